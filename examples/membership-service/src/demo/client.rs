//! The demo's HTTP client: one hyper client per source address, one call per request, and the
//! classification of a failed call into an error kind for the table.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Bound on one call, answer body included: longer than the service's own write bound (6 s),
/// so that a call the service gives up on is its 503, not our time-out.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client whose connections come from one local address (the rate limits key on it).
#[derive(Clone, Debug)]
pub struct DemoClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// `Retry-After`, when present.
    pub retry_after: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `version` of a member body.
    pub fn version(&self) -> Option<u64> {
        self.json()?.get("version")?.as_u64()
    }

    /// The error kind of a non-2xx answer: `<status> <error.code>` (`503
    /// dependency_unavailable`), or the status alone when the body has no code.
    pub fn error_kind(&self) -> String {
        match self
            .json()
            .and_then(|v| v.get("error")?.get("code")?.as_str().map(str::to_owned))
        {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }
}

impl DemoClient {
    /// A client connecting from `local` (any port).
    pub fn new(local: IpAddr, max_idle: usize) -> DemoClient {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(Duration::from_secs(1)));
        c.set_local_address(Some(local));
        DemoClient {
            inner: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(max_idle)
                .build(c),
        }
    }

    /// One call; `Err` holds the transport error's kind (`timeout`, `connect`, `transport`).
    pub async fn call(
        &self,
        addr: SocketAddr,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let fut = async {
            let resp = self.inner.request(req).await.map_err(|e| {
                if e.is_connect() {
                    "connect".to_string()
                } else {
                    "transport".to_string()
                }
            })?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| "transport".to_string())?
                .to_bytes();
            Ok(Answer {
                status,
                retry_after,
                body,
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err("timeout".into()),
        }
    }

    /// `GET path`.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<Answer, String> {
        self.call(addr, http::Method::GET, path, &[], Bytes::new())
            .await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, String> {
        self.call(
            addr,
            http::Method::PUT,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
    }

    /// `POST path` with a JSON body and a bearer token.
    pub async fn post_admin(
        &self,
        addr: SocketAddr,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, String> {
        let auth = format!("Bearer {token}");
        self.call(
            addr,
            http::Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Bytes::from(body.to_string()),
        )
        .await
    }
}
