//! Readiness for established sessions without a task, a stream or a buffer
//! per connection: one level-triggered epoll set per shard.
//!
//! glommio's per-connection `TcpStream` plus task costs ~700 B of heap per
//! idle connection (measured; see docs/benchmarks.md), more than the whole
//! per-agent budget. Sessions therefore live as plain entries in the
//! shard's slab with their socket registered here; the shard waits for the
//! epoll set on glommio's blocking pool (so the executor never blocks) and
//! handles every ready session synchronously, reading into one per-shard
//! buffer.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PollerError {
    #[error("epoll_create: {0}")]
    Create(nix::Error),
    #[error("epoll_ctl on fd {fd}: {source}")]
    Ctl { fd: i32, source: nix::Error },
}

/// Most events handled per wake-up.
pub const BATCH: usize = 1024;

/// A shard's epoll set. `key` is the session's slab key.
#[derive(Clone)]
pub struct Poller {
    epoll: Arc<Epoll>,
}

fn interest(want_write: bool) -> EpollFlags {
    let mut f = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
    if want_write {
        f |= EpollFlags::EPOLLOUT;
    }
    f
}

impl Poller {
    pub fn new() -> Result<Self, PollerError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(PollerError::Create)?;
        Ok(Self {
            epoll: Arc::new(epoll),
        })
    }

    fn ctl_err(fd: BorrowedFd<'_>) -> impl FnOnce(nix::Error) -> PollerError + '_ {
        move |source| PollerError::Ctl {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            source,
        }
    }

    /// Watch `fd` for input (and output when `want_write`).
    pub fn add(&self, fd: BorrowedFd<'_>, key: u64, want_write: bool) -> Result<(), PollerError> {
        self.epoll
            .add(fd, EpollEvent::new(interest(want_write), key))
            .map_err(Self::ctl_err(fd))
    }

    /// Change whether `fd` is also watched for output.
    pub fn set_write_interest(
        &self,
        fd: BorrowedFd<'_>,
        key: u64,
        want_write: bool,
    ) -> Result<(), PollerError> {
        let mut ev = EpollEvent::new(interest(want_write), key);
        self.epoll.modify(fd, &mut ev).map_err(Self::ctl_err(fd))
    }

    /// Stop watching `fd` (closing it also does).
    pub fn remove(&self, fd: BorrowedFd<'_>) -> Result<(), PollerError> {
        self.epoll.delete(fd).map_err(Self::ctl_err(fd))
    }

    /// Wait up to `timeout` for ready sessions, on glommio's blocking pool.
    /// `events` is returned filled (its length is the number ready).
    pub async fn wait(&self, mut events: Vec<EpollEvent>, timeout: Duration) -> Vec<EpollEvent> {
        let epoll = self.epoll.clone();
        let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
        glommio::executor()
            .spawn_blocking(move || {
                events.resize(BATCH, EpollEvent::empty());
                let n = loop {
                    match epoll.wait(&mut events, EpollTimeout::from(ms)) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        r => break r.unwrap_or(0),
                    }
                };
                events.truncate(n);
                events
            })
            .await
    }

    /// The epoll descriptor (for diagnostics).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_readable_sockets_by_key() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(512 << 10)
            .make()
            .expect("executor");
        ex.run(async {
            let p = Poller::new().unwrap();
            let (a, mut b) = UnixStream::pair().unwrap();
            let (c, _d) = UnixStream::pair().unwrap();
            p.add(a.as_fd(), 7, false).unwrap();
            p.add(c.as_fd(), 9, false).unwrap();
            let ev = p.wait(Vec::new(), Duration::from_millis(10)).await;
            assert!(ev.is_empty());
            b.write_all(b"x").unwrap();
            let ev = p.wait(ev, Duration::from_millis(1000)).await;
            assert_eq!(ev.len(), 1);
            assert_eq!(ev[0].data(), 7);
            assert!(ev[0].events().contains(EpollFlags::EPOLLIN));
            p.set_write_interest(c.as_fd(), 9, true).unwrap();
            let ev = p.wait(ev, Duration::from_millis(1000)).await;
            assert!(ev
                .iter()
                .any(|e| e.data() == 9 && e.events().contains(EpollFlags::EPOLLOUT)));
            p.remove(a.as_fd()).unwrap();
        });
    }
}
