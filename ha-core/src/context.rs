//! [`HaContext`]: the topology, the event bus and the drain handle of one client, handing out
//! discovery, balancers, failover layers and master watches already wired to them.
//!
//! Without it every backend and every service passes the same three things to every builder;
//! with it a dependency's stack is a few lines, and every part of it reports on one
//! [`EventBus`] and obeys one [`Control`]:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ha_core::HaError> {
//! use ha_core::balance::LocalityBalanceLayer;
//! use ha_core::{Endpoint, HaContext, Topology};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let topology = Topology::from_toml_str(r#"
//! local_idc = "bj-a"
//! [[regions]]
//! name = "north"
//! resolvers = ["127.0.1.53"]
//! [[idcs]]
//! name = "bj-a"
//! region = "north"
//! cidrs = ["127.0.1.0/24"]
//! [dependencies.profile]
//! static_addrs = ["127.0.1.20:8080"]
//! "#, "inline.toml")?;
//! let ctx = HaContext::new(topology);
//! let mut client = ServiceBuilder::new()
//!     .layer(ctx.failover("profile")?.layer())
//!     .layer(LocalityBalanceLayer::new(ctx.balancer("profile").await?))
//!     .service(|ep: &Endpoint| {
//!         let addr = ep.addr;
//!         tower::service_fn(move |req: String| async move {
//!             Ok::<_, std::io::Error>(format!("{req} via {addr}"))
//!         })
//!     });
//! let answer = client.ready().await?.call("GET /who".to_string()).await?;
//! assert_eq!(answer, "GET /who via 127.0.1.20:8080");
//! ctx.control().drain("bj-a")?; // every balancer of this context moves away from bj-a
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::balance::{Builder as BalanceBuilder, LocalityBalance};
use crate::config::{Source, Topology};
use crate::control::Control;
use crate::discovery::{EndpointWatch, Publisher, static_endpoints};
use crate::dns::DnsDiscovery;
use crate::error::HaError;
use crate::events::EventBus;
use crate::failover::{Failover, FailoverBuilder, NotIdempotent};
use crate::master::MasterWatch;

/// The shared parts of one client: [`Topology`], [`EventBus`], [`Control`], and the discovery
/// of each dependency (started once, on first use, and kept running for the context's
/// lifetime). `Clone` shares all of it.
#[derive(Clone)]
pub struct HaContext {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Arc<Topology>,
    events: EventBus,
    control: Control,
    discoveries: tokio::sync::Mutex<HashMap<Arc<str>, Discovery>>,
    masters: Mutex<HashMap<Arc<str>, MasterWatch>>,
    publishers: Mutex<HashMap<Arc<str>, Publisher>>,
}

/// The discovery of one dependency: its endpoint watch, and the DNS task when it has one.
#[derive(Clone)]
pub struct Discovery {
    watch: EndpointWatch,
    dns: Option<Arc<DnsDiscovery>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("set", &*self.watch.borrow())
            .field("dns", &self.dns.is_some())
            .finish()
    }
}

impl Discovery {
    /// A receiver of the dependency's endpoint sets.
    pub fn watch(&self) -> EndpointWatch {
        self.watch.clone()
    }

    /// The DNS discovery, for a DNS dependency.
    pub fn dns(&self) -> Option<&DnsDiscovery> {
        self.dns.as_deref()
    }
}

impl std::fmt::Debug for HaContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaContext")
            .field("local_idc", &self.inner.topology.local_idc())
            .finish_non_exhaustive()
    }
}

impl HaContext {
    /// A context over `topology` with a new event bus (1 024 events) and drain handle.
    pub fn new(topology: impl Into<Arc<Topology>>) -> HaContext {
        Self::with_events(topology, EventBus::default())
    }

    /// A context over `topology` publishing on `events`.
    pub fn with_events(topology: impl Into<Arc<Topology>>, events: EventBus) -> HaContext {
        let topology = topology.into();
        let control = Control::new(&topology, events.clone());
        HaContext {
            inner: Arc::new(Inner {
                topology,
                events,
                control,
                discoveries: tokio::sync::Mutex::new(HashMap::new()),
                masters: Mutex::new(HashMap::new()),
                publishers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Loads the topology file at `path` (see [`Topology::load`]).
    pub fn load(path: impl AsRef<Path>) -> Result<HaContext, HaError> {
        Ok(Self::new(Topology::load(path)?))
    }

    /// The topology.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.inner.topology
    }

    /// The event bus every part of this context publishes on.
    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    /// The drain handle every balancer of this context obeys.
    pub fn control(&self) -> &Control {
        &self.inner.control
    }

    /// The discovery of `dependency`: DNS per region for a DNS dependency (started on the first
    /// call and shared by later ones), the fixed set for `static_addrs`. An unknown dependency
    /// is a [`HaError::Config`] error naming it.
    pub async fn discover(&self, dependency: &str) -> Result<Discovery, HaError> {
        let dep = self.inner.topology.require_dependency(dependency)?;
        let mut map = self.inner.discoveries.lock().await;
        if let Some(d) = map.get(dependency) {
            return Ok(d.clone());
        }
        let discovery = match &dep.source {
            Source::Static(_) => Discovery {
                watch: static_endpoints(&self.inner.topology, dependency)?,
                dns: None,
            },
            _ => {
                let dns = DnsDiscovery::start(
                    self.inner.topology.clone(),
                    dependency,
                    self.inner.events.clone(),
                )
                .await?;
                Discovery {
                    watch: dns.watch(),
                    dns: Some(Arc::new(dns)),
                }
            }
        };
        map.insert(dep.name.clone(), discovery.clone());
        Ok(discovery)
    }

    /// A [`LocalityBalance`] builder for `dependency`, over its discovery, with this context's
    /// drain handle and event bus and the dependency's settings.
    pub async fn balancer(&self, dependency: &str) -> Result<BalanceBuilder, HaError> {
        let discovery = self.discover(dependency).await?;
        Ok(self.balancer_over(discovery.watch()))
    }

    /// A [`LocalityBalance`] builder over any endpoint watch (a backend's own publisher, such
    /// as a Sentinel replica watcher), wired to this context.
    pub fn balancer_over(&self, watch: EndpointWatch) -> BalanceBuilder {
        LocalityBalance::builder(&self.inner.topology, watch)
            .control(self.inner.control.clone())
            .events(self.inner.events.clone())
    }

    /// A [`Failover`] builder labelled with `dependency` (the defaults of
    /// [`Failover::builder`]). An unknown dependency is a [`HaError::Config`] error.
    pub fn failover(&self, dependency: &str) -> Result<FailoverBuilder<NotIdempotent>, HaError> {
        let dep = self.inner.topology.require_dependency(dependency)?;
        Ok(Failover::builder().dependency(dep.name.to_string()))
    }

    /// The [`MasterWatch`] of `dependency`, shared by every caller of this context, classifying
    /// masters into this topology's IDCs and publishing on this context's bus. Any name is
    /// accepted (a backend may follow a master that is not a configured dependency).
    pub fn master_watch(&self, dependency: &str) -> MasterWatch {
        let mut map = self.inner.masters.lock();
        if let Some(w) = map.get(dependency) {
            return w.clone();
        }
        let w = MasterWatch::new(dependency, self.inner.events.clone())
            .with_classifier(self.inner.topology.classifier().clone());
        map.insert(dependency.into(), w.clone());
        w
    }

    /// A [`Publisher`] for a set a backend discovers itself (Sentinel replicas, RocketMQ
    /// brokers), named `name`, publishing on this context's bus; one per name, shared by every
    /// caller. Feed its [`Publisher::watch`] to [`HaContext::balancer_over`].
    pub fn publisher(&self, name: &str) -> Publisher {
        let mut map = self.inner.publishers.lock();
        if let Some(p) = map.get(name) {
            return p.clone();
        }
        let p = Publisher::new(name, self.inner.events.clone());
        map.insert(name.into(), p.clone());
        p
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const TOPO: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[dependencies.profile]
static_addrs = ["127.0.1.20:8080", "127.0.2.20:8080"]
"#;

    #[tokio::test]
    async fn hands_out_wired_parts_and_shares_them() {
        let ctx = HaContext::new(Topology::from_toml_str(TOPO, "t.toml").unwrap());
        let a = ctx.discover("profile").await.unwrap();
        let b = ctx.discover("profile").await.unwrap();
        assert!(a.watch().same_channel(&b.watch()));
        assert_eq!(a.watch().borrow().len(), 2);
        let m1 = ctx.master_watch("cache");
        let m2 = ctx.master_watch("cache");
        let got = m1.switch("127.0.2.9:6379".parse().unwrap(), "initial");
        assert_eq!(m2.current().unwrap().generation, got.generation);
        assert_eq!(got.idc_name(), "bj-b");
    }

    #[tokio::test]
    async fn unknown_dependency_is_a_config_error_naming_it() {
        let ctx = HaContext::new(Topology::from_toml_str(TOPO, "t.toml").unwrap());
        let err = ctx.discover("nope").await.unwrap_err();
        assert!(err.is_config(), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = ctx.failover("nope").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn drain_reaches_the_balancers_it_built() {
        use tower::{Service, ServiceExt};
        let ctx = HaContext::new(Topology::from_toml_str(TOPO, "t.toml").unwrap());
        let mut bal =
            ctx.balancer("profile")
                .await
                .unwrap()
                .seed(1)
                .build(|ep: &crate::Endpoint| {
                    let addr = ep.addr;
                    tower::service_fn(move |()| async move { Ok::<_, std::io::Error>(addr) })
                });
        let local: std::net::SocketAddr = "127.0.1.20:8080".parse().unwrap();
        assert_eq!(bal.ready().await.unwrap().call(()).await.unwrap(), local);
        ctx.control().drain("bj-a").unwrap();
        for _ in 0..20 {
            let got = bal.ready().await.unwrap().call(()).await.unwrap();
            assert_ne!(got, local);
        }
    }

    #[tokio::test]
    async fn a_backend_publisher_is_shared_and_feeds_a_balancer() {
        use tower::{Service, ServiceExt};
        let ctx = HaContext::new(Topology::from_toml_str(TOPO, "t.toml").unwrap());
        let replicas = ctx.publisher("cache-replicas");
        let c = ctx.topology().classifier().clone();
        let addr: std::net::SocketAddr = "127.0.2.21:6380".parse().unwrap();
        ctx.publisher("cache-replicas")
            .publish(vec![c.endpoint(addr).with_role(crate::Role::Replica)]);
        assert_eq!(replicas.current().version, 1, "one publisher per name");
        let mut bal = ctx
            .balancer_over(replicas.watch())
            .seed(1)
            .build(|ep: &crate::Endpoint| {
                let addr = ep.addr;
                tower::service_fn(move |()| async move { Ok::<_, std::io::Error>(addr) })
            });
        assert_eq!(bal.ready().await.unwrap().call(()).await.unwrap(), addr);
    }
}
