//! The event lag: for a sample of the acknowledged writes (at most one per [`PROBE_EVERY`],
//! [`PROBES_PER_PHASE`] per phase), how long after the PUT's answer its version shows in
//! `/members/{id}/history` (the service's RocketMQ consumer writes it). Each probe polls, 50 ms
//! apart at first and up to 1 s apart later, for at most [`PROBE_WAIT`]: the lag is measured
//! to within the poll interval. Probes run in the background across phases and are collected
//! at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::demo::client::DemoClient;

/// At most one probe started per this interval.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// At most this many probes per phase.
pub const PROBES_PER_PHASE: usize = 20;
/// A probe gives up after this long.
pub const PROBE_WAIT: Duration = Duration::from_secs(30);

/// An acknowledged write: phase index, id, version, when its answer came.
pub type Acked = (usize, u64, u64, Instant);

/// Where the workers report acknowledged writes.
#[derive(Debug, Clone)]
pub struct ProbeTx(mpsc::UnboundedSender<Acked>);

impl ProbeTx {
    /// Offers one acknowledged write (the prober samples them).
    pub fn offer(&self, a: Acked) {
        let _ = self.0.send(a);
    }
}

/// Per phase index: the lags measured (`None`: not seen within [`PROBE_WAIT`]).
pub type Lags = BTreeMap<usize, Vec<Option<Duration>>>;

/// The running prober.
#[derive(Debug)]
pub struct Prober {
    tx: ProbeTx,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Lags>,
}

impl Prober {
    /// Starts probing through `client` against `addr`.
    pub fn start(client: DemoClient, addr: SocketAddr) -> Prober {
        let (tx, mut rx) = mpsc::unbounded_channel::<Acked>();
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut lags: Lags = BTreeMap::new();
            let mut probes: JoinSet<(usize, Option<Duration>)> = JoinSet::new();
            let mut last: Option<Instant> = None;
            let mut started: BTreeMap<usize, usize> = BTreeMap::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    got = rx.recv() => {
                        let Some((phase, id, version, acked_at)) = got else { break };
                        let due = last.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
                        let n = started.entry(phase).or_default();
                        if due && *n < PROBES_PER_PHASE {
                            *n += 1;
                            last = Some(Instant::now());
                            let client = client.clone();
                            probes.spawn(async move {
                                (phase, probe(&client, addr, id, version, acked_at).await)
                            });
                        }
                    }
                    Some(done) = probes.join_next(), if !probes.is_empty() => {
                        if let Ok((phase, lag)) = done {
                            lags.entry(phase).or_default().push(lag);
                        }
                    }
                }
            }
            while let Some(done) = probes.join_next().await {
                if let Ok((phase, lag)) = done {
                    lags.entry(phase).or_default().push(lag);
                }
            }
            lags
        });
        Prober {
            tx: ProbeTx(tx),
            stop,
            task,
        }
    }

    /// The workers' end.
    pub fn tx(&self) -> ProbeTx {
        self.tx.clone()
    }

    /// Stops sampling, waits for the probes in flight (each bounded by [`PROBE_WAIT`]).
    pub async fn finish(self) -> Lags {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn probe(
    client: &DemoClient,
    addr: SocketAddr,
    id: u64,
    version: u64,
    acked_at: Instant,
) -> Option<Duration> {
    let path = format!("/members/{id}/history");
    let mut pause = Duration::from_millis(50);
    loop {
        if let Ok(a) = client.get(addr, &path).await
            && a.status == 200
            && a.json().is_some_and(|v| {
                v.get("versions")
                    .and_then(serde_json::Value::as_array)
                    .is_some_and(|l| l.iter().any(|x| x.as_u64() == Some(version)))
            })
        {
            return Some(acked_at.elapsed());
        }
        if acked_at.elapsed() >= PROBE_WAIT {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    }
}
