//! The tower layer under concurrency, on paused tokio time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ha_core::HaError;
use ha_ratelimit::{
    Key, KeyError, Keys, LimitConfig, Limiter, Rate, RateLimitConfig, RateLimitLayer, Rejected,
    TokioClock, key_fn,
};
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

struct Routed {
    member: u64,
    route: String,
}

fn routed(member: u64, route: &str) -> Routed {
    Routed {
        member,
        route: route.to_string(),
    }
}

fn one_per_route() -> RateLimitConfig {
    RateLimitConfig::with_limits(vec![
        LimitConfig::new("per_route", "route", Rate::per_second(1)).nodelay(),
    ])
}

async fn send<S>(svc: &mut S, req: Routed) -> Result<(), ha_core::BoxError>
where
    S: Service<Routed, Response = (), Error = ha_core::BoxError>,
{
    svc.ready().await?.call(req).await
}

/// A key function may be a closure (through `key_fn`), capturing state and borrowing its key
/// from the request; or a `Keys` registry, whose names the limiter checks.
#[tokio::test(start_paused = true)]
async fn closures_and_named_keys_are_key_functions() {
    let limiter = Arc::new(
        Limiter::builder(one_per_route())
            .clock(TokioClock::new())
            .build()
            .unwrap(),
    );
    let wanted = String::from("route");
    let keys = key_fn(move |source: &str, req: &Routed| {
        if source == wanted {
            Key::str(&req.route)
        } else {
            Key::u64(req.member)
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter.clone(), keys))
        .service_fn(|_req: Routed| async { Ok::<_, Infallible>(()) });
    send(&mut svc, routed(1, "/a")).await.unwrap();
    send(&mut svc, routed(2, "/b")).await.unwrap();
    let err = send(&mut svc, routed(3, "/a")).await.unwrap_err();
    // The rejection carries the configured status (default 429) and is an HaError inside.
    let rejected = err.downcast_ref::<Rejected>().expect("a Rejected");
    assert_eq!(rejected.status(), 429);
    assert!(rejected.retry_after() > Duration::ZERO);
    assert!(HaError::find(&*err).unwrap().is_rate_limited());

    let keys = Keys::new().key("route", |req: &Routed| Key::str(&req.route));
    let limiter = Arc::new(
        Limiter::builder(one_per_route())
            .keys(keys.names())
            .clock(TokioClock::new())
            .build()
            .unwrap(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter.clone(), keys))
        .service_fn(|_req: Routed| async { Ok::<_, Infallible>(()) });
    send(&mut svc, routed(1, "/a")).await.unwrap();
    assert!(send(&mut svc, routed(1, "/a")).await.is_err());
    // A reload with a line whose key the registry does not know is refused, naming the limit
    // and the key, and the limiter keeps deciding as before.
    let mut cfg = one_per_route();
    cfg.limits.push(LimitConfig::new(
        "per_member",
        "member",
        Rate::per_second(1),
    ));
    let err = limiter.reload(cfg).unwrap_err();
    assert_eq!(
        (err.field(), err.value(), err.limit()),
        ("limit[1].key", "member", Some("per_member")),
        "{err}"
    );
    assert!(err.reason().contains("route"), "{err}");
    assert!(send(&mut svc, routed(1, "/a")).await.is_err());
    send(&mut svc, routed(1, "/b")).await.unwrap();
}

/// A line whose key the key function does not know is an error when the limiter is built (it
/// used to be a line that silently never applied), and a key function's error fails the
/// request instead of skipping the line.
#[tokio::test(start_paused = true)]
async fn unknown_key_names_are_errors_not_disabled_lines() {
    let keys = Keys::new()
        .key("client_ip", |_: &Routed| Key::u64(7))
        .key("server", |_: &Routed| Key::global());
    let mut cfg = one_per_route();
    cfg.limits[0].key = "clientip".into(); // misspelled
    let err = Limiter::builder(cfg)
        .keys(keys.names())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "limit[0].key", "{err}");
    assert_eq!(err.value(), "clientip", "{err}");
    assert_eq!(err.limit(), Some("per_route"), "{err}");
    assert_eq!(err.limit_index(), Some(0), "{err}");

    // Without the names declared, the registry's answer for an unknown key is an error.
    let limiter = Arc::new(
        Limiter::builder(one_per_route())
            .clock(TokioClock::new())
            .build()
            .unwrap(),
    );
    let failing = Keys::new().try_key("route", |_: &Routed| {
        Err(KeyError::MissingConnectInfo {
            key: "route".into(),
        })
    });
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter.clone(), keys))
        .service_fn(|_req: Routed| async { Ok::<_, Infallible>(()) });
    let err = send(&mut svc, routed(1, "/a")).await.unwrap_err();
    let err = err.downcast_ref::<KeyError>().expect("a KeyError");
    assert!(err.is_unknown_key() && err.key() == "route", "{err}");
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, failing))
        .service_fn(|_req: Routed| async { Ok::<_, Infallible>(()) });
    for _ in 0..3 {
        let err = send(&mut svc, routed(1, "/a")).await.unwrap_err();
        assert!(
            err.downcast_ref::<KeyError>()
                .unwrap()
                .is_missing_connect_info()
        );
    }
}
