//! nginx `limit_req` behaviour, request by request, on governor's fake clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use ha_ratelimit::{
    Alert, AlertKind, Decision, Key, LimitConfig, Limiter, Rate, RateLimitConfig, Share,
};

const A: Decision = Decision::Allow;
fn d(ms: u64) -> Decision {
    Decision::Delay(Duration::from_millis(ms))
}
fn is_r(x: &Decision) -> bool {
    x.is_reject()
}

fn limiter(lines: Vec<LimitConfig>) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let l = Limiter::builder(RateLimitConfig::with_limits(lines))
        .clock(clock.clone())
        .build()
        .unwrap();
    (l, clock)
}

/// Runs `(time ms, key)` requests and returns the decisions.
fn run(lines: Vec<LimitConfig>, reqs: &[(u64, &str)]) -> Vec<Decision> {
    let (l, clock) = limiter(lines);
    let mut now = 0;
    reqs.iter()
        .map(|&(t, k)| {
            clock.advance(Duration::from_millis(t - now));
            now = t;
            l.check(Key::str(k))
        })
        .collect()
}

fn line(rate: &str, burst: u64) -> LimitConfig {
    LimitConfig::new("one", "k", rate.parse().unwrap()).burst(burst)
}

#[test]
fn empty_bucket_admits_one_plus_burst() {
    let got = run(vec![line("10r/s", 5).nodelay()], &[(0, "a"); 20]);
    assert_eq!(got.iter().filter(|x| **x == A).count(), 6);
    assert!(got[6..].iter().all(is_r));
}

#[test]
fn delay_splits_the_burst() {
    let got = run(vec![line("10r/s", 8).delay(4)], &[(0, "a"); 10]);
    assert_eq!(got[..9], [A, A, A, A, A, d(100), d(200), d(300), d(400)]);
    assert!(is_r(&got[9]));
}

#[test]
fn without_nodelay_every_excess_request_is_held() {
    let got = run(vec![line("10r/s", 5)], &[(0, "a"); 7]);
    assert_eq!(got[..6], [A, d(100), d(200), d(300), d(400), d(500)]);
    assert!(is_r(&got[6]));
}

#[test]
fn nodelay_changes_only_holding() {
    let reqs: Vec<(u64, &str)> = (0..40).map(|i| (i * 37 / 3, "a")).collect();
    let held = run(vec![line("10r/s", 8).delay(2)], &reqs);
    let nodelay = run(vec![line("10r/s", 8).nodelay()], &reqs);
    let all = run(vec![line("10r/s", 8)], &reqs);
    for i in 0..reqs.len() {
        assert_eq!(held[i].is_reject(), nodelay[i].is_reject(), "request {i}");
        assert_eq!(all[i].is_reject(), nodelay[i].is_reject(), "request {i}");
        assert!(!matches!(nodelay[i], Decision::Delay(_)));
    }
}

#[test]
fn reject_is_strict_and_changes_nothing() {
    // excess' == burst*1000 still passes.
    let got = run(
        vec![line("10r/s", 1).nodelay()],
        &[(0, "a"), (0, "a"), (0, "a")],
    );
    assert_eq!(got[..2], [A, A]);
    assert!(is_r(&got[2]));
    // 10 r/s, burst 0, every 92 ms: the rejected one does not count, so they alternate.
    let reqs: Vec<(u64, &str)> = (0..10).map(|i| (i * 92, "a")).collect();
    let got = run(vec![line("10r/s", 0)], &reqs);
    for (i, x) in got.iter().enumerate() {
        assert_eq!(
            x.is_reject(),
            i % 2 == 1,
            "request {i} at {} ms: {x:?}",
            i * 92
        );
    }
}

#[test]
fn per_minute_rates_truncate_like_nginx() {
    // 7r/m is 116 milli-requests/s: the next request passes after ceil(1000*1000/116) = 8621 ms.
    let got = run(
        vec![line("7r/m", 0)],
        &[(0, "a"), (1, "a"), (8620, "a"), (8621, "a")],
    );
    assert_eq!(got[0], A);
    assert_eq!(
        got[1],
        Decision::Reject {
            retry_after: Duration::from_millis(8620)
        }
    );
    assert!(is_r(&got[2]));
    assert_eq!(got[3], A);
}

#[test]
fn retry_after_is_when_the_same_request_passes() {
    let (l, clock) = limiter(vec![line("3r/s", 2).nodelay()]);
    let k = Key::str("a");
    for _ in 0..3 {
        assert_eq!(l.check(k), A);
    }
    clock.advance(Duration::from_millis(17));
    let Decision::Reject { retry_after } = l.check(k) else {
        panic!()
    };
    clock.advance(retry_after - Duration::from_millis(1));
    assert!(l.check(k).is_reject());
    clock.advance(Duration::from_millis(1));
    assert_eq!(l.check(k), A);
}

#[test]
fn keys_are_independent_and_empty_keys_skip() {
    let got = run(
        vec![line("1r/s", 0)],
        &[(0, "a"), (0, "b"), (0, "a"), (0, ""), (0, ""), (0, "")],
    );
    assert_eq!(got[..2], [A, A]);
    assert!(is_r(&got[2]));
    assert_eq!(got[3..], [A, A, A]);
    let (l, _) = limiter(vec![line("1r/s", 0)]);
    let long = vec![b'x'; 65536];
    for _ in 0..3 {
        assert_eq!(l.check(Key::bytes(&long)), A);
        assert_eq!(l.check(Key::NONE), A);
    }
    assert_eq!(l.tracked_keys("one"), Some(0));
}

fn two_lines(per_key_first: bool) -> Vec<LimitConfig> {
    let per_key = LimitConfig::new("per_key", "member", Rate::per_second(1)).nodelay();
    let server = LimitConfig::new("server", "server", Rate::per_second(1))
        .burst(1)
        .nodelay();
    if per_key_first {
        vec![per_key, server]
    } else {
        vec![server, per_key]
    }
}

#[test]
fn a_rejection_charges_no_line_and_order_does_not_matter() {
    for order in [true, false] {
        let (l, clock) = limiter(two_lines(order));
        let check = |member: &'static str| {
            l.check_with(|src| {
                if src == "server" {
                    Key::global()
                } else {
                    Key::str(member)
                }
            })
        };
        assert_eq!(check("a"), A); // server 0
        assert!(check("a").is_reject()); // per-key rejects; server not charged
        assert_eq!(check("b"), A); // server 1000 == burst: passes
        assert!(check("c").is_reject()); // server rejects; c not charged
        assert_eq!(l.tracked_keys("per_key"), Some(2), "order {order}");
        clock.advance(Duration::from_millis(1000));
        assert_eq!(check("c"), A, "c was not charged (order {order})");
    }
}

#[test]
fn largest_hold_wins_and_nodelay_does_not_cancel() {
    let (l, _) = limiter(vec![
        LimitConfig::new("fast", "k", Rate::per_second(10)).burst(5),
        LimitConfig::new("slow", "k", Rate::per_second(5)).burst(5),
        LimitConfig::new("free", "k", Rate::per_second(1))
            .burst(5)
            .nodelay(),
    ]);
    let k = Key::str("a");
    assert_eq!(l.check(k), A);
    assert_eq!(l.check(k), d(200));
    assert_eq!(l.check(k), d(400));
}

#[test]
fn hot_reload_keeps_state() {
    let (l, _) = limiter(vec![line("1r/s", 2).nodelay()]);
    let k = Key::str("a");
    for _ in 0..3 {
        assert_eq!(l.check(k), A);
    }
    assert!(l.check(k).is_reject());
    l.reload(RateLimitConfig::with_limits(vec![
        line("2r/s", 3).nodelay(),
    ]))
    .unwrap();
    assert_eq!(l.rate("one"), Some(Rate::per_second(2)));
    // The bucket is still at 2000: one more fits in burst 3, then it is full.
    assert_eq!(l.check(k), A);
    assert!(l.check(k).is_reject());
    // A bad config changes nothing.
    let mut bad = line("2r/s", 3);
    bad.delay = Some(1);
    bad.nodelay = true;
    assert!(l.reload(RateLimitConfig::with_limits(vec![bad])).is_err());
    assert!(l.check(k).is_reject());
    // A renamed line starts empty; the old one's keys are gone.
    let mut renamed = line("2r/s", 3).nodelay();
    renamed.name = "two".into();
    l.reload(RateLimitConfig::with_limits(vec![renamed]))
        .unwrap();
    assert_eq!(l.check(k), A);
    assert_eq!(l.tracked_keys("one"), None);
}

#[test]
fn a_reload_that_changes_max_keys_keeps_state() {
    let (l, _) = limiter(vec![line("1r/s", 2).nodelay()]);
    let k = Key::str("a");
    for _ in 0..3 {
        assert_eq!(l.check(k), A);
    }
    for max_keys in [1_000_000, 100, 100_000] {
        let mut cfg = RateLimitConfig::with_limits(vec![line("1r/s", 2).nodelay()]);
        cfg.max_keys = max_keys;
        l.reload(cfg).unwrap();
        // The bucket is still full after each rebuild of the key table.
        assert!(l.check(k).is_reject(), "max_keys {max_keys}");
        assert_eq!(l.tracked_keys("one"), Some(1));
    }
    let mut cfg = RateLimitConfig::with_limits(vec![line("1r/s", 2)]);
    cfg.max_keys = ha_ratelimit::config::MAX_KEYS + 1;
    let err = l.reload(cfg).unwrap_err();
    assert!(err.to_string().contains("max_keys"), "{err}");
}

#[test]
fn sweep_drops_drained_keys_only() {
    let (l, clock) = limiter(vec![line("10r/s", 5).nodelay()]);
    for i in 0..100u64 {
        l.check(Key::u64(i));
    }
    for _ in 0..5 {
        l.check(Key::u64(7));
    }
    assert_eq!(l.tracked_keys("one"), Some(100));
    clock.advance(Duration::from_millis(100));
    // Idle 100 ms at 10 r/s: every key with excess 0 has drained; key 7 (excess 4000) has not.
    assert_eq!(l.sweep(), 99);
    assert_eq!(l.tracked_keys("one"), Some(1));
    assert_eq!(l.check(Key::u64(7)), A);
    assert!(l.check(Key::u64(7)).is_reject());
}

#[test]
fn memory_is_bounded_by_the_cap() {
    let mut cfg = RateLimitConfig::with_limits(vec![line("10r/s", 5).nodelay()]);
    cfg.max_keys = 1000;
    let clock = FakeRelativeClock::default();
    let alerts = Arc::new(parking_lot::Mutex::new(Vec::<Alert>::new()));
    let sink = alerts.clone();
    let l = Limiter::builder(cfg)
        .clock(clock.clone())
        .on_alert(move |a| sink.lock().push(a.clone()))
        .build()
        .unwrap();
    for i in 0..100_000u64 {
        assert_eq!(l.check(Key::u64(i)), A);
        assert!(l.tracked_keys("one").unwrap() <= 1000);
    }
    // None had drained (no time passed): keys were dropped by force, and that alerted once.
    let got = alerts.lock().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, AlertKind::KeysEvicted);
    // Once time passes, new keys replace drained ones without force.
    clock.advance(Duration::from_secs(1));
    for i in 0..5000u64 {
        l.check(Key::u64(1_000_000 + i));
    }
    assert!(l.tracked_keys("one").unwrap() <= 1000);
}

fn topology(capacity: &str) -> ha_core::Topology {
    ha_core::Topology::from_toml_str(
        &format!(
            r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15353"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
{capacity}
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[dependencies.profile]
static_addrs = ["127.0.1.11:8080"]
"#
        ),
        "t.toml",
    )
    .unwrap()
}

fn share_line(idc: &str, fraction: f64) -> LimitConfig {
    LimitConfig::share(
        "route",
        "route",
        Share {
            idc: idc.into(),
            fraction,
        },
    )
    .burst(10_000)
    .nodelay()
}

#[test]
fn capacity_share_is_derived_and_rederived() {
    let topo = topology("capacity_rps = 2000");
    let l = Limiter::builder(RateLimitConfig::with_limits(vec![share_line("bj-a", 0.8)]))
        .topology(&topo)
        .instances(4)
        .clock(FakeRelativeClock::default())
        .build()
        .unwrap();
    assert_eq!(l.rate("route"), Some(Rate::per_second(400)));
    for _ in 0..3 {
        l.check(Key::str("/members"));
    }
    l.set_instances(5).unwrap();
    assert_eq!(l.rate("route"), Some(Rate::per_second(320)));
    l.set_topology(&topology("capacity_rps = 1000")).unwrap();
    assert_eq!(l.rate("route"), Some(Rate::per_second(160)));
    l.set_capacity("bj-a", 3000.0).unwrap();
    assert_eq!(l.rate("route"), Some(Rate::per_second(480)));
    assert_eq!(
        l.tracked_keys("route"),
        Some(1),
        "state kept across re-derivations"
    );
    assert!(l.set_instances(0).is_err());
    assert_eq!(l.rate("route"), Some(Rate::per_second(480)));

    let e = Limiter::builder(RateLimitConfig::with_limits(vec![share_line("bj-b", 0.5)]))
        .topology(&topo)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "limit[0].share.idc");
    assert!(e.reason().contains("capacity"), "{e}");
    let e = Limiter::builder(RateLimitConfig::with_limits(vec![share_line("xx", 0.5)]))
        .topology(&topo)
        .build()
        .unwrap_err();
    assert!(e.reason().contains("no such IDC"), "{e}");
    let e = Limiter::builder(RateLimitConfig::with_limits(vec![share_line("bj-a", 0.5)]))
        .build()
        .unwrap_err();
    assert!(e.reason().contains("topology"), "{e}");
}

fn recording(
    cfg: RateLimitConfig,
    topo: Option<&ha_core::Topology>,
) -> (
    Limiter<FakeRelativeClock>,
    FakeRelativeClock,
    Arc<parking_lot::Mutex<Vec<Alert>>>,
) {
    let clock = FakeRelativeClock::default();
    let alerts = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = alerts.clone();
    let mut b = Limiter::builder(cfg)
        .clock(clock.clone())
        .on_alert(move |a| sink.lock().push(a.clone()));
    if let Some(t) = topo {
        b = b.topology(t);
    }
    (b.build().unwrap(), clock, alerts)
}

#[test]
fn rejection_alerts_are_debounced() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let (l, clock, alerts) =
            recording(RateLimitConfig::with_limits(vec![line("1r/s", 0)]), None);
        let k = Key::str("a");
        l.check(k);
        for _ in 0..1000 {
            assert!(l.check(k).is_reject());
        }
        assert_eq!(alerts.lock().len(), 1);
        clock.advance(Duration::from_millis(9_999));
        l.check(k);
        l.check(k);
        assert_eq!(alerts.lock().len(), 1);
        clock.advance(Duration::from_millis(1));
        l.check(k);
        let got = alerts.lock().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].kind, AlertKind::Rejected);
        assert_eq!(got[1].suppressed, 1000);
        let snap = snapshotter.snapshot().into_vec();
        let value = |name: &str| {
            snap.iter()
                .filter(|(k, ..)| k.key().name() == name)
                .map(|(.., v)| match v {
                    metrics_util::debugging::DebugValue::Counter(c) => *c,
                    _ => 0,
                })
                .sum::<u64>()
        };
        // 1000 + the second at 9 999 ms + the one at 10 000 ms.
        assert_eq!(value("ha_ratelimit_rejected_total"), 1002);
        assert_eq!(value("ha_ratelimit_alerts_total"), 2);
    });
}

#[test]
fn near_capacity_alerts_from_the_measured_window() {
    let topo = topology("capacity_rps = 10");
    let (l, clock, alerts) = recording(
        RateLimitConfig::with_limits(vec![share_line("bj-a", 1.0)]),
        Some(&topo),
    );
    // 5 r/s for two seconds: half the share, no alert.
    for _ in 0..10 {
        l.check(Key::str("/"));
        clock.advance(Duration::from_millis(200));
    }
    assert!(alerts.lock().is_empty());
    // 9 r/s: over 0.8 of 10 r/s.
    for _ in 0..30 {
        l.check(Key::str("/"));
        clock.advance(Duration::from_millis(111));
    }
    let got = alerts.lock().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].kind, AlertKind::NearCapacity);
    let (idc, measured, limit) = got[0].load.clone().unwrap();
    assert_eq!(&*idc, "bj-a");
    assert!(measured >= 8.0 && limit == 10.0, "{measured} {limit}");
}

#[test]
fn dry_run_counts_but_never_limits() {
    let mut cfg = RateLimitConfig::with_limits(vec![line("1r/s", 0)]);
    cfg.dry_run = true;
    let (l, _, alerts) = recording(cfg, None);
    for _ in 0..5 {
        assert_eq!(l.check(Key::str("a")), A);
    }
    assert_eq!(alerts.lock().len(), 1);
}

/// A hot reload is seen by checks on every thread, and an alert hook may check a limiter from
/// inside a check (re-entrancy).
#[test]
fn reloads_reach_every_thread_and_alert_hooks_may_check() {
    let (l, _clock) = limiter(vec![line("1r/s", 0).nodelay()]);
    let l = Arc::new(l);
    // Warm this thread's cache and another thread's.
    assert_eq!(l.check(Key::str("a")), Decision::Allow);
    let l2 = l.clone();
    std::thread::spawn(move || assert_eq!(l2.check(Key::str("b")), Decision::Allow))
        .join()
        .unwrap();
    assert!(l.check(Key::str("a")).is_reject());
    // Reload with a larger burst: both threads see it on their next check.
    l.reload(RateLimitConfig::with_limits(vec![
        line("1r/s", 5).nodelay(),
    ]))
    .unwrap();
    assert_eq!(l.check(Key::str("a")), Decision::Allow);
    let l2 = l.clone();
    std::thread::spawn(move || assert_eq!(l2.check(Key::str("b")), Decision::Allow))
        .join()
        .unwrap();

    // An alert hook that checks another limiter while the first one's check is running.
    let inner = Arc::new(limiter(vec![line("1r/s", 0).nodelay()]).0);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (inner2, seen2) = (inner.clone(), seen.clone());
    let cfg = RateLimitConfig::with_limits(vec![line("1r/s", 0).nodelay()]);
    let outer = Limiter::builder(cfg)
        .clock(FakeRelativeClock::default())
        .on_alert(move |_| seen2.lock().push(inner2.check(Key::str("x"))))
        .build()
        .unwrap();
    assert_eq!(outer.check(Key::str("k")), Decision::Allow);
    assert!(outer.check(Key::str("k")).is_reject());
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 1, "one debounced rejection alert");
    assert_eq!(
        seen[0],
        Decision::Allow,
        "the re-entrant check ran on the inner limiter"
    );
}

/// A zero rate (`Rate::per_second(0)`, `Rate::per_minute(0)`) is refused when the configuration
/// is validated, built or reloaded, with an error naming the limit; it never reaches a check (it
/// used to pass and then panic dividing by zero on the second request).
#[test]
fn a_zero_rate_is_a_config_error_naming_the_limit() {
    for zero in [Rate::per_second(0), Rate::per_minute(0)] {
        let cfg = RateLimitConfig::with_limits(vec![
            line("1r/s", 0),
            LimitConfig::new("zero", "k", zero).burst(1),
        ]);
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field(), "limit[1].rate", "{e}");
        assert_eq!(e.value(), "0r/s", "{e}");
        assert_eq!(e.limit(), Some("zero"), "{e}");
        assert_eq!(e.limit_index(), Some(1), "{e}");
        assert!(e.to_string().contains("zero"), "{e}");
        let e = Limiter::builder(cfg.clone()).build().unwrap_err();
        assert_eq!(e.field(), "limit[1].rate", "{e}");
        // A running limiter refuses it on reload and keeps deciding.
        let (l, _) = limiter(vec![line("1r/s", 0)]);
        assert!(l.reload(cfg).is_err());
        assert_eq!(l.check(Key::str("a")), A);
        assert!(l.check(Key::str("a")).is_reject());
    }
}
