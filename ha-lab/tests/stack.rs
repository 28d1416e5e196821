//! The whole stack (`ha_lab::stack`): it starts, every server answers, its service
//! configurations are valid ha-core topologies, a fault is observed, and `stop` leaves no
//! process behind. Needs redis-server, mariadbd and the RocketMQ servers (`scripts/setup`).
#![cfg(feature = "mariadb")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::{net::SocketAddr, time::Duration};

use ha_core::config::Source;
use ha_lab::{
    lab::probe,
    mariadb::{APP_PASSWORD, APP_USER},
    process::pid_alive,
    stack::{SERVICE_CONFIG, SERVICE_CONFIG_SH_A, SERVICE_DATABASE, Stack, StackOptions},
};
use mysql_async::prelude::Queryable;

/// Bound on a whole test: start (~10 s), checks, one failover, stop.
const TEST_BOUND: Duration = Duration::from_secs(150);

fn check_topology(text: &str, idc: &str, stack: &Stack, with_mq: bool) -> ha_core::Topology {
    let topo = ha_core::Topology::from_toml_str(text, format!("{idc}.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(&*topo.local_idc().name, idc);
    assert_eq!(topo.idcs().len(), 3);
    let cache = topo.dependency("cache").unwrap();
    assert_eq!(cache.kind.as_deref(), Some("redis"));
    assert_eq!(
        cache.source,
        Source::Static(stack.redis().sentinel_addrs()),
        "the sentinels"
    );
    let redis: serde_json::Value = cache.settings().unwrap();
    let third = match idc {
        "bj-a" => 1,
        "bj-b" => 2,
        _ => 3,
    };
    assert_eq!(
        redis["source_address"],
        format!("127.0.{third}.100"),
        "Redis connections from an address of the instance's IDC"
    );
    let db = topo.dependency("db").unwrap();
    assert_eq!(db.kind.as_deref(), Some("mysql"));
    let Source::Dns { names, port } = &db.source else {
        panic!("db by DNS: {:?}", db.source)
    };
    assert_eq!(*port, stack.mariadb().primary().addr.port());
    assert_eq!(names.len(), 2);
    let settings: serde_json::Value = db.settings().unwrap();
    assert_eq!(settings["database"], SERVICE_DATABASE);
    assert_eq!(settings["replicas"].as_array().unwrap().len(), 2);
    let events = topo.dependency("events");
    assert_eq!(events.is_some(), with_mq);
    if let Some(events) = events {
        let settings: serde_json::Value = events.settings().unwrap();
        let clusters = settings["clusters"].as_array().unwrap();
        let mq = stack.rocketmq().unwrap();
        assert_eq!(clusters.len(), mq.idcs().len());
        for (c, i) in clusters.iter().zip(mq.idcs()) {
            assert_eq!(c["idc"], i.idc.as_str());
            assert_eq!(c["name_servers"][0], i.namesrv.to_string().as_str());
        }
    }
    let app: serde_json::Value = topo.app().unwrap();
    assert_eq!(app["instance"], format!("{idc}-1").as_str());
    assert_eq!(app["admin"]["token"], "t\"ok\\en");
    assert_eq!(app["limits"]["limit"][1]["share"]["idc"], idc);
    topo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_starts_serves_its_configs_survives_a_failover_and_stops_clean() {
    let dir = tempfile::tempdir().unwrap();
    let run = async {
        let stack = Stack::start(StackOptions::default().with_dir(dir.path()))
            .await
            .unwrap();
        let t = stack.startup();
        println!(
            "stack up in {:?} (redis {:?}, mariadb {:?}, rocketmq {:?})",
            t.total, t.redis, t.mariadb, t.rocketmq
        );
        for sub in ["redis", "mariadb", "rocketmq"] {
            assert!(
                dir.path().join(sub).is_dir(),
                "{sub}/ holds its lab's files"
            );
        }

        // Every server answers.
        let servers = stack.servers().await;
        assert_eq!(servers.len(), 3 + 3 + 3 + 2 + 4, "{servers:#?}");
        for s in &servers {
            assert!(probe(s, Duration::from_secs(2)).await, "{} answers", s.name);
        }
        let master = stack.redis().master().await.unwrap();
        let pong = stack.redis().redis_cmd(master, &["PING"]).await.unwrap();
        assert_eq!(pong.as_str(), Some("PONG"));
        for i in stack.rocketmq().unwrap().idcs() {
            assert!(
                stack
                    .rocketmq()
                    .unwrap()
                    .is_registered(&i.idc)
                    .await
                    .unwrap()
            );
        }
        // The application user may create tables in the service database.
        let primary = stack.mariadb().primary();
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(primary.addr.ip().to_string())
            .tcp_port(primary.addr.port())
            .user(Some(APP_USER))
            .pass(Some(APP_PASSWORD))
            .db_name(Some(SERVICE_DATABASE))
            .prefer_socket(false);
        let mut c = tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts))
            .await
            .unwrap()
            .unwrap();
        c.query_drop("CREATE TABLE IF NOT EXISTS probe (id INT PRIMARY KEY)")
            .await
            .unwrap();
        c.query_drop("INSERT INTO probe VALUES (1)").await.unwrap();
        drop(c);

        // The configurations are topologies with the lab's addresses.
        let token = "t\"ok\\en";
        for (idc, listen) in [("bj-a", "127.0.1.100:18090"), ("sh-a", "127.0.3.100:18090")] {
            let listen: SocketAddr = listen.parse().unwrap();
            check_topology(&stack.service_config(idc, listen, token), idc, &stack, true);
        }
        let paths = stack.write_service_configs(dir.path(), token).unwrap();
        assert_eq!(
            paths,
            vec![
                dir.path().join(SERVICE_CONFIG),
                dir.path().join(SERVICE_CONFIG_SH_A)
            ]
        );
        let bj = std::fs::read_to_string(&paths[0]).unwrap();
        let topo = check_topology(&bj, "bj-a", &stack, true);
        let app: serde_json::Value = topo.app().unwrap();
        assert_eq!(app["listen"], "127.0.1.100:18090");
        let sh = std::fs::read_to_string(&paths[1]).unwrap();
        let app: serde_json::Value = check_topology(&sh, "sh-a", &stack, true).app().unwrap();
        assert_eq!(app["listen"], "127.0.3.100:18090");

        // A fault: the Redis master is killed, the sentinels promote a replica.
        let switch = stack.kill_redis_master().await.unwrap();
        println!("{switch}");
        assert_eq!(switch.from_addr, master);
        assert_ne!(switch.to_addr, master);
        assert_eq!(stack.redis().master().await.unwrap(), switch.to_addr);
        let pong = stack
            .redis()
            .redis_cmd(switch.to_addr, &["SET", "k", "v"])
            .await;
        assert_eq!(
            pong.unwrap().as_str(),
            Some("OK"),
            "the new master takes writes"
        );
        let old = servers.iter().find(|s| s.name == switch.from).unwrap();
        assert!(!pid_alive(old.pid), "the old master is gone");

        // The MariaDB primary is killed, the HA simulator promotes a replica.
        let switch = stack.kill_mysql_primary().await.unwrap();
        println!("{switch}");
        assert_eq!(switch.from, primary.name);
        assert_eq!(stack.mariadb().primary().addr, switch.to_addr);

        // Stop: no server process is left.
        let pids = stack.pids();
        assert_eq!(
            pids.len(),
            3 + 3 + 3 + 4 - 2,
            "every server but the two killed: {pids:?}"
        );
        stack.stop().await;
        for (name, pid) in pids {
            assert!(!pid_alive(pid), "{name} (pid {pid}) survived stop");
        }
    };
    tokio::time::timeout(TEST_BOUND, run)
        .await
        .expect("the test finished within its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mq_the_stack_has_no_events_and_planned_switches_work() {
    let run = async {
        let stack = Stack::start(StackOptions::default().with_mq(false))
            .await
            .unwrap();
        println!("stack without mq up in {:?}", stack.startup().total);
        assert!(stack.rocketmq().is_none());
        assert!(stack.startup().rocketmq.is_none());
        let text = stack.service_config("bj-a", "127.0.1.100:18090".parse().unwrap(), "t\"ok\\en");
        check_topology(&text, "bj-a", &stack, false);
        assert!(stack.kill_broker("bj-a").await.is_err(), "no RocketMQ");

        let switch = stack.mysql_switchover().await.unwrap();
        println!("{switch}");
        assert_ne!(switch.from, switch.to);
        let switch = stack.redis_failover().await.unwrap();
        println!("{switch}");
        assert_ne!(switch.from_addr, switch.to_addr);
        // Freeze and thaw by role.
        let frozen = stack.freeze("mysql-primary").await.unwrap();
        assert_eq!(stack.thaw(&frozen).await.unwrap(), frozen);
        assert!(stack.freeze("no-such-server").await.is_err());

        let pids = stack.pids();
        assert_eq!(pids.len(), 9);
        stack.stop().await;
        for (name, pid) in pids {
            assert!(!pid_alive(pid), "{name} (pid {pid}) survived stop");
        }
    };
    tokio::time::timeout(TEST_BOUND, run)
        .await
        .expect("the test finished within its bound");
}

// === partitions ===

/// Whether a helper process placed in `idc`'s cgroup connects to `addr` within 1 s. The shell
/// waits for its go line, written once the pid is in the cgroup, so its socket is opened
/// inside the IDC.
async fn connects_from(stack: &Stack, idc: &str, addr: SocketAddr) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("read -r go && exec timeout 1 bash -c 'exec 3<>/dev/tcp/$0/$1' \"$0\" \"$1\"")
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    stack.place(idc, child.id().unwrap()).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the helper ends within its own timeout")
        .unwrap()
        .success()
}

/// Polls the sentinel at `sentinel` until it names a master other than `old` (bounded).
async fn sentinel_moves_from(stack: &Stack, sentinel: SocketAddr, old: SocketAddr) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = stack
            .redis()
            .sentinel_cmd(
                sentinel,
                &["SENTINEL", "get-master-addr-by-name", "members"],
            )
            .await
            .unwrap();
        let items = r.items();
        let addr: Option<SocketAddr> = match (items.first(), items.get(1)) {
            (Some(ip), Some(port)) => {
                format!("{}:{}", ip.as_str().unwrap(), port.as_str().unwrap())
                    .parse()
                    .ok()
            }
            _ => None,
        };
        if let Some(a) = addr
            && a != old
        {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sentinel {sentinel} still names {old}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_cuts_an_idc_and_its_placed_processes_in_every_lab_and_heals() {
    if !ha_lab::partition::nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let run = async {
        let stack = Stack::start(StackOptions::default()).await.unwrap();
        let redis = |idc: &str| {
            let n = stack.redis().nodes.iter().find(|n| n.idc == idc).unwrap();
            n.addr
        };
        let sentinel = |idc: &str| {
            let n = stack
                .redis()
                .sentinels
                .iter()
                .find(|n| n.idc == idc)
                .unwrap();
            n.addr
        };
        let maria = |idc: &str| stack.mariadb().node(idc).unwrap().addr;
        let mq = stack.rocketmq().unwrap();
        let namesrv = |idc: &str| mq.namesrv_addr(idc).unwrap();
        let broker = |idc: &str| mq.broker_addr(idc).unwrap();

        // Whole: a process in bj-a reaches sh-a's servers and one in sh-a bj-a's.
        assert!(connects_from(&stack, "bj-a", redis("sh-a")).await);
        assert!(connects_from(&stack, "bj-a", maria("sh-a")).await);
        assert!(connects_from(&stack, "sh-a", namesrv("bj-a")).await);
        let master = stack.redis().master().await.unwrap();
        let primary = stack.mariadb().primary();
        let seen = stack.mariadb().ha_events().len();

        let cut = stack.partition("bj-a").unwrap();
        assert_eq!(cut.idc(), "bj-a");
        // Inside bj-a: its own servers only.
        assert!(connects_from(&stack, "bj-a", redis("bj-a")).await);
        assert!(connects_from(&stack, "bj-a", sentinel("bj-a")).await);
        assert!(connects_from(&stack, "bj-a", namesrv("bj-a")).await);
        assert!(!connects_from(&stack, "bj-a", redis("sh-a")).await);
        assert!(!connects_from(&stack, "bj-a", sentinel("bj-b")).await);
        assert!(!connects_from(&stack, "bj-a", maria("bj-b")).await);
        assert!(!connects_from(&stack, "bj-a", namesrv("sh-a")).await);
        // Outside: everything but bj-a.
        assert!(!connects_from(&stack, "sh-a", redis("bj-a")).await);
        assert!(!connects_from(&stack, "sh-a", maria("bj-a")).await);
        assert!(!connects_from(&stack, "sh-a", broker("bj-a")).await);
        assert!(!connects_from(&stack, "bj-b", sentinel("bj-a")).await);
        assert!(connects_from(&stack, "sh-a", redis("bj-b")).await);
        assert!(connects_from(&stack, "sh-a", broker("sh-a")).await);
        assert!(connects_from(&stack, "bj-b", maria("sh-a")).await);
        // The HA decides from outside bj-a: the primary and the master there are replaced.
        let bj_a = |a: SocketAddr| stack.redis().node_at(a).is_some_and(|n| n.idc == "bj-a");
        if primary.idc == "bj-a" {
            let ev = stack
                .mariadb()
                .wait_ha_event(seen + 1, Duration::from_secs(20))
                .await
                .unwrap();
            assert_ne!(stack.mariadb().node(&ev.to).unwrap().idc, "bj-a");
        }
        if bj_a(master) {
            let new = sentinel_moves_from(&stack, sentinel("sh-a"), master).await;
            assert!(!bj_a(new), "{new}");
        }

        let heal = cut.heal().await.unwrap();
        println!(
            "healed after {:?}, fenced {:?}",
            heal.lasted, heal.mysql_fenced
        );
        if primary.idc == "bj-a" {
            assert_eq!(heal.mysql_fenced, vec![primary.name.clone()]);
        }
        assert!(connects_from(&stack, "bj-a", redis("sh-a")).await);
        assert!(connects_from(&stack, "bj-a", maria("bj-b")).await);
        assert!(connects_from(&stack, "sh-a", broker("bj-a")).await);
        let settled = stack.settle(Duration::from_secs(45)).await.unwrap();
        println!("{settled}");
        assert_eq!(settled.mq_registered, Some(true));
        if primary.idc == "bj-a" {
            assert_eq!(settled.mysql_not_replicating, vec![primary.name.clone()]);
            assert_eq!(settled.mysql_caught_up.len(), 1);
        }
        if bj_a(master) {
            assert!(!bj_a(settled.redis_master));
        }

        // Dropping the guard heals too.
        let cut = stack.partition("sh-a").unwrap();
        assert!(!connects_from(&stack, "bj-a", redis("sh-a")).await);
        drop(cut);
        assert!(connects_from(&stack, "bj-a", redis("sh-a")).await);
        assert!(stack.partition("nowhere").is_err());

        // An IDC whose MariaDB node is down (killed before, as the demo's earlier phases do)
        // heals without fencing it.
        let primary_idc = stack.mariadb().primary().idc;
        let down = ["bj-b", "sh-a"]
            .into_iter()
            .find(|i| *i != primary_idc)
            .unwrap();
        stack.mariadb().kill(down).await.unwrap();
        let heal = stack.partition(down).unwrap().heal().await.unwrap();
        assert!(heal.mysql_fenced.is_empty(), "{heal:?}");
        assert!(connects_from(&stack, "bj-a", redis(down)).await);
        stack.stop().await;
    };
    tokio::time::timeout(TEST_BOUND, run)
        .await
        .expect("the test finished within its bound");
}

// === the CLI: `ha-lab up --stack` ===

const BIN: &str = env!("CARGO_BIN_EXE_ha-lab");

fn ha_lab(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let (sub, rest) = args.split_first().unwrap();
    let out = std::process::Command::new(BIN)
        .arg(sub)
        .arg("--dir")
        .arg(dir)
        .args(rest)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Takes the stack down even when an assertion panics; then SIGKILLs any server (and the
/// daemon) `lab.json` listed that still runs.
struct Down<'a>(&'a std::path::Path, Vec<u32>);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = ha_lab(self.0, &["down"]);
        for pid in &self.1 {
            if pid_alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn stack_pids(dir: &std::path::Path) -> Vec<u32> {
    let m = ha_lab::lab::Manifest::read(dir).unwrap();
    let mut pids: Vec<u32> = m
        .servers
        .iter()
        .map(|s| s.pid)
        .filter(|p| *p != 0)
        .collect();
    pids.push(m.daemon_pid);
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[test]
fn the_cli_runs_the_stack_writes_configs_applies_faults_and_takes_it_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut guard = Down(d, Vec::new());
    let (ok, out) = ha_lab(
        d,
        &[
            "up",
            "--stack",
            "--admin-token",
            "tok",
            "--timeout-secs",
            "90",
        ],
    );
    if ha_lab::lab::Manifest::read(d).is_ok() {
        guard.1 = stack_pids(d);
    }
    assert!(ok, "{out}");
    println!("{out}");
    for f in [SERVICE_CONFIG, SERVICE_CONFIG_SH_A] {
        let path = d.join(f);
        assert!(out.contains(&path.display().to_string()), "{out}");
        let text = std::fs::read_to_string(&path).unwrap();
        let topo = ha_core::Topology::from_toml_str(&text, &path).unwrap();
        assert!(topo.dependency("events").is_some());
        let app: serde_json::Value = topo.app().unwrap();
        assert_eq!(app["admin"]["token"], "tok");
    }
    let (ok, out) = ha_lab(d, &["status"]);
    assert!(ok, "{out}");
    for name in [
        "sentinel-sh-a",
        "mariadb-bj-b",
        "rocketmq-broker-sh-a",
        "db-dns-north",
    ] {
        assert!(out.contains(name), "{name} in\n{out}");
    }

    let (ok, out) = ha_lab(d, &["fault", "kill", "redis-master"]);
    assert!(ok && out.contains("redis master redis-"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "switchover", "mysql"]);
    assert!(ok && out.contains("mysql primary mariadb-bj-a"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "kill", "mq-broker@bj-a"]);
    assert!(ok, "{out}");
    let (ok, out) = ha_lab(d, &["status"]);
    assert!(!ok, "two servers are down:\n{out}");
    let (ok, out) = ha_lab(d, &["fault", "restart", "mq-broker@bj-a"]);
    assert!(ok && out.contains("registered"), "{out}");
    // By IDC: the killed master of bj-a comes back as a replica; bj-b's sentinel frozen and
    // thawed.
    let (ok, out) = ha_lab(d, &["fault", "restart", "redis@bj-a"]);
    assert!(ok && out.contains("redis-bj-a"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "freeze", "sentinel@bj-b"]);
    assert!(ok && out.contains("sentinel-bj-b"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "thaw", "sentinel@bj-b"]);
    assert!(ok && out.contains("sentinel-bj-b"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "kill", "redis@no-such-idc"]);
    assert!(!ok && out.contains("unknown server"), "{out}");
    let (ok, out) = ha_lab(d, &["status"]);
    assert!(ok, "everything is back:\n{out}");
    let (ok, out) = ha_lab(d, &["fault", "kill", "no-such-server"]);
    assert!(!ok && out.contains("unknown server"), "{out}");

    // `run --idc` moves itself into the IDC's cgroup, then executes the command.
    let (ok, out) = ha_lab(
        d,
        &["run", "--idc", "sh-a", "--", "cat", "/proc/self/cgroup"],
    );
    assert!(
        ok && out.contains("halab/") && out.contains("-sh-a"),
        "{out}"
    );
    let (ok, out) = ha_lab(d, &["run", "--idc", "nowhere", "--", "true"]);
    assert!(!ok && out.contains("unknown idc"), "{out}");
    let (ok, out) = ha_lab(d, &["place", "--idc", "bj-b", "--pid", "999999999"]);
    assert!(!ok && out.contains("999999999"), "{out}");
    // A partition of sh-a held by the daemon cuts a process placed in sh-a from bj-a's Redis
    // node (a TCP connect, bounded by `timeout`); the heal restores it.
    let redis_bj_a = ha_lab::lab::Manifest::read(d)
        .unwrap()
        .servers
        .iter()
        .find(|s| s.name == "redis-bj-a")
        .unwrap()
        .address;
    let connect = format!("exec 3<>/dev/tcp/{}/{}", redis_bj_a.ip(), redis_bj_a.port());
    let reach = || {
        ha_lab(
            d,
            &[
                "run", "--idc", "sh-a", "--", "timeout", "3", "bash", "-c", &connect,
            ],
        )
    };
    let (ok, out) = reach();
    assert!(ok, "before the partition: {out}");
    let (ok, out) = ha_lab(d, &["fault", "partition", "sh-a"]);
    assert!(ok && out.contains("partitioned sh-a"), "{out}");
    let (ok, out) = ha_lab(d, &["fault", "partition", "sh-a"]);
    assert!(ok && out.contains("already partitioned"), "{out}");
    let (ok, out) = reach();
    assert!(
        !ok,
        "a process placed in sh-a reached bj-a's Redis during the partition: {out}"
    );
    let (ok, out) = ha_lab(d, &["fault", "heal", "sh-a"]);
    assert!(ok && out.contains("healed sh-a"), "{out}");
    let (ok, out) = reach();
    assert!(ok, "after the heal: {out}");

    let pids = stack_pids(d);
    guard.1 = pids.clone();
    let (ok, out) = ha_lab(d, &["down"]);
    assert!(ok, "{out}");
    for pid in pids {
        // The daemon is gone once `down` returns; its children were reaped before it exited.
        assert!(!pid_alive(pid), "pid {pid} survived down");
    }
    assert!(!d.join("lab.json").exists());
}
