//! Interop over loopback TCP: a tiny blocking server built from
//! [`Handshake`] and [`LeanSession`] against `openssl s_client` and Python's
//! `ssl` module (both OpenSSL underneath, independent of rustls).
//!
//! Skipped (with a message) when `openssl` or `python3` is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rustls::{ServerConfig, SupportedCipherSuite};

use super::handshake::{Handshake, Progress};
use super::record::{Incoming, RecordReader, MAX_RECORD};
use super::testutil::{pki, server_config, ALL_SUITES};
use presence_proto::{Frame, FrameDecoder};

/// What the server saw after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Data(Vec<u8>),
    KeyUpdate { requested: bool },
    CloseNotify,
    Frame(String),
}

#[derive(Clone, Copy)]
enum Mode {
    /// Answer each received chunk with "echo:" + chunk.
    Echo,
    /// Speak presence frames: HELLO -> WELCOME, HEARTBEAT -> ACK, BYE -> close.
    Frames,
}

struct ServerResult {
    alpn: Option<Vec<u8>>,
    sni: Option<String>,
    events: Vec<Event>,
}

/// Serve one connection; events are also streamed on `tx` as they happen.
fn serve_one(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    mode: Mode,
    tx: mpsc::Sender<Event>,
) -> Result<ServerResult, String> {
    let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut hs = Handshake::new(config).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut established = loop {
        let mut out = Vec::new();
        let progress = hs.step(&mut out);
        sock.write_all(&out).map_err(|e| e.to_string())?;
        match progress.map_err(|e| format!("handshake: {e}"))? {
            Progress::Done(e) => break e,
            Progress::NeedInput => {
                let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("EOF during handshake".into());
                }
                hs.feed(&buf[..n]);
            }
        }
    };
    let mut events = Vec::new();
    let emit = |ev: Event, events: &mut Vec<Event>| {
        let _ = tx.send(ev.clone());
        events.push(ev);
    };
    if !established.early_plaintext.is_empty() {
        emit(
            Event::Data(std::mem::take(&mut established.early_plaintext)),
            &mut events,
        );
    }
    let session = &mut established.session;
    let mut pending = std::mem::take(&mut established.leftover);
    let mut decoder = FrameDecoder::new();
    'conn: loop {
        // Whole records from pending (which holds the leftover at first).
        let mut out = Vec::new();
        let mut reader = RecordReader::new(&mut pending);
        let mut closed = false;
        let mut replies = Vec::new();
        while let Some(record) = reader.next_record().map_err(|e| e.to_string())? {
            match session
                .read_record(record, &mut out)
                .map_err(|e| format!("record: {e}"))?
            {
                Incoming::Data(range) => {
                    let data = record[range].to_vec();
                    match mode {
                        Mode::Echo => replies.push([b"echo:".as_slice(), &data].concat()),
                        Mode::Frames => {
                            decoder.extend(&data);
                            while let Some(f) = decoder.next_frame().map_err(|e| e.to_string())? {
                                let reply = match &f {
                                    Frame::Hello { .. } => Some(Frame::Welcome {
                                        heartbeat_interval_ms: 30_000,
                                        session_id: 1,
                                    }),
                                    Frame::Heartbeat { seq } => {
                                        Some(Frame::HeartbeatAck { seq: *seq })
                                    }
                                    _ => None,
                                };
                                emit(Event::Frame(format!("{f:?}")), &mut events);
                                if let Some(r) = reply {
                                    replies.push(r.to_bytes());
                                }
                            }
                        }
                    }
                    emit(Event::Data(data), &mut events);
                }
                Incoming::KeyUpdate { requested } => {
                    emit(Event::KeyUpdate { requested }, &mut events)
                }
                Incoming::CloseNotify => {
                    emit(Event::CloseNotify, &mut events);
                    closed = true;
                    break;
                }
                Incoming::Nothing => {}
            }
        }
        let consumed = reader.consumed();
        pending.drain(..consumed);
        for r in replies {
            session
                .seal_app_data(&r, &mut out)
                .map_err(|e| e.to_string())?;
        }
        if closed {
            session
                .seal_close_notify(&mut out)
                .map_err(|e| e.to_string())?;
        }
        sock.write_all(&out).map_err(|e| e.to_string())?;
        if closed {
            break 'conn;
        }
        if pending.len() > MAX_RECORD {
            return Err("pending exceeds a record".into());
        }
        let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("EOF without close_notify after {events:?}"));
        }
        pending.extend_from_slice(&buf[..n]);
    }
    Ok(ServerResult {
        alpn: established.alpn.clone(),
        sni: established.sni.clone(),
        events,
    })
}

fn start(
    suite: SupportedCipherSuite,
    mode: Mode,
) -> (
    u16,
    thread::JoinHandle<Result<ServerResult, String>>,
    mpsc::Receiver<Event>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = server_config(&[suite]);
    let (tx, rx) = mpsc::channel();
    let server = thread::spawn(move || serve_one(listener, config, mode, tx));
    (port, server, rx)
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn ca_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &pki().cert_pem).unwrap();
    path
}

/// Wait for the server to report an event matching `want`.
fn wait_for(rx: &mpsc::Receiver<Event>, want: impl Fn(&Event) -> bool, what: &str) {
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(ev) if want(&ev) => return,
            Ok(_) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

#[test]
fn openssl_s_client_data_key_updates_and_close_notify() {
    if !have("openssl") {
        eprintln!("openssl not found; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&dir);
    for (suite, name) in ALL_SUITES.iter().zip([
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    ]) {
        let (port, server, rx) = start(*suite, Mode::Echo);
        let mut child = Command::new("openssl")
            .args(["s_client", "-tls1_3", "-ciphersuites", name])
            .args(["-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-alpn", "presence/1"])
            .arg("-CAfile")
            .arg(&ca)
            .arg("-verify_return_error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn openssl");
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (line_tx, line_rx) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let wait_line = |want: &str| loop {
            match line_rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.contains(want) => return,
                Ok(_) => {}
                Err(e) => panic!("waiting for {want:?} from s_client: {e}"),
            }
        };

        stdin.write_all(b"ping1\n").unwrap();
        wait_line("echo:ping1");
        // "K": KeyUpdate with update_requested; our answer comes under the
        // old key, then the echo under the new one.
        stdin.write_all(b"K\n").unwrap();
        wait_for(
            &rx,
            |e| *e == Event::KeyUpdate { requested: true },
            "KeyUpdate(update_requested)",
        );
        stdin.write_all(b"ping2\n").unwrap();
        wait_line("echo:ping2");
        // "k": KeyUpdate without request.
        stdin.write_all(b"k\n").unwrap();
        wait_for(
            &rx,
            |e| *e == Event::KeyUpdate { requested: false },
            "KeyUpdate(update_not_requested)",
        );
        stdin.write_all(b"ping3\n").unwrap();
        wait_line("echo:ping3");
        // EOF on stdin: s_client sends close_notify.
        drop(stdin);
        let result = server.join().unwrap().unwrap();
        let status = child.wait().unwrap();
        let transcript = reader.join().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "{name}: {status}\n{transcript}\n{stderr}");
        assert!(transcript.contains(name), "{name}\n{transcript}");
        assert_eq!(result.alpn.as_deref(), Some(b"presence/1".as_slice()));
        assert_eq!(result.sni.as_deref(), Some("localhost"));
        assert_eq!(result.events.last(), Some(&Event::CloseNotify), "{name}");
        let data: Vec<u8> = result
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Data(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(data, b"ping1\nping2\nping3\n", "{name}");
        eprintln!("{name}: {:?}", result.events);
    }
}

const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
port, cafile, frames = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(cafile)
ctx.set_alpn_protocols(["presence/1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
assert s.selected_alpn_protocol() == "presence/1", s.selected_alpn_protocol()

def recv_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("EOF")
        b += c
    return b

def recv_frame():
    h = recv_exact(3)
    return h + recv_exact(int.from_bytes(h[1:3], "big"))

# frames: HELLO, HEARTBEAT x3, BYE (one per line of the hex argument, joined)
hello_len = 3 + int.from_bytes(frames[1:3], "big")
s.sendall(frames[:hello_len])
welcome = recv_frame()
assert welcome[0] == 2, welcome
rest = frames[hello_len:]
for i in range(3):
    s.sendall(rest[:7])
    ack = recv_frame()
    assert ack[0] == 4 and ack[3:] == rest[3:7], (ack, rest[:7])
    rest = rest[7:]
s.sendall(rest)  # BYE
info = (s.version(), s.cipher()[0])
# close_notify: unwrap() sends ours and waits for the server's.
s.unwrap().close()
print("python ok", *info)
"#;

#[test]
fn python_ssl_hello_heartbeats_bye_close_notify() {
    if !have("python3") {
        eprintln!("python3 not found; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&dir);
    let mut frames = Frame::Hello {
        version: 1,
        id: b"agent-1".to_vec(),
        token: [9; 32],
    }
    .to_bytes();
    for seq in 1..=3 {
        Frame::Heartbeat { seq }.encode(&mut frames);
    }
    Frame::Bye.encode(&mut frames);
    for suite in ALL_SUITES {
        let (port, server, _rx) = start(suite, Mode::Frames);
        let output = Command::new("python3")
            .arg("-c")
            .arg(PYTHON_CLIENT)
            .arg(port.to_string())
            .arg(&ca)
            .arg(::hex::encode(&frames))
            .output()
            .expect("run python3");
        let result = server.join().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{suite:?}: {}\n{stdout}\n{stderr}\nserver: {:?}",
            output.status,
            result.as_ref().map(|r| r.events.clone())
        );
        let result = result.unwrap();
        let frames: Vec<&String> = result
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Frame(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert!(frames[0].starts_with("Hello"));
        assert_eq!(frames[4], "Bye");
        assert_eq!(result.events.last(), Some(&Event::CloseNotify));
        eprintln!("{suite:?}: {}", stdout.trim());
    }
}
