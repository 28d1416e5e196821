#![allow(clippy::unwrap_used, clippy::expect_used)]
//! nftables partitions (root). Uses /32 ranges of its own so that it never cuts the traffic of
//! other tests or a running lab.

use std::{net::SocketAddr, time::Duration};

use ha_lab::partition::{heal, nft_available, partition};
use ipnet::IpNet;
use tokio::{
    net::{TcpListener, TcpSocket},
    time::timeout,
};

/// Heals on drop, so a failing assertion does not leave the partition behind.
struct Healer(IpNet);

impl Drop for Healer {
    fn drop(&mut self) {
        let _ = heal(self.0);
    }
}

async fn connect_from(src: &str, dst: SocketAddr) -> Result<(), String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    match timeout(Duration::from_millis(700), sock.connect(dst)).await {
        Err(_) => Err("timeout".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

#[tokio::test]
async fn partition_drops_between_ranges_and_heals() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let listener = TcpListener::bind("127.0.3.221:0").await.unwrap();
    let dst = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _accept = Abort(accept);

    let idc: IpNet = "127.0.1.221/32".parse().unwrap();
    connect_from("127.0.1.221", dst).await.unwrap();
    partition(idc, &["127.0.3.221/32".parse().unwrap()]).unwrap();
    let healer = Healer(idc);
    assert_eq!(
        connect_from("127.0.1.221", dst).await.unwrap_err(),
        "timeout"
    );
    connect_from("127.0.2.221", dst).await.unwrap();

    heal(idc).unwrap();
    drop(healer);
    connect_from("127.0.1.221", dst).await.unwrap();
}

#[test]
fn heal_of_unpartitioned_range_is_ok() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    heal("127.0.1.222/32".parse().unwrap()).unwrap();
}
