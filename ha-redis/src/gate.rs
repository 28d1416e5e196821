//! The write gate: the current verified master connection and whether writes are held.
//!
//! One `watch` holds both, so the follower swaps the connection and releases the hold in one
//! step: no write can slip onto the old master between the two. A caller waits for a usable
//! connection bounded by its deadline, and a held write also by the maximum hold, counted
//! from the moment that write found the gate held. Reads are never held; they only wait when
//! there is no usable connection at all.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Why writes are held, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub(crate) since: Instant,
    pub(crate) reason: Arc<str>,
}

/// The gate's state.
#[derive(Debug)]
pub(crate) struct State<C> {
    pub(crate) conn: Option<Arc<C>>,
    pub(crate) hold: Option<Hold>,
    /// Bumped by every [`Gate::hold`] (also one that finds writes already held), in the same
    /// step that closes the gate: a write that saw `holds == n` when it took its connection
    /// and reads another value once answered knows a hold began while it was in flight.
    pub(crate) holds: u64,
}

impl<C> Clone for State<C> {
    fn clone(&self) -> Self {
        State {
            conn: self.conn.clone(),
            hold: self.hold.clone(),
            holds: self.holds,
        }
    }
}

/// Why no connection was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The caller's deadline passed (`held`: while writes were held).
    Deadline { held: bool },
    /// A held write waited the maximum hold.
    MaxHold,
    /// The follower is gone.
    Closed,
}

pub(crate) struct Gate<C> {
    tx: watch::Sender<State<C>>,
    /// The same state for the command path, written inside every change of `tx` (under its
    /// lock, so the two never disagree for longer than that change): a lock-free read for
    /// every command, where the `watch`'s read lock is one cache line that every thread
    /// writes to.
    fast: arc_swap::ArcSwap<Snapshot<C>>,
}

/// What a command needs of the [`State`].
struct Snapshot<C> {
    conn: Option<Arc<C>>,
    held: bool,
    holds: u64,
}

impl<C> Snapshot<C> {
    fn of(s: &State<C>) -> Arc<Snapshot<C>> {
        Arc::new(Snapshot {
            conn: s.conn.clone(),
            held: s.hold.is_some(),
            holds: s.holds,
        })
    }
}

impl<C> Gate<C> {
    pub(crate) fn new() -> Gate<C> {
        Gate {
            tx: watch::Sender::new(State {
                conn: None,
                hold: None,
                holds: 0,
            }),
            fast: arc_swap::ArcSwap::from_pointee(Snapshot {
                conn: None,
                held: false,
                holds: 0,
            }),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State<C>> {
        self.tx.subscribe()
    }

    pub(crate) fn state(&self) -> State<C> {
        self.tx.borrow().clone()
    }

    /// True while writes are held (no lock, no clone of the state).
    pub(crate) fn is_held(&self) -> bool {
        self.fast.load().held
    }

    /// The number of [`Gate::hold`] calls so far (no lock).
    pub(crate) fn holds(&self) -> u64 {
        self.fast.load().holds
    }

    /// Holds writes; true when this started a hold (it was not held). Counts in
    /// [`State::holds`] either way.
    pub(crate) fn hold(&self, reason: &str) -> bool {
        self.tx.send_if_modified(|s| {
            s.holds += 1;
            let started = s.hold.is_none();
            if started {
                s.hold = Some(Hold {
                    since: Instant::now(),
                    reason: reason.into(),
                });
            }
            self.fast.store(Snapshot::of(s));
            started
        })
    }

    /// Releases held writes to the current connection; returns the hold that ended.
    pub(crate) fn release(&self) -> Option<Hold> {
        let mut ended = None;
        self.tx.send_if_modified(|s| {
            ended = s.hold.take();
            self.fast.store(Snapshot::of(s));
            ended.is_some()
        });
        ended
    }

    /// Installs `conn` (or none) and, when `release`, ends a hold in the same step.
    pub(crate) fn install(&self, conn: Option<Arc<C>>, release: bool) -> Option<Hold> {
        let mut ended = None;
        self.tx.send_modify(|s| {
            s.conn = conn;
            if release {
                ended = s.hold.take();
            }
            self.fast.store(Snapshot::of(s));
        });
        ended
    }

    /// Clears the connection if it is still `is_current` (a broken one), keeping the hold.
    pub(crate) fn clear_if(&self, is_current: impl Fn(&C) -> bool) -> bool {
        self.tx.send_if_modified(|s| {
            if s.conn.as_deref().is_some_and(&is_current) {
                s.conn = None;
                self.fast.store(Snapshot::of(s));
                true
            } else {
                false
            }
        })
    }

    /// Waits for a connection that `usable` accepts: for a write, also not held. Bounded by
    /// `deadline`, and a held write by `max_hold` from when it first found the gate held.
    #[cfg(test)]
    pub(crate) async fn acquire(
        &self,
        write: bool,
        deadline: Instant,
        max_hold: Duration,
        usable: impl Fn(&C) -> bool,
    ) -> Result<Arc<C>, Refused> {
        self.acquire_counted(write, deadline, max_hold, usable)
            .await
            .map(|(c, _)| c)
    }

    /// [`Gate::acquire`], also returning [`State::holds`] as it was when the connection was
    /// handed out (read in the same step as the connection and the hold).
    #[cfg(test)]
    pub(crate) async fn acquire_counted(
        &self,
        write: bool,
        deadline: Instant,
        max_hold: Duration,
        usable: impl Fn(&C) -> bool,
    ) -> Result<(Arc<C>, u64), Refused> {
        self.acquire_with(write, deadline, max_hold, usable, Arc::clone, || {})
            .await
    }

    /// [`Gate::acquire_counted`], handing out `take` of the connection instead of the
    /// connection (what a command needs of it, without a reference count of its own), and
    /// calling `on_held` each time a write finds the gate held, before it waits.
    pub(crate) async fn acquire_with<T>(
        &self,
        write: bool,
        deadline: Instant,
        max_hold: Duration,
        usable: impl Fn(&C) -> bool,
        take: impl Fn(&Arc<C>) -> T,
        mut on_held: impl FnMut(),
    ) -> Result<(T, u64), Refused> {
        if let Some(got) = self.try_take(write, &usable, &take) {
            return Ok(got);
        }
        // Subscribed only now: the loop's first look is a fresh borrow, so a change between
        // the look above and the subscription is not missed.
        let mut rx = self.tx.subscribe();
        let mut held_since: Option<Instant> = None;
        loop {
            let (conn, held, holds) = {
                let s = rx.borrow_and_update();
                let held = write && s.hold.is_some();
                let conn = if held {
                    None
                } else {
                    s.conn.as_ref().filter(|c| usable(c)).map(&take)
                };
                (conn, held, s.holds)
            };
            if let Some(c) = conn {
                return Ok((c, holds));
            }
            let mut bound = deadline;
            let mut by_hold = false;
            if held {
                on_held();
                let since = *held_since.get_or_insert_with(Instant::now);
                if since + max_hold < bound {
                    bound = since + max_hold;
                    by_hold = true;
                }
            }
            match tokio::time::timeout_at(bound, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Refused::Closed),
                Err(_) if by_hold => return Err(Refused::MaxHold),
                Err(_) => return Err(Refused::Deadline { held }),
            }
        }
    }

    /// The common case of [`Gate::acquire_with`], synchronous: a usable connection and, for a
    /// write, no hold; without a lock or a subscription. `None`: take the waiting path.
    pub(crate) fn try_take<T>(
        &self,
        write: bool,
        usable: impl Fn(&C) -> bool,
        take: impl Fn(&Arc<C>) -> T,
    ) -> Option<(T, u64)> {
        let s = self.fast.load();
        if write && s.held {
            return None;
        }
        s.conn
            .as_ref()
            .filter(|c| usable(c))
            .map(|c| (take(c), s.holds))
    }

    /// The connection now, if any (for a rare path: marking it broken).
    pub(crate) fn current(&self) -> Option<Arc<C>> {
        self.fast.load().conn.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn gate_with(id: u32) -> Arc<Gate<u32>> {
        let g = Arc::new(Gate::new());
        g.install(Some(Arc::new(id)), true);
        g
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_that_begins_after_a_write_took_its_connection_is_seen() {
        let g = gate_with(1);
        let (c, holds) = g
            .acquire_counted(true, Instant::now() + ms(1000), ms(5000), |_| true)
            .await
            .unwrap();
        assert_eq!((*c, g.holds()), (1, holds), "nothing happened yet");
        // The hold begins while the write is in flight: its answer must be checked.
        g.hold("+try-failover");
        assert_ne!(g.holds(), holds);
        // A write that waited out a hold takes the count of the state it was released in.
        let g2 = g.clone();
        let w = tokio::spawn(async move {
            g2.acquire_counted(true, Instant::now() + ms(1000), ms(5000), |_| true)
                .await
        });
        tokio::time::sleep(ms(10)).await;
        g.install(Some(Arc::new(2)), true);
        let (c, holds) = w.await.unwrap().unwrap();
        assert_eq!((*c, holds), (2, g.holds()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_write_waits_for_the_new_master_and_reads_pass() {
        let g = gate_with(1);
        assert_eq!(g.holds(), 0);
        assert!(g.hold("+try-failover"));
        assert!(!g.hold("+elected-leader"), "one hold at a time");
        assert_eq!(
            g.holds(),
            2,
            "every hold is counted, also one that was held already"
        );
        let start = Instant::now();
        // A read is not held: it goes to the old master at once.
        let read = g.acquire(false, start + ms(1000), ms(5000), |_| true).await;
        assert_eq!(*read.unwrap(), 1);
        let g2 = g.clone();
        let write = tokio::spawn(async move {
            g2.acquire(true, Instant::now() + ms(1000), ms(5000), |_| true)
                .await
                .map(|c| (*c, Instant::now()))
        });
        tokio::time::sleep(ms(640)).await;
        let ended = g.install(Some(Arc::new(2)), true).unwrap();
        assert_eq!(&*ended.reason, "+try-failover");
        let (conn, at) = write.await.unwrap().unwrap();
        assert_eq!(
            conn, 2,
            "the held write goes to the new master, never the old"
        );
        assert_eq!(at - start, ms(640));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_failover_releases_to_the_old_master() {
        let g = gate_with(1);
        g.hold("+try-failover");
        let g2 = g.clone();
        let write = tokio::spawn(async move {
            g2.acquire(true, Instant::now() + ms(2000), ms(5000), |_| true)
                .await
        });
        tokio::time::sleep(ms(300)).await;
        assert!(g.release().is_some());
        assert_eq!(*write.await.unwrap().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_and_the_max_hold_bound_the_wait() {
        let g = gate_with(1);
        g.hold("+odown");
        let start = Instant::now();
        let r = g.acquire(true, start + ms(1000), ms(5000), |_| true).await;
        assert_eq!(r.unwrap_err(), Refused::Deadline { held: true });
        assert_eq!(start.elapsed(), ms(1000));
        let start = Instant::now();
        let r = g.acquire(true, start + ms(1000), ms(250), |_| true).await;
        assert_eq!(r.unwrap_err(), Refused::MaxHold);
        assert_eq!(start.elapsed(), ms(250));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unusable_connection_is_waited_past_by_reads_too() {
        let g = gate_with(1);
        let g2 = g.clone();
        // Connection 1 is fenced (e.g. it failed with -READONLY): only another one will do.
        let read = tokio::spawn(async move {
            g2.acquire(false, Instant::now() + ms(1000), ms(5000), |c| *c != 1)
                .await
        });
        tokio::time::sleep(ms(10)).await;
        assert!(g.clear_if(|c| *c == 1));
        assert!(!g.clear_if(|c| *c == 1));
        tokio::time::sleep(ms(10)).await;
        g.install(Some(Arc::new(3)), false);
        assert_eq!(*read.await.unwrap().unwrap(), 3);
        let start = Instant::now();
        let r = g
            .acquire(false, start + ms(100), ms(5000), |c| *c == 9)
            .await;
        assert_eq!(r.unwrap_err(), Refused::Deadline { held: false });
    }

    #[tokio::test(start_paused = true)]
    async fn the_follower_gone_is_closed() {
        let g: Gate<u32> = Gate::new();
        let rx_side = async {
            g.acquire(false, Instant::now() + ms(100), ms(100), |_| true)
                .await
        };
        // The sender lives as long as the gate: the wait is bounded by the deadline.
        assert_eq!(
            rx_side.await.unwrap_err(),
            Refused::Deadline { held: false }
        );
    }
}
