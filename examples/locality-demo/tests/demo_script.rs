//! `scripts/demo --locality` installs only what the locality demo needs (a C linker for cargo, when missing), quietly,
//! and shows apt's output only when it fails. Run against stub `apt-get` and `cargo` on a PATH
//! of their own, so nothing is installed or built.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory of this test, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo")
}

fn stub(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Run {
    ok: bool,
    output: String,
    calls: String,
}

/// Runs `scripts/demo --locality --quiet` with only the stubs and a few basic tools on PATH.
fn run(case: &str, with_cc: bool, apt_fails: bool) -> (Run, Scratch) {
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "locality-demo-script-test-{}-{case}",
        std::process::id()
    )));
    let bin = scratch.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["bash", "dirname", "mktemp", "cat", "rm", "env"] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        symlink(real, bin.join(tool)).unwrap();
    }
    let calls = scratch.0.join("calls.log");
    stub(
        &bin,
        "apt-get",
        &format!(
            "echo \"apt-get $*\" >> {calls}\necho 'Reading package lists... APT-NOISE'\necho 'E: APT-NOISE on stderr' >&2\nexit {code}",
            calls = calls.display(),
            code = if apt_fails { 100 } else { 0 }
        ),
    );
    stub(
        &bin,
        "cargo",
        &format!("echo \"cargo $*\" >> {}", calls.display()),
    );
    if with_cc {
        stub(&bin, "cc", "exit 0");
    }
    let out = Command::new(script())
        .args(["--locality", "--quiet"])
        .env_clear()
        .env("PATH", &bin)
        .env("TMPDIR", &scratch.0)
        .output()
        .unwrap();
    let run = Run {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        calls: std::fs::read_to_string(&calls).unwrap_or_default(),
    };
    (run, scratch)
}

#[test]
fn installs_only_a_linker_quietly_and_only_when_missing() {
    let (r, _s) = run("no-cc", false, false);
    assert!(r.ok, "{}\n{}", r.output, r.calls);
    let installs: Vec<&str> = r
        .calls
        .lines()
        .filter(|l| l.contains(" install "))
        .collect();
    assert_eq!(installs.len(), 1, "{}", r.calls);
    assert!(
        installs[0].contains("gcc") && installs[0].contains("-qq"),
        "{}",
        r.calls
    );
    for unneeded in ["redis", "nftables", "cargo-nextest"] {
        assert!(
            !r.calls.contains(unneeded),
            "{unneeded} is not needed: {}",
            r.calls
        );
    }
    assert!(
        !r.output.contains("APT-NOISE"),
        "apt's output is kept out: {}",
        r.output
    );
    assert!(
        r.calls
            .contains("cargo run --release -p locality-demo -- --quiet"),
        "{}",
        r.calls
    );

    let (r, _s) = run("cc", true, false);
    assert!(r.ok, "{}\n{}", r.output, r.calls);
    assert!(
        !r.calls.contains("apt-get"),
        "nothing to install: {}",
        r.calls
    );
    assert!(
        r.calls.contains("cargo run --release -p locality-demo"),
        "{}",
        r.calls
    );
}

#[test]
fn a_failed_install_shows_apts_output_and_stops() {
    let (r, _s) = run("apt-fails", false, true);
    assert!(!r.ok, "{}", r.output);
    assert!(
        r.output.contains("APT-NOISE"),
        "apt's output shown on failure: {}",
        r.output
    );
    assert!(!r.calls.contains("cargo run"), "{}", r.calls);
}
