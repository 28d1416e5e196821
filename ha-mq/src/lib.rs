//! # ha-mq (stub: not built yet)
//!
//! RocketMQ producer and consumer over two IDC clusters that back each other up. **This crate
//! is a documented stub**: its issue is not open yet; nothing here works, and
//! `rocketmq-client-rust` is deliberately kept out of the build until then (it takes 20–25
//! minutes to build cold).
//!
//! The planned design, on `ha-core`'s pieces: a producer per IDC cluster chosen by locality and
//! health (its own circuit state instead of the transport's hard-coded 30 s block), every message
//! keyed so an unknown outcome can be retried on the other cluster without silent loss or
//! unbounded duplicates; a consumer on both clusters with dedupe by key; events and metrics
//! through [`ha_core::EventBus`].
#![forbid(unsafe_code)]
