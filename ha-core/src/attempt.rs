//! The context one attempt of a call carries from [`Failover`](crate::failover::Failover) down to
//! [`LocalityBalance`](crate::balance::LocalityBalance), so that each retry goes to a different
//! endpoint without the request type having to carry anything.
//!
//! `Failover` runs the inner `call` inside [`scope`]; the balancer reads [`avoided`] while it picks
//! and reports its pick with [`record_pick`]. The scope covers only the synchronous `call`, so
//! nothing is held across an `.await` and the futures stay `Send`.
//!
//! **Layers that defer the call.** A layer that calls its inner service later, inside its own
//! future or on a worker task (tower's `Buffer`), breaks that synchronous chain: the balancer
//! would pick outside the scope, every retry could go back to the endpoint that just failed.
//! Put [`CarryLayer`] just above such a layer and [`RestoreLayer`] just below it: the context
//! then travels inside the request as an [`Attempt`], and the pick comes back through a shared
//! slot that `Failover` reads when it decides the retry.
//!
//! ```
//! use ha_core::attempt::{CarryLayer, RestoreLayer};
//! use ha_core::failover::Failover;
//! use tower::ServiceBuilder;
//!
//! # fn stack<S>(balancer: S) where S: tower::Service<String, Error = ha_core::HaError> + Clone + Send + 'static, S::Future: Send {
//! let client = ServiceBuilder::new()
//!     .layer(Failover::layer())
//!     .layer(CarryLayer)
//!     .buffer(64)
//!     .layer(RestoreLayer)
//!     .service(balancer);
//! # let _ = client;
//! # }
//! ```
//!
//! **Timeouts.** When `Failover` abandons a try because its per-try timeout (or the deadline)
//! fired, it drops the try's future inside [`timing_out`]; a balancer's call guard that is
//! dropped then reads [`is_timing_out`] and counts a timeout against the endpoint. A future
//! dropped any other way (the caller went away) is a cancellation, not an endpoint failure.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tower_layer::Layer;
use tower_service::Service;

// Plain thread-locals, not a tokio task-local: a scope only ever covers a synchronous `call`,
// which runs on one thread without yielding. The first attempt of a call (nothing to avoid, no
// deferring layer) touches only the two plain cells, `PICKED` and `FLAGS`; the list to avoid
// and the deferred slot are touched only when a flag says they hold something.
thread_local! {
    static PICKED: Cell<Option<SocketAddr>> = const { Cell::new(None) };
    static FLAGS: Cell<u8> = const { Cell::new(0) };
    static AVOID: RefCell<Vec<SocketAddr>> = const { RefCell::new(Vec::new()) };
    static DEFERRED: Cell<Option<Arc<PickSlot>>> = const { Cell::new(None) };
}

/// `AVOID` holds this scope's endpoints to avoid.
const AVOIDING: u8 = 1;
/// `DEFERRED` holds a slot a deferring layer set in this scope.
const DEFERRING: u8 = 2;
/// `Failover` is dropping a try it abandoned.
const TIMING_OUT: u8 = 4;
/// The flags a scope has of its own (timing out spans scopes).
const SCOPED: u8 = AVOIDING | DEFERRING;

fn flags() -> u8 {
    FLAGS.try_with(Cell::get).unwrap_or(0)
}

fn set_flags(f: impl FnOnce(u8) -> u8) -> u8 {
    FLAGS
        .try_with(|c| {
            let old = c.get();
            c.set(f(old));
            old
        })
        .unwrap_or(0)
}

/// Restores the enclosing scope's state, also when `f` panics.
struct RestoreState {
    picked: Option<SocketAddr>,
    flags: u8,
    avoid: Option<Vec<SocketAddr>>,
    deferred: Option<Arc<PickSlot>>,
}

impl Drop for RestoreState {
    fn drop(&mut self) {
        let _ = PICKED.try_with(|c| c.set(self.picked));
        let outer = self.flags & SCOPED;
        set_flags(|f| (f & !SCOPED) | outer);
        if let Some(v) = self.avoid.take() {
            let _ = AVOID.try_with(|c| {
                if let Ok(mut slot) = c.try_borrow_mut() {
                    *slot = v;
                }
            });
        }
        if outer & DEFERRING != 0 {
            let slot = self.deferred.take();
            let _ = DEFERRED.try_with(|c| c.set(slot));
        }
    }
}

/// Runs `f` (a synchronous `Service::call`) with `avoid` as the endpoints the balancer should not
/// pick, and returns what `f` returned together with the endpoint the balancer picked, if any.
/// Scopes nest: an inner scope hides the outer one until it ends.
///
/// ```
/// use ha_core::attempt;
/// let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
/// let ((), picked) = attempt::scope(vec![a], || {
///     assert!(attempt::avoided(|avoid| avoid.contains(&a)));
///     attempt::record_pick(a);
/// });
/// assert_eq!(picked, Some(a));
/// assert!(!attempt::avoided(|avoid| avoid.contains(&a)));
/// ```
pub fn scope<R>(avoid: Vec<SocketAddr>, f: impl FnOnce() -> R) -> (R, Option<SocketAddr>) {
    let (r, pick) = scope_pick(avoid, f);
    (r, pick.now())
}

/// What an attempt's pick is: known at once, to be known later (a deferring layer between
/// `Failover` and the balancer, see [`CarryLayer`]), or none (no balancer under the scope).
#[derive(Debug, Clone, Default)]
pub enum Pick {
    /// No balancer reported a pick.
    #[default]
    None,
    /// The balancer picked this endpoint during the call.
    Now(SocketAddr),
    /// The call was deferred; the slot holds the pick once the balancer made it.
    Later(Arc<PickSlot>),
}

impl Pick {
    /// The pick if it is known now.
    pub fn now(&self) -> Option<SocketAddr> {
        match self {
            Pick::None => None,
            Pick::Now(a) => Some(*a),
            Pick::Later(slot) => slot.get(),
        }
    }
}

/// Where a deferred attempt's pick lands (see [`CarryLayer`]).
#[derive(Debug, Default)]
pub struct PickSlot(Mutex<Option<SocketAddr>>);

impl PickSlot {
    /// The pick, once made.
    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.lock()
    }

    fn set(&self, addr: SocketAddr) {
        *self.0.lock() = Some(addr);
    }
}

/// [`scope`], also collecting the slot of a deferred pick (see [`Pick`]).
pub fn scope_pick<R>(avoid: Vec<SocketAddr>, f: impl FnOnce() -> R) -> (R, Pick) {
    let avoiding = if avoid.is_empty() { 0 } else { AVOIDING };
    let mut restore = RestoreState {
        picked: PICKED.try_with(|c| c.replace(None)).ok().flatten(),
        flags: set_flags(|f| (f & !SCOPED) | avoiding),
        avoid: None,
        deferred: None,
    };
    if avoiding != 0 {
        restore.avoid = AVOID
            .try_with(|c| {
                c.try_borrow_mut()
                    .ok()
                    .map(|mut slot| std::mem::replace(&mut *slot, avoid))
            })
            .ok()
            .flatten();
    }
    if restore.flags & DEFERRING != 0 {
        restore.deferred = DEFERRED.try_with(Cell::take).ok().flatten();
    }
    let r = f();
    let picked = PICKED.try_with(Cell::get).ok().flatten();
    let deferred = if flags() & DEFERRING != 0 {
        DEFERRED.try_with(Cell::take).ok().flatten()
    } else {
        None
    };
    drop(restore);
    let pick = match (picked, deferred) {
        (Some(a), _) => Pick::Now(a),
        (None, Some(slot)) => Pick::Later(slot),
        (None, None) => Pick::None,
    };
    (r, pick)
}

/// Runs `f` (dropping an abandoned try's future) with [`is_timing_out`] true.
pub fn timing_out<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(u8);
    impl Drop for Reset {
        fn drop(&mut self) {
            let was = self.0 & TIMING_OUT;
            set_flags(|f| (f & !TIMING_OUT) | was);
        }
    }
    let _reset = Reset(set_flags(|f| f | TIMING_OUT));
    f()
}

/// True while `Failover` drops a try it abandoned for its per-try timeout or the deadline:
/// a call guard dropped now was timed out, not cancelled.
pub fn is_timing_out() -> bool {
    flags() & TIMING_OUT != 0
}

// === Carrying the context through a deferring layer ===

/// A request with its attempt's context, as [`CarryLayer`] sends it through a deferring layer.
pub struct Attempt<Req> {
    /// The request itself.
    pub request: Req,
    avoid: Vec<SocketAddr>,
    slot: Arc<PickSlot>,
}

impl<Req: fmt::Debug> fmt::Debug for Attempt<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("request", &self.request)
            .field("avoid", &self.avoid)
            .finish_non_exhaustive()
    }
}

impl<Req> Attempt<Req> {
    /// The endpoints this attempt avoids.
    pub fn avoid(&self) -> &[SocketAddr] {
        &self.avoid
    }
}

/// Puts the current attempt's context into the request ([`Attempt`]) so that it crosses a
/// layer that defers the call; pair it with [`RestoreLayer`] below that layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct CarryLayer;

impl<S> Layer<S> for CarryLayer {
    type Service = Carry<S>;
    fn layer(&self, inner: S) -> Carry<S> {
        Carry { inner }
    }
}

/// The service of [`CarryLayer`]: `Service<Req>` over a `Service<Attempt<Req>>`.
#[derive(Debug, Clone)]
pub struct Carry<S> {
    inner: S,
}

impl<S, Req> Service<Req> for Carry<S>
where
    S: Service<Attempt<Req>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let slot = Arc::new(PickSlot::default());
        let avoid = avoided(<[SocketAddr]>::to_vec);
        let _ = DEFERRED.try_with(|c| c.set(Some(slot.clone())));
        set_flags(|f| f | DEFERRING);
        self.inner.call(Attempt {
            request,
            avoid,
            slot,
        })
    }
}

/// Takes the context out of an [`Attempt`] again and runs the inner call inside it; see
/// [`CarryLayer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreLayer;

impl<S> Layer<S> for RestoreLayer {
    type Service = Restore<S>;
    fn layer(&self, inner: S) -> Restore<S> {
        Restore { inner }
    }
}

/// The service of [`RestoreLayer`]: `Service<Attempt<Req>>` over a `Service<Req>`.
#[derive(Debug, Clone)]
pub struct Restore<S> {
    inner: S,
}

impl<S, Req> Service<Attempt<Req>> for Restore<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt<Req>) -> Self::Future {
        let Attempt {
            request,
            avoid,
            slot,
        } = attempt;
        let inner = &mut self.inner;
        let (future, picked) = scope(avoid, || inner.call(request));
        if let Some(addr) = picked {
            slot.set(addr);
        }
        future
    }
}

/// Calls `f` with the endpoints to avoid in the current attempt (empty outside a [`scope`]).
pub fn avoided<T>(mut f: impl FnMut(&[SocketAddr]) -> T) -> T {
    if flags() & AVOIDING == 0 {
        return f(&[]);
    }
    match AVOID.try_with(|c| c.try_borrow().ok().map(|v| f(&v))) {
        Ok(Some(t)) => t,
        _ => f(&[]),
    }
}

/// True when the current attempt avoids some endpoints (a retry).
pub fn is_avoiding() -> bool {
    flags() & AVOIDING != 0
}

/// Records the endpoint the balancer picked for the current attempt.
pub fn record_pick(addr: SocketAddr) {
    let _ = PICKED.try_with(|c| c.set(Some(addr)));
}
