//! Process-wide figures the control socket adds to the shards' snapshots
//! (per-shard counters and snapshots live in `shard/counters.rs`).

pub use crate::shard::counters::{LatencySummary, ShardSnapshot};

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// Live heap bytes allocated through jemalloc (None when jemalloc is not the
/// global allocator, e.g. in unit tests).
pub fn heap_bytes() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64;
    // Without jemalloc as the global allocator its own arenas are nearly empty.
    (allocated > 0).then_some(allocated)
}
