//! Reads from the same IDC's replica, and away from it when it is killed (real lab).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Duration;

use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::ReplicaHandle;
use tokio::time::Instant;

mod common;

/// The port of the node that answered.
async fn who(r: &ReplicaHandle) -> Result<u16, ha_core::HaError> {
    let info: String = r.query(ha_redis::redis::cmd("INFO").arg("server")).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_in_the_local_idc_and_move_when_its_replica_dies() {
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = common::client_in(&lab, "bj-b").await;
    let replicas = client.replicas().expect("built with a topology");
    let (master, local, remote) = (lab.nodes[0].addr, lab.nodes[1].addr, lab.nodes[2].addr);
    for _ in 0..20 {
        assert_eq!(who(&replicas).await.unwrap(), local.port());
    }
    lab.kill("redis-bj-b").await.unwrap();
    let killed = Instant::now();
    let mut errors = 0;
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "reads did not move"
        );
        match who(&replicas).await {
            Ok(p) if p == remote.port() => break,
            Ok(p) => assert_ne!(p, master.port(), "a read went to the master"),
            Err(_) => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "replicas: reads moved from bj-b to sh-a {:?} after the kill, {errors} errors meanwhile",
        killed.elapsed()
    );
    for _ in 0..20 {
        let p = who(&replicas).await.unwrap();
        assert_eq!(p, remote.port());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_writes_and_reads_fall_back_to_the_master() {
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = common::client_in(&lab, "bj-b").await;
    let (master, local) = (lab.nodes[0].addr, lab.nodes[1].addr);
    let window = Duration::from_millis(300);
    let mut s = client.session(window).expect("built with a topology");
    // No write yet: the local replica answers.
    assert_eq!(who(&s.replicas).await.unwrap(), local.port());
    // Right after a write: the master answers, with the value just written.
    let _: () = ha_redis::redis::AsyncCommands::set(&mut s.master, "ryw:k", "v1")
        .await
        .unwrap();
    assert_eq!(who(&s.replicas).await.unwrap(), master.port());
    let v: String = s
        .replicas
        .query(ha_redis::redis::cmd("GET").arg("ryw:k"))
        .await
        .unwrap();
    assert_eq!(v, "v1");
    // Another handle without the session is not affected.
    let plain = client.replicas().unwrap();
    assert_eq!(who(&plain).await.unwrap(), local.port());
    // After the window: the replica again.
    tokio::time::sleep(window).await;
    assert_eq!(who(&s.replicas).await.unwrap(), local.port());
    // Every replica gone from Sentinel's list: reads go to the master (bounded wait for
    // Sentinel to drop them and the set to follow).
    lab.kill("redis-bj-b").await.unwrap();
    lab.kill("redis-sh-a").await.unwrap();
    let killed = Instant::now();
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "reads did not fall back to the master"
        );
        if let Ok(p) = who(&plain).await
            && p == master.port()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "replicas: reads fell back to the master {:?} after both replicas were killed",
        killed.elapsed()
    );
}
