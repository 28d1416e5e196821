//! Runs every phase of the demo in a short form against its own lab (ports +2000, so it does
//! not collide with a running demo or the ha-lab tests) and asserts each row's expectation,
//! plus a few numbers directly. The whole run is bounded by a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Duration;

use locality_demo::{Options, Phase, PhaseRow, Report};

fn row(report: &Report, phase: Phase) -> &PhaseRow {
    report
        .rows
        .iter()
        .find(|r| r.phase == phase.name())
        .unwrap_or_else(|| panic!("no row for {}", phase.name()))
}

fn share(r: &PhaseRow, idc: &str) -> f64 {
    r.share.get(idc).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_meets_its_expectation() {
    let dir = std::env::temp_dir().join(format!("locality-demo-test-{}", std::process::id()));
    let opts = Options {
        phases: Phase::ALL.to_vec(),
        seconds_per_phase: 2.5,
        rate: 200,
        port_offset: 2000,
        config_dir: Some(dir.clone()),
        progress: false,
        ..Options::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(240), locality_demo::run(opts))
        .await
        .expect("the demo finishes within 240s")
        .expect("the demo runs");
    let table = report.table();
    println!("{table}");

    // The topology the client read is the file the demo wrote, and it loads.
    assert!(report.config.starts_with(&dir));
    ha_core::Topology::load(&report.config).expect("the written topology loads");

    assert_eq!(report.rows.len(), Phase::ALL.len());
    for r in &report.rows {
        assert!(
            r.requests > 100,
            "{}: only {} calls\n{table}",
            r.phase,
            r.requests
        );
        assert!(r.pass, "{} failed\n{table}", r.phase);
    }
    assert!(report.pass);

    let steady = row(&report, Phase::Steady);
    assert!(share(steady, "bj-a") >= 0.99, "{table}");
    assert!(steady.errors.is_empty(), "{table}");

    let kill = row(&report, Phase::KillOne);
    // The whole phase's share: 100% bj-a until the killed endpoint is ejected, then the spill
    // rule's 70% (which the phase itself checks after 1 s, within 70% ± 10%). Since failures
    // are charged in the peak-EWMA (issue 14, B.4) the dead endpoint gets only exploration
    // traffic until its ejection (~1.4 s at 200 calls/s), so the whole-phase share lies between
    // 70% and 100% of that mix: above 70% - 15%, below 95%.
    let kill_share = share(kill, "bj-a");
    assert!((0.55..=0.95).contains(&kill_share), "{table}");
    assert_eq!(share(kill, "sh-a"), 0.0, "{table}");

    let blackhole = row(&report, Phase::Blackhole);
    assert!(blackhole.max_ms <= 1100.0, "{table}");
    assert!(share(blackhole, "bj-b") >= 0.6, "{table}");

    let drain = row(&report, Phase::Drain);
    assert!(
        share(drain, "sh-a") > 0.3 && share(drain, "bj-a") > 0.3,
        "{table}"
    );
    assert_eq!(share(drain, "bj-b"), 0.0, "{table}");

    for p in [Phase::DnsNorthDown, Phase::DnsAllDown, Phase::DnsPoison] {
        let r = row(&report, p);
        assert!(r.errors.is_empty(), "{}: errors\n{table}", r.phase);
    }
    assert!(
        row(&report, Phase::DnsNorthDown)
            .events
            .contains_key("dns_fallback")
    );
    assert!(
        row(&report, Phase::DnsAllDown)
            .events
            .contains_key("dns_stale")
    );
    assert!(
        row(&report, Phase::DnsPoison)
            .events
            .contains_key("dns_poisoned")
    );

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), Phase::ALL.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_options_are_refused_before_anything_starts() {
    let err = locality_demo::run(Options {
        phases: Vec::new(),
        progress: false,
        ..Options::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no phase"), "{err}");
    let err = locality_demo::run(Options {
        seconds_per_phase: -1.0,
        progress: false,
        ..Options::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("seconds-per-phase"), "{err}");
}
