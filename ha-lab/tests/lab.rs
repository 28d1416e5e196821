#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The whole lab in-process (ports shifted by 1100 so it can run beside a default lab).

use std::{net::IpAddr, time::Duration};

use ha_lab::{
    Lab, LabOptions,
    control::{ControlRequest, FaultAction, request},
    dns::DnsMode,
    lab::{Manifest, ServerKind, probe},
    proxy::Fault,
};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

const WAIT: Duration = Duration::from_secs(3);

async fn resolve(server: std::net::SocketAddr, name: &str) -> Vec<IpAddr> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    sock.send(&msg.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(WAIT, sock.recv(&mut buf)).await.unwrap().unwrap();
    let mut ips: Vec<IpAddr> = Message::from_vec(&buf[..n])
        .unwrap()
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}

async fn who(addr: std::net::SocketAddr) -> String {
    let mut s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(b"GET /who HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn lab_starts_publishes_and_takes_faults() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(LabOptions {
        dir: dir.path().to_owned(),
        ..LabOptions::default().with_port_offset(1100).unwrap()
    })
    .await
    .unwrap();

    let m = Manifest::read(dir.path()).unwrap();
    assert_eq!(m, lab.manifest().await);
    assert_eq!(m.servers.len(), 2 + 6 + 6);
    assert_eq!(m.daemon_pid, std::process::id());
    for s in &m.servers {
        assert!(probe(s, WAIT).await, "{} answers", s.name);
    }
    let dns_north = m.server("dns-north").unwrap();
    assert_eq!(dns_north.kind, ServerKind::Dns);
    assert_eq!(dns_north.address.to_string(), "127.0.1.53:16453");
    let proxy = m.server("proxy-sh-a-2").unwrap();
    assert_eq!(proxy.address.to_string(), "127.0.3.12:19181");
    assert_eq!(proxy.idc, "sh-a");

    // Both regions publish the six proxies.
    let expected: Vec<IpAddr> = [
        "127.0.1.11",
        "127.0.1.12",
        "127.0.2.11",
        "127.0.2.12",
        "127.0.3.11",
        "127.0.3.12",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for region in ["north", "south"] {
        let dns = lab.dns(region).unwrap();
        assert_eq!(resolve(dns.addr(), "profile.north.lab.").await, expected);
    }

    // A request through the proxy reaches the backend of the same IDC.
    let body = who(lab.proxy("proxy-bj-b-1").unwrap().addr()).await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("\"idc\":\"bj-b\""), "{body}");
    assert!(body.contains("\"name\":\"who-bj-b-1\""), "{body}");
    assert_eq!(lab.who("who-bj-b-1").unwrap().requests(), 1);

    // Faults over the control socket.
    let fault = |target: &str, action| ControlRequest::Fault {
        target: target.into(),
        action,
    };
    request(&m.control, &ControlRequest::Ping, WAIT)
        .await
        .unwrap();
    request(
        &m.control,
        &fault("proxy-bj-a-1", FaultAction::Latency { ms: 50 }),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(
        lab.proxy("proxy-bj-a-1").unwrap().fault(),
        Fault::Latency(Duration::from_millis(50))
    );
    request(&m.control, &fault("dns-south", FaultAction::Freeze), WAIT)
        .await
        .unwrap();
    assert_eq!(lab.dns("south").unwrap().mode(), DnsMode::Silent);
    request(&m.control, &fault("dns-south", FaultAction::Thaw), WAIT)
        .await
        .unwrap();
    assert_eq!(lab.dns("south").unwrap().mode(), DnsMode::Serve);
    request(&m.control, &fault("who-sh-a-1", FaultAction::Kill), WAIT)
        .await
        .unwrap();
    assert!(!probe(m.server("who-sh-a-1").unwrap(), WAIT).await);
    request(&m.control, &fault("who-sh-a-1", FaultAction::Restart), WAIT)
        .await
        .unwrap();
    assert!(probe(m.server("who-sh-a-1").unwrap(), WAIT).await);

    let err = request(&m.control, &fault("nope", FaultAction::Kill), WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown server") && err.contains("proxy-bj-a-1"),
        "{err}"
    );
    let err = lab
        .apply("who-bj-a-1", FaultAction::Latency { ms: 1 })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy-bj-a-1"), "hint names the proxy: {err}");

    // Shutdown over the control socket wakes the owner, who stops the lab.
    request(&m.control, &ControlRequest::Shutdown, WAIT)
        .await
        .unwrap();
    timeout(WAIT, lab.shutdown_requested()).await.unwrap();
    lab.stop().await;
    assert!(!Manifest::path(dir.path()).exists());
    for s in &m.servers {
        assert!(
            !probe(s, Duration::from_millis(300)).await,
            "{} stopped",
            s.name
        );
    }
}

#[test]
fn a_port_offset_past_65535_is_an_error_naming_offset_and_port() {
    let err = LabOptions::new("unused")
        .with_port_offset(60000)
        .unwrap_err();
    assert!(err.is_port_overflow(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("60000") && text.contains("15353") && text.contains("dns-north"),
        "{err}"
    );
    // The largest offset that fits the highest default port (18081) is fine.
    let options = LabOptions::new("unused")
        .with_port_offset(65535 - 18081)
        .unwrap();
    assert!(options.backends.iter().all(|b| b.proxy.port() == 65535));
    assert_eq!(options.port_offset, 65535 - 18081);
    let err = options.with_port_offset(1).unwrap_err();
    assert!(err.to_string().contains("18081"), "{err}");
}
