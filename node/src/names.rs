//! Persistent name → holder maps for the derived tables (routes, SNI).
//!
//! The route and certificate tables are updated by change (issue 16): each
//! commit touches only the names of the records it changed, and readers
//! keep whatever version they loaded. A [`NameMap`] is cheap to clone (an
//! `Arc` per map, [`imbl`]'s hash array mapped trie underneath), and an
//! insert copies only the path to its entry, so publishing a new table
//! costs O(log n), not O(n).
//!
//! Two records can hold the same name for a while (two nodes accepted the
//! same domain before hearing of each other). The table must then still
//! answer exactly as a table rebuilt from scratch would — the holder with
//! the greatest id — and hand the name to the other holder when that one
//! goes. So a name with more than one holder keeps the list of all of them
//! on the side; the map the request path reads has only the winner.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use imbl::shared_ptr::DefaultSharedPtr;

use crate::util::Fnv;

type Map<K, V> = imbl::GenericHashMap<K, V, BuildHasherDefault<Fnv>, DefaultSharedPtr>;

/// Name → value of the holder that wins the name (the greatest holder id).
#[derive(Clone)]
pub struct NameMap<V: Clone> {
    /// What lookups read: the winning holder's id and value.
    win: Map<String, (Arc<str>, V)>,
    /// Only for names with two or more holders: all of them, by id.
    shared: Map<String, Vec<(Arc<str>, V)>>,
}

impl<V: Clone> Default for NameMap<V> {
    fn default() -> Self {
        NameMap {
            win: Map::default(),
            shared: Map::default(),
        }
    }
}

impl<V: Clone> NameMap<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        self.win.get(name).map(|(_, v)| v)
    }

    /// Sets `holder`'s value for `name` (replacing the one it had).
    pub fn insert(&mut self, name: &str, holder: &Arc<str>, value: V) {
        if let Some(list) = self.shared.get_mut(name) {
            match list.binary_search_by(|(id, _)| (**id).cmp(holder)) {
                Ok(i) => list[i].1 = value,
                Err(i) => list.insert(i, (holder.clone(), value)),
            }
            let top = list.last().expect("two or more holders").clone();
            self.win.insert(name.to_string(), top);
            return;
        }
        match self.win.get(name) {
            Some((id, old)) if id != holder => {
                let mut list = vec![(id.clone(), old.clone()), (holder.clone(), value)];
                list.sort_by(|a, b| a.0.cmp(&b.0));
                let top = list[1].clone();
                self.shared.insert(name.to_string(), list);
                self.win.insert(name.to_string(), top);
            }
            _ => {
                self.win.insert(name.to_string(), (holder.clone(), value));
            }
        }
    }

    /// Drops `holder`'s claim on `name`; another holder, if any, takes it.
    pub fn remove(&mut self, name: &str, holder: &str) {
        if let Some(list) = self.shared.get_mut(name) {
            list.retain(|(id, _)| &**id != holder);
            let top = list.last().cloned();
            if list.len() < 2 {
                self.shared.remove(name);
            }
            match top {
                Some(top) => self.win.insert(name.to_string(), top),
                None => self.win.remove(name),
            };
            return;
        }
        if self.win.get(name).is_some_and(|(id, _)| &**id == holder) {
            self.win.remove(name);
        }
    }

    /// Names with a winner.
    pub fn len(&self) -> usize {
        self.win.len()
    }

    pub fn is_empty(&self) -> bool {
        self.win.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// After any sequence of inserts and removals the map answers as a
        /// table rebuilt from the surviving claims would: the greatest id.
        #[test]
        fn matches_a_rebuild(ops in prop::collection::vec((0..4u8, 0..5u8, any::<bool>(), 0..100u32), 0..60)) {
            let mut m = NameMap::default();
            let mut claims = std::collections::BTreeMap::new();
            for (name, holder, add, value) in ops {
                let (name, holder) = (format!("n{name}"), format!("h{holder}"));
                let id: Arc<str> = Arc::from(holder.as_str());
                if add {
                    m.insert(&name, &id, value);
                    claims.insert((name.clone(), holder.clone()), value);
                } else {
                    m.remove(&name, &holder);
                    claims.remove(&(name.clone(), holder.clone()));
                }
                for n in 0..4 {
                    let n = format!("n{n}");
                    let want = claims.iter().filter(|((cn, _), _)| *cn == n).map(|(_, v)| *v).next_back();
                    prop_assert_eq!(m.get(&n).copied(), want, "name {}", n);
                }
            }
        }
    }
}
