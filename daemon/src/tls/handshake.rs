//! Sans-I/O TLS 1.3 server handshake over rustls's unbuffered API, ending in
//! a [`LeanSession`].
//!
//! rustls does the whole handshake. When it reports `WriteTraffic` (the
//! session tickets already encoded), the connection is converted with
//! `dangerous_into_kernel_connection()`, which yields the record sequence
//! numbers and the current key/IV, and then dropped. What a key update needs,
//! the traffic secrets themselves, rustls hands out only through the config's
//! `KeyLog` hook (`CLIENT_TRAFFIC_SECRET_0` / `SERVER_TRAFFIC_SECRET_0`). The
//! hook is config-wide, so each [`Handshake`] puts its capture slot into a
//! thread-local for the duration of its own `process_tls_records` call, the
//! only place rustls derives secrets. A shard is single-threaded, so the
//! secrets logged during that call are this connection's. As a check, the
//! key and IV derived from the captured secrets must equal what rustls
//! extracted, or the handshake fails.
//!
//! rustls is handed the received bytes one record at a time and nothing
//! after the record that completes the handshake (see [`Handshake`]), so
//! application data, a KeyUpdate or close_notify sent together with the
//! client Finished stays raw in [`Established::leftover`] for the record
//! layer, and the converted session starts at client sequence number 0.
//!
//! Record-layer rules rustls does not apply itself are checked on each record
//! header before rustls sees the record (RFC 8446 section 5): a plaintext
//! record over 2^14 bytes or any record over 2^14 + 256 bytes gets
//! `record_overflow`, a plaintext handshake record once the handshake keys are
//! in use (e.g. a plaintext Finished) gets `unexpected_message`, and so does an
//! encrypted record whose inner plaintext has no content type. These alerts
//! are sealed here (see [`Handshake::own_alert`]).
//!
//! A config must go through [`prepare_config`] first: it turns on secret
//! extraction, installs the hook, disables 0-RTT and wraps the certificate
//! resolver to note the SNI (the unbuffered server connection of rustls
//! 0.23 has no SNI accessor).

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use rustls::server::{ClientHello, ResolvesServerCert, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError};
use rustls::{ConnectionTrafficSecrets, KeyLog, ProtocolVersion, ServerConfig};
use thiserror::Error;

use super::record::{self, AlertDescription, LeanSession, RecordError, Suite};

/// Handshake bytes we buffer before giving up on a client. A TLS 1.3 client
/// flight is a few KiB even with post-quantum key shares.
pub const MAX_HANDSHAKE_INPUT: usize = 64 * 1024;
/// Application data a client may send along with its Finished.
pub const MAX_EARLY_PLAINTEXT: usize = 64 * 1024;
/// Alert records drained after a failure.
const MAX_ALERT_DRAIN: usize = 8;

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("server config was not passed through lean::handshake::prepare_config")]
    ConfigNotPrepared,
    #[error("TLS handshake: {0}")]
    Tls(#[from] rustls::Error),
    #[error("handshake input exceeds {0} bytes")]
    InputTooLarge(usize),
    #[error("application data sent with the client Finished exceeds {0} bytes")]
    EarlyPlaintextTooLarge(usize),
    #[error("client sent 0-RTT data, which is disabled")]
    EarlyData,
    #[error("negotiated {0:?}; only TLS 1.3 is served")]
    NotTls13(Option<ProtocolVersion>),
    #[error("negotiated cipher suite {0:?} has no lean record layer")]
    UnsupportedSuite(Option<rustls::CipherSuite>),
    #[error("the key log hook did not deliver {0} for this connection")]
    SecretNotCaptured(&'static str),
    #[error("{0} traffic secret from the key log does not match the key rustls extracted")]
    SecretMismatch(&'static str),
    #[error("the peer closed the connection during the handshake")]
    ClosedDuringHandshake,
    #[error("unexpected rustls unbuffered state {0}")]
    UnexpectedState(&'static str),
    #[error("encoding a handshake record: {0}")]
    Encode(String),
    #[error("the handshake already ended")]
    AlreadyEnded,
    #[error("building the record layer: {0}")]
    Record(#[from] RecordError),
    #[error("record of type {ty} and {len} bytes exceeds {limit} bytes")]
    RecordOverflow { ty: u8, len: usize, limit: usize },
    #[error("plaintext record of type {0} after the handshake keys took effect")]
    PlaintextAfterKeys(u8),
    #[error("record of unknown content type {0}")]
    UnknownContentType(u8),
}

impl HandshakeError {
    /// The alert RFC 8446 names for an error this driver finds itself (rustls
    /// sends its own alerts for the errors it finds, except the one mapped
    /// here, an encrypted record without a content type, for which it sends
    /// none).
    pub fn own_alert(&self) -> Option<AlertDescription> {
        match self {
            Self::RecordOverflow { .. } => Some(AlertDescription::RecordOverflow),
            Self::PlaintextAfterKeys(_) | Self::UnknownContentType(_) => {
                Some(AlertDescription::UnexpectedMessage)
            }
            Self::Tls(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::IllegalTlsInnerPlaintext,
            )) => Some(AlertDescription::UnexpectedMessage),
            _ => None,
        }
    }
}

/// What the caller does next. In every case, bytes appended to the `out`
/// vector passed to [`Handshake::step`] must be sent to the peer, in order.
#[derive(Debug)]
pub enum Progress {
    /// Send `out`, read more from the peer, [`Handshake::feed`] it and call
    /// [`Handshake::step`] again.
    NeedInput,
    /// The handshake is complete. Send `out` (it holds the session tickets)
    /// before anything the session seals.
    Done(Box<Established>),
}

/// An established connection: everything kept from the handshake.
pub struct Established {
    pub session: LeanSession,
    /// Negotiated ALPN protocol, if any.
    pub alpn: Option<Vec<u8>>,
    /// Server name the client asked for, if it sent SNI.
    pub sni: Option<String>,
    /// Application data rustls decrypted before the conversion. Empty in
    /// practice, since rustls never sees a record after the client Finished;
    /// kept for safety. Goes to the frame decoder before anything else.
    pub early_plaintext: Vec<u8>,
    /// Received bytes after the handshake not yet processed: the start of a
    /// record for the [`LeanSession`] (read it with `read_stream` as pending).
    pub leftover: Vec<u8>,
    /// The client already sent close_notify within its last flight.
    pub peer_closed: bool,
    /// Whether the client resumed a session with a ticket.
    pub resumed: bool,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("session", &self.session)
            .field("alpn", &self.alpn.as_deref().map(String::from_utf8_lossy))
            .field("sni", &self.sni)
            .field("early_plaintext", &self.early_plaintext.len())
            .field("leftover", &self.leftover.len())
            .field("peer_closed", &self.peer_closed)
            .finish()
    }
}

/// A traffic secret as logged by rustls.
#[derive(Clone)]
struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Default for Secret {
    fn default() -> Self {
        Self {
            bytes: [0; 48],
            len: 0,
        }
    }
}

impl Secret {
    fn from_slice(s: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; 48];
        bytes.get_mut(..s.len())?.copy_from_slice(s);
        Some(Self {
            bytes,
            len: u8::try_from(s.len()).ok()?,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

/// What the hooks captured for one connection.
#[derive(Default)]
struct Capture {
    client: Option<Secret>,
    server: Option<Secret>,
    sni: Option<String>,
    /// rustls derived the handshake traffic secrets: from here on the client
    /// sends only encrypted records (and change_cipher_spec).
    handshake_keys: bool,
}

thread_local! {
    /// The capture of the connection whose `process_tls_records` call is
    /// running on this thread, if any.
    static CURRENT: RefCell<Option<Capture>> = const { RefCell::new(None) };
}

/// Puts a connection's capture into [`CURRENT`] and takes it back on drop.
struct CaptureGuard<'a> {
    target: &'a mut Capture,
    previous: Option<Capture>,
}

impl<'a> CaptureGuard<'a> {
    fn install(target: &'a mut Capture) -> Self {
        let mine = std::mem::take(target);
        let previous = CURRENT
            .try_with(|c| c.try_borrow_mut().ok().and_then(|mut c| c.replace(mine)))
            .ok()
            .flatten();
        Self { target, previous }
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let mine = CURRENT
            .try_with(|c| {
                c.try_borrow_mut()
                    .ok()
                    .and_then(|mut c| std::mem::replace(&mut *c, previous))
            })
            .ok()
            .flatten();
        *self.target = mine.unwrap_or_default();
    }
}

fn with_current(f: impl FnOnce(&mut Capture)) {
    let _ = CURRENT.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            if let Some(c) = c.as_mut() {
                f(c);
            }
        }
    });
}

const CLIENT_LABEL: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_LABEL: &str = "SERVER_TRAFFIC_SECRET_0";
/// Logged when the handshake keys take effect; only the fact is kept.
const CLIENT_HS_LABEL: &str = "CLIENT_HANDSHAKE_TRAFFIC_SECRET";

/// The config-wide key log: hands the application traffic secrets to the
/// connection being driven on this thread. Connections driven by other code
/// (no capture installed) are ignored.
#[derive(Debug)]
struct CaptureKeyLog;

impl KeyLog for CaptureKeyLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        with_current(|c| match label {
            CLIENT_LABEL => c.client = Secret::from_slice(secret),
            SERVER_LABEL => c.server = Secret::from_slice(secret),
            CLIENT_HS_LABEL => c.handshake_keys = true,
            _ => {}
        });
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_LABEL || label == SERVER_LABEL || label == CLIENT_HS_LABEL
    }
}

fn capture_key_log() -> Arc<dyn KeyLog> {
    static KEY_LOG: OnceLock<Arc<dyn KeyLog>> = OnceLock::new();
    KEY_LOG.get_or_init(|| Arc::new(CaptureKeyLog)).clone()
}

/// Wraps the certificate resolver to note the client's SNI.
#[derive(Debug)]
struct SniCapture(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for SniCapture {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = client_hello.server_name() {
            with_current(|c| c.sni = Some(name.to_owned()));
        }
        self.0.resolve(client_hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Make a server config usable by [`Handshake`]: secret extraction on, the
/// capturing key log installed (replacing any other), 0-RTT off, SNI noted.
///
/// The config should allow TLS 1.3 only; a TLS 1.2 or non-AEAD-suite
/// handshake fails at the end with [`HandshakeError::NotTls13`] or
/// [`HandshakeError::UnsupportedSuite`].
pub fn prepare_config(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.enable_secret_extraction = true;
    config.key_log = capture_key_log();
    config.max_early_data_size = 0;
    config.cert_resolver = Arc::new(SniCapture(config.cert_resolver.clone()));
    Arc::new(config)
}

fn is_prepared(config: &ServerConfig) -> bool {
    config.enable_secret_extraction
        && Arc::as_ptr(&config.key_log).cast::<()>() == Arc::as_ptr(&capture_key_log()).cast::<()>()
}

/// A server handshake in progress.
///
/// Received bytes wait in `queue` and are handed to rustls one TLS record at
/// a time, and only while the handshake is in progress: rustls never sees a
/// record sent after the client Finished. Those records (application data,
/// KeyUpdate, close_notify sent in the same flight) stay raw in the queue and
/// become [`Established::leftover`] for the record layer. This matters for
/// KeyUpdate: rustls would answer one with a message it only emits before its
/// next write, which never comes once the connection is converted.
pub struct Handshake {
    /// `None` once the handshake ended.
    conn: Option<Box<UnbufferedServerConnection>>,
    /// rustls's input buffer: bytes it has not discarded yet.
    input: Vec<u8>,
    /// Received bytes not handed to rustls yet; starts at a record boundary
    /// or inside the record being handed over.
    queue: Vec<u8>,
    /// Bytes of the current record still to move from `queue` to `input`.
    record_left: usize,
    capture: Capture,
    early_plaintext: Vec<u8>,
    peer_closed: bool,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("ended", &self.conn.is_none())
            .field("input", &self.input.len())
            .field("queue", &self.queue.len())
            .finish_non_exhaustive()
    }
}

enum HandshakeStep {
    Continue,
    Blocked,
    Convert,
}

impl Handshake {
    /// A new server handshake; `config` must come from [`prepare_config`].
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, HandshakeError> {
        if !is_prepared(&config) {
            return Err(HandshakeError::ConfigNotPrepared);
        }
        Ok(Self {
            conn: Some(Box::new(UnbufferedServerConnection::new(config)?)),
            input: Vec::new(),
            queue: Vec::new(),
            record_left: 0,
            capture: Capture::default(),
            early_plaintext: Vec::new(),
            peer_closed: false,
        })
    }

    /// Bytes received from the peer.
    pub fn feed(&mut self, input: &[u8]) {
        self.queue.extend_from_slice(input);
    }

    /// Advance the handshake as far as the input allows. Bytes to send are
    /// appended to `out` whatever the result; after an error `out` may hold
    /// an alert for the peer, and the connection must be closed.
    pub fn step(&mut self, out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        let r = self.step_inner(out);
        if let Err(e) = &r {
            let before = out.len();
            if let Some(conn) = self.conn.as_deref_mut() {
                drain_alerts(conn, &mut self.input, out);
            }
            if out.len() == before {
                if let Some(alert) = e.own_alert() {
                    self.seal_own_alert(alert, out);
                }
            }
            self.conn = None;
            self.input = Vec::new();
            self.queue = Vec::new();
        }
        r
    }

    fn step_inner(&mut self, out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        loop {
            if self.input.len() + self.queue.len() > MAX_HANDSHAKE_INPUT {
                return Err(HandshakeError::InputTooLarge(MAX_HANDSHAKE_INPUT));
            }
            let conn = self
                .conn
                .as_deref_mut()
                .ok_or(HandshakeError::AlreadyEnded)?;
            let status = {
                let _guard = CaptureGuard::install(&mut self.capture);
                conn.process_tls_records(&mut self.input)
            };
            let mut discard = status.discard;
            let next = match status.state {
                Err(e) => Err(HandshakeError::Tls(e)),
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    encode(out, |buf| enc.encode(buf)).map(|()| HandshakeStep::Continue)
                }
                Ok(ConnectionState::TransmitTlsData(tx)) => {
                    // The bytes are in `out`, which the caller sends.
                    tx.done();
                    Ok(HandshakeStep::Continue)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(HandshakeStep::Blocked),
                Ok(ConnectionState::ReadTraffic(mut rd)) => {
                    // Not expected (no record after the client Finished is
                    // handed over), but harmless.
                    let mut r = Ok(HandshakeStep::Continue);
                    while let Some(rec) = rd.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                if self.early_plaintext.len() + rec.payload.len()
                                    > MAX_EARLY_PLAINTEXT
                                {
                                    r = Err(HandshakeError::EarlyPlaintextTooLarge(
                                        MAX_EARLY_PLAINTEXT,
                                    ));
                                    break;
                                }
                                self.early_plaintext.extend_from_slice(rec.payload);
                            }
                            Err(e) => {
                                r = Err(HandshakeError::Tls(e));
                                break;
                            }
                        }
                    }
                    r
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(HandshakeStep::Continue)
                }
                Ok(ConnectionState::WriteTraffic(_)) => Ok(HandshakeStep::Convert),
                Ok(ConnectionState::ReadEarlyData(_)) => Err(HandshakeError::EarlyData),
                Ok(ConnectionState::Closed) => Err(HandshakeError::ClosedDuringHandshake),
                Ok(_) => Err(HandshakeError::UnexpectedState("unknown")),
            };
            // rustls requires the discard before any further call, errors
            // included.
            self.input.drain(..discard.min(self.input.len()));
            match next? {
                HandshakeStep::Continue => {}
                HandshakeStep::Blocked => {
                    if !self.hand_over()? {
                        return Ok(Progress::NeedInput);
                    }
                }
                HandshakeStep::Convert => {
                    return self.convert().map(|e| Progress::Done(Box::new(e)))
                }
            }
        }
    }

    /// Move bytes of the next record from `queue` to rustls's input, never
    /// past the end of that record. False if there is nothing to move. A
    /// record whose header breaks a rule of [`check_record_header`] fails
    /// before rustls sees any of it.
    fn hand_over(&mut self) -> Result<bool, HandshakeError> {
        let handshaking = self.conn.as_deref().is_some_and(|c| c.is_handshaking());
        if !handshaking {
            return Ok(false);
        }
        if self.record_left == 0 {
            // Start of a record: its header says how long it is.
            let Some(header) = self.queue.get(..record::HEADER_LEN) else {
                return Ok(false);
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            check_record_header(header[0], len, self.capture.handshake_keys)?;
            self.record_left = record::HEADER_LEN + len;
        }
        let n = self.record_left.min(self.queue.len());
        if n == 0 {
            return Ok(false);
        }
        self.input.extend(self.queue.drain(..n));
        self.record_left -= n;
        Ok(true)
    }

    /// Append the fatal alert for an error rustls sent no alert for.
    ///
    /// Before the handshake keys take effect the alert is a plaintext record.
    /// After, rustls protects what it sends with the server application
    /// traffic secret (it switches to it right after the server Finished,
    /// which goes out in the same flight as the ServerHello), and has sealed
    /// nothing with it yet: it sends the session tickets, the first records
    /// under that secret, only once the client Finished is verified, and no
    /// record is handed to rustls after that. So the alert is record 0 under
    /// the captured server secret. If that secret is missing, nothing is sent.
    fn seal_own_alert(&self, alert: AlertDescription, out: &mut Vec<u8>) {
        if !self.capture.handshake_keys {
            out.extend_from_slice(&[
                ContentTypeByte::ALERT,
                3,
                3,
                0,
                2,
                2, // fatal
                alert as u8,
            ]);
            return;
        }
        let suite = self
            .conn
            .as_deref()
            .and_then(|c| c.negotiated_cipher_suite())
            .and_then(|s| Suite::from_rustls(s.suite()));
        let (Some(suite), Some(secret)) = (suite, self.capture.server.as_ref()) else {
            return;
        };
        let secret = secret.as_slice();
        if let Ok(mut session) = LeanSession::new(suite, secret, 0, secret, 0) {
            let _ = session.seal_alert(alert, out);
        }
    }

    /// Turn the finished rustls connection into an [`Established`].
    fn convert(&mut self) -> Result<Established, HandshakeError> {
        let conn = self.conn.take().ok_or(HandshakeError::AlreadyEnded)?;
        let version = conn.protocol_version();
        if version != Some(ProtocolVersion::TLSv1_3) {
            return Err(HandshakeError::NotTls13(version));
        }
        let negotiated = conn.negotiated_cipher_suite().map(|s| s.suite());
        let suite = negotiated
            .and_then(Suite::from_rustls)
            .ok_or(HandshakeError::UnsupportedSuite(negotiated))?;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
        drop(kernel);
        let capture = std::mem::take(&mut self.capture);
        let client = capture
            .client
            .as_ref()
            .ok_or(HandshakeError::SecretNotCaptured(CLIENT_LABEL))?;
        let server = capture
            .server
            .as_ref()
            .ok_or(HandshakeError::SecretNotCaptured(SERVER_LABEL))?;
        let (rx_seq, rx_keys) = &secrets.rx;
        let (tx_seq, tx_keys) = &secrets.tx;
        let rx = matching_secret(suite, client.as_slice(), rx_keys, "client")?;
        let tx = matching_secret(suite, server.as_slice(), tx_keys, "server")?;
        let session = LeanSession::new(suite, rx.as_slice(), *rx_seq, tx.as_slice(), *tx_seq)?;
        // rustls consumed whole records only; normally `input` is empty here.
        let mut leftover = std::mem::take(&mut self.input);
        leftover.append(&mut self.queue);
        // Do not carry the handshake buffer's capacity into the connection.
        if leftover.is_empty() {
            leftover = Vec::new();
        } else {
            leftover.shrink_to_fit();
        }
        Ok(Established {
            session,
            alpn,
            sni: capture.sni.clone(),
            early_plaintext: std::mem::take(&mut self.early_plaintext),
            leftover,
            peer_closed: self.peer_closed,
            resumed,
        })
    }
}

/// Outer content types of TLS records (RFC 8446 section 5.1).
struct ContentTypeByte;

impl ContentTypeByte {
    const CHANGE_CIPHER_SPEC: u8 = 20;
    const ALERT: u8 = 21;
    const HANDSHAKE: u8 = 22;
    const APPLICATION_DATA: u8 = 23;
}

/// The RFC 8446 section 5 rules on a record header that rustls does not
/// enforce itself during the handshake:
///
/// - `TLSPlaintext.length` must not exceed 2^14, `TLSCiphertext.length`
///   2^14 + 256: `record_overflow` (section 5.1, 5.2). rustls accepts records
///   up to 2^14 + 2048 bytes and refuses larger ones with `decode_error`.
/// - Once the handshake keys are in use the client sends only protected
///   records (outer type application_data) and change_cipher_spec; a
///   plaintext alert is still allowed (rustls accepts one while it has not
///   decrypted anything, in case the client failed to derive the keys). A
///   plaintext handshake record, e.g. an unencrypted Finished, is an
///   unexpected record type: `unexpected_message` (section 5). rustls would
///   try to decrypt it and answer `bad_record_mac`.
/// - An unknown content type: `unexpected_message` (section 5).
fn check_record_header(ty: u8, len: usize, handshake_keys: bool) -> Result<(), HandshakeError> {
    let limit = match ty {
        ContentTypeByte::APPLICATION_DATA => record::MAX_CIPHERTEXT,
        ContentTypeByte::CHANGE_CIPHER_SPEC | ContentTypeByte::ALERT => record::MAX_PLAINTEXT,
        ContentTypeByte::HANDSHAKE if handshake_keys => {
            return Err(HandshakeError::PlaintextAfterKeys(ty))
        }
        ContentTypeByte::HANDSHAKE => record::MAX_PLAINTEXT,
        _ => return Err(HandshakeError::UnknownContentType(ty)),
    };
    if len > limit {
        return Err(HandshakeError::RecordOverflow { ty, len, limit });
    }
    Ok(())
}

/// Encode one handshake record into `out`, growing it to what rustls needs.
fn encode(
    out: &mut Vec<u8>,
    mut enc: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), HandshakeError> {
    let start = out.len();
    let mut want = 4096;
    for _ in 0..2 {
        out.resize(start + want, 0);
        match enc(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                want = required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(HandshakeError::Encode(e.to_string()));
            }
        }
    }
    out.truncate(start);
    Err(HandshakeError::Encode("buffer size not settled".into()))
}

/// After a failure, collect the alert rustls queued so the peer learns why.
///
/// Only while rustls has records queued: it hands those out before looking
/// at the input again, and a failed connection must not parse more input
/// (rustls asserts that it sends at most one fatal alert).
fn drain_alerts(conn: &mut UnbufferedServerConnection, input: &mut Vec<u8>, out: &mut Vec<u8>) {
    for _ in 0..MAX_ALERT_DRAIN {
        if !conn.wants_write() {
            return;
        }
        let status = conn.process_tls_records(input);
        let discard = status.discard;
        let encoded = match status.state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                encode(out, |buf| enc.encode(buf)).is_ok()
            }
            _ => false,
        };
        input.drain(..discard.min(input.len()));
        if !encoded {
            return;
        }
    }
}

/// The captured secret, checked against the key and IV rustls extracted:
/// proof that the key log delivered this connection's secret.
fn matching_secret(
    suite: Suite,
    secret: &[u8],
    extracted: &ConnectionTrafficSecrets,
    side: &'static str,
) -> Result<Secret, HandshakeError> {
    let (key, iv) = match extracted {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
        _ => return Err(HandshakeError::UnsupportedSuite(None)),
    };
    let secret = Secret::from_slice(secret).ok_or(HandshakeError::SecretMismatch(side))?;
    let mut k = [0u8; 32];
    let k = k
        .get_mut(..suite.key_len())
        .ok_or(HandshakeError::SecretMismatch(side))?;
    let mut i = [0u8; 12];
    record::derive_key_iv_bytes(suite, secret.as_slice(), k, &mut i)?;
    let same = k == key && i[..] == *iv;
    k.fill(0);
    if same {
        Ok(secret)
    } else {
        Err(HandshakeError::SecretMismatch(side))
    }
}
