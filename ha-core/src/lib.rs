//! # ha-core
//!
//! The foundation of the ha-* crates: the configured [`Topology`] of regions and IDCs, per-region
//! DNS with background refresh ([`dns`]), IDC classification ([`locality`]), passive health
//! ([`health`]), locality-aware selection and the tower layers that put them on the call path
//! ([`balance`], [`failover`], [`fail_fast`]), one event stream ([`events`]) and one metrics
//! vocabulary ([`metrics_names`]), and the operator's [`Control`] handle.
//!
//! The data flow of one call: `Failover` (deadline, budget, retries on another endpoint) →
//! `LocalityBalance` (tier by locality and health, then power of two choices over peak-EWMA) →
//! the endpoint's service. Discovery runs in the background and only publishes
//! [`EndpointSet`]s; the call path never awaits DNS.
#![forbid(unsafe_code)]

pub mod attempt;
pub mod balance;
pub mod config;
pub mod context;
pub mod control;
pub mod discovery;
pub mod dns;
pub mod error;
pub mod events;
pub mod fail_fast;
pub mod failover;
pub mod generation;
pub mod health;
pub mod locality;
pub mod master;
pub mod metrics_names;

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use config::{
    BalanceSettings, Dependency, DnsSettings, HealthSettings, Idc, Region, Source, Topology,
};
pub use context::HaContext;
pub use control::Control;
pub use discovery::{EndpointSet, EndpointWatch, Freshness, Publisher};
pub use error::{BoxError, Classify, ConfigError, DefaultClassifier, ErrorClass, HaError};
pub use events::{EventBus, TopologyEvent};
pub use generation::{Generation, GenerationCounter};
pub use locality::{Endpoint, EndpointMeta, IdcClassifier, Locality, Placement, Role};
pub use master::{Master, MasterWatch};
