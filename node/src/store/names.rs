//! Which host serves each domain, decided the same way on every node.
//!
//! Hosts live under random ids, so two nodes can each accept the same
//! domain before they hear of each other. The domain therefore has a
//! replicated key of its own: a claim record `name/<domain>` naming its
//! holder, written in the same transaction as every write of a host that
//! lists the domain and merged last-writer-wins like any record. From the
//! records alone every node derives the same [`Names`]:
//! - the holder of a domain is the host its live claim names, if that host
//!   is live and still lists the domain;
//! - otherwise (no claim, or the claim's host was deleted or dropped the
//!   domain in a write concurrent with another host's claim) the live host
//!   listing it with the smallest id — any rule works as long as it reads
//!   only the replicated records;
//! - every other live host listing the domain is *conflicted* for it: it
//!   lost a concurrent claim. It is shown (`host list`, `cluster status`,
//!   a metric, a log line), not routed for that domain, and an ordinary
//!   update that drops the domain, or removing either host, resolves it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::codec::{Body, NameClaim, Record};
use super::{HostSet, Write};
use crate::host::ProxyHost;

pub const NAME_PREFIX: &str = "name/";

pub fn name_key(domain: &str) -> String {
    format!("{NAME_PREFIX}{domain}")
}

/// A host that lists a domain another host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub domain: String,
    /// The host that lost: it lists the domain but does not serve it.
    pub loser: String,
    /// The host that serves the domain.
    pub holder: String,
}

/// The holder of every domain and the conflicts, derived from the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// domain → id of the host that serves it.
    pub holders: BTreeMap<String, String>,
    /// Sorted by (domain, loser).
    pub conflicts: Vec<Conflict>,
}

impl Names {
    /// Derives holders from the live hosts and the claim records
    /// (`claims`: domain → live claim's host id).
    pub fn derive<'a>(
        hosts: impl IntoIterator<Item = &'a ProxyHost>,
        claims: &BTreeMap<String, String>,
    ) -> Names {
        let mut listed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for h in hosts {
            for d in &h.domains {
                listed.entry(d.as_str()).or_default().push(h.id.as_str());
            }
        }
        let mut names = Names::default();
        for (domain, mut ids) in listed {
            ids.sort_unstable();
            ids.dedup();
            let holder = claims
                .get(domain)
                .map(String::as_str)
                .filter(|c| ids.contains(c))
                .unwrap_or(ids[0]);
            for loser in ids.iter().filter(|id| **id != holder) {
                names.conflicts.push(Conflict {
                    domain: domain.to_string(),
                    loser: loser.to_string(),
                    holder: holder.to_string(),
                });
            }
            names.holders.insert(domain.to_string(), holder.to_string());
        }
        names
    }

    /// [`Names::derive`] over a store's records.
    pub fn from_records(records: &BTreeMap<String, Record>, hosts: &HostSet) -> Names {
        let claims = records
            .range(NAME_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(NAME_PREFIX))
            .filter_map(|(_, r)| match &r.body {
                Some(Body::Claim(c)) => Some((c.domain.clone(), c.host_id.clone())),
                _ => None,
            })
            .collect();
        Names::derive(hosts.iter().map(|h| &**h), &claims)
    }

    pub fn holder(&self, domain: &str) -> Option<&str> {
        self.holders.get(domain).map(String::as_str)
    }

    /// The conflicts of one host (domains it lists but does not hold).
    pub fn conflicts_of<'a>(&'a self, host_id: &'a str) -> impl Iterator<Item = &'a Conflict> {
        self.conflicts.iter().filter(move |c| c.loser == host_id)
    }

    /// The hosts as the proxy routes them: each with only the domains it
    /// holds; a host that holds none is left out.
    pub fn routed(&self, hosts: &HostSet) -> HostSet {
        hosts
            .iter()
            .filter_map(|h| {
                let held = |d: &String| self.holder(d) == Some(h.id.as_str());
                if h.domains.iter().all(held) {
                    return Some(h.clone());
                }
                let domains: Vec<String> = h.domains.iter().filter(|d| held(d)).cloned().collect();
                (!domains.is_empty()).then(|| {
                    Arc::new(ProxyHost {
                        domains,
                        ..(**h).clone()
                    })
                })
            })
            .collect()
    }

    /// Conflicts in `self` that `before` did not have.
    pub fn new_conflicts<'a>(&'a self, before: &'a Names) -> impl Iterator<Item = &'a Conflict> {
        self.conflicts
            .iter()
            .filter(move |c| !before.conflicts.contains(c))
    }
}

/// The claim writes that go with writing `new` over `old` (either may be
/// absent: a create, a delete). Every domain `new` lists is claimed for it
/// (a newer claim wins over an older concurrent one); every domain `old`
/// listed that `new` no longer does is released, but only if this host is
/// what the claim names — a claim another host won stays.
pub fn claim_writes(
    claims_now: impl Fn(&str) -> Option<String>,
    old: Option<&ProxyHost>,
    new: Option<&ProxyHost>,
) -> Vec<Write> {
    let mut out = Vec::new();
    if let Some(new) = new {
        for d in &new.domains {
            out.push(Write {
                key: name_key(d),
                body: Some(Body::Claim(NameClaim {
                    domain: d.clone(),
                    host_id: new.id.clone(),
                })),
            });
        }
    }
    if let Some(old) = old {
        let kept = |d: &String| new.is_some_and(|n| n.domains.contains(d));
        for d in old.domains.iter().filter(|d| !kept(d)) {
            if claims_now(d).as_deref() == Some(old.id.as_str()) {
                out.push(Write {
                    key: name_key(d),
                    body: None,
                });
            }
        }
    }
    out
}

/// One warning per conflict that appeared with this change, naming both
/// hosts: the operator has something to fix.
pub(super) fn log_new_conflicts(snap: &super::Snapshot, before: &Names) {
    let name_of = |id: &str| {
        snap.hosts
            .iter()
            .find(|h| h.id == id)
            .map(|h| h.name.clone())
            .unwrap_or_default()
    };
    for c in snap.names.new_conflicts(before) {
        tracing::warn!(domain = %c.domain, holder = %c.holder, holder_name = %name_of(&c.holder),
            loser = %c.loser, loser_name = %name_of(&c.loser),
            "two hosts list the same domain (accepted concurrently on two nodes); the holder serves it. \
             Fix: remove the domain from one host (charonctl host update <id> --domain ...) or remove one host");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{host_key, Store, StoreError, View};
    use proptest::prelude::*;

    const DOMAINS: [&str; 4] = ["a.test", "b.test", "c.test", "d.test"];

    /// One step of the simulation; indexes are taken modulo what exists.
    #[derive(Debug, Clone)]
    enum Op {
        /// On node, a new host with the domains in the mask.
        Create(usize, u8),
        /// On node, the n-th host it knows gets the domains in the mask.
        Update(usize, usize, u8),
        Delete(usize, usize),
        /// Node `from`'s news reach node `to` (a partial, one-way sync).
        Sync(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 1..16u8).prop_map(|(n, m)| Op::Create(n, m)),
            (0..3usize, 0..8usize, 0..16u8).prop_map(|(n, h, m)| Op::Update(n, h, m)),
            (0..3usize, 0..8usize).prop_map(|(n, h)| Op::Delete(n, h)),
            (0..3usize, 0..3usize).prop_map(|(a, b)| Op::Sync(a, b)),
        ]
    }

    fn domains(mask: u8) -> Vec<String> {
        (0..4)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| DOMAINS[i].to_string())
            .collect()
    }

    fn claim_in(view: &View<'_>, d: &str) -> Option<String> {
        view.record(&name_key(d))
            .and_then(|r| r.body.as_ref())
            .and_then(Body::as_claim)
            .map(|c| c.host_id.clone())
    }

    /// What the API does: a domain held by another host refuses the write;
    /// otherwise the host and its claims are written together.
    fn write_host(store: &Store, old: Option<ProxyHost>, new: Option<ProxyHost>) {
        let _ = store.transact(|view| {
            if let Some(n) = &new {
                if n.domains
                    .iter()
                    .any(|d| view.names().holder(d).is_some_and(|h| h != n.id))
                {
                    return Err(StoreError::Db("taken".into()));
                }
            }
            let mut writes = match (&new, &old) {
                (Some(n), _) => vec![Write {
                    key: host_key(&n.id),
                    body: Some(Body::Host(n.clone())),
                }],
                (None, Some(o)) => vec![Write {
                    key: host_key(&o.id),
                    body: None,
                }],
                (None, None) => vec![],
            };
            writes.extend(claim_writes(
                |d| claim_in(view, d),
                old.as_ref(),
                new.as_ref(),
            ));
            Ok((writes, ()))
        });
    }

    fn sync(from: &Store, to: &Store) {
        to.apply_delta(from.delta_since(&to.version_vector()))
            .unwrap();
    }

    fn run(stores: &[Store], ops: &[Op]) {
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Create(n, mask) => {
                    let h = ProxyHost {
                        id: format!("h{i:03}"),
                        domains: domains(mask),
                        ..Default::default()
                    };
                    write_host(&stores[n], None, Some(h));
                }
                Op::Update(n, k, mask) => {
                    let hosts = stores[n].hosts();
                    if let Some(h) = hosts.get(k % hosts.len().max(1)) {
                        let mut new = (**h).clone();
                        new.domains = domains(mask);
                        new.version += 1;
                        write_host(&stores[n], Some((**h).clone()), Some(new));
                    }
                }
                Op::Delete(n, k) => {
                    let hosts = stores[n].hosts();
                    if let Some(h) = hosts.get(k % hosts.len().max(1)) {
                        write_host(&stores[n], Some((**h).clone()), None);
                    }
                }
                Op::Sync(a, b) if a != b => sync(&stores[a], &stores[b]),
                Op::Sync(..) => {}
            }
        }
    }

    fn converge(stores: &[Store]) {
        for _ in 0..2 {
            for a in stores {
                for b in stores {
                    sync(a, b);
                }
            }
        }
    }

    fn names_of(store: &Store) -> Names {
        (*store.snapshot().names).clone()
    }

    /// Every domain a live host lists has one holder that lists it, and
    /// the routed hosts share no domain.
    fn check_single_holder(store: &Store) -> Result<(), TestCaseError> {
        let snap = store.snapshot();
        for h in &snap.hosts {
            for d in &h.domains {
                let holder = snap.names.holder(d);
                prop_assert!(holder.is_some(), "{d} has no holder");
                let holder_host = snap.hosts.iter().find(|o| Some(o.id.as_str()) == holder);
                prop_assert!(holder_host.is_some_and(|o| o.domains.contains(d)));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for h in &snap.routed {
            for d in &h.domains {
                prop_assert!(seen.insert(d.clone()), "{d} routed to two hosts");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// Any interleaving of writes on three partitioned nodes, healed:
        /// every node derives the same single holder per domain; the same
        /// records replayed in any order, with duplicates, give it too; and
        /// removing the losers leaves no conflict.
        #[test]
        fn one_holder_per_domain_everywhere_after_any_history(
            ops in prop::collection::vec(op(), 1..40),
            seed in any::<u64>(),
        ) {
            let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
            let stores: Vec<Store> = dirs.iter().map(|d| Store::open(d.path()).unwrap()).collect();
            run(&stores, &ops);
            converge(&stores);
            let names = names_of(&stores[0]);
            for s in &stores {
                prop_assert_eq!(&names_of(s), &names);
                check_single_holder(s)?;
            }
            // Replay: every record, shuffled, some twice, in small batches.
            let mut all = stores[0].records();
            all.extend(all.clone().into_iter().take(seed as usize % (all.len() + 1)));
            let mut rng = seed;
            for i in (1..all.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                all.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let dir = tempfile::tempdir().unwrap();
            let replay = Store::open(dir.path()).unwrap();
            for chunk in all.chunks(3) {
                replay.apply(chunk.to_vec()).unwrap();
            }
            prop_assert_eq!(&names_of(&replay), &names);
            // Resolve: delete every loser on node 0, converge.
            for c in &names.conflicts {
                let loser = stores[0].hosts().into_iter().find(|h| h.id == c.loser);
                if let Some(h) = loser {
                    write_host(&stores[0], Some((*h).clone()), None);
                }
            }
            converge(&stores);
            for s in &stores {
                prop_assert!(names_of(s).conflicts.is_empty(), "{:?}", names_of(s).conflicts);
                check_single_holder(s)?;
            }
        }
    }

    #[test]
    fn the_newer_claim_wins_and_the_loser_is_marked_not_routed() {
        let h = |id: &str| ProxyHost {
            id: id.into(),
            domains: vec!["x.test".into(), format!("{id}.only")],
            ..Default::default()
        };
        let (a, b) = (h("a"), h("b"));
        let claims = BTreeMap::from([("x.test".to_string(), "b".to_string())]);
        let names = Names::derive([&a, &b], &claims);
        assert_eq!(names.holder("x.test"), Some("b"));
        assert_eq!(
            names.conflicts,
            [Conflict {
                domain: "x.test".into(),
                loser: "a".into(),
                holder: "b".into(),
            }]
        );
        let routed = names.routed(&vec![Arc::new(a), Arc::new(b)]);
        assert_eq!(routed[0].domains, ["a.only"]);
        assert_eq!(routed[1].domains, ["x.test", "b.only"]);
        // The claim's host gone: the remaining host holds it, no conflict.
        let a = h("a");
        let names = Names::derive([&a], &claims);
        assert_eq!(names.holder("x.test"), Some("a"));
        assert!(names.conflicts.is_empty());
    }
}
