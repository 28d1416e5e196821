//! Processes placed in an IDC for partitions: a cgroup (v2) per IDC whose sockets a partition
//! matches (`socket cgroupv2` in nftables).
//!
//! Every lab process talks over loopback, and a process that does not bind its source address
//! (a MariaDB replica's replication connection, a service whose Redis and MySQL clients cannot
//! bind one) sends from `127.0.0.1`, which is in no IDC: an address-based partition cannot
//! tell a `bj-b` replica from a `sh-a` one. Moving the process into its IDC's [`IdcCgroup`]
//! makes a partition ([`Scope::partition_members`](crate::partition::Scope::partition_members))
//! cut its connections exactly as its IDC's addresses are cut. Only sockets created after the
//! move are matched, so move a process before it connects.
//!
//! The cgroup lives at `<cgroup v2 mount>/halab/<name>`; nftables names it relative to
//! `/sys/fs/cgroup`, so the v2 hierarchy must be mounted at or under `/sys/fs/cgroup` (both
//! the unified layout and the hybrid one, `/sys/fs/cgroup/unified`, are). Needs root. On drop
//! the cgroup's processes are moved back to the root cgroup and the directory is removed.
//!
//! ```no_run
//! # fn demo(replica_pid: u32) -> Result<(), ha_lab::LabError> {
//! use ha_lab::cgroup::IdcCgroup;
//! let bj_b = IdcCgroup::create("t1-bj-b")?;
//! bj_b.add(replica_pid)?;
//! assert!(bj_b.nft_match().starts_with("socket cgroupv2 level 2 "));
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use crate::LabError;

/// Where nftables resolves cgroup v2 paths from.
const NFT_BASE: &str = "/sys/fs/cgroup";

/// One IDC's cgroup. See the [module docs](self).
#[derive(Debug)]
pub struct IdcCgroup {
    /// The cgroup v2 mount point.
    root: PathBuf,
    /// `<root>/halab/<name>`.
    dir: PathBuf,
    /// The path nftables resolves (relative to [`NFT_BASE`]).
    nft_path: String,
    /// Depth below the v2 root (2 for `halab/<name>`).
    level: usize,
}

/// The cgroup v2 mount point, from `/proc/self/mounts`.
fn v2_mount() -> Result<PathBuf, LabError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| LabError::io("read /proc/self/mounts", e))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(at))
        })
        .next()
        .ok_or_else(|| LabError::Control("no cgroup v2 hierarchy is mounted".into()))
}

/// The nftables path of `dir` (under `root`, the v2 mount), or why it has none.
fn nft_path(root: &Path, dir: &Path) -> Result<String, LabError> {
    let rel = dir.strip_prefix(NFT_BASE).map_err(|_| {
        LabError::Control(format!(
            "the cgroup v2 hierarchy is mounted at {}, outside {NFT_BASE}: nftables cannot name its cgroups",
            root.display()
        ))
    })?;
    Ok(rel.to_string_lossy().into_owned())
}

impl IdcCgroup {
    /// Creates (or reuses) the cgroup `halab/<name>`. `name` is one path component of
    /// letters, digits, `-` and `_` (e.g. `21875-bj-b`: make it unique per lab).
    pub fn create(name: &str) -> Result<IdcCgroup, LabError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(LabError::Control(format!(
                "cgroup name {name:?}: use letters, digits, '-' and '_'"
            )));
        }
        let root = v2_mount()?;
        let dir = root.join("halab").join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("create cgroup {}", dir.display()), e))?;
        let nft_path = nft_path(&root, &dir)?;
        Ok(IdcCgroup {
            root,
            dir,
            nft_path,
            level: 2,
        })
    }

    /// Moves process `pid` (all its threads) into the cgroup; its children follow it.
    pub fn add(&self, pid: u32) -> Result<(), LabError> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| LabError::io(format!("move pid {pid} into {}", self.dir.display()), e))
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The nftables match of the cgroup's sockets, e.g.
    /// `socket cgroupv2 level 2 "unified/halab/t1-bj-b"`.
    pub fn nft_match(&self) -> String {
        format!("socket cgroupv2 level {} \"{}\"", self.level, self.nft_path)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for IdcCgroup {
    fn drop(&mut self) {
        let root_procs = self.root.join("cgroup.procs");
        for pid in self.pids() {
            let _ = std::fs::write(&root_procs, pid.to_string());
        }
        // A process killed just before (the lab's servers) leaves its cgroup a moment after
        // it was reaped: retry, bounded.
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                // At most 2 s (200 × 10 ms).
                Err(e) if tries >= 200 => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a lab cgroup");
                    return;
                }
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_one_plain_component() {
        for bad in ["", "a/b", "..", "a b", "bj-a\n"] {
            assert!(IdcCgroup::create(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nftables_names_cgroups_relative_to_sys_fs_cgroup() {
        let p = nft_path(
            Path::new("/sys/fs/cgroup/unified"),
            Path::new("/sys/fs/cgroup/unified/halab/x"),
        )
        .unwrap();
        assert_eq!(p, "unified/halab/x");
        let p = nft_path(
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/halab/x"),
        )
        .unwrap();
        assert_eq!(p, "halab/x");
        let e = nft_path(Path::new("/cg"), Path::new("/cg/halab/x")).unwrap_err();
        assert!(e.to_string().contains("outside /sys/fs/cgroup"), "{e}");
    }
}
