//! The push tree: which members a node pushes a write to.
//!
//! The writer lists its region's members, itself first, and that list (the
//! tree) travels with every push of the write. A node at position `r`
//! pushes to positions `3r+1..=3r+3`. Every relay reads the same list, so
//! the tree is the same at every hop even when the nodes' views of the
//! membership differ — which they do, for seconds, on a busy or flapping
//! cluster. (When each relay built the tree from its own view, a node that
//! one relay saw dead was nobody's child and waited for a pull: in a
//! simulated 100-node cluster on two cores, for more than 10 s.)
//!
//! A child this node cannot push to (unknown here, or unreachable) is stood
//! in for: its children are pushed to instead. A child this node sees as
//! not live is pushed to *and* stood in for: gossip's failure detector
//! flaps under load, and a push to a node that is really down costs one
//! failed call, while skipping a live one costs it a pull.

/// Children per node: a write reaches N nodes in about log3(N) hops, and
/// no node sends more than this many pushes of it (plus stand-ins, plus one
/// per other region at the writer).
pub(super) const FANOUT: usize = 3;

/// What this node knows of a member it may push to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Live in gossip and reachable: push.
    Live,
    /// Known but not live in gossip: push, and stand in for it.
    Suspect,
    /// Unknown here (no address) or unreachable: stand in for it.
    Absent,
}

/// The tree of a write by `root` over `members` (node ids of its region,
/// any order, `root` included or not): `root` first, then the others by
/// node id, so a reader of logs can find any node's place.
pub(super) fn order<'a>(root: &str, members: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut rest: Vec<&str> = members.into_iter().filter(|m| *m != root).collect();
    rest.sort_unstable();
    rest.dedup();
    std::iter::once(root)
        .chain(rest)
        .map(str::to_string)
        .collect()
}

/// The positions `me` pushes to in `tree`, each with the node id: its
/// children, and the children of every child it stands in for. Empty when
/// `me` is not in the tree.
pub(super) fn targets<'t>(
    tree: &'t [String],
    me: &str,
    reach: impl Fn(&str) -> Reach,
) -> Vec<&'t str> {
    let Some(rank) = tree.iter().position(|m| m == me) else {
        return Vec::new();
    };
    let n = tree.len();
    let mut out = Vec::new();
    let mut todo: Vec<usize> = children(rank).collect();
    while let Some(r) = todo.pop() {
        if r >= n {
            continue;
        }
        let id = tree[r].as_str();
        let how = reach(id);
        if how != Reach::Absent {
            out.push(id);
        }
        if how != Reach::Live {
            todo.extend(children(r));
        }
    }
    out.sort_unstable();
    out
}

fn children(rank: usize) -> impl Iterator<Item = usize> {
    (1..=FANOUT).map(move |c| rank * FANOUT + c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i:03}")).collect()
    }

    /// Whom every node of `tree` would push to, relaying from the root.
    fn delivered(tree: &[String], reach: &dyn Fn(&str, &str) -> Reach) -> HashMap<String, usize> {
        let mut got: HashMap<String, usize> = HashMap::new();
        let mut todo = vec![tree[0].clone()];
        let mut relayed = BTreeSet::new();
        while let Some(at) = todo.pop() {
            if !relayed.insert(at.clone()) {
                continue;
            }
            for t in targets(tree, &at, |m| reach(&at, m)) {
                *got.entry(t.to_string()).or_default() += 1;
                // A Suspect that is really down does not relay.
                if reach("", t) != Reach::Absent {
                    todo.push(t.to_string());
                }
            }
        }
        got
    }

    #[test]
    fn the_writer_comes_first_and_the_rest_by_id() {
        let t = order("n5", ["n9", "n1", "n5", "n3", "n1"]);
        assert_eq!(t, ["n5", "n1", "n3", "n9"]);
        assert_eq!(order("n0", []), ["n0"]);
    }

    /// All reachable: everyone but the root gets exactly one push, and no
    /// node sends more than three.
    #[test]
    fn every_member_gets_one_push() {
        for n in [1, 2, 4, 13, 100, 1000] {
            let tree = ids(n);
            let got = delivered(&tree, &|_, _| Reach::Live);
            assert_eq!(got.len(), n - 1, "n={n}");
            assert!(got.values().all(|&c| c == 1), "n={n}");
            assert!(!got.contains_key(&tree[0]));
            for me in &tree {
                assert!(targets(&tree, me, |_| Reach::Live).len() <= FANOUT);
            }
        }
    }

    /// A member every relay sees dead but that is up still gets the write
    /// (pushed to as a suspect), and so do its children (stood in for).
    #[test]
    fn suspects_are_pushed_to_and_stood_in_for() {
        let tree = ids(40);
        let suspect = |_: &str, m: &str| {
            if m == "n001" || m == "n005" {
                Reach::Suspect
            } else {
                Reach::Live
            }
        };
        let got = delivered(&tree, &suspect);
        assert_eq!(got.len(), 39);
        // A child of a suspect gets it twice (parent + stand-in); n005 is
        // a suspect under the suspect n001, so its children get it from
        // n005, n001 and n000: one copy more per suspect above, no more.
        assert!(got.values().all(|&c| c <= 3), "{got:?}");
        assert_eq!(got.values().filter(|&&c| c == 3).count(), 3, "{got:?}");
    }

    /// A member nobody can reach is skipped, and its whole subtree still
    /// gets the write through stand-ins.
    #[test]
    fn an_absent_member_is_stood_in_for() {
        let tree = ids(40);
        let absent = |_: &str, m: &str| {
            if m == "n002" {
                Reach::Absent
            } else {
                Reach::Live
            }
        };
        let got = delivered(&tree, &absent);
        assert_eq!(got.len(), 38);
        assert!(!got.contains_key("n002"));
        // n002's children (7, 8, 9) come from n000 standing in.
        assert_eq!(
            targets(&tree, "n000", |m| absent("n000", m)),
            ["n001", "n003", "n007", "n008", "n009"]
        );
    }

    #[test]
    fn a_node_outside_the_tree_pushes_nothing() {
        assert!(targets(&ids(5), "elsewhere", |_| Reach::Live).is_empty());
    }
}
