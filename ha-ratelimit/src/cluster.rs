//! A cluster-wide limit kept in Redis (feature `redis`), with the local [`Limiter`] as the
//! fallback.
//!
//! Every instance of a service shares one bucket per (line, key) in Redis. One Lua script runs
//! nginx's `limit_req` arithmetic over all lines of a request at once, on Redis's clock (every
//! instance sees the same time): the same integer units, look-up-then-commit across lines, the
//! largest hold, and an exact `retry_after` as the local limiter. A bucket expires in Redis when
//! it is empty, so Redis only holds keys with state.
//!
//! **Redis trouble never blocks a request.** Each call to Redis is bounded by
//! [`timeout`](ClusterLimiterBuilder::timeout) (default 50 ms). When it fails or times out,
//! the request is decided by the fallback limiter, and so is every request after it until
//! [`retry_after`](ClusterLimiterBuilder::retry_after) (default 1 s) has passed; then one
//! request tries Redis again while the others keep using the fallback. A failure is a
//! `cluster_unavailable` alert (debounced like every alert), a `tracing` warning and the metric
//! `ha_ratelimit_cluster_unavailable_total{reason}`; every decision counts in
//! `ha_ratelimit_cluster_checks_total{source="cluster"|"fallback"}`.
//!
//! **The fallback** is, unless given, the same lines with every fixed rate divided by
//! [`instances`](ClusterLimiterBuilder::instances) (share lines: the IDC share divided by the
//! instances, exactly as a local [`Limiter`] with that many instances), the bursts unchanged: the
//! instances together keep close to the cluster's rate while Redis is away. Cluster-wide, a
//! share line's rate is the IDC's whole share (`capacity × fraction`).
//!
//! The connection is anything that speaks `redis::aio::ConnectionLike` and is cheap to clone:
//! [`ClusterLimiter::connect`] makes a lazily connecting, reconnecting `ConnectionManager`
//! (nothing is sent at start, so a Redis that is down at start-up is a fallback, not an error);
//! ha-redis's Sentinel-following master handle will plug in the same way. Redis Cluster is not
//! supported (the keys of one request may live in different slots).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ha_ratelimit::cluster::ClusterLimiter;
//! use ha_ratelimit::{Key, LimitConfig, Rate, RateLimitConfig};
//!
//! // 100 renewals per minute per member across the whole service, 4 instances.
//! let cfg = RateLimitConfig::with_limits(vec![
//!     LimitConfig::new("renewals", "member", Rate::per_minute(100)).burst(10).nodelay(),
//! ]);
//! let limiter = ClusterLimiter::connect("redis://127.0.0.1:6379/", cfg)?
//!     .prefix("membership:rl:")
//!     .instances(4)
//!     .build()?;
//! let decision = limiter.check_with(|_| Key::u64(42)).await;
//! # let _ = decision;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;
use ha_core::{BoxError, EventBus, Topology, TopologyEvent};
use metrics::Counter;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use tower_layer::Layer;
use tower_service::Service;

pub use redis;

use crate::alert::{Alert, AlertHook, AlertKind, Debounce};
use crate::clock::DefaultClock;
use crate::config::{ConfigError, RateLimitConfig};
use crate::key::Key;
use crate::layer::{KeyFn, Rejected};
use crate::limiter::{Decision, Limiter, Plan};
use crate::rate::Rate;

/// The Lua script: nginx's arithmetic over every line of a request, in one atomic step (published
/// so that it can be audited, or run by hand with `EVAL`).
pub const SCRIPT: &str = include_str!("cluster.lua");

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis: the buckets shared by every instance.
    Cluster,
    /// The local fallback limiter: Redis failed or timed out, or is skipped while it recovers.
    Fallback,
}

/// A limit shared by every instance of a service, kept in Redis, with a local [`Limiter`] that
/// decides whenever Redis does not answer in time. See the [module docs](self).
pub struct ClusterLimiter<R = ConnectionManager, C: Clock = DefaultClock> {
    conn: R,
    script: redis::Script,
    /// The cluster-wide lines. Only its plan is used (names, key sources, parameters, rejection
    /// metrics and alerts); its key tables stay empty, so it is built with a cap of one key.
    spec: Limiter,
    fallback: Arc<Limiter<C>>,
    /// `Some(the configuration and the instances it was derived for)` when the fallback was
    /// derived (and is re-derived on reload and on a new instance count).
    derived: Option<parking_lot::Mutex<(RateLimitConfig, u32)>>,
    prefix: Arc<str>,
    timeout: Duration,
    retry_ms: u64,
    origin: tokio::time::Instant,
    /// 0 while Redis answers; else the time (ms since `origin`, at least 1) from which one
    /// request may try it again.
    next_try_ms: AtomicU64,
    unavailable: Debounce,
    on_alert: Option<AlertHook>,
    events: Option<EventBus>,
    /// How many instances share the cluster-wide lines (the builder's, then `set_instances`):
    /// a share line's load on this instance is compared with its even part of the share.
    instances: AtomicU32,
    checks_cluster: Counter,
    checks_fallback: Counter,
    unavailable_error: Counter,
    unavailable_timeout: Counter,
    alerts_total: Counter,
}

impl<R, C: Clock> std::fmt::Debug for ClusterLimiter<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("prefix", &self.prefix)
            .field("lines", &self.spec)
            .field("fallback", &self.fallback)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Builds a [`ClusterLimiter`].
#[must_use]
pub struct ClusterLimiterBuilder<R, C: Clock = DefaultClock> {
    conn: R,
    config: RateLimitConfig,
    topology: Option<Topology>,
    instances: u32,
    fallback: Option<Arc<Limiter<C>>>,
    prefix: String,
    timeout: Duration,
    retry_after: Duration,
    on_alert: Option<AlertHook>,
    events: Option<EventBus>,
    keys: Option<Vec<String>>,
}

impl<R, C: Clock> std::fmt::Debug for ClusterLimiterBuilder<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiterBuilder")
            .field("limits", &self.config.limits.len())
            .field("prefix", &self.prefix)
            .field("instances", &self.instances)
            .field("timeout", &self.timeout)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl ClusterLimiter<ConnectionManager> {
    /// Starts building a cluster limiter on a lazily connecting, reconnecting Redis connection
    /// to `url` (`redis://[:password@]host:port/[db]`). Nothing is sent until the first check.
    ///
    /// Must be called inside a tokio runtime (the connection's reconnect task is spawned here);
    /// outside one, and for a malformed URL, it returns an error naming the problem.
    pub fn connect(
        url: &str,
        config: RateLimitConfig,
    ) -> Result<ClusterLimiterBuilder<ConnectionManager>, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::new(
                "redis",
                url,
                "ClusterLimiter::connect must be called inside a tokio runtime",
            ));
        }
        let client = redis::Client::open(url)
            .map_err(|e| ConfigError::new("redis", url, format!("not a Redis URL: {e}")))?;
        // Few, short reconnect attempts: the limiter's own retry interval paces the rest, and
        // every call is bounded by the limiter's timeout anyway.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| ConfigError::new("redis", url, e.to_string()))?;
        Ok(ClusterLimiter::builder(conn, config))
    }
}

impl<R> ClusterLimiter<R>
where
    R: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Starts building a cluster limiter on `conn` (a `ConnectionManager`, a
    /// `MultiplexedConnection`, or any cheap-to-clone `ConnectionLike`).
    pub fn builder(conn: R, config: RateLimitConfig) -> ClusterLimiterBuilder<R> {
        ClusterLimiterBuilder {
            conn,
            config,
            topology: None,
            instances: 1,
            fallback: None,
            prefix: "ha-ratelimit:".to_string(),
            timeout: Duration::from_millis(50),
            retry_after: Duration::from_secs(1),
            on_alert: None,
            events: None,
            keys: None,
        }
    }
}

impl<R, C: Clock> ClusterLimiterBuilder<R, C> {
    /// The topology share lines take IDC capacities from.
    pub fn topology(mut self, topology: &Topology) -> Self {
        self.topology = Some(topology.clone());
        self
    }

    /// How many instances share the cluster-wide limits (default 1); the derived fallback
    /// divides each rate by it.
    pub fn instances(mut self, instances: u32) -> Self {
        self.instances = instances;
        self
    }

    /// The prefix of every Redis key (default `"ha-ratelimit:"`); a bucket's key is
    /// `{prefix}{limit name}:{request key bytes}`. Give each service its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a check waits for Redis before the fallback decides (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// After a failure, how long the fallback decides before Redis is tried again (default 1 s).
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Called on every emitted (debounced) alert of the cluster limiter (the cluster lines'
    /// `rejected` and `near_capacity`, `cluster_unavailable`) and of a derived fallback.
    pub fn on_alert(mut self, hook: impl Fn(&Alert) + Send + Sync + 'static) -> Self {
        self.on_alert = Some(Arc::new(hook));
        self
    }

    /// Publishes the same alerts on ha-core's event bus as
    /// [`TopologyEvent::RateLimitAlert`] (a fallback
    /// of your own publishes where its own builder says).
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// The key names the key function answers (as [`LimiterBuilder::keys`](crate::LimiterBuilder::keys)):
    /// a cluster or derived fallback line whose `key` is not one of them is an error at build
    /// and reload, naming the limit and the key.
    pub fn keys<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.keys = Some(names.into_iter().map(|n| n.as_ref().to_string()).collect());
        self
    }

    /// A fallback of your own instead of the derived one (its lines may differ; its key
    /// function is the same).
    pub fn fallback<C2: Clock>(self, fallback: Arc<Limiter<C2>>) -> ClusterLimiterBuilder<R, C2> {
        ClusterLimiterBuilder {
            conn: self.conn,
            config: self.config,
            topology: self.topology,
            instances: self.instances,
            fallback: Some(fallback),
            prefix: self.prefix,
            timeout: self.timeout,
            retry_after: self.retry_after,
            on_alert: self.on_alert,
            events: self.events,
            keys: self.keys,
        }
    }
}

impl<R, C> ClusterLimiterBuilder<R, C>
where
    R: ConnectionLike + Clone + Send + Sync + 'static,
    C: Clock + Default,
{
    /// Validates the configuration, derives the cluster-wide rates and, unless one was given,
    /// the fallback.
    pub fn build(self) -> Result<ClusterLimiter<R, C>, ConfigError> {
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "0s", "must be positive"));
        }
        if self.retry_after.is_zero() {
            return Err(ConfigError::new("retry_after", "0s", "must be positive"));
        }
        if self.instances == 0 {
            return Err(ConfigError::new("instances", 0, "must be at least 1"));
        }
        let keys = self.keys.as_deref();
        let alerts = Sinks {
            hook: self.on_alert.clone(),
            events: self.events.clone(),
        };
        let spec = build_spec(&self.config, self.topology.as_ref(), keys, &alerts)?;
        let (fallback, derived) = match self.fallback {
            Some(f) => (f, None),
            None => {
                let f = build_fallback(
                    &self.config,
                    self.topology.as_ref(),
                    self.instances,
                    &alerts,
                    keys,
                )?;
                (
                    Arc::new(f),
                    Some(parking_lot::Mutex::new((
                        self.config.clone(),
                        self.instances,
                    ))),
                )
            }
        };
        let prefix: Arc<str> = self.prefix.into();
        let label = prefix.to_string();
        Ok(ClusterLimiter {
            conn: self.conn,
            script: redis::Script::new(SCRIPT),
            spec,
            fallback,
            derived,
            timeout: self.timeout,
            retry_ms: self.retry_after.as_millis().try_into().unwrap_or(u64::MAX),
            origin: tokio::time::Instant::now(),
            next_try_ms: AtomicU64::new(0),
            unavailable: Debounce::default(),
            on_alert: self.on_alert,
            events: self.events,
            instances: AtomicU32::new(self.instances),
            checks_cluster: metrics::counter!("ha_ratelimit_cluster_checks_total", "prefix" => label.clone(), "source" => "cluster"),
            checks_fallback: metrics::counter!("ha_ratelimit_cluster_checks_total", "prefix" => label.clone(), "source" => "fallback"),
            unavailable_error: metrics::counter!("ha_ratelimit_cluster_unavailable_total", "prefix" => label.clone(), "reason" => "error"),
            unavailable_timeout: metrics::counter!("ha_ratelimit_cluster_unavailable_total", "prefix" => label.clone(), "reason" => "timeout"),
            alerts_total: metrics::counter!("ha_ratelimit_alerts_total", "limit" => label, "kind" => AlertKind::ClusterUnavailable.as_str()),
            prefix,
        })
    }
}

/// The cluster-wide lines: the configuration with shares taken whole (one instance) and a key
/// table of one key (it is never used).
fn build_spec(
    config: &RateLimitConfig,
    topology: Option<&Topology>,
    keys: Option<&[String]>,
    alerts: &Sinks,
) -> Result<Limiter, ConfigError> {
    let mut spec = config.clone();
    spec.max_keys = 1;
    let mut b = alerts.on(Limiter::builder(spec).instances(1));
    if let Some(t) = topology {
        b = b.topology(t);
    }
    if let Some(keys) = keys {
        b = b.keys(keys);
    }
    b.build()
}

/// The configuration a derived fallback applies: every fixed rate divided by `instances`
/// (truncated to whole milli-requests per second, at least 1), bursts unchanged.
pub fn fallback_config(config: &RateLimitConfig, instances: u32) -> RateLimitConfig {
    let mut cfg = config.clone();
    let n = u64::from(instances.max(1));
    for line in &mut cfg.limits {
        if let Some(rate) = line.rate {
            line.rate = Rate::from_milli_per_sec((rate.milli_per_sec() / n).max(1));
        }
    }
    cfg
}

fn build_fallback<C: Clock + Default>(
    config: &RateLimitConfig,
    topology: Option<&Topology>,
    instances: u32,
    alerts: &Sinks,
    keys: Option<&[String]>,
) -> Result<Limiter<C>, ConfigError> {
    let b = Limiter::builder(fallback_config(config, instances))
        .instances(instances)
        .clock(C::default());
    let mut b = alerts.on(b);
    if let Some(t) = topology {
        b = b.topology(t);
    }
    if let Some(keys) = keys {
        b = b.keys(keys);
    }
    b.build()
}

/// Where the cluster limiter's alerts go, handed on to the limiters it builds.
struct Sinks {
    hook: Option<AlertHook>,
    events: Option<EventBus>,
}

impl Sinks {
    fn on<C: Clock>(&self, mut b: crate::LimiterBuilder<C>) -> crate::LimiterBuilder<C> {
        if let Some(hook) = self.hook.clone() {
            b = b.on_alert(move |a| hook(a));
        }
        if let Some(bus) = self.events.clone() {
            b = b.events(bus);
        }
        b
    }
}

/// A request's keys, copied out of the request before anything is awaited: one per key source
/// that the cluster's or the fallback's lines ask for.
pub(crate) struct Prepared {
    plan: Arc<Plan>,
    keys: Vec<(Arc<str>, Vec<u8>)>,
}

impl Prepared {
    fn key(&self, source: &str) -> Key<'_> {
        self.keys
            .iter()
            .find(|(s, _)| &**s == source)
            .map_or(Key::NONE, |(_, k)| Key::bytes(k))
    }
}

impl<R, C> ClusterLimiter<R, C>
where
    R: ConnectionLike + Clone + Send + Sync + 'static,
    C: Clock,
{
    /// Checks a request whose key is the same for every line.
    pub fn check(&self, key: Key<'_>) -> impl Future<Output = Decision> + Send + '_
    where
        C: Send + Sync,
        C::Instant: Send + Sync,
    {
        self.check_with(move |_| key)
    }

    /// Checks a request against the cluster-wide limits: `key_of` is called (before anything
    /// is awaited) with each line's `key` setting and returns the request's key for it, as
    /// for [`Limiter::check_with`].
    pub fn check_with<'k>(
        &self,
        key_of: impl FnMut(&str) -> Key<'k>,
    ) -> impl Future<Output = Decision> + Send + '_
    where
        C: Send + Sync,
        C::Instant: Send + Sync,
    {
        let prepared = self.prepare(key_of);
        async move { self.decide(prepared, None).await.0 }
    }

    /// [`check_with`](Self::check_with), also saying whether Redis or the fallback decided.
    pub fn check_with_source<'k>(
        &self,
        key_of: impl FnMut(&str) -> Key<'k>,
    ) -> impl Future<Output = (Decision, Source)> + Send + '_
    where
        C: Send + Sync,
        C::Instant: Send + Sync,
    {
        let prepared = self.prepare(key_of);
        self.decide(prepared, None)
    }

    /// The local fallback limiter (e.g. to reload a fallback of your own).
    pub fn fallback(&self) -> &Arc<Limiter<C>> {
        &self.fallback
    }

    /// A cluster-wide limit's rate (for share lines, the IDC's whole share).
    pub fn rate(&self, limit: &str) -> Option<Rate> {
        self.spec.rate(limit)
    }

    /// True while Redis is being skipped after a failure (the fallback decides).
    pub fn is_degraded(&self) -> bool {
        self.next_try_ms.load(Ordering::Relaxed) != 0
    }

    /// Replaces the configuration at run time; a derived fallback is re-derived (keeping its
    /// keys' state by limit name). On error nothing changes.
    pub fn reload(&self, config: RateLimitConfig) -> Result<(), ConfigError> {
        let mut spec_cfg = config.clone();
        spec_cfg.max_keys = 1;
        let old_spec = self.spec.config();
        self.spec.reload(spec_cfg)?;
        if let Some(derived) = &self.derived {
            let mut derived = derived.lock();
            if let Err(e) = self.fallback.reload(fallback_config(&config, derived.1)) {
                // Put the cluster lines back: they were in force a moment ago, so this cannot
                // fail on the configuration (and if it did, the new lines would stay).
                let _ = self.spec.reload(old_spec);
                return Err(e);
            }
            derived.0 = config;
        }
        Ok(())
    }

    /// A new number of instances sharing the cluster-wide limits: the derived fallback's rates
    /// are divided by it from now on (keeping its keys' state). A fallback of your own is
    /// yours to adjust: then this is an error that says so. On error nothing changes.
    pub fn set_instances(&self, instances: u32) -> Result<(), ConfigError> {
        let Some(derived) = &self.derived else {
            return Err(ConfigError::new(
                "instances",
                instances,
                "the fallback was given to the builder, not derived: set its instances on it",
            ));
        };
        if instances == 0 {
            return Err(ConfigError::new("instances", 0, "must be at least 1"));
        }
        let mut derived = derived.lock();
        let (config, old) = (derived.0.clone(), derived.1);
        // Shares first (they can refuse an instance count that leaves too small a rate), then
        // the fixed rates, which cannot fail.
        self.fallback.set_instances(instances)?;
        if let Err(e) = self.fallback.reload(fallback_config(&config, instances)) {
            let _ = self.fallback.set_instances(old);
            return Err(e);
        }
        derived.1 = instances;
        self.instances.store(instances, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn prepare<'k>(&self, mut key_of: impl FnMut(&str) -> Key<'k>) -> Prepared {
        match self.try_prepare(|source| Ok::<_, std::convert::Infallible>(key_of(source))) {
            Ok(prepared) => prepared,
            Err(never) => match never {},
        }
    }

    /// [`prepare`](Self::prepare) with a key function that may fail.
    pub(crate) fn try_prepare<'k, E>(
        &self,
        mut key_of: impl FnMut(&str) -> Result<Key<'k>, E>,
    ) -> Result<Prepared, E> {
        let plan = self.spec.plan();
        let fallback = self.fallback.plan();
        let mut keys: Vec<(Arc<str>, Vec<u8>)> = Vec::with_capacity(plan.lines.len());
        for line in plan.lines.iter().chain(fallback.lines.iter()) {
            if keys.iter().any(|(s, _)| *s == line.key) {
                continue;
            }
            let key = key_of(&line.key)?;
            keys.push((line.key.clone(), key.as_bytes().to_vec()));
        }
        Ok(Prepared { plan, keys })
    }

    /// The HTTP status the cluster-wide lines' rejections are answered with (the
    /// configuration's `status`).
    pub fn status(&self) -> u16 {
        self.spec.status()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Whether this request may ask Redis: always while it answers; after a failure, one
    /// request per `retry_after`.
    fn may_try(&self) -> bool {
        let next = self.next_try_ms.load(Ordering::Relaxed);
        if next == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= next
            && self
                .next_try_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.retry_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Decides in Redis (on its clock, or at `at` ms for the tests), else in the fallback.
    pub(crate) async fn decide(&self, prepared: Prepared, at: Option<u64>) -> (Decision, Source)
    where
        C: Send + Sync,
        C::Instant: Send + Sync,
    {
        let plan = &prepared.plan;
        // Rule 10: an empty key skips the line.
        let active: Vec<usize> = (0..plan.lines.len())
            .filter(|&i| !prepared.key(&plan.lines[i].key).is_skip())
            .collect();
        if active.is_empty() {
            self.checks_cluster.increment(1);
            return (Decision::Allow, Source::Cluster);
        }
        // While Redis is skipped, nothing is built for it.
        if !self.may_try() {
            return self.fall_back(&prepared);
        }
        let mut invocation = self.script.prepare_invoke();
        for &i in &active {
            let line = &plan.lines[i];
            let key = prepared.key(&line.key);
            let bytes = key.as_bytes();
            let mut k = Vec::with_capacity(self.prefix.len() + line.name.len() + 1 + bytes.len());
            k.extend_from_slice(self.prefix.as_bytes());
            k.extend_from_slice(line.name.as_bytes());
            k.push(b':');
            k.extend_from_slice(bytes);
            let delay: i64 = if line.params.delay_m == u64::MAX {
                -1
            } else {
                i64::try_from(line.params.delay_m).unwrap_or(i64::MAX)
            };
            invocation
                .key(k)
                .arg(line.params.rate_m)
                .arg(line.params.burst_m)
                .arg(delay);
        }
        if let Some(at) = at {
            invocation.arg(at);
        }
        let mut conn = self.conn.clone();
        let reply =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut conn))
                .await;
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                self.unavailable_error.increment(1);
                self.failed(&format!("redis error: {e}"));
                return self.fall_back(&prepared);
            }
            Err(_) => {
                self.unavailable_timeout.increment(1);
                self.failed(&format!("no answer within {:?}", self.timeout));
                return self.fall_back(&prepared);
            }
        };
        let decision = match reply.as_slice() {
            [1, hold] => {
                // Share lines measure their load as local lines do (near_capacity).
                let instances = self.instances.load(Ordering::Relaxed);
                for &i in &active {
                    self.spec.note_admitted(&plan.lines[i], plan, instances);
                }
                let hold = u64::try_from(*hold).unwrap_or(0);
                if hold == 0 || plan.dry_run {
                    Decision::Allow
                } else {
                    Decision::Delay(Duration::from_millis(hold))
                }
            }
            [0, line, wait] => {
                let by = usize::try_from(*line)
                    .ok()
                    .and_then(|l| l.checked_sub(1))
                    .and_then(|l| active.get(l))
                    .and_then(|&i| plan.lines.get(i));
                if let Some(line) = by {
                    self.spec.note_rejected(line, plan);
                }
                if plan.dry_run {
                    Decision::Allow
                } else {
                    Decision::Reject {
                        retry_after: Duration::from_millis(u64::try_from(*wait).unwrap_or(1)),
                    }
                }
            }
            other => {
                self.unavailable_error.increment(1);
                self.failed(&format!("unexpected script reply {other:?}"));
                return self.fall_back(&prepared);
            }
        };
        if self.next_try_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(
                prefix = &*self.prefix,
                "cluster rate limit: Redis answers again"
            );
        }
        self.checks_cluster.increment(1);
        (decision, Source::Cluster)
    }

    fn fall_back(&self, prepared: &Prepared) -> (Decision, Source) {
        self.checks_fallback.increment(1);
        let decision = self.fallback.check_with(|source| prepared.key(source));
        (decision, Source::Fallback)
    }

    #[cold]
    fn failed(&self, why: &str) {
        let now = self.now_ms();
        self.next_try_ms
            .store(now.saturating_add(self.retry_ms), Ordering::Relaxed);
        let interval = self.spec.alert_interval_ms();
        if let Some(suppressed) = self.unavailable.fire(now, interval) {
            tracing::warn!(
                prefix = &*self.prefix,
                kind = "cluster_unavailable",
                suppressed,
                error = why,
                retry_after_ms = self.retry_ms,
                "cluster rate limit: Redis unavailable, the local fallback decides"
            );
            self.alerts_total.increment(1);
            if let Some(bus) = &self.events {
                bus.publish(TopologyEvent::rate_limit_alert(
                    self.prefix.clone(),
                    AlertKind::ClusterUnavailable.as_str(),
                    suppressed,
                    format!("Redis unavailable ({why}): the local fallback decides"),
                ));
            }
            if let Some(hook) = &self.on_alert {
                hook(&Alert {
                    limit: self.prefix.clone(),
                    kind: AlertKind::ClusterUnavailable,
                    suppressed,
                    load: None,
                });
            }
        }
    }
}

// === tower ===

/// Applies a [`ClusterLimiter`] to a service: a `Clone` tower layer, like
/// [`RateLimitLayer`](crate::RateLimitLayer) but deciding in Redis (an await per request).
pub struct ClusterRateLimitLayer<K, R = ConnectionManager, C: Clock = DefaultClock> {
    limiter: Arc<ClusterLimiter<R, C>>,
    keys: Arc<K>,
}

impl<K, R, C: Clock> ClusterRateLimitLayer<K, R, C> {
    /// A layer checking every request with `limiter`, keys from `keys`.
    pub fn new(limiter: Arc<ClusterLimiter<R, C>>, keys: K) -> Self {
        ClusterRateLimitLayer {
            limiter,
            keys: Arc::new(keys),
        }
    }
}

impl<K, R, C: Clock> Clone for ClusterRateLimitLayer<K, R, C> {
    fn clone(&self) -> Self {
        ClusterRateLimitLayer {
            limiter: self.limiter.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<S, K, R, C: Clock> Layer<S> for ClusterRateLimitLayer<K, R, C> {
    type Service = ClusterRateLimit<S, K, R, C>;

    fn layer(&self, inner: S) -> Self::Service {
        ClusterRateLimit {
            inner,
            limiter: self.limiter.clone(),
            keys: self.keys.clone(),
        }
    }
}

/// A service behind a [`ClusterLimiter`]. `Clone` and cheap to clone.
pub struct ClusterRateLimit<S, K, R = ConnectionManager, C: Clock = DefaultClock> {
    inner: S,
    limiter: Arc<ClusterLimiter<R, C>>,
    keys: Arc<K>,
}

impl<S: Clone, K, R, C: Clock> Clone for ClusterRateLimit<S, K, R, C> {
    fn clone(&self) -> Self {
        ClusterRateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<S, K, R, C, Req> Service<Req> for ClusterRateLimit<S, K, R, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    K: KeyFn<Req>,
    R: ConnectionLike + Clone + Send + Sync + 'static,
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The keys are copied out of the request now, so nothing borrows it across the await.
        let keys = &self.keys;
        let prepared = match self
            .limiter
            .try_prepare(|source| keys.try_key(source, &req))
        {
            Ok(prepared) => prepared,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        let limiter = self.limiter.clone();
        // The instance that was polled ready goes into the future; a clone takes its place.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match limiter.decide(prepared, None).await.0 {
                Decision::Allow => ready.call(req).await.map_err(Into::into),
                Decision::Delay(hold) => {
                    tokio::time::sleep(hold).await;
                    ready.call(req).await.map_err(Into::into)
                }
                Decision::Reject { retry_after } => {
                    Err(Rejected::new(retry_after, limiter.status()).into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::LimitConfig;
    use governor::clock::FakeRelativeClock;
    use ha_lab::process::{ServerSpec, Supervisor};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// A line: (rate per second or per minute, burst, mode: nodelay / delay=burst/2 / all held).
    fn line() -> impl Strategy<Value = (u64, bool, u64, u8)> {
        (1u64..30, any::<bool>(), 0u64..6, 0u8..3)
    }

    fn config(lines: &[(u64, bool, u64, u8)]) -> RateLimitConfig {
        let limits = lines
            .iter()
            .enumerate()
            .map(|(i, &(n, per_min, burst, mode))| {
                let rate = if per_min {
                    Rate::per_minute(n * 20)
                } else {
                    Rate::per_second(n)
                };
                let key = if i == 0 { "k" } else { "s" };
                let l = LimitConfig::new(format!("l{i}"), key, rate).burst(burst);
                match mode {
                    0 => l.nodelay(),
                    1 => l.delay(burst / 2),
                    _ => l,
                }
            })
            .collect();
        RateLimitConfig::with_limits(limits)
    }

    /// The Lua script and zone.rs decide the same, request by request, retry_after and holds
    /// included, on one or two lines (a per-key line and a server-wide one), given the same
    /// request times: the script gets the time as an argument instead of Redis's clock.
    #[test]
    fn the_script_decides_exactly_like_the_local_limiter() {
        assert!(
            ha_lab::process::find_program("redis-server").is_some(),
            "redis-server is not installed (Debian package redis-server; scripts/setup installs it)"
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(dir.path());
        let addr: std::net::SocketAddr = "127.0.1.39:16409".parse().unwrap();
        let spec = ServerSpec::redis("redis", addr, dir.path());
        let conn = rt.block_on(async {
            sup.start(spec).await.unwrap();
            redis::Client::open(format!("redis://{addr}/"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        });

        let case = AtomicU64::new(0);
        let strategy = (
            prop::collection::vec(line(), 1..=2),
            prop::collection::vec(
                (prop_oneof![Just(0u64), 0u64..50, 0u64..1500], 0u8..3),
                1..80,
            ),
        );
        let mut runner = TestRunner::new(Config {
            cases: 128,
            ..Config::default()
        });
        runner
            .run(&strategy, |(lines, reqs)| {
                let case = case.fetch_add(1, Ordering::Relaxed);
                let cfg = config(&lines);
                let clock = FakeRelativeClock::default();
                let local = Limiter::builder(cfg.clone())
                    .clock(clock.clone())
                    .build()
                    .unwrap();
                let _guard = rt.enter();
                let cluster = ClusterLimiter::builder(conn.clone(), cfg)
                    .prefix(format!("case{case}:"))
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let base = 1_700_000_000_000u64;
                let mut t = 0;
                for (i, &(gap, k)) in reqs.iter().enumerate() {
                    clock.advance(Duration::from_millis(gap));
                    t += gap;
                    let key_of = |src: &str| match src {
                        "k" => Key::u64(u64::from(k)),
                        _ => Key::global(),
                    };
                    let want = local.check_with(key_of);
                    let got = rt.block_on(cluster.decide(cluster.prepare(key_of), Some(base + t)));
                    prop_assert_eq!(got, (want, Source::Cluster), "request {} at {} ms", i, t);
                }
                Ok(())
            })
            .unwrap();
    }
}
