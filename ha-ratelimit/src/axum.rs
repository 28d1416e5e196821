//! axum adapter: a rejection becomes the configured status (`status`, default 429 Too Many
//! Requests; nginx's `limit_req_status` default is 503) with `Retry-After`, the client's address
//! is a key that fails loudly when the server does not provide it, and [`layer`] checks the key
//! names and the connect-info requirement when it is built.
//!
//! ```ignore
//! use axum::{Router, error_handling::HandleErrorLayer, routing::get};
//! use ha_ratelimit::axum::{Serve, handle_error, layer};
//! let keys = ha_ratelimit::Keys::new()
//!     .client_ip("client_ip")                       // ConnectInfo<SocketAddr>
//!     .key("server", |_| ha_ratelimit::Key::global());
//! let app = Router::new().route("/", get(|| async { "ok" })).layer(
//!     tower::ServiceBuilder::new()
//!         .layer(HandleErrorLayer::new(handle_error))  // status + Retry-After
//!         .layer(layer(limiter, keys, Serve::WithConnectInfo)?),
//! );
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use ha_core::{BoxError, HaError};
use http::{HeaderValue, StatusCode, header};

use crate::config::ConfigError;
use crate::key::Key;
use crate::keys::{KeyError, Keys};
use crate::layer::{RateLimitLayer, Rejected};
use crate::limiter::Limiter;

/// `429 Too Many Requests` with `Retry-After` in whole seconds (rounded up, at least 1).
pub fn too_many_requests(retry_after: Duration) -> Response {
    rejection(StatusCode::TOO_MANY_REQUESTS, retry_after)
}

/// A rejection answered with `status` and `Retry-After` in whole seconds (rounded up, at least
/// 1); a status that is not an HTTP error status becomes 429.
pub fn rejection(status: StatusCode, retry_after: Duration) -> Response {
    let status = if status.is_client_error() || status.is_server_error() {
        status
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let secs = crate::retry_after_secs(retry_after);
    let body = if status == StatusCode::TOO_MANY_REQUESTS {
        "too many requests\n"
    } else {
        "rate limited\n"
    };
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// For axum's `HandleErrorLayer`: a rate-limit rejection becomes its configured status with
/// `Retry-After`, a key that could not be had a 500 saying why, any other error a 500.
pub async fn handle_error(err: BoxError) -> Response {
    error_response(&*err)
}

/// The response for an error out of the tower stack (see [`handle_error`]): a [`Rejected`] is
/// answered with its status, a bare [`HaError::RateLimited`] with 429, a [`KeyError`] with 500
/// (and logged: it is a deployment error, not the client's).
pub fn error_response(err: &(dyn std::error::Error + 'static)) -> Response {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Rejected>() {
            let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            return rejection(status, r.retry_after());
        }
        if let Some(k) = e.downcast_ref::<KeyError>() {
            tracing::error!(key = k.key(), error = %k, "rate limit key unavailable");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {k}\n"),
            )
                .into_response();
        }
        cur = e.source();
    }
    match HaError::find(err) {
        Some(HaError::RateLimited { retry_after }) => too_many_requests(*retry_after),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response(),
    }
}

/// The client's IP as a key (nginx's `$binary_remote_addr`), from axum's `ConnectInfo`.
///
/// Without it (a server not started with `into_make_service_with_connect_info::<SocketAddr>()`)
/// this is [`KeyError::MissingConnectInfo`], not an empty key: an empty key would skip the
/// per-IP line for every request, silently.
pub fn client_ip<B>(req: &http::Request<B>) -> Result<Key<'static>, KeyError> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ci| Key::ip(ci.0.ip()))
        .ok_or_else(|| KeyError::MissingConnectInfo {
            key: "client_ip".into(),
        })
}

impl<B: 'static> Keys<http::Request<B>> {
    /// The key `name` is the client's IP ([`client_ip`]): a request without `ConnectInfo` fails
    /// with [`KeyError::MissingConnectInfo`], and [`layer`] refuses a line with this key unless
    /// it is told the server provides connect info ([`Serve::WithConnectInfo`]).
    #[must_use]
    pub fn client_ip(self, name: impl Into<Arc<str>>) -> Self {
        let name: Arc<str> = name.into();
        let key = name.clone();
        let get = crate::keys::getter(move |req: &http::Request<B>| {
            client_ip(req).map_err(|_| KeyError::MissingConnectInfo { key: key.clone() })
        });
        self.insert(name, get, true)
    }
}

/// How the axum server is started, declared to [`layer`]: a per-IP key needs the client's
/// address, which axum only provides with `into_make_service_with_connect_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`.
    WithConnectInfo,
    /// `axum::serve(listener, app)`: no client address; a line keyed by
    /// [`Keys::client_ip`] is refused when the layer is built.
    WithoutConnectInfo,
}

/// The rate-limit layer for an axum app, checked when it is built: every line's `key` must be
/// one of `keys` (else a [`ConfigError`] naming the limit and the key), and a line keyed by the
/// client's address needs [`Serve::WithConnectInfo`]. Both checks also apply to every later
/// reload of `limiter`. Put `HandleErrorLayer::new(handle_error)` above it.
pub fn layer<B: 'static, C: Clock>(
    limiter: Arc<Limiter<C>>,
    keys: Keys<http::Request<B>>,
    serve: Serve,
) -> Result<RateLimitLayer<Keys<http::Request<B>>, C>, ConfigError> {
    let known = keys
        .names()
        .map(|name| {
            let why =
                (serve == Serve::WithoutConnectInfo && keys.needs_connect_info(name)).then(|| {
                    Arc::from(
                        "this key is the client's address, but the layer was built with \
                         Serve::WithoutConnectInfo: serve with \
                         into_make_service_with_connect_info::<SocketAddr>() and declare \
                         Serve::WithConnectInfo",
                    )
                });
            (Arc::from(name), why)
        })
        .collect();
    limiter.set_known_keys(known)?;
    Ok(RateLimitLayer::new(limiter, keys))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{LimitConfig, Rate, RateLimitConfig};
    use governor::clock::FakeRelativeClock;
    use tower::{Service, ServiceExt};

    #[test]
    fn rate_limited_becomes_429_with_retry_after() {
        let err: BoxError = Box::new(HaError::RateLimited {
            retry_after: Duration::from_millis(1200),
        });
        let resp = error_response(&*err);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let resp = too_many_requests(Duration::from_millis(3));
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let other: BoxError = "boom".into();
        assert_eq!(
            error_response(&*other).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    fn per_ip(status: Option<u16>) -> Arc<Limiter<FakeRelativeClock>> {
        let mut cfg = RateLimitConfig::with_limits(vec![
            LimitConfig::new("per_ip", "client_ip", Rate::per_second(1)).nodelay(),
        ]);
        if let Some(s) = status {
            cfg.status = s;
        }
        Arc::new(
            Limiter::builder(cfg)
                .clock(FakeRelativeClock::default())
                .build()
                .unwrap(),
        )
    }

    fn request(from: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::builder().uri("/").body(()).unwrap();
        if let Some(addr) = from {
            req.extensions_mut()
                .insert(ConnectInfo(addr.parse::<SocketAddr>().unwrap()));
        }
        req
    }

    /// Runs one request through the layer and answers as `HandleErrorLayer(handle_error)`.
    async fn answer(
        layer: &RateLimitLayer<Keys<http::Request<()>>, FakeRelativeClock>,
        req: http::Request<()>,
    ) -> Response {
        let mut svc = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_req: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(StatusCode::OK.into_response())
            });
        match svc.ready().await.unwrap().call(req).await {
            Ok(resp) => resp,
            Err(e) => handle_error(e).await,
        }
    }

    #[tokio::test]
    async fn a_per_ip_line_without_connect_info_is_an_error_not_a_skip() {
        // Declared without connect info: the layer is refused, naming the limit and the key.
        let keys = || Keys::new().client_ip("client_ip");
        let err = layer(per_ip(None), keys(), Serve::WithoutConnectInfo).unwrap_err();
        assert_eq!(err.field(), "limit[0].key", "{err}");
        assert_eq!(err.value(), "client_ip", "{err}");
        assert_eq!(err.limit(), Some("per_ip"), "{err}");
        assert!(
            err.reason().contains("into_make_service_with_connect_info"),
            "{err}"
        );

        // Declared with it, but a request arrives without: a 500 saying why, not a pass.
        let l = layer(per_ip(None), keys(), Serve::WithConnectInfo).unwrap();
        for _ in 0..3 {
            let resp = answer(&l, request(None)).await;
            assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        assert!(
            client_ip(&request(None))
                .unwrap_err()
                .is_missing_connect_info()
        );
        // With the address: one per second, then 429 with Retry-After (the default status).
        let from = Some("127.0.1.7:40000");
        assert_eq!(answer(&l, request(from)).await.status(), StatusCode::OK);
        let resp = answer(&l, request(from)).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            answer(&l, request(Some("127.0.1.8:40000"))).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_configured_status_answers_rejections() {
        // nginx's default, limit_req_status 503, set in the configuration; no handler of one's
        // own and no ha-core type needed.
        let l = layer(
            per_ip(Some(503)),
            Keys::new().client_ip("client_ip"),
            Serve::WithConnectInfo,
        )
        .unwrap();
        let from = Some("127.0.1.9:1");
        assert_eq!(answer(&l, request(from)).await.status(), StatusCode::OK);
        let resp = answer(&l, request(from)).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        // And on the builder.
        let cfg = RateLimitConfig::with_limits(vec![
            LimitConfig::new("per_ip", "client_ip", Rate::per_second(1)).nodelay(),
        ]);
        let limiter = Limiter::builder(cfg)
            .status(503)
            .clock(FakeRelativeClock::default())
            .build()
            .unwrap();
        assert_eq!(limiter.status(), 503);
    }

    #[tokio::test]
    async fn an_unknown_key_name_is_an_error_naming_the_limit() {
        let keys = Keys::<http::Request<()>>::new().client_ip("clientip");
        let err = layer(per_ip(None), keys, Serve::WithConnectInfo).unwrap_err();
        assert_eq!(
            (err.field(), err.value(), err.limit()),
            ("limit[0].key", "client_ip", Some("per_ip")),
            "{err}"
        );
        assert!(err.reason().contains("clientip"), "{err}");
    }
}
