//! The demo's tuning and the topology TOML it writes (and the client then reads back, exactly as
//! a service reads its file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::DemoError;
use crate::lab::{DNS_NAME, IDCS, Ports};

/// Timings of the client, shortened so each phase fits in a few seconds. A production service
/// keeps ha-core's defaults (TTL clamps 1 s–300 s, stale for 300 s, ejection 2 s–60 s, failback
/// hold 5 s, deadline 2 s, per-try 500 ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Overall deadline of one call (all tries).
    pub deadline: Duration,
    /// Timeout of one try: a blackholed endpoint costs one try, not the deadline.
    pub try_timeout: Duration,
    /// Tries per call, the first included.
    pub max_attempts: u32,
    /// Retry budget: retries per request over 10 s.
    pub budget_ratio: f32,
    /// Retry budget: retries per second always allowed.
    pub budget_floor_per_sec: u32,
    /// TCP connect timeout of the hyper client.
    pub connect_timeout: Duration,
    /// `[dns] query_timeout`.
    pub dns_query_timeout: Duration,
    /// `[dns] retry_interval`.
    pub dns_retry_interval: Duration,
    /// `[dns] serve_stale_for`.
    pub serve_stale_for: Duration,
    /// `[health] consecutive_failures`.
    pub consecutive_failures: u32,
    /// `[health] base_ejection`.
    pub base_ejection: Duration,
    /// `[health] max_ejection`.
    pub max_ejection: Duration,
    /// `[balance] failback_hold`.
    pub failback_hold: Duration,
    /// `[balance] overprovisioning`.
    pub overprovisioning: f64,
}

impl Tuning {
    /// The demo's tuning for phases of `phase_secs` seconds: stale answers are served for at
    /// least twice a phase, so the "all DNS down" phase stays within the bound.
    pub fn for_phase(phase_secs: f64) -> Tuning {
        let stale = (phase_secs * 2.0).max(10.0);
        Tuning {
            deadline: Duration::from_secs(1),
            try_timeout: Duration::from_millis(200),
            max_attempts: 3,
            budget_ratio: 0.5,
            budget_floor_per_sec: 50,
            connect_timeout: Duration::from_millis(150),
            dns_query_timeout: Duration::from_millis(250),
            dns_retry_interval: Duration::from_millis(500),
            serve_stale_for: Duration::from_secs_f64(stale.ceil()),
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
            failback_hold: Duration::from_secs(2),
            overprovisioning: 1.4,
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The topology TOML for `ports` and `tuning`, with comments saying what is shortened for the
/// demo. The failover settings are not part of the topology file (they are code, per call
/// site); they are listed in a comment.
pub fn topology_toml(ports: Ports, tuning: &Tuning) -> String {
    let t = tuning;
    let mut s = String::new();
    s.push_str(
        "# Written by locality-demo. Copy it as a starting point for a service's topology file.\n\
         # Timings are SHORTENED so each demo phase fits in a few seconds; production values\n\
         # (ha-core's defaults) are given in the comments.\n\
         #\n",
    );
    s.push_str(&format!(
        "# Failover (set in code with ha_core::failover::Failover::builder(), not in this file):\n\
         #   deadline {} (default 2s), try_timeout {} (default 500ms), max_attempts {},\n\
         #   budget {} retries/request + {}/s (default 0.2 + 10/s), policy Idempotent (GET).\n\n",
        ms(t.deadline),
        ms(t.try_timeout),
        t.max_attempts,
        t.budget_ratio,
        t.budget_floor_per_sec
    ));
    s.push_str("local_idc = \"bj-a\"   # HA_IDC in the environment wins over this\n\n");
    s.push_str(&format!(
        "[[regions]]\nname = \"north\"\nresolvers = [\"127.0.1.53:{p}\"]\n\n\
         [[regions]]\nname = \"south\"\nresolvers = [\"127.0.3.53:{p}\"]\n\n",
        p = ports.dns
    ));
    for (idc, region, octet) in IDCS {
        s.push_str(&format!(
            "[[idcs]]\nname = \"{idc}\"\nregion = \"{region}\"\ncidrs = [\"127.0.{octet}.0/24\"]\ncapacity_rps = 400\n\n"
        ));
    }
    s.push_str(&format!(
        "[dns]\n\
         min_ttl = \"1s\"\n\
         max_ttl = \"30s\"                 # default 300s\n\
         refresh_ahead = 0.5             # default 0.75; here the fallback (250ms timeout) ends before the 1s TTL\n\
         serve_stale_for = \"{}s\"         # default 300s; here 2 phases (at least 10s)\n\
         query_timeout = \"{}\"        # default 1s\n\
         retry_interval = \"{}\"       # default 1s\n\n",
        t.serve_stale_for.as_secs(),
        ms(t.dns_query_timeout),
        ms(t.dns_retry_interval)
    ));
    s.push_str(&format!(
        "[health]\n\
         consecutive_failures = {}        # default 5\n\
         failure_rate = 0.5\n\
         failure_rate_min_requests = 20\n\
         window = \"5s\"                   # default 10s\n\
         base_ejection = \"{}\"         # default 2s\n\
         max_ejection = \"{}\"          # default 60s\n\
         max_ejected_percent = 50\n\n",
        t.consecutive_failures,
        ms(t.base_ejection),
        ms(t.max_ejection)
    ));
    s.push_str(&format!(
        "[balance]\n\
         overprovisioning = {}\n\
         panic_threshold = 0.5\n\
         failback_hold = \"{}\"         # default 5s\n\
         ewma_decay = \"2s\"               # default 10s\n\n",
        t.overprovisioning,
        ms(t.failback_hold)
    ));
    s.push_str(&format!(
        "[dependencies.profile]\n\
         port = {}\n\
         dns = {{ north = \"{DNS_NAME}\", south = \"{DNS_NAME}\" }}\n\
         allowed_cidrs = [\"127.0.1.0/24\", \"127.0.2.0/24\", \"127.0.3.0/24\"]\n",
        ports.proxy
    ));
    s
}

/// Writes the topology file into `dir` (created if missing) and returns its path.
pub fn write_topology(dir: &Path, ports: Ports, tuning: &Tuning) -> Result<PathBuf, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("topology.toml");
    std::fs::write(&path, topology_toml(ports, tuning)).map_err(|source| DemoError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// A directory of the demo's own under the system's temp dir (`locality-demo-<pid>-<n>`, created
/// new, never reused), removed with its contents on drop: no run leaves one behind, whether it
/// ends, fails to start or is interrupted.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty directory.
    pub fn create() -> Result<TempDir, DemoError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        let pid = std::process::id();
        for _ in 0..1000 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("locality-demo-{pid}-{n}"));
            // create_dir, not create_dir_all: an existing name (or a planted link) is skipped.
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(DemoError::Io { path, source }),
            }
        }
        Err(DemoError::Io {
            path: base,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "no free locality-demo-<pid>-<n> name",
            ),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn written_toml_is_a_valid_topology() {
        let ports = Ports::with_offset(0).unwrap();
        let tuning = Tuning::for_phase(5.0);
        let topo = ha_core::Topology::from_toml_str(&topology_toml(ports, &tuning), "t.toml")
            .expect("valid topology");
        assert_eq!(&*topo.local_idc().name, "bj-a");
        assert_eq!(topo.balance().failback_hold, tuning.failback_hold);
        assert_eq!(topo.health().max_ejection, tuning.max_ejection);
        assert_eq!(topo.dns().serve_stale_for, Duration::from_secs(10));
        let dep = topo.dependency("profile").unwrap();
        assert!(!dep.allows(crate::lab::POISON_IP.into()));
        assert!(dep.allows("127.0.2.12".parse().unwrap()));
    }

    #[test]
    fn a_temp_dir_is_new_and_removed_on_drop() {
        let a = TempDir::create().unwrap();
        let b = TempDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("topology.toml"), "x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
        assert!(b.path().is_dir());
    }
}
