//! The `presence-bench` command line: help and argument errors (no servers
//! are started; the scenarios themselves run in tests/bench_smoke.rs).

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_presence-bench"))
        .args(args)
        .output()
        .expect("run presence-bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_scenarios_but_not_the_worker() {
    let o = bench(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for s in ["ramp", "steady", "storm", "density", "upgrade"] {
        assert!(text.contains(s), "{s} missing from:\n{text}");
    }
    assert!(!text.contains("worker"), "hidden subcommand shown:\n{text}");
    let o = bench(&["density", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in ["--peer", "--source-ips", "--agents", "--json", "--settle"] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
    let o = bench(&["storm", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--kill-daemon",
        "--restart-cmd",
        "--drop-share",
        "--undisturbed",
        "--undisturbed-interval",
        "--resumption",
        "--legacy-config",
        "--recovery-interval",
    ] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
    let o = bench(&["ramp", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in ["--rate", "--undisturbed", "--connect-retries"] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
    let o = bench(&["upgrade", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in ["--binary", "--interval", "--before", "--after", "--agents"] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
}

#[test]
fn argument_errors_are_reported_before_anything_starts() {
    let cases: &[(&[&str], &str)] = &[
        (&["ramp", "--agents", "0"], "at least 1"),
        (&["ramp", "--source-ips", "10.0.0.1"], "not a loopback"),
        (&["ramp", "--source-ips", "127.0.0.9-127.0.0.2"], "reversed"),
        (&["ramp", "--source-ips", "bogus"], "bad address"),
        (&["density", "--agents", "500,100"], "ascending"),
        (&["ramp", "--peer", "redis"], "invalid value"),
        (&["storm", "--restart-cmd", "true"], "--kill-daemon"),
        (&["ramp", "--addr", "127.0.0.1:1"], "--control"),
        (&["ramp", "--per-worker", "50000"], "--per-worker"),
        (&["steady", "--interval", "soon"], "invalid value"),
        (&["storm", "--drop-share", "0"], "--drop-share"),
        (&["storm", "--drop-share", "1.5"], "--drop-share"),
        (
            &["storm", "--drop-share", "0.5", "--kill-daemon"],
            "--drop-share",
        ),
        (&["upgrade", "--interval", "0s"], "--interval"),
        (
            &["storm", "--recovery-interval", "5ms"],
            "--recovery-interval",
        ),
        (&["report"], "required"),
        (
            &["upgrade", "--binary", "/nonexistent/presenced"],
            "no such file",
        ),
    ];
    for (args, want) in cases {
        let o = bench(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: expected {want:?} in:\n{err}");
    }
}

#[test]
fn worker_without_init_fails_cleanly() {
    let o = Command::new(env!("CARGO_BIN_EXE_presence-bench"))
        .arg("worker")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run worker");
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"msg\":\"fatal\""), "{out}");
}
