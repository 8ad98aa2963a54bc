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
//!
//! This is the one rule for "who serves this domain": the API's lookups by
//! name, the uniqueness check, the route and SNI tables (through
//! [`Snapshot::routed`]) and the conflict counts all read it from here.
//!
//! [`Names`] is kept by change, like the rest of the [`Snapshot`]: a commit
//! re-derives only the domains whose listers or claim it changed, and the
//! routed form of only the hosts that changed or list such a domain, so a
//! write costs O(what it touched), whatever the number of hosts stored.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::codec::{Body, NameClaim};
use super::{Changed, Index, Snapshot, Write};
use crate::host::ProxyHost;

pub const NAME_PREFIX: &str = "name/";

pub fn name_key(domain: &str) -> String {
    format!("{NAME_PREFIX}{domain}")
}

/// A host that lists a domain another host holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub domain: String,
    /// The host that lost: it lists the domain but does not serve it.
    pub loser: String,
    /// The host that serves the domain.
    pub holder: String,
}

/// Who holds each domain, and the conflicts: persistent maps, cloned in
/// O(1) with the snapshot and changed per commit only where the commit
/// touched them (see [`settle`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// Domain → ids of the live hosts listing it, sorted (more than one
    /// only while a concurrent claim is unresolved).
    listers: Index,
    /// Domain → the host its live claim record names (which may no longer
    /// list it, or be gone).
    claims: imbl::OrdMap<String, String>,
    /// (loser, domain) → holder, by loser so that a host's conflicts are
    /// one range away and their count is the map's size.
    conflicts: imbl::OrdMap<(String, String), String>,
}

impl Names {
    /// The host that serves `domain` (normalised: lower case): the one its
    /// claim names if that host lists it, else the lister with the smallest
    /// id. O(log n + hosts listing it).
    pub fn holder(&self, domain: &str) -> Option<&str> {
        let ids = self.listers.get(domain)?;
        let claimed = self
            .claims
            .get(domain)
            .filter(|c| ids.binary_search(c).is_ok());
        Some(claimed.unwrap_or(&ids[0]).as_str())
    }

    /// The live hosts listing `domain`, by id.
    pub fn listers(&self, domain: &str) -> &[String] {
        self.listers.get(domain).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The host the live claim of `domain` names, if there is one.
    pub fn claim(&self, domain: &str) -> Option<&str> {
        self.claims.get(domain).map(String::as_str)
    }

    /// Every listed domain with its holder, by domain.
    pub fn holders(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.listers
            .keys()
            .filter_map(|d| Some((d.as_str(), self.holder(d)?)))
    }

    /// The conflicts of one host (domains it lists but does not hold), by
    /// domain; O(log n + its conflicts).
    pub fn conflicts_of<'a>(&'a self, host_id: &'a str) -> impl Iterator<Item = Conflict> + 'a {
        self.conflicts
            .range((host_id.to_string(), String::new())..)
            .take_while(move |((loser, _), _)| loser == host_id)
            .map(conflict)
    }

    /// How many (host, domain) pairs are conflicted; O(1).
    pub fn conflict_count(&self) -> usize {
        self.conflicts.len()
    }

    /// Every conflict, by (loser, domain).
    pub fn conflicts(&self) -> impl Iterator<Item = Conflict> + '_ {
        self.conflicts.iter().map(conflict)
    }

    /// The conflicts `domain` has now: every lister but the holder.
    fn losers(&self, domain: &str) -> Vec<Conflict> {
        let Some(holder) = self.holder(domain) else {
            return Vec::new();
        };
        self.listers(domain)
            .iter()
            .filter(|id| *id != holder)
            .map(|loser| Conflict {
                domain: domain.to_string(),
                loser: loser.clone(),
                holder: holder.to_string(),
            })
            .collect()
    }

    /// Brings `domain`'s conflicts in line with its listers and claim now;
    /// `before` is the state before the commit. Returns the conflicts that
    /// are new (or have a new holder), for the log.
    fn settle_domain(&mut self, before: &Names, domain: &str) -> Vec<Conflict> {
        let now = self.losers(domain);
        for gone in before.losers(domain) {
            if !now.iter().any(|c| c.loser == gone.loser) {
                self.conflicts.remove(&(gone.loser, gone.domain));
            }
        }
        let mut fresh = Vec::new();
        for c in now {
            let key = (c.loser.clone(), c.domain.clone());
            if before.conflicts.get(&key) != Some(&c.holder) {
                self.conflicts.insert(key, c.holder.clone());
                fresh.push(c);
            }
        }
        fresh
    }
}

fn conflict(((loser, domain), holder): (&(String, String), &String)) -> Conflict {
    Conflict {
        domain: domain.clone(),
        loser: loser.clone(),
        holder: holder.clone(),
    }
}

/// What a commit touched, gathered while its records are applied: the
/// hosts whose record changed, and the domains whose listers or claim
/// changed.
#[derive(Default)]
pub(super) struct Touched {
    hosts: BTreeSet<String>,
    domains: BTreeSet<String>,
}

impl Touched {
    pub(super) fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.domains.is_empty()
    }
}

/// A host record changed: its domains' listers follow, and the domains it
/// gained or dropped are touched (an update that keeps its domains touches
/// no domain, only the host).
pub(super) fn host_changed(names: &mut Names, touched: &mut Touched, c: &Changed<ProxyHost>) {
    let domains = |h: &Option<Arc<ProxyHost>>| -> BTreeSet<String> {
        h.iter().flat_map(|h| h.domains.iter().cloned()).collect()
    };
    let (old, new) = (domains(&c.old), domains(&c.new));
    let dropped: Vec<String> = old.difference(&new).cloned().collect();
    let added: Vec<String> = new.difference(&old).cloned().collect();
    touched.hosts.insert(c.id.clone());
    touched
        .domains
        .extend(dropped.iter().chain(&added).cloned());
    super::reindex(&mut names.listers, &c.id, dropped, added);
}

/// The claim record of `domain` is now `host` (`None`: a tombstone).
pub(super) fn claim_changed(
    names: &mut Names,
    touched: &mut Touched,
    domain: &str,
    host: Option<&NameClaim>,
) {
    let host = host.map(|c| c.host_id.clone());
    let was = match &host {
        Some(h) => names.claims.insert(domain.to_string(), h.clone()),
        None => names.claims.remove(domain),
    };
    if was != host {
        touched.domains.insert(domain.to_string());
    }
}

/// After a commit's records are in `snap` (hosts, listers, claims):
/// re-derives the conflicts of the touched domains and the routed form of
/// every host that changed or lists a touched domain, and returns how the
/// routed hosts changed, for subscribers. `before` is the snapshot the
/// commit started from. With `log`, each new conflict gets a warning.
pub(super) fn settle(
    before: &Snapshot,
    snap: &mut Snapshot,
    touched: Touched,
    log: bool,
) -> Vec<Changed<ProxyHost>> {
    let Touched { mut hosts, domains } = touched;
    let mut fresh = Vec::new();
    for d in &domains {
        fresh.extend(snap.names.settle_domain(&before.names, d));
        hosts.extend(snap.names.listers(d).iter().cloned());
    }
    if log {
        for c in &fresh {
            log_conflict(snap, c);
        }
    }
    let mut out = Vec::new();
    for id in hosts {
        let new = routed_of(snap, &id);
        let old = before.routed.get(&id).cloned();
        match (&old, &new) {
            (None, None) => continue,
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => continue,
            // Rewritten as it was: keep sharing the stored `Arc`, but the
            // tables have nothing to do.
            (Some(a), Some(b)) if a == b => {
                snap.routed.set(&id, new);
                continue;
            }
            _ => {}
        }
        snap.routed.set(&id, new.clone());
        out.push(Changed { id, old, new });
    }
    out
}

/// Host `id` as the proxy routes it: with only the domains it holds (the
/// stored `Arc` itself when it holds them all); `None` when it holds none
/// or is gone.
fn routed_of(snap: &Snapshot, id: &str) -> Option<Arc<ProxyHost>> {
    let h = snap.hosts.get(id)?;
    let held = |d: &String| snap.names.holder(d) == Some(id);
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

/// One warning per conflict that appeared, naming both hosts: the
/// operator has something to fix.
fn log_conflict(snap: &Snapshot, c: &Conflict) {
    let name_of = |id: &str| {
        snap.hosts
            .get(id)
            .map(|h| h.name.clone())
            .unwrap_or_default()
    };
    tracing::warn!(domain = %c.domain, holder = %c.holder, holder_name = %name_of(&c.holder),
        loser = %c.loser, loser_name = %name_of(&c.loser),
        "two hosts list the same domain (accepted concurrently on two nodes); the holder serves it. \
         Fix: remove the domain from one host (charonctl host update <id> --domain ...) or remove one host");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{host_key, Record, Store, StoreError, View};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const DOMAINS: [&str; 4] = ["a.test", "b.test", "c.test", "d.test"];

    /// What the names rule gives, by domain and by host.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Derived {
        holders: BTreeMap<String, String>,
        conflicts: Vec<Conflict>,
        /// (host id, the domains it is routed for); hosts that lost every
        /// domain they list left out.
        routed: Vec<(String, Vec<String>)>,
    }

    /// The rule stated plainly, over all the records at once (issue 16's
    /// first version recomputed this on every commit): the oracle the
    /// store's by-change derivation must agree with.
    fn from_scratch(records: &[(String, Record)]) -> Derived {
        let mut hosts = BTreeMap::new();
        let mut claims = BTreeMap::new();
        for (_, r) in records {
            match &r.body {
                Some(Body::Host(h)) => {
                    hosts.insert(h.id.clone(), h.clone());
                }
                Some(Body::Claim(c)) => {
                    claims.insert(c.domain.clone(), c.host_id.clone());
                }
                _ => {}
            }
        }
        let mut listed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for h in hosts.values() {
            for d in &h.domains {
                listed.entry(d.as_str()).or_default().push(h.id.as_str());
            }
        }
        let mut out = Derived {
            holders: BTreeMap::new(),
            conflicts: Vec::new(),
            routed: Vec::new(),
        };
        for (domain, mut ids) in listed {
            ids.sort_unstable();
            ids.dedup();
            let holder = claims
                .get(domain)
                .map(String::as_str)
                .filter(|c| ids.contains(c))
                .unwrap_or(ids[0]);
            for loser in ids.iter().filter(|id| **id != holder) {
                out.conflicts.push(Conflict {
                    domain: domain.to_string(),
                    loser: loser.to_string(),
                    holder: holder.to_string(),
                });
            }
            out.holders.insert(domain.to_string(), holder.to_string());
        }
        out.conflicts
            .sort_by(|a, b| (&a.loser, &a.domain).cmp(&(&b.loser, &b.domain)));
        for h in hosts.values() {
            let held: Vec<String> = h
                .domains
                .iter()
                .filter(|d| out.holders.get(*d) == Some(&h.id))
                .cloned()
                .collect();
            if !held.is_empty() || h.domains.is_empty() {
                out.routed.push((h.id.clone(), held));
            }
        }
        out
    }

    /// What the store derived by change.
    fn observed(snap: &Snapshot) -> Derived {
        Derived {
            holders: snap
                .names
                .holders()
                .map(|(d, h)| (d.to_string(), h.to_string()))
                .collect(),
            conflicts: snap.names.conflicts().collect(),
            routed: snap
                .routed
                .iter()
                .map(|h| (h.id.clone(), h.domains.clone()))
                .collect(),
        }
    }

    /// The store's derived names agree with the oracle and with a snapshot
    /// derived from its records at once; a host holding all its domains is
    /// routed as the very `Arc` stored.
    fn check_by_change(store: &Store) -> Result<(), TestCaseError> {
        let snap = store.snapshot();
        let records = store.records();
        prop_assert_eq!(observed(&snap), from_scratch(&records));
        let rebuilt = crate::store::snapshot(&records.into_iter().collect());
        prop_assert_eq!(&snap.names, &rebuilt.names);
        for h in snap.routed.iter() {
            let stored = snap.hosts.get(&h.id).expect("routed hosts are stored");
            if stored.domains == h.domains {
                prop_assert!(Arc::ptr_eq(stored, h), "{} copied though unfiltered", h.id);
            }
        }
        Ok(())
    }

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
        view.names().claim(d).map(str::to_string)
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

    /// The `k`-th host `store` knows (modulo how many), if any.
    fn nth_host(store: &Store, k: usize) -> Option<ProxyHost> {
        let hosts = store.hosts().to_vec();
        hosts.get(k % hosts.len().max(1)).map(|h| (**h).clone())
    }

    /// Runs `ops`; after each, every store's by-change names are checked
    /// against the oracle.
    fn run(stores: &[Store], ops: &[Op]) -> Result<(), TestCaseError> {
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
                    if let Some(h) = nth_host(&stores[n], k) {
                        let mut new = h.clone();
                        new.domains = domains(mask);
                        new.version += 1;
                        write_host(&stores[n], Some(h), Some(new));
                    }
                }
                Op::Delete(n, k) => {
                    if let Some(h) = nth_host(&stores[n], k) {
                        write_host(&stores[n], Some(h), None);
                    }
                }
                Op::Sync(a, b) if a != b => sync(&stores[a], &stores[b]),
                Op::Sync(..) => {}
            }
            for s in stores {
                check_by_change(s)?;
            }
        }
        Ok(())
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
        store.snapshot().names.clone()
    }

    /// Every domain a live host lists has one holder that lists it, and
    /// the routed hosts share no domain.
    fn check_single_holder(store: &Store) -> Result<(), TestCaseError> {
        let snap = store.snapshot();
        for h in snap.hosts.iter() {
            for d in &h.domains {
                let holder = snap.names.holder(d);
                prop_assert!(holder.is_some(), "{d} has no holder");
                let holder_host = holder.and_then(|id| snap.hosts.get(id));
                prop_assert!(holder_host.is_some_and(|o| o.domains.contains(d)));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for h in snap.routed.iter() {
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
        /// removing the losers leaves no conflict. At every step the names
        /// kept by change are what the rule gives from scratch.
        #[test]
        fn one_holder_per_domain_everywhere_after_any_history(
            ops in prop::collection::vec(op(), 1..40),
            seed in any::<u64>(),
        ) {
            let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
            let stores: Vec<Store> = dirs.iter().map(|d| Store::open(d.path()).unwrap()).collect();
            run(&stores, &ops)?;
            converge(&stores);
            let names = names_of(&stores[0]);
            for s in &stores {
                prop_assert_eq!(&names_of(s), &names);
                check_single_holder(s)?;
                check_by_change(s)?;
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
                check_by_change(&replay)?;
            }
            prop_assert_eq!(&names_of(&replay), &names);
            // Resolve: delete every loser on node 0, converge.
            for c in names.conflicts() {
                if let Some(h) = stores[0].hosts().get(&c.loser) {
                    write_host(&stores[0], Some((**h).clone()), None);
                }
            }
            converge(&stores);
            for s in &stores {
                prop_assert_eq!(names_of(s).conflict_count(), 0, "{:?}", names_of(s).conflicts().collect::<Vec<_>>());
                check_single_holder(s)?;
                check_by_change(s)?;
            }
        }

        /// Records no API would write together (claims naming any host,
        /// hosts and tombstones from three origins, in any batches): the
        /// names kept by change still equal the rule applied from scratch
        /// after every batch.
        #[test]
        fn names_by_change_equal_names_from_scratch(
            raw in prop::collection::vec((0..3usize, 0..5usize, 0..16u8, 0..4usize, 0..6usize, 0..3u8), 1..40),
            cut in 1..6usize,
        ) {
            let mut seq = [0u64; 3];
            let mut recs = Vec::new();
            for (i, (o, h, mask, d, claimant, kind)) in raw.into_iter().enumerate() {
                seq[o] += 1;
                let (key, body) = match kind {
                    0 => (host_key(&format!("h{h}")), None),
                    1 => {
                        let id = format!("h{h}");
                        let host = ProxyHost { id: id.clone(), domains: domains(mask), ..Default::default() };
                        (host_key(&id), Some(Body::Host(host)))
                    }
                    _ => {
                        let claim = (claimant < 5).then(|| Body::Claim(NameClaim {
                            domain: DOMAINS[d].to_string(),
                            host_id: format!("h{claimant}"),
                        }));
                        (name_key(DOMAINS[d]), claim)
                    }
                };
                recs.push((key, Record { hlc: i as u64 + 1, origin: format!("n{o}"), seq: seq[o], body }));
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            for chunk in recs.chunks(cut) {
                store.apply(chunk.to_vec()).unwrap();
                check_by_change(&store)?;
                check_single_holder(&store)?;
            }
        }
    }

    #[test]
    fn the_newer_claim_wins_and_the_loser_is_marked_not_routed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let h = |id: &str| ProxyHost {
            id: id.into(),
            domains: vec!["x.test".into(), format!("{id}.only")],
            ..Default::default()
        };
        let rec = |hlc, body| Record {
            hlc,
            origin: "n".into(),
            seq: hlc,
            body: Some(body),
        };
        store
            .apply(vec![
                (host_key("a"), rec(1, Body::Host(h("a")))),
                (host_key("b"), rec(2, Body::Host(h("b")))),
                (
                    name_key("x.test"),
                    rec(
                        3,
                        Body::Claim(NameClaim {
                            domain: "x.test".into(),
                            host_id: "b".into(),
                        }),
                    ),
                ),
            ])
            .unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.names.holder("x.test"), Some("b"));
        let want = Conflict {
            domain: "x.test".into(),
            loser: "a".into(),
            holder: "b".into(),
        };
        assert_eq!(snap.names.conflicts_of("a").collect::<Vec<_>>(), [want]);
        assert_eq!(snap.names.conflicts_of("b").count(), 0);
        assert_eq!(snap.names.conflict_count(), 1);
        assert_eq!(snap.routed.get("a").unwrap().domains, ["a.only"]);
        assert_eq!(snap.routed.get("b").unwrap().domains, ["x.test", "b.only"]);
        // The claim's host gone: the remaining host holds it, no conflict.
        store
            .apply(vec![(
                host_key("b"),
                Record {
                    body: None,
                    ..rec(4, Body::Host(h("b")))
                },
            )])
            .unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.names.holder("x.test"), Some("a"));
        assert_eq!(snap.names.conflict_count(), 0);
        assert_eq!(snap.routed.get("a").unwrap().domains, ["x.test", "a.only"]);
    }
}
