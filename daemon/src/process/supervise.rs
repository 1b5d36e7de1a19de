//! The systemd notify protocol (sd_notify): READY=1 once every shard
//! listens, STATUS= with live counts, WATCHDOG=1 while every shard answers.
//! A no-op when NOTIFY_SOCKET is not set.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("sd_notify failed: {e}");
    }
}

/// Every shard is listening.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A human-readable one-line status (`systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The daemon is alive: every shard answered.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Reload started / finished.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The reload notifications the control socket sends.
pub const NOTIFIER: crate::control::socket::Notifier = crate::control::socket::Notifier {
    reloading,
    reloaded,
};

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd expects pings within (WATCHDOG_USEC), if
/// any. As systemd: a WATCHDOG_PID, when set, must be this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
