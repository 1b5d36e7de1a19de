//! TLS 1.3 record protection from raw traffic secrets (RFC 8446 section 5).
//!
//! A [`LeanSession`] holds, per direction, the current application traffic
//! secret and the record sequence number; nothing else. The AEAD key and IV
//! are derived from the secret (HKDF-Expand-Label, RFC 8446 section 7.3) each
//! time a record is opened or sealed, and the ring key is built on the stack
//! and dropped right after: an idle connection holds no expanded key schedule.
//!
//! Record protection: nonce = IV XOR (zero-padded big-endian sequence
//! number), additional data = the 5-byte record header, plaintext =
//! `content || inner content type || zero padding`.

use std::ops::Range;

use ring::{aead, hkdf};
use thiserror::Error;

/// Bytes in a TLS record header.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest `TLSCiphertext.length` a peer may send (2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest whole record on the wire, header included.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// AEAD tag length of every TLS 1.3 suite.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext: header, content type, tag.
pub const RECORD_OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Largest traffic secret (SHA-384).
const MAX_SECRET: usize = 48;
const NONCE_LEN: usize = 12;
const MAX_KEY: usize = 32;

/// Outer content type of every protected record, and the inner one of
/// application data.
const APPLICATION_DATA: u8 = 23;
/// The `legacy_record_version` of every TLS 1.3 record.
const LEGACY_VERSION: u16 = 0x0303;
/// Handshake message type of KeyUpdate.
const KEY_UPDATE: u8 = 24;
/// Bytes of a handshake message header: type, u24 length.
const HS_HEADER_LEN: usize = 4;
/// KeyUpdates accepted without application data in between (rustls allows
/// 32 as well): each costs an HKDF and maybe a reply, so a peer may not
/// loop on them.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;

/// TLS content types (RFC 8446 section 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ContentType {
    ChangeCipherSpec = 20,
    Alert = 21,
    Handshake = 22,
    ApplicationData = 23,
}

/// Alert descriptions this layer sends (RFC 8446 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    CloseNotify = 0,
    UnexpectedMessage = 10,
    BadRecordMac = 20,
    RecordOverflow = 22,
    IllegalParameter = 47,
    DecodeError = 50,
    InternalError = 80,
    UserCanceled = 90,
}

/// The TLS 1.3 cipher suites ring offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Suite {
    Aes128GcmSha256,
    Aes256GcmSha384,
    Chacha20Poly1305Sha256,
}

impl Suite {
    /// The IANA cipher suite id.
    pub fn iana(self) -> u16 {
        match self {
            Self::Aes128GcmSha256 => 0x1301,
            Self::Aes256GcmSha384 => 0x1302,
            Self::Chacha20Poly1305Sha256 => 0x1303,
        }
    }

    /// The suite with this IANA id, if this layer implements it.
    pub fn from_iana(id: u16) -> Option<Self> {
        match id {
            0x1301 => Some(Self::Aes128GcmSha256),
            0x1302 => Some(Self::Aes256GcmSha384),
            0x1303 => Some(Self::Chacha20Poly1305Sha256),
            _ => None,
        }
    }

    /// The suite rustls negotiated, if this layer implements it.
    pub fn from_rustls(suite: rustls::CipherSuite) -> Option<Self> {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Self::Aes128GcmSha256),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Self::Aes256GcmSha384),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => {
                Some(Self::Chacha20Poly1305Sha256)
            }
            _ => None,
        }
    }

    /// Length of the suite's hash, and so of its traffic secrets.
    pub fn hash_len(self) -> usize {
        match self {
            Self::Aes256GcmSha384 => 48,
            Self::Aes128GcmSha256 | Self::Chacha20Poly1305Sha256 => 32,
        }
    }

    /// Length of the AEAD key.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes128GcmSha256 => 16,
            Self::Aes256GcmSha384 | Self::Chacha20Poly1305Sha256 => 32,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128GcmSha256 => &aead::AES_128_GCM,
            Self::Aes256GcmSha384 => &aead::AES_256_GCM,
            Self::Chacha20Poly1305Sha256 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Self::Aes256GcmSha384 => hkdf::HKDF_SHA384,
            Self::Aes128GcmSha256 | Self::Chacha20Poly1305Sha256 => hkdf::HKDF_SHA256,
        }
    }

    /// Records sealed under one key before we move to the next one.
    ///
    /// AES-GCM: RFC 8446 section 5.5 allows 2^24.5 full-size records; rustls
    /// uses 2^24, we update at 2^23 to stay well clear. ChaCha20-Poly1305 has
    /// no practical limit, so only the sequence number bounds it: we update
    /// before the sequence number could wrap.
    pub fn records_per_key(self) -> u64 {
        match self {
            Self::Aes128GcmSha256 | Self::Aes256GcmSha384 => 1 << 23,
            Self::Chacha20Poly1305Sha256 => u64::MAX - 1,
        }
    }
}

/// Why a record could not be read or written. After any error from the read
/// side the connection must end: send [`RecordError::alert`] (if any) with
/// [`LeanSession::seal_alert`], then close.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record header: outer content type {0} (expected application_data 23)")]
    UnexpectedOuterType(u8),
    #[error("record header: legacy_record_version {0:#06x} (expected 0x0303)")]
    BadVersion(u16),
    #[error("record header: length {0} exceeds 2^14 + 256")]
    Overflow(usize),
    #[error("record header: length {0} is shorter than an AEAD tag plus content type")]
    TooShort(usize),
    #[error("record {seq}: decryption failed")]
    BadRecordMac { seq: u64 },
    #[error("record {seq}: inner plaintext of {len} bytes exceeds 2^14 + 1")]
    InnerOverflow { seq: u64, len: usize },
    #[error("record {seq}: all-zero plaintext, no inner content type")]
    NoContentType { seq: u64 },
    #[error("record {seq}: inner content type {ty} is not allowed after the handshake")]
    UnexpectedInnerType { seq: u64, ty: u8 },
    #[error("alert record of {0} bytes (must be exactly 2)")]
    BadAlertLength(usize),
    #[error("peer sent alert {description} (level {level})")]
    PeerAlert { level: u8, description: u8 },
    #[error("empty handshake record")]
    EmptyHandshake,
    #[error("post-handshake message type {0} is not accepted from a client")]
    UnexpectedHandshake(u8),
    #[error("KeyUpdate with body length {0} (must be 1)")]
    BadKeyUpdateLength(u32),
    #[error("KeyUpdate with request_update {0} (must be 0 or 1)")]
    BadKeyUpdateRequest(u8),
    #[error("KeyUpdate not at the end of its record")]
    KeyUpdateNotAtRecordEnd,
    #[error("more than {MAX_KEY_UPDATES_IN_A_ROW} KeyUpdates without application data")]
    TooManyKeyUpdates,
    #[error("record of type {0} inside a fragmented handshake message")]
    HandshakeInterleaved(u8),
    #[error("receive sequence number exhausted")]
    RxSeqExhausted,
    #[error("transmit sequence number exhausted")]
    TxSeqExhausted,
    #[error("plaintext of {0} bytes does not fit in one record")]
    PlaintextTooLong(usize),
    #[error("traffic secret of {got} bytes; the suite needs {want}")]
    SecretLength { got: usize, want: usize },
    #[error("{0} side is closed")]
    Closed(&'static str),
    #[error("crypto provider failure in {0}")]
    Crypto(&'static str),
}

impl RecordError {
    /// The alert to send before closing, if one should be sent.
    pub fn alert(&self) -> Option<AlertDescription> {
        use AlertDescription as A;
        match self {
            Self::UnexpectedOuterType(_)
            | Self::NoContentType { .. }
            | Self::UnexpectedInnerType { .. }
            | Self::EmptyHandshake
            | Self::UnexpectedHandshake(_)
            | Self::KeyUpdateNotAtRecordEnd
            | Self::TooManyKeyUpdates
            | Self::HandshakeInterleaved(_) => Some(A::UnexpectedMessage),
            Self::BadVersion(_)
            | Self::TooShort(_)
            | Self::BadAlertLength(_)
            | Self::BadKeyUpdateLength(_) => Some(A::DecodeError),
            Self::Overflow(_) | Self::InnerOverflow { .. } => Some(A::RecordOverflow),
            Self::BadRecordMac { .. } => Some(A::BadRecordMac),
            Self::BadKeyUpdateRequest(_) => Some(A::IllegalParameter),
            Self::RxSeqExhausted
            | Self::TxSeqExhausted
            | Self::PlaintextTooLong(_)
            | Self::SecretLength { .. }
            | Self::Crypto(_) => Some(A::InternalError),
            Self::PeerAlert { .. } | Self::Closed(_) => None,
        }
    }
}

/// Checks the start of a byte stream for a record header.
///
/// Returns the length of the first whole record (header included) once it is
/// all there, `None` while more bytes are needed. Fields are checked as soon as
/// they arrive, so a bad header fails on its first bytes.
pub fn check_header(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    if ty != APPLICATION_DATA {
        return Err(RecordError::UnexpectedOuterType(ty));
    }
    if buf.len() < 3 {
        return Ok(None);
    }
    let version = u16::from_be_bytes([buf[1], buf[2]]);
    if version != LEGACY_VERSION {
        return Err(RecordError::BadVersion(version));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow(len));
    }
    if len < TAG_LEN + 1 {
        return Err(RecordError::TooShort(len));
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

/// Splits a received byte stream into whole records, in place.
///
/// It holds no bytes: whatever is left after the last whole record
/// ([`RecordReader::remainder`]) is the caller's to keep until more arrives.
#[derive(Debug)]
pub struct RecordReader<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> RecordReader<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The next whole record (header included), `None` if the rest is
    /// incomplete. After an error the stream is unusable.
    pub fn next_record(&mut self) -> Result<Option<&mut [u8]>, RecordError> {
        let rest = &mut self.buf[self.pos..];
        match check_header(rest)? {
            None => Ok(None),
            Some(len) => {
                self.pos += len;
                Ok(Some(&mut rest[..len]))
            }
        }
    }

    /// Bytes taken by the records returned so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// Bytes after the last whole record returned.
    pub fn remainder(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
}

/// A decrypted record: its inner content type and where its content lies
/// inside the record buffer that was passed to [`LeanSession::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    pub plaintext: Range<usize>,
}

/// What one received record meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Application data at this range of the record (possibly empty).
    Data(Range<usize>),
    /// The peer sent close_notify: clean end of its stream.
    CloseNotify,
    /// The peer updated its keys; if it asked us to, our own KeyUpdate was
    /// appended to the output.
    KeyUpdate { requested: bool },
    /// Nothing for the caller (user_canceled, part of a handshake message).
    Nothing,
}

/// Whether the peer's stream is still open after [`LeanSession::read_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStatus {
    Open,
    /// close_notify received; later bytes were ignored.
    PeerClosed,
}

/// One direction: current traffic secret and next sequence number.
#[derive(Clone)]
struct Direction {
    secret: [u8; MAX_SECRET],
    seq: u64,
}

impl Direction {
    fn new(suite: Suite, secret: &[u8], seq: u64) -> Result<Self, RecordError> {
        let want = suite.hash_len();
        if secret.len() != want {
            return Err(RecordError::SecretLength {
                got: secret.len(),
                want,
            });
        }
        let mut s = [0u8; MAX_SECRET];
        s[..want].copy_from_slice(secret);
        Ok(Self { secret: s, seq })
    }

    fn secret(&self, suite: Suite) -> &[u8] {
        &self.secret[..suite.hash_len()]
    }

    /// The AEAD key and the nonce of the current sequence number.
    fn key_nonce(&self, suite: Suite) -> Result<(aead::LessSafeKey, aead::Nonce), RecordError> {
        let (key, iv) = derive_key_iv(suite, self.secret(suite))?;
        let mut nonce = iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        Ok((key, aead::Nonce::assume_unique_for_key(nonce)))
    }

    /// Move to the next traffic secret (RFC 8446 section 7.2).
    fn advance(&mut self, suite: Suite) -> Result<(), RecordError> {
        let len = suite.hash_len();
        let mut next = [0u8; MAX_SECRET];
        expand_label(suite, &self.secret[..len], b"traffic upd", &mut next[..len])?;
        self.secret = next;
        next.fill(0);
        self.seq = 0;
        Ok(())
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.secret.fill(0);
        std::hint::black_box(&self.secret);
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 section 7.1).
pub fn expand_label(
    suite: Suite,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> Result<(), RecordError> {
    const PREFIX: &[u8] = b"tls13 ";
    let (Ok(out_len), Ok(label_len)) = (
        u16::try_from(out.len()),
        u8::try_from(PREFIX.len() + label.len()),
    ) else {
        return Err(RecordError::Crypto("HKDF-Expand-Label lengths"));
    };
    let out_len = out_len.to_be_bytes();
    let label_len = [label_len];
    let context_len = [0u8];
    let info: [&[u8]; 5] = [&out_len, &label_len, PREFIX, label, &context_len];
    hkdf::Prk::new_less_safe(suite.hkdf(), secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| RecordError::Crypto("HKDF-Expand-Label"))
}

/// The record key and IV of a traffic secret (RFC 8446 section 7.3).
pub fn derive_key_iv(
    suite: Suite,
    secret: &[u8],
) -> Result<(aead::LessSafeKey, [u8; NONCE_LEN]), RecordError> {
    let mut key = [0u8; MAX_KEY];
    let key = &mut key[..suite.key_len()];
    let mut iv = [0u8; NONCE_LEN];
    let r = expand_label(suite, secret, b"key", key)
        .and_then(|()| expand_label(suite, secret, b"iv", &mut iv))
        .and_then(|()| {
            aead::UnboundKey::new(suite.aead(), key)
                .map_err(|_| RecordError::Crypto("AEAD key construction"))
        });
    key.fill(0);
    Ok((aead::LessSafeKey::new(r?), iv))
}

/// Raw key and IV bytes of a traffic secret, to compare with what rustls
/// extracted or to hand to kernel TLS.
pub fn derive_key_iv_bytes(
    suite: Suite,
    secret: &[u8],
    key: &mut [u8],
    iv: &mut [u8; NONCE_LEN],
) -> Result<(), RecordError> {
    if key.len() != suite.key_len() {
        return Err(RecordError::Crypto("key buffer length"));
    }
    expand_label(suite, secret, b"key", key)?;
    expand_label(suite, secret, b"iv", iv)
}

const RX_CLOSED: u8 = 1;
const TX_CLOSED: u8 = 2;
const RX_FAILED: u8 = 4;

/// Established TLS 1.3 session state: everything the record layer keeps.
///
/// Server side: rx is the client's traffic, tx is ours.
pub struct LeanSession {
    rx: Direction,
    tx: Direction,
    suite: Suite,
    flags: u8,
    /// Bytes of a post-handshake message split across records (only a
    /// KeyUpdate is accepted, so at most 4 are ever kept).
    hs_len: u8,
    hs_buf: [u8; HS_HEADER_LEN],
    /// KeyUpdates received since the last application data.
    key_updates_in_a_row: u8,
}

impl std::fmt::Debug for LeanSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanSession")
            .field("suite", &self.suite)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl LeanSession {
    /// A session from the current traffic secrets and next sequence numbers.
    pub fn new(
        suite: Suite,
        rx_secret: &[u8],
        rx_seq: u64,
        tx_secret: &[u8],
        tx_seq: u64,
    ) -> Result<Self, RecordError> {
        Ok(Self {
            rx: Direction::new(suite, rx_secret, rx_seq)?,
            tx: Direction::new(suite, tx_secret, tx_seq)?,
            suite,
            flags: 0,
            hs_len: 0,
            hs_buf: [0; HS_HEADER_LEN],
            key_updates_in_a_row: 0,
        })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Whether this state can be carried to another process: no KeyUpdate
    /// half received, nothing failed or closed.
    pub fn transferable(&self) -> bool {
        self.hs_len == 0 && self.flags == 0
    }

    /// The current traffic secrets and next sequence numbers, for a live
    /// hand-over: `(suite, rx_secret, rx_seq, tx_secret, tx_seq)`.
    /// [`LeanSession::new`] rebuilds the same session from them.
    pub fn export(&self) -> (Suite, Vec<u8>, u64, Vec<u8>, u64) {
        let n = self.suite.hash_len();
        (
            self.suite,
            self.rx.secret[..n].to_vec(),
            self.rx.seq,
            self.tx.secret[..n].to_vec(),
            self.tx.seq,
        )
    }

    /// Sequence number of the next record we will open.
    pub fn rx_seq(&self) -> u64 {
        self.rx.seq
    }

    /// Sequence number of the next record we will seal.
    pub fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// Whether the peer sent close_notify.
    pub fn peer_closed(&self) -> bool {
        self.flags & RX_CLOSED != 0
    }

    /// Whether we sent an alert (close_notify or fatal): nothing more can be
    /// sealed.
    pub fn tx_closed(&self) -> bool {
        self.flags & TX_CLOSED != 0
    }

    /// Decrypt one whole record (header included) in place.
    ///
    /// Checks the header, removes the padding and finds the inner content
    /// type; does not interpret it (see [`LeanSession::read_record`]).
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        if self.flags & RX_FAILED != 0 {
            return Err(RecordError::Closed("receive"));
        }
        let r = self.open_inner(record);
        if r.is_err() {
            self.flags |= RX_FAILED;
        }
        r
    }

    fn open_inner(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        if self.flags & RX_CLOSED != 0 {
            return Err(RecordError::Closed("receive"));
        }
        match check_header(record)? {
            Some(len) if len == record.len() => {}
            // A caller bug, not the peer's: the record was not split by
            // check_header or RecordReader.
            _ => return Err(RecordError::TooShort(record.len())),
        }
        let seq = self.rx.seq;
        if seq == u64::MAX {
            return Err(RecordError::RxSeqExhausted);
        }
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let mut aad = [0u8; HEADER_LEN];
        aad.copy_from_slice(header);
        let (key, nonce) = self.rx.key_nonce(self.suite)?;
        let inner = key
            .open_in_place(nonce, aead::Aad::from(aad), body)
            .map_err(|_| RecordError::BadRecordMac { seq })?;
        self.rx.seq += 1;
        if inner.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::InnerOverflow {
                seq,
                len: inner.len(),
            });
        }
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType { seq });
        };
        Ok(Opened {
            content_type: inner[type_at],
            plaintext: HEADER_LEN..HEADER_LEN + type_at,
        })
    }

    /// Decrypt one whole record and act on it: application data is returned,
    /// close_notify ends the peer's stream, a KeyUpdate moves the receive key
    /// on (and, if the peer asked, our KeyUpdate is appended to `out`).
    pub fn read_record(
        &mut self,
        record: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<Incoming, RecordError> {
        let opened = self.open(record)?;
        let r = self.interpret(opened, record, out);
        if r.is_err() {
            self.flags |= RX_FAILED;
        }
        r
    }

    fn interpret(
        &mut self,
        opened: Opened,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Incoming, RecordError> {
        let seq = self.rx.seq - 1;
        let content = &record[opened.plaintext.clone()];
        let ty = opened.content_type;
        if self.hs_len != 0 && ty != ContentType::Handshake as u8 {
            return Err(RecordError::HandshakeInterleaved(ty));
        }
        match ty {
            t if t == ContentType::ApplicationData as u8 => {
                self.key_updates_in_a_row = 0;
                Ok(Incoming::Data(opened.plaintext))
            }
            t if t == ContentType::Alert as u8 => {
                let &[level, description] = content else {
                    return Err(RecordError::BadAlertLength(content.len()));
                };
                if description == AlertDescription::CloseNotify as u8 {
                    self.flags |= RX_CLOSED;
                    Ok(Incoming::CloseNotify)
                } else if description == AlertDescription::UserCanceled as u8 {
                    // RFC 8446 section 6.1: followed by close_notify.
                    Ok(Incoming::Nothing)
                } else {
                    Err(RecordError::PeerAlert { level, description })
                }
            }
            t if t == ContentType::Handshake as u8 => self.handshake(content, out),
            _ => Err(RecordError::UnexpectedInnerType { seq, ty }),
        }
    }

    /// Post-handshake handshake messages: only KeyUpdate is accepted from a
    /// client (no post-handshake authentication was requested, and
    /// NewSessionTicket only goes from server to client).
    fn handshake(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<Incoming, RecordError> {
        if data.is_empty() {
            return Err(RecordError::EmptyHandshake);
        }
        let mut result = Incoming::Nothing;
        while !data.is_empty() {
            // The 4-byte message header, possibly split across records.
            let have = usize::from(self.hs_len);
            let take = (HS_HEADER_LEN - have).min(data.len());
            self.hs_buf[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            let have = have + take;
            if self.hs_buf[0] != KEY_UPDATE {
                return Err(RecordError::UnexpectedHandshake(self.hs_buf[0]));
            }
            if have == HS_HEADER_LEN {
                let len = u32::from_be_bytes([0, self.hs_buf[1], self.hs_buf[2], self.hs_buf[3]]);
                if len != 1 {
                    return Err(RecordError::BadKeyUpdateLength(len));
                }
            }
            // `have` <= 4 fits in a u8.
            self.hs_len = have as u8;
            let Some((&request, rest)) = data.split_first() else {
                break;
            };
            data = rest;
            self.hs_len = 0;
            // RFC 8446 section 5.1: a KeyUpdate must end its record.
            if !data.is_empty() {
                return Err(RecordError::KeyUpdateNotAtRecordEnd);
            }
            let requested = match request {
                0 => false,
                1 => true,
                v => return Err(RecordError::BadKeyUpdateRequest(v)),
            };
            self.key_updates_in_a_row = self.key_updates_in_a_row.saturating_add(1);
            if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                return Err(RecordError::TooManyKeyUpdates);
            }
            self.rx.advance(self.suite)?;
            if requested && !self.tx_closed() {
                self.update_tx_keys(false, out)?;
            }
            result = Incoming::KeyUpdate { requested };
        }
        Ok(result)
    }

    /// Read a chunk of the byte stream: decrypt every whole record in
    /// `pending` + `input`, hand application data to `on_data`, append any
    /// reply (our KeyUpdate) to `out`, and keep an incomplete trailing record
    /// in `pending`.
    ///
    /// `pending` is the caller's per-connection partial-record storage. When
    /// it is empty, records are decrypted in place in `input` and `pending`
    /// only receives the trailing incomplete bytes; once it empties again its
    /// allocation is released, so an idle connection holds none.
    pub fn read_stream(
        &mut self,
        pending: &mut Vec<u8>,
        input: &mut [u8],
        out: &mut Vec<u8>,
        on_data: impl FnMut(&[u8]),
    ) -> Result<StreamStatus, RecordError> {
        if self.flags & RX_FAILED != 0 {
            return Err(RecordError::Closed("receive"));
        }
        let r = self.read_stream_inner(pending, input, out, on_data);
        if r.is_err() {
            self.flags |= RX_FAILED;
            *pending = Vec::new();
        }
        r
    }

    fn read_stream_inner(
        &mut self,
        pending: &mut Vec<u8>,
        input: &mut [u8],
        out: &mut Vec<u8>,
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<StreamStatus, RecordError> {
        if pending.is_empty() {
            let (consumed, status) = self.read_records(input, out, &mut on_data)?;
            if status == StreamStatus::Open {
                pending.extend_from_slice(&input[consumed..]);
            }
            return Ok(status);
        }
        pending.extend_from_slice(input);
        let (consumed, status) = self.read_records(pending, out, &mut on_data)?;
        match status {
            StreamStatus::Open => {
                pending.drain(..consumed);
            }
            StreamStatus::PeerClosed => pending.clear(),
        }
        if pending.is_empty() {
            *pending = Vec::new();
        }
        Ok(status)
    }

    fn read_records(
        &mut self,
        buf: &mut [u8],
        out: &mut Vec<u8>,
        on_data: &mut impl FnMut(&[u8]),
    ) -> Result<(usize, StreamStatus), RecordError> {
        if self.peer_closed() {
            return Ok((buf.len(), StreamStatus::PeerClosed));
        }
        let mut reader = RecordReader::new(buf);
        while let Some(record) = reader.next_record()? {
            match self.read_record(record, out)? {
                Incoming::Data(range) => on_data(&record[range]),
                Incoming::CloseNotify => return Ok((reader.consumed(), StreamStatus::PeerClosed)),
                Incoming::KeyUpdate { .. } | Incoming::Nothing => {}
            }
        }
        Ok((reader.consumed(), StreamStatus::Open))
    }

    /// Seal one record of application data (at most 2^14 bytes; empty is
    /// allowed). Moves to the next key first when the current one has
    /// protected its share of records.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.before_send(out)?;
        self.seal_record(ContentType::ApplicationData, plaintext, out)
    }

    /// Seal application data of any length, as many records as needed.
    pub fn seal_app_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.reserve(data.len() + data.len().div_ceil(MAX_PLAINTEXT).max(1) * RECORD_OVERHEAD);
        if data.is_empty() {
            return self.seal(data, out);
        }
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal(chunk, out)?;
        }
        Ok(())
    }

    /// Seal an alert; nothing can be sealed after it. Both close_notify and
    /// the fatal alerts end our side. A second alert is silently dropped.
    pub fn seal_alert(
        &mut self,
        description: AlertDescription,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.tx_closed() {
            return Ok(());
        }
        let level = match description {
            AlertDescription::CloseNotify | AlertDescription::UserCanceled => 1,
            _ => 2,
        };
        let r = self.seal_record(ContentType::Alert, &[level, description as u8], out);
        self.flags |= TX_CLOSED;
        r
    }

    /// Send close_notify.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_alert(AlertDescription::CloseNotify, out)
    }

    /// Send a KeyUpdate under the current key, then move our sending key to
    /// the next secret. `request_peer` asks the peer to update its key too.
    pub fn update_tx_keys(
        &mut self,
        request_peer: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.tx_closed() {
            return Err(RecordError::Closed("transmit"));
        }
        let msg = [KEY_UPDATE, 0, 0, 1, u8::from(request_peer)];
        self.seal_record(ContentType::Handshake, &msg, out)?;
        self.tx.advance(self.suite)
    }

    fn before_send(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.tx_closed() {
            return Err(RecordError::Closed("transmit"));
        }
        if self.tx.seq >= self.suite.records_per_key() {
            self.update_tx_keys(false, out)?;
        }
        Ok(())
    }

    /// Seal one record with the given inner content type; no policy.
    fn seal_record(
        &mut self,
        ty: ContentType,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.seal_inner(plaintext, ty as u8, 0, out)
    }

    /// Seal `content || ty || zeros(padding)`.
    fn seal_inner(
        &mut self,
        content: &[u8],
        ty: u8,
        padding: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let inner_len = content.len() + 1 + padding;
        if inner_len > MAX_PLAINTEXT + 1 {
            return Err(RecordError::PlaintextTooLong(content.len()));
        }
        let seq = self.tx.seq;
        if seq == u64::MAX {
            return Err(RecordError::TxSeqExhausted);
        }
        let (key, nonce) = self.tx.key_nonce(self.suite)?;
        let len = inner_len + TAG_LEN;
        // len <= 2^14 + 17 fits in a u16.
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, (len & 0xff) as u8];
        let start = out.len();
        out.reserve(HEADER_LEN + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(content);
        out.push(ty);
        out.resize(out.len() + padding, 0);
        match key.seal_in_place_separate_tag(
            nonce,
            aead::Aad::from(header),
            &mut out[start + HEADER_LEN..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                self.tx.seq += 1;
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(RecordError::Crypto("AEAD seal"))
            }
        }
    }

    /// The same session seen from the client: rx and tx swapped. For tests
    /// that play the peer.
    #[cfg(test)]
    pub(crate) fn mirror(&self) -> Self {
        Self {
            rx: self.tx.clone(),
            tx: self.rx.clone(),
            suite: self.suite,
            flags: 0,
            hs_len: 0,
            hs_buf: [0; HS_HEADER_LEN],
            key_updates_in_a_row: 0,
        }
    }

    /// Seal arbitrary inner plaintext with padding, for tests.
    #[cfg(test)]
    pub(crate) fn seal_raw(
        &mut self,
        content: &[u8],
        ty: u8,
        padding: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.seal_inner(content, ty, padding, out)
    }

    /// Current secrets, for tests.
    #[cfg(test)]
    pub(crate) fn secrets(&self) -> (&[u8], &[u8]) {
        (self.rx.secret(self.suite), self.tx.secret(self.suite))
    }

    #[cfg(test)]
    pub(crate) fn set_seqs(&mut self, rx: u64, tx: u64) {
        self.rx.seq = rx;
        self.tx.seq = tx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        ::hex::decode(s).unwrap()
    }

    const SUITES: [Suite; 3] = [
        Suite::Aes128GcmSha256,
        Suite::Aes256GcmSha384,
        Suite::Chacha20Poly1305Sha256,
    ];

    fn pair(suite: Suite) -> (LeanSession, LeanSession) {
        let n = suite.hash_len();
        let c: Vec<u8> = (0..n as u8).collect();
        let s: Vec<u8> = (0..n as u8).map(|b| b ^ 0x5a).collect();
        let server = LeanSession::new(suite, &c, 0, &s, 0).unwrap();
        let client = server.mirror();
        (server, client)
    }

    /// Everything `session` reads from `wire`, in one call.
    fn read_all(
        session: &mut LeanSession,
        wire: &mut [u8],
    ) -> (Result<StreamStatus, RecordError>, Vec<u8>, Vec<u8>) {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        let mut data = Vec::new();
        let r = session.read_stream(&mut pending, wire, &mut out, |d| data.extend_from_slice(d));
        (r, data, out)
    }

    #[test]
    fn rfc8448_application_key_and_iv() {
        // RFC 8448 section 3, "{server} derive write traffic keys for
        // application data".
        let secret = hex("a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32
             82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43");
        let mut key = [0u8; 16];
        let mut iv = [0u8; 12];
        derive_key_iv_bytes(Suite::Aes128GcmSha256, &secret, &mut key, &mut iv).unwrap();
        assert_eq!(
            key.to_vec(),
            hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
        );
        assert_eq!(iv.to_vec(), hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
    }

    #[test]
    fn session_is_small_and_inline() {
        let size = std::mem::size_of::<LeanSession>();
        assert!(size <= 128, "LeanSession is {size} bytes");
    }

    #[test]
    fn round_trip_every_suite_with_padding_and_empty_records() {
        for suite in SUITES {
            let (mut server, mut client) = pair(suite);
            let mut wire = Vec::new();
            server.seal_app_data(b"hello", &mut wire).unwrap();
            server.seal(b"", &mut wire).unwrap();
            server.seal_app_data(&[7u8; 40_000], &mut wire).unwrap();
            let (r, data, _) = read_all(&mut client, &mut wire);
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(data.len(), 5 + 40_000);
            assert_eq!(client.rx_seq(), 2 + 3);

            // Padded records from the client, including a zero-length one.
            let mut wire = Vec::new();
            client.seal_raw(b"abc", 23, 100, &mut wire).unwrap();
            client.seal_raw(b"", 23, 7, &mut wire).unwrap();
            client
                .seal_raw(&[1; MAX_PLAINTEXT], 23, 0, &mut wire)
                .unwrap();
            let (r, data, _) = read_all(&mut server, &mut wire);
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(data.len(), 3 + MAX_PLAINTEXT);
        }
    }

    #[test]
    fn split_byte_by_byte_and_many_in_one_read() {
        let (mut server, mut client) = pair(Suite::Aes128GcmSha256);
        let mut wire = Vec::new();
        for i in 0..10u8 {
            client.seal_app_data(&[i; 300], &mut wire).unwrap();
        }
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 300]).collect();

        let mut pending = Vec::new();
        let mut out = Vec::new();
        let mut data = Vec::new();
        for b in wire.clone() {
            let r = server.read_stream(&mut pending, &mut [b], &mut out, |d| {
                data.extend_from_slice(d)
            });
            assert_eq!(r, Ok(StreamStatus::Open));
        }
        assert_eq!(data, expected);
        assert!(pending.is_empty());
        assert_eq!(pending.capacity(), 0, "idle connection keeps no buffer");

        // Odd-sized chunks straddling record boundaries.
        let mut wire = Vec::new();
        for i in 0..10u8 {
            client.seal_app_data(&[i; 300], &mut wire).unwrap();
        }
        data.clear();
        for chunk in wire.chunks_mut(333) {
            server
                .read_stream(&mut pending, chunk, &mut out, |d| data.extend_from_slice(d))
                .unwrap();
        }
        assert_eq!(data, expected);
        assert_eq!(pending.capacity(), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn close_notify_is_clean_eof_and_ignores_the_rest() {
        let (mut server, mut client) = pair(Suite::Chacha20Poly1305Sha256);
        let mut wire = Vec::new();
        client.seal_app_data(b"bye", &mut wire).unwrap();
        client.seal_close_notify(&mut wire).unwrap();
        wire.extend_from_slice(b"garbage after close_notify");
        let (r, data, _) = read_all(&mut server, &mut wire);
        assert_eq!(r, Ok(StreamStatus::PeerClosed));
        assert_eq!(data, b"bye");
        assert!(server.peer_closed());
        // We can still answer with our own close_notify.
        let mut out = Vec::new();
        server.seal_close_notify(&mut out).unwrap();
        let (r, _, _) = read_all(&mut client, &mut out);
        assert_eq!(r, Ok(StreamStatus::PeerClosed));
        assert!(server.seal(b"x", &mut out).is_err());
    }

    #[test]
    fn key_update_requested_is_answered_under_the_old_key() {
        for suite in SUITES {
            let (mut server, mut client) = pair(suite);
            let old_tx = server.secrets().1.to_vec();
            let mut wire = Vec::new();
            client.update_tx_keys(true, &mut wire).unwrap();
            client.seal_app_data(b"after", &mut wire).unwrap();
            let (r, data, mut reply) = read_all(&mut server, &mut wire);
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(data, b"after");
            assert_eq!(server.rx_seq(), 1);
            assert_eq!(server.tx_seq(), 0);
            assert_ne!(server.secrets().1, &old_tx[..]);
            server.seal_app_data(b"new key", &mut reply).unwrap();
            let mut out = Vec::new();
            let mut pending = Vec::new();
            let mut got = Vec::new();
            let r = client.read_stream(&mut pending, &mut reply, &mut out, |d| {
                got.extend_from_slice(d)
            });
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(got, b"new key");
            assert!(out.is_empty(), "update_not_requested needs no answer");
        }
    }

    #[test]
    fn key_update_split_across_records() {
        let (mut server, mut client) = pair(Suite::Aes128GcmSha256);
        let mut wire = Vec::new();
        client.seal_raw(&[24, 0], 22, 0, &mut wire).unwrap();
        client.seal_raw(&[0, 1, 0], 22, 3, &mut wire).unwrap();
        client.tx.advance(Suite::Aes128GcmSha256).unwrap();
        client.seal_app_data(b"ok", &mut wire).unwrap();
        let (r, data, out) = read_all(&mut server, &mut wire);
        assert_eq!(r, Ok(StreamStatus::Open));
        assert_eq!(data, b"ok");
        assert!(out.is_empty());
    }

    /// A record whose inner plaintext is `inner_len` bytes, past what
    /// `seal` allows.
    fn seal_oversized(client: &mut LeanSession, inner_len: usize, out: &mut Vec<u8>) {
        let suite = client.suite;
        let (key, nonce) = client.tx.key_nonce(suite).unwrap();
        let len = inner_len + TAG_LEN;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut body = vec![23u8; inner_len];
        let tag = key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut body)
            .unwrap();
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        client.tx.seq += 1;
    }

    fn expect_error(wire: &mut [u8], server: &mut LeanSession, alert: AlertDescription) {
        let (r, _, _) = read_all(server, wire);
        let err = r.expect_err("must fail");
        assert_eq!(err.alert(), Some(alert), "{err}");
    }

    #[test]
    fn malformed_records_map_to_the_right_alert() {
        use AlertDescription as A;
        let suite = Suite::Aes256GcmSha384;
        type Make = Box<dyn Fn(&mut LeanSession, &mut Vec<u8>)>;
        let cases: Vec<(Make, A)> = vec![
            (
                Box::new(|c, w| {
                    c.seal_app_data(b"x", w).unwrap();
                    w[7] ^= 1;
                }),
                A::BadRecordMac,
            ),
            (
                Box::new(|c, w| {
                    c.seal_app_data(b"x", w).unwrap();
                    let n = w.len();
                    w[n - 1] ^= 0x80;
                }),
                A::BadRecordMac,
            ),
            (
                Box::new(|_, w| w.extend_from_slice(&[23, 3, 3, 0x41, 0x01])),
                A::RecordOverflow,
            ),
            (
                Box::new(|_, w| w.extend_from_slice(&[22, 3, 3, 0, 20])),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|_, w| w.extend_from_slice(&[21, 3, 3, 0, 2, 1, 0])),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|_, w| w.extend_from_slice(&[23, 3, 1, 0, 20])),
                A::DecodeError,
            ),
            (
                Box::new(|_, w| w.extend_from_slice(&[23, 3, 3, 0, 16])),
                A::DecodeError,
            ),
            (
                Box::new(|c, w| c.seal_raw(b"", 0, 10, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| c.seal_raw(&[0; 10], 0, 0, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| c.seal_raw(b"x", 20, 0, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| c.seal_raw(&[1, 0, 3], 21, 0, w).unwrap()),
                A::DecodeError,
            ),
            (
                // NewSessionTicket from a client.
                Box::new(|c, w| c.seal_raw(&[4, 0, 0, 1, 0], 22, 0, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| c.seal_raw(&[24, 0, 0, 2, 0, 0], 22, 0, w).unwrap()),
                A::DecodeError,
            ),
            (
                Box::new(|c, w| c.seal_raw(&[24, 0, 0, 1, 2], 22, 0, w).unwrap()),
                A::IllegalParameter,
            ),
            (
                Box::new(|c, w| c.seal_raw(&[24, 0, 0, 1, 0, 24], 22, 0, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| c.seal_raw(b"", 22, 4, w).unwrap()),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| {
                    c.seal_raw(&[24, 0], 22, 0, w).unwrap();
                    c.seal_app_data(b"interleaved", w).unwrap();
                }),
                A::UnexpectedMessage,
            ),
            (
                Box::new(|c, w| seal_oversized(c, MAX_PLAINTEXT + 2, w)),
                A::RecordOverflow,
            ),
        ];
        for (i, (make, alert)) in cases.into_iter().enumerate() {
            let (mut server, mut client) = pair(suite);
            let mut wire = Vec::new();
            make(&mut client, &mut wire);
            eprintln!("case {i}");
            expect_error(&mut wire, &mut server, alert);
            // The session refuses to read more after an error.
            let mut more = Vec::new();
            client.seal_app_data(b"more", &mut more).unwrap();
            assert!(read_all(&mut server, &mut more).0.is_err());
            // And can still send the alert.
            let mut out = Vec::new();
            server.seal_alert(alert, &mut out).unwrap();
            assert!(!out.is_empty());
        }
    }

    /// RFC 8446 section 5.4 and 6 rules on the inner plaintext, every suite:
    /// zero-length application data (padded or not) is accepted and ignored,
    /// content + padding may total exactly 2^14 bytes, one more is
    /// `record_overflow`, an all-zero inner plaintext is `unexpected_message`,
    /// an empty alert (padded or not) is `decode_error`.
    #[test]
    fn rfc8446_inner_plaintext_rules() {
        use AlertDescription as A;
        for suite in SUITES {
            let (mut server, mut client) = pair(suite);
            let mut wire = Vec::new();
            client.seal_raw(b"", 23, 0, &mut wire).unwrap();
            client.seal_raw(b"", 23, 1, &mut wire).unwrap();
            client.seal_raw(b"", 23, MAX_PLAINTEXT, &mut wire).unwrap();
            client
                .seal_raw(b"hello", 23, MAX_PLAINTEXT - 5, &mut wire)
                .unwrap();
            let (r, data, out) = read_all(&mut server, &mut wire);
            assert_eq!(
                (r, data, out),
                (Ok(StreamStatus::Open), b"hello".to_vec(), vec![])
            );
            assert_eq!(server.rx_seq(), 4);

            type Make = fn(&mut LeanSession, &mut Vec<u8>);
            let cases: [(Make, A); 5] = [
                (
                    |c, w| seal_oversized(c, MAX_PLAINTEXT + 2, w),
                    A::RecordOverflow,
                ),
                (
                    |c, w| c.seal_raw(&[0; 20], 0, 0, w).unwrap(),
                    A::UnexpectedMessage,
                ),
                (
                    |c, w| c.seal_raw(b"", 0, 0, w).unwrap(),
                    A::UnexpectedMessage,
                ),
                (|c, w| c.seal_raw(b"", 21, 0, w).unwrap(), A::DecodeError),
                (|c, w| c.seal_raw(b"", 21, 9, w).unwrap(), A::DecodeError),
            ];
            for (make, alert) in cases {
                let (mut server, mut client) = pair(suite);
                let mut wire = Vec::new();
                make(&mut client, &mut wire);
                expect_error(&mut wire, &mut server, alert);
            }
        }
    }

    #[test]
    fn peer_alerts_end_the_stream_without_a_reply() {
        let (mut server, mut client) = pair(Suite::Aes128GcmSha256);
        let mut wire = Vec::new();
        client.seal_raw(&[1, 90], 21, 0, &mut wire).unwrap(); // user_canceled
        client
            .seal_alert(AlertDescription::InternalError, &mut wire)
            .unwrap();
        let (r, _, _) = read_all(&mut server, &mut wire);
        let err = r.unwrap_err();
        assert_eq!(
            err,
            RecordError::PeerAlert {
                level: 2,
                description: 80
            }
        );
        assert_eq!(err.alert(), None);
    }

    #[test]
    fn confidentiality_limit_moves_to_the_next_key_first() {
        for suite in [Suite::Aes128GcmSha256, Suite::Aes256GcmSha384] {
            let (mut server, mut client) = pair(suite);
            let limit = suite.records_per_key();
            server.set_seqs(0, limit - 1);
            client.set_seqs(limit - 1, 0);
            let mut wire = Vec::new();
            server
                .seal_app_data(b"last under key 0", &mut wire)
                .unwrap();
            assert_eq!(server.tx_seq(), limit);
            server
                .seal_app_data(b"first under key 1", &mut wire)
                .unwrap();
            // KeyUpdate at seq `limit`, then data at seq 0 of the next key.
            assert_eq!(server.tx_seq(), 1);
            let (r, data, out) = read_all(&mut client, &mut wire);
            assert_eq!(r, Ok(StreamStatus::Open));
            assert_eq!(data, b"last under key 0first under key 1");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn sequence_number_limits() {
        let suite = Suite::Chacha20Poly1305Sha256;
        // Sending: we move to a new key before the sequence number can wrap.
        let (mut server, mut client) = pair(suite);
        server.set_seqs(0, u64::MAX - 1);
        client.set_seqs(u64::MAX - 1, 0);
        let mut wire = Vec::new();
        server.seal_app_data(b"x", &mut wire).unwrap();
        assert_eq!(server.tx_seq(), 1);
        let (r, data, _) = read_all(&mut client, &mut wire);
        assert_eq!((r, data), (Ok(StreamStatus::Open), b"x".to_vec()));

        // Receiving: a peer that does not update its key is cut off.
        let (mut server, mut client) = pair(suite);
        server.set_seqs(u64::MAX - 1, 0);
        client.set_seqs(0, u64::MAX - 1);
        let mut wire = Vec::new();
        client.seal_raw(b"a", 23, 0, &mut wire).unwrap();
        client.set_seqs(0, u64::MAX);
        client.tx.seq = u64::MAX;
        assert_eq!(
            client.seal_raw(b"b", 23, 0, &mut wire),
            Err(RecordError::TxSeqExhausted)
        );
        let (r, data, _) = read_all(&mut server, &mut wire);
        assert_eq!((r, data), (Ok(StreamStatus::Open), b"a".to_vec()));
        let mut rec = vec![23, 3, 3, 0, 17];
        rec.extend_from_slice(&[0; 17]);
        let (r, _, _) = read_all(&mut server, &mut rec);
        assert_eq!(r, Err(RecordError::RxSeqExhausted));
    }

    // Per-record cost: `cargo run --release -p presenced --example record_cost`.

    #[test]
    fn key_update_flood_is_cut_off() {
        let (mut server, mut client) = pair(Suite::Aes128GcmSha256);
        let mut wire = Vec::new();
        for _ in 0..MAX_KEY_UPDATES_IN_A_ROW {
            client.update_tx_keys(false, &mut wire).unwrap();
        }
        client
            .seal_app_data(b"resets the count", &mut wire)
            .unwrap();
        for _ in 0..MAX_KEY_UPDATES_IN_A_ROW {
            client.update_tx_keys(true, &mut wire).unwrap();
        }
        let (r, data, out) = read_all(&mut server, &mut wire);
        assert_eq!(
            (r, data),
            (Ok(StreamStatus::Open), b"resets the count".to_vec())
        );
        assert!(!out.is_empty());
        let mut wire = Vec::new();
        client.update_tx_keys(false, &mut wire).unwrap();
        let (r, _, _) = read_all(&mut server, &mut wire);
        assert_eq!(r, Err(RecordError::TooManyKeyUpdates));
    }
}
