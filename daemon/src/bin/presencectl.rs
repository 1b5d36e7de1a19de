//! `presencectl`: the operator's client for presenced's control socket.
//!
//! Exit codes: 0 ok, 1 the daemon reported an error (or broke off the
//! reply), 2 usage, 3 cannot connect to the control socket.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use presenced::ops::cli::ctl::{Cmd, CtlCli as Cli, GuardAction};
use serde_json::Value;

/// Why presencectl failed; decides the exit code.
enum Failure {
    /// 3: the control socket could not be reached.
    Connect(String),
    /// 1: the daemon answered with an error, or the conversation broke.
    Daemon(String),
    /// 2: an argument the daemon could not be sent.
    Usage(String),
}

type Result<T> = std::result::Result<T, Failure>;

/// How long a one-shot reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an upgrade may take: the daemon answers only once the new
/// process serves (or the hand-over failed), and each of its steps may wait
/// up to 20 s for the other process.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Cmd::Stats { json } => stats(&cli.socket, *json),
        Cmd::Top {
            interval,
            iterations,
        } => top(&cli.socket, *interval, *iterations),
        Cmd::Agent { id, json } => agent(&cli.socket, id, *json),
        Cmd::Events { from } => events(&cli.socket, *from),
        Cmd::Reload => reload(&cli.socket),
        Cmd::Ping => ping(&cli.socket),
        Cmd::Metrics => metrics(&cli.socket),
        Cmd::Upgrade { binary, json } => upgrade(&cli.socket, binary.as_deref(), *json),
        Cmd::Cluster { json } => cluster(&cli.socket, *json),
        Cmd::Guard { json, action } => match action {
            None => guard(&cli.socket, *json),
            Some(GuardAction::Release { id, json: j }) => {
                guard_release(&cli.socket, id.as_deref(), *json || *j)
            }
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("presencectl: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Daemon(m)) => {
            eprintln!("presencectl: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Connect(m)) => {
            eprintln!("presencectl: {m}");
            ExitCode::from(3)
        }
    }
}

// --- talking to the socket -------------------------------------------------

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "run as the presenced user or a member of [server] control_group"
            }
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is presenced running? check --socket or [server] control_socket"
            }
            _ => "check --socket or [server] control_socket, and that presenced is running",
        };
        Failure::Connect(format!(
            "cannot connect to control socket {}: {} — {hint}",
            socket.display(),
            os_message(&e)
        ))
    })
}

/// The OS error text without Rust's " (os error N)" suffix.
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn broken(socket: &Path, e: std::io::Error) -> Failure {
    Failure::Daemon(format!(
        "control socket {}: {}",
        socket.display(),
        os_message(&e)
    ))
}

/// Send `cmd`; return everything the daemon wrote until it closed.
fn request(socket: &Path, cmd: &str) -> Result<String> {
    request_within(socket, cmd, REPLY_TIMEOUT)
}

/// [`request`] with its own reply timeout.
fn request_within(socket: &Path, cmd: &str, timeout: Duration) -> Result<String> {
    let mut s = connect(socket)?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| broken(socket, e))?;
    s.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| broken(socket, e))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| broken(socket, e))?;
    if out.is_empty() {
        return Err(Failure::Daemon(format!(
            "control socket {}: the daemon closed without answering `{cmd}`",
            socket.display()
        )));
    }
    Ok(out)
}

/// Send `cmd` and parse the one JSON object it returns; an `"error"` key is a failure.
fn request_json(socket: &Path, cmd: &str) -> Result<Value> {
    let text = request(socket, cmd)?;
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        Failure::Daemon(format!(
            "unexpected reply to `{cmd}` ({e}): {}",
            text.trim()
        ))
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(Failure::Daemon(format!("presenced: {e}")));
    }
    Ok(v)
}

/// Write to stdout; a closed pipe (`| head`) ends the program quietly.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    if o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

// --- commands --------------------------------------------------------------

fn ping(socket: &Path) -> Result<()> {
    let v = request_json(socket, "ping")?;
    out(&format!(
        "presenced {} (pid {}) is answering on {}\n",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        socket.display()
    ));
    Ok(())
}

fn metrics(socket: &Path) -> Result<()> {
    let text = request(socket, "metrics")?;
    if text.starts_with('{') {
        // An error object instead of the text format.
        let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        let msg = v["error"].as_str().unwrap_or(text.trim()).to_owned();
        return Err(Failure::Daemon(format!("presenced: {msg}")));
    }
    out(&text);
    Ok(())
}

fn reload(socket: &Path) -> Result<()> {
    let text = request(socket, "reload")?;
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        Failure::Daemon(format!(
            "unexpected reply to `reload` ({e}): {}",
            text.trim()
        ))
    })?;
    if v["ok"] == Value::Bool(true) {
        out("reloaded: new TLS handshakes use the new certificate and key, HELLOs the new fleet key\n");
        return Ok(());
    }
    let why = v["error"].as_str().unwrap_or("no reason given");
    Err(Failure::Daemon(format!(
        "reload failed: {why}\nthe previous certificate, key and fleet key stay in service; fix the file and reload again"
    )))
}

fn upgrade(socket: &Path, binary: Option<&Path>, json: bool) -> Result<()> {
    let cmd = match binary {
        None => "upgrade".to_owned(),
        Some(b) => {
            // The daemon resolves a relative path against its own working
            // directory (`/` under systemd): send it absolute.
            let abs = std::path::absolute(b).map_err(|e| {
                Failure::Usage(format!("--binary {}: {}", b.display(), os_message(&e)))
            })?;
            let text = abs.to_str().ok_or_else(|| {
                Failure::Usage(format!("--binary {}: not valid UTF-8", abs.display()))
            })?;
            if text.chars().any(char::is_whitespace) {
                return Err(Failure::Usage(format!(
                    "--binary {text}: the control socket cannot carry a path with whitespace; \
                     use a path (or symlink) without it"
                )));
            }
            format!("upgrade {text}")
        }
    };
    let text = request_within(socket, &cmd, UPGRADE_TIMEOUT)?;
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        Failure::Daemon(format!(
            "unexpected reply to `upgrade` ({e}): {}",
            text.trim()
        ))
    })?;
    if json {
        out(&format!("{v}\n"));
    }
    if v["ok"] != Value::Bool(true) {
        let why = v["error"].as_str().unwrap_or("no reason given");
        let after = if v["committed"] == Value::Bool(true) {
            "the hand-over had committed: the previous process stops (check the new one)"
        } else {
            "the running daemon keeps serving every connection"
        };
        return Err(Failure::Daemon(format!("upgrade failed: {why}\n{after}")));
    }
    if !json {
        out(&upgrade_table(&v));
    }
    Ok(())
}

fn upgrade_table(v: &Value) -> String {
    let mut s = format!(
        "upgraded: pid {} now serves on the same control socket; the previous process exits\n",
        v["new_pid"]
    );
    let rows = [
        ("connections", u(&v["connections"]).to_string()),
        ("records", u(&v["records"]).to_string()),
        (
            "not carried",
            format!(
                "{} (mid-handshake or mid-KeyUpdate: sent RECONNECT or closed)",
                u(&v["uncarried"])
            ),
        ),
        ("took", format!("{} ms", u(&v["elapsed_ms"]))),
    ];
    for (k, val) in rows {
        s.push_str(&format!("{k:<15} {val}\n"));
    }
    s
}

fn guard(socket: &Path, json: bool) -> Result<()> {
    let v = request_json(socket, "guard")?;
    if json {
        out(&format!("{v}\n"));
    } else {
        out(&guard_table(&v, now_ms()));
    }
    Ok(())
}

fn guard_release(socket: &Path, id: Option<&str>, json: bool) -> Result<()> {
    let cmd = match id {
        Some(id) => format!("guard release {id}"),
        None => "guard release".to_owned(),
    };
    let v = request_json(socket, &cmd)?;
    if json {
        out(&format!("{v}\n"));
        return Ok(());
    }
    let n = u(&v["released"]);
    out(&match (id, n) {
        (Some(id), 0) => format!("agent {id} has no held offline event; nothing released\n"),
        (Some(id), _) => format!("released the held offline event of {id}; it is published now\n"),
        (None, n) => format!(
            "released {n} held offline event(s); they are published now and the guard is inactive\n"
        ),
    });
    Ok(())
}

fn cluster(socket: &Path, json: bool) -> Result<()> {
    let v = request_json(socket, "cluster")?;
    if json {
        out(&format!("{v}\n"));
    } else {
        out(&cluster_table(&v, now_ms()));
    }
    Ok(())
}

/// `cluster`: this node's bridge, then one row per node.
fn cluster_table(v: &Value, now: u64) -> String {
    let st = &v["stats"];
    let yes = |x: &Value| {
        if x.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    let mut s = String::new();
    let mut row = |k: &str, val: String| s.push_str(&format!("{k:<15} {val}\n"));
    row(
        "node",
        format!(
            "{} (epoch {})",
            v["node_id"].as_str().unwrap_or("?"),
            u(&v["epoch"])
        ),
    );
    row(
        "nats",
        format!(
            "connected {}, ready {}, server {}",
            yes(&v["connected"]),
            yes(&v["ready"]),
            st["server_version"].as_str().unwrap_or("-")
        ),
    );
    row(
        "writes",
        format!(
            "{} ({} events, {} conflicts, {} suppressed offlines)",
            u(&st["writes_total"]),
            u(&st["events_total"]),
            u(&st["conflicts_total"]),
            u(&st["suppressed_offlines_total"])
        ),
    );
    row(
        "backlog",
        format!("{} of {}", u(&st["backlog"]), u(&st["backlog_max"])),
    );
    row(
        "publish lag",
        format!(
            "p50 {} ms, p99 {} ms, max {} ms",
            u(&st["publish_lag_ms"]["p50_ms"]),
            u(&st["publish_lag_ms"]["p99_ms"]),
            u(&st["publish_lag_ms"]["max_ms"])
        ),
    );
    row("last success", when(&st["last_success_ms"], now));
    if let Some(e) = st["last_error"].as_str() {
        row("last error", e.to_owned());
    }
    s.push_str(&format!(
        "\n{:<24} {:<6} {:>8} {:>11} {:>8} {:>8} {:>12}\n",
        "NODE", "ALIVE", "AGENTS", "CONNECTIONS", "LAG_MS", "BACKLOG", "SEEN"
    ));
    for n in v["nodes"].as_array().into_iter().flatten() {
        let mut id = n["node_id"].as_str().unwrap_or("?").to_owned();
        if n["local"].as_bool() == Some(true) {
            id.push_str(" *");
        }
        s.push_str(&format!(
            "{:<24} {:<6} {:>8} {:>11} {:>8} {:>8} {:>12}\n",
            id,
            yes(&n["alive"]),
            u(&n["agents"]),
            u(&n["connections"]),
            u(&n["publish_lag_ms"]),
            u(&n["backlog"]),
            when(&n["ts_ms"], now)
        ));
    }
    s
}

/// `guard`: status rows, then the held offline events.
fn guard_table(v: &Value, now: u64) -> String {
    let st = &v["status"];
    let pct = |x: &Value| format!("{:.2}%", x.as_f64().unwrap_or(0.0) * 100.0);
    let ms = |x: &Value| humantime::format_duration(Duration::from_millis(u(x))).to_string();
    let mut s = String::new();
    let mut row = |k: &str, val: String| s.push_str(&format!("{k:<15} {val}\n"));
    row("guard", st["state"].as_str().unwrap_or("?").to_owned());
    row("since", when(&st["since_ms"], now));
    row(
        "window",
        format!(
            "{} offline in the last {} ({} of {} online; threshold {}, at least {})",
            u(&st["window_offline"]),
            ms(&st["window_ms"]),
            pct(&st["share"]),
            u(&st["online_fleet"]),
            pct(&st["threshold_share"]),
            u(&st["min_offline"]),
        ),
    );
    row(
        "release",
        match st["quiet_since_ms"].as_u64() {
            Some(_) => format!(
                "below the threshold since {}; held events go out after {} of quiet",
                when(&st["quiet_since_ms"], now),
                ms(&st["release_quiet_ms"])
            ),
            None => format!("after {} below the threshold", ms(&st["release_quiet_ms"])),
        },
    );
    row("held", u(&st["held"]).to_string());
    row(
        "totals",
        format!(
            "activations {}, held {}, released {}, suppressed {}",
            u(&st["activations_total"]),
            u(&st["held_total"]),
            u(&st["released_total"]),
            u(&st["suppressed_total"])
        ),
    );
    let held = v["held"].as_array().map(Vec::as_slice).unwrap_or_default();
    s.push('\n');
    if held.is_empty() {
        s.push_str("held offline events: none\n");
        return s;
    }
    s.push_str(&format!(
        "{:<40} {:<16} {:<45} held at\n",
        "agent", "reason", "went offline"
    ));
    for h in held {
        s.push_str(&format!(
            "{:<40} {:<16} {:<45} {}\n",
            h["agent"].as_str().unwrap_or("?"),
            h["reason"].as_str().unwrap_or("?"),
            when(&h["ts_ms"], now),
            when(&h["held_at_ms"], now),
        ));
    }
    if (held.len() as u64) < u(&st["held"]) {
        s.push_str(&format!(
            "(the first {} of {} held events; `--json` has the same list)\n",
            held.len(),
            u(&st["held"])
        ));
    }
    s
}

fn agent(socket: &Path, id: &str, json: bool) -> Result<()> {
    let v = request_json(socket, &format!("agent {id}"))?;
    if json {
        out(&format!("{v}\n"));
        return Ok(());
    }
    let now = now_ms();
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<15} {v}\n"));
    row(
        &mut s,
        "agent",
        v["agent"].as_str().unwrap_or(id).to_owned(),
    );
    let state = v["state"].as_str().unwrap_or("?");
    let state = match (state, v["offline_reason"].as_str()) {
        ("offline", Some(r)) => format!("offline ({r})"),
        ("grace", _) => "grace (connection dropped without BYE; still reported online)".into(),
        (s, _) => s.to_owned(),
    };
    row(&mut s, "state", state);
    row(&mut s, "since", when(&v["since_ms"], now));
    row(&mut s, "last seen", when(&v["last_seen_ms"], now));
    row(&mut s, "session", v["session"].to_string());
    row(
        &mut s,
        "connected on",
        match v["shard"].as_u64() {
            Some(n) => format!("shard {n}"),
            None => "not connected".into(),
        },
    );
    row(&mut s, "owner shard", v["owner_shard"].to_string());
    out(&s);
    Ok(())
}

fn events(socket: &Path, from: Option<u64>) -> Result<()> {
    let mut s = connect(socket)?;
    let cmd = match from {
        Some(seq) => format!("events from {seq}\n"),
        None => "events\n".to_owned(),
    };
    // No shutdown of our write side: the daemon ends the stream on EOF.
    s.write_all(cmd.as_bytes()).map_err(|e| broken(socket, e))?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(broken(socket, e)),
        }
        if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
            if let Some(msg) = v.get("error").and_then(Value::as_str) {
                return Err(Failure::Daemon(format!("presenced: {msg}")));
            }
        }
        out(&line);
    }
}

fn stats(socket: &Path, json: bool) -> Result<()> {
    let v = request_json(socket, "stats")?;
    if json {
        out(&format!("{v}\n"));
    } else {
        out(&stats_table(&v));
    }
    Ok(())
}

fn top(socket: &Path, interval: Duration, iterations: Option<u64>) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<(Instant, Value)> = None;
    let mut n = 0u64;
    loop {
        let v = request_json(socket, "stats")?;
        let t = Instant::now();
        let block = top_block(
            &v,
            prev.as_ref().map(|(pt, pv)| (t.duration_since(*pt), pv)),
        );
        if tty {
            // Home the cursor and clear the screen, then draw.
            out(&format!("\x1b[H\x1b[2J{block}"));
        } else {
            out(&format!("{block}\n"));
        }
        prev = Some((t, v));
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

// --- formatting ------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-01-02T03:04:05.678Z (12s ago)`, or `-`.
fn when(ms: &Value, now: u64) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = Duration::from_secs(now.saturating_sub(ms) / 1000);
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_millis(t),
        humantime::format_duration(ago)
    )
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// 1536 -> "1.5 KiB"; null -> "-".
fn bytes(v: &Value) -> String {
    let Some(b) = v.as_u64() else {
        return "-".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// Microseconds to a short human duration: 850us, 1.2ms, 3.40s.
fn micros(v: &Value) -> String {
    let Some(us) = v.as_u64() else {
        return "-".into();
    };
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

fn latency(l: &Value, key: &str) -> String {
    if u(&l["count"]) == 0 {
        "-".into()
    } else {
        micros(&l[key])
    }
}

fn uptime(v: &Value) -> String {
    humantime::format_duration(Duration::from_secs(u(v))).to_string()
}

fn stats_table(v: &Value) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "presenced {}  pid {}  listen {}  shards {}  up {}",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["listen"].as_str().unwrap_or("?"),
        v["shards"],
        uptime(&v["uptime_s"])
    ));
    line(String::new());
    for (k, val) in stats_summary(v) {
        line(format!("{k:<15} {val}"));
    }
    line(String::new());
    s.push_str(&shard_table(v));
    s
}

/// The daemon-wide figures, one labelled line each.
fn stats_summary(v: &Value) -> Vec<(&'static str, String)> {
    vec![
        (
            "agents online",
            format!(
                "{} (in grace {})",
                u(&v["agents_online"]),
                u(&v["agents_in_grace"])
            ),
        ),
        ("agents known", u(&v["agents_known"]).to_string()),
        (
            "connections",
            format!("{} (sessions {})", u(&v["connections"]), u(&v["sessions"])),
        ),
        (
            "accepted",
            format!(
                "{} (accept errors {})",
                u(&v["accepted_total"]),
                u(&v["accept_errors_total"])
            ),
        ),
        (
            "handshakes",
            format!(
                "{} (failures {}, of which timeouts {})",
                u(&v["handshakes_total"]),
                u(&v["handshake_failures_total"]),
                u(&v["handshake_timeouts_total"])
            ),
        ),
        ("hellos", u(&v["hellos_total"]).to_string()),
        ("heartbeats", u(&v["heartbeats_total"]).to_string()),
        (
            "sessions ended",
            format!(
                "timeout {}, bye {}",
                u(&v["timeouts_total"]),
                u(&v["byes_total"])
            ),
        ),
        ("errors sent", errors_sent(&v["errors_sent"])),
        (
            "events",
            format!(
                "next seq {}, oldest held {}",
                u(&v["events_next_seq"]),
                u(&v["events_oldest_seq"])
            ),
        ),
        (
            "memory",
            format!(
                "rss {}, heap {}",
                bytes(&v["rss_bytes"]),
                bytes(&v["heap_bytes"])
            ),
        ),
        ("reload", reload_line(&v["reload"])),
    ]
}

/// One row per shard.
fn shard_table(v: &Value) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "{:>5} {:>9} {:>9} {:>8} {:>6} {:>9} {:>10} {:>11} {:>9} {:>12} {:>8} {:>8}",
        "shard",
        "conns",
        "sessions",
        "online",
        "grace",
        "known",
        "accepted",
        "handshakes",
        "hs fail",
        "heartbeats",
        "hs p99",
        "hb p99"
    ));
    for sh in v["per_shard"].as_array().into_iter().flatten() {
        line(format!(
            "{:>5} {:>9} {:>9} {:>8} {:>6} {:>9} {:>10} {:>11} {:>9} {:>12} {:>8} {:>8}",
            u(&sh["shard"]),
            u(&sh["connections"]),
            u(&sh["sessions"]),
            u(&sh["agents_online"]),
            u(&sh["agents_in_grace"]),
            u(&sh["agents_known"]),
            u(&sh["accepted_total"]),
            u(&sh["handshakes_total"]),
            u(&sh["handshake_failures_total"]),
            u(&sh["heartbeats_total"]),
            latency(&sh["handshake_latency"], "p99_us"),
            latency(&sh["heartbeat_latency"], "p99_us"),
        ));
    }
    s
}

fn errors_sent(v: &Value) -> String {
    let nonzero: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| u(n) > 0)
        .map(|(k, n)| format!("{k} {}", u(n)))
        .collect();
    if nonzero.is_empty() {
        "none".into()
    } else {
        nonzero.join(", ")
    }
}

fn reload_line(r: &Value) -> String {
    if !r.is_object() || u(&r["reloads_total"]) == 0 {
        return "none since start".into();
    }
    let mut s = format!(
        "{} reloads, {} failed",
        u(&r["reloads_total"]),
        u(&r["reload_failures_total"])
    );
    if let Some(e) = r["last_reload_error"].as_str() {
        s.push_str(&format!("; LAST RELOAD FAILED: {e}"));
    } else {
        s.push_str("; last one succeeded");
    }
    s
}

/// One `top` screen. `prev` is the previous sample and the time since it.
fn top_block(v: &Value, prev: Option<(Duration, &Value)>) -> String {
    let rate = |cur: &Value, key: &str, shard: Option<usize>| -> String {
        let Some((dt, p)) = prev else {
            return "-".into();
        };
        let old = match shard {
            Some(i) => &p["per_shard"][i][key],
            None => &p[key],
        };
        let secs = dt.as_secs_f64();
        if secs <= 0.0 || !old.is_u64() {
            return "-".into();
        }
        format!("{:.1}", u(cur).saturating_sub(u(old)) as f64 / secs)
    };
    let queue = |sh: &Value| -> String {
        match (sh["accept_queue"].as_u64(), sh["accept_backlog"].as_u64()) {
            (Some(q), Some(b)) => format!("{q}/{b}"),
            (Some(q), None) => q.to_string(),
            _ => "-".into(),
        }
    };
    let mut s = String::new();
    s.push_str(&format!(
        "presenced {}  pid {}  up {}  {}\n",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        uptime(&v["uptime_s"]),
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    s.push_str(&format!(
        "agents online {} (grace {})  connections {}  handshakes/s {}  heartbeats/s {}  rss {}  heap {}\n\n",
        u(&v["agents_online"]),
        u(&v["agents_in_grace"]),
        u(&v["connections"]),
        rate(&v["handshakes_total"], "handshakes_total", None),
        rate(&v["heartbeats_total"], "heartbeats_total", None),
        bytes(&v["rss_bytes"]),
        bytes(&v["heap_bytes"]),
    ));
    s.push_str(&format!(
        "{:>5} {:>9} {:>8} {:>8} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8}\n",
        "shard",
        "conns",
        "online",
        "hs/s",
        "hb/s",
        "acceptq",
        "hs p50",
        "hs p99",
        "hb p50",
        "hb p99"
    ));
    for (i, sh) in v["per_shard"].as_array().into_iter().flatten().enumerate() {
        s.push_str(&format!(
            "{:>5} {:>9} {:>8} {:>8} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8}\n",
            u(&sh["shard"]),
            u(&sh["connections"]),
            u(&sh["agents_online"]),
            rate(&sh["handshakes_total"], "handshakes_total", Some(i)),
            rate(&sh["heartbeats_total"], "heartbeats_total", Some(i)),
            queue(sh),
            latency(&sh["handshake_latency"], "p50_us"),
            latency(&sh["handshake_latency"], "p99_us"),
            latency(&sh["heartbeat_latency"], "p50_us"),
            latency(&sh["heartbeat_latency"], "p99_us"),
        ));
    }
    s
}
