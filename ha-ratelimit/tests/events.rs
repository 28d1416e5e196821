//! Alerts go onto ha-core's EventBus as `TopologyEvent::RateLimitAlert`, as well as to the
//! alert hook, with the same debouncing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use ha_core::{EventBus, TopologyEvent};
use ha_ratelimit::{Alert, AlertKind, Key, LimitConfig, Limiter, Rate, RateLimitConfig, Share};

/// Every event on the bus so far, as (limit, kind, suppressed, detail).
fn drain(
    rx: &mut tokio::sync::broadcast::Receiver<TopologyEvent>,
) -> Vec<(String, &'static str, u64, String)> {
    let mut out = Vec::new();
    while let Ok(event) = rx.try_recv() {
        match event {
            TopologyEvent::RateLimitAlert {
                limit,
                kind,
                suppressed,
                detail,
                ..
            } => out.push((limit.to_string(), kind, suppressed, detail.to_string())),
            other => panic!("not a rate-limit alert: {other:?}"),
        }
    }
    out
}

#[test]
fn alerts_are_published_on_the_event_bus_and_to_the_hook() {
    let bus = EventBus::new(64);
    let mut rx = bus.subscribe();
    let hooked = Arc::new(parking_lot::Mutex::new(Vec::<Alert>::new()));
    let sink = hooked.clone();
    let clock = FakeRelativeClock::default();
    let mut cfg = RateLimitConfig::with_limits(vec![
        LimitConfig::new("per_ip", "k", Rate::per_second(1)).nodelay(),
    ]);
    cfg.max_keys = 10;
    let l = Limiter::builder(cfg)
        .clock(clock.clone())
        .events(bus.clone())
        .on_alert(move |a| sink.lock().push(a.clone()))
        .build()
        .unwrap();

    // Rejections: one alert per interval, the others counted in the next one.
    let k = Key::str("a");
    l.check(k);
    for _ in 0..5 {
        assert!(l.check(k).is_reject());
    }
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((&*got[0].0, got[0].1, got[0].2), ("per_ip", "rejected", 0));
    assert!(got[0].3.contains("1r/s"), "{got:?}");
    clock.advance(Duration::from_secs(10));
    l.check(k);
    l.check(k);
    let got = drain(&mut rx);
    assert_eq!(
        got.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(),
        [("rejected", 4)]
    );

    // Keys dropped by force at the cap.
    for i in 0..20u64 {
        l.check(Key::u64(i));
    }
    let got = drain(&mut rx);
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        ["keys_evicted"]
    );
    assert!(got[0].3.contains("10 keys"), "{got:?}");

    // The hook saw the same alerts.
    let hooked: Vec<AlertKind> = hooked.lock().iter().map(|a| a.kind).collect();
    assert_eq!(
        hooked,
        [
            AlertKind::Rejected,
            AlertKind::Rejected,
            AlertKind::KeysEvicted
        ]
    );
}

#[test]
fn near_capacity_is_published_with_the_load() {
    let topo = ha_core::Topology::from_toml_str(
        r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15353"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
capacity_rps = 20
[dependencies.profile]
static_addrs = ["127.0.1.11:8080"]
"#,
        "t.toml",
    )
    .unwrap();
    let bus = EventBus::new(64);
    let mut rx = bus.subscribe();
    let clock = FakeRelativeClock::default();
    let share = Share {
        idc: "bj-a".into(),
        fraction: 1.0,
    };
    let l = Limiter::builder(RateLimitConfig::with_limits(vec![
        LimitConfig::share("route", "route", share)
            .burst(1000)
            .nodelay(),
    ]))
    .topology(&topo)
    .instances(2)
    .clock(clock.clone())
    .events(bus)
    .build()
    .unwrap();
    // 9.5 r/s on an instance whose share is 20 / 2 = 10 r/s: over 0.8 of it.
    for _ in 0..40 {
        l.check(Key::str("/"));
        clock.advance(Duration::from_millis(105));
    }
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((&*got[0].0, got[0].1), ("route", "near_capacity"));
    assert!(got[0].3.contains("bj-a"), "{got:?}");
}
