//! A producer killed with SIGKILL in the middle of replaying its spool loses nothing it
//! acknowledged: one process spools N messages (no cluster reachable) and is killed, a second
//! replays them into the lab's clusters and is killed half way, a third finishes the replay,
//! and a consumer finds every acknowledged key.
//!
//! The children are this test binary run again with `HA_MQ_REPLAY_CHILD_*` set (see
//! `replay_child`); they print marked lines on stdout, which the parent reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ha_core::{EventBus, TopologyEvent};
use ha_lab::rocketmq::{RocketMqLab, RocketMqLabOptions};
use ha_mq::spool::{Spool, SpoolConfig};
use ha_mq::{
    ClusterConfig, ConsumerConfig, HaConsumer, HaProducer, OutgoingMessage, ProducerConfig,
};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout};

const TOPIC: &str = "members";
/// Messages spooled by the first child.
const N: usize = 2000;
const CHILD_MODE: &str = "HA_MQ_REPLAY_CHILD_MODE";
const CHILD_DIR: &str = "HA_MQ_REPLAY_CHILD_DIR";
/// `idc=addr,idc=addr`: the clusters a replaying child sends to.
const CHILD_CLUSTERS: &str = "HA_MQ_REPLAY_CHILD_CLUSTERS";
const MARK: &str = "@replay ";

// The real stdout, not the harness's captured one, one write per line.
#[allow(clippy::explicit_write)]
fn say(line: String) {
    // Marked: the harness's `test replay_child ... ` precedes the first line.
    writeln!(std::io::stdout(), "{MARK}{line}").unwrap();
}

/// The children of `killed_while_replaying_loses_nothing_acknowledged`; in a normal run (no
/// environment) it does nothing.
///
/// - `spool`: a producer whose clusters' name servers refuse connections (started degraded)
///   sends `N` messages from 16 tasks, each acknowledged as spooled, prints `acked KEY` for
///   each and `all N`, then waits to be killed.
/// - `replay`: a producer over the lab's clusters on the same spool; prints `start LEN`, then
///   `left LEN` every 5 ms, `replayed RECORDS` on the `SpoolReplayed` event, and `done` after
///   its shutdown.
#[test]
fn replay_child() {
    let (Ok(mode), Ok(dir)) = (std::env::var(CHILD_MODE), std::env::var(CHILD_DIR)) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let spool = SpoolConfig::new(&dir);
        match mode.as_str() {
            "spool" => {
                // Nothing listens on port 9 there: every connect is refused at once.
                let dead = vec![
                    ClusterConfig::new("bj-a", vec!["127.0.1.253:9".parse().unwrap()]),
                    ClusterConfig::new("sh-a", vec!["127.0.3.253:9".parse().unwrap()]),
                ];
                let p = HaProducer::start(
                    ProducerConfig::new("spooler", dead)
                        .start_degraded(true)
                        .attempt_timeout(Duration::from_millis(200))
                        .deadline(Duration::from_millis(500))
                        .spool(spool),
                    None,
                )
                .await
                .unwrap();
                let tasks: Vec<_> = (0..16)
                    .map(|t| {
                        let p = p.clone();
                        tokio::spawn(async move {
                            for j in 0..N / 16 {
                                let key = format!("rc{t}-{j}");
                                let r = p
                                    .send(OutgoingMessage::new(TOPIC, "x").key(key.clone()))
                                    .await
                                    .unwrap();
                                assert!(r.spooled, "{r:?}");
                                say(format!("acked {key}"));
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                say(format!("all {}", p.spool().unwrap().len()));
                // Killed here, without a shutdown.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            "replay" => {
                let clusters = std::env::var(CHILD_CLUSTERS)
                    .unwrap()
                    .split(',')
                    .map(|c| {
                        let (idc, addr) = c.split_once('=').unwrap();
                        ClusterConfig::new(idc, vec![addr.parse().unwrap()])
                    })
                    .collect();
                let bus = EventBus::new(4096);
                let mut events = bus.subscribe();
                let p = HaProducer::start(
                    ProducerConfig::new("replayer", clusters).spool(spool),
                    Some(bus),
                )
                .await
                .unwrap();
                let spool = p.spool().unwrap().clone();
                say(format!("start {}", spool.len()));
                let records = loop {
                    say(format!("left {}", spool.len()));
                    match timeout(Duration::from_millis(5), events.recv()).await {
                        Ok(Ok(TopologyEvent::SpoolReplayed { records, .. })) => break records,
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(e)) => panic!("{e}"),
                    }
                };
                say(format!("replayed {records}"));
                drop(spool);
                p.shutdown().await;
                say("done".into());
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// A child's marked lines so far.
type Lines = Vec<String>;

/// Runs `replay_child` in `mode` and hands each marked line to `kill_on`; a true answer
/// SIGKILLs the child. Every wait is bounded by `bound`. Returns the lines and the exit status.
async fn run_child(
    mode: &str,
    dir: &Path,
    clusters: &str,
    bound: Duration,
    mut kill_on: impl FnMut(&str) -> bool,
) -> (Lines, ExitStatus) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["replay_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_MODE, mode)
        .env(CHILD_DIR, dir)
        .env(CHILD_CLUSTERS, clusters)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    let end = Instant::now() + bound;
    let mut killed = false;
    loop {
        let line = match timeout(
            end.saturating_duration_since(Instant::now()),
            out.next_line(),
        )
        .await
        {
            Ok(line) => line.unwrap(),
            Err(_) => {
                child.kill().await.unwrap();
                panic!(
                    "{mode} child still running after {bound:?}; last lines {:?}",
                    &lines[lines.len().saturating_sub(5)..]
                );
            }
        };
        let Some(line) = line else { break };
        let Some((_, said)) = line.split_once(MARK) else {
            continue;
        };
        let said = said.to_string();
        if !killed && kill_on(&said) {
            child.start_kill().unwrap();
            killed = true;
        }
        lines.push(said);
    }
    let status = timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the child exits")
        .unwrap();
    (lines, status)
}

/// The number after `tag ` on the last line starting with it.
fn last_number(lines: &[String], tag: &str) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(tag)?.strip_prefix(' ')?.parse().ok())
}

async fn spool_len(dir: &Path) -> u64 {
    // The child's lock is gone with it; this open is the next one.
    let spool = Spool::open(SpoolConfig::new(dir)).await.unwrap();
    let len = spool.len();
    spool.close().await;
    len
}

/// Creates the topic on every cluster (a first send creates it), so that the replay and the
/// consumer find a route at once.
async fn warm(lab: &RocketMqLab) {
    for idc in ["bj-a", "sh-a"] {
        let c = ClusterConfig::new(idc, vec![lab.namesrv_addr(idc).unwrap()]);
        let p = HaProducer::start(ProducerConfig::new("warm", vec![c]), None)
            .await
            .unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while let Err(e) = p
            .send(OutgoingMessage::new(TOPIC, "warm").key(format!("warm-{idc}")))
            .await
        {
            assert!(Instant::now() < end, "topic not created on {idc}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_replaying_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // 1. Every message spooled (no cluster reachable) and acknowledged; then SIGKILL.
    let (lines, status) = run_child("spool", dir, "", Duration::from_secs(120), |l| {
        l.starts_with("all ")
    })
    .await;
    assert_eq!(status.signal(), Some(9), "spool child: {status}");
    let acked: HashSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("acked ").map(str::to_string))
        .collect();
    assert_eq!(acked.len(), N, "every send acknowledged as spooled");
    assert_eq!(last_number(&lines, "all"), Some(N as u64));
    assert_eq!(
        spool_len(dir).await,
        N as u64,
        "the kill lost no acknowledged record"
    );

    let lab = RocketMqLab::start(RocketMqLabOptions::default())
        .await
        .expect("RocketMQ lab starts (scripts/setup installs the servers)");
    warm(&lab).await;
    let clusters: Vec<ClusterConfig> = ["bj-a", "sh-a"]
        .iter()
        .map(|idc| ClusterConfig::new(*idc, vec![lab.namesrv_addr(idc).unwrap()]))
        .collect();
    let env = clusters
        .iter()
        .map(|c| format!("{}={}", c.idc, c.name_servers[0]))
        .collect::<Vec<_>>()
        .join(",");

    // 2. Replaying, killed once half of it is committed.
    let (lines, status) = run_child("replay", dir, &env, Duration::from_secs(180), |l| {
        l.strip_prefix("left ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n <= N as u64 / 2)
    })
    .await;
    assert_eq!(status.signal(), Some(9), "replay child: {status}");
    assert!(
        !lines.iter().any(|l| l.starts_with("replayed")),
        "the replay finished before the kill"
    );
    assert_eq!(last_number(&lines, "start"), Some(N as u64));
    let left = spool_len(dir).await;
    println!("replay killed with {left} of {N} records left in the spool");
    assert!(
        left > 0 && left < N as u64,
        "the kill did not land mid-replay: {left} of {N} left"
    );

    // 3. A new producer on the spool finishes the replay.
    let (lines, status) = run_child("replay", dir, &env, Duration::from_secs(180), |_| false).await;
    assert!(status.success(), "finishing child: {status}");
    assert_eq!(last_number(&lines, "start"), Some(left));
    let replayed = last_number(&lines, "replayed").expect("a SpoolReplayed event");
    assert!(replayed >= left, "replayed {replayed} of {left}");
    assert_eq!(lines.last().map(String::as_str), Some("done"));
    assert_eq!(spool_len(dir).await, 0);

    // Every acknowledged key arrived, at least once.
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let s = Arc::clone(&seen);
    let consumer = HaConsumer::start(
        ConsumerConfig::new("c-replay-crash", TOPIC, clusters),
        None,
        move |d| {
            let s = Arc::clone(&s);
            async move {
                s.lock().insert(d.key.unwrap_or_default());
                Ok::<(), String>(())
            }
        },
    )
    .await
    .unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let missing: Vec<String> = acked.difference(&seen.lock()).cloned().collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} acknowledged messages never consumed, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "all {N} acknowledged keys consumed ({} keys seen); the last run replayed {replayed}",
        seen.lock().len()
    );
    consumer.shutdown().await;
    lab.stop().await;
}
