//! TLS 1.3 session tickets that survive restarts and upgrades.
//!
//! Resumption is stateless: the server keeps nothing per session, the client
//! holds a ticket, an AEAD-sealed blob rustls decrypts on the next
//! connection. What must persist is the set of ticket keys, so they live in
//! `<state_dir>/tickets.keys` (mode 0600, written atomically) and travel in
//! the upgrade hand-over ([`TicketKeys::to_handoff`]).
//!
//! Keys rotate: the newest generation seals new tickets and is replaced once
//! it is [`TicketPolicy::rotate_every`] old; an older generation only opens
//! tickets, until [`TicketPolicy::lifetime`] after it stopped sealing, then
//! it is erased. A ticket therefore stops working at most `lifetime` after
//! it was issued (the lifetime rustls advertises), and no key opens tickets
//! for longer than `rotate_every + lifetime`.
//!
//! [`PersistentTicketer`] is the rustls [`ProducesTickets`] over these keys.
//! Every shard thread shares it through the `ServerConfig`; a ticket
//! operation takes a read lock just long enough to clone an `Arc` of the
//! immutable key snapshot, and rotation swaps in a new snapshot.
//!
//! Whether a handshake was resumed is not the ticketer's business (rustls
//! may decrypt a ticket and still decline it): ask the connection
//! (`handshake_kind() == Some(HandshakeKind::Resumed)`).
//!
//! # Key file format (`tickets.keys`, also [`TicketKeys::to_bytes`])
//!
//! All integers big-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `PSDTKEYS` |
//! | 8 | 2 | format version, 1 |
//! | 10 | 2 | generation count `n`, 1 to [`MAX_GENERATIONS`] |
//! | 12 | 44 × n | generations, newest (the sealing key) first: key id `u32`, created (Unix seconds) `u64`, key 32 bytes |
//! | 12 + 44n | 32 | SHA-256 of all the bytes before it |
//!
//! # Ticket format
//!
//! `key id (4) | nonce (12) | ChaCha20-Poly1305 ciphertext + tag (16)`, the
//! nonce random, the key id as additional authenticated data.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::{NoServerSessionStorage, ProducesTickets};
use rustls::ServerConfig;
use thiserror::Error;

use crate::store::fs::{self as store_fs, FsError};

/// The key file's name inside the state directory.
pub const FILE_NAME: &str = "tickets.keys";
/// How often a new sealing key is made.
pub const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(12 * 3600);
/// How long a ticket stays usable after it was issued.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Generations kept at most, whatever the policy (3 with the defaults).
pub const MAX_GENERATIONS: usize = 16;
/// RFC 8446 section 4.6.1: a ticket lifetime is at most 7 days.
const MAX_TICKET_LIFETIME_SECS: u64 = 7 * 24 * 3600;

const MAGIC: [u8; 8] = *b"PSDTKEYS";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 12;
const KEY_LEN: usize = 32;
/// One generation, as stored: id, created, key.
const ENTRY_LEN: usize = 4 + 8 + KEY_LEN;
const ID_LEN: usize = 4;
const TAG_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum TicketError {
    #[error("ticket key file {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("ticket key file: {0}")]
    Fs(#[from] FsError),
    #[error("ticket keys: {0}")]
    Invalid(String),
    #[error("ticket keys: the system random number generator failed")]
    Random,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TicketError + 'a {
    move |source| TicketError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// When keys rotate and how long their tickets stay good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketPolicy {
    /// Age at which the sealing key is replaced.
    pub rotate_every: Duration,
    /// Ticket lifetime: advertised to clients, and how long a replaced key
    /// keeps opening tickets.
    pub lifetime: Duration,
}

impl Default for TicketPolicy {
    fn default() -> Self {
        Self {
            rotate_every: DEFAULT_ROTATE_EVERY,
            lifetime: DEFAULT_LIFETIME,
        }
    }
}

impl TicketPolicy {
    fn rotate_secs(&self) -> u64 {
        self.rotate_every.as_secs().max(1)
    }

    fn lifetime_secs(&self) -> u64 {
        self.lifetime.as_secs().clamp(1, MAX_TICKET_LIFETIME_SECS)
    }
}

/// What [`TicketKeys::load_or_create`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadNote {
    /// The file was read. `changed`: generations were rotated in or expired
    /// ones dropped, and the file rewritten. `mode_fixed`: the file was
    /// readable by others and was set back to 0600.
    Loaded {
        generations: usize,
        changed: bool,
        mode_fixed: bool,
    },
    /// No file: fresh keys were made and saved. Tickets from before are not
    /// accepted (clients fall back to a full handshake).
    Created,
    /// The file could not be used: it was moved to `moved_to` (if that
    /// worked) and fresh keys were made and saved.
    Replaced {
        reason: String,
        moved_to: Option<PathBuf>,
    },
}

impl fmt::Display for LoadNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadNote::Loaded {
                generations,
                changed,
                mode_fixed,
            } => {
                write!(f, "loaded {generations} ticket key generation(s)")?;
                if *changed {
                    write!(f, ", rotated")?;
                }
                if *mode_fixed {
                    write!(f, ", file mode reset to 0600 (it was readable by others)")?;
                }
                Ok(())
            }
            LoadNote::Created => write!(f, "no ticket key file, created fresh keys"),
            LoadNote::Replaced { reason, moved_to } => {
                write!(f, "ticket key file unusable ({reason}), created fresh keys")?;
                if let Some(p) = moved_to {
                    write!(f, "; old file kept as {}", p.display())?;
                }
                Ok(())
            }
        }
    }
}

/// One generation.
struct Generation {
    id: u32,
    /// Unix seconds.
    created: u64,
    secret: [u8; KEY_LEN],
}

impl Clone for Generation {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            created: self.created,
            secret: self.secret,
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.secret.fill(0);
        std::hint::black_box(&self.secret);
    }
}

impl Generation {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.secret);
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENTRY_LEN {
            return None;
        }
        let (id, rest) = b.split_first_chunk::<4>()?;
        let (created, secret) = rest.split_first_chunk::<8>()?;
        Some(Self {
            id: u32::from_be_bytes(*id),
            created: u64::from_be_bytes(*created),
            secret: <[u8; KEY_LEN]>::try_from(secret).ok()?,
        })
    }
}

/// The ticket key generations, newest (sealing) first, and the policy
/// that rotates them.
#[derive(Clone)]
pub struct TicketKeys {
    /// Never empty.
    gens: Vec<Generation>,
    policy: TicketPolicy,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("ids", &self.ids())
            .field(
                "created",
                &self.gens.iter().map(|g| g.created).collect::<Vec<_>>(),
            )
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix_secs(s: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(s))
        .unwrap_or(UNIX_EPOCH)
}

fn random_generation(
    rng: &dyn SecureRandom,
    created: u64,
    taken: &[Generation],
) -> Result<Generation, TicketError> {
    let mut secret = [0u8; KEY_LEN];
    rng.fill(&mut secret).map_err(|_| TicketError::Random)?;
    for _ in 0..16 {
        let mut id = [0u8; 4];
        rng.fill(&mut id).map_err(|_| TicketError::Random)?;
        let id = u32::from_be_bytes(id);
        if !taken.iter().any(|g| g.id == id) {
            return Ok(Generation {
                id,
                created,
                secret,
            });
        }
    }
    Err(TicketError::Random)
}

impl TicketKeys {
    /// One fresh generation, created `now`, default policy.
    pub fn generate(now: SystemTime) -> Result<Self, TicketError> {
        let gen = random_generation(&SystemRandom::new(), unix_secs(now), &[])?;
        Ok(Self {
            gens: vec![gen],
            policy: TicketPolicy::default(),
        })
    }

    /// The key file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Read `<state_dir>/tickets.keys`, rotating and saving if due; a
    /// missing or unusable file is replaced by fresh keys (see the note).
    /// Errors only when the file cannot be read or written (permissions, I/O).
    pub fn load_or_create(state_dir: &Path) -> Result<(Self, LoadNote), TicketError> {
        Self::load_or_create_with(state_dir, TicketPolicy::default(), SystemTime::now())
    }

    /// [`load_or_create`](Self::load_or_create) with a policy and clock.
    pub fn load_or_create_with(
        state_dir: &Path,
        policy: TicketPolicy,
        now: SystemTime,
    ) -> Result<(Self, LoadNote), TicketError> {
        let path = Self::path(state_dir);
        let (bytes, mode_fixed) = match File::open(&path) {
            Ok(mut f) => {
                let mut b = Vec::new();
                f.read_to_end(&mut b).map_err(io_err("read", &path))?;
                let mode = f
                    .metadata()
                    .map_err(io_err("stat", &path))?
                    .permissions()
                    .mode();
                let loose = mode & 0o077 != 0;
                if loose {
                    f.set_permissions(fs::Permissions::from_mode(0o600))
                        .map_err(io_err("chmod 0600", &path))?;
                }
                (Some(b), loose)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, false),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let fresh = |note: LoadNote| -> Result<(Self, LoadNote), TicketError> {
            let keys = Self::generate(now)?.with_policy(policy);
            keys.save(state_dir)?;
            Ok((keys, note))
        };
        let Some(bytes) = bytes else {
            return fresh(LoadNote::Created);
        };
        match Self::from_bytes(&bytes) {
            Ok(keys) => {
                let mut keys = keys.with_policy(policy);
                let changed = keys.rotate(now)?;
                if changed {
                    keys.save(state_dir)?;
                }
                let generations = keys.generations();
                Ok((
                    keys,
                    LoadNote::Loaded {
                        generations,
                        changed,
                        mode_fixed,
                    },
                ))
            }
            Err(e) => {
                let moved_to = store_fs::move_aside(&path).ok().flatten();
                fresh(LoadNote::Replaced {
                    reason: e.to_string(),
                    moved_to,
                })
            }
        }
    }

    /// Write `<state_dir>/tickets.keys` atomically and durably with mode
    /// 0600, creating the directory (0700) if it is missing
    /// ([`crate::store::fs::write_private`]).
    pub fn save(&self, state_dir: &Path) -> Result<(), TicketError> {
        store_fs::ensure_private_dir(state_dir)?;
        store_fs::write_private(&Self::path(state_dir), &self.to_bytes())?;
        Ok(())
    }

    /// Replace the policy (not stored in the file).
    pub fn with_policy(mut self, policy: TicketPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> TicketPolicy {
        self.policy
    }

    /// Generations held, the sealing one included.
    pub fn generations(&self) -> usize {
        self.gens.len()
    }

    /// Key ids, newest (sealing) first.
    pub fn ids(&self) -> Vec<u32> {
        self.gens.iter().map(|g| g.id).collect()
    }

    /// The sealing key's id.
    pub fn current_id(&self) -> u32 {
        self.gens.first().map_or(0, |g| g.id)
    }

    /// True when the sealing key is `rotate_every` old (or dated implausibly
    /// far in the future, after a clock step back).
    pub fn rotate_due(&self, now: SystemTime) -> bool {
        let now = unix_secs(now);
        let every = self.policy.rotate_secs();
        let created = self.gens.first().map_or(0, |g| g.created);
        now.saturating_sub(created) >= every || created > now.saturating_add(every)
    }

    /// Rotate if due (a new sealing key; the old one keeps opening tickets)
    /// and erase generations past their lifetime. True if anything changed
    /// (then [`save`](Self::save) and re-install).
    pub fn rotate(&mut self, now: SystemTime) -> Result<bool, TicketError> {
        let mut changed = false;
        if self.rotate_due(now) {
            self.force_rotate(now)?;
            changed = true;
        }
        Ok(self.prune(now) || changed)
    }

    /// A new sealing key now, due or not (e.g. after a suspected key leak,
    /// together with dropping the old ones by hand). Expired generations are
    /// erased too.
    pub fn force_rotate(&mut self, now: SystemTime) -> Result<(), TicketError> {
        let gen = random_generation(&SystemRandom::new(), unix_secs(now), &self.gens)?;
        self.gens.insert(0, gen);
        self.prune(now);
        Ok(())
    }

    /// Erase generations whose tickets have all expired: a generation stops
    /// sealing when the next one is made and opens tickets for `lifetime`
    /// after that. True if any was erased.
    pub fn prune(&mut self, now: SystemTime) -> bool {
        let keep = self.keep_count(unix_secs(now));
        let before = self.gens.len();
        self.gens.truncate(keep);
        self.gens.len() != before
    }

    fn keep_count(&self, now: u64) -> usize {
        let mut keep = 1;
        for i in 1..self.gens.len() {
            match self.accept_until(i) {
                Some(until) if until > now => keep = i + 1,
                _ => break,
            }
        }
        keep.min(MAX_GENERATIONS)
    }

    /// Until when (Unix seconds, exclusive) generation `i` opens tickets;
    /// `None` for the sealing generation.
    fn accept_until(&self, i: usize) -> Option<u64> {
        let successor = self.gens.get(i.checked_sub(1)?)?;
        Some(
            successor
                .created
                .saturating_add(self.policy.lifetime_secs()),
        )
    }

    /// The next time [`rotate`](Self::rotate) has something to do: the
    /// sealing key becomes due or the oldest generation expires.
    pub fn next_due(&self) -> SystemTime {
        let rotate_at = self
            .gens
            .first()
            .map_or(0, |g| g.created)
            .saturating_add(self.policy.rotate_secs());
        let expire_at = self.accept_until(self.gens.len() - 1);
        from_unix_secs(expire_at.map_or(rotate_at, |e| e.min(rotate_at)))
    }

    /// The key file encoding (see the module docs), for the file and for
    /// hand-overs. Contains the secret keys.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.gens.len() + 32);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        let n = u16::try_from(self.gens.len().min(MAX_GENERATIONS)).unwrap_or(1);
        out.extend_from_slice(&n.to_be_bytes());
        for g in self.gens.iter().take(usize::from(n)) {
            g.encode(&mut out);
        }
        let sum = digest(&SHA256, &out);
        out.extend_from_slice(sum.as_ref());
        out
    }

    /// Decode [`to_bytes`](Self::to_bytes) output (default policy). Any
    /// damage is an [`TicketError::Invalid`], never a panic.
    pub fn from_bytes(b: &[u8]) -> Result<Self, TicketError> {
        let bad = |s: &str| TicketError::Invalid(s.to_owned());
        let (body, sum) = b
            .split_at_checked(b.len().saturating_sub(SHA256_OUTPUT_LEN))
            .filter(|(body, _)| body.len() >= HEADER_LEN)
            .ok_or_else(|| bad(&format!("too short ({} bytes)", b.len())))?;
        if body.get(..8) != Some(&MAGIC[..]) {
            return Err(bad("not a ticket key file (bad magic)"));
        }
        if digest(&SHA256, body).as_ref() != sum {
            return Err(bad("checksum mismatch"));
        }
        let version = u16::from_be_bytes([body[8], body[9]]);
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let n = usize::from(u16::from_be_bytes([body[10], body[11]]));
        if n == 0 || n > MAX_GENERATIONS {
            return Err(bad(&format!("{n} generations")));
        }
        let entries = &body[HEADER_LEN..];
        if entries.len() != n * ENTRY_LEN {
            return Err(bad("length does not match the generation count"));
        }
        let gens = entries
            .chunks_exact(ENTRY_LEN)
            .map(Generation::decode)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("bad generation entry"))?;
        Self::from_generations(gens)
    }

    fn from_generations(gens: Vec<Generation>) -> Result<Self, TicketError> {
        if gens.is_empty() || gens.len() > MAX_GENERATIONS {
            return Err(TicketError::Invalid(format!("{} generations", gens.len())));
        }
        for (i, g) in gens.iter().enumerate() {
            if gens[..i].iter().any(|h| h.id == g.id) {
                return Err(TicketError::Invalid(format!("duplicate key id {}", g.id)));
            }
        }
        Ok(Self {
            gens,
            policy: TicketPolicy::default(),
        })
    }

    /// The generations for the upgrade manifest (`upgrade::TicketKeys.keys`,
    /// oldest first), one 44-byte entry each. Contains the secret keys.
    pub fn to_handoff(&self) -> Vec<Vec<u8>> {
        self.gens
            .iter()
            .rev()
            .map(|g| {
                let mut v = Vec::with_capacity(ENTRY_LEN);
                g.encode(&mut v);
                v
            })
            .collect()
    }

    /// The inverse of [`to_handoff`](Self::to_handoff) (default policy).
    pub fn from_handoff(entries: &[Vec<u8>]) -> Result<Self, TicketError> {
        let gens = entries
            .iter()
            .rev()
            .map(|e| Generation::decode(e))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| TicketError::Invalid("bad hand-over key entry".into()))?;
        Self::from_generations(gens)
    }
}

/// A generation ready for use.
struct SealKey {
    id: [u8; ID_LEN],
    aead: LessSafeKey,
    /// Unix seconds; `None` for the sealing key.
    accept_until: Option<u64>,
}

/// Immutable view of the keys used by ticket operations.
struct Snapshot {
    /// Sealing key first. Never empty.
    keys: Vec<SealKey>,
}

impl Snapshot {
    fn new(keys: &TicketKeys) -> Result<Self, TicketError> {
        let keys = keys
            .gens
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let unbound = UnboundKey::new(&CHACHA20_POLY1305, &g.secret)
                    .map_err(|_| TicketError::Invalid("AEAD key setup".into()))?;
                Ok(SealKey {
                    id: g.id.to_be_bytes(),
                    aead: LessSafeKey::new(unbound),
                    accept_until: keys.accept_until(i),
                })
            })
            .collect::<Result<Vec<_>, TicketError>>()?;
        Ok(Self { keys })
    }
}

/// Counters of ticket operations. `accepted` counts tickets that decrypted;
/// rustls may still decline to resume with one (other cipher suite or SNI),
/// so count resumed handshakes from the connection's `handshake_kind()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TicketStats {
    pub issued: u64,
    pub issue_failed: u64,
    pub accepted: u64,
    /// Key id not among the generations held (expired and erased, or from
    /// keys that were lost).
    pub rejected_unknown_key: u64,
    /// Generation still held but past its lifetime (rotation overdue).
    pub rejected_expired: u64,
    /// Malformed or failed authentication.
    pub rejected_invalid: u64,
    pub rotations: u64,
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    issue_failed: AtomicU64,
    accepted: AtomicU64,
    rejected_unknown_key: AtomicU64,
    rejected_expired: AtomicU64,
    rejected_invalid: AtomicU64,
    rotations: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// rustls [`ProducesTickets`] over [`TicketKeys`], persisted in a state
/// directory. Share one `Arc` between every `ServerConfig` the process
/// builds (certificate reloads included), or tickets issued under one
/// config are not accepted under the next.
pub struct PersistentTicketer {
    /// The authoritative keys; locked only to rotate or save.
    keys: Mutex<TicketKeys>,
    snapshot: RwLock<Arc<Snapshot>>,
    state_dir: Option<PathBuf>,
    lifetime: u32,
    rng: SystemRandom,
    counters: Counters,
}

impl fmt::Debug for PersistentTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistentTicketer")
            .field("state_dir", &self.state_dir)
            .field("lifetime", &self.lifetime)
            .field("generations", &self.snapshot().keys.len())
            .finish_non_exhaustive()
    }
}

impl PersistentTicketer {
    /// A ticketer over `keys`; rotations are saved to `state_dir` if given
    /// (`None`: in memory only, e.g. when the state directory is unusable).
    pub fn new(keys: TicketKeys, state_dir: Option<PathBuf>) -> Result<Self, TicketError> {
        let snapshot = Snapshot::new(&keys)?;
        let lifetime = u32::try_from(keys.policy.lifetime_secs()).unwrap_or(u32::MAX);
        Ok(Self {
            keys: Mutex::new(keys),
            snapshot: RwLock::new(Arc::new(snapshot)),
            state_dir,
            lifetime,
            rng: SystemRandom::new(),
            counters: Counters::default(),
        })
    }

    /// [`TicketKeys::load_or_create`] in `state_dir`, then a ticketer
    /// saving there.
    pub fn open(state_dir: &Path) -> Result<(Arc<Self>, LoadNote), TicketError> {
        let (keys, note) = TicketKeys::load_or_create(state_dir)?;
        Ok((Arc::new(Self::new(keys, Some(state_dir.to_owned()))?), note))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, TicketKeys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn install_snapshot(&self, keys: &TicketKeys) -> Result<(), TicketError> {
        let snap = Arc::new(Snapshot::new(keys)?);
        match self.snapshot.write() {
            Ok(mut g) => *g = snap,
            Err(p) => *p.into_inner() = snap,
        }
        Ok(())
    }

    fn apply(&self, keys: &TicketKeys) -> Result<(), TicketError> {
        self.install_snapshot(keys)?;
        match &self.state_dir {
            Some(dir) => keys.save(dir),
            None => Ok(()),
        }
    }

    /// Rotate and erase expired generations if due, then save. True if the
    /// keys changed. On `Err` the new keys are already in use but not saved
    /// (after a restart, tickets of the newest generation fall back to full
    /// handshakes); [`save`](Self::save) can be retried. Blocks on fsync:
    /// call it off the shard reactors.
    pub fn rotate_if_due(&self, now: SystemTime) -> Result<bool, TicketError> {
        let mut keys = self.lock_keys();
        let before = keys.ids();
        if !keys.rotate(now)? {
            return Ok(false);
        }
        if keys.current_id() != before.first().copied().unwrap_or(0) {
            bump(&self.counters.rotations);
        }
        self.apply(&keys).map(|()| true)
    }

    /// Rotate now, due or not, then save.
    pub fn force_rotate(&self, now: SystemTime) -> Result<(), TicketError> {
        let mut keys = self.lock_keys();
        keys.force_rotate(now)?;
        bump(&self.counters.rotations);
        self.apply(&keys)
    }

    /// Save the keys to the state directory (no-op without one).
    pub fn save(&self) -> Result<(), TicketError> {
        let keys = self.lock_keys();
        match &self.state_dir {
            Some(dir) => keys.save(dir),
            None => Ok(()),
        }
    }

    /// A copy of the keys (for the upgrade hand-over: `to_handoff`).
    pub fn keys(&self) -> TicketKeys {
        self.lock_keys().clone()
    }

    /// When [`rotate_if_due`](Self::rotate_if_due) next has work.
    pub fn next_due(&self) -> SystemTime {
        self.lock_keys().next_due()
    }

    pub fn stats(&self) -> TicketStats {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TicketStats {
            issued: r(&c.issued),
            issue_failed: r(&c.issue_failed),
            accepted: r(&c.accepted),
            rejected_unknown_key: r(&c.rejected_unknown_key),
            rejected_expired: r(&c.rejected_expired),
            rejected_invalid: r(&c.rejected_invalid),
            rotations: r(&c.rotations),
        }
    }

    fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let snap = self.snapshot();
        let key = snap.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                out.get_mut(ID_LEN + NONCE_LEN..)?,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn open_ticket(&self, cipher: &[u8]) -> Result<Vec<u8>, Reject> {
        let (id, rest) = cipher
            .split_first_chunk::<ID_LEN>()
            .ok_or(Reject::Invalid)?;
        let (nonce, sealed) = rest
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(Reject::Invalid)?;
        if sealed.len() < TAG_LEN {
            return Err(Reject::Invalid);
        }
        let snap = self.snapshot();
        let key = snap
            .keys
            .iter()
            .find(|k| k.id == *id)
            .ok_or(Reject::UnknownKey)?;
        if let Some(until) = key.accept_until {
            if unix_secs(SystemTime::now()) >= until {
                return Err(Reject::Expired);
            }
        }
        let mut buf = sealed.to_vec();
        let n = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(*id),
                &mut buf,
            )
            .map_err(|_| Reject::Invalid)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

enum Reject {
    UnknownKey,
    Expired,
    Invalid,
}

// Compile-time check that the AEAD's tag is what the format assumes.
const _: () = assert!(aead::MAX_TAG_LEN == TAG_LEN);

impl ProducesTickets for PersistentTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let r = self.seal(plain);
        bump(if r.is_some() {
            &self.counters.issued
        } else {
            &self.counters.issue_failed
        });
        r
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let c = &self.counters;
        match self.open_ticket(cipher) {
            Ok(plain) => {
                bump(&c.accepted);
                Some(plain)
            }
            Err(Reject::UnknownKey) => {
                bump(&c.rejected_unknown_key);
                None
            }
            Err(Reject::Expired) => {
                bump(&c.rejected_expired);
                None
            }
            Err(Reject::Invalid) => {
                bump(&c.rejected_invalid);
                None
            }
        }
    }
}

/// Turn on stateless resumption with `ticketer`: rustls seals tickets with
/// it and keeps no session cache (`NoServerSessionStorage`, so nothing is
/// shared between shard threads but the ticketer). `send_tls13_tickets` is
/// left as configured (rustls default 2, what the lean handshake expects).
/// Call before [`crate::tls::handshake::prepare_config`]; 0-RTT stays off.
pub fn install(config: &mut ServerConfig, ticketer: Arc<PersistentTicketer>) {
    config.ticketer = ticketer;
    config.session_storage = Arc::new(NoServerSessionStorage {});
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::OnceLock;

    use rustls::crypto::ring as provider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConnection};

    use crate::tls::handshake::{prepare_config, Handshake, Progress};
    use presence_proto::ALPN;

    const HOUR: Duration = Duration::from_secs(3600);

    fn pki() -> &'static (CertificateDer<'static>, Vec<u8>) {
        static PKI: OnceLock<(CertificateDer<'static>, Vec<u8>)> = OnceLock::new();
        PKI.get_or_init(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
                .expect("self-signed certificate");
            (ck.cert.der().clone(), ck.key_pair.serialize_der())
        })
    }

    /// The daemon's config (TLS 1.3, ALPN) with `ticketer` installed.
    fn server_config(ticketer: &Arc<PersistentTicketer>) -> ServerConfig {
        let (cert, key) = pki();
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
            )
            .expect("server certificate");
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        install(&mut cfg, ticketer.clone());
        cfg
    }

    /// A client config with rustls's default in-memory session cache.
    fn client_config() -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(pki().0.clone()).expect("root");
        let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(cfg)
    }

    fn new_client(cfg: &Arc<ClientConfig>) -> ClientConnection {
        ClientConnection::new(
            cfg.clone(),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client")
    }

    fn drain(from: &mut dyn FnMut(&mut Vec<u8>) -> io::Result<usize>) -> Vec<u8> {
        let mut v = Vec::new();
        while from(&mut v).expect("write_tls to a Vec") > 0 {}
        v
    }

    /// A buffered handshake in memory, tickets delivered to the client.
    /// Returns (client kind, server kind).
    fn connect(
        server_cfg: &Arc<ServerConfig>,
        client_cfg: &Arc<ClientConfig>,
    ) -> (Option<HandshakeKind>, Option<HandshakeKind>) {
        let mut client = new_client(client_cfg);
        let mut server = ServerConnection::new(server_cfg.clone()).expect("server");
        for _ in 0..20 {
            let c2s = drain(&mut |v| client.write_tls(v));
            let mut b = &c2s[..];
            while !b.is_empty() {
                server.read_tls(&mut b).expect("read_tls");
                server.process_new_packets().expect("server accepts");
            }
            let s2c = drain(&mut |v| server.write_tls(v));
            let mut b = &s2c[..];
            while !b.is_empty() {
                client.read_tls(&mut b).expect("read_tls");
                client.process_new_packets().expect("client accepts");
            }
            if c2s.is_empty()
                && s2c.is_empty()
                && !client.is_handshaking()
                && !server.is_handshaking()
            {
                assert_eq!(server.handshake_kind(), client.handshake_kind());
                return (client.handshake_kind(), server.handshake_kind());
            }
        }
        panic!("handshake did not finish");
    }

    fn ticketer_at(now: SystemTime) -> Arc<PersistentTicketer> {
        let keys = TicketKeys::generate(now).expect("keys");
        Arc::new(PersistentTicketer::new(keys, None).expect("ticketer"))
    }

    const FULL: (Option<HandshakeKind>, Option<HandshakeKind>) =
        (Some(HandshakeKind::Full), Some(HandshakeKind::Full));
    const RESUMED: (Option<HandshakeKind>, Option<HandshakeKind>) =
        (Some(HandshakeKind::Resumed), Some(HandshakeKind::Resumed));

    #[test]
    fn full_then_resumed() {
        let t = ticketer_at(SystemTime::now());
        let server = Arc::new(server_config(&t));
        assert!(server.ticketer.enabled());
        assert!(!server.session_storage.can_cache(), "stateless only");
        assert_eq!(server.send_tls13_tickets, 2);
        let client = client_config();
        assert_eq!(connect(&server, &client), FULL);
        let s = t.stats();
        assert_eq!((s.issued, s.accepted), (2, 0));
        assert_eq!(connect(&server, &client), RESUMED);
        assert_eq!(connect(&server, &client), RESUMED);
        let s = t.stats();
        assert_eq!(s.accepted, 2);
        assert_eq!(s.issued, 6);
        // Another client has no ticket.
        assert_eq!(connect(&server, &client_config()), FULL);
        assert_eq!(t.lifetime(), 24 * 3600);
    }

    #[test]
    fn resumes_through_the_lean_driver() {
        let t = ticketer_at(SystemTime::now());
        let server = prepare_config(server_config(&t));
        let client_cfg = client_config();
        for expected in [HandshakeKind::Full, HandshakeKind::Resumed] {
            let mut client = new_client(&client_cfg);
            let mut hs = Handshake::new(server.clone()).expect("prepared");
            let mut done = false;
            for _ in 0..20 {
                let c2s = drain(&mut |v| client.write_tls(v));
                hs.feed(&c2s);
                let mut out = Vec::new();
                let p = hs.step(&mut out).expect("handshake");
                let mut b = &out[..];
                while !b.is_empty() {
                    client.read_tls(&mut b).expect("read_tls");
                    client.process_new_packets().expect("client accepts");
                }
                if matches!(p, Progress::Done(_)) {
                    done = true;
                    break;
                }
            }
            assert!(done);
            assert_eq!(client.handshake_kind(), Some(expected));
        }
        assert_eq!(t.stats().accepted, 1);
    }

    #[test]
    fn resumes_after_reload_from_file_and_handoff() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, note) = TicketKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(note, LoadNote::Created);
        let t1 = Arc::new(PersistentTicketer::new(keys, Some(dir.path().into())).unwrap());
        let client = client_config();
        assert_eq!(connect(&Arc::new(server_config(&t1)), &client), FULL);
        drop(t1);

        // A new process: keys from the file.
        let (t2, note) = PersistentTicketer::open(dir.path()).unwrap();
        assert!(
            matches!(
                note,
                LoadNote::Loaded {
                    generations: 1,
                    changed: false,
                    mode_fixed: false
                }
            ),
            "{note}"
        );
        assert_eq!(connect(&Arc::new(server_config(&t2)), &client), RESUMED);

        // An upgrade: keys handed over as bytes, either encoding.
        let blob = t2.keys().to_bytes();
        let t3 = Arc::new(
            PersistentTicketer::new(TicketKeys::from_bytes(&blob).unwrap(), None).unwrap(),
        );
        assert_eq!(connect(&Arc::new(server_config(&t3)), &client), RESUMED);
        let parts = t2.keys().to_handoff();
        let t4 = Arc::new(
            PersistentTicketer::new(TicketKeys::from_handoff(&parts).unwrap(), None).unwrap(),
        );
        assert_eq!(connect(&Arc::new(server_config(&t4)), &client), RESUMED);
    }

    #[test]
    fn rotation_keeps_previous_generations_then_expires_them() {
        // Whole seconds: the key file's resolution.
        let t0 = from_unix_secs(unix_secs(SystemTime::now()));
        let dir = tempfile::tempdir().unwrap();
        let keys = TicketKeys::generate(t0).unwrap();
        let t = Arc::new(PersistentTicketer::new(keys, Some(dir.path().into())).unwrap());
        let server = Arc::new(server_config(&t));
        // Clients holding only tickets of generation 0.
        let c1 = client_config();
        let c2 = client_config();
        assert_eq!(connect(&server, &c1), FULL);
        assert_eq!(connect(&server, &c2), FULL);

        assert!(!t.rotate_if_due(t0 + 11 * HOUR).unwrap());
        assert!(t.rotate_if_due(t0 + 13 * HOUR).unwrap());
        assert!(!t.rotate_if_due(t0 + 14 * HOUR).unwrap());
        assert!(t.rotate_if_due(t0 + 26 * HOUR).unwrap());
        assert_eq!(t.keys().generations(), 3);
        // Saved on rotation.
        let (on_disk, _) =
            TicketKeys::load_or_create_with(dir.path(), TicketPolicy::default(), t0 + 26 * HOUR)
                .unwrap();
        assert_eq!(on_disk.ids(), t.keys().ids());

        // Generation 0 stopped sealing at +13 h: open until +37 h.
        assert_eq!(connect(&server, &c1), RESUMED);
        assert_eq!(t.keys().next_due(), t0 + 37 * HOUR);

        // +39 h: rotation; generation 0 erased, its tickets fall back.
        assert!(t.rotate_if_due(t0 + 39 * HOUR).unwrap());
        assert_eq!(t.keys().generations(), 3);
        assert_eq!(t.stats().rotations, 3);
        assert_eq!(connect(&server, &c2), FULL);
        assert_eq!(t.stats().rejected_unknown_key, 1);
        // c2 got fresh tickets from the newest generation.
        assert_eq!(connect(&server, &c2), RESUMED);
    }

    #[test]
    fn overdue_generation_is_refused_by_the_clock() {
        // Keys rotated two days ago and never pruned since.
        let now = SystemTime::now();
        let mut keys = TicketKeys::generate(now - 72 * HOUR).unwrap();
        keys.force_rotate(now - 48 * HOUR).unwrap();
        assert_eq!(keys.generations(), 2);
        let old_only = {
            let mut k = keys.clone();
            k.gens.remove(0);
            k
        };
        let sealer = PersistentTicketer::new(old_only, None).unwrap();
        let ticket = sealer.encrypt(b"session").unwrap();
        let t = PersistentTicketer::new(keys.clone(), None).unwrap();
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.stats().rejected_expired, 1);
        // Pruning drops it too.
        assert!(keys.prune(now));
        assert_eq!(keys.generations(), 1);
    }

    #[test]
    fn corrupt_or_loose_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = TicketKeys::path(dir.path());
        let (keys, note) = TicketKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(note, LoadNote::Created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let good = fs::read(&path).unwrap();
        assert_eq!(good, keys.to_bytes());
        assert_eq!(good.len(), HEADER_LEN + ENTRY_LEN + 32);

        // One flipped bit: checksum.
        let mut bad = good.clone();
        bad[20] ^= 1;
        fs::write(&path, &bad).unwrap();
        let (fresh, note) = TicketKeys::load_or_create(dir.path()).unwrap();
        match &note {
            LoadNote::Replaced { reason, moved_to } => {
                assert!(reason.contains("checksum"), "{reason}");
                assert_eq!(fs::read(moved_to.as_ref().unwrap()).unwrap(), bad);
            }
            n => panic!("{n:?}"),
        }
        assert!(note.to_string().contains("created fresh keys"));
        assert_ne!(fresh.current_id(), keys.current_id());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            TicketKeys::from_bytes(&fs::read(&path).unwrap())
                .unwrap()
                .ids(),
            fresh.ids()
        );

        // Garbage and empty files.
        for junk in [&b""[..], b"hello", &[0u8; 200][..]] {
            fs::write(&path, junk).unwrap();
            let (_, note) = TicketKeys::load_or_create(dir.path()).unwrap();
            assert!(matches!(note, LoadNote::Replaced { .. }), "{note:?}");
        }

        // Readable by others: reset to 0600.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (_, note) = TicketKeys::load_or_create(dir.path()).unwrap();
        assert!(
            matches!(
                note,
                LoadNote::Loaded {
                    mode_fixed: true,
                    ..
                }
            ),
            "{note:?}"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");

        // A missing state directory is created.
        let sub = dir.path().join("a/b");
        let (_, note) = TicketKeys::load_or_create(&sub).unwrap();
        assert_eq!(note, LoadNote::Created);
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn unreadable_state_dir_is_an_error_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails.
        fs::create_dir(TicketKeys::path(dir.path())).unwrap();
        let e = TicketKeys::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }

    #[test]
    fn from_bytes_rejects_damage_without_panicking() {
        let mut keys = TicketKeys::generate(SystemTime::now()).unwrap();
        keys.force_rotate(SystemTime::now() + HOUR).unwrap();
        let good = keys.to_bytes();
        assert_eq!(TicketKeys::from_bytes(&good).unwrap().ids(), keys.ids());
        for n in 0..good.len() {
            assert!(TicketKeys::from_bytes(&good[..n]).is_err(), "prefix {n}");
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x80;
            assert!(TicketKeys::from_bytes(&b).is_err(), "bit flip at {i}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(TicketKeys::from_bytes(&long).is_err());
        // Hand-over entries.
        assert!(TicketKeys::from_handoff(&[]).is_err());
        assert!(TicketKeys::from_handoff(&[vec![1, 2, 3]]).is_err());
        let mut dup = keys.to_handoff();
        dup.push(dup[0].clone());
        assert!(TicketKeys::from_handoff(&dup).is_err());
    }

    #[test]
    fn garbage_tickets_are_refused() {
        let t = ticketer_at(SystemTime::now());
        let plain = b"a serialized ServerSessionValue".to_vec();
        let ticket = t.encrypt(&plain).unwrap();
        assert_eq!(ticket.len(), ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        assert_eq!(t.decrypt(&ticket), Some(plain.clone()));
        assert_ne!(t.encrypt(&plain).unwrap(), ticket, "random nonce");
        assert_eq!(
            t.encrypt(b"").map(|c| t.decrypt(&c)),
            Some(Some(Vec::new()))
        );

        for n in 0..ticket.len() {
            assert_eq!(t.decrypt(&ticket[..n]), None, "prefix {n}");
        }
        for i in 0..ticket.len() {
            let mut b = ticket.clone();
            b[i] ^= 1;
            assert_eq!(t.decrypt(&b), None, "bit flip at {i}");
        }
        // Another key set's tickets, and pseudo-random junk.
        let other = ticketer_at(SystemTime::now());
        assert_eq!(t.decrypt(&other.encrypt(&plain).unwrap()), None);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(t.decrypt(&junk), None);
        }
        let mut same_id = ticket.clone();
        same_id.truncate(ID_LEN);
        same_id.extend_from_slice(&[0u8; 100]);
        assert_eq!(t.decrypt(&same_id), None);
        let s = t.stats();
        assert!(s.rejected_invalid > 0 && s.rejected_unknown_key > 0);
        assert_eq!(s.accepted, 2);
    }

    #[test]
    fn ticketer_is_shared_across_threads() {
        let t = ticketer_at(SystemTime::now());
        let ticket = t.encrypt(b"x").unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"x"[..]));
                        let c = t.encrypt(b"y").unwrap();
                        assert_eq!(t.decrypt(&c).as_deref(), Some(&b"y"[..]));
                    }
                });
            }
            s.spawn(|| {
                for i in 0..5 {
                    t.force_rotate(SystemTime::now() + HOUR * i).unwrap();
                }
            });
        });
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"x"[..]));
    }
}
