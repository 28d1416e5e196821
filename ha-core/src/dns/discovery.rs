//! The background refresh task of one DNS dependency and its handle.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::resolver::{DnsLookup, RegionalResolver};
use super::state::{Effect, RefreshState};
use crate::config::{Dependency, Source, Topology};
use crate::discovery::{EndpointSet, EndpointWatch};
use crate::error::{ConfigError, HaError};
use crate::events::EventBus;
use crate::metrics_names;

/// Background DNS discovery of one dependency: resolves it by region, refreshes before the TTL
/// runs out, serves stale answers while every resolver fails, and publishes [`EndpointSet`]s.
///
/// The request path reads [`DnsDiscovery::current`] (an `arc-swap` load) or the
/// [`EndpointWatch`]; it never waits on DNS. Dropping the handle stops the task (the watch
/// channel then closes).
///
/// ```no_run
/// # async fn demo(topo: std::sync::Arc<ha_core::Topology>) -> Result<(), ha_core::HaError> {
/// use ha_core::{EventBus, dns::DnsDiscovery};
/// let events = EventBus::default();
/// let profile = DnsDiscovery::start(topo, "profile", events).await?;
/// let set = profile.current();
/// println!("{} endpoints (version {}, stale: {})", set.len(), set.version, set.stale);
/// let mut watch = profile.watch();
/// watch.changed().await.ok(); // the next change
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DnsDiscovery {
    dependency: Arc<str>,
    current: Arc<ArcSwap<EndpointSet>>,
    rx: EndpointWatch,
    nudge: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for DnsDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsDiscovery {
    /// Starts discovery of `dependency` with a [`RegionalResolver`] for `topology`.
    ///
    /// Waits for the first resolution attempt (bounded by the query timeouts of every region)
    /// and returns even if it failed: the set is then empty and the task keeps retrying every
    /// `retry_interval`. An unknown or static dependency is a [`HaError::Config`] error.
    pub async fn start(
        topology: Arc<Topology>,
        dependency: &str,
        events: EventBus,
    ) -> Result<DnsDiscovery, HaError> {
        let resolver = RegionalResolver::new(&topology)?;
        Self::with_lookup(topology, dependency, events, resolver).await
    }

    /// Like [`DnsDiscovery::start`], resolving with any [`DnsLookup`] (a scripted one in tests).
    pub async fn with_lookup<L: DnsLookup>(
        topology: Arc<Topology>,
        dependency: &str,
        events: EventBus,
        lookup: L,
    ) -> Result<DnsDiscovery, HaError> {
        let dep = dns_dependency(&topology, dependency)?;
        let Source::Dns { port, .. } = &dep.source else {
            return Err(not_dns(&topology, dependency));
        };
        let settings = *topology.dns();
        let state = RefreshState::new(
            settings,
            dep.name.clone(),
            *port,
            topology.classifier().clone(),
            Instant::now(),
        );
        let initial = Arc::new(state.initial_set());
        let current = Arc::new(ArcSwap::new(initial.clone()));
        let (tx, rx) = watch::channel(initial);
        let nudge = Arc::new(Notify::new());
        let (first_tx, first_rx) = oneshot::channel();
        let task = Task {
            state,
            dependency: dep.clone(),
            tx,
            current: current.clone(),
            events,
            nudge: nudge.clone(),
            first: Some(first_tx),
        };
        let task = tokio::spawn(task.run(lookup));
        // The lookup bounds itself by query_timeout per region; the margin only guards a
        // misbehaving custom DnsLookup.
        let regions = u32::try_from(topology.regions().len()).unwrap_or(u32::MAX);
        let bound = settings.query_timeout.saturating_mul(regions) + Duration::from_secs(1);
        let _ = tokio::time::timeout(bound, first_rx).await;
        Ok(DnsDiscovery {
            dependency: dep.name.clone(),
            current,
            rx,
            nudge,
            task,
        })
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &Arc<str> {
        &self.dependency
    }

    /// A receiver of every published set (it holds the latest one at once).
    pub fn watch(&self) -> EndpointWatch {
        self.rx.clone()
    }

    /// The current set: an `arc-swap` load, no lock, no allocation, never waits on DNS.
    pub fn current(&self) -> Arc<EndpointSet> {
        self.current.load_full()
    }

    /// Asks for a refresh now instead of at the scheduled time (e.g. after connection errors).
    pub fn refresh_now(&self) {
        self.nudge.notify_one();
    }
}

fn dns_dependency(topology: &Topology, dependency: &str) -> Result<Dependency, HaError> {
    let dep = topology.require_dependency(dependency)?;
    match dep.source {
        Source::Dns { .. } => Ok(dep.clone()),
        Source::Static(_) => Err(not_dns(topology, dependency)),
    }
}

fn not_dns(topology: &Topology, dependency: &str) -> HaError {
    HaError::Config(ConfigError::new(
        topology.file(),
        format!("dependencies.{dependency}"),
        "",
        "not a DNS dependency: use ha_core::discovery::static_endpoints",
    ))
}

// === impl Task ===

struct Task {
    state: RefreshState,
    dependency: Dependency,
    tx: watch::Sender<Arc<EndpointSet>>,
    current: Arc<ArcSwap<EndpointSet>>,
    events: EventBus,
    nudge: Arc<Notify>,
    first: Option<oneshot::Sender<()>>,
}

/// Far enough to mean "never" for a sleep, small enough not to overflow an `Instant`.
const FAR: Duration = Duration::from_secs(86_400 * 365);

impl Task {
    async fn run<L: DnsLookup>(mut self, lookup: L) {
        loop {
            // Wait until a lookup is due, carrying out time-driven transitions meanwhile.
            loop {
                let now = Instant::now();
                let effects = self.state.on_time(now);
                self.apply(effects);
                if self.state.refresh_due(now) {
                    break;
                }
                tokio::select! {
                    _ = sleep_until(self.state.next_wake()) => {}
                    _ = self.nudge.notified() => self.state.refresh_now(Instant::now()),
                }
            }
            let resolve = lookup.resolve(&self.dependency);
            tokio::pin!(resolve);
            let result = loop {
                let transition = self
                    .state
                    .next_transition()
                    .unwrap_or_else(|| Instant::now() + FAR);
                tokio::select! {
                    r = &mut resolve => break r,
                    _ = sleep_until(transition) => {
                        let effects = self.state.on_time(Instant::now());
                        self.apply(effects);
                    }
                }
            };
            let effects = self.state.on_result(Instant::now(), result);
            self.apply(effects);
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            tracing::trace!(dependency = %self.dependency.name, next = ?self.state.next_refresh(), "dns refresh done");
        }
    }

    fn apply(&self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Publish(set) => {
                    tracing::debug!(dependency = %set.dependency, version = set.version, stale = set.stale, endpoints = set.len(), "dns set published");
                    self.current.store(set.clone());
                    self.tx.send_replace(set);
                }
                Effect::Event(event) => self.events.publish(event),
                Effect::StaleServed => {
                    metrics::counter!(metrics_names::DNS_STALE, "dependency" => self.dependency.name.to_string())
                        .increment(1);
                }
                Effect::Failed { error, stale } => {
                    if stale {
                        tracing::debug!(dependency = %self.dependency.name, %error, "dns refresh failed");
                    } else {
                        tracing::warn!(dependency = %self.dependency.name, %error, "dns refresh failed");
                    }
                }
            }
        }
    }
}
