//! The background refresh task of one DNS dependency and its handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

use super::resolver::{DnsLookup, RegionalResolver};
use super::state::{Effect, FAR, RefreshState, at};
use crate::config::{Dependency, Source, Topology};
use crate::discovery::{EndpointSet, EndpointWatch, Publisher};
use crate::error::{ConfigError, HaError};
use crate::events::EventBus;
use crate::locality::IdcClassifier;
use crate::metrics_names;

/// Background DNS discovery of one dependency: resolves it by region, refreshes before the TTL
/// runs out, serves stale answers while every resolver fails, and publishes [`EndpointSet`]s.
///
/// The request path reads [`DnsDiscovery::current`] (an `arc-swap` load) or the
/// [`EndpointWatch`]; it never waits on DNS.
///
/// The refresh task runs as long as anyone can see its results: the handle or any receiver of
/// its watch. Dropping the handle while a balancer still holds a receiver keeps the set fresh
/// (before, it froze the set forever, silently); [`DnsDiscovery::stop`] ends it on purpose.
/// However the task ends (every receiver dropped, stopped, a panic), it says so: a
/// [`TopologyEvent::TaskEnded`](crate::TopologyEvent::TaskEnded) event, the
/// `ha_core_tasks_ended_total` counter, the last set published again as
/// [`Freshness::Ended`](crate::Freshness::Ended), and [`DnsDiscovery::ended`].
///
/// Sets are published through a [`Publisher`], as every other discovery source does.
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
    publisher: Publisher,
    /// Keeps the task alive while the handle lives.
    rx: EndpointWatch,
    nudge: Arc<Notify>,
    task: AbortHandle,
    ended: Arc<Mutex<Option<Arc<str>>>>,
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
        let resolver = RegionalResolver::for_dependency(&topology, dependency)?;
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
        let settings = *topology.dns_for(&dep.name);
        let state = RefreshState::new(settings, dep.name.clone(), Instant::now());
        let publisher = Publisher::new(dep.name.clone(), events.clone());
        let rx = publisher.watch();
        let nudge = Arc::new(Notify::new());
        let (first_tx, first_rx) = oneshot::channel();
        let task = Task {
            state,
            dependency: dep.clone(),
            port: *port,
            classifier: topology.classifier().clone(),
            publisher: publisher.clone(),
            events: events.clone(),
            nudge: nudge.clone(),
            first: Some(first_tx),
        };
        let inner = tokio::spawn(task.run(lookup));
        let abort = inner.abort_handle();
        let ended = Arc::new(Mutex::new(None));
        tokio::spawn(supervise(
            inner,
            dep.name.clone(),
            publisher.clone(),
            events,
            ended.clone(),
        ));
        // The lookup bounds itself by query_timeout per region; the margin only guards a
        // misbehaving custom DnsLookup.
        let regions = u32::try_from(topology.regions().len()).unwrap_or(u32::MAX);
        let bound = settings
            .query_timeout
            .saturating_mul(regions.saturating_mul(2))
            .saturating_add(Duration::from_secs(1))
            .min(FAR);
        let _ = tokio::time::timeout(bound, first_rx).await;
        Ok(DnsDiscovery {
            dependency: dep.name.clone(),
            publisher,
            rx,
            nudge,
            task: abort,
            ended,
        })
    }

    /// Stops the refresh task on purpose; the set stays as it is, marked
    /// [`Freshness::Ended`](crate::Freshness::Ended).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Why the refresh task ended, `None` while it runs.
    pub fn ended(&self) -> Option<Arc<str>> {
        self.ended.lock().clone()
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &Arc<str> {
        &self.dependency
    }

    /// A receiver of every published set (it holds the latest one at once). The task keeps
    /// refreshing while any receiver lives, also after the handle is dropped.
    pub fn watch(&self) -> EndpointWatch {
        self.rx.clone()
    }

    /// The current set: an `arc-swap` load, no lock, no allocation, never waits on DNS.
    pub fn current(&self) -> Arc<EndpointSet> {
        self.publisher.current()
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

/// Waits for the refresh task and reports its end, whatever the cause: nothing a caller relies
/// on may stop changing silently.
async fn supervise(
    task: tokio::task::JoinHandle<&'static str>,
    dependency: Arc<str>,
    publisher: Publisher,
    events: EventBus,
    ended: Arc<Mutex<Option<Arc<str>>>>,
) {
    let reason: Arc<str> = match task.await {
        Ok(reason) => reason.into(),
        Err(e) if e.is_cancelled() => "stopped".into(),
        Err(e) => {
            let panic = e.into_panic();
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            format!("panicked: {msg}").into()
        }
    };
    *ended.lock() = Some(reason.clone());
    metrics::counter!(metrics_names::TASKS_ENDED, "dependency" => dependency.to_string(), "task" => "dns_refresh")
        .increment(1);
    // The last set, marked ended: it will not be refreshed any more.
    publisher.end(reason.clone());
    events.publish(crate::TopologyEvent::task_ended(
        dependency,
        "dns_refresh",
        reason,
    ));
}

struct Task {
    state: RefreshState,
    dependency: Dependency,
    port: u16,
    classifier: Arc<IdcClassifier>,
    publisher: Publisher,
    events: EventBus,
    nudge: Arc<Notify>,
    first: Option<oneshot::Sender<()>>,
}

impl Task {
    async fn run<L: DnsLookup>(mut self, lookup: L) -> &'static str {
        let publisher = self.publisher.clone();
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
                    // Nobody can see the sets any more: the handle and every receiver are gone.
                    _ = publisher.closed() => return "every receiver dropped",
                }
            }
            let confirming = self.state.confirming();
            let resolve = async {
                if confirming {
                    lookup.resolve_confirming(&self.dependency).await
                } else {
                    lookup.resolve(&self.dependency).await
                }
            };
            tokio::pin!(resolve);
            let result = loop {
                let transition = self
                    .state
                    .next_transition()
                    .unwrap_or_else(|| at(Instant::now(), FAR));
                tokio::select! {
                    r = &mut resolve => break r,
                    _ = sleep_until(transition) => {
                        let effects = self.state.on_time(Instant::now());
                        self.apply(effects);
                    }
                    _ = publisher.closed() => return "every receiver dropped",
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
                Effect::Publish(addrs) => {
                    let endpoints = addrs
                        .into_iter()
                        .map(|ip| self.classifier.endpoint(SocketAddr::new(ip, self.port)))
                        .collect();
                    self.publisher.publish(endpoints);
                }
                Effect::MarkStale => self.publisher.mark_stale(),
                Effect::Expire => self.publisher.expire(),
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
