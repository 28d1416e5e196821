//! The [`Failover`] service and its builder.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tower_layer::Layer;
use tower_service::Service;

use super::backoff::Backoff;
use super::budget::RetryBudget;
use super::future::ResponseFuture;
use super::layer::FailoverLayer;
use super::policy::{NotIdempotent, RetryPolicy};
use crate::attempt;
use crate::error::{BoxError, Classify, DefaultClassifier, HaError};

/// The longest deadline or per-try timeout the builder accepts; longer values are clamped.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Settings and state shared by a [`FailoverLayer`] and every service and clone it makes.
pub(super) struct Shared {
    pub(super) deadline: Duration,
    pub(super) try_timeout: Duration,
    pub(super) max_attempts: u32,
    pub(super) classifier: Box<dyn Classify>,
    pub(super) budget: RetryBudget,
    pub(super) backoff: Option<Backoff>,
    pub(super) dependency: metrics::SharedString,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("dependency", &&*self.dependency)
            .field("deadline", &self.deadline)
            .field("try_timeout", &self.try_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("budget", &self.budget)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// What every clone of one [`Failover`] and every call's future share: the layer's settings and
/// a copy of the service it was built with, which a retry clones. A call that succeeds at once
/// (the common case) thus clones nothing but this one `Arc`.
pub(super) struct Proto<S> {
    pub(super) shared: Arc<Shared>,
    service: Mutex<S>,
}

impl<S: Clone> Proto<S> {
    pub(super) fn new(shared: Arc<Shared>, service: &S) -> Self {
        Proto {
            shared,
            service: Mutex::new(service.clone()),
        }
    }

    /// A fresh clone of the service, for a retry.
    pub(super) fn service(&self) -> S {
        self.service.lock().clone()
    }
}

/// Retries failed calls on another endpoint, within an overall deadline and a retry budget.
///
/// A retry goes through a clone of the service the `Failover` was built with (as tower's
/// services are handles, a clone of the same one), so a call that succeeds at once clones no
/// service at all.
///
/// See the [module documentation](super) for the rules and an example.
pub struct Failover<S, P = NotIdempotent> {
    pub(super) inner: S,
    pub(super) policy: P,
    pub(super) proto: Arc<Proto<S>>,
    /// The inner service answered `Ready` to the last `poll_ready` and has not been called.
    pub(super) ready: bool,
}

// === impl Failover ===

impl Failover<(), NotIdempotent> {
    /// A builder with the defaults: deadline 2 s, per-try timeout 500 ms, 3 attempts, a budget
    /// of 20% of the requests of the last 10 s plus 10 retries/s, [`DefaultClassifier`], the
    /// [`NotIdempotent`] policy (a request that may have been sent is never sent again), no
    /// backoff.
    pub fn builder() -> FailoverBuilder<NotIdempotent> {
        FailoverBuilder::default()
    }

    /// A [`FailoverLayer`] with the defaults of [`Failover::builder`].
    pub fn layer() -> FailoverLayer<NotIdempotent> {
        FailoverBuilder::default().layer()
    }
}

impl<S, P> Failover<S, P> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably. A change made through it does not reach retries, which
    /// go through a clone of the service this `Failover` was built with.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Retries still available in the (shared) budget now.
    pub fn budget_available(&self) -> i64 {
        self.proto
            .shared
            .budget
            .available(tokio::time::Instant::now())
    }
}

impl<S: Clone, P: Clone> Clone for Failover<S, P> {
    fn clone(&self) -> Self {
        Failover {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            proto: Arc::clone(&self.proto),
            // A clone of a ready service is not ready (tower's rule).
            ready: false,
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Failover<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .field("shared", &self.proto.shared)
            .finish()
    }
}

impl<S, P, Req> Service<Req> for Failover<S, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: RetryPolicy<Req>,
{
    type Response = S::Response;
    type Error = HaError;
    type Future = ResponseFuture<S, P, Req>;

    /// Always ready: when the inner service is not ready yet, the call's future waits for it,
    /// bounded by the call's deadline, so a service that never becomes ready cannot hang
    /// callers in `ready()`.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.ready = true,
            Poll::Ready(Err(err)) => return Poll::Ready(Err(HaError::from_boxed(err.into()))),
            Poll::Pending => {}
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &self.proto.shared;
        shared.budget.deposit();
        let idempotent = self.policy.is_idempotent(&req);
        // Any request the policy can copy may be retried: one that was provably not sent
        // goes to another endpoint whatever it is.
        let copy = if shared.max_attempts > 1 {
            self.policy.clone_request(&req)
        } else {
            None
        };
        if !std::mem::take(&mut self.ready) {
            // Not ready (or `call` without `poll_ready`): wait in the future, within the
            // deadline, on a clone; this service stays unready.
            return ResponseFuture::unready(
                self.inner.clone(),
                self.policy.clone(),
                req,
                copy,
                idempotent,
                Arc::clone(&self.proto),
            );
        }
        let retry = copy.map(|copy| (self.policy.clone(), copy));
        let inner = &mut self.inner;
        let (future, picked) = attempt::scope_pick(Vec::new(), || inner.call(req));
        ResponseFuture::new(future, picked, retry, idempotent, Arc::clone(&self.proto))
    }
}

// === impl FailoverBuilder ===

/// Builds a [`FailoverLayer`] (or a [`Failover`] directly); see [`Failover::builder`].
///
/// ```
/// use ha_core::failover::{Failover, IdempotentIf};
/// use std::time::Duration;
///
/// let layer = Failover::builder()
///     .deadline(Duration::from_secs(1))
///     .try_timeout(Duration::from_millis(200))
///     .max_attempts(2)
///     .budget(0.1, 5)
///     .policy(IdempotentIf::new(|req: &String| req.starts_with("GET ")))
///     .dependency("profile")
///     .layer();
/// # let _ = layer;
/// ```
#[must_use]
pub struct FailoverBuilder<P> {
    deadline: Duration,
    try_timeout: Duration,
    max_attempts: u32,
    budget_ratio: f32,
    budget_floor: u32,
    budget_ttl: Duration,
    classifier: Box<dyn Classify>,
    policy: P,
    backoff: Option<Backoff>,
    dependency: metrics::SharedString,
}

impl Default for FailoverBuilder<NotIdempotent> {
    fn default() -> Self {
        FailoverBuilder {
            deadline: Duration::from_secs(2),
            try_timeout: Duration::from_millis(500),
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_floor: 10,
            budget_ttl: Duration::from_secs(10),
            classifier: Box::new(DefaultClassifier),
            policy: NotIdempotent,
            backoff: None,
            dependency: metrics::SharedString::from_borrowed("unknown"),
        }
    }
}

impl<P> FailoverBuilder<P> {
    /// The overall deadline of one call, all attempts included (default 2 s, at most
    /// [`MAX_DURATION`]). It runs from the first poll of the call's future.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline.min(MAX_DURATION);
        self
    }

    /// The timeout of one try (default 500 ms), capped by the time left to the deadline. When it
    /// fires and a retry is allowed, the try is abandoned and the call moves to another
    /// endpoint; when no retry is allowed the try keeps running until the deadline.
    pub fn try_timeout(mut self, timeout: Duration) -> Self {
        self.try_timeout = timeout.min(MAX_DURATION);
        self
    }

    /// Attempts per call, the first included (default 3; 0 is taken as 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The retry budget: `ratio` retries per request over the last 10 s (default 0.2, clamped to
    /// `0.0..=1000.0`) plus `floor_per_sec` retries per second (default 10). It is shared by every
    /// service and clone this builder's layer makes.
    pub fn budget(mut self, ratio: f32, floor_per_sec: u32) -> Self {
        self.budget_ratio = ratio;
        self.budget_floor = floor_per_sec;
        self
    }

    /// How long a request counts towards the budget (default 10 s, clamped to 1 s..=60 s).
    pub fn budget_ttl(mut self, ttl: Duration) -> Self {
        self.budget_ttl = ttl;
        self
    }

    /// How errors are classified (default [`DefaultClassifier`]): which are retried for any
    /// request, which only for idempotent ones, which never (see [`ErrorClass`](crate::ErrorClass)).
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Box::new(classifier);
        self
    }

    /// A pause between tries (default none: the next try goes to another endpoint at once).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// The dependency name used as the `dependency` label of metrics and logs (default
    /// `unknown`).
    pub fn dependency(mut self, name: impl Into<String>) -> Self {
        self.dependency = metrics::SharedString::from(name.into());
        self
    }

    /// Which requests are idempotent and how they are copied (default
    /// [`NotIdempotent`](super::NotIdempotent): none is, so only a request that provably was not
    /// sent is retried; use [`Idempotent`](super::Idempotent) for reads,
    /// [`IdempotentIf`](super::IdempotentIf) for a mix, [`NeverRetry`](super::NeverRetry) to
    /// try every call once).
    pub fn policy<P2>(self, policy: P2) -> FailoverBuilder<P2> {
        FailoverBuilder {
            deadline: self.deadline,
            try_timeout: self.try_timeout,
            max_attempts: self.max_attempts,
            budget_ratio: self.budget_ratio,
            budget_floor: self.budget_floor,
            budget_ttl: self.budget_ttl,
            classifier: self.classifier,
            policy,
            backoff: self.backoff,
            dependency: self.dependency,
        }
    }

    /// The layer, for `tower::ServiceBuilder`.
    pub fn layer(self) -> FailoverLayer<P> {
        let shared = Shared {
            deadline: self.deadline,
            try_timeout: self.try_timeout,
            max_attempts: self.max_attempts,
            classifier: self.classifier,
            budget: RetryBudget::new(self.budget_ttl, self.budget_floor, self.budget_ratio),
            backoff: self.backoff,
            dependency: self.dependency,
        };
        FailoverLayer::from_parts(self.policy, Arc::new(shared))
    }

    /// Wraps `service` directly.
    pub fn service<S>(self, service: S) -> Failover<S, P>
    where
        S: Clone,
        P: Clone,
    {
        self.layer().layer(service)
    }
}

impl<P: fmt::Debug> fmt::Debug for FailoverBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverBuilder")
            .field("deadline", &self.deadline)
            .field("try_timeout", &self.try_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("budget_ratio", &self.budget_ratio)
            .field("budget_floor", &self.budget_floor)
            .field("budget_ttl", &self.budget_ttl)
            .field("policy", &self.policy)
            .field("backoff", &self.backoff)
            .field("dependency", &&*self.dependency)
            .finish_non_exhaustive()
    }
}
