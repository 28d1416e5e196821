//! The error every ha-* crate returns, with kinds a caller can match on.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::generation::Generation;

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
    ///
    /// When `maybe_sent` is true a try was in flight when the deadline fired: the request may
    /// have taken effect ([`HaError::is_outcome_unknown`] is true).
    #[error("deadline of {deadline:?} exceeded after {attempts} attempt(s){}", if *maybe_sent { " (the last one may have taken effect)" } else { "" })]
    DeadlineExceeded {
        /// The overall deadline the call had.
        deadline: Duration,
        /// How many attempts were started.
        attempts: u32,
        /// True when a try was still in flight (written, unanswered) at the deadline.
        maybe_sent: bool,
    },
    /// The request was sent (or may have been) and no answer came: it may or may not have taken
    /// effect. Returned for a *maybe sent* failure ([`ErrorClass::MaybeSent`]) that was not
    /// retried, e.g. a connection reset after a non-idempotent write. Check before repeating it.
    #[error("outcome unknown: the request may have taken effect: {source}")]
    OutcomeUnknown {
        /// The endpoint the request went to, when known.
        endpoint: Option<std::net::SocketAddr>,
        /// The failure that left the outcome unknown.
        #[source]
        source: BoxError,
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
        connection: Generation,
        /// The dependency's current generation.
        current: Generation,
    },
    /// The fail-fast guard is open: the inner service has not been ready for too long.
    #[error("service unavailable: not ready for {unready_for:?}")]
    Unavailable {
        /// How long the inner service had been unready when the guard opened.
        unready_for: Duration,
    },
    /// The backend (or the service under the layer) failed with this error; its class decides
    /// whether it was retried (see [`Classify`]).
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

    /// True when the request may have taken effect although no success came back:
    /// [`HaError::OutcomeUnknown`], or [`HaError::DeadlineExceeded`] with a try in flight.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            HaError::OutcomeUnknown { .. }
                | HaError::DeadlineExceeded {
                    maybe_sent: true,
                    ..
                }
        )
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
            HaError::OutcomeUnknown { .. } => "outcome_unknown",
            HaError::Unavailable { .. } => "unavailable",
            HaError::Backend(_) => "backend",
            HaError::Config(_) => "config",
        }
    }

    /// Turns a boxed error into an `HaError`: the `HaError` itself when the box holds one,
    /// else [`HaError::Backend`] around it. Layers use it so that what comes out of them is
    /// always typed.
    pub fn from_boxed(err: BoxError) -> HaError {
        match err.downcast::<HaError>() {
            Ok(ha) => *ha,
            Err(other) => HaError::Backend(other),
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
///
/// Errors of the TOML layer (an unknown field, a wrong type, an out-of-range integer, a
/// duplicate key) name the dotted field path and the line and column:
///
/// ```
/// let err = ha_core::Topology::from_toml_str("local_idc = \"bj-a\"\nregions = 5\n", "t.toml")
///     .unwrap_err();
/// assert_eq!(err.field, "regions");
/// assert_eq!((err.line, err.column), (Some(2), Some(11)));
/// assert!(err.to_string().starts_with("invalid config t.toml:2:11: regions: "), "{err}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The file the configuration came from (or a label such as `<inline>`).
    pub file: PathBuf,
    /// The dotted path of the offending field, e.g. `idcs[1].cidrs[0]`.
    pub field: String,
    /// The offending value as written (empty when the field is missing).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
    /// The 1-based line of the offending text, when known (errors of the TOML layer).
    pub line: Option<u32>,
    /// The 1-based column (in characters) of the offending text, when known.
    pub column: Option<u32>,
}

impl ConfigError {
    /// An error about `field` of `file`: the `value` as written and the `reason` it is refused.
    /// Backends use it for their own settings so that every configuration error reads the same.
    pub fn new(
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
            line: None,
            column: None,
        }
    }

    /// The same error located at `line` and `column` (1-based).
    pub fn at(mut self, line: u32, column: u32) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }

    /// The dotted path of the offending field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The offending value as written.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        if !self.value.is_empty() {
            write!(f, " = {:?}", self.value)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// What a failure says about the request: did it take effect, and is the endpoint to blame?
///
/// One classification drives both [`Failover`](crate::failover::Failover)'s retries and the
/// balancer's passive health (an application error is an answer, not a sick endpoint):
///
/// | class | took effect? | retried by `Failover` | endpoint failure |
/// |---|---|---|---|
/// | [`NotSent`](ErrorClass::NotSent) | no | any request | yes |
/// | [`Refused`](ErrorClass::Refused) | no | any request | no |
/// | [`MaybeSent`](ErrorClass::MaybeSent) | unknown | idempotent requests only, else [`HaError::OutcomeUnknown`] | yes |
/// | [`Answered`](ErrorClass::Answered) | the backend decided | never | no |
/// | [`Final`](ErrorClass::Final) | no, refused locally | never | no |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The request never reached the endpoint: connect refused, host or network unreachable.
    /// Any request may be retried elsewhere; it counts against the endpoint's health.
    NotSent,
    /// The request provably did not take effect, but the endpoint is alive and said no, or
    /// nothing was picked: [`HaError::Fenced`], Redis `-READONLY` / `-MASTERDOWN`, MySQL 1290
    /// (read-only), [`HaError::NoHealthyEndpoint`], [`HaError::Unavailable`]. Any request may be
    /// retried; not an endpoint failure.
    Refused,
    /// The request was (or may have been) written and no answer came: a reset or EOF after
    /// connect, a per-try timeout. Only an idempotent request is retried; it counts against the
    /// endpoint's health.
    MaybeSent,
    /// The backend answered with an application error (`WRONGTYPE`, a duplicate key, a 4xx):
    /// never retried, and not an endpoint failure.
    Answered,
    /// Refused by our own layers for a reason another try cannot fix: a rate limit, a
    /// configuration error, an expired deadline, an unknown outcome. Never retried, not an
    /// endpoint failure.
    Final,
}

impl ErrorClass {
    /// True when the request provably did not take effect (`NotSent`, `Refused`).
    pub fn is_not_sent(self) -> bool {
        matches!(self, ErrorClass::NotSent | ErrorClass::Refused)
    }

    /// True when the failure counts against the endpoint's health (`NotSent`, `MaybeSent`).
    pub fn is_endpoint_failure(self) -> bool {
        matches!(self, ErrorClass::NotSent | ErrorClass::MaybeSent)
    }

    /// True when `Failover` may retry the request (`idempotent`: its policy says so).
    pub fn is_retryable(self, idempotent: bool) -> bool {
        match self {
            ErrorClass::NotSent | ErrorClass::Refused => true,
            ErrorClass::MaybeSent => idempotent,
            ErrorClass::Answered | ErrorClass::Final => false,
        }
    }

    /// A short stable name for metric labels: `not_sent`, `refused`, `maybe_sent`, `answered`,
    /// `final`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::NotSent => "not_sent",
            ErrorClass::Refused => "refused",
            ErrorClass::MaybeSent => "maybe_sent",
            ErrorClass::Answered => "answered",
            ErrorClass::Final => "final",
        }
    }
}

/// Classifies a failed call's error (see [`ErrorClass`]).
///
/// Backends provide their own (ha-redis knows `-READONLY`, ha-mysql knows error 1290) and fall
/// back to [`DefaultClassifier`] for what they do not recognise. A closure works too:
///
/// ```
/// use ha_core::{Classify, DefaultClassifier, ErrorClass};
///
/// let classify = |err: &(dyn std::error::Error + 'static)| {
///     if err.to_string().starts_with("READONLY") {
///         ErrorClass::Refused
///     } else {
///         DefaultClassifier.classify(err)
///     }
/// };
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(classify.classify(&refused), ErrorClass::NotSent);
/// ```
pub trait Classify: Send + Sync + 'static {
    /// The class of `err`, the error of one failed try.
    fn classify(&self, err: &(dyn std::error::Error + 'static)) -> ErrorClass;
}

impl<F> Classify for F
where
    F: Fn(&(dyn std::error::Error + 'static)) -> ErrorClass + Send + Sync + 'static,
{
    fn classify(&self, err: &(dyn std::error::Error + 'static)) -> ErrorClass {
        self(err)
    }
}

/// The default classification, walking the error's source chain:
///
/// - our own [`HaError`]s: `Fenced`, `NoHealthyEndpoint`, `Unavailable` → `Refused`;
///   `RateLimited`, `Config`, `DeadlineExceeded`, `OutcomeUnknown` → `Final`; `Backend` → its
///   source decides;
/// - `std::io::Error`: `ConnectionRefused`, `HostUnreachable`, `NetworkUnreachable`,
///   `AddrNotAvailable` → `NotSent`; `ConnectionReset`, `ConnectionAborted`, `NotConnected`,
///   `BrokenPipe`, `TimedOut`, `UnexpectedEof` → `MaybeSent`; any other kind → `Answered`;
/// - a tokio or tower timeout (`Elapsed`) → `MaybeSent`;
/// - anything else → `Answered`: an error we cannot place is the backend's answer, neither
///   retried nor held against the endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl Classify for DefaultClassifier {
    fn classify(&self, err: &(dyn std::error::Error + 'static)) -> ErrorClass {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(ha) = e.downcast_ref::<HaError>() {
                match ha {
                    HaError::RateLimited { .. }
                    | HaError::Config(_)
                    | HaError::DeadlineExceeded { .. }
                    | HaError::OutcomeUnknown { .. } => return ErrorClass::Final,
                    HaError::Fenced { .. }
                    | HaError::NoHealthyEndpoint { .. }
                    | HaError::Unavailable { .. } => return ErrorClass::Refused,
                    HaError::Backend(_) => {}
                }
            }
            if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
                return ErrorClass::MaybeSent;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return classify_io(io.kind());
            }
            cur = e.source();
        }
        ErrorClass::Answered
    }
}

/// The class of an I/O error kind (see [`DefaultClassifier`]).
pub fn classify_io(kind: std::io::ErrorKind) -> ErrorClass {
    use std::io::ErrorKind::*;
    match kind {
        ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
            ErrorClass::NotSent
        }
        ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe | TimedOut
        | UnexpectedEof => ErrorClass::MaybeSent,
        _ => ErrorClass::Answered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_retries_transport_errors_only() {
        let c = DefaultClassifier;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(c.classify(&refused).is_retryable(false));
        assert_eq!(c.classify(&refused), ErrorClass::NotSent);
        let wrapped = HaError::backend(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(c.classify(&wrapped).is_retryable(true));
        assert_eq!(c.classify(&wrapped), ErrorClass::MaybeSent);
        assert!(!c.classify(&wrapped).is_retryable(false));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!c.classify(&denied).is_retryable(true));
        let limited = HaError::RateLimited {
            retry_after: Duration::from_secs(1),
        };
        assert!(!c.classify(&limited).is_retryable(true));
        assert_eq!(c.classify(&limited), ErrorClass::Final);
        let fenced = HaError::Fenced {
            connection: 1,
            current: 2,
        };
        assert!(c.classify(&fenced).is_retryable(false));
        assert!(!c.classify(&fenced).is_endpoint_failure());
    }

    #[test]
    fn unknown_errors_are_answers() {
        #[derive(Debug)]
        struct DuplicateKey;
        impl fmt::Display for DuplicateKey {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("duplicate key")
            }
        }
        impl std::error::Error for DuplicateKey {}
        let class = DefaultClassifier.classify(&HaError::backend(DuplicateKey));
        assert_eq!(class, ErrorClass::Answered);
        assert!(!class.is_endpoint_failure());
        assert!(!class.is_retryable(true));
    }

    #[test]
    fn outcome_unknown_is_final_and_found() {
        let e = HaError::OutcomeUnknown {
            endpoint: None,
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        assert_eq!(DefaultClassifier.classify(&e), ErrorClass::Final);
        assert!(e.is_outcome_unknown());
        assert_eq!(e.kind(), "outcome_unknown");
        let boxed: BoxError = Box::new(e);
        assert!(HaError::from_boxed(boxed).is_outcome_unknown());
        let other: BoxError = Box::new(std::io::Error::other("x"));
        assert!(HaError::from_boxed(other).is_backend());
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
