//! Zero-drop upgrade, the new process's (target) side: `serve --upgrade-fd N`
//! runs [`crate::upgrade::machine::run_target`] with a [`DaemonTarget`]
//! before any shard starts, then starts the shards with what it adopted
//! (`process::start::assemble`). The old process's side is
//! `control::upgrade`.

use std::os::fd::OwnedFd;

use thiserror::Error;
use tracing::warn;

use crate::control::socket::ControlError;
use crate::process::start::{Material, ServerError};
use crate::shard::Adopted;
use crate::upgrade::machine::{GlobalState, Target};
use crate::upgrade::manifest::{
    ConnHandoff, EventHandoff, Manifest, ManifestError, PresenceRecordHandoff,
};

/// Why this process refuses (or cannot take) what the old one hands over.
/// The text is the `Fail` reason the old process reports.
#[derive(Debug, Error)]
pub enum AdoptError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{got} listeners for {shards} shards")]
    Listeners { got: usize, shards: usize },
    #[error("no shard {0}")]
    NoShard(usize),
    /// TLS material, fleet key or ticket keys.
    #[error(transparent)]
    Material(#[from] ServerError),
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Test hooks: the e2e tests fail a hand-over at these steps.
    #[error("adopt shard {0}: failing on purpose (PRESENCED_TEST_FAIL_ADOPT_SHARD)")]
    TestFailAdoptShard(usize),
    #[error("ready: failing on purpose (PRESENCED_TEST_FAIL_READY)")]
    TestFailReady,
}

/// The new process's side: collects what the old one hands over, before
/// any shard runs.
pub struct DaemonTarget {
    config: crate::config::Config,
    shards: usize,
    pub listeners: Vec<OwnedFd>,
    pub adopted: Vec<Adopted>,
    /// Loaded in `ready` (before Confirm): a bad certificate aborts the
    /// hand-over while the old process can still resume.
    pub material: Option<Material>,
    /// Bound in `commit`: the control socket path moves to this process.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// Session ticket keys from the old process (resumption keeps working).
    ticket_keys: Option<crate::tls::tickets::TicketKeys>,
}

impl DaemonTarget {
    pub fn new(config: crate::config::Config) -> Self {
        let shards = config.shard_count();
        Self {
            config,
            shards,
            listeners: Vec::new(),
            adopted: (0..shards).map(|_| Adopted::default()).collect(),
            material: None,
            control: None,
            ticket_keys: None,
        }
    }
}

impl Target for DaemonTarget {
    type Error = AdoptError;

    fn check_manifest(&mut self, manifest: &Manifest) -> Result<(), AdoptError> {
        Ok(manifest.check_local(self.shards, &self.config.server.listen.to_string())?)
    }

    fn adopt_listeners(&mut self, listeners: Vec<OwnedFd>) -> Result<(), AdoptError> {
        if listeners.len() != self.shards {
            return Err(AdoptError::Listeners {
                got: listeners.len(),
                shards: self.shards,
            });
        }
        self.listeners = listeners;
        Ok(())
    }

    fn adopt_shard(
        &mut self,
        shard: usize,
        conns: Vec<(ConnHandoff, OwnedFd)>,
        records: Vec<PresenceRecordHandoff>,
    ) -> Result<(), AdoptError> {
        let a = self
            .adopted
            .get_mut(shard)
            .ok_or(AdoptError::NoShard(shard))?;
        a.conns = conns;
        a.records = records;
        if std::env::var("PRESENCED_TEST_FAIL_ADOPT_SHARD")
            .ok()
            .as_deref()
            == Some(&shard.to_string())
        {
            return Err(AdoptError::TestFailAdoptShard(shard));
        }
        Ok(())
    }

    fn adopt_global(&mut self, global: GlobalState) -> Result<(), AdoptError> {
        let events: Vec<EventHandoff> = global.events;
        if !global.ticket_keys.keys.is_empty() {
            match crate::tls::tickets::TicketKeys::from_handoff(&global.ticket_keys.keys) {
                Ok(k) => self.ticket_keys = Some(k),
                Err(e) => {
                    warn!("handed-over ticket keys unusable, loading from the state dir: {e}")
                }
            }
        }
        self.adopted[0].events = Some((events, global.next_event_seq));
        Ok(())
    }

    fn ready(&mut self) -> Result<(), AdoptError> {
        let material = Material::load_with_tickets(&self.config, self.ticket_keys.take())?;
        if std::env::var_os("PRESENCED_TEST_FAIL_READY").is_some() {
            return Err(AdoptError::TestFailReady);
        }
        self.material = Some(material);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), AdoptError> {
        let s = &self.config.server;
        let control =
            crate::control::socket::bind_with(&s.control_socket, s.control_group.as_deref(), true)?;
        self.control = Some(control);
        let _ = crate::upgrade::spawn::notify_takeover("took over from the previous process");
        Ok(())
    }
}
