//! Socket figures read from the kernel (for `stats` and `metrics`).

use std::os::fd::RawFd;

/// `TCP_LISTEN` in `tcpi_state` (include/net/tcp_states.h).
const TCP_LISTEN: u8 = 10;

/// The accept queue of a listening TCP socket: `(queued, backlog)`.
///
/// For a socket in `LISTEN`, Linux reports the current accept queue length
/// (`sk_ack_backlog`: connections that completed the handshake and wait for
/// `accept()`) in `tcpi_unacked`, and the queue's capacity
/// (`sk_max_ack_backlog`: the `listen()` backlog capped by
/// `net.core.somaxconn`) in `tcpi_sacked`. The same figures `ss -lnt` shows
/// as Recv-Q / Send-Q. `None` if `fd` is not a listening TCP socket or the
/// call fails.
pub fn accept_queue(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; an invalid fd only
    // makes the call fail (EBADF / ENOTSOCK).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < 32 || info.tcpi_state != TCP_LISTEN {
        return None;
    }
    Some((info.tcpi_unacked, info.tcpi_sacked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    #[test]
    fn reports_pending_connections_and_backlog() {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        sock.bind(&addr.into()).unwrap();
        sock.listen(7).unwrap();
        let listener: TcpListener = sock.into();
        let fd = listener.as_raw_fd();
        assert_eq!(accept_queue(fd), Some((0, 7)));

        let addr = listener.local_addr().unwrap();
        let c1 = TcpStream::connect(addr).unwrap();
        let c2 = TcpStream::connect(addr).unwrap();
        // The handshake completes in the kernel; the queue fills at once, but poll briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        while accept_queue(fd) != Some((2, 7)) {
            assert!(Instant::now() < deadline, "{:?}", accept_queue(fd));
            std::thread::sleep(Duration::from_millis(5));
        }
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accept_queue(fd), Some((1, 7)));

        // Not a listening socket, and not a socket at all.
        assert_eq!(accept_queue(accepted.as_raw_fd()), None);
        assert_eq!(accept_queue(c1.as_raw_fd()), None);
        let file = std::fs::File::open("/proc/self/statm").unwrap();
        assert_eq!(accept_queue(file.as_raw_fd()), None);
        assert_eq!(accept_queue(-1), None);
        drop(c2);
    }
}
