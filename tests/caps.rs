//! Resource caps (issue 13, item 4) against the spawned daemon: idle sockets
//! are closed by `tls.first_byte_timeout` instead of holding handshake slots,
//! one source address cannot take more than
//! `admission.max_handshakes_per_source` handshake slots, and the metrics
//! HTTP endpoint bounds its connections (503 when busy, idle ones closed).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdTcp};
use std::time::{Duration, Instant};

use presence_client::Connection;
use presenced_tests::{config_text, dev_setup, free_addr, Daemon, Options};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// A daemon with one shard (so every connection meets the same caps), the
/// `[tls]` lines after `handshake_timeout` and `extra` appended.
fn daemon(tls_extra: &str, extra: &str) -> Daemon {
    let o = Options {
        shards: 1,
        handshake_timeout: "30s",
        extra: extra.to_owned(),
        ..Options::default()
    };
    let text = config_text(&o).replace(
        "handshake_timeout = \"30s\"\n",
        &format!("handshake_timeout = \"30s\"\n{tls_extra}\n"),
    );
    Daemon::spawn_in(dev_setup(&text))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_default()
}

/// A TCP connection from `source` that never sends a byte.
async fn idle_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(source, 0)).expect("bind source");
    s.connect(to).await.expect("connect")
}

/// True when the server closes `s` (EOF or reset) within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(limit, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_no_longer_block_a_real_agent() {
    // The slowloris of the issue: 4 idle sockets, the cap at 4, a 30 s
    // handshake timeout. They are closed after the first-byte timeout.
    let d = daemon(
        "first_byte_timeout = \"1s\"",
        "[admission]\nmax_concurrent_handshakes = 4\n",
    );
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(idle_from(local, d.addr).await);
    }
    d.wait_stats(Duration::from_secs(5), |v| {
        u(v, "handshakes_in_flight") == 4
    });
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "an idle socket was kept past the first-byte timeout"
        );
    }
    let v = d.wait_stats(Duration::from_secs(5), |v| {
        u(v, "first_byte_timeouts_total") == 4 && u(v, "handshakes_in_flight") == 0
    });
    assert!(u(&v, "handshake_failures_total") >= 4, "{v}");
    assert_eq!(u(&v, "admission_rejected_total"), 0, "{v}");
    let (mut c, _) = d.agent("real-agent").await;
    c.heartbeat(1).await.expect("the agent is served");
    let v = d.stats();
    assert_eq!(u(&v, "agents_online"), 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_address_cannot_take_every_handshake_slot() {
    let d = daemon(
        "first_byte_timeout = \"30s\"",
        "[admission]\nmax_handshakes_per_source = 2\n",
    );
    let noisy: IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = vec![
        idle_from(noisy, d.addr).await,
        idle_from(noisy, d.addr).await,
    ];
    d.wait_stats(Duration::from_secs(5), |v| {
        u(v, "handshakes_in_flight") == 2
    });
    // The third from the same address is closed before TLS...
    let mut third = idle_from(noisy, d.addr).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(5)).await,
        "a third idle socket from 127.0.0.2 was admitted"
    );
    let v = d.wait_stats(Duration::from_secs(5), |v| {
        u(v, "admission_source_rejected_total") == 1
    });
    assert_eq!(u(&v, "admission_rejected_total"), 1, "{v}");
    // ...while another address is served: a real agent from 127.0.0.3.
    let other: IpAddr = "127.0.0.3".parse().unwrap();
    let mut c = Connection::connect_from(d.addr, Some(other), "localhost", d.client_tls())
        .await
        .expect("an agent from another address gets a handshake");
    let token = d.fleet_key.token(b"other-source");
    c.hello(b"other-source", &token).await.expect("hello");
    // The held sockets are still open (their slots are theirs).
    for s in &mut held {
        assert!(!closed_within(s, Duration::from_millis(200)).await);
    }
    let v = d.stats();
    assert_eq!(u(&v, "admission_source_rejected_total"), 1, "{v}");
    assert_eq!(u(&v, "agents_online"), 1, "{v}");
}

fn scrape(addr: &str) -> String {
    let mut s = StdTcp::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_endpoint_bounds_idle_connections_and_still_answers() {
    let listen = free_addr();
    let d = Daemon::start_with(Options {
        extra: format!("[metrics]\nlisten = \"{listen}\"\n"),
        ..Options::default()
    });
    assert!(scrape(&listen).starts_with("HTTP/1.1 200"));
    // Many idle connections: the excess is answered 503 at once.
    let mut idle: Vec<StdTcp> = (0..60)
        .map(|_| StdTcp::connect(&listen).expect("connect"))
        .collect();
    let mut busy = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 12];
        if let Ok(12) = s.read(&mut b) {
            if &b == b"HTTP/1.1 503" {
                busy += 1;
            }
        }
    }
    assert!(busy > 0, "no connection was refused with 503");
    // The rest are closed by the read timeout, and scrapes answer again.
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(Instant::now() < deadline, "idle connections were kept open");
    }
    let r = scrape(&listen);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let v = d.stats();
    assert_eq!(u(&v, "metrics_http_rejected_total"), 60, "{v}");
    assert!(
        r.contains("presenced_metrics_http_rejected_total 60"),
        "{r}"
    );
}
