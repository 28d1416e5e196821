//! # ha-mysql (stub: not built yet)
//!
//! MySQL/MariaDB pools that follow the HA-master switch. **This crate is a documented stub**: its
//! issue is not open yet; nothing here works.
//!
//! The planned design, on `ha-core`'s pieces:
//! - the writer follows a DNS name that the Raft-based HA-master system repoints: an
//!   [`ha_core::dns::DnsDiscovery`] of that name publishes the master's address; a change bumps a
//!   [`ha_core::GenerationCounter`];
//! - a deadpool `Manager` for `mysql_async` whose `recycle` refuses a connection of an older
//!   generation ([`ha_core::HaError::Fenced`]) and verifies `@@read_only = 0` on writer
//!   connections, so a planned switchover that makes the old primary read-only is left at once;
//! - reader pools per IDC with replication-lag checks, picked by
//!   [`ha_core::balance::LocalityBalance`];
//! - error classification (1290, 2013, 2006, 1317, 1950, connection refused) through
//!   [`ha_core::Classify`] for the [`ha_core::failover::Failover`] layer;
//! - `mysql_async` re-exported.
#![forbid(unsafe_code)]
