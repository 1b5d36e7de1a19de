//! An established agent connection after its TLS handshake: a plain entry
//! in the shard's slab, its socket in the shard's epoll set. No task, no
//! stream object, no read buffer: when the socket is readable the shard
//! reads into its one buffer, opens the TLS records in place, parses frames,
//! and answers with one sealed record per batch.
//!
//! What a session holds while idle: the socket, the lean TLS state (traffic
//! secrets and sequence numbers), the agent id and session id, and nothing
//! else unless a record or frame arrived split (then a small `Pending`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};

use crate::conn::agent::{self, SessionEvent};
use crate::tls::record::{AlertDescription, LeanSession};

/// Unsent output above this closes the connection (the agent is not reading).
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// Reads per readiness event before yielding to other sessions.
const READS_PER_EVENT: usize = 4;

/// Bytes carried between reads: rare, so boxed and usually absent.
#[derive(Default)]
pub struct Pending {
    /// The start of a TLS record whose rest has not arrived.
    pub record: Vec<u8>,
    /// The start of a frame whose rest is in a later record.
    pub frames: Vec<u8>,
    /// Sealed output the socket did not take yet.
    pub tx: Vec<u8>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.record.is_empty() && self.frames.is_empty() && self.tx.is_empty()
    }
}

/// The post-handshake state of one connection.
pub struct Session {
    pub fd: OwnedFd,
    pub tls: LeanSession,
    /// Set once HELLO was accepted.
    pub agent: Option<Box<str>>,
    pub session_id: u64,
    pub pending: Option<Box<Pending>>,
    /// EPOLLOUT is armed.
    pub want_write: bool,
    /// Described in a live hand-over: the new process owns it now.
    pub carried: bool,
}

impl Session {
    pub fn new(fd: OwnedFd, tls: LeanSession) -> Self {
        Self {
            fd,
            tls,
            agent: None,
            session_id: 0,
            pending: None,
            want_write: false,
            carried: false,
        }
    }

    fn pending_mut(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Default::default)
    }

    fn shrink_pending(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.is_empty()) {
            self.pending = None;
        }
    }

    /// Unsent output bytes.
    pub fn pending_output(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.tx.len())
    }

    /// Read what the socket has (into the shard's `buf`), open records and
    /// split frames into `events` (the shard's, reused), in order; processing
    /// stops at the first closing step.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        events: &mut Vec<SessionEvent>,
    ) {
        for _ in 0..READS_PER_EVENT {
            let n = match recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    events.push(SessionEvent::Closed);
                    break;
                }
                Ok(n) => n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    events.push(SessionEvent::Closed);
                    break;
                }
            };
            if self.ingest(&mut buf[..n], plain, out, events) || n < buf.len() {
                break;
            }
        }
        self.shrink_pending();
    }

    /// Process received ciphertext. Returns true when a closing step was produced.
    pub fn ingest(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        events: &mut Vec<SessionEvent>,
    ) -> bool {
        // Continue a split record from the pending buffer; else work in place.
        let mut carried = match self.pending.as_mut() {
            Some(p) if !p.record.is_empty() => {
                let mut v = std::mem::take(&mut p.record);
                v.extend_from_slice(data);
                Some(v)
            }
            _ => None,
        };
        let input: &mut [u8] = match carried.as_mut() {
            Some(v) => v.as_mut_slice(),
            None => data,
        };
        let mut at = 0;
        let mut closing = false;
        // A closing outcome (close_notify, a bad record) comes after the data
        // that preceded it: frames first, then the close.
        let mut close_event: Option<SessionEvent> = None;
        plain.clear();
        while at < input.len() {
            let len = match tls_adapter::record_len(&input[at..]) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(f) => {
                    close_event = Some(f);
                    break;
                }
            };
            let record = &mut input[at..at + len];
            at += len;
            match tls_adapter::open(&mut self.tls, record, plain, out) {
                Ok(tls_adapter::Opened::Data) | Ok(tls_adapter::Opened::Nothing) => {}
                Ok(tls_adapter::Opened::Closed) => {
                    close_event = Some(SessionEvent::Closed);
                    break;
                }
                Err(f) => {
                    close_event = Some(f);
                    break;
                }
            }
        }
        if close_event.is_none() && at < input.len() {
            let rest = input[at..].to_vec();
            self.pending_mut().record = rest;
        }
        if !plain.is_empty() {
            closing |= self.split_frames(plain, events);
        }
        if let Some(step) = close_event {
            if !closing {
                events.push(step);
            }
            closing = true;
        }
        closing
    }

    /// Application data that arrived with the client's Finished.
    pub fn split_early(&mut self, plain: &mut Vec<u8>, events: &mut Vec<SessionEvent>) -> bool {
        let data = std::mem::take(plain);
        self.split_frames(&data, events)
    }

    /// Split decrypted application data into frames.
    fn split_frames(&mut self, plain: &[u8], events: &mut Vec<SessionEvent>) -> bool {
        let joined = match self.pending.as_mut() {
            Some(p) if !p.frames.is_empty() => {
                let mut v = std::mem::take(&mut p.frames);
                v.extend_from_slice(plain);
                Some(v)
            }
            _ => None,
        };
        let input: &[u8] = joined.as_deref().unwrap_or(plain);
        let (at, stop) = agent::split_frames(input, events);
        if stop {
            return true;
        }
        if at < input.len() {
            let rest = input[at..].to_vec();
            self.pending_mut().frames = rest;
        }
        false
    }

    /// Seal `plain` (whole frames) into records appended to `out`. False
    /// when nothing more can be sent (sequence limit, or already closed).
    #[must_use]
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> bool {
        tls_adapter::seal(&mut self.tls, plain, out)
    }

    /// Seal an alert into `out`: close_notify when `alert` is None.
    pub fn seal_alert(&mut self, alert: Option<AlertDescription>, out: &mut Vec<u8>) {
        tls_adapter::seal_alert(&mut self.tls, alert, out);
    }

    /// Send `out` (and anything pending first). Returns false when the
    /// connection must close (error, or the agent stopped reading).
    pub fn send(&mut self, out: &[u8]) -> bool {
        if self.pending_output() > 0 {
            self.pending_mut().tx.extend_from_slice(out);
            return self.flush();
        }
        let mut at = 0;
        while at < out.len() {
            match send(
                self.fd.as_raw_fd(),
                &out[at..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => at += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(_) => return false,
            }
        }
        if at < out.len() {
            if out.len() - at > MAX_PENDING_OUTPUT {
                return false;
            }
            self.pending_mut().tx = out[at..].to_vec();
        }
        true
    }

    /// Write pending output. Returns false when the connection must close.
    pub fn flush(&mut self) -> bool {
        let Some(p) = self.pending.as_mut() else {
            return true;
        };
        let mut at = 0;
        while at < p.tx.len() {
            match send(
                self.fd.as_raw_fd(),
                &p.tx[at..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => at += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(_) => return false,
            }
        }
        p.tx.drain(..at);
        if p.tx.len() > MAX_PENDING_OUTPUT {
            return false;
        }
        if p.tx.is_empty() {
            p.tx = Vec::new();
        }
        self.shrink_pending();
        true
    }

    /// Best effort before closing: send `plain` frames (if any) and close_notify.
    pub fn goodbye(&mut self, plain: &[u8], scratch: &mut Vec<u8>) {
        scratch.clear();
        if !plain.is_empty() {
            let _ = self.seal(plain, scratch);
        }
        self.seal_alert(None, scratch);
        let _ = self.send(scratch);
        let _ = self.flush();
        let _ = nix::sys::socket::shutdown(
            self.fd.as_fd().as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        );
    }
}

/// The seam between sessions and the lean record layer.
mod tls_adapter {
    use super::SessionEvent;
    use crate::tls::record::{check_header, Incoming, LeanSession, RecordError};

    pub enum Opened {
        /// Application data was appended to `plain`.
        Data,
        /// A post-handshake message was handled (e.g. KeyUpdate; any reply is in `out`).
        Nothing,
        /// close_notify: the peer is gone.
        Closed,
    }

    /// Length of the whole record at the front of `input`, if it has arrived.
    pub fn record_len(input: &[u8]) -> Result<Option<usize>, SessionEvent> {
        check_header(input).map_err(failure)
    }

    pub fn open(
        tls: &mut LeanSession,
        record: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Opened, SessionEvent> {
        match tls.read_record(record, out).map_err(failure)? {
            Incoming::Data(range) => {
                plain.extend_from_slice(&record[range]);
                Ok(Opened::Data)
            }
            Incoming::CloseNotify => Ok(Opened::Closed),
            Incoming::KeyUpdate { .. } | Incoming::Nothing => Ok(Opened::Nothing),
        }
    }

    /// Sealing fails only at the sequence-number limit or after we closed:
    /// the caller then closes the connection.
    pub fn seal(tls: &mut LeanSession, plain: &[u8], out: &mut Vec<u8>) -> bool {
        tls.seal_app_data(plain, out).is_ok()
    }

    pub fn seal_alert(
        tls: &mut LeanSession,
        alert: Option<crate::tls::record::AlertDescription>,
        out: &mut Vec<u8>,
    ) {
        let _ = match alert {
            Some(a) => tls.seal_alert(a, out),
            None => tls.seal_close_notify(out),
        };
    }

    fn failure(e: RecordError) -> SessionEvent {
        match e {
            // The peer ended the connection with an alert: nothing to answer.
            RecordError::PeerAlert { .. } | RecordError::Closed(_) => SessionEvent::Closed,
            e => SessionEvent::TlsFailure {
                alert: e.alert(),
                reason: e.to_string(),
            },
        }
    }
}
