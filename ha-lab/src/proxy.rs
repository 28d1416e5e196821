//! A TCP fault proxy placed between a client and a server, switchable at run time.
//!
//! There is no `tc netem` in the lab's kernel, so latency, blackholes and resets are made here.
//! A fault set with [`FaultProxy::set_fault`] applies at once to new *and* existing connections:
//! every relay task watches a `tokio::sync::watch` channel.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use std::time::Duration;
//! use ha_lab::proxy::{Fault, FaultProxy};
//! let proxy = FaultProxy::start("127.0.1.11:0".parse().unwrap(), "127.0.1.11:18080".parse().unwrap()).await?;
//! proxy.set_fault(Fault::Latency(Duration::from_millis(200)));
//! proxy.set_fault(Fault::Pass);
//! # Ok(()) }
//! ```

use std::{
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
};

use crate::LabError;
use crate::listener::{self, AcceptTask};

/// The fault a [`FaultProxy`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Add this delay once per forwarded chunk, in each direction.
    Latency(Duration),
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
            Fault::Pass | Fault::Latency(_) => break,
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
        let a = pump(cr, uw, fault.clone());
        let b = pump(ur, cw, fault);
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

/// Copies one direction, applying the current fault to every chunk.
async fn pump<R, W>(mut r: R, mut w: W, mut fault: watch::Receiver<Fault>) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        if *fault.borrow_and_update() == Fault::Reset {
            return End::Reset;
        }
        let n = tokio::select! {
            res = r.read(&mut buf) => match res {
                Ok(n) => n,
                Err(_) => return End::Error,
            },
            changed = fault.changed() => {
                if changed.is_err() { return End::Error; }
                continue;
            }
        };
        if n == 0 {
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
        let mut current = *fault.borrow_and_update();
        if let Fault::Latency(d) = current {
            tokio::time::sleep(d).await;
            current = *fault.borrow_and_update();
        }
        match current {
            Fault::Reset => return End::Reset,
            Fault::Blackhole => {}
            Fault::Pass | Fault::Latency(_) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return End::Error;
                }
            }
        }
    }
}
