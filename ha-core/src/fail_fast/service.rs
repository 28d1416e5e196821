//! The [`FailFast`] service and its [`ResponseFuture`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::layer::FailFastLayer;
use crate::error::{BoxError, HaError};
use crate::metrics_names;

/// Rejects calls at once while the inner service has been unready for longer than a timeout.
///
/// See the [module documentation](super) for the states.
pub struct FailFast<S> {
    inner: S,
    timeout: Duration,
    state: State,
    /// Kept across unready episodes so the box is allocated once.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The states of [`FailFast`]; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Unready {
        since: Instant,
    },
    FailFast {
        since: Instant,
        unready_for: Duration,
    },
}

// === impl FailFast ===

impl FailFast<()> {
    /// The default timeout, 1 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// A layer with the given timeout.
    pub fn layer(timeout: Duration) -> FailFastLayer {
        FailFastLayer::new(timeout)
    }
}

impl<S> FailFast<S> {
    /// Wraps `inner`, failing fast after it has been unready for `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        FailFast {
            inner,
            timeout,
            state: State::Ready,
            timer: None,
        }
    }

    /// True while calls are being rejected.
    pub fn is_failing_fast(&self) -> bool {
        matches!(self.state, State::FailFast { .. })
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for FailFast<S> {
    fn clone(&self) -> Self {
        FailFast {
            inner: self.inner.clone(),
            timeout: self.timeout,
            state: self.state,
            // Re-armed from `since` on the clone's first unready poll.
            timer: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for FailFast<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailFast")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("state", &self.state)
            .finish()
    }
}

impl<S, Req> Service<Req> for FailFast<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = HaError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is polled in every state, so recovery is noticed at once.
        match self.inner.poll_ready(cx) {
            Poll::Ready(result) => {
                if let State::FailFast { since, .. } = self.state {
                    tracing::info!(
                        unready_for = ?Instant::now().saturating_duration_since(since),
                        "fail-fast: inner service ready again, accepting calls"
                    );
                }
                self.state = State::Ready;
                return Poll::Ready(result.map_err(|e| HaError::from_boxed(e.into())));
            }
            Poll::Pending => {}
        }

        let since = match self.state {
            State::FailFast { .. } => return Poll::Ready(Ok(())),
            State::Unready { since } => {
                if self.timer.is_none() {
                    self.timer = Some(Box::pin(tokio::time::sleep_until(since + self.timeout)));
                }
                since
            }
            State::Ready => {
                let now = Instant::now();
                let at = now + self.timeout;
                match self.timer.as_mut() {
                    Some(timer) => timer.as_mut().reset(at),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                self.state = State::Unready { since: now };
                now
            }
        };

        let fired = match self.timer.as_mut() {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if !fired {
            return Poll::Pending;
        }
        let unready_for = Instant::now().saturating_duration_since(since);
        tracing::warn!(
            ?unready_for,
            timeout = ?self.timeout,
            "fail-fast: inner service unready for too long, rejecting calls"
        );
        self.state = State::FailFast { since, unready_for };
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.state {
            State::FailFast { unready_for, .. } => {
                metrics::counter!(metrics_names::FAIL_FAST).increment(1);
                ResponseFuture {
                    kind: Kind::Rejected {
                        unready_for: Some(unready_for),
                    },
                }
            }
            State::Ready | State::Unready { .. } => ResponseFuture {
                kind: Kind::Inner {
                    future: self.inner.call(req),
                },
            },
        }
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Inner { #[pin] future: F },
        // The error is built when polled, so the future stays small on the pass-through path.
        Rejected { unready_for: Option<Duration> },
    }
}

pin_project! {
    /// The future of a [`FailFast`] call: the inner future, or an immediate rejection.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, HaError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                future.poll(cx).map_err(|e| HaError::from_boxed(e.into()))
            }
            KindProj::Rejected { unready_for } => Poll::Ready(Err(match unready_for.take() {
                Some(unready_for) => HaError::Unavailable { unready_for },
                None => HaError::backend(std::io::Error::other(
                    "fail-fast future polled after completion",
                )),
            })),
        }
    }
}
