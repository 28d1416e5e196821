//! The expiry job's state as `/topology` shows it.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::ServiceConfig;
use crate::lease::{self, Lease, LeaseConfig, LeaseError};
use crate::store::Store;
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

/// The lease's name.
pub const LEASE_NAME: &str = "expire-members";

/// Starts the expiry job: every instance runs the lease loop; the holder expires members
/// (fenced by its token), then updates the cache and publishes `member.expired`. The view is
/// refreshed every interval for `/topology`. Ends (releasing the lease) when `stop` turns true.
pub fn spawn(
    store: Store,
    config: &ServiceConfig,
    view: JobView,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, LeaseError> {
    let cfg = LeaseConfig::new(LEASE_NAME, config.instance.clone(), config.lease_ttl);
    let lease = Lease::new(store.db().clone(), cfg)?;
    let interval = config.job_interval;
    Ok(tokio::spawn(async move {
        if let Err(e) = Lease::ensure_schema(store.db()).await {
            tracing::error!(error = %e, "the job's lease table could not be created: no job here");
            view.update(|s| s.last_error = Some(e.to_string()));
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        let watcher = {
            let lease = lease.clone();
            let view = view.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let info = lease.holder().await;
                    let held = lease.held();
                    let stats = lease.stats();
                    view.update(|s| {
                        if let Ok(info) = &info {
                            let live = info.as_ref().filter(|i| !i.expired);
                            s.holder = live.map(|i| i.holder.clone());
                            s.token = live.map(|i| i.token.0);
                        }
                        s.held_here = held.is_some();
                        s.runs = stats.job_runs;
                        s.fenced = stats.fenced;
                    });
                }
            })
        };
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let job_view = view.clone();
        let result = lease::run(lease.clone(), interval, shutdown, |token| {
            let lease = lease.clone();
            let store = store.clone();
            let view = job_view.clone();
            async move {
                let changed = lease::expire_members(&lease, token).await?;
                if !changed.is_empty() {
                    tracing::info!(count = changed.len(), token = token.0, "members expired");
                    view.update(|s| s.expired += changed.len() as u64);
                    store.expired(&changed).await.map_err(LeaseError::job)?;
                }
                Ok(())
            }
        })
        .await;
        watcher.abort();
        if let Err(e) = result {
            tracing::error!(error = %e, "the expiry job ended");
            view.update(|s| s.last_error = Some(e.to_string()));
        }
    }))
}
