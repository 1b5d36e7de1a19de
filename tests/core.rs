//! End-to-end tests of the core daemon: the spawned `presenced` over real
//! TLS on loopback (port 0), observed through its real control socket.

use std::io::{Read, Write};
use std::net::TcpStream as StdTcp;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use presence_client::protocol::{ErrorCode, Frame};
use presence_client::{Alpn, ConnError, Connection};
use presenced_tests::{Daemon, Options};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

fn ev(v: &Value) -> (String, String, String) {
    (
        v["agent"].as_str().unwrap_or_default().to_owned(),
        v["state"].as_str().unwrap_or_default().to_owned(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn triple(a: &str, s: &str, r: &str) -> (String, String, String) {
    (a.into(), s.into(), r.into())
}

/// Expect the server to send ERROR `code` and close.
async fn expect_error(c: &mut Connection, code: ErrorCode) {
    let f = tokio::time::timeout(Duration::from_secs(5), c.recv_frame())
        .await
        .expect("server answered in time");
    match f {
        Ok(Some(Frame::Error { code: got, message })) => {
            assert_eq!(got, code as u16, "message: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), c.recv_frame())
        .await
        .expect("server closed in time");
    assert!(matches!(end, Ok(None) | Err(_)), "not closed: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_heartbeat_ack_bye_and_port_zero() {
    let d = Daemon::start();
    assert_ne!(d.addr.port(), 0, "port 0 resolved to a real port");
    let stats = d.stats();
    assert_eq!(stats["listen"], d.addr.to_string());
    assert_eq!(stats["shards"], 2);
    assert!(
        d.log_text().contains(&d.addr.to_string()),
        "bound address is logged"
    );

    let mut events = d.events(None);
    let (mut c, w) = d.agent("host-1.example").await;
    assert_eq!(c.alpn(), Some(&b"presence/1"[..]));
    assert_eq!(w.heartbeat_interval_ms, 30_000);
    assert_eq!(
        ev(&events.next(5 * SECOND).expect("online event")),
        triple("host-1.example", "online", "hello")
    );

    for seq in [1u32, 2, u32::MAX] {
        let rtt = c
            .heartbeat(seq)
            .await
            .expect("heartbeat acked with the same seq");
        assert!(rtt < 5 * SECOND);
    }
    // Several heartbeats batched in one TLS record get one ACK each, in order.
    let mut batch = Vec::new();
    for seq in 10..15u32 {
        Frame::Heartbeat { seq }.encode(&mut batch);
    }
    c.send_raw(&batch).await.unwrap();
    for seq in 10..15u32 {
        assert_eq!(
            c.recv_frame().await.unwrap(),
            Some(Frame::HeartbeatAck { seq })
        );
    }
    // A frame split across writes is reassembled.
    let hb = Frame::Heartbeat { seq: 99 }.to_bytes();
    c.send_raw(&hb[..2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send_raw(&hb[2..]).await.unwrap();
    assert_eq!(
        c.recv_frame().await.unwrap(),
        Some(Frame::HeartbeatAck { seq: 99 })
    );

    let rec = d.control_json("agent host-1.example");
    assert_eq!(rec["state"], "online");
    assert_eq!(rec["session"], w.session_id);
    assert!(rec["shard"].is_number() && rec["last_seen_ms"].as_u64() >= rec["since_ms"].as_u64());

    let s = d.stats();
    assert_eq!(s["agents_online"], 1);
    assert_eq!(s["connections"], 1);
    assert!(s["heartbeats_total"].as_u64().unwrap() >= 9);
    assert_eq!(s["handshakes_total"], 1);

    c.bye().await.unwrap();
    assert_eq!(
        ev(&events.next(5 * SECOND).expect("offline event")),
        triple("host-1.example", "offline", "bye")
    );
    d.wait_stats(5 * SECOND, |s| {
        s["agents_online"] == 0 && s["connections"] == 0
    });
    assert_eq!(d.control_json("agent host-1.example")["state"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_times_out() {
    let d = Daemon::start_with(Options {
        heartbeat_interval: "200ms",
        miss_limit: 2,
        ..Options::default()
    });
    let mut events = d.events(None);
    let (mut c, w) = d.agent("quiet").await;
    assert_eq!(w.heartbeat_interval_ms, 200);
    // A heartbeating agent on the same daemon is not touched.
    let (mut busy, _) = d.agent("busy").await;
    let start = Instant::now();
    let mut got = vec![
        ev(&events.next(5 * SECOND).unwrap()),
        ev(&events.next(5 * SECOND).unwrap()),
    ];
    got.sort();
    assert_eq!(
        got,
        [
            triple("busy", "online", "hello"),
            triple("quiet", "online", "hello")
        ]
    );
    let mut seq = 0;
    let offline = loop {
        seq += 1;
        busy.heartbeat(seq)
            .await
            .expect("busy agent keeps its connection");
        if let Some(e) = events.next(Duration::from_millis(100)) {
            break e;
        }
        assert!(start.elapsed() < 5 * SECOND, "no timeout event");
    };
    assert_eq!(ev(&offline), triple("quiet", "offline", "timeout"));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(380),
        "timed out too early: {waited:?}"
    );
    // The server closed the silent connection.
    let end = tokio::time::timeout(5 * SECOND, c.recv_frame())
        .await
        .expect("closed");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(busy.heartbeat(seq + 1).await.is_ok());
    assert_eq!(d.stats()["timeouts_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_reconnect_within_grace_is_silent_and_late_one_is_offline() {
    let d = Daemon::start_with(Options {
        offline_grace: "1500ms",
        ..Options::default()
    });
    let mut events = d.events(None);
    let (c, _) = d.agent("flappy").await;
    assert_eq!(
        ev(&events.next(5 * SECOND).unwrap()),
        triple("flappy", "online", "hello")
    );

    drop(c); // connection lost, no BYE
    d.wait_stats(5 * SECOND, |s| s["agents_in_grace"] == 1);
    assert_eq!(d.stats()["agents_online"], 1, "in grace counts as online");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c2, _) = d.agent("flappy").await;
    c2.heartbeat(1).await.unwrap();
    // Wait past the first grace period: no event at all.
    assert_eq!(
        events.collect(Duration::from_millis(2500)),
        Vec::<Value>::new()
    );
    assert_eq!(d.control_json("agent flappy")["state"], "online");

    drop(c2);
    let e = events.next(5 * SECOND).expect("offline after grace");
    assert_eq!(ev(&e), triple("flappy", "offline", "disconnect"));
    assert_eq!(d.stats()["agents_online"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_session_supersedes_the_first_without_events() {
    let d = Daemon::start();
    let mut events = d.events(None);
    let (mut old, w1) = d.agent("dup").await;
    assert_eq!(
        ev(&events.next(5 * SECOND).unwrap()),
        triple("dup", "online", "hello")
    );
    let (mut new, w2) = d.agent("dup").await;
    assert_ne!(w1.session_id, w2.session_id);
    expect_error(&mut old, ErrorCode::Superseded).await;
    new.heartbeat(1).await.expect("new session works");
    assert_eq!(
        events.collect(Duration::from_millis(500)),
        Vec::<Value>::new()
    );
    let rec = d.control_json("agent dup");
    assert_eq!(rec["session"], w2.session_id);
    assert_eq!(rec["state"], "online");
    let s = d.stats();
    assert_eq!(s["agents_online"], 1);
    assert_eq!(s["errors_sent"]["superseded"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_right_error_and_leave_others_alone() {
    let d = Daemon::start();
    let mut events = d.events(None);
    let (mut bystander, _) = d.agent("bystander").await;
    let mut seq = 0u32;
    let mut check_bystander = async |c: &mut Connection| {
        seq += 1;
        c.heartbeat(seq).await.expect("bystander unaffected");
    };

    // Bad token.
    let mut c = d.connect().await;
    c.send_frame(&Frame::Hello {
        version: 1,
        id: b"intruder".to_vec(),
        token: [0; 32],
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::AuthenticationFailed).await;
    check_bystander(&mut bystander).await;

    // Unsupported version.
    let mut c = d.connect().await;
    let token = d.fleet_key.token(b"future");
    c.send_frame(&Frame::Hello {
        version: 2,
        id: b"future".to_vec(),
        token,
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::UnsupportedVersion).await;

    // A frame before HELLO.
    let mut c = d.connect().await;
    c.send_frame(&Frame::Heartbeat { seq: 1 }).await.unwrap();
    expect_error(&mut c, ErrorCode::MalformedFrame).await;

    // Unknown frame type, after HELLO.
    let (mut c, _) = d.agent("a-unknown").await;
    c.send_raw(&[0x09, 0, 0]).await.unwrap();
    expect_error(&mut c, ErrorCode::MalformedFrame).await;

    // Oversized length.
    let (mut c, _) = d.agent("a-oversized").await;
    c.send_raw(&[0x03, 0x04, 0x01]).await.unwrap();
    expect_error(&mut c, ErrorCode::MalformedFrame).await;

    // HELLO twice.
    let (mut c, _) = d.agent("a-twice").await;
    let token = d.fleet_key.token(b"a-twice");
    c.send_frame(&Frame::Hello {
        version: 1,
        id: b"a-twice".to_vec(),
        token,
    })
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::MalformedFrame).await;

    // A malformed HELLO (bad id characters).
    let mut c = d.connect().await;
    let mut raw = vec![0x01, 0, 2 + 3 + 32, 1, 3];
    raw.extend_from_slice(b"a b");
    raw.extend_from_slice(&[0; 32]);
    c.send_raw(&raw).await.unwrap();
    expect_error(&mut c, ErrorCode::MalformedFrame).await;
    check_bystander(&mut bystander).await;

    // Garbage instead of TLS.
    let before = d.stats()["handshake_failures_total"].as_u64().unwrap();
    let mut raw = StdTcp::connect(d.addr).unwrap();
    raw.set_read_timeout(Some(5 * SECOND)).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink); // closed by the server (maybe after an alert)
    d.wait_stats(5 * SECOND, |s| {
        s["handshake_failures_total"].as_u64().unwrap() > before
    });

    // Wrong ALPN is refused; no ALPN is accepted.
    let wrong = Connection::connect(
        d.addr,
        "localhost",
        d.client_tls_alpn(Alpn::Custom(vec![b"h2".to_vec()])),
    )
    .await;
    let wrong_ok = match wrong {
        Err(ConnError::Handshake { .. }) => false,
        Err(e) => panic!("unexpected error {e}"),
        // TLS 1.3 clients may finish before reading the server's alert.
        Ok(mut c) => c.recv_frame().await.is_ok_and(|f| f.is_some()),
    };
    assert!(!wrong_ok, "wrong ALPN must be refused");
    let mut none = Connection::connect(d.addr, "localhost", d.client_tls_alpn(Alpn::None))
        .await
        .unwrap();
    assert_eq!(none.alpn(), None);
    let token = d.fleet_key.token(b"no-alpn");
    none.hello(b"no-alpn", &token)
        .await
        .expect("no ALPN is accepted");
    check_bystander(&mut bystander).await;

    let s = d.stats();
    assert_eq!(s["errors_sent"]["authentication_failed"], 1);
    assert_eq!(s["errors_sent"]["unsupported_version"], 1);
    assert_eq!(s["errors_sent"]["malformed_frame"], 5);
    assert!(s["handshake_failures_total"].as_u64().unwrap() >= 2);

    // Only real sessions produced events; the aborted ones went offline
    // through grace (not yet), so events are exactly the onlines.
    let got: Vec<_> = events
        .collect(Duration::from_millis(300))
        .iter()
        .map(ev)
        .collect();
    let mut agents: Vec<_> = got
        .iter()
        .filter(|e| e.1 == "online")
        .map(|e| e.0.clone())
        .collect();
    agents.sort();
    assert_eq!(
        agents,
        [
            "a-oversized",
            "a-twice",
            "a-unknown",
            "bystander",
            "no-alpn"
        ]
    );
    assert!(got.iter().all(|e| e.1 == "online"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshake_and_missing_hello_are_cut_off() {
    let d = Daemon::start_with(Options {
        handshake_timeout: "600ms",
        hello_timeout: "900ms",
        ..Options::default()
    });
    let (mut bystander, _) = d.agent("bystander").await;

    // A client that connects and dribbles bytes of a ClientHello.
    let start = Instant::now();
    let mut slow = StdTcp::connect(d.addr).unwrap();
    slow.set_read_timeout(Some(5 * SECOND)).unwrap();
    for b in [0x16u8, 0x03, 0x01] {
        slow.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut buf = [0u8; 16];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "server closed the slow handshake");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < 3 * SECOND,
        "{took:?}"
    );
    assert!(d.stats()["handshake_timeouts_total"].as_u64().unwrap() >= 1);

    // TLS up, but no HELLO: ERROR 4.
    let mut c = d.connect().await;
    let start = Instant::now();
    expect_error(&mut c, ErrorCode::HelloTimeout).await;
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    bystander.heartbeat(1).await.expect("bystander unaffected");
    assert_eq!(d.stats()["errors_sent"]["hello_timeout"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_from_a_seq_and_report_gaps() {
    let d = Daemon::start_with(Options {
        event_ring_capacity: 4,
        ..Options::default()
    });
    for i in 0..3 {
        let id = format!("r{i}");
        let (mut c, _) = d.agent(&id).await;
        c.bye().await.unwrap();
    }
    d.wait_stats(5 * SECOND, |s| s["events_next_seq"] == 7);
    // seq 1..=6 were published; the ring holds 3..=6.
    let mut from3 = d.events(Some(3));
    let got: Vec<u64> = from3
        .collect(Duration::from_millis(500))
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [3, 4, 5, 6]);
    let mut from5 = d.events(Some(5));
    let e5 = from5.next(5 * SECOND).unwrap();
    assert_eq!(
        (
            e5["seq"].as_u64(),
            e5["agent"].as_str(),
            e5["state"].as_str()
        ),
        (Some(5), Some("r2"), Some("online"))
    );
    assert!(e5["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);

    // Live: the resumed stream continues with new events.
    let (_c, _) = d.agent("live").await;
    let e = from3.next(5 * SECOND).unwrap();
    assert_eq!(
        (e["seq"].as_u64(), e["agent"].as_str()),
        (Some(7), Some("live"))
    );

    // A seq that has left the ring is an error naming the oldest held.
    let mut gone = d.events(Some(1));
    let err = gone.next(5 * SECOND).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("no longer held"),
        "{err}"
    );
    assert_eq!(err["oldest"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_private_and_rejects_unknown_commands() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let v = d.control_json("frobnicate");
    assert!(
        v["error"].as_str().unwrap().contains("unknown command"),
        "{v}"
    );
    let v = d.control_json("agent nobody");
    assert!(
        v["error"].as_str().unwrap().contains("unknown agent"),
        "{v}"
    );
    assert_eq!(d.control_json("ping")["ok"], true);
    // An oversized request gets an error, and the daemon keeps serving.
    let huge = "x".repeat(10_000);
    let v = d.control_json(&huge);
    assert!(v["error"].is_string(), "{v}");
    assert_eq!(d.stats()["pid"], d.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_agents_with_shutting_down_and_no_offline_events() {
    let mut d = Daemon::start();
    let mut events = d.events(None);
    let (mut c, _) = d.agent("stays").await;
    assert_eq!(ev(&events.next(5 * SECOND).unwrap()).1, "online");
    let status = d.stop();
    assert!(status.success(), "{status}");
    expect_error(&mut c, ErrorCode::ShuttingDown).await;
    // The event stream ended without an offline event.
    let rest: Vec<_> = events.collect(SECOND);
    assert!(rest.iter().all(|e| e["state"] != "offline"), "{rest:?}");
    assert!(!d.control.exists(), "control socket removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_works_too() {
    let d = Daemon::start_with(Options {
        shards: 1,
        ..Options::default()
    });
    let mut events = d.events(None);
    let (mut a, _) = d.agent("solo").await;
    a.heartbeat(1).await.unwrap();
    assert_eq!(ev(&events.next(5 * SECOND).unwrap()).0, "solo");
    let (_b, _) = d.agent("solo").await;
    expect_error(&mut a, ErrorCode::Superseded).await;
}
