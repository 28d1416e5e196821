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
    // A pipeline in the window: the master too, as a whole.
    let (info, v): (String, String) = s
        .replicas
        .query_pipeline(
            ha_redis::redis::pipe()
                .cmd("INFO")
                .arg("server")
                .get("ryw:k"),
        )
        .await
        .unwrap();
    assert!(
        info.contains(&format!("tcp_port:{}", master.port())),
        "{info}"
    );
    assert_eq!(v, "v1");
    // Another handle without the session is not affected, pipelines included.
    let plain = client.replicas().unwrap();
    assert_eq!(who(&plain).await.unwrap(), local.port());
    let (info, _): (String, Option<String>) = plain
        .query_pipeline(
            ha_redis::redis::pipe()
                .cmd("INFO")
                .arg("server")
                .get("ryw:k"),
        )
        .await
        .unwrap();
    assert!(
        info.contains(&format!("tcp_port:{}", local.port())),
        "{info}"
    );
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

/// A client in `bj-b` whose replicas may trail the master by at most `max_lag` bytes, and
/// every event it publishes.
async fn client_with_lag_bound(
    lab: &RedisLab,
    max_lag: u64,
) -> (
    ha_redis::HaRedis,
    std::sync::Arc<parking_lot::Mutex<Vec<ha_core::TopologyEvent>>>,
) {
    let ctx = ha_core::HaContext::new(common::topology(
        lab,
        "bj-b",
        &format!("replica_max_lag_bytes = {max_lag}"),
    ));
    let events = common::collect_events(ctx.events());
    let client = ha_redis::HaRedis::builder_from_context(&ctx, "cache")
        .await
        .unwrap()
        .build()
        .await
        .unwrap();
    (client, events)
}

fn out_of_reads(e: &ha_core::TopologyEvent, addr: std::net::SocketAddr) -> bool {
    matches!(e, ha_core::TopologyEvent::ReplicaLagging { addr: a, .. } if *a == addr)
}

fn back_in_reads(e: &ha_core::TopologyEvent, addr: std::net::SocketAddr) -> bool {
    matches!(e, ha_core::TopologyEvent::ReplicaCaughtUp { addr: a, .. } if *a == addr)
}

/// Reads `n` times; every read answered by `port`, none outliving the deadline (1 s) by
/// more than scheduling slack.
async fn all_from(r: &ReplicaHandle, port: u16, n: usize) {
    for _ in 0..n {
        let t = Instant::now();
        let p = who(r).await.unwrap();
        assert_eq!(p, port);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_leave_a_replica_that_lags_and_return_when_it_caught_up() {
    let _serial = common::SERIAL.lock().await;
    common::init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let bound = 64 * 1024;
    let (client, events) = client_with_lag_bound(&lab, bound).await;
    let replicas = client.replicas().unwrap();
    let (master, local, remote) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    all_from(&replicas, local.addr.port(), 20).await;
    // Cut bj-b's replication (bj-b <-> the master's port only): every sentinel still reaches
    // the replica and reports its link ok, and the replica answers reads, stale.
    let cut = lab
        .cut(
            &[lab.idc_net("bj-b").unwrap()],
            &[lab.idc_net("bj-a").unwrap()],
            &[master.addr.port()],
        )
        .unwrap();
    let mut m = client.master();
    let value = "x".repeat(1024);
    for i in 0..200 {
        let _: () = ha_redis::redis::AsyncCommands::set(&mut m, format!("lag:{i}"), &value)
            .await
            .unwrap();
    }
    // The stale replica still has none of them.
    let stale: Option<String> = ha_redis::redis::AsyncCommands::get(
        &mut ha_redis::redis::Client::open(format!("redis://{}", local.addr))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap(),
        "lag:199",
    )
    .await
    .unwrap();
    assert_eq!(stale, None, "the cut replica got the writes");
    let cut_at = Instant::now();
    common::wait_event(&events, Duration::from_secs(10), "no ReplicaLagging", |e| {
        out_of_reads(e, local.addr)
    })
    .await;
    println!(
        "lag: bj-b out of the read set {:?} after 200 KiB it did not get; {:?}",
        cut_at.elapsed(),
        events.lock().iter().find(|e| out_of_reads(e, local.addr))
    );
    // Sentinel never noticed: it is our own check that moved the reads.
    all_from(&replicas, remote.addr.port(), 20).await;
    cut.heal().unwrap();
    let healed = Instant::now();
    common::wait_event(
        &events,
        Duration::from_secs(40),
        "no ReplicaCaughtUp",
        |e| back_in_reads(e, local.addr),
    )
    .await;
    println!("lag: bj-b back {:?} after the heal", healed.elapsed());
    // Back in the local IDC, with the writes it missed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while who(&replicas).await.unwrap() != local.addr.port() {
        assert!(Instant::now() < deadline, "reads did not come back to bj-b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: Option<String> = replicas
        .query(ha_redis::redis::cmd("GET").arg("lag:199"))
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some(value.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_leave_a_frozen_replica_within_their_deadline() {
    let _serial = common::SERIAL.lock().await;
    common::init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let (client, events) = client_with_lag_bound(&lab, 1 << 20).await;
    let replicas = client.replicas().unwrap();
    let (local, remote) = (&lab.nodes[1], &lab.nodes[2]);
    all_from(&replicas, local.addr.port(), 20).await;
    lab.supervisor().freeze(&local.name).unwrap();
    let frozen = Instant::now();
    let mut errors = 0;
    // Every read ends within its deadline, and they move to sh-a.
    loop {
        assert!(
            frozen.elapsed() < Duration::from_secs(15),
            "reads did not leave the frozen replica"
        );
        let t = Instant::now();
        match who(&replicas).await {
            Ok(p) if p == remote.addr.port() => break,
            Ok(p) => assert_eq!(p, local.addr.port(), "a read went to the master"),
            Err(e) => {
                assert!(
                    matches!(e, ha_core::HaError::DeadlineExceeded { .. }),
                    "{e:?}"
                );
                errors += 1;
            }
        }
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
    println!(
        "frozen: reads moved to sh-a {:?} after the SIGSTOP, {errors} deadline errors meanwhile",
        frozen.elapsed()
    );
    // Out of the read set: by our own check, or by Sentinel's `+sdown` if it came first.
    common::wait_event(&events, Duration::from_secs(10), "bj-b never left", |e| {
        out_of_reads(e, local.addr)
            || matches!(e, ha_core::TopologyEvent::EndpointRemoved { addr, .. } if *addr == local.addr)
    })
    .await;
    all_from(&replicas, remote.addr.port(), 20).await;
    lab.supervisor().thaw(&local.name).unwrap();
    common::wait_event(&events, Duration::from_secs(30), "bj-b never came back", |e| {
        back_in_reads(e, local.addr)
            || matches!(e, ha_core::TopologyEvent::EndpointAdded { addr, .. } if *addr == local.addr)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while who(&replicas).await.unwrap() != local.addr.port() {
        assert!(Instant::now() < deadline, "reads did not come back to bj-b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
