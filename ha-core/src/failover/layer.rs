//! The [`FailoverLayer`].

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::policy::NotIdempotent;
use super::service::{Failover, FailoverBuilder, Proto, Shared};

/// Wraps services in [`Failover`]; made by [`FailoverBuilder::layer`].
///
/// Every service the layer makes (and every clone of those) shares one retry budget.
///
/// ```
/// use ha_core::failover::Failover;
/// use std::time::Duration;
///
/// let svc = tower::ServiceBuilder::new()
///     .layer(Failover::builder().deadline(Duration::from_millis(800)).layer())
///     .service(tower::service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }));
/// # let _ = svc;
/// ```
pub struct FailoverLayer<P = NotIdempotent> {
    policy: P,
    shared: Arc<Shared>,
}

impl<P> FailoverLayer<P> {
    pub(super) fn from_parts(policy: P, shared: Arc<Shared>) -> Self {
        FailoverLayer { policy, shared }
    }
}

impl Default for FailoverLayer<NotIdempotent> {
    fn default() -> Self {
        FailoverBuilder::default().layer()
    }
}

impl<P: Clone> Clone for FailoverLayer<P> {
    fn clone(&self) -> Self {
        FailoverLayer {
            policy: self.policy.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for FailoverLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("policy", &self.policy)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S: Clone, P: Clone> Layer<S> for FailoverLayer<P> {
    type Service = Failover<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Failover {
            proto: Arc::new(Proto::new(Arc::clone(&self.shared), &inner)),
            inner,
            policy: self.policy.clone(),
            ready: false,
        }
    }
}
