//! The deadpool [`Manager`] for mysql_async: `create` connects to the current primary (pinned to
//! the address of the [`Master`] snapshot it read), verifies that the node is writable and not
//! a replica, and stamps the connection with that snapshot; `recycle` refuses connections of an
//! old generation, broken or abandoned ones, and re-checks the role at most once per
//! `role_check_interval`.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use ha_core::{Master, MasterWatch};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tokio::sync::Notify;

use crate::error::{MysqlError, codes, connect_error};

/// Connection settings shared by the pool, the follower and start-up.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub user: String,
    pub password: Option<String>,
    pub database: Option<String>,
    pub connect_timeout: Duration,
    pub check_timeout: Duration,
    pub role_check_interval: Duration,
}

impl ConnSettings {
    /// Options for one node, pinned to `addr`: mysql_async would otherwise resolve the host on
    /// every connect and, with `prefer_socket` (its default), reconnect over a local socket
    /// after a loopback TCP connect.
    fn opts(&self, addr: SocketAddr) -> OptsBuilder {
        OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .resolved_ips(Some(vec![addr.ip()]))
            .prefer_socket(false)
            .user(Some(self.user.clone()))
            .pass(self.password.clone())
            .db_name(self.database.clone())
    }
}

/// The role a node showed when checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeRole {
    Primary,
    ReadOnly,
    Replica,
}

/// Connects to `addr`, bounded by the connect timeout, with typed errors.
pub(crate) async fn connect(settings: &ConnSettings, addr: SocketAddr) -> Result<Conn, MysqlError> {
    match tokio::time::timeout(settings.connect_timeout, Conn::new(settings.opts(addr))).await {
        Err(_) => Err(MysqlError::ConnectTimeout {
            addr,
            after: settings.connect_timeout,
        }),
        Ok(Err(e)) => Err(connect_error(
            addr,
            &settings.user,
            settings.database.as_deref(),
            e,
        )),
        Ok(Ok(c)) => Ok(c),
    }
}

/// `@@read_only` and, when the user may see it, whether the node replicates.
pub(crate) async fn role(
    conn: &mut Conn,
    addr: SocketAddr,
    timeout: Duration,
    full: bool,
) -> Result<NodeRole, MysqlError> {
    let check = async {
        let ro: Option<i64> = conn.query_first("SELECT @@global.read_only").await?;
        if ro != Some(0) {
            return Ok(NodeRole::ReadOnly);
        }
        if !full {
            return Ok(NodeRole::Primary);
        }
        match conn
            .query::<mysql_async::Row, _>("SHOW ALL SLAVES STATUS")
            .await
        {
            Ok(rows) => {
                let replicating = rows.iter().any(|r| {
                    ["Slave_IO_Running", "Slave_SQL_Running"].iter().any(|col| {
                        r.get_opt::<Option<String>, _>(*col)
                            .and_then(Result::ok)
                            .flatten()
                            .is_some_and(|v| v.eq_ignore_ascii_case("yes"))
                    })
                });
                Ok(if replicating {
                    NodeRole::Replica
                } else {
                    NodeRole::Primary
                })
            }
            // Without SLAVE MONITOR the user cannot see replication; read_only decides.
            Err(mysql_async::Error::Server(s)) if s.code == codes::SPECIFIC_ACCESS_DENIED => {
                Ok(NodeRole::Primary)
            }
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Err(_) => Err(MysqlError::ConnectTimeout {
            addr,
            after: timeout,
        }),
        Ok(Err(source)) => Err(MysqlError::Connect { addr, source }),
        Ok(Ok(r)) => Ok(r),
    }
}

/// Connects to `addr` and checks that it is a writable primary.
pub(crate) async fn connect_primary(
    settings: &ConnSettings,
    addr: SocketAddr,
) -> Result<Conn, MysqlError> {
    let mut conn = connect(settings, addr).await?;
    match role(&mut conn, addr, settings.check_timeout, true).await? {
        NodeRole::Primary => Ok(conn),
        NodeRole::ReadOnly => Err(MysqlError::ReadOnly { addr }),
        NodeRole::Replica => Err(MysqlError::Replica { addr }),
    }
}

/// [`connect_primary`], on the node's warm standby connection when there is one: only the role
/// check's round trips. A standby connection that breaks is closed and a fresh connect
/// decides; one that times out is the answer (a frozen node); one that shows a replica or a
/// read-only node is kept warm.
pub(crate) async fn probe_primary(shared: &Shared, addr: SocketAddr) -> Result<Conn, MysqlError> {
    let warm = shared.standby.lock().remove(&addr);
    if let Some(mut conn) = warm {
        let settings = &shared.conn;
        match role(&mut conn, addr, settings.check_timeout, true).await {
            Ok(NodeRole::Primary) => return Ok(conn),
            Ok(other) => {
                shared.put_standby(addr, conn);
                return Err(match other {
                    NodeRole::Replica => MysqlError::Replica { addr },
                    _ => MysqlError::ReadOnly { addr },
                });
            }
            // A node that does not answer in time would not answer a connect either (the
            // kernel completes the TCP handshake of a frozen server; the greeting never
            // comes): do not wait a second timeout.
            Err(e @ MysqlError::ConnectTimeout { .. }) => {
                close_later(conn);
                return Err(e);
            }
            Err(_) => close_later(conn),
        }
    }
    connect_primary(&shared.conn, addr).await
}

/// Keeps one warm connection to each of `addrs` in [`Shared::standby`]: every `every`, a
/// missing one is connected and a present one pinged (a failed ping closes it). Returns when
/// the client is gone.
pub(crate) async fn keep_standby(
    shared: std::sync::Weak<Shared>,
    addrs: Vec<SocketAddr>,
    every: Duration,
) {
    if addrs.is_empty() || every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let rounds = addrs.iter().map(|&addr| {
            let shared = shared.clone();
            async move {
                let warm = shared.standby.lock().remove(&addr);
                let conn = match warm {
                    Some(mut conn) => {
                        match tokio::time::timeout(shared.conn.check_timeout, conn.ping()).await {
                            Ok(Ok(())) => Some(conn),
                            _ => {
                                close_later(conn);
                                None
                            }
                        }
                    }
                    None => connect(&shared.conn, addr).await.ok(),
                };
                if let Some(conn) = conn {
                    shared.put_standby(addr, conn);
                }
            }
        });
        futures::future::join_all(rounds).await;
    }
}

/// Resolves once the master watch no longer publishes `generation` (a switch or a loss).
pub(crate) async fn moved_on(master: &MasterWatch, generation: ha_core::Generation) {
    let mut rx = master.subscribe();
    let _ = rx
        .wait_for(|m| m.as_ref().map(|m| m.generation) != Some(generation))
        .await;
}

/// Closes a connection in the background, bounded (a frozen server never answers the quit).
pub(crate) fn close_later(conn: Conn) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
    });
}

/// The most connects to the primary the writer pool makes at once. After a switch every
/// waiting writer's checkout creates a connection; all at once (32 handshakes beside the
/// first INSERT) they slowed the new primary's first commit: kill -9 repoint → first
/// acknowledgement measured 16–27 ms, with at most 4 at a time 8–17 ms (this machine).
pub(crate) const MAX_CONNECTING: usize = 4;

/// What the manager, the follower and the client share.
pub(crate) struct Shared {
    pub dependency: Arc<str>,
    pub master: MasterWatch,
    pub conn: ConnSettings,
    /// Wakes the follower: something suggests the primary changed.
    pub nudge: Notify,
    /// The follower's verified probe connection to a new primary, handed to the first
    /// `create` of that generation (it saves the first writer a connect and a role check).
    pub spare: parking_lot::Mutex<Option<(Arc<Master>, Conn)>>,
    /// Warm connections, at most one per node (the configured replicas and the primary), that
    /// the follower's probes check the role on instead of connecting: a promoted replica is
    /// verified in the round trips of its role check, without a TCP connect, a handshake and
    /// an authentication first. Kept by [`keep_standby`]; a probe takes one out, and puts it
    /// back unless it becomes the new primary's first pooled connection.
    pub standby: parking_lot::Mutex<std::collections::HashMap<SocketAddr, Conn>>,
    /// Bounds the connects `create` makes at once ([`MAX_CONNECTING`]).
    pub connecting: tokio::sync::Semaphore,
    /// Bumped every `role_check_interval` by the ticker task ([`tick_roles`]): a pooled
    /// connection whose last role check saw an older tick is checked again on its next
    /// checkout (at most once per tick per connection; a used connection is never more than
    /// two intervals past its last check), without reading a clock on every checkout.
    pub role_tick: std::sync::atomic::AtomicU64,
    /// The generation whose role check last failed (0: none): its other idle connections are
    /// dropped at checkout without a check of their own, so one checkout never waits on more
    /// than one failing check. Cleared by a verified `create`.
    pub suspect: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// A role check of `generation`'s primary failed: suspect it, and wake the follower.
    fn suspect_now(&self, generation: u64) {
        self.suspect
            .store(generation, std::sync::atomic::Ordering::Relaxed);
        self.nudge();
    }

    /// Keeps `conn` as `addr`'s standby connection (closing one it replaces).
    pub(crate) fn put_standby(&self, addr: SocketAddr, conn: Conn) {
        if let Some(old) = self.standby.lock().insert(addr, conn) {
            close_later(old);
        }
    }

    fn tick(&self) -> u64 {
        self.role_tick.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when a connection last checked at `tick` is due for a role check.
    fn role_check_due(&self, tick: u64) -> bool {
        self.conn.role_check_interval.is_zero() || self.tick() != tick
    }
}

/// The ticker of [`Shared::role_tick`]; with a zero interval every checkout checks and no
/// ticker runs.
pub(crate) async fn tick_roles(shared: std::sync::Weak<Shared>, every: Duration) {
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared
            .role_tick
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pooled connection to a verified primary, stamped with the [`Master`] snapshot it was made
/// from. Derefs to [`Conn`].
#[derive(Debug)]
pub struct HaConn {
    conn: Conn,
    stamp: Arc<Master>,
    /// The [`Shared::role_tick`] of its last role check.
    checked_tick: u64,
    in_flight: bool,
    broken: bool,
}

impl HaConn {
    /// The snapshot this connection was verified on: its address and generation.
    pub fn stamp(&self) -> &Arc<Master> {
        &self.stamp
    }

    pub(crate) fn into_conn(self) -> Conn {
        self.conn
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.stamp.addr
    }

    /// Marks the connection as unusable: the pool closes it instead of reusing it. Call it
    /// after an error that left the session in an unknown state.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Marks a statement as running; if the future running it is dropped before
    /// [`HaConn::end_statement`], the pool refuses the connection (its session is mid-answer).
    pub fn begin_statement(&mut self) {
        self.in_flight = true;
    }

    /// The statement begun with [`HaConn::begin_statement`] finished.
    pub fn end_statement(&mut self) {
        self.in_flight = false;
    }
}

impl Deref for HaConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for HaConn {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// The deadpool [`Manager`] of the writer pool (see the [module docs](self)). Built by
/// [`HaMysql`](crate::HaMysql); use [`HaMysql::pool`](crate::HaMysql::pool) for the pool.
pub struct MysqlManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MysqlManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlManager")
            .field("dependency", &self.shared.dependency)
            .field("master", &self.shared.master.current())
            .finish()
    }
}

impl MysqlManager {
    pub(crate) fn new(shared: Arc<Shared>) -> MysqlManager {
        MysqlManager { shared }
    }
}

impl Manager for MysqlManager {
    type Type = HaConn;
    /// Boxed: deadpool moves `Result<Object, PoolError<Error>>` around on every checkout, and
    /// a [`MysqlError`] is 120 bytes (measured: the checkout's instructions grew with it).
    type Error = Box<MysqlError>;

    async fn create(&self) -> Result<HaConn, Box<MysqlError>> {
        Ok(create(&self.shared).await?)
    }

    async fn recycle(&self, c: &mut HaConn, _: &Metrics) -> RecycleResult<Box<MysqlError>> {
        let shared = &self.shared;
        if c.in_flight || c.broken || c.conn.is_disconnected() {
            return Err(RecycleError::message("broken or abandoned mid-statement"));
        }
        shared
            .master
            .check(&c.stamp)
            .map_err(|e| RecycleError::Backend(Box::new(MysqlError::Fenced(e))))?;
        if shared.role_check_due(c.checked_tick) {
            if shared.suspect.load(std::sync::atomic::Ordering::Relaxed) == c.stamp.generation {
                return Err(RecycleError::message(
                    "a role check of this primary just failed",
                ));
            }
            // Boxed: the role check's future is large and rare; the common recycle stays small.
            return Box::pin(recheck_role(shared, c)).await;
        }
        Ok(())
    }
}

/// `create` of [`MysqlManager`]: a connection to the current primary, verified, stamped.
async fn create(shared: &Arc<Shared>) -> Result<HaConn, MysqlError> {
    // One snapshot: the address connected to and the generation stamped come together.
    let stamp = shared
        .master
        .current()
        .ok_or_else(|| MysqlError::NoPrimary {
            dependency: shared.dependency.to_string(),
        })?;
    let spare = shared.spare.lock().take();
    if let Some((spare_stamp, conn)) = spare {
        if spare_stamp.generation == stamp.generation {
            return Ok(HaConn {
                conn,
                stamp,
                checked_tick: shared.tick(),
                in_flight: false,
                broken: false,
            });
        }
        close_later(conn);
    }
    // A connect to a frozen node waits its full timeout; when the primary moves on
    // meanwhile, give the pool slot back at once instead. At most MAX_CONNECTING at once; the
    // wait for a turn, the connect and its role check together within the connect timeout
    // (what the checkout's timer-free fast path counts on).
    let bound = shared.conn.connect_timeout;
    let connected = tokio::select! {
        r = tokio::time::timeout(bound, async {
            let _permit = shared.connecting.acquire().await;
            connect_primary(&shared.conn, stamp.addr).await
        }) => r.unwrap_or(Err(MysqlError::ConnectTimeout { addr: stamp.addr, after: bound })),
        () = moved_on(&shared.master, stamp.generation) => {
            return Err(MysqlError::Fenced(ha_core::HaError::Fenced {
                connection: stamp.generation,
                current: shared.master.generation(),
            }));
        }
    };
    let conn = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(dependency = %shared.dependency, endpoint = %stamp.addr, generation = stamp.generation, error = %e, "writer connect refused");
            shared.nudge();
            return Err(e);
        }
    };
    // The primary may have switched while we connected.
    shared.master.check(&stamp).map_err(MysqlError::Fenced)?;
    metrics::counter!("ha_mysql_connections_created_total", "dependency" => shared.dependency.to_string()).increment(1);
    // Verified writable just now: the primary is no longer in doubt.
    let _ = shared.suspect.compare_exchange(
        stamp.generation,
        0,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(HaConn {
        conn,
        stamp,
        checked_tick: shared.tick(),
        in_flight: false,
        broken: false,
    })
}

/// `recycle`'s rate-limited role check of a connection to the primary.
async fn recheck_role(shared: &Arc<Shared>, c: &mut HaConn) -> RecycleResult<Box<MysqlError>> {
    let checked = tokio::select! {
        r = role(&mut c.conn, c.stamp.addr, shared.conn.check_timeout, false) => r,
        () = moved_on(&shared.master, c.stamp.generation) => {
            c.broken = true;
            return Err(RecycleError::message("the primary moved on during the role check"));
        }
    };
    match checked {
        Ok(NodeRole::Primary) => {
            c.checked_tick = shared.tick();
            Ok(())
        }
        Ok(_) => {
            shared.suspect_now(c.stamp.generation);
            Err(RecycleError::Backend(Box::new(MysqlError::ReadOnly {
                addr: c.stamp.addr,
            })))
        }
        Err(e) => {
            shared.suspect_now(c.stamp.generation);
            Err(RecycleError::Backend(Box::new(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shared(role_check_interval: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            dependency: "db".into(),
            master: MasterWatch::new("db", ha_core::EventBus::default()),
            conn: ConnSettings {
                user: "u".into(),
                password: None,
                database: None,
                connect_timeout: Duration::from_millis(100),
                check_timeout: Duration::from_millis(100),
                role_check_interval,
            },
            nudge: Notify::new(),
            spare: parking_lot::Mutex::new(None),
            connecting: tokio::sync::Semaphore::new(MAX_CONNECTING),
            standby: parking_lot::Mutex::new(std::collections::HashMap::new()),
            role_tick: std::sync::atomic::AtomicU64::new(0),
            suspect: std::sync::atomic::AtomicU64::new(0),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_due_for_a_role_check_once_per_tick() {
        let s = shared(Duration::from_secs(1));
        let ticker = tokio::spawn(tick_roles(Arc::downgrade(&s), Duration::from_secs(1)));
        let checked = s.tick();
        assert!(!s.role_check_due(checked));
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(!s.role_check_due(checked), "not before the interval");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(s.role_check_due(checked), "due once the interval passed");
        assert!(!s.role_check_due(s.tick()), "a check made now is not due");
        // The ticker ends with the pool's shared state.
        drop(s);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(ticker.is_finished());
    }

    #[test]
    fn after_a_failed_role_check_the_generation_is_suspect_until_a_verified_create() {
        let s = shared(Duration::from_secs(1));
        assert_eq!(s.suspect.load(std::sync::atomic::Ordering::Relaxed), 0);
        s.suspect_now(7);
        assert_eq!(s.suspect.load(std::sync::atomic::Ordering::Relaxed), 7);
        // A verified create of another generation does not clear it; of this one it does.
        let clear = |g: u64| {
            let _ = s.suspect.compare_exchange(
                g,
                0,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
        };
        clear(6);
        assert_eq!(s.suspect.load(std::sync::atomic::Ordering::Relaxed), 7);
        clear(7);
        assert_eq!(s.suspect.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_checks_every_checkout_and_runs_no_ticker() {
        let s = shared(Duration::ZERO);
        let ticker = tokio::spawn(tick_roles(Arc::downgrade(&s), Duration::ZERO));
        tokio::task::yield_now().await;
        assert!(ticker.is_finished());
        assert!(s.role_check_due(s.tick()));
    }
}
