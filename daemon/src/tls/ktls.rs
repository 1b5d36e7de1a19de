//! Kernel TLS (`TCP_ULP` "tls") detection.
//!
//! The secrets a [`super::record::LeanSession`] holds are exactly what kTLS
//! needs (`TLS_TX`/`TLS_RX` take key, IV, salt and record sequence number),
//! so a host with kTLS could move record protection into the kernel. This
//! module only detects support at start; the hand-off itself is not written
//! yet, so [`record_path`] always chooses the userspace record layer.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};

use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
use thiserror::Error;

/// Where the kernel lists the upper-layer protocols it can attach to TCP.
const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// Why kernel TLS cannot be used.
#[derive(Debug, Error)]
pub enum KtlsError {
    #[error("probe socket ({step}): {source}")]
    Probe {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("setsockopt(TCP_ULP, \"tls\"): {errno} ({AVAILABLE_ULP}: {available:?})")]
    Ulp {
        errno: nix::errno::Errno,
        available: String,
    },
}

/// Whether kernel TLS can be attached to a TCP socket on this host.
#[derive(Debug)]
pub enum KtlsSupport {
    Available,
    Unsupported(KtlsError),
}

impl KtlsSupport {
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }
}

/// Which record layer connections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPath {
    /// Records sealed and opened by the kernel after the handshake.
    Kernel,
    /// Records sealed and opened by [`super::record::LeanSession`].
    Userspace,
}

/// Probe once at start: attach the "tls" ULP to a connected loopback socket.
///
/// The `tcp_available_ulp` list alone is not enough: the kernel may load the
/// `tls` module on demand when the option is set, and a listed ULP may still
/// be refused. The probe socket is closed right after.
pub fn detect() -> KtlsSupport {
    match probe() {
        Ok(()) => KtlsSupport::Available,
        Err(e) => KtlsSupport::Unsupported(e),
    }
}

fn probe() -> Result<(), KtlsError> {
    let step = |step| move |source| KtlsError::Probe { step, source };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(step("bind"))?;
    let addr = listener.local_addr().map_err(step("local_addr"))?;
    let client = TcpStream::connect(addr).map_err(step("connect"))?;
    let (_server, _) = listener.accept().map_err(step("accept"))?;
    setsockopt(&client, TcpUlp::default(), b"tls").map_err(|errno| KtlsError::Ulp {
        errno,
        available: available_ulps().unwrap_or_else(|e| format!("unreadable: {e}")),
    })
}

/// The kernel's list of available ULPs, for diagnostics.
pub fn available_ulps() -> io::Result<String> {
    std::fs::read_to_string(AVAILABLE_ULP).map(|s| s.trim().to_owned())
}

/// The record layer to use given what [`detect`] found.
///
/// Always [`RecordPath::Userspace`] for now: handing the secrets to the
/// kernel (`setsockopt(SOL_TLS, TLS_TX/TLS_RX)`, plus `recvmsg` control
/// messages for alerts and KeyUpdate, which the kernel passes up) is future
/// work. Kernel-side key updates need Linux 6.13 or later as well.
pub fn record_path(support: &KtlsSupport) -> RecordPath {
    match support {
        KtlsSupport::Available | KtlsSupport::Unsupported(_) => RecordPath::Userspace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_on_this_host_falls_back_to_userspace() {
        let support = detect();
        let listed = available_ulps()
            .map(|s| s.split_whitespace().any(|u| u == "tls"))
            .unwrap_or(false);
        eprintln!("kTLS: {support:?}; listed: {listed}");
        if !listed {
            // CONFIG_TLS is unset on the development machine.
            assert!(!support.is_available(), "{support:?}");
            let KtlsSupport::Unsupported(KtlsError::Ulp { errno, .. }) = &support else {
                panic!("expected a refused TCP_ULP, got {support:?}");
            };
            assert_eq!(*errno, nix::errno::Errno::ENOENT);
        }
        assert_eq!(record_path(&support), RecordPath::Userspace);
    }
}
