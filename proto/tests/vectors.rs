//! Shared conformance vectors in `proto/testdata/*.json`, checked against
//! the Rust codec (`presence_proto::frame`) and token code (`presence_proto::token`).
//!
//! Agents in other languages (`agents/go`) test their codecs against the same
//! files. The format is described in `proto/testdata/README.md`.
//!
//! Two checks per file:
//! 1. the committed JSON is read back and every vector is replayed through
//!    the Rust code (decode the hex, encode the fields, compute the token);
//! 2. the vectors are generated again from the definitions below and must
//!    equal the committed JSON, so nothing was dropped or hand-edited.
//!
//! After changing the protocol or the definitions, regenerate with
//! `PRESENCED_WRITE_VECTORS=1 cargo test -p presence-proto --test vectors`
//! and commit the files.

use std::path::{Path, PathBuf};

use presence_proto::FleetKey;
use presence_proto::{
    self as protocol, ErrorCode, Frame, FrameDecoder, ProtocolError, ALPN, HEADER_LEN,
    MAX_ERROR_MESSAGE, MAX_ID_LEN, MAX_PAYLOAD, TOKEN_LEN, VERSION,
};
use serde_json::{json, Value};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

fn u32_of(v: &Value, key: &str) -> u32 {
    u32::try_from(u64_of(v, key)).expect("u32")
}

// --- frames ----------------------------------------------------------------

/// A frame as JSON. `session_id` is a decimal string: a u64 does not fit
/// the integers every JSON reader keeps exactly.
fn frame_json(f: &Frame) -> Value {
    match f {
        Frame::Hello { version, id, token } => json!({
            "type": "HELLO",
            "version": version,
            "id": String::from_utf8(id.clone()).expect("ids are ASCII"),
            "token": hex(token),
        }),
        Frame::Welcome {
            heartbeat_interval_ms,
            session_id,
        } => json!({
            "type": "WELCOME",
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "session_id": session_id.to_string(),
        }),
        Frame::Heartbeat { seq } => json!({"type": "HEARTBEAT", "seq": seq}),
        Frame::HeartbeatAck { seq } => json!({"type": "HEARTBEAT_ACK", "seq": seq}),
        Frame::Bye => json!({"type": "BYE"}),
        Frame::Reconnect {
            min_delay_ms,
            max_delay_ms,
        } => json!({
            "type": "RECONNECT",
            "min_delay_ms": min_delay_ms,
            "max_delay_ms": max_delay_ms,
        }),
        Frame::Error { code, message } => json!({
            "type": "ERROR",
            "code": code,
            "message": message,
        }),
    }
}

fn frame_from_json(v: &Value) -> Frame {
    match str_of(v, "type") {
        "HELLO" => Frame::Hello {
            version: u8::try_from(u64_of(v, "version")).expect("u8"),
            id: str_of(v, "id").as_bytes().to_vec(),
            token: unhex(str_of(v, "token")).try_into().expect("32-byte token"),
        },
        "WELCOME" => Frame::Welcome {
            heartbeat_interval_ms: u32_of(v, "heartbeat_interval_ms"),
            session_id: str_of(v, "session_id").parse().expect("decimal u64"),
        },
        "HEARTBEAT" => Frame::Heartbeat {
            seq: u32_of(v, "seq"),
        },
        "HEARTBEAT_ACK" => Frame::HeartbeatAck {
            seq: u32_of(v, "seq"),
        },
        "BYE" => Frame::Bye,
        "RECONNECT" => Frame::Reconnect {
            min_delay_ms: u32_of(v, "min_delay_ms"),
            max_delay_ms: u32_of(v, "max_delay_ms"),
        },
        "ERROR" => Frame::Error {
            code: u16::try_from(u64_of(v, "code")).expect("u16"),
            message: str_of(v, "message").to_owned(),
        },
        other => panic!("unknown frame type {other}"),
    }
}

/// The ERROR code the server answers when an agent's bytes fail to decode
/// this way (daemon/src/session.rs): 3 for a HELLO version, else 1.
fn server_error_code(e: &ProtocolError) -> ErrorCode {
    match e {
        ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::MalformedFrame,
    }
}

fn error_json(e: &ProtocolError) -> Value {
    let kind = match e {
        ProtocolError::UnknownType(_) => "unknown_type",
        ProtocolError::Oversized(_) => "oversized",
        ProtocolError::BadLength { .. } => "bad_length",
        ProtocolError::UnsupportedVersion(_) => "unsupported_version",
        ProtocolError::BadIdLength(_) => "bad_id_length",
        ProtocolError::BadIdChar(_) => "bad_id_char",
        ProtocolError::BadReconnectRange { .. } => "bad_reconnect_range",
        ProtocolError::BadErrorMessage => "bad_error_message",
    };
    json!({
        "kind": kind,
        "message": e.to_string(),
        "server_error_code": server_error_code(e) as u16,
    })
}

/// Decode a whole stream at once: the frames, then the error or the bytes
/// left over (an incomplete frame).
fn decode_stream(bytes: &[u8]) -> (Vec<Frame>, Result<Vec<u8>, ProtocolError>) {
    let mut d = FrameDecoder::new();
    d.extend(bytes);
    let mut frames = Vec::new();
    loop {
        match d.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, Ok(d.pending().to_vec())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

fn doc_token() -> [u8; TOKEN_LEN] {
    doc_key().token(b"host-01")
}

fn doc_key() -> FleetKey {
    FleetKey::parse("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")
        .expect("doc key")
}

fn hello(version: u8, id: &[u8], token: &[u8]) -> Vec<u8> {
    let mut p = vec![version, id.len() as u8];
    p.extend_from_slice(id);
    p.extend_from_slice(token);
    p
}

/// `type | u16 len | payload` with the length taken from the payload.
fn raw(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Every id byte the protocol allows, in one 66-byte id.
const ALL_ID_BYTES: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-";

fn valid_frames() -> Vec<(&'static str, Frame)> {
    let long_id = "a".repeat(MAX_ID_LEN);
    vec![
        (
            "HELLO host-01 with the docs' fleet key (protocol.md 4.1)",
            Frame::Hello {
                version: VERSION,
                id: b"host-01".to_vec(),
                token: doc_token(),
            },
        ),
        (
            "HELLO with every allowed id byte",
            Frame::Hello {
                version: VERSION,
                id: ALL_ID_BYTES.as_bytes().to_vec(),
                token: doc_key().token(ALL_ID_BYTES.as_bytes()),
            },
        ),
        (
            "HELLO with a one-byte id",
            Frame::Hello {
                version: VERSION,
                id: b"x".to_vec(),
                token: [0xff; TOKEN_LEN],
            },
        ),
        (
            "HELLO with a 128-byte id (the longest)",
            Frame::Hello {
                version: VERSION,
                id: long_id.as_bytes().to_vec(),
                token: doc_key().token(long_id.as_bytes()),
            },
        ),
        (
            "WELCOME 30000 ms, session 0x1122334455667788 (protocol.md 4.2)",
            Frame::Welcome {
                heartbeat_interval_ms: 30_000,
                session_id: 0x1122_3344_5566_7788,
            },
        ),
        (
            "WELCOME with the largest values",
            Frame::Welcome {
                heartbeat_interval_ms: u32::MAX,
                session_id: u64::MAX,
            },
        ),
        ("HEARTBEAT seq 1", Frame::Heartbeat { seq: 1 }),
        ("HEARTBEAT seq 0", Frame::Heartbeat { seq: 0 }),
        ("HEARTBEAT seq u32::MAX", Frame::Heartbeat { seq: u32::MAX }),
        ("HEARTBEAT_ACK seq 1", Frame::HeartbeatAck { seq: 1 }),
        (
            "HEARTBEAT_ACK seq 0x01020304",
            Frame::HeartbeatAck { seq: 0x0102_0304 },
        ),
        ("BYE", Frame::Bye),
        (
            "RECONNECT 1 s to 30 s (protocol.md 4.6)",
            Frame::Reconnect {
                min_delay_ms: 1000,
                max_delay_ms: 30_000,
            },
        ),
        (
            "RECONNECT 100 to 2000 ms (what an upgrade sends)",
            Frame::Reconnect {
                min_delay_ms: 100,
                max_delay_ms: 2000,
            },
        ),
        (
            "RECONNECT with min equal to max",
            Frame::Reconnect {
                min_delay_ms: 0,
                max_delay_ms: 0,
            },
        ),
        (
            "ERROR 7 shutting_down (protocol.md 4.7)",
            Frame::error(ErrorCode::ShuttingDown, "server shutting down"),
        ),
        (
            "ERROR 2 authentication_failed (protocol.md 8)",
            Frame::error(
                ErrorCode::AuthenticationFailed,
                "token does not match the agent id",
            ),
        ),
        (
            "ERROR 5 superseded (protocol.md 8)",
            Frame::error(
                ErrorCode::Superseded,
                "superseded by a newer session of this agent",
            ),
        ),
        (
            "ERROR 1 with an empty message",
            Frame::error(ErrorCode::MalformedFrame, ""),
        ),
        (
            "ERROR with an unknown code 999",
            Frame::Error {
                code: 999,
                message: "from a future server".into(),
            },
        ),
        (
            "ERROR with a 256-byte message (the longest)",
            Frame::error(ErrorCode::Overloaded, "m".repeat(MAX_ERROR_MESSAGE)),
        ),
        (
            "ERROR with a multi-byte UTF-8 message",
            Frame::error(ErrorCode::HelloTimeout, "délai dépassé ⏱"),
        ),
    ]
}

fn invalid_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let token = doc_token();
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("type 0x00 is unknown", vec![0x00, 0x00, 0x00]),
        ("type 0x08 is unknown", vec![0x08, 0x00, 0x04, 0, 0, 0, 1]),
        ("type 0xff is unknown", vec![0xff, 0x00, 0x00]),
        (
            "an unknown type is reported before an oversized length",
            vec![0x09, 0xff, 0xff],
        ),
        (
            "length 1025 is oversized (header alone is enough)",
            vec![0x03, 0x04, 0x01],
        ),
        ("length 65535 is oversized", vec![0x07, 0xff, 0xff]),
        ("HELLO with an empty payload", raw(0x01, &[])),
        ("HELLO with a one-byte payload", raw(0x01, &[1])),
        (
            "HELLO version 2 (with a v1 layout)",
            raw(0x01, &hello(2, b"host-01", &token)),
        ),
        (
            "HELLO version 2 is reported before its layout is checked",
            raw(0x01, &[2, 9, 9, 9]),
        ),
        ("HELLO version 0", raw(0x01, &hello(0, b"host-01", &token))),
        (
            "HELLO id_len larger than the payload",
            raw(0x01, &{
                let mut p = hello(1, b"host-01", &token);
                p[1] = 8;
                p
            }),
        ),
        (
            "HELLO token one byte short",
            raw(0x01, &hello(1, b"host-01", &token[..31])),
        ),
        (
            "HELLO with a trailing byte",
            raw(0x01, &{
                let mut p = hello(1, b"host-01", &token);
                p.push(0);
                p
            }),
        ),
        ("HELLO with an empty id", raw(0x01, &hello(1, b"", &token))),
        (
            "HELLO with a 129-byte id",
            raw(0x01, &hello(1, &[b'a'; 129], &token)),
        ),
        (
            "HELLO id with a space",
            raw(0x01, &hello(1, b"host 01", &token)),
        ),
        (
            "HELLO id with a slash",
            raw(0x01, &hello(1, b"host/01", &token)),
        ),
        (
            "HELLO id with a non-ASCII byte",
            raw(0x01, &hello(1, "hôte".as_bytes(), &token)),
        ),
        ("WELCOME with 11 bytes", raw(0x02, &[0; 11])),
        ("WELCOME with 13 bytes", raw(0x02, &[0; 13])),
        ("HEARTBEAT with 3 bytes", raw(0x03, &[0, 0, 1])),
        ("HEARTBEAT with 5 bytes", raw(0x03, &[0, 0, 0, 0, 1])),
        ("HEARTBEAT_ACK with 0 bytes", raw(0x04, &[])),
        ("BYE with 1 byte", raw(0x05, &[0])),
        ("RECONNECT with 7 bytes", raw(0x06, &[0; 7])),
        (
            "RECONNECT with min greater than max",
            raw(0x06, &[0, 0, 0x07, 0xd0, 0, 0, 0x03, 0xe8]),
        ),
        ("ERROR with 0 bytes", raw(0x07, &[])),
        ("ERROR with 1 byte", raw(0x07, &[0])),
        (
            "ERROR message that is not UTF-8",
            raw(0x07, &[0, 1, 0xff, 0xfe]),
        ),
        (
            "ERROR message cut inside a UTF-8 character",
            raw(0x07, &[0, 1, b'a', 0xc3]),
        ),
    ];
    let mut long = vec![0, 6];
    long.extend_from_slice(&[b'm'; MAX_ERROR_MESSAGE + 1]);
    v.push(("ERROR with a 257-byte message", raw(0x07, &long)));
    v
}

fn incomplete_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("nothing", vec![]),
        ("one header byte", vec![0x03]),
        ("two header bytes", vec![0x03, 0x00]),
        (
            "two bytes of an unknown type: still waiting for the length",
            vec![0x09, 0x00],
        ),
        ("a header without its payload", vec![0x03, 0x00, 0x04]),
        (
            "HEARTBEAT missing one byte",
            vec![0x03, 0x00, 0x04, 0, 0, 0],
        ),
        (
            "a header announcing the largest payload, 1024 bytes",
            vec![0x07, 0x04, 0x00, 0x00, 0x01],
        ),
    ]
}

fn streams() -> Vec<(&'static str, Vec<u8>)> {
    let cat = |frames: &[Frame]| {
        let mut v = Vec::new();
        for f in frames {
            f.encode(&mut v);
        }
        v
    };
    let mut after_bad = cat(&[Frame::HeartbeatAck { seq: 1 }]);
    after_bad.extend_from_slice(&[0x0a, 0x00, 0x00]);
    let mut with_partial = cat(&[Frame::Heartbeat { seq: 7 }, Frame::Bye]);
    with_partial.extend_from_slice(&[0x03, 0x00, 0x04, 0x00]);
    vec![
        (
            "HEARTBEAT seq 2 and 3 in one write (protocol.md 8)",
            cat(&[Frame::Heartbeat { seq: 2 }, Frame::Heartbeat { seq: 3 }]),
        ),
        (
            "the agent side of protocol.md 8",
            cat(&[
                Frame::Hello {
                    version: VERSION,
                    id: b"host-01".to_vec(),
                    token: doc_token(),
                },
                Frame::Heartbeat { seq: 1 },
                Frame::Heartbeat { seq: 2 },
                Frame::Heartbeat { seq: 3 },
                Frame::Bye,
            ]),
        ),
        (
            "the server side of protocol.md 8",
            cat(&[
                Frame::Welcome {
                    heartbeat_interval_ms: 30_000,
                    session_id: 0x1122_3344_5566_7788,
                },
                Frame::HeartbeatAck { seq: 1 },
                Frame::HeartbeatAck { seq: 2 },
                Frame::HeartbeatAck { seq: 3 },
            ]),
        ),
        (
            "WELCOME, ACK, RECONNECT",
            cat(&[
                Frame::Welcome {
                    heartbeat_interval_ms: 1000,
                    session_id: 42,
                },
                Frame::HeartbeatAck { seq: 1 },
                Frame::Reconnect {
                    min_delay_ms: 100,
                    max_delay_ms: 2000,
                },
            ]),
        ),
        ("a valid frame, then an unknown type", after_bad),
        ("two frames, then part of a third", with_partial),
    ]
}

fn truncations() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "a 300-byte ASCII message is cut to 256 bytes",
            Frame::error(ErrorCode::Overloaded, "x".repeat(300)),
        ),
        (
            "a 400-byte message of 2-byte characters is cut to 256 bytes",
            Frame::error(ErrorCode::Overloaded, "é".repeat(200)),
        ),
        (
            "255 ASCII bytes then a 3-byte character: cut to 255 bytes",
            Frame::error(ErrorCode::Overloaded, format!("{}€", "x".repeat(255))),
        ),
    ]
}

fn frames_file() -> Value {
    let valid: Vec<Value> = valid_frames()
        .into_iter()
        .map(|(name, f)| {
            let bytes = f.to_bytes();
            let (got, rest) = decode_stream(&bytes);
            assert_eq!(got, vec![f.clone()], "{name}: round trip");
            assert_eq!(rest, Ok(vec![]), "{name}");
            json!({"name": name, "hex": hex(&bytes), "frame": frame_json(&f)})
        })
        .collect();
    let invalid: Vec<Value> = invalid_inputs()
        .into_iter()
        .map(|(name, bytes)| {
            let e = match protocol::decode_one(&bytes) {
                Err(e) => e,
                other => panic!("{name}: expected an error, got {other:?}"),
            };
            json!({"name": name, "hex": hex(&bytes), "error": error_json(&e)})
        })
        .collect();
    let incomplete: Vec<Value> = incomplete_inputs()
        .into_iter()
        .map(|(name, bytes)| {
            assert_eq!(protocol::decode_one(&bytes), Ok(None), "{name}");
            json!({"name": name, "hex": hex(&bytes)})
        })
        .collect();
    let streams: Vec<Value> = streams()
        .into_iter()
        .map(|(name, bytes)| stream_json(name, &bytes))
        .collect();
    let truncations: Vec<Value> = truncations()
        .into_iter()
        .map(|(name, f)| {
            let bytes = f.to_bytes();
            let (got, _) = decode_stream(&bytes);
            json!({
                "name": name,
                "frame": frame_json(&f),
                "hex": hex(&bytes),
                "decoded": frame_json(&got[0]),
            })
        })
        .collect();
    json!({
        "about": "Wire protocol v1 frames (docs/protocol.md). Generated and checked by proto/tests/vectors.rs with presence_proto; format in proto/testdata/README.md.",
        "constants": {
            "version": VERSION,
            "alpn": String::from_utf8(ALPN.to_vec()).expect("ASCII"),
            "header_len": HEADER_LEN,
            "max_payload": MAX_PAYLOAD,
            "token_len": TOKEN_LEN,
            "max_id_len": MAX_ID_LEN,
            "max_error_message": MAX_ERROR_MESSAGE,
            "id_bytes": ALL_ID_BYTES,
        },
        "valid": valid,
        "invalid": invalid,
        "incomplete": incomplete,
        "streams": streams,
        "encode_truncates": truncations,
    })
}

fn stream_json(name: &str, bytes: &[u8]) -> Value {
    let (frames, end) = decode_stream(bytes);
    let frames: Vec<Value> = frames.iter().map(frame_json).collect();
    let (error, pending) = match end {
        Ok(rest) => (Value::Null, hex(&rest)),
        Err(e) => (error_json(&e), String::new()),
    };
    json!({"name": name, "hex": hex(bytes), "frames": frames, "error": error, "pending": pending})
}

// --- tokens ----------------------------------------------------------------

fn key_hex(k: &FleetKey) -> String {
    k.to_file_text().trim_end().to_owned()
}

fn tokens_file() -> Value {
    let pattern: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let keys = [
        FleetKey::from_bytes(pattern),
        doc_key(),
        FleetKey::from_bytes([0xff; 32]),
        FleetKey::from_bytes([0; 32]),
    ];
    let long_id = "z".repeat(MAX_ID_LEN);
    let ids = [
        "host-01",
        "x",
        "Host-01",
        "agent@site:42.example_com",
        ALL_ID_BYTES,
        long_id.as_str(),
    ];
    let mut tokens = vec![json!({
        "name": "protocol.md section 3 worked example",
        "fleet_key": key_hex(&keys[1]),
        "agent_id": "host-01",
        "token": hex(&keys[1].token(b"host-01")),
    })];
    for (ki, k) in keys.iter().enumerate() {
        for id in ids {
            tokens.push(json!({
                "name": format!("key {ki}, id of {} bytes", id.len()),
                "fleet_key": key_hex(k),
                "agent_id": id,
                "token": hex(&k.token(id.as_bytes())),
            }));
        }
    }
    let doc = key_hex(&doc_key());
    let files: Vec<(&str, String)> = vec![
        ("64 hex characters and \\n", format!("{doc}\n")),
        ("no newline", doc.clone()),
        ("\\r\\n", format!("{doc}\r\n")),
        ("upper case", format!("{}\n", doc.to_uppercase())),
        (
            "mixed case",
            format!("{}{}\n", &doc[..32], doc[32..].to_uppercase()),
        ),
        ("63 characters", format!("{}\n", &doc[..63])),
        ("65 characters", format!("{doc}0\n")),
        ("two newlines", format!("{doc}\n\n")),
        ("a leading space", format!(" {doc}\n")),
        ("a trailing space", format!("{doc} \n")),
        ("a non-hex character", format!("{}g\n", &doc[..63])),
        ("a lone \\r", format!("{doc}\r")),
        ("empty", String::new()),
    ];
    let files: Vec<Value> = files
        .into_iter()
        .map(|(name, text)| {
            let key = match FleetKey::parse(&text) {
                Ok(k) => Value::String(key_hex(&k)),
                Err(_) => Value::Null,
            };
            json!({"name": name, "text": text, "fleet_key": key})
        })
        .collect();
    json!({
        "about": "Agent tokens: HMAC-SHA256(fleet_key, agent id) (docs/protocol.md section 3), and the fleet key file format. Generated and checked by proto/tests/vectors.rs with presence_proto::token; format in proto/testdata/README.md.",
        "tokens": tokens,
        "fleet_key_files": files,
    })
}

fn error_codes_file() -> Value {
    let codes: Vec<Value> = ErrorCode::ALL
        .iter()
        .map(|c| json!({"code": *c as u16, "name": c.name()}))
        .collect();
    json!({
        "about": "ERROR frame codes (docs/protocol.md 4.7). Generated and checked by proto/tests/vectors.rs with presence_proto::ErrorCode; format in proto/testdata/README.md.",
        "codes": codes,
    })
}

// --- replay of the committed files ------------------------------------------

fn array<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not an array"))
}

fn replay_frames(file: &Value) {
    for v in array(file, "valid") {
        let name = str_of(v, "name");
        let bytes = unhex(str_of(v, "hex"));
        let frame = frame_from_json(&v["frame"]);
        assert_eq!(frame.to_bytes(), bytes, "{name}: encode");
        assert_eq!(
            protocol::decode_one(&bytes),
            Ok(Some((frame, bytes.len()))),
            "{name}: decode"
        );
    }
    for v in array(file, "invalid") {
        let name = str_of(v, "name");
        match protocol::decode_one(&unhex(str_of(v, "hex"))) {
            Err(e) => assert_eq!(error_json(&e), v["error"], "{name}"),
            other => panic!("{name}: expected an error, got {other:?}"),
        }
    }
    for v in array(file, "incomplete") {
        let name = str_of(v, "name");
        assert_eq!(
            protocol::decode_one(&unhex(str_of(v, "hex"))),
            Ok(None),
            "{name}"
        );
    }
    for v in array(file, "streams") {
        let name = str_of(v, "name");
        let bytes = unhex(str_of(v, "hex"));
        // Byte by byte: the decoder must not depend on how input is chunked.
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut error = Value::Null;
        'feed: for b in &bytes {
            d.extend(std::slice::from_ref(b));
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => frames.push(frame_json(&f)),
                    Ok(None) => break,
                    Err(e) => {
                        error = error_json(&e);
                        break 'feed;
                    }
                }
            }
        }
        assert_eq!(Value::Array(frames), v["frames"], "{name}: frames");
        assert_eq!(error, v["error"], "{name}: error");
        if error.is_null() {
            assert_eq!(hex(d.pending()), str_of(v, "pending"), "{name}: pending");
        }
    }
    for v in array(file, "encode_truncates") {
        let name = str_of(v, "name");
        let bytes = frame_from_json(&v["frame"]).to_bytes();
        assert_eq!(hex(&bytes), str_of(v, "hex"), "{name}: encode");
        let (got, _) = decode_stream(&bytes);
        assert_eq!(got, vec![frame_from_json(&v["decoded"])], "{name}: decode");
    }
}

fn replay_tokens(file: &Value) {
    for v in array(file, "tokens") {
        let name = str_of(v, "name");
        let key: [u8; 32] = unhex(str_of(v, "fleet_key"))
            .try_into()
            .expect("32-byte key");
        let token = FleetKey::from_bytes(key).token(str_of(v, "agent_id").as_bytes());
        assert_eq!(hex(&token), str_of(v, "token"), "{name}");
    }
    for v in array(file, "fleet_key_files") {
        let name = str_of(v, "name");
        let got = FleetKey::parse(str_of(v, "text")).ok().map(|k| key_hex(&k));
        assert_eq!(got.as_deref(), v["fleet_key"].as_str(), "{name}");
    }
}

fn replay_error_codes(file: &Value) {
    let codes = array(file, "codes");
    assert_eq!(codes.len(), ErrorCode::ALL.len());
    for v in codes {
        let code = u16::try_from(u64_of(v, "code")).expect("u16");
        let c = ErrorCode::from_u16(code).expect("known code");
        assert_eq!(c.name(), str_of(v, "name"));
    }
}

// --- the tests ----------------------------------------------------------------

/// Compare the committed file with the generated one, or write it when
/// `PRESENCED_WRITE_VECTORS` is set.
fn committed(name: &str, generated: Value) -> Value {
    let path = testdata().join(name);
    if std::env::var_os("PRESENCED_WRITE_VECTORS").is_some() {
        std::fs::create_dir_all(testdata()).expect("create proto/testdata");
        let text = serde_json::to_string_pretty(&generated).expect("json") + "\n";
        std::fs::write(&path, text).expect("write vectors");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file: Value = serde_json::from_str(&text).expect("vectors are JSON");
    for (key, want) in generated.as_object().expect("object") {
        assert_eq!(
            file.get(key),
            Some(want),
            "{}: `{key}` differs from what the Rust code generates; regenerate with \
             PRESENCED_WRITE_VECTORS=1 cargo test -p presence-proto --test vectors",
            path.display()
        );
    }
    assert_eq!(file, generated, "{}: extra keys", path.display());
    file
}

#[test]
fn frame_vectors_match_the_codec() {
    replay_frames(&committed("frames.json", frames_file()));
}

#[test]
fn token_vectors_match_the_token_code() {
    replay_tokens(&committed("tokens.json", tokens_file()));
}

#[test]
fn error_code_vectors_match_the_codes() {
    replay_error_codes(&committed("error_codes.json", error_codes_file()));
}

#[test]
fn protocol_md_examples_are_in_the_vectors() {
    // The hex examples of docs/protocol.md appear verbatim in frames.json.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"))
            .expect("protocol.md");
    let doc_hex: String = doc
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_hexdigit()))
        .filter(|w| w.len() == 2)
        .collect::<Vec<_>>()
        .concat();
    let frames = frames_file();
    for name in [
        "HELLO host-01 with the docs' fleet key (protocol.md 4.1)",
        "WELCOME 30000 ms, session 0x1122334455667788 (protocol.md 4.2)",
        "RECONNECT 1 s to 30 s (protocol.md 4.6)",
        "ERROR 7 shutting_down (protocol.md 4.7)",
        "ERROR 2 authentication_failed (protocol.md 8)",
        "ERROR 5 superseded (protocol.md 8)",
    ] {
        let v = array(&frames, "valid")
            .iter()
            .find(|v| v["name"] == name)
            .expect("vector");
        assert!(
            doc_hex.contains(str_of(v, "hex")),
            "{name}: {} is not in protocol.md",
            str_of(v, "hex")
        );
    }
}
