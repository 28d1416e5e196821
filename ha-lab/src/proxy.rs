//! A TCP fault proxy placed between a client and a server, switchable at run time.
//!
//! There is no `tc netem` in the lab's kernel, so latency, blackholes and resets are made here.
//! A fault set with [`FaultProxy::set_fault`] applies at once to new *and* existing connections:
//! every relay task watches a `tokio::sync::watch` channel.
//!
//! Latency is a delay line per direction: each chunk read is written out once its delay has
//! passed since it arrived, so delays do not accumulate over chunks. [`Fault::RoundTrip`]`(d)`
//! makes a request/response round trip `d` slower; [`Fault::Latency`]`(d)` delays each
//! direction by `d` (a round trip gains `2 × d`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use std::time::Duration;
//! use ha_lab::proxy::{Fault, FaultProxy};
//! let proxy = FaultProxy::start("127.0.1.11:0".parse().unwrap(), "127.0.1.11:18080".parse().unwrap()).await?;
//! proxy.set_fault(Fault::RoundTrip(Duration::from_millis(200))); // +200 ms per round trip
//! proxy.set_fault(Fault::Pass);
//! # Ok(()) }
//! ```

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinSet,
    time::Instant,
};

use crate::LabError;
use crate::listener::{self, AcceptTask};

/// The fault a [`FaultProxy`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Delay every forwarded byte by this much **in each direction**: a request/response round
    /// trip gains twice this. (A delay line: bytes that arrive together leave together, and
    /// chunks in flight do not add up.)
    Latency(Duration),
    /// Delay the forwarded bytes so that a request/response round trip gains this much in
    /// total: half of it on the way to the upstream, the rest on the way back. What
    /// `ha-lab fault latency MS` sets.
    RoundTrip(Duration),
    /// Accept and read, discard everything, never answer and never close.
    Blackhole,
    /// Reset new and existing connections (RST via `SO_LINGER` 0).
    Reset,
}

const BUF: usize = 16 * 1024;

// === impl FaultProxy ===

/// A running TCP fault proxy.
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: AcceptTask,
}

struct Shared {
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    connections: AtomicU64,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("fault", &self.fault())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on `listen` (port 0 allowed) and forwards each connection to `upstream`, connecting
    /// from the listen IP where possible so the upstream sees an address of the proxy's IDC.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<FaultProxy, LabError> {
        let (listener, addr) = listener::bind(listen).await?;
        let (fault, _) = watch::channel(Fault::Pass);
        let shared = Arc::new(Shared {
            upstream,
            fault,
            connections: AtomicU64::new(0),
        });
        let accept = AcceptTask::spawn("fault proxy", addr, accept_loop(listener, shared.clone()));
        tracing::info!(%addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            shared,
            addr,
            accept,
        })
    }

    /// The bound listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Sets the fault, effective at once for new and existing connections.
    pub fn set_fault(&self, fault: Fault) {
        tracing::info!(addr = %self.addr, ?fault, "proxy fault set");
        self.shared.fault.send_replace(fault);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Connections accepted so far (over all restarts).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// True while listening.
    pub async fn is_running(&self) -> bool {
        self.accept.is_running().await
    }

    /// Closes the listener and every connection (a dead server: connects are refused).
    /// Idempotent.
    pub async fn stop(&self) {
        self.accept.stop().await;
    }

    /// Listens again on the same address (after a stop; on a running proxy, stop then start).
    /// The fault setting is kept.
    pub async fn restart(&self) -> Result<(), LabError> {
        let shared = self.shared.clone();
        self.accept.restart(|l| accept_loop(l, shared)).await
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut relays = JoinSet::new();
    loop {
        while relays.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((client, peer)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let local = listener.local_addr().ok();
                relays.spawn(relay(client, peer, local, shared.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resets a socket: with `SO_LINGER` 0 the close sends RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    shared: Arc<Shared>,
) {
    let mut fault = shared.fault.subscribe();
    // A new connection under Blackhole is held without an upstream until the fault changes.
    let mut buf = vec![0u8; BUF];
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Reset => return reset(client),
            Fault::Blackhole => {
                tokio::select! {
                    r = client.read(&mut buf) => match r {
                        Ok(0) | Err(_) => {
                            // The client went away: wait for the fault to change, never answer.
                            if fault.changed().await.is_err() { return; }
                        }
                        Ok(_) => {}
                    },
                    changed = fault.changed() => if changed.is_err() { return },
                }
            }
            Fault::Pass | Fault::Latency(_) | Fault::RoundTrip(_) => break,
        }
    }
    let mut upstream = match connect_upstream(local, shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, upstream = %shared.upstream, error = %e, "proxy upstream connect");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let end = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let a = pump(cr, uw, fault.clone(), Direction::ToUpstream);
        let b = pump(ur, cw, fault, Direction::ToClient);
        tokio::pin!(a, b);
        tokio::select! {
            r = &mut a => if r == End::Eof { b.await } else { r },
            r = &mut b => if r == End::Eof { a.await } else { r },
        }
    };
    if end == End::Reset {
        reset(client);
        reset(upstream);
    }
}

async fn connect_upstream(
    local: Option<SocketAddr>,
    upstream: SocketAddr,
) -> std::io::Result<TcpStream> {
    if let Some(local) = local
        && !local.ip().is_unspecified()
        && local.is_ipv4() == upstream.is_ipv4()
    {
        let socket = if upstream.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if socket.bind(SocketAddr::new(local.ip(), 0)).is_ok() {
            return socket.connect(upstream).await;
        }
    }
    TcpStream::connect(upstream).await
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    Eof,
    Reset,
    Error,
}

/// Which way a [`pump`] copies.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Direction {
    /// Client to upstream: the request.
    ToUpstream,
    /// Upstream to client: the answer.
    ToClient,
}

impl Direction {
    /// The delay `fault` puts on this direction (`None`: forward at once).
    fn delay(self, fault: Fault) -> Option<Duration> {
        match fault {
            Fault::Latency(d) => Some(d),
            // Split so that the two halves add up to exactly `d`.
            Fault::RoundTrip(d) => Some(match self {
                Direction::ToUpstream => d / 2,
                Direction::ToClient => d - d / 2,
            }),
            Fault::Pass | Fault::Blackhole | Fault::Reset => None,
        }
    }
}

/// Most bytes held in one direction's delay line; reading pauses beyond it (back-pressure).
const MAX_DELAYED: usize = 1024 * 1024;

/// Copies one direction, applying the current fault to every chunk. Under a latency fault the
/// chunks wait in a delay line (each until its arrival + delay), so a burst of chunks is delayed
/// once, not once per chunk. Queued chunks are dropped when the fault becomes `Blackhole`, and
/// sent at once when it becomes `Pass`.
async fn pump<R, W>(mut r: R, mut w: W, mut fault: watch::Receiver<Fault>, dir: Direction) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut line: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut delayed = 0usize;
    let mut eof = false;
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Reset => return End::Reset,
            Fault::Blackhole => {
                line.clear();
                delayed = 0;
            }
            Fault::Pass | Fault::Latency(_) | Fault::RoundTrip(_) => {}
        }
        // Send what is due: everything when the fault no longer delays this direction.
        let undelayed = dir.delay(current).is_none();
        let now = Instant::now();
        while let Some((due, _)) = line.front() {
            if !undelayed && *due > now {
                break;
            }
            let Some((_, chunk)) = line.pop_front() else {
                break;
            };
            delayed -= chunk.len();
            if w.write_all(&chunk).await.is_err() {
                return End::Error;
            }
        }
        if eof && line.is_empty() {
            // Under Blackhole the peer must not see the close: hold until the fault changes.
            while *fault.borrow_and_update() == Fault::Blackhole {
                if fault.changed().await.is_err() {
                    return End::Error;
                }
            }
            if *fault.borrow() == Fault::Reset {
                return End::Reset;
            }
            let _ = w.shutdown().await;
            return End::Eof;
        }
        let next_due = line.front().map(|(due, _)| *due);
        let can_read = !eof && delayed < MAX_DELAYED;
        tokio::select! {
            res = r.read(&mut buf), if can_read => match res {
                Ok(0) => eof = true,
                Ok(n) => {
                    // The fault may have changed while the read was pending.
                    let current = *fault.borrow_and_update();
                    match (current, dir.delay(current)) {
                        (Fault::Reset, _) => return End::Reset,
                        (Fault::Blackhole, _) => {}
                        (_, None) if line.is_empty() => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                return End::Error;
                            }
                        }
                        (_, delay) => {
                            let due = Instant::now() + delay.unwrap_or_default();
                            line.push_back((due, buf[..n].to_vec()));
                            delayed += n;
                        }
                    }
                }
                Err(_) => return End::Error,
            },
            () = sleep_until_due(next_due) => {}
            changed = fault.changed() => if changed.is_err() { return End::Error },
        }
    }
}

/// Sleeps until `due`, or forever when there is nothing queued.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
