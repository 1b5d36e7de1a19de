//! Which shard owns an agent id's presence record. Its own module because
//! both the presence table and the upgrade manifest (which checks that a
//! handed-over record arrives at its owner) need it, and the table depends
//! on the manifest's hand-over types.

/// Which shard owns the presence record of `id`: FNV-1a of the id, modulo
/// the shard count. Stable across builds (it must agree across an upgrade).
pub fn owner_shard(id: &[u8], shards: usize) -> usize {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(id);
    (h.finish() % shards as u64) as usize
}
