//! axum adapter: a rate-limit rejection becomes `429 Too Many Requests` with `Retry-After`.
//!
//! ```ignore
//! use axum::{Router, error_handling::HandleErrorLayer, routing::get};
//! let app = Router::new().route("/", get(|| async { "ok" })).layer(
//!     tower::ServiceBuilder::new()
//!         .layer(HandleErrorLayer::new(ha_ratelimit::axum::handle_error))
//!         .layer(rate_limit_layer),
//! );
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use ha_core::{BoxError, HaError};
use http::{HeaderValue, StatusCode, header};

use crate::key::Key;

/// `429 Too Many Requests` with `Retry-After` in whole seconds (rounded up, at least 1).
pub fn too_many_requests(retry_after: Duration) -> Response {
    let secs = crate::retry_after_secs(retry_after);
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// For axum's `HandleErrorLayer`: a rate-limit error becomes 429 with `Retry-After`, any other
/// error a 500.
pub async fn handle_error(err: BoxError) -> Response {
    error_response(&*err)
}

/// The response for an error out of the tower stack (see [`handle_error`]).
pub fn error_response(err: &(dyn std::error::Error + 'static)) -> Response {
    match HaError::find(err) {
        Some(HaError::RateLimited { retry_after }) => too_many_requests(*retry_after),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response(),
    }
}

/// The client's IP as a key (nginx's `$binary_remote_addr`), from axum's `ConnectInfo`;
/// [`Key::NONE`] when the server was not started with connect info.
pub fn client_ip<B>(req: &http::Request<B>) -> Key<'static> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ci| Key::ip(ci.0.ip()))
        .unwrap_or(Key::NONE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
}
