//! Operations: `presencectl` against the spawned daemon, the control socket's
//! security bounds, Prometheus metrics through real parsers (promtool and
//! the prometheus-parse crate), the HTTP metrics endpoint, the systemd notify
//! protocol, reload, and `presenced tuning check` on a fake /proc tree.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use presence_client::{ClientTls, Connection};
use presenced_tests::{
    bin, config_text, dev_setup, presencectl_at, signal, Daemon, Options, Signal,
};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert_eq!(code(o), 0, "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    stdout(o)
}

/// The default test config with `line` added to `[server]`.
fn config_with_server_line(line: &str) -> String {
    let text = config_text(&Options::default());
    let anchor = "control_socket = \"control.sock\"\n";
    assert!(text.contains(anchor));
    text.replace(anchor, &format!("{anchor}{line}\n"))
}

// --- presencectl ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presencectl_stats_agent_ping_top_metrics() {
    let d = Daemon::start();
    let (mut a, w) = d.agent("host-a").await;
    let (_b, _) = d.agent("host-b").await;
    for seq in 1..=5 {
        a.heartbeat(seq).await.expect("heartbeat");
    }
    d.wait_stats(5 * SECOND, |s| s["agents_online"] == 2);

    let table = ok(&d.presencectl(&["stats"]));
    assert!(table.contains(&format!("pid {}", d.pid())), "{table}");
    assert!(table.contains(&format!("listen {}", d.addr)), "{table}");
    let online = table
        .lines()
        .find(|l| l.starts_with("agents online"))
        .unwrap_or_default();
    assert!(online.split_whitespace().nth(2) == Some("2"), "{table}");
    let shard_rows = table
        .lines()
        .filter(|l| {
            let first = l.split_whitespace().next().unwrap_or_default();
            first == "0" || first == "1"
        })
        .count();
    assert_eq!(shard_rows, 2, "one row per shard:\n{table}");

    let json: Value = serde_json::from_str(&ok(&d.presencectl(&["stats", "--json"]))).unwrap();
    assert_eq!(json["agents_online"], 2);
    assert_eq!(json["per_shard"].as_array().map(Vec::len), Some(2));
    assert!(json["heartbeats_total"].as_u64() >= Some(5));

    let rec = ok(&d.presencectl(&["agent", "host-a"]));
    assert!(rec.contains("host-a"), "{rec}");
    assert!(
        rec.lines()
            .any(|l| l.starts_with("state") && l.ends_with("online")),
        "{rec}"
    );
    assert!(rec.contains(&w.session_id.to_string()), "{rec}");
    let rec: Value =
        serde_json::from_str(&ok(&d.presencectl(&["agent", "host-a", "--json"]))).unwrap();
    assert_eq!(rec["state"], "online");
    assert_eq!(rec["session"], w.session_id);

    let o = d.presencectl(&["agent", "nobody-here"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown agent `nobody-here`"),
        "{}",
        stderr(&o)
    );
    let o = d.presencectl(&["agent", "bad!id"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("0x21"), "{}", stderr(&o));

    let ping = ok(&d.presencectl(&["ping"]));
    assert!(ping.contains(&format!("pid {}", d.pid())), "{ping}");

    // top: two refreshes, the second with rates computed from the first.
    let top = ok(&d.presencectl(&["top", "--iterations", "2", "--interval", "300ms"]));
    let headers: Vec<&str> = top.lines().filter(|l| l.contains("hs/s")).collect();
    assert_eq!(headers.len(), 2, "{top}");
    assert!(
        !top.contains("\x1b["),
        "no ANSI codes when stdout is not a TTY"
    );
    let second = top.split("presenced ").nth(2).expect("second block");
    assert!(second.contains("heartbeats/s 0.0"), "{second}");
    assert!(second.contains("agents online 2"), "{second}");
    for l in ["hs p50", "hs p99", "hb p50", "hb p99", "acceptq", "rss"] {
        assert!(top.contains(l), "{l} missing:\n{top}");
    }

    let text = ok(&d.presencectl(&["metrics"]));
    assert!(text.contains("presenced_agents_online 2"), "{text}");

    // Usage errors exit 2 (clap).
    assert_eq!(code(&d.presencectl(&["frobnicate"])), 2);
    assert_eq!(code(&d.presencectl(&["top", "--interval", "soon"])), 2);
}

/// Lines of a child's stdout, through a channel (so reads can time out).
fn line_reader(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

fn event(line: &str) -> (String, String, String) {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (
        v["agent"].as_str().unwrap_or_default().to_owned(),
        v["state"].as_str().unwrap_or_default().to_owned(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn triple(a: &str, s: &str, r: &str) -> (String, String, String) {
    (a.into(), s.into(), r.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presencectl_events_tails_replays_and_ends_on_eof() {
    let mut d = Daemon::start();
    let next = d.stats()["events_next_seq"].as_u64().unwrap();
    let mut tail = Command::new(bin("presencectl"))
        .arg("--socket")
        .arg(&d.control)
        .args(["events", "--from", &next.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn presencectl events");
    let lines = line_reader(tail.stdout.take().unwrap());
    // Plain `events` (from now) as well: give it time to subscribe.
    let mut live = Command::new(bin("presencectl"))
        .arg("--socket")
        .arg(&d.control)
        .arg("events")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn presencectl events");
    let live_lines = line_reader(live.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(300));

    let (mut c, _) = d.agent("tail-me").await;
    let l = lines.recv_timeout(5 * SECOND).expect("online event line");
    assert_eq!(event(&l), triple("tail-me", "online", "hello"));
    let first_seq = serde_json::from_str::<Value>(&l).unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(first_seq, next);
    c.bye().await.unwrap();
    let l = lines.recv_timeout(5 * SECOND).expect("offline event line");
    assert_eq!(event(&l), triple("tail-me", "offline", "bye"));
    assert_eq!(
        event(&live_lines.recv_timeout(5 * SECOND).expect("live online")),
        triple("tail-me", "online", "hello")
    );

    // --from replays what is held, then keeps following.
    let mut replay = Command::new(bin("presencectl"))
        .arg("--socket")
        .arg(&d.control)
        .args(["events", "--from", &first_seq.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let replayed = line_reader(replay.stdout.take().unwrap());
    let got: Vec<_> = (0..2)
        .map(|_| event(&replayed.recv_timeout(5 * SECOND).expect("replayed line")))
        .collect();
    assert_eq!(
        got,
        [
            triple("tail-me", "online", "hello"),
            triple("tail-me", "offline", "bye")
        ]
    );

    // A seq the daemon has not issued (e.g. a consumer's seq from before a
    // restart): the daemon's error, exit 1.
    let o = d.presencectl(&["events", "--from", "999999"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stderr(&o).contains("has not been issued"), "{}", stderr(&o));

    // The daemon stops: every tail ends with exit 0.
    d.stop();
    for child in [&mut tail, &mut live, &mut replay] {
        let deadline = Instant::now() + 10 * SECOND;
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "presencectl events did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "{st}");
    }
}

/// `pid N` in `presencectl upgrade`'s table (`upgraded: pid N now serves ...`).
fn upgraded_pid(table: &str) -> Option<u32> {
    let rest = table.strip_prefix("upgraded: pid ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn presencectl_upgrade_hands_over_to_a_new_process() {
    let d = Daemon::start();
    let first = d.pid();

    // --json: the daemon's report as is.
    let o = d.presencectl(&["upgrade", "--json"]);
    let report: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("{e}: stdout {} stderr {}", stdout(&o), stderr(&o)));
    let second = report["new_pid"].as_u64().map(|p| p as u32);
    if let Some(pid) = second {
        d.track_successor(pid);
    }
    assert_eq!(code(&o), 0, "{report} {}", stderr(&o));
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["error"].is_null(), "{report}");
    for key in ["connections", "records", "uncarried", "elapsed_ms"] {
        assert!(report[key].is_u64(), "{key} in {report}");
    }
    let second = second.expect("new_pid");
    assert_ne!(second, first);
    let stats: Value = serde_json::from_str(&ok(&d.presencectl(&["stats", "--json"]))).unwrap();
    assert_eq!(
        stats["pid"], second,
        "the new process answers on the same path"
    );

    // The table, from the process that took over.
    let o = d.presencectl(&["upgrade"]);
    let third = upgraded_pid(&stdout(&o));
    if let Some(pid) = third {
        d.track_successor(pid);
    }
    let table = ok(&o);
    let third = third.unwrap_or_else(|| panic!("no pid in:\n{table}"));
    assert_ne!(third, second);
    assert!(table.contains("connections"), "{table}");
    let stats: Value = serde_json::from_str(&ok(&d.presencectl(&["stats", "--json"]))).unwrap();
    assert_eq!(stats["pid"], third);

    // A binary that cannot start: exit 1 with the daemon's reason, and the
    // running process keeps serving.
    let missing = d.dir.path().join("no-such-presenced");
    let o = d.presencectl(&["upgrade", "--binary", missing.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{} {}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("upgrade failed"), "{}", stderr(&o));
    assert!(stderr(&o).contains("no-such-presenced"), "{}", stderr(&o));
    let stats: Value = serde_json::from_str(&ok(&d.presencectl(&["stats", "--json"]))).unwrap();
    assert_eq!(stats["pid"], third);

    // A path the one-line request cannot carry is a usage error.
    assert_eq!(code(&d.presencectl(&["upgrade", "--binary", "a b"])), 2);
}

#[test]
fn presencectl_guard_status_and_release() {
    let d = Daemon::start();
    let table = ok(&d.presencectl(&["guard"]));
    let state = table
        .lines()
        .find(|l| l.starts_with("guard "))
        .unwrap_or_default();
    assert_eq!(state.split_whitespace().nth(1), Some("inactive"), "{table}");
    assert!(table.contains("held offline events: none"), "{table}");

    let v: Value = serde_json::from_str(&ok(&d.presencectl(&["guard", "--json"]))).unwrap();
    assert_eq!(v["status"]["state"], "inactive", "{v}");
    assert_eq!(v["status"]["held"], 0, "{v}");
    assert_eq!(v["held"], serde_json::json!([]), "{v}");

    let out = ok(&d.presencectl(&["guard", "release"]));
    assert!(out.contains("released 0"), "{out}");
    let out = ok(&d.presencectl(&["guard", "release", "host-a"]));
    assert!(out.contains("host-a has no held offline event"), "{out}");
    let v: Value =
        serde_json::from_str(&ok(&d.presencectl(&["guard", "release", "--json"]))).unwrap();
    assert_eq!(v, serde_json::json!({"ok": true, "released": 0}));
}

#[test]
fn presencectl_errors_name_the_socket_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here.sock");
    for args in [
        &["stats"][..],
        &["ping"],
        &["agent", "x"],
        &["events"],
        &["reload"],
        &["metrics"],
        &["top", "--iterations", "1"],
    ] {
        let o = presencectl_at(&missing, args);
        assert_eq!(code(&o), 3, "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(e.contains("No such file or directory"), "{e}");
        assert!(e.contains("is presenced running?"), "{e}");
        assert!(e.contains("--socket"), "{e}");
    }
    // A socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = presencectl_at(&stale, &["ping"]);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("Connection refused"), "{}", stderr(&o));

    // The default socket path comes from the config module; env overrides it.
    let o = Command::new(bin("presencectl"))
        .arg("ping")
        .env_remove("PRESENCECTL_SOCKET")
        .output()
        .unwrap();
    if !Path::new(presenced::config::DEFAULT_CONTROL_SOCKET).exists() {
        assert_eq!(code(&o), 3);
        assert!(
            stderr(&o).contains(presenced::config::DEFAULT_CONTROL_SOCKET),
            "{}",
            stderr(&o)
        );
    }
    let o = Command::new(bin("presencectl"))
        .arg("ping")
        .env("PRESENCECTL_SOCKET", &missing)
        .output()
        .unwrap();
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("nothing-here.sock"), "{}", stderr(&o));
}

#[test]
fn presencectl_permission_denied_names_control_group() {
    let d = Daemon::start();
    let is_root = nix::unistd::geteuid().is_root();
    let o = if is_root {
        // Root passes every permission check: run as `nobody` instead.
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("skipped: setpriv (util-linux) not found");
            return;
        }
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("presencectl"))
            .arg("--socket")
            .arg(&d.control)
            .arg("ping")
            .output()
            .unwrap()
    } else {
        // Our own socket is 0600 and ours: nothing to deny. Use a root-owned one if any.
        eprintln!("skipped: needs root to try another user");
        return;
    };
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("Permission denied"), "{e}");
    assert!(e.contains("control_group"), "{e}");
    assert!(e.contains(&d.control.display().to_string()), "{e}");
}

// --- reload -------------------------------------------------------------------

fn client_tls(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    ClientTls::from_ca_file(ca)
        .expect("CA")
        .build()
        .expect("client config")
}

async fn hello_with(d: &Daemon, ca: &Path, id: &str) -> Result<(), String> {
    let mut c = Connection::connect(d.addr, "localhost", client_tls(ca))
        .await
        .map_err(|e| e.to_string())?;
    let token = d.fleet_key.token(id.as_bytes());
    c.hello(id.as_bytes(), &token)
        .await
        .map_err(|e| e.to_string())?;
    c.heartbeat(1).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_renews_the_certificate_and_a_broken_one_keeps_the_old() {
    let d = Daemon::start();
    let tls = d.dir.path().join("tls");
    let old_ca = d.dir.path().join("old-ca.pem");
    std::fs::copy(tls.join("cert.pem"), &old_ca).unwrap();
    let (mut before, _) = d.agent("connected-before").await;

    // Renewal: a new certificate and key (another dev-init) replace the files.
    let other = dev_setup("");
    let new_ca = d.dir.path().join("new-ca.pem");
    std::fs::copy(other.path().join("tls/cert.pem"), &new_ca).unwrap();
    std::fs::copy(other.path().join("tls/cert.pem"), tls.join("cert.pem")).unwrap();
    std::fs::copy(other.path().join("tls/key.pem"), tls.join("key.pem")).unwrap();
    assert!(
        hello_with(&d, &new_ca, "n0").await.is_err(),
        "the new certificate is not served before the reload"
    );

    let child = Command::new(bin("presencectl"))
        .arg("--socket")
        .arg(&d.control)
        .arg("reload")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ctl_pid = child.id();
    let o = child.wait_with_output().unwrap();
    assert!(ok(&o).contains("reloaded"), "{}", stdout(&o));
    hello_with(&d, &new_ca, "n1")
        .await
        .expect("new handshakes use the new certificate");
    assert!(hello_with(&d, &old_ca, "n2").await.is_err());
    before
        .heartbeat(7)
        .await
        .expect("an established connection is untouched by the reload");
    // The state-changing command was logged with the peer's credentials.
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reload requested"))
        .unwrap_or_else(|| panic!("no reload log line:\n{log}"));
    assert!(line.contains(&format!("pid: {ctl_pid}")), "{line}");
    assert!(
        line.contains(&format!("uid: {}", nix::unistd::geteuid())),
        "{line}"
    );
    let s = d.stats();
    assert_eq!(s["reload"]["reloads_total"], 1);
    assert!(s["reload"]["last_reload_error"].is_null());

    // A broken certificate: reload fails, names the file, keeps the old one.
    std::fs::write(
        tls.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    let o = d.presencectl(&["reload"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains("reload failed"), "{e}");
    assert!(
        e.contains(&tls.join("cert.pem").display().to_string()),
        "{e}"
    );
    assert!(e.contains("previous certificate"), "{e}");
    let s = d.stats();
    assert_eq!(s["reload"]["reload_failures_total"], 1);
    let why = s["reload"]["last_reload_error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("cert.pem"), "{s:#}");
    let table = ok(&d.presencectl(&["stats"]));
    assert!(table.contains("LAST RELOAD FAILED"), "{table}");
    hello_with(&d, &new_ca, "n3")
        .await
        .expect("the last good certificate stays in service");
    before.heartbeat(8).await.expect("still connected");
    let text = ok(&d.presencectl(&["metrics"]));
    assert!(text.contains("presenced_reload_last_success 0"), "{text}");
    assert!(text.contains("presenced_reload_failures_total 1"), "{text}");
}

// --- control socket security ------------------------------------------------

#[test]
fn control_socket_is_0600_or_0660_with_control_group() {
    let d = Daemon::start();
    let meta = std::fs::metadata(&d.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    drop(d);

    let gid = nix::unistd::getegid();
    let group = nix::unistd::Group::from_gid(gid)
        .unwrap()
        .expect("our primary group has a name");
    let d = Daemon::start_with_config(&config_with_server_line(&format!(
        "control_group = \"{}\"",
        group.name
    )));
    let meta = std::fs::metadata(&d.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid.as_raw());
    ok(&d.presencectl(&["ping"]));
}

#[test]
fn oversized_requests_are_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    for size in [4097usize, 100_000] {
        let mut s = UnixStream::connect(&d.control).unwrap();
        s.set_read_timeout(Some(10 * SECOND)).unwrap();
        let mut req = vec![b'a'; size];
        req.push(b'\n');
        s.write_all(&req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let v: Value =
            serde_json::from_str(reply.trim()).unwrap_or_else(|e| panic!("{e}: {reply}"));
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("longer than 4096 bytes"),
            "{reply}"
        );
    }
    // Exactly at the cap is still parsed (as an unknown command).
    let v = d.control_json(&"x".repeat(4096));
    assert!(
        v["error"].as_str().unwrap().contains("unknown command"),
        "{v}"
    );
    ok(&d.presencectl(&["ping"]));
    assert_eq!(d.stats()["pid"], d.pid());
}

#[test]
fn stuck_control_clients_do_not_block_others() {
    let d = Daemon::start();
    // Clients that connect and send nothing, or half a line.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let mut half = UnixStream::connect(&d.control).unwrap();
    half.write_all(b"sta").unwrap();
    // A client that asks for events and never reads.
    let mut deaf = UnixStream::connect(&d.control).unwrap();
    deaf.write_all(b"events from 1\n").unwrap();

    let start = Instant::now();
    for _ in 0..5 {
        let t = Instant::now();
        ok(&d.presencectl(&["stats", "--json"]));
        ok(&d.presencectl(&["ping"]));
        assert!(
            t.elapsed() < 3 * SECOND,
            "a control round trip took {:?}",
            t.elapsed()
        );
    }
    // The half line is answered with an error after the 5 s request limit.
    half.set_read_timeout(Some(10 * SECOND)).unwrap();
    let mut reply = String::new();
    half.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("no request line within 5s"), "{reply}");
    let waited = start.elapsed();
    assert!(waited >= 4 * SECOND && waited < 9 * SECOND, "{waited:?}");
    // The silent ones got the same and were closed.
    for mut s in silent {
        s.set_read_timeout(Some(5 * SECOND)).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.contains("no request line"), "{r}");
    }
    ok(&d.presencectl(&["ping"]));
}

// --- metrics ------------------------------------------------------------------

/// `promtool check metrics` on `text`. Missing promtool fails the test in
/// CI (CI=true or PRESENCED_REQUIRE_PROMTOOL=1) and is skipped elsewhere.
fn promtool_check(text: &str) {
    let required = std::env::var_os("CI").is_some_and(|v| v != "false" && !v.is_empty())
        || std::env::var_os("PRESENCED_REQUIRE_PROMTOOL").is_some();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            eprintln!("promtool not found (apt-get install prometheus): skipping its check");
            return;
        }
        Err(e) => panic!("promtool: {e} (apt-get install prometheus)"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics failed:\n{}{}\n--- text ---\n{text}",
        stdout(&o),
        stderr(&o)
    );
}

fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("prometheus-parse accepts the text")
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name}: unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_a_parser() {
    let d = Daemon::start();
    let (mut c, _) = d.agent("metered").await;
    for seq in 1..=3 {
        c.heartbeat(seq).await.unwrap();
    }
    let stats = d.wait_stats(5 * SECOND, |s| s["heartbeats_total"] == 3);
    let text = ok(&d.presencectl(&["metrics"]));
    promtool_check(&text);
    let scrape = parse_metrics(&text);
    assert_eq!(sample(&scrape, "presenced_agents_online", &[]), 1.0);
    assert_eq!(sample(&scrape, "presenced_connections", &[]), 1.0);
    assert_eq!(sample(&scrape, "presenced_heartbeats_total", &[]), 3.0);
    assert_eq!(sample(&scrape, "presenced_handshakes_total", &[]), 1.0);
    assert_eq!(sample(&scrape, "presenced_shards", &[]), 2.0);
    let rss = sample(&scrape, "presenced_resident_memory_bytes", &[]);
    assert!(rss > 1e6, "rss {rss}");
    // Per shard: one series per shard, adding up to the total.
    let per_shard: f64 = (0..2)
        .map(|i| {
            sample(
                &scrape,
                "presenced_shard_heartbeats_total",
                &[("shard", &i.to_string())],
            )
        })
        .sum();
    assert_eq!(per_shard, 3.0);
    // Every protocol error code is present, with a value.
    for code in stats["errors_sent"].as_object().unwrap().keys() {
        sample(
            &scrape,
            "presenced_protocol_errors_sent_total",
            &[("code", code)],
        );
    }
    sample(
        &scrape,
        "presenced_handshake_failures_by_reason_total",
        &[("reason", "timeout")],
    );
    // Latency summaries: quantiles per shard, and one handshake counted.
    let mut handshakes = 0.0;
    for s in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "presenced_handshake_latency_seconds")
    {
        assert!(s.labels.get("shard").is_some());
        if let prometheus_parse::Value::Summary(qs) = &s.value {
            assert_eq!(qs.len(), 4, "{qs:?}");
        } else {
            panic!("not a summary: {s:?}");
        }
    }
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("presenced_handshake_latency_seconds_count{") {
            handshakes += rest.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
    }
    assert_eq!(handshakes, 1.0, "{text}");
    assert!(text.contains("# TYPE presenced_heartbeat_latency_seconds summary"));
    assert!(text.contains("presenced_heartbeat_latency_seconds{shard=\""));
}

/// A port that was free a moment ago.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A bare HTTP/1.1 GET; returns (status code, headers, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(15 * SECOND)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_http_endpoint_serves_the_same_text() {
    let addr = free_port();
    let d = Daemon::start_with(Options {
        extra: format!("\n[metrics]\nlisten = \"{addr}\"\n"),
        ..Options::default()
    });
    let (_c, _) = d.agent("scraped").await;
    d.wait_stats(5 * SECOND, |s| s["agents_online"] == 1);
    assert!(d.log_text().contains(&format!("http://{addr}/metrics")));

    // A scraper that connects and sends nothing does not hold up the others.
    let _silent = TcpStream::connect(addr).unwrap();
    let (status, head, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    promtool_check(&body);
    let scrape = parse_metrics(&body);
    assert_eq!(sample(&scrape, "presenced_agents_online", &[]), 1.0);
    let (status, _, _) = http_get(addr, "/metrics?debug=1");
    assert_eq!(status, 200);
    let (status, _, body) = http_get(addr, "/");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/metrics"), "{body}");
}

#[test]
fn metrics_listen_address_in_use_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = dev_setup(&format!(
        "{}\n[metrics]\nlisten = \"{addr}\"\n",
        config_text(&Options::default())
    ));
    let o = Command::new(bin("presenced"))
        .args(["serve", "--config"])
        .arg(dir.path().join("presenced.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&addr.to_string()), "{e}");
    assert!(e.contains("in use"), "{e}");
}

// --- systemd notify -----------------------------------------------------------

/// Datagrams from the daemon's sd_notify, through a channel.
fn notify_listener(path: &Path) -> mpsc::Receiver<(Instant, String)> {
    let sock = UnixDatagram::bind(path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx.send((Instant::now(), msg)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Wait for a datagram containing `needle`; returns it and everything seen before it.
fn wait_for(
    rx: &mpsc::Receiver<(Instant, String)>,
    needle: &str,
    limit: Duration,
) -> (Instant, String, Vec<String>) {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, m)) if m.contains(needle) => return (t, m, seen),
            Ok((_, m)) => seen.push(m),
            Err(_) => panic!("no `{needle}` within {limit:?}; saw {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_watchdog_reload_stopping() {
    let sockdir = tempfile::tempdir().unwrap();
    let path = sockdir.path().join("notify.sock");
    let rx = notify_listener(&path);
    let dir = dev_setup(&config_text(&Options::default()));
    let mut d = Daemon::spawn_in_env(
        dir,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
        true,
    );

    let (_, ready, before) = wait_for(&rx, "READY=1", 10 * SECOND);
    assert!(before.is_empty(), "READY=1 comes first: {before:?}");
    assert!(ready.contains("STATUS=listening on"), "{ready}");
    assert!(ready.contains(&d.addr.to_string()), "{ready}");

    // WATCHDOG=1 every WATCHDOG_USEC/2 = 200 ms, with a STATUS line each time.
    let start = Instant::now();
    let mut pings = 0;
    let mut statuses = Vec::new();
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok((_, m)) = rx.recv_timeout(Duration::from_millis(100)) {
            if m.contains("WATCHDOG=1") {
                pings += 1;
            }
            if m.contains("STATUS=") {
                statuses.push(m);
            }
        }
    }
    assert!(
        pings >= 3,
        "{pings} WATCHDOG=1 in 1.5 s; statuses {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| s.contains("0 agents online")),
        "{statuses:?}"
    );

    let (_c, _) = d.agent("notified").await;
    wait_for(&rx, "STATUS=1 agents online, 1 connections", 5 * SECOND);

    signal(d.pid(), Signal::SIGHUP).unwrap();
    let (t_reloading, _, _) = wait_for(&rx, "RELOADING=1", 5 * SECOND);
    let (t_ready, m, _) = wait_for(&rx, "READY=1", 5 * SECOND);
    assert!(t_ready >= t_reloading);
    assert!(m.contains("STATUS=reloaded"), "{m}");
    assert_eq!(d.stats()["reload"]["reloads_total"], 1);

    signal(d.pid(), Signal::SIGTERM).unwrap();
    wait_for(&rx, "STOPPING=1", 10 * SECOND);
    let st = d
        .wait_exit(15 * SECOND)
        .expect("daemon exits after SIGTERM");
    assert!(st.success(), "{st}");
}

// --- tuning check -------------------------------------------------------------

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("{text}\n")).unwrap();
}

/// A fake proc tree matching the 1m profile: every sysctl at the profile's
/// value, limits that fit, 256 GiB of RAM and 16 CPUs.
fn good_proc_tree() -> tempfile::TempDir {
    use presenced::ops::tuning::Profile;
    let dir = tempfile::tempdir().unwrap();
    let p = Profile::Agents1m;
    for e in p.entries().unwrap() {
        write(&e.path_under(dir.path()), &e.value.replace(' ', "\t"));
    }
    let nofile = (p.agents() * 2).to_string();
    write(
        &dir.path().join("self/limits"),
        &format!(
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max open files            {nofile:<20} {nofile:<20} files     \n\
             Max locked memory         67108864             67108864             bytes     "
        ),
    );
    write(
        &dir.path().join("meminfo"),
        &format!("MemTotal:       {} kB\nMemFree:  1 kB", 256u64 << 20),
    );
    let cpuinfo: String = (0..16)
        .map(|i| format!("processor\t: {i}\nmodel name\t: test\n\n"))
        .collect();
    write(&dir.path().join("cpuinfo"), &cpuinfo);
    dir
}

fn tuning_check(root: &Path) -> Output {
    Command::new(bin("presenced"))
        .args(["tuning", "check", "--profile", "1m", "--proc-root"])
        .arg(root)
        .output()
        .unwrap()
}

#[test]
fn tuning_check_against_a_fake_proc_tree() {
    let tree = good_proc_tree();
    let o = tuning_check(tree.path());
    let report = ok(&o);
    assert!(report.contains("fs.nr_open"), "{report}");

    write(&tree.path().join("sys/fs/nr_open"), "1048576");
    let o = tuning_check(tree.path());
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    let line = stdout(&o)
        .lines()
        .find(|l| l.contains("fs.nr_open"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(line.contains("LOW"), "{}", stdout(&o));

    let tree = good_proc_tree();
    std::fs::remove_file(tree.path().join("meminfo")).unwrap();
    let o = tuning_check(tree.path());
    assert_eq!(code(&o), 2, "{}{}", stdout(&o), stderr(&o));
    let missing: PathBuf = tree.path().join("meminfo");
    assert!(
        stderr(&o).contains(&missing.display().to_string()),
        "{}",
        stderr(&o)
    );

    let o = Command::new(bin("presenced"))
        .args(["tuning", "check", "--profile", "5m", "--proc-root"])
        .arg(tree.path())
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("5m"), "{}", stderr(&o));
}
