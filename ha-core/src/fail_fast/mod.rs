//! Fail-fast: when the inner service has not been ready for too long, reject calls at once
//! instead of letting them queue (linkerd2-proxy's fail-fast, as an explicit state machine).
//!
//! [`FailFast`] is in one of three states, moved only by `poll_ready`:
//!
//! ```text
//!   Ready ──(inner Pending: arm timer)──► Unready ──(timer fires)──► FailFast
//!     ▲                                      │                          │
//!     └──────────(inner ready)───────────────┴──────(inner ready)───────┘
//! ```
//!
//! - **Ready**: the inner service was ready at its last `poll_ready` (or was never polled);
//!   calls pass through.
//! - **Unready { since }**: the inner service has returned `Pending` since `since`; `poll_ready`
//!   returns `Pending` (back-pressure as usual) while a timer runs to `since + timeout` (default
//!   1 s).
//! - **FailFast { since }**: the timer fired. `poll_ready` still polls the inner service (so it
//!   notices recovery) but returns `Ready`, and every `call` fails at once with
//!   [`HaError::Unavailable`](crate::HaError::Unavailable), counted in
//!   `ha_core_fail_fast_rejected_total`. As soon as the inner service is ready again the state
//!   is **Ready**.
//!
//! Each clone starts from the state of the service it was cloned from and then keeps its own.
//!
//! ```
//! use ha_core::fail_fast::FailFastLayer;
//! use ha_core::BoxError;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // A service that is never ready, as a saturated or disconnected backend.
//! let (mock, _handle) = tower_test::mock::pair::<&str, &str>();
//! let mut svc = ServiceBuilder::new()
//!     .layer(FailFastLayer::new(Duration::from_millis(500)))
//!     .service(mock);
//! # let mut _handle = _handle;
//! # _handle.allow(0);
//! // After 500 ms of waiting, poll_ready gives up and the call is rejected at once.
//! let err = svc.ready().await?.call("GET /").await.unwrap_err();
//! assert!(err.is_unavailable());
//! # Ok(())
//! # }
//! ```

mod layer;
mod service;

pub use layer::FailFastLayer;
pub use service::{FailFast, ResponseFuture};
