//! # ha-mq
//!
//! RocketMQ over one cluster per IDC, the clusters backing each other up: a producer that
//! fails over within the caller's deadline and never loses a message silently, and a consumer
//! on every cluster that delivers each key once.
//!
//! - [`HaProducer`]: a `rocketmq-client-rust` producer per cluster (each with its own client
//!   identity), the local IDC's first. A failed or slow attempt (over
//!   [`ProducerConfig::attempt_timeout`]) moves the message to the next cluster within the
//!   deadline; the failed cluster is avoided for a growing, bounded time and then probed by one
//!   send through a fresh client (the client's transport locks a broker address out for 30 s
//!   after 5 failed connects; a new client escapes it), so traffic is back on the local cluster
//!   within about a second of its recovery.
//! - No silent loss: `send` is `Ok` only when a broker acknowledged the message (its
//!   [`SendReceipt`] says which IDC and the broker's status), or, with the spool on, when the
//!   message is durably in the local [`spool`]. An attempt written and not answered is
//!   [`MqError::OutcomeUnknown`] (converts to [`ha_core::HaError::OutcomeUnknown`]) when no
//!   other cluster took the message.
//! - Every message carries a key (the caller's or a generated one): the consumers' dedupe key.
//! - [`ProducerConfig::from_context`] and [`ConsumerConfig::from_context`] read a
//!   `kind = "rocketmq"` dependency of a ha-core topology ([`settings`]); the producer publishes
//!   cluster avoided/restored, spool growing and spool replayed events on the bus it is given.
//! - Errors name the root cause (the deepest descriptor of the client's error chain, the
//!   broker's response code), classified by [`error::classify`], never by text.
//!
//! `rocketmq-client-rust` is re-exported, so users need no second version.
#![forbid(unsafe_code)]

/// The README's example, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod consumer;
mod dedupe;
pub mod error;
mod producer;
mod runtime;
pub mod settings;
pub mod spool;

pub use consumer::{ConsumerConfig, ConsumerStats, Delivery, HaConsumer};
pub use error::{Cause, MqError};
pub use producer::{
    ClusterConfig, HaProducer, MAX_TOPIC_LEN, OutgoingMessage, ProducerConfig, SendReceipt,
    WARM_TAG, generate_key,
};
pub use rocketmq_client_rust;
pub use rocketmq_client_rust::SendStatus;
