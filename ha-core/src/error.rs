//! The error every ha-* crate returns, with kinds a caller can match on.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A boxed error from a backend, the way tower passes errors around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error kinds of every ha-* crate.
///
/// Callers match on the kind; the `is_*` helpers do the same for boxed errors that came out of a
/// tower stack (see [`HaError::find`]).
///
/// ```
/// use ha_core::HaError;
/// use std::time::Duration;
///
/// let err = HaError::RateLimited { retry_after: Duration::from_millis(250) };
/// assert!(err.is_rate_limited());
/// assert_eq!(err.to_string(), "rate limited, retry after 250ms");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HaError {
    /// No endpoint of the dependency could take the call (none resolved, all ejected or drained).
    #[error("no healthy endpoint for dependency {dependency}")]
    NoHealthyEndpoint {
        /// The dependency's configured name.
        dependency: String,
    },
    /// The call's overall deadline passed before it succeeded.
    #[error("deadline of {deadline:?} exceeded after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// The overall deadline the call had.
        deadline: Duration,
        /// How many attempts were started.
        attempts: u32,
    },
    /// A local rate limit refused the call; it may be tried again after `retry_after`.
    #[error("rate limited, retry after {retry_after:?}")]
    RateLimited {
        /// How long until the same call would be admitted.
        retry_after: Duration,
    },
    /// The call reached a connection made for an older master (a stale generation).
    #[error(
        "fenced: connection of generation {connection} but the current generation is {current}"
    )]
    Fenced {
        /// The generation the connection was made in.
        connection: u64,
        /// The dependency's current generation.
        current: u64,
    },
    /// The fail-fast guard is open: the inner service has not been ready for too long.
    #[error("service unavailable: not ready for {unready_for:?}")]
    Unavailable {
        /// How long the inner service had been unready when the guard opened.
        unready_for: Duration,
    },
    /// The backend answered with an error.
    #[error("backend error: {0}")]
    Backend(#[source] BoxError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl HaError {
    /// Wraps any backend error.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        HaError::Backend(err.into())
    }

    /// True for [`HaError::NoHealthyEndpoint`].
    pub fn is_no_healthy_endpoint(&self) -> bool {
        matches!(self, HaError::NoHealthyEndpoint { .. })
    }

    /// True for [`HaError::DeadlineExceeded`].
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, HaError::DeadlineExceeded { .. })
    }

    /// True for [`HaError::RateLimited`].
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, HaError::RateLimited { .. })
    }

    /// True for [`HaError::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, HaError::Fenced { .. })
    }

    /// True for [`HaError::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, HaError::Unavailable { .. })
    }

    /// True for [`HaError::Backend`].
    pub fn is_backend(&self) -> bool {
        matches!(self, HaError::Backend(_))
    }

    /// True for [`HaError::Config`].
    pub fn is_config(&self) -> bool {
        matches!(self, HaError::Config(_))
    }

    /// The `retry_after` of a rate-limit rejection.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HaError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short, stable name of the kind, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HaError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            HaError::DeadlineExceeded { .. } => "deadline_exceeded",
            HaError::RateLimited { .. } => "rate_limited",
            HaError::Fenced { .. } => "fenced",
            HaError::Unavailable { .. } => "unavailable",
            HaError::Backend(_) => "backend",
            HaError::Config(_) => "config",
        }
    }

    /// Finds an `HaError` in a boxed error or anywhere in its source chain.
    ///
    /// ```
    /// use ha_core::{BoxError, HaError};
    ///
    /// let boxed: BoxError = Box::new(HaError::NoHealthyEndpoint { dependency: "profile".into() });
    /// assert!(HaError::find(&*boxed).is_some_and(HaError::is_no_healthy_endpoint));
    /// ```
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a HaError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(ha) = e.downcast_ref::<HaError>() {
                return Some(ha);
            }
            cur = e.source();
        }
        None
    }
}

/// What was wrong with a configuration: the file, the field and the bad value.
///
/// ```
/// use ha_core::Topology;
///
/// let text = r#"
/// local_idc = "nowhere"
/// [[regions]]
/// name = "north"
/// resolvers = ["10.0.0.53"]
/// [[idcs]]
/// name = "bj-a"
/// region = "north"
/// cidrs = ["10.1.0.0/16"]
/// "#;
/// let err = Topology::from_toml_str(text, "inline.toml").unwrap_err();
/// let text = err.to_string();
/// assert!(text.contains("inline.toml"), "{text}");
/// assert!(text.contains("local_idc"), "{text}");
/// assert!(text.contains("nowhere"), "{text}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the configuration came from (or a label such as `<inline>`).
    pub file: PathBuf,
    /// The dotted path of the offending field, e.g. `idcs[1].cidrs[0]`.
    pub field: String,
    /// The offending value as written (empty when the field is missing).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}: {}", self.file.display(), self.field)?;
        if !self.value.is_empty() {
            write!(f, " = {:?}", self.value)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Decides whether a failed call may be retried on another endpoint.
///
/// The [`Failover`](crate::failover::Failover) layer asks its classifier about every error; the
/// default, [`DefaultClassifier`], retries connection-level failures and `NoHealthyEndpoint`
/// races, and never a rate limit, a fence or a configuration error.
pub trait Classify: Send + Sync + 'static {
    /// True when the error says the request did not take effect and another endpoint may succeed.
    fn is_retryable(&self, err: &(dyn std::error::Error + 'static)) -> bool;
}

/// The default error classification: I/O errors of connection setup and transport, timeouts of a
/// single try, and backend errors that wrap those are retryable; everything else is not.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl Classify for DefaultClassifier {
    fn is_retryable(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(ha) = e.downcast_ref::<HaError>() {
                match ha {
                    HaError::RateLimited { .. }
                    | HaError::Config(_)
                    | HaError::DeadlineExceeded { .. } => return false,
                    HaError::Fenced { .. }
                    | HaError::NoHealthyEndpoint { .. }
                    | HaError::Unavailable { .. } => return true,
                    HaError::Backend(_) => {}
                }
            }
            if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
                return true;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                return matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | NotConnected
                        | BrokenPipe
                        | TimedOut
                        | UnexpectedEof
                        | HostUnreachable
                        | NetworkUnreachable
                        | AddrNotAvailable
                );
            }
            cur = e.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_retries_transport_errors_only() {
        let c = DefaultClassifier;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(c.is_retryable(&refused));
        let wrapped = HaError::backend(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(c.is_retryable(&wrapped));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!c.is_retryable(&denied));
        let limited = HaError::RateLimited {
            retry_after: Duration::from_secs(1),
        };
        assert!(!c.is_retryable(&limited));
        assert!(c.is_retryable(&HaError::Fenced {
            connection: 1,
            current: 2
        }));
    }

    #[test]
    fn kinds_are_stable() {
        let e = HaError::NoHealthyEndpoint {
            dependency: "db".into(),
        };
        assert_eq!(e.kind(), "no_healthy_endpoint");
        assert!(e.is_no_healthy_endpoint());
        assert_eq!(e.retry_after(), None);
    }
}
