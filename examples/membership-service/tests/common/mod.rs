//! Shared by the HTTP tests: the lab stack, a started service, a small HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ha_lab::stack::{Stack, StackOptions};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use membership_service::{Service, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-admin-token-0123";

/// A running service instance.
pub struct Running {
    pub addr: SocketAddr,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Triggers the graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub async fn stack() -> Stack {
    tokio::time::timeout(
        Duration::from_secs(120),
        Stack::start(StackOptions::default()),
    )
    .await
    .expect("the stack starts within 120 s")
    .expect("the stack starts")
}

/// Starts the service of `idc` on an ephemeral port of its IDC's address.
pub async fn start(stack: &Stack, idc: &str, extra_app: &str) -> Running {
    let extra = extra_app.to_string();
    start_with(stack, idc, move |text| {
        if extra.is_empty() {
            text
        } else {
            text.replacen("[app]\n", &format!("[app]\n{extra}\n"), 1)
        }
    })
    .await
}

/// Starts the service of `idc` with its generated config passed through `edit`.
pub async fn start_with(stack: &Stack, idc: &str, edit: impl FnOnce(String) -> String) -> Running {
    let ip = match idc {
        "bj-a" => "127.0.1.100",
        "bj-b" => "127.0.2.100",
        _ => "127.0.3.100",
    };
    let listen: SocketAddr = format!("{ip}:0").parse().unwrap();
    let text = edit(stack.service_config(idc, listen, TOKEN));
    let cfg = ServiceConfig::from_toml_str(&text, "test.toml").expect("config");
    let service = tokio::time::timeout(Duration::from_secs(60), Service::start(cfg, None))
        .await
        .expect("the service starts within 60 s")
        .expect("the service starts");
    let listener = service.bind(Some(listen)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.serve(listener, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(c)
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The error code of a JSON error body (asserting the content type).
    pub fn code(&self) -> String {
        assert_eq!(
            self.headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{self:?}"
        );
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code: {self:?}"))
            .to_string()
    }
}

pub async fn call(
    c: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(15), c.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub const JSON: (&str, &str) = ("content-type", "application/json");

pub fn member(name: &str, level: &str) -> Vec<u8> {
    serde_json::json!({"name": name, "level": level, "expires_at": "2030-01-01T00:00:00Z"})
        .to_string()
        .into_bytes()
}

/// Sends raw bytes on a new connection and returns the status line's code.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"))
}
