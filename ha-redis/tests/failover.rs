//! Failovers against the real lab under 200 writes/s: planned `SENTINEL FAILOVER` (no
//! acknowledged write lost, no error seen) and kill -9 of the master (lag from
//! `+switch-master` to the first acknowledged write, every acknowledged write present).
//!
//! The tests assert correctness only (no timing thresholds); the figures they print are what
//! `README.md` reports. Every wait is bounded. The two tests take turns (one lab at a time):
//! a 2-core machine running two failover drills at once measures the machine, not the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::HaRedis;
use tokio::time::Instant;

mod common;
use common::{
    PREFIX, SERIAL, Write, build, collect_events, holds, init_tracing, lost, start_load,
    start_load_at,
};

async fn wait_client_on(client: &HaRedis, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if client.current_master().is_some_and(|m| m.addr == addr) && !client.is_holding() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "client did not follow to {addr} within {timeout:?}: {:?}",
            client.current_master()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A separate subscription to `+switch-master` on `sentinel`: the instant it is seen.
async fn watch_switch(sentinel: SocketAddr) -> tokio::sync::oneshot::Receiver<Instant> {
    let client = ha_redis::redis::Client::open(format!("redis://{sentinel}")).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("+switch-master").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut s = ps.into_on_message();
        if s.next().await.is_some() {
            let _ = tx.send(Instant::now());
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failovers_lose_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let bus = ha_core::EventBus::default();
    let events = collect_events(&bus);
    let client = build(&lab).events(bus).build().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (log, load) = start_load(client.master(), stop.clone());
    let mut lost_per_run = Vec::new();
    let mut lost_before = 0;
    for round in 0..5 {
        let before = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        lab.failover().await.unwrap();
        let after = lab
            .wait_switched_from(before, Duration::from_secs(15))
            .await
            .unwrap();
        wait_client_on(&client, after, Duration::from_secs(10)).await;
        // Settled: the old master converted and resynced, so anything it alone acknowledged
        // would be gone now.
        let master = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
        // The log first, then the dump: a write acknowledged in between is not a loss.
        let snapshot = log.lock().await.clone();
        let dump = lab.dump(master, PREFIX).await.unwrap();
        let missing = lost(&snapshot, &dump).len();
        lost_per_run.push(missing.saturating_sub(lost_before));
        lost_before = missing;
        println!(
            "planned round {round}: {before} -> {after}, writes so far {}, lost this round {}",
            snapshot.len(),
            lost_per_run[round]
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(5), load)
        .await
        .unwrap()
        .unwrap();
    let master = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
    let dump = lab.dump(master, PREFIX).await.unwrap();
    let log = log.lock().await.clone();
    let errors: Vec<&Write> = log.iter().filter(|w| w.result.is_err()).collect();
    let missing = lost(&log, &dump);
    let max_wait = log
        .iter()
        .map(|w| w.done - w.issued)
        .max()
        .unwrap_or_default();
    println!(
        "planned: {} writes, {} acked, lost per run {lost_per_run:?}, errors {}, longest write {max_wait:?}, stats {:?}",
        log.len(),
        log.len() - errors.len(),
        errors.len(),
        client.stats()
    );
    assert!(log.len() > 1000, "the load ran");
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    assert!(
        errors.is_empty(),
        "callers saw errors: {:?}",
        errors.iter().take(10).collect::<Vec<_>>()
    );
    assert!(client.stats().switches >= 6, "{:?}", client.stats());
    // Every failover told through the events: writes held, then released to a new master,
    // in that order, never an abort.
    let holds = holds(&events.lock());
    println!("planned: hold events {holds:?}");
    assert!(holds.len() >= 10, "{holds:?}");
    for pair in holds.chunks(2) {
        assert!(pair[0].is_ok(), "a hold comes first: {holds:?}");
        let Some(Err((master, _, aborted))) = pair.get(1) else {
            panic!("each hold is released: {holds:?}");
        };
        assert!(!aborted, "{holds:?}");
        assert!(lab.nodes.iter().any(|n| n.addr == *master), "{holds:?}");
    }
    let held: u64 = holds
        .iter()
        .filter_map(|h| h.as_ref().err())
        .map(|r| r.1)
        .sum();
    assert_eq!(held, client.stats().held_writes, "{holds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_master_is_followed_by_events() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = build(&lab).build().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (log, load) = start_load(client.master(), stop.clone());
    let mut lags_ms = Vec::new();
    let mut errors_per_kill = Vec::new();
    for round in 0..5 {
        let before = lab.wait_stable(2, Duration::from_secs(40)).await.unwrap();
        let victim = lab.node_at(before).unwrap().clone();
        let observer = lab
            .sentinels
            .iter()
            .find(|s| s.idc != victim.idc)
            .unwrap()
            .addr;
        let switched = watch_switch(observer).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        lab.kill(&victim.name).await.unwrap();
        let after = lab
            .wait_switched_from(before, Duration::from_secs(20))
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), switched)
            .await
            .unwrap()
            .unwrap();
        wait_client_on(&client, after, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let snapshot = log.lock().await.clone();
        let first_ack = snapshot
            .iter()
            .filter(|w| w.result.is_ok() && w.done > killed_at)
            .map(|w| w.done)
            .min()
            .unwrap();
        // Signed: the client may switch on `+promoted-slave`, before `+switch-master`.
        let lag_ms = if first_ack >= seen {
            (first_ack - seen).as_secs_f64() * 1e3
        } else {
            -((seen - first_ack).as_secs_f64() * 1e3)
        };
        let errors: Vec<&Write> = snapshot
            .iter()
            .filter(|w| w.result.is_err() && w.done > killed_at)
            .collect();
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for w in &errors {
            let k = w.result.as_ref().unwrap_err();
            *kinds
                .entry(k.split(':').next().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        println!(
            "kill round {round}: {before} -> {after}, +switch-master {:?} after the kill, lag to first ack {lag_ms:.2} ms, errors {} {kinds:?}",
            seen - killed_at,
            errors.len()
        );
        lags_ms.push(lag_ms);
        errors_per_kill.push(errors.len());
        // Every error is typed: an HaError, never a raw redis I/O error.
        for w in &errors {
            let e = w.result.as_ref().unwrap_err();
            assert!(!e.starts_with("redis:"), "untyped error: {e}");
        }
        lab.restart_as_replica(&victim.name, after).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(5), load)
        .await
        .unwrap()
        .unwrap();
    let master = lab.wait_stable(2, Duration::from_secs(40)).await.unwrap();
    let dump = lab.dump(master, PREFIX).await.unwrap();
    let log = log.lock().await.clone();
    let missing = lost(&log, &dump);
    let mut sorted = lags_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!(
        "kill -9: {} writes, lost {}, lag ms {lags_ms:?} (median {:.2}, max {:.2}), errors per kill {errors_per_kill:?}, stats {:?}",
        log.len(),
        missing.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        client.stats()
    );
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_2000_writes_per_second_with_durable_acks_loses_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = build(&lab).build().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Every replica must acknowledge: `WAIT 1` could be met by the replica not promoted.
    let master = client.master().durable(2, Duration::from_millis(200));
    let (log, load) = start_load_at(master, stop.clone(), Duration::from_millis(1), 2);
    let before = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = lab.node_at(before).unwrap().clone();
    let killed_at = Instant::now();
    lab.kill(&victim.name).await.unwrap();
    let after = lab
        .wait_switched_from(before, Duration::from_secs(20))
        .await
        .unwrap();
    wait_client_on(&client, after, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), load)
        .await
        .unwrap()
        .unwrap();
    let master = lab.wait_stable(1, Duration::from_secs(40)).await.unwrap();
    let dump = lab.dump(master, PREFIX).await.unwrap();
    let log = log.lock().await.clone();
    let missing = lost(&log, &dump);
    let acked = log.iter().filter(|w| w.result.is_ok()).count();
    let secs = log
        .iter()
        .map(|w| w.issued)
        .max()
        .zip(log.iter().map(|w| w.issued).min())
        .map_or(0.0, |(a, b)| (a - b).as_secs_f64());
    let errors_after_kill = log
        .iter()
        .filter(|w| w.result.is_err() && w.done > killed_at)
        .count();
    println!(
        "durable kill -9: {} writes in {secs:.1} s ({:.0}/s), {acked} acked, lost {}, errors after the kill {errors_after_kill}, stats {:?}",
        log.len(),
        log.len() as f64 / secs.max(0.001),
        missing.len(),
        client.stats()
    );
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}
