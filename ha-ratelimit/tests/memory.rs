//! Key state is bounded in bytes, not only in keys, and `state_bytes` counts what is really held
//! (measured by a counting global allocator, which counts every thread's allocations). So that
//! no other thread allocates inside the measured window, this file holds one test and runs it on
//! the main thread with no other thread alive (`harness = false`, libtest-mimic with one
//! thread): libtest's harness does its own bookkeeping on the main thread while the test thread
//! starts, and 900 bytes of it landed in the window in about one run of fifteen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use governor::clock::FakeRelativeClock;
use ha_ratelimit::{Decision, Key, LimitConfig, Limiter, Rate, RateLimitConfig};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not freed since `region` started (stats_alloc counts a realloc's growth
/// in `bytes_allocated` already).
fn held(region: &Region<System>) -> i64 {
    let c = region.change();
    c.bytes_allocated as i64 - c.bytes_deallocated as i64
}

fn main() -> std::process::ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let tests = vec![libtest_mimic::Trial::test(
        "huge_keys_are_bounded_in_bytes_and_state_bytes_is_what_is_held",
        || {
            huge_keys_are_bounded_in_bytes_and_state_bytes_is_what_is_held();
            Ok(())
        },
    )];
    libtest_mimic::run(&args, tests).exit_code()
}

fn huge_keys_are_bounded_in_bytes_and_state_bytes_is_what_is_held() {
    const CAP: usize = 2000;
    // The review's case: a 2 000-key cap fed 64 KiB keys. Each key was kept whole (RSS grew by
    // 124 MiB) while state_bytes() reported 211 KB.
    let mut cfg = RateLimitConfig::with_limits(vec![
        LimitConfig::new("long", "k", Rate::per_second(10))
            .burst(5)
            .nodelay(),
    ]);
    cfg.max_keys = CAP;
    // The longest key a line accepts (a longer one skips the line, as in nginx).
    let mut key = vec![0u8; ha_ratelimit::MAX_KEY_LEN];
    let region = Region::new(GLOBAL);
    let l = Limiter::builder(cfg)
        .clock(FakeRelativeClock::default())
        .build()
        .unwrap();
    // The first check on a thread makes arc-swap register the thread (a node it keeps for
    // good); an empty key skips the line, so this changes no key state.
    assert_eq!(l.check(Key::NONE), Decision::Allow);
    // What the limiter holds besides its key state: the plan, names, metric handles.
    let fixed = held(&region) - l.state_bytes("long").unwrap() as i64;
    assert!(
        fixed >= 0,
        "state_bytes reports more than was allocated: {fixed}"
    );
    let mut peak = 0usize;
    for i in 0..3 * CAP as u64 {
        key[..8].copy_from_slice(&i.to_be_bytes());
        assert_eq!(l.check(Key::bytes(&key)), Decision::Allow, "key {i}");
        if i % 250 == 249 {
            let reported = l.state_bytes("long").unwrap();
            peak = peak.max(reported);
            let now = held(&region) - fixed;
            // True: what the limiter holds for its keys is what it reports (to the byte).
            assert_eq!(now, reported as i64, "after {} keys", i + 1);
            let tracked = l.tracked_keys("long").unwrap();
            assert!(
                tracked <= CAP && tracked >= (i as usize + 1).min(CAP) / 2,
                "{tracked}"
            );
        }
    }
    // Bounded in bytes whatever the keys' length: well under 256 bytes per key of the cap (the
    // 64 KiB keys themselves would be 125 MiB).
    assert!(peak <= CAP * 256, "{peak} bytes for {CAP} keys");
    // The keys are still told apart: the last one is tracked (its bucket fills), and a key
    // differing from it in the last byte only is a new key.
    for _ in 0..5 {
        assert_eq!(l.check(Key::bytes(&key)), Decision::Allow);
    }
    assert!(l.check(Key::bytes(&key)).is_reject());
    let last = key.len() - 1;
    key[last] = 1;
    assert_eq!(l.check(Key::bytes(&key)), Decision::Allow);
}
