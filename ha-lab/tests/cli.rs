#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `ha-lab` binary end to end: up, status, fault, down (ports shifted by 1200).

use std::{path::Path, process::Command, time::Duration};

use ha_lab::{lab::Manifest, process::pid_alive};

const BIN: &str = env!("CARGO_BIN_EXE_ha-lab");

fn ha_lab(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    let (sub, rest) = args.split_first().unwrap();
    cmd.arg(sub).arg("--dir").arg(dir).args(rest);
    let out = cmd.output().unwrap();
    assert!(
        !out.stderr.contains(&0x1b),
        "no colour codes on a stderr that is not a terminal: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Takes the lab down (and, failing that, kills its daemon) even when an assertion panics.
struct Down<'a> {
    dir: &'a Path,
    pid: Option<u32>,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = ha_lab(self.dir, &["down"]);
        if let Some(pid) = self.pid
            && pid_alive(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    // Bounded by a count of short polls (about 10 s).
    for _ in 0..500 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// One keep-alive `GET /who` on `conn`, read to the end of its body; returns how long it took.
#[allow(clippy::disallowed_types)] // a blocking test: no tokio clock to follow
fn get_who(conn: &mut std::net::TcpStream) -> Duration {
    use std::io::{Read, Write};
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = std::time::Instant::now();
    conn.write_all(b"GET /who HTTP/1.1\r\nHost: lab\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{text}");
                return t.elapsed();
            }
        }
    }
}

#[test]
fn up_status_fault_down() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut guard = Down { dir, pid: None };

    let (ok, out, err) = ha_lab(
        dir,
        &["up", "--port-offset", "1200", "--timeout-secs", "20"],
    );
    assert!(ok, "up failed: {out}\n{err}");
    assert!(out.contains("proxy-bj-a-1"), "{out}");
    let m = Manifest::read(dir).unwrap();
    guard.pid = Some(m.daemon_pid);
    assert!(pid_alive(m.daemon_pid));
    assert_eq!(
        m.server("dns-south").unwrap().address.to_string(),
        "127.0.3.53:16553"
    );

    let log = std::fs::read(dir.join("daemon.log")).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("lab started"),
        "the daemon logs to daemon.log"
    );
    assert!(
        !log.contains(&0x1b),
        "no colour codes in daemon.log: {:?}",
        String::from_utf8_lossy(&log)
    );

    let (ok, out, err) = ha_lab(dir, &["status"]);
    assert!(ok, "status: {out}\n{err}");
    assert!(out.contains("running") && !out.contains("DOWN"), "{out}");

    // `fault latency MS`: what a request/response round trip through the proxy gains.
    let proxy = m.server("proxy-bj-a-1").unwrap().address;
    let mut conn = std::net::TcpStream::connect(proxy).unwrap();
    get_who(&mut conn);
    let (ok, out, err) = ha_lab(dir, &["fault", "latency", "300", "proxy-bj-a-1"]);
    assert!(ok, "latency: {out}\n{err}");
    assert!(out.contains("per round trip"), "{out}");
    let took = get_who(&mut conn);
    let ms = Duration::from_millis(300);
    assert!(took >= ms, "a round trip gains the latency: {took:?}");
    assert!(took < ms * 2, "not the latency in each direction: {took:?}");
    let (ok, out, err) = ha_lab(dir, &["fault", "latency", "100", "proxy-bj-a-1"]);
    assert!(ok, "latency: {out}\n{err}");
    let (ok, out, err) = ha_lab(dir, &["fault", "heal", "proxy-bj-a-1"]);
    assert!(ok, "heal: {out}\n{err}");

    let (ok, _, err) = ha_lab(dir, &["fault", "kill", "no-such-server"]);
    assert!(!ok);
    assert!(
        err.contains("unknown server") && err.contains("dns-north"),
        "{err}"
    );

    let (ok, out, err) = ha_lab(dir, &["fault", "kill", "who-bj-b-2"]);
    assert!(ok, "kill: {out}\n{err}");
    let (ok, out, _) = ha_lab(dir, &["status"]);
    assert!(
        !ok && out.contains("DOWN"),
        "status reports the killed server: {out}"
    );
    let (ok, out, err) = ha_lab(dir, &["fault", "restart", "who-bj-b-2"]);
    assert!(ok, "restart: {out}\n{err}");

    let (ok, _, err) = ha_lab(dir, &["up", "--port-offset", "1200"]);
    assert!(!ok && err.contains("already running"), "{err}");

    // A partition of this lab lives in its own table and cuts only its own ports; down
    // removes that table.
    let scope = m.partition_scope();
    if ha_lab::partition::nft_available() {
        assert_eq!(scope.table(), "halab_1200");
        assert_eq!(scope.ports(), Some(&[16553, 19280, 19281][..]));
        let (ok, out, err) = ha_lab(dir, &["fault", "partition", "bj-a"]);
        assert!(ok, "partition: {out}\n{err}");
        assert!(out.contains("halab_1200"), "{out}");
        let bj_a: ipnet::IpNet = "127.0.1.0/24".parse().unwrap();
        assert_eq!(scope.partitioned().unwrap(), vec![bj_a]);
        let (ok, out, err) = ha_lab(dir, &["fault", "heal", "bj-a"]);
        assert!(ok, "heal: {out}\n{err}");
        assert!(scope.partitioned().unwrap().is_empty());
        let (ok, out, err) = ha_lab(dir, &["fault", "partition", "sh-a"]);
        assert!(ok, "partition: {out}\n{err}");
    }

    let (ok, out, err) = ha_lab(dir, &["down"]);
    assert!(ok, "down: {out}\n{err}");
    wait_until("daemon gone", || !pid_alive(m.daemon_pid));
    assert!(!Manifest::path(dir).exists());
    let (ok, _, err) = ha_lab(dir, &["status"]);
    assert!(!ok, "status without a lab fails: {err}");
    if ha_lab::partition::nft_available() {
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("halab_1200"),
            "down removed the lab's table"
        );
    }
    drop(guard);
}

#[test]
fn up_refuses_a_port_offset_past_65535() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let guard = Down { dir, pid: None };
    let (ok, out, err) = ha_lab(
        dir,
        &["up", "--port-offset", "60000", "--timeout-secs", "5"],
    );
    assert!(!ok, "up with an overflowing offset must fail: {out}\n{err}");
    assert!(
        err.contains("port offset 60000") && err.contains("15353"),
        "names the offset and the port: {err}"
    );
    assert!(!Manifest::path(dir).exists(), "no daemon was started");
    drop(guard);
}

/// A process that is not a lab daemon (`sleep 300`), killed by pid and reaped on drop.
struct Stranger(std::process::Child);

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn down_does_not_signal_a_pid_that_is_no_longer_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut stranger = Stranger(Command::new("sleep").arg("300").spawn().unwrap());
    let pid = stranger.0.id();
    let start = ha_lab::process::start_time(pid).expect("start time of a running pid");

    // The daemon of this lab.json is gone and its pid was reused: the start time differs.
    let manifest = Manifest {
        servers: Vec::new(),
        control: dir.join("control.sock"),
        daemon_pid: pid,
        daemon_start: Some(start + 1),
        zone: "lab.".into(),
        service: "profile.north.lab.".into(),
        idcs: Vec::new(),
        // A table no real lab uses, so that down's heal touches nothing of anyone's.
        port_offset: 65000,
        stack: false,
    };
    manifest.write(dir).unwrap();
    let (ok, out, err) = ha_lab(dir, &["down"]);
    assert!(ok, "down: {out}\n{err}");
    assert!(
        out.contains(&format!("pid {pid}")) && out.contains("not signalled"),
        "{out}"
    );
    assert!(
        stranger.0.try_wait().unwrap().is_none(),
        "the stranger was not signalled"
    );
    assert!(!Manifest::path(dir).exists());

    // A lab.json from before start times were recorded: the command line is checked instead.
    let old = serde_json::json!({
        "servers": [],
        "control": dir.join("control.sock"),
        "daemon_pid": pid,
        "zone": "lab.",
        "service": "profile.north.lab.",
        "idcs": [],
        "port_offset": 65000,
    });
    std::fs::write(Manifest::path(dir), old.to_string()).unwrap();
    let (ok, out, err) = ha_lab(dir, &["down"]);
    assert!(ok, "down: {out}\n{err}");
    assert!(out.contains("not signalled"), "{out}");
    assert!(stranger.0.try_wait().unwrap().is_none());
    assert!(!Manifest::path(dir).exists());
}
