//! The listening lifecycle shared by the lab's TCP servers (the fault proxy and the `/who`
//! backend): one accept task that owns the listener and every connection, so aborting it is a
//! dead server (connects refused, open connections closed), and a restart on the same address.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::LabError;

/// Binds `bind` and returns the listener with its actual address (port 0 resolved).
pub(crate) async fn bind(bind: SocketAddr) -> Result<(TcpListener, SocketAddr), LabError> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| LabError::Bind { addr: bind, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| LabError::Bind { addr: bind, source })?;
    Ok((listener, addr))
}

/// The accept task of one server at a fixed address.
pub(crate) struct AcceptTask {
    addr: SocketAddr,
    what: &'static str,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl AcceptTask {
    /// Runs `accept_loop` on `listener` (bound at `addr`); `what` names the server in logs.
    pub(crate) fn spawn<F>(what: &'static str, addr: SocketAddr, accept_loop: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        AcceptTask {
            addr,
            what,
            task: Mutex::new(Some(tokio::spawn(accept_loop))),
        }
    }

    /// True while listening.
    pub(crate) async fn is_running(&self) -> bool {
        self.task.lock().await.is_some()
    }

    /// Aborts the accept task: the listener and every connection it owns close. Idempotent.
    pub(crate) async fn stop(&self) {
        let Some(handle) = self.task.lock().await.take() else {
            return;
        };
        handle.abort();
        let _ = handle.await;
        tracing::info!(addr = %self.addr, what = self.what, "stopped");
    }

    /// Stops if running, binds the same address again and runs `accept_loop(listener)`.
    pub(crate) async fn restart<F, Fut>(&self, accept_loop: F) -> Result<(), LabError>
    where
        F: FnOnce(TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.stop().await;
        let mut guard = self.task.lock().await;
        let (listener, _) = bind(self.addr).await?;
        *guard = Some(tokio::spawn(accept_loop(listener)));
        tracing::info!(addr = %self.addr, what = self.what, "restarted");
        Ok(())
    }
}

impl Drop for AcceptTask {
    fn drop(&mut self) {
        if let Some(handle) = self.task.get_mut().take() {
            handle.abort();
        }
    }
}
