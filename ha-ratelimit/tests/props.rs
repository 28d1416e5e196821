//! Property tests: the burst bound, agreement with governor, nodelay, line order, eviction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use ha_ratelimit::{Decision, Key, LimitConfig, Limiter, Rate, RateLimitConfig};
use proptest::prelude::*;

fn build(lines: Vec<LimitConfig>) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let mut cfg = RateLimitConfig::with_limits(lines);
    // Three keys: a small zone (1 024 shards rather than the default's 131 072) keeps
    // `sweep_each`, which walks every shard after every request, fast in a debug build.
    cfg.max_keys = 1000;
    let l = Limiter::builder(cfg).clock(clock.clone()).build().unwrap();
    (l, clock)
}

/// Requests as (gap ms since the previous, key index).
fn reqs() -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec(
        (prop_oneof![Just(0u64), 0u64..50, 0u64..1500], 0u8..3),
        1..120,
    )
}

fn run(lines: Vec<LimitConfig>, reqs: &[(u64, u8)], sweep_each: bool) -> Vec<(u64, Decision)> {
    let (l, clock) = build(lines);
    let mut t = 0;
    reqs.iter()
        .map(|&(gap, k)| {
            clock.advance(Duration::from_millis(gap));
            t += gap;
            let d = l.check(Key::u64(u64::from(k)));
            if sweep_each {
                l.sweep();
            }
            (t, d)
        })
        .collect()
}

fn mode(line: LimitConfig, m: u8, burst: u64) -> LimitConfig {
    match m {
        0 => line.nodelay(),
        1 => line.delay(burst / 2),
        _ => line,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No key ever passes more than rate × t + (burst + 1) in any window of t ms (burst + 1 is
    /// GCRA's burst capacity: nginx admits 1 + burst at once).
    #[test]
    fn never_more_than_rate_times_t_plus_burst(
        reqs in reqs(), rate in 1u64..30, per_min in any::<bool>(), burst in 0u64..6, m in 0u8..3,
    ) {
        let r = if per_min { Rate::per_minute(rate * 7) } else { Rate::per_second(rate) };
        let out = run(vec![mode(LimitConfig::new("l", "k", r).burst(burst), m, burst)], &reqs, false);
        for key in 0u8..3 {
            let times: Vec<u64> = reqs.iter().zip(&out)
                .filter(|((_, k), (_, d))| *k == key && d.is_admitted())
                .map(|(_, (t, _))| *t)
                .collect();
            for i in 0..times.len() {
                for j in i..times.len() {
                    let n = (j - i + 1) as u64;
                    let window = times[j] - times[i];
                    // n ≤ rate_m × window / 1e6 + burst + 1, in integers.
                    prop_assert!(
                        n * 1_000_000 <= r.milli_per_sec() * window + (burst + 1) * 1_000_000,
                        "{n} admitted in {window} ms at {r} burst {burst}"
                    );
                }
            }
        }
    }

    /// Where nginx's integers are exact (whole r/s dividing 1e9 ns, whole-ms times), the
    /// admissions are governor's GCRA with burst capacity burst + 1, request by request.
    #[test]
    fn agrees_with_governor(
        reqs in reqs(),
        rate in prop::sample::select(vec![1u32, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 250, 1000]),
        burst in 0u32..6,
    ) {
        let ours = run(
            vec![LimitConfig::new("l", "k", Rate::per_second(u64::from(rate))).burst(u64::from(burst)).nodelay()],
            &reqs,
            false,
        );
        let clock = FakeRelativeClock::default();
        let quota = Quota::per_second(NonZeroU32::new(rate).unwrap())
            .allow_burst(NonZeroU32::new(burst + 1).unwrap());
        let gov = RateLimiter::hashmap_with_clock(quota, clock.clone());
        for (i, &(gap, k)) in reqs.iter().enumerate() {
            clock.advance(Duration::from_millis(gap));
            let g = gov.check_key(&k).is_ok();
            prop_assert_eq!(g, ours[i].1.is_admitted(), "request {} at {} ms", i, ours[i].0);
        }
    }

    /// delay=N and nodelay change only holding, never who passes.
    #[test]
    fn modes_admit_the_same(reqs in reqs(), rate in 1u64..30, burst in 0u64..8) {
        let line = || LimitConfig::new("l", "k", Rate::per_second(rate)).burst(burst);
        let a = run(vec![line().nodelay()], &reqs, false);
        let b = run(vec![line().delay(burst / 2)], &reqs, false);
        let c = run(vec![line()], &reqs, false);
        for i in 0..reqs.len() {
            prop_assert_eq!(a[i].1.is_admitted(), b[i].1.is_admitted());
            prop_assert_eq!(a[i].1.is_admitted(), c[i].1.is_admitted());
            prop_assert_eq!(a[i].1, if a[i].1.is_admitted() { Decision::Allow } else { a[i].1 });
        }
    }

    /// Evicting drained keys after every request changes no decision.
    #[test]
    fn sweeping_drained_keys_changes_nothing(reqs in reqs(), rate in 1u64..30, burst in 0u64..6, m in 0u8..3) {
        let line = || mode(LimitConfig::new("l", "k", Rate::per_second(rate)).burst(burst), m, burst);
        prop_assert_eq!(run(vec![line()], &reqs, false), run(vec![line()], &reqs, true));
    }

    /// With several lines, their order changes no decision.
    #[test]
    fn line_order_does_not_matter(reqs in reqs(), r1 in 1u64..20, r2 in 1u64..20, b1 in 0u64..4, b2 in 0u64..6) {
        let per_key = LimitConfig::new("per_key", "member", Rate::per_second(r1)).burst(b1);
        let server = LimitConfig::new("server", "server", Rate::per_second(r2)).burst(b2).delay(1);
        let go = |lines: Vec<LimitConfig>| {
            let (l, clock) = build(lines);
            reqs.iter().map(|&(gap, k)| {
                clock.advance(Duration::from_millis(gap));
                l.check_with(|src| if src == "server" { Key::global() } else { Key::u64(u64::from(k)) })
            }).collect::<Vec<_>>()
        };
        prop_assert_eq!(go(vec![per_key.clone(), server.clone()]), go(vec![server, per_key]));
    }
}
