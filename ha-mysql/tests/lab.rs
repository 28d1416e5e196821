#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
//! ha-mysql against the real MariaDB lab (primary `bj-a`, GTID replicas `bj-b`, `sh-a`, the
//! HA simulator repointing the primary's per-region DNS name).
//!
//! The tests share the machine's two cores, so they run one at a time (`LOCK`); every wait is
//! bounded; the servers are killed and their directory removed when the lab drops, also when
//! a test fails. Figures are printed (`--nocapture`), never asserted as timing thresholds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{HaContext, HaError, Topology};
use ha_lab::mariadb::{APP_PASSWORD, APP_USER, DATABASE, HaEvent, MariaDbLab, MariaDbLabOptions};
use ha_mysql::mysql_async::prelude::Queryable;
use ha_mysql::{HaMysql, MysqlError};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One lab at a time on the machine, also across processes (nextest runs every test in its own
/// process): the holder binds this address; the OS releases it when the process ends, even
/// when it is killed.
const SERIAL_ADDR: &str = "127.0.9.1:47913";

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

/// Bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// The writes' deadline.
const TIMEOUT: Duration = Duration::from_secs(1);
/// 200 writes per second.
const PERIOD: Duration = Duration::from_millis(5);

async fn lab() -> MariaDbLab {
    lab_with(MariaDbLabOptions::default()).await
}

async fn lab_with(opts: MariaDbLabOptions) -> MariaDbLab {
    let lab = tokio::time::timeout(Duration::from_secs(60), MariaDbLab::start(opts))
        .await
        .expect("lab start bounded")
        .expect("lab start");
    let primary = lab.primary();
    let mut c = lab.admin_conn(&primary).await.unwrap();
    c.query_drop(format!(
        "CREATE TABLE {DATABASE}.t (id BIGINT PRIMARY KEY, v INT NOT NULL)"
    ))
    .await
    .unwrap();
    // Wait for the table on both replicas.
    for node in &lab.nodes()[1..] {
        let mut rc = lab.admin_conn(node).await.unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let n: Option<i64> = rc
                .query_first(format!(
                    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{DATABASE}' AND table_name = 't'"
                ))
                .await
                .unwrap();
            if n == Some(1) {
                break;
            }
            if Instant::now() >= deadline {
                let status: Vec<ha_mysql::mysql_async::Row> =
                    rc.query("SHOW SLAVE STATUS").await.unwrap();
                panic!("table t not replicated to {}: {status:?}", node.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    lab
}

fn settings() -> String {
    format!(
        r#"[dependencies.db.settings]
user = "{APP_USER}"
password = "{APP_PASSWORD}"
database = "{DATABASE}"
max_connections = 32
connect_timeout = "300ms"
timeout = "1s"
startup_timeout = "3s"
"#
    )
}

async fn client(lab: &MariaDbLab) -> HaMysql {
    client_with(lab, "").await
}

/// The replicas' addresses as a `replicas = [...]` settings line: reads may go to them, and
/// the follower keeps a warm connection to each for its probes.
fn replicas_line(lab: &MariaDbLab) -> String {
    let primary = lab.primary();
    let addrs: Vec<String> = lab
        .nodes()
        .iter()
        .filter(|n| n.name != primary.name)
        .map(|n| format!("\"{}\"", n.addr))
        .collect();
    format!("replicas = [{}]\n", addrs.join(", "))
}

async fn client_with(lab: &MariaDbLab, extra: &str) -> HaMysql {
    let toml = lab.topology_toml("bj-a", "db", &format!("{}{extra}", settings()));
    let ctx = HaContext::new(Topology::from_toml_str(&toml, "lab.toml").unwrap());
    // The client's view of the switch, printed with its time for the outage break-down.
    let mut rx = ctx.events().subscribe();
    tokio::spawn(async move {
        let t0 = Instant::now();
        while let Ok(ev) = rx.recv().await {
            let kind = ev.kind();
            if kind == "master_switched" || kind == "endpoint_added" {
                println!("[event +{:?}] {kind}: {ev:?}", t0.elapsed());
            }
        }
    });
    HaMysql::from_context(&ctx, "db")
        .await
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Res {
    Acked(String),
    Unknown,
    NotSent,
    Failed(String),
}

#[derive(Debug, Clone)]
struct Rec {
    id: u64,
    sent: Instant,
    done: Instant,
    res: Res,
}

/// 200 INSERTs per second, each bounded by `TIMEOUT`, until `stop` turns true.
async fn load(db: HaMysql, mut stop: watch::Receiver<bool>) -> Vec<Rec> {
    let mut tick = tokio::time::interval(PERIOD);
    let mut set = JoinSet::new();
    let mut id = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        id += 1;
        let db = db.clone();
        set.spawn(async move {
            let sent = Instant::now();
            let r = db
                .write(TIMEOUT, move |c| {
                    Box::pin(async move {
                        c.exec_drop("INSERT INTO t (id, v) VALUES (?, 1)", (id,))
                            .await?;
                        Ok(c.opts().ip_or_hostname().to_string())
                    })
                })
                .await;
            let res = match r {
                Ok(ip) => Res::Acked(ip),
                Err(e) if e.is_outcome_unknown() => Res::Unknown,
                Err(HaError::DeadlineExceeded {
                    maybe_sent: false, ..
                }) => Res::NotSent,
                Err(e) => Res::Failed(e.to_string()),
            };
            Rec {
                id,
                sent,
                done: Instant::now(),
                res,
            }
        });
    }
    let mut out = Vec::new();
    let drained = tokio::time::timeout(TIMEOUT * 5, async {
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
    })
    .await;
    assert!(drained.is_ok(), "a write outlived its deadline by far");
    out.sort_by_key(|r| r.id);
    out
}

async fn ids_on(lab: &MariaDbLab, name: &str) -> HashSet<u64> {
    let node = lab.node(name).unwrap().clone();
    let mut c = lab.admin_conn(&node).await.unwrap();
    let ids: Vec<u64> = c
        .query(format!("SELECT id FROM {DATABASE}.t"))
        .await
        .unwrap();
    ids.into_iter().collect()
}

/// Waits until `name` has applied everything `from` has (bounded).
async fn caught_up(lab: &MariaDbLab, from: &str, name: &str) {
    let src = lab.node(from).unwrap().clone();
    let mut c = lab.admin_conn(&src).await.unwrap();
    let pos: String = c
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .unwrap()
        .unwrap();
    let node = lab.node(name).unwrap().clone();
    let mut r = lab.admin_conn(&node).await.unwrap();
    let _: Option<i64> = r
        .query_first(format!("SELECT MASTER_GTID_WAIT('{pos}', 10)"))
        .await
        .unwrap();
}

struct Summary {
    acked: usize,
    unknown: usize,
    not_sent: usize,
    failed: Vec<String>,
    /// From the fault to the first acknowledgement by the new primary.
    outage: Option<Duration>,
    /// From the DNS repoint to the first acknowledgement by the new primary.
    repoint_to_ack: Option<Duration>,
    max_latency: Duration,
    /// Acknowledged by the old primary after the repoint.
    old_acks_after_repoint: usize,
}

fn summarise(recs: &[Rec], fault_at: Instant, ev: &HaEvent, old_ip: &str, new_ip: &str) -> Summary {
    let first_new = recs
        .iter()
        .filter(|r| r.done > fault_at && r.res == Res::Acked(new_ip.to_owned()))
        .map(|r| r.done)
        .min();
    Summary {
        acked: recs
            .iter()
            .filter(|r| matches!(r.res, Res::Acked(_)))
            .count(),
        unknown: recs.iter().filter(|r| r.res == Res::Unknown).count(),
        not_sent: recs.iter().filter(|r| r.res == Res::NotSent).count(),
        failed: recs
            .iter()
            .filter_map(|r| match &r.res {
                Res::Failed(e) => Some(e.clone()),
                _ => None,
            })
            .collect(),
        outage: first_new.map(|t| t.saturating_duration_since(fault_at)),
        repoint_to_ack: first_new.map(|t| t.saturating_duration_since(ev.repointed_at)),
        max_latency: recs
            .iter()
            .map(|r| r.done.saturating_duration_since(r.sent))
            .max()
            .unwrap_or_default(),
        old_acks_after_repoint: recs
            .iter()
            .filter(|r| r.done > ev.repointed_at && r.res == Res::Acked(old_ip.to_owned()))
            .count(),
    }
}

fn report(name: &str, ev: &HaEvent, s: &Summary, lost: usize, fault_at: Instant) {
    println!(
        "[{name}] HA decided +{:?}, promoted +{:?}, repointed +{:?} after the first miss",
        ev.decided_at - ev.started_at,
        ev.promoted_at - ev.started_at,
        ev.repointed_at - ev.started_at
    );
    println!(
        "[{name}] HA {:?}: repoint {:?} after the fault; outage {:?} (repoint -> 1st ack {:?}); acked {}, unknown {}, not sent {}, failed {} {:?}; acked lost {lost}; old-primary acks after repoint {}; max latency {:?}",
        ev.kind,
        ev.repointed_at.saturating_duration_since(fault_at),
        s.outage,
        s.repoint_to_ack,
        s.acked,
        s.unknown,
        s.not_sent,
        s.failed.len(),
        s.failed.iter().take(3).collect::<Vec<_>>(),
        s.old_acks_after_repoint,
        s.max_latency,
    );
}

fn ip(addr: SocketAddr) -> String {
    addr.ip().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_under_load_follows_the_repoint() {
    let _serial = serial().await;
    let lab = lab().await;
    // With the replicas configured, as a service reading from them has: the promoted one is
    // verified on a warm connection.
    let db = client_with(&lab, &replicas_line(&lab)).await;
    lab.start_ha();
    let old = lab.primary();
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(db.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    lab.kill(&old.name).await.unwrap();
    let ev = lab.wait_ha_event(1, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let recs = load.await.unwrap();
    let new = lab.node(&ev.to).unwrap().clone();
    let on_new = ids_on(&lab, &new.name).await;
    let acked: Vec<u64> = recs
        .iter()
        .filter(|r| matches!(r.res, Res::Acked(_)))
        .map(|r| r.id)
        .collect();
    let lost = acked.iter().filter(|id| !on_new.contains(id)).count();
    let s = summarise(&recs, fault_at, &ev, &ip(old.addr), &ip(new.addr));
    report("kill -9", &ev, &s, lost, fault_at);
    assert_eq!(lost, 0, "acknowledged rows missing on the new primary");
    assert!(s.failed.is_empty(), "unexpected errors: {:?}", s.failed);
    assert_eq!(s.old_acks_after_repoint, 0);
    assert!(
        s.outage.is_some(),
        "the client never wrote to the new primary"
    );
    assert_eq!(db.master().current().unwrap().addr, new.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_recovers_without_surfacing_read_only() {
    let _serial = serial().await;
    let lab = lab().await;
    let db = client(&lab).await;
    let old = lab.primary();
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(db.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    let ev = tokio::time::timeout(WAIT, lab.switchover(None))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let recs = load.await.unwrap();
    let new = lab.node(&ev.to).unwrap().clone();
    let on_new = ids_on(&lab, &new.name).await;
    let lost = recs
        .iter()
        .filter(|r| matches!(r.res, Res::Acked(_)) && !on_new.contains(&r.id))
        .count();
    let s = summarise(&recs, fault_at, &ev, &ip(old.addr), &ip(new.addr));
    report("switchover", &ev, &s, lost, fault_at);
    assert_eq!(lost, 0, "acknowledged rows missing on the new primary");
    assert!(
        s.failed.is_empty(),
        "errors surfaced (1290?): {:?}",
        s.failed
    );
    assert_eq!(
        s.old_acks_after_repoint, 0,
        "acks from the old primary after the repoint"
    );
    assert!(
        s.outage.is_some(),
        "the client never wrote to the new primary"
    );
    // Nothing originated on the old primary after the switch: its binlog has no GTID of its
    // own server id beyond what the new primary also has.
    caught_up(&lab, &new.name, &old.name).await;
    assert_eq!(ids_on(&lab, &old.name).await, on_new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_never_hangs_a_call_and_reports_unknown_outcomes() {
    let _serial = serial().await;
    let lab = lab().await;
    let db = client(&lab).await;
    lab.start_ha();
    let old = lab.primary();
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(db.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    lab.freeze(&old.name).unwrap();
    let ev = lab.wait_ha_event(1, WAIT).await.unwrap();
    // Thaw 4 s after the freeze, still writable (the simulator does not fence it).
    tokio::time::sleep_until(fault_at + Duration::from_secs(4)).await;
    lab.thaw(&old.name).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let recs = load.await.unwrap();
    let new = lab.node(&ev.to).unwrap().clone();
    let on_new = ids_on(&lab, &new.name).await;
    let on_old = ids_on(&lab, &old.name).await;
    let lost = recs
        .iter()
        .filter(|r| matches!(r.res, Res::Acked(_)) && !on_new.contains(&r.id))
        .count();
    let s = summarise(&recs, fault_at, &ev, &ip(old.addr), &ip(new.addr));
    report("SIGSTOP 4 s", &ev, &s, lost, fault_at);
    let unknown: HashSet<u64> = recs
        .iter()
        .filter(|r| r.res == Res::Unknown)
        .map(|r| r.id)
        .collect();
    let only_old: Vec<u64> = on_old.difference(&on_new).copied().collect();
    println!(
        "[SIGSTOP 4 s] rows only on the old primary: {} (all reported OutcomeUnknown: {})",
        only_old.len(),
        only_old.iter().all(|id| unknown.contains(id))
    );
    // No call past its deadline (plus scheduling slack on a shared 2-core machine).
    assert!(
        s.max_latency < TIMEOUT + Duration::from_secs(1),
        "max latency {:?}",
        s.max_latency
    );
    assert!(s.failed.is_empty(), "unexpected errors: {:?}", s.failed);
    assert_eq!(s.old_acks_after_repoint, 0);
    // Whatever landed only on the old primary was never acknowledged nor reported not sent.
    assert!(
        only_old.iter().all(|id| unknown.contains(id)),
        "{only_old:?}"
    );
    assert_eq!(lost, 0, "acknowledged rows missing on the new primary");
    assert!(s.outage.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_are_typed_and_bounded() {
    let _serial = serial().await;
    let lab = lab().await;
    let primary = lab.primary();
    let replica = lab.node("bj-b").unwrap().clone();
    let bound = Duration::from_secs(3);
    let base = || {
        HaMysql::builder()
            .user(APP_USER)
            .password(APP_PASSWORD)
            .database(DATABASE)
            .connect_timeout(Duration::from_millis(300))
            .startup_timeout(Duration::from_secs(1))
    };
    let timed = |f: ha_mysql::Builder| async move {
        let t = Instant::now();
        let r = tokio::time::timeout(bound, f.connect())
            .await
            .expect("start-up is bounded");
        (r.map(|_| ()), t.elapsed())
    };
    // Nothing listens there.
    let (r, took) = timed(base().addrs(["127.0.1.31:9".parse().unwrap()])).await;
    let e = r.unwrap_err();
    println!("unreachable: {e} after {took:?}");
    assert!(e.is_unreachable(), "{e:?}");
    // Wrong password.
    let (r, took) = timed(base().password("wrong").addrs([primary.addr])).await;
    let e = r.unwrap_err();
    println!("wrong password: {e} after {took:?}");
    assert!(e.is_access_denied(), "{e:?}");
    // Unknown database.
    let (r, took) = timed(base().database("nope").addrs([primary.addr])).await;
    let e = r.unwrap_err();
    println!("unknown database: {e} after {took:?}");
    assert!(e.is_unknown_database(), "{e:?}");
    // A "primary" that is read-only.
    let (r, took) = timed(base().addrs([replica.addr])).await;
    let e = r.unwrap_err();
    println!("read-only primary: {e} after {took:?}");
    assert!(e.is_not_primary(), "{e:?}");
    // Invalid settings.
    let (r, _) = timed(base().max_connections(0).addrs([primary.addr])).await;
    assert!(r.unwrap_err().is_config());
    // A DNS name that resolves to nothing.
    let toml = lab.topology_toml("bj-a", "db", &settings());
    let toml = toml
        .replace("db.north.lab.", "nothing.north.lab.")
        .replace("db.south.lab.", "nothing.south.lab.");
    let ctx = HaContext::new(Topology::from_toml_str(&toml, "lab.toml").unwrap());
    let t = Instant::now();
    let r = tokio::time::timeout(bound + Duration::from_secs(2), async {
        HaMysql::from_context(&ctx, "db").await?.connect().await
    })
    .await
    .expect("start-up is bounded");
    let e = r.unwrap_err();
    println!("unresolvable: {e} after {:?}", t.elapsed());
    assert!(e.is_unresolvable(), "{e:?}");
    // A bad settings table names the field.
    let toml = lab.topology_toml(
        "bj-a",
        "db",
        "[dependencies.db.settings]\ntimeout = \"soon\"\n",
    );
    let ctx = HaContext::new(Topology::from_toml_str(&toml, "lab.toml").unwrap());
    let e = HaMysql::from_context(&ctx, "db").await.unwrap_err();
    match &e {
        MysqlError::Config(c) => assert_eq!(c.field, "dependencies.db.settings.timeout"),
        other => panic!("{other:?}"),
    }
    // And the good case, for contrast: a writer to the verified primary.
    let db = base()
        .addrs([replica.addr, primary.addr])
        .connect()
        .await
        .unwrap();
    let mut w = db.writer().await.unwrap();
    assert_eq!(w.addr(), primary.addr);
    let one: Option<i64> = w.query_first("SELECT 1").await.unwrap();
    assert_eq!(one, Some(1));
    let _ = Arc::new(());
}

async fn insert(db: &HaMysql, id: u64) -> Result<String, HaError> {
    db.write(TIMEOUT, move |c| {
        Box::pin(async move {
            c.exec_drop("INSERT INTO t (id, v) VALUES (?, 1)", (id,))
                .await?;
            Ok(c.opts().ip_or_hostname().to_string())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_naming_the_read_only_old_primary_is_refused() {
    let _serial = serial().await;
    let lab = lab().await;
    let db = client(&lab).await;
    let old = lab.primary();
    assert_eq!(insert(&db, 1).await.unwrap(), ip(old.addr));
    let ev = tokio::time::timeout(WAIT, lab.switchover(Some("bj-b")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(insert(&db, 2).await.unwrap(), ip(ev.to_addr));
    // A stale answer brings the old primary back; it is read-only (a replica of bj-b now).
    lab.set_primary_dns(old.addr.ip()).unwrap();
    let mut rx = db.master().subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|m| m.is_none()))
        .await
        .expect("the follower refuses the read-only node")
        .unwrap();
    let r = insert(&db, 3).await;
    println!("write while DNS names the read-only old primary: {r:?}");
    match r {
        Err(HaError::DeadlineExceeded {
            maybe_sent: false, ..
        }) => {}
        other => panic!("expected a not-sent deadline, got {other:?}"),
    }
    // The answer is fixed: writes resume on bj-b; none ever reached the old primary.
    lab.set_primary_dns(ev.to_addr.ip()).unwrap();
    let (ok_id, ok_ip) = tokio::time::timeout(WAIT, async {
        let mut id = 4;
        loop {
            if let Ok(ip) = insert(&db, id).await {
                return (id, ip);
            }
            id += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(ok_ip, ip(ev.to_addr));
    caught_up(&lab, &ev.to, &old.name).await;
    let on_new = ids_on(&lab, &ev.to).await;
    assert!(on_new.contains(&1) && on_new.contains(&2) && on_new.contains(&ok_id));
    assert!(!on_new.contains(&3), "the refused write must not have run");
    assert_eq!(ids_on(&lab, &old.name).await, on_new);
}

/// Writes `id` and returns the GTID of its transaction.
async fn insert_gtid(db: &HaMysql, id: u64) -> String {
    db.write(TIMEOUT, move |c| {
        Box::pin(async move {
            c.exec_drop("INSERT INTO t (id, v) VALUES (?, 1)", (id,))
                .await?;
            ha_mysql::last_gtid(c).await
        })
    })
    .await
    .unwrap()
}

async fn sees(conn: &mut ha_mysql::ReadConn, id: u64) -> bool {
    let n: Option<i64> = conn
        .exec_first("SELECT COUNT(*) FROM t WHERE id = ?", (id,))
        .await
        .unwrap();
    n == Some(1)
}

/// Reads until one goes to `want` (bounded); returns how many reads that took.
async fn reads_until(
    db: &HaMysql,
    want: &dyn Fn(&ha_mysql::ReadConn) -> bool,
    what: &str,
) -> usize {
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let r = db.reader().await.unwrap();
        if want(&r) {
            return n;
        }
        drop(r);
        assert!(Instant::now() < deadline, "reads never went to {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_prefer_the_same_idc_replica_within_the_lag_bound_and_see_own_writes() {
    let _serial = serial().await;
    let lab = lab().await;
    let bj_b = lab.node("bj-b").unwrap().clone();
    let sh_a = lab.node("sh-a").unwrap().clone();
    let extra = format!(
        "{}replicas = [\"{}\", \"{}\"]\nmax_lag = \"1s\"\nlag_check_interval = \"100ms\"\nread_your_writes_timeout = \"200ms\"\n",
        settings(),
        bj_b.addr,
        sh_a.addr
    );
    let toml = lab.topology_toml("bj-b", "db", &extra);
    let ctx = HaContext::new(Topology::from_toml_str(&toml, "lab.toml").unwrap());
    let mut events = ctx.events().subscribe();
    let db = HaMysql::from_context(&ctx, "db")
        .await
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Read-your-writes holds from the first write on.
    let g1 = insert_gtid(&db, 1).await;
    assert!(!g1.is_empty(), "@@last_gtid needs the binlog");
    let mut r = db.reader_after(&g1).await.unwrap();
    assert!(
        sees(&mut r, 1).await,
        "own write not visible on {}",
        r.addr()
    );
    drop(r);
    // The same-IDC replica serves the reads.
    let n = reads_until(&db, &|r| r.addr() == bj_b.addr, "bj-b").await;
    println!("[replica reads] same-IDC replica picked after {n} read(s)");
    // Its SQL thread stops: it leaves the set, reads go to the other replica (or the primary).
    let mut admin = lab.admin_conn(&bj_b).await.unwrap();
    admin.query_drop("STOP SLAVE SQL_THREAD").await.unwrap();
    let t = Instant::now();
    reads_until(
        &db,
        &|r| r.addr() != bj_b.addr,
        "away from the stopped bj-b",
    )
    .await;
    println!(
        "[replica reads] left the stopped replica after {:?}",
        t.elapsed()
    );
    // Told as an event, with why.
    let lagging = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ha_core::TopologyEvent::ReplicaLagging { addr, reason, .. }) =
                events.recv().await
                && addr == bj_b.addr
            {
                return reason;
            }
        }
    })
    .await
    .expect("a ReplicaLagging event for bj-b");
    assert!(lagging.contains("not replicating"), "{lagging}");
    let g2 = insert_gtid(&db, 2).await;
    let mut r = db.reader_after(&g2).await.unwrap();
    assert_ne!(r.addr(), bj_b.addr);
    assert!(
        sees(&mut r, 2).await,
        "own write not visible on {}",
        r.addr()
    );
    drop(r);
    // It catches up: reads return to it.
    admin.query_drop("START SLAVE SQL_THREAD").await.unwrap();
    let t = Instant::now();
    reads_until(&db, &|r| r.addr() == bj_b.addr, "bj-b again").await;
    println!(
        "[replica reads] back on the caught-up replica after {:?}",
        t.elapsed()
    );
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ha_core::TopologyEvent::ReplicaCaughtUp { addr, .. }) = events.recv().await
                && addr == bj_b.addr
            {
                return;
            }
        }
    })
    .await
    .expect("a ReplicaCaughtUp event for bj-b");
    let mut r = db.reader_after(&g2).await.unwrap();
    assert!(sees(&mut r, 2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_addresses_follow_a_switchover_without_dns() {
    let _serial = serial().await;
    let lab = lab().await;
    let addrs: Vec<SocketAddr> = lab.nodes().iter().map(|n| n.addr).collect();
    let db = HaMysql::builder()
        .addrs(addrs)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .database(DATABASE)
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let old = lab.primary();
    assert_eq!(db.master().current().unwrap().addr, old.addr);
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(db.clone(), stop_rx));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fault_at = Instant::now();
    let ev = tokio::time::timeout(WAIT, lab.switchover(Some("sh-a")))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    let recs = load.await.unwrap();
    let on_new = ids_on(&lab, &ev.to).await;
    let lost = recs
        .iter()
        .filter(|r| matches!(r.res, Res::Acked(_)) && !on_new.contains(&r.id))
        .count();
    let s = summarise(&recs, fault_at, &ev, &ip(old.addr), &ip(ev.to_addr));
    report("switchover, plain addresses", &ev, &s, lost, fault_at);
    assert_eq!(lost, 0);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    assert_eq!(s.old_acks_after_repoint, 0);
    assert_eq!(db.master().current().unwrap().addr, ev.to_addr);
}

// === partitions of the primary's IDC ===

/// What a partition scenario measured.
#[derive(Debug)]
struct PartitionOutcome {
    acked: usize,
    unknown: usize,
    /// Acknowledged writes missing on the final primary.
    lost: Vec<u64>,
    /// Rows on the old primary that the new one lacks, and whether each was reported
    /// `OutcomeUnknown` (never acknowledged).
    only_old: usize,
    only_old_all_unknown: bool,
    fenced: Vec<String>,
}

/// A lab for a partition of the primary's IDC, semi-synchronous replication on or off, its
/// HA simulator running, and a client in `client_idc` (this test process joins that IDC's
/// cgroup before it opens any connection).
async fn lab_for_a_partition(client_idc: &str, semi_sync: bool) -> (MariaDbLab, HaMysql) {
    let mut opts = MariaDbLabOptions::default();
    // A wait timeout far longer than the test: the primary never falls back to asynchronous.
    opts.semi_sync = semi_sync.then_some(Duration::from_secs(120));
    let lab = lab_with(opts).await;
    lab.cgroup(client_idc)
        .expect("an IDC cgroup (root, cgroup v2)")
        .add(std::process::id())
        .unwrap();
    let db = client(&lab).await;
    lab.start_ha();
    (lab, db)
}

/// Partitions `bj-a` (the primary's IDC) for 4 s under 200 writes/s, with this test process
/// (the client) placed in `client_idc`, and semi-synchronous replication on or off. The HA
/// simulator decides from outside `bj-a` and promotes; the heal fences the old primary.
async fn partition_of_the_primary_idc(client_idc: &str, semi_sync: bool) -> PartitionOutcome {
    let (lab, db) = lab_for_a_partition(client_idc, semi_sync).await;
    let old = lab.primary();
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(load(db.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    let cut = lab.partition("bj-a").unwrap();
    let ev = lab.wait_ha_event(1, WAIT).await.unwrap();
    tokio::time::sleep_until(fault_at + Duration::from_secs(4)).await;
    let fenced = cut.heal().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let recs = load.await.unwrap();
    let new = lab.node(&ev.to).unwrap().clone();
    let on_new = ids_on(&lab, &new.name).await;
    let on_old = ids_on(&lab, &old.name).await;
    let s = summarise(&recs, fault_at, &ev, &ip(old.addr), &ip(new.addr));
    let name = format!(
        "partition, client in {client_idc}, semi-sync {}",
        if semi_sync { "on" } else { "off" }
    );
    let lost: Vec<u64> = recs
        .iter()
        .filter(|r| matches!(r.res, Res::Acked(_)) && !on_new.contains(&r.id))
        .map(|r| r.id)
        .collect();
    report(&name, &ev, &s, lost.len(), fault_at);
    let unknown: HashSet<u64> = recs
        .iter()
        .filter(|r| r.res == Res::Unknown)
        .map(|r| r.id)
        .collect();
    let only_old: Vec<u64> = on_old.difference(&on_new).copied().collect();
    assert!(
        s.max_latency < TIMEOUT + Duration::from_secs(1),
        "a call outlived its deadline: {:?}",
        s.max_latency
    );
    let out = PartitionOutcome {
        acked: s.acked,
        unknown: s.unknown,
        only_old: only_old.len(),
        only_old_all_unknown: only_old.iter().all(|id| unknown.contains(id)),
        lost,
        fenced,
    };
    println!("[{name}] {out:?}");
    out
}

/// A commit still waiting for a semi-synchronous acknowledgement on the cut-off old primary
/// when the partition heals (its caller's deadline not yet passed) must not come back
/// acknowledged: the row is on that node alone. The lab's fencing once released such waits
/// by switching semi-sync off first, answering OK for a row the new primary never got (seen
/// once in CI as one lost write of `partition_with_the_client_inside_and_semi_sync_...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waiting_on_the_cut_off_primary_at_the_heal_is_not_acknowledged() {
    let _serial = serial().await;
    let (lab, db) = lab_for_a_partition("bj-a", true).await;
    let old = lab.primary();
    let cut = lab.partition("bj-a").unwrap();
    // Sent to the old primary right after the cut, with a deadline past the HA's switch and
    // the heal: its commit waits for a replica that cannot answer.
    let pending = tokio::spawn({
        let db = db.clone();
        async move {
            db.write(Duration::from_secs(20), |c| {
                Box::pin(async move {
                    c.exec_drop("INSERT INTO t (id, v) VALUES (?, 1)", (777_777u64,))
                        .await?;
                    Ok(c.opts().ip_or_hostname().to_string())
                })
            })
            .await
        }
    });
    let ev = lab.wait_ha_event(1, WAIT).await.unwrap();
    assert_ne!(ev.to, old.name);
    assert!(
        !pending.is_finished(),
        "the commit did not wait for a replica"
    );
    let fenced = cut.heal().await.unwrap();
    assert_eq!(fenced, vec![old.name.clone()]);
    let got = tokio::time::timeout(Duration::from_secs(25), pending)
        .await
        .expect("the write ended within its deadline")
        .unwrap();
    println!("the waiting write after the heal: {got:?}");
    let new = lab.node(&ev.to).unwrap().clone();
    let on_new = ids_on(&lab, &new.name).await;
    match got {
        // Retried on the new primary after the old one refused: fine, it is there.
        Ok(ip) => assert!(
            ip == new.addr.ip().to_string() && on_new.contains(&777_777),
            "acknowledged by {ip}, on the new primary: {}",
            on_new.contains(&777_777)
        ),
        Err(e) => assert!(e.is_outcome_unknown(), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_with_the_client_outside_loses_no_acknowledged_write() {
    let _serial = serial().await;
    let o = partition_of_the_primary_idc("sh-a", true).await;
    assert!(o.lost.is_empty(), "acknowledged writes lost: {o:?}");
    assert!(o.acked > 0, "{o:?}");
    assert_eq!(o.fenced, vec!["mariadb-bj-a".to_owned()], "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_with_the_client_inside_and_semi_sync_acknowledges_nothing_it_loses() {
    let _serial = serial().await;
    let o = partition_of_the_primary_idc("bj-a", true).await;
    assert!(o.lost.is_empty(), "acknowledged writes lost: {o:?}");
    // The commits that waited for a replica past the deadline are reported unknown.
    assert!(o.unknown > 0, "{o:?}");
    assert!(o.only_old_all_unknown && o.only_old <= o.unknown, "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_with_the_client_inside_without_semi_sync_loses_what_the_old_primary_acked() {
    let _serial = serial().await;
    let o = partition_of_the_primary_idc("bj-a", false).await;
    // The measured danger (reported in the README): the isolated primary acknowledges writes
    // that the promoted replica never gets. If this reads 0, the client was not isolated with
    // the old primary.
    assert!(!o.lost.is_empty(), "{o:?}");
}
