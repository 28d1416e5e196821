#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The RocketMQ lab against the real servers (`rocketmq-namesrv-rust`, `rocketmq-broker-rust`;
//! `scripts/setup` installs them). Each test starts its own lab on its own ports; nextest runs
//! them one at a time (`failover-lab` group): two brokers per lab are heavy for a 2-core machine.

use std::{net::SocketAddr, time::Duration};

use ha_lab::{
    process::pid_alive,
    rocketmq::{GET_BROKER_RUNTIME_INFO, RocketMqLab, RocketMqLabOptions, remoting_request},
};
use tokio::{net::TcpStream, time::timeout};

const IDCS: [&str; 2] = ["bj-a", "sh-a"];

async fn start() -> RocketMqLab {
    let t = tokio::time::Instant::now();
    let lab = RocketMqLab::start(RocketMqLabOptions::default())
        .await
        .expect("rocketmq lab starts (servers installed by scripts/setup?)");
    eprintln!("rocketmq lab ready in {:?}", t.elapsed());
    lab
}

async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn refuses(addr: SocketAddr) -> bool {
    matches!(
        timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// True when the broker answers a remoting request within 1 s (any response code).
async fn broker_answers(addr: SocketAddr) -> bool {
    remoting_request(addr, GET_BROKER_RUNTIME_INFO, Duration::from_secs(1))
        .await
        .is_ok()
}

/// Waits (bounded) until `pid` is gone (reaped, or a zombie of a dropped child).
async fn gone(pid: u32) -> bool {
    timeout(Duration::from_secs(10), async {
        while pid_alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn lab_starts_two_independent_clusters() {
    let lab = start().await;
    for idc in IDCS {
        let i = lab.idc(idc).unwrap();
        let namesrv = lab.namesrv_addr(idc).unwrap();
        let broker = lab.broker_addr(idc).unwrap();
        assert!(accepts(namesrv).await, "{idc} name server {namesrv}");
        assert!(accepts(broker).await, "{idc} broker {broker}");
        assert!(
            broker_answers(broker).await,
            "{idc} broker answers remoting"
        );
        assert_eq!(namesrv.ip(), broker.ip(), "one address per IDC");
        assert_eq!(i.broker_fast.port() + 2, broker.port());
        assert_eq!(i.broker_ha.port(), broker.port() + 1);

        // Each name server knows its own IDC's broker and nothing else.
        let info = lab.cluster_info(idc).await.unwrap();
        let broker_name = lab.broker_name(idc).unwrap();
        let cluster = lab.cluster_name(idc).unwrap();
        assert_eq!(cluster, format!("cluster-{idc}"));
        assert!(info.lists(broker_name, broker), "{idc}: {info:?}");
        assert_eq!(
            info.brokers.keys().collect::<Vec<_>>(),
            [broker_name],
            "{idc}: {info:?}"
        );
        assert_eq!(info.brokers[broker_name].cluster, cluster);
        assert_eq!(
            info.clusters.keys().collect::<Vec<_>>(),
            [cluster],
            "{idc}: {info:?}"
        );
        assert!(lab.namesrv_pid(idc).is_some() && lab.broker_pid(idc).is_some());
    }
    assert_ne!(lab.namesrv_addr("bj-a"), lab.namesrv_addr("sh-a"));
    assert_eq!(lab.namesrv_addr("nowhere"), None);
    assert!(
        lab.kill_broker("nowhere")
            .await
            .unwrap_err()
            .is_unknown_server()
    );
    lab.stop().await;
}

#[tokio::test]
async fn a_killed_broker_refuses_and_restarts_on_the_same_port_and_store() {
    let lab = start().await;
    let broker = lab.broker_addr("bj-a").unwrap();
    let old = lab.broker_pid("bj-a").unwrap();
    let other = lab.broker_pid("sh-a").unwrap();
    let store = lab.dir().join("broker-bj-a").join("store");
    assert!(store.is_dir());

    lab.kill_broker("bj-a").await.unwrap();
    assert_eq!(lab.broker_pid("bj-a"), None);
    assert!(gone(old).await, "old broker pid {old} still alive");
    assert!(
        refuses(broker).await,
        "{broker} still accepts after the kill"
    );

    let t = tokio::time::Instant::now();
    let new = lab.restart_broker("bj-a").await.unwrap();
    eprintln!("broker restarted and registered in {:?}", t.elapsed());
    assert_ne!(new, old);
    assert_eq!(lab.broker_pid("bj-a"), Some(new));
    assert!(accepts(broker).await);
    assert!(broker_answers(broker).await);
    assert!(lab.is_registered("bj-a").await.unwrap());
    assert!(store.is_dir(), "the store stays");

    // The other cluster did not notice.
    assert_eq!(lab.broker_pid("sh-a"), Some(other));
    assert!(lab.is_registered("sh-a").await.unwrap());
    lab.stop().await;
}

#[tokio::test]
async fn frozen_servers_do_not_answer_until_thawed() {
    let lab = start().await;
    let broker = lab.broker_addr("bj-a").unwrap();

    lab.freeze_broker("bj-a").unwrap();
    assert!(
        !broker_answers(broker).await,
        "a frozen broker answered remoting"
    );
    assert!(
        broker_answers(lab.broker_addr("sh-a").unwrap()).await,
        "the other IDC's broker answers"
    );
    lab.thaw_broker("bj-a").unwrap();
    assert!(broker_answers(broker).await, "the thawed broker answers");

    lab.freeze_namesrv("bj-a").unwrap();
    assert!(lab.cluster_info("bj-a").await.is_err());
    lab.thaw_namesrv("bj-a").unwrap();
    assert!(lab.is_registered("bj-a").await.unwrap());
    lab.stop().await;
}

#[tokio::test]
async fn a_killed_name_server_restarts_and_the_broker_registers_again() {
    let lab = start().await;
    let namesrv = lab.namesrv_addr("sh-a").unwrap();
    let old = lab.namesrv_pid("sh-a").unwrap();

    lab.kill_namesrv("sh-a").await.unwrap();
    assert!(gone(old).await);
    assert!(refuses(namesrv).await);
    assert!(lab.cluster_info("sh-a").await.is_err());
    // The broker does not depend on its name server to serve.
    assert!(broker_answers(lab.broker_addr("sh-a").unwrap()).await);

    let t = tokio::time::Instant::now();
    let new = lab.restart_namesrv("sh-a").await.unwrap();
    eprintln!(
        "name server restarted, broker registered again in {:?}",
        t.elapsed()
    );
    assert_ne!(new, old);
    assert!(accepts(namesrv).await);
    assert!(lab.is_registered("sh-a").await.unwrap());
    lab.stop().await;
}

#[tokio::test]
async fn stop_leaves_no_process_and_no_files() {
    let lab = start().await;
    let pids = lab.pids();
    assert_eq!(pids.len(), 4, "{pids:?}");
    let dir = lab.dir().to_owned();
    // A frozen server is stopped too.
    lab.freeze_broker("sh-a").unwrap();
    lab.stop().await;
    for (name, pid) in pids {
        assert!(!pid_alive(pid), "{name} (pid {pid}) survived stop");
    }
    assert!(!dir.exists() || std::env::var_os("HA_LAB_KEEP").is_some());
}

#[tokio::test]
async fn dropping_the_lab_kills_every_server() {
    let lab = start().await;
    let pids = lab.pids();
    assert_eq!(pids.len(), 4, "{pids:?}");
    drop(lab);
    for (name, pid) in pids {
        assert!(gone(pid).await, "{name} (pid {pid}) survived the drop");
    }
}
