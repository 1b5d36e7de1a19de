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

/// What the process runs beside the event shard: the control socket and
/// the service-manager supervision (given to `shard::run` as its hook).
pub struct EventShardHook {
    control: Option<std::os::unix::net::UnixListener>,
}

impl EventShardHook {
    pub fn new(control: std::os::unix::net::UnixListener) -> Self {
        Self {
            control: Some(control),
        }
    }
}

impl crate::shard::ShardHook for EventShardHook {
    fn started(&mut self, shard: &std::rc::Rc<crate::shard::Shard>) {
        if let Some(control) = self.control.take() {
            let s = shard.clone();
            glommio::spawn_local(async move {
                if let Err(e) = crate::control::socket::serve(s, control, NOTIFIER).await {
                    tracing::warn!("control socket stopped: {e}");
                }
            })
            .detach();
        }
        glommio::spawn_local(supervise(shard.clone())).detach();
    }

    fn stopping(&mut self, _shard: &crate::shard::Shard) {
        stopping();
    }
}

/// On the event shard: READY=1 once every shard listens, then STATUS= and
/// WATCHDOG=1 pings while every shard answers, and SIGHUP reloads.
async fn supervise(shard: std::rc::Rc<crate::shard::Shard>) {
    use glommio::timer::sleep;
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    let rt = shard.rt.clone();
    while rt.shards_ready() < shard.nshards {
        sleep(Duration::from_millis(5)).await;
    }
    ready(&format!("listening on {}", rt.listen));
    let watchdog_every = watchdog_interval().map(|d| d / 2);
    let status_every = watchdog_every
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut next_status = Instant::now();
    while !shard.is_shutting_down() {
        if rt.reload_requested.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: reloading");
            let _ = crate::control::socket::reload(&shard, NOTIFIER);
        }
        if Instant::now() >= next_status {
            // Every shard must answer: a stuck shard stops the watchdog pings.
            let v = crate::control::stats::gather_stats(&shard).await;
            status(&format!(
                "{} agents online, {} connections, {} shards",
                v.agents_online, v.connections, v.shards
            ));
            watchdog();
            next_status = Instant::now() + status_every;
        }
        sleep(Duration::from_millis(50)).await;
    }
    if !shard.is_released() {
        stopping();
    }
}
