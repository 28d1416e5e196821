#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real DNS over UDP and TCP against `LabDns`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ha_lab::dns::{DnsMode, LabDns};
use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

const WAIT: Duration = Duration::from_secs(2);

fn query_bytes(name: &str, rtype: RecordType) -> (u16, Vec<u8>) {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    (msg.metadata.id, msg.to_vec().unwrap())
}

/// One UDP query; `Err` when no answer comes within `wait` or the port is unreachable.
async fn udp_query(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    wait: Duration,
) -> Result<Message, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    let (id, bytes) = query_bytes(name, rtype);
    sock.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let msg = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(msg.metadata.id, id);
    Ok(msg)
}

async fn tcp_query(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(server))
        .await
        .unwrap()
        .unwrap();
    let (_, bytes) = query_bytes(name, rtype);
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    let len = tokio::time::timeout(WAIT, s.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn ips(msg: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

async fn start() -> LabDns {
    LabDns::start("north", "127.0.1.153:0".parse().unwrap(), "lab.")
        .await
        .unwrap()
}

#[tokio::test]
async fn serves_and_changes_records_over_udp_and_tcp() {
    let dns = start().await;
    assert_eq!(dns.region(), "north");
    let a: IpAddr = "127.0.1.11".parse().unwrap();
    let b: IpAddr = "127.0.2.11".parse().unwrap();
    dns.set_records("profile.north.lab.", &[a, b], 1).unwrap();

    let msg = udp_query(dns.addr(), "profile.north.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert!(msg.metadata.authoritative);
    assert_eq!(ips(&msg), vec![a, b]);
    assert_eq!(msg.answers[0].ttl, 1);

    // Relative names and case-insensitivity; the change is visible on the next query.
    dns.set_records("Profile.North", &[b], 3).unwrap();
    let msg = udp_query(dns.addr(), "PROFILE.north.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(ips(&msg), vec![b]);
    assert_eq!(dns.records("profile.north").unwrap(), vec![b]);

    let msg = tcp_query(dns.addr(), "profile.north.lab.", RecordType::A).await;
    assert_eq!(ips(&msg), vec![b]);

    // AAAA of a name with only A records: NODATA with the SOA.
    let msg = udp_query(dns.addr(), "profile.north.lab.", RecordType::AAAA, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert!(msg.answers.is_empty());
    assert_eq!(msg.authorities.len(), 1);

    dns.remove("profile.north").unwrap();
    let msg = udp_query(dns.addr(), "profile.north.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);

    // Out of zone: refused; and names outside the zone cannot be set.
    let msg = udp_query(dns.addr(), "example.com.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::Refused);
    assert!(dns.set_records("example.com.", &[a], 1).is_err());
    assert!(dns.queries() >= 6);
}

#[tokio::test]
async fn modes_silent_refused_servfail() {
    let dns = start().await;
    dns.set_records("svc", &["127.0.3.11".parse().unwrap()], 1)
        .unwrap();

    dns.set_mode(DnsMode::Silent);
    assert_eq!(dns.mode(), DnsMode::Silent);
    let before = dns.queries();
    let err = udp_query(
        dns.addr(),
        "svc.lab.",
        RecordType::A,
        Duration::from_millis(500),
    )
    .await
    .unwrap_err();
    assert_eq!(err, "timeout");
    assert_eq!(dns.queries(), before + 1, "silent still counts queries");

    dns.set_mode(DnsMode::Refused);
    let msg = udp_query(dns.addr(), "svc.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::Refused);

    dns.set_mode(DnsMode::ServFail);
    let msg = udp_query(dns.addr(), "svc.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);

    dns.set_mode(DnsMode::Serve);
    let msg = udp_query(dns.addr(), "svc.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(ips(&msg), vec!["127.0.3.11".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn stop_and_restart_keep_address_and_records() {
    let dns = start().await;
    let ip: IpAddr = "127.0.1.12".parse().unwrap();
    dns.set_records("svc", &[ip], 1).unwrap();
    assert!(dns.is_running().await);

    dns.stop().await;
    dns.stop().await; // idempotent
    assert!(!dns.is_running().await);
    let res = udp_query(
        dns.addr(),
        "svc.lab.",
        RecordType::A,
        Duration::from_millis(500),
    )
    .await;
    assert!(res.is_err(), "a stopped server must not answer: {res:?}");
    assert!(
        TcpStream::connect(dns.addr()).await.is_err(),
        "tcp connect refused when stopped"
    );

    dns.restart().await.unwrap();
    let msg = udp_query(dns.addr(), "svc.lab.", RecordType::A, WAIT)
        .await
        .unwrap();
    assert_eq!(ips(&msg), vec![ip]);
    let msg = tcp_query(dns.addr(), "svc.lab.", RecordType::A).await;
    assert_eq!(ips(&msg), vec![ip]);
}
