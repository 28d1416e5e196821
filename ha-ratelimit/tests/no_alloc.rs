//! A check for a key already tracked does not allocate (counted by a global allocator).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use ha_ratelimit::{Key, LimitConfig, Limiter, Rate, RateLimitConfig};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn existing_key_check_does_not_allocate() {
    let cfg = RateLimitConfig::with_limits(vec![
        LimitConfig::new("per_ip", "ip", Rate::per_second(1_000_000))
            .burst(1000)
            .delay(10),
        LimitConfig::new("server", "server", Rate::per_second(1_000_000))
            .burst(1000)
            .nodelay(),
    ]);
    let limiter = Limiter::builder(cfg).build().unwrap();
    let ips: Vec<std::net::IpAddr> = (0..64u8).map(|i| [127, 0, 1, i].into()).collect();
    for ip in &ips {
        limiter.check_with(|src| {
            if src == "server" {
                Key::global()
            } else {
                Key::ip(*ip)
            }
        });
    }
    let region = Region::new(GLOBAL);
    for _ in 0..100 {
        for ip in &ips {
            let d = limiter.check_with(|src| {
                if src == "server" {
                    Key::global()
                } else {
                    Key::ip(*ip)
                }
            });
            std::hint::black_box(d);
        }
    }
    let change = region.change();
    assert_eq!(change.allocations, 0, "{change:?}");
    assert_eq!(change.reallocations, 0, "{change:?}");
}
