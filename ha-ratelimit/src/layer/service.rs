use std::sync::Arc;
use std::task::{Context, Poll};

use governor::clock::Clock;
use ha_core::BoxError;
use tower_service::Service;

use super::error::Rejected;
use super::future::ResponseFuture;
use crate::clock::DefaultClock;
use crate::key::Key;
use crate::keys::KeyError;
use crate::limiter::{Decision, Limiter};

/// Maps a limit line's `key` setting (`"client_ip"`, `"member_id"`, ...) to a request's key.
///
/// Implemented for functions `fn(&str, &Req) -> Key<'_>` (a closure goes through
/// [`key_fn`](crate::key_fn)) and for the registry [`Keys`](crate::Keys); return [`Key::NONE`]
/// to skip a line for this request (how nginx users scope a line with a `map` to an empty key).
pub trait KeyFn<Req>: Send + Sync + 'static {
    /// The request's key for the line whose `key` setting is `source`.
    fn key<'r>(&self, source: &str, req: &'r Req) -> Key<'r>;

    /// The request's key, or why it has none (the request then fails with that error instead
    /// of skipping the line). The layers call this; by default it is [`key`](KeyFn::key).
    fn try_key<'r>(&self, source: &str, req: &'r Req) -> Result<Key<'r>, KeyError> {
        Ok(self.key(source, req))
    }
}

impl<Req, F> KeyFn<Req> for F
where
    F: for<'r> Fn(&str, &'r Req) -> Key<'r> + Send + Sync + 'static,
{
    fn key<'r>(&self, source: &str, req: &'r Req) -> Key<'r> {
        self(source, req)
    }
}

/// A service behind a [`Limiter`]. `Clone` and cheap to clone.
pub struct RateLimit<S, K, C: Clock = DefaultClock> {
    inner: S,
    limiter: Arc<Limiter<C>>,
    keys: Arc<K>,
}

impl<S, K, C: Clock> RateLimit<S, K, C> {
    /// Wraps `inner`.
    pub fn new(inner: S, limiter: Arc<Limiter<C>>, keys: Arc<K>) -> Self {
        RateLimit {
            inner,
            limiter,
            keys,
        }
    }

    /// The limiter, e.g. to reload it.
    pub fn limiter(&self) -> &Arc<Limiter<C>> {
        &self.limiter
    }
}

impl<S: Clone, K, C: Clock> Clone for RateLimit<S, K, C> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<S, K, C, Req> Service<Req> for RateLimit<S, K, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: KeyFn<Req>,
    C: Clock,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The check needs the request's key, so it happens in `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let keys = &self.keys;
        let decision = self
            .limiter
            .try_check_with(|source| keys.try_key(source, &req));
        match decision {
            Ok(Decision::Allow) => ResponseFuture::called(self.inner.call(req)),
            Ok(Decision::Delay(hold)) => {
                // The instance that was polled ready goes into the future; a clone takes its place.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::delayed(hold, ready, req)
            }
            Ok(Decision::Reject { retry_after }) => ResponseFuture::rejected(Box::new(
                Rejected::new(retry_after, self.limiter.status()),
            )),
            Err(e) => ResponseFuture::rejected(Box::new(e)),
        }
    }
}
