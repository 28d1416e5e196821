#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
//! The job lease against a real MariaDB (ha-lab's primary `bj-a`; its replicas are unused):
//! one holder at a time, renewals keep the token, a holder that stops renewing is taken over
//! with token + 1 and its fenced writes are refused without effect, the expiry job, release,
//! the `run` loop, a holder stalled inside a fenced transaction, typed configuration errors.
//!
//! One lab at a time on the machine (`serial`); every wait is bounded (`WAIT`) and polls a
//! condition; nothing asserts a timing threshold.

use std::sync::Arc;
use std::time::Duration;

use ha_lab::mariadb::{APP_PASSWORD, APP_USER, MariaDbLab, MariaDbLabOptions};
use ha_mysql::HaMysql;
use ha_mysql::mysql_async::Conn;
use ha_mysql::mysql_async::prelude::Queryable;
use membership_service::lease::{
    self, Lease, LeaseConfig, LeaseConfigError, LeaseError, LeaseStats, Token,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The address ha-mysql's lab tests bind too: one MariaDB lab at a time on the machine, also
/// across processes and packages; the OS releases it when the process ends.
const SERIAL_ADDR: &str = "127.0.9.1:47913";

/// Bound of any single wait.
const WAIT: Duration = Duration::from_secs(20);
/// The test database.
const DB: &str = "lease_test";
const TTL: Duration = Duration::from_secs(2);

const MEMBERS_DDL: &str = "CREATE TABLE IF NOT EXISTS members (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  level VARCHAR(16) NOT NULL,
  expires_at DATETIME(6) NOT NULL,
  version BIGINT UNSIGNED NOT NULL,
  deleted TINYINT(1) NOT NULL DEFAULT 0,
  expired TINYINT(1) NOT NULL DEFAULT 0
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

struct Env {
    _serial: (tokio::sync::MutexGuard<'static, ()>, std::net::TcpListener),
    lab: MariaDbLab,
    db: HaMysql,
}

impl Env {
    async fn admin(&self) -> Conn {
        let mut c = self.lab.admin_conn(&self.lab.primary()).await.unwrap();
        c.query_drop(format!("USE {DB}")).await.unwrap();
        c
    }

    fn lease(&self, holder: &str) -> Lease {
        self.lease_with(config(holder))
    }

    fn lease_with(&self, cfg: LeaseConfig) -> Lease {
        Lease::new(self.db.clone(), cfg).unwrap()
    }
}

async fn serial() -> (tokio::sync::MutexGuard<'static, ()>, std::net::TcpListener) {
    let guard = LOCK.lock().await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(l) = std::net::TcpListener::bind(SERIAL_ADDR) {
            return (guard, l);
        }
        assert!(
            Instant::now() < deadline,
            "another lab test held {SERIAL_ADDR} for 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lab, a fresh database with `job_lease` and `members`, and a client as the app user.
async fn env() -> Env {
    let serial = serial().await;
    let lab = tokio::time::timeout(
        Duration::from_secs(60),
        MariaDbLab::start(MariaDbLabOptions::default()),
    )
    .await
    .expect("lab start bounded")
    .expect("lab start");
    let primary = lab.primary();
    let mut admin = lab.admin_conn(&primary).await.unwrap();
    admin
        .query_drop(format!("CREATE DATABASE {DB}"))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "GRANT ALL PRIVILEGES ON {DB}.* TO '{APP_USER}'@'127.%'"
        ))
        .await
        .unwrap();
    let db = HaMysql::builder()
        .addrs([primary.addr])
        .user(APP_USER)
        .password(APP_PASSWORD)
        .database(DB)
        .timeout(Duration::from_secs(2))
        .startup_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    Lease::ensure_schema(&db).await.unwrap();
    // Twice: it is idempotent.
    Lease::ensure_schema(&db).await.unwrap();
    admin.query_drop(format!("USE {DB}")).await.unwrap();
    admin.query_drop(MEMBERS_DDL).await.unwrap();
    Env {
        _serial: serial,
        lab,
        db,
    }
}

fn config(holder: &str) -> LeaseConfig {
    LeaseConfig {
        renew_every: Duration::from_millis(300),
        timeout: Duration::from_secs(1),
        ..LeaseConfig::new("expire-members", holder, TTL)
    }
}

/// Polls `f` until it yields a value, at most `WAIT`.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `lease.try_acquire()` until it acquires (errors, e.g. a lock wait past the deadline,
/// count as "not yet").
async fn acquire_eventually(lease: &Lease) -> Token {
    eventually("acquire", async || match lease.try_acquire().await {
        Ok(t) => t,
        Err(e) => {
            println!("try_acquire: {e}");
            None
        }
    })
    .await
}

async fn member_row(admin: &mut Conn, id: u64) -> (String, u64, u8) {
    admin
        .exec_first(
            "SELECT name, version, expired FROM members WHERE id = ?",
            (id,),
        )
        .await
        .unwrap()
        .unwrap()
}

/// Inserts a member whose `expires_at` is `offset_secs` from the database's UTC now.
async fn insert_member(admin: &mut Conn, id: u64, offset_secs: i64, deleted: u8, expired: u8) {
    admin
        .exec_drop(
            "INSERT INTO members (id, name, level, expires_at, version, deleted, expired) \
             VALUES (?, ?, 'gold', UTC_TIMESTAMP(6) + INTERVAL ? SECOND, ?, ?, ?)",
            (id, format!("m{id}"), offset_secs, id * 10, deleted, expired),
        )
        .await
        .unwrap();
}

#[test]
fn config_errors_are_typed() {
    let ok = LeaseConfig::new("job", "a", TTL);
    assert_eq!(ok.renew_every, TTL / 3);
    assert_eq!(ok.validate(), Ok(()));
    let cases = [
        (
            LeaseConfig {
                name: String::new(),
                ..ok.clone()
            },
            LeaseConfigError::EmptyName,
        ),
        (
            LeaseConfig {
                name: "n".repeat(65),
                ..ok.clone()
            },
            LeaseConfigError::NameTooLong { chars: 65 },
        ),
        (
            LeaseConfig {
                holder: String::new(),
                ..ok.clone()
            },
            LeaseConfigError::EmptyHolder,
        ),
        (
            LeaseConfig {
                holder: "h".repeat(129),
                ..ok.clone()
            },
            LeaseConfigError::HolderTooLong { chars: 129 },
        ),
        (
            LeaseConfig::new("job", "a", Duration::ZERO),
            LeaseConfigError::ZeroTtl,
        ),
        (
            LeaseConfig::new("job", "a", Duration::from_secs(2 * 24 * 3600)),
            LeaseConfigError::TtlOutOfRange {
                ttl: Duration::from_secs(2 * 24 * 3600),
            },
        ),
        (
            LeaseConfig {
                renew_every: Duration::ZERO,
                ..ok.clone()
            },
            LeaseConfigError::ZeroRenewEvery,
        ),
        (
            LeaseConfig {
                renew_every: TTL,
                ..ok.clone()
            },
            LeaseConfigError::RenewNotBelowTtl {
                renew_every: TTL,
                ttl: TTL,
            },
        ),
        (
            LeaseConfig {
                timeout: Duration::ZERO,
                ..ok.clone()
            },
            LeaseConfigError::ZeroTimeout,
        ),
    ];
    for (cfg, want) in cases {
        assert_eq!(cfg.validate(), Err(want), "{cfg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_renewal_takeover_and_fencing() {
    let env = env().await;
    let mut admin = env.admin().await;
    insert_member(&mut admin, 1, 3600, 0, 0).await;

    // Lease::new validates too.
    let bad = Lease::new(
        env.db.clone(),
        LeaseConfig::new("expire-members", "a", Duration::ZERO),
    );
    assert!(matches!(
        bad,
        Err(LeaseError::Config(LeaseConfigError::ZeroTtl))
    ));

    let a = env.lease("a");
    let b = env.lease("b");
    assert_eq!(a.holder().await.unwrap(), None);

    // Only one acquires.
    let t1 = a
        .try_acquire()
        .await
        .unwrap()
        .expect("a acquires the free lease");
    assert_eq!(b.try_acquire().await.unwrap(), None);
    assert_eq!(a.held(), Some(t1));
    assert_eq!(b.held(), None);

    // A renewal keeps the token.
    assert_eq!(a.try_acquire().await.unwrap(), Some(t1));
    assert_eq!(b.try_acquire().await.unwrap(), None);
    let info = b.holder().await.unwrap().unwrap();
    assert_eq!(
        (info.holder.as_str(), info.token, info.expired),
        ("a", t1, false)
    );
    assert!(info.expires_at.ends_with('Z'), "{}", info.expires_at);
    let s = a.stats();
    assert_eq!((s.acquisitions, s.renewals, s.losses), (1, 1, 0), "{s:?}");

    // The holder's fenced write goes through.
    let n = a
        .fenced(t1, async |tx| {
            tx.exec_drop("UPDATE members SET name = 'by-a-1' WHERE id = 1", ())
                .await?;
            Ok(tx.affected_rows())
        })
        .await
        .unwrap();
    assert_eq!(n, 1);

    // `a` freezes: it stops renewing. `b` takes over after the ttl, with the next token.
    let t2 = acquire_eventually(&b).await;
    assert_eq!(t2, Token(t1.0 + 1));
    assert_eq!(b.held(), Some(t2));
    // a's local view lapsed before the database let b in (acquired_at is taken before the
    // acquiring statement is sent).
    assert_eq!(a.held(), None);
    let info = a.holder().await.unwrap().unwrap();
    assert_eq!(
        (info.holder.as_str(), info.token, info.expired),
        ("b", t2, false)
    );

    // `a` resumes with its old token: refused, and its statement did not run.
    let refused = a
        .fenced(t1, async |tx| {
            tx.exec_drop("UPDATE members SET name = 'by-a-2' WHERE id = 1", ())
                .await
        })
        .await;
    match refused {
        Err(LeaseError::Fenced {
            held_token,
            current_token,
            expired,
        }) => {
            assert_eq!((held_token, current_token, expired), (t1, Some(t2), false));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(member_row(&mut admin, 1).await.0, "by-a-1");
    assert_eq!(a.stats().fenced, 1);

    // Its next try sees b: no token, a loss counted.
    assert_eq!(a.try_acquire().await.unwrap(), None);
    assert_eq!(a.stats().losses, 1);
    // The new holder's fenced writes go through.
    b.fenced(t2, async |tx| {
        tx.exec_drop("UPDATE members SET name = 'by-b' WHERE id = 1", ())
            .await
    })
    .await
    .unwrap();
    assert_eq!(member_row(&mut admin, 1).await.0, "by-b");

    // b stops renewing too: a token that merely expired (nobody took over) is refused as well.
    let expired = eventually("b's lease expires", async || {
        let info = a.holder().await.unwrap().unwrap();
        info.expired.then_some(info)
    })
    .await;
    assert_eq!(expired.token, t2);
    let refused = b
        .fenced(t2, async |tx| {
            tx.exec_drop("UPDATE members SET name = 'late-b' WHERE id = 1", ())
                .await
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(LeaseError::Fenced {
                current_token: Some(t),
                expired: true,
                ..
            }) if t == t2
        ),
        "{refused:?}"
    );
    assert_eq!(member_row(&mut admin, 1).await.0, "by-b");
    // Re-acquiring after an expiry bumps the token even for the same holder: t2 stays dead.
    let t3 = b.try_acquire().await.unwrap().unwrap();
    assert_eq!(t3, Token(t2.0 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_members_changes_exactly_the_expired_rows() {
    let env = env().await;
    let mut admin = env.admin().await;
    insert_member(&mut admin, 1, -3600, 0, 0).await; // expired: changes
    insert_member(&mut admin, 2, -1, 0, 0).await; // expired: changes
    insert_member(&mut admin, 3, -3600, 1, 0).await; // deleted
    insert_member(&mut admin, 4, -3600, 0, 1).await; // already expired
    insert_member(&mut admin, 5, 3600, 0, 0).await; // not yet

    let a = env.lease("a");
    let b = env.lease("b");
    let t1 = a.try_acquire().await.unwrap().unwrap();

    let changed = lease::expire_members(&a, t1).await.unwrap();
    assert_eq!(changed, vec![(1, 11), (2, 21)]);
    assert_eq!(member_row(&mut admin, 1).await, ("m1".into(), 11, 1));
    assert_eq!(member_row(&mut admin, 2).await, ("m2".into(), 21, 1));
    assert_eq!(member_row(&mut admin, 3).await, ("m3".into(), 30, 0));
    assert_eq!(member_row(&mut admin, 4).await, ("m4".into(), 40, 1));
    assert_eq!(member_row(&mut admin, 5).await, ("m5".into(), 50, 0));
    // Nothing left to do.
    assert_eq!(lease::expire_members(&a, t1).await.unwrap(), vec![]);

    // More than a batch: at most EXPIRE_BATCH per run, the rest at the next.
    for id in 100..(100 + lease::EXPIRE_BATCH as u64 + 5) {
        insert_member(&mut admin, id, -60, 0, 0).await;
    }
    let first = lease::expire_members(&a, t1).await.unwrap();
    assert_eq!(first.len(), lease::EXPIRE_BATCH);
    let second = lease::expire_members(&a, t1).await.unwrap();
    assert_eq!(second.len(), 5);

    // b takes over; a's old token changes nothing.
    insert_member(&mut admin, 6, -60, 0, 0).await;
    let t2 = acquire_eventually(&b).await;
    let refused = lease::expire_members(&a, t1).await;
    assert!(
        refused.as_ref().is_err_and(LeaseError::is_fenced),
        "{refused:?}"
    );
    assert_eq!(member_row(&mut admin, 6).await, ("m6".into(), 60, 0));
    assert_eq!(lease::expire_members(&b, t2).await.unwrap(), vec![(6, 61)]);
    assert_eq!(member_row(&mut admin, 6).await, ("m6".into(), 61, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_hands_over_at_once() {
    let env = env().await;
    let a = env.lease("a");
    let b = env.lease("b");
    let t1 = a.try_acquire().await.unwrap().unwrap();
    assert_eq!(b.try_acquire().await.unwrap(), None);

    a.release().await.unwrap();
    assert_eq!(a.held(), None);
    let info = b.holder().await.unwrap().unwrap();
    assert!(info.expired, "{info:?}");
    // No waiting for the ttl: the very next try takes it.
    let t2 = b
        .try_acquire()
        .await
        .unwrap()
        .expect("b takes the released lease");
    assert_eq!(t2, Token(t1.0 + 1));
    // The released token is fenced.
    let refused = a.fenced(t1, async |_tx| Ok(())).await;
    assert!(
        refused.as_ref().is_err_and(LeaseError::is_fenced),
        "{refused:?}"
    );
    // Releasing a lease that is not ours (any more) changes nothing.
    a.release().await.unwrap();
    assert_eq!(b.try_acquire().await.unwrap(), Some(t2));
}

/// One `run` loop per holder; every job call is recorded and writes a fenced row.
struct Runner {
    lease: Lease,
    calls: Arc<tokio::sync::Mutex<Vec<Token>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), LeaseError>>,
}

impl Runner {
    fn start(env: &Env, holder: &str) -> Runner {
        let lease = env.lease(holder);
        let calls = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        let job_lease = lease.clone();
        let job_calls = calls.clone();
        let holder = holder.to_owned();
        // Spawned: the loop, its job and the fenced writes are Send.
        let task = tokio::spawn(lease::run(
            lease.clone(),
            Duration::from_millis(100),
            async move {
                let _ = stopped.await;
            },
            move |token| {
                let lease = job_lease.clone();
                let calls = job_calls.clone();
                let holder = holder.clone();
                async move {
                    calls.lock().await.push(token);
                    lease
                        .fenced(token, async |tx| {
                            tx.exec_drop(
                                "INSERT INTO job_log (holder, token) VALUES (?, ?)",
                                (holder.clone(), token.0),
                            )
                            .await
                        })
                        .await?;
                    lease::expire_members(&lease, token).await?;
                    Ok(())
                }
            },
        ));
        Runner {
            lease,
            calls,
            stop: Some(stop),
            task,
        }
    }

    async fn calls(&self) -> Vec<Token> {
        self.calls.lock().await.clone()
    }

    async fn shutdown(mut self) -> LeaseStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
        self.lease.stats()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_loop_runs_only_the_holders_job() {
    let env = env().await;
    let mut admin = env.admin().await;
    admin
        .query_drop(
            "CREATE TABLE job_log (seq BIGINT AUTO_INCREMENT PRIMARY KEY, \
             holder VARCHAR(128) NOT NULL, token BIGINT UNSIGNED NOT NULL)",
        )
        .await
        .unwrap();
    insert_member(&mut admin, 1, -60, 0, 0).await;

    // A zero interval is a typed error, at once.
    let zero = lease::run(
        env.lease("z"),
        Duration::ZERO,
        std::future::pending::<()>(),
        |_| async { Ok(()) },
    )
    .await;
    assert!(matches!(
        zero,
        Err(LeaseError::Config(LeaseConfigError::ZeroInterval))
    ));

    let a = Runner::start(&env, "a");
    let b = Runner::start(&env, "b");
    let a_leads = eventually("a job runs 3 times", async || {
        if a.calls().await.len() >= 3 {
            Some(true)
        } else if b.calls().await.len() >= 3 {
            Some(false)
        } else {
            None
        }
    })
    .await;
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    assert!(
        follower.calls().await.is_empty(),
        "only the holder's job runs"
    );
    let token = leader.lease.held().expect("the leader holds the lease");
    assert!(leader.calls().await.iter().all(|t| *t == token));
    // The member expired by the leader's job.
    assert_eq!(member_row(&mut admin, 1).await, ("m1".into(), 11, 1));

    // The leader shuts down: it releases, the follower takes over at its next renewal.
    let leader_stats = leader.shutdown().await;
    assert_eq!(leader_stats.job_errors, 0, "{leader_stats:?}");
    assert!(leader_stats.job_runs >= 3, "{leader_stats:?}");
    let next = eventually("the follower's job runs", async || {
        follower.calls().await.first().copied()
    })
    .await;
    assert_eq!(next, Token(token.0 + 1));
    let follower_stats = follower.shutdown().await;
    assert_eq!(follower_stats.job_errors, 0, "{follower_stats:?}");

    // Every fenced row carries its holder's token, and the tokens never overlap.
    let rows: Vec<(String, u64)> = admin
        .query("SELECT holder, token FROM job_log ORDER BY seq")
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let first_holder = rows[0].0.clone();
    let switch = rows
        .iter()
        .position(|(h, _)| *h != first_holder)
        .expect("both holders wrote");
    assert!(
        rows[..switch].iter().all(|(_, t)| *t == token.0),
        "{rows:?}"
    );
    assert!(
        rows[switch..]
            .iter()
            .all(|(h, t)| *h != first_holder && *t == token.0 + 1),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_stalled_inside_a_fenced_transaction_is_taken_over() {
    let env = env().await;
    let mut admin = env.admin().await;
    insert_member(&mut admin, 1, 3600, 0, 0).await;
    // `a` stalls mid-transaction with its own deadline far away (as a frozen process would:
    // its timers do not fire), holding the lease row's lock.
    let a = env.lease_with(LeaseConfig {
        ttl: Duration::from_secs(1),
        renew_every: Duration::from_millis(300),
        timeout: Duration::from_secs(60),
        ..config("a")
    });
    let b = env.lease("b");
    let t1 = a.try_acquire().await.unwrap().unwrap();
    let wrote = Arc::new(Notify::new());
    let resume = Arc::new(Notify::new());
    let stalled = {
        let (a, wrote, resume) = (a.clone(), wrote.clone(), resume.clone());
        tokio::spawn(async move {
            a.fenced(t1, async move |tx| {
                tx.exec_drop("UPDATE members SET name = 'stalled-a' WHERE id = 1", ())
                    .await?;
                wrote.notify_one();
                resume.notified().await;
                tx.exec_drop("UPDATE members SET level = 'stalled' WHERE id = 1", ())
                    .await
            })
            .await
        })
    };
    tokio::time::timeout(WAIT, wrote.notified())
        .await
        .expect("a's first write ran");
    // The server ends a's idle transaction (idle_transaction_timeout = ceil(ttl)), the row lock
    // goes, b takes over.
    let t2 = acquire_eventually(&b).await;
    assert_eq!(t2, Token(t1.0 + 1));
    resume.notify_one();
    let a_result = tokio::time::timeout(WAIT, stalled)
        .await
        .expect("a's fenced call returns")
        .unwrap();
    assert!(a_result.is_err(), "{a_result:?}");
    println!("stalled holder's fenced call: {a_result:?}");
    // Nothing of a's transaction took effect.
    let (name, version, expired) = member_row(&mut admin, 1).await;
    assert_eq!((name.as_str(), version, expired), ("m1", 10, 0));
    let level: Option<String> = admin
        .query_first("SELECT level FROM members WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(level.as_deref(), Some("gold"));
    // b's writes work.
    b.fenced(t2, async |tx| {
        tx.exec_drop("UPDATE members SET name = 'by-b' WHERE id = 1", ())
            .await
    })
    .await
    .unwrap();
    assert_eq!(member_row(&mut admin, 1).await.0, "by-b");
}
