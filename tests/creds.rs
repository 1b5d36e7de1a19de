//! Credentials (issue 13, items 3 and 6): several fleet keys at once with a
//! per-key HELLO counter, the reloadable deny-list of agent ids, and the
//! key files' modes (at load, and as `dev-init --force` writes them).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use presence_client::protocol::{self as presence_proto, ErrorCode, Frame};
use presence_client::{Connection, FleetKey};
use presenced_tests::{bin, config_text, dev_setup, Daemon, Options};

/// Expect the server to send ERROR `code` and close.
async fn expect_error(c: &mut Connection, code: ErrorCode) -> String {
    let f = tokio::time::timeout(Duration::from_secs(5), c.recv_frame())
        .await
        .expect("server answered in time");
    let msg = match f {
        Ok(Some(Frame::Error { code: got, message })) => {
            assert_eq!(got, code as u16, "message: {message}");
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    };
    let end = tokio::time::timeout(Duration::from_secs(5), c.recv_frame())
        .await
        .expect("server closed in time");
    assert!(matches!(end, Ok(None) | Err(_)), "not closed: {end:?}");
    msg
}

/// A HELLO as `id` with the token of `key`.
async fn hello_with(d: &Daemon, key: &FleetKey, id: &str) -> Connection {
    let mut c = d.connect().await;
    c.send_frame(&Frame::Hello {
        version: presence_proto::VERSION,
        id: id.as_bytes().to_vec(),
        token: key.token(id.as_bytes()),
    })
    .await
    .expect("send HELLO");
    c
}

async fn expect_welcome(c: &mut Connection) {
    let f = tokio::time::timeout(Duration::from_secs(5), c.recv_frame())
        .await
        .expect("server answered in time");
    assert!(
        matches!(f, Ok(Some(Frame::Welcome { .. }))),
        "expected WELCOME, got {f:?}"
    );
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A dev setup whose `[auth]` has `fleet.key`, `fleet-new.key` and a deny-list.
fn rotation_setup() -> (tempfile::TempDir, FleetKey) {
    let auth =
        "fleet_key = \"fleet.key\"\nfleet_keys = [\"fleet-new.key\"]\nrevoked = \"revoked.txt\"";
    let text = config_text(&Options::default()).replace("fleet_key = \"fleet.key\"", auth);
    let dir = dev_setup(&text);
    let new = FleetKey::generate();
    write_private(&dir.path().join("fleet-new.key"), &new.to_file_text());
    std::fs::write(dir.path().join("revoked.txt"), "# stolen laptop\nbad-1\n").unwrap();
    (dir, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fleet_keys_are_accepted_and_counted_per_key() {
    let (dir, new) = rotation_setup();
    let d = Daemon::spawn_in(dir);
    let old = d.fleet_key.clone();

    let mut a = hello_with(&d, &old, "host-old").await;
    expect_welcome(&mut a).await;
    let mut b = hello_with(&d, &new, "host-new").await;
    expect_welcome(&mut b).await;
    let mut b2 = hello_with(&d, &new, "host-new-2").await;
    expect_welcome(&mut b2).await;
    // A key that is not configured is refused.
    let mut c = hello_with(&d, &FleetKey::generate(), "host-x").await;
    expect_error(&mut c, ErrorCode::AuthenticationFailed).await;

    let stats = d.stats();
    assert_eq!(stats["auth"]["fleet_keys_used"]["fleet.key"], 1, "{stats}");
    assert_eq!(
        stats["auth"]["fleet_keys_used"]["fleet-new.key"], 2,
        "{stats}"
    );
    assert_eq!(stats["auth"]["revoked_agents"], 1, "{stats}");
    let o = d.presencectl(&["metrics"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("presenced_hellos_by_fleet_key_total{key=\"fleet-new.key\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("presenced_hellos_by_fleet_key_total{key=\"fleet.key\"} 1"),
        "{text}"
    );

    // A reload swaps the key set (the config is read at start; the key
    // files at every reload): fleet.key now holds the new key too, so the
    // old one is no longer accepted. Counters carry on by file name.
    write_private(&d.dir.path().join("fleet.key"), &new.to_file_text());
    let o = d.presencectl(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let mut e = hello_with(&d, &old, "host-old-2").await;
    expect_error(&mut e, ErrorCode::AuthenticationFailed).await;
    let mut f = hello_with(&d, &new, "host-new-3").await;
    expect_welcome(&mut f).await;
    let stats = d.stats();
    assert_eq!(
        stats["auth"]["fleet_keys_used"]["fleet-new.key"], 2,
        "{stats}"
    );
    assert_eq!(stats["auth"]["fleet_keys_used"]["fleet.key"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_ids_get_error_2_and_reload_swaps_the_list() {
    let (dir, _new) = rotation_setup();
    let d = Daemon::spawn_in(dir);
    let key = d.fleet_key.clone();

    let mut c = hello_with(&d, &key, "bad-1").await;
    let msg = expect_error(&mut c, ErrorCode::AuthenticationFailed).await;
    assert!(msg.contains("revoked"), "{msg}");
    let mut ok = hello_with(&d, &key, "bad-2").await;
    expect_welcome(&mut ok).await;
    ok.bye().await.unwrap();

    std::fs::write(d.dir.path().join("revoked.txt"), "bad-2\n").unwrap();
    let o = d.presencectl(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let mut c = hello_with(&d, &key, "bad-2").await;
    expect_error(&mut c, ErrorCode::AuthenticationFailed).await;
    let mut c = hello_with(&d, &key, "bad-1").await;
    expect_welcome(&mut c).await;

    // An unreadable deny-list fails the reload and keeps the old one.
    std::fs::remove_file(d.dir.path().join("revoked.txt")).unwrap();
    let o = d.presencectl(&["reload"]);
    assert!(!o.status.success(), "{o:?}");
    let mut c = hello_with(&d, &key, "bad-2").await;
    expect_error(&mut c, ErrorCode::AuthenticationFailed).await;
}

/// `presenced serve` on `dir`, expected to exit by itself; its output.
fn serve_to_exit(dir: &Path) -> std::process::Output {
    let mut child = Command::new(bin("presenced"))
        .args(["serve", "--config"])
        .arg(dir.join("presenced.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn presenced");
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!("presenced did not refuse to start: {out:?}");
}

#[test]
fn loose_key_files_are_refused_when_configured() {
    for file in ["fleet.key", "tls/key.pem"] {
        let text = config_text(&Options::default()).replace(
            "handshake_timeout",
            "key_permissions = \"refuse\"\nhandshake_timeout",
        );
        let dir = dev_setup(&text);
        let p = dir.path().join(file);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = serve_to_exit(dir.path());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(file), "{err}");
        assert!(err.contains("0644"), "{err}");
    }
}

#[test]
fn loose_key_files_are_warned_about_by_default_and_at_reload() {
    let dir = dev_setup(&config_text(&Options::default()));
    let p = dir.path().join("fleet.key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let d = Daemon::spawn_in(dir);
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("fleet.key") && l.contains("0640"))
        .unwrap_or_else(|| panic!("no warning naming fleet.key and its mode:\n{log}"));
    assert!(line.contains("WARN"), "{line}");

    let key = d.dir.path().join("tls/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    assert!(d.presencectl(&["reload"]).status.success());
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("key.pem") && l.contains("0604")),
        "no reload warning naming key.pem:\n{log}"
    );
}

#[test]
fn dev_init_force_tightens_modes_and_never_writes_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let run = || {
        let o = Command::new(bin("presenced"))
            .args(["dev-init", "--force"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    run();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    // A key loosened to 0644 comes back 0600.
    let fleet = dir.path().join("fleet.key");
    let key = dir.path().join("tls/key.pem");
    for p in [&fleet, &key] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    run();
    assert_eq!(mode(&fleet), 0o600);
    assert_eq!(mode(&key), 0o600);
    // A symlinked key is replaced by a file; its target is untouched.
    let victims = [outside.path().join("a"), outside.path().join("b")];
    for (link, victim) in [&fleet, &key].into_iter().zip(&victims) {
        std::fs::write(victim, "precious\n").unwrap();
        std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_file(link).unwrap();
        std::os::unix::fs::symlink(victim, link).unwrap();
    }
    run();
    for (link, victim) in [&fleet, &key].into_iter().zip(&victims) {
        let m = std::fs::symlink_metadata(link).unwrap();
        assert!(
            m.file_type().is_file(),
            "{} is still a symlink",
            link.display()
        );
        assert_eq!(mode(link), 0o600);
        assert_eq!(std::fs::read_to_string(victim).unwrap(), "precious\n");
        assert_eq!(mode(victim), 0o644);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_closes_live_sessions_of_revoked_ids_with_reason_revoked() {
    let (dir, _new) = rotation_setup();
    let d = Daemon::spawn_in(dir);
    let key = d.fleet_key.clone();
    let mut victim = hello_with(&d, &key, "live-1").await;
    expect_welcome(&mut victim).await;
    let mut bystander = hello_with(&d, &key, "live-2").await;
    expect_welcome(&mut bystander).await;
    let mut events = d.events(None);

    std::fs::write(d.dir.path().join("revoked.txt"), "bad-1\nlive-1\n").unwrap();
    let o = d.presencectl(&["reload"]);
    assert!(o.status.success(), "{o:?}");
    let msg = expect_error(&mut victim, ErrorCode::AuthenticationFailed).await;
    assert!(msg.contains("revoked"), "{msg}");

    let ev = events
        .collect(Duration::from_secs(2))
        .into_iter()
        .find(|v| v["agent"] == "live-1")
        .expect("an event for the revoked agent");
    assert_eq!(ev["state"], "offline", "{ev}");
    assert_eq!(ev["reason"], "revoked", "{ev}");
    assert_eq!(d.control_json("agent live-1")["state"], "offline");
    let stats = d.stats();
    assert_eq!(stats["events_by_reason"]["offline:revoked"], 1, "{stats}");
    // The other agent's session is untouched.
    bystander
        .heartbeat(1)
        .await
        .expect("bystander still served");
    assert_eq!(d.control_json("agent live-2")["state"], "online");
}
