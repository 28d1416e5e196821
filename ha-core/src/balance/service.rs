use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::RngCore;

use super::rng::{ForkRng, PickRng};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{CallGuard, ResponseFuture};
use super::select::{TierCounts, cumulative, is_panic, tier_shares};
use crate::config::{BalanceSettings, HealthSettings, Topology};
use crate::control::Control;
use crate::discovery::{EndpointSet, EndpointWatch};
use crate::error::{BoxError, Classify, DefaultClassifier, HaError};
use crate::events::{EventBus, TopologyEvent};
use crate::health::{EndpointHealth, ProbeTicket, Status, Verdict};
use crate::locality::{Endpoint, Locality};
use crate::metrics_names;

/// Makes the service of one endpoint; implemented for every `Fn(&Endpoint) -> S`.
pub trait MakeEndpoint {
    /// The endpoint's service.
    type Service;
    /// Makes the service that sends calls to `endpoint.addr`.
    fn make(&self, endpoint: &Endpoint) -> Self::Service;
}

impl<F, S> MakeEndpoint for F
where
    F: Fn(&Endpoint) -> S,
{
    type Service = S;
    fn make(&self, endpoint: &Endpoint) -> S {
        self(endpoint)
    }
}

/// `next_due_ms` while a recompute runs: far in the future, so pickers do not pile onto the
/// recompute lock, and distinct from any due time a recompute stores.
const RECOMPUTING: u64 = u64::MAX;

/// `next_due_ms` when nothing is due: no time-driven change ahead, so a pick need not read the
/// clock (every [`CLOCK_EVERY`] picks it still does). Distinct from [`RECOMPUTING`], and like it
/// never reached by the clock.
const NEVER: u64 = RECOMPUTING - 1;

/// The least latency a failed call is charged in the endpoint's peak-EWMA.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_millis(100);

/// The cost estimate (ns) of an endpoint with no latency sample yet: never zero, so that its
/// calls in flight still count.
const UNMEASURED_NS: f64 = 1_000.0;

// === Ctx: what outcome recording needs (no reference back to the picture, so no Arc cycle) ===

pub(crate) struct Ctx {
    pub(crate) dependency: Arc<str>,
    /// Which errors count against an endpoint (transport failures and timeouts do; an
    /// application error is an answer).
    pub(crate) classifier: Arc<dyn Classify>,
    pub(crate) health: HealthSettings,
    balance: BalanceSettings,
    pub(crate) events: EventBus,
    base: Instant,
    /// When the picture must be recomputed next (ms since `base`); 0 forces it.
    pub(crate) next_due_ms: AtomicU64,
    /// The last clock reading (ms since `base`), shared by every call. See `CLOCK_EVERY`.
    clock_ms: AtomicU64,
    ejected: AtomicUsize,
    total: AtomicUsize,
}

impl Ctx {
    pub(crate) fn now_ms(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.base);
        d.as_secs() * 1000 + u64::from(d.subsec_millis())
    }

    /// Reads the clock, and keeps the reading for calls that use the cached one.
    pub(crate) fn read_clock(&self) -> u64 {
        self.observe_clock(Instant::now())
    }

    /// Converts a reading taken by the caller, and keeps it.
    pub(crate) fn observe_clock(&self, now: Instant) -> u64 {
        let ms = self.now_ms(now);
        self.clock_ms.fetch_max(ms, Ordering::Relaxed);
        ms
    }

    /// The last reading, without reading the clock.
    pub(crate) fn cached_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::Relaxed)
    }

    /// A health verdict changed the picture: the next pick recomputes it. A recompute under
    /// way cannot overwrite this: it claimed `next_due_ms` by setting it to `RECOMPUTING` and
    /// only replaces that value, so a 0 stored meanwhile stays (see `Shared::recompute`).
    fn picture_changed(&self) {
        self.next_due_ms.store(0, Ordering::Release);
    }

    /// Reserves an ejection slot when the cap allows (at least one, `max_ejected_percent` of the set).
    fn may_eject(&self) -> bool {
        let total = self.total.load(Ordering::Acquire);
        let pct = self.health.max_ejected_percent;
        if pct <= 0.0 {
            return false;
        }
        let cap = ((total as f64 * pct / 100.0).floor() as usize).max(1);
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    pub(crate) fn record(
        &self,
        entry: &EntryCore,
        ok: bool,
        latency: Duration,
        now_ms: u64,
        probe: Option<ProbeTicket>,
    ) {
        // A failure is charged as a latency of at least FAILURE_PENALTY (as the peak-EWMA of
        // tower and Finagle do): an endpoint that fails at once must not look like the fastest
        // one, or P2C prefers exactly the endpoints the ejection cap keeps in.
        let charged = if ok {
            latency
        } else {
            latency.max(FAILURE_PENALTY)
        };
        entry.observe_latency(charged, now_ms, self.balance.ewma_decay);
        let verdict = if ok {
            entry.health.on_success(now_ms, &self.health, probe)
        } else {
            entry
                .health
                .on_failure(now_ms, &self.health, probe, || self.may_eject())
        };
        match verdict {
            Verdict::Unchanged => {}
            Verdict::Capped => {
                metrics::counter!(metrics_names::EJECTION_CAPPED, "dependency" => self.dependency.to_string(), "idc" => entry.endpoint.idc_name().to_string()).increment(1);
                tracing::warn!(dependency = %self.dependency, endpoint = %entry.endpoint.addr, idc = entry.endpoint.idc_name(), "endpoint failing but the ejection cap keeps it in");
            }
            Verdict::Ejected { for_, reason } => {
                self.picture_changed();
                metrics::counter!(metrics_names::EJECTIONS, "dependency" => self.dependency.to_string(), "idc" => entry.endpoint.idc_name().to_string(), "reason" => reason).increment(1);
                self.events.publish(TopologyEvent::EndpointEjected {
                    dependency: self.dependency.clone(),
                    addr: entry.endpoint.addr,
                    idc: entry.endpoint.idc_name().into(),
                    for_,
                    reason,
                });
            }
            Verdict::Restored => {
                self.ejected.fetch_sub(1, Ordering::AcqRel);
                self.picture_changed();
                self.events.publish(TopologyEvent::EndpointRestored {
                    dependency: self.dependency.clone(),
                    addr: entry.endpoint.addr,
                    idc: entry.endpoint.idc_name().into(),
                });
            }
        }
    }
}

// === Entry: one endpoint with its service and live state ===

/// The state of one endpoint that outlives picture recomputations.
pub(crate) struct EntryCore {
    pub(crate) endpoint: Endpoint,
    pub(crate) health: EndpointHealth,
    /// Peak-EWMA latency estimate in ns (f64 bits); 0 until the first observation.
    ewma: AtomicU64,
    ewma_at_ms: AtomicU64,
    pub(crate) in_flight: AtomicU32,
    picks: metrics::Counter,
    ctx: Arc<Ctx>,
}

impl EntryCore {
    /// `ewma × (in_flight + 1)`, with the estimate decayed for the time since its last sample
    /// (as tower's and Finagle's peak-EWMA do): an endpoint that had one slow call is not shunned
    /// for ever, it comes back into the comparison as its old estimate fades, and a dead
    /// endpoint that gets no calls is found by passive health within a few decay times.
    fn cost(&self, now_ms: u64, tau_ms: f64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let pending = f64::from(self.in_flight.load(Ordering::Relaxed) + 1);
        if ewma == 0.0 {
            return UNMEASURED_NS * pending;
        }
        let idle = now_ms.saturating_sub(self.ewma_at_ms.load(Ordering::Relaxed));
        let w = if idle == 0 {
            1.0
        } else {
            (-(idle as f64) / tau_ms).exp()
        };
        ewma * w * pending
    }

    fn observe_latency(&self, latency: Duration, now_ms: u64, decay: Duration) {
        let rtt = latency.as_secs_f64() * 1e9;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        if rtt == 0.0 && prev == 0.0 {
            // An answer on the first poll to an endpoint estimated at 0: nothing to record (a
            // zero estimate does not decay), and no write to the endpoint's cache line.
            return;
        }
        let last = self.ewma_at_ms.load(Ordering::Relaxed);
        if rtt <= prev && now_ms == last {
            // Within the same millisecond a lower sample has no weight yet (w = 1).
            return;
        }
        self.ewma_at_ms.store(now_ms, Ordering::Relaxed);
        let next = if prev == 0.0 || rtt > prev {
            rtt
        } else {
            let elapsed = now_ms.saturating_sub(last) as f64;
            let w = (-elapsed / decay.as_millis().max(1) as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }
}

impl Drop for EntryCore {
    fn drop(&mut self) {
        if self.health.is_ejected() {
            self.ctx.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Entry<S> {
    core: Arc<EntryCore>,
    service: S,
}

// === Picture: the precomputed state one pick reads ===

struct Picture<S> {
    /// The discovery channel, marked seen up to the set this picture was built from: a pick
    /// checks it on the picture it loaded anyway, so clones of the balancer carry no receiver.
    watch: EndpointWatch,
    /// True when the channel was seen closed when this picture was built: its last set is in
    /// the picture, and nothing will change any more. (A closed channel answers
    /// `has_changed` with an error, also when its last set was never read: the publisher of a
    /// final set must not be ignored.)
    closed_seen: bool,
    set_version: u64,
    drained: Arc<BTreeSet<Arc<str>>>,
    entries: Vec<Entry<S>>,
    /// Usable endpoints (healthy or warming, not drained) per tier.
    tiers: [Vec<u32>; 3],
    /// Cumulative tier thresholds on a u32 scale.
    cum: [u64; 3],
    /// Exploration threshold out of 256.
    explore: u32,
    shares: [f64; 3],
    panic: bool,
    panic_pool: Vec<u32>,
    /// Endpoints whose ejection is over (not drained): the next calls probe them.
    probes: Vec<u32>,
}

impl<S> Picture<S> {
    fn empty(watch: EndpointWatch) -> Self {
        Picture {
            watch,
            closed_seen: false,
            set_version: 0,
            drained: Arc::new(BTreeSet::new()),
            entries: Vec::new(),
            tiers: Default::default(),
            cum: [0; 3],
            explore: 0,
            shares: [0.0; 3],
            panic: false,
            panic_pool: Vec::new(),
            probes: Vec::new(),
        }
    }
}

struct Shared<S> {
    ctx: Arc<Ctx>,
    picture: ArcSwap<Picture<S>>,
    // Recomputing the picture is rare and short; a std mutex only serialises recomputers (a caller
    // that finds it taken keeps using the current picture). It is never held across an await.
    #[allow(clippy::disallowed_types)]
    recompute: std::sync::Mutex<()>,
    make: Box<dyn Fn(&Endpoint) -> S + Send + Sync>,
    control: Option<Control>,
    empty_drained: Arc<BTreeSet<Arc<str>>>,
    clones: AtomicU64,
}

// === Builder ===

/// Configures a [`LocalityBalance`]; start with [`LocalityBalance::builder`].
#[derive(Clone)]
#[must_use]
pub struct Builder {
    dependency: Arc<str>,
    watch: EndpointWatch,
    balance: BalanceSettings,
    health: HealthSettings,
    control: Option<Control>,
    events: EventBus,
    seed: Option<u64>,
    classifier: Arc<dyn Classify>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("dependency", &self.dependency)
            .field("balance", &self.balance)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Selection tuning (default: the topology's `[balance]`).
    pub fn balance(mut self, s: BalanceSettings) -> Self {
        self.balance = s;
        self
    }

    /// Outlier-detection tuning (default: the topology's `[health]`).
    pub fn health(mut self, s: HealthSettings) -> Self {
        self.health = s;
        self
    }

    /// The operator's drain handle (default: none, nothing is ever drained).
    pub fn control(mut self, c: Control) -> Self {
        self.control = Some(c);
        self
    }

    /// The event bus for ejections, restorations and tier changes (default: a private bus).
    pub fn events(mut self, e: EventBus) -> Self {
        self.events = e;
        self
    }

    /// Seeds the pick RNG, for deterministic tests (default: from the OS).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// How an endpoint's errors are classified (default [`DefaultClassifier`]): only a
    /// transport failure or a timeout
    /// ([`ErrorClass::is_endpoint_failure`](crate::ErrorClass::is_endpoint_failure)) counts
    /// against the endpoint's health; an
    /// application error such as a duplicate key is an answer and counts as proof of life.
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// Builds the balancer; `make` creates the service of each endpoint as it appears.
    pub fn build<S, M>(self, make: M) -> LocalityBalance<S>
    where
        S: Clone,
        M: Fn(&Endpoint) -> S + Send + Sync + 'static,
    {
        let rng = match self.seed {
            Some(seed) => PickRng::seeded(seed),
            None => PickRng::thread(),
        };
        self.build_with_rng(make, rng)
    }

    /// Builds the balancer with an injected RNG; each clone of the service gets its own stream
    /// from [`ForkRng::fork`].
    pub fn build_with_rng<S, M, R>(self, make: M, rng: R) -> LocalityBalance<S, R>
    where
        S: Clone,
        M: Fn(&Endpoint) -> S + Send + Sync + 'static,
        R: ForkRng,
    {
        let ctx = Arc::new(Ctx {
            dependency: self.dependency,
            classifier: self.classifier,
            health: self.health,
            balance: self.balance,
            events: self.events,
            base: Instant::now(),
            next_due_ms: AtomicU64::new(0),
            clock_ms: AtomicU64::new(0),
            ejected: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
        });
        let shared = Arc::new(Shared {
            ctx,
            picture: ArcSwap::from_pointee(Picture::empty(self.watch)),
            recompute: Default::default(),
            make: Box::new(make),
            control: self.control,
            empty_drained: Arc::new(BTreeSet::new()),
            clones: AtomicU64::new(1),
        });
        let now_ms = shared.ctx.read_clock();
        shared.recompute(now_ms, true);
        LocalityBalance {
            shared,
            rng,
            calls: 0,
        }
    }
}

// === LocalityBalance ===

/// A locality-aware balancer over the live endpoints of one dependency. See the
/// [module docs](crate::balance). Cloning is cheap (an `Arc` and an RNG); clones share health,
/// latency estimates and the picture.
pub struct LocalityBalance<S, R = PickRng> {
    shared: Arc<Shared<S>>,
    rng: R,
    /// Calls made through this clone, to read the clock every `CLOCK_EVERY` calls.
    calls: u32,
}

/// In steady state (nothing ejected, warming or due) a pick needs no clock reading: it uses the
/// last one, refreshed every this many calls of a clone and by every call that completes after
/// yielding or fails. A pick reads the clock itself whenever something time-dependent is pending.
const CLOCK_EVERY: u32 = 32;

impl<S, R: ForkRng> Clone for LocalityBalance<S, R> {
    fn clone(&self) -> Self {
        // Each clone draws its own stream (free for the default per-thread RNG, which needs no
        // clone number).
        let n = if self.rng.uses_stream() {
            self.shared.clones.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        LocalityBalance {
            shared: self.shared.clone(),
            rng: self.rng.fork(n),
            calls: 0,
        }
    }
}

impl<S, R> std::fmt::Debug for LocalityBalance<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalityBalance")
            .field("dependency", &self.shared.ctx.dependency)
            .finish_non_exhaustive()
    }
}

impl LocalityBalance<()> {
    /// Starts a builder for the dependency whose endpoints `watch` publishes, with that
    /// dependency's `[balance]` and `[health]` settings (its overrides applied).
    pub fn builder(topology: &Topology, watch: EndpointWatch) -> Builder {
        let dependency = watch.borrow().dependency.clone();
        Builder {
            balance: *topology.balance_for(&dependency),
            health: *topology.health_for(&dependency),
            dependency,
            watch,
            control: None,
            events: EventBus::default(),
            seed: None,
            classifier: Arc::new(DefaultClassifier),
        }
    }
}

/// A pick: the picture it was made on, the endpoint's index, whether it is a probe, and the
/// time (ms since the balancer's start) it was made at.
type Pick<S> = (
    arc_swap::Guard<Arc<Picture<S>>>,
    u32,
    Option<ProbeTicket>,
    u64,
);

/// A point-in-time view of one endpoint, for status pages and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its health status.
    pub status: Status,
    /// Whether its IDC is drained.
    pub drained: bool,
    /// Peak-EWMA latency estimate.
    pub ewma: Duration,
    /// Calls in flight.
    pub in_flight: u32,
}

/// A point-in-time view of a balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The dependency.
    pub dependency: Arc<str>,
    /// Traffic shares of `SameIdc`, `SameRegion`, `Remote`.
    pub shares: [f64; 3],
    /// True in panic mode.
    pub panic: bool,
    /// Every endpoint.
    pub endpoints: Vec<EndpointView>,
}

impl<S, R> LocalityBalance<S, R>
where
    S: Clone,
    R: RngCore,
{
    /// The current picture: shares, panic, and every endpoint's state.
    pub fn view(&self) -> View {
        let now = Instant::now();
        let ctx = &self.shared.ctx;
        let p = self.shared.picture.load();
        let now_ms = ctx.now_ms(now);
        View {
            dependency: ctx.dependency.clone(),
            shares: p.shares,
            panic: p.panic,
            endpoints: p
                .entries
                .iter()
                .map(|e| EndpointView {
                    endpoint: e.core.endpoint.clone(),
                    status: e
                        .core
                        .health
                        .status(now_ms, ctx.balance.failback_hold.as_millis() as u64),
                    drained: e
                        .core
                        .endpoint
                        .idc
                        .as_ref()
                        .is_some_and(|i| p.drained.contains(i)),
                    ewma: Duration::from_nanos(
                        f64::from_bits(e.core.ewma.load(Ordering::Relaxed)) as u64
                    ),
                    in_flight: e.core.in_flight.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Picks an endpoint for one call; returns its index in the picture, or `None`.
    fn pick(&mut self) -> Option<Pick<S>> {
        let shared = &*self.shared;
        let ctx = &*shared.ctx;
        let next_due = ctx.next_due_ms.load(Ordering::Acquire);
        self.calls = self.calls.wrapping_add(1);
        // Nothing due (or a recompute under way): the cached clock is good enough, as before
        // the recompute claimed the due time (a clock read is ~20 ns of a ~80 ns pick).
        let now_ms = if next_due < NEVER || self.calls.is_multiple_of(CLOCK_EVERY) {
            ctx.read_clock()
        } else {
            ctx.cached_ms()
        };
        // Recompute when something changed: discovery, a due time, a drain.
        let mut p = shared.picture.load();
        let set_changed = p.watch.has_changed().unwrap_or(!p.closed_seen);
        let drained_changed = match &shared.control {
            Some(c) => !Arc::ptr_eq(&c.snapshot(), &p.drained),
            None => false,
        };
        if set_changed || drained_changed || now_ms >= next_due {
            drop(p);
            shared.recompute(now_ms, false);
            p = shared.picture.load();
        }

        // An endpoint whose ejection is over gets this call as its probe.
        for &i in &p.probes {
            let core = &p.entries[i as usize].core;
            let probe_timeout_ms =
                u64::try_from(ctx.health.probe_timeout.as_millis()).unwrap_or(u64::MAX);
            if let Some(ticket) = core.health.try_claim_probe(now_ms, probe_timeout_ms) {
                tracing::debug!(dependency = %ctx.dependency, endpoint = %core.endpoint.addr, idc = core.endpoint.idc_name(), "pick: probe of an endpoint whose ejection ended");
                return Some((p, i, Some(ticket), now_ms));
            }
        }

        let rng = &mut self.rng;
        let tau_ms = ctx.balance.ewma_decay.as_secs_f64() * 1000.0;
        let picked = if !p.panic && !crate::attempt::is_avoiding() {
            // The first attempt of a call. One 64-bit draw: 8 bits decide exploration, 24 the
            // tier, 32 the two candidates.
            let r = rng.next_u64();
            let tier_draw = r & 0xFFFF_FF00;
            let tier = p.cum.iter().position(|c| tier_draw < *c).unwrap_or(2);
            let pool = &p.tiers[tier];
            if ((r & 0xFF) as u32) < p.explore {
                p2c_fast(&p.entries, pool, r >> 32, None).map(|i| (i, "explore", pool.len()))
            } else {
                p2c_fast(&p.entries, pool, r >> 32, Some((now_ms, tau_ms)))
                    .map(|i| (i, Locality::ALL[tier].as_str(), pool.len()))
            }
        } else {
            let r = u64::from(rng.next_u32());
            crate::attempt::avoided(|avoid| {
                if p.panic {
                    return p2c(&p.entries, &p.panic_pool, avoid, rng, now_ms, tau_ms)
                        .map(|i| (i, "panic", p.panic_pool.len()));
                }
                let tier = p.cum.iter().position(|c| r < *c).unwrap_or(2);
                let usable = |t: usize| {
                    p.tiers[t]
                        .iter()
                        .any(|i| !avoid.contains(&p.entries[*i as usize].core.endpoint.addr))
                };
                // The drawn tier, or the nearest tier with an endpoint that is not avoided.
                let (pool, why) = if usable(tier) {
                    (&p.tiers[tier], Locality::ALL[tier].as_str())
                } else {
                    match (0..3).find(|t| usable(*t)) {
                        Some(t) => (&p.tiers[t], "spill_after_avoid"),
                        None => (&p.panic_pool, "only_avoided_left"),
                    }
                };
                p2c(&p.entries, pool, avoid, rng, now_ms, tau_ms).map(|i| (i, why, pool.len()))
            })
        };
        let (i, why, pool) = picked?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let core = &p.entries[i as usize].core;
            tracing::debug!(
                dependency = %ctx.dependency,
                endpoint = %core.endpoint.addr,
                idc = core.endpoint.idc_name(),
                locality = %core.endpoint.locality,
                why,
                shares = ?p.shares,
                pool,
                cost = core.cost(now_ms, tau_ms),
                "pick"
            );
        }
        Some((p, i, None, now_ms))
    }
}

/// [`p2c`] for a first attempt (nothing avoided), from 32 random bits: 16 for each candidate
/// (multiply-shift, bias below n / 2^16, irrelevant for picks).
/// With `cost` `None` (exploration), the first candidate is taken whatever the costs.
fn p2c_fast<S>(
    entries: &[Entry<S>],
    pool: &[u32],
    r: u64,
    cost: Option<(u64, f64)>,
) -> Option<u32> {
    let n = pool.len() as u64;
    if n < 2 {
        return pool.first().copied();
    }
    let a = (((r & 0xFFFF) * n) >> 16) as usize;
    let mut b = ((((r >> 16) & 0xFFFF) * (n - 1)) >> 16) as usize;
    if b >= a {
        b += 1;
    }
    let (ia, ib) = (*pool.get(a)?, *pool.get(b)?);
    let Some((now_ms, tau_ms)) = cost else {
        return Some(ia);
    };
    let ca = entries.get(ia as usize)?.core.cost(now_ms, tau_ms);
    let cb = entries.get(ib as usize)?.core.cost(now_ms, tau_ms);
    Some(if cb < ca { ib } else { ia })
}

/// Power of two choices: two distinct random members of `pool` not in `avoid`, lower cost wins.
/// When every member is avoided, they are all allowed again (the balancer has nothing else).
fn p2c<S, R: RngCore>(
    entries: &[Entry<S>],
    pool: &[u32],
    avoid: &[SocketAddr],
    rng: &mut R,
    now_ms: u64,
    tau_ms: f64,
) -> Option<u32> {
    let addr = |i: u32| entries[i as usize].core.endpoint.addr;
    let allowed: usize = if avoid.is_empty() {
        pool.len()
    } else {
        pool.iter().filter(|i| !avoid.contains(&addr(**i))).count()
    };
    let (n, avoid) = if allowed == 0 {
        (pool.len(), &[][..])
    } else {
        (allowed, avoid)
    };
    let nth = |k: usize| -> u32 {
        if avoid.is_empty() {
            pool[k]
        } else {
            pool.iter()
                .copied()
                .filter(|i| !avoid.contains(&addr(*i)))
                .nth(k)
                .unwrap_or(pool[0])
        }
    };
    match n {
        0 => None,
        1 => Some(nth(0)),
        _ => {
            // Two distinct indices from one draw: multiply-shift maps 32 random bits onto 0..n
            // (bias below n / 2^32, irrelevant for picks) without a division or a rejection loop.
            let r = rng.next_u64();
            let a = (((r & 0xFFFF_FFFF) * n as u64) >> 32) as usize;
            let mut b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
            if b >= a {
                b += 1;
            }
            let (ia, ib) = (nth(a), nth(b));
            let (ca, cb) = (
                entries[ia as usize].core.cost(now_ms, tau_ms),
                entries[ib as usize].core.cost(now_ms, tau_ms),
            );
            Some(if cb < ca { ib } else { ia })
        }
    }
}

impl<S: Clone> Shared<S> {
    /// Rebuilds the picture from `set` (when given) and the endpoints' current health.
    fn recompute(&self, now_ms: u64, first: bool) {
        let Ok(_guard) = (if first {
            Ok(self.recompute.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            self.recompute.try_lock().map_err(|_| ())
        }) else {
            return;
        };
        let ctx = &*self.ctx;
        // Claim the due time before reading any health state: a verdict that lands from now on
        // stores 0 over the claim, and the final compare-and-swap then leaves that 0 in place,
        // so the next pick recomputes with the verdict's full state. (With a separate counter
        // read at the start, a verdict whose state was half written when this recompute read
        // it could still be hidden until the next due time.)
        ctx.next_due_ms.store(RECOMPUTING, Ordering::Release);
        #[cfg(test)]
        tests::hook("claimed");
        let hold_ms = ctx.balance.failback_hold.as_millis() as u64;
        let old = self.picture.load_full();
        let mut watch = old.watch.clone();
        let changed = watch.has_changed();
        let closed = changed.is_err();
        let set: Option<Arc<EndpointSet>> = (first || changed.unwrap_or(!old.closed_seen))
            .then(|| watch.borrow_and_update().clone());
        let drained = match &self.control {
            Some(c) => c.drained(),
            None => self.empty_drained.clone(),
        };

        let (set_version, entries): (u64, Vec<Entry<S>>) = match set {
            Some(set) => {
                let mut by_addr: HashMap<SocketAddr, &Entry<S>> = old
                    .entries
                    .iter()
                    .map(|e| (e.core.endpoint.addr, e))
                    .collect();
                let entries = set
                    .endpoints
                    .iter()
                    .map(|ep| match by_addr.remove(&ep.addr) {
                        Some(e) if e.core.endpoint == *ep => Entry {
                            core: e.core.clone(),
                            service: e.service.clone(),
                        },
                        _ => Entry {
                            core: Arc::new(EntryCore {
                                endpoint: ep.clone(),
                                health: EndpointHealth::new(),
                                ewma: AtomicU64::new(0),
                                ewma_at_ms: AtomicU64::new(now_ms),
                                in_flight: AtomicU32::new(0),
                                picks: metrics::counter!(metrics_names::PICKS,
                                    "dependency" => ctx.dependency.to_string(),
                                    "idc" => ep.idc_name().to_string(),
                                    "locality" => ep.locality.as_str()),
                                ctx: self.ctx.clone(),
                            }),
                            service: (self.make)(ep),
                        },
                    })
                    .collect();
                (set.version, entries)
            }
            None => (
                old.set_version,
                old.entries
                    .iter()
                    .map(|e| Entry {
                        core: e.core.clone(),
                        service: e.service.clone(),
                    })
                    .collect(),
            ),
        };
        ctx.total.store(entries.len(), Ordering::Release);

        let mut counts = [TierCounts::default(); 3];
        let mut tiers: [Vec<u32>; 3] = Default::default();
        let mut panic_pool = Vec::new();
        let mut probes = Vec::new();
        let mut next_due = u64::MAX;
        for (i, e) in entries.iter().enumerate() {
            let i = i as u32;
            let core = &e.core;
            let is_drained = core
                .endpoint
                .idc
                .as_ref()
                .is_some_and(|d| drained.contains(d));
            let status = core.health.status(now_ms, hold_ms);
            if let Some(t) = core.health.next_change_ms(now_ms, hold_ms) {
                next_due = next_due.min(t);
            }
            if is_drained {
                continue;
            }
            let t = core.endpoint.locality.index();
            counts[t].total += 1;
            panic_pool.push(i);
            match status {
                // A capped endpoint is failing but the ejection cap keeps it in: it takes
                // traffic as before (its cost, charged for its failures, steers P2C away).
                Status::Healthy | Status::Capped => {
                    counts[t].healthy += 1;
                    tiers[t].push(i);
                }
                Status::Warming => tiers[t].push(i),
                Status::ProbeDue => probes.push(i),
                Status::Ejected { .. } => {}
            }
        }
        if panic_pool.is_empty() {
            // Everything is drained: in panic, drained endpoints are used too.
            panic_pool = (0..entries.len() as u32).collect();
        }
        let shares = tier_shares(counts, ctx.balance.overprovisioning);
        let panic = !entries.is_empty() && is_panic(counts, ctx.balance.panic_threshold);
        if shares != old.shares || panic != old.panic {
            for (t, l) in Locality::ALL.iter().enumerate() {
                metrics::gauge!(metrics_names::TIER_SHARE, "dependency" => ctx.dependency.to_string(), "locality" => l.as_str()).set(shares[t]);
            }
            metrics::gauge!(metrics_names::PANIC, "dependency" => ctx.dependency.to_string())
                .set(if panic { 1.0 } else { 0.0 });
            ctx.events.publish(TopologyEvent::TierChanged {
                dependency: ctx.dependency.clone(),
                shares,
                panic,
            });
        }
        let picture = Picture {
            watch,
            closed_seen: closed,
            set_version,
            drained,
            entries,
            tiers,
            cum: cumulative(shares),
            explore: (ctx.balance.explore * 256.0).round() as u32,
            shares,
            panic,
            panic_pool,
            probes,
        };
        self.picture.store(Arc::new(picture));
        #[cfg(test)]
        tests::hook("stored");
        // A verdict that landed while this picture was computed may be missing from it: its 0
        // replaced the claim, and stays.
        let _ = ctx.next_due_ms.compare_exchange(
            RECOMPUTING,
            next_due.min(NEVER),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

impl<S, R, Req> Service<Req> for LocalityBalance<S, R>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    R: RngCore,
{
    type Response = S::Response;
    type Error = HaError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per endpoint and checked in the response future (like `Oneshot`): the
        // endpoint is only known once the request is, in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.pick() {
            Some((p, i, probe, now_ms)) => {
                let entry = &p.entries[i as usize];
                crate::attempt::record_pick(entry.core.endpoint.addr);
                entry.core.picks.increment(1);
                let guard = CallGuard::new(entry.core.clone(), now_ms, probe);
                ResponseFuture::call(entry.service.clone(), req, guard)
            }
            None => {
                metrics::counter!(metrics_names::NO_ENDPOINT, "dependency" => self.shared.ctx.dependency.to_string()).increment(1);
                ResponseFuture::fail(HaError::NoHealthyEndpoint {
                    dependency: self.shared.ctx.dependency.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&str)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs the test's hook at a named step of a recompute (a forced schedule).
    pub(super) fn hook(step: &str) {
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(step);
            HOOK.with(|h| *h.borrow_mut() = Some(f));
        }
    }

    const TOPO: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[dependencies.profile]
static_addrs = ["127.0.1.11:80", "127.0.1.12:80"]
"#;

    /// A verdict landing at either step of a recompute is never hidden: afterwards the next
    /// pick is due to recompute (next_due 0), or the stored picture already reflects it.
    #[test]
    fn a_verdict_during_a_recompute_is_never_hidden() {
        for step in ["claimed", "stored"] {
            let topo = Topology::from_toml_str(TOPO, "t.toml").unwrap();
            let rx = crate::discovery::static_endpoints(&topo, "profile").unwrap();
            let bal = LocalityBalance::builder(&topo, rx)
                .seed(1)
                .build(|_: &Endpoint| ());
            let shared = bal.shared.clone();
            let ctx = shared.ctx.clone();
            let s2 = step.to_string();
            HOOK.with(|h| {
                *h.borrow_mut() = Some(Box::new(move |at: &str| {
                    if at == s2 {
                        // The interleaving: a health verdict changes the picture while the
                        // recompute is between these two steps.
                        ctx.picture_changed();
                    }
                }))
            });
            shared.recompute(0, true);
            HOOK.with(|h| *h.borrow_mut() = None);
            assert_eq!(
                shared.ctx.next_due_ms.load(Ordering::Acquire),
                0,
                "verdict at step {step} was hidden"
            );
        }
    }
}
