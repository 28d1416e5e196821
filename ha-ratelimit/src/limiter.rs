//! The limiter: every line of a request looked up, then all charged with one `now`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, Reference};
use ha_core::{EventBus, Topology, TopologyEvent};
use metrics::{Counter, Gauge};

use crate::alert::{Alert, AlertHook, AlertKind, Debounce, LoadWindow};
use crate::clock::DefaultClock;
use crate::config::{ConfigError, LineSpec, MAX_LINES, RateLimitConfig, RateSource, validate};
use crate::key::Key;
use crate::rate::Rate;
use crate::zone::{Evicted, Ident, Locked, Look, Params, Zone, judge};

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Pass it now.
    Allow,
    /// Pass it after holding it this long (nginx's delayed excess request).
    Delay(Duration),
    /// Refuse it; the same request would be admitted after `retry_after`.
    Reject {
        /// The time until the same request would be admitted.
        retry_after: Duration,
    },
}

impl Decision {
    /// True for [`Decision::Reject`].
    pub fn is_reject(&self) -> bool {
        matches!(self, Decision::Reject { .. })
    }

    /// True for [`Decision::Allow`] and [`Decision::Delay`].
    pub fn is_admitted(&self) -> bool {
        !self.is_reject()
    }
}

/// A decision packed in one word (the kind in the top two bits, whole ms below), the way the
/// check returns it internally: a `Decision` (24 bytes) returned through the plan cache's
/// closures by memory and copied with wider loads than its fields were stored with stalled
/// store forwarding, ~8 ns of a ~35 ns check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict(u64);

impl Verdict {
    const DELAY: u64 = 1 << 62;
    const REJECT: u64 = 2 << 62;
    const MS: u64 = (1 << 62) - 1;
    pub(crate) const ALLOW: Verdict = Verdict(0);

    #[inline]
    fn delay(ms: u64) -> Verdict {
        Verdict(Self::DELAY | ms.min(Self::MS))
    }

    #[inline]
    fn reject(ms: u64) -> Verdict {
        Verdict(Self::REJECT | ms.min(Self::MS))
    }

    #[inline]
    pub(crate) fn decision(self) -> Decision {
        let ms = Duration::from_millis(self.0 & Self::MS);
        match self.0 & !Self::MS {
            Self::DELAY => Decision::Delay(ms),
            Self::REJECT => Decision::Reject { retry_after: ms },
            _ => Decision::Allow,
        }
    }
}

// === state kept across reloads ===

/// Everything of one limit that survives a reload: its keys, alert debouncers, metrics.
struct LineState {
    zone: Zone,
    rejected_alert: Debounce,
    near_alert: Debounce,
    evicted_alert: Debounce,
    load: LoadWindow,
    rejected_total: Counter,
    tracked_keys: Gauge,
    evicted_idle: Counter,
    evicted_forced: Counter,
    alerts_total: [Counter; 3],
}

impl LineState {
    fn new(name: &Arc<str>, zone: Zone) -> LineState {
        let limit = name.to_string();
        let alert = |kind: AlertKind| metrics::counter!("ha_ratelimit_alerts_total", "limit" => limit.clone(), "kind" => kind.as_str());
        LineState {
            zone,
            rejected_alert: Debounce::default(),
            near_alert: Debounce::default(),
            evicted_alert: Debounce::default(),
            load: LoadWindow::default(),
            rejected_total: metrics::counter!("ha_ratelimit_rejected_total", "limit" => limit.clone()),
            tracked_keys: metrics::gauge!("ha_ratelimit_tracked_keys", "limit" => limit.clone()),
            evicted_idle: metrics::counter!("ha_ratelimit_evicted_keys_total", "limit" => limit.clone(), "reason" => "idle"),
            evicted_forced: metrics::counter!("ha_ratelimit_evicted_keys_total", "limit" => limit.clone(), "reason" => "forced"),
            alerts_total: [
                alert(AlertKind::Rejected),
                alert(AlertKind::NearCapacity),
                alert(AlertKind::KeysEvicted),
            ],
        }
    }
}

// === the plan: what a reload swaps ===

struct ShareInfo {
    idc: Arc<str>,
    instances: u32,
}

pub(crate) struct Line {
    pub(crate) name: Arc<str>,
    pub(crate) key: Arc<str>,
    pub(crate) params: Params,
    share: Option<ShareInfo>,
    state: Arc<LineState>,
}

pub(crate) struct Plan {
    pub(crate) lines: Vec<Line>,
    pub(crate) dry_run: bool,
    pub(crate) status: u16,
    alert_interval_ms: u64,
    near_capacity: f64,
    window_ms: u64,
    sweep_every: Duration,
}

/// The inputs a plan is derived from; changed only on the (cold) reload path.
struct Inputs {
    config: RateLimitConfig,
    topology: Option<Topology>,
    capacity_overrides: BTreeMap<String, f64>,
    instances: u32,
    states: BTreeMap<Arc<str>, Arc<LineState>>,
    /// The key names the key function answers, when it said (`LimiterBuilder::keys`): each
    /// with why a line may not use it after all (`None`: it may).
    keys: Option<KnownKeys>,
}

/// Key names a key function answers; a name mapped to a reason may not be used by a line.
pub(crate) type KnownKeys = BTreeMap<Arc<str>, Option<Arc<str>>>;

/// A set of limit lines applied to every request (one nginx `location`'s `limit_req` lines),
/// with hot reload, IDC capacity shares, alerts and bounded memory.
///
/// ```
/// use ha_ratelimit::{Decision, Key, LimitConfig, Limiter, Rate, RateLimitConfig};
/// use governor::clock::FakeRelativeClock;
///
/// let cfg = RateLimitConfig::with_limits(vec![
///     LimitConfig::new("per_ip", "client_ip", Rate::per_second(10)).burst(1).nodelay(),
/// ]);
/// let limiter = Limiter::builder(cfg).clock(FakeRelativeClock::default()).build().unwrap();
/// let ip = Key::str("127.0.1.7");
/// assert_eq!(limiter.check(ip), Decision::Allow);
/// assert_eq!(limiter.check(ip), Decision::Allow); // the burst
/// assert!(limiter.check(ip).is_reject());
/// ```
pub struct Limiter<C: Clock = DefaultClock> {
    plan: ArcSwap<Plan>,
    /// This limiter in the per-thread plan caches.
    id: u64,
    /// Bumped after every new plan; [`DEAD`] once the limiter is dropped. Shared with the
    /// per-thread caches, which drop what they hold of a dead or replaced plan.
    generation: Arc<AtomicU64>,
    inputs: parking_lot::Mutex<Inputs>,
    clock: C,
    start: C::Instant,
    on_alert: Option<AlertHook>,
    events: Option<EventBus>,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = self.plan.load();
        f.debug_struct("Limiter")
            .field(
                "limits",
                &plan.lines.iter().map(|l| &*l.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Builds a [`Limiter`].
#[must_use]
pub struct LimiterBuilder<C: Clock = DefaultClock> {
    config: RateLimitConfig,
    topology: Option<Topology>,
    instances: u32,
    clock: C,
    on_alert: Option<AlertHook>,
    events: Option<EventBus>,
    keys: Option<KnownKeys>,
}

impl Limiter<DefaultClock> {
    /// Starts building a limiter for `config` ([`DefaultClock`], 1 instance, no topology).
    ///
    /// On paused tokio time, pass [`crate::TokioClock`] to [`LimiterBuilder::clock`].
    pub fn builder(config: RateLimitConfig) -> LimiterBuilder<DefaultClock> {
        LimiterBuilder {
            config,
            topology: None,
            instances: 1,
            clock: DefaultClock::default(),
            on_alert: None,
            events: None,
            keys: None,
        }
    }
}

impl<C: Clock> LimiterBuilder<C> {
    /// The topology that share limits take IDC capacities from.
    pub fn topology(mut self, topology: &Topology) -> Self {
        self.topology = Some(topology.clone());
        self
    }

    /// How many instances of this service share each IDC share (default 1).
    pub fn instances(mut self, instances: u32) -> Self {
        self.instances = instances;
        self
    }

    /// Another clock: [`crate::TokioClock`] on paused tokio time, governor's
    /// `FakeRelativeClock` to step time by hand.
    pub fn clock<C2: Clock>(self, clock: C2) -> LimiterBuilder<C2> {
        LimiterBuilder {
            config: self.config,
            topology: self.topology,
            instances: self.instances,
            clock,
            on_alert: self.on_alert,
            events: self.events,
            keys: self.keys,
        }
    }

    /// Called on every emitted (debounced) alert, besides the log line and the metric.
    pub fn on_alert(mut self, hook: impl Fn(&Alert) + Send + Sync + 'static) -> Self {
        self.on_alert = Some(Arc::new(hook));
        self
    }

    /// Publishes every emitted (debounced) alert on ha-core's event bus as
    /// [`TopologyEvent::RateLimitAlert`] (limit, kind, suppressed count and a readable detail),
    /// besides the log line, the metric and the [`on_alert`](Self::on_alert) hook.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// The key names the key function answers (e.g. [`Keys::names`](crate::Keys::names)): a
    /// line whose `key` is not one of them is then an error when the limiter is built or
    /// reloaded (naming the limit and the key), instead of a line that never applies. Not
    /// given, any key name is accepted.
    pub fn keys<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.keys = Some(
            names
                .into_iter()
                .map(|n| (Arc::from(n.as_ref()), None))
                .collect(),
        );
        self
    }

    /// The HTTP status rejected requests are answered with, 400 to 599 (the configuration's
    /// `status`, nginx's `limit_req_status`; default 429, nginx's default is 503).
    pub fn status(mut self, status: u16) -> Self {
        self.config.status = status;
        self
    }

    /// Validates the configuration and derives every rate.
    ///
    /// Metrics handles are taken here: install the `metrics` recorder first.
    pub fn build(self) -> Result<Limiter<C>, ConfigError> {
        let mut inputs = Inputs {
            config: self.config,
            topology: self.topology,
            capacity_overrides: BTreeMap::new(),
            instances: self.instances,
            states: BTreeMap::new(),
            keys: self.keys,
        };
        let plan = derive(&mut inputs)?;
        let start = self.clock.now();
        Ok(Limiter {
            plan: ArcSwap::from_pointee(plan),
            id: NEXT_LIMITER.fetch_add(1, Ordering::Relaxed),
            generation: Arc::new(AtomicU64::new(0)),
            inputs: parking_lot::Mutex::new(inputs),
            clock: self.clock,
            start,
            on_alert: self.on_alert,
            events: self.events,
        })
    }
}

/// Derives the plan from the inputs, reusing the state of every limit that keeps its name.
fn derive(inputs: &mut Inputs) -> Result<Plan, ConfigError> {
    let specs: Vec<LineSpec> = validate(&inputs.config)?;
    if inputs.instances == 0 {
        return Err(ConfigError::new("instances", 0, "must be at least 1"));
    }
    if let Some(known) = &inputs.keys {
        for (i, spec) in specs.iter().enumerate() {
            let why = match known.get(&spec.key) {
                Some(None) => continue,
                Some(Some(why)) => why.to_string(),
                None => {
                    let names: Vec<&str> = known.keys().map(|k| &**k).collect();
                    format!(
                        "no key function answers this key (it knows: {})",
                        names.join(", ")
                    )
                }
            };
            return Err(ConfigError::new(format!("limit[{i}].key"), &spec.key, why)
                .in_limit(i, &*spec.name));
        }
    }
    let mut lines = Vec::with_capacity(specs.len());
    let mut states = BTreeMap::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let (rate, share) =
            derive_rate(inputs, i, &spec).map_err(|e| e.in_limit(i, &*spec.name))?;
        let max_keys = inputs.config.max_keys;
        let state = match inputs.states.get(&spec.name) {
            // The same table layout: keep the keys' state in place.
            Some(state) if state.zone.fits(max_keys) => {
                state.zone.set_max_keys(max_keys);
                state.clone()
            }
            // A cap that needs another number of lines: a new table with the old keys (the
            // most recently seen ones, up to the new cap). A request checked while the reload
            // runs may be charged to the old table only.
            Some(state) => Arc::new(LineState::new(&spec.name, state.zone.rebuilt(max_keys))),
            None => Arc::new(LineState::new(&spec.name, Zone::new(max_keys))),
        };
        states.insert(spec.name.clone(), state.clone());
        lines.push(Line {
            name: spec.name,
            key: spec.key,
            params: Params {
                rate_m: rate.milli_per_sec(),
                burst_m: spec.burst_m,
                delay_m: spec.delay_m,
            },
            share,
            state,
        });
    }
    // Limits that left the configuration drop their keys here.
    inputs.states = states;
    let a = &inputs.config.alerts;
    Ok(Plan {
        lines,
        dry_run: inputs.config.dry_run,
        status: inputs.config.status,
        alert_interval_ms: a.interval.as_millis().try_into().unwrap_or(u64::MAX),
        near_capacity: a.near_capacity,
        window_ms: a.window.as_millis().try_into().unwrap_or(u64::MAX),
        sweep_every: inputs.config.idle_sweep,
    })
}

/// A line's rate: fixed, or derived from its IDC share.
fn derive_rate(
    inputs: &Inputs,
    i: usize,
    spec: &LineSpec,
) -> Result<(Rate, Option<ShareInfo>), ConfigError> {
    Ok(match &spec.source {
        RateSource::Fixed(rate) => (*rate, None),
        RateSource::Share(share) => {
            let field = format!("limit[{i}].share.idc");
            let capacity = match inputs.capacity_overrides.get(&share.idc) {
                Some(c) => *c,
                None => {
                    let topo = inputs.topology.as_ref().ok_or_else(|| {
                        ConfigError::new(&field, &share.idc, "a share limit needs a topology")
                    })?;
                    let idc = topo.idc(&share.idc).ok_or_else(|| {
                        ConfigError::new(&field, &share.idc, "no such IDC in the topology")
                    })?;
                    idc.capacity_rps.ok_or_else(|| {
                        ConfigError::new(&field, &share.idc, "the IDC has no capacity_rps")
                    })?
                }
            };
            let rate = share_rate(capacity, share.fraction, inputs.instances).ok_or_else(|| {
                ConfigError::new(
                    &field,
                    &share.idc,
                    format!(
                        "capacity {capacity} r/s x {} / {} instances is below 0.001 r/s",
                        share.fraction, inputs.instances
                    ),
                )
            })?;
            (
                rate,
                Some(ShareInfo {
                    idc: share.idc.as_str().into(),
                    instances: inputs.instances,
                }),
            )
        }
    })
}

/// `capacity × fraction / instances` as a [`Rate`] in whole milli-requests per second
/// (truncated, like nginx's rates); `None` when that is below 1 milli-request per second or not
/// a finite positive number.
///
/// ```
/// use ha_ratelimit::{share_rate, Rate};
/// // 80% of 2000 r/s over 4 instances: 400 r/s each.
/// assert_eq!(share_rate(2000.0, 0.8, 4), Some(Rate::per_second(400)));
/// assert_eq!(share_rate(1000.0, 0.5, 3).unwrap().milli_per_sec(), 166_666);
/// ```
pub fn share_rate(capacity_rps: f64, fraction: f64, instances: u32) -> Option<Rate> {
    if instances == 0 {
        return None;
    }
    let milli = (capacity_rps * fraction * 1000.0 / f64::from(instances)).floor();
    if !milli.is_finite() || milli < 1.0 {
        return None;
    }
    // Saturating float-to-int conversion is the intent for absurdly large capacities.
    Rate::from_milli_per_sec(milli as u64)
}

// === the per-thread plan cache ===

/// Limiter ids for the per-thread plan caches.
static NEXT_LIMITER: AtomicU64 = AtomicU64::new(1);

/// The generation of a dropped limiter.
const DEAD: u64 = u64::MAX;

/// Plans a thread keeps, of the limiters it checked last.
const PLAN_CACHE: usize = 4;

/// A plan a thread checked with, and the generation it was the plan of.
struct CachedPlan {
    limiter: u64,
    generation: u64,
    /// The limiter's generation now (`DEAD` once it is dropped).
    current: Arc<AtomicU64>,
    plan: Arc<Plan>,
}

thread_local! {
    /// Why: `ArcSwap::load` costs two atomic read-modify-writes and ~80 instructions, about 12 ns
    /// of a ~45 ns check on the bench machine. A thread keeps the plans of the last few
    /// limiters it checked and uses one while its limiter's generation (a plain atomic load)
    /// has not moved. What it holds of a replaced plan or a dropped limiter is dropped at the
    /// thread's next cache miss (or when the thread ends).
    static PLANS: RefCell<[Option<CachedPlan>; PLAN_CACHE]> =
        const { RefCell::new([const { None }; PLAN_CACHE]) };
}

impl<C: Clock> Drop for Limiter<C> {
    fn drop(&mut self) {
        self.generation.store(DEAD, Ordering::Release);
    }
}

// === impl Limiter ===

impl<C: Clock> Limiter<C> {
    /// The whole-ms clock nginx uses (rule 13): ms since the limiter was built.
    #[inline]
    fn now_ms(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64() / 1_000_000
    }

    /// Checks a request whose key is the same for every line.
    pub fn check(&self, key: Key<'_>) -> Decision {
        self.check_with(|_| key)
    }

    /// Checks a request: `key_of` is called with each line's `key` setting (e.g. `"client_ip"`)
    /// and returns the request's key for that line ([`Key::NONE`] skips the line).
    ///
    /// Every line with a key is looked up first, reading only; if all admit, all are charged
    /// with the same `now`; a rejection charges no line. The hold is the largest of the lines'.
    /// With several lines this happens under all their locks at once (taken in a fixed global
    /// order), so concurrent requests are decided exactly as nginx would decide them one after
    /// the other. For a key already tracked this does not allocate.
    pub fn check_with<'k>(&self, mut key_of: impl FnMut(&str) -> Key<'k>) -> Decision {
        match self.try_check_with(|source| Ok::<_, std::convert::Infallible>(key_of(source))) {
            Ok(decision) => decision,
            Err(never) => match never {},
        }
    }

    /// [`check_with`](Self::check_with) with a key function that may fail: its error is
    /// returned as is, before any line is looked at (nothing is charged).
    pub fn try_check_with<'k, E>(
        &self,
        mut key_of: impl FnMut(&str) -> Result<Key<'k>, E>,
    ) -> Result<Decision, E> {
        self.with_plan(|plan| {
            Ok(match plan.lines.as_slice() {
                [] => Verdict::ALLOW,
                // The common case, on a path of its own.
                [line] => self.check_one(line, key_of(&line.key)?, plan),
                _ => self.check_lines(plan, key_of)?,
            })
        })
        .map(Verdict::decision)
    }

    /// Runs `f` on the plan in force, from this thread's plan cache while the limiter's
    /// generation has not moved (no shared counter is touched), else from the `ArcSwap`.
    #[inline]
    fn with_plan<R>(&self, f: impl FnOnce(&Plan) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        // A thread tearing down its thread-locals (a check from another one's destructor).
        if PLANS.try_with(|_| ()).is_err() {
            return f(&self.plan.load());
        }
        PLANS.with(|cell| {
            // Borrowed (not copied) for the whole check: an alert hook may check another
            // limiter meanwhile, which borrows it again; only a miss needs it mutably.
            let slots = cell.try_borrow();
            let hit = slots.as_ref().ok().and_then(|slots| {
                slots
                    .iter()
                    .flatten()
                    .find(|c| c.limiter == self.id && c.generation == generation)
            });
            match hit {
                Some(cached) => f(&cached.plan),
                None => {
                    drop(slots);
                    self.plan_miss(cell, generation, f)
                }
            }
        })
    }

    /// Loads the plan and caches it for this thread (unless the cache is borrowed by a check
    /// further up this thread's stack), dropping what the cache holds of dropped limiters and
    /// replaced plans.
    #[cold]
    #[inline(never)]
    fn plan_miss<R>(
        &self,
        cell: &RefCell<[Option<CachedPlan>; PLAN_CACHE]>,
        generation: u64,
        f: impl FnOnce(&Plan) -> R,
    ) -> R {
        let plan = self.plan.load_full();
        if let Ok(mut slots) = cell.try_borrow_mut() {
            for slot in slots.iter_mut() {
                if slot.as_ref().is_some_and(|c| {
                    c.limiter == self.id || c.current.load(Ordering::Acquire) != c.generation
                }) {
                    *slot = None;
                }
            }
            // The newest first; the oldest goes when all are taken.
            slots.rotate_right(1);
            slots[0] = Some(CachedPlan {
                limiter: self.id,
                generation,
                current: self.generation.clone(),
                plan: plan.clone(),
            });
        }
        f(&plan)
    }

    /// The HTTP status rejections are answered with (the configuration's `status`).
    pub fn status(&self) -> u16 {
        self.plan.load().status
    }

    /// Several lines: look every one up, then charge them all (rule 11), under all their line
    /// locks at once, so that concurrent requests are decided exactly as in some serial order.
    #[inline(never)]
    fn check_lines<'k, E>(
        &self,
        plan: &Plan,
        mut key_of: impl FnMut(&str) -> Result<Key<'k>, E>,
    ) -> Result<Verdict, E> {
        // Fixed-size tables keep the per-request work off the heap (MAX_LINES is validated).
        let mut ids = [Ident::NONE; MAX_LINES];
        let mut active = [0usize; MAX_LINES];
        let mut m = 0;
        for (i, line) in plan.lines.iter().enumerate().take(MAX_LINES) {
            let key = key_of(&line.key)?;
            if key.is_skip() {
                // Rule 10: an empty key skips the line, neither checked nor counted.
                continue;
            }
            ids[m] = line.state.zone.ident(&key.probe());
            active[m] = i;
            m += 1;
        }
        if m == 0 {
            return Ok(Verdict::ALLOW);
        }
        let lines = &plan.lines;
        let zone = |j: usize| &lines[active[j]].state.zone;
        // Every zone has a unique id: taking the locks in id order means two requests never
        // wait for each other in a cycle, whatever their lines' order in a plan (a reload may
        // reorder them) and whichever lines they share.
        let mut order = [0usize; MAX_LINES];
        for (j, o) in order.iter_mut().enumerate().take(m) {
            *o = j;
        }
        order[..m].sort_unstable_by_key(|&j| zone(j).id());
        let mut locked: [Option<Locked<'_>>; MAX_LINES] = [const { None }; MAX_LINES];
        for &j in &order[..m] {
            locked[j] = Some(zone(j).lock(zone(j).line_of(ids[j])));
        }
        let now = self.now_ms();

        // Look-up: every line is read; none is written unless all admit.
        let mut found = [None; MAX_LINES];
        let mut excess = [0u64; MAX_LINES];
        let mut rejected_by: Option<usize> = None;
        let mut wait = 0u64;
        for j in 0..m {
            let Some(line) = &locked[j] else { continue };
            found[j] = line.find(ids[j]);
            let params = &lines[active[j]].params;
            match judge(found[j].map(|(_, s)| s), now, params) {
                Look::Pass { excess: e } => excess[j] = e,
                Look::Reject { wait_ms } => {
                    // The first line in order that rejects is the one counted; the wait is
                    // the longest, for an exact retry_after over all lines.
                    rejected_by.get_or_insert(active[j]);
                    wait = wait.max(wait_ms);
                }
            }
        }
        if let Some(by) = rejected_by {
            drop(locked);
            self.rejected(&lines[by], now, plan);
            if plan.dry_run {
                return Ok(Verdict::ALLOW);
            }
            return Ok(Verdict::reject(wait));
        }

        // Commit: charge every line at the same `now`, still under all the locks.
        let mut evicted = [Evicted::default(); MAX_LINES];
        let mut hold = 0;
        for j in 0..m {
            let Some(line) = &locked[j] else { continue };
            let l = &lines[active[j]];
            evicted[j] = zone(j).commit(line, ids[j], found[j], excess[j], now, &l.params);
            // Rule 12: the largest hold wins.
            hold = hold.max(l.params.hold_ms(excess[j]));
        }
        drop(locked);
        // Alerts and metrics only once every lock is released (an alert hook may check).
        for j in 0..m {
            let line = &lines[active[j]];
            self.note_evictions(line, evicted[j], now, plan);
            if line.share.is_some() {
                self.measure_load(line, now, plan);
            }
        }
        Ok(if hold == 0 || plan.dry_run {
            Verdict::ALLOW
        } else {
            Verdict::delay(hold)
        })
    }

    /// The common case of one line: the same rules under one lock, without the tables.
    /// Inlined into the check so that the key is read where it was built, with the loads of
    /// its words (a key copied through the stack with one 16-byte load just after it was
    /// written with two 8-byte stores stalls store forwarding, ~4 ns).
    #[inline(always)]
    fn check_one(&self, line: &Line, key: Key<'_>, plan: &Plan) -> Verdict {
        if key.is_skip() {
            return Verdict::ALLOW;
        }
        let id = line.state.zone.ident(&key.probe());
        let now = self.now_ms();
        let (look, ev) = line.state.zone.check_commit(id, now, &line.params);
        if ev.inserted {
            self.note_evictions(line, ev, now, plan);
        }
        match look {
            Look::Pass { excess } => {
                if line.share.is_some() {
                    self.measure_load(line, now, plan);
                }
                let hold = line.params.hold_ms(excess);
                if hold == 0 || plan.dry_run {
                    Verdict::ALLOW
                } else {
                    Verdict::delay(hold)
                }
            }
            Look::Reject { wait_ms } => {
                self.rejected(line, now, plan);
                if plan.dry_run {
                    Verdict::ALLOW
                } else {
                    Verdict::reject(wait_ms)
                }
            }
        }
    }

    #[cold]
    fn rejected(&self, line: &Line, now: u64, plan: &Plan) {
        line.state.rejected_total.increment(1);
        if let Some(suppressed) = line.state.rejected_alert.fire(now, plan.alert_interval_ms) {
            let rate = Rate::from_milli_per_sec(line.params.rate_m)
                .map(|r| r.to_string())
                .unwrap_or_default();
            let burst = line.params.burst_m / 1000;
            tracing::warn!(
                limit = &*line.name,
                kind = "rejected",
                suppressed,
                rate = %rate,
                burst,
                dry_run = plan.dry_run,
                "rate limit rejecting requests"
            );
            self.emit(line, AlertKind::Rejected, suppressed, None, || {
                let dry = if plan.dry_run { " (dry run)" } else { "" };
                format!("rejecting requests at rate {rate} burst {burst}{dry}")
            });
        }
    }

    #[cold]
    fn note_evictions(&self, line: &Line, ev: Evicted, now: u64, plan: &Plan) {
        if !ev.inserted {
            return;
        }
        line.state.tracked_keys.set(line.state.zone.len() as f64);
        if ev.idle > 0 {
            line.state.evicted_idle.increment(ev.idle as u64);
        }
        if ev.forced > 0 {
            line.state.evicted_forced.increment(ev.forced as u64);
            if let Some(suppressed) = line.state.evicted_alert.fire(now, plan.alert_interval_ms) {
                let tracked = line.state.zone.len();
                tracing::warn!(
                    limit = &*line.name,
                    kind = "keys_evicted",
                    suppressed,
                    tracked,
                    "rate limit key table full: dropping the least recently seen keys"
                );
                self.emit(line, AlertKind::KeysEvicted, suppressed, None, || {
                    format!(
                        "key table full ({tracked} keys tracked): dropping the least recently \
                         seen keys by force"
                    )
                });
            }
        }
    }

    fn measure_load(&self, line: &Line, now: u64, plan: &Plan) {
        self.measure_load_of(line, now, plan, 1);
    }

    /// Counts an admitted request of a share line and alerts when the line's load over the
    /// window reaches `near_capacity` of its rate. `divide` is how many instances the line's
    /// rate is for: 1 for a local line (its rate is already this instance's part of the
    /// share), the instance count for a cluster line (its rate is the IDC's whole share), so
    /// both compare this instance's load with its even part of the share.
    pub(crate) fn measure_load_of(&self, line: &Line, now: u64, plan: &Plan, divide: u32) {
        let Some(share) = &line.share else { return };
        let Some(measured) = line.state.load.record(now, plan.window_ms) else {
            return;
        };
        let divide = divide.max(1);
        let limit = line.params.rate_m as f64 / 1000.0 / f64::from(divide);
        if measured < plan.near_capacity * limit {
            return;
        }
        if let Some(suppressed) = line.state.near_alert.fire(now, plan.alert_interval_ms) {
            let instances = f64::from(share.instances.max(1)) * f64::from(divide);
            tracing::warn!(
                limit = &*line.name,
                kind = "near_capacity",
                idc = &*share.idc,
                suppressed,
                measured_rps = measured,
                limit_rps = limit,
                idc_measured_rps = measured * instances,
                idc_limit_rps = limit * instances,
                threshold = plan.near_capacity,
                "rate limit close to the IDC share"
            );
            self.emit(
                line,
                AlertKind::NearCapacity,
                suppressed,
                Some((share.idc.clone(), measured, limit)),
                || {
                    format!(
                        "idc {}: {measured:.1} r/s of {limit:.1} r/s on this instance \
                         ({:.1} of {:.1} r/s for the IDC share), over {} of it",
                        share.idc,
                        measured * instances,
                        limit * instances,
                        plan.near_capacity
                    )
                },
            );
        }
    }

    fn emit(
        &self,
        line: &Line,
        kind: AlertKind,
        suppressed: u64,
        load: Option<(Arc<str>, f64, f64)>,
        detail: impl FnOnce() -> String,
    ) {
        let i = match kind {
            AlertKind::Rejected => Some(0),
            AlertKind::NearCapacity => Some(1),
            AlertKind::KeysEvicted => Some(2),
            // Not a line's alert: the cluster limiter counts it itself.
            AlertKind::ClusterUnavailable => None,
        };
        if let Some(i) = i {
            line.state.alerts_total[i].increment(1);
        }
        if let Some(bus) = &self.events {
            bus.publish(TopologyEvent::rate_limit_alert(
                line.name.clone(),
                kind.as_str(),
                suppressed,
                detail(),
            ));
        }
        if let Some(hook) = &self.on_alert {
            hook(&Alert {
                limit: line.name.clone(),
                kind,
                suppressed,
                load,
            });
        }
    }

    /// The current plan (for the cluster limiter, which keeps its lines in a limiter of its
    /// own and only uses their parameters, metrics and alerts).
    #[cfg(feature = "redis")]
    pub(crate) fn plan(&self) -> Arc<Plan> {
        self.plan.load_full()
    }

    /// The alert debounce interval, ms.
    #[cfg(feature = "redis")]
    pub(crate) fn alert_interval_ms(&self) -> u64 {
        self.plan.load().alert_interval_ms
    }

    /// Counts and (debounced) alerts a rejection by `line` decided elsewhere.
    #[cfg(feature = "redis")]
    pub(crate) fn note_rejected(&self, line: &Line, plan: &Plan) {
        self.rejected(line, self.now_ms(), plan);
    }

    /// Counts a request admitted by `line` elsewhere (in Redis) towards its share's load,
    /// `instances` sharing the line's rate.
    #[cfg(feature = "redis")]
    pub(crate) fn note_admitted(&self, line: &Line, plan: &Plan, instances: u32) {
        if line.share.is_some() {
            self.measure_load_of(line, self.now_ms(), plan, instances);
        }
    }

    // --- reload ---

    fn update(&self, change: impl FnOnce(&mut Inputs)) -> Result<(), ConfigError> {
        let mut inputs = self.inputs.lock();
        let saved = (
            inputs.config.clone(),
            inputs.topology.clone(),
            inputs.capacity_overrides.clone(),
            inputs.instances,
            inputs.keys.clone(),
        );
        change(&mut inputs);
        match derive(&mut inputs) {
            Ok(plan) => {
                self.plan.store(Arc::new(plan));
                // After the store: a thread that sees the new generation loads the new plan.
                self.generation.fetch_add(1, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                (
                    inputs.config,
                    inputs.topology,
                    inputs.capacity_overrides,
                    inputs.instances,
                    inputs.keys,
                ) = saved;
                Err(e)
            }
        }
    }

    /// The key names the key function answers, as [`LimiterBuilder::keys`] but on a running
    /// limiter: the lines in force are checked now (on error nothing changes), every reload
    /// from then on.
    pub fn set_keys<I, S>(&self, names: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let known = names
            .into_iter()
            .map(|n| (Arc::from(n.as_ref()), None))
            .collect();
        self.set_known_keys(known)
    }

    /// Key names with, for those a line may not use, why.
    pub(crate) fn set_known_keys(&self, known: KnownKeys) -> Result<(), ConfigError> {
        self.update(|i| i.keys = Some(known))
    }

    /// Replaces the configuration at run time. Limits keep their keys' state by name; a new
    /// rate applies to the existing state, as after an nginx reload. On error nothing changes.
    pub fn reload(&self, config: RateLimitConfig) -> Result<(), ConfigError> {
        self.update(|i| i.config = config)
    }

    /// A new topology (new IDC capacities): share limits are re-derived, keeping state.
    pub fn set_topology(&self, topology: &Topology) -> Result<(), ConfigError> {
        self.update(|i| i.topology = Some(topology.clone()))
    }

    /// Overrides one IDC's capacity (requests per second) at run time, over the topology's.
    pub fn set_capacity(&self, idc: &str, capacity_rps: f64) -> Result<(), ConfigError> {
        if !(capacity_rps.is_finite() && capacity_rps > 0.0) {
            return Err(ConfigError::new(
                "capacity_rps",
                capacity_rps,
                "must be a positive number",
            ));
        }
        self.update(|i| {
            i.capacity_overrides.insert(idc.to_string(), capacity_rps);
        })
    }

    /// How many instances share each IDC share now; share limits are re-derived, keeping state.
    pub fn set_instances(&self, instances: u32) -> Result<(), ConfigError> {
        self.update(|i| i.instances = instances)
    }

    /// The configuration in force (the last one given to the builder or to
    /// [`reload`](Self::reload)).
    pub fn config(&self) -> RateLimitConfig {
        self.inputs.lock().config.clone()
    }

    /// A limit's current rate (derived, for share limits).
    pub fn rate(&self, limit: &str) -> Option<Rate> {
        let plan = self.plan.load();
        plan.lines
            .iter()
            .find(|l| &*l.name == limit)
            .and_then(|l| Rate::from_milli_per_sec(l.params.rate_m))
    }

    /// How many keys a limit tracks now.
    pub fn tracked_keys(&self, limit: &str) -> Option<usize> {
        let plan = self.plan.load();
        plan.lines
            .iter()
            .find(|l| &*l.name == limit)
            .map(|l| l.state.zone.len())
    }

    /// Bytes a limit's key state holds now: its table of lines and its overflow store, all of
    /// it (keys are kept as a fixed-size hash, never as their bytes, so a long key costs what a
    /// short one does). Bounded by `max_keys`, however many distinct keys have been seen and
    /// however long they are.
    pub fn state_bytes(&self, limit: &str) -> Option<usize> {
        let plan = self.plan.load();
        plan.lines
            .iter()
            .find(|l| &*l.name == limit)
            .map(|l| l.state.zone.table_bytes())
    }

    /// Drops every drained key of every limit and returns how many. A drained key (one whose
    /// next request would find an empty bucket) is indistinguishable from a new key, so this
    /// changes no decision while the rate stays the same.
    pub fn sweep(&self) -> usize {
        let plan = self.plan.load();
        let now = self.now_ms();
        let mut total = 0;
        for line in &plan.lines {
            let n = line.state.zone.sweep(now, line.params.rate_m);
            if n > 0 {
                line.state.evicted_idle.increment(n as u64);
            }
            line.state.tracked_keys.set(line.state.zone.len() as f64);
            total += n;
        }
        total
    }
}

impl<C> Limiter<C>
where
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Runs [`Limiter::sweep`] every `idle_sweep` (from the config) on the tokio runtime until
    /// the limiter is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(l) => l.plan.load().sweep_every,
                    None => return,
                };
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(l) => {
                        l.sweep();
                    }
                    None => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{LimitConfig, Rate};
    use governor::clock::FakeRelativeClock;

    fn limiter(burst: u64) -> Limiter<FakeRelativeClock> {
        let cfg = RateLimitConfig::with_limits(vec![
            LimitConfig::new("l", "k", Rate::per_second(1))
                .burst(burst)
                .nodelay(),
        ]);
        Limiter::builder(cfg)
            .clock(FakeRelativeClock::default())
            .build()
            .unwrap()
    }

    /// The per-thread plan cache gives way to a new plan at once, and lets go of the plans
    /// of replaced configurations and dropped limiters at the thread's next miss.
    #[test]
    fn the_plan_cache_follows_reloads_and_lets_go_of_old_plans() {
        let a = limiter(0);
        let k = Key::str("x");
        assert_eq!(a.check(k), Decision::Allow);
        assert!(a.check(k).is_reject());
        let first = Arc::downgrade(&a.plan.load_full());
        // A reload is seen by the very next check on this thread (same bucket, burst 5).
        let mut cfg = a.config();
        cfg.limits[0].burst = 5;
        a.reload(cfg).unwrap();
        assert_eq!(a.check(k), Decision::Allow);
        // That check missed and replaced the old plan: nothing holds it any more.
        assert!(first.upgrade().is_none());
        let second = Arc::downgrade(&a.plan.load_full());
        drop(a);
        assert!(second.upgrade().is_some(), "still cached by this thread");
        let b = limiter(0);
        assert_eq!(b.check(k), Decision::Allow);
        assert!(
            second.upgrade().is_none(),
            "a dropped limiter's plan was kept"
        );
        // More limiters than the cache holds, used in turn, all decide right.
        let many: Vec<_> = (0..2 * PLAN_CACHE).map(|_| limiter(0)).collect();
        for l in &many {
            assert_eq!(l.check(k), Decision::Allow);
        }
        for l in &many {
            assert!(l.check(k).is_reject());
        }
    }
}
