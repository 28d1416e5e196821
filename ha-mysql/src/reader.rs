//! Reads from replicas: a pool per replica, a lag watcher publishing the replicas within the
//! lag bound (`Role::Replica`) through an ha-core [`Publisher`], and ha-core's
//! `LocalityBalance` over that set (same IDC, then same region, then the rest).

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool::managed::{Manager, Metrics, Object, Pool, RecycleError, RecycleResult};
use futures::future::BoxFuture;
use ha_core::{BoxError, IdcClassifier, Publisher, Role};
use mysql_async::Conn;
use mysql_async::prelude::Queryable;

use crate::client::Writer;
use crate::error::MysqlError;
use crate::manager::{ConnSettings, close_later, connect};

/// A pooled connection to one replica. Derefs to [`Conn`].
#[derive(Debug)]
pub struct ReplicaConn {
    conn: Conn,
    addr: SocketAddr,
    broken: bool,
}

impl ReplicaConn {
    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Marks the connection as unusable: the pool closes it.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Deref for ReplicaConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for ReplicaConn {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// The deadpool [`Manager`] of one replica's pool: connects (pinned to the address), refuses
/// broken connections. Lag is the watcher's business, not a checkout's.
#[derive(Debug)]
pub struct ReplicaManager {
    addr: SocketAddr,
    settings: ConnSettings,
}

impl Manager for ReplicaManager {
    type Type = ReplicaConn;
    /// Boxed, as [`crate::MysqlManager`]'s: the checkout's results stay small.
    type Error = Box<MysqlError>;

    async fn create(&self) -> Result<ReplicaConn, Box<MysqlError>> {
        let conn = connect(&self.settings, self.addr).await?;
        Ok(ReplicaConn {
            conn,
            addr: self.addr,
            broken: false,
        })
    }

    async fn recycle(&self, c: &mut ReplicaConn, _: &Metrics) -> RecycleResult<Box<MysqlError>> {
        if c.broken || c.conn.is_disconnected() {
            return Err(RecycleError::message("broken"));
        }
        Ok(())
    }
}

/// A connection for a read: to a replica, or to the primary when no replica qualifies.
/// Derefs to [`Conn`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadConn {
    /// A replica within the lag bound, picked by locality.
    Replica(Object<ReplicaManager>),
    /// The primary (no replica qualified, or read-your-writes could not wait).
    Primary(Writer),
}

impl ReadConn {
    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            ReadConn::Replica(r) => r.addr(),
            ReadConn::Primary(w) => w.addr(),
        }
    }

    /// True when the read goes to a replica.
    pub fn is_replica(&self) -> bool {
        matches!(self, ReadConn::Replica(_))
    }
}

impl Deref for ReadConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        match self {
            ReadConn::Replica(r) => r,
            ReadConn::Primary(w) => w,
        }
    }
}

impl DerefMut for ReadConn {
    fn deref_mut(&mut self) -> &mut Conn {
        match self {
            ReadConn::Replica(r) => r,
            ReadConn::Primary(w) => w,
        }
    }
}

/// The per-endpoint service the balancer calls: checks a connection out of that replica's
/// pool.
#[derive(Clone)]
pub(crate) struct ReplicaService {
    pool: Option<Pool<ReplicaManager>>,
    addr: SocketAddr,
    /// `same_idc`, `same_region` or `remote`: the label of `ha_mysql_reads_total`.
    locality: &'static str,
}

impl ReplicaService {
    pub(crate) fn new(
        ep: &ha_core::Endpoint,
        settings: ConnSettings,
        max: usize,
    ) -> ReplicaService {
        let addr = ep.addr;
        let timeout = settings.connect_timeout;
        let pool = Pool::builder(ReplicaManager { addr, settings })
            .max_size(max.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .wait_timeout(Some(timeout))
            .build()
            .inspect_err(|e| tracing::warn!(endpoint = %addr, error = %e, "replica pool refused"))
            .ok();
        ReplicaService {
            pool,
            addr,
            locality: ep.locality.as_str(),
        }
    }
}

impl tower_service::Service<()> for ReplicaService {
    type Response = Object<ReplicaManager>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Object<ReplicaManager>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let pool = self.pool.clone();
        let addr = self.addr;
        let locality = self.locality;
        Box::pin(async move {
            let Some(pool) = pool else {
                return Err(Box::new(MysqlError::NoPrimary {
                    dependency: format!("replica {addr}"),
                }) as BoxError);
            };
            let conn = pool.get().await.map_err(|e| -> BoxError {
                match e {
                    deadpool::managed::PoolError::Backend(m) => m,
                    other => Box::new(std::io::Error::other(other.to_string())),
                }
            })?;
            metrics::counter!("ha_mysql_reads_total", "served_by" => "replica", "locality" => locality)
                .increment(1);
            Ok(conn)
        })
    }
}

/// Where [`watch_lag`] tells a replica leaving or rejoining the read set.
pub(crate) struct LagReport {
    pub dependency: Arc<str>,
    pub events: ha_core::EventBus,
}

/// Watches every configured replica: published (as `Role::Replica`) while its SQL thread runs
/// and `Seconds_Behind_Master` is within `max_lag`; withdrawn otherwise (a promoted replica
/// stops replicating and leaves the set; a demoted primary that replicates joins it). A
/// replica leaving the set is told as `ReplicaLagging` (with why), its return as
/// `ReplicaCaughtUp`; `ha_mysql_replica_lag_seconds{replica}` is the last lag read.
pub(crate) async fn watch_lag(
    replicas: Vec<SocketAddr>,
    settings: ConnSettings,
    classifier: Arc<IdcClassifier>,
    publisher: Publisher,
    report: LagReport,
    max_lag: Duration,
    every: Duration,
) {
    let mut conns: Vec<Option<Conn>> = replicas.iter().map(|_| None).collect();
    let mut judges: Vec<Judge> = replicas.iter().map(|_| Judge::default()).collect();
    let mut first = true;
    loop {
        // All at once: a frozen replica (its check waits the check timeout) does not delay
        // the verdict on the others.
        let lags = futures::future::join_all(
            conns
                .iter_mut()
                .zip(&replicas)
                .map(|(slot, addr)| check_lag(slot, *addr, &settings)),
        )
        .await;
        let now = tokio::time::Instant::now();
        let mut ok = Vec::new();
        for ((addr, lag), judge) in replicas.iter().zip(lags).zip(&mut judges) {
            let ep = classifier.endpoint(*addr).with_role(Role::Replica);
            if let Some(l) = lag {
                metrics::gauge!("ha_mysql_replica_lag_seconds", "replica" => addr.to_string())
                    .set(l.as_secs_f64());
            }
            let (within, change) = judge.observe(lag, max_lag, first, now);
            tracing::trace!(endpoint = %addr, ?lag, within, "replica lag");
            let event = change.map(|c| match c {
                Change::Lagging(reason) => ha_core::TopologyEvent::replica_lagging(
                    report.dependency.clone(),
                    *addr,
                    ep.idc_name(),
                    reason,
                ),
                Change::CaughtUp(after) => ha_core::TopologyEvent::replica_caught_up(
                    report.dependency.clone(),
                    *addr,
                    ep.idc_name(),
                    after,
                ),
            });
            if let Some(event) = event {
                report.events.publish(event);
            }
            if within {
                ok.push(ep);
            }
        }
        first = false;
        publisher.publish(ok);
        if publisher.receiver_count() == 0 {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// A replica leaving or rejoining the read set ([`Judge::observe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// It left: why.
    Lagging(String),
    /// It is back, after this long out.
    CaughtUp(Duration),
}

/// One replica's place in the read set, as the lag watcher judges it round by round.
#[derive(Debug, Default)]
struct Judge {
    /// When it left the set, and whether that was told (`None`: in it).
    out: Option<(tokio::time::Instant, bool)>,
}

impl Judge {
    /// The round's verdict on a replica whose lag read `lag` (`None`: not replicating, SQL
    /// thread stopped, no answer): whether it is in the read set (`lag <= max_lag`), and the
    /// change to tell. In the watcher's `first` round a replica that is not usable (a promoted
    /// one, one not yet replicating) is simply left out, untold; only changes are told, and a
    /// return only of a leaving that was told.
    fn observe(
        &mut self,
        lag: Option<Duration>,
        max_lag: Duration,
        first: bool,
        now: tokio::time::Instant,
    ) -> (bool, Option<Change>) {
        let within = lag.is_some_and(|l| l <= max_lag);
        let change = match (within, self.out) {
            (true, Some((since, told))) => {
                self.out = None;
                told.then(|| Change::CaughtUp(now.saturating_duration_since(since)))
            }
            (false, None) => {
                self.out = Some((now, !first));
                (!first).then(|| {
                    Change::Lagging(match lag {
                        Some(l) => format!(
                            "Seconds_Behind_Master {} s > bound {:?}",
                            l.as_secs(),
                            max_lag
                        ),
                        None => {
                            "not replicating (SQL thread stopped, no replication, or no answer)"
                                .to_owned()
                        }
                    })
                })
            }
            _ => None,
        };
        (within, change)
    }
}

/// The replica's lag (`None`: not replicating, SQL thread stopped, unreachable).
async fn check_lag(
    slot: &mut Option<Conn>,
    addr: SocketAddr,
    settings: &ConnSettings,
) -> Option<Duration> {
    if slot.is_none() {
        *slot = connect(settings, addr).await.ok();
    }
    let conn = slot.as_mut()?;
    let q = tokio::time::timeout(
        settings.check_timeout,
        conn.query_first::<mysql_async::Row, _>("SHOW SLAVE STATUS"),
    )
    .await;
    let row = match q {
        Ok(Ok(row)) => row,
        _ => {
            if let Some(c) = slot.take() {
                close_later(c);
            }
            return None;
        }
    };
    let row = row?;
    let text = |col: &str| {
        row.get_opt::<Option<String>, _>(col)
            .and_then(Result::ok)
            .flatten()
    };
    if !text("Slave_SQL_Running").is_some_and(|v| v.eq_ignore_ascii_case("yes")) {
        return None;
    }
    let secs: u64 = text("Seconds_Behind_Master")?.parse().ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BOUND: Duration = Duration::from_secs(1);

    fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_leaves_past_the_bound_once_and_returns_with_how_long_it_was_out() {
        let mut j = Judge::default();
        let t0 = tokio::time::Instant::now();
        assert_eq!(j.observe(secs(0), BOUND, true, t0), (true, None));
        // At the bound is within it.
        assert_eq!(j.observe(secs(1), BOUND, false, t0), (true, None));
        tokio::time::advance(Duration::from_millis(500)).await;
        let left = tokio::time::Instant::now();
        let (within, change) = j.observe(secs(3), BOUND, false, left);
        assert!(!within);
        let Some(Change::Lagging(why)) = change else {
            panic!("{change:?}")
        };
        assert!(why.contains("3 s") && why.contains("1s"), "{why}");
        // Still behind: nothing new to tell.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            j.observe(secs(2), BOUND, false, tokio::time::Instant::now()),
            (false, None)
        );
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(
            j.observe(secs(0), BOUND, false, tokio::time::Instant::now()),
            (true, Some(Change::CaughtUp(Duration::from_millis(1200))))
        );
        assert_eq!(
            j.observe(secs(0), BOUND, false, tokio::time::Instant::now()),
            (true, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn not_replicating_is_out_and_says_so() {
        let mut j = Judge::default();
        let now = tokio::time::Instant::now();
        assert_eq!(j.observe(secs(0), BOUND, true, now), (true, None));
        let (within, change) = j.observe(None, BOUND, false, now);
        assert!(!within);
        assert!(
            matches!(&change, Some(Change::Lagging(why)) if why.contains("not replicating")),
            "{change:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unusable_at_start_is_left_out_untold_and_its_joining_is_not_told_either() {
        let mut j = Judge::default();
        let now = tokio::time::Instant::now();
        // A promoted replica, or one not replicating yet, at start.
        assert_eq!(j.observe(None, BOUND, true, now), (false, None));
        assert_eq!(j.observe(None, BOUND, false, now), (false, None));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            j.observe(secs(0), BOUND, false, tokio::time::Instant::now()),
            (true, None),
            "joining was never preceded by a told leaving"
        );
        // From then on changes are told.
        assert!(matches!(
            j.observe(secs(5), BOUND, false, tokio::time::Instant::now()),
            (false, Some(Change::Lagging(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_bound_admits_only_a_replica_with_no_lag() {
        let mut j = Judge::default();
        let now = tokio::time::Instant::now();
        assert_eq!(j.observe(secs(0), Duration::ZERO, true, now), (true, None));
        assert!(!j.observe(secs(1), Duration::ZERO, false, now).0);
    }
}
