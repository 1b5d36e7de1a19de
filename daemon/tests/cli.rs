//! The `presenced` command line: dev-init, token, and bad configuration.

use std::path::Path;
use std::process::{Command, Output};

fn presenced(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn presenced")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn dev_init_writes_the_contract_files_and_token_matches_hmac() {
    let d = tempfile::tempdir().unwrap();
    let o = presenced(&["dev-init", "setup"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = d.path().join("setup");
    for f in ["presenced.toml", "tls/cert.pem", "tls/key.pem", "fleet.key"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let cfg = std::fs::read_to_string(dir.join("presenced.toml")).unwrap();
    assert!(cfg.contains("control_socket = \"control.sock\""), "{cfg}");
    // A second dev-init refuses to overwrite.
    let o = presenced(&["dev-init", "setup"], d.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));

    let key = std::fs::read_to_string(dir.join("fleet.key")).unwrap();
    let o = presenced(
        &["token", "--fleet-key", "setup/fleet.key", "agent-7"],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let token = String::from_utf8(o.stdout).unwrap();
    let expected = presence_proto::FleetKey::parse(&key)
        .unwrap()
        .token(b"agent-7");
    assert_eq!(token.trim(), hex::encode(expected));

    let o = presenced(
        &["token", "--fleet-key", "setup/fleet.key", "bad id"],
        d.path(),
    );
    assert!(!o.status.success());
}

#[test]
fn bad_config_exits_non_zero_naming_file_and_key() {
    let d = tempfile::tempdir().unwrap();
    assert!(presenced(&["dev-init", "."], d.path()).status.success());
    let cfg = d.path().join("presenced.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();

    let cases = [
        (format!("{good}\nbogus_key = 1\n"), "bogus_key"),
        (
            good.replace("miss_limit = 3", "miss_limit = 0"),
            "presence.miss_limit",
        ),
        (
            good.replace(
                "heartbeat_interval = \"30s\"",
                "heartbeat_interval = \"soon\"",
            ),
            "heartbeat_interval",
        ),
        (
            good.replace("listen = \"127.0.0.1:7443\"", "listen = \"nowhere\""),
            "listen",
        ),
        (
            good.replace("cert = \"tls/cert.pem\"", "cert = \"tls/missing.pem\""),
            "missing.pem",
        ),
        (
            good.replace("fleet_key = \"fleet.key\"", "fleet_key = \"tls/cert.pem\""),
            "fleet key",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let o = presenced(&["serve", "--config", "presenced.toml"], d.path());
        let err = stderr(&o);
        assert!(!o.status.success(), "accepted a bad config ({needle})");
        assert!(
            err.contains("presenced.toml") || err.contains(needle),
            "{err}"
        );
        assert!(
            err.contains(needle),
            "error does not name `{needle}`: {err}"
        );
    }
    let o = presenced(&["serve", "--config", "nope.toml"], d.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.toml"));
}
