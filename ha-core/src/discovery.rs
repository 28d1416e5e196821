//! Endpoint sets and how they reach the balancer: a `watch` channel of [`EndpointSet`]s, published
//! by a background task (DNS refresh, Sentinel or HA-master watcher) or fixed for static addresses.
//! The request path only reads the latest set; it never waits on discovery.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Source, Topology};
use crate::error::{ConfigError, HaError};
use crate::locality::Endpoint;

/// The current resolved endpoints of one dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSet {
    /// The dependency's name.
    pub dependency: Arc<str>,
    /// The endpoints, classified, in a stable order (sorted by address).
    pub endpoints: Arc<[Endpoint]>,
    /// Bumped by the publisher for every change.
    pub version: u64,
    /// True while the set comes from answers past their TTL (every resolver failing).
    pub stale: bool,
}

impl EndpointSet {
    /// An empty set for `dependency`.
    pub fn empty(dependency: impl Into<Arc<str>>) -> EndpointSet {
        EndpointSet {
            dependency: dependency.into(),
            endpoints: Arc::from(Vec::new()),
            version: 0,
            stale: false,
        }
    }

    /// A set of `endpoints`, sorted by address and deduplicated.
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
        }
    }

    /// True when there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
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
