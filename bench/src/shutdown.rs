//! A one-shot, cloneable shutdown signal for agents.

use std::sync::Arc;

use tokio::sync::watch;

/// Triggers the paired [`ShutdownSignal`]s. Cheap to clone.
///
/// Dropping every handle without calling [`trigger`](Self::trigger) does
/// **not** shut agents down; their signals simply never fire.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

/// Observed by agents: once triggered it stays triggered.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

/// A new handle and a signal bound to it.
pub fn shutdown_channel() -> (ShutdownHandle, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownHandle { tx: Arc::new(tx) }, ShutdownSignal { rx })
}

impl ShutdownHandle {
    /// Ask every agent holding a paired signal to shut down. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Another signal bound to this handle.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }
}

impl ShutdownSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        shutdown_channel().1
    }

    /// Whether shutdown has been requested.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolve once shutdown is requested (immediately if it already was).
    /// Never resolves if all handles were dropped untriggered. Cancel-safe.
    pub async fn wait(&mut self) {
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn trigger_reaches_all_signals_and_sticks() {
        let (h, mut a) = shutdown_channel();
        let mut b = h.signal();
        let mut c = a.clone();
        assert!(!a.is_triggered());
        let waiter = tokio::spawn(async move { b.wait().await });
        h.trigger();
        waiter.await.unwrap();
        a.wait().await;
        a.wait().await;
        c.wait().await;
        assert!(c.is_triggered());
    }

    #[tokio::test]
    async fn never_and_dropped_handle_do_not_fire() {
        let mut s = ShutdownSignal::never();
        assert!(tokio::time::timeout(Duration::from_millis(50), s.wait())
            .await
            .is_err());
        let (h, mut s) = shutdown_channel();
        drop(h);
        assert!(tokio::time::timeout(Duration::from_millis(50), s.wait())
            .await
            .is_err());
    }
}
