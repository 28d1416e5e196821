//! Errors: why start-up failed ([`StartupError`]), and how an [`HaError`] travels inside the
//! `redis::RedisError` that [`redis::aio::ConnectionLike`] must return.
//!
//! # The choice
//! `ConnectionLike` can only return `RedisError`, and redis 1.x offers no constructor for a
//! `RedisError` around an arbitrary error except through `std::io::Error`. So an error of
//! ours is returned as a `RedisError` of kind [`redis::ErrorKind::Io`] wrapping
//! `std::io::Error::other(HaError)` (io kind `Other`, so `is_connection_dropped()` stays
//! false); [`ha_error`] finds it again and [`into_ha_error`] turns any `RedisError` into an
//! `HaError`. Errors that Redis itself answered (`WRONGTYPE`, `NOSCRIPT`, ...) are passed
//! through unchanged, so code matching on `ErrorKind` keeps working. The typed methods of
//! [`crate::MasterHandle`] (`query`, `query_pipeline`) return `Result<T, HaError>` directly.
//!
//! ```
//! use ha_core::HaError;
//! let e = ha_redis::error::to_redis_error(HaError::Fenced { connection: 1, current: 2 });
//! assert!(ha_redis::error::ha_error(&e).is_some_and(HaError::is_fenced));
//! assert!(ha_redis::error::into_ha_error(e).is_fenced());
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Classify, DefaultClassifier, ErrorClass, HaError};
use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::vote::Answer;

/// Why [`crate::HaRedis`] could not start. Every variant names what was wrong; start-up is
/// bounded by its timeout, so none of them is a hang.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// The configuration is unusable (no sentinel, an empty master name, a bad topology entry).
    #[error("invalid ha-redis config: {0}")]
    Config(String),
    /// No sentinel answered.
    #[error("no sentinel reachable for master {master_name:?}: {}", list(errors))]
    NoSentinelReachable {
        /// The master name.
        master_name: String,
        /// Each sentinel and its error.
        errors: Vec<(SocketAddr, String)>,
    },
    /// Every sentinel that answered refused our credentials.
    #[error(
        "every sentinel refused the credentials for master {master_name:?}: {}",
        list(errors)
    )]
    SentinelAuth {
        /// The master name.
        master_name: String,
        /// Each sentinel and its error.
        errors: Vec<(SocketAddr, String)>,
    },
    /// A majority of the answering sentinels do not monitor a master of that name.
    #[error("unknown master name {master_name:?}: the sentinels do not monitor it")]
    UnknownMaster {
        /// The master name.
        master_name: String,
    },
    /// The sentinels disagree and no address has a majority.
    #[error("sentinels disagree about master {master_name:?} with no majority: {answers:?}")]
    NoMajority {
        /// The master name.
        master_name: String,
        /// Each sentinel and its answer.
        answers: Vec<(SocketAddr, Answer)>,
    },
    /// The master refused our Redis credentials.
    #[error("master {addr} refused the credentials: {reason}")]
    RedisAuth {
        /// The master the sentinels named.
        addr: SocketAddr,
        /// Its error.
        reason: String,
    },
    /// The node the sentinels named is not (or not yet) a master, or cannot be reached.
    #[error("master {addr} named by the sentinels could not be verified: {reason}")]
    NotVerified {
        /// The node.
        addr: SocketAddr,
        /// Its `ROLE`, or the error.
        reason: String,
    },
    /// Start-up did not finish within its bound.
    #[error("start-up of master {master_name:?} not done within {timeout:?} (last: {last})")]
    Timeout {
        /// The master name.
        master_name: String,
        /// The bound.
        timeout: Duration,
        /// The last problem seen.
        last: String,
    },
}

impl StartupError {
    /// True for [`StartupError::NoSentinelReachable`].
    pub fn is_no_sentinel_reachable(&self) -> bool {
        matches!(self, StartupError::NoSentinelReachable { .. })
    }
    /// True for [`StartupError::UnknownMaster`].
    pub fn is_unknown_master(&self) -> bool {
        matches!(self, StartupError::UnknownMaster { .. })
    }
    /// True for a refusal of credentials, by the sentinels or by the master.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            StartupError::SentinelAuth { .. } | StartupError::RedisAuth { .. }
        )
    }
    /// True for [`StartupError::NoMajority`].
    pub fn is_no_majority(&self) -> bool {
        matches!(self, StartupError::NoMajority { .. })
    }
}

impl From<StartupError> for HaError {
    fn from(e: StartupError) -> HaError {
        match e {
            StartupError::Config(reason) => {
                HaError::Config(ha_core::ConfigError::new("<ha-redis>", "", "", reason))
            }
            other => HaError::backend(other),
        }
    }
}

/// A durable write ([`crate::MasterHandle::durable`]) that the master executed but fewer
/// replicas than asked acknowledged within the timeout (`WAIT`). It comes inside
/// [`HaError::OutcomeUnknown`]: the write took effect on the master, and a failover now could
/// lose it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("write not acknowledged by {needed} replica(s) within {timeout:?}: {acked} did")]
#[non_exhaustive]
pub struct NotDurable {
    /// Replicas asked for.
    pub needed: usize,
    /// Replicas that acknowledged.
    pub acked: usize,
    /// The `WAIT` timeout.
    pub timeout: Duration,
}

fn list(errors: &[(SocketAddr, String)]) -> String {
    errors
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Wraps an [`HaError`] in a `RedisError` (see the [module docs](self)).
pub fn to_redis_error(err: HaError) -> RedisError {
    RedisError::from(std::io::Error::other(err))
}

/// The [`HaError`] inside a `RedisError` made by [`to_redis_error`], if it is one.
pub fn ha_error(err: &RedisError) -> Option<&HaError> {
    let source = std::error::Error::source(err)?;
    // redis keeps the wrapped error as `Arc<dyn Error + Send + Sync>` and returns the `Arc`
    // itself as the source; look through it (and through a bare io::Error, to be safe).
    let io = source
        .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()
        .and_then(|a| (**a).downcast_ref::<std::io::Error>())
        .or_else(|| source.downcast_ref::<std::io::Error>())?;
    io.get_ref()?.downcast_ref::<HaError>()
}

/// Any `RedisError` as an [`HaError`]: the one inside, else [`HaError::Backend`] around it.
pub fn into_ha_error(err: RedisError) -> HaError {
    if let Some(inner) = ha_error(&err) {
        return clone_ha(inner);
    }
    HaError::backend(err)
}

/// `HaError` is not `Clone`; rebuild the kinds we produce, keeping their data.
fn clone_ha(e: &HaError) -> HaError {
    match e {
        HaError::DeadlineExceeded {
            deadline,
            attempts,
            maybe_sent,
        } => HaError::DeadlineExceeded {
            deadline: *deadline,
            attempts: *attempts,
            maybe_sent: *maybe_sent,
        },
        HaError::Fenced {
            connection,
            current,
        } => HaError::Fenced {
            connection: *connection,
            current: *current,
        },
        HaError::NoHealthyEndpoint { dependency } => HaError::NoHealthyEndpoint {
            dependency: dependency.clone(),
        },
        HaError::OutcomeUnknown { endpoint, source } => HaError::OutcomeUnknown {
            endpoint: *endpoint,
            source: source.to_string().into(),
        },
        other => HaError::backend(other.to_string()),
    }
}

/// True for `-READONLY` and `-MASTERDOWN`: the node is not (or no longer) a usable master,
/// and the command was not executed.
pub fn is_not_master(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// True when the failure was the connection's (reset, EOF, broken pipe, timeout), not an
/// answer of the server's.
pub fn is_transport(err: &RedisError) -> bool {
    ha_error(err).is_none()
        && (err.is_io_error() || err.is_connection_dropped() || err.is_timeout())
}

/// The classifier of ha-redis: `-READONLY`, `-MASTERDOWN` and `-NOREPLICAS` are
/// [`ErrorClass::Refused`] (not executed, the node is alive), transport failures
/// [`ErrorClass::MaybeSent`], connect refusals [`ErrorClass::NotSent`], an `HaError` inside a
/// `RedisError` its own class, anything else [`DefaultClassifier`]'s answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisClassifier;

impl Classify for RedisClassifier {
    fn classify(&self, err: &(dyn std::error::Error + 'static)) -> ErrorClass {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<RedisError>() {
                if let Some(ha) = ha_error(r) {
                    return DefaultClassifier.classify(ha);
                }
                if is_not_master(r) || r.code() == Some("NOREPLICAS") {
                    return ErrorClass::Refused;
                }
                if r.is_connection_refusal() {
                    return ErrorClass::NotSent;
                }
                if is_transport(r) {
                    return ErrorClass::MaybeSent;
                }
                return ErrorClass::Answered;
            }
            cur = e.source();
        }
        DefaultClassifier.classify(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ha_errors_round_trip_through_redis_errors() {
        let e = to_redis_error(HaError::DeadlineExceeded {
            deadline: Duration::from_secs(1),
            attempts: 2,
            maybe_sent: false,
        });
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(!e.is_connection_dropped());
        assert!(!is_transport(&e));
        assert!(ha_error(&e).is_some_and(HaError::is_deadline_exceeded));
        assert_eq!(RedisClassifier.classify(&e), ErrorClass::Final);
        let back = into_ha_error(e);
        assert!(matches!(
            back,
            HaError::DeadlineExceeded {
                attempts: 2,
                maybe_sent: false,
                ..
            }
        ));
        let fenced = to_redis_error(HaError::Fenced {
            connection: 1,
            current: 2,
        });
        assert_eq!(RedisClassifier.classify(&fenced), ErrorClass::Refused);
        let plain = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(ha_error(&plain).is_none());
        assert!(is_transport(&plain));
        assert_eq!(RedisClassifier.classify(&plain), ErrorClass::MaybeSent);
        assert!(into_ha_error(plain).is_backend());
    }
}
