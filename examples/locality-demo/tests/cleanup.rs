//! The demo removes the temporary directory of its topology file, after a run and after a
//! failed start. One test in its own binary (its own pid names the directories it may create).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use locality_demo::{Options, Phase};

/// Directories under the temp dir that a run of this process created.
fn leftovers() -> Vec<PathBuf> {
    let mine = format!("locality-demo-{}", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == mine || name.starts_with(&format!("{mine}-"))
        })
        .map(|e| e.path())
        .collect()
}

fn options(offset: u16) -> Options {
    Options {
        phases: vec![Phase::Steady],
        seconds_per_phase: 2.0,
        rate: 100,
        port_offset: offset,
        config_dir: None,
        progress: false,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_temporary_topology_directory_never_outlives_the_run() {
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The start fails: the north DNS address is taken.
    let offset = 2600u16;
    let held = std::net::UdpSocket::bind(("127.0.1.53", 15353 + offset)).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), locality_demo::run(options(offset)))
        .await
        .expect("a failed start returns at once")
        .unwrap_err();
    assert!(err.to_string().contains("127.0.1.53"), "{err}");
    assert!(
        leftovers().is_empty(),
        "after a failed start: {:?}",
        leftovers()
    );
    drop(held);

    // A whole run.
    let report = tokio::time::timeout(Duration::from_secs(60), locality_demo::run(options(offset)))
        .await
        .expect("a one-phase run ends within 60s")
        .expect("the demo runs");
    assert!(!report.config_kept);
    assert!(!report.config.exists(), "{}", report.config.display());
    assert!(leftovers().is_empty(), "after a run: {:?}", leftovers());
}
