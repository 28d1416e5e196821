use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower_service::Service;

use super::service::EntryCore;
use crate::error::{BoxError, HaError};
use crate::health::ProbeTicket;

/// Tracks one call on one endpoint: counts it in flight, and records its outcome on completion,
/// or a failure when the call is dropped unfinished (a per-try timeout or deadline).
pub(crate) struct CallGuard {
    core: Arc<EntryCore>,
    /// When the call first yielded; `None` while it has not (an answer on the first poll takes
    /// no measurable time and needs no clock reading).
    start: Option<Instant>,
    start_ms: u64,
    probe: Option<ProbeTicket>,
    done: bool,
}

impl CallGuard {
    pub(crate) fn new(core: Arc<EntryCore>, start_ms: u64, probe: Option<ProbeTicket>) -> Self {
        core.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            core,
            start: None,
            start_ms,
            probe,
            done: false,
        }
    }

    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let ctx = self.core.ctx();
        let (latency, now_ms) = match self.start {
            Some(start) => {
                let now = Instant::now();
                (now.saturating_duration_since(start), ctx.observe_clock(now))
            }
            // A failure moves ejection clocks: it reads the clock even when it came at once.
            None if !ok => (Duration::ZERO, ctx.read_clock()),
            None => (Duration::ZERO, self.start_ms),
        };
        ctx.record(&self.core, ok, latency, now_ms, self.probe);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.core.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done && crate::attempt::is_timing_out() {
            // `Failover` abandoned this try for its per-try timeout or the deadline: a
            // timeout, held against the endpoint. Any other drop is the caller going away (a
            // cancelled request, an outer `select!`): it says nothing about the endpoint.
            self.finish(false);
        }
        if let Some(ticket) = self.probe {
            self.core.health.release_probe(ticket);
        }
    }
}

pin_project! {
    /// The response future of [`LocalityBalance`](super::LocalityBalance).
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        kind: Kind<S, Req>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S: Service<Req>, Req> {
        Call { #[pin] fut: Oneshot<S, Req>, guard: Option<CallGuard> },
        Fail { err: Option<HaError> },
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn call(svc: S, req: Req, guard: CallGuard) -> Self {
        ResponseFuture {
            kind: Kind::Call {
                fut: Oneshot::new(svc, req),
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn fail(err: HaError) -> Self {
        ResponseFuture {
            kind: Kind::Fail { err: Some(err) },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, HaError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Call { fut, guard } => {
                let res = match fut.poll(cx) {
                    Poll::Ready(res) => res,
                    Poll::Pending => {
                        if let Some(g) = guard.as_mut()
                            && g.start.is_none()
                        {
                            g.start = Some(Instant::now());
                        }
                        return Poll::Pending;
                    }
                };
                let res = res.map_err(Into::into);
                if let Some(mut g) = guard.take() {
                    // Only a transport failure or a timeout counts against the endpoint; an
                    // application error is an answer, and proof that the endpoint is alive.
                    let ok = match &res {
                        Ok(_) => true,
                        Err(e) => !g.core.ctx().classifier.classify(&**e).is_endpoint_failure(),
                    };
                    g.finish(ok);
                }
                Poll::Ready(res.map_err(HaError::from_boxed))
            }
            KindProj::Fail { err } => Poll::Ready(Err(match err.take() {
                Some(e) => e,
                None => HaError::NoHealthyEndpoint {
                    dependency: "polled after completion".into(),
                },
            })),
        }
    }
}
