use std::time::Duration;

use ha_core::HaError;

/// The error of a request refused by a rate limit: [`HaError::RateLimited`] (its source, so
/// `HaError::find` finds it) with the HTTP status the configuration asks for (`status`, nginx's
/// `limit_req_status`), which `axum::handle_error` answers with.
///
/// ```
/// use std::time::Duration;
/// use ha_core::HaError;
/// let e = ha_ratelimit::Rejected::new(Duration::from_millis(250), 503);
/// assert_eq!(e.status(), 503);
/// assert_eq!(e.to_string(), "rate limited, retry after 250ms");
/// let boxed: ha_core::BoxError = Box::new(e);
/// assert!(HaError::find(&*boxed).is_some_and(HaError::is_rate_limited));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct Rejected {
    status: u16,
    source: HaError,
}

impl Rejected {
    /// A rejection to be answered with `status`; the same request would pass after
    /// `retry_after`.
    pub fn new(retry_after: Duration, status: u16) -> Rejected {
        Rejected {
            status,
            source: HaError::RateLimited { retry_after },
        }
    }

    /// The HTTP status to answer with (from the configuration's `status`; default 429).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// How long until the same request would be admitted.
    pub fn retry_after(&self) -> Duration {
        self.source.retry_after().unwrap_or_default()
    }
}
