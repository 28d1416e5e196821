#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `/who` HTTP backend over real keep-alive connections.

use std::time::Duration;

use ha_lab::http::{Who, WhoServer};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::timeout,
};

const WAIT: Duration = Duration::from_secs(3);

/// Sends one GET on a kept-alive connection; returns (status, body).
async fn get(s: &mut BufReader<TcpStream>, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n");
    s.get_mut().write_all(req.as_bytes()).await.unwrap();
    timeout(WAIT, async {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            s.read_line(&mut h).await.unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn who_answers_json_with_keep_alive_and_404() {
    let srv = WhoServer::start("who-test", "bj-b", "127.0.2.211:0".parse().unwrap())
        .await
        .unwrap();
    let mut s = BufReader::new(TcpStream::connect(srv.addr()).await.unwrap());
    let (status, body) = get(&mut s, "/who").await;
    assert_eq!(status, 200);
    let who: Who = serde_json::from_str(&body).unwrap();
    assert_eq!(
        who,
        Who {
            idc: "bj-b".into(),
            addr: srv.addr().to_string(),
            name: "who-test".into()
        }
    );
    let (status, _) = get(&mut s, "/nope").await;
    assert_eq!(status, 404);
    let (status, _) = get(&mut s, "/who").await;
    assert_eq!(status, 200, "same connection kept alive");
    assert_eq!(srv.requests(), 3);

    srv.stop().await;
    let mut buf = [0u8; 8];
    let r = timeout(WAIT, s.read(&mut buf)).await.unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "open connection closed on stop"
    );
    assert!(TcpStream::connect(srv.addr()).await.is_err());
    srv.restart().await.unwrap();
    let mut s = BufReader::new(TcpStream::connect(srv.addr()).await.unwrap());
    assert_eq!(get(&mut s, "/who").await.0, 200);
}
