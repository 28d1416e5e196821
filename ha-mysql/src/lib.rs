//! # ha-mysql
//!
//! MySQL/MariaDB writer pools that follow the HA-master switch, on mysql_async and deadpool.
//!
//! In the "DNS + HA" model an HA system heartbeats the databases, promotes a replica when the
//! primary dies (or on a planned switchover) and repoints the primary's DNS name. mysql_async's
//! own pool keeps writing to the old address (a planned switchover is never recovered from: every
//! write answers 1290). This crate's part:
//!
//! - [`MysqlManager`], a deadpool `Manager`: `create` connects to the current primary, pinned
//!   to the address of the [`ha_core::Master`] snapshot it read, verifies `@@read_only = 0` and
//!   that the node does not replicate, and stamps the connection with that snapshot;
//!   `recycle` refuses a connection of an old generation ([`ha_core::MasterWatch::check`]), a
//!   broken one or one abandoned mid-statement, and re-checks the role at most once per
//!   `role_check_interval`.
//! - [`HaMysql`]: the writer pool and its follower. A change of the DNS answer, a nudge from a
//!   classified error (1290/1836 confirmed by `@@read_only`, a lost connection, a refused
//!   connect) or the periodic check re-resolves and re-checks; a new primary bumps the
//!   generation (`MasterWatch::switch`) and the whole pool turns over without a restart.
//!   Connections of an old generation are closed, never reused, even if the old primary comes
//!   back writable.
//! - [`HaMysql::write`]: one statement (or transaction) bounded by the caller's deadline,
//!   retried on the new primary only when it provably did not run; a lost connection or the
//!   deadline passing after sending is [`ha_core::HaError::OutcomeUnknown`].
//! - [`HaMysql::reader`]: a replica within a lag bound (`Seconds_Behind_Master`, checked by a
//!   watcher that publishes the qualifying replicas through an ha-core `Publisher`), picked by
//!   ha-core's `LocalityBalance` (same IDC, then same region, then the rest), else the primary;
//!   [`HaMysql::reader_after`] waits for the caller's own write (`MASTER_GTID_WAIT` with the
//!   GTID from [`last_gtid`]) or reads from the primary.
//! - [`MysqlClassifier`]: the [`ha_core::Classify`] of MySQL failures.
//!
//! `mysql_async` and `deadpool` are re-exported, so users need no second version.
#![forbid(unsafe_code)]

/// The README's example, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod client;
pub mod error;
pub mod manager;
pub mod reader;
pub mod settings;

pub use client::{Builder, HaMysql, WriteOptions, Writer, last_gtid};
pub use deadpool;
pub use error::{MysqlClassifier, MysqlError};
pub use manager::{HaConn, MysqlManager};
pub use mysql_async;
pub use reader::{ReadConn, ReplicaConn, ReplicaManager};
pub use settings::MysqlSettings;
