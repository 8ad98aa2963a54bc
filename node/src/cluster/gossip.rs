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
/// The whole version vector in one value: what nodes of earlier versions
/// publish (read only, as a fallback; see [`read_vv`]).
pub(super) const K_VV: &str = "vv";
/// One key per origin, `seq:<origin>` = seq: what nodes of the previous
/// version publish (read only, as a fallback; see [`read_vv`]).
pub(super) const K_SEQ_PREFIX: &str = "seq:";
/// The vector in [`VV_BUCKETS`] keys, `vv/<b>` = `origin=seq,...` for the
/// origins that hash to bucket b. Neither one value for the whole vector
/// (chitchat resends a changed value whole: at 100 nodes writing, ~5 KB per
/// node per write, more than a datagram's worth per round) nor one key per
/// origin (chitchat clones every live member's whole key map on every
/// gossip round where a member changed: at 100 nodes x 100 origins that
/// clone was a third of a simulated cluster's CPU). A write changes one
/// bucket: ~1/16 of the vector.
pub(super) const K_VV_BUCKET_PREFIX: &str = "vv/";
pub(super) const VV_BUCKETS: u64 = 16;
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

/// `origin=seq` pairs joined by `,`: the `vv` value of earlier versions
/// (only the tests write it now; [`decode_vv`] reads it, and bucket values).
#[cfg(test)]
pub(super) fn encode_vv(vv: &VersionVector) -> String {
    vv.iter()
        .map(|(o, s)| format!("{o}={s}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The bucket of `origin`: FNV-1a of its bytes, so every node and version
/// agrees (std's hasher makes no such promise).
fn bucket_of(origin: &str) -> u64 {
    let h = origin.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    h % VV_BUCKETS
}

fn bucket_key(b: u64) -> String {
    format!("{K_VV_BUCKET_PREFIX}{b:x}")
}

/// A member's version vector from its `vv/` buckets, or from what a node of
/// an earlier version publishes: `seq:` keys, or the one `vv` value.
pub(super) fn read_vv(state: &chitchat::NodeState) -> VersionVector {
    let mut vv = VersionVector::new();
    for (_, v) in state.iter_prefix(K_VV_BUCKET_PREFIX) {
        vv.extend(decode_vv(&v.value));
    }
    for (k, v) in state.iter_prefix(K_SEQ_PREFIX) {
        if let Ok(seq) = v.value.parse() {
            vv.insert(k[K_SEQ_PREFIX.len()..].to_string(), seq);
        }
    }
    if vv.is_empty() {
        return decode_vv(state.get(K_VV).unwrap_or(""));
    }
    vv
}

/// Every bucket key of `vv` with its value: what a node publishes at start.
pub(super) fn vv_keys(vv: &VersionVector) -> Vec<(String, String)> {
    vv_changes(&VersionVector::new(), vv)
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
}

/// The key changes that take a published vector from `old` to `new`:
/// `(key, Some(value))` to set each bucket in which an origin moved,
/// `(key, None)` to delete a bucket left empty (its origins compacted away).
pub(super) fn vv_changes(
    old: &VersionVector,
    new: &VersionVector,
) -> Vec<(String, Option<String>)> {
    let mut moved: Vec<u64> = new
        .iter()
        .filter(|(o, s)| old.get(*o) != Some(s))
        .map(|(o, _)| bucket_of(o))
        .chain(
            old.keys()
                .filter(|o| !new.contains_key(*o))
                .map(|o| bucket_of(o)),
        )
        .collect();
    moved.sort_unstable();
    moved.dedup();
    moved
        .into_iter()
        .map(|b| {
            let value = new
                .iter()
                .filter(|(o, _)| bucket_of(o) == b)
                .map(|(o, s)| format!("{o}={s}"))
                .collect::<Vec<_>>()
                .join(",");
            (bucket_key(b), (!value.is_empty()).then_some(value))
        })
        .collect()
}

pub(super) fn decode_vv(s: &str) -> VersionVector {
    pairs(s).map(|(o, n)| (o.to_string(), n)).collect()
}

/// The `origin=seq` pairs of a `vv` or bucket value, borrowed (unreadable
/// pairs are skipped).
fn pairs(s: &str) -> impl Iterator<Item = (&str, u64)> {
    s.split(',').filter_map(|p| {
        let (o, n) = p.split_once('=')?;
        Some((o, n.parse().ok()?))
    })
}

/// Whether a member's published vector has a write `ours` lacks, looking
/// only at its vector keys set after its state's version `since` (0: at
/// all). The pull loop's test, on every member whose gossip changed since
/// a look that found it not ahead (and ours only grew since): a write
/// changes one bucket, so this reads about 1/16 of the vector, without
/// allocating, where decoding it whole ([`read_vv`]) for every changed
/// member was a fifth of a 100-node simulated cluster's CPU. Reads the
/// same keys as [`read_vv`].
pub(super) fn ahead_since(state: &chitchat::NodeState, since: u64, ours: &VersionVector) -> bool {
    let lacks = |o: &str, s: u64| s > ours.get(o).copied().unwrap_or(0);
    let mut keyed = false;
    for (_, v) in state.iter_prefix(K_VV_BUCKET_PREFIX) {
        keyed = true;
        if v.version > since && pairs(&v.value).any(|(o, s)| lacks(o, s)) {
            return true;
        }
    }
    for (k, v) in state.iter_prefix(K_SEQ_PREFIX) {
        keyed = true;
        if v.version > since
            && v.value
                .parse()
                .is_ok_and(|s| lacks(&k[K_SEQ_PREFIX.len()..], s))
        {
            return true;
        }
    }
    !keyed
        && state
            .get_versioned(K_VV)
            .is_some_and(|v| !v.is_deleted() && v.version > since)
        && pairs(state.get(K_VV).unwrap_or("")).any(|(o, s)| lacks(o, s))
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

    /// A write moves one origin: one bucket key is set, holding every
    /// origin of that bucket; an emptied bucket is deleted.
    #[test]
    fn vector_changes_touch_only_the_moved_bucket() {
        let old: VersionVector = (0..40).map(|i| (format!("origin-{i}"), 3)).collect();
        let mut new = old.clone();
        new.insert("origin-7".into(), 4);
        let c = vv_changes(&old, &new);
        assert_eq!(c.len(), 1, "{c:?}");
        let (key, value) = &c[0];
        assert_eq!(*key, bucket_key(bucket_of("origin-7")));
        let bucket = decode_vv(value.as_deref().unwrap());
        assert_eq!(bucket.get("origin-7"), Some(&4));
        assert!(bucket.keys().all(|o| bucket_of(o) == bucket_of("origin-7")));
        assert!(vv_changes(&new, &new).is_empty());
        let alone: VersionVector = [("a".to_string(), 1)].into();
        assert_eq!(
            vv_changes(&alone, &VersionVector::new()),
            vec![(bucket_key(bucket_of("a")), None)]
        );
    }

    /// Buckets are spread: 100 origins fill most of the 16.
    #[test]
    fn origins_spread_over_the_buckets() {
        let vv: VersionVector = (0..100).map(|i| (format!("node-{i}"), 1)).collect();
        let keys = vv_keys(&vv);
        assert!(keys.len() >= 14, "{}", keys.len());
        let back: VersionVector = keys.iter().flat_map(|(_, v)| decode_vv(v)).collect();
        assert_eq!(back, vv);
    }

    /// A member's vector comes from its buckets; a node of an earlier
    /// version, which publishes `seq:` keys or one `vv` value, is still read.
    #[test]
    fn members_vectors_read_from_buckets_or_older_keys() {
        let mut state = chitchat::NodeState::for_test();
        state.set(K_VV, "old=7");
        assert_eq!(read_vv(&state), [("old".to_string(), 7)].into());
        state.set(format!("{K_SEQ_PREFIX}b"), 5);
        state.set("seqx", "not a seq key");
        assert_eq!(read_vv(&state), [("b".to_string(), 5)].into());
        state.delete(&format!("{K_SEQ_PREFIX}b"));
        let vv: VersionVector = [("a".to_string(), 2), ("c".to_string(), 9)].into();
        for (k, v) in vv_keys(&vv) {
            state.set(k, v);
        }
        assert_eq!(read_vv(&state), vv);
    }

    /// The pull loop's incremental test agrees with decoding the whole
    /// vector, and with `since` reads only keys set after that version.
    #[test]
    fn ahead_since_reads_the_keys_set_since() {
        let ours: VersionVector = [("a".to_string(), 2), ("b".to_string(), 3)].into();
        let mut state = chitchat::NodeState::for_test();
        assert!(!ahead_since(&state, 0, &ours));
        state.set(K_VV, "a=3");
        assert!(ahead_since(&state, 0, &ours));
        let old_format = state.max_version();
        assert!(!ahead_since(&state, old_format, &ours));
        // Buckets (or `seq:` keys) present: the single value is not read.
        let theirs: VersionVector = [("a".to_string(), 2), ("b".to_string(), 3)].into();
        for (k, v) in vv_keys(&theirs) {
            state.set(k, v);
        }
        assert_eq!(
            ahead(&read_vv(&state), &ours),
            ahead_since(&state, 0, &ours)
        );
        assert!(!ahead_since(&state, 0, &ours));
        let looked = state.max_version();
        let mut newer = theirs.clone();
        newer.insert("c".into(), 1);
        for (k, v) in vv_changes(&theirs, &newer) {
            state.set(k, v.unwrap());
        }
        assert!(ahead_since(&state, looked, &ours));
        assert!(ahead_since(&state, 0, &ours));
        assert!(!ahead_since(&state, state.max_version(), &ours));
        let ours_too: VersionVector = newer.clone();
        assert!(!ahead_since(&state, 0, &ours_too));
        state.set(format!("{K_SEQ_PREFIX}d"), 4);
        assert!(ahead_since(&state, looked, &ours_too));
    }

    fn ahead(theirs: &VersionVector, ours: &VersionVector) -> bool {
        theirs
            .iter()
            .any(|(o, s)| *s > ours.get(o).copied().unwrap_or(0))
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
