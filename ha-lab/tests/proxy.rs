#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fault proxy in front of a real echo server.

use std::{net::SocketAddr, time::Duration};

use ha_lab::proxy::{Fault, FaultProxy};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::{Instant, timeout},
};

const WAIT: Duration = Duration::from_secs(3);
const SHORT: Duration = Duration::from_millis(300);

/// An echo server aborted on drop; records the peer addresses it saw.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
    peers: tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(ip: &str) -> Echo {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, peers) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        loop {
            let (mut s, peer) = l.accept().await.unwrap();
            let _ = tx.send(peer);
            set.spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo { addr, task, peers }
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn pass_through_echo_from_the_proxy_ip() {
    let mut up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    assert_eq!(proxy.upstream(), up.addr);
    assert_eq!(proxy.fault(), Fault::Pass);
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"hello").await;
    roundtrip(&mut c, b"again").await;
    assert_eq!(proxy.connections(), 1);
    let peer = timeout(WAIT, up.peers.recv()).await.unwrap().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "127.0.1.212",
        "upstream sees the proxy's IDC address"
    );
}

#[tokio::test]
async fn latency_adds_delay_each_direction() {
    let up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"warm").await;
    let d = Duration::from_millis(150);
    proxy.set_fault(Fault::Latency(d));
    let t = Instant::now();
    roundtrip(&mut c, b"slow").await;
    assert!(
        t.elapsed() >= d * 2,
        "existing connection delayed both ways: {:?}",
        t.elapsed()
    );
    let mut c2 = connect(proxy.addr()).await;
    let t = Instant::now();
    roundtrip(&mut c2, b"slow2").await;
    assert!(
        t.elapsed() >= d * 2,
        "new connection delayed: {:?}",
        t.elapsed()
    );
    proxy.set_fault(Fault::Pass);
    roundtrip(&mut c, b"fast").await;
}

#[tokio::test]
async fn round_trip_latency_is_what_a_request_and_its_answer_gain() {
    let up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"warm").await;
    let d = Duration::from_millis(300);
    proxy.set_fault(Fault::RoundTrip(d));
    for (conn, what) in [
        (&mut c, "existing"),
        (&mut connect(proxy.addr()).await, "new"),
    ] {
        let t = Instant::now();
        roundtrip(conn, b"slow").await;
        let took = t.elapsed();
        // The semantics, not a speed: 1x the fault per round trip (half each way), not 2x.
        assert!(
            took >= d,
            "{what} connection: a round trip gains the fault: {took:?}"
        );
        assert!(
            took < d * 2,
            "{what} connection: not the fault each way: {took:?}"
        );
    }
    proxy.set_fault(Fault::Pass);
    roundtrip(&mut c, b"fast").await;
}

#[tokio::test]
async fn blackhole_existing_and_new_then_heal() {
    let up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"before").await;
    proxy.set_fault(Fault::Blackhole);

    c.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        timeout(SHORT, c.read(&mut buf)).await.is_err(),
        "existing connection hangs"
    );

    let mut c2 = connect(proxy.addr()).await;
    c2.write_all(b"lost too").await.unwrap();
    assert!(
        timeout(SHORT, c2.read(&mut buf)).await.is_err(),
        "new connection hangs"
    );

    proxy.set_fault(Fault::Pass);
    roundtrip(&mut c, b"healed").await;
    roundtrip(&mut c2, b"healed2").await;
}

#[tokio::test]
async fn reset_existing_and_new_connections() {
    let up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"before").await;
    proxy.set_fault(Fault::Reset);
    let mut buf = [0u8; 16];
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "existing connection reset or closed: {r:?}"
    );
    if let Err(e) = &r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }

    let mut c2 = connect(proxy.addr()).await;
    let r = timeout(WAIT, c2.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "new connection reset: {r:?}");

    proxy.set_fault(Fault::Pass);
    let mut c3 = connect(proxy.addr()).await;
    roundtrip(&mut c3, b"healed").await;
}

#[tokio::test]
async fn stop_refuses_and_restart_listens_again() {
    let up = echo("127.0.1.211").await;
    let proxy = FaultProxy::start("127.0.1.212:0".parse().unwrap(), up.addr)
        .await
        .unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"x").await;
    proxy.stop().await;
    proxy.stop().await;
    let mut buf = [0u8; 4];
    let r = timeout(WAIT, c.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "existing connection closed");
    assert!(
        TcpStream::connect(proxy.addr()).await.is_err(),
        "connect refused"
    );
    proxy.restart().await.unwrap();
    let mut c = connect(proxy.addr()).await;
    roundtrip(&mut c, b"back").await;
}
