//! A tiny HTTP/1.1 backend for demos and tests: `GET /who` says which server answered.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::http::WhoServer;
//! let who = WhoServer::start("who-bj-a-1", "bj-a", "127.0.1.11:0".parse().unwrap()).await?;
//! // GET http://{addr}/who -> {"idc":"bj-a","addr":"127.0.1.11:PORT","name":"who-bj-a-1"}
//! # Ok(()) }
//! ```

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinSet};

use crate::LabError;
use crate::listener::{self, AcceptTask};

/// The JSON body of `GET /who`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Who {
    /// The IDC of the server.
    pub idc: String,
    /// The server's own bound address, `ip:port`.
    pub addr: String,
    /// The server's name.
    pub name: String,
}

/// A running `GET /who` HTTP/1.1 server (hyper 1, keep-alive).
pub struct WhoServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: AcceptTask,
}

struct Shared {
    body: Bytes,
    requests: AtomicU64,
}

impl std::fmt::Debug for WhoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhoServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl WhoServer {
    /// Serves HTTP/1.1 with keep-alive on `bind` (port 0 allowed). `GET /who` answers 200 with
    /// JSON `{"idc": idc, "addr": "<ip:port>", "name": name}`; other paths answer 404.
    pub async fn start(name: &str, idc: &str, bind: SocketAddr) -> Result<WhoServer, LabError> {
        let (listener, addr) = listener::bind(bind).await?;
        let who = Who {
            idc: idc.to_owned(),
            addr: addr.to_string(),
            name: name.to_owned(),
        };
        let body = serde_json::to_vec(&who).map_err(|source| LabError::Json {
            context: format!("encode /who of {name}"),
            source,
        })?;
        let shared = Arc::new(Shared {
            body: Bytes::from(body),
            requests: AtomicU64::new(0),
        });
        let accept = AcceptTask::spawn("who server", addr, accept_loop(listener, shared.clone()));
        tracing::info!(name, idc, %addr, "who server started");
        Ok(WhoServer {
            shared,
            addr,
            accept,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests served so far (any path, over all restarts).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// True while listening.
    pub async fn is_running(&self) -> bool {
        self.accept.is_running().await
    }

    /// Closes the listener and every open connection. Idempotent.
    pub async fn stop(&self) {
        self.accept.stop().await;
    }

    /// Listens again on the same address (after a stop; on a running server, stop then start).
    pub async fn restart(&self) -> Result<(), LabError> {
        let shared = self.shared.clone();
        self.accept.restart(|l| accept_loop(l, shared)).await
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connections here means aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "who accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let mut resp = if req.method() == Method::GET && req.uri().path() == "/who" {
        let mut r = Response::new(Full::new(shared.body.clone()));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}
