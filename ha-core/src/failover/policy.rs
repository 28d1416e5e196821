//! Which requests may be sent more than once.

use std::fmt;

/// Decides whether a request may be tried again, and makes the copy a retry sends.
///
/// [`Failover`](super::Failover) asks the error's [`ErrorClass`](crate::ErrorClass): a request
/// that provably was not sent (`NotSent`, `Refused`) is retried whatever the policy says, as
/// long as the policy can copy it; one that may have been sent (`MaybeSent`: a reset after
/// the write, a per-try timeout) is retried only when the policy says it is idempotent, and
/// otherwise fails with [`HaError::OutcomeUnknown`](crate::HaError::OutcomeUnknown).
/// [`NeverRetry`] copies nothing, so its calls are tried exactly once.
///
/// ```
/// use ha_core::failover::{Idempotent, NeverRetry, NotIdempotent, RetryPolicy};
///
/// assert!(Idempotent.is_idempotent(&"GET /profile"));
/// assert!(!NotIdempotent.is_idempotent(&"POST /orders"));
/// assert_eq!(NotIdempotent.clone_request(&"POST /orders"), Some("POST /orders"));
/// assert_eq!(Idempotent.clone_request(&"GET /profile"), Some("GET /profile"));
/// assert!(!RetryPolicy::<&str>::is_idempotent(&NeverRetry, &"POST /orders"));
/// ```
pub trait RetryPolicy<Req>: Clone + Send + Sync + 'static {
    /// True when sending `req` twice has the same effect as sending it once.
    fn is_idempotent(&self, req: &Req) -> bool;

    /// A copy of `req` for another attempt, or `None` when it cannot be copied (then the call is
    /// tried once).
    fn clone_request(&self, req: &Req) -> Option<Req>;
}

/// No request is idempotent, every request is copied with `Clone`: the default policy.
///
/// A call is retried on another endpoint only when it provably never took effect (connect
/// refused, fenced, read-only, nothing picked); a call that may have been sent and got no
/// answer is never sent again and fails with
/// [`HaError::OutcomeUnknown`](crate::HaError::OutcomeUnknown). Safe for writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotIdempotent;

impl<Req: Clone> RetryPolicy<Req> for NotIdempotent {
    fn is_idempotent(&self, _req: &Req) -> bool {
        false
    }

    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// Every request is idempotent and is copied with `Clone`.
///
/// Use it for reads; for a mix of reads and writes use [`IdempotentIf`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Idempotent;

impl<Req: Clone> RetryPolicy<Req> for Idempotent {
    fn is_idempotent(&self, _req: &Req) -> bool {
        true
    }

    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// No request is ever retried, not even one that was provably not sent: every call is tried
/// exactly once (deadline and metrics still apply).
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverRetry;

impl<Req> RetryPolicy<Req> for NeverRetry {
    fn is_idempotent(&self, _req: &Req) -> bool {
        false
    }

    fn clone_request(&self, _req: &Req) -> Option<Req> {
        None
    }
}

/// A request is idempotent when a predicate says so; idempotent requests are copied with
/// `Clone`.
///
/// For HTTP the usual rule is that `GET`, `HEAD`, `OPTIONS`, `PUT` and `DELETE` are idempotent
/// and `POST` and `PATCH` are not. With `http::Request<B>` (`B: Clone`) that reads
/// `IdempotentIf::new(|req: &http::Request<B>| matches!(*req.method(), Method::GET | Method::HEAD
/// | Method::OPTIONS | Method::PUT | Method::DELETE))`; the same with a request type of your own:
///
/// ```
/// use ha_core::failover::{IdempotentIf, RetryPolicy};
///
/// #[derive(Clone)]
/// struct Request {
///     method: &'static str,
///     path: String,
/// }
///
/// let policy = IdempotentIf::new(|req: &Request| {
///     matches!(req.method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
/// });
/// let get = Request { method: "GET", path: "/members/7".into() };
/// let post = Request { method: "POST", path: "/members".into() };
/// assert!(policy.is_idempotent(&get));
/// assert!(!policy.is_idempotent(&post));
/// assert_eq!(policy.clone_request(&get).map(|r| r.path), Some("/members/7".to_string()));
/// ```
#[derive(Clone, Copy)]
pub struct IdempotentIf<F> {
    predicate: F,
}

impl<F> IdempotentIf<F> {
    /// A policy that retries the requests for which `predicate` returns true.
    pub fn new(predicate: F) -> Self {
        IdempotentIf { predicate }
    }
}

impl<F> fmt::Debug for IdempotentIf<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentIf").finish_non_exhaustive()
    }
}

impl<F, Req> RetryPolicy<Req> for IdempotentIf<F>
where
    F: Fn(&Req) -> bool + Clone + Send + Sync + 'static,
    Req: Clone,
{
    fn is_idempotent(&self, req: &Req) -> bool {
        (self.predicate)(req)
    }

    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}
