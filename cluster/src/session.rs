//! Session identity and its total order across the cluster.
//!
//! A session is ordered by the tuple (accept time ms, node id, boot epoch,
//! per-node counter), compared field by field (the string form is not
//! compared). Its string form, stored in the KV value and the events, is
//! `<accept_ms>-<node>-<epoch>-<counter>`; the node id may itself contain
//! `-`, so the parser takes the first field from the left and the last two
//! from the right.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// Unix ms when the session's HELLO was accepted.
    pub accept_ms: u64,
    /// The node that accepted it.
    pub node: String,
    /// That node's boot epoch (increases with every start of the node).
    pub epoch: u64,
    /// Per-node (per-epoch) counter, to order sessions accepted in the same ms.
    pub counter: u64,
}

impl SessionId {
    pub fn new(accept_ms: u64, node: impl Into<String>, epoch: u64, counter: u64) -> Self {
        Self {
            accept_ms,
            node: node.into(),
            epoch,
            counter,
        }
    }
}

impl Ord for SessionId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.accept_ms
            .cmp(&other.accept_ms)
            .then_with(|| self.node.as_bytes().cmp(other.node.as_bytes()))
            .then_with(|| self.epoch.cmp(&other.epoch))
            .then_with(|| self.counter.cmp(&other.counter))
    }
}

impl PartialOrd for SessionId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}-{}",
            self.accept_ms, self.node, self.epoch, self.counter
        )
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("session `{text}`: {reason} (expected `<accept_ms>-<node>-<epoch>-<counter>`)")]
pub struct SessionParseError {
    pub text: String,
    pub reason: &'static str,
}

impl FromStr for SessionId {
    type Err = SessionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SessionParseError {
            text: s.to_string(),
            reason,
        };
        let (accept, rest) = s.split_once('-').ok_or_else(|| err("too few fields"))?;
        let (rest, counter) = rest.rsplit_once('-').ok_or_else(|| err("too few fields"))?;
        let (node, epoch) = rest.rsplit_once('-').ok_or_else(|| err("too few fields"))?;
        if node.is_empty() {
            return Err(err("empty node id"));
        }
        let num = |t: &str, what| {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(what));
            }
            t.parse::<u64>().map_err(|_| err(what))
        };
        Ok(SessionId {
            accept_ms: num(accept, "accept_ms is not a u64")?,
            node: node.to_string(),
            epoch: num(epoch, "epoch is not a u64")?,
            counter: num(counter, "counter is not a u64")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_dashes_in_node() {
        let s = SessionId::new(1795507720584, "node-a-1", 3, 17);
        let text = s.to_string();
        assert_eq!(text, "1795507720584-node-a-1-3-17");
        assert_eq!(text.parse::<SessionId>().unwrap(), s);
    }

    #[test]
    fn order_is_the_tuple_not_the_string() {
        let a = SessionId::new(999, "b", 1, 1);
        let b = SessionId::new(1000, "a", 1, 1);
        assert!(a < b, "999 < 1000 although \"999\" > \"1000\" as strings");
        assert!(a.to_string() > b.to_string());
        let c = SessionId::new(1000, "a", 1, 2);
        let d = SessionId::new(1000, "a", 2, 0);
        assert!(b < c && c < d);
        assert!(SessionId::new(1000, "a", 9, 9) < SessionId::new(1000, "b", 0, 0));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", "1-a-2", "x-a-1-2", "1--1-2", "1-a-1-", "1-a--2", "1-a-1-+2",
        ] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad}");
        }
    }
}
