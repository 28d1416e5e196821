//! Endpoint sets and how they reach the balancer: a `watch` channel of [`EndpointSet`]s, published
//! by a background task (DNS refresh, Sentinel or HA-master watcher) or fixed for static addresses.
//! The request path only reads the latest set; it never waits on discovery.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::{Source, Topology};
use crate::error::{ConfigError, HaError};
use crate::events::{EventBus, TopologyEvent};
use crate::locality::Endpoint;

/// How current an [`EndpointSet`] is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Freshness {
    /// Backed by a current answer (a DNS answer within its TTL, a watcher that is connected).
    #[default]
    Fresh,
    /// The last good answer, kept while its source fails (DNS past its TTL within
    /// `serve_stale_for`, a watcher that lost its connection).
    Stale,
    /// The source gave up on the last answer (DNS past `serve_stale_for`): the set is empty.
    Expired,
    /// The publisher ended (its task stopped or died, the reason given): the set will not
    /// change any more, and is kept as it was.
    Ended(Arc<str>),
}

/// The current resolved endpoints of one dependency.
///
/// Built by a [`Publisher`] (or [`EndpointSet::new`] for a fixed list).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointSet {
    /// The dependency's name.
    pub dependency: Arc<str>,
    /// The endpoints, classified, in a stable order (sorted by address).
    pub endpoints: Arc<[Endpoint]>,
    /// Bumped by the publisher for every change of the endpoints (not of the freshness).
    pub version: u64,
    /// True while the set is not backed by a current answer: [`Freshness::Stale`] or
    /// [`Freshness::Ended`]. Kept in step with `freshness`.
    pub stale: bool,
    /// How current the set is.
    pub freshness: Freshness,
}

impl EndpointSet {
    /// An empty set for `dependency`.
    pub fn empty(dependency: impl Into<Arc<str>>) -> EndpointSet {
        EndpointSet {
            dependency: dependency.into(),
            endpoints: Arc::from(Vec::new()),
            version: 0,
            stale: false,
            freshness: Freshness::Fresh,
        }
    }

    /// A set of `endpoints`, sorted by address and deduplicated (the first of equal addresses
    /// stays).
    pub fn new(
        dependency: impl Into<Arc<str>>,
        mut endpoints: Vec<Endpoint>,
        version: u64,
    ) -> Self {
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        EndpointSet {
            dependency: dependency.into(),
            endpoints: endpoints.into(),
            version,
            stale: false,
            freshness: Freshness::Fresh,
        }
    }

    /// The same set with another freshness (`stale` follows).
    pub fn with_freshness(mut self, freshness: Freshness) -> EndpointSet {
        self.stale = matches!(freshness, Freshness::Stale | Freshness::Ended(_));
        self.freshness = freshness;
        self
    }

    /// True when there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True when the publisher ended: the set will not change any more.
    pub fn is_ended(&self) -> bool {
        matches!(self.freshness, Freshness::Ended(_))
    }
}

/// Publishes the endpoint sets of one dependency, the same way for every source: DNS
/// ([`DnsDiscovery`](crate::dns::DnsDiscovery) uses it), a Sentinel replica watcher, a
/// RocketMQ route poller.
///
/// It keeps the current set in an `arc-swap` (for [`Publisher::current`]) and a `watch`
/// channel (for balancers), diffs every new list against the last one, bumps the version only
/// on a change, and emits [`TopologyEvent::EndpointAdded`] / [`TopologyEvent::EndpointRemoved`]
/// on the [`EventBus`] before the set they describe. Freshness changes
/// ([`Publisher::mark_stale`], [`Publisher::expire`], [`Publisher::end`]) republish without a
/// new version unless the endpoints change. Dropping the publisher closes the channel; the
/// receivers keep the last set. Cheap to clone (clones publish to the same channel).
///
/// ```
/// use ha_core::{EventBus, IdcClassifier, Role};
/// use ha_core::discovery::{Freshness, Publisher};
///
/// let events = EventBus::new(16);
/// let mut seen = events.subscribe();
/// let publisher = Publisher::new("cache", events);
/// let watch = publisher.watch();
/// let c = IdcClassifier::new(&[], "bj-a");
/// let replica = c.endpoint("127.0.2.21:6380".parse().unwrap()).with_role(Role::Replica);
/// assert!(publisher.publish(vec![replica.clone()]));
/// assert!(!publisher.publish(vec![replica]), "the same list is no change");
/// assert_eq!(watch.borrow().version, 1);
/// assert_eq!(seen.try_recv().unwrap().kind(), "endpoint_added");
/// publisher.mark_stale();
/// assert_eq!(watch.borrow().freshness, Freshness::Stale);
/// assert_eq!(watch.borrow().version, 1);
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    dependency: Arc<str>,
    tx: watch::Sender<Arc<EndpointSet>>,
    current: ArcSwap<EndpointSet>,
    events: EventBus,
    /// Serializes publishers so that events and sets go out in one order.
    lock: Mutex<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("dependency", &self.inner.dependency)
            .field("current", &self.inner.current.load())
            .finish()
    }
}

impl Publisher {
    /// A publisher for `dependency` whose first set is empty, version 0, fresh.
    pub fn new(dependency: impl Into<Arc<str>>, events: EventBus) -> Publisher {
        Publisher::with_initial(EndpointSet::empty(dependency), events)
    }

    /// A publisher whose first set is `initial` (no events are emitted for it).
    pub fn with_initial(initial: EndpointSet, events: EventBus) -> Publisher {
        let initial = Arc::new(initial);
        let (tx, _rx) = watch::channel(initial.clone());
        Publisher {
            inner: Arc::new(PublisherInner {
                dependency: initial.dependency.clone(),
                tx,
                current: ArcSwap::new(initial),
                events,
                lock: Mutex::new(()),
            }),
        }
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &Arc<str> {
        &self.inner.dependency
    }

    /// A receiver that always holds the latest set (for a balancer).
    pub fn watch(&self) -> EndpointWatch {
        self.inner.tx.subscribe()
    }

    /// The latest set (a lock-free load).
    pub fn current(&self) -> Arc<EndpointSet> {
        self.inner.current.load_full()
    }

    /// How many receivers are alive.
    pub fn receiver_count(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    /// Resolves when every receiver is gone: nobody can see what is published any more.
    pub async fn closed(&self) {
        self.inner.tx.closed().await
    }

    /// Publishes `endpoints` (sorted by address, deduplicated) as a fresh set. Returns true when
    /// the endpoints changed (a new version, with an event per endpoint added or removed; an
    /// endpoint whose facts changed counts as removed and added); a list equal to the current one
    /// changes nothing but the freshness, which becomes [`Freshness::Fresh`].
    pub fn publish(&self, endpoints: Vec<Endpoint>) -> bool {
        self.replace(endpoints, Freshness::Fresh)
    }

    /// Keeps the endpoints and marks the set [`Freshness::Stale`] (no new version). Does nothing
    /// when it is already stale or the publisher ended.
    pub fn mark_stale(&self) {
        let _g = self.inner.lock.lock();
        let cur = self.inner.current.load_full();
        if cur.freshness == Freshness::Fresh {
            let set = (*cur).clone().with_freshness(Freshness::Stale);
            self.send(Arc::new(set));
        }
    }

    /// Replaces the set by an empty one marked [`Freshness::Expired`] (a new version when it
    /// held endpoints, with an event per endpoint removed).
    pub fn expire(&self) {
        self.replace(Vec::new(), Freshness::Expired);
    }

    /// Marks the set [`Freshness::Ended`] with `reason`, keeping its endpoints: the set will not
    /// change any more. Later calls change nothing.
    pub fn end(&self, reason: impl Into<Arc<str>>) {
        let _g = self.inner.lock.lock();
        let cur = self.inner.current.load_full();
        if !cur.is_ended() {
            let set = (*cur)
                .clone()
                .with_freshness(Freshness::Ended(reason.into()));
            self.send(Arc::new(set));
        }
    }

    fn replace(&self, mut endpoints: Vec<Endpoint>, freshness: Freshness) -> bool {
        let _g = self.inner.lock.lock();
        let cur = self.inner.current.load_full();
        if cur.is_ended() {
            return false;
        }
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        if *cur.endpoints == *endpoints {
            if cur.freshness != freshness {
                let set = (*cur).clone().with_freshness(freshness);
                self.send(Arc::new(set));
            }
            return false;
        }
        let dep = &self.inner.dependency;
        // Events go out before the set they describe, so a watcher woken by the set finds them
        // already on the bus.
        for e in cur.endpoints.iter().filter(|e| !endpoints.contains(e)) {
            self.inner.events.publish(TopologyEvent::EndpointRemoved {
                dependency: dep.clone(),
                addr: e.addr,
                idc: e.idc_name().into(),
            });
        }
        for e in endpoints.iter().filter(|e| !cur.endpoints.contains(e)) {
            self.inner.events.publish(TopologyEvent::EndpointAdded {
                dependency: dep.clone(),
                addr: e.addr,
                idc: e.idc_name().into(),
            });
        }
        let set =
            EndpointSet::new(dep.clone(), endpoints, cur.version + 1).with_freshness(freshness);
        self.send(Arc::new(set));
        true
    }

    fn send(&self, set: Arc<EndpointSet>) {
        tracing::debug!(dependency = %set.dependency, version = set.version, freshness = ?set.freshness, endpoints = set.len(), "endpoint set published");
        self.inner.current.store(set.clone());
        self.inner.tx.send_replace(set);
    }
}

/// The receiving side of discovery: always holds the latest [`EndpointSet`].
pub type EndpointWatch = watch::Receiver<Arc<EndpointSet>>;

/// A fixed set for a dependency with `static_addrs`, or any fixed list of addresses.
///
/// ```
/// use ha_core::{Topology, discovery::static_endpoints};
/// let topo = Topology::from_toml_str(r#"
/// local_idc = "bj-a"
/// [[regions]]
/// name = "north"
/// resolvers = ["127.0.1.53"]
/// [[idcs]]
/// name = "bj-a"
/// region = "north"
/// cidrs = ["127.0.1.0/24"]
/// [dependencies.cache]
/// static_addrs = ["127.0.1.20:6380", "10.0.0.1:6380"]
/// "#, "t.toml").unwrap();
/// let rx = static_endpoints(&topo, "cache").unwrap();
/// assert_eq!(rx.borrow().len(), 2);
/// ```
pub fn static_endpoints(topology: &Topology, dependency: &str) -> Result<EndpointWatch, HaError> {
    let dep = topology.require_dependency(dependency)?;
    let Source::Static(addrs) = &dep.source else {
        return Err(HaError::Config(ConfigError::new(
            topology.file(),
            format!("dependencies.{dependency}"),
            "",
            "not a static dependency: use ha_core::dns::DnsDiscovery",
        )));
    };
    let c = topology.classifier();
    let set = EndpointSet::new(
        dep.name.clone(),
        addrs.iter().map(|a| c.endpoint(*a)).collect(),
        1,
    );
    // The sender is dropped at once: a static set never changes, and a closed channel tells the
    // balancer there will be no further updates.
    let (_tx, rx) = watch::channel(Arc::new(set));
    Ok(rx)
}

/// A channel to publish sets by hand (tests, custom discovery): returns the sender and receiver.
pub fn channel(initial: EndpointSet) -> (watch::Sender<Arc<EndpointSet>>, EndpointWatch) {
    watch::channel(Arc::new(initial))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::locality::{IdcClassifier, Role};

    fn ep(addr: &str) -> Endpoint {
        IdcClassifier::new(&[], "bj-a").endpoint(addr.parse().unwrap())
    }

    fn kinds(rx: &mut tokio::sync::broadcast::Receiver<TopologyEvent>) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e.kind());
        }
        out
    }

    #[test]
    fn publish_diffs_versions_and_announces_before_the_set() {
        let bus = EventBus::new(64);
        let mut rx = bus.subscribe();
        let p = Publisher::new("cache", bus);
        let mut w = p.watch();
        assert!(p.publish(vec![
            ep("127.0.1.2:1"),
            ep("127.0.1.1:1"),
            ep("127.0.1.1:1")
        ]));
        let set = w.borrow_and_update().clone();
        assert_eq!(set.version, 1);
        assert_eq!(set.len(), 2, "sorted and deduplicated");
        assert!(set.endpoints[0].addr < set.endpoints[1].addr);
        assert_eq!(kinds(&mut rx), ["endpoint_added", "endpoint_added"]);
        // The same list in another order: no change, no event, no wake-up.
        assert!(!p.publish(vec![ep("127.0.1.1:1"), ep("127.0.1.2:1")]));
        assert!(!w.has_changed().unwrap());
        assert!(kinds(&mut rx).is_empty());
        // One replaced.
        assert!(p.publish(vec![ep("127.0.1.1:1"), ep("127.0.1.3:1")]));
        assert_eq!(p.current().version, 2);
        assert_eq!(kinds(&mut rx), ["endpoint_removed", "endpoint_added"]);
    }

    #[test]
    fn a_role_change_is_a_change() {
        let p = Publisher::new("cache", EventBus::new(16));
        p.publish(vec![ep("127.0.1.1:1").with_role(Role::Replica)]);
        assert!(p.publish(vec![ep("127.0.1.1:1").with_role(Role::Primary)]));
        assert_eq!(p.current().endpoints[0].meta.role, Some(Role::Primary));
        assert_eq!(p.current().version, 2);
    }

    #[test]
    fn freshness_changes_keep_the_version_and_end_is_final() {
        let p = Publisher::new("cache", EventBus::new(16));
        p.publish(vec![ep("127.0.1.1:1")]);
        p.mark_stale();
        let s = p.current();
        assert_eq!(
            (s.version, s.stale, &s.freshness),
            (1, true, &Freshness::Stale)
        );
        // Fresh again with the same endpoints: the flag changes, the version does not.
        assert!(!p.publish(vec![ep("127.0.1.1:1")]));
        let s = p.current();
        assert_eq!(
            (s.version, s.stale, &s.freshness),
            (1, false, &Freshness::Fresh)
        );
        p.expire();
        let s = p.current();
        assert!(s.is_empty());
        assert_eq!(
            (s.version, s.stale, &s.freshness),
            (2, false, &Freshness::Expired)
        );
        // Stale makes no sense for an expired (empty) set.
        p.mark_stale();
        assert_eq!(p.current().freshness, Freshness::Expired);
        p.publish(vec![ep("127.0.1.1:1")]);
        p.end("stopped");
        let s = p.current();
        assert!(s.is_ended() && s.stale);
        assert_eq!(s.freshness, Freshness::Ended("stopped".into()));
        // Nothing changes an ended set.
        assert!(!p.publish(vec![ep("127.0.1.9:1")]));
        p.end("again");
        p.mark_stale();
        assert_eq!(p.current(), s);
    }

    #[tokio::test]
    async fn closed_resolves_when_every_receiver_is_gone_and_receivers_keep_the_last_set() {
        let p = Publisher::new("cache", EventBus::new(16));
        let w = p.watch();
        assert_eq!(p.receiver_count(), 1);
        let closed = tokio::time::timeout(std::time::Duration::from_millis(10), p.closed()).await;
        assert!(closed.is_err(), "a receiver lives");
        drop(w);
        p.closed().await;
        let w = p.watch();
        p.publish(vec![ep("127.0.1.1:1")]);
        drop(p);
        assert!(w.has_changed().is_err(), "closed");
        assert_eq!(w.borrow().len(), 1, "the last set stays readable");
    }
}
