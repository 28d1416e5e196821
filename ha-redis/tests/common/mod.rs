//! What the lab test files share: the builder every test uses, tracing, one lab at a time, and
//! the topology of the three lab IDCs with the sentinels as a dependency.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ha_lab::redis::RedisLab;
use ha_redis::HaRedis;
use ha_redis::MasterHandle;
use ha_redis::redis::AsyncCommands;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// One lab at a time within a test binary (under nextest the `failover-lab` test group does
/// the same across processes).
pub static SERIAL: Mutex<()> = Mutex::const_new(());

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A client of the lab's sentinels with a 1 s command deadline.
pub fn build(lab: &RedisLab) -> ha_redis::Builder {
    HaRedis::builder(lab.sentinel_addrs(), &lab.options().master_name)
        .timeout(Duration::from_secs(1))
        .startup_timeout(Duration::from_secs(5))
}

/// The key prefix of the loads.
pub const PREFIX: &str = "k";

/// One write of a load: its key number, when it was issued and answered, and its result.
#[derive(Debug, Clone)]
pub struct Write {
    /// The key's prefix ([`PREFIX`] unless the load was started with another).
    pub prefix: &'static str,
    pub i: u64,
    pub issued: Instant,
    pub done: Instant,
    pub result: Result<(), String>,
}

/// The writes of a load, as they were answered.
pub type Log = Arc<Mutex<Vec<Write>>>;

/// 200 writes/s, each its own task (a write held during a failover does not slow the others),
/// `SET k<i> <i>` with the handle's 1 s deadline.
pub fn start_load(
    master: MasterHandle,
    stop: Arc<AtomicBool>,
) -> (Log, tokio::task::JoinHandle<()>) {
    start_load_at(master, stop, Duration::from_millis(5), 1)
}

/// `per_tick` writes every `tick`.
pub fn start_load_at(
    master: MasterHandle,
    stop: Arc<AtomicBool>,
    tick: Duration,
    per_tick: u64,
) -> (Log, tokio::task::JoinHandle<()>) {
    start_load_with(master, stop, tick, per_tick, PREFIX)
}

/// [`start_load_at`] with keys `<prefix><i>`.
pub fn start_load_with(
    master: MasterHandle,
    stop: Arc<AtomicBool>,
    tick: Duration,
    per_tick: u64,
    prefix: &'static str,
) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Arc::default();
    let log2 = log.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tasks = tokio::task::JoinSet::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            for _ in 0..per_tick {
                let mut m = master.clone();
                let log = log2.clone();
                tasks.spawn(async move {
                    let issued = Instant::now();
                    let r: ha_redis::redis::RedisResult<()> =
                        m.set(format!("{prefix}{i}"), i).await;
                    let w = Write {
                        prefix,
                        i,
                        issued,
                        done: Instant::now(),
                        result: r.map_err(|e| {
                            ha_redis::error::ha_error(&e).map_or_else(
                                || format!("redis: {e}"),
                                |h| format!("{}: {h}", h.kind()),
                            )
                        }),
                    };
                    log.lock().await.push(w);
                });
                i += 1;
            }
            while tasks.try_join_next().is_some() {}
        }
        // Every write is bounded by its 1 s deadline, so this ends.
        while tasks.join_next().await.is_some() {}
    });
    (log, task)
}

/// Keys acknowledged (`Ok`) that are missing or wrong in `dump`.
pub fn lost(log: &[Write], dump: &HashMap<String, String>) -> Vec<u64> {
    log.iter()
        .filter(|w| w.result.is_ok())
        .filter(|w| dump.get(&format!("{}{}", w.prefix, w.i)) != Some(&w.i.to_string()))
        .map(|w| w.i)
        .collect()
}

/// The lab's regions and IDCs, local IDC `local_idc`, and a `cache` dependency (`kind =
/// "redis"`) on the lab's sentinels with `master_name = "members"` plus `extra_settings` lines.
pub fn topology(lab: &RedisLab, local_idc: &str, extra_settings: &str) -> ha_core::Topology {
    let addrs: Vec<String> = lab
        .sentinel_addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    let text = format!(
        r#"
local_idc = "{local_idc}"
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
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[dependencies.cache]
kind = "redis"
static_addrs = [{}]
[dependencies.cache.settings]
master_name = "members"
{extra_settings}
"#,
        addrs.join(", ")
    );
    ha_core::Topology::from_toml_str(&text, "t.toml").unwrap()
}

/// Every event published on `bus` from now on, collected by a task (no lag: it reads as they
/// come).
pub fn collect_events(
    bus: &ha_core::EventBus,
) -> std::sync::Arc<parking_lot::Mutex<Vec<ha_core::TopologyEvent>>> {
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut rx = bus.subscribe();
    let out = seen.clone();
    tokio::spawn(async move {
        while let Ok(e) = rx.recv().await {
            out.lock().push(e);
        }
    });
    seen
}

/// The hold events among `events`, in order: `Ok(reason)` for a hold, `Err((master, held,
/// aborted))` for a release.
pub fn holds(
    events: &[ha_core::TopologyEvent],
) -> Vec<Result<String, (std::net::SocketAddr, u64, bool)>> {
    events
        .iter()
        .filter_map(|e| match e {
            ha_core::TopologyEvent::WritesHeld { reason, .. } => Some(Ok(reason.to_string())),
            ha_core::TopologyEvent::WritesReleased {
                master,
                held,
                aborted,
                ..
            } => Some(Err((*master, *held, *aborted))),
            _ => None,
        })
        .collect()
}

/// Waits (bounded by `timeout`) until an event in `seen` matches `pred`; panics naming `what`.
pub async fn wait_event(
    seen: &parking_lot::Mutex<Vec<ha_core::TopologyEvent>>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&ha_core::TopologyEvent) -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !seen.lock().iter().any(&pred) {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of the lab's sentinels built from a topology whose local IDC is `local_idc` (the
/// `cache` dependency of [`topology`]).
pub async fn client_in(lab: &RedisLab, local_idc: &str) -> HaRedis {
    let ctx = ha_core::HaContext::new(topology(lab, local_idc, ""));
    HaRedis::builder_from_context(&ctx, "cache")
        .await
        .unwrap()
        .build()
        .await
        .unwrap()
}
