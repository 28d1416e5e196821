//! The [`ResponseFuture`] of [`Failover`](super::Failover): a state machine over the tries of
//! one call.
//!
//! The first try costs no allocation, no spawn and no timer when it completes on its first
//! poll: the clock is read and the `Sleep` is armed only once the inner future has returned
//! `Pending` (or failed in a way that may be retried).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::policy::RetryPolicy;
use super::service::{Proto, Shared};
use crate::attempt::{self, Pick};
use crate::error::{BoxError, ErrorClass, HaError};
use crate::metrics_names;

/// What the armed `Sleep` stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Not armed yet (the fast path never arms it).
    Unarmed,
    /// The per-try timeout of the current try, earlier than the deadline.
    Try,
    /// The overall deadline of the call.
    Deadline,
    /// The end of the pause before the next try, earlier than the deadline.
    Backoff,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // A try is in flight.
        Called { #[pin] future: F },
        // Pausing before the next try.
        Backoff,
        // Waiting for the service to be ready for the next try.
        Ready,
        // The output was returned.
        Done,
    }
}

/// What a retry needs: a copy of the service (taken from the prototype at the first retry)
/// and of the request.
struct Retry<S, P, Req> {
    service: Option<S>,
    policy: P,
    /// The copy the remaining tries are made from (taken by the last one).
    request: Option<Req>,
    /// The request of the next try, set when a retry has been decided.
    next: Option<Req>,
}

/// The endpoints picked by the tries so far; the first is stored inline so the fast path does
/// not allocate.
#[derive(Default)]
struct Picks {
    first: Option<SocketAddr>,
    rest: Vec<SocketAddr>,
    /// Picks of tries that went through a deferring layer, known once the balancer made them.
    deferred: Vec<Arc<attempt::PickSlot>>,
    /// The current try's pick.
    current: Pick,
}

impl Picks {
    fn push(&mut self, pick: Pick) {
        match &pick {
            Pick::Now(addr) => self.push_addr(*addr),
            Pick::Later(slot) => self.deferred.push(slot.clone()),
            Pick::None => {}
        }
        self.current = pick;
    }

    fn push_addr(&mut self, addr: SocketAddr) {
        if self.first.is_none() {
            self.first = Some(addr);
        } else if self.first != Some(addr) && !self.rest.contains(&addr) {
            self.rest.push(addr);
        }
    }

    fn collect(&mut self) -> Vec<SocketAddr> {
        for slot in std::mem::take(&mut self.deferred) {
            match slot.get() {
                Some(addr) => self.push_addr(addr),
                None => self.deferred.push(slot),
            }
        }
        self.first.iter().chain(self.rest.iter()).copied().collect()
    }
}

impl fmt::Debug for Picks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.first.iter().chain(self.rest.iter()))
            .finish()
    }
}

pin_project! {
    /// The future of a [`Failover`](super::Failover) call.
    pub struct ResponseFuture<S, P, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        // Boxed, and only once a try returns Pending: an inline `Sleep` would double the size
        // every call's future has to move around.
        sleep: Option<Pin<Box<Sleep>>>,
        timer: Timer,
        retry: Option<Retry<S, P, Req>>,
        proto: Arc<Proto<S>>,
        picks: Picks,
        attempts: u32,
        start: Option<Instant>,
        // The policy said the request may be sent twice.
        idempotent: bool,
        // Some try may have taken effect without an answer (abandoned or a maybe-sent error).
        maybe_sent: bool,
    }
}

impl<S, P, Req> ResponseFuture<S, P, Req>
where
    S: Service<Req>,
{
    pub(super) fn new(
        future: S::Future,
        picked: Pick,
        retry: Option<(P, Req)>,
        idempotent: bool,
        proto: Arc<Proto<S>>,
    ) -> Self {
        let mut picks = Picks::default();
        picks.push(picked);
        ResponseFuture {
            state: State::Called { future },
            sleep: None,
            timer: Timer::Unarmed,
            retry: retry.map(|(policy, request)| Retry {
                service: None,
                policy,
                request: Some(request),
                next: None,
            }),
            proto,
            picks,
            attempts: 1,
            start: None,
            idempotent,
            maybe_sent: false,
        }
    }

    /// A call whose service was not ready when it was made: the future waits for it (within
    /// the deadline) before the first try.
    pub(super) fn unready(
        service: S,
        policy: P,
        request: Req,
        copy: Option<Req>,
        idempotent: bool,
        proto: Arc<Proto<S>>,
    ) -> Self {
        ResponseFuture {
            state: State::Ready,
            sleep: None,
            timer: Timer::Unarmed,
            retry: Some(Retry {
                service: Some(service),
                policy,
                request: copy,
                next: Some(request),
            }),
            proto,
            picks: Picks::default(),
            attempts: 0,
            start: None,
            idempotent,
            maybe_sent: false,
        }
    }
}

impl<S, P, Req> fmt::Debug for ResponseFuture<S, P, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("picks", &self.picks)
            .field("timer", &self.timer)
            .finish_non_exhaustive()
    }
}

/// Why a failed try is not retried (the `outcome` label).
type GiveUp = &'static str;

impl<S, P, Req> Future for ResponseFuture<S, P, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: RetryPolicy<Req>,
{
    type Output = Result<S::Response, HaError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let proto: &Proto<S> = this.proto;
        let shared: &Shared = &proto.shared;
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let err: BoxError = match future.poll(cx) {
                        Poll::Ready(Ok(rsp)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(rsp));
                        }
                        Poll::Ready(Err(err)) => err.into(),
                        Poll::Pending => {
                            if *this.timer == Timer::Unarmed {
                                // First Pending of this try: only now read the clock and arm
                                // the timer (an armed `Sleep` from an earlier try is reset).
                                let now = Instant::now();
                                let start = *this.start.get_or_insert(now);
                                shared.budget.observe(now);
                                let (kind, at) = try_timer(
                                    shared,
                                    this.retry,
                                    *this.attempts,
                                    *this.idempotent,
                                    start,
                                    now,
                                );
                                arm(this.sleep, this.timer, kind, at);
                            }
                            ready!(poll_sleep(this.sleep, cx));
                            if *this.timer == Timer::Deadline {
                                // The try in flight is abandoned: it may have taken effect.
                                attempt::timing_out(|| this.state.set(State::Done));
                                return Poll::Ready(Err(exceeded(shared, *this.attempts, true)));
                            }
                            // The per-try timeout fired: the try may have been sent.
                            match decide(
                                shared,
                                this.retry,
                                *this.attempts,
                                this.start,
                                ErrorClass::MaybeSent.is_retryable(*this.idempotent),
                            ) {
                                Ok(now) => {
                                    *this.maybe_sent = true;
                                    log_retry(
                                        shared,
                                        *this.attempts,
                                        &"per-try timeout",
                                        this.picks,
                                    );
                                    attempt::timing_out(|| this.state.set(State::Ready));
                                    next_try(
                                        shared,
                                        this.sleep,
                                        this.timer,
                                        this.state.as_mut(),
                                        *this.attempts,
                                        this.start,
                                        now,
                                    );
                                }
                                Err(outcome) => {
                                    // Nowhere else to go: let this try run to the deadline.
                                    count_give_up(shared, outcome);
                                    let at = deadline_at(shared, this.start);
                                    arm(this.sleep, this.timer, Timer::Deadline, at);
                                }
                            }
                            continue;
                        }
                    };
                    let class = shared.classifier.classify(&*err);
                    let verdict = if matches!(this.picks.current, Pick::None)
                        && HaError::find(&*err).is_some_and(HaError::is_no_healthy_endpoint)
                    {
                        // Nothing was picked because there is nothing to pick: trying again at
                        // once would find the same and only drain the retry budget that the
                        // next real failure needs.
                        Err("no_endpoint")
                    } else {
                        decide(
                            shared,
                            this.retry,
                            *this.attempts,
                            this.start,
                            class.is_retryable(*this.idempotent),
                        )
                    };
                    match verdict {
                        Ok(now) => {
                            if class == ErrorClass::MaybeSent {
                                *this.maybe_sent = true;
                            }
                            log_retry(shared, *this.attempts, &err, this.picks);
                            this.state.set(State::Ready);
                            next_try(
                                shared,
                                this.sleep,
                                this.timer,
                                this.state.as_mut(),
                                *this.attempts,
                                this.start,
                                now,
                            );
                        }
                        Err(outcome) => {
                            count_give_up(shared, outcome);
                            this.state.set(State::Done);
                            let endpoint = this.picks.current.now();
                            return Poll::Ready(Err(give_up(shared, class, err, endpoint)));
                        }
                    }
                }
                StateProj::Backoff => {
                    ready!(poll_sleep(this.sleep, cx));
                    if *this.timer == Timer::Deadline {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(exceeded(
                            shared,
                            *this.attempts,
                            *this.maybe_sent,
                        )));
                    }
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let Some(retry) = this.retry.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(internal("retry state without a service")));
                    };
                    let service = retry.service.get_or_insert_with(|| proto.service());
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let Some(req) = retry.next.take() else {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(internal("retry state without a request")));
                            };
                            let (future, picked) =
                                attempt::scope_pick(this.picks.collect(), || service.call(req));
                            this.picks.push(picked);
                            *this.attempts += 1;
                            this.state.set(State::Called { future });
                            // As for the first try: the timer is re-armed only if it returns
                            // Pending.
                            *this.timer = Timer::Unarmed;
                        }
                        Poll::Ready(Err(err)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(HaError::from_boxed(err.into())));
                        }
                        Poll::Pending => {
                            if *this.timer != Timer::Deadline {
                                // A service that is never ready is bounded by the deadline too,
                                // from the first poll of the call.
                                let now = Instant::now();
                                let start = *this.start.get_or_insert(now);
                                arm(
                                    this.sleep,
                                    this.timer,
                                    Timer::Deadline,
                                    start + shared.deadline,
                                );
                            }
                            ready!(poll_sleep(this.sleep, cx));
                            this.state.set(State::Done);
                            return Poll::Ready(Err(exceeded(
                                shared,
                                *this.attempts,
                                *this.maybe_sent,
                            )));
                        }
                    }
                }
                StateProj::Done => {
                    return Poll::Ready(Err(internal("failover future polled after completion")));
                }
            }
        }
    }
}

/// Decides whether the failed try `attempts` is retried. On `Ok(now)` the budget has paid for
/// the retry and the next request is ready in `retry.next`.
fn decide<S, P, Req>(
    shared: &Shared,
    retry: &mut Option<Retry<S, P, Req>>,
    attempts: u32,
    start: &mut Option<Instant>,
    retryable: bool,
) -> Result<Instant, GiveUp>
where
    P: RetryPolicy<Req>,
{
    let Some(r) = retry.as_mut() else {
        return Err("not_retryable");
    };
    if !retryable {
        return Err("not_retryable");
    }
    if attempts >= shared.max_attempts {
        return Err("attempts_exhausted");
    }
    let now = Instant::now();
    let start = *start.get_or_insert(now);
    if now >= start + shared.deadline {
        return Err("deadline_exceeded");
    }
    let last = attempts + 1 >= shared.max_attempts;
    let next = if last {
        r.request.take()
    } else {
        r.request
            .as_ref()
            .and_then(|req| r.policy.clone_request(req))
    };
    let Some(next) = next else {
        return Err("not_retryable");
    };
    if !shared.budget.withdraw(now) {
        if last {
            r.request = Some(next);
        }
        return Err("budget_exhausted");
    }
    r.next = Some(next);
    Ok(now)
}

/// Moves a call whose retry was decided (state `Ready`) into its backoff pause, if any, and arms
/// the timer for it.
fn next_try<F>(
    shared: &Shared,
    sleep: &mut Option<Pin<Box<Sleep>>>,
    timer: &mut Timer,
    mut state: Pin<&mut State<F>>,
    attempts: u32,
    start: &Option<Instant>,
    now: Instant,
) {
    let deadline = deadline_at(shared, start);
    let delay = shared
        .backoff
        .as_ref()
        .map_or(Duration::ZERO, |b| b.delay(attempts));
    if delay.is_zero() {
        // The service may be ready at once; the deadline timer is armed only if it is not.
        return;
    }
    let until = now + delay;
    if until < deadline {
        arm(sleep, timer, Timer::Backoff, until);
    } else {
        arm(sleep, timer, Timer::Deadline, deadline);
    }
    state.set(State::Backoff);
}

/// The timer of a try that starts at `now`: the per-try timeout if another try could follow,
/// else (or if it is later) the deadline.
fn try_timer<S, P, Req>(
    shared: &Shared,
    retry: &Option<Retry<S, P, Req>>,
    attempts: u32,
    idempotent: bool,
    start: Instant,
    now: Instant,
) -> (Timer, Instant) {
    let deadline = start + shared.deadline;
    // Only an idempotent request moves on when a try times out (it may have been sent).
    let more = idempotent
        && attempts < shared.max_attempts
        && retry.as_ref().is_some_and(|r| r.request.is_some());
    let try_end = now + shared.try_timeout;
    if more && try_end < deadline {
        (Timer::Try, try_end)
    } else {
        (Timer::Deadline, deadline)
    }
}

fn deadline_at(shared: &Shared, start: &Option<Instant>) -> Instant {
    start.unwrap_or_else(Instant::now) + shared.deadline
}

fn arm(sleep: &mut Option<Pin<Box<Sleep>>>, timer: &mut Timer, kind: Timer, at: Instant) {
    match sleep.as_mut() {
        Some(s) => s.as_mut().reset(at),
        None => *sleep = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    *timer = kind;
}

fn poll_sleep(sleep: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match sleep.as_mut() {
        Some(s) => s.as_mut().poll(cx),
        // Never reached: every caller arms the timer first.
        None => Poll::Pending,
    }
}

/// The error of a failed try that is not retried: an unknown outcome for a maybe-sent
/// failure, else the error itself, typed.
fn give_up(
    shared: &Shared,
    class: ErrorClass,
    err: BoxError,
    endpoint: Option<SocketAddr>,
) -> HaError {
    if class == ErrorClass::MaybeSent {
        metrics::counter!(metrics_names::OUTCOME_UNKNOWN, "dependency" => shared.dependency.clone())
            .increment(1);
        return HaError::OutcomeUnknown {
            endpoint,
            source: err,
        };
    }
    HaError::from_boxed(err)
}

fn exceeded(shared: &Shared, attempts: u32, maybe_sent: bool) -> HaError {
    metrics::counter!(metrics_names::DEADLINES, "dependency" => shared.dependency.clone())
        .increment(1);
    tracing::debug!(
        dependency = %&*shared.dependency,
        deadline = ?shared.deadline,
        attempts,
        "failover: deadline exceeded"
    );
    if maybe_sent {
        metrics::counter!(metrics_names::OUTCOME_UNKNOWN, "dependency" => shared.dependency.clone())
            .increment(1);
    }
    HaError::DeadlineExceeded {
        deadline: shared.deadline,
        attempts,
        maybe_sent,
    }
}

fn log_retry(shared: &Shared, attempts: u32, err: &dyn fmt::Display, picks: &mut Picks) {
    metrics::counter!(
        metrics_names::RETRIES,
        "dependency" => shared.dependency.clone(),
        "outcome" => "retried"
    )
    .increment(1);
    tracing::debug!(
        dependency = %&*shared.dependency,
        attempt = attempts + 1,
        error = %err,
        avoided = ?picks.collect(),
        "failover: retrying on another endpoint"
    );
}

fn count_give_up(shared: &Shared, outcome: GiveUp) {
    metrics::counter!(
        metrics_names::RETRIES,
        "dependency" => shared.dependency.clone(),
        "outcome" => outcome
    )
    .increment(1);
}

fn internal(msg: &'static str) -> HaError {
    HaError::backend(std::io::Error::other(msg))
}
