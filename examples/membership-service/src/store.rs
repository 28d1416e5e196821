//! Members: MySQL is the record (through ha-mysql), Redis the cache (through ha-redis), RocketMQ
//! carries `member.updated` (through ha-mq), and the service's own consumer writes the history.
//!
//! Read-your-writes across the whole service, not per session: every PUT, before its 200,
//!
//! 1. commits the member with `version = version + 1` on the verified primary and reads the
//!    transaction's GTID (`@@last_gtid`); a commit that a semi-synchronous primary made without
//!    a replica's acknowledgement (it had fallen back to asynchronous: cut off from its
//!    replicas) is not acknowledged (503, the outcome unknown);
//! 2. writes `"<version>|<json>"` to Redis with a script that never replaces a newer version,
//!    and raises the watermark `ms:gtid` (the highest acknowledged GTID) in the same script, with
//!    a durable acknowledgement (`WAIT 1`): a Sentinel failover promotes the replica with the
//!    most data, so the entry survives it;
//! 3. publishes `member.updated` (key `member-<id>-v<version>`) through the producer, which
//!    fails over between the IDCs' clusters.
//!
//! A GET reads Redis: an entry (or a tombstone) is at least as new as every acknowledged
//! version. On a miss it reads a replica that has applied the watermark (`MASTER_GTID_WAIT`),
//! else the primary; without Redis it reads the primary. Either way it sees every version a
//! client was answered 200 for.

use std::sync::Arc;
use std::time::Duration;

use ha_core::HaError;
use ha_mq::{HaProducer, MqError, OutgoingMessage};
use ha_mysql::mysql_async::prelude::Queryable;
use ha_mysql::mysql_async::{self, TxOpts};
use ha_mysql::{HaMysql, ReadConn};
use ha_redis::HaRedis;
use ha_redis::redis;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::model::{Level, Member, MemberInput};

/// The tables.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS members (
      id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
      name VARCHAR(255) NOT NULL,
      level VARCHAR(16) NOT NULL,
      expires_at DATETIME(6) NOT NULL,
      version BIGINT UNSIGNED NOT NULL,
      deleted TINYINT(1) NOT NULL DEFAULT 0,
      expired TINYINT(1) NOT NULL DEFAULT 0,
      KEY expiry (expired, deleted, expires_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS member_history (
      id BIGINT UNSIGNED NOT NULL,
      version BIGINT UNSIGNED NOT NULL,
      kind VARCHAR(16) NOT NULL,
      PRIMARY KEY (id, version)
    ) ENGINE=InnoDB",
];

/// How long a cache entry lives (a miss then reads MySQL again).
const CACHE_TTL_SECS: u64 = 3600;

/// Sets `KEYS[1]` to `ARGV[2]` unless it holds a version `>= ARGV[1]`; raises `KEYS[2]` (the
/// GTID watermark, `domain-server-seq`) to `ARGV[3]` when its sequence number is higher.
const CACHE_SET: &str = r#"
local cur = redis.call('GET', KEYS[1])
local set = 1
if cur then
  local v = tonumber(string.match(cur, '^(%d+)|'))
  if v and v >= tonumber(ARGV[1]) then set = 0 end
end
if set == 1 then redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[4]) end
if ARGV[3] ~= '' then
  local w = redis.call('GET', KEYS[2])
  local new = tonumber(string.match(ARGV[3], '(%d+)$'))
  local old = w and tonumber(string.match(w, '(%d+)$'))
  if new and (not old or new > old) then redis.call('SET', KEYS[2], ARGV[3]) end
end
return set
"#;

/// The watermark key.
const WATERMARK: &str = "ms:gtid";

/// What went wrong in a store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A dependency failed or timed out (the outcome of a write may be unknown: the caller
    /// retries the PUT, which only raises the version).
    #[error("{dependency}: {source}")]
    Unavailable {
        /// `mysql`, `redis` or `events`.
        dependency: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored row could not be read back (a bug or a hand-edited row).
    #[error("corrupt row for member {id}: {why}")]
    Corrupt {
        /// The member.
        id: u64,
        /// What was wrong.
        why: String,
    },
}

impl StoreError {
    fn mysql(e: HaError) -> StoreError {
        StoreError::Unavailable {
            dependency: "mysql",
            source: Box::new(e),
        }
    }
    fn redis(e: HaError) -> StoreError {
        StoreError::Unavailable {
            dependency: "redis",
            source: Box::new(e),
        }
    }
    fn events(e: MqError) -> StoreError {
        StoreError::Unavailable {
            dependency: "events",
            source: Box::new(e),
        }
    }
}

/// Refuses a commit that a semi-synchronous primary made without any replica's
/// acknowledgement. After `rpl_semi_sync_master_timeout` MariaDB (and MySQL) commit anyway,
/// asynchronously, and switch semi-sync off until a replica catches up: a primary cut off from
/// its replicas (a partition of its IDC, while the HA promotes on the other side) keeps such a
/// row alone, and it is gone once that node is fenced. The demo's `partition-bj-a` saw it:
/// history rows written by the cut-off bj-a instance during the cut were only on the fenced
/// old primary. Checked after the statement, on its connection: semi-sync enabled on the node
/// and off now means not replicated (a false alarm, semi-sync switched off by a later commit,
/// only costs a retry of the idempotent write). Nothing is checked where semi-synchronous
/// replication is not configured.
async fn replicated(c: &mut mysql_async::Conn) -> mysql_async::Result<()> {
    if replicated_now(c).await? {
        return Ok(());
    }
    Err(mysql_async::Error::Other(NOT_REPLICATED.into()))
}

/// Why a commit made without a replica's acknowledgement is not acknowledged.
const NOT_REPLICATED: &str = "committed without a semi-synchronous replica's acknowledgement (rpl_semi_sync_master_status OFF): not durable, to be written again";

/// False when the node runs semi-synchronous replication and has fallen back to asynchronous
/// ([`replicated`]).
async fn replicated_now(c: &mut mysql_async::Conn) -> mysql_async::Result<bool> {
    let enabled: Option<(String, String)> = c
        .query_first("SHOW GLOBAL VARIABLES LIKE 'rpl_semi_sync_master_enabled'")
        .await?;
    if !enabled.is_some_and(|(_, v)| v.eq_ignore_ascii_case("ON")) {
        return Ok(true);
    }
    let status: Option<(String, String)> = c
        .query_first("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_status'")
        .await?;
    Ok(!status.is_some_and(|(_, v)| v.eq_ignore_ascii_case("OFF")))
}

/// A member change committed by a primary that had fallen back to asynchronous replication
/// (a cut-off primary after `rpl_semi_sync_master_timeout`): it may exist on that node alone,
/// so it is not acknowledged; its outcome is unknown to the caller, who may write again.
fn not_replicated() -> StoreError {
    StoreError::mysql(HaError::OutcomeUnknown {
        endpoint: None,
        source: NOT_REPLICATED.into(),
    })
}

/// A member event, as published on the topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEvent {
    /// `member.updated`, `member.deleted` or `member.expired`.
    pub kind: String,
    /// The member.
    pub id: u64,
    /// Its version after the change.
    pub version: u64,
}

/// The cache entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Cached {
    Live(Member),
    Deleted,
}

/// Where a GET was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis.
    Cache,
    /// A MySQL replica.
    Replica,
    /// The MySQL primary.
    Primary,
}

impl Source {
    /// As a label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Replica => "replica",
            Source::Primary => "primary",
        }
    }
}

/// The members store.
#[derive(Clone)]
pub struct Store {
    db: HaMysql,
    cache: HaRedis,
    events: Arc<HaProducer>,
    topic: Arc<str>,
    write_timeout: Duration,
    read_timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("topic", &self.topic).finish()
    }
}

type Row = (String, String, String, u64, bool, bool);

const SELECT_MEMBER: &str = "SELECT name, level, DATE_FORMAT(expires_at, '%Y-%m-%dT%H:%i:%s.%fZ'), \
     version, deleted, expired FROM members WHERE id = ?";

fn member_of(id: u64, row: Row) -> Result<Option<Member>, StoreError> {
    let (name, level, expires_at, version, deleted, expired) = row;
    if deleted {
        return Ok(None);
    }
    let level = Level::parse(&level).ok_or_else(|| StoreError::Corrupt {
        id,
        why: format!("level {level:?}"),
    })?;
    Ok(Some(Member {
        id,
        name,
        level,
        expires_at,
        version,
        expired,
    }))
}

impl Store {
    /// A store over the three clients.
    pub fn new(
        db: HaMysql,
        cache: HaRedis,
        events: Arc<HaProducer>,
        topic: &str,
        write_timeout: Duration,
        read_timeout: Duration,
    ) -> Store {
        Store {
            db,
            cache,
            events,
            topic: topic.into(),
            write_timeout,
            read_timeout,
        }
    }

    /// Creates the tables when missing.
    pub async fn ensure_schema(db: &HaMysql, timeout: Duration) -> Result<(), HaError> {
        for stmt in SCHEMA {
            db.write_with(ha_mysql::WriteOptions::new(timeout).idempotent(), |c| {
                Box::pin(async move { c.query_drop(*stmt).await })
            })
            .await?;
        }
        Ok(())
    }

    /// The MySQL client.
    pub fn db(&self) -> &HaMysql {
        &self.db
    }

    /// The Redis client.
    pub fn cache(&self) -> &HaRedis {
        &self.cache
    }

    /// The producer.
    pub fn events(&self) -> &HaProducer {
        &self.events
    }

    /// Creates or replaces member `id`; returns it with its new version.
    pub async fn put(&self, id: u64, input: &MemberInput) -> Result<Member, StoreError> {
        let deadline = Instant::now() + self.write_timeout;
        let (version, gtid) = Store::commit_put(&self.db, id, input, left(deadline)).await?;
        let member = Member {
            id,
            name: input.name.clone(),
            level: input.level,
            expires_at: input.expires_at.clone(),
            version,
            expired: false,
        };
        self.cache_set(
            id,
            version,
            &Cached::Live(member.clone()),
            &gtid,
            true,
            deadline,
        )
        .await?;
        self.publish("member.updated", id, version, deadline)
            .await?;
        Ok(member)
    }

    /// The MySQL step of [`Store::put`]: commits member `id` with `version = version + 1`
    /// on the verified primary, within `timeout`; its version and the transaction's GTID. A
    /// commit that a semi-synchronous primary made without a replica's acknowledgement is
    /// refused as [`HaError::OutcomeUnknown`] (in a [`StoreError::Unavailable`]): it may exist
    /// on that node alone.
    pub async fn commit_put(
        db: &HaMysql,
        id: u64,
        input: &MemberInput,
        timeout: Duration,
    ) -> Result<(u64, String), StoreError> {
        let name = input.name.clone();
        let level = input.level.as_str();
        let expires = input.expires_at_sql.clone();
        let (version, gtid, replicated) = db
            .write(timeout, |c| {
                let name = name.clone();
                let expires = expires.clone();
                Box::pin(async move {
                    let mut tx = c.start_transaction(TxOpts::default()).await?;
                    tx.exec_drop(
                        "INSERT INTO members (id, name, level, expires_at, version) \
                         VALUES (?, ?, ?, ?, 1) ON DUPLICATE KEY UPDATE \
                         name = VALUES(name), level = VALUES(level), \
                         expires_at = VALUES(expires_at), version = version + 1, \
                         deleted = 0, expired = 0",
                        (id, &name, level, &expires),
                    )
                    .await?;
                    let version: Option<u64> = tx
                        .exec_first("SELECT version FROM members WHERE id = ?", (id,))
                        .await?;
                    tx.commit().await?;
                    let gtid = ha_mysql::last_gtid(c).await?;
                    let replicated = replicated_now(c).await?;
                    Ok((version.unwrap_or(0), gtid, replicated))
                })
            })
            .await
            .map_err(StoreError::mysql)?;
        if !replicated {
            return Err(not_replicated());
        }
        Ok((version, gtid))
    }

    /// Marks member `id` deleted (a tombstone keeps its version, so versions are never
    /// reused). `Ok(false)` when it was never written.
    pub async fn delete(&self, id: u64) -> Result<bool, StoreError> {
        let deadline = Instant::now() + self.write_timeout;
        let got = self
            .db
            .write(left(deadline), |c| {
                Box::pin(async move {
                    let mut tx = c.start_transaction(TxOpts::default()).await?;
                    let row: Option<(u64, bool)> = tx
                        .exec_first(
                            "SELECT version, deleted FROM members WHERE id = ? FOR UPDATE",
                            (id,),
                        )
                        .await?;
                    let out = match row {
                        None => None,
                        Some((v, true)) => Some((v, false)),
                        Some((v, false)) => {
                            tx.exec_drop(
                                "UPDATE members SET deleted = 1, version = version + 1 WHERE id = ?",
                                (id,),
                            )
                            .await?;
                            Some((v + 1, true))
                        }
                    };
                    tx.commit().await?;
                    let gtid = ha_mysql::last_gtid(c).await?;
                    let replicated = out.is_none() || replicated_now(c).await?;
                    Ok(out.map(|(v, changed)| (v, changed, gtid, replicated)))
                })
            })
            .await
            .map_err(StoreError::mysql)?;
        let Some((version, changed, gtid, replicated)) = got else {
            return Ok(false);
        };
        if !replicated {
            return Err(not_replicated());
        }
        // Also when it was already deleted: the tombstone may be what a failover lost.
        self.cache_set(id, version, &Cached::Deleted, &gtid, true, deadline)
            .await?;
        if changed {
            self.publish("member.deleted", id, version, deadline)
                .await?;
        }
        Ok(true)
    }

    /// Member `id` and where it was read from; `None` when absent or deleted.
    pub async fn get(&self, id: u64) -> Result<(Option<Member>, Source), StoreError> {
        let key = format!("m:{id}");
        let cached: Result<(Option<String>, Option<String>), HaError> = self
            .cache
            .master()
            .with_timeout(self.read_timeout / 3)
            .query(redis::cmd("MGET").arg(&key).arg(WATERMARK))
            .await;
        let watermark = match cached {
            Ok((Some(entry), _)) => {
                if let Some(member) = parse_entry(id, &entry) {
                    return Ok((member, Source::Cache));
                }
                tracing::warn!(id, "unreadable cache entry: reading MySQL");
                None
            }
            Ok((None, watermark)) => watermark,
            Err(e) => {
                tracing::debug!(error = %e, "redis unavailable for a read: the primary");
                None
            }
        };
        // A replica that applied the watermark, else the primary (also when no watermark is
        // known: nothing says which replica is recent enough).
        let mut conn = match &watermark {
            Some(gtid) => self.db.reader_after(gtid).await,
            None => self.db.writer().await.map(ReadConn::Primary),
        }
        .map_err(StoreError::mysql)?;
        let source = if conn.is_replica() {
            Source::Replica
        } else {
            Source::Primary
        };
        let row = tokio::time::timeout(
            self.read_timeout,
            conn.exec_first::<Row, _, _>(SELECT_MEMBER, (id,)),
        )
        .await;
        let row = match row {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => return Err(StoreError::mysql(HaError::backend(e))),
            Err(elapsed) => {
                return Err(StoreError::Unavailable {
                    dependency: "mysql",
                    source: Box::new(elapsed),
                });
            }
        };
        let Some(row) = row else {
            return Ok((None, source));
        };
        let version = row.3;
        let member = member_of(id, row)?;
        let entry = match &member {
            Some(m) => Cached::Live(m.clone()),
            None => Cached::Deleted,
        };
        // A fill: best effort, never replacing a newer version.
        let fill_by = Instant::now() + self.read_timeout / 3;
        if let Err(e) = self
            .cache_set(id, version, &entry, "", false, fill_by)
            .await
        {
            tracing::debug!(id, error = %e, "cache fill failed");
        }
        Ok((member, source))
    }

    /// The versions the history consumer has recorded for `id`; `None` for an id never
    /// written.
    pub async fn history(&self, id: u64) -> Result<Option<Vec<u64>>, StoreError> {
        let mut conn = self.db.writer().await.map_err(StoreError::mysql)?;
        let read = tokio::time::timeout(self.read_timeout, async {
            let exists: Option<u64> = conn
                .exec_first("SELECT version FROM members WHERE id = ?", (id,))
                .await?;
            let versions: Vec<u64> = conn
                .exec(
                    "SELECT version FROM member_history WHERE id = ? ORDER BY version",
                    (id,),
                )
                .await?;
            Ok::<_, mysql_async::Error>((exists, versions))
        })
        .await;
        match read {
            Ok(Ok((None, v))) if v.is_empty() => Ok(None),
            Ok(Ok((_, v))) => Ok(Some(v)),
            Ok(Err(e)) => Err(StoreError::mysql(HaError::backend(e))),
            Err(elapsed) => Err(StoreError::Unavailable {
                dependency: "mysql",
                source: Box::new(elapsed),
            }),
        }
    }

    /// Records one event in the history (the consumer's handler; idempotent).
    pub async fn record(
        db: &HaMysql,
        event: &MemberEvent,
        timeout: Duration,
    ) -> Result<(), HaError> {
        let (id, version, kind) = (event.id, event.version, event.kind.clone());
        db.write_with(ha_mysql::WriteOptions::new(timeout).idempotent(), |c| {
            let kind = kind.clone();
            Box::pin(async move {
                c.exec_drop(
                    "INSERT IGNORE INTO member_history (id, version, kind) VALUES (?, ?, ?)",
                    (id, version, kind),
                )
                .await?;
                replicated(c).await
            })
        })
        .await
    }

    /// Brings the cache and the event stream up to date after the expiry job changed
    /// `(id, version)` pairs (the rows are read back from the primary).
    pub async fn expired(&self, changed: &[(u64, u64)]) -> Result<(), StoreError> {
        for &(id, version) in changed {
            let deadline = Instant::now() + self.write_timeout;
            let mut conn = self.db.writer().await.map_err(StoreError::mysql)?;
            let row = conn
                .exec_first::<Row, _, _>(SELECT_MEMBER, (id,))
                .await
                .map_err(|e| StoreError::mysql(HaError::backend(e)))?;
            drop(conn);
            if let Some(row) = row {
                let v = row.3;
                if let Some(m) = member_of(id, row)? {
                    self.cache_set(id, v, &Cached::Live(m), "", true, deadline)
                        .await?;
                }
            }
            self.publish("member.expired", id, version, deadline)
                .await?;
        }
        Ok(())
    }

    async fn cache_set(
        &self,
        id: u64,
        version: u64,
        entry: &Cached,
        gtid: &str,
        durable: bool,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(entry).map_err(|e| StoreError::Corrupt {
            id,
            why: e.to_string(),
        })?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CACHE_SET)
            .arg(2)
            .arg(format!("m:{id}"))
            .arg(WATERMARK)
            .arg(version)
            .arg(json)
            .arg(gtid)
            .arg(CACHE_TTL_SECS);
        // The script is idempotent (it never lowers a version), so a write whose outcome is
        // unknown (a connection lost after sending, or `WAIT` not reached while the replicas
        // reattach to a new master after a failover) is simply sent again within the deadline.
        loop {
            let mut handle = self
                .cache
                .master()
                .with_timeout(left(deadline))
                .idempotent();
            if durable {
                handle = handle.durable(1, Duration::from_millis(500));
            }
            match handle.query::<i64>(&cmd).await {
                Ok(_) => return Ok(()),
                Err(e @ HaError::OutcomeUnknown { .. })
                    if Instant::now() + Duration::from_millis(100) < deadline =>
                {
                    tracing::debug!(id, error = %e, "cache write unconfirmed: sending it again");
                    metrics::counter!("membership_cache_write_retries_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(StoreError::redis(e)),
            }
        }
    }

    async fn publish(
        &self,
        kind: &str,
        id: u64,
        version: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let event = MemberEvent {
            kind: kind.into(),
            id,
            version,
        };
        let body = serde_json::to_vec(&event).map_err(|e| StoreError::Corrupt {
            id,
            why: e.to_string(),
        })?;
        let msg = OutgoingMessage::new(&*self.topic, body)
            .key(format!("member-{id}-v{version}"))
            .tags(kind);
        self.events
            .send_within(msg, left(deadline))
            .await
            .map(|_| ())
            .map_err(StoreError::events)
    }
}

/// The time left until `deadline` (at least 1 ms: a zero budget would mean "no bound" to
/// some clients).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn parse_entry(id: u64, entry: &str) -> Option<Option<Member>> {
    let (_, json) = entry.split_once('|')?;
    match serde_json::from_str::<Cached>(json).ok()? {
        Cached::Live(m) if m.id == id => Some(Some(m)),
        Cached::Live(_) => None,
        Cached::Deleted => Some(None),
    }
}
