//! # ha-redis
//!
//! A Redis client that follows Sentinel: the master is the **majority** answer of every
//! sentinel, verified with `ROLE` before any command goes to it; a subscription on every
//! sentinel follows failovers by their events (with a polling safety net); and writes issued
//! while a failover is in progress are **held** and sent to the new master once it is verified,
//! so a planned `SENTINEL FAILOVER` loses no acknowledged write.
//!
//! - [`HaRedis`] / [`Builder`]: start-up from a list of sentinels and a master name (or a
//!   topology dependency, [`HaRedis::builder_from_context`]); typed, bounded start-up errors
//!   ([`StartupError`]).
//! - [`MasterHandle`]: `Clone` + [`redis::aio::ConnectionLike`], so [`redis::AsyncCommands`]
//!   and [`redis::Pipeline`] work unchanged; typed [`MasterHandle::query`].
//! - [`ReplicaHandle`] ([`HaRedis::replicas`], with a topology): reads from the nearest
//!   healthy replica through ha-core's `LocalityBalance`.
//! - [`command`]: which commands are reads; [`event`]: Sentinel's events; [`vote`]: the
//!   majority; [`error`]: how `HaError`s travel inside `RedisError`s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ha_redis::redis::AsyncCommands;
//! let sentinels = ["127.0.1.10:26400".parse()?, "127.0.2.10:26401".parse()?];
//! let client = ha_redis::HaRedis::builder(sentinels, "members")
//!     .timeout(std::time::Duration::from_secs(1))
//!     .build()
//!     .await?;
//! let mut master = client.master();
//! let _: () = master.set("k", "v").await?;
//! let v: String = master.get("k").await?;
//! // Or with typed errors:
//! let n: i64 = client.master().query(ha_redis::redis::cmd("INCR").arg("n")).await?;
//! # let _ = (v, n); Ok(()) }
//! ```
#![forbid(unsafe_code)]

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod client;
pub mod command;
pub mod error;
pub mod event;
mod gate;
mod node;
pub mod replica;
pub mod vote;

pub use client::{Builder, HaRedis, MasterHandle, RedisSettings, Session, Stats};
pub use error::{RedisClassifier, StartupError};
pub use node::Credentials;
/// The `redis` crate this one is built on, so users need no second version.
pub use redis;
pub use replica::ReplicaHandle;
