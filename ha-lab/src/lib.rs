//! Real servers and faults for tests, drills and demos of the `ha-*` crates.
//!
//! Everything here binds only `127.x.y.z` addresses and non-standard ports, so it never collides
//! with the machine's own services. The modules:
//!
//! - [`dns`]: a per-region authoritative DNS server (hickory-server) whose records and failure
//!   mode change at run time.
//! - [`proxy`]: a TCP fault proxy (latency, blackhole, reset) switchable at run time.
//! - [`http`]: a tiny HTTP/1.1 backend answering `GET /who`.
//! - [`process`]: a supervisor for external server processes (kill, freeze, thaw, restart by pid).
//! - [`partition`]: nftables partitions between IDC address ranges.
//! - [`cgroup`]: processes placed in an IDC (a cgroup per IDC), cut by partitions like its
//!   addresses.
//! - [`redis`]: Redis + Sentinel across three IDCs ([`redis::RedisLab`]).
//! - [`rocketmq`]: a RocketMQ name server and broker per IDC, two independent clusters
//!   ([`rocketmq::RocketMqLab`]).
//! - [`stack`] (feature `mariadb`): Redis, MariaDB and RocketMQ together for the example
//!   membership service ([`stack::Stack`]), with its configuration files and faults by role.
//! - [`lab`]: the whole default lab ([`Lab`]), its `lab.json` manifest and its control socket.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod control;
pub mod dns;
mod error;
pub mod http;
pub mod lab;
mod listener;
#[cfg(feature = "mariadb")]
pub mod mariadb;
pub mod partition;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod rocketmq;
#[cfg(feature = "mariadb")]
pub mod stack;

pub use error::LabError;
pub use lab::{Lab, LabOptions};
