//! The steady load and the flood.
//!
//! The steady load is closed-loop workers, each paced to one step per [`STEP`]: a step is
//! either a write then a read-back (`PUT /members/{id}` of one of the worker's own ids, then
//! `GET` of that id, whose version must be at least the PUT's acknowledged one: a
//! read-your-writes check), or a `GET` of a random id of any worker (a 404 is an answer too).
//! Every call is one [`Sample`]; every acknowledged write is kept for the end-of-phase and
//! history checks.
//!
//! The flood is many unpaced tasks sharing one client address, `GET`ting one id as fast as
//! they can: the per-client limit answers 429 with `Retry-After`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::demo::client::DemoClient;
use crate::demo::probe::ProbeTx;

/// The pace of one steady worker: one step (one or two calls) per `STEP`.
pub const STEP: Duration = Duration::from_millis(50);
/// The first id the demo writes.
pub const ID_BASE: u64 = 7_000_000;
/// Ids owned (written) by each worker.
pub const IDS_PER_WORKER: u64 = 16;

/// The id `k` of worker `w`.
pub fn worker_id(w: usize, k: u64) -> u64 {
    ID_BASE + w as u64 * 1000 + k
}

/// A small xorshift64* generator: the demo needs spread, not quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `seed` (never zero inside).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `PUT /members/{id}`.
    Put,
    /// The `GET` right after a worker's own acknowledged PUT.
    ReadBack,
    /// A `GET` of a random id.
    Get,
}

/// One call of the steady load.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The worker.
    pub worker: usize,
    /// The instance called (`bj-a`, `sh-a`).
    pub instance: &'static str,
    /// What it was.
    pub op: Op,
    /// When it started.
    pub start: Instant,
    /// How long it took.
    pub latency: Duration,
    /// `None` when answered as expected, else the error kind.
    pub error: Option<String>,
}

/// One steady worker: its index (which picks its ids), the instance it calls and the client.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The worker's index.
    pub index: usize,
    /// The instance's name.
    pub instance: &'static str,
    /// The instance's address.
    pub addr: SocketAddr,
    /// The client (its source address).
    pub client: DemoClient,
}

/// A read-your-writes violation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    /// The id.
    pub id: u64,
    /// The instance that acknowledged the PUT and answered the GET.
    pub instance: &'static str,
    /// The acknowledged version.
    pub acked: u64,
    /// What the GET answered (`version 3`, `404`).
    pub read: String,
}

/// What one worker did.
#[derive(Debug, Default)]
struct WorkerResult {
    samples: Vec<Sample>,
    acked: Vec<(u64, u64, &'static str)>,
    ryw_checks: u64,
    violations: Vec<Violation>,
}

/// Counters for the live line.
#[derive(Debug, Default)]
pub struct Live {
    /// Calls done.
    pub done: AtomicU64,
    /// Calls failed.
    pub errors: AtomicU64,
    /// Writes acknowledged.
    pub acked: AtomicU64,
    /// Read-your-writes violations.
    pub violations: AtomicU64,
    /// Flood calls done.
    pub flood: AtomicU64,
    /// Flood calls answered 429.
    pub flood_429: AtomicU64,
}

/// What the steady load did in a phase.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Every call, per worker in the worker's order.
    pub samples: Vec<Sample>,
    /// Every acknowledged write: `(id, version, instance)`.
    pub acked: Vec<(u64, u64, &'static str)>,
    /// Read-backs done (read-your-writes checks).
    pub ryw_checks: u64,
    /// Read-your-writes violations.
    pub violations: Vec<Violation>,
}

/// The running steady load.
#[derive(Debug)]
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: JoinSet<WorkerResult>,
    live: Arc<Live>,
}

impl Load {
    /// Starts the workers; `ids_total` is how many workers own ids (random reads spread over
    /// all of them); `seed` varies the random choices between phases; acknowledged writes are
    /// offered to `probe` with the phase's index.
    pub fn start(
        workers: &[WorkerSpec],
        ids_total: usize,
        seed: u64,
        probe: Option<(ProbeTx, usize)>,
    ) -> Load {
        let (stop, rx) = watch::channel(false);
        let live = Arc::new(Live::default());
        let mut tasks = JoinSet::new();
        for w in workers {
            tasks.spawn(worker(
                w.clone(),
                ids_total,
                seed,
                rx.clone(),
                Arc::clone(&live),
                probe.clone(),
            ));
        }
        Load { stop, tasks, live }
    }

    /// The live counters.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// Stops the workers (each finishes its step: bounded by the calls' time-out) and collects
    /// what they did.
    pub async fn stop(mut self) -> LoadResult {
        let _ = self.stop.send(true);
        let mut out = LoadResult::default();
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(w) => {
                    out.samples.extend(w.samples);
                    out.acked.extend(w.acked);
                    out.ryw_checks += w.ryw_checks;
                    out.violations.extend(w.violations);
                }
                Err(e) => tracing::error!(error = %e, "a demo worker died"),
            }
        }
        out
    }
}

fn member_body(w: usize, seq: u64) -> serde_json::Value {
    let level = ["basic", "gold", "platinum"][(seq % 3) as usize];
    serde_json::json!({
        "name": format!("demo worker {w} step {seq}"),
        "level": level,
        "expires_at": "2030-01-01T00:00:00Z",
    })
}

async fn worker(
    spec: WorkerSpec,
    ids_total: usize,
    seed: u64,
    mut stop: watch::Receiver<bool>,
    live: Arc<Live>,
    probe: Option<(ProbeTx, usize)>,
) -> WorkerResult {
    let mut rng = Rng::new(seed ^ (spec.index as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut out = WorkerResult::default();
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let record = |out: &mut WorkerResult, op: Op, start: Instant, error: Option<String>| {
        live.done.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
        out.samples.push(Sample {
            worker: spec.index,
            instance: spec.instance,
            op,
            start,
            latency: start.elapsed(),
            error,
        });
    };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            break;
        }
        seq += 1;
        if rng.below(2) == 0 {
            // A write, then its read-back.
            let id = worker_id(spec.index, rng.below(IDS_PER_WORKER));
            let path = format!("/members/{id}");
            let start = Instant::now();
            let put = spec
                .client
                .put_json(spec.addr, &path, &member_body(spec.index, seq))
                .await;
            let acked = match put {
                Ok(a) if a.status == 200 => match a.version() {
                    Some(v) => {
                        record(&mut out, Op::Put, start, None);
                        Some(v)
                    }
                    None => {
                        record(&mut out, Op::Put, start, Some("200 without version".into()));
                        None
                    }
                },
                Ok(a) => {
                    record(&mut out, Op::Put, start, Some(a.error_kind()));
                    None
                }
                Err(kind) => {
                    record(&mut out, Op::Put, start, Some(kind));
                    None
                }
            };
            let Some(v) = acked else { continue };
            if let Some((tx, phase)) = &probe {
                tx.offer((*phase, id, v, Instant::now()));
            }
            live.acked.fetch_add(1, Ordering::Relaxed);
            out.acked.push((id, v, spec.instance));
            let start = Instant::now();
            let got = spec.client.get(spec.addr, &path).await;
            let violation = |read: String| Violation {
                id,
                instance: spec.instance,
                acked: v,
                read,
            };
            match got {
                Ok(a) if a.status == 200 => {
                    out.ryw_checks += 1;
                    match a.version() {
                        Some(r) if r >= v => record(&mut out, Op::ReadBack, start, None),
                        Some(r) => {
                            live.violations.fetch_add(1, Ordering::Relaxed);
                            out.violations.push(violation(format!("version {r}")));
                            record(&mut out, Op::ReadBack, start, None);
                        }
                        None => record(
                            &mut out,
                            Op::ReadBack,
                            start,
                            Some("200 without version".into()),
                        ),
                    }
                }
                Ok(a) if a.status == 404 => {
                    out.ryw_checks += 1;
                    live.violations.fetch_add(1, Ordering::Relaxed);
                    out.violations.push(violation("404".into()));
                    record(&mut out, Op::ReadBack, start, None);
                }
                Ok(a) => record(&mut out, Op::ReadBack, start, Some(a.error_kind())),
                Err(kind) => record(&mut out, Op::ReadBack, start, Some(kind)),
            }
        } else {
            let w = rng.below(ids_total as u64) as usize;
            let id = worker_id(w, rng.below(IDS_PER_WORKER));
            let start = Instant::now();
            match spec.client.get(spec.addr, &format!("/members/{id}")).await {
                Ok(a) if a.status == 200 || a.status == 404 => {
                    record(&mut out, Op::Get, start, None)
                }
                Ok(a) => record(&mut out, Op::Get, start, Some(a.error_kind())),
                Err(kind) => record(&mut out, Op::Get, start, Some(kind)),
            }
        }
    }
    out
}

/// What the flood saw.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FloodResult {
    /// Calls made.
    pub requests: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Calls without an answer, by kind.
    pub transport: BTreeMap<String, u64>,
    /// 429 answers that carried `Retry-After`.
    pub retry_after_on_429: u64,
    /// The first `Retry-After` value seen.
    pub retry_after_sample: Option<String>,
    /// How long the flood ran, seconds.
    pub seconds: f64,
}

impl FloodResult {
    /// The 429 answers.
    pub fn rejected(&self) -> u64 {
        self.statuses.get(&429).copied().unwrap_or(0)
    }

    /// The 5xx answers.
    pub fn server_errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    fn merge(&mut self, o: FloodResult) {
        self.requests += o.requests;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.transport {
            *self.transport.entry(k).or_default() += v;
        }
        self.retry_after_on_429 += o.retry_after_on_429;
        if self.retry_after_sample.is_none() {
            self.retry_after_sample = o.retry_after_sample;
        }
    }
}

/// Floods `GET path` on `addr` from `client` with `tasks` concurrent callers for `length`, and
/// on until a 429 was seen (a busy machine may not reach the limit in `length`), at most
/// `max`.
pub async fn flood(
    client: DemoClient,
    addr: SocketAddr,
    path: String,
    tasks: usize,
    length: Duration,
    max: Duration,
    live: Arc<Live>,
) -> FloodResult {
    let begin = Instant::now();
    let min_until = begin + length;
    let max_until = begin + max.max(length);
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (client, path, live) = (client.clone(), path.clone(), Arc::clone(&live));
        set.spawn(async move {
            let mut r = FloodResult::default();
            loop {
                let now = Instant::now();
                let rejected = live.flood_429.load(Ordering::Relaxed) > 0;
                if now >= max_until || (now >= min_until && rejected) {
                    break;
                }
                r.requests += 1;
                live.flood.fetch_add(1, Ordering::Relaxed);
                match client.get(addr, &path).await {
                    Ok(a) => {
                        *r.statuses.entry(a.status).or_default() += 1;
                        if a.status == 429 {
                            live.flood_429.fetch_add(1, Ordering::Relaxed);
                            if let Some(v) = a.retry_after {
                                r.retry_after_on_429 += 1;
                                if r.retry_after_sample.is_none() {
                                    r.retry_after_sample = Some(v);
                                }
                            }
                        }
                    }
                    Err(kind) => {
                        *r.transport.entry(kind).or_default() += 1;
                        // A refused connection must not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            r
        });
    }
    let mut out = FloodResult::default();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.merge(r);
        }
    }
    out.seconds = begin.elapsed().as_secs_f64();
    out
}
