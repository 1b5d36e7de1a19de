//! Wire protocol v1: frame types, encoding and an incremental decoder.
//!
//! Every frame is `u8 type | u16 length (big-endian) | payload`; payloads over
//! [`MAX_PAYLOAD`] bytes are a protocol error. Frames may be split across or
//! batched within TLS records, so [`FrameDecoder`] accepts arbitrary chunks.
//! The normative description is `docs/protocol.md`.

use thiserror::Error;

/// Protocol version carried in HELLO.
pub const VERSION: u8 = 1;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1024;
/// Frame header: type (1) + length (2).
pub const HEADER_LEN: usize = 3;
/// Length of the HELLO authentication token (HMAC-SHA256).
pub const TOKEN_LEN: usize = 32;
/// Longest agent id.
pub const MAX_ID_LEN: usize = 128;
/// Longest ERROR message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// ALPN protocol identifier advertised by the server.
pub const ALPN: &[u8] = b"presence/1";

/// Frame type bytes.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const HEARTBEAT: u8 = 0x03;
    pub const HEARTBEAT_ACK: u8 = 0x04;
    pub const BYE: u8 = 0x05;
    pub const RECONNECT: u8 = 0x06;
    pub const ERROR: u8 = 0x07;
}

/// ERROR frame codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    MalformedFrame = 1,
    AuthenticationFailed = 2,
    UnsupportedVersion = 3,
    HelloTimeout = 4,
    Superseded = 5,
    Overloaded = 6,
    ShuttingDown = 7,
}

impl ErrorCode {
    /// All codes, in numeric order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::MalformedFrame,
        ErrorCode::AuthenticationFailed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HelloTimeout,
        ErrorCode::Superseded,
        ErrorCode::Overloaded,
        ErrorCode::ShuttingDown,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u16 == v)
    }

    /// Stable snake_case name used in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::Superseded => "superseded",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

/// A decoded frame. Borrowed payloads point into the decoder's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u8,
        id: Vec<u8>,
        token: [u8; TOKEN_LEN],
    },
    Welcome {
        heartbeat_interval_ms: u32,
        session_id: u64,
    },
    Heartbeat {
        seq: u32,
    },
    HeartbeatAck {
        seq: u32,
    },
    Bye,
    Reconnect {
        min_delay_ms: u32,
        max_delay_ms: u32,
    },
    Error {
        code: u16,
        message: String,
    },
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame type 0x{0:02x} is unknown")]
    UnknownType(u8),
    #[error("frame length {0} exceeds the maximum payload of {MAX_PAYLOAD} bytes")]
    Oversized(usize),
    #[error("{frame} payload is {got} bytes, expected {expected}")]
    BadLength {
        frame: &'static str,
        got: usize,
        expected: &'static str,
    },
    #[error("protocol version {0} is not supported; this server speaks {VERSION}")]
    UnsupportedVersion(u8),
    #[error("agent id is {0} bytes; it must be 1..=128")]
    BadIdLength(usize),
    #[error("agent id contains byte 0x{0:02x}; allowed are [A-Za-z0-9._:@-]")]
    BadIdChar(u8),
    #[error("RECONNECT min_delay_ms {min} is greater than max_delay_ms {max}")]
    BadReconnectRange { min: u32, max: u32 },
    #[error("ERROR message is not valid UTF-8 or longer than {MAX_ERROR_MESSAGE} bytes")]
    BadErrorMessage,
}

/// Whether a byte may appear in an agent id.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
}

/// Validate an agent id: 1..=128 bytes of `[A-Za-z0-9._:@-]`.
pub fn validate_id(id: &[u8]) -> Result<(), ProtocolError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ProtocolError::BadIdLength(id.len()));
    }
    match id.iter().find(|b| !is_id_byte(**b)) {
        Some(b) => Err(ProtocolError::BadIdChar(*b)),
        None => Ok(()),
    }
}

fn be_u32(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}

fn expect_len(
    frame: &'static str,
    p: &[u8],
    n: usize,
    s: &'static str,
) -> Result<(), ProtocolError> {
    if p.len() == n {
        Ok(())
    } else {
        Err(ProtocolError::BadLength {
            frame,
            got: p.len(),
            expected: s,
        })
    }
}

/// Parse one frame's payload given its type byte.
pub fn parse_payload(ty: u8, p: &[u8]) -> Result<Frame, ProtocolError> {
    use frame_type::*;
    match ty {
        HELLO => {
            if p.len() < 2 {
                return Err(ProtocolError::BadLength {
                    frame: "HELLO",
                    got: p.len(),
                    expected: "2 + id_len + 32",
                });
            }
            let version = p[0];
            // Checked before the layout: a future version may lay HELLO out differently.
            if version != VERSION {
                return Err(ProtocolError::UnsupportedVersion(version));
            }
            let id_len = p[1] as usize;
            expect_len("HELLO", p, 2 + id_len + TOKEN_LEN, "2 + id_len + 32")?;
            let id = &p[2..2 + id_len];
            validate_id(id)?;
            let mut token = [0u8; TOKEN_LEN];
            token.copy_from_slice(&p[2 + id_len..]);
            Ok(Frame::Hello {
                version,
                id: id.to_vec(),
                token,
            })
        }
        WELCOME => {
            expect_len("WELCOME", p, 12, "12")?;
            Ok(Frame::Welcome {
                heartbeat_interval_ms: be_u32(p),
                session_id: u64::from_be_bytes(p[4..12].try_into().expect("8 bytes")),
            })
        }
        HEARTBEAT => {
            expect_len("HEARTBEAT", p, 4, "4")?;
            Ok(Frame::Heartbeat { seq: be_u32(p) })
        }
        HEARTBEAT_ACK => {
            expect_len("HEARTBEAT_ACK", p, 4, "4")?;
            Ok(Frame::HeartbeatAck { seq: be_u32(p) })
        }
        BYE => {
            expect_len("BYE", p, 0, "0")?;
            Ok(Frame::Bye)
        }
        RECONNECT => {
            expect_len("RECONNECT", p, 8, "8")?;
            let (min, max) = (be_u32(p), be_u32(&p[4..]));
            if min > max {
                return Err(ProtocolError::BadReconnectRange { min, max });
            }
            Ok(Frame::Reconnect {
                min_delay_ms: min,
                max_delay_ms: max,
            })
        }
        ERROR => {
            if p.len() < 2 {
                return Err(ProtocolError::BadLength {
                    frame: "ERROR",
                    got: p.len(),
                    expected: "2 + message",
                });
            }
            let msg = &p[2..];
            if msg.len() > MAX_ERROR_MESSAGE {
                return Err(ProtocolError::BadErrorMessage);
            }
            let message = std::str::from_utf8(msg)
                .map_err(|_| ProtocolError::BadErrorMessage)?
                .to_owned();
            Ok(Frame::Error {
                code: u16::from_be_bytes([p[0], p[1]]),
                message,
            })
        }
        other => Err(ProtocolError::UnknownType(other)),
    }
}

impl Frame {
    /// Append this frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let ty = match self {
            Frame::Hello { version, id, token } => {
                out.push(*version);
                out.push(id.len() as u8);
                out.extend_from_slice(id);
                out.extend_from_slice(token);
                frame_type::HELLO
            }
            Frame::Welcome {
                heartbeat_interval_ms,
                session_id,
            } => {
                out.extend_from_slice(&heartbeat_interval_ms.to_be_bytes());
                out.extend_from_slice(&session_id.to_be_bytes());
                frame_type::WELCOME
            }
            Frame::Heartbeat { seq } => {
                out.extend_from_slice(&seq.to_be_bytes());
                frame_type::HEARTBEAT
            }
            Frame::HeartbeatAck { seq } => {
                out.extend_from_slice(&seq.to_be_bytes());
                frame_type::HEARTBEAT_ACK
            }
            Frame::Bye => frame_type::BYE,
            Frame::Reconnect {
                min_delay_ms,
                max_delay_ms,
            } => {
                out.extend_from_slice(&min_delay_ms.to_be_bytes());
                out.extend_from_slice(&max_delay_ms.to_be_bytes());
                frame_type::RECONNECT
            }
            Frame::Error { code, message } => {
                out.extend_from_slice(&code.to_be_bytes());
                let mut end = message.len().min(MAX_ERROR_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&message.as_bytes()[..end]);
                frame_type::ERROR
            }
        };
        let len = (out.len() - start - HEADER_LEN) as u16;
        out[start] = ty;
        out[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
    }

    /// This frame's encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        self.encode(&mut v);
        v
    }

    /// The frame type's name, as the protocol document spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Heartbeat { .. } => "HEARTBEAT",
            Frame::HeartbeatAck { .. } => "HEARTBEAT_ACK",
            Frame::Bye => "BYE",
            Frame::Reconnect { .. } => "RECONNECT",
            Frame::Error { .. } => "ERROR",
        }
    }

    /// An ERROR frame with the given code and message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error {
            code: code as u16,
            message: message.into(),
        }
    }
}

/// Decode one frame from the front of `buf`: `Ok(None)` when `buf` holds
/// only part of a frame, else the frame and the bytes it took.
pub fn decode_one(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let ty = buf[0];
    if !(frame_type::HELLO..=frame_type::ERROR).contains(&ty) {
        return Err(ProtocolError::UnknownType(ty));
    }
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Oversized(len));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let frame = parse_payload(ty, &buf[HEADER_LEN..HEADER_LEN + len])?;
    Ok(Some((frame, HEADER_LEN + len)))
}

/// Incremental frame decoder. Feed it bytes as they arrive; it yields whole
/// frames and keeps at most one partial frame (<= 1027 bytes) in between.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held from a frame that has not completed yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Whether a whole frame (or a header that is already an error) is buffered.
    pub fn has_frame(&self) -> bool {
        if self.buf.len() < HEADER_LEN {
            return false;
        }
        let len = u16::from_be_bytes([self.buf[1], self.buf[2]]) as usize;
        len > MAX_PAYLOAD || self.buf.len() >= HEADER_LEN + len
    }

    /// Append received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Decode the next whole frame, if any. On error the stream is unusable.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let Some((frame, used)) = decode_one(&self.buf)? else {
            return Ok(None);
        };
        self.buf.drain(..used);
        if self.buf.is_empty() {
            // An idle connection keeps no buffer capacity.
            self.buf = Vec::new();
        }
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: 1,
                id: b"host-01.example:x@y_z".to_vec(),
                token: [7; 32],
            },
            Frame::Welcome {
                heartbeat_interval_ms: 30_000,
                session_id: 0x0102_0304_0506_0708,
            },
            Frame::Heartbeat { seq: 42 },
            Frame::HeartbeatAck { seq: u32::MAX },
            Frame::Bye,
            Frame::Reconnect {
                min_delay_ms: 10,
                max_delay_ms: 20,
            },
            Frame::error(ErrorCode::Superseded, "superseded"),
        ]
    }

    #[test]
    fn future_version_is_reported_before_layout() {
        assert_eq!(
            parse_payload(frame_type::HELLO, &[2, 9, 9, 9]),
            Err(ProtocolError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn round_trip_every_frame_byte_by_byte() {
        let mut wire = Vec::new();
        for f in all_frames() {
            f.encode(&mut wire);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.extend(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
        assert!(d.pending().is_empty());
    }

    #[test]
    fn exact_bytes_of_heartbeat_and_welcome() {
        assert_eq!(
            Frame::Heartbeat { seq: 0x01020304 }.to_bytes(),
            [0x03, 0x00, 0x04, 1, 2, 3, 4]
        );
        assert_eq!(
            Frame::Welcome {
                heartbeat_interval_ms: 1000,
                session_id: 9
            }
            .to_bytes(),
            [0x02, 0, 12, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(Frame::Bye.to_bytes(), [0x05, 0, 0]);
    }

    #[test]
    fn rejects_bad_input() {
        let mut d = FrameDecoder::new();
        d.extend(&[0x09, 0, 0]);
        assert_eq!(d.next_frame(), Err(ProtocolError::UnknownType(9)));

        let mut d = FrameDecoder::new();
        d.extend(&[0x03, 0x04, 0x01]);
        assert_eq!(d.next_frame(), Err(ProtocolError::Oversized(1025)));

        let mut d = FrameDecoder::new();
        d.extend(&[0x03, 0, 3, 1, 2, 3]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::BadLength { .. })
        ));

        let mut hello = vec![1u8, 3];
        hello.extend_from_slice(b"a b");
        hello.extend_from_slice(&[0; 32]);
        assert_eq!(
            parse_payload(frame_type::HELLO, &hello),
            Err(ProtocolError::BadIdChar(b' '))
        );
        let mut hello = vec![1u8, 0];
        hello.extend_from_slice(&[0; 32]);
        assert_eq!(
            parse_payload(frame_type::HELLO, &hello),
            Err(ProtocolError::BadIdLength(0))
        );
    }

    #[test]
    fn error_message_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let bytes = Frame::error(ErrorCode::Overloaded, long).to_bytes();
        let f = parse_payload(bytes[0], &bytes[3..]).unwrap();
        match f {
            Frame::Error { code, message } => {
                assert_eq!(code, 6);
                assert!(message.len() <= MAX_ERROR_MESSAGE);
            }
            _ => panic!("not an error frame"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of a pseudo-random stream.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut d = FrameDecoder::new();
            let n = (x % 64) as usize + 1;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.extend(&[(x % 8) as u8, (x >> 8) as u8 % 2, (x >> 16) as u8]);
                if d.next_frame().is_err() {
                    break;
                }
            }
        }
    }
}
