//! Typed errors of ha-mq and the classification of RocketMQ client failures.
//!
//! The client's errors carry a canonical descriptor (`transport.connection.failed`,
//! `transport.response.timeout`, `broker.topic.not_found`, ...) and, for a broker's refusal, the
//! broker's response code; the outermost descriptor is often generic ("Argument is invalid" for
//! a missing route), so [`classify`] walks the whole source chain and keeps the deepest
//! descriptor: the root cause. Nothing here looks at an error's text.

use std::fmt;
use std::time::Duration;

use ha_core::{ErrorClass, HaError};
use rocketmq_client_rust::ClientError;
use rocketmq_error::{CanonicalCondition, ErrorDescriptor};

/// Broker response codes (RocketMQ remoting `ResponseCode`) this crate acts on.
pub mod codes {
    /// `SYSTEM_ERROR`.
    pub const SYSTEM_ERROR: i32 = 1;
    /// `SYSTEM_BUSY`: the broker's queue is full (flow control); nothing was stored.
    pub const SYSTEM_BUSY: i32 = 2;
    /// `MESSAGE_ILLEGAL`: the message is malformed (topic, properties).
    pub const MESSAGE_ILLEGAL: i32 = 13;
    /// `SERVICE_NOT_AVAILABLE`: the broker is shutting down or its store is not writable.
    pub const SERVICE_NOT_AVAILABLE: i32 = 14;
    /// `NO_PERMISSION`: the broker does not take writes (write permission off).
    pub const NO_PERMISSION: i32 = 16;
    /// `TOPIC_NOT_EXIST`.
    pub const TOPIC_NOT_EXIST: i32 = 17;
}

/// What a failed send attempt was, read from the client's error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cause {
    /// The class: `NotSent` (never reached a broker: no connection, no route), `Refused` (a
    /// broker answered and stored nothing), `MaybeSent` (written, no answer), `Final` (the
    /// message itself is wrong; another cluster would refuse it too).
    pub class: ErrorClass,
    /// The root cause's canonical code (`transport.connection.failed`, ...).
    pub code: &'static str,
    /// The broker's response code, when a broker answered.
    pub broker_code: Option<i32>,
    /// The code of a client exception deep in the chain (`17`: the topic's route was not
    /// found, e.g. its broker is gone from the name server), when there is one.
    pub client_code: Option<i32>,
    /// The client's display of the root cause (for logs).
    pub message: String,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)?;
        if let Some(code) = self.broker_code {
            write!(f, " (broker code {code})")?;
        }
        if let Some(code) = self.client_code {
            write!(f, " (client code {code})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The descriptor of one link of an error chain, if it is a RocketMQ error.
fn descriptor_of(err: &(dyn std::error::Error + 'static)) -> Option<&'static ErrorDescriptor> {
    if let Some(e) = err.downcast_ref::<ClientError>() {
        return Some(e.descriptor());
    }
    err.downcast_ref::<rocketmq_error::Error>()
        .map(|e| e.descriptor())
}

/// Reads a client error: the deepest RocketMQ descriptor of its chain (the root cause), any
/// broker response code on the way, an I/O error kind at the bottom.
pub fn classify(err: &ClientError) -> Cause {
    let mut root = err.descriptor();
    let mut root_msg = err.to_string();
    let mut broker_code = err.broker_response_code();
    let mut io_kind = None;
    let mut client_code = None;
    let mut chain = vec![root_msg.clone()];
    let mut current: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = current.source() {
        let text = next.to_string();
        if chain.last() != Some(&text) {
            chain.push(text.clone());
        }
        if let Some(d) = descriptor_of(next) {
            root = d;
            root_msg = text;
        }
        if let Some(c) = next.downcast_ref::<ClientError>() {
            broker_code = broker_code.or(c.broker_response_code());
        }
        if let Some(c) = next.downcast_ref::<rocketmq_client_rust::MQClientException>() {
            client_code = Some(c.response_code());
        }
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        current = next;
    }
    let code = match client_code {
        // The client's descriptor says "argument invalid"; the cause is no route.
        Some(codes::TOPIC_NOT_EXIST) if broker_code.is_none() => "route.not_found",
        _ => root.code().as_str(),
    };
    let class = match client_code {
        // The route was not found: nothing was sent (the generic "argument invalid" above it
        // says nothing more).
        Some(codes::TOPIC_NOT_EXIST) if broker_code.is_none() => ErrorClass::NotSent,
        _ => class_of(code, root.condition(), broker_code, io_kind),
    };
    // The root cause's text, then what lies below it (a non-RocketMQ error at the bottom).
    let below: Vec<&String> = chain
        .iter()
        .skip_while(|t| **t != root_msg)
        .skip(1)
        .collect();
    let message = if below.is_empty() {
        root_msg
    } else {
        format!(
            "{root_msg}: {}",
            below
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(": ")
        )
    };
    Cause {
        class,
        code,
        broker_code,
        client_code,
        message,
    }
}

fn class_of(
    code: &str,
    condition: CanonicalCondition,
    broker_code: Option<i32>,
    io_kind: Option<std::io::ErrorKind>,
) -> ErrorClass {
    use std::io::ErrorKind as K;
    if let Some(b) = broker_code {
        // A broker answered: nothing was stored. A malformed message is refused everywhere.
        return match b {
            codes::MESSAGE_ILLEGAL => ErrorClass::Final,
            _ if code == "broker.message.too_large" || code == "broker.message.invalid" => {
                ErrorClass::Final
            }
            _ => ErrorClass::Refused,
        };
    }
    match code {
        "transport.connection.failed" | "transport.dns.failed" => {
            // A connect that failed sent nothing; a connection that broke under a request
            // may have delivered it.
            match io_kind {
                Some(K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof) => {
                    ErrorClass::MaybeSent
                }
                _ => ErrorClass::NotSent,
            }
        }
        "transport.write.timeout" | "transport.response.timeout" => ErrorClass::MaybeSent,
        "broker.message.too_large" | "broker.message.invalid" => ErrorClass::Final,
        _ => match condition {
            CanonicalCondition::DeadlineExceeded | CanonicalCondition::Cancelled => {
                ErrorClass::MaybeSent
            }
            // No route, no broker address, a client not started: nothing left the process.
            CanonicalCondition::NotFound
            | CanonicalCondition::Unavailable
            | CanonicalCondition::FailedPrecondition
            | CanonicalCondition::ResourceExhausted => ErrorClass::NotSent,
            // The message was validated before sending; the client's own "invalid argument"
            // covers routing failures too (no queue to pick). Not stored: try elsewhere.
            CanonicalCondition::InvalidArgument => ErrorClass::NotSent,
            // Anything else: the request may have left; say so rather than guess.
            _ => ErrorClass::MaybeSent,
        },
    }
}

/// Why an [`HaProducer`](crate::HaProducer) refused or failed a send, or failed to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqError {
    /// The configuration is invalid (names the field).
    #[error(transparent)]
    Config(#[from] ha_core::ConfigError),
    /// The message is invalid before anything is sent (an empty or malformed topic, ...).
    #[error("invalid message: {why}")]
    InvalidMessage {
        /// What is wrong.
        why: String,
    },
    /// The message body is larger than the producer's limit.
    #[error("message of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// No name server of a cluster answered at start-up.
    #[error("cluster {idc}: no name server reachable ({addrs}): {why}")]
    NameServerUnreachable {
        /// The cluster's IDC.
        idc: String,
        /// The name servers tried.
        addrs: String,
        /// The last failure.
        why: String,
    },
    /// The client failed to start for a cluster.
    #[error("cluster {idc}: producer failed to start: {cause}")]
    Start {
        /// The cluster's IDC.
        idc: String,
        /// The root cause.
        cause: Cause,
    },
    /// A broker refused the message for good (malformed, too large for the broker): another
    /// cluster would refuse it too, so it was not retried there.
    #[error("cluster {idc}: message refused: {cause}")]
    Refused {
        /// The cluster's IDC.
        idc: String,
        /// The root cause.
        cause: Cause,
    },
    /// Every cluster failed and none may have stored the message: it was not sent. `attempts`
    /// holds each cluster's root cause, in the order tried.
    #[error("no cluster took the message: {}", Attempts(attempts))]
    Unavailable {
        /// `(idc, cause)` per attempt.
        attempts: Vec<(String, Cause)>,
    },
    /// The send may have been stored (a write went unanswered) and no other cluster
    /// acknowledged it: check (the message's key) before repeating it. Converts to
    /// [`HaError::OutcomeUnknown`].
    #[error("outcome unknown for message key {key}: {}", Attempts(attempts))]
    OutcomeUnknown {
        /// The message's key (dedupe key).
        key: String,
        /// `(idc, cause)` per attempt.
        attempts: Vec<(String, Cause)>,
    },
    /// The caller's deadline passed before any cluster acknowledged the message.
    #[error("deadline of {deadline:?} exceeded for message key {key} after {} attempt(s){}", attempts.len(), if *maybe_sent { " (one may have been stored)" } else { "" })]
    DeadlineExceeded {
        /// The deadline.
        deadline: Duration,
        /// The message's key.
        key: String,
        /// True when an attempt may have stored it.
        maybe_sent: bool,
        /// `(idc, cause)` per attempt.
        attempts: Vec<(String, Cause)>,
    },
    /// Every cluster failed and the spool could not take the message either.
    #[error("no cluster took the message and the spool refused it: {source}")]
    Spool {
        /// The spool's failure (full, I/O).
        #[source]
        source: crate::spool::SpoolError,
        /// `(idc, cause)` per cluster attempt before the spool.
        attempts: Vec<(String, Cause)>,
    },
    /// The client runtime could not be built (threads, its configuration).
    #[error("{why}")]
    Runtime {
        /// What failed.
        why: String,
    },
    /// The producer was shut down.
    #[error("producer is shut down")]
    Closed,
}

struct Attempts<'a>(&'a [(String, Cause)]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no attempt");
        }
        for (i, (idc, cause)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{idc}: {cause}")?;
        }
        Ok(())
    }
}

impl MqError {
    /// True for [`MqError::OutcomeUnknown`] and a [`MqError::DeadlineExceeded`] with an
    /// attempt that may have stored the message.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            MqError::OutcomeUnknown { .. }
                | MqError::DeadlineExceeded {
                    maybe_sent: true,
                    ..
                }
        )
    }

    /// The root causes of the cluster attempts, in order (empty for errors before sending).
    pub fn attempts(&self) -> &[(String, Cause)] {
        match self {
            MqError::Unavailable { attempts }
            | MqError::OutcomeUnknown { attempts, .. }
            | MqError::DeadlineExceeded { attempts, .. }
            | MqError::Spool { attempts, .. } => attempts,
            _ => &[],
        }
    }
}

impl From<MqError> for HaError {
    fn from(err: MqError) -> HaError {
        match err {
            MqError::Config(c) => HaError::Config(c),
            MqError::DeadlineExceeded {
                deadline,
                maybe_sent,
                attempts,
                ..
            } => HaError::DeadlineExceeded {
                deadline,
                attempts: u32::try_from(attempts.len()).unwrap_or(u32::MAX),
                maybe_sent,
            },
            e @ MqError::OutcomeUnknown { .. } => HaError::OutcomeUnknown {
                endpoint: None,
                source: Box::new(e),
            },
            e => HaError::backend(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn classes_of_codes() {
        let c = |code, cond, b, io| class_of(code, cond, b, io);
        use CanonicalCondition as C;
        assert_eq!(
            c("transport.connection.failed", C::Unavailable, None, None),
            ErrorClass::NotSent
        );
        assert_eq!(
            c(
                "transport.connection.failed",
                C::Unavailable,
                None,
                Some(std::io::ErrorKind::ConnectionReset)
            ),
            ErrorClass::MaybeSent
        );
        assert_eq!(
            c(
                "transport.response.timeout",
                C::DeadlineExceeded,
                None,
                None
            ),
            ErrorClass::MaybeSent
        );
        assert_eq!(
            c("broker.operation.failed", C::Internal, Some(2), None),
            ErrorClass::Refused
        );
        assert_eq!(
            c("broker.operation.failed", C::Internal, Some(13), None),
            ErrorClass::Final
        );
        assert_eq!(
            c("route.cluster.not_found", C::NotFound, None, None),
            ErrorClass::NotSent
        );
        assert_eq!(
            c("something.else", C::Internal, None, None),
            ErrorClass::MaybeSent
        );
    }

    #[test]
    fn outcome_unknown_converts_to_ha_error() {
        let e = MqError::OutcomeUnknown {
            key: "k1".into(),
            attempts: vec![(
                "bj-a".into(),
                Cause {
                    class: ErrorClass::MaybeSent,
                    code: "transport.response.timeout",
                    broker_code: None,
                    client_code: None,
                    message: "timed out".into(),
                },
            )],
        };
        assert!(e.is_outcome_unknown());
        assert!(e.to_string().contains("bj-a: transport.response.timeout"));
        let h: HaError = e.into();
        assert!(h.is_outcome_unknown());
    }
}
