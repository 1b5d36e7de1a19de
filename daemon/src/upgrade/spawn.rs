//! Starting the new binary with the hand-over socket, and telling systemd
//! which process is the unit's main process.
//!
//! The old process creates a `UnixStream` pair, clears `FD_CLOEXEC` on the
//! child's end only, spawns `<binary> serve --config <path> --upgrade-fd <N>`
//! (N is also in `PRESENCED_UPGRADE_FD`), and closes the child's end in the
//! parent. The child's end keeps its number across exec, so no `pre_exec`
//! /`dup2` is needed. While `FD_CLOEXEC` is clear, any other process this
//! process spawns would inherit the end too (and the parent would then never
//! see EOF when the target dies), so spawns through this module are
//! serialized and the daemon must not fork anything else meanwhile.
//!
//! The new process calls [`target_socket`] once, early in `main`; it
//! validates the fd (a connected `AF_UNIX` stream socket) and sets
//! `FD_CLOEXEC` on it again.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};
use nix::sys::stat::{fstat, SFlag};
use sd_notify::NotifyState;
use thiserror::Error;
use tracing::info;

/// Environment variable naming the inherited hand-over fd.
pub const UPGRADE_FD_ENV: &str = "PRESENCED_UPGRADE_FD";
/// Command-line flag naming the inherited hand-over fd.
pub const UPGRADE_FD_ARG: &str = "--upgrade-fd";

static SPAWN_LOCK: Mutex<()> = Mutex::new(());
static CLAIMED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("creating the hand-over socket pair: {0}")]
    Pair(#[source] std::io::Error),
    #[error("clearing FD_CLOEXEC on the child's end (fd {fd}): {source}")]
    Cloexec {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("spawning {binary:?}: {source}")]
    Spawn {
        binary: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("upgrade fd {value:?} (from {from}) is not a file descriptor number")]
    BadNumber { value: String, from: &'static str },
    #[error("upgrade fd {fd} (from {from}) is unusable: {what}")]
    BadFd {
        fd: RawFd,
        from: &'static str,
        what: String,
    },
    #[error("the upgrade fd was already claimed")]
    AlreadyClaimed,
}

/// A started target: the child process and the parent's end of the socket.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    pub sock: UnixStream,
    /// The fd number the child got (as passed on its command line).
    pub child_fd: RawFd,
}

/// Start `<binary> serve --config <config> --upgrade-fd <N>`.
pub fn spawn_target(binary: &Path, config: &Path) -> Result<Spawned, SpawnError> {
    let mut cmd = Command::new(binary);
    cmd.arg("serve").arg("--config").arg(config);
    spawn_with(cmd, true)
}

/// Start `cmd` with the child's end of a fresh socket pair inherited. The
/// fd number is put in `PRESENCED_UPGRADE_FD`, and appended as
/// `--upgrade-fd <N>` when `fd_arg` is set.
pub fn spawn_with(mut cmd: Command, fd_arg: bool) -> Result<Spawned, SpawnError> {
    let _serial = SPAWN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (parent, child_end) = UnixStream::pair().map_err(SpawnError::Pair)?;
    let n = child_end.as_raw_fd();
    if fd_arg {
        cmd.arg(UPGRADE_FD_ARG).arg(n.to_string());
    }
    cmd.env(UPGRADE_FD_ENV, n.to_string());
    fcntl(n, FcntlArg::F_SETFD(FdFlag::empty()))
        .map_err(|source| SpawnError::Cloexec { fd: n, source })?;
    let spawned = cmd.spawn();
    // Close our copy of the child's end right away (also on failure): from
    // now on only the child holds it, so its death is EOF for us.
    drop(child_end);
    let child = spawned.map_err(|source| SpawnError::Spawn {
        binary: cmd.get_program().to_owned(),
        source,
    })?;
    info!(pid = child.id(), fd = n, "upgrade: target spawned");
    Ok(Spawned {
        child,
        sock: parent,
        child_fd: n,
    })
}

/// In the new process: the hand-over socket, from `--upgrade-fd` (`arg`)
/// or else `PRESENCED_UPGRADE_FD`; `None` when neither is set (a normal
/// start). Can be claimed once.
pub fn target_socket(arg: Option<RawFd>) -> Result<Option<UnixStream>, SpawnError> {
    let (fd, from) = match arg {
        Some(fd) => (fd, "--upgrade-fd"),
        None => match std::env::var(UPGRADE_FD_ENV) {
            Ok(v) => {
                let fd = v
                    .trim()
                    .parse::<RawFd>()
                    .map_err(|_| SpawnError::BadNumber {
                        value: v.clone(),
                        from: UPGRADE_FD_ENV,
                    })?;
                (fd, UPGRADE_FD_ENV)
            }
            Err(_) => return Ok(None),
        },
    };
    let bad = |what: String| SpawnError::BadFd { fd, from, what };
    if fd <= 2 {
        return Err(bad(
            "stdin/stdout/stderr cannot be the upgrade socket".into()
        ));
    }
    let st = fstat(fd).map_err(|e| bad(format!("fstat: {e}")))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    let addr: SockaddrStorage = getsockname(fd).map_err(|e| bad(format!("getsockname: {e}")))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(bad(format!(
            "address family {:?}, expected AF_UNIX",
            addr.family()
        )));
    }
    // SAFETY: the fd is open (fstat succeeded) and was inherited for this
    // purpose only; the `CLAIMED` flag below makes sure we wrap it in an
    // owning type at most once. BorrowedFd is used only for the checks.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let ty = getsockopt(&borrowed, sockopt::SockType).map_err(|e| bad(format!("SO_TYPE: {e}")))?;
    if ty != SockType::Stream {
        return Err(bad(format!("socket type {ty:?}, expected stream")));
    }
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(SpawnError::AlreadyClaimed);
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(format!("setting FD_CLOEXEC: {e}")))?;
    // SAFETY: see above; from here the UnixStream owns and closes the fd.
    Ok(Some(unsafe { UnixStream::from_raw_fd(fd) }))
}

/// Send `MAINPID=<pid>` to the service manager (no-op without
/// `NOTIFY_SOCKET`). Used by the old process when it resumes.
pub fn notify_main_pid(pid: u32) -> std::io::Result<()> {
    sd_notify::notify(false, &[NotifyState::MainPid(pid)])
}

/// The new process takes over the unit: `MAINPID=<own pid>`, `READY=1` and
/// a status line, in one datagram (so systemd never sees READY from a
/// process that is not the main one). No-op without `NOTIFY_SOCKET`.
pub fn notify_takeover(status: &str) -> std::io::Result<()> {
    sd_notify::notify(
        false,
        &[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::Stdio;

    #[test]
    fn python_child_writes_to_inherited_fd() {
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(
            "import os, sys\n\
             i = sys.argv.index('--upgrade-fd')\n\
             fd = int(sys.argv[i + 1])\n\
             assert os.environ['PRESENCED_UPGRADE_FD'] == str(fd)\n\
             os.write(fd, b'hi from ' + str(os.getpid()).encode())\n",
        );
        cmd.stdin(Stdio::null());
        let Spawned {
            mut child,
            sock,
            child_fd,
        } = spawn_with(cmd, true).unwrap();
        assert!(child_fd > 2);
        sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let want = format!("hi from {}", child.id());
        let mut got = vec![0u8; want.len()];
        (&sock).read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
        let status = child.wait().unwrap();
        assert!(status.success());
        // The parent closed its copy of the child's end, so the child's exit
        // is EOF here.
        let mut rest = Vec::new();
        (&sock).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn spawn_failure_is_reported_and_leaks_nothing() {
        let e =
            spawn_target(Path::new("/nonexistent/presenced"), Path::new("/x.toml")).unwrap_err();
        assert!(matches!(e, SpawnError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/presenced"));
    }

    #[test]
    fn target_socket_rejects_bad_fds() {
        // A pipe is not a socket.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = target_socket(Some(r.as_raw_fd())).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(target_socket(Some(1)).is_err());
        // A TCP socket is not AF_UNIX.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = target_socket(Some(l.as_raw_fd())).unwrap_err();
        assert!(e.to_string().contains("AF_UNIX"), "{e}");
    }
}
