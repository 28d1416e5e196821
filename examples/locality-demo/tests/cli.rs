//! The `locality-demo` binary: options that cannot work are refused before anything starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_locality-demo");

/// Kills the demo by pid (and reaps it) if a test fails before it exited.
struct Demo(Option<Child>);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the demo with `args`; waits for its exit, bounded by `limit` (polled, then killed).
fn run_demo(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut demo = Demo(Some(child));
    let polls = limit.as_millis() / 20;
    for _ in 0..polls {
        let running = demo.0.as_mut().unwrap().try_wait().unwrap().is_none();
        if !running {
            let out = demo.0.take().unwrap().wait_with_output().unwrap();
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the demo did not exit within {limit:?}: {args:?}");
}

#[test]
fn an_unwritable_json_path_fails_before_the_run() {
    let dir = std::env::temp_dir().join(format!("locality-demo-cli-test-{}", std::process::id()));
    let path = dir.join("no-such-dir").join("out.json");
    let path_text = path.display().to_string();
    let (code, out, err) = run_demo(
        &[
            "--json",
            &path_text,
            "--phases",
            "steady",
            "--seconds-per-phase",
            "2",
            "--port-offset",
            "2500",
            "--quiet",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(err.contains(&path_text) && err.contains("--json"), "{err}");
    assert!(
        out.is_empty(),
        "nothing ran (no table) before the error: {out}"
    );
    assert!(!err.contains('\u{1b}'), "no colour codes in a pipe: {err}");
}

#[test]
fn seconds_per_phase_below_the_minimum_is_refused() {
    let (code, out, err) = run_demo(
        &[
            "--phases",
            "steady",
            "--seconds-per-phase",
            "1",
            "--port-offset",
            "2510",
            "--quiet",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("--seconds-per-phase") && err.contains("at least 2"),
        "{err}"
    );
    assert!(out.is_empty(), "nothing ran: {out}");
}
