//! The load driver: a fixed-rate ticker over a bounded number of concurrent calls, recording
//! every call's start, latency and outcome; and the event log of the client's topology events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ha_core::{EventBus, TopologyEvent};
use tokio::sync::{Mutex, Semaphore, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tower::ServiceExt;

use crate::client::{DemoService, WhoRequest, error_kind};
use crate::lab::IDCS;

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by a backend of `idc` through `endpoint`.
    Ok {
        /// The IDC the backend reported in its `/who` answer.
        idc: String,
        /// The endpoint (proxy address) the balancer picked.
        endpoint: SocketAddr,
    },
    /// Failed, with the kind of error (see [`error_kind`]).
    Err(&'static str),
}

/// One call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When it started.
    pub start: Instant,
    /// How long until it answered or failed.
    pub latency: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

/// Live counters for the progress line (monotonic; take differences).
#[derive(Debug, Default)]
pub struct Live {
    /// Calls finished.
    pub done: AtomicU64,
    /// Calls failed.
    pub errors: AtomicU64,
    /// Calls answered, per IDC of [`IDCS`] (index 3: any other).
    pub by_idc: [AtomicU64; 4],
    /// Ticks skipped because the in-flight bound was reached.
    pub shed: AtomicU64,
}

/// A snapshot of [`Live`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveSnapshot {
    /// Calls finished.
    pub done: u64,
    /// Calls failed.
    pub errors: u64,
    /// Calls answered per IDC.
    pub by_idc: [u64; 4],
}

impl Live {
    /// The current counts.
    pub fn snapshot(&self) -> LiveSnapshot {
        LiveSnapshot {
            done: self.done.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            by_idc: [0, 1, 2, 3].map(|i| self.by_idc[i].load(Ordering::Relaxed)),
        }
    }
}

impl LiveSnapshot {
    /// Counts since `earlier`.
    pub fn since(&self, earlier: &LiveSnapshot) -> LiveSnapshot {
        LiveSnapshot {
            done: self.done - earlier.done,
            errors: self.errors - earlier.errors,
            by_idc: [0, 1, 2, 3].map(|i| self.by_idc[i] - earlier.by_idc[i]),
        }
    }
}

/// The running load.
#[derive(Debug)]
pub struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    live: Arc<Live>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Load {
    /// Starts calling `service` at `rate` calls per second, at most `max_in_flight` at once.
    pub fn start(service: DemoService, rate: u32, max_in_flight: usize, drain: Duration) -> Load {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let live = Arc::new(Live::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drive(
            service,
            rate.max(1),
            max_in_flight.max(1),
            drain,
            samples.clone(),
            live.clone(),
            stop_rx,
        ));
        Load {
            samples,
            live,
            stop,
            task,
        }
    }

    /// The live counters.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// The calls that started in `[from, to)`, in start order.
    pub async fn samples_between(&self, from: Instant, to: Instant) -> Vec<Sample> {
        let all = self.samples.lock().await;
        let mut out: Vec<Sample> = all
            .iter()
            .filter(|s| s.start >= from && s.start < to)
            .cloned()
            .collect();
        out.sort_by_key(|s| s.start);
        out
    }

    /// Stops the ticker and waits (bounded) for the calls in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn drive(
    service: DemoService,
    rate: u32,
    max_in_flight: usize,
    drain: Duration,
    samples: Arc<Mutex<Vec<Sample>>>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut calls = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticker.tick() => {}
        }
        while calls.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            live.shed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let svc = service.clone();
        let samples = samples.clone();
        let live = live.clone();
        calls.spawn(async move {
            let start = Instant::now();
            let result = svc.oneshot(WhoRequest).await;
            let latency = start.elapsed();
            drop(permit);
            let outcome = match result {
                Ok(served) => {
                    let i = IDCS
                        .iter()
                        .position(|(idc, _, _)| *idc == served.who.idc)
                        .unwrap_or(3);
                    live.by_idc[i].fetch_add(1, Ordering::Relaxed);
                    Outcome::Ok {
                        idc: served.who.idc,
                        endpoint: served.endpoint,
                    }
                }
                Err(e) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                    Outcome::Err(error_kind(&e))
                }
            };
            live.done.fetch_add(1, Ordering::Relaxed);
            samples.lock().await.push(Sample {
                start,
                latency,
                outcome,
            });
        });
    }
    // The calls in flight end by their deadline; the bound only guards against a bug.
    let _ = tokio::time::timeout(drain, async { while calls.join_next().await.is_some() {} }).await;
    calls.abort_all();
}

/// Every topology event of the client, with the time it was received.
#[derive(Debug)]
pub struct EventLog {
    entries: Arc<Mutex<Vec<(Instant, TopologyEvent)>>>,
    lagged: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventLog {
    /// Subscribes to `bus` (before the client is built, so no event is missed).
    pub fn start(bus: &EventBus) -> EventLog {
        let mut rx = bus.subscribe();
        let entries = Arc::new(Mutex::new(Vec::new()));
        let lagged = Arc::new(AtomicU64::new(0));
        let (e, l) = (entries.clone(), lagged.clone());
        let task = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => e.lock().await.push((Instant::now(), ev)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        l.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        EventLog {
            entries,
            lagged,
            task,
        }
    }

    /// The events received in `[from, to)`.
    pub async fn between(&self, from: Instant, to: Instant) -> Vec<(Instant, TopologyEvent)> {
        self.entries
            .lock()
            .await
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .cloned()
            .collect()
    }

    /// Events lost because the log could not keep up (should stay 0).
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }
}
