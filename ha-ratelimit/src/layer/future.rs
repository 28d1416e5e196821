use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ha_core::BoxError;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Called { #[pin] fut: S::Future },
        Held { #[pin] sleep: Sleep, svc: Option<S>, req: Option<Req> },
        Rejected { err: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    pub(crate) fn delayed(hold: Duration, svc: S, req: Req) -> Self {
        ResponseFuture {
            state: State::Held {
                sleep: tokio::time::sleep(hold),
                svc: Some(svc),
                req: Some(req),
            },
        }
    }

    pub(crate) fn rejected(err: BoxError) -> Self {
        ResponseFuture {
            state: State::Rejected { err: Some(err) },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Held { sleep, svc, req } => {
                    ready!(sleep.poll(cx));
                    let (Some(mut svc), Some(req)) = (svc.take(), req.take()) else {
                        return Poll::Ready(
                            Err("rate-limit future polled after completion".into()),
                        );
                    };
                    let fut = svc.call(req);
                    state.set(State::Called { fut });
                }
                StateProj::Rejected { err } => {
                    return Poll::Ready(Err(match err.take() {
                        Some(e) => e,
                        None => "rate-limit future polled after completion".into(),
                    }));
                }
            }
        }
    }
}
