//! The client, built exactly as a service would build it: a `tower::ServiceBuilder` with
//! ha-core's `Failover` over `LocalityBalance` over one shared hyper client.
//!
//! ```text
//! Failover (deadline, per-try timeout, retries on another endpoint, budget)
//!   └ LocalityBalance (local IDC first, spill by overprovisioning, drain, outlier ejection)
//!       └ WhoEndpoint per endpoint: GET http://{endpoint}/who on the shared hyper client
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ha_core::balance::{LocalityBalance, LocalityBalanceLayer};
use ha_core::dns::DnsDiscovery;
use ha_core::failover::{Failover, Idempotent};
use ha_core::{Control, Endpoint, EventBus, HaError, Topology};
use ha_lab::http::Who;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder};

use crate::DemoError;
use crate::config::Tuning;

/// The one hyper client every endpoint service shares (HTTP/1, keep-alive pool).
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// The full client stack.
pub type DemoService = Failover<LocalityBalance<WhoEndpoint>, Idempotent>;

/// Makes the shared hyper client: HTTP/1 with keep-alive, a short connect timeout, no Nagle.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// The request of the demo: `GET /who`. It is `Clone`, so `Failover` can retry it (a GET is
/// idempotent); the endpoint service turns it into an HTTP request for its own address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WhoRequest;

/// A successful answer: which endpoint (proxy address) was called and what the backend said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The endpoint the balancer picked (the address DNS published).
    pub endpoint: SocketAddr,
    /// The backend's `/who` answer.
    pub who: Who,
}

/// Why one endpoint's call failed. Transport failures keep an `std::io::Error` in their source
/// chain, so ha-core's `DefaultClassifier` retries them on another endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The connection could not be made (refused, timed out).
    #[error("connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: SocketAddr,
        /// hyper-util's error; its source chain holds the `io::Error`.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The connection failed after it was made (closed, reset, incomplete answer).
    #[error("transport to {endpoint}: {source}")]
    Transport {
        /// The endpoint.
        endpoint: SocketAddr,
        /// An `io::Error` of kind `ConnectionReset` wrapping hyper's error, so the failure
        /// classifies as retryable: a `GET` that may not have been answered can be sent again.
        #[source]
        source: std::io::Error,
    },
    /// The backend answered with a non-2xx status (counted as a failure by health).
    #[error("{endpoint} answered HTTP {status}")]
    Status {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not a `/who` JSON body.
    #[error("{endpoint} sent an unreadable /who answer: {reason}")]
    BadAnswer {
        /// The endpoint.
        endpoint: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

impl EndpointError {
    /// A short, stable name for the table.
    pub fn kind(&self) -> &'static str {
        match self {
            EndpointError::Connect { .. } => "connect",
            EndpointError::Transport { .. } => "transport",
            EndpointError::Status { .. } => "http_status",
            EndpointError::BadAnswer { .. } => "bad_answer",
        }
    }
}

/// The service of one endpoint: `GET http://{endpoint}/who` on the shared client; non-2xx
/// answers become errors so passive health sees them.
#[derive(Debug, Clone)]
pub struct WhoEndpoint {
    client: HttpClient,
    endpoint: SocketAddr,
    uri: Option<http::Uri>,
}

impl WhoEndpoint {
    /// The service of `endpoint`.
    pub fn new(client: HttpClient, endpoint: SocketAddr) -> WhoEndpoint {
        let uri = format!("http://{endpoint}/who").parse().ok();
        WhoEndpoint {
            client,
            endpoint,
            uri,
        }
    }
}

impl Service<WhoRequest> for WhoEndpoint {
    type Response = Served;
    type Error = EndpointError;
    type Future = Pin<Box<dyn Future<Output = Result<Served, EndpointError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: WhoRequest) -> Self::Future {
        let client = self.client.clone();
        let endpoint = self.endpoint;
        let uri = self.uri.clone();
        Box::pin(async move {
            let bad = |reason: String| EndpointError::BadAnswer { endpoint, reason };
            let uri = uri.ok_or_else(|| bad("no valid URI for this endpoint".into()))?;
            let req = http::Request::get(uri)
                .body(Empty::new())
                .map_err(|e| bad(e.to_string()))?;
            let resp = client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    EndpointError::Connect {
                        endpoint,
                        source: e,
                    }
                } else {
                    EndpointError::Transport {
                        endpoint,
                        source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, e),
                    }
                }
            })?;
            let status = resp.status();
            if !status.is_success() {
                return Err(EndpointError::Status {
                    endpoint,
                    status: status.as_u16(),
                });
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| EndpointError::Transport {
                    endpoint,
                    source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, e),
                })?
                .to_bytes();
            let who: Who = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
            Ok(Served { endpoint, who })
        })
    }
}

/// The client and the handles a service keeps next to it.
#[derive(Debug)]
pub struct DemoClient {
    /// The service stack; clone it per request.
    pub service: DemoService,
    /// The topology read from the TOML file.
    pub topology: Arc<Topology>,
    /// The operator's drain handle.
    pub control: Control,
    /// Background DNS discovery of `profile` (dropping it stops the refresh task).
    pub discovery: DnsDiscovery,
}

impl DemoClient {
    /// Reads the topology from `config`, starts DNS discovery of `profile` and builds the stack.
    pub async fn build(
        config: &Path,
        tuning: &Tuning,
        events: EventBus,
    ) -> Result<DemoClient, DemoError> {
        let topology = Arc::new(Topology::load(config)?);
        let control = Control::new(&topology, events.clone());
        let discovery = DnsDiscovery::start(topology.clone(), "profile", events.clone()).await?;
        let http = http_client(tuning.connect_timeout);
        let balance = LocalityBalance::builder(&topology, discovery.watch())
            .control(control.clone())
            .events(events);
        let service = ServiceBuilder::new()
            .layer(
                Failover::builder()
                    .deadline(tuning.deadline)
                    .try_timeout(tuning.try_timeout)
                    .max_attempts(tuning.max_attempts)
                    .budget(tuning.budget_ratio, tuning.budget_floor_per_sec)
                    .policy(Idempotent)
                    .dependency("profile")
                    .layer(),
            )
            .layer(LocalityBalanceLayer::new(balance))
            .service(move |ep: &Endpoint| WhoEndpoint::new(http.clone(), ep.addr));
        Ok(DemoClient {
            service,
            topology,
            control,
            discovery,
        })
    }
}

/// A short, stable name for the kind of a failed call: ha-core's [`HaError::kind`] when the
/// error is one (`deadline_exceeded`, `no_healthy_endpoint`, ...), else the endpoint's
/// [`EndpointError::kind`], else `other`.
pub fn error_kind(err: &(dyn std::error::Error + 'static)) -> &'static str {
    // An endpoint's own error inside `HaError::Backend` / `OutcomeUnknown` names the kind more
    // exactly than the wrapper; ha-core's other kinds (deadline, no endpoint) are the answer.
    if let Some(ha) = HaError::find(err)
        && !matches!(ha, HaError::Backend(_) | HaError::OutcomeUnknown { .. })
    {
        return ha.kind();
    }
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(ep) = e.downcast_ref::<EndpointError>() {
            return ep.kind();
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return "try_timeout";
        }
        cur = e.source();
    }
    "other"
}
