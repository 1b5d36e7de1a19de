//! Framed messages with attached file descriptors over a `SOCK_STREAM` Unix
//! socket.
//!
//! # Frame
//!
//! ```text
//! +----------------+----------------+---------------------------+
//! | body len (u32) | fd count (u32) | body: JSON, `len` bytes    |
//! | little endian  | little endian  |                           |
//! +----------------+----------------+---------------------------+
//!   fds (SCM_RIGHTS) ride on the first byte of the frame
//! ```
//!
//! # Why SOCK_STREAM
//!
//! `std` only has `UnixStream` (no `SOCK_SEQPACKET` type), the pair is what
//! `spawn` hands to the child, and a stream has no per-datagram size limit:
//! one frame can carry a 64 MiB batch of presence records without raising
//! `SO_SNDBUF`. The price is that message boundaries are ours to keep, hence
//! the header. The fd count in the header lets the receiver check that
//! exactly the descriptors that belong to this frame arrived.
//!
//! # Sending
//!
//! A frame goes out in one `sendmsg` when the socket buffer takes it. If the
//! kernel takes only part of it, the rest follows in further `sendmsg` calls
//! *without* the control message: the descriptors were attached to the first
//! chunk and must not be sent twice. `MSG_NOSIGNAL` keeps a dead peer from
//! killing the old daemon with `SIGPIPE`.
//!
//! # Receiving
//!
//! The receiver reads exactly the header, then exactly the body, never past
//! the end of the frame, so descriptors of the next frame (attached to its
//! first byte) can never be picked up early. Descriptors may arrive with any
//! `recvmsg` of the frame; all of them are collected and their number is
//! checked against the header. `MSG_CMSG_CLOEXEC` makes every received fd
//! close-on-exec. `MSG_CTRUNC` (control data did not fit) is an error, never
//! ignored. [`recv_no_fds`] passes no control buffer at all: if the peer
//! attaches descriptors anyway the kernel discards them (they are never
//! installed in this process) and we report [`WireError::UnexpectedFds`].
//!
//! # Timeouts
//!
//! The `*_deadline` variants re-arm `SO_SNDTIMEO`/`SO_RCVTIMEO` with the time
//! left before every syscall, so a peer that dribbles bytes cannot stretch
//! the deadline. [`send`] and [`recv`] use whatever timeouts the socket
//! already has (`set_read_timeout` / `set_write_timeout`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// The kernel's limit on descriptors in one `SCM_RIGHTS` message
/// (`SCM_MAX_FD` in include/net/scm.h).
pub const SCM_MAX_FD: usize = 253;

/// Largest body accepted or sent. A frame is fully buffered in memory on
/// both sides; callers batch to stay well below this.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Header bytes before the body.
pub const HEADER_LEN: usize = 8;

/// Everything that can go wrong moving one frame.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("peer closed the upgrade socket")]
    Closed,
    #[error("truncated message: peer closed after {got} of {expected} bytes of the {part}")]
    Truncated {
        part: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("timed out {op}")]
    Timeout { op: &'static str },
    #[error("message body of {len} bytes exceeds the {max}-byte cap")]
    TooLarge { len: usize, max: usize },
    #[error("empty message body")]
    Empty,
    #[error("{n} fds in one message exceeds SCM_MAX_FD ({max}); send them in batches")]
    TooManyFds { n: usize, max: usize },
    #[error("control data truncated (MSG_CTRUNC) while {op}: descriptors were lost")]
    ControlTruncated { op: &'static str },
    #[error("frame announced {expected} fds but {got} arrived")]
    FdCount { expected: usize, got: usize },
    #[error("peer attached fds to a message that must carry none (they were discarded)")]
    UnexpectedFds,
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode message body ({len} bytes): {source}")]
    Decode {
        len: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl WireError {
    /// The peer is gone (EOF, EPIPE, ECONNRESET, or EOF mid-frame).
    pub fn is_closed(&self) -> bool {
        matches!(self, WireError::Closed | WireError::Truncated { .. })
    }
}

fn io_err(op: &'static str, e: Errno) -> WireError {
    WireError::Io {
        op,
        source: std::io::Error::from(e),
    }
}

/// Arm the socket timeout for the time left before `deadline`.
fn arm(sock: &UnixStream, deadline: Option<Instant>, write: bool) -> Result<(), WireError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    let op = if write { "sending" } else { "receiving" };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(WireError::Timeout { op });
    }
    let r = if write {
        sock.set_write_timeout(Some(left))
    } else {
        sock.set_read_timeout(Some(left))
    };
    r.map_err(|source| WireError::Io {
        op: "setting socket timeout",
        source,
    })
}

/// Send one frame, using the socket's current write timeout.
pub fn send<M: Serialize + ?Sized>(
    sock: &UnixStream,
    msg: &M,
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    send_deadline(sock, msg, fds, None)
}

/// Send one frame; fail with [`WireError::Timeout`] if it is not fully
/// written by `deadline`.
pub fn send_deadline<M: Serialize + ?Sized>(
    sock: &UnixStream,
    msg: &M,
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    if fds.len() > SCM_MAX_FD {
        return Err(WireError::TooManyFds {
            n: fds.len(),
            max: SCM_MAX_FD,
        });
    }
    let mut frame = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut frame, msg).map_err(WireError::Encode)?;
    let len = frame.len() - HEADER_LEN;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    // Both fit in u32: len <= MAX_MESSAGE, fds <= SCM_MAX_FD.
    frame[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    frame[4..8].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    send_frame(sock, &frame, &raw, deadline)
}

fn send_frame(
    sock: &UnixStream,
    frame: &[u8],
    fds: &[RawFd],
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    let mut off = 0;
    while off < frame.len() {
        arm(sock, deadline, true)?;
        let iov = [IoSlice::new(&frame[off..])];
        let rights = [ControlMessage::ScmRights(fds)];
        // The descriptors ride on the first chunk only.
        let cmsgs: &[ControlMessage] = if off == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => off += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(WireError::Timeout { op: "sending" }),
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(WireError::Closed)
            }
            Err(e) => return Err(io_err("sendmsg", e)),
        }
    }
    Ok(())
}

/// Receive one frame and its descriptors, using the socket's current read
/// timeout.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>), WireError> {
    recv_deadline(sock, None)
}

/// Receive one frame and its descriptors by `deadline`.
pub fn recv_deadline<T: DeserializeOwned>(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> Result<(T, Vec<OwnedFd>), WireError> {
    let (body, fds) = recv_frame(sock, deadline, true)?;
    let msg = decode(&body)?;
    Ok((msg, fds))
}

/// Receive one frame that must carry no descriptors. No control buffer is
/// given to the kernel, so descriptors a broken peer attaches are discarded
/// by the kernel instead of being installed in this process.
pub fn recv_no_fds<T: DeserializeOwned>(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> Result<T, WireError> {
    let (body, fds) = recv_frame(sock, deadline, false)?;
    debug_assert!(fds.is_empty());
    decode(&body)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|source| WireError::Decode {
        len: body.len(),
        source,
    })
}

fn recv_frame(
    sock: &UnixStream,
    deadline: Option<Instant>,
    accept_fds: bool,
) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut fds = Vec::new();
    let mut cmsg = accept_fds.then(|| nix::cmsg_space!([RawFd; SCM_MAX_FD]));
    let mut hdr = [0u8; HEADER_LEN];
    read_exact(sock, &mut hdr, "header", &mut cmsg, &mut fds, deadline)?;
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let nfds = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    if nfds > SCM_MAX_FD {
        return Err(WireError::TooManyFds {
            n: nfds,
            max: SCM_MAX_FD,
        });
    }
    if !accept_fds && nfds > 0 {
        return Err(WireError::UnexpectedFds);
    }
    let mut body = vec![0u8; len];
    read_exact(sock, &mut body, "body", &mut cmsg, &mut fds, deadline)?;
    if fds.len() != nfds {
        return Err(WireError::FdCount {
            expected: nfds,
            got: fds.len(),
        });
    }
    Ok((body, fds))
}

/// Fill `buf` completely, collecting any descriptors that arrive on the way.
fn read_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    part: &'static str,
    cmsg: &mut Option<Vec<u8>>,
    fds: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    let mut got = 0;
    let want_fds = cmsg.is_some();
    while got < buf.len() {
        arm(sock, deadline, false)?;
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let r = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            cmsg.as_mut(),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match r {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(WireError::Timeout { op: "receiving" }),
            Err(Errno::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(io_err("recvmsg", e)),
        };
        let n = msg.bytes;
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            if !want_fds {
                // No control buffer: the kernel dropped whatever fds the
                // peer attached; none were installed here.
                return Err(WireError::UnexpectedFds);
            }
            // Our buffer holds SCM_MAX_FD descriptors, the most one skb can
            // carry, and we never enable SO_PASSCRED/SO_PASSSEC; so this
            // means something else is writing control data. Fail loudly.
            return Err(WireError::ControlTruncated { op: "receiving" });
        }
        if want_fds {
            let cmsgs = msg
                .cmsgs()
                .map_err(|_| WireError::ControlTruncated { op: "receiving" })?;
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed `fd` in this
                        // process for us (SCM_RIGHTS); nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if n == 0 {
            return Err(if got == 0 && part == "header" {
                WireError::Closed
            } else {
                WireError::Truncated {
                    part,
                    got,
                    expected: buf.len(),
                }
            });
        }
        got += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Msg {
        n: u32,
        text: String,
    }

    pub(crate) fn raise_nofile() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }

    fn ino(fd: BorrowedFd<'_>) -> (u64, u64) {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
        (st.st_dev, st.st_ino)
    }

    fn pipes(n: usize) -> Vec<(std::fs::File, std::fs::File)> {
        (0..n)
            .map(|_| {
                let (r, w) = nix::unistd::pipe().unwrap();
                (std::fs::File::from(r), std::fs::File::from(w))
            })
            .collect()
    }

    /// Send `n` pipe write ends in batches of at most SCM_MAX_FD; check each
    /// received fd is the same open file (inode) and works (write through
    /// it, read from the original read end).
    fn roundtrip(n: usize) {
        raise_nofile();
        let (a, b) = UnixStream::pair().unwrap();
        let ps = pipes(n);
        let writer = std::thread::spawn(move || {
            let mut batches = 0;
            for (i, chunk) in ps.chunks(SCM_MAX_FD).enumerate() {
                let fds: Vec<BorrowedFd> = chunk.iter().map(|(_, w)| w.as_fd()).collect();
                let m = Msg {
                    n: i as u32,
                    text: format!("batch {i}"),
                };
                send(&a, &m, &fds).unwrap();
                batches += 1;
            }
            if n == 0 {
                send(
                    &a,
                    &Msg {
                        n: 0,
                        text: "none".into(),
                    },
                    &[],
                )
                .unwrap();
                batches = 1;
            }
            (ps, batches)
        });
        let mut got: Vec<OwnedFd> = Vec::new();
        let expect_batches = n.div_ceil(SCM_MAX_FD).max(1);
        for i in 0..expect_batches {
            let (m, fds): (Msg, _) =
                recv_deadline(&b, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            assert_eq!(m.n, i as u32);
            got.extend(fds);
        }
        let (ps, batches) = writer.join().unwrap();
        assert_eq!(batches, expect_batches);
        assert_eq!(got.len(), n);
        for (i, ((r, w), fd)) in ps.iter().zip(got).enumerate() {
            assert_eq!(
                ino(w.as_fd()),
                ino(fd.as_fd()),
                "fd {i} is a different file"
            );
            // The received fd is close-on-exec.
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFD).unwrap();
            assert!(flags & libc::FD_CLOEXEC != 0);
            let mut f = std::fs::File::from(fd);
            f.write_all(&[i as u8]).unwrap();
            let mut byte = [0u8];
            (&*r).read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i as u8);
        }
    }

    #[test]
    fn zero_fds() {
        roundtrip(0);
    }

    #[test]
    fn one_fd() {
        roundtrip(1);
    }

    #[test]
    fn max_fds_in_one_message() {
        roundtrip(SCM_MAX_FD);
    }

    #[test]
    fn six_hundred_fds_batched() {
        roundtrip(600);
    }

    #[test]
    fn too_many_fds_rejected() {
        let (a, _b) = UnixStream::pair().unwrap();
        let ps = pipes(SCM_MAX_FD + 1);
        let fds: Vec<BorrowedFd> = ps.iter().map(|(_, w)| w.as_fd()).collect();
        let e = send(
            &a,
            &Msg {
                n: 1,
                text: "x".into(),
            },
            &fds,
        )
        .unwrap_err();
        assert!(
            matches!(e, WireError::TooManyFds { n: 254, max: 253 }),
            "{e}"
        );
        assert!(e.to_string().contains("SCM_MAX_FD"), "{e}");
    }

    #[test]
    fn large_body_partial_writes() {
        // 8 MiB body: far above the socket buffer, so sendmsg returns short
        // counts and recvmsg reads in pieces; the fd must still arrive once.
        let (a, b) = UnixStream::pair().unwrap();
        let ps = pipes(1);
        let text = "x".repeat(8 << 20);
        let t2 = text.clone();
        let w = std::thread::spawn(move || {
            send(&a, &Msg { n: 7, text: t2 }, &[ps[0].1.as_fd()]).unwrap();
            send(
                &a,
                &Msg {
                    n: 8,
                    text: "second".into(),
                },
                &[],
            )
            .unwrap();
            ps
        });
        let (m, fds): (Msg, _) = recv(&b).unwrap();
        assert_eq!(m.n, 7);
        assert_eq!(m.text, text);
        assert_eq!(fds.len(), 1);
        let (m2, fds2): (Msg, _) = recv(&b).unwrap();
        assert_eq!(m2.n, 8);
        assert!(fds2.is_empty());
        let ps = w.join().unwrap();
        assert_eq!(ino(ps[0].1.as_fd()), ino(fds[0].as_fd()));
    }

    #[test]
    fn truncated_message() {
        let (a, b) = UnixStream::pair().unwrap();
        // Header promises 100 bytes, only 10 arrive, then EOF.
        let mut frame = Vec::new();
        frame.extend_from_slice(&100u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(b"{\"n\":1,\"te");
        (&a).write_all(&frame).unwrap();
        drop(a);
        let e = recv::<Msg>(&b).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::Truncated {
                    part: "body",
                    got: 10,
                    expected: 100
                }
            ),
            "{e}"
        );
        assert!(e.is_closed());

        // Half a header.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0]).unwrap();
        drop(a);
        let e = recv::<Msg>(&b).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::Truncated {
                    part: "header",
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );

        // Clean EOF between frames.
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv::<Msg>(&b).unwrap_err(), WireError::Closed));
    }

    #[test]
    fn oversize_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&((MAX_MESSAGE + 1) as u32).to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        (&a).write_all(&hdr).unwrap();
        let e = recv::<Msg>(&b).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { .. }), "{e}");

        // And the sender refuses to build one.
        let big = "y".repeat(MAX_MESSAGE);
        let e = send(&a, &Msg { n: 0, text: big }, &[]).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn garbage_body_and_bad_fd_count() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = Vec::new();
        frame.extend_from_slice(&3u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(b"\xff{[");
        (&a).write_all(&frame).unwrap();
        assert!(matches!(
            recv::<Msg>(&b).unwrap_err(),
            WireError::Decode { .. }
        ));

        // Header says 2 fds, none attached.
        let mut frame = Vec::new();
        frame.extend_from_slice(&2u32.to_le_bytes());
        frame.extend_from_slice(&2u32.to_le_bytes());
        frame.extend_from_slice(b"{}");
        (&a).write_all(&frame).unwrap();
        assert!(matches!(
            recv::<Msg>(&b).unwrap_err(),
            WireError::FdCount {
                expected: 2,
                got: 0
            }
        ));
    }

    #[test]
    fn fds_to_a_no_fd_receiver_are_refused_and_not_installed() {
        let (a, b) = UnixStream::pair().unwrap();
        let ps = pipes(1);
        send(
            &a,
            &Msg {
                n: 1,
                text: "x".into(),
            },
            &[ps[0].1.as_fd()],
        )
        .unwrap();
        let e = recv_no_fds::<Msg>(&b, None).unwrap_err();
        assert!(matches!(e, WireError::UnexpectedFds), "{e}");
    }

    #[test]
    fn timeout() {
        let (_a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let e = recv_deadline::<Msg>(&b, Some(Instant::now() + Duration::from_millis(100)))
            .unwrap_err();
        assert!(matches!(e, WireError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
