//! The tower middleware: [`RateLimitLayer`] wraps a service in a [`RateLimit`].
//!
//! The check happens in `call`, not in `poll_ready`: the key comes from the request, which
//! `poll_ready` does not see. `poll_ready` only delegates to the inner service. A rejection
//! returns a [`Rejected`] error at once (its source is [`ha_core::HaError::RateLimited`], so
//! `HaError::find` finds it, and it carries the configured HTTP `status`); a key function's
//! [`KeyError`](crate::KeyError) is returned as the error too. A delay sleeps
//! (`tokio::time::sleep`) before the inner service is called. The service is `Clone` (tower's
//! own `RateLimit` is not, tower#794) and cloning it costs two `Arc` clones plus the inner
//! service's clone.

mod error;
mod future;
// tower's layout (`limit/rate/layer.rs`): the layer lives in `layer.rs` of its middleware folder.
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use error::Rejected;
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use service::{KeyFn, RateLimit};
