//! TLS 1.3 conformance of the spawned daemon (RFC 8446 sections 5 and 6):
//! the record layer and the handshake driver against records crafted here.
//!
//! A rustls client does the handshake up to its own Finished and logs every
//! traffic secret (its `KeyLog`). From those secrets this file protects and
//! opens records itself (HKDF-Expand-Label and AEAD with ring, written from
//! RFC 8446 sections 5.2, 5.3, 7.1 and 7.3, not the daemon's code), so a test
//! can send what no well-behaved client sends (a plaintext Finished, an
//! all-zero inner plaintext, a record at the size limit with padding) and
//! read the alert the daemon answers with, encrypted or not.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use presence_client::protocol::{decode_one, Frame};
use presenced_tests::Daemon;
use ring::{aead, hkdf};
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, KeyLog, RootCertStore, SupportedCipherSuite};

const SECOND: Duration = Duration::from_secs(1);

/// RFC 8446 alert descriptions.
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;

/// Content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const MAX_PLAINTEXT: usize = 1 << 14;

const SUITES: [SupportedCipherSuite; 3] = [
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Every secret the client's key schedule logs, by label.
#[derive(Debug, Default)]
struct Secrets(Mutex<HashMap<String, Vec<u8>>>);

impl KeyLog for Secrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .insert(label.to_owned(), secret.to_vec());
    }
}

impl Secrets {
    fn get(&self, label: &str) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .get(label)
            .unwrap_or_else(|| panic!("{label} not logged"))
            .clone()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// One direction of record protection (RFC 8446 section 5.2, 5.3).
struct Protect {
    suite: rustls::CipherSuite,
    secret: Vec<u8>,
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Protect {
    fn algorithms(suite: rustls::CipherSuite) -> (hkdf::Algorithm, &'static aead::Algorithm) {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => {
                (hkdf::HKDF_SHA256, &aead::AES_128_GCM)
            }
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => {
                (hkdf::HKDF_SHA384, &aead::AES_256_GCM)
            }
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => {
                (hkdf::HKDF_SHA256, &aead::CHACHA20_POLY1305)
            }
            other => panic!("suite {other:?}"),
        }
    }

    /// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 section 7.1).
    fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
        let full: Vec<u8> = [b"tls13 ".as_slice(), label].concat();
        let len16 = (len as u16).to_be_bytes();
        let info: [&[u8]; 4] = [&len16, &[full.len() as u8], &full, &[0]];
        let mut out = vec![0u8; len];
        hkdf::Prk::new_less_safe(alg, secret)
            .expand(&info, Len(len))
            .unwrap()
            .fill(&mut out)
            .unwrap();
        out
    }

    fn new(suite: rustls::CipherSuite, secret: Vec<u8>) -> Self {
        let (h, a) = Self::algorithms(suite);
        let key = Self::expand_label(h, &secret, b"key", a.key_len());
        let iv: [u8; 12] = Self::expand_label(h, &secret, b"iv", 12)
            .try_into()
            .unwrap();
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(a, &key).unwrap());
        Self {
            suite,
            secret,
            key,
            iv,
            seq: 0,
        }
    }

    /// The next traffic secret (RFC 8446 section 7.2).
    fn updated(&self) -> Self {
        let (h, _) = Self::algorithms(self.suite);
        let next = Self::expand_label(h, &self.secret, b"traffic upd", self.secret.len());
        Self::new(self.suite, next)
    }

    fn nonce(&mut self) -> aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(n)
    }

    /// One record protecting `inner` (TLSInnerPlaintext: content, type, padding).
    fn seal(&mut self, inner: &[u8]) -> Vec<u8> {
        let len = inner.len() + 16;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let mut body = inner.to_vec();
        let nonce = self.nonce();
        self.key
            .seal_in_place_append_tag(nonce, aead::Aad::from(header), &mut body)
            .unwrap();
        [header.as_slice(), &body].concat()
    }

    /// `content || ty || zeros(padding)`, protected.
    fn seal_typed(&mut self, content: &[u8], ty: u8, padding: usize) -> Vec<u8> {
        let mut inner = content.to_vec();
        inner.push(ty);
        inner.resize(inner.len() + padding, 0);
        self.seal(&inner)
    }

    /// The inner content type and content of a protected record, or None if
    /// it does not open.
    fn open(&mut self, record: &[u8]) -> Option<(u8, Vec<u8>)> {
        let header: [u8; 5] = record[..5].try_into().unwrap();
        let mut body = record[5..].to_vec();
        let nonce = self.nonce();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(header), &mut body)
            .ok()?;
        let at = plain.iter().rposition(|&b| b != 0)?;
        Some((plain[at], plain[..at].to_vec()))
    }
}

/// Split `bytes` into whole records (outer type, whole record).
fn records(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
        let end = at + 5 + len;
        if end > bytes.len() {
            break;
        }
        out.push((bytes[at], bytes[at..end].to_vec()));
        at = end;
    }
    out
}

fn client_config(d: &Daemon, suite: SupportedCipherSuite, secrets: Arc<Secrets>) -> ClientConfig {
    let pem = std::fs::read(&d.ca).expect("CA file");
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![presence_client::protocol::ALPN.to_vec()];
    cfg.key_log = secrets;
    cfg
}

/// A TLS 1.3 connection to the daemon stopped just before the client's
/// Finished goes out.
struct Raw {
    tcp: TcpStream,
    suite: rustls::CipherSuite,
    secrets: Arc<Secrets>,
    /// The client's last flight (change_cipher_spec if any, then Finished),
    /// not sent yet.
    flight: Vec<u8>,
}

impl Raw {
    fn connect(d: &Daemon, suite: SupportedCipherSuite) -> Self {
        let secrets = Arc::new(Secrets::default());
        let cfg = client_config(d, suite, secrets.clone());
        let mut client =
            ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut tcp = TcpStream::connect(d.addr).expect("connect");
        tcp.set_read_timeout(Some(SECOND)).unwrap();
        let deadline = Instant::now() + 10 * SECOND;
        let mut buf = vec![0u8; 64 * 1024];
        while client.is_handshaking() {
            assert!(Instant::now() < deadline, "handshake stalled");
            let mut out = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut out).unwrap();
            }
            tcp.write_all(&out).unwrap();
            let n = match tcp.read(&mut buf) {
                Ok(0) => panic!("daemon closed during the handshake:\n{}", d.log_text()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read: {e}"),
            };
            let mut input = &buf[..n];
            while !input.is_empty() {
                client.read_tls(&mut input).unwrap();
                client.process_new_packets().expect("server flight");
            }
        }
        let mut flight = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut flight).unwrap();
        }
        assert!(!flight.is_empty(), "client Finished");
        Self {
            tcp,
            suite: client.negotiated_cipher_suite().unwrap().suite(),
            secrets,
            flight,
        }
    }

    fn protect(&self, label: &str) -> Protect {
        Protect::new(self.suite, self.secrets.get(label))
    }

    /// The client's application traffic (record 0 follows the Finished).
    fn client_app(&self) -> Protect {
        self.protect("CLIENT_TRAFFIC_SECRET_0")
    }

    /// The client's handshake traffic; the Finished is its record 0.
    fn client_handshake(&self) -> Protect {
        self.protect("CLIENT_HANDSHAKE_TRAFFIC_SECRET")
    }

    /// What the daemon sends after the client's Finished.
    fn server_app(&self) -> Protect {
        self.protect("SERVER_TRAFFIC_SECRET_0")
    }

    fn send(&mut self, bytes: &[u8]) {
        // The daemon may close (and reset) before it read everything.
        let _ = self.tcp.write_all(bytes);
    }

    /// Everything the daemon sends until it closes (or `limit` passes).
    fn read_to_close(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while Instant::now() < deadline {
            match self.tcp.read(&mut buf) {
                Ok(0) => return (got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return (got, true),
            }
        }
        (got, false)
    }

    /// The alert the daemon ends the connection with: a plaintext alert
    /// record, or one protected under `server` (records before it, such as
    /// session tickets, are opened and skipped).
    fn alert(&mut self, mut server: Protect, d: &Daemon) -> u8 {
        let (bytes, closed) = self.read_to_close(5 * SECOND);
        assert!(closed, "daemon kept the connection open\n{}", d.log_text());
        for (ty, record) in records(&bytes) {
            match ty {
                ALERT => return record[6],
                APPLICATION_DATA => match server.open(&record) {
                    Some((ALERT, content)) => return content[1],
                    Some(_) => {}
                    None => panic!("a record from the daemon does not open: {record:02x?}"),
                },
                _ => {}
            }
        }
        panic!(
            "no alert before the daemon closed (got {} bytes)\n{}",
            bytes.len(),
            d.log_text()
        );
    }
}

fn hello(d: &Daemon, id: &str) -> Vec<u8> {
    Frame::Hello {
        version: 1,
        id: id.as_bytes().to_vec(),
        token: d.fleet_key.token(id.as_bytes()),
    }
    .to_bytes()
}

/// Frames the daemon sends under `server` until it sends `want` or closes:
/// opens each record, follows the daemon's KeyUpdates. Panics on anything
/// that does not open.
fn frames_until(
    raw: &mut Raw,
    mut server: Protect,
    d: &Daemon,
    want: impl Fn(&Frame) -> bool,
) -> (Vec<Frame>, usize) {
    let deadline = Instant::now() + 10 * SECOND;
    let mut pending = Vec::new();
    let mut plain = Vec::new();
    let mut frames = Vec::new();
    let mut key_updates = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let n = match raw.tcp.read(&mut buf) {
            Ok(0) => panic!("daemon closed; frames so far {frames:?}\n{}", d.log_text()),
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => panic!("read: {e}\n{}", d.log_text()),
        };
        pending.extend_from_slice(&buf[..n]);
        let whole = records(&pending);
        let used: usize = whole.iter().map(|(_, r)| r.len()).sum();
        pending.drain(..used);
        for (_, record) in whole {
            let Some((ty, content)) = server.open(&record) else {
                panic!(
                    "record {} from the daemon does not open under the expected key \
                     (frames so far {frames:?})\n{}",
                    server.seq - 1,
                    d.log_text()
                );
            };
            match ty {
                APPLICATION_DATA => plain.extend_from_slice(&content),
                // KeyUpdate: later records use the next secret.
                HANDSHAKE if content.first() == Some(&24) => {
                    key_updates += 1;
                    server = server.updated();
                }
                HANDSHAKE => {} // NewSessionTicket
                ALERT => panic!("alert {content:?}; frames {frames:?}\n{}", d.log_text()),
                other => panic!("inner type {other}"),
            }
        }
        while let Ok(Some((frame, used))) = decode_one(&plain) {
            plain.drain(..used);
            let done = want(&frame);
            frames.push(frame);
            if done {
                return (frames, key_updates);
            }
        }
    }
    panic!("no matching frame in time: {frames:?}\n{}", d.log_text());
}

fn is_welcome(f: &Frame) -> bool {
    matches!(f, Frame::Welcome { .. })
}

#[test]
fn zero_length_application_data_with_and_without_padding_is_ignored() {
    let d = Daemon::start();
    for (i, suite) in SUITES.into_iter().enumerate() {
        let mut raw = Raw::connect(&d, suite);
        let mut app = raw.client_app();
        let mut wire = raw.flight.clone();
        wire.extend(app.seal_typed(b"", APPLICATION_DATA, 0));
        wire.extend(app.seal_typed(b"", APPLICATION_DATA, 1));
        wire.extend(app.seal_typed(b"", APPLICATION_DATA, 200));
        raw.send(&wire);
        // Zero-length records on their own, then HELLO.
        raw.send(&app.seal_typed(b"", APPLICATION_DATA, 0));
        raw.send(&app.seal_typed(b"", APPLICATION_DATA, 31));
        let id = format!("zero-length-{i}");
        let mut wire = app.seal_typed(&hello(&d, &id), APPLICATION_DATA, 0);
        wire.extend(app.seal_typed(b"", APPLICATION_DATA, 5));
        wire.extend(app.seal_typed(&Frame::Heartbeat { seq: 1 }.to_bytes(), APPLICATION_DATA, 0));
        raw.send(&wire);
        let server = raw.server_app();
        let (frames, _) = frames_until(&mut raw, server, &d, |f| {
            matches!(f, Frame::HeartbeatAck { seq: 1 })
        });
        assert!(is_welcome(&frames[0]), "{frames:?}");
    }
}

#[test]
fn inner_plaintext_of_only_zeros_is_unexpected_message() {
    let d = Daemon::start();
    // After the handshake.
    let mut raw = Raw::connect(&d, SUITES[0]);
    let mut wire = raw.flight.clone();
    wire.extend(raw.client_app().seal(&[0; 40]));
    raw.send(&wire);
    let server = raw.server_app();
    assert_eq!(raw.alert(server, &d), UNEXPECTED_MESSAGE);

    // In place of the client Finished (under the handshake key).
    let mut raw = Raw::connect(&d, SUITES[1]);
    let wire = raw.client_handshake().seal(&[0; 1]);
    raw.send(&wire);
    let server = raw.server_app();
    assert_eq!(raw.alert(server, &d), UNEXPECTED_MESSAGE);
}

#[test]
fn empty_alert_record_is_decode_error() {
    let d = Daemon::start();
    // Protected, after the handshake.
    let mut raw = Raw::connect(&d, SUITES[2]);
    let mut wire = raw.flight.clone();
    wire.extend(raw.client_app().seal_typed(b"", ALERT, 0));
    raw.send(&wire);
    let server = raw.server_app();
    assert_eq!(raw.alert(server, &d), DECODE_ERROR);

    // Protected, with padding.
    let mut raw = Raw::connect(&d, SUITES[0]);
    let mut wire = raw.flight.clone();
    wire.extend(raw.client_app().seal_typed(b"", ALERT, 10));
    raw.send(&wire);
    let server = raw.server_app();
    assert_eq!(raw.alert(server, &d), DECODE_ERROR);

    // Plaintext, in place of the ClientHello.
    let mut tcp = TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(5 * SECOND)).unwrap();
    tcp.write_all(&[ALERT, 3, 3, 0, 0]).unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    assert_eq!(got, [ALERT, 3, 3, 0, 2, 2, DECODE_ERROR]);
}

#[test]
fn full_size_records_with_padding_are_accepted_and_one_byte_more_is_record_overflow() {
    let d = Daemon::start();
    for (i, suite) in SUITES.into_iter().enumerate() {
        // content + padding = 2^14: TLSInnerPlaintext is 2^14 + 1 bytes.
        let mut raw = Raw::connect(&d, suite);
        let mut app = raw.client_app();
        let hello = hello(&d, &format!("full-size-{i}"));
        let mut wire = raw.flight.clone();
        wire.extend(app.seal_typed(b"", APPLICATION_DATA, MAX_PLAINTEXT));
        wire.extend(app.seal_typed(&hello, APPLICATION_DATA, MAX_PLAINTEXT - hello.len()));
        raw.send(&wire);
        let server = raw.server_app();
        let (frames, _) = frames_until(&mut raw, server, &d, is_welcome);
        assert!(is_welcome(&frames[0]));

        // One byte of padding more.
        let mut raw = Raw::connect(&d, suite);
        let mut wire = raw.flight.clone();
        wire.extend(raw.client_app().seal_typed(
            &hello,
            APPLICATION_DATA,
            MAX_PLAINTEXT + 1 - hello.len(),
        ));
        raw.send(&wire);
        let server = raw.server_app();
        assert_eq!(raw.alert(server, &d), RECORD_OVERFLOW, "{suite:?}");
    }
}

/// A ClientHello record of 2^14 + 1 bytes: over the TLSPlaintext limit.
#[test]
fn client_hello_over_the_record_limit_is_record_overflow() {
    let d = Daemon::start();
    for len in [MAX_PLAINTEXT + 1, MAX_PLAINTEXT + 256, MAX_PLAINTEXT + 2048] {
        let body_len = len - 4;
        let mut record = vec![
            HANDSHAKE,
            3,
            1,
            (len >> 8) as u8,
            len as u8,
            1, // client_hello
            (body_len >> 16) as u8,
            (body_len >> 8) as u8,
            body_len as u8,
            3,
            3,
        ];
        record.resize(5 + len, 0x41);
        let mut tcp = TcpStream::connect(d.addr).unwrap();
        tcp.set_read_timeout(Some(5 * SECOND)).unwrap();
        let _ = tcp.write_all(&record);
        let mut got = Vec::new();
        let _ = tcp.read_to_end(&mut got);
        assert_eq!(
            got,
            [ALERT, 3, 3, 0, 2, 2, RECORD_OVERFLOW],
            "length {len}\n{}",
            d.log_text()
        );
    }
}

/// The client Finished sent as a plaintext handshake record.
#[test]
fn plaintext_finished_is_unexpected_message() {
    let d = Daemon::start();
    for suite in SUITES {
        let mut raw = Raw::connect(&d, suite);
        let mut hs = raw.client_handshake();
        let finished = records(&raw.flight)
            .into_iter()
            .filter(|(ty, _)| *ty == APPLICATION_DATA)
            .find_map(|(_, r)| hs.open(&r))
            .expect("the client Finished opens");
        assert_eq!(finished.0, HANDSHAKE);
        assert_eq!(finished.1[0], 20, "finished");
        let len = finished.1.len();
        let mut wire = vec![HANDSHAKE, 3, 3, (len >> 8) as u8, len as u8];
        wire.extend_from_slice(&finished.1);
        raw.send(&wire);
        let server = raw.server_app();
        assert_eq!(raw.alert(server, &d), UNEXPECTED_MESSAGE, "{suite:?}");
    }
}

#[test]
fn application_data_during_the_handshake_is_unexpected_message() {
    let d = Daemon::start();
    // Protected under the client handshake key, before the Finished.
    for suite in SUITES {
        let mut raw = Raw::connect(&d, suite);
        let wire = raw
            .client_handshake()
            .seal_typed(&hello(&d, "early"), APPLICATION_DATA, 0);
        raw.send(&wire);
        let server = raw.server_app();
        assert_eq!(raw.alert(server, &d), UNEXPECTED_MESSAGE, "{suite:?}");
    }
    // An application_data record in place of the ClientHello.
    let mut tcp = TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(5 * SECOND)).unwrap();
    tcp.write_all(&[APPLICATION_DATA, 3, 3, 0, 3, 1, 2, 3])
        .unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    assert_eq!(got, [ALERT, 3, 3, 0, 2, 2, UNEXPECTED_MESSAGE]);
}

#[test]
fn corrupted_finished_tag_is_bad_record_mac_in_every_suite() {
    let d = Daemon::start();
    for suite in SUITES {
        let mut raw = Raw::connect(&d, suite);
        let mut wire = raw.flight.clone();
        let n = wire.len();
        wire[n - 1] ^= 0x01; // last byte of the Finished record's tag
        raw.send(&wire);
        let server = raw.server_app();
        assert_eq!(raw.alert(server, &d), BAD_RECORD_MAC, "{suite:?}");
    }
}

/// KeyUpdate (update_requested) in the same TCP segment as the client
/// Finished: the daemon must answer with its own KeyUpdate before anything
/// it seals under its next key.
#[test]
fn key_update_with_the_client_finished_is_answered() {
    let d = Daemon::start();
    for (i, suite) in SUITES.into_iter().enumerate() {
        let mut raw = Raw::connect(&d, suite);
        let mut app = raw.client_app();
        let mut wire = raw.flight.clone();
        wire.extend(app.seal_typed(&[24, 0, 0, 1, 1], HANDSHAKE, 0));
        raw.send(&wire);
        // Give the daemon time to take the flight on its own first.
        std::thread::sleep(Duration::from_millis(100));
        let mut app = app.updated();
        let hello = hello(&d, &format!("key-update-{i}"));
        raw.send(&app.seal_typed(&hello, APPLICATION_DATA, 0));
        let server = raw.server_app();
        let (frames, key_updates) = frames_until(&mut raw, server, &d, is_welcome);
        assert!(is_welcome(&frames[0]));
        assert_eq!(key_updates, 1, "{suite:?}");
    }
}

/// Set SO_LINGER 0 so that closing sends RST instead of FIN.
fn abort(raw: Raw) {
    nix::sys::socket::setsockopt(
        &raw.tcp,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(raw);
}

/// An agent that goes away (RST) right after its Finished, before or after
/// reading its session tickets, is a routine event: the handshake counts as
/// completed, the connection is cleaned up, and nothing is logged above
/// debug level.
#[test]
fn connection_aborted_after_new_session_ticket_is_quiet() {
    let d = Daemon::start();
    let log_before = d.log_text().len();
    let mut completed = 0;
    for suite in SUITES {
        // Read the tickets, then reset.
        let mut raw = Raw::connect(&d, suite);
        let wire = raw.flight.clone();
        raw.send(&wire);
        let server = raw.server_app();
        let deadline = Instant::now() + 5 * SECOND;
        let mut tickets = 0;
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = Vec::new();
        while tickets == 0 && Instant::now() < deadline {
            if let Ok(n) = raw.tcp.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            let mut s = Protect::new(server.suite, server.secret.clone());
            tickets = records(&got)
                .iter()
                .filter(|(_, r)| matches!(s.open(r), Some((HANDSHAKE, c)) if c[0] == 4))
                .count();
        }
        assert!(tickets > 0, "no NewSessionTicket");
        abort(raw);
        completed += 1;

        // Reset right after the Finished, while the tickets are on their way.
        for _ in 0..5 {
            let mut raw = Raw::connect(&d, suite);
            let wire = raw.flight.clone();
            raw.send(&wire);
            abort(raw);
            completed += 1;
        }
    }
    d.wait_stats(5 * SECOND, |s| s["connections"] == 0);
    let stats = d.wait_stats(5 * SECOND, |s| s["handshakes_total"] == completed);
    assert_eq!(stats["handshake_failures_total"], 0, "{stats:#}");
    let log = d.log_text();
    let noisy: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    assert!(
        noisy.is_empty(),
        "logged above debug for aborted agents:\n{log}"
    );
}
