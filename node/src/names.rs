//! Persistent name → holder maps for the derived tables (routes, SNI).
//!
//! The route and certificate tables are updated by change (issue 16): each
//! commit touches only the names of the records it changed, and readers
//! keep whatever version they loaded. A [`NameMap`] is cheap to clone (an
//! `Arc` per map, [`imbl`]'s hash array mapped trie underneath), and an
//! insert copies only the path to its entry, so publishing a new table
//! costs O(log n), not O(n).
//!
//! A name has one holder: the tables are fed the store's *routed* hosts
//! (`store::names`), where the cluster-wide rule has already given each
//! domain to exactly one host. What the map still has to get right is the
//! order of one commit's changes: when a domain moves from host A to host
//! B, B's insert may come before A's removal. So each entry remembers its
//! holder and [`NameMap::remove`] drops a name only for the holder that
//! has it.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use imbl::shared_ptr::DefaultSharedPtr;

use crate::util::Fnv;

type Map<K, V> = imbl::GenericHashMap<K, V, BuildHasherDefault<Fnv>, DefaultSharedPtr>;

/// Name → the holder's id and value.
#[derive(Clone)]
pub struct NameMap<V: Clone> {
    map: Map<String, (Arc<str>, V)>,
}

impl<V: Clone> Default for NameMap<V> {
    fn default() -> Self {
        NameMap {
            map: Map::default(),
        }
    }
}

impl<V: Clone> NameMap<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        self.map.get(name).map(|(_, v)| v)
    }

    /// `holder` now has `name`, with `value` (replacing whatever was there:
    /// a domain that moved to `holder` in this commit).
    pub fn insert(&mut self, name: &str, holder: &Arc<str>, value: V) {
        self.map.insert(name.to_string(), (holder.clone(), value));
    }

    /// `holder` no longer has `name`; a no-op when another holder already
    /// took it over earlier in the same commit.
    pub fn remove(&mut self, name: &str, holder: &str) {
        if self.map.get(name).is_some_and(|(id, _)| &**id == holder) {
            self.map.remove(name);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A domain moving from one holder to another ends with the new holder
    /// whichever of the two changes is applied first.
    #[test]
    fn a_move_lands_in_either_order() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let start = {
            let mut m = NameMap::default();
            m.insert("d", &a, 1);
            m
        };
        let mut m = start.clone();
        m.remove("d", "a");
        m.insert("d", &b, 2);
        assert_eq!(m.get("d"), Some(&2));
        let mut m = start.clone();
        m.insert("d", &b, 2);
        m.remove("d", "a");
        assert_eq!(
            m.get("d"),
            Some(&2),
            "a's late removal must not drop b's name"
        );
        let mut m = start;
        m.remove("d", "a");
        assert!(m.is_empty());
    }
}
