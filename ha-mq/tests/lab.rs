//! ha-mq against real RocketMQ name servers and brokers (one cluster in `bj-a`, one in `sh-a`,
//! started by ha-lab): failover on a killed or frozen broker, no failover on a name server
//! outage, every acknowledged message consumed once, bad input refused with a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ha_core::{EventBus, TopologyEvent};
use ha_lab::rocketmq::{RocketMqLab, RocketMqLabOptions};
use ha_mq::{
    ClusterConfig, ConsumerConfig, HaConsumer, HaProducer, MqError, OutgoingMessage, ProducerConfig,
};
use parking_lot::Mutex;
use tokio::time::{Instant, timeout};

const TOPIC: &str = "members";

fn clusters(lab: &RocketMqLab) -> Vec<ClusterConfig> {
    ["bj-a", "sh-a"]
        .iter()
        .map(|idc| ClusterConfig::new(*idc, vec![lab.namesrv_addr(idc).unwrap()]))
        .collect()
}

async fn lab() -> RocketMqLab {
    RocketMqLab::start(RocketMqLabOptions::default())
        .await
        .expect("RocketMQ lab starts (scripts/setup installs the servers)")
}

/// Creates the topic on every cluster (auto-created by a first send), so that consumers
/// find a route at once.
async fn warm(lab: &RocketMqLab) {
    for c in clusters(lab) {
        let p = HaProducer::start(ProducerConfig::new("warm", vec![c.clone()]), None)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match p
                .send(OutgoingMessage::new(TOPIC, "warm").key(format!("warm-{}", c.idc)))
                .await
            {
                Ok(r) => {
                    assert_eq!(r.idc.as_deref(), Some(c.idc.as_str()));
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    println!("warm {}: {e}", c.idc);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("topic not created on {}: {e}", c.idc),
            }
        }
        p.shutdown().await;
    }
}

type Seen = Arc<Mutex<Vec<(String, String)>>>;

async fn consumer(lab: &RocketMqLab, group: &str) -> (HaConsumer, Seen) {
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let c = HaConsumer::start(
        ConsumerConfig::new(group, TOPIC, clusters(lab)),
        None,
        move |d| {
            let s = Arc::clone(&s);
            async move {
                s.lock().push((d.key.unwrap_or_default(), d.idc));
                Ok::<(), String>(())
            }
        },
    )
    .await
    .unwrap();
    (c, seen)
}

/// Waits (bounded) until every key of `want` was consumed; then checks each once.
async fn all_consumed_once(seen: &Seen, want: &HashSet<String>, bound: Duration) {
    let end = Instant::now() + bound;
    loop {
        let got: HashSet<String> = seen.lock().iter().map(|(k, _)| k.clone()).collect();
        let missing: Vec<&String> = want.difference(&got).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} acknowledged messages never consumed, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    for (k, _) in seen.lock().iter() {
        *count.entry(k.clone()).or_default() += 1;
    }
    let dup: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "handled more than once: {dup:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_stay_local_and_each_key_is_consumed_once() {
    let lab = lab().await;
    warm(&lab).await;
    let p = HaProducer::start(ProducerConfig::new("p1", clusters(&lab)), None)
        .await
        .unwrap();
    // warm_up reaches every cluster; its markers never reach the handler (checked below).
    let warmed = p.warm_up(TOPIC).await;
    assert_eq!(warmed.len(), 2);
    assert!(warmed.iter().all(|(_, r)| r.is_ok()), "{warmed:?}");
    let mut want = HashSet::new();
    for i in 0..50 {
        let r = p
            .send(OutgoingMessage::new(TOPIC, format!("m{i}")).key(format!("k{i}")))
            .await
            .unwrap();
        assert_eq!(r.idc.as_deref(), Some("bj-a"), "{r:?}");
        assert!(!r.spooled);
        want.insert(r.key);
    }
    // An operator's drain of bj-a moves the sends to sh-a at once; undrained, they come back.
    let topo = ha_core::Topology::from_toml_str(
        r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
"#,
        "drain.toml",
    )
    .unwrap();
    let control = ha_core::Control::new(&topo, EventBus::default());
    let drained = HaProducer::start(
        ProducerConfig::new("p3", clusters(&lab)).control(control.clone()),
        None,
    )
    .await
    .unwrap();
    control.drain("bj-a").unwrap();
    for i in 0..5 {
        let r = drained
            .send(OutgoingMessage::new(TOPIC, "drained").key(format!("d{i}")))
            .await
            .unwrap();
        assert_eq!(r.idc.as_deref(), Some("sh-a"), "drained bj-a: {r:?}");
        assert_eq!(r.attempts, 1, "no attempt on the drained cluster: {r:?}");
        want.insert(r.key);
    }
    control.undrain("bj-a").unwrap();
    let r = drained
        .send(OutgoingMessage::new(TOPIC, "back").key("d-back"))
        .await
        .unwrap();
    assert_eq!(r.idc.as_deref(), Some("bj-a"), "undrained: {r:?}");
    want.insert(r.key);
    drained.shutdown().await;
    // A duplicate (as a failover makes) on the other cluster: handled once.
    let only_sh = HaProducer::start(
        ProducerConfig::new("p2", vec![clusters(&lab)[1].clone()]),
        None,
    )
    .await
    .unwrap();
    only_sh
        .send(OutgoingMessage::new(TOPIC, "again").key("k7"))
        .await
        .unwrap();
    // A generated key is returned and consumed.
    let r = p.send(OutgoingMessage::new(TOPIC, "no key")).await.unwrap();
    assert!(r.key.starts_with("hamq-"));
    want.insert(r.key);
    want.insert("warm-bj-a".into());
    want.insert("warm-sh-a".into());
    let (c, seen) = consumer(&lab, "c1").await;
    all_consumed_once(&seen, &want, Duration::from_secs(30)).await;
    // The duplicate came and was dropped (bounded wait: it sits on the other cluster).
    let end = Instant::now() + Duration::from_secs(20);
    while c.stats().duplicates == 0 {
        assert!(
            Instant::now() < end,
            "duplicate never delivered: {:?}",
            c.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.lock()
            .iter()
            .all(|(k, _)| !k.starts_with(ha_mq::WARM_TAG)),
        "a warm-up marker reached the handler"
    );
    c.shutdown().await;
    p.shutdown().await;
    only_sh.shutdown().await;
    assert!(matches!(
        p.send(OutgoingMessage::new(TOPIC, "x")).await,
        Err(MqError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors() {
    let lab = lab().await;
    // Nothing listens there: start-up refuses, with the cluster named.
    let dead: std::net::SocketAddr = "127.0.1.221:9".parse().unwrap();
    let err = HaProducer::start(
        ProducerConfig::new("p", vec![ClusterConfig::new("bj-a", vec![dead])]),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, MqError::NameServerUnreachable { idc, .. } if idc == "bj-a"),
        "{err}"
    );
    let p = HaProducer::start(
        ProducerConfig::new("p", clusters(&lab)).max_message_bytes(1024),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(
        p.send(OutgoingMessage::new("", "x")).await,
        Err(MqError::InvalidMessage { .. })
    ));
    assert!(matches!(
        p.send(OutgoingMessage::new(TOPIC, vec![0u8; 1025])).await,
        Err(MqError::TooLarge {
            size: 1025,
            max: 1024
        })
    ));
    p.shutdown().await;
}

/// One send: when it started, how long it took, what it returned.
type Sent = (Instant, Duration, Result<ha_mq::SendReceipt, MqError>);

/// Sends at ~200/s until `stop` is set; records each outcome with its time.
fn sender(
    p: HaProducer,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let t = Instant::now();
            let r = p
                .send(OutgoingMessage::new(TOPIC, format!("m{i}")).key(format!("s{i}")))
                .await;
            out.push((t, t.elapsed(), r));
            i += 1;
        }
        out
    })
}

/// The longest stretch without an acknowledgement.
fn outage(results: &[Sent]) -> Duration {
    let acks: Vec<Instant> = results
        .iter()
        .filter(|r| r.2.is_ok())
        .map(|r| r.0 + r.1)
        .collect();
    acks.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_broker_killed_sends_move_to_the_backup_and_come_back() {
    let lab = lab().await;
    warm(&lab).await;
    let p = HaProducer::start(ProducerConfig::new("p", clusters(&lab)), None)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = sender(p.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    lab.kill_broker("bj-a").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    lab.restart_broker("bj-a").await.unwrap();
    let restarted = Instant::now();
    // Bounded: traffic back on bj-a.
    let end = restarted + Duration::from_secs(20);
    let back = loop {
        let r = p
            .send(
                OutgoingMessage::new(TOPIC, "probe")
                    .key(format!("back-{:?}", Instant::now().elapsed())),
            )
            .await;
        if let Ok(r) = &r
            && r.idc.as_deref() == Some("bj-a")
        {
            break r.key.clone();
        }
        assert!(Instant::now() < end, "never back on bj-a: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let back_after = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = task.await.unwrap();
    let errors: Vec<_> = results.iter().filter_map(|r| r.2.as_ref().err()).collect();
    let on_sh = results
        .iter()
        .filter(|r| matches!(&r.2, Ok(x) if x.idc.as_deref() == Some("sh-a")))
        .count();
    println!(
        "kill -9: {} sends, {} errors, {} to sh-a, outage {:?}, back on bj-a {:?} after the restart; killed at +{:?}",
        results.len(),
        errors.len(),
        on_sh,
        outage(&results),
        back_after,
        killed.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(on_sh > 0, "nothing went to the backup");
    let mut want: HashSet<String> = results
        .iter()
        .filter_map(|r| r.2.as_ref().ok().map(|x| x.key.clone()))
        .collect();
    want.insert(back);
    let (c, seen) = consumer(&lab, "c-kill").await;
    all_consumed_once(&seen, &want, Duration::from_secs(60)).await;
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_name_server_down_alone_causes_no_failover() {
    let lab = lab().await;
    warm(&lab).await;
    let p = HaProducer::start(ProducerConfig::new("p", clusters(&lab)), None)
        .await
        .unwrap();
    p.send(OutgoingMessage::new(TOPIC, "before")).await.unwrap();
    lab.kill_namesrv("bj-a").await.unwrap();
    for i in 0..200 {
        let r = p
            .send(OutgoingMessage::new(TOPIC, format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(r.idc.as_deref(), Some("bj-a"), "send {i}: {r:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_local_broker_no_send_outlives_its_deadline() {
    let lab = lab().await;
    warm(&lab).await;
    let deadline = Duration::from_secs(2);
    let p = HaProducer::start(
        ProducerConfig::new("p", clusters(&lab)).deadline(deadline),
        None,
    )
    .await
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = sender(p.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.freeze_broker("bj-a").unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    lab.thaw_broker("bj-a").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = timeout(Duration::from_secs(30), task)
        .await
        .expect("the sender never hangs")
        .unwrap();
    // The deadline bounds every send (the spawn's scheduling adds a little).
    let longest = results.iter().map(|r| r.1).max().unwrap();
    let unknown = results
        .iter()
        .filter(|r| matches!(&r.2, Err(e) if e.is_outcome_unknown()))
        .count();
    let other: Vec<_> = results
        .iter()
        .filter_map(|r| r.2.as_ref().err())
        .filter(|e| !e.is_outcome_unknown())
        .collect();
    println!(
        "SIGSTOP 4 s: {} sends, longest {longest:?}, {unknown} outcome unknown, outage {:?}",
        results.len(),
        outage(&results)
    );
    assert!(
        longest < deadline + Duration::from_millis(500),
        "{longest:?}"
    );
    assert!(other.is_empty(), "{other:?}");
    // Every acknowledged one, and the unknown ones that were stored, consumed once.
    let want: HashSet<String> = results
        .iter()
        .filter_map(|r| r.2.as_ref().ok().map(|x| x.key.clone()))
        .collect();
    let (c, seen) = consumer(&lab, "c-freeze").await;
    all_consumed_once(&seen, &want, Duration::from_secs(60)).await;
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_5000_is_consumed_with_none_rejected_or_lost() {
    let lab = lab().await;
    warm(&lab).await;
    let p = HaProducer::start(ProducerConfig::new("p", clusters(&lab)), None)
        .await
        .unwrap();
    let mut want = HashSet::new();
    let mut sends = tokio::task::JoinSet::new();
    for t in 0..16 {
        let p = p.clone();
        sends.spawn(async move {
            let mut keys = Vec::new();
            for i in 0..5000 / 16 + 1 {
                let r = p
                    .send(OutgoingMessage::new(TOPIC, "b").key(format!("b{t}-{i}")))
                    .await
                    .unwrap();
                keys.push(r.key);
            }
            keys
        });
    }
    while let Some(k) = sends.join_next().await {
        want.extend(k.unwrap());
    }
    want.insert("warm-bj-a".into());
    want.insert("warm-sh-a".into());
    assert!(want.len() >= 5000);
    // A slow handler and a small pool: work waits, none is rejected.
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let c = HaConsumer::start(
        ConsumerConfig::new("c-backlog", TOPIC, clusters(&lab)).concurrency(4),
        None,
        move |d| {
            let s = Arc::clone(&s);
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                s.lock().push((d.key.unwrap_or_default(), d.idc));
                Ok::<(), String>(())
            }
        },
    )
    .await
    .unwrap();
    all_consumed_once(&seen, &want, Duration::from_secs(120)).await;
    assert_eq!(c.stats().handler_failures, 0);
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_down_sends_go_to_the_spool_and_are_replayed_when_one_is_back() {
    let lab = lab().await;
    warm(&lab).await;
    let dir = tempfile::tempdir().unwrap();
    let bus = EventBus::new(4096);
    let mut events = bus.subscribe();
    let p = HaProducer::start(
        ProducerConfig::new("p", clusters(&lab))
            .dependency("events")
            .spool(ha_mq::spool::SpoolConfig::new(dir.path())),
        Some(bus.clone()),
    )
    .await
    .unwrap();
    let mut want = HashSet::new();
    let r = p.send(OutgoingMessage::new(TOPIC, "before")).await.unwrap();
    assert!(!r.spooled);
    want.insert(r.key);
    lab.kill_broker("bj-a").await.unwrap();
    lab.kill_broker("sh-a").await.unwrap();
    for i in 0..100 {
        let r = p
            .send(OutgoingMessage::new(TOPIC, format!("{i}")).key(format!("sp{i}")))
            .await
            .unwrap();
        assert!(r.spooled, "send {i}: {r:?}");
        want.insert(r.key);
    }
    assert_eq!(p.spool().unwrap().len(), 100);
    lab.restart_broker("sh-a").await.unwrap();
    // Replayed (bounded wait) through the cluster that is back.
    let end = Instant::now() + Duration::from_secs(60);
    while !p.spool().unwrap().is_empty() {
        assert!(
            Instant::now() < end,
            "spool not replayed: {} left",
            p.spool().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New sends after the replay go to a cluster again.
    let r = p.send(OutgoingMessage::new(TOPIC, "after")).await.unwrap();
    assert!(!r.spooled);
    want.insert(r.key);
    // The events said so: both clusters avoided, the spool growing at powers of two, sh-a
    // restored, the replay done with every record (bounded wait: it follows the last commit).
    let mut seen = Vec::new();
    let replayed = timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            seen.push(e.clone());
            if let TopologyEvent::SpoolReplayed { records, took, .. } = e {
                break (records, took);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SpoolReplayed event; saw {seen:?}"));
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    println!("spool replayed: {replayed:?}");
    assert_eq!(replayed.0, 100, "{seen:?}");
    for idc in ["bj-a", "sh-a"] {
        assert!(
            seen.iter().any(|e| matches!(e, TopologyEvent::ClusterAvoided { idc: i, dependency, .. } if &**i == idc && &**dependency == "events")),
            "{idc} never avoided: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, TopologyEvent::ClusterRestored { idc, .. } if &**idc == "sh-a")),
        "sh-a never restored: {seen:?}"
    );
    let growing: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            TopologyEvent::SpoolGrowing { records, .. } => Some(*records),
            _ => None,
        })
        .collect();
    assert_eq!(growing, [1, 2, 4, 8, 16, 32, 64], "{seen:?}");
    lab.restart_broker("bj-a").await.unwrap();
    let (c, seen) = consumer(&lab, "c-spool").await;
    want.insert("warm-bj-a".into());
    want.insert("warm-sh-a".into());
    all_consumed_once(&seen, &want, Duration::from_secs(60)).await;
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_down_without_spool_is_a_typed_error_within_the_deadline() {
    let lab = lab().await;
    warm(&lab).await;
    let deadline = Duration::from_secs(2);
    let p = HaProducer::start(
        ProducerConfig::new("p", clusters(&lab)).deadline(deadline),
        None,
    )
    .await
    .unwrap();
    lab.kill_broker("bj-a").await.unwrap();
    lab.kill_broker("sh-a").await.unwrap();
    for i in 0..20 {
        let t = Instant::now();
        let err = p
            .send(OutgoingMessage::new(TOPIC, format!("{i}")))
            .await
            .unwrap_err();
        assert!(
            t.elapsed() < deadline + Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Each cluster's root cause is named.
        assert!(
            matches!(
                err,
                MqError::Unavailable { .. }
                    | MqError::OutcomeUnknown { .. }
                    | MqError::DeadlineExceeded { .. }
            ),
            "{err}"
        );
        if i == 19 {
            println!("both brokers down: {err}");
        }
    }
    p.shutdown().await;
}

/// Each cluster's name servers found through a DNS name per region (ha-core's discovery of
/// another dependency), not written as addresses: `ProducerConfig::discover` resolves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_servers_found_through_dns_per_region() {
    let lab = lab().await;
    warm(&lab).await;
    let dns = ha_lab::dns::LabDns::start("north", "127.0.1.53:0".parse().unwrap(), "lab.")
        .await
        .unwrap();
    let (bj, sh) = (
        lab.namesrv_addr("bj-a").unwrap(),
        lab.namesrv_addr("sh-a").unwrap(),
    );
    dns.set_records("ns.bj-a.lab.", &[bj.ip()], 5).unwrap();
    dns.set_records("ns.sh-a.lab.", &[sh.ip()], 5).unwrap();
    let text = format!(
        r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["{resolver}"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "sh-a"
region = "north"
cidrs = ["127.0.3.0/24"]
[dependencies.ns-bj-a]
port = {bj_port}
dns = {{ north = "ns.bj-a.lab." }}
[dependencies.ns-sh-a]
port = {sh_port}
dns = {{ north = "ns.sh-a.lab." }}
[dependencies.events]
kind = "rocketmq"
static_addrs = ["{bj}"]
[dependencies.events.settings]
group = "dns-p"
[[dependencies.events.settings.clusters]]
idc = "sh-a"
name_servers_from = "ns-sh-a"
[[dependencies.events.settings.clusters]]
idc = "bj-a"
name_servers_from = "ns-bj-a"
"#,
        resolver = dns.addr(),
        bj_port = bj.port(),
        sh_port = sh.port(),
    );
    let topo = ha_core::Topology::from_toml_str(&text, "dns.toml").unwrap();
    let ctx = ha_core::HaContext::new(topo);
    // The synchronous constructor cannot resolve: a typed error naming the field.
    match ProducerConfig::from_context(&ctx, "events") {
        Err(MqError::Config(e)) => {
            assert!(e.field.ends_with("name_servers_from"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let config = timeout(
        Duration::from_secs(10),
        ProducerConfig::discover(&ctx, "events"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(config.clusters[0].idc, "bj-a", "the local IDC's first");
    assert_eq!(config.clusters[0].name_servers, vec![bj]);
    assert_eq!(config.clusters[1].name_servers, vec![sh]);
    let cc = ConsumerConfig::discover(&ctx, "events", "dns-c", TOPIC)
        .await
        .unwrap();
    assert_eq!(cc.clusters[0].name_servers, vec![bj]);
    let p = HaProducer::start(config, None).await.unwrap();
    let r = p
        .send(OutgoingMessage::new(TOPIC, "via dns").key("dns-1"))
        .await
        .unwrap();
    assert_eq!(r.idc.as_deref(), Some("bj-a"), "{r:?}");
    p.shutdown().await;
}
