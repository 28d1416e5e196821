//! Faults against the real lab: a master demoted behind Sentinel's back (`-READONLY`, retried
//! once on the next master), a frozen master (no call hangs past its deadline; the client
//! follows the failover), a failover that aborts (held writes released to the old master), every
//! sentinel lost, one sentinel lost during a planned failover, and a sentinel that names a wrong
//! master (outvoted; with no majority left, start-up refuses).
//! Correctness only, no timing thresholds; every wait bounded; one lab at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Duration;

use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::redis::AsyncCommands;
use tokio::time::Instant;

mod common;
use common::{SERIAL, build, collect_events, holds, init_tracing, wait_event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_master_is_left_and_the_write_retried_on_the_next() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    // Sentinel sometimes aborts the first failover of a master demoted this way
    // (`-failover-abort-no-good-slave`: the replicas' INFO is not fresh enough yet) and tries
    // again after twice the failover timeout (10 s in the lab). The client holds writes while
    // the master is ODOWN, so the hold must outlast that retry; the deadline bounds it.
    let patience = Duration::from_secs(45);
    let client = build(&lab).max_hold(patience).build().await.unwrap();
    let old = lab.nodes[0].addr;
    let mut m = client.master();
    let _: () = m.set("ro:before", 1).await.unwrap();
    // Demote the master behind Sentinel's back: it answers writes with -READONLY. Sentinel
    // notices the role change (down-after + 2 info periods) and fails over.
    let r = lab
        .redis_cmd(old, &["REPLICAOF", "127.0.1.250", "1"])
        .await
        .unwrap();
    assert_eq!(r.as_str(), Some("OK"));
    // One write with a deadline long enough for Sentinel's failover (and one retry of it):
    // -READONLY, re-discovery, a hold while the master is ODOWN, one retry on the new master.
    let mut patient = client.master().with_timeout(patience);
    let start = Instant::now();
    let r: ha_redis::redis::RedisResult<()> = patient.set("ro:after", 2).await;
    println!(
        "readonly: write done after {:?}: {r:?}, stats {:?}",
        start.elapsed(),
        client.stats()
    );
    r.unwrap();
    assert!(client.stats().retried >= 1, "{:?}", client.stats());
    let now = client.current_master().unwrap().addr;
    assert_ne!(now, old);
    let master = lab
        .wait_switched_from(old, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(now, master);
    let dump = lab.dump(master, "ro:").await.unwrap();
    assert_eq!(dump.get("ro:after").map(String::as_str), Some("2"));
    assert_eq!(dump.get("ro:before").map(String::as_str), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_master_no_call_hangs_and_the_failover_is_followed() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = build(&lab).build().await.unwrap();
    let old = lab.nodes[0].addr;
    let deadline = Duration::from_secs(1);
    lab.supervisor().freeze(&lab.nodes[0].name).unwrap();
    let frozen_at = Instant::now();
    let mut results = Vec::new();
    let mut acked = Vec::new();
    let mut i = 0u64;
    // Write one at a time until a write is acknowledged by a new master (bounded).
    while Instant::now() < frozen_at + Duration::from_secs(20) {
        let mut m = client.master();
        let start = Instant::now();
        let r: ha_redis::redis::RedisResult<()> = m.set(format!("frozen:{i}"), i).await;
        let took = start.elapsed();
        // A hang detector, not a latency threshold: nothing may outlive its deadline by more
        // than scheduling noise.
        assert!(
            took < deadline + Duration::from_millis(500),
            "write {i} took {took:?}"
        );
        if r.is_ok() {
            acked.push(i);
        }
        results.push((i, took, r.map_err(|e| e.to_string())));
        i += 1;
        if client.current_master().is_some_and(|m| m.addr != old) && !acked.is_empty() {
            break;
        }
    }
    let errors: Vec<_> = results.iter().filter(|r| r.2.is_err()).collect();
    println!(
        "frozen: {} writes, {} errors {:?}, stats {:?}",
        results.len(),
        errors.len(),
        errors.iter().map(|e| e.2.clone()).collect::<Vec<_>>(),
        client.stats()
    );
    let new = client.current_master().unwrap().addr;
    assert_ne!(new, old, "the client followed the failover");
    // Every error is typed (an HaError inside the RedisError).
    for (_, _, e) in &results {
        if let Err(text) = e {
            assert!(
                text.contains("deadline") || text.contains("outcome unknown"),
                "{text}"
            );
        }
    }
    lab.supervisor().thaw(&lab.nodes[0].name).unwrap();
    let master = lab.wait_stable(2, Duration::from_secs(40)).await.unwrap();
    let dump = lab.dump(master, "frozen:").await.unwrap();
    for i in acked {
        assert_eq!(dump.get(&format!("frozen:{i}")), Some(&i.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_failover_releases_held_writes_to_the_old_master() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let bus = ha_core::EventBus::default();
    let events = collect_events(&bus);
    let client = build(&lab)
        .max_hold(Duration::from_millis(500))
        .events(bus)
        .build()
        .await
        .unwrap();
    let old = lab.nodes[0].addr;
    lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
    // Start a failover and freeze both replicas before the chosen one gets SLAVEOF NO ONE:
    // the promotion never happens and Sentinel aborts after failover-timeout (5 s).
    lab.failover().await.unwrap();
    for n in &lab.nodes[1..] {
        lab.supervisor().freeze(&n.name).unwrap();
    }
    let start = Instant::now();
    let mut held_failures = 0;
    let mut in_flight_unknown = 0;
    let mut acked_after = None;
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(30) {
        let mut m = client.master();
        let t = Instant::now();
        let r: ha_redis::redis::RedisResult<()> = m.set(format!("abort:{i}"), i).await;
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "write {i} hung: {:?}",
            t.elapsed()
        );
        match r {
            Ok(()) if client.is_holding() => {}
            Ok(()) => {
                if held_failures > 0 {
                    acked_after = Some(i);
                    break;
                }
            }
            Err(e) => {
                let ha = ha_redis::error::ha_error(&e).expect("typed");
                if ha.is_outcome_unknown() {
                    // The one write in flight when the failover began: acknowledged by the old
                    // master, but whether it reached a promoted node cannot be known before the
                    // failover ends (after this write's deadline).
                    in_flight_unknown += 1;
                    assert_eq!(in_flight_unknown, 1, "{ha}");
                    assert!(client.stats().in_flight_checked >= 1);
                } else {
                    assert!(ha.is_deadline_exceeded(), "{ha}");
                    held_failures += 1;
                }
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "abort: {in_flight_unknown} in-flight write unknown, {held_failures} writes refused by the max hold, first write after the release {acked_after:?} at {:?}, stats {:?}",
        start.elapsed(),
        client.stats()
    );
    for n in &lab.nodes[1..] {
        lab.supervisor().thaw(&n.name).unwrap();
    }
    assert!(acked_after.is_some(), "held writes were released");
    // The events tell it: writes held, then released to the old master as an abort, with
    // the writes that waited counted.
    let holds = holds(&events.lock());
    println!("abort: hold events {holds:?}");
    assert!(matches!(holds.first(), Some(Ok(_))), "{holds:?}");
    assert!(
        holds
            .iter()
            .any(|h| matches!(h, Err((m, held, true)) if *m == old && *held >= 1)),
        "{holds:?}"
    );
    assert_eq!(
        client.current_master().unwrap().addr,
        old,
        "still the old master"
    );
    let master = lab.wait_stable(2, Duration::from_secs(40)).await.unwrap();
    assert_eq!(master, old);
    let dump = lab.dump(master, "abort:").await.unwrap();
    let i = acked_after.unwrap();
    assert_eq!(dump.get(&format!("abort:{i}")), Some(&i.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_wait_for_the_replicas_and_say_when_they_did_not() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let client = build(&lab).build().await.unwrap();
    let durable = client
        .master()
        .with_timeout(Duration::from_secs(2))
        .durable(2, Duration::from_millis(300));
    let _: () = durable
        .query(ha_redis::redis::cmd("SET").arg("durable:1").arg(1))
        .await
        .unwrap();
    for r in &lab.nodes[1..] {
        let v = lab.redis_cmd(r.addr, &["GET", "durable:1"]).await.unwrap();
        assert_eq!(v.as_str(), Some("1"), "on {}", r.addr);
    }
    // Both replicas frozen: the master executes the write, nobody acknowledges it.
    for n in &lab.nodes[1..] {
        lab.supervisor().freeze(&n.name).unwrap();
    }
    let err = durable
        .query::<()>(ha_redis::redis::cmd("SET").arg("durable:2").arg(2))
        .await
        .unwrap_err();
    for n in &lab.nodes[1..] {
        lab.supervisor().thaw(&n.name).unwrap();
    }
    assert!(err.is_outcome_unknown(), "{err}");
    let nd = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<ha_redis::error::NotDurable>())
        .expect("NotDurable inside");
    assert_eq!((nd.needed, nd.acked), (2, 0));
    assert_eq!(nd.timeout, Duration::from_millis(300));
    println!("durable: {err}");
    // Reads are not affected.
    let v: i64 = durable
        .query(ha_redis::redis::cmd("GET").arg("durable:1"))
        .await
        .unwrap();
    assert_eq!(v, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_lost_keep_the_last_master_and_say_so() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let events = ha_core::EventBus::default();
    let mut rx = events.subscribe();
    let client = build(&lab).events(events).build().await.unwrap();
    let old = lab.nodes[0].addr;
    for s in &lab.sentinels {
        lab.supervisor().kill(&s.name).await.unwrap();
    }
    // Writes keep going to the last verified master while every sentinel is gone.
    let mut m = client.master();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut degraded = std::collections::HashSet::new();
    let mut i = 0;
    let down_since = Instant::now();
    // All three subscriptions lost and at least one poll (1 s) done with nobody answering.
    while degraded.len() < 3 || down_since.elapsed() < Duration::from_millis(1500) {
        assert!(Instant::now() < deadline, "degraded seen: {degraded:?}");
        let _: () = m.set(format!("nosentinel:{i}"), i).await.unwrap();
        i += 1;
        while let Ok(ev) = rx.try_recv() {
            if let ha_core::TopologyEvent::WatcherDegraded { watcher, .. } = ev
                && watcher.starts_with("sentinel")
            {
                degraded.insert(watcher.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.current_master().unwrap().addr, old);
    assert!(degraded.contains("sentinel-poll"), "{degraded:?}");
    for s in &lab.sentinels {
        lab.supervisor().restart(&s.name).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut restored = std::collections::HashSet::new();
    while restored.len() < 3 {
        assert!(Instant::now() < deadline, "restored seen: {restored:?}");
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Ok(ha_core::TopologyEvent::WatcherRestored { watcher, .. }))
                if watcher.starts_with("sentinel ") =>
            {
                restored.insert(watcher.to_string());
            }
            _ => {}
        }
    }
    println!(
        "sentinels: {i} writes while all sentinels were down; degraded {degraded:?}, restored {restored:?}"
    );
    let _: () = m.set("nosentinel:after", 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sentinel_lost_a_planned_failover_is_still_followed_without_loss() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let bus = ha_core::EventBus::default();
    let events = collect_events(&bus);
    let client = build(&lab).events(bus).build().await.unwrap();
    let old = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
    // The sentinel in the master's IDC goes away: the other two are still a majority.
    let gone = &lab.sentinels[0];
    lab.supervisor().kill(&gone.name).await.unwrap();
    let gone_addr = gone.addr.to_string();
    wait_event(
        &events,
        Duration::from_secs(10),
        "the lost sentinel was not reported",
        |e| matches!(e, ha_core::TopologyEvent::WatcherDegraded { watcher, .. } if watcher.contains(&gone_addr)),
    )
    .await;
    // Writes to the old master, then a planned failover through the remaining sentinels
    // while the writes go on.
    let mut m = client.master();
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for i in 0..50u64 {
        let _: () = m.set(format!("onesentinel:before:{i}"), i).await.unwrap();
    }
    lab.failover().await.unwrap();
    let start = Instant::now();
    let mut after_switch = 0;
    let mut longest = Duration::ZERO;
    let mut switched_at = None;
    let mut i = 0u64;
    while after_switch < 50 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the failover was not followed"
        );
        let t = Instant::now();
        let r: ha_redis::redis::RedisResult<()> = m.set(format!("onesentinel:{i}"), i).await;
        longest = longest.max(t.elapsed());
        match r {
            Ok(()) => acked.push(i),
            Err(e) => errors.push(e.to_string()),
        }
        if client.current_master().is_some_and(|c| c.addr != old) {
            switched_at.get_or_insert(start.elapsed());
            after_switch += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The sentinel comes back and is reported so.
    lab.supervisor().restart(&gone.name).await.unwrap();
    wait_event(
        &events,
        Duration::from_secs(15),
        "the sentinel's return was not reported",
        |e| matches!(e, ha_core::TopologyEvent::WatcherRestored { watcher, .. } if watcher.contains(&gone_addr)),
    )
    .await;
    // Settled (the old master converted and resynced: what it alone acknowledged is gone).
    let master = lab.wait_stable(2, Duration::from_secs(30)).await.unwrap();
    assert_ne!(master, old);
    assert_eq!(client.current_master().unwrap().addr, master);
    let dump = lab.dump(master, "onesentinel:").await.unwrap();
    let mut lost: Vec<String> = acked
        .iter()
        .filter(|i| dump.get(&format!("onesentinel:{i}")) != Some(&i.to_string()))
        .map(|i| format!("onesentinel:{i}"))
        .collect();
    lost.extend(
        (0..50u64)
            .filter(|i| dump.get(&format!("onesentinel:before:{i}")) != Some(&i.to_string()))
            .map(|i| format!("onesentinel:before:{i}")),
    );
    println!(
        "one sentinel lost: {} writes acked, {} errors, lost {lost:?}, client on the new master {switched_at:?} after the command, longest write {longest:?}",
        acked.len(),
        errors.len(),
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(errors.is_empty(), "callers saw errors: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_naming_a_wrong_master_is_outvoted() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let real = lab.nodes[0].addr;
    let wrong = lab.nodes[2].addr;
    let liar = &lab.sentinels[2];
    // sh-a's sentinel is told that the master `members` is the sh-a replica.
    let (ip, port) = (wrong.ip().to_string(), wrong.port().to_string());
    for args in [
        vec!["SENTINEL", "REMOVE", "members"],
        vec!["SENTINEL", "MONITOR", "members", &ip, &port, "2"],
    ] {
        let r = lab.sentinel_cmd(liar.addr, &args).await.unwrap();
        assert_eq!(r.as_str(), Some("OK"), "{args:?}: {r:?}");
    }
    let said = lab
        .sentinel_cmd(
            liar.addr,
            &["SENTINEL", "get-master-addr-by-name", "members"],
        )
        .await
        .unwrap();
    assert_eq!(said.items()[1].as_str(), Some(port.as_str()), "{said:?}");

    // Two honest sentinels of three: the liar is outvoted at start-up ...
    let client = build(&lab).build().await.unwrap();
    assert_eq!(client.current_master().unwrap().addr, real);
    let mut m = client.master();
    let _: () = m.set("liar:1", "a").await.unwrap();
    let on_real = lab.redis_cmd(real, &["GET", "liar:1"]).await.unwrap();
    assert_eq!(on_real.as_str(), Some("a"));
    // ... and by every poll after it (one a second): the client never moves.
    let polls = Instant::now() + Duration::from_secs(3);
    while Instant::now() < polls {
        assert_eq!(client.current_master().unwrap().addr, real);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.stats().switches, 1, "{:?}", client.stats());

    // One honest sentinel gone: one honest answer against one lie, no majority. A new client
    // refuses to start, naming the answers; the running one keeps its verified master.
    lab.supervisor().kill("sentinel-bj-b").await.unwrap();
    let err = build(&lab).build().await.unwrap_err();
    assert!(err.is_no_majority(), "{err:?}");
    println!("no majority: {err}");
    let polls = Instant::now() + Duration::from_secs(3);
    while Instant::now() < polls {
        assert_eq!(client.current_master().unwrap().addr, real);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = m.set("liar:2", "b").await.unwrap();
    let on_real = lab.redis_cmd(real, &["GET", "liar:2"]).await.unwrap();
    assert_eq!(on_real.as_str(), Some("b"));
}
