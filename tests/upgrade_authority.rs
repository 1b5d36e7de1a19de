//! Hardening (issue 13, items 1 and 2): one upgrade at a time (also across
//! processes, via the flock on `upgrade.lock` next to the control socket), SIGTERM during a
//! hand-over, which binaries `upgrade <path>` accepts, and which verbs a
//! `control_group` member may use.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use presenced_tests::{bin, config_text, dev_setup, signal, Daemon, Options, Signal};

/// A "binary" that holds the hand-over socket for `secs` seconds without
/// answering, then exits: the upgrade stays in flight (shards frozen) that
/// long, then fails and resumes.
fn slow_target(dir: &Path, secs: u32) -> PathBuf {
    let p = dir.join(format!("slow-target-{secs}.sh"));
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "#!/bin/sh\nexec sleep {secs}").unwrap();
    drop(f);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_second_upgrade_while_one_is_in_flight_is_refused() {
    let d = Daemon::start();
    let pid = d.pid();
    let slow = slow_target(d.dir.path(), 3);
    std::thread::scope(|s| {
        let first = s.spawn(|| d.try_control(&format!("upgrade {}", slow.display())));
        std::thread::sleep(Duration::from_millis(700));
        // The real binary: on its own this upgrade would succeed.
        let real = bin("presenced");
        let second = d.presencectl(&["upgrade", "--binary", real.to_str().unwrap()]);
        assert!(
            !second.status.success(),
            "second upgrade: {}",
            text(&second)
        );
        assert!(
            text(&second).contains("already in progress"),
            "{}",
            text(&second)
        );
        let first = first.join().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
        assert_eq!(v["ok"], false, "{v}");
    });
    // Only the first one ran: the old process still serves, and the next
    // upgrade (nothing in flight any more) goes through.
    assert_eq!(d.stats()["pid"], pid);
    let report = d.upgrade(Some(&bin("presenced")));
    assert_eq!(report["ok"], true, "{report}\n{}", d.log_text());
}

#[test]
fn an_upgrade_lock_held_by_another_process_refuses_upgrade() {
    let d = Daemon::start();
    let path = d.dir.path().join("upgrade.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    write!(held, "4242").unwrap();
    let out = d.presencectl(&["upgrade", "--binary", bin("presenced").to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already in progress"), "{}", text(&out));
    assert!(text(&out).contains("4242"), "{}", text(&out));
    assert_eq!(d.stats()["pid"], d.pid());
    drop(held);
    let report = d.upgrade(Some(&bin("presenced")));
    assert_eq!(report["ok"], true, "{report}\n{}", d.log_text());
}

#[test]
fn sigterm_during_a_hand_over_waits_for_its_outcome() {
    let mut d = Daemon::start();
    let slow = slow_target(d.dir.path(), 2);
    let report = std::thread::scope(|s| {
        let up = s.spawn(|| d.try_control(&format!("upgrade {}", slow.display())));
        std::thread::sleep(Duration::from_millis(500));
        signal(d.pid(), Signal::SIGTERM).unwrap();
        up.join().unwrap()
    });
    // The hand-over ended (failed, resumed) and was reported before the
    // shutdown closed anything; then the daemon stopped cleanly.
    let report = report.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("no upgrade report ({e}): {report:?}\n{}", d.log_text()));
    assert_eq!(v["ok"], false, "{v}");
    let st = d
        .wait_exit(Duration::from_secs(15))
        .expect("daemon did not stop");
    assert!(st.success(), "{st}\n{}", d.log_text());
}

#[test]
fn upgrade_binary_must_be_absolute_root_owned_and_not_writable() {
    let d = Daemon::start();
    let pid = d.pid();
    let loose = slow_target(d.dir.path(), 1);
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (arg, why) in [
        ("presenced".to_owned(), "absolute path is required"),
        ("sh".to_owned(), "absolute path is required"),
        (loose.display().to_string(), "writable by group or other"),
        ("/tmp".to_owned(), "not a regular file"),
        ("/nonexistent/presenced".to_owned(), "No such file"),
    ] {
        let v = d.control_json(&format!("upgrade {arg}"));
        assert_eq!(v["ok"], false, "{arg}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{arg}: {v}");
    }
    assert_eq!(d.stats()["pid"], pid);
}

/// `presencectl` as `nobody` with group `nogroup` only.
fn as_member(d: &Daemon, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(bin("presencectl"))
        .arg("--socket")
        .arg(&d.control)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

#[test]
fn control_group_members_get_read_only_verbs() {
    let config = config_text(&Options::default()).replacen(
        "[server]\n",
        "[server]\ncontrol_group = \"nogroup\"\n",
        1,
    );
    let d = Daemon::spawn_in(dev_setup(&config));
    // Let `nobody` reach the socket (not the keys, which stay 0600).
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for args in [&["ping"][..], &["stats"], &["guard"]] {
        let out = as_member(&d, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let real = bin("presenced");
    for args in [
        &["upgrade", "--binary", real.to_str().unwrap()][..],
        &["reload"],
        &["guard", "release"],
    ] {
        let out = as_member(&d, args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("requires the daemon's user or root"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(d.stats()["pid"], d.pid());
    // The owner (root here) still may.
    let out = d.presencectl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
}
