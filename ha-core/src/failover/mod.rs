//! Failover: an overall deadline, a per-try timeout, and classified retries on another endpoint
//! within a retry budget.
//!
//! [`Failover`] wraps a service (normally [`LocalityBalance`](crate::balance::LocalityBalance))
//! and, for one call:
//!
//! - returns [`HaError::DeadlineExceeded`](crate::HaError::DeadlineExceeded) no later than the
//!   **deadline** (default 2 s, from the first poll), even if the inner service never answers
//!   **or is never ready** (`Failover` is always ready; a call made while the inner service is
//!   unready waits for it inside its future, within the deadline); `maybe_sent` says whether a
//!   try was in flight, i.e. whether the request may have taken effect;
//! - gives each try a **per-try timeout** (default 500 ms, capped by the time left); when it fires
//!   and a retry is allowed, the try is dropped and the call moves on; when no retry is allowed
//!   the try keeps running until the deadline;
//! - **retries by error class** (a [`Classify`](crate::Classify), default
//!   [`DefaultClassifier`](crate::DefaultClassifier); see [`ErrorClass`](crate::ErrorClass)):
//!   a request that provably was not sent (*not sent*, *refused*: connect refused, fenced,
//!   read-only) is retried whatever it is; one that *may have been sent* (a reset after the
//!   write, a per-try timeout) only when the [`RetryPolicy`] says it is idempotent, and
//!   otherwise fails with [`HaError::OutcomeUnknown`](crate::HaError::OutcomeUnknown); an
//!   *answered* or *final* error (a duplicate key, a rate limit) is never retried. The default
//!   policy, [`NotIdempotent`], never sends a maybe-sent request twice;
//! - does not retry [`HaError::NoHealthyEndpoint`](crate::HaError::NoHealthyEndpoint) when
//!   nothing was picked (the same would be found at once, and the retry budget is kept for
//!   real failures);
//! - at most `max_attempts` tries (default 3), each paid for by a shared [`RetryBudget`]
//!   (default 20% of the requests of the last 10 s plus 10 retries/s, the semantics of tower's
//!   `TpsBudget`);
//! - sends every retry to a **different endpoint**: each inner `call` runs inside
//!   [`attempt::scope`](crate::attempt::scope) with the endpoints picked so far as the ones to
//!   avoid (the balancer may pick an avoided one again when it has nothing else); through a
//!   layer that defers the call (tower's `Buffer`), put
//!   [`CarryLayer`](crate::attempt::CarryLayer) above it and
//!   [`RestoreLayer`](crate::attempt::RestoreLayer) below it;
//! - tells the balancer which dropped tries were timed out (see
//!   [`attempt::timing_out`](crate::attempt::timing_out)), so that a caller that goes away is
//!   not counted as an endpoint failure;
//! - optionally pauses between tries ([`Backoff`], default none).
//!
//! Errors come out typed, as [`HaError`](crate::HaError): the inner service's error of the
//! last try inside [`HaError::Backend`](crate::HaError::Backend) (or as itself when it already
//! is an `HaError`), [`HaError::OutcomeUnknown`](crate::HaError::OutcomeUnknown) for a
//! maybe-sent failure that was not retried, or another `HaError` of ours. Each retry is counted
//! in `ha_core_retries_total` (`outcome` = `retried`, `budget_exhausted`, `attempts_exhausted`,
//! `not_retryable`, `deadline_exceeded`, `no_endpoint`) and logged at debug level with the error
//! and the avoided endpoints; each expired deadline is counted in
//! `ha_core_deadline_exceeded_total`, each unknown outcome in `ha_core_outcome_unknown_total`.
//!
//! The first try of a call allocates nothing, spawns nothing and arms no timer when the inner
//! future is ready on its first poll; the clock is read and a `tokio::time::Sleep` is armed
//! (boxed once per call, so the future every call moves around stays small) only once a try
//! returns `Pending`.
//!
//! ```
//! use ha_core::failover::{Failover, IdempotentIf};
//! use ha_core::BoxError;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let mut svc = ServiceBuilder::new()
//!     .layer(
//!         Failover::builder()
//!             .deadline(Duration::from_secs(1))
//!             .try_timeout(Duration::from_millis(300))
//!             .max_attempts(3)
//!             .budget(0.2, 10)
//!             // Reads are retried, writes are tried once.
//!             .policy(IdempotentIf::new(|req: &String| req.starts_with("GET ")))
//!             .dependency("profile")
//!             .layer(),
//!     )
//!     .service(tower::service_fn(|req: String| async move {
//!         Ok::<_, std::io::Error>(req.len())
//!     }));
//! let len = svc.ready().await?.call("GET /members/7".to_string()).await?;
//! assert_eq!(len, 14);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod budget;
mod future;
mod layer;
mod policy;
mod service;

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use future::ResponseFuture;
pub use layer::FailoverLayer;
pub use policy::{Idempotent, IdempotentIf, NeverRetry, NotIdempotent, RetryPolicy};
pub use service::{Failover, FailoverBuilder, MAX_DURATION};
