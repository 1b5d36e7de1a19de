//! TLS interoperability of the lean record layer: three independent TLS 1.3
//! clients (rustls from the bench, Debian's `openssl s_client`, Python's
//! `ssl`) against the spawned daemon, each completing HELLO, heartbeats and
//! BYE; rustls and OpenSSL also send a client KeyUpdate mid-session, and
//! close_notify ends each session's TLS stream.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use presence_client::protocol::Frame;
use presenced_tests::Daemon;
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

fn hello_bytes(d: &Daemon, id: &str) -> Vec<u8> {
    Frame::Hello {
        version: 1,
        id: id.as_bytes().to_vec(),
        token: d.fleet_key.token(id.as_bytes()),
    }
    .to_bytes()
}

/// Every frame in `bytes` in order (skipping anything that is not a frame
/// start, such as text a client printed in between).
fn frames_in(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match presence_client::protocol::decode_one(&bytes[at..]) {
            Ok(Some((f, used))) => {
                out.push(f);
                at += used;
            }
            _ => at += 1,
        }
    }
    out
}

fn acked(frames: &[Frame]) -> Vec<u32> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::HeartbeatAck { seq } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn states(events: &[Value], agent: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["agent"] == agent)
        .map(|e| {
            (
                e["state"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn online_then_bye() -> Vec<(String, String)> {
    vec![
        ("online".into(), "hello".into()),
        ("offline".into(), "bye".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_client_with_key_update_and_close_notify() {
    let d = Daemon::start();
    let mut events = d.events(None);
    let (mut c, _) = d.agent("rustls-agent").await;
    c.heartbeat(1).await.expect("ack before KeyUpdate");
    // The client moves to new keys and asks the server to do the same.
    c.tls_stream_mut()
        .get_mut()
        .1
        .refresh_traffic_keys()
        .expect("KeyUpdate queued");
    for seq in 2..5 {
        c.heartbeat(seq).await.expect("ack after KeyUpdate");
    }
    c.tls_stream_mut()
        .get_mut()
        .1
        .refresh_traffic_keys()
        .unwrap();
    c.heartbeat(5).await.expect("ack after a second KeyUpdate");
    c.bye().await.unwrap();
    c.close().await.expect("close_notify exchange");
    let got = events.collect(2 * SECOND);
    assert_eq!(
        states(&got, "rustls-agent"),
        online_then_bye(),
        "{}",
        d.log_text()
    );

    // close_notify without BYE is a lost connection: grace, no event yet.
    let (c2, _) = d.agent("rustls-quiet").await;
    c2.close().await.expect("close_notify");
    d.wait_stats(5 * SECOND, |s| s["agents_in_grace"] == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_key_update() {
    let d = Daemon::start();
    let mut events = d.events(None);
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_3",
            "-alpn",
            "presence/1",
            "-servername",
            "localhost",
        ])
        .arg("-connect")
        .arg(d.addr.to_string())
        .arg("-CAfile")
        .arg(&d.ca)
        .arg("-verify_return_error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client (Debian's openssl package) must be installed");
    let mut stdin = child.stdin.take().expect("stdin");
    // s_client reads stdin in chunks; one write per step, spaced out, so a
    // command letter ("K": KeyUpdate, update_requested) starts its own chunk.
    let mut step = |bytes: &[u8]| {
        stdin.write_all(bytes).expect("write to s_client");
        stdin.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(400));
    };
    std::thread::sleep(Duration::from_millis(800));
    step(&hello_bytes(&d, "openssl-agent"));
    step(&Frame::Heartbeat { seq: 1 }.to_bytes());
    step(b"K\n");
    step(&Frame::Heartbeat { seq: 2 }.to_bytes());
    step(b"k\n");
    step(&Frame::Heartbeat { seq: 3 }.to_bytes());
    step(&Frame::Bye.to_bytes());
    drop(stdin);
    let out = child.wait_with_output().expect("s_client output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KEYUPDATE"),
        "s_client did not send KeyUpdate: {stderr}"
    );
    let frames = frames_in(&out.stdout);
    assert!(
        matches!(frames.first(), Some(Frame::Welcome { .. })),
        "{frames:?}"
    );
    assert_eq!(acked(&frames), [1, 2, 3], "ACKs across two KeyUpdates");
    let got = events.collect(2 * SECOND);
    assert_eq!(states(&got, "openssl-agent"), online_then_bye());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_client_with_close_notify() {
    let d = Daemon::start();
    let mut events = d.events(None);
    let script = r#"
import socket, ssl, struct, sys
addr, port, ca, hello = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(ca)
ctx.set_alpn_protocols(["presence/1"])
s = ctx.wrap_socket(socket.create_connection((addr, port)), server_hostname="localhost")
assert s.version() == "TLSv1.3" and s.selected_alpn_protocol() == "presence/1"
def frame():
    h = b""
    while len(h) < 3:
        h += s.recv(3 - len(h))
    t, n = struct.unpack(">BH", h)
    p = b""
    while len(p) < n:
        p += s.recv(n - len(p))
    return t, p
s.sendall(hello)
t, p = frame(); assert t == 2, t
for seq in (7, 8, 9):
    s.sendall(struct.pack(">BHI", 3, 4, seq))
    t, p = frame(); assert (t, struct.unpack(">I", p)[0]) == (4, seq)
s.sendall(struct.pack(">BH", 5, 0))
raw = s.unwrap()   # sends close_notify and waits for the server's
raw.close()
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.addr.ip().to_string())
        .arg(d.addr.port().to_string())
        .arg(&d.ca)
        .arg(hex_of(&hello_bytes(&d, "python-agent")))
        .output()
        .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let got = events.collect(2 * SECOND);
    assert_eq!(states(&got, "python-agent"), online_then_bye());
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_close_only_that_connection() {
    let d = Daemon::start();
    let (mut bystander, _) = d.agent("bystander").await;
    // A TLS session whose next record is garbage (random bytes with a valid
    // application_data header): bad_record_mac, connection closed.
    let (mut c, _) = d.agent("victim").await;
    let tcp = c.tls_stream_mut().get_mut().0;
    use tokio::io::AsyncWriteExt;
    let mut junk = vec![23u8, 3, 3, 0, 40];
    junk.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    tcp.write_all(&junk).await.unwrap();
    let end = tokio::time::timeout(5 * SECOND, c.recv_frame())
        .await
        .expect("closed in time");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    bystander.heartbeat(1).await.expect("bystander unaffected");
    // An oversized record header.
    let (mut c, _) = d.agent("victim2").await;
    let tcp = c.tls_stream_mut().get_mut().0;
    tcp.write_all(&[23, 3, 3, 0x48, 0x01]).await.unwrap();
    let end = tokio::time::timeout(5 * SECOND, c.recv_frame())
        .await
        .expect("closed in time");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    bystander.heartbeat(2).await.expect("bystander unaffected");
    assert_eq!(d.stats()["sessions"], 1);
}
