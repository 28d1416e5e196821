//! The expiry job's state as `/topology` shows it.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

/// What the job loop last saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobStatus {
    /// The lease's holder, as last read.
    pub holder: Option<String>,
    /// The lease's fencing token, as last read.
    pub token: Option<u64>,
    /// True while this instance holds the lease.
    pub held_here: bool,
    /// Runs of the job by this instance.
    pub runs: u64,
    /// Members this instance expired.
    pub expired: u64,
    /// Writes refused because the token was old.
    pub fenced: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// A shared view of the job's state.
#[derive(Debug, Clone, Default)]
pub struct JobView(Arc<Mutex<JobStatus>>);

impl JobView {
    /// A copy of the state.
    pub fn snapshot(&self) -> JobStatus {
        self.0.lock().clone()
    }

    /// Changes the state.
    pub fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        f(&mut self.0.lock());
    }
}

/// Starts the expiry job (the lease loop arrives with `lease.rs`).
pub fn spawn(
    _store: crate::store::Store,
    _config: &crate::config::ServiceConfig,
    _view: JobView,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
    })
}
