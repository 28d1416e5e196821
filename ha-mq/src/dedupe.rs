//! The consumer's dedupe window: each key handled once within the window, whichever cluster
//! delivers it and however often; bounded in keys.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

enum Slot {
    /// A handler runs for the key; others wait for its outcome.
    InFlight(Arc<Notify>),
    /// Handled at that time.
    Done(Instant),
}

/// What a delivery of a key should do.
pub(crate) enum Claim {
    /// Run the handler, then call [`Dedupe::done`] or [`Dedupe::failed`].
    Run,
    /// Handled within the window: acknowledge without running the handler.
    Duplicate,
}

struct State {
    slots: HashMap<String, Slot>,
    /// Keys in the order they were handled (with the time), for expiry and the cap.
    order: VecDeque<(Instant, String)>,
}

/// Keys handled within `window`, at most `max_keys` of them (the oldest go first).
pub(crate) struct Dedupe {
    window: Duration,
    max_keys: usize,
    state: Mutex<State>,
}

impl Dedupe {
    pub(crate) fn new(window: Duration, max_keys: usize) -> Dedupe {
        Dedupe {
            window,
            max_keys: max_keys.max(1),
            state: Mutex::new(State {
                slots: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Claims `key`: waits while another delivery of it is being handled.
    pub(crate) async fn claim(&self, key: &str) -> Claim {
        loop {
            let notify = {
                let mut st = self.state.lock();
                let now = Instant::now();
                Self::expire(&mut st, now, self.window, self.max_keys);
                match st.slots.get(key) {
                    None => {
                        st.slots
                            .insert(key.to_string(), Slot::InFlight(Arc::new(Notify::new())));
                        return Claim::Run;
                    }
                    Some(Slot::Done(_)) => return Claim::Duplicate,
                    Some(Slot::InFlight(n)) => Arc::clone(n),
                }
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before the state is looked at again: no wake-up is missed.
            notified.as_mut().enable();
            let still = matches!(self.state.lock().slots.get(key), Some(Slot::InFlight(n)) if Arc::ptr_eq(n, &notify));
            if still {
                notified.await;
            }
        }
    }

    /// The handler of `key` succeeded: later deliveries within the window are duplicates.
    pub(crate) fn done(&self, key: &str) {
        let mut st = self.state.lock();
        let now = Instant::now();
        if let Some(Slot::InFlight(n)) = st.slots.insert(key.to_string(), Slot::Done(now)) {
            n.notify_waiters();
        }
        st.order.push_back((now, key.to_string()));
        Self::expire(&mut st, now, self.window, self.max_keys);
    }

    /// The handler of `key` failed: the next delivery (or a waiting one) runs it again.
    pub(crate) fn failed(&self, key: &str) {
        let mut st = self.state.lock();
        if let Some(Slot::InFlight(n)) = st.slots.remove(key) {
            n.notify_waiters();
        }
    }

    /// Keys remembered as handled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state.lock().order.len()
    }

    fn expire(st: &mut State, now: Instant, window: Duration, max: usize) {
        while let Some((t, _)) = st.order.front() {
            if now.duration_since(*t) < window && st.order.len() <= max {
                break;
            }
            if let Some((t, k)) = st.order.pop_front() {
                // Only the entry of this handling (a key handled again later has a newer one).
                if matches!(st.slots.get(&k), Some(Slot::Done(d)) if *d == t) {
                    st.slots.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_runs_once_within_the_window_then_again_after_it() {
        let d = Dedupe::new(Duration::from_secs(60), 100);
        assert!(matches!(d.claim("k").await, Claim::Run));
        d.done("k");
        assert!(matches!(d.claim("k").await, Claim::Duplicate));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(d.claim("k").await, Claim::Run));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_handling_lets_the_next_delivery_run() {
        let d = Dedupe::new(Duration::from_secs(60), 100);
        assert!(matches!(d.claim("k").await, Claim::Run));
        d.failed("k");
        assert!(matches!(d.claim("k").await, Claim::Run));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_delivery_waits_for_the_first_and_is_a_duplicate_if_it_succeeded() {
        let d = Arc::new(Dedupe::new(Duration::from_secs(60), 100));
        assert!(matches!(d.claim("k").await, Claim::Run));
        let d2 = Arc::clone(&d);
        let waiter = tokio::spawn(async move { matches!(d2.claim("k").await, Claim::Duplicate) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        d.done("k");
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_delivery_runs_if_the_first_failed() {
        let d = Arc::new(Dedupe::new(Duration::from_secs(60), 100));
        assert!(matches!(d.claim("k").await, Claim::Run));
        let d2 = Arc::clone(&d);
        let waiter = tokio::spawn(async move { matches!(d2.claim("k").await, Claim::Run) });
        tokio::task::yield_now().await;
        d.failed("k");
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_by_max_keys() {
        let d = Dedupe::new(Duration::from_secs(3600), 10);
        for i in 0..1000 {
            let k = format!("k{i}");
            assert!(matches!(d.claim(&k).await, Claim::Run));
            d.done(&k);
        }
        assert_eq!(d.len(), 10);
        assert_eq!(d.state.lock().slots.len(), 10);
        // The newest are remembered, the oldest forgotten.
        assert!(matches!(d.claim("k999").await, Claim::Duplicate));
        assert!(matches!(d.claim("k0").await, Claim::Run));
    }
}
