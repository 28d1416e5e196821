#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The supervisor with `sleep`, `sh -c` and a real `redis-server`.

use std::{net::SocketAddr, time::Duration};

use ha_lab::{
    LabError,
    process::{Readiness, ServerSpec, Supervisor},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0): look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` is gone.
async fn gone(pid: u32) -> bool {
    timeout(Duration::from_secs(5), async {
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

fn sleep_spec(name: &str) -> ServerSpec {
    let mut spec = ServerSpec::new(name, "sleep", "coreutils", "127.0.1.1:1".parse().unwrap());
    spec.args = vec!["300".into()];
    spec.ready = Readiness::Immediate;
    spec
}

#[tokio::test]
async fn start_kill_restart_and_drop_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let pid;
    let pid_sh;
    {
        let sup = Supervisor::new(dir.path());
        pid = sup.start(sleep_spec("s1")).await.unwrap();
        assert!(alive(pid));
        assert_eq!(sup.pid("s1"), Some(pid));
        assert!(matches!(
            sup.start(sleep_spec("s1")).await,
            Err(LabError::AlreadyRunning { .. })
        ));

        sup.kill("s1").await.unwrap();
        assert!(gone(pid).await);
        assert_eq!(sup.pid("s1"), None);

        let pid2 = sup.restart("s1").await.unwrap();
        assert_ne!(pid2, pid);
        assert!(alive(pid2));

        let mut sh = ServerSpec::new("sh1", "sh", "dash", "127.0.1.1:1".parse().unwrap());
        sh.args = vec!["-c".into(), "echo hello-from-sh; exec sleep 300".into()];
        sh.ready = Readiness::Immediate;
        pid_sh = sup.start(sh).await.unwrap();
        let log = dir.path().join("sh1.log");
        timeout(Duration::from_secs(5), async {
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("hello-from-sh")
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("child output reaches its log file");

        let err = sup.freeze("nope").unwrap_err();
        assert!(err.is_unknown_server(), "{err}");
        assert!(
            err.to_string().contains("s1"),
            "names the known ones: {err}"
        );
        // Drop kills everything still owned.
        drop(sup);
        assert!(gone(pid2).await, "dropped supervisor kills its children");
    }
    assert!(gone(pid_sh).await);
}

#[tokio::test]
async fn missing_binary_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(dir.path());
    let mut spec = sleep_spec("ghost");
    spec.program = "ha-lab-no-such-program".into();
    spec.package = "ghost-package".into();
    let err = sup.start(spec).await.unwrap_err();
    assert!(err.is_missing_binary());
    assert!(err.to_string().contains("ghost-package"), "{err}");
}

#[tokio::test]
async fn exit_during_start_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(dir.path());
    let mut spec = ServerSpec::new(
        "false",
        "false",
        "coreutils",
        "127.0.1.213:1".parse().unwrap(),
    );
    spec.ready = Readiness::TcpConnect("127.0.1.213:1".parse().unwrap());
    let err = sup.start(spec).await.unwrap_err();
    assert!(matches!(err, LabError::Exited { .. }), "{err}");
}

async fn ping(addr: SocketAddr, wait: Duration) -> Result<String, String> {
    timeout(wait, async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"PING\r\n").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await
    .map_err(|_| "timeout".to_string())?
}

#[tokio::test]
async fn redis_freeze_thaw_kill_restart() {
    if ha_lab::process::find_program("redis-server").is_none() {
        eprintln!("skipped: redis-server not installed (Debian package redis-server)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(dir.path());
    let addr: SocketAddr = "127.0.1.10:16379".parse().unwrap();
    let mut spec = ServerSpec::redis("redis-bj-a", addr, dir.path());
    assert_eq!(spec.ready, Readiness::TcpConnect(addr));
    spec.idc = "bj-a".into();
    let pid = sup.start(spec).await.unwrap();
    assert_eq!(
        ping(addr, Duration::from_secs(3)).await.unwrap(),
        "+PONG\r\n"
    );

    sup.freeze("redis-bj-a").unwrap();
    assert_eq!(
        ping(addr, Duration::from_millis(500)).await.unwrap_err(),
        "timeout",
        "a frozen server accepts (kernel backlog) but never answers"
    );
    sup.thaw("redis-bj-a").unwrap();
    assert_eq!(
        ping(addr, Duration::from_secs(3)).await.unwrap(),
        "+PONG\r\n"
    );

    // Kill while frozen still works.
    sup.freeze("redis-bj-a").unwrap();
    sup.kill("redis-bj-a").await.unwrap();
    assert!(gone(pid).await);
    assert!(ping(addr, Duration::from_secs(1)).await.is_err());
    assert!(sup.freeze("redis-bj-a").is_err());

    let pid2 = sup.restart("redis-bj-a").await.unwrap();
    assert_ne!(pid, pid2);
    assert_eq!(
        ping(addr, Duration::from_secs(3)).await.unwrap(),
        "+PONG\r\n"
    );
    sup.stop_all().await;
    assert!(gone(pid2).await);
}

/// A plain listener holding `ip:0`, closed on drop.
fn occupy(ip: &str) -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

#[tokio::test]
async fn a_stranger_on_the_port_is_not_our_child_being_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (_held, addr) = occupy("127.0.1.214");
    let sup = Supervisor::new(dir.path()).with_ready_timeout(Duration::from_secs(1));

    // Alive but never listening: the port answers, but not from our child.
    let mut spec = ServerSpec::new("idle", "sleep", "coreutils", addr);
    spec.args = vec!["300".into()];
    let err = sup.start(spec).await.unwrap_err();
    assert!(err.is_address_in_use(), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert_eq!(sup.pid("idle"), None, "the failed child is killed");

    // Dies at once, as a server does when its address is taken.
    let mut spec = ServerSpec::new("dies", "sh", "dash", addr);
    spec.args = vec![
        "-c".into(),
        "echo 'bind: Address already in use' >&2; exit 1".into(),
    ];
    let err = sup.start(spec).await.unwrap_err();
    assert!(err.is_address_in_use(), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(err.to_string().contains("exit status: 1"), "{err}");
}

#[tokio::test]
async fn redis_on_a_taken_port_is_an_error_naming_the_address() {
    if ha_lab::process::find_program("redis-server").is_none() {
        eprintln!("skipped: redis-server not installed (Debian package redis-server)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_held, addr) = occupy("127.0.1.215");
    let sup = Supervisor::new(dir.path());
    let err = sup
        .start(ServerSpec::redis("redis-taken", addr, dir.path()))
        .await
        .unwrap_err();
    assert!(err.is_address_in_use(), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn a_listener_in_the_childs_process_group_is_ready() {
    if ha_lab::process::find_program("redis-server").is_none() {
        eprintln!("skipped: redis-server not installed (Debian package redis-server)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(dir.path());
    let addr: SocketAddr = "127.0.1.216:16380".parse().unwrap();
    // `sh` without `exec`: the listening socket belongs to a grandchild of the same group.
    let redis = ServerSpec::redis("redis-sh", addr, dir.path());
    let mut spec = ServerSpec::new("redis-sh", "sh", "dash", addr);
    spec.args = vec![
        "-c".into(),
        "redis-server \"$@\"; echo redis exited".into(),
        "sh".into(),
    ];
    spec.args.extend(redis.args);
    let pid = sup.start(spec).await.unwrap();
    assert_eq!(
        ping(addr, Duration::from_secs(3)).await.unwrap(),
        "+PONG\r\n"
    );
    sup.kill("redis-sh").await.unwrap();
    assert!(gone(pid).await);
    assert!(ping(addr, Duration::from_secs(1)).await.is_err());
}
