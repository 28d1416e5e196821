//! # membership-service
//!
//! The example membership service: every ha-* crate in one small axum service. MySQL
//! (ha-mysql) holds the members, Redis (ha-redis, through Sentinel) caches them, RocketMQ
//! (ha-mq, one cluster per IDC) carries `member.updated`, the service's own consumer writes
//! the history, ha-ratelimit limits the clients, and ha-core gives the topology, the drain
//! control and the events. See the README.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod demo;
pub mod http;
pub mod job;
pub mod lease;
pub mod model;
pub mod store;
pub mod topology;

pub use app::{Service, StartError};
pub use config::ServiceConfig;
