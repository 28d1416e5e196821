//! [`HaConsumer`]: a consumer on every IDC's cluster (a message may sit in either), bounded
//! concurrency that never rejects work, each key handled once within a dedupe window, offsets
//! committed only after the handler succeeded.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ha_core::{ConfigError, EventBus, HaContext};
use parking_lot::Mutex;
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::dedupe::{Claim, Dedupe};
use crate::error::{MqError, classify};
use crate::producer::{ClusterConfig, join_addrs};
use crate::runtime::ClientRt;

/// How an [`HaConsumer`] consumes. Build with [`ConsumerConfig::new`] and the setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The dependency's name in metrics (default `"mq"`).
    pub dependency: String,
    /// The consumer group (the same on every cluster).
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Every IDC's cluster: the consumer reads from all of them.
    pub clusters: Vec<ClusterConfig>,
    /// Handlers running at once, over all clusters (default 16). Beyond it, work waits: none
    /// is rejected.
    pub concurrency: usize,
    /// A key handled successfully is not handled again for this long (default 10 min, longer
    /// than the broker's redelivery delays and a failover's duplicates).
    pub dedupe_window: Duration,
    /// At most this many keys remembered (default 1,000,000; the oldest go first).
    pub dedupe_max_keys: usize,
    /// How long one poll waits for messages (default 200 ms).
    pub poll_timeout: Duration,
    /// The first wait before a failed handler runs again (default 100 ms, doubling to 5 s).
    pub retry_backoff: Duration,
    /// A group new to a cluster starts at each queue's first message (default true: nothing
    /// sent before the consumer's first start is skipped); false starts at the end.
    pub from_first_offset: bool,
}

impl ConsumerConfig {
    /// A consumer of `group` on `topic` over `clusters`, with the defaults.
    pub fn new(
        group: impl Into<String>,
        topic: impl Into<String>,
        clusters: Vec<ClusterConfig>,
    ) -> ConsumerConfig {
        ConsumerConfig {
            dependency: "mq".into(),
            group: group.into(),
            topic: topic.into(),
            clusters,
            concurrency: 16,
            dedupe_window: Duration::from_secs(600),
            dedupe_max_keys: 1_000_000,
            poll_timeout: Duration::from_millis(200),
            retry_backoff: Duration::from_millis(100),
            from_first_offset: true,
        }
    }

    /// The config of a consumer of `group` on `topic` over the clusters of dependency
    /// `dependency` of `ctx`'s topology (a `kind = "rocketmq"` dependency, see
    /// [`crate::settings`]), with the defaults; [`dependency`](Self::dependency) is its name.
    /// Like [`ConsumerConfig::new`], it takes the group: the settings' `group` is the producer
    /// group, and one service consumes under a group of its own per purpose. The consumer
    /// reads every cluster, the local IDC's listed first. The errors are
    /// [`ProducerConfig::from_context`](crate::ProducerConfig::from_context)'s (but `group`
    /// need not be in the file).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let topology = ha_core::Topology::from_toml_str(r#"
    /// local_idc = "bj-a"
    /// [[regions]]
    /// name = "north"
    /// resolvers = ["127.0.1.53"]
    /// [[idcs]]
    /// name = "bj-a"
    /// region = "north"
    /// cidrs = ["127.0.1.0/24"]
    /// [dependencies.events]
    /// kind = "rocketmq"
    /// static_addrs = ["127.0.1.220:9876"]
    /// [[dependencies.events.settings.clusters]]
    /// idc = "bj-a"
    /// name_servers = ["127.0.1.220:9876"]
    /// "#, "topology.toml")?;
    /// let ctx = ha_core::HaContext::new(topology);
    /// let config = ha_mq::ConsumerConfig::from_context(&ctx, "events", "member-history", "member_events")?;
    /// assert_eq!(config.clusters.len(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_context(
        ctx: &HaContext,
        dependency: &str,
        group: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<ConsumerConfig, MqError> {
        let read = crate::settings::read(ctx, dependency, &crate::settings::Resolved::new())?;
        Self::from_read(dependency, read, group, topic)
    }

    /// [`from_context`](Self::from_context) that also resolves a cluster's
    /// `name_servers_from` through `ctx`'s discovery, once (see
    /// [`ProducerConfig::discover`](crate::ProducerConfig::discover)).
    pub async fn discover(
        ctx: &HaContext,
        dependency: &str,
        group: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<ConsumerConfig, MqError> {
        let resolved = crate::settings::resolve(ctx, dependency).await?;
        let read = crate::settings::read(ctx, dependency, &resolved)?;
        Self::from_read(dependency, read, group, topic)
    }

    fn from_read(
        dependency: &str,
        read: crate::settings::Read,
        group: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<ConsumerConfig, MqError> {
        let mut config = ConsumerConfig::new(group, topic, read.clusters);
        config.dependency = dependency.to_string();
        config.validate()?;
        Ok(config)
    }

    /// Sets [`from_first_offset`](Self::from_first_offset).
    pub fn from_first_offset(mut self, yes: bool) -> Self {
        self.from_first_offset = yes;
        self
    }

    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Sets [`dedupe_window`](Self::dedupe_window) and [`dedupe_max_keys`](Self::dedupe_max_keys).
    pub fn dedupe(mut self, window: Duration, max_keys: usize) -> Self {
        self.dedupe_window = window;
        self.dedupe_max_keys = max_keys;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, value: String, why: &str| {
            Err(ConfigError::new(
                "<ha-mq consumer config>",
                field.to_string(),
                value,
                why.to_string(),
            ))
        };
        if self.group.is_empty() {
            return bad("group", String::new(), "must not be empty");
        }
        if self.topic.is_empty() {
            return bad("topic", String::new(), "must not be empty");
        }
        crate::settings::validate_clusters(
            &self.clusters,
            std::path::Path::new("<ha-mq consumer config>"),
            "",
        )?;
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return bad(
                "concurrency",
                self.concurrency.to_string(),
                "must be in 1..=10000",
            );
        }
        if self.dedupe_max_keys == 0 {
            return bad("dedupe_max_keys", "0".into(), "must be at least 1");
        }
        for (field, d) in [
            ("dedupe_window", self.dedupe_window),
            ("poll_timeout", self.poll_timeout),
            ("retry_backoff", self.retry_backoff),
        ] {
            if d.is_zero() || d > Duration::from_secs(7 * 24 * 3600) {
                return bad(field, format!("{d:?}"), "must be in (0, 7 days]");
            }
        }
        Ok(())
    }
}

/// One message handed to the handler.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// The message's dedupe key (`KEYS`), when it has one.
    pub key: Option<String>,
    /// The topic.
    pub topic: String,
    /// The tag.
    pub tags: Option<String>,
    /// The body.
    pub body: Bytes,
    /// The IDC whose cluster delivered it.
    pub idc: String,
    /// The broker's message id.
    pub msg_id: String,
    /// The message's properties.
    pub properties: HashMap<String, String>,
}

/// Counters of an [`HaConsumer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Handler runs that succeeded.
    pub handled: u64,
    /// Deliveries dropped as duplicates of a key handled within the window.
    pub duplicates: u64,
    /// Handler runs that failed (each was run again).
    pub handler_failures: u64,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
}

/// A consumer on every cluster. Dropping it without [`shutdown`](Self::shutdown) stops its
/// tasks at their next poll.
///
/// Delivery is at least once: an offset is committed only after the handler succeeded for
/// every message before it in the batch; a failed handler runs again (with backoff) until it
/// succeeds, so a message is never skipped. Across a restart, or beyond the dedupe window, a
/// key may be handled again: make the handler idempotent by key (the window removes the
/// duplicates failover and replay make while it runs).
pub struct HaConsumer {
    closed: Arc<AtomicBool>,
    tasks: Mutex<Option<JoinSet<()>>>,
    counters: Arc<Counters>,
    rt: ClientRt,
}

impl std::fmt::Debug for HaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaConsumer")
            .field("stats", &self.stats())
            .finish()
    }
}

/// How often a consumer's client asks the name servers for routes (the client accepts 10 s to
/// 10 min).
const ROUTE_POLL_MS: u32 = 10_000;

/// Numbers the consumers of this process (their clients' instance names).
static CONSUMERS: AtomicU64 = AtomicU64::new(0);

type Handler<E> =
    dyn Fn(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), E>> + Send>> + Send + Sync;

impl HaConsumer {
    /// Starts a consumer on every cluster and runs `handler` for each message.
    pub async fn start<H, Fut, E>(
        config: ConsumerConfig,
        _bus: Option<EventBus>,
        handler: H,
    ) -> Result<HaConsumer, MqError>
    where
        H: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        config.validate()?;
        let rt = ClientRt::start("ha-mq-consumer")?;
        let handler: Arc<Handler<E>> = Arc::new(move |d| Box::pin(handler(d)));
        let dedupe = Arc::new(Dedupe::new(config.dedupe_window, config.dedupe_max_keys));
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let closed = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        for c in &config.clusters {
            let ns = join_addrs(&c.name_servers);
            // Routes from the name servers every 10 s (the client's minimum; its default is
            // 30 s): a restarted broker's queues are pulled again that much sooner.
            let mut client = rocketmq_client_rust::ClientConfig::default();
            client.set_poll_name_server_interval(ROUTE_POLL_MS);
            let consumer =
                rocketmq_client_rust::DefaultLitePullConsumer::builder(Arc::clone(&rt.runtime))
                    .client_options(rocketmq_client_rust::ClientOptions::from(client))
                    .name_server_addr(ns)
                    .consumer_group(config.group.clone())
                    // Unique per consumer: two consumers of one group in one process under one
                    // name would look like one client to the broker's rebalance.
                    .instance_name(format!(
                        "ha-mq-consumer-{}-{}-{}",
                        c.idc,
                        std::process::id(),
                        CONSUMERS.fetch_add(1, Ordering::Relaxed)
                    ))
                    .auto_commit(false)
                    .consume_from_where(if config.from_first_offset {
                        ConsumeFromWhere::ConsumeFromFirstOffset
                    } else {
                        ConsumeFromWhere::ConsumeFromLastOffset
                    })
                    .poll_timeout_millis(
                        u64::try_from(config.poll_timeout.as_millis()).unwrap_or(u64::MAX),
                    )
                    .build()
                    .map_err(|e| MqError::Start {
                        idc: c.idc.clone(),
                        cause: classify(&e),
                    })?;
            consumer
                .subscribe(&config.topic)
                .await
                .map_err(|e| MqError::Start {
                    idc: c.idc.clone(),
                    cause: classify(&e),
                })?;
            consumer.start().await.map_err(|e| MqError::Start {
                idc: c.idc.clone(),
                cause: classify(&e),
            })?;
            let run = ClusterLoop {
                idc: c.idc.clone(),
                consumer: Arc::new(consumer),
                handler: Arc::clone(&handler),
                dedupe: Arc::clone(&dedupe),
                permits: Arc::clone(&permits),
                closed: Arc::clone(&closed),
                counters: Arc::clone(&counters),
                poll_ms: u64::try_from(config.poll_timeout.as_millis()).unwrap_or(u64::MAX),
                backoff: config.retry_backoff,
            };
            tasks.spawn(run.run());
        }
        Ok(HaConsumer {
            closed,
            tasks: Mutex::new(Some(tasks)),
            counters,
            rt,
        })
    }

    /// The consumer's counters.
    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            handled: self.counters.handled.load(Ordering::Relaxed),
            duplicates: self.counters.duplicates.load(Ordering::Relaxed),
            handler_failures: self.counters.failures.load(Ordering::Relaxed),
        }
    }

    /// Stops polling, lets the batches in hand finish (their offsets committed), and stops the
    /// clients.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let tasks = self.tasks.lock().take();
        if let Some(mut tasks) = tasks {
            // Bounded: a handler that never returns is aborted (its batch is not committed,
            // so it is delivered again).
            let joined = tokio::time::timeout(Duration::from_secs(10), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if joined.is_err() {
                tracing::warn!("ha-mq: consumer tasks did not stop within 10 s; aborted");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
        }
        self.rt.shutdown().await;
    }
}

impl Drop for HaConsumer {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

struct ClusterLoop<E> {
    idc: String,
    consumer: Arc<rocketmq_client_rust::DefaultLitePullConsumer>,
    handler: Arc<Handler<E>>,
    dedupe: Arc<Dedupe>,
    permits: Arc<Semaphore>,
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
    poll_ms: u64,
    backoff: Duration,
}

fn delivery(m: &MessageExt, idc: &str) -> Delivery {
    let properties: HashMap<String, String> = m
        .properties()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let key = properties
        .get("KEYS")
        .and_then(|k| k.split(' ').find(|s| !s.is_empty()))
        .map(str::to_string);
    Delivery {
        key,
        topic: m.topic().to_string(),
        tags: m.get_tags().map(|t| t.to_string()),
        body: m.body().unwrap_or_default(),
        idc: idc.to_string(),
        msg_id: m.msg_id().to_string(),
        properties,
    }
}

impl<E: std::fmt::Display + Send + 'static> ClusterLoop<E> {
    async fn run(self) {
        let this = Arc::new(self);
        while !this.closed.load(Ordering::Acquire) {
            let batch = this.consumer.poll_with_timeout(this.poll_ms).await;
            if batch.is_empty() {
                continue;
            }
            // Every message of the batch handled (concurrently, bounded by the shared permits)
            // before its offsets are committed.
            let mut offsets: HashMap<MessageQueue, i64> = HashMap::new();
            let mut running = JoinSet::new();
            for m in batch {
                let mq =
                    MessageQueue::from_parts(m.topic().as_str(), m.broker_name(), m.queue_id());
                let next = m.queue_offset() + 1;
                let e = offsets.entry(mq).or_insert(next);
                *e = (*e).max(next);
                let d = delivery(&m, &this.idc);
                let this2 = Arc::clone(&this);
                let Ok(permit) = Arc::clone(&this.permits).acquire_owned().await else {
                    return;
                };
                running.spawn(async move {
                    let ok = this2.handle(d).await;
                    drop(permit);
                    ok
                });
            }
            let mut all = true;
            while let Some(r) = running.join_next().await {
                all &= matches!(r, Ok(true));
            }
            if !all {
                // Shut down mid-batch: nothing of it is committed (it is delivered again).
                break;
            }
            this.consumer.commit_sync_with_map(offsets, true).await;
        }
        self_shutdown(&this.consumer).await;
    }

    /// Runs the handler until it succeeds (true), or the consumer is shut down (false).
    async fn handle(&self, d: Delivery) -> bool {
        if d.tags.as_deref() == Some(crate::producer::WARM_TAG) {
            // HaProducer::warm_up's marker: acknowledged, not the application's.
            return true;
        }
        let key = d.key.clone();
        if let Some(k) = &key
            && matches!(self.dedupe.claim(k).await, Claim::Duplicate)
        {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let mut wait = self.backoff;
        loop {
            match (self.handler)(d.clone()).await {
                Ok(()) => {
                    if let Some(k) = &key {
                        self.dedupe.done(k);
                    }
                    self.counters.handled.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    if self.closed.load(Ordering::Acquire) {
                        if let Some(k) = &key {
                            self.dedupe.failed(k);
                        }
                        return false;
                    }
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(idc = %self.idc, key = ?key, error = %e, "ha-mq: handler failed; running it again after {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

async fn self_shutdown(consumer: &rocketmq_client_rust::DefaultLitePullConsumer) {
    Box::pin(consumer.shutdown()).await;
}
