//! The agent protocol as a pure state machine: no socket, no clock, no
//! shard. `(phase, event) -> outcome` decides, for one event of a
//! connection, the reply frame, whether the liveness deadline starts again,
//! and what the connection table must do (welcome, acknowledge, end).
//! Every rule of docs/protocol.md section 5.1 for an established TLS
//! connection lives here, and the deadline rule of section 5 too; the
//! connection table (`conn/table.rs`) only carries them out.

use std::borrow::Cow;
use std::time::Duration;

use presence_proto::{self as protocol, ErrorCode, FleetKey, Frame, ProtocolError, TOKEN_LEN};

use crate::presence::table::GoneReason;
use crate::tls::record::AlertDescription;

/// Connection lifecycle phase, which decides the connection's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Handshake,
    AwaitHello,
    Session,
}

/// Something the shard asks a connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCmd {
    HandshakeTimeout,
    HelloTimeout,
    /// No frame within heartbeat_interval * miss_limit.
    Timeout,
    /// A newer session of the same agent took over.
    Superseded,
    Shutdown,
}

/// What a batch of a session's input asks for, in order (was `Step`).
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// A decoded frame (HELLO, HEARTBEAT, BYE, or one an agent must not send).
    Frame(Frame),
    /// The agent sent bytes that are not a valid frame; close with ERROR `code`.
    Violation(ErrorCode, String),
    /// The peer closed (EOF, reset, close_notify, fatal alert).
    Closed,
    /// A TLS-level failure; close after sending `alert`.
    TlsFailure {
        alert: Option<AlertDescription>,
        reason: String,
    },
}

/// How a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Send what is pending (an ERROR frame, if any), close_notify, FIN.
    Goodbye,
    /// Send this TLS alert (None: close_notify) and nothing else.
    Alert(Option<AlertDescription>),
}

/// Why and how a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// What the owner shard is told (decides the presence effect).
    pub reason: GoneReason,
    /// ERROR frame sent before closing.
    pub error: Option<(ErrorCode, Cow<'static, str>)>,
    pub close: Close,
}

impl Ending {
    fn new(reason: GoneReason, error: Option<(ErrorCode, Cow<'static, str>)>) -> Self {
        Self {
            reason,
            error,
            close: Close::Goodbye,
        }
    }

    fn malformed(msg: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            GoneReason::Disconnect,
            Some((ErrorCode::MalformedFrame, msg.into())),
        )
    }
}

/// What the connection table must do after one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// HELLO accepted: the connection enters [`Phase::Session`] as
    /// `agent`'s session `session`; its owner shard is told.
    Welcomed {
        agent: Box<str>,
        session: u64,
    },
    /// A HEARTBEAT was acknowledged.
    Heartbeat,
    /// Close the connection; process no further input.
    End(Ending),
}

/// The answer to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// A frame arrived: the liveness deadline starts again. ANY frame
    /// counts, even one that then ends the connection.
    pub seen: bool,
    /// Frame to send back (WELCOME, HEARTBEAT_ACK).
    pub reply: Option<Frame>,
    pub effect: Effect,
}

impl Outcome {
    fn frame(reply: Option<Frame>, effect: Effect) -> Self {
        Self {
            seen: true,
            reply,
            effect,
        }
    }
}

/// What the credentials say about a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloAuth {
    /// The token verifies against fleet key number `key` (configuration order).
    Accepted { key: usize },
    /// The token verifies against no configured fleet key.
    BadToken,
    /// The agent id is on the deny-list (`auth.revoked`), whatever its token.
    Revoked,
}

/// The credential rule of HELLO: a revoked id is refused whatever its
/// token; otherwise the token must verify against one of `keys`. Each check
/// is constant time, and every key is tried whichever matched, so the time
/// taken does not tell which key (or whether any) matched.
pub fn authenticate<'a>(
    keys: impl IntoIterator<Item = &'a FleetKey>,
    revoked: bool,
    id: &[u8],
    token: &[u8; TOKEN_LEN],
) -> HelloAuth {
    let mut matched = None;
    for (i, k) in keys.into_iter().enumerate() {
        if k.verify(id, token) && matched.is_none() {
            matched = Some(i);
        }
    }
    match (revoked, matched) {
        (true, _) => HelloAuth::Revoked,
        (false, Some(key)) => HelloAuth::Accepted { key },
        (false, None) => HelloAuth::BadToken,
    }
}

/// The deny-list file format (`auth.revoked`): one agent id per line;
/// surrounding blanks are ignored, and so are empty lines and lines whose
/// first non-blank character is `#`.
pub fn parse_revoked(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// How a live session of an agent revoked by a reload ends: ERROR 2, and
/// offline with reason `revoked` (no grace).
pub fn revoked_ending() -> Ending {
    Ending::new(
        GoneReason::Revoked,
        Some((
            ErrorCode::AuthenticationFailed,
            "agent id is revoked".into(),
        )),
    )
}

/// What the rules need from outside: the credentials, the configured
/// interval, and randomness for session ids.
pub trait Context {
    /// Check a HELLO's id and token (see [`authenticate`]).
    fn authenticate(&self, id: &[u8], token: &[u8; TOKEN_LEN]) -> HelloAuth;
    fn heartbeat_interval_ms(&self) -> u32;
    fn new_session_id(&mut self) -> u64;
}

/// Apply one event to a connection in `phase`.
pub fn on_event(phase: Phase, event: SessionEvent, ctx: &mut impl Context) -> Outcome {
    let frame = match event {
        SessionEvent::Frame(f) => f,
        SessionEvent::Violation(code, msg) => {
            return Outcome {
                seen: false,
                reply: None,
                effect: Effect::End(Ending::new(
                    GoneReason::Disconnect,
                    Some((code, msg.into())),
                )),
            };
        }
        SessionEvent::Closed => {
            return Outcome {
                seen: false,
                reply: None,
                effect: Effect::End(Ending::new(GoneReason::Disconnect, None)),
            };
        }
        SessionEvent::TlsFailure { alert, .. } => {
            return Outcome {
                seen: false,
                reply: None,
                effect: Effect::End(Ending {
                    reason: GoneReason::Disconnect,
                    error: None,
                    close: Close::Alert(alert),
                }),
            };
        }
    };
    match (phase, frame) {
        (Phase::AwaitHello, Frame::Hello { id, token, .. }) => {
            let refused = match ctx.authenticate(&id, &token) {
                HelloAuth::Accepted { .. } => None,
                HelloAuth::BadToken => Some("token does not match the agent id"),
                HelloAuth::Revoked => Some("agent id is revoked"),
            };
            if let Some(msg) = refused {
                return Outcome::frame(
                    None,
                    Effect::End(Ending::new(
                        GoneReason::Disconnect,
                        Some((ErrorCode::AuthenticationFailed, msg.into())),
                    )),
                );
            }
            let agent: Box<str> = String::from_utf8_lossy(&id).into();
            let session = ctx.new_session_id();
            let welcome = Frame::Welcome {
                heartbeat_interval_ms: ctx.heartbeat_interval_ms(),
                session_id: session,
            };
            Outcome::frame(Some(welcome), Effect::Welcomed { agent, session })
        }
        (Phase::AwaitHello, other) => Outcome::frame(
            None,
            Effect::End(Ending::malformed(format!(
                "expected HELLO as the first frame, got {}",
                other.name()
            ))),
        ),
        (Phase::Session, Frame::Heartbeat { seq }) => {
            Outcome::frame(Some(Frame::HeartbeatAck { seq }), Effect::Heartbeat)
        }
        (Phase::Session, Frame::Bye) => {
            Outcome::frame(None, Effect::End(Ending::new(GoneReason::Bye, None)))
        }
        (Phase::Session, Frame::Hello { .. }) => Outcome::frame(
            None,
            Effect::End(Ending::malformed("HELLO was already received")),
        ),
        (Phase::Session, other) => Outcome::frame(
            None,
            Effect::End(Ending::malformed(format!(
                "{} is not a frame an agent sends",
                other.name()
            ))),
        ),
        // A handshake task has no session input; nothing to act on.
        (Phase::Handshake, _) => Outcome::frame(None, Effect::None),
    }
}

/// How a connection ends when the shard commands it.
pub fn on_command(cmd: ConnCmd) -> Ending {
    match cmd {
        ConnCmd::Timeout => Ending::new(GoneReason::Timeout, None),
        ConnCmd::HelloTimeout | ConnCmd::HandshakeTimeout => Ending::new(
            GoneReason::Disconnect,
            Some((ErrorCode::HelloTimeout, "no HELLO in time".into())),
        ),
        // The owner already moved to the new session: no event for this one.
        ConnCmd::Superseded => Ending::new(
            GoneReason::Shutdown,
            Some((
                ErrorCode::Superseded,
                "superseded by a newer session of this agent".into(),
            )),
        ),
        ConnCmd::Shutdown => Ending::new(
            GoneReason::Shutdown,
            Some((ErrorCode::ShuttingDown, "server shutting down".into())),
        ),
    }
}

/// Split decrypted application data into events. Returns the bytes used
/// (the rest is the start of a frame) and whether a closing event (BYE or a
/// violation) ended the input: nothing after it is looked at.
pub fn split_frames(input: &[u8], events: &mut Vec<SessionEvent>) -> (usize, bool) {
    let mut at = 0;
    loop {
        match protocol::decode_one(&input[at..]) {
            Ok(Some((frame, used))) => {
                at += used;
                let stop = matches!(frame, Frame::Bye);
                events.push(SessionEvent::Frame(frame));
                if stop {
                    return (at, true);
                }
            }
            Ok(None) => return (at, false),
            Err(e) => {
                events.push(violation(&e));
                return (at, true);
            }
        }
    }
}

/// The ERROR a decoding failure earns: 3 for a version, 1 otherwise.
pub fn violation(e: &ProtocolError) -> SessionEvent {
    let code = match e {
        ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::MalformedFrame,
    };
    SessionEvent::Violation(code, e.to_string())
}

/// The configured deadlines, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub handshake_ms: u64,
    pub hello_ms: u64,
    /// heartbeat_interval x miss_limit.
    pub liveness_ms: u64,
}

impl Timeouts {
    pub fn new(handshake: Duration, hello: Duration, liveness: Duration) -> Self {
        let ms = |d: Duration| d.as_millis() as u64;
        Self {
            handshake_ms: ms(handshake),
            hello_ms: ms(hello),
            liveness_ms: ms(liveness),
        }
    }

    /// The deadline rule: the TLS handshake and HELLO count from accept;
    /// a session's deadline counts from the last frame seen (any frame).
    pub fn deadline_ms(&self, phase: Phase, accepted_ms: u64, last_seen_ms: u64) -> u64 {
        match phase {
            Phase::Handshake => accepted_ms + self.handshake_ms,
            Phase::AwaitHello => accepted_ms + self.hello_ms,
            Phase::Session => last_seen_ms + self.liveness_ms,
        }
    }

    /// A new connection's first wheel entry: the earlier of both deadlines
    /// that count from accept.
    pub fn first_deadline_ms(&self, accepted_ms: u64) -> u64 {
        accepted_ms + self.handshake_ms.min(self.hello_ms)
    }
}

/// The command a passed deadline sends, by phase.
pub fn expired(phase: Phase) -> ConnCmd {
    match phase {
        Phase::Handshake => ConnCmd::HandshakeTimeout,
        Phase::AwaitHello => ConnCmd::HelloTimeout,
        Phase::Session => ConnCmd::Timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use presence_proto::FleetKey;

    fn key() -> FleetKey {
        FleetKey::from_bytes([7; 32])
    }

    struct Ctx {
        next_session: u64,
    }

    impl Context for Ctx {
        fn authenticate(&self, id: &[u8], token: &[u8; TOKEN_LEN]) -> HelloAuth {
            authenticate([&key()], id == b"revoked-1", id, token)
        }
        fn heartbeat_interval_ms(&self) -> u32 {
            30_000
        }
        fn new_session_id(&mut self) -> u64 {
            self.next_session += 1;
            self.next_session
        }
    }

    fn ctx() -> Ctx {
        Ctx { next_session: 41 }
    }

    fn hello(id: &str) -> Frame {
        Frame::Hello {
            version: presence_proto::VERSION,
            id: id.as_bytes().to_vec(),
            token: key().token(id.as_bytes()),
        }
    }

    /// Feed `bytes` as one batch of application data to a connection in
    /// `phase`, as the table does; returns the phase after and the outcomes.
    fn run(mut phase: Phase, bytes: &[u8]) -> (Phase, Vec<Outcome>) {
        let mut events = Vec::new();
        split_frames(bytes, &mut events);
        let mut ctx = ctx();
        let mut outs = Vec::new();
        for ev in events {
            let out = on_event(phase, ev, &mut ctx);
            let end = matches!(out.effect, Effect::End(_));
            if let Effect::Welcomed { .. } = out.effect {
                phase = Phase::Session;
            }
            outs.push(out);
            if end {
                break;
            }
        }
        (phase, outs)
    }

    fn ending(out: &Outcome) -> &Ending {
        match &out.effect {
            Effect::End(e) => e,
            other => panic!("expected an ending, got {other:?}"),
        }
    }

    fn error_of(out: &Outcome) -> (ErrorCode, &str) {
        let (code, msg) = ending(out).error.as_ref().expect("an ERROR frame");
        (*code, msg)
    }

    #[test]
    fn hello_first_is_welcomed_with_interval_and_session_id() {
        let (phase, outs) = run(Phase::AwaitHello, &hello("host-01").to_bytes());
        assert_eq!(phase, Phase::Session);
        assert_eq!(outs.len(), 1);
        assert!(outs[0].seen);
        assert_eq!(
            outs[0].reply,
            Some(Frame::Welcome {
                heartbeat_interval_ms: 30_000,
                session_id: 42
            })
        );
        assert_eq!(
            outs[0].effect,
            Effect::Welcomed {
                agent: "host-01".into(),
                session: 42
            }
        );
    }

    #[test]
    fn frame_before_hello_is_error_1() {
        for (frame, name) in [
            (Frame::Heartbeat { seq: 1 }, "HEARTBEAT"),
            (Frame::Bye, "BYE"),
        ] {
            let (phase, outs) = run(Phase::AwaitHello, &frame.to_bytes());
            assert_eq!(phase, Phase::AwaitHello);
            assert!(outs[0].seen, "any frame refreshes the deadline");
            assert_eq!(
                error_of(&outs[0]),
                (
                    ErrorCode::MalformedFrame,
                    format!("expected HELLO as the first frame, got {name}").as_str()
                )
            );
            assert_eq!(ending(&outs[0]).reason, GoneReason::Disconnect);
            assert_eq!(outs[0].reply, None);
        }
    }

    #[test]
    fn hello_twice_is_error_1_and_a_drop() {
        let mut bytes = hello("host-01").to_bytes();
        bytes.extend(hello("host-01").to_bytes());
        bytes.extend(Frame::Heartbeat { seq: 1 }.to_bytes());
        let (_, outs) = run(Phase::AwaitHello, &bytes);
        assert_eq!(outs.len(), 2, "nothing after the closing frame is handled");
        assert_eq!(
            error_of(&outs[1]),
            (ErrorCode::MalformedFrame, "HELLO was already received")
        );
        // A protocol error in a session is like a drop: grace, not offline.
        assert_eq!(ending(&outs[1]).reason, GoneReason::Disconnect);
    }

    #[test]
    fn wrong_token_is_error_2() {
        let mut f = hello("host-01");
        if let Frame::Hello { token, .. } = &mut f {
            token[0] ^= 1;
        }
        let (phase, outs) = run(Phase::AwaitHello, &f.to_bytes());
        assert_eq!(phase, Phase::AwaitHello);
        assert_eq!(
            error_of(&outs[0]),
            (
                ErrorCode::AuthenticationFailed,
                "token does not match the agent id"
            )
        );
        assert_eq!(outs[0].reply, None, "no WELCOME");
    }

    #[test]
    fn unsupported_version_is_error_3() {
        let mut bytes = hello("host-01").to_bytes();
        bytes[3] = 2; // version byte, after the 3-byte frame header
        let (_, outs) = run(Phase::AwaitHello, &bytes);
        assert!(!outs[0].seen, "an undecodable frame is not a frame");
        assert_eq!(
            error_of(&outs[0]),
            (
                ErrorCode::UnsupportedVersion,
                "protocol version 2 is not supported; this server speaks 1"
            )
        );
    }

    #[test]
    fn bad_hello_id_is_error_1() {
        let mut bytes = hello("host-01").to_bytes();
        bytes[5] = b' '; // first id byte
        let (_, outs) = run(Phase::AwaitHello, &bytes);
        assert_eq!(error_of(&outs[0]).0, ErrorCode::MalformedFrame);
    }

    #[test]
    fn unknown_type_is_error_1_at_any_time() {
        for phase in [Phase::AwaitHello, Phase::Session] {
            let (_, outs) = run(phase, &[0x09, 0, 0]);
            assert_eq!(
                error_of(&outs[0]),
                (ErrorCode::MalformedFrame, "frame type 0x09 is unknown")
            );
            assert_eq!(ending(&outs[0]).reason, GoneReason::Disconnect);
        }
    }

    #[test]
    fn oversize_is_error_1_at_any_time() {
        for phase in [Phase::AwaitHello, Phase::Session] {
            let (_, outs) = run(phase, &[0x03, 0x04, 0x01]); // length 1025
            assert_eq!(
                error_of(&outs[0]),
                (
                    ErrorCode::MalformedFrame,
                    "frame length 1025 exceeds the maximum payload of 1024 bytes"
                )
            );
        }
    }

    #[test]
    fn wrong_payload_length_is_error_1() {
        let (_, outs) = run(Phase::Session, &[0x03, 0x00, 0x02, 0, 1]);
        assert_eq!(error_of(&outs[0]).0, ErrorCode::MalformedFrame);
    }

    #[test]
    fn server_only_frame_from_agent_is_error_1() {
        let (_, outs) = run(Phase::Session, &Frame::HeartbeatAck { seq: 3 }.to_bytes());
        assert_eq!(
            error_of(&outs[0]),
            (
                ErrorCode::MalformedFrame,
                "HEARTBEAT_ACK is not a frame an agent sends"
            )
        );
    }

    #[test]
    fn heartbeat_is_acked_with_its_seq() {
        let mut bytes = Frame::Heartbeat { seq: 7 }.to_bytes();
        bytes.extend(Frame::Heartbeat { seq: 8 }.to_bytes());
        let (_, outs) = run(Phase::Session, &bytes);
        assert_eq!(outs.len(), 2);
        for (out, seq) in outs.iter().zip([7, 8]) {
            assert!(out.seen);
            assert_eq!(out.reply, Some(Frame::HeartbeatAck { seq }));
            assert_eq!(out.effect, Effect::Heartbeat);
        }
    }

    #[test]
    fn bye_ends_without_error_and_stops_the_input() {
        let mut bytes = Frame::Bye.to_bytes();
        bytes.extend(Frame::Heartbeat { seq: 1 }.to_bytes());
        let mut events = Vec::new();
        let (used, stop) = split_frames(&bytes, &mut events);
        assert_eq!((used, stop), (3, true), "nothing after BYE is decoded");
        let (_, outs) = run(Phase::Session, &bytes);
        assert_eq!(outs.len(), 1);
        assert_eq!(
            outs[0].effect,
            Effect::End(Ending {
                reason: GoneReason::Bye,
                error: None,
                close: Close::Goodbye
            })
        );
    }

    #[test]
    fn a_split_frame_waits_for_its_rest() {
        let bytes = Frame::Heartbeat { seq: 1 }.to_bytes();
        let mut events = Vec::new();
        assert_eq!(split_frames(&bytes[..4], &mut events), (0, false));
        assert!(events.is_empty());
    }

    #[test]
    fn peer_close_and_tls_failure_end_without_error() {
        let mut ctx = ctx();
        let out = on_event(Phase::Session, SessionEvent::Closed, &mut ctx);
        assert!(!out.seen);
        assert_eq!(
            out.effect,
            Effect::End(Ending {
                reason: GoneReason::Disconnect,
                error: None,
                close: Close::Goodbye
            })
        );
        let alert = Some(AlertDescription::DecodeError);
        let out = on_event(
            Phase::AwaitHello,
            SessionEvent::TlsFailure {
                alert,
                reason: "bad record".into(),
            },
            &mut ctx,
        );
        // Never an ERROR frame for TLS-level trouble: an alert only.
        assert_eq!(
            out.effect,
            Effect::End(Ending {
                reason: GoneReason::Disconnect,
                error: None,
                close: Close::Alert(alert)
            })
        );
    }

    #[test]
    fn hello_before_tls_fails_the_handshake_without_an_error_frame() {
        use crate::tls::handshake::Handshake;
        use crate::tls::testutil::{server_config, ALL_SUITES};
        let mut hs = Handshake::new(server_config(&ALL_SUITES)).expect("handshake");
        hs.feed(&hello("host-01").to_bytes());
        let mut out = Vec::new();
        assert!(hs.step(&mut out).is_err(), "a plaintext HELLO is not TLS");
        // At most a TLS alert record (content type 21), never a frame.
        assert!(out.is_empty() || out[0] == 21, "sent {out:?}");
    }

    #[test]
    fn frames_before_tls_are_not_acted_on() {
        // A connection still in its TLS handshake has no session input;
        // plaintext HELLO bytes there are the TLS stack's to refuse.
        let out = on_event(
            Phase::Handshake,
            SessionEvent::Frame(hello("a")),
            &mut ctx(),
        );
        assert_eq!(out.effect, Effect::None);
        assert_eq!(out.reply, None);
    }

    #[test]
    fn supersede_shutdown_and_timeouts() {
        let e = on_command(ConnCmd::Superseded);
        assert_eq!(e.reason, GoneReason::Shutdown, "no presence event");
        assert_eq!(
            e.error,
            Some((
                ErrorCode::Superseded,
                "superseded by a newer session of this agent".into()
            ))
        );
        let e = on_command(ConnCmd::Shutdown);
        assert_eq!(e.reason, GoneReason::Shutdown);
        assert_eq!(
            e.error,
            Some((ErrorCode::ShuttingDown, "server shutting down".into()))
        );
        let e = on_command(ConnCmd::Timeout);
        assert_eq!((e.reason, e.error), (GoneReason::Timeout, None));
        for cmd in [ConnCmd::HelloTimeout, ConnCmd::HandshakeTimeout] {
            let e = on_command(cmd);
            assert_eq!(
                e.error,
                Some((ErrorCode::HelloTimeout, "no HELLO in time".into()))
            );
            assert_eq!(e.reason, GoneReason::Disconnect);
        }
    }

    #[test]
    fn deadlines_by_phase_and_refresh_on_any_frame() {
        let t = Timeouts::new(
            Duration::from_secs(10),
            Duration::from_secs(5),
            Duration::from_secs(90),
        );
        assert_eq!(t.first_deadline_ms(1_000), 6_000);
        assert_eq!(t.deadline_ms(Phase::Handshake, 1_000, 50_000), 11_000);
        assert_eq!(t.deadline_ms(Phase::AwaitHello, 1_000, 50_000), 6_000);
        assert_eq!(t.deadline_ms(Phase::Session, 1_000, 50_000), 140_000);
        assert_eq!(expired(Phase::Handshake), ConnCmd::HandshakeTimeout);
        assert_eq!(expired(Phase::AwaitHello), ConnCmd::HelloTimeout);
        assert_eq!(expired(Phase::Session), ConnCmd::Timeout);
        // Every decoded frame refreshes the deadline, whatever it is.
        for (phase, f) in [
            (Phase::Session, Frame::Heartbeat { seq: 1 }),
            (Phase::Session, Frame::Bye),
            (Phase::Session, hello("a")),
            (
                Phase::Session,
                Frame::Reconnect {
                    min_delay_ms: 1,
                    max_delay_ms: 2,
                },
            ),
            (Phase::AwaitHello, Frame::Heartbeat { seq: 1 }),
            (Phase::AwaitHello, hello("a")),
        ] {
            assert!(on_event(phase, SessionEvent::Frame(f), &mut ctx()).seen);
        }
    }

    #[test]
    fn any_configured_key_verifies_and_the_matching_one_is_named() {
        let old = FleetKey::from_bytes([1; 32]);
        let new = FleetKey::from_bytes([2; 32]);
        let other = FleetKey::from_bytes([3; 32]);
        let id = b"host-07";
        assert_eq!(
            authenticate([&old, &new], false, id, &old.token(id)),
            HelloAuth::Accepted { key: 0 }
        );
        assert_eq!(
            authenticate([&old, &new], false, id, &new.token(id)),
            HelloAuth::Accepted { key: 1 }
        );
        assert_eq!(
            authenticate([&old, &new], false, id, &other.token(id)),
            HelloAuth::BadToken
        );
        // A token for another id never verifies.
        assert_eq!(
            authenticate([&old, &new], false, id, &new.token(b"host-08")),
            HelloAuth::BadToken
        );
        // No key at all: nothing verifies.
        assert_eq!(
            authenticate([], false, id, &new.token(id)),
            HelloAuth::BadToken
        );
        // Revoked wins over a valid token.
        assert_eq!(
            authenticate([&old, &new], true, id, &new.token(id)),
            HelloAuth::Revoked
        );
    }

    #[test]
    fn revoked_hello_is_error_2_with_its_reason() {
        let id = "revoked-1";
        let (phase, outs) = run(Phase::AwaitHello, &hello(id).to_bytes());
        assert_eq!(phase, Phase::AwaitHello);
        let (code, msg) = error_of(&outs[0]);
        assert_eq!(code, ErrorCode::AuthenticationFailed);
        assert!(msg.contains("revoked"), "{msg}");
        assert_eq!(ending(&outs[0]).reason, GoneReason::Disconnect);
    }

    #[test]
    fn revoked_session_ends_with_error_2_and_reason_revoked() {
        let e = revoked_ending();
        assert_eq!(e.reason, GoneReason::Revoked);
        assert_eq!(e.close, Close::Goodbye);
        assert_eq!(
            e.error.as_ref().map(|(c, _)| *c),
            Some(ErrorCode::AuthenticationFailed)
        );
    }

    #[test]
    fn revoked_file_lines_and_comments() {
        let text = "# revoked 2026-12-01\nhost-01\n  host-02  \n\n   # host-03\nhost-04\r\n";
        let ids: Vec<&str> = parse_revoked(text).collect();
        assert_eq!(ids, ["host-01", "host-02", "host-04"]);
    }
}
