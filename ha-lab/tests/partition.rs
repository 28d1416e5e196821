#![allow(clippy::unwrap_used, clippy::expect_used)]
//! nftables partitions (root). Uses /32 ranges of its own so that it never cuts the traffic of
//! other tests or a running lab.

use std::{net::SocketAddr, time::Duration};

use ha_lab::partition::{Scope, heal, nft_available, partition};
use ipnet::IpNet;
use tokio::{
    net::{TcpListener, TcpSocket},
    time::timeout,
};

/// Heals on drop, so a failing assertion does not leave the partition behind.
struct Healer(IpNet);

impl Drop for Healer {
    fn drop(&mut self) {
        let _ = heal(self.0);
    }
}

async fn connect_from(src: &str, dst: SocketAddr) -> Result<(), String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    match timeout(Duration::from_millis(700), sock.connect(dst)).await {
        Err(_) => Err("timeout".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

#[tokio::test]
async fn partition_drops_between_ranges_and_heals() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let listener = TcpListener::bind("127.0.3.221:0").await.unwrap();
    let dst = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _accept = Abort(accept);

    let idc: IpNet = "127.0.1.221/32".parse().unwrap();
    connect_from("127.0.1.221", dst).await.unwrap();
    partition(idc, &["127.0.3.221/32".parse().unwrap()]).unwrap();
    let healer = Healer(idc);
    assert_eq!(
        connect_from("127.0.1.221", dst).await.unwrap_err(),
        "timeout"
    );
    connect_from("127.0.2.221", dst).await.unwrap();

    heal(idc).unwrap();
    drop(healer);
    connect_from("127.0.1.221", dst).await.unwrap();
}

#[test]
fn heal_of_unpartitioned_range_is_ok() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    heal("127.0.1.222/32".parse().unwrap()).unwrap();
}

/// The rules of `table inet halab` whose source is `ip` (0 when the table is absent).
fn rules_from(ip: &str) -> usize {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", ha_lab::partition::TABLE])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("ip saddr {ip} ")) && l.contains(" drop"))
        .count()
}

#[test]
fn concurrent_partitions_and_heals_of_two_idcs_stay_consistent() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let x: IpNet = "127.0.1.223/32".parse().unwrap();
    let y: IpNet = "127.0.2.223/32".parse().unwrap();
    let other: IpNet = "127.0.3.223/32".parse().unwrap();
    let _heal_x = Healer(x);
    let _heal_y = Healer(y);

    // Partitioning twice replaces, it does not add.
    partition(x, &[other]).unwrap();
    let once = rules_from("127.0.1.223");
    assert!(once > 0);
    partition(x, &[other]).unwrap();
    assert_eq!(
        rules_from("127.0.1.223"),
        once,
        "a second partition replaces"
    );
    heal(x).unwrap();
    assert_eq!(rules_from("127.0.1.223"), 0);

    // Each thread only ever changes its own IDC: what it sees of its IDC must be what it did,
    // whatever the other thread does to the other IDC at the same time.
    let run = move |idc: IpNet, ip: &'static str| {
        std::thread::spawn(move || -> Result<(), String> {
            for round in 0..40 {
                partition(idc, &[other]).map_err(|e| format!("round {round}: partition: {e}"))?;
                if rules_from(ip) != once {
                    return Err(format!(
                        "round {round}: {idc} not partitioned after partition"
                    ));
                }
                heal(idc).map_err(|e| format!("round {round}: heal: {e}"))?;
                if rules_from(ip) != 0 {
                    return Err(format!("round {round}: {idc} still partitioned after heal"));
                }
            }
            partition(idc, &[other]).map_err(|e| format!("last partition: {e}"))
        })
    };
    let a = run(x, "127.0.1.223");
    let b = run(y, "127.0.2.223");
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    a.unwrap();
    b.unwrap();
    assert_eq!(rules_from("127.0.1.223"), once);
    assert_eq!(rules_from("127.0.2.223"), once);
    heal(x).unwrap();
    assert_eq!(rules_from("127.0.1.223"), 0);
    assert_eq!(rules_from("127.0.2.223"), once, "healing x leaves y");
    heal(y).unwrap();
    assert_eq!(rules_from("127.0.2.223"), 0);
}

/// Deletes a scope's table on drop, so a failing assertion leaves nothing behind.
struct TableGuard(Scope);

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = self.0.heal_all();
    }
}

#[tokio::test]
async fn a_partition_of_one_lab_leaves_another_labs_ports_alone() {
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    // Two labs on the same address ranges, told apart by their ports (as two port offsets).
    let a = TcpListener::bind("127.0.3.224:0").await.unwrap();
    let b = TcpListener::bind("127.0.3.224:0").await.unwrap();
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let accept = |l: TcpListener| {
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                if let Ok((s, _)) = l.accept().await {
                    held.push(s);
                }
            }
        })
    };
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _a = Abort(accept(a));
    let _b = Abort(accept(b));
    let lab_a = Scope::lab(60001, [a_addr.port()]);
    let lab_b = Scope::lab(60002, [b_addr.port()]);
    assert_ne!(lab_a.table(), lab_b.table());
    let _guard_a = TableGuard(lab_a.clone());
    let _guard_b = TableGuard(lab_b.clone());

    let idc: IpNet = "127.0.1.224/32".parse().unwrap();
    let other: IpNet = "127.0.3.224/32".parse().unwrap();
    lab_a.partition(idc, &[other]).unwrap();
    assert_eq!(
        connect_from("127.0.1.224", a_addr).await.unwrap_err(),
        "timeout",
        "lab a's own port is cut"
    );
    connect_from("127.0.1.224", b_addr)
        .await
        .expect("lab b's port between the same ranges still connects");
    connect_from("127.0.2.224", a_addr)
        .await
        .expect("another range still reaches lab a");
    assert_eq!(lab_a.partitioned().unwrap(), vec![idc]);
    assert!(lab_b.partitioned().unwrap().is_empty());

    // Lab b's heals touch only lab b's table.
    lab_b.heal(idc).unwrap();
    lab_b.heal_all().unwrap();
    assert_eq!(lab_a.partitioned().unwrap(), vec![idc]);
    assert_eq!(
        connect_from("127.0.1.224", a_addr).await.unwrap_err(),
        "timeout"
    );

    lab_a.heal(idc).unwrap();
    connect_from("127.0.1.224", a_addr).await.unwrap();
    lab_a.heal_all().unwrap();
    assert!(lab_a.partitioned().unwrap().is_empty());
}

/// A child that connects to `dst` (from `127.0.0.1`, in no IDC) once it reads a line, and
/// prints `rc=0` when it connected, `rc=124` when the connect timed out (2 s).
fn child_connecting_to(dst: SocketAddr) -> std::process::Child {
    std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "read go; timeout 2 bash -c 'exec 3<>/dev/tcp/{}/{}'; echo rc=$?",
            dst.ip(),
            dst.port()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn go_and_read(mut child: std::process::Child) -> String {
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_process_placed_in_an_idc_is_cut_with_it() {
    use ha_lab::cgroup::IdcCgroup;
    if !nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let listener = TcpListener::bind("127.0.3.225:0").await.unwrap();
    let dst = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _accept = Abort(accept);
    let scope = Scope::lab(60003, [dst.port()]);
    let _guard = TableGuard(scope.clone());
    let bj_a = IdcCgroup::create(&format!("{}-bj-a", std::process::id())).unwrap();
    let idc: IpNet = "127.0.1.225/32".parse().unwrap();
    let other: IpNet = "127.0.3.225/32".parse().unwrap();
    // Both ways: what the member sends to sh-a (output), what sh-a's servers send to the
    // member's sockets (input, matched on the receiving socket).
    let script = scope.partition_members_script(idc, &[&bj_a], &[other], &[]);
    let out_rule = format!("{} ip daddr {{ 127.0.3.225/32 }}", bj_a.nft_match());
    let in_rule = format!(
        "_in ip saddr {{ 127.0.3.225/32 }} {} meta l4proto {{ tcp, udp }} th sport",
        bj_a.nft_match()
    );
    assert!(script.contains(&out_rule), "{script}");
    assert!(script.contains(&in_rule), "{script}");
    scope
        .partition_members(idc, &[&bj_a], &[other], &[])
        .unwrap();

    // In bj-a's cgroup: cut off from sh-a, although it sends from 127.0.0.1.
    let inside = child_connecting_to(dst);
    bj_a.add(inside.id()).unwrap();
    assert_eq!(bj_a.pids(), vec![inside.id()]);
    assert_eq!(
        go_and_read(inside),
        "rc=124",
        "a member of bj-a reached sh-a"
    );
    // The same program outside the cgroup connects.
    assert_eq!(go_and_read(child_connecting_to(dst)), "rc=0");
    // Healed: the member connects again.
    scope.heal(idc).unwrap();
    let inside = child_connecting_to(dst);
    bj_a.add(inside.id()).unwrap();
    assert_eq!(go_and_read(inside), "rc=0");
    // Dropping the cgroup removes it.
    let dir = bj_a.dir().to_owned();
    drop(bj_a);
    assert!(!dir.exists());
}
