//! The HTTP API: routes, JSON errors, the admin token, rate limits and request metrics.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ha_core::{HaContext, HaError};
use ha_ratelimit::{Decision, Key, Limiter};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use ipnet::IpNet;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::model::{InputError, MemberInput, parse_id, parse_object};
use crate::store::{Store, StoreError};

/// The largest body accepted, declared or streamed.
pub const MAX_BODY: usize = 16 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The members.
    pub store: Store,
    /// ha-core: topology, events, drain control.
    pub ctx: HaContext,
    /// The rate limiter (none configured: no limits).
    pub limiter: Option<Arc<Limiter>>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<[IpNet]>,
    /// The admin token.
    pub admin_token: Arc<str>,
    /// The Prometheus recorder's handle, when installed.
    pub prometheus: Option<PrometheusHandle>,
    /// `/topology`'s view of the job.
    pub job: Option<crate::job::JobView>,
    /// This instance's name.
    pub instance: Arc<str>,
    /// The dependency names.
    pub deps: Arc<crate::config::DependencyNames>,
}

/// An error answer: `{"error": {"code", "message"}}` with `application/json`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// With `Retry-After` (whole seconds, at least 1).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> ApiError {
        match e {
            InputError::Malformed(m) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", m),
            InputError::Invalid { field, reason } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                if field.is_empty() {
                    reason
                } else {
                    format!("{field}: {reason}")
                },
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match &e {
            StoreError::Unavailable { dependency, source } => {
                let unknown = source
                    .downcast_ref::<HaError>()
                    .is_some_and(|h| matches!(h, HaError::OutcomeUnknown { .. }));
                tracing::warn!(dependency, error = %e, "dependency unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    if unknown {
                        "outcome_unknown"
                    } else {
                        "dependency_unavailable"
                    },
                    e.to_string(),
                )
                .retry_after(1)
            }
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "corrupt data");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn id_of(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let raw = path
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_id", format!("bad path: {e}")))?;
    parse_id(&raw.0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!(
                "the id must be plain ASCII digits fitting a u64, not {:?}",
                raw.0
            ),
        )
    })
}

/// Reads a JSON body: `application/json` (415 otherwise), at most [`MAX_BODY`] bytes declared
/// or streamed (413).
async fn json_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json",
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body must be at most {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > MAX_BODY as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
            )
        }
    })
}

async fn put_member(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let id = id_of(path)?;
    let bytes = json_body(&headers, body).await?;
    let input = MemberInput::parse(&bytes)?;
    let member = st.store.put(id, &input).await?;
    Ok(axum::Json(member).into_response())
}

async fn get_member(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = id_of(path)?;
    let (member, source) = st.store.get(id).await?;
    metrics::counter!("membership_reads_total", "source" => source.as_str()).increment(1);
    match member {
        Some(m) => Ok(axum::Json(m).into_response()),
        None => Err(not_found(format!("no member {id}"))),
    }
}

async fn delete_member(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = id_of(path)?;
    if st.store.delete(id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(format!("no member {id}")))
    }
}

async fn history(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = id_of(path)?;
    match st.store.history(id).await? {
        Some(versions) => Ok(axum::Json(json!({"id": id, "versions": versions})).into_response()),
        None => Err(not_found(format!("member {id} was never written"))),
    }
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "up"})).into_response()
}

async fn readyz(State(st): State<AppState>) -> Response {
    let redis = st.store.cache().current_master().is_some();
    let mysql = st.store.db().master().current().is_some();
    let mq = st
        .store
        .events()
        .idcs()
        .iter()
        .any(|idc| !st.store.events().is_avoided(idc))
        || st.store.events().spool().is_some();
    let body = json!({"redis": redis, "mysql": mysql, "events": mq});
    if redis && mysql && mq {
        axum::Json(body).into_response()
    } else {
        let mut resp = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("not ready: {body}"),
        )
        .retry_after(1)
        .into_response();
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    match &st.prometheus {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are not recorded in this process",
        )
        .into_response(),
    }
}

async fn topology(State(st): State<AppState>) -> Response {
    axum::Json(crate::topology::snapshot(&st).await).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    idc: String,
}

fn authorized(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = st.admin_token.as_bytes();
    // Constant time in the token's content (the length is not a secret worth hiding).
    if given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin routes need Authorization: Bearer <token>",
        ))
    }
}

async fn drain_body(headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    let bytes = json_body(headers, body).await?;
    let value = parse_object(&bytes)?;
    let b: DrainBody = serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            e.to_string(),
        )
    })?;
    Ok(b.idc)
}

async fn drain(State(st): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    authorized(&st, &headers)?;
    let idc = drain_body(&headers, body).await?;
    st.ctx.control().drain(&idc).map_err(unknown_idc)?;
    tracing::info!(idc, "drained");
    Ok(axum::Json(drained_answer(&st)).into_response())
}

async fn undrain(State(st): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    authorized(&st, &headers)?;
    let idc = drain_body(&headers, body).await?;
    st.ctx.control().undrain(&idc).map_err(unknown_idc)?;
    tracing::info!(idc, "undrained");
    Ok(axum::Json(drained_answer(&st)).into_response())
}

fn drained_answer(st: &AppState) -> serde_json::Value {
    let drained: Vec<String> = st
        .ctx
        .control()
        .drained()
        .iter()
        .map(|s| s.to_string())
        .collect();
    json!({"drained": drained})
}

fn unknown_idc(e: HaError) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_idc",
        e.to_string(),
    )
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// The client's address: the socket's peer, or, when the peer is a trusted proxy, the
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else {
            return peer;
        };
        for part in s.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

async fn rate_limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limiter) = &st.limiter else {
        return next.run(req).await;
    };
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server runs without connect info",
        )
        .into_response();
    };
    let ip = client_ip(peer, req.headers(), &st.trusted_proxies);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| format!("{} {}", req.method(), m.as_str()))
        .unwrap_or_default();
    let decision = limiter.check_with(|key| match key {
        "client_ip" => Key::ip(ip),
        "route" => Key::str(&route),
        "server" => Key::global(),
        _ => Key::NONE,
    });
    match decision {
        Decision::Allow => next.run(req).await,
        Decision::Delay(d) => {
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        Decision::Reject { retry_after } => {
            metrics::counter!("membership_rate_limited_total").increment(1);
            let status =
                StatusCode::from_u16(limiter.status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            ApiError::new(status, "rate_limited", "too many requests")
                .retry_after(ha_ratelimit::retry_after_secs(retry_after))
                .into_response()
        }
    }
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let limited = Router::new()
        .route(
            "/members/{id}",
            put(put_member).get(get_member).delete(delete_member),
        )
        .route("/members/{id}/history", get(history))
        .route("/topology", get(topology))
        .route("/admin/drain", post(drain))
        .route("/admin/undrain", post(undrain))
        .route_layer(middleware::from_fn_with_state(state.clone(), rate_limit));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(limited)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn(record_metrics))
        .with_state(state)
}

/// The time a graceful shutdown waits for requests in flight.
pub const DRAIN_REQUESTS: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [net("10.0.0.0/8")];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 10.0.0.7".parse().unwrap());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let outsider: IpAddr = "5.6.7.8".parse().unwrap();
        assert_eq!(client_ip(outsider, &h, &trusted), outsider);
        // A spoofed left-most entry does not win over the last untrusted hop.
        h.insert("x-forwarded-for", "9.9.9.9, 1.2.3.4".parse().unwrap());
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Garbage: the peer.
        h.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(peer, &h, &trusted), peer);
        // No header: the peer.
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }
}
