//! The tower layers of ha-core on paused time: `Failover` (deadline, per-try timeout, retry
//! rules, budget, endpoint avoidance) and `FailFast`, alone and composed. No network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use ha_core::attempt;
use ha_core::fail_fast::{FailFast, FailFastLayer};
use ha_core::failover::{Backoff, Failover, Idempotent, IdempotentIf, NeverRetry};
use ha_core::{BoxError, HaError};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the scripted service does on its n-th call (0-based).
#[derive(Clone, Copy, Debug)]
enum Act {
    Ok,
    Refused,
    Reset,
    RateLimited,
    Hang,
}

/// A service that follows a script per call, counts its calls, reports a different endpoint per
/// call to the attempt context (as a balancer does) and records what it was told to avoid.
#[derive(Clone)]
struct Scripted {
    script: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    calls: Arc<AtomicUsize>,
    // A test-only record written from the synchronous `call`; nothing awaits while holding it.
    #[allow(clippy::disallowed_types)]
    avoided: Arc<std::sync::Mutex<Vec<Vec<SocketAddr>>>>,
}

impl Scripted {
    fn new(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Self {
        Scripted {
            script: Arc::new(script),
            calls: Arc::default(),
            avoided: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn avoided(&self) -> Vec<Vec<SocketAddr>> {
        self.avoided.lock().unwrap().clone()
    }
}

fn addr(n: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 9, n as u8 + 1], 7000))
}

impl Service<&'static str> for Scripted {
    type Response = usize;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<usize, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: &'static str) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let avoid = attempt::avoided(|a| a.to_vec());
        self.avoided.lock().unwrap().push(avoid);
        attempt::record_pick(addr(n));
        match (self.script)(n) {
            Act::Ok => Box::pin(async move { Ok(n) }),
            Act::Refused => Box::pin(async {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
            }),
            Act::Reset => Box::pin(async {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into())
            }),
            Act::RateLimited => Box::pin(async {
                Err(HaError::RateLimited {
                    retry_after: Duration::from_millis(100),
                }
                .into())
            }),
            Act::Hang => Box::pin(futures::future::pending()),
        }
    }
}

fn ha<'a>(err: &'a (dyn std::error::Error + 'static)) -> &'a HaError {
    HaError::find(err).expect("an HaError")
}

// === Failover ===

#[tokio::test(start_paused = true)]
async fn deadline_with_a_blackholed_service_is_exact() {
    let inner = Scripted::new(|_| Act::Hang);
    let mut svc = Failover::builder()
        .policy(Idempotent)
        .service(inner.clone());
    let t0 = Instant::now();
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    // Tries at 0, 500 ms and 1 s (each per-try timeout moves on); the last runs to the deadline.
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    match ha(&err) {
        HaError::DeadlineExceeded {
            deadline, attempts, ..
        } => {
            assert_eq!(*deadline, Duration::from_secs(2));
            assert_eq!(*attempts, 3);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(inner.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn deadline_shorter_than_the_try_timeout_caps_it() {
    let inner = Scripted::new(|_| Act::Hang);
    let mut svc = Failover::builder()
        .deadline(Duration::from_millis(300))
        .service(inner.clone());
    let t0 = Instant::now();
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(300));
    assert!(ha(&err).is_deadline_exceeded());
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_then_success_on_the_second_try() {
    let inner = Scripted::new(|n| if n == 0 { Act::Hang } else { Act::Ok });
    let mut svc = Failover::builder()
        .try_timeout(Duration::from_millis(200))
        .policy(Idempotent)
        .service(inner.clone());
    let t0 = Instant::now();
    let got = svc.ready().await.unwrap().call("GET").await.unwrap();
    assert_eq!(got, 1);
    assert_eq!(t0.elapsed(), Duration::from_millis(200));
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_request_is_tried_once() {
    let policy = IdempotentIf::new(|req: &&'static str| req.starts_with("GET"));

    // A reset after the write may have taken effect: a non-idempotent request is tried once
    // and its outcome is unknown.
    let inner = Scripted::new(|_| Act::Reset);
    let mut svc = Failover::builder().policy(policy).service(inner.clone());
    let err = svc.ready().await.unwrap().call("POST").await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    match &err {
        HaError::OutcomeUnknown { endpoint, source } => {
            assert_eq!(*endpoint, Some(addr(0)));
            assert!(
                source.downcast_ref::<std::io::Error>().is_some(),
                "{source}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(inner.calls(), 1);

    // The same error on an idempotent request is retried up to max_attempts; it comes out
    // typed, never as a raw io::Error.
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    assert_eq!(inner.calls(), 1 + 3);

    // A refused connect provably was not sent: any request is retried.
    let inner = Scripted::new(|_| Act::Refused);
    let mut svc = Failover::builder().policy(policy).service(inner.clone());
    let err = svc.ready().await.unwrap().call("POST").await.unwrap_err();
    assert!(err.is_backend(), "{err}");
    assert!(
        std::error::Error::source(&err)
            .is_some_and(|e| e.downcast_ref::<std::io::Error>().is_some()),
        "{err}"
    );
    assert_eq!(inner.calls(), 3);

    // A non-idempotent request that hangs is not cut by the per-try timeout: it runs to the
    // deadline, once.
    let inner = Scripted::new(|_| Act::Hang);
    let mut svc = Failover::builder()
        .policy(NeverRetry)
        .service(inner.clone());
    let t0 = Instant::now();
    let err = svc.ready().await.unwrap().call("POST").await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert!(matches!(
        ha(&err),
        HaError::DeadlineExceeded { attempts: 1, .. }
    ));
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_error_is_not_retried() {
    let inner = Scripted::new(|_| Act::RateLimited);
    let mut svc = Failover::builder().service(inner.clone());
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    assert!(ha(&err).is_rate_limited());
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn budget_exhaustion_stops_retries_after_the_floor() {
    let inner = Scripted::new(|_| Act::Refused);
    // No ratio, a floor of 1 retry/s over the 10 s window: 10 retries in all.
    let svc = Failover::builder().budget(0.0, 1).service(inner.clone());
    for _ in 0..20 {
        let mut svc = svc.clone();
        let _ = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    }
    // 5 calls get 3 attempts (2 retries each, 10 in all), the other 15 get 1.
    assert_eq!(inner.calls(), 5 * 3 + 15);
    assert_eq!(svc.budget_available(), 0);

    // After the window the floor is back.
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut one = svc.clone();
    let _ = one.ready().await.unwrap().call("GET").await.unwrap_err();
    assert_eq!(inner.calls(), 30 + 3);
}

#[tokio::test(start_paused = true)]
async fn budget_ratio_funds_retries_from_successes() {
    let inner = Scripted::new(|n| if n < 10 { Act::Ok } else { Act::Refused });
    // 50% of requests, no floor: 10 successes (and the failing call itself) fund 5 retries.
    let mut svc = Failover::builder()
        .budget(0.5, 0)
        .max_attempts(10)
        .service(inner.clone());
    for _ in 0..10 {
        svc.ready().await.unwrap().call("GET").await.unwrap();
    }
    let _ = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    // 11 deposits at 0.5 = 5.5 → 5 retries.
    assert_eq!(inner.calls(), 10 + 1 + 5);
}

#[tokio::test(start_paused = true)]
async fn each_retry_avoids_the_previous_picks() {
    let inner = Scripted::new(|n| if n < 2 { Act::Refused } else { Act::Ok });
    let mut svc = Failover::builder().service(inner.clone());
    let got = svc.ready().await.unwrap().call("GET").await.unwrap();
    assert_eq!(got, 2);
    assert_eq!(
        inner.avoided(),
        vec![vec![], vec![addr(0)], vec![addr(0), addr(1)]]
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_pauses_between_tries() {
    let inner = Scripted::new(|n| if n < 2 { Act::Refused } else { Act::Ok });
    let mut svc = Failover::builder()
        .backoff(
            Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1))
                .with_jitter(|| 0.0),
        )
        .service(inner.clone());
    let t0 = Instant::now();
    svc.ready().await.unwrap().call("GET").await.unwrap();
    // Equal jitter with r = 0: 50 ms then 100 ms.
    assert_eq!(t0.elapsed(), Duration::from_millis(150));
}

#[test]
fn fast_path_needs_no_timer() {
    // Outside any runtime, creating a tokio `Sleep` panics: these calls prove that a try that
    // completes on its first poll (success, non-retryable error, or a retry that completes at
    // once) arms no timer.
    let inner = Scripted::new(|n| match n {
        0 => Act::Ok,
        1 => Act::RateLimited,
        2 => Act::Refused,
        _ => Act::Ok,
    });
    let mut svc = Failover::builder().service(inner.clone());
    futures::executor::block_on(async {
        assert_eq!(svc.ready().await.unwrap().call("GET").await.unwrap(), 0);
        let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
        assert!(ha(&err).is_rate_limited());
        assert_eq!(svc.ready().await.unwrap().call("GET").await.unwrap(), 3);
    });
    assert_eq!(inner.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn deadline_with_a_try_in_flight_reports_an_unknown_outcome() {
    // Before: DeadlineExceeded said nothing about whether the write landed.
    let inner = Scripted::new(|_| Act::Hang);
    let mut svc = Failover::builder().service(inner.clone());
    let err = svc.ready().await.unwrap().call("POST").await.unwrap_err();
    assert!(err.is_deadline_exceeded());
    assert!(err.is_outcome_unknown(), "{err}");
    assert_eq!(inner.calls(), 1, "a maybe-sent request is not sent again");
}

/// A service that is never ready.
#[derive(Clone)]
struct NeverReady;

impl Service<&'static str> for NeverReady {
    type Response = usize;
    type Error = BoxError;
    type Future = futures::future::Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }

    fn call(&mut self, _req: &'static str) -> Self::Future {
        futures::future::ready(Ok(0))
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_a_never_ready_service() {
    // Before: `oneshot` over a never-ready service was still pending after 60 s with a 2 s
    // deadline, because the deadline did not bound `poll_ready`.
    let svc = Failover::builder().service(NeverReady);
    let t0 = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(60), svc.oneshot("GET")).await;
    let err = got.expect("bounded by the deadline").unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    match &err {
        HaError::DeadlineExceeded {
            attempts,
            maybe_sent,
            ..
        } => {
            assert_eq!(*attempts, 0);
            assert!(!maybe_sent, "nothing was sent");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A balancer stand-in with nothing to pick: fails with `NoHealthyEndpoint` and reports no
/// pick.
#[derive(Clone)]
struct Empty(Arc<AtomicUsize>);

impl Service<&'static str> for Empty {
    type Response = usize;
    type Error = BoxError;
    type Future = futures::future::Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: &'static str) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        futures::future::ready(Err(HaError::NoHealthyEndpoint {
            dependency: "profile".into(),
        }
        .into()))
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_to_pick_does_not_drain_the_budget() {
    // Before: 70 calls with no endpoints emptied the budget (each retried at once), and the
    // first real refused connect afterwards was not retried.
    let layer = Failover::builder().budget(0.0, 1).layer();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut empty = tower::Layer::layer(&layer, Empty(calls.clone()));
    for _ in 0..70 {
        let err = empty.ready().await.unwrap().call("GET").await.unwrap_err();
        assert!(err.is_no_healthy_endpoint(), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 70, "tried once each");
    assert_eq!(empty.budget_available(), 10);
    let inner = Scripted::new(|n| if n == 0 { Act::Refused } else { Act::Ok });
    let mut svc = tower::Layer::layer(&layer, inner.clone());
    assert_eq!(svc.ready().await.unwrap().call("GET").await.unwrap(), 1);
}

// === FailFast ===

#[tokio::test(start_paused = true)]
async fn fail_fast_enters_after_the_timeout_rejects_at_once_and_recovers() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, &'static str>();
    handle.allow(0);
    let mut svc = FailFast::new(mock, Duration::from_secs(1));

    // Unready for less than the timeout: ordinary back-pressure.
    let t0 = Instant::now();
    assert!(
        tokio::time::timeout(Duration::from_millis(900), svc.ready())
            .await
            .is_err()
    );
    assert!(!svc.is_failing_fast());

    // At the timeout, poll_ready gives up waiting and the call is rejected at once.
    svc.ready().await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert!(svc.is_failing_fast());
    let t1 = Instant::now();
    let err = svc.call("GET").await.unwrap_err();
    assert_eq!(t1.elapsed(), Duration::ZERO);
    match ha(&err) {
        HaError::Unavailable { unready_for } => {
            assert_eq!(*unready_for, Duration::from_secs(1))
        }
        other => panic!("unexpected {other:?}"),
    }
    // Still rejecting while the inner service stays unready.
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    assert!(ha(&err).is_unavailable());

    // The inner service becomes ready: the next poll_ready leaves the state.
    handle.allow(1);
    svc.ready().await.unwrap();
    assert!(!svc.is_failing_fast());
    let rsp = svc.call("GET");
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, "GET");
    send.send_response("ok");
    assert_eq!(rsp.await.unwrap(), "ok");
}

// === Composition ===

#[tokio::test(start_paused = true)]
async fn composes_with_service_builder() {
    let inner = Scripted::new(|n| if n == 0 { Act::Refused } else { Act::Ok });
    let mut svc = ServiceBuilder::new()
        .layer(
            Failover::builder()
                .deadline(Duration::from_secs(1))
                .try_timeout(Duration::from_millis(250))
                .max_attempts(2)
                .budget(0.2, 10)
                .dependency("profile")
                .layer(),
        )
        .layer(FailFastLayer::default())
        .service(inner.clone());
    let got = svc.ready().await.unwrap().call("GET").await.unwrap();
    assert_eq!(got, 1);
    assert_eq!(inner.calls(), 2);

    // Through the whole stack, a blackholed service still ends at the deadline.
    let inner = Scripted::new(|_| Act::Hang);
    let mut svc = ServiceBuilder::new()
        .layer(
            Failover::builder()
                .deadline(Duration::from_secs(1))
                .policy(Idempotent)
                .layer(),
        )
        .layer(FailFastLayer::new(Duration::from_millis(100)))
        .service(inner.clone());
    let t0 = Instant::now();
    let err = svc.ready().await.unwrap().call("GET").await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert!(ha(&err).is_deadline_exceeded());
    assert_eq!(inner.calls(), 2);
}
