//! Every gossip key a node publishes about itself, and how each value is
//! written and read.
//!
//! Kept in one place so the whole per-node state (which travels in
//! datagrams: chitchat cannot carry values much over 64 KB) can be read at
//! a glance, and so modules that publish facts (`drain`) do not own keys
//! the cluster has to read back.

use crate::store::VersionVector;

/// Keys are short: chitchat's whole per-node state travels in datagrams.
pub(super) const K_API: &str = "api";
pub(super) const K_NAME: &str = "name";
pub(super) const K_REGION: &str = "region";
pub(super) const K_ZONE: &str = "zone";
pub(super) const K_STATUS: &str = "status";
pub(super) const K_VERSION: &str = "version";
pub(super) const K_VV: &str = "vv";
pub(super) const K_HASH: &str = "hash";
pub(super) const K_AUTH: &str = "auth";
/// Drain progress, published while a node drains (zeros otherwise).
const K_CONNS: &str = "conns";
const K_TUNNELS: &str = "tunnels";
const K_DEADLINE: &str = "drain_deadline";
const K_LISTENERS_CLOSED: &str = "listeners_closed";
const K_CUT: &str = "cut";
/// Rate-limit admissions of this node's busiest clients (cluster scope):
/// `host:key:total` entries, at most `proxy::rate::HOT_KEYS`.
pub(super) const K_RATE: &str = "rl";

/// Values of `status`.
pub const STATUS_SERVING: &str = "serving";
pub const STATUS_DRAINING: &str = "draining";
pub const STATUS_DRAINED: &str = "drained";

/// What a member publishes of its drain, which `charonctl node drain
/// --wait` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrainFacts {
    pub http_connections: u64,
    pub tunnels: u64,
    pub deadline_ms: u64,
    pub listeners_closed: bool,
    pub cut: u64,
}

impl DrainFacts {
    /// The key/value pairs of these facts.
    pub(super) fn encode(&self) -> [(&'static str, String); 5] {
        [
            (K_CONNS, self.http_connections.to_string()),
            (K_TUNNELS, self.tunnels.to_string()),
            (K_DEADLINE, self.deadline_ms.to_string()),
            (K_LISTENERS_CLOSED, self.listeners_closed.to_string()),
            (K_CUT, self.cut.to_string()),
        ]
    }

    /// Reads the facts back; a missing or unreadable value is 0 / false
    /// (a peer that never drained publishes none).
    pub(super) fn decode(get: impl Fn(&str) -> Option<String>) -> DrainFacts {
        let num = |k| get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        DrainFacts {
            http_connections: num(K_CONNS),
            tunnels: num(K_TUNNELS),
            deadline_ms: num(K_DEADLINE),
            listeners_closed: get(K_LISTENERS_CLOSED).as_deref() == Some("true"),
            cut: num(K_CUT),
        }
    }
}

/// `origin=seq` pairs joined by `,`: compact enough for gossip.
pub(super) fn encode_vv(vv: &VersionVector) -> String {
    vv.iter()
        .map(|(o, s)| format!("{o}={s}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn decode_vv(s: &str) -> VersionVector {
    s.split(',')
        .filter_map(|p| {
            let (o, n) = p.split_once('=')?;
            Some((o.to_string(), n.parse().ok()?))
        })
        .collect()
}

/// Rate-limit entries (host id, client key, admitted in all) as gossip:
/// `host:keyhex:total` joined by `,` (host ids have no `:` or `,`).
pub fn encode_rate(entries: &[(String, u64, u64)]) -> String {
    entries
        .iter()
        .map(|(h, k, t)| format!("{h}:{k:x}:{t}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode_rate(s: &str) -> Vec<(String, u64, u64)> {
    s.split(',')
        .filter_map(|e| {
            let mut p = e.split(':');
            let (h, k, t) = (p.next()?, p.next()?, p.next()?);
            Some((
                h.to_string(),
                u64::from_str_radix(k, 16).ok()?,
                t.parse().ok()?,
            ))
        })
        .collect()
}

/// The store's state hash as 16 hex digits.
pub(super) fn hash_hex(h: u64) -> String {
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn version_vectors_round_trip() {
        let vv: VersionVector = [("a".to_string(), 3), ("b".to_string(), 10)].into();
        assert_eq!(encode_vv(&vv), "a=3,b=10");
        assert_eq!(decode_vv(&encode_vv(&vv)), vv);
        assert!(decode_vv("").is_empty());
        assert_eq!(decode_vv("a=1,junk,b=x"), [("a".to_string(), 1)].into());
    }

    #[test]
    fn rate_entries_round_trip() {
        let e = vec![
            ("h-1".to_string(), 0xdead_beef_u64, 42),
            ("h-2".to_string(), 7, 1),
        ];
        assert_eq!(decode_rate(&encode_rate(&e)), e);
        assert!(decode_rate("").is_empty());
    }

    #[test]
    fn drain_facts_round_trip() {
        let facts = DrainFacts {
            http_connections: 4,
            tunnels: 2,
            deadline_ms: 1_700_000_000_000,
            listeners_closed: true,
            cut: 1,
        };
        let state: BTreeMap<&str, String> = facts.encode().into_iter().collect();
        assert_eq!(DrainFacts::decode(|k| state.get(k).cloned()), facts);
        assert_eq!(DrainFacts::decode(|_| None), DrainFacts::default());
    }
}
