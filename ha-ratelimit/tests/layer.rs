//! The tower layer under concurrency, on paused tokio time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ha_core::HaError;
use ha_ratelimit::{Key, LimitConfig, Limiter, Rate, RateLimitConfig, RateLimitLayer, TokioClock};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

struct Req {
    member: u64,
}

fn key<'r>(source: &str, req: &'r Req) -> Key<'r> {
    match source {
        "member_id" => Key::u64(req.member),
        _ => Key::NONE,
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_calls_pass_wait_and_fail_like_nginx() {
    let cfg = RateLimitConfig::with_limits(vec![
        LimitConfig::new("per_member", "member_id", Rate::per_second(10)).burst(5),
    ]);
    let limiter = Arc::new(
        Limiter::builder(cfg)
            .clock(TokioClock::new())
            .build()
            .unwrap(),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, key))
        .service_fn(move |_req: Req| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Instant::now())
            }
        });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for member in [1u64, 2, 3] {
        for _ in 0..20 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(
                async move { svc.oneshot(Req { member }).await },
            ));
        }
    }
    let mut by_delay = std::collections::BTreeMap::<u128, usize>::new();
    let mut rejected = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(at) => *by_delay.entry((at - start).as_millis()).or_default() += 1,
            Err(e) => {
                let e = HaError::find(&*e).expect("an HaError");
                assert!(e.is_rate_limited());
                assert!(e.retry_after().unwrap() > Duration::ZERO);
                rejected += 1;
            }
        }
    }
    // Per member: 1 at once, 5 held 100..500 ms, 14 rejected at once.
    let expected: std::collections::BTreeMap<u128, usize> =
        [(0, 3), (100, 3), (200, 3), (300, 3), (400, 3), (500, 3)].into();
    assert_eq!(by_delay, expected);
    assert_eq!(rejected, 42);
    assert_eq!(calls.load(Ordering::SeqCst), 18);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_delegates_and_clones_share_state() {
    let cfg = RateLimitConfig::with_limits(vec![
        LimitConfig::new("per_member", "member_id", Rate::per_second(1)).nodelay(),
    ]);
    let limiter = Arc::new(
        Limiter::builder(cfg)
            .clock(TokioClock::new())
            .build()
            .unwrap(),
    );
    let (mock, mut handle) = tower_test::mock::pair::<Req, &'static str>();
    let mut a = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, key))
        .service(mock);
    let mut b = a.clone();
    handle.allow(0);
    assert!(futures::poll!(std::future::poll_fn(|cx| a.poll_ready(cx))).is_pending());
    handle.allow(2);
    a.ready().await.unwrap();
    let fut = a.call(Req { member: 7 });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("ok");
    assert_eq!(fut.await.unwrap(), "ok");
    // The clone sees the same bucket: the second request is refused without reaching the mock.
    b.ready().await.unwrap();
    let err = b.call(Req { member: 7 }).await.unwrap_err();
    assert!(HaError::find(&*err).unwrap().is_rate_limited());
}
