//! The kernel's share of a connection: slab caches from /proc/slabinfo
//! (root only) summed as active_objs * objsize, and TCP buffer pages from
//! /proc/net/sockstat. Both ends of every loopback connection live on this
//! machine, so deltas cover the client and the server socket.

use std::collections::BTreeMap;

/// Caches that grow with TCP connections (both the socket and its file).
const CACHES: &[&str] = &[
    "TCP",
    "TCPv6",
    "tw_sock_TCP",
    "tw_sock_TCPv6",
    "request_sock_TCP",
    "request_sock_TCPv6",
    "sock_inode_cache",
    "filp",
    "dentry",
    "eventpoll_epi",
    "eventpoll_pwq",
    "skbuff_head_cache",
    "skbuff_small_head",
    "skbuff_fclone_cache",
    "inet_peer_cache",
    "ip_fib_alias",
];

fn counted(name: &str) -> bool {
    CACHES.contains(&name) || name.starts_with("kmalloc-")
}

/// Bytes held by each counted slab cache.
#[derive(Debug, Clone, Default)]
pub struct Slab {
    pub caches: BTreeMap<String, u64>,
}

impl Slab {
    /// Read /proc/slabinfo; None when it cannot be read (not root).
    pub fn read() -> Option<Slab> {
        let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
        Some(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Slab {
        let mut caches = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.starts_with("slabinfo") {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || !counted(f[0]) {
                continue;
            }
            let (Ok(active), Ok(size)) = (f[1].parse::<u64>(), f[3].parse::<u64>()) else {
                continue;
            };
            caches.insert(f[0].to_owned(), active * size);
        }
        Slab { caches }
    }

    pub fn total(&self) -> u64 {
        self.caches.values().sum()
    }
}

/// Pages of TCP socket buffers (the `mem` field of /proc/net/sockstat).
pub fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mem")?;
    f.get(i + 1)?.parse().ok()
}

/// Least-squares slope and intercept of y over x; None with < 2 distinct x.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slabinfo_and_sums_counted_caches() {
        let text = "slabinfo - version: 2.1\n\
# name <active_objs> <num_objs> <objsize> ...\n\
TCP                   91     91   2368   13    8 : tunables    0    0    0 : slabdata      7      7      0\n\
filp                 703    735    192   21    1 : tunables    0    0    0 : slabdata     35     35      0\n\
kmalloc-64          2560   2560     64   64    1 : tunables    0    0    0 : slabdata     40     40      0\n\
btrfs_inode            9      9   1000   1    1 : tunables    0    0    0 : slabdata     40     40      0\n";
        let s = Slab::parse(text);
        assert_eq!(s.caches.len(), 3);
        assert_eq!(s.total(), 91 * 2368 + 703 * 192 + 2560 * 64);
    }

    #[test]
    fn fit_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (0..5)
            .map(|i| (i as f64 * 1000.0, 5e6 + 3000.0 * i as f64 * 1000.0))
            .collect();
        let (slope, icpt) = fit(&pts).unwrap();
        assert!((slope - 3000.0).abs() < 1e-6);
        assert!((icpt - 5e6).abs() < 1e-3);
        assert!(fit(&[(1.0, 2.0)]).is_none());
        assert!(fit(&[(1.0, 2.0), (1.0, 3.0)]).is_none());
    }
}
