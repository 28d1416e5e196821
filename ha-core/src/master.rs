//! The current master of a dependency as one snapshot: address, IDC and generation together.
//!
//! A backend that follows a switcher (ha-redis following Sentinel, ha-mysql following the
//! HA-master DNS name) publishes every change through one [`MasterWatch`]. A connection is
//! stamped with the [`Master`] snapshot it was made from, never with an address read from one
//! place and a generation read from another: a pool's `create` that read the old address and
//! then a freshly bumped generation would otherwise stamp a connection to a demoted master as
//! current. With one snapshot that interleaving cannot happen: the address and the generation
//! were published together, so a connection to the old address always carries the old
//! generation and is fenced by [`MasterWatch::check`].
//!
//! ```
//! use ha_core::master::MasterWatch;
//! use ha_core::EventBus;
//!
//! let watch = MasterWatch::new("cache", EventBus::default());
//! let first = watch.switch("127.0.1.10:6379".parse().unwrap(), "initial");
//! // A pool makes a connection from one snapshot and keeps it as the connection's stamp.
//! let stamp = watch.current().unwrap();
//! assert_eq!(stamp.addr, first.addr);
//! assert!(watch.check(&stamp).is_ok());
//!
//! // Sentinel promotes a replica: every connection of the old snapshot is fenced.
//! watch.switch("127.0.2.10:6379".parse().unwrap(), "sentinel_switch_master");
//! let err = watch.check(&stamp).unwrap_err();
//! assert!(err.is_fenced());
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::HaError;
use crate::events::{EventBus, TopologyEvent};
use crate::generation::Generation;
use crate::locality::IdcClassifier;

/// One published master: where it is, in which IDC, and the generation it started.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Master {
    /// The master's address.
    pub addr: SocketAddr,
    /// Its IDC, when the watch has a classifier and the address is in a configured range.
    pub idc: Option<Arc<str>>,
    /// The generation this master started; every switch (and every [`MasterWatch::lose`])
    /// bumps it.
    pub generation: Generation,
    /// The highest external epoch seen so far (Sentinel's config epoch; 0 when unused).
    pub epoch: u64,
}

impl Master {
    /// The IDC's name, or `"unknown"`.
    pub fn idc_name(&self) -> &str {
        self.idc.as_deref().unwrap_or("unknown")
    }
}

/// What [`MasterWatch::observe`] did with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observed {
    /// The report named a new master: it was published with a new generation.
    Switched(Arc<Master>),
    /// The report confirmed the current master (the epoch may have risen); nothing changed.
    Unchanged(Arc<Master>),
    /// The report's epoch is older than one already seen: it was ignored (a lagging sentinel).
    Stale {
        /// The epoch of the report.
        reported: u64,
        /// The highest epoch seen.
        current: u64,
    },
}

/// The receiving side of a [`MasterWatch`]: always holds the latest snapshot (`None` while no
/// master is known).
pub type MasterReceiver = watch::Receiver<Option<Arc<Master>>>;

struct Inner {
    dependency: Arc<str>,
    events: EventBus,
    classifier: Option<Arc<IdcClassifier>>,
    current: ArcSwapOption<Master>,
    /// The generation of `current` (0 while it is `None`; a master's generation is at least
    /// 1), stored after `current`: [`MasterWatch::check`]'s one-load fast path.
    live: std::sync::atomic::AtomicU64,
    tx: watch::Sender<Option<Arc<Master>>>,
    /// Serialises writers so the generation, the epoch and the snapshot move together;
    /// readers never take it.
    write: Mutex<State>,
}

struct State {
    generation: Generation,
    epoch: u64,
}

/// The current master of one dependency, published as one snapshot (arc-swap for readers on
/// the call path, a `watch` for tasks that wait for a change). `Clone` shares it.
///
/// Readers ([`current`](Self::current), [`check`](Self::check)) are lock-free; writers
/// ([`switch`](Self::switch), [`observe`](Self::observe), [`lose`](Self::lose)) are serialised
/// and each publishes a [`TopologyEvent::MasterSwitched`] with the previous master, the new
/// one's IDC and the cause.
#[derive(Clone)]
pub struct MasterWatch {
    inner: Arc<Inner>,
}

impl fmt::Debug for MasterWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterWatch")
            .field("dependency", &&*self.inner.dependency)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl MasterWatch {
    /// A watch with no master yet, at generation 0.
    pub fn new(dependency: impl Into<Arc<str>>, events: EventBus) -> MasterWatch {
        let (tx, _) = watch::channel(None);
        MasterWatch {
            inner: Arc::new(Inner {
                dependency: dependency.into(),
                events,
                classifier: None,
                current: ArcSwapOption::empty(),
                live: std::sync::atomic::AtomicU64::new(0),
                tx,
                write: Mutex::new(State {
                    generation: 0,
                    epoch: 0,
                }),
            }),
        }
    }

    /// The same watch, placing masters into IDCs with `classifier` (call before sharing it:
    /// clones made earlier keep the old settings).
    #[must_use]
    pub fn with_classifier(self, classifier: Arc<IdcClassifier>) -> MasterWatch {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.classifier = Some(classifier);
                inner
            }
            Err(shared) => {
                let state = shared.write.lock();
                let (tx, _) = watch::channel(shared.current.load_full());
                Inner {
                    dependency: shared.dependency.clone(),
                    events: shared.events.clone(),
                    classifier: Some(classifier),
                    current: ArcSwapOption::new(shared.current.load_full()),
                    live: std::sync::atomic::AtomicU64::new(
                        shared.live.load(std::sync::atomic::Ordering::Acquire),
                    ),
                    tx,
                    write: Mutex::new(State {
                        generation: state.generation,
                        epoch: state.epoch,
                    }),
                }
            }
        };
        MasterWatch {
            inner: Arc::new(inner),
        }
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &Arc<str> {
        &self.inner.dependency
    }

    /// The current master, `None` while none is known. One atomic load.
    pub fn current(&self) -> Option<Arc<Master>> {
        self.inner.current.load_full()
    }

    /// The current generation (0 before the first master).
    pub fn generation(&self) -> Generation {
        // One atomic load while a master is known.
        let live = self.inner.live.load(std::sync::atomic::Ordering::Acquire);
        if live != 0 {
            return live;
        }
        self.inner
            .current
            .load()
            .as_ref()
            .map_or_else(|| self.inner.write.lock().generation, |m| m.generation)
    }

    /// A receiver that sees every published snapshot.
    pub fn subscribe(&self) -> MasterReceiver {
        self.inner.tx.subscribe()
    }

    /// `Ok` when `stamp` (the snapshot a connection was made from) is still the current master,
    /// else [`HaError::Fenced`] with both generations. Also counts the refusal and publishes a
    /// [`TopologyEvent::ConnectionFenced`].
    #[inline]
    pub fn check(&self, stamp: &Master) -> Result<(), HaError> {
        // One atomic load on the checkout path: the current snapshot has the stamp's
        // generation (generations are never reused, and 0 means none). Inlined; the rest is
        // out of line.
        if self.inner.live.load(std::sync::atomic::Ordering::Acquire) == stamp.generation {
            return Ok(());
        }
        self.check_slow(stamp)
    }

    #[cold]
    fn check_slow(&self, stamp: &Master) -> Result<(), HaError> {
        let cur = self.inner.current.load();
        match cur.as_ref() {
            Some(m) if m.generation == stamp.generation => Ok(()),
            other => {
                let current = other.map_or_else(|| self.generation(), |m| m.generation);
                metrics::counter!(
                    crate::metrics_names::FENCED,
                    "dependency" => self.inner.dependency.to_string()
                )
                .increment(1);
                self.inner.events.publish(TopologyEvent::connection_fenced(
                    self.inner.dependency.clone(),
                    stamp.addr,
                    stamp.generation,
                    current,
                ));
                Err(HaError::Fenced {
                    connection: stamp.generation,
                    current,
                })
            }
        }
    }

    /// Publishes `addr` as the master. When it already is the current master nothing changes
    /// and the current snapshot is returned; otherwise the generation is bumped and the new
    /// snapshot published.
    pub fn switch(&self, addr: SocketAddr, cause: &str) -> Arc<Master> {
        let mut state = self.inner.write.lock();
        if let Some(cur) = self.inner.current.load_full()
            && cur.addr == addr
        {
            return cur;
        }
        let epoch = state.epoch;
        self.publish_locked(&mut state, addr, epoch, cause)
    }

    /// Takes a report that `addr` is the master as of the external `epoch` (Sentinel's config
    /// epoch), kept as a monotonic maximum: a report older than one already seen is ignored,
    /// so a lagging sentinel cannot switch the master back.
    pub fn observe(&self, addr: SocketAddr, epoch: u64, cause: &str) -> Observed {
        let mut state = self.inner.write.lock();
        if epoch < state.epoch {
            return Observed::Stale {
                reported: epoch,
                current: state.epoch,
            };
        }
        if let Some(cur) = self.inner.current.load_full()
            && cur.addr == addr
        {
            if epoch > cur.epoch {
                state.epoch = epoch;
                let next = Arc::new(Master {
                    epoch,
                    ..(*cur).clone()
                });
                self.inner.current.store(Some(next.clone()));
                self.inner.tx.send_replace(Some(next.clone()));
                return Observed::Unchanged(next);
            }
            return Observed::Unchanged(cur);
        }
        Observed::Switched(self.publish_locked(&mut state, addr, epoch, cause))
    }

    /// No master is known any more (it was demoted or made read-only and no successor is
    /// confirmed yet): bumps the generation so every existing connection is fenced, and
    /// publishes `None`. Returns the new generation.
    pub fn lose(&self, cause: &str) -> Generation {
        let mut state = self.inner.write.lock();
        let prev = self.inner.current.load_full();
        state.generation += 1;
        let generation = state.generation;
        self.inner.current.store(None);
        self.inner
            .live
            .store(0, std::sync::atomic::Ordering::Release);
        self.inner.tx.send_replace(None);
        tracing::warn!(
            dependency = %self.inner.dependency,
            from = ?prev.as_ref().map(|m| m.addr),
            generation,
            cause,
            "master lost: every connection fenced until a new master is confirmed"
        );
        generation
    }

    fn publish_locked(
        &self,
        state: &mut State,
        addr: SocketAddr,
        epoch: u64,
        cause: &str,
    ) -> Arc<Master> {
        let prev = self.inner.current.load_full();
        state.generation += 1;
        state.epoch = state.epoch.max(epoch);
        let idc = self
            .inner
            .classifier
            .as_ref()
            .and_then(|c| c.classify(addr.ip()).idc);
        let next = Arc::new(Master {
            addr,
            idc,
            generation: state.generation,
            epoch: state.epoch,
        });
        // The snapshot goes out before the event, so a subscriber that reacts to the event
        // already reads the new master.
        self.inner.current.store(Some(next.clone()));
        self.inner
            .live
            .store(next.generation, std::sync::atomic::Ordering::Release);
        self.inner.tx.send_replace(Some(next.clone()));
        self.inner.events.publish(TopologyEvent::master_switched(
            self.inner.dependency.clone(),
            prev.as_ref().map(|m| m.addr),
            addr,
            next.idc_name(),
            next.generation,
            cause,
        ));
        next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn switch_bumps_once_per_change() {
        let w = MasterWatch::new("db", EventBus::default());
        assert!(w.current().is_none());
        assert_eq!(w.generation(), 0);
        let m1 = w.switch(a("127.0.1.1:1"), "initial");
        assert_eq!(m1.generation, 1);
        assert_eq!(w.switch(a("127.0.1.1:1"), "poll").generation, 1);
        let m2 = w.switch(a("127.0.2.1:1"), "dns_repointed");
        assert_eq!(m2.generation, 2);
        assert!(w.check(&m1).unwrap_err().is_fenced());
        assert!(w.check(&m2).is_ok());
    }

    #[tokio::test]
    async fn event_names_previous_master_idc_and_cause() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        let topo = crate::Topology::from_toml_str(
            r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
"#,
            "t.toml",
        )
        .unwrap();
        let w = MasterWatch::new("cache", bus).with_classifier(topo.classifier().clone());
        w.switch(a("127.0.1.1:6379"), "initial");
        w.switch(a("127.0.2.1:6379"), "sentinel_switch_master");
        let _first = rx.recv().await.unwrap();
        match rx.recv().await.unwrap() {
            TopologyEvent::MasterSwitched {
                dependency,
                from,
                addr,
                idc,
                generation,
                cause,
                ..
            } => {
                assert_eq!(&*dependency, "cache");
                assert_eq!(from, Some(a("127.0.1.1:6379")));
                assert_eq!(addr, a("127.0.2.1:6379"));
                assert_eq!(&*idc, "bj-b");
                assert_eq!(generation, 2);
                assert_eq!(&*cause, "sentinel_switch_master");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn epoch_is_a_monotonic_max() {
        let w = MasterWatch::new("cache", EventBus::default());
        let m = match w.observe(a("127.0.2.1:1"), 5, "sentinel") {
            Observed::Switched(m) => m,
            o => panic!("{o:?}"),
        };
        assert_eq!((m.generation, m.epoch), (1, 5));
        // A lagging sentinel still reports the old master at the old epoch: ignored.
        assert_eq!(
            w.observe(a("127.0.1.1:1"), 4, "sentinel"),
            Observed::Stale {
                reported: 4,
                current: 5
            }
        );
        assert_eq!(w.current().unwrap().addr, a("127.0.2.1:1"));
        // The same master at a higher epoch: no new generation.
        match w.observe(a("127.0.2.1:1"), 6, "sentinel") {
            Observed::Unchanged(m) => assert_eq!((m.generation, m.epoch), (1, 6)),
            o => panic!("{o:?}"),
        }
        // A manual switch keeps the epoch seen.
        assert_eq!(w.switch(a("127.0.3.1:1"), "manual").epoch, 6);
    }

    #[test]
    fn lose_fences_everything_until_a_new_master() {
        let w = MasterWatch::new("db", EventBus::default());
        let m = w.switch(a("127.0.1.1:1"), "initial");
        assert_eq!(w.lose("read_only"), 2);
        assert!(w.current().is_none());
        assert!(w.check(&m).is_err());
        assert_eq!(w.generation(), 2);
        // The same address confirmed again starts a new generation: connections made before
        // the loss stay fenced.
        let again = w.switch(a("127.0.1.1:1"), "confirmed");
        assert_eq!(again.generation, 3);
        assert!(w.check(&m).is_err());
        assert!(w.check(&again).is_ok());
    }

    #[tokio::test]
    async fn subscribers_see_every_switch() {
        let w = MasterWatch::new("db", EventBus::default());
        let mut rx = w.subscribe();
        w.switch(a("127.0.1.1:1"), "initial");
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().generation, 1);
        w.lose("demoted");
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().is_none());
    }

    /// The contract: whatever the interleaving of switches and readers, a snapshot never pairs
    /// an address with a generation it was not published with. Writers switch between
    /// addresses as fast as they can while readers stamp "connections" from `current()`; every
    /// stamp is checked against the writers' own record of what each generation's address was.
    #[test]
    fn no_interleaving_stamps_an_old_address_with_a_new_generation() {
        let w = MasterWatch::new("db", EventBus::new(1));
        let addrs = [a("127.0.1.1:1"), a("127.0.2.1:1"), a("127.0.3.1:1")];
        let published = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = std::thread::scope(|s| {
            let writers: Vec<_> = (0..2)
                .map(|t| {
                    let w = w.clone();
                    let published = published.clone();
                    s.spawn(move || {
                        for i in 0..5_000usize {
                            let m = w.switch(addrs[(i + t) % 3], "test");
                            published.lock().insert(m.generation, m.addr);
                        }
                    })
                })
                .collect();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let w = w.clone();
                    let stop = stop.clone();
                    s.spawn(move || {
                        let mut seen = Vec::new();
                        // Until the writers are done (they are bounded); keep at most 1M stamps.
                        while !stop.load(Ordering::Acquire) {
                            if let Some(m) = w.current()
                                && seen.len() < 1_000_000
                            {
                                seen.push((m.generation, m.addr));
                            }
                        }
                        seen
                    })
                })
                .collect();
            for h in writers {
                h.join().unwrap();
            }
            stop.store(true, Ordering::Release);
            readers
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        let map = published.lock();
        assert!(!seen.is_empty());
        for (generation, addr) in seen {
            assert_eq!(map.get(&generation), Some(&addr), "generation {generation}");
        }
        // After the writers: the current snapshot is one that was published.
        let cur = w.current().unwrap();
        assert_eq!(map.get(&cur.generation), Some(&cur.addr));
    }
}
