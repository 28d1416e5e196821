//! Several lines are checked and charged as one step: two threads in lockstep on a frozen clock
//! get exactly what serial nginx gives (NGINX-LIMIT-REQ.md rule 11), key after key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use ha_ratelimit::{Decision, Key, LimitConfig, Limiter, Rate, RateLimitConfig};

const KEYS: u64 = 20_000;

/// The tests of this file run one at a time: each keeps both cores busy.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// A barrier for two threads that spins, so that both leave it within nanoseconds of each other
/// (a parked thread that `std::sync::Barrier` wakes starts tens of microseconds after the one
/// that woke it, long after that one's checks are done). It yields after a while, for a machine
/// whose cores are busy with other work.
#[derive(Default)]
struct Lockstep {
    arrived: AtomicUsize,
    round: AtomicUsize,
}

impl Lockstep {
    fn wait(&self) {
        let round = self.round.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) == 1 {
            self.arrived.store(0, Ordering::Relaxed);
            self.round.store(round + 1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.round.load(Ordering::Acquire) == round {
            spins += 1;
            if spins < 2_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Two threads, started together by a `Barrier`; for every key, both meet in lockstep and then
/// send `per_thread` requests for it, all at the same (frozen) ms. Returns each key's decisions,
/// both threads' together.
fn lockstep(lines: Vec<LimitConfig>, per_thread: usize) -> Vec<Vec<Decision>> {
    let l = Arc::new(
        Limiter::builder(RateLimitConfig::with_limits(lines))
            .clock(FakeRelativeClock::default())
            .build()
            .unwrap(),
    );
    let barrier = Arc::new(Barrier::new(2));
    let step = Arc::new(Lockstep::default());
    let run = || {
        let (l, barrier, step) = (l.clone(), barrier.clone(), step.clone());
        std::thread::spawn(move || {
            let mut out = Vec::with_capacity(KEYS as usize);
            barrier.wait();
            for k in 0..KEYS {
                step.wait();
                let got: Vec<Decision> = (0..per_thread)
                    .map(|_| {
                        l.check_with(|src| match src {
                            "server" => Key::global(),
                            _ => Key::u64(k),
                        })
                    })
                    .collect();
                out.push(got);
            }
            out
        })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    a.into_iter()
        .zip(b)
        .map(|(mut x, y)| {
            x.extend(y);
            x
        })
        .collect()
}

#[test]
fn two_threads_never_pass_more_than_serial_nginx() {
    let _one = ONE_AT_A_TIME.lock();
    // A per-key line with burst 2 and a server-wide line that never rejects here: 6 requests per
    // key on a frozen clock, of which serial nginx admits exactly 1 + 2 (either line order).
    for per_key_first in [true, false] {
        let per_key = LimitConfig::new("per_key", "member", Rate::per_second(1))
            .burst(2)
            .nodelay();
        let server = LimitConfig::new("server", "server", Rate::per_second(1))
            .burst(6 * KEYS)
            .nodelay();
        let lines = if per_key_first {
            vec![per_key, server]
        } else {
            vec![server, per_key]
        };
        let got = lockstep(lines, 3);
        let wrong: Vec<(usize, usize)> = got
            .iter()
            .map(|d| d.iter().filter(|d| d.is_admitted()).count())
            .enumerate()
            .filter(|&(_, admitted)| admitted != 3)
            .collect();
        assert!(
            wrong.is_empty(),
            "per-key line first: {per_key_first}: {} of {KEYS} keys admitted other than 3, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

#[test]
fn two_threads_get_serial_nginx_holds() {
    let _one = ONE_AT_A_TIME.lock();
    // Two lines on the same key, every excess request held: 20 r/s (a step of 50 ms) and 5 r/s
    // (200 ms). Serially the first request passes at once and the second is held by the larger
    // hold, max(50, 200) = 200 ms: {0, 200}, never {50, 200}.
    for fast_first in [true, false] {
        let fast = LimitConfig::new("fast", "member", Rate::per_second(20)).burst(4);
        let slow = LimitConfig::new("slow", "member", Rate::per_second(5)).burst(4);
        let lines = if fast_first {
            vec![fast, slow]
        } else {
            vec![slow, fast]
        };
        let want = vec![Decision::Allow, Decision::Delay(Duration::from_millis(200))];
        let wrong: Vec<(usize, Vec<Decision>)> = lockstep(lines, 1)
            .into_iter()
            .map(|mut d| {
                d.sort_by_key(|d| match d {
                    Decision::Allow => Duration::ZERO,
                    Decision::Delay(h) => *h,
                    Decision::Reject { .. } => Duration::MAX,
                });
                d
            })
            .enumerate()
            .filter(|(_, d)| *d != want)
            .collect();
        assert!(
            wrong.is_empty(),
            "fast line first: {fast_first}: {} of {KEYS} keys got other holds than {{0, 200}} ms, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }
}
