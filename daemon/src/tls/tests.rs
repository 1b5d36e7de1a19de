//! The handshake driver and the record layer against the rustls client, in
//! memory, plus arbitrary-input tests.

use super::handshake::{Established, Handshake, HandshakeError, Progress};
use super::record::{AlertDescription, LeanSession, RecordError, StreamStatus, MAX_RECORD};
use super::testutil::*;
use presence_proto::{Frame, FrameDecoder, ALPN};

use rustls::ClientConnection;

/// Server reads `wire`; returns plaintext, status and what it must send back.
fn server_read(
    e: &mut Established,
    wire: &mut [u8],
) -> (Result<StreamStatus, RecordError>, Vec<u8>, Vec<u8>) {
    let mut data = Vec::new();
    let mut out = Vec::new();
    let r = e.session.read_stream(&mut e.leftover, wire, &mut out, |d| {
        data.extend_from_slice(d)
    });
    (r, data, out)
}

fn exchange(e: &mut Established, client: &mut ClientConnection, tag: &str) {
    let hello = Frame::Heartbeat { seq: 7 }.to_bytes();
    let mut wire = client_send(client, &hello);
    wire.extend(client_send(client, tag.as_bytes()));
    let (r, data, out) = server_read(e, &mut wire);
    assert_eq!(r, Ok(StreamStatus::Open), "{tag}");
    assert!(out.is_empty());
    let mut expected = hello.clone();
    expected.extend_from_slice(tag.as_bytes());
    assert_eq!(data, expected, "{tag}");

    let mut out = Vec::new();
    e.session.seal_app_data(b"ack ", &mut out).unwrap();
    e.session.seal_app_data(tag.as_bytes(), &mut out).unwrap();
    let (plain, eof) = client_input(client, &out).unwrap();
    assert!(!eof);
    assert_eq!(
        plain,
        [b"ack ".as_slice(), tag.as_bytes()].concat(),
        "{tag}"
    );
}

#[test]
fn handshake_then_data_both_ways_every_suite() {
    for suite in ALL_SUITES {
        let (mut e, mut client) = handshake(suite);
        eprintln!("{suite:?}: {e:?}");
        assert_eq!(e.alpn.as_deref(), Some(ALPN));
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        assert_eq!(e.sni.as_deref(), Some("localhost"));
        assert!(e.early_plaintext.is_empty());
        assert!(e.leftover.is_empty());
        assert_eq!(e.leftover.capacity(), 0);
        assert!(!e.peer_closed);
        assert_eq!(e.session.rx_seq(), 0);
        assert!(e.session.tx_seq() >= 1, "session tickets were sent");
        exchange(&mut e, &mut client, "first");
        // Big writes: records of 2^14 bytes both ways.
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut wire = client_send(&mut client, &big);
        let (r, data, _) = server_read(&mut e, &mut wire);
        assert_eq!((r, data.len()), (Ok(StreamStatus::Open), big.len()));
        assert_eq!(data, big);
        let mut out = Vec::new();
        e.session.seal_app_data(&big, &mut out).unwrap();
        assert_eq!(client_input(&mut client, &out).unwrap().0, big);
    }
}

#[test]
fn handshake_fed_byte_by_byte() {
    let suite = ALL_SUITES[0];
    let (mut e, mut client) =
        handshake_with(server_config(&[suite]), client_config(&[suite]), 1, |_| {}).unwrap();
    exchange(&mut e, &mut client, "bytewise");
}

#[test]
fn data_sent_with_the_client_finished() {
    for chunk in [usize::MAX, 7, 1] {
        let suite = ALL_SUITES[2];
        let (mut e, mut client) = handshake_with(
            server_config(&[suite]),
            client_config(&[suite]),
            chunk,
            |c| {
                use std::io::Write;
                c.writer().write_all(b"HELLO with Finished").unwrap();
            },
        )
        .unwrap();
        // rustls decrypted what it saw complete; the rest is ours to read.
        let mut all = std::mem::take(&mut e.early_plaintext);
        let (r, data, _) = server_read(&mut e, &mut []);
        assert_eq!(r, Ok(StreamStatus::Open));
        all.extend(data);
        assert_eq!(all, b"HELLO with Finished", "chunk {chunk}");
        assert!(e.leftover.is_empty());
        exchange(&mut e, &mut client, "after early data");
    }
}

#[test]
fn client_key_update_then_data_both_ways() {
    for suite in ALL_SUITES {
        let (mut e, mut client) = handshake(suite);
        exchange(&mut e, &mut client, "before");
        for round in 0..3 {
            // rustls sends KeyUpdate(update_requested).
            client.refresh_traffic_keys().unwrap();
            let mut wire = client_send(&mut client, b"after update");
            let (r, data, reply) = server_read(&mut e, &mut wire);
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(data, b"after update", "round {round}");
            assert!(!reply.is_empty(), "our KeyUpdate answers update_requested");
            assert_eq!(e.session.rx_seq(), 1);
            assert_eq!(e.session.tx_seq(), 0);
            // The reply first, then data under our new key.
            let mut out = reply;
            e.session
                .seal_app_data(b"new server key", &mut out)
                .unwrap();
            let (plain, _) = client_input(&mut client, &out).unwrap();
            assert_eq!(plain, b"new server key");
            exchange(&mut e, &mut client, "after");
        }
        // Our own KeyUpdate, asking the client to update too.
        let mut out = Vec::new();
        e.session.update_tx_keys(true, &mut out).unwrap();
        e.session
            .seal_app_data(b"server-initiated", &mut out)
            .unwrap();
        let (plain, _) = client_input(&mut client, &out).unwrap();
        assert_eq!(plain, b"server-initiated");
        exchange(&mut e, &mut client, "after server update");
    }
}

#[test]
fn key_update_in_the_same_flight_as_finished() {
    // rustls must not see the KeyUpdate (it would queue its answer and never
    // send it): it stays in the leftover for the record layer.
    for suite in ALL_SUITES {
        let (mut e, mut client) = handshake_with(
            server_config(&[suite]),
            client_config(&[suite]),
            usize::MAX,
            |c| {
                use std::io::Write;
                c.writer().write_all(b"one").unwrap();
                c.refresh_traffic_keys().unwrap();
                c.writer().write_all(b"two").unwrap();
            },
        )
        .unwrap();
        assert!(e.early_plaintext.is_empty());
        let (r, data, reply) = server_read(&mut e, &mut []);
        assert_eq!((r, data), (Ok(StreamStatus::Open), b"onetwo".to_vec()));
        assert!(!reply.is_empty());
        let (plain, _) = client_input(&mut client, &reply).unwrap();
        assert!(plain.is_empty());
        exchange(&mut e, &mut client, "updated");
    }
}

#[test]
fn client_close_notify_is_clean_eof() {
    let (mut e, mut client) = handshake(ALL_SUITES[1]);
    exchange(&mut e, &mut client, "bye soon");
    let mut wire = client_send(&mut client, &Frame::Bye.to_bytes());
    client.send_close_notify();
    wire.extend(client_output(&mut client));
    let (r, data, _) = server_read(&mut e, &mut wire);
    assert_eq!(r, Ok(StreamStatus::PeerClosed));
    assert_eq!(data, Frame::Bye.to_bytes());
    let mut out = Vec::new();
    e.session.seal_close_notify(&mut out).unwrap();
    let (_, eof) = client_input(&mut client, &out).unwrap();
    assert!(eof);
}

#[test]
fn close_notify_with_finished() {
    let suite = ALL_SUITES[0];
    let (mut e, _client) = handshake_with(
        server_config(&[suite]),
        client_config(&[suite]),
        usize::MAX,
        |c| c.send_close_notify(),
    )
    .unwrap();
    // The close_notify was not handed to rustls: the record layer reads it.
    assert!(!e.peer_closed);
    assert!(!e.leftover.is_empty());
    let (r, data, _) = server_read(&mut e, &mut []);
    assert_eq!((r, data), (Ok(StreamStatus::PeerClosed), vec![]));
}

#[test]
fn records_split_across_reads_and_many_per_read() {
    let (mut e, mut client) = handshake(ALL_SUITES[0]);
    let mut wire = Vec::new();
    for i in 0..20u8 {
        wire.extend(client_send(&mut client, &[i; 100]));
    }
    let expected: Vec<u8> = (0..20u8).flat_map(|i| [i; 100]).collect();
    let mut data = Vec::new();
    let mut out = Vec::new();
    for b in &wire {
        let r = e
            .session
            .read_stream(&mut e.leftover, &mut [*b], &mut out, |d| {
                data.extend_from_slice(d)
            });
        assert_eq!(r, Ok(StreamStatus::Open));
    }
    assert_eq!(data, expected);
    assert_eq!(e.leftover.capacity(), 0);
    // All twenty records in one read.
    let mut wire = Vec::new();
    for i in 0..20u8 {
        wire.extend(client_send(&mut client, &[i; 100]));
    }
    let (r, data, _) = server_read(&mut e, &mut wire);
    assert_eq!((r, data), (Ok(StreamStatus::Open), expected));
}

#[test]
fn tampered_record_is_bad_record_mac_and_the_client_hears_why() {
    let (mut e, mut client) = handshake(ALL_SUITES[0]);
    let mut wire = client_send(&mut client, b"heartbeat");
    let n = wire.len();
    wire[n - 3] ^= 0x10;
    let (r, _, _) = server_read(&mut e, &mut wire);
    let err = r.unwrap_err();
    assert!(matches!(err, RecordError::BadRecordMac { seq: 0 }), "{err}");
    let mut out = Vec::new();
    e.session
        .seal_alert(err.alert().unwrap(), &mut out)
        .unwrap();
    let client_err = client_input(&mut client, &out).unwrap_err();
    assert_eq!(
        client_err,
        rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
    );
}

#[test]
fn oversize_and_wrong_type_headers() {
    let (mut e, _client) = handshake(ALL_SUITES[0]);
    let (r, _, _) = server_read(&mut e, &mut [23, 3, 3, 0x41, 0x01, 0, 0]);
    assert_eq!(
        r.unwrap_err().alert(),
        Some(AlertDescription::RecordOverflow)
    );
    let (mut e, _client) = handshake(ALL_SUITES[0]);
    let (r, _, _) = server_read(&mut e, &mut [22, 3, 3, 0, 5]);
    assert_eq!(
        r.unwrap_err().alert(),
        Some(AlertDescription::UnexpectedMessage)
    );
}

#[test]
fn config_must_be_prepared() {
    let cfg = std::sync::Arc::new(base_server_config(&ALL_SUITES));
    assert!(matches!(
        Handshake::new(cfg),
        Err(HandshakeError::ConfigNotPrepared)
    ));
}

#[test]
fn refused_handshakes_send_an_alert() {
    // A client offering only another ALPN protocol.
    let mut cfg = (*client_config(&ALL_SUITES)).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = new_client(std::sync::Arc::new(cfg));
    let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
    hs.feed(&client_output(&mut client));
    let mut out = Vec::new();
    let err = hs.step(&mut out).unwrap_err();
    assert!(matches!(err, HandshakeError::Tls(_)), "{err}");
    assert!(!out.is_empty(), "alert for the client");
    let client_err = client_input(&mut client, &out).unwrap_err();
    assert_eq!(
        client_err,
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
    );
    assert!(matches!(
        hs.step(&mut Vec::new()),
        Err(HandshakeError::AlreadyEnded)
    ));

    // A TLS 1.2-only client.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().cert.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = new_client(std::sync::Arc::new(cfg));
    let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
    hs.feed(&client_output(&mut client));
    let mut out = Vec::new();
    assert!(hs.step(&mut out).is_err());
    assert!(!out.is_empty());
}

#[test]
fn garbage_instead_of_a_client_hello() {
    let mut rng = Rng::new(0xfeed);
    for i in 0..2_000 {
        let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
        let mut bytes = rng.upto(600);
        if i % 2 == 0 && bytes.len() > 5 {
            // Often a plausible handshake record header.
            bytes[..3].copy_from_slice(&[22, 3, 1]);
        }
        hs.feed(&bytes);
        let mut out = Vec::new();
        match hs.step(&mut out) {
            Ok(Progress::NeedInput) | Err(_) => {}
            Ok(Progress::Done(_)) => panic!("garbage completed a handshake"),
        }
    }
}

/// Arbitrary bytes into the record splitter + open path of a live session:
/// no panic, and an error ends only that session.
#[test]
fn arbitrary_bytes_into_the_record_layer() {
    let (e, _client) = handshake(ALL_SUITES[0]);
    let template = e.session.mirror();
    let mut rng = Rng::new(0x1234_5678);
    let mut errors = 0;
    for case in 0..100_000 {
        let mut server = template.mirror();
        let mut pending = Vec::new();
        let mut bytes = rng.upto(64);
        match case % 4 {
            // A plausible header with a random length.
            0 => {
                let len = rng.below(MAX_RECORD + 64);
                let mut h = vec![23, 3, 3, (len >> 8) as u8, len as u8];
                h.extend(rng.upto((len + 8).min(200)));
                bytes = h;
            }
            // A valid record with a random byte flipped or cut.
            1 => {
                let mut peer = template.duplicate();
                let mut w = Vec::new();
                peer.seal_app_data(&rng.upto(40), &mut w).unwrap();
                let i = rng.below(w.len());
                if rng.below(2) == 0 {
                    w[i] ^= 1 << rng.below(8);
                } else {
                    w.truncate(i);
                }
                bytes = w;
            }
            _ => {}
        }
        // Fed in random pieces.
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let end = (at + 1 + rng.below(bytes.len())).min(bytes.len());
            let mut piece = bytes[at..end].to_vec();
            at = end;
            match server.read_stream(&mut pending, &mut piece, &mut out, |_| {}) {
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    let _ = e.alert();
                    let mut alert = Vec::new();
                    if let Some(a) = e.alert() {
                        server.seal_alert(a, &mut alert).unwrap();
                    }
                    break;
                }
            }
        }
        assert!(pending.len() <= MAX_RECORD);
    }
    assert!(errors > 10_000, "most random input is rejected ({errors})");
}

/// Arbitrary *decrypted* content: random inner plaintexts (content type,
/// padding, alerts, handshake messages) sealed by a peer.
#[test]
fn arbitrary_inner_plaintext() {
    let (e, _client) = handshake(ALL_SUITES[2]);
    let template = e.session.mirror();
    let mut rng = Rng::new(42);
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..30_000 {
        let mut server = template.mirror();
        let mut peer = template.duplicate();
        let mut wire = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let ty = [0, 20, 21, 22, 23, 24, rng.next_u64() as u8][rng.below(7)];
            let content = match rng.below(4) {
                0 => vec![24, 0, 0, 1, rng.below(3) as u8],
                1 => vec![rng.below(3) as u8, rng.next_u64() as u8],
                _ => rng.upto(12),
            };
            let _ = peer.seal_raw(&content, ty, rng.below(4), &mut wire);
        }
        let mut out = Vec::new();
        let r = server.read_stream(&mut Vec::new(), &mut wire, &mut out, |_| {});
        let key = match &r {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("{:?}", e.alert()),
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    eprintln!("{outcomes:?}");
    assert!(outcomes.len() >= 6, "{outcomes:?}");
}

/// Arbitrary bytes into the frame decoder: no panic, bounded buffer.
#[test]
fn arbitrary_bytes_into_the_frame_decoder() {
    let mut rng = Rng::new(7);
    for case in 0..100_000 {
        let mut dec = FrameDecoder::new();
        let mut bytes = rng.upto(80);
        if case % 3 == 0 && !bytes.is_empty() {
            bytes[0] = 1 + rng.below(7) as u8;
        }
        let mut at = 0;
        'feed: while at < bytes.len() {
            let end = (at + 1 + rng.below(16)).min(bytes.len());
            dec.extend(&bytes[at..end]);
            at = end;
            loop {
                match dec.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            assert!(dec.pending().len() <= 1027 + 16);
        }
    }
}

#[test]
fn lean_session_size() {
    let size = std::mem::size_of::<LeanSession>();
    eprintln!("size_of::<LeanSession>() = {size}");
    assert!(size <= 128);
}

impl LeanSession {
    /// A copy of this session (mirroring twice).
    fn duplicate(&self) -> LeanSession {
        self.mirror().mirror()
    }
}

/// Two handshakes driven step by step on one thread, as a shard does: each
/// gets its own secrets from the config-wide key log.
#[test]
fn interleaved_handshakes_on_one_thread_keep_their_own_secrets() {
    let suite = ALL_SUITES[1];
    let server = server_config(&[suite]);
    let mut pairs: Vec<(ClientConnection, Handshake, Option<Box<Established>>)> = (0..3)
        .map(|_| {
            (
                new_client(client_config(&[suite])),
                Handshake::new(server.clone()).unwrap(),
                None,
            )
        })
        .collect();
    for _ in 0..10 {
        for (client, hs, done) in pairs.iter_mut() {
            if done.is_some() {
                continue;
            }
            hs.feed(&client_output(client));
            let mut out = Vec::new();
            let p = hs.step(&mut out).unwrap();
            client_input(client, &out).unwrap();
            if let Progress::Done(e) = p {
                *done = Some(e);
            }
        }
    }
    for (i, (client, _, done)) in pairs.iter_mut().enumerate() {
        let e = done.as_mut().expect("handshake finished");
        exchange(e, client, &format!("connection {i}"));
    }
}

/// A client config that logs its secrets, and the log.
fn logging_client(
    suite: rustls::SupportedCipherSuite,
) -> (
    std::sync::Arc<rustls::ClientConfig>,
    std::sync::Arc<SecretLog>,
) {
    let log = std::sync::Arc::new(SecretLog::default());
    let mut cfg = (*client_config(&[suite])).clone();
    cfg.key_log = log.clone();
    (std::sync::Arc::new(cfg), log)
}

#[derive(Debug, Default)]
struct SecretLog(std::sync::Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .push((label.to_owned(), secret.to_vec()));
    }
}

impl SecretLog {
    fn get(&self, label: &str) -> Vec<u8> {
        let log = self.0.lock().unwrap();
        log.iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("{label} not logged"))
    }
}

/// Run a handshake up to the client Finished, which is returned unsent,
/// with the server's handshake driver waiting for it.
fn up_to_client_finished(
    suite: rustls::SupportedCipherSuite,
) -> (
    Handshake,
    ClientConnection,
    Vec<u8>,
    std::sync::Arc<SecretLog>,
) {
    let (cfg, log) = logging_client(suite);
    let mut client = new_client(cfg);
    let mut hs = Handshake::new(server_config(&[suite])).unwrap();
    hs.feed(&client_output(&mut client));
    let mut out = Vec::new();
    assert!(matches!(hs.step(&mut out), Ok(Progress::NeedInput)));
    client_input(&mut client, &out).expect("server flight");
    assert!(!client.is_handshaking());
    let finished = client_output(&mut client);
    (hs, client, finished, log)
}

/// The suite's record layer id.
fn lean_suite(suite: rustls::SupportedCipherSuite) -> super::record::Suite {
    super::record::Suite::from_rustls(suite.suite()).unwrap()
}

#[test]
fn client_hello_over_the_record_limit_is_record_overflow() {
    use super::record::MAX_PLAINTEXT;
    for len in [
        MAX_PLAINTEXT + 1,
        MAX_PLAINTEXT + 2048,
        usize::from(u16::MAX),
    ] {
        let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
        // Only the header and the start of the body have arrived.
        hs.feed(&[22, 3, 1, (len >> 8) as u8, len as u8, 1, 0, 0x40, 0]);
        let mut out = Vec::new();
        let err = hs.step(&mut out).unwrap_err();
        assert!(
            matches!(err, HandshakeError::RecordOverflow { ty: 22, .. }),
            "{err}"
        );
        assert_eq!(out, [21, 3, 3, 0, 2, 2, 22], "{len}");
    }
    // Exactly 2^14 is a record rustls gets (and then refuses to parse).
    let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
    hs.feed(&[22, 3, 1, 0x40, 0]);
    assert!(matches!(hs.step(&mut Vec::new()), Ok(Progress::NeedInput)));
}

#[test]
fn unknown_record_type_is_unexpected_message() {
    let mut hs = Handshake::new(server_config(&ALL_SUITES)).unwrap();
    hs.feed(&[24, 3, 3, 0, 1, 0]);
    let mut out = Vec::new();
    let err = hs.step(&mut out).unwrap_err();
    assert!(
        matches!(err, HandshakeError::UnknownContentType(24)),
        "{err}"
    );
    assert_eq!(out, [21, 3, 3, 0, 2, 2, 10]);
}

/// The client Finished as a plaintext handshake record: `unexpected_message`,
/// sealed under the server's application key, which the client opens.
#[test]
fn plaintext_finished_is_unexpected_message_every_suite() {
    for suite in ALL_SUITES {
        let (mut hs, mut client, flight, log) = up_to_client_finished(suite);
        let mut peer = LeanSession::new(
            lean_suite(suite),
            &log.get("SERVER_HANDSHAKE_TRAFFIC_SECRET"),
            0,
            &log.get("CLIENT_HANDSHAKE_TRAFFIC_SECRET"),
            0,
        )
        .unwrap()
        .mirror();
        // The Finished is the flight's last record (after a CCS, if any).
        let mut last = flight.clone();
        let mut start = 0;
        while start + 5 + usize::from(u16::from_be_bytes([last[start + 3], last[start + 4]]))
            < last.len()
        {
            start += 5 + usize::from(u16::from_be_bytes([last[start + 3], last[start + 4]]));
        }
        let mut finished = last.split_off(start);
        let opened = peer.open(&mut finished).expect("client Finished opens");
        assert_eq!(opened.content_type, 22);
        let msg = finished[opened.plaintext].to_vec();
        assert_eq!(msg[0], 20, "finished");
        let mut wire = vec![22, 3, 3, 0, msg.len() as u8];
        wire.extend_from_slice(&msg);
        hs.feed(&wire);
        let mut out = Vec::new();
        let err = hs.step(&mut out).unwrap_err();
        assert!(
            matches!(err, HandshakeError::PlaintextAfterKeys(22)),
            "{err}"
        );
        assert_eq!(
            client_input(&mut client, &out).unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage),
            "{suite:?}"
        );
    }
}

/// An encrypted record that is all zeros inside, in place of the Finished:
/// rustls refuses it without an alert; the driver sends `unexpected_message`.
#[test]
fn all_zero_inner_plaintext_during_the_handshake_is_unexpected_message() {
    for suite in ALL_SUITES {
        let (mut hs, mut client, _flight, log) = up_to_client_finished(suite);
        let hs_secret = log.get("CLIENT_HANDSHAKE_TRAFFIC_SECRET");
        let mut sender = LeanSession::new(lean_suite(suite), &hs_secret, 0, &hs_secret, 0).unwrap();
        let mut wire = Vec::new();
        sender.seal_raw(b"", 0, 7, &mut wire).unwrap();
        hs.feed(&wire);
        let mut out = Vec::new();
        let err = hs.step(&mut out).unwrap_err();
        assert!(
            matches!(
                err,
                HandshakeError::Tls(rustls::Error::PeerMisbehaved(
                    rustls::PeerMisbehaved::IllegalTlsInnerPlaintext
                ))
            ),
            "{err}"
        );
        assert_eq!(
            client_input(&mut client, &out).unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage),
            "{suite:?}"
        );
    }
}

/// A tampered tag on the client Finished: rustls's `bad_record_mac` reaches
/// the client, and the driver adds nothing after it.
#[test]
fn corrupted_finished_tag_is_bad_record_mac_every_suite() {
    for suite in ALL_SUITES {
        let (mut hs, mut client, mut flight, _log) = up_to_client_finished(suite);
        let n = flight.len();
        flight[n - 1] ^= 0x80;
        hs.feed(&flight);
        let mut out = Vec::new();
        assert!(hs.step(&mut out).is_err());
        assert_eq!(
            client_input(&mut client, &out).unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac),
            "{suite:?}"
        );
    }
}
