//! `LocalityBalance`: a `Service` over the live [`EndpointSet`](crate::EndpointSet) of one
//! dependency that keeps calls in the local IDC, spills to the same region and then to other
//! regions only as healthy capacity requires, and picks inside a tier by power of two choices over
//! peak-EWMA latency.
//!
//! How one pick works (all lock-free on the hot path; one `arc-swap` load of the current picture):
//! 1. If discovery published a new set, an ejection ended, a failback hold expired, a health
//!    verdict changed, or an operator drained an IDC, the picture is recomputed first (rare).
//! 2. An endpoint whose ejection is over and that is not being probed gets this call as its probe.
//! 3. Otherwise a tier is drawn by its share ([`select::tier_shares`]); in panic mode the pool is
//!    every non-drained endpoint.
//! 4. Two distinct endpoints of the pool are drawn (skipping those the current
//!    [`Failover`](crate::failover::Failover) attempt avoids); the one with the lower
//!    `ewma_latency × (in_flight + 1)` wins.
//!
//! Outcomes feed [`health`](crate::health): an error, or a call dropped before it finished (a
//! per-try timeout), is a failure. Turn application-level failures (an HTTP 503) into `Err` in the
//! endpoint service to have them count.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_core::BoxError> {
//! use ha_core::balance::LocalityBalance;
//! use ha_core::{Control, EventBus, Endpoint, Topology, discovery::static_endpoints};
//! use tower::{service_fn, Service, ServiceExt};
//!
//! let topo = Topology::load("topology.toml")?;
//! let events = EventBus::default();
//! let control = Control::new(&topo, events.clone());
//! let endpoints = static_endpoints(&topo, "profile")?;
//! let mut svc = LocalityBalance::builder(&topo, endpoints)
//!     .control(control)
//!     .events(events)
//!     .build(|ep: &Endpoint| {
//!         let addr = ep.addr;
//!         service_fn(move |req: String| async move { Ok::<_, std::io::Error>(format!("{addr}: {req}")) })
//!     });
//! let answer = svc.ready().await?.call("hello".to_string()).await?;
//! # let _ = answer; Ok(()) }
//! ```

mod future;
mod layer;
mod rng;
pub mod select;
mod service;

pub use future::ResponseFuture;
pub use layer::LocalityBalanceLayer;
pub use rng::{ForkRng, PickRng};
pub use service::{Builder, EndpointView, LocalityBalance, MakeEndpoint, View};
