//! A job lease with a fencing token, kept in MySQL/MariaDB: the scheduled expiry job runs in
//! every IDC but executes in one instance at a time.
//!
//! The lease is one row of `job_lease` per job name: `(name, holder, token, expires_at)`.
//!
//! - [`Lease::try_acquire`] takes the lease when it is free or expired, with
//!   `token = previous token + 1` (a token is never handed out twice for a row), and renews it
//!   (same token, new expiry) when it is ours. Expiry is computed and compared by the
//!   **database's** clock (`UTC_TIMESTAMP(6)`, time-zone and DST independent), never by the
//!   local one.
//! - [`Lease::held`] is the local view: the token while `acquired_at + ttl` has not passed, where
//!   `acquired_at` is the local (tokio) instant taken *before* the acquiring statement was
//!   sent. It is conservative, and only a hint: the authority is the row.
//! - [`Lease::fenced`] runs the job's writes in a transaction that first locks the lease row
//!   (`SELECT ... FOR UPDATE`) and checks that the token is still the current one and not
//!   expired; otherwise it rolls back with [`LeaseError::Fenced`]. A take-over waits for that row
//!   lock, so the writes of two holders never interleave, and a holder that was frozen (SIGSTOP,
//!   GC pause) and resumes with an old token cannot act.
//! - A holder frozen *inside* a fenced transaction would keep the row locked; on MariaDB the
//!   transaction's session gets `idle_transaction_timeout = ceil(ttl)`, so the server kills it
//!   (rolling back) and another instance can take over within about the lease time.
//! - [`run`] is the scheduler's loop: it renews every `renew_every` (in its own task, so a long
//!   job does not delay renewals), runs the job every `interval` while the lease is held, logs
//!   and counts errors, and releases the lease on shutdown.
//!
//! Every holder must use a distinct `holder` string (e.g. `<idc>/<host>/<pid>`), distinct also
//! under the column's (case-insensitive) collation: two instances with the same one would both
//! renew the same lease.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ha_core::{BoxError, ErrorClass, HaError};
use ha_mysql::error::classify_mysql;
use ha_mysql::mysql_async::prelude::Queryable;
use ha_mysql::mysql_async::{self, Conn, DriverError, Row, Transaction, TxOpts, Value};
use ha_mysql::{HaMysql, WriteOptions};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

/// The DDL of the lease table ([`Lease::ensure_schema`]).
pub const LEASE_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS job_lease (\
    name VARCHAR(64) NOT NULL PRIMARY KEY, \
    holder VARCHAR(128) NOT NULL, \
    token BIGINT UNSIGNED NOT NULL, \
    expires_at DATETIME(6) NOT NULL\
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

/// The longest lease name (`job_lease.name VARCHAR(64)`), in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// The longest holder (`job_lease.holder VARCHAR(128)`), in characters.
pub const MAX_HOLDER_CHARS: usize = 128;
/// The longest lease time accepted.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest lease time accepted (the database keeps microseconds, the server-side guard of
/// a fenced transaction seconds; shorter leases would only flap).
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// The most members [`expire_members`] changes in one transaction.
pub const EXPIRE_BATCH: usize = 100;

/// Acquire-or-renew: the token stays when the lease is ours and valid, is bumped when it was
/// free or expired. MySQL and MariaDB evaluate single-table `SET` assignments left to right
/// (and with MariaDB's `SIMULTANEOUS_ASSIGNMENT` every one sees the old row); either way `token`
/// is computed from the old `holder` and `expires_at`.
const ACQUIRE_SQL: &str = "UPDATE job_lease SET \
    token = IF(holder = ? AND expires_at > UTC_TIMESTAMP(6), token, token + 1), \
    holder = ?, \
    expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
    WHERE name = ? AND (holder = ? OR expires_at <= UTC_TIMESTAMP(6))";
/// Whether the row is ours is the database's comparison (the same as the `UPDATE`'s, under the
/// column's collation), never a second one in Rust.
const STATE_SQL: &str = "SELECT holder = ?, token FROM job_lease WHERE name = ?";
const INSERT_SQL: &str = "INSERT IGNORE INTO job_lease (name, holder, token, expires_at) \
    VALUES (?, ?, 1, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)";
const INFO_SQL: &str = "SELECT holder, token, \
    DATE_FORMAT(expires_at, '%Y-%m-%dT%H:%i:%s.%fZ'), \
    TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) \
    FROM job_lease WHERE name = ?";
const RELEASE_SQL: &str = "UPDATE job_lease SET expires_at = UTC_TIMESTAMP(6) \
    WHERE name = ? AND holder = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)";
const FENCE_SQL: &str =
    "SELECT token, expires_at > UTC_TIMESTAMP(6) FROM job_lease WHERE name = ? FOR UPDATE";
const EXPIRED_MEMBERS_SQL: &str = "SELECT id, version FROM members \
    WHERE expires_at < UTC_TIMESTAMP(6) AND expired = 0 AND deleted = 0 \
    ORDER BY id LIMIT 100 FOR UPDATE";

/// MySQL's "unknown system variable": `idle_transaction_timeout` is MariaDB's.
const ER_UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;

/// A fencing token: grows by one at every change of holder (or re-acquisition after expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The lease's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The job's name (the row's key), at most [`MAX_NAME_CHARS`] characters.
    pub name: String,
    /// This instance's identity, unique among the instances (e.g. `<idc>/<host>/<pid>`), at most
    /// [`MAX_HOLDER_CHARS`] characters.
    pub holder: String,
    /// The lease time: another instance takes over at most this long (by the database's clock)
    /// after the last renewal of a holder that died or froze. Between [`MIN_TTL`] and
    /// [`MAX_TTL`].
    pub ttl: Duration,
    /// How often [`run`] renews (and tries to acquire). Must be below `ttl`; [`LeaseConfig::new`]
    /// sets `ttl / 3`.
    pub renew_every: Duration,
    /// The deadline of every database call of the lease (acquire, renew, release, one fenced
    /// transaction). [`LeaseConfig::new`] sets `ttl / 3`.
    pub timeout: Duration,
}

impl LeaseConfig {
    /// A configuration with `renew_every = timeout = ttl / 3`.
    pub fn new(name: impl Into<String>, holder: impl Into<String>, ttl: Duration) -> LeaseConfig {
        LeaseConfig {
            name: name.into(),
            holder: holder.into(),
            ttl,
            renew_every: ttl / 3,
            timeout: ttl / 3,
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), LeaseConfigError> {
        if self.name.is_empty() {
            return Err(LeaseConfigError::EmptyName);
        }
        let chars = self.name.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(LeaseConfigError::NameTooLong { chars });
        }
        if self.holder.is_empty() {
            return Err(LeaseConfigError::EmptyHolder);
        }
        let chars = self.holder.chars().count();
        if chars > MAX_HOLDER_CHARS {
            return Err(LeaseConfigError::HolderTooLong { chars });
        }
        if self.ttl.is_zero() {
            return Err(LeaseConfigError::ZeroTtl);
        }
        if self.ttl < MIN_TTL || self.ttl > MAX_TTL {
            return Err(LeaseConfigError::TtlOutOfRange { ttl: self.ttl });
        }
        if self.renew_every.is_zero() {
            return Err(LeaseConfigError::ZeroRenewEvery);
        }
        if self.renew_every >= self.ttl {
            return Err(LeaseConfigError::RenewNotBelowTtl {
                renew_every: self.renew_every,
                ttl: self.ttl,
            });
        }
        if self.timeout.is_zero() {
            return Err(LeaseConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

/// What is wrong with a [`LeaseConfig`] (or with [`run`]'s interval).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseConfigError {
    /// `name` is empty.
    #[error("lease name must not be empty")]
    EmptyName,
    /// `name` is longer than [`MAX_NAME_CHARS`].
    #[error("lease name has {chars} characters, at most {MAX_NAME_CHARS} allowed")]
    NameTooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// `holder` is empty.
    #[error("lease holder must not be empty")]
    EmptyHolder,
    /// `holder` is longer than [`MAX_HOLDER_CHARS`].
    #[error("lease holder has {chars} characters, at most {MAX_HOLDER_CHARS} allowed")]
    HolderTooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// `ttl` is zero.
    #[error("lease ttl must be positive")]
    ZeroTtl,
    /// `ttl` is outside [`MIN_TTL`]..=[`MAX_TTL`].
    #[error("lease ttl {ttl:?} is outside {MIN_TTL:?}..={MAX_TTL:?}")]
    TtlOutOfRange {
        /// The ttl given.
        ttl: Duration,
    },
    /// `renew_every` is zero.
    #[error("lease renew_every must be positive")]
    ZeroRenewEvery,
    /// `renew_every` is not below `ttl`: the lease would lapse between renewals.
    #[error("lease renew_every {renew_every:?} must be below the ttl {ttl:?}")]
    RenewNotBelowTtl {
        /// The renewal period given.
        renew_every: Duration,
        /// The ttl given.
        ttl: Duration,
    },
    /// `timeout` is zero.
    #[error("lease timeout must be positive")]
    ZeroTimeout,
    /// [`run`]'s job interval is zero.
    #[error("the job interval must be positive")]
    ZeroInterval,
}

/// The errors of the lease.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The configuration is invalid.
    #[error("invalid lease configuration: {0}")]
    Config(#[from] LeaseConfigError),
    /// A fenced write with a token that is no longer the lease's (another holder took over) or
    /// whose lease expired: nothing was written (the transaction was rolled back).
    #[error(
        "fenced: token {held_token} is not the lease's ({}){}",
        current_token.map_or_else(|| "no lease row".to_owned(), |t| format!("current token {t}")),
        if *expired { ", expired" } else { "" }
    )]
    Fenced {
        /// The token the write carried.
        held_token: Token,
        /// The lease's token in the database (`None`: no row).
        current_token: Option<Token>,
        /// True when the lease's expiry had passed (by the database's clock).
        expired: bool,
    },
    /// A database call failed. From [`Lease::fenced`], the transaction did not commit unless
    /// [`HaError::is_outcome_unknown`] is true (the connection broke, or the deadline passed,
    /// while the `COMMIT` was under way).
    #[error("lease database call failed: {0}")]
    Db(#[from] HaError),
    /// A job's own failure (see [`LeaseError::job`]).
    #[error("job failed: {0}")]
    Job(#[source] BoxError),
}

impl LeaseError {
    /// Wraps a job's own error, for a job given to [`run`].
    pub fn job(err: impl Into<BoxError>) -> LeaseError {
        LeaseError::Job(err.into())
    }

    /// True for [`LeaseError::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, LeaseError::Fenced { .. })
    }
}

/// Who holds the lease, as the database says ([`Lease::holder`]), e.g. for `/topology`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The (last) holder.
    pub holder: String,
    /// Its token.
    pub token: Token,
    /// The expiry, UTC, RFC 3339 with microseconds (`2025-01-02T03:04:05.123456Z`).
    pub expires_at: String,
    /// True when the expiry has passed (by the database's clock): nobody holds the lease.
    pub expired: bool,
    /// Time left until the expiry (zero once expired), by the database's clock.
    pub remaining: Duration,
}

/// Our lease as last acquired or renewed ([`Lease::watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// The token.
    pub token: Token,
    /// The local instant taken before the acquiring (or renewing) statement was sent.
    pub acquired_at: Instant,
    /// `acquired_at + ttl`: until then [`Lease::held`] returns the token.
    pub valid_until: Instant,
}

/// Counters of a lease (shared by its clones), for tests and `/topology`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Acquisitions: a new token for us.
    pub acquisitions: u64,
    /// Renewals: the same token, a new expiry.
    pub renewals: u64,
    /// Times the database showed another holder while we thought we held the lease.
    pub losses: u64,
    /// Failed acquire/renew calls.
    pub acquire_errors: u64,
    /// Fenced writes refused ([`LeaseError::Fenced`]).
    pub fenced: u64,
    /// Job runs started by [`run`].
    pub job_runs: u64,
    /// Job runs that failed with another error than [`LeaseError::Fenced`].
    pub job_errors: u64,
}

#[derive(Default)]
struct Counters {
    acquisitions: AtomicU64,
    renewals: AtomicU64,
    losses: AtomicU64,
    acquire_errors: AtomicU64,
    fenced: AtomicU64,
    job_runs: AtomicU64,
    job_errors: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Inner {
    db: HaMysql,
    cfg: LeaseConfig,
    ttl_micros: u64,
    idle_guard_secs: u64,
    state: watch::Sender<Option<Acquired>>,
    counters: Counters,
}

/// A job lease with a fencing token (see the [module docs](self)). `Clone` shares it.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.inner.cfg.name)
            .field("holder", &self.inner.cfg.holder)
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

/// What one acquire/renew statement found.
enum Acquire {
    Ours(Token),
    Other,
}

impl Lease {
    /// Creates the `job_lease` table if it does not exist ([`LEASE_TABLE_DDL`]), bounded by
    /// 10 s.
    pub async fn ensure_schema(db: &HaMysql) -> Result<(), LeaseError> {
        db.write_with(
            WriteOptions::new(Duration::from_secs(10)).idempotent(),
            |c| Box::pin(async move { c.query_drop(LEASE_TABLE_DDL).await }),
        )
        .await?;
        Ok(())
    }

    /// A lease on `cfg.name` for `cfg.holder`; nothing is sent yet. Fails with
    /// [`LeaseError::Config`] for an invalid configuration.
    pub fn new(db: HaMysql, cfg: LeaseConfig) -> Result<Lease, LeaseError> {
        cfg.validate()?;
        let ttl_micros = u64::try_from(cfg.ttl.as_micros())
            .map_err(|_| LeaseConfigError::TtlOutOfRange { ttl: cfg.ttl })?;
        let idle_guard_secs = cfg.ttl.as_secs() + u64::from(cfg.ttl.subsec_nanos() > 0);
        let (state, _) = watch::channel(None);
        Ok(Lease {
            inner: Arc::new(Inner {
                db,
                cfg,
                ttl_micros,
                idle_guard_secs: idle_guard_secs.max(1),
                state,
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.inner.cfg
    }

    /// Acquires the lease if it is free or expired (a new token: the previous one + 1), renews
    /// it if it is ours (same token, new expiry), by the database's clock. Returns our token
    /// while the local view is valid (as [`Lease::held`] after the call), `None` when another
    /// instance holds it. On an error the local view is left as it was (it lapses by itself).
    pub async fn try_acquire(&self) -> Result<Option<Token>, LeaseError> {
        let inner = &self.inner;
        let before = Instant::now();
        let name = inner.cfg.name.clone();
        let holder = inner.cfg.holder.clone();
        let ttl = inner.ttl_micros;
        // Idempotent: a retry after a lost answer finds the row ours and renews it.
        let opts = WriteOptions::new(inner.cfg.timeout).idempotent();
        let got = inner
            .db
            .write_with(opts, move |c| {
                let (name, holder) = (name.clone(), holder.clone());
                Box::pin(async move { acquire_txn(c, name, holder, ttl).await })
            })
            .await;
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                Counters::bump(&inner.counters.acquire_errors);
                return Err(e.into());
            }
        };
        match got {
            Acquire::Ours(token) => self.record_ours(token, before),
            Acquire::Other => self.record_other(before),
        }
        Ok(self.held())
    }

    fn record_ours(&self, token: Token, before: Instant) {
        let inner = &self.inner;
        let next = Acquired {
            token,
            acquired_at: before,
            valid_until: before + inner.cfg.ttl,
        };
        let mut renewed = None;
        inner.state.send_if_modified(|cur| match cur {
            // A newer observation is already recorded (concurrent calls on clones).
            Some(c) if c.acquired_at > before => false,
            Some(c) => {
                renewed = Some(c.token == token && c.valid_until > before);
                *c = next;
                true
            }
            None => {
                renewed = Some(false);
                *cur = Some(next);
                true
            }
        });
        match renewed {
            Some(true) => Counters::bump(&inner.counters.renewals),
            Some(false) => {
                Counters::bump(&inner.counters.acquisitions);
                tracing::info!(lease = %inner.cfg.name, holder = %inner.cfg.holder, %token, "lease acquired");
            }
            None => {}
        }
    }

    fn record_other(&self, before: Instant) {
        let inner = &self.inner;
        let mut lost = None;
        inner.state.send_if_modified(|cur| match cur {
            Some(c) if c.acquired_at <= before => {
                lost = Some(c.token);
                *cur = None;
                true
            }
            _ => false,
        });
        if let Some(token) = lost {
            Counters::bump(&inner.counters.losses);
            tracing::warn!(lease = %inner.cfg.name, holder = %inner.cfg.holder, %token, "lease lost: another instance holds it");
        }
    }

    /// Our token while the local view of the lease is valid: the last acquisition or renewal
    /// started (locally) less than `ttl` ago. Only the fenced check in the database is
    /// authoritative ([`Lease::fenced`]).
    pub fn held(&self) -> Option<Token> {
        let now = Instant::now();
        let cur = *self.inner.state.borrow();
        cur.filter(|a| a.valid_until > now).map(|a| a.token)
    }

    /// Our last acquisition or renewal, as it changes (`None` after a loss or a release). It is
    /// not cleared when it merely lapses: compare `valid_until` with the clock.
    pub fn watch(&self) -> watch::Receiver<Option<Acquired>> {
        self.inner.state.subscribe()
    }

    /// The counters.
    pub fn stats(&self) -> LeaseStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LeaseStats {
            acquisitions: get(&c.acquisitions),
            renewals: get(&c.renewals),
            losses: get(&c.losses),
            acquire_errors: get(&c.acquire_errors),
            fenced: get(&c.fenced),
            job_runs: get(&c.job_runs),
            job_errors: get(&c.job_errors),
        }
    }

    /// Who holds the lease now, as the database says (`None`: never acquired). An expired lease
    /// is returned with `expired: true`.
    pub async fn holder(&self) -> Result<Option<LeaseInfo>, LeaseError> {
        let name = self.inner.cfg.name.clone();
        let opts = WriteOptions::new(self.inner.cfg.timeout).idempotent();
        let info = self
            .inner
            .db
            .write_with(opts, move |c| {
                let name = name.clone();
                Box::pin(async move {
                    let row: Option<Row> = c.exec_first(INFO_SQL, (name,)).await?;
                    row.map(|row| {
                        let (holder, token, expires_at, remaining): (String, u64, String, i64) =
                            decode(row)?;
                        Ok(LeaseInfo {
                            holder,
                            token: Token(token),
                            expires_at,
                            expired: remaining <= 0,
                            remaining: Duration::from_micros(u64::try_from(remaining).unwrap_or(0)),
                        })
                    })
                    .transpose()
                })
            })
            .await?;
        Ok(info)
    }

    /// Gives the lease up (graceful shutdown): our local view ends at once and the row expires
    /// now, if it is still ours with our last token, so another instance takes over at its next
    /// try. On an error the lease simply lapses after `ttl`.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let inner = &self.inner;
        let mut last = None;
        inner.state.send_if_modified(|cur| {
            last = cur.take().map(|a| a.token);
            last.is_some()
        });
        let Some(token) = last else {
            return Ok(());
        };
        let name = inner.cfg.name.clone();
        let holder = inner.cfg.holder.clone();
        let opts = WriteOptions::new(inner.cfg.timeout).idempotent();
        let released = inner
            .db
            .write_with(opts, move |c| {
                let (name, holder) = (name.clone(), holder.clone());
                Box::pin(async move {
                    c.exec_drop(RELEASE_SQL, (name, holder, token.0)).await?;
                    Ok(c.affected_rows())
                })
            })
            .await?;
        tracing::info!(lease = %inner.cfg.name, holder = %inner.cfg.holder, %token, released = released > 0, "lease released");
        Ok(())
    }

    /// Runs `f` in a transaction on the primary that first locks the lease row and checks that
    /// `token` is the lease's current token and the lease has not expired (by the database's
    /// clock); then commits. Otherwise it rolls back and returns [`LeaseError::Fenced`] without
    /// running `f`. Every write of the job goes through here with the token of [`Lease::held`].
    ///
    /// The whole call is bounded by the lease's `timeout`. When `f` fails, the transaction is
    /// rolled back and the driver's error returned as [`LeaseError::Db`]
    /// ([`HaError::Backend`]); the deadline passing before the `COMMIT` is
    /// [`HaError::DeadlineExceeded`] (nothing was committed); a broken connection or the
    /// deadline during the `COMMIT` is [`HaError::OutcomeUnknown`]. Not retried.
    ///
    /// ```no_run
    /// # async fn demo(lease: membership_service::lease::Lease) -> Result<(), membership_service::lease::LeaseError> {
    /// use ha_mysql::mysql_async::prelude::Queryable;
    /// let Some(token) = lease.held() else { return Ok(()) };
    /// let n = lease
    ///     .fenced(token, async |tx| {
    ///         tx.exec_drop("UPDATE members SET level = 'gold' WHERE id = ?", (7,)).await?;
    ///         Ok(tx.affected_rows())
    ///     })
    ///     .await?;
    /// # let _ = n; Ok(()) }
    /// ```
    pub async fn fenced<T, F>(&self, token: Token, f: F) -> Result<T, LeaseError>
    where
        F: AsyncFnOnce(&mut Transaction<'_>) -> Result<T, mysql_async::Error>,
    {
        let inner = &self.inner;
        let budget = inner.cfg.timeout;
        let deadline = Instant::now() + budget;
        let not_sent = || {
            LeaseError::Db(HaError::DeadlineExceeded {
                deadline: budget,
                attempts: 1,
                maybe_sent: false,
            })
        };
        let mut w = match tokio::time::timeout_at(deadline, inner.db.writer()).await {
            Err(_) => return Err(not_sent()),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(w)) => w,
        };
        let endpoint = w.addr();
        let mut progress = Progress::default();
        w.begin_statement();
        let ran = tokio::time::timeout_at(
            deadline,
            fenced_txn(
                &mut w,
                &inner.cfg.name,
                token,
                inner.idle_guard_secs,
                &mut progress,
                f,
            ),
        )
        .await;
        let err = match ran {
            // The connection stays marked in flight: the pool closes it, and the server rolls
            // back what was not committed.
            Err(elapsed) => {
                return Err(if progress.committing {
                    LeaseError::Db(HaError::OutcomeUnknown {
                        endpoint: Some(endpoint),
                        source: Box::new(elapsed),
                    })
                } else {
                    not_sent()
                });
            }
            Ok(Ok(Ok(v))) => {
                w.end_statement();
                return Ok(v);
            }
            Ok(Ok(Err(fenced))) => {
                w.end_statement();
                Counters::bump(&inner.counters.fenced);
                tracing::warn!(lease = %inner.cfg.name, holder = %inner.cfg.holder, error = %fenced, "fenced write refused");
                return Err(fenced);
            }
            Ok(Err(e)) => e,
        };
        w.end_statement();
        let class = classify_mysql(&err);
        if progress.broken || err.is_fatal() || class.is_endpoint_failure() {
            w.mark_broken();
        }
        inner.db.report(&err);
        if progress.committing && class == ErrorClass::MaybeSent {
            return Err(LeaseError::Db(HaError::OutcomeUnknown {
                endpoint: Some(endpoint),
                source: Box::new(err),
            }));
        }
        Err(LeaseError::Db(HaError::backend(err)))
    }
}

/// How far a fenced transaction got.
#[derive(Default)]
struct Progress {
    /// The `COMMIT` was (about to be) sent: a failure from here on leaves the outcome unknown.
    committing: bool,
    /// The session may be left in a state the pool must not reuse.
    broken: bool,
}

/// One acquire-or-renew transaction.
async fn acquire_txn(
    c: &mut Conn,
    name: String,
    holder: String,
    ttl_micros: u64,
) -> Result<Acquire, mysql_async::Error> {
    let mut tx = c.start_transaction(TxOpts::default()).await?;
    tx.exec_drop(
        ACQUIRE_SQL,
        (
            holder.clone(),
            holder.clone(),
            ttl_micros,
            name.clone(),
            holder.clone(),
        ),
    )
    .await?;
    let row: Option<Row> = tx
        .exec_first(STATE_SQL, (holder.clone(), name.clone()))
        .await?;
    let got = match row {
        Some(row) => {
            let (ours, token): (i64, u64) = decode(row)?;
            if ours != 0 {
                Acquire::Ours(Token(token))
            } else {
                Acquire::Other
            }
        }
        None => {
            // The first acquisition of this name; a concurrent first one wins the insert.
            tx.exec_drop(INSERT_SQL, (name, holder, ttl_micros)).await?;
            if tx.affected_rows() == 1 {
                Acquire::Ours(Token(1))
            } else {
                Acquire::Other
            }
        }
    };
    tx.commit().await?;
    Ok(got)
}

/// The fenced transaction: guard, lock and check the lease row, run `f`, commit. The outer
/// `Result` is the driver's, the inner one the fencing verdict.
async fn fenced_txn<T, F>(
    c: &mut Conn,
    name: &str,
    token: Token,
    idle_guard_secs: u64,
    progress: &mut Progress,
    f: F,
) -> Result<Result<T, LeaseError>, mysql_async::Error>
where
    F: AsyncFnOnce(&mut Transaction<'_>) -> Result<T, mysql_async::Error>,
{
    // A holder frozen inside the transaction (its own deadline cannot fire) would keep the row
    // locked: MariaDB kills a session idle in a transaction for longer than this. The setting
    // is reset below; a session where that fails is not reused.
    let guarded = match c
        .exec_drop(
            "SET SESSION idle_transaction_timeout = ?",
            (idle_guard_secs,),
        )
        .await
    {
        Ok(()) => true,
        Err(mysql_async::Error::Server(s)) if s.code == ER_UNKNOWN_SYSTEM_VARIABLE => false,
        Err(e) => return Err(e),
    };
    progress.broken = guarded;
    let verdict = fenced_body(c, name, token, progress, f).await?;
    if guarded {
        c.query_drop("SET SESSION idle_transaction_timeout = DEFAULT")
            .await?;
        progress.broken = false;
    }
    Ok(verdict)
}

async fn fenced_body<T, F>(
    c: &mut Conn,
    name: &str,
    token: Token,
    progress: &mut Progress,
    f: F,
) -> Result<Result<T, LeaseError>, mysql_async::Error>
where
    F: AsyncFnOnce(&mut Transaction<'_>) -> Result<T, mysql_async::Error>,
{
    let mut tx = c.start_transaction(TxOpts::default()).await?;
    let row: Option<Row> = tx.exec_first(FENCE_SQL, (name,)).await?;
    let (current, valid) = match row {
        Some(row) => {
            let (t, valid): (u64, i64) = decode(row)?;
            (Some(Token(t)), valid != 0)
        }
        None => (None, false),
    };
    if current != Some(token) || !valid {
        tx.rollback().await?;
        return Ok(Err(LeaseError::Fenced {
            held_token: token,
            current_token: current,
            expired: current == Some(token) && !valid,
        }));
    }
    let v = match f(&mut tx).await {
        Ok(v) => v,
        Err(e) => {
            if tx.rollback().await.is_err() {
                progress.broken = true;
            }
            return Err(e);
        }
    };
    progress.committing = true;
    tx.commit().await?;
    Ok(Ok(v))
}

/// A row as `T`, a conversion failure as the driver's error (never a panic).
fn decode<T: mysql_async::prelude::FromRow>(row: Row) -> Result<T, mysql_async::Error> {
    mysql_async::from_row_opt(row)
        .map_err(|e| mysql_async::Error::Driver(DriverError::FromRow { row: e.0 }))
}

/// The expiry job: marks up to [`EXPIRE_BATCH`] members whose `expires_at` passed (by the
/// database's UTC clock; not deleted, not yet expired) as expired and bumps their version, in
/// one transaction fenced by `token`. Returns `(id, new version)` of every row it changed.
pub async fn expire_members(lease: &Lease, token: Token) -> Result<Vec<(u64, u64)>, LeaseError> {
    lease
        .fenced(token, async |tx| {
            let rows: Vec<Row> = tx.exec(EXPIRED_MEMBERS_SQL, ()).await?;
            let mut changed = Vec::with_capacity(rows.len());
            for row in rows {
                let (id, version): (u64, u64) = decode(row)?;
                changed.push((id, version.saturating_add(1)));
            }
            if changed.is_empty() {
                return Ok(changed);
            }
            let marks = vec!["?"; changed.len()].join(", ");
            let ids: Vec<Value> = changed.iter().map(|(id, _)| Value::from(*id)).collect();
            // The rows are locked since the SELECT: updating them by id changes exactly them.
            tx.exec_drop(
                format!(
                    "UPDATE members SET expired = 1, version = version + 1 WHERE id IN ({marks})"
                ),
                ids,
            )
            .await?;
            Ok(changed)
        })
        .await
}

/// Aborts the renewal task when [`run`]'s future is dropped before its shutdown.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The scheduler's loop: renews (or tries to acquire) the lease every `renew_every` in its own
/// task, and every `interval` runs `job(token)` if the lease is held (the job does its writes
/// with [`Lease::fenced`]`(token, ..)`). Errors are logged and counted ([`Lease::stats`]) and
/// the loop goes on. When `shutdown` completes, a running job gets up to the lease's `timeout`
/// to finish, renewals stop and the lease is released; then it returns. Fails at once only for
/// a zero `interval` ([`LeaseConfigError::ZeroInterval`]).
///
/// Dropping the future instead stops the renewals without releasing (the lease lapses).
pub async fn run<F, Fut, S>(
    lease: Lease,
    interval: Duration,
    shutdown: S,
    mut job: F,
) -> Result<(), LeaseError>
where
    S: Future<Output = ()>,
    F: FnMut(Token) -> Fut,
    Fut: Future<Output = Result<(), LeaseError>>,
{
    if interval.is_zero() {
        return Err(LeaseConfigError::ZeroInterval.into());
    }
    let (stop, stopped) = watch::channel(false);
    let renewer = tokio::spawn(renew_loop(lease.clone(), stopped));
    let _abort = AbortOnDrop(renewer.abort_handle());
    let grace = lease.config().timeout;
    let name = lease.config().name.clone();
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut wake = lease.watch();
    let mut seen: Option<Token> = None;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // A new token runs the job at once rather than at the next tick (a renewal does
            // not).
            changed = wake.changed() => {
                if changed.is_err() {
                    continue;
                }
                let token = wake.borrow_and_update().map(|a| a.token);
                let fresh = token.is_some() && token != seen;
                seen = token;
                if !fresh {
                    continue;
                }
            }
            _ = ticks.tick() => {}
        }
        let Some(token) = lease.held() else {
            continue;
        };
        ticks.reset();
        Counters::bump(&lease.inner.counters.job_runs);
        let running = job(token);
        tokio::pin!(running);
        let mut stopping = false;
        let outcome = tokio::select! {
            biased;
            r = &mut running => Some(r),
            () = &mut shutdown => {
                stopping = true;
                tokio::time::timeout(grace, &mut running).await.ok()
            }
        };
        match outcome {
            Some(Ok(())) => {}
            Some(Err(e)) if e.is_fenced() => {
                tracing::info!(lease = %name, %token, error = %e, "job fenced: the lease moved on");
            }
            Some(Err(e)) => {
                Counters::bump(&lease.inner.counters.job_errors);
                tracing::error!(lease = %name, %token, error = %e, "job failed");
            }
            None => {
                Counters::bump(&lease.inner.counters.job_errors);
                tracing::warn!(lease = %name, %token, ?grace, "job still running at shutdown: abandoned");
            }
        }
        if stopping {
            break;
        }
    }
    let _ = stop.send(true);
    // A renewal under way is bounded by the timeout; wait for it so that release sees its
    // result, and do not wait longer.
    let mut renewer = renewer;
    if tokio::time::timeout(grace + Duration::from_millis(100), &mut renewer)
        .await
        .is_err()
    {
        renewer.abort();
    }
    if let Err(e) = lease.release().await {
        tracing::warn!(lease = %name, error = %e, "release at shutdown failed: the lease lapses after its ttl");
    }
    Ok(())
}

async fn renew_loop(lease: Lease, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(lease.config().renew_every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return,
            _ = ticks.tick() => {}
        }
        match lease.try_acquire().await {
            Ok(_) => {
                if failing {
                    tracing::info!(lease = %lease.config().name, "lease renewals work again");
                }
                failing = false;
            }
            Err(e) => {
                failing = true;
                tracing::warn!(lease = %lease.config().name, holder = %lease.config().holder, error = %e, held = ?lease.held(), "lease renewal failed");
            }
        }
    }
}
