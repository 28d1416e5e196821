//! # ha-redis (stub: not built yet)
//!
//! A Redis client that follows Sentinel failovers for multi-IDC services. **This crate is a
//! documented stub**: its issue is not open yet; nothing here works. It exists so the workspace
//! has its final shape and so `ha-core` is designed to fit it.
//!
//! The planned design, on `ha-core`'s pieces:
//! - a Sentinel watcher subscribed to `+switch-master` (and `+convert-to-slave`, `+sdown`) on
//!   **every** sentinel, plus a polling safety net, with the new master verified with `ROLE`
//!   before it is published: it bumps the dependency's [`ha_core::GenerationCounter`] and
//!   publishes [`ha_core::TopologyEvent::MasterSwitched`];
//! - master connections carry the generation they were made in; a connection of an older
//!   generation is fenced ([`ha_core::HaError::Fenced`]) rather than used, so no write reaches a
//!   demoted master that still acknowledges writes (the loss every client measured in `LAB.md`
//!   shows); `-READONLY` answers are classified as retryable after a switch;
//! - replica reads in the same IDC through [`ha_core::balance::LocalityBalance`] over an
//!   [`ha_core::EndpointWatch`] of replicas published by the watcher;
//! - `redis` (tokio-comp) re-exported, so users need no second version.
#![forbid(unsafe_code)]
