//! [`HaProducer`]: one RocketMQ producer per IDC cluster, the local one first, failing over
//! within the caller's deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ha_core::{ConfigError, ErrorClass, EventBus, HaContext, TopologyEvent};
use parking_lot::Mutex;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, DefaultMQProducer, SendResult, SendStatus,
};
use rocketmq_model::common::message::message_single::Message;
use tokio::sync::RwLock;
use tokio::time::Instant;

use crate::error::{Cause, MqError, classify};
use crate::runtime::ClientRt;
use crate::spool::{MIN_SEGMENT_BYTES, Spool, SpoolConfig, SpoolError, SpoolRecord};

/// The longest topic RocketMQ accepts.
pub const MAX_TOPIC_LEN: usize = 127;

/// One IDC's RocketMQ cluster, found through its name servers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The IDC the cluster runs in (events and metrics name it).
    pub idc: String,
    /// The cluster's name servers.
    pub name_servers: Vec<SocketAddr>,
}

impl ClusterConfig {
    /// A cluster in `idc` with these name servers.
    pub fn new(idc: impl Into<String>, name_servers: Vec<SocketAddr>) -> ClusterConfig {
        ClusterConfig {
            idc: idc.into(),
            name_servers,
        }
    }
}

/// How an [`HaProducer`] sends. Build with [`ProducerConfig::new`] and the setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// The dependency's name in events and metrics (default `"mq"`).
    pub dependency: String,
    /// The RocketMQ producer group.
    pub group: String,
    /// The clusters in order of preference: the local IDC's first, then the backups.
    pub clusters: Vec<ClusterConfig>,
    /// The bound of one attempt on one cluster (default 400 ms). When it passes, the message
    /// goes to the next cluster (and the first may have stored it: duplicates carry the same
    /// key).
    pub attempt_timeout: Duration,
    /// The whole send's deadline unless the caller gives one (default 2 s).
    pub deadline: Duration,
    /// The first time a failed cluster is avoided (default 100 ms); it doubles on every
    /// consecutive failure up to [`max_avoid`](Self::max_avoid).
    pub min_avoid: Duration,
    /// The longest a failed cluster is avoided before it is tried again (default 800 ms): after
    /// it recovers, traffic is back within about this.
    pub max_avoid: Duration,
    /// A cluster that failed again within this of recovering keeps its longer avoid time (no
    /// flapping); after this long without failure it starts from `min_avoid` again (default
    /// 10 s).
    pub stable_after: Duration,
    /// The largest body accepted (default 4 MiB, RocketMQ's default).
    pub max_message_bytes: usize,
    /// How long start-up waits for each name server's TCP connect (default 1 s).
    pub connect_timeout: Duration,
    /// Start even when some cluster's name servers are unreachable (that cluster starts out
    /// avoided); by default start-up fails with [`MqError::NameServerUnreachable`].
    pub start_degraded: bool,
    /// The local spool for when every cluster fails (default off).
    pub spool: Option<SpoolConfig>,
    /// The operator's drain switch: a drained IDC's cluster is tried only after every other
    /// one (default none; [`from_context`](Self::from_context) takes the context's).
    pub control: Option<ha_core::Control>,
}

impl ProducerConfig {
    /// A producer of `group` over `clusters` (the local IDC's first), with the defaults.
    pub fn new(group: impl Into<String>, clusters: Vec<ClusterConfig>) -> ProducerConfig {
        ProducerConfig {
            dependency: "mq".into(),
            group: group.into(),
            clusters,
            attempt_timeout: Duration::from_millis(400),
            deadline: Duration::from_secs(2),
            min_avoid: Duration::from_millis(100),
            max_avoid: Duration::from_millis(800),
            stable_after: Duration::from_secs(10),
            max_message_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(1),
            start_degraded: false,
            spool: None,
            control: None,
        }
    }

    /// Follows `control`'s drains: a drained IDC's cluster is tried last.
    #[must_use]
    pub fn control(mut self, control: ha_core::Control) -> Self {
        self.control = Some(control);
        self
    }

    /// The config of dependency `dependency` of `ctx`'s topology: a `kind = "rocketmq"`
    /// dependency whose `[dependencies.NAME.settings]` are [`MqSettings`](crate::settings::MqSettings)
    /// (see [`crate::settings`] for the format). [`dependency`](Self::dependency) is its name.
    ///
    /// The clusters are ordered with the one in the local IDC (`ctx.topology().local_idc()`)
    /// first and the others in the file's order; when no cluster is in the local IDC, the
    /// file's order is kept as it is (the first listed is preferred). A `spool_dir` turns the
    /// spool on (a relative path is relative to the working directory).
    ///
    /// Errors are [`MqError::Config`] naming the file and the dotted field: an unknown
    /// dependency, another `kind` (`dependencies.NAME.kind`), an unknown field, a missing
    /// `group`, no cluster, an IDC the topology does not know, an address that is not
    /// `IP:port`, a duration that does not parse (`dependencies.NAME.settings.deadline`).
    ///
    /// The producer's events go to the context's bus when it is given to
    /// [`HaProducer::start`]:
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use ha_core::{HaContext, Topology};
    /// use ha_mq::{HaProducer, OutgoingMessage, ProducerConfig};
    ///
    /// let topology = Topology::from_toml_str(r#"
    /// local_idc = "sh-a"
    /// [[regions]]
    /// name = "north"
    /// resolvers = ["127.0.1.53"]
    /// [[regions]]
    /// name = "south"
    /// resolvers = ["127.0.3.53"]
    /// [[idcs]]
    /// name = "bj-a"
    /// region = "north"
    /// cidrs = ["127.0.1.0/24"]
    /// [[idcs]]
    /// name = "sh-a"
    /// region = "south"
    /// cidrs = ["127.0.3.0/24"]
    /// [dependencies.events]
    /// kind = "rocketmq"
    /// # ha-core wants a source for every dependency; ha-mq reads the clusters below.
    /// static_addrs = ["127.0.1.220:9876", "127.0.3.220:9876"]
    /// [dependencies.events.settings]
    /// group = "membership"
    /// deadline = "1s"
    /// [[dependencies.events.settings.clusters]]
    /// idc = "bj-a"
    /// name_servers = ["127.0.1.220:9876"]
    /// [[dependencies.events.settings.clusters]]
    /// idc = "sh-a"
    /// name_servers = ["127.0.3.220:9876"]
    /// "#, "topology.toml")?;
    /// let ctx = HaContext::new(topology);
    /// let config = ProducerConfig::from_context(&ctx, "events")?;
    /// assert_eq!(config.clusters[0].idc, "sh-a"); // the local IDC's first
    /// let producer = HaProducer::start(config, Some(ctx.events().clone())).await?;
    /// producer.send(OutgoingMessage::new("member_events", "{}")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_context(ctx: &HaContext, dependency: &str) -> Result<ProducerConfig, MqError> {
        let read = crate::settings::read(ctx, dependency, &crate::settings::Resolved::new())?;
        Self::from_read(ctx, dependency, read)
    }

    /// [`from_context`](Self::from_context) that also resolves a cluster's
    /// `name_servers_from` (another dependency of the topology, e.g. a DNS name per region for
    /// the cluster's name servers) through `ctx`'s discovery, once.
    pub async fn discover(ctx: &HaContext, dependency: &str) -> Result<ProducerConfig, MqError> {
        let resolved = crate::settings::resolve(ctx, dependency).await?;
        let read = crate::settings::read(ctx, dependency, &resolved)?;
        Self::from_read(ctx, dependency, read)
    }

    fn from_read(
        ctx: &HaContext,
        dependency: &str,
        read: crate::settings::Read,
    ) -> Result<ProducerConfig, MqError> {
        let s = &read.settings;
        let group = match s.group.as_deref().map(str::trim) {
            Some(g) if !g.is_empty() => g.to_string(),
            other => {
                return Err(ConfigError::new(
                    &read.file,
                    read.field("group"),
                    other.unwrap_or(""),
                    "missing: the producer group",
                )
                .into());
            }
        };
        let mut config = ProducerConfig::new(group, read.clusters.clone())
            .dependency(dependency)
            .control(ctx.control().clone());
        config.attempt_timeout = read.duration(
            "attempt_timeout",
            s.attempt_timeout.as_deref(),
            config.attempt_timeout,
        )?;
        config.deadline = read.duration("deadline", s.deadline.as_deref(), config.deadline)?;
        match (&s.spool_dir, s.spool_max_bytes) {
            (None, None) => {}
            (None, Some(n)) => {
                return Err(ConfigError::new(
                    &read.file,
                    read.field("spool_max_bytes"),
                    n,
                    "needs spool_dir (the spool is off without it)",
                )
                .into());
            }
            (Some(dir), max) => {
                let mut spool = SpoolConfig::new(dir);
                if let Some(n) = max {
                    // Space comes back a segment at a time: keep a few segments in the bound.
                    let segment = spool.segment_bytes.min(n / 4).max(MIN_SEGMENT_BYTES);
                    spool = spool.max_bytes(n).segment_bytes(segment);
                }
                spool.validate().map_err(|e| {
                    let (field, value) = match &e {
                        SpoolError::Config { field: "dir", .. } => {
                            ("spool_dir", dir.display().to_string())
                        }
                        _ => ("spool_max_bytes", max.unwrap_or_default().to_string()),
                    };
                    let why = match e {
                        SpoolError::Config { why, .. } => why,
                        other => other.to_string(),
                    };
                    ConfigError::new(&read.file, read.field(field), value, why)
                })?;
                config.spool = Some(spool);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets [`dependency`](Self::dependency).
    pub fn dependency(mut self, name: impl Into<String>) -> Self {
        self.dependency = name.into();
        self
    }

    /// Sets [`attempt_timeout`](Self::attempt_timeout).
    pub fn attempt_timeout(mut self, t: Duration) -> Self {
        self.attempt_timeout = t;
        self
    }

    /// Sets [`deadline`](Self::deadline).
    pub fn deadline(mut self, t: Duration) -> Self {
        self.deadline = t;
        self
    }

    /// Sets [`min_avoid`](Self::min_avoid) and [`max_avoid`](Self::max_avoid).
    pub fn avoid(mut self, min: Duration, max: Duration) -> Self {
        self.min_avoid = min;
        self.max_avoid = max;
        self
    }

    /// Sets [`max_message_bytes`](Self::max_message_bytes).
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Sets [`start_degraded`](Self::start_degraded).
    pub fn start_degraded(mut self, yes: bool) -> Self {
        self.start_degraded = yes;
        self
    }

    /// Turns the spool on (see [`crate::spool`]).
    pub fn spool(mut self, spool: SpoolConfig) -> Self {
        self.spool = Some(spool);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, value: String, why: &str| {
            Err(ConfigError::new(
                "<ha-mq producer config>",
                field.to_string(),
                value,
                why.to_string(),
            ))
        };
        if self.group.is_empty() {
            return bad("group", String::new(), "must not be empty");
        }
        crate::settings::validate_clusters(
            &self.clusters,
            std::path::Path::new("<ha-mq producer config>"),
            "",
        )?;
        for (field, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("deadline", self.deadline),
            ("min_avoid", self.min_avoid),
            ("max_avoid", self.max_avoid),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return bad(field, "0".into(), "must be positive");
            }
            if d > Duration::from_secs(24 * 3600) {
                return bad(field, format!("{d:?}"), "must be at most 24 h");
            }
        }
        if self.min_avoid > self.max_avoid {
            return bad(
                "min_avoid",
                format!("{:?}", self.min_avoid),
                "must not exceed max_avoid",
            );
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > 64 * 1024 * 1024 {
            return bad(
                "max_message_bytes",
                self.max_message_bytes.to_string(),
                "must be in 1..=67108864",
            );
        }
        Ok(())
    }
}

/// A message to send. The key is the consumers' dedupe key: give your own (an id that
/// survives retries, e.g. `"member-42-v7"`), or one is generated.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    topic: String,
    body: Bytes,
    key: Option<String>,
    tags: Option<String>,
    properties: Vec<(String, String)>,
}

impl OutgoingMessage {
    /// A message for `topic` with `body`.
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> OutgoingMessage {
        OutgoingMessage {
            topic: topic.into(),
            body: body.into(),
            key: None,
            tags: None,
            properties: Vec::new(),
        }
    }

    /// Sets the dedupe key (no spaces: RocketMQ separates keys with them).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the tag.
    pub fn tags(mut self, tags: impl Into<String>) -> Self {
        self.tags = Some(tags.into());
        self
    }

    /// Adds a user property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// The topic.
    pub fn topic_name(&self) -> &str {
        &self.topic
    }

    /// The key, if set.
    pub fn key_value(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// A generated dedupe key: `hamq-` and 32 hex digits (128 random bits).
pub fn generate_key() -> String {
    let v: u128 = rand::random();
    format!("hamq-{v:032x}")
}

fn validate_message(msg: &OutgoingMessage, max: usize) -> Result<(), MqError> {
    let invalid = |why: String| Err(MqError::InvalidMessage { why });
    if msg.topic.is_empty() {
        return invalid("empty topic".into());
    }
    if msg.topic.len() > MAX_TOPIC_LEN {
        return invalid(format!(
            "topic of {} characters (at most {MAX_TOPIC_LEN})",
            msg.topic.len()
        ));
    }
    if let Some(c) = msg
        .topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')))
    {
        return invalid(format!(
            "topic {:?} has {c:?} (allowed: letters, digits, _ - % |)",
            msg.topic
        ));
    }
    if let Some(k) = &msg.key {
        if k.is_empty() {
            return invalid("empty key".into());
        }
        if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return invalid(format!(
                "key {k:?} has whitespace or a control character (RocketMQ splits keys on spaces)"
            ));
        }
    }
    if msg.body.len() > max {
        return Err(MqError::TooLarge {
            size: msg.body.len(),
            max,
        });
    }
    Ok(())
}

/// What a successful send did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReceipt {
    /// The message's dedupe key (the caller's or the generated one).
    pub key: String,
    /// The IDC whose cluster stored it; `None` when it went to the spool.
    pub idc: Option<String>,
    /// The broker's message id.
    pub msg_id: Option<String>,
    /// The broker's status. Anything but `SendOk` (`FlushDiskTimeout`, `FlushSlaveTimeout`,
    /// `SlaveNotAvailable`) still means stored on the master: it is not re-sent elsewhere
    /// (that would make a duplicate), and the caller sees the weaker durability here.
    pub status: SendStatus,
    /// True when every cluster failed and the message is in the local spool (durably, to be
    /// replayed in order).
    pub spooled: bool,
    /// Cluster attempts made.
    pub attempts: u32,
}

/// One incarnation of a cluster's client: a producer with an identity of its own (a new one
/// after a failure escapes the transport's 30 s lockout of a broker address).
struct Incarnation {
    producer: RwLock<DefaultMQProducer>,
}

#[derive(Debug, Default)]
struct Health {
    /// Consecutive failures (reset by a success).
    failures: u32,
    /// Avoided until then.
    avoid_until: Option<Instant>,
    /// The current avoid time (grows while failing, kept through a flap).
    avoid: Duration,
    /// The last failure, for the flap hold.
    last_failure: Option<Instant>,
    /// A probe (the first send after the avoid time) is in flight.
    probing: bool,
}

struct Cluster {
    idc: String,
    name_servers: String,
    current: arc_swap::ArcSwap<Incarnation>,
    health: Mutex<Health>,
    rebuilding: AtomicBool,
}

struct Inner {
    config: ProducerConfig,
    rt: ClientRt,
    clusters: Vec<Cluster>,
    bus: Option<EventBus>,
    /// The cluster that acknowledged the last send (index), for failover/back events.
    serving: Mutex<usize>,
    incarnations: AtomicU64,
    closed: AtomicBool,
    spool: Option<Spool>,
    replay_wake: tokio::sync::Notify,
    spool_growth: Mutex<SpoolGrowth>,
}

/// How often `SpoolGrowing` is published at most while the spool grows between powers of two.
const SPOOL_REPORT_EVERY: Duration = Duration::from_secs(10);

/// When to publish `SpoolGrowing`: once the spool's record count reaches the next power of two
/// above the last one reported (1, 2, 4, 8, ...), and otherwise at most every
/// [`SPOOL_REPORT_EVERY`] while it grows; a spool that is replayed to the end starts over.
#[derive(Debug, Default)]
struct SpoolGrowth {
    last_records: u64,
    last_at: Option<Instant>,
}

impl SpoolGrowth {
    /// True when `records` (now) is to be published.
    fn observe(&mut self, records: u64, now: Instant) -> bool {
        if records <= self.last_records {
            return false;
        }
        let power = self.last_records.saturating_add(1).next_power_of_two();
        let due = records >= power
            || self
                .last_at
                .is_none_or(|t| now.duration_since(t) >= SPOOL_REPORT_EVERY);
        if due {
            self.last_records = records;
            self.last_at = Some(now);
        }
        due
    }
}

/// A RocketMQ producer over one cluster per IDC. `Clone` shares it.
///
/// A message goes to the first cluster (the local IDC's) that is not avoided; when that attempt
/// fails or passes [`ProducerConfig::attempt_timeout`], to the next, all within the deadline.
/// A cluster that failed is avoided for a growing time (100 ms doubling to 800 ms by default)
/// and then tried again by one send (a probe) with a fresh client identity, so a restarted
/// broker gets traffic back within about a second (not the client's 30 s lockout).
///
/// `send` returns `Ok` only when a broker acknowledged the message (or, with the spool on, when
/// it is durably in the spool). An attempt that was written and not answered is reported as
/// [`MqError::OutcomeUnknown`] when no other cluster took the message.
#[derive(Clone)]
pub struct HaProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaProducer")
            .field("group", &self.inner.config.group)
            .field(
                "clusters",
                &self
                    .inner
                    .clusters
                    .iter()
                    .map(|c| c.idc.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Addresses as the client takes them: `a;b`.
pub(crate) fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

impl HaProducer {
    /// Starts a producer per cluster. Fails with a typed error on a bad config, or when a
    /// cluster's name servers all refuse a TCP connect (unless
    /// [`start_degraded`](ProducerConfig::start_degraded)). `bus` receives
    /// `ClusterFailedOver`/`ClusterFailedBack` events.
    pub async fn start(
        config: ProducerConfig,
        bus: Option<EventBus>,
    ) -> Result<HaProducer, MqError> {
        config.validate()?;
        let spool = match &config.spool {
            Some(s) => Some(
                Spool::open(s.clone())
                    .await
                    .map_err(|source| MqError::Spool {
                        source,
                        attempts: Vec::new(),
                    })?,
            ),
            None => None,
        };
        // Reachability first: the client's start() succeeds with no name server running.
        let mut unreachable = Vec::new();
        for (i, c) in config.clusters.iter().enumerate() {
            let mut why = String::new();
            let mut ok = false;
            for a in &c.name_servers {
                match tokio::time::timeout(
                    config.connect_timeout,
                    tokio::net::TcpStream::connect(a),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        ok = true;
                        break;
                    }
                    Ok(Err(e)) => why = format!("{a}: {e}"),
                    Err(_) => {
                        why = format!("{a}: connect timed out after {:?}", config.connect_timeout)
                    }
                }
            }
            if !ok {
                if !config.start_degraded {
                    return Err(MqError::NameServerUnreachable {
                        idc: c.idc.clone(),
                        addrs: join_addrs(&c.name_servers),
                        why,
                    });
                }
                tracing::warn!(idc = %c.idc, %why, "ha-mq: cluster's name servers unreachable at start-up; it starts avoided");
                unreachable.push((i, why));
            }
        }
        let rt = ClientRt::start("ha-mq")?;
        let incarnations = AtomicU64::new(0);
        let mut clusters = Vec::with_capacity(config.clusters.len());
        for c in &config.clusters {
            let ns = join_addrs(&c.name_servers);
            let n = incarnations.fetch_add(1, Ordering::Relaxed);
            let inc = build_incarnation(&rt.runtime, &config, &c.idc, &ns, n)
                .await
                .map_err(|cause| MqError::Start {
                    idc: c.idc.clone(),
                    cause,
                })?;
            clusters.push(Cluster {
                idc: c.idc.clone(),
                name_servers: ns,
                current: arc_swap::ArcSwap::from_pointee(inc),
                health: Mutex::new(Health::default()),
                rebuilding: AtomicBool::new(false),
            });
        }
        let now = Instant::now();
        for (i, why) in unreachable {
            let mut h = clusters[i].health.lock();
            h.failures = 1;
            h.avoid = config.min_avoid;
            h.avoid_until = Some(now + config.min_avoid);
            h.last_failure = Some(now);
            if let Some(bus) = &bus {
                bus.publish(TopologyEvent::cluster_avoided(
                    config.dependency.as_str(),
                    clusters[i].idc.as_str(),
                    config.min_avoid,
                    format!("name servers unreachable at start-up: {why}"),
                ));
            }
        }
        let inner = Arc::new(Inner {
            config,
            rt,
            clusters,
            bus,
            serving: Mutex::new(0),
            incarnations,
            closed: AtomicBool::new(false),
            spool,
            replay_wake: tokio::sync::Notify::new(),
            spool_growth: Mutex::new(SpoolGrowth::default()),
        });
        if inner.spool.is_some() {
            tokio::spawn(Inner::replay(Arc::downgrade(&inner)));
        }
        Ok(HaProducer { inner })
    }

    /// The spool, when configured (its length, for a readiness check or a drill).
    pub fn spool(&self) -> Option<&Spool> {
        self.inner.spool.as_ref()
    }

    /// The IDCs of the clusters, in order of preference.
    pub fn idcs(&self) -> Vec<&str> {
        self.inner.clusters.iter().map(|c| c.idc.as_str()).collect()
    }

    /// True while the cluster of `idc` is avoided after a failure.
    pub fn is_avoided(&self, idc: &str) -> bool {
        let now = Instant::now();
        self.inner
            .clusters
            .iter()
            .find(|c| c.idc == idc)
            .is_some_and(|c| c.health.lock().avoid_until.is_some_and(|u| u > now))
    }

    /// Sends within the configured deadline. See [`send_within`](Self::send_within).
    pub async fn send(&self, msg: OutgoingMessage) -> Result<SendReceipt, MqError> {
        self.send_within(msg, self.inner.config.deadline).await
    }

    /// Sends `msg`, trying the clusters in order of preference within `deadline`; with the
    /// spool on, a message no cluster took is appended to the spool.
    pub async fn send_within(
        &self,
        mut msg: OutgoingMessage,
        deadline: Duration,
    ) -> Result<SendReceipt, MqError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(MqError::Closed);
        }
        validate_message(&msg, inner.config.max_message_bytes)?;
        let key = match &msg.key {
            Some(k) => k.clone(),
            None => {
                let k = generate_key();
                msg.key = Some(k.clone());
                k
            }
        };
        let rocket = to_rocket(&msg, &key)?;
        // While older messages wait in the spool, new ones queue behind them (order kept).
        if let Some(spool) = &inner.spool
            && !spool.is_empty()
        {
            return inner.spool_message(spool, msg, key, Vec::new()).await;
        }
        let result = inner.send_clusters(&rocket, &key, deadline).await;
        match (result, &inner.spool) {
            (Ok(r), _) => Ok(r),
            (Err(e @ (MqError::Refused { .. } | MqError::Closed)), _) => Err(e),
            (Err(e), Some(spool)) => {
                let attempts = e.attempts().to_vec();
                inner.spool_message(spool, msg, key, attempts).await
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Stops every cluster's client (waits for sends in flight) and the client runtime.
    /// Later sends fail with [`MqError::Closed`].
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.replay_wake.notify_one();
        if let Some(spool) = &inner.spool {
            spool.close().await;
        }
        for c in &inner.clusters {
            let inc = c.current.load_full();
            let stop = async { Box::pin(inc.producer.write().await.shutdown()).await };
            if tokio::time::timeout(SHUTDOWN_BOUND, stop).await.is_err() {
                tracing::warn!(idc = %c.idc, "ha-mq: client did not stop within {SHUTDOWN_BOUND:?}");
            }
        }
        inner.rt.shutdown().await;
    }
}

/// The tag of [`HaProducer::warm_up`]'s marker messages; [`HaConsumer`](crate::HaConsumer)
/// acknowledges them without running the handler.
pub const WARM_TAG: &str = "ha-mq-warm";

impl HaProducer {
    /// Sends one marker message (tag [`WARM_TAG`]) to `topic` on **every** cluster, each
    /// bounded by `attempt_timeout`, and returns each IDC's outcome. On brokers that create
    /// topics on first use (`autoCreateTopicEnable`, the lab's), this creates the topic's route
    /// on every cluster before any failover needs it, so consumers on the backup cluster find
    /// it at once instead of at their next rebalance (20 s). Where topics are created by an
    /// operator it only checks that each cluster takes the topic. Consumers drop the markers.
    pub async fn warm_up(&self, topic: &str) -> Vec<(String, Result<(), Cause>)> {
        let inner = &self.inner;
        let mut out = Vec::with_capacity(inner.clusters.len());
        for c in &inner.clusters {
            let key = format!("{WARM_TAG}-{}-{}", c.idc, generate_key());
            let msg = OutgoingMessage::new(topic, Bytes::from_static(b"{}")).tags(WARM_TAG);
            let result = match to_rocket(&msg, &key) {
                Err(e) => Err(Cause {
                    class: ErrorClass::NotSent,
                    code: "ha_mq.invalid_message",
                    broker_code: None,
                    client_code: None,
                    message: e.to_string(),
                }),
                Ok(m) => match inner.attempt(c, &m, inner.config.attempt_timeout).await {
                    Attempt::Stored(_) => Ok(()),
                    Attempt::Failed(cause) => Err(cause),
                },
            };
            out.push((c.idc.clone(), result));
        }
        out
    }
}

fn to_rocket(msg: &OutgoingMessage, key: &str) -> Result<Message, MqError> {
    let mut b = Message::builder()
        .topic(msg.topic.as_str())
        .body(msg.body.clone())
        .key(key);
    if let Some(t) = &msg.tags {
        b = b.tags(t.as_str());
    }
    for (k, v) in &msg.properties {
        b = b
            .raw_property(k.as_str(), v.as_str())
            .map_err(|e| MqError::InvalidMessage {
                why: format!("property {k:?}: {e}"),
            })?;
    }
    b.build()
        .map_err(|e| MqError::InvalidMessage { why: e.to_string() })
}

async fn build_incarnation(
    runtime: &Arc<ClientRuntime>,
    config: &ProducerConfig,
    idc: &str,
    name_servers: &str,
    n: u64,
) -> Result<Incarnation, Cause> {
    let mut client = ClientConfig::default();
    // Each cluster (and each incarnation) its own identity: two producers of one runtime
    // with the same instance name and different name servers collide.
    client.set_instance_name(format!("ha-mq-{idc}-{}-{n}", std::process::id()).into());
    let attempt_ms = u32::try_from(config.attempt_timeout.as_millis()).unwrap_or(u32::MAX);
    let mut producer = DefaultMQProducer::builder(Arc::clone(runtime))
        .client_config(client)
        .name_server_addr(name_servers.to_string())
        .producer_group(config.group.clone())
        .send_msg_timeout(attempt_ms)
        // One try per cluster: ha-mq decides where a failed message goes.
        .retry_times_when_send_failed(0)
        .retry_another_broker_when_not_store_ok(false)
        .max_message_size(u32::try_from(config.max_message_bytes).unwrap_or(u32::MAX))
        .build();
    producer.start().await.map_err(|e| classify(&e))?;
    Ok(Incarnation {
        producer: RwLock::new(producer),
    })
}

/// Probes claimed by one send; released when tried, and on drop.
struct Probes<'a> {
    clusters: &'a [Cluster],
    claimed: Vec<usize>,
}

impl Probes<'_> {
    fn release(&mut self, i: usize) {
        if let Some(pos) = self.claimed.iter().position(|&p| p == i) {
            self.claimed.swap_remove(pos);
            self.clusters[i].health.lock().probing = false;
        }
    }
}

impl Drop for Probes<'_> {
    fn drop(&mut self) {
        for &i in &self.claimed {
            self.clusters[i].health.lock().probing = false;
        }
    }
}

/// Bound on stopping one client (it may try to reach a frozen broker).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

enum Attempt {
    Stored(SendResult),
    Failed(Cause),
}

impl Inner {
    async fn spool_message(
        &self,
        spool: &Spool,
        msg: OutgoingMessage,
        key: String,
        attempts: Vec<(String, Cause)>,
    ) -> Result<SendReceipt, MqError> {
        let n = u32::try_from(attempts.len()).unwrap_or(u32::MAX);
        let record = SpoolRecord {
            topic: msg.topic,
            key: key.clone(),
            tags: msg.tags,
            body: msg.body,
            properties: msg.properties,
        };
        match spool.append(&record).await {
            Ok(_) => {
                metrics::counter!("ha_mq_spooled_total", "dependency" => self.config.dependency.clone()).increment(1);
                self.replay_wake.notify_one();
                let records = spool.len();
                if self.spool_growth.lock().observe(records, Instant::now()) {
                    self.publish(TopologyEvent::spool_growing(
                        self.config.dependency.as_str(),
                        records,
                        spool.disk_bytes(),
                    ));
                }
                Ok(SendReceipt {
                    key,
                    idc: None,
                    msg_id: None,
                    status: SendStatus::SendOk,
                    spooled: true,
                    attempts: n,
                })
            }
            Err(source) => Err(MqError::Spool { source, attempts }),
        }
    }

    /// Replays the spool in order through the clusters; commits in groups (a crash replays
    /// at most a group again: duplicates with the same key, never a loss).
    ///
    /// It holds the producer only for one record at a time: once every handle is dropped it
    /// ends (what it had not committed is replayed by the next producer on the spool).
    async fn replay(weak: std::sync::Weak<Self>) {
        let mut wait = Duration::ZERO;
        let mut last: Option<u64> = None;
        let mut since_commit = 0u32;
        // This replay's start and the records it sent, for `SpoolReplayed`.
        let mut round: Option<(Instant, u64)> = None;
        loop {
            let Some(this) = weak.upgrade() else {
                return;
            };
            let Some(spool) = this.spool.as_ref() else {
                return;
            };
            if this.closed.load(Ordering::Acquire) {
                return;
            }
            if wait.is_zero() {
                wait = this.config.min_avoid;
            }
            let next = match spool.next_pending().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "ha-mq: spool read failed");
                    tokio::time::sleep(this.config.max_avoid).await;
                    continue;
                }
            };
            let Some((seq, rec)) = next else {
                if let Some(seq) = last.take() {
                    this.commit_spool(spool, seq).await;
                    since_commit = 0;
                }
                if spool.is_empty()
                    && let Some((start, records)) = round.take()
                {
                    let took = start.elapsed();
                    tracing::info!(records, ?took, "ha-mq: spool replayed");
                    *this.spool_growth.lock() = SpoolGrowth::default();
                    this.publish(TopologyEvent::spool_replayed(
                        this.config.dependency.as_str(),
                        records,
                        took,
                    ));
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), this.replay_wake.notified())
                        .await;
                continue;
            };
            let round = round.get_or_insert_with(|| (Instant::now(), 0));
            let mut out = OutgoingMessage::new(rec.topic, rec.body).key(rec.key.clone());
            out.tags = rec.tags;
            out.properties = rec.properties;
            let sent = match to_rocket(&out, &rec.key) {
                Ok(m) => this.send_clusters(&m, &rec.key, this.config.deadline).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(_) => {
                    round.1 += 1;
                    wait = this.config.min_avoid;
                    last = Some(seq);
                    since_commit += 1;
                    if since_commit >= 64 {
                        this.commit_spool(spool, seq).await;
                        last = None;
                        since_commit = 0;
                    }
                }
                Err(e @ (MqError::Refused { .. } | MqError::InvalidMessage { .. })) => {
                    // Refused for good by a broker: it would block the spool forever. Said
                    // loudly, counted, and passed.
                    tracing::error!(key = %rec.key, error = %e, "ha-mq: spooled message refused by the broker; dropped from the spool");
                    metrics::counter!("ha_mq_spool_refused_total", "dependency" => this.config.dependency.clone()).increment(1);
                    last = Some(seq);
                }
                Err(e) => {
                    tracing::debug!(key = %rec.key, error = %e, "ha-mq: replay waits for a cluster");
                    if let Some(seq) = last.take() {
                        this.commit_spool(spool, seq).await;
                        since_commit = 0;
                    }
                    spool.rewind().await;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(this.config.max_avoid);
                }
            }
        }
    }

    async fn commit_spool(&self, spool: &Spool, seq: u64) {
        if let Err(e) = spool.commit(seq).await {
            tracing::error!(error = %e, seq, "ha-mq: spool commit failed (the records are replayed again)");
        }
    }

    fn publish(&self, event: TopologyEvent) {
        if let Some(bus) = &self.bus {
            bus.publish(event);
        }
    }

    /// The clusters to try now, in order: those not avoided (an avoided one whose time is up
    /// is tried by one send, the probe), then, when none is left, the avoided ones anyway.
    fn plan(&self, now: Instant) -> Vec<(usize, bool)> {
        let mut ready = Vec::with_capacity(self.clusters.len());
        let mut avoided = Vec::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let mut h = c.health.lock();
            match h.avoid_until {
                Some(until) if until > now => avoided.push((i, until)),
                Some(_) => {
                    if h.probing {
                        avoided.push((i, now));
                    } else {
                        h.probing = true;
                        ready.push((i, true));
                    }
                }
                None => ready.push((i, false)),
            }
        }
        if ready.is_empty() {
            // Better a cluster that failed than none: soonest due first.
            avoided.sort_by_key(|&(_, until)| until);
            ready.extend(avoided.into_iter().map(|(i, _)| (i, false)));
        }
        if let Some(control) = &self.config.control {
            // A drained IDC's cluster last (a stable sort keeps the preference otherwise); still
            // tried when nothing else takes the message.
            ready.sort_by_key(|&(i, _)| control.is_drained(&self.clusters[i].idc));
        }
        ready
    }

    async fn attempt(&self, c: &Cluster, msg: &Message, budget: Duration) -> Attempt {
        let inc = c.current.load_full();
        let producer = inc.producer.read().await;
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1);
        // The client's own timeout first; ours (a little later) in case it does not fire.
        let guard = budget + Duration::from_millis(50);
        match tokio::time::timeout(guard, producer.send_with_timeout(msg.clone(), ms)).await {
            Ok(Ok(Some(r))) => Attempt::Stored(r),
            Ok(Ok(None)) => Attempt::Failed(Cause {
                class: ErrorClass::MaybeSent,
                code: "ha_mq.no_result",
                broker_code: None,
                client_code: None,
                message: "the client returned no send result".into(),
            }),
            Ok(Err(e)) => Attempt::Failed(classify(&e)),
            Err(_) => Attempt::Failed(Cause {
                class: ErrorClass::MaybeSent,
                code: "ha_mq.attempt_timeout",
                broker_code: None,
                client_code: None,
                message: format!("no answer within {budget:?}"),
            }),
        }
    }

    async fn send_clusters(
        self: &Arc<Self>,
        msg: &Message,
        key: &str,
        deadline: Duration,
    ) -> Result<SendReceipt, MqError> {
        let start = Instant::now();
        let end = start + deadline;
        let mut attempts: Vec<(String, Cause)> = Vec::new();
        let mut maybe_sent = false;
        let plan = self.plan(start);
        // The probes this send claimed are released however it ends (a cancelled send too).
        let mut probes = Probes {
            clusters: &self.clusters,
            claimed: plan.iter().filter(|p| p.1).map(|p| p.0).collect(),
        };
        let result = 'send: {
            for (i, _probe) in plan {
                let now = Instant::now();
                if now >= end {
                    break 'send Err(MqError::DeadlineExceeded {
                        deadline,
                        key: key.to_string(),
                        maybe_sent,
                        attempts: std::mem::take(&mut attempts),
                    });
                }
                let c = &self.clusters[i];
                let budget = self.config.attempt_timeout.min(end - now);
                let outcome = self.attempt(c, msg, budget).await;
                probes.release(i);
                match outcome {
                    Attempt::Stored(r) => {
                        self.succeeded(i);
                        metrics::counter!("ha_mq_sends_total", "dependency" => self.config.dependency.clone(), "idc" => c.idc.clone(), "result" => "ok").increment(1);
                        break 'send Ok(SendReceipt {
                            key: key.to_string(),
                            idc: Some(c.idc.clone()),
                            msg_id: r.msg_id.as_ref().map(ToString::to_string),
                            status: r.send_status,
                            spooled: false,
                            attempts: u32::try_from(attempts.len() + 1).unwrap_or(u32::MAX),
                        });
                    }
                    Attempt::Failed(cause) => {
                        metrics::counter!("ha_mq_attempt_failures_total", "dependency" => self.config.dependency.clone(), "idc" => c.idc.clone(), "class" => class_name(cause.class)).increment(1);
                        tracing::debug!(idc = %c.idc, %cause, key, "ha-mq: send attempt failed");
                        if cause.class == ErrorClass::Final {
                            break 'send Err(MqError::Refused {
                                idc: c.idc.clone(),
                                cause,
                            });
                        }
                        maybe_sent |= cause.class == ErrorClass::MaybeSent;
                        self.failed(i, &cause);
                        attempts.push((c.idc.clone(), cause));
                    }
                }
            }
            if Instant::now() >= end {
                Err(MqError::DeadlineExceeded {
                    deadline,
                    key: key.to_string(),
                    maybe_sent,
                    attempts,
                })
            } else if maybe_sent {
                Err(MqError::OutcomeUnknown {
                    key: key.to_string(),
                    attempts,
                })
            } else {
                Err(MqError::Unavailable { attempts })
            }
        };
        drop(probes);
        result
    }

    fn succeeded(&self, i: usize) {
        let c = &self.clusters[i];
        {
            let mut h = c.health.lock();
            h.failures = 0;
            if h.avoid_until.take().is_some() {
                drop(h);
                tracing::info!(idc = %c.idc, "ha-mq: cluster takes messages again");
                self.publish(TopologyEvent::cluster_restored(
                    self.config.dependency.as_str(),
                    c.idc.as_str(),
                ));
            }
        }
        let mut serving = self.serving.lock();
        if *serving != i {
            let from = self.clusters[*serving].idc.clone();
            let to = c.idc.clone();
            let back = i == 0;
            *serving = i;
            drop(serving);
            if let Some(bus) = &self.bus {
                let dep = self.config.dependency.as_str();
                bus.publish(if back {
                    TopologyEvent::cluster_failed_back(dep, from, to)
                } else {
                    TopologyEvent::cluster_failed_over(
                        dep,
                        from,
                        to,
                        "send failed on the preferred cluster",
                    )
                });
            }
        }
    }

    fn failed(self: &Arc<Self>, i: usize, cause: &Cause) {
        let c = &self.clusters[i];
        let now = Instant::now();
        let newly_avoided = {
            let mut h = c.health.lock();
            // An avoided cluster failing again (a send that had no better one) is no news; one
            // whose time was up (a failed probe) is avoided anew, for longer.
            let was_avoided = h.avoid_until.is_some_and(|u| u > now);
            let flapping = h
                .last_failure
                .is_some_and(|t| now.duration_since(t) < self.config.stable_after);
            h.avoid = if h.failures > 0 {
                (h.avoid * 2).min(self.config.max_avoid)
            } else if flapping {
                h.avoid.max(self.config.min_avoid)
            } else {
                self.config.min_avoid
            };
            h.failures = h.failures.saturating_add(1);
            h.last_failure = Some(now);
            h.avoid_until = Some(now + h.avoid);
            tracing::warn!(idc = %c.idc, %cause, avoid = ?h.avoid, "ha-mq: cluster avoided");
            (!was_avoided).then_some(h.avoid)
        };
        if let Some(avoid) = newly_avoided {
            self.publish(TopologyEvent::cluster_avoided(
                self.config.dependency.as_str(),
                c.idc.as_str(),
                avoid,
                cause.to_string(),
            ));
        }
        // A fresh identity for the next try: the transport locks a broker address out for 30 s
        // after 5 failed connects, and a new client escapes it.
        if matches!(cause.class, ErrorClass::NotSent | ErrorClass::MaybeSent)
            && !c.rebuilding.swap(true, Ordering::AcqRel)
        {
            let inner = Arc::clone(self);
            tokio::spawn(async move {
                inner.rebuild(i).await;
            });
        }
    }

    async fn rebuild(self: Arc<Self>, i: usize) {
        let c = &self.clusters[i];
        if !self.closed.load(Ordering::Acquire) {
            let n = self.incarnations.fetch_add(1, Ordering::Relaxed);
            let bound = self.config.connect_timeout * 3;
            match tokio::time::timeout(
                bound,
                build_incarnation(&self.rt.runtime, &self.config, &c.idc, &c.name_servers, n),
            )
            .await
            {
                Ok(Ok(inc)) => {
                    let old = c.current.swap(Arc::new(inc));
                    // Sends in flight on the old one finish (bounded by their timeout) first.
                    let stop = async { Box::pin(old.producer.write().await.shutdown()).await };
                    if tokio::time::timeout(SHUTDOWN_BOUND, stop).await.is_err() {
                        tracing::warn!(idc = %c.idc, "ha-mq: old client did not stop within {SHUTDOWN_BOUND:?}");
                    }
                }
                Ok(Err(cause)) => {
                    tracing::warn!(idc = %c.idc, %cause, "ha-mq: new client for the cluster failed to start");
                }
                Err(_) => {
                    tracing::warn!(idc = %c.idc, "ha-mq: new client for the cluster did not start within {bound:?}")
                }
            }
        }
        c.rebuilding.store(false, Ordering::Release);
    }
}

fn class_name(c: ErrorClass) -> &'static str {
    match c {
        ErrorClass::NotSent => "not_sent",
        ErrorClass::Refused => "refused",
        ErrorClass::MaybeSent => "maybe_sent",
        ErrorClass::Answered => "answered",
        ErrorClass::Final => "final",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9876".parse().unwrap()
    }

    #[test]
    fn bad_configs_name_the_field() {
        let ok = ProducerConfig::new("g", vec![ClusterConfig::new("bj-a", vec![addr()])]);
        assert!(ok.validate().is_ok());
        let cases: Vec<(ProducerConfig, &str)> = vec![
            (ProducerConfig::new("", ok.clusters.clone()), "group"),
            (ProducerConfig::new("g", vec![]), "clusters"),
            (
                ProducerConfig::new("g", vec![ClusterConfig::new("", vec![addr()])]),
                "clusters[0].idc",
            ),
            (
                ProducerConfig::new("g", vec![ClusterConfig::new("bj-a", vec![])]),
                "clusters[0].name_servers",
            ),
            (
                ProducerConfig::new(
                    "g",
                    vec![
                        ClusterConfig::new("bj-a", vec![addr()]),
                        ClusterConfig::new("bj-a", vec![addr()]),
                    ],
                ),
                "clusters[1].idc",
            ),
            (
                ok.clone().attempt_timeout(Duration::ZERO),
                "attempt_timeout",
            ),
            (
                ok.clone().deadline(Duration::from_secs(100 * 24 * 3600)),
                "deadline",
            ),
            (
                ok.clone()
                    .avoid(Duration::from_secs(2), Duration::from_secs(1)),
                "min_avoid",
            ),
            (ok.clone().max_message_bytes(0), "max_message_bytes"),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
        }
    }

    #[test]
    fn bad_messages_are_refused_before_sending() {
        let max = 10;
        let m = |t: &str| OutgoingMessage::new(t, Bytes::from_static(b"x"));
        assert!(validate_message(&m("members"), max).is_ok());
        for (msg, want) in [
            (m(""), "empty topic"),
            (m(&"t".repeat(128)), "at most 127"),
            (m("a b"), "' '"),
            (m("members").key(""), "empty key"),
            (m("members").key("a b"), "whitespace"),
        ] {
            match validate_message(&msg, max) {
                Err(MqError::InvalidMessage { why }) => assert!(why.contains(want), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        let big = OutgoingMessage::new("members", vec![0u8; 11]);
        assert!(matches!(
            validate_message(&big, max),
            Err(MqError::TooLarge { size: 11, max: 10 })
        ));
    }

    /// `SpoolGrowing` is published at 1, 2, 4, 8, ... records, and between powers of two at
    /// most every 10 s while the spool grows (paused time).
    #[tokio::test(start_paused = true)]
    async fn spool_growth_is_reported_at_powers_of_two_or_every_10_s() {
        let mut g = SpoolGrowth::default();
        let mut reported = Vec::new();
        for n in 1..=100 {
            if g.observe(n, Instant::now()) {
                reported.push(n);
            }
        }
        assert_eq!(reported, [1, 2, 4, 8, 16, 32, 64]);
        // A jump past a power of two is reported.
        assert!(g.observe(130, Instant::now()));
        // Growing slowly: the next report 10 s after the last one, not before.
        tokio::time::advance(SPOOL_REPORT_EVERY - Duration::from_millis(1)).await;
        assert!(!g.observe(131, Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(g.observe(132, Instant::now()));
        // Shrinking (replay) or standing still is not reported, however long.
        tokio::time::advance(SPOOL_REPORT_EVERY * 3).await;
        assert!(!g.observe(132, Instant::now()));
        assert!(!g.observe(50, Instant::now()));
    }

    #[test]
    fn generated_keys_are_unique_and_valid() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 32);
        let msg = OutgoingMessage::new("t", Bytes::new()).key(a);
        assert!(validate_message(&msg, 1).is_ok());
    }
}
