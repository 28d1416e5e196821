//! The [`FailFastLayer`].

use std::time::Duration;

use tower_layer::Layer;

use super::service::FailFast;

/// Wraps services in [`FailFast`] with a timeout (default 1 s).
///
/// ```
/// use ha_core::fail_fast::FailFastLayer;
/// use std::time::Duration;
///
/// let svc = tower::ServiceBuilder::new()
///     .layer(FailFastLayer::new(Duration::from_secs(2)))
///     .service(tower::service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }));
/// # let _ = svc;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct FailFastLayer {
    timeout: Duration,
}

impl FailFastLayer {
    /// A layer whose services fail fast after being unready for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        FailFastLayer { timeout }
    }
}

impl Default for FailFastLayer {
    /// A timeout of 1 s.
    fn default() -> Self {
        FailFastLayer::new(FailFast::<()>::DEFAULT_TIMEOUT)
    }
}

impl<S> Layer<S> for FailFastLayer {
    type Service = FailFast<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FailFast::new(inner, self.timeout)
    }
}
