//! `presence-bench report --svg DIR` on saved reports (bench/tests/fixtures:
//! small real runs, see fixtures/README.md): the three charts are written,
//! are SVG, and name their series.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn report(args: &[&str], files: &[PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_presence-bench"))
        .arg("report")
        .args(args)
        .args(files)
        .output()
        .expect("run presence-bench report")
}

fn svg(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let head = text.trim_start();
    assert!(
        head.starts_with("<svg") || head.starts_with("<?xml"),
        "{name} does not start as SVG: {:?}",
        &head[..head.len().min(80)]
    );
    assert!(text.trim_end().ends_with("</svg>"), "{name} is cut short");
    text
}

fn all_fixtures() -> Vec<PathBuf> {
    ["density.json", "ramp.json", "storm.json", "storm-kill.json"]
        .iter()
        .map(|f| fixture(f))
        .collect()
}

#[test]
fn report_svg_writes_the_three_charts_with_their_series() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img");
    let o = report(&["--svg", out.to_str().unwrap()], &all_fixtures());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "nothing skipped: {stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    for f in ["density.svg", "handshakes.svg", "storm.svg"] {
        assert!(stdout.contains(f), "{f} not reported written:\n{stdout}");
    }

    let density = svg(&out, "density.svg");
    for s in [
        "presenced RSS",
        "presenced heap",
        "nats-server RSS",
        "mosquitto RSS",
        "memory per connection",
    ] {
        assert!(density.contains(s), "density.svg has no {s:?}");
    }

    let hs = svg(&out, "handshakes.svg");
    for s in [
        "presenced",
        "nats-server",
        "mosquitto",
        "per second of server CPU time",
        "density up to",
        "ramp ",
    ] {
        assert!(hs.contains(s), "handshakes.svg has no {s:?}");
    }

    let storm = svg(&out, "storm.svg");
    for s in [
        "agents back (bench)",
        "sessions (daemon)",
        "agents online (daemon)",
        "agents in grace (daemon)",
        "storm drop-all",
        "storm kill-daemon",
    ] {
        assert!(storm.contains(s), "storm.svg has no {s:?}");
    }
}

#[test]
fn report_svg_skips_charts_without_data_and_fails_with_none() {
    let dir = tempfile::tempdir().unwrap();
    let o = report(
        &["--svg", dir.path().to_str().unwrap()],
        &[fixture("storm.json")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("skipped density.svg"), "{stderr}");
    assert!(stderr.contains("skipped handshakes.svg"), "{stderr}");
    assert!(dir.path().join("storm.svg").is_file());
    assert!(!dir.path().join("density.svg").exists());

    // A report with nothing to draw (a storm from before the recovery curve).
    let old = dir.path().join("old-storm.json");
    let text = std::fs::read_to_string(fixture("storm.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["targets"][0]["storm"]
        .as_object_mut()
        .unwrap()
        .remove("recovery");
    std::fs::write(&old, v.to_string()).unwrap();
    let empty = dir.path().join("empty");
    let o = report(&["--svg", empty.to_str().unwrap()], &[old]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no chart has data"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn report_without_svg_still_prints_the_tables_of_each_file() {
    let o = report(&[], &[fixture("density.json"), fixture("storm.json")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("presence-bench density"), "{stdout}");
    assert!(stdout.contains("reconnect storm"), "{stdout}");
    let o = report(&[], &[fixture("nonexistent.json")]);
    assert!(!o.status.success());
}
