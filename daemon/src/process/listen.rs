//! The agents' listening sockets: one SO_REUSEPORT listener per shard, so
//! the kernel spreads new connections over the shards. With port 0 in the
//! config, the first socket picks the port and the others join it.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

/// A listening socket could not be set up.
#[derive(Debug, Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Bind `count` listening sockets to `addr` with SO_REUSEPORT. With port 0,
/// the first socket picks the port and the others join it. Returns the
/// sockets and the address they are bound to.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> Result<(Vec<OwnedFd>, SocketAddr), ListenError> {
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let sock = bind_one(bound, backlog)?;
        if bound.port() == 0 {
            bound = resolved(&sock).map_err(|source| ListenError {
                addr: bound,
                source,
            })?;
        }
        out.push(OwnedFd::from(sock));
    }
    Ok((out, bound))
}

/// One SO_REUSEPORT listener (close-on-exec) on `addr`.
fn bind_one(addr: SocketAddr, backlog: u32) -> Result<Socket, ListenError> {
    let err = |source| ListenError { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.set_cloexec(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(err)?;
    Ok(sock)
}

/// The address the kernel picked for a socket bound to port 0.
fn resolved(sock: &Socket) -> std::io::Result<SocketAddr> {
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))
}

/// The address a listening descriptor is bound to.
pub fn bound_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_resolved_and_shared() {
        let (fds, addr) = bind_listeners("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        assert_eq!(fds.len(), 3);
        assert_ne!(addr.port(), 0);
        for fd in &fds {
            assert_eq!(bound_addr(fd), Some(addr));
        }
    }

    #[test]
    fn a_taken_port_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind_listeners(addr, 1, 16).unwrap_err();
        assert_eq!(e.addr, addr);
        assert!(e.to_string().starts_with("cannot listen on"), "{e}");
    }
}
