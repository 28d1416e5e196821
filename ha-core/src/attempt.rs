//! The context one attempt of a call carries from [`Failover`](crate::failover::Failover) down to
//! [`LocalityBalance`](crate::balance::LocalityBalance), so that each retry goes to a different
//! endpoint without the request type having to carry anything.
//!
//! `Failover` runs the inner `call` inside [`scope`]; the balancer reads [`avoided`] while it picks
//! and reports its pick with [`record_pick`]. The scope covers only the synchronous `call`, so
//! nothing is held across an `.await` and the futures stay `Send`.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

// Plain thread-locals, not a tokio task-local: a scope only ever covers a synchronous `call`,
// which runs on one thread without yielding. The first attempt of a call (nothing to avoid)
// touches only the two `Cell`s.
thread_local! {
    static AVOIDING: Cell<bool> = const { Cell::new(false) };
    static AVOID: RefCell<Vec<SocketAddr>> = const { RefCell::new(Vec::new()) };
    static PICKED: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

/// Restores the enclosing scope's state, also when `f` panics.
struct Restore {
    picked: Option<SocketAddr>,
    avoiding: bool,
    avoid: Option<Vec<SocketAddr>>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = PICKED.try_with(|c| c.set(self.picked));
        let _ = AVOIDING.try_with(|c| c.set(self.avoiding));
        if let Some(v) = self.avoid.take() {
            let _ = AVOID.try_with(|c| {
                if let Ok(mut slot) = c.try_borrow_mut() {
                    *slot = v;
                }
            });
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
    let mut restore = Restore {
        picked: PICKED.try_with(|c| c.replace(None)).ok().flatten(),
        avoiding: AVOIDING
            .try_with(|c| c.replace(!avoid.is_empty()))
            .unwrap_or(false),
        avoid: None,
    };
    if !avoid.is_empty() {
        restore.avoid = AVOID
            .try_with(|c| {
                c.try_borrow_mut()
                    .ok()
                    .map(|mut slot| std::mem::replace(&mut *slot, avoid))
            })
            .ok()
            .flatten();
    }
    let r = f();
    let picked = PICKED.try_with(Cell::get).ok().flatten();
    drop(restore);
    (r, picked)
}

/// Calls `f` with the endpoints to avoid in the current attempt (empty outside a [`scope`]).
pub fn avoided<T>(mut f: impl FnMut(&[SocketAddr]) -> T) -> T {
    if !AVOIDING.try_with(Cell::get).unwrap_or(false) {
        return f(&[]);
    }
    match AVOID.try_with(|c| c.try_borrow().ok().map(|v| f(&v))) {
        Ok(Some(t)) => t,
        _ => f(&[]),
    }
}

/// True when the current attempt avoids some endpoints (a retry).
pub fn is_avoiding() -> bool {
    AVOIDING.try_with(Cell::get).unwrap_or(false)
}

/// Records the endpoint the balancer picked for the current attempt.
pub fn record_pick(addr: SocketAddr) {
    let _ = PICKED.try_with(|c| c.set(Some(addr)));
}
