use std::sync::Arc;

use governor::clock::Clock;
use tower_layer::Layer;

use super::service::RateLimit;
use crate::clock::DefaultClock;
use crate::limiter::Limiter;

/// Applies a [`Limiter`] to a service; `keys` maps each line's `key` setting to the request's key.
///
/// ```
/// use std::sync::Arc;
/// use ha_ratelimit::{Key, LimitConfig, Limiter, Rate, RateLimitConfig, RateLimitLayer};
///
/// struct Req { member: u64 }
/// fn key<'r>(source: &str, req: &'r Req) -> Key<'r> {
///     match source {
///         "member_id" => Key::u64(req.member),
///         _ => Key::NONE,
///     }
/// }
/// let cfg = RateLimitConfig::with_limits(vec![
///     LimitConfig::new("per_member", "member_id", Rate::per_second(10)).burst(5),
/// ]);
/// let limiter = Arc::new(Limiter::builder(cfg).build().unwrap());
/// let layer = RateLimitLayer::new(limiter, key);
/// let svc = tower::ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_req: Req| async { Ok::<_, std::convert::Infallible>("ok") });
/// # let _ = svc;
/// ```
pub struct RateLimitLayer<K, C: Clock = DefaultClock> {
    limiter: Arc<Limiter<C>>,
    keys: Arc<K>,
}

impl<K, C: Clock> RateLimitLayer<K, C> {
    /// A layer over `limiter` with the key function `keys`.
    pub fn new(limiter: Arc<Limiter<C>>, keys: K) -> Self {
        RateLimitLayer {
            limiter,
            keys: Arc::new(keys),
        }
    }
}

impl<K, C: Clock> std::fmt::Debug for RateLimitLayer<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<K, C: Clock> Clone for RateLimitLayer<K, C> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<S, K, C: Clock> Layer<S> for RateLimitLayer<K, C> {
    type Service = RateLimit<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limiter.clone(), self.keys.clone())
    }
}
