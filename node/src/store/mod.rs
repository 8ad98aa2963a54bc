//! The node's store: one redb file holding every record.
//!
//! Data flows one way: API (or, later, replication) → [`Store::transact`] /
//! [`Store::apply`] → subscribers (the route table). Every change, local or
//! replicated or replayed at start-up, goes through [`Store::apply_locked`],
//! which merges by last-writer-wins and commits durably before returning.
//! Nothing on the request path reads redb: subscribers get what each commit
//! changed ([`Changes`]) synchronously after it, and apply only that to their
//! tables, so an API call that returned has already reached the proxy and a
//! write costs the same whatever the number of records stored.

pub mod acme;
mod balance;
pub mod codec;
pub mod hlc;
pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

pub use codec::{ApiToken, Body, DrainRecord, NameClaim, Record};
use hlc::Hlc;
pub use names::{name_key, Names, NAME_PREFIX};

use crate::host::ProxyHost;
use crate::tls::cert::StoredCert;

/// key → encoded [`Record`] (see [`codec`]).
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Node facts: `node_id`, `hlc`, `seq`, `gc_floor`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Version vector: origin node id → highest contiguous seq applied.
const VV: TableDefinition<&str, u64> = TableDefinition::new("vv");

pub const DB_FILE: &str = "charon.redb";
pub const HOST_PREFIX: &str = "host/";
pub const CERT_PREFIX: &str = "cert/";
pub const TOKEN_PREFIX: &str = "token/";
pub const DRAIN_PREFIX: &str = "drain/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data dir {0} is already in use by another charon-node process \
         (stop it, or give this node its own --data-dir)"
    )]
    Locked(PathBuf),
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("store I/O failed: {0}")]
    Db(String),
    #[error("record {key} cannot be read: {source}")]
    Decode {
        key: String,
        source: codec::DecodeError,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// A change requested by local code: the store stamps it.
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    /// `None` deletes (writes a tombstone).
    pub body: Option<Body>,
}

/// Per origin node id, the highest contiguous sequence number applied (or,
/// for [`Store::gc_floor`], the highest collected).
pub type VersionVector = BTreeMap<String, u64>;

/// Where a local write landed: replication and `--wait` follow it by
/// `(origin, seq)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub origin: String,
    /// The last sequence number of the transaction's records.
    pub seq: u64,
    pub hlc: u64,
}

/// What the cluster publishes about this store: cheap to clone, sent on a
/// watch channel after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSummary {
    pub vv: VersionVector,
    /// XOR of a digest of every live record (key, hlc, origin): two stores
    /// with the same live records have the same hash whatever order the
    /// records arrived in. Tombstones are left out so that collecting them
    /// (at slightly different times on different nodes) changes nothing.
    pub hash: u64,
    pub records: usize,
}

/// The answer to a pull: see [`Store::delta_since`].
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub records: Vec<(String, Record)>,
    /// The sender's vector when the records were read: after applying them
    /// all, the receiver's state covers it.
    pub covers: VersionVector,
    /// The receiver was behind the sender's collection floor, so `records`
    /// is the whole state (see [`Store::apply_snapshot`]).
    pub snapshot: bool,
    pub gc_floor: VersionVector,
}

/// The live (non-tombstone) records of one kind, by id (the key without
/// its prefix), in id order. A persistent map: cloning is O(1) and a
/// change copies only the path to its entry, so publishing a new
/// [`Snapshot`] after a commit costs O(change), not O(everything stored).
pub struct Live<T>(imbl::OrdMap<String, Arc<T>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Default for Live<T> {
    fn default() -> Self {
        Live(imbl::OrdMap::new())
    }
}

impl<T> Live<T> {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> + '_ {
        self.0.values()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<T>> {
        self.0.get(id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_vec(&self) -> Vec<Arc<T>> {
        self.iter().cloned().collect()
    }

    /// Sets (or, with `None`, removes) `id`; returns the value it had.
    fn set(&mut self, id: &str, value: Option<Arc<T>>) -> Option<Arc<T>> {
        match value {
            Some(v) => self.0.insert(id.to_string(), v),
            None => self.0.remove(id),
        }
    }
}

/// The live hosts.
pub type HostSet = Live<ProxyHost>;

/// What the data plane is built from: cheap to clone, replaced (not
/// rebuilt) after each change.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// Every live host, as stored (conflicted domains included).
    pub hosts: HostSet,
    /// What the proxy and the TLS table serve: each host with only the
    /// domains it holds (see [`names`]); the same `Arc` as in `hosts` when
    /// it holds them all, absent when it holds none. Subscribers' host
    /// changes are changes of this set, so no table ever sees two holders
    /// of one name.
    pub routed: HostSet,
    /// Who holds each domain, the claims and the conflicts.
    pub names: Names,
    pub certs: Live<StoredCert>,
    pub tokens: Live<ApiToken>,
    pub drains: Live<DrainRecord>,
    /// Certificate id → ids of the live hosts that pin it.
    pub by_cert: Index,
    /// Idempotency key → id of the live host created with it, so that a
    /// retried create finds what it made without a scan.
    pub by_create_key: Index,
    /// ACME accounts (by hash of the directory URL), orders (by certificate
    /// id) and TLS-ALPN-01 challenges (by domain); see [`acme`].
    pub acme_accounts: Live<acme::AcmeAccount>,
    pub acme_orders: Live<acme::AcmeOrder>,
    pub acme_challenges: Live<acme::AcmeChallenge>,
    /// Access lists by name, and which hosts use each (on the host or a
    /// location): see [`crate::access`].
    pub acls: Live<crate::access::AccessList>,
    pub by_acl: Index,
}

/// Name → ids of the records listing it, by id.
pub type Index = imbl::OrdMap<String, Vec<String>>;

impl Snapshot {
    /// The live hosts pinning certificate `cert_id`, by id; O(log n).
    pub fn hosts_pinning<'a>(
        &'a self,
        cert_id: &str,
    ) -> impl Iterator<Item = &'a Arc<ProxyHost>> + 'a {
        self.by_cert
            .get(cert_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.hosts.get(id))
    }

    /// The live host created with idempotency key `key`; O(log n).
    pub fn host_created_with(&self, key: &str) -> Option<&Arc<ProxyHost>> {
        self.by_create_key
            .get(key)
            .and_then(|ids| ids.first())
            .and_then(|id| self.hosts.get(id))
    }
}

/// One live record that changed: `old`/`new` are `None` where the record
/// was absent or a tombstone. Tombstones never reach subscribers as values.
#[derive(Debug)]
pub struct Changed<T> {
    pub id: String,
    pub old: Option<Arc<T>>,
    pub new: Option<Arc<T>>,
}

/// What one commit changed, by kind: what subscribers apply to their
/// derived tables instead of rebuilding them.
#[derive(Debug, Default)]
pub struct Changes {
    /// Changes of the *routed* hosts ([`Snapshot::routed`]): a host that
    /// gains or loses a domain to a concurrent claim shows up here with the
    /// domains it serves, so a table applying these never has two holders
    /// of one name.
    pub hosts: Vec<Changed<ProxyHost>>,
    pub certs: Vec<Changed<StoredCert>>,
    pub tokens: Vec<Changed<ApiToken>>,
    pub drains: Vec<Changed<DrainRecord>>,
    /// An ACME account, order or challenge changed.
    pub acme: bool,
    pub acls: Vec<Changed<crate::access::AccessList>>,
}

impl Changes {
    /// Everything in `snap`, as if added to an empty state: what a new
    /// subscriber starts from.
    pub fn everything(snap: &Snapshot) -> Changes {
        fn all<T>(live: &Live<T>) -> Vec<Changed<T>> {
            live.0
                .iter()
                .map(|(id, v)| Changed {
                    id: id.clone(),
                    old: None,
                    new: Some(v.clone()),
                })
                .collect()
        }
        Changes {
            hosts: all(&snap.routed),
            certs: all(&snap.certs),
            tokens: all(&snap.tokens),
            drains: all(&snap.drains),
            acme: true,
            acls: all(&snap.acls),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.certs.is_empty()
            && self.tokens.is_empty()
            && self.drains.is_empty()
            && !self.acme
            && self.acls.is_empty()
    }
}

type Subscriber = Box<dyn Fn(&Snapshot, &Changes) + Send + Sync>;

struct Inner {
    records: BTreeMap<String, Record>,
    hlc: Hlc,
    seq: u64,
    vv: VersionVector,
    /// Seqs seen beyond a gap in the vector (pushes can arrive out of
    /// order); the vector advances over them once the gap is filled. Only
    /// in memory: losing it on restart just means one more pull.
    pending: BTreeMap<String, std::collections::BTreeSet<u64>>,
    gc_floor: VersionVector,
    hash: u64,
    subscribers: Vec<Subscriber>,
    snapshot: Arc<Snapshot>,
    local_writes: Option<mpsc::UnboundedSender<Vec<(String, Record)>>>,
}

pub struct Store {
    db: Database,
    node_id: String,
    inner: Mutex<Inner>,
    summary: watch::Sender<StateSummary>,
}

/// Read access to the current state inside [`Store::transact`], under the
/// store's lock, so checks (like domain uniqueness) and the write they guard
/// are atomic.
pub struct View<'a> {
    inner: &'a Inner,
}

impl View<'_> {
    pub fn hosts(&self) -> &HostSet {
        &self.inner.snapshot.hosts
    }

    pub fn certs(&self) -> &Live<StoredCert> {
        &self.inner.snapshot.certs
    }

    pub fn drains(&self) -> &Live<DrainRecord> {
        &self.inner.snapshot.drains
    }

    pub fn tokens(&self) -> &Live<ApiToken> {
        &self.inner.snapshot.tokens
    }

    pub fn acme_order(&self, id: &str) -> Option<&Arc<acme::AcmeOrder>> {
        self.inner.snapshot.acme_orders.get(id)
    }

    pub fn acme_challenge(&self, domain: &str) -> Option<&Arc<acme::AcmeChallenge>> {
        self.inner.snapshot.acme_challenges.get(domain)
    }

    /// The whole state as of this view; O(1) to clone.
    pub fn snapshot(&self) -> &Snapshot {
        &self.inner.snapshot
    }

    pub fn find_cert(&self, id: &str) -> Option<&Arc<StoredCert>> {
        self.inner.snapshot.certs.get(id)
    }

    /// Who holds which domain, and the conflicts.
    pub fn names(&self) -> &Names {
        &self.inner.snapshot.names
    }

    /// A stored record (tombstones included).
    pub fn record(&self, key: &str) -> Option<&Record> {
        self.inner.records.get(key)
    }

    /// A host by id or by one of its domains; a domain names the host that
    /// holds it, never a host that lost it in a concurrent claim.
    pub fn find_host(&self, id_or_domain: &str) -> Option<&Arc<ProxyHost>> {
        find_host(&self.inner.snapshot, id_or_domain)
    }
}

/// See [`View::find_host`]; O(log n).
pub fn find_host<'a>(snap: &'a Snapshot, id_or_domain: &str) -> Option<&'a Arc<ProxyHost>> {
    if let Some(h) = snap.hosts.get(id_or_domain) {
        return Some(h);
    }
    let needle = id_or_domain.trim().to_ascii_lowercase();
    snap.hosts.get(snap.names.holder(&needle)?)
}

impl Store {
    /// Opens (or creates) the store in `dir`. A second process on the same
    /// dir gets [`StoreError::Locked`]: redb holds an exclusive file lock.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(dir.to_path_buf()),
            source => StoreError::Open {
                path: path.clone(),
                source,
            },
        })?;
        let (node_id, mut inner) = Self::load(&db)?;
        inner.snapshot = Arc::new(snapshot(&inner.records));
        let conflicts = inner.snapshot.names.conflict_count();
        if conflicts > 0 {
            // Each got its own warning when it appeared; one line now so a
            // restart does not hide them.
            tracing::warn!(
                conflicts,
                "hosts list domains other hosts hold (see charonctl host list / cluster status)"
            );
        }
        inner.hash = inner
            .records
            .iter()
            .fold(0, |h, (k, r)| h ^ record_digest(k, r));
        let (summary, _) = watch::channel(summarise(&inner));
        Ok(Store {
            db,
            node_id,
            inner: Mutex::new(inner),
            summary,
        })
    }

    /// Start-up replay: reads every record and node fact; generates and
    /// persists the node id the first time.
    fn load(db: &Database) -> Result<(String, Inner), StoreError> {
        let txn = db.begin_write()?;
        let node_id;
        let mut inner = Inner {
            records: BTreeMap::new(),
            hlc: Hlc::default(),
            seq: 0,
            vv: VersionVector::new(),
            pending: BTreeMap::new(),
            gc_floor: VersionVector::new(),
            hash: 0,
            subscribers: Vec::new(),
            snapshot: Arc::default(),
            local_writes: None,
        };
        {
            let mut meta = txn.open_table(META)?;
            let existing = meta
                .get("node_id")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            node_id = match existing {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    meta.insert("node_id", id.as_bytes())?;
                    id
                }
            };
            let read_u64 = |v: Option<redb::AccessGuard<&[u8]>>| {
                v.and_then(|v| v.value().try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0)
            };
            inner.hlc = Hlc::new(read_u64(meta.get("hlc")?));
            inner.seq = read_u64(meta.get("seq")?);
            if let Some(v) = meta.get("gc_floor")? {
                inner.gc_floor = decode_vv(v.value());
            }
            let vv = txn.open_table(VV)?;
            for entry in vv.iter()? {
                let (k, v) = entry?;
                inner.vv.insert(k.value().to_string(), v.value());
            }
            let records = txn.open_table(RECORDS)?;
            for entry in records.iter()? {
                let (key, rec) = decode_entry(entry?)?;
                inner.hlc.observe(rec.hlc);
                inner.records.insert(key, rec);
            }
        }
        txn.commit()?;
        Ok((node_id, inner))
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Registers a subscriber and calls it at once with the current state
    /// (everything as added), then after each commit with what it changed.
    /// Subscribers run under the store lock: keep them quick (apply the
    /// changes to a copy of a persistent table, swap a pointer).
    pub fn subscribe(&self, f: impl Fn(&Snapshot, &Changes) + Send + Sync + 'static) {
        let mut inner = self.inner.lock().expect("store lock");
        f(&inner.snapshot, &Changes::everything(&inner.snapshot));
        inner.subscribers.push(Box::new(f));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.lock().expect("store lock").snapshot.clone()
    }

    pub fn hosts(&self) -> HostSet {
        self.snapshot().hosts.clone()
    }

    /// The vector, hash and size of the state, updated after every change.
    pub fn summary(&self) -> watch::Receiver<StateSummary> {
        self.summary.subscribe()
    }

    /// Every local write's records, in commit order, for the cluster's eager
    /// push. One receiver; a later call replaces the earlier one.
    pub fn local_writes(&self) -> mpsc::UnboundedReceiver<Vec<(String, Record)>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.lock().expect("store lock").local_writes = Some(tx);
        rx
    }

    /// Runs `f` under the store lock; the writes it returns are stamped
    /// (HLC, origin = this node, next seq) and committed durably in one redb
    /// transaction before this returns. If `f` fails nothing is written.
    pub fn transact<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), E>,
    ) -> Result<T, E> {
        self.transact_stamped(f).map(|(out, _)| out)
    }

    /// [`Store::transact`], also returning where the write landed (`None`
    /// when `f` asked for no write).
    pub fn transact_stamped<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), E>,
    ) -> Result<(T, Option<Stamp>), E> {
        let mut inner = self.inner.lock().expect("store lock");
        let (writes, out) = f(&View { inner: &inner })?;
        if writes.is_empty() {
            return Ok((out, None));
        }
        let wall = crate::util::wall_ms();
        let mut hlc = inner.hlc;
        let mut seq = inner.seq;
        let records: Vec<(String, Record)> = writes
            .into_iter()
            .map(|w| {
                seq += 1;
                let rec = Record {
                    hlc: hlc.tick(wall),
                    origin: self.node_id.clone(),
                    seq,
                    body: w.body,
                };
                (w.key, rec)
            })
            .collect();
        let stamp = Stamp {
            origin: self.node_id.clone(),
            seq,
            hlc: hlc.last(),
        };
        self.apply_locked(&mut inner, records.clone(), Some((hlc, seq)))?;
        if let Some(tx) = &inner.local_writes {
            let _ = tx.send(records);
        }
        Ok((out, Some(stamp)))
    }

    /// Merges records that came from elsewhere (a push): each is kept only
    /// if it supersedes what is stored. Returns how many were applied.
    pub fn apply(&self, records: Vec<(String, Record)>) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        self.apply_locked(&mut inner, records, None)
    }

    /// Merges the answer to a pull. A delta also advances the vector to
    /// what the sender covered: every write the sender had seen is now
    /// either here or superseded here. A snapshot first drops local records
    /// the sender has seen but no longer holds — deletions whose tombstones
    /// it has collected — so that nothing deleted comes back.
    pub fn apply_delta(&self, delta: Delta) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        let mut removed = Vec::new();
        let mut floor = None;
        if delta.snapshot {
            let keep: std::collections::HashSet<&str> =
                delta.records.iter().map(|(k, _)| k.as_str()).collect();
            removed = inner
                .records
                .iter()
                .filter(|(k, r)| {
                    !keep.contains(k.as_str())
                        && r.seq <= delta.covers.get(&r.origin).copied().unwrap_or(0)
                })
                .map(|(k, _)| k.clone())
                .collect();
            let mut f = inner.gc_floor.clone();
            merge_max(&mut f, &delta.gc_floor);
            floor = Some(f);
        }
        let change = Change {
            records: delta.records,
            local_clock: None,
            covers: Some(&delta.covers),
            removed,
            gc_floor: floor,
        };
        self.commit(&mut inner, change)
    }

    fn apply_locked(
        &self,
        inner: &mut Inner,
        records: Vec<(String, Record)>,
        local_clock: Option<(Hlc, u64)>,
    ) -> Result<usize, StoreError> {
        let change = Change {
            records,
            local_clock,
            covers: None,
            removed: Vec::new(),
            gc_floor: None,
        };
        self.commit(inner, change)
    }

    /// The one merge-and-commit path, for local writes, pushes, pulls,
    /// snapshots and tombstone collection. Records are kept only if they
    /// supersede what is stored (last writer wins on `(hlc, origin)`);
    /// everything is committed durably in one redb transaction, then the
    /// in-memory state, the subscribers and the summary follow.
    fn commit(&self, inner: &mut Inner, change: Change<'_>) -> Result<usize, StoreError> {
        let Change {
            records,
            local_clock,
            covers,
            removed,
            gc_floor,
        } = change;
        // The vector counts every record seen, winner or not: a record that
        // lost to a newer one is still covered.
        let mut new_vv = inner.vv.clone();
        let mut pending = inner.pending.clone();
        for (_, r) in &records {
            if r.seq > new_vv.get(&r.origin).copied().unwrap_or(0) {
                pending.entry(r.origin.clone()).or_default().insert(r.seq);
            }
        }
        if let Some(covers) = covers {
            merge_max(&mut new_vv, covers);
        }
        for (origin, seqs) in pending.iter_mut() {
            let v = new_vv.entry(origin.clone()).or_insert(0);
            seqs.retain(|&s| s > *v);
            while seqs.first() == Some(&(*v + 1)) {
                *v += 1;
                seqs.pop_first();
            }
        }
        pending.retain(|_, seqs| !seqs.is_empty());
        new_vv.retain(|_, v| *v > 0);
        let mut winners: BTreeMap<String, Record> = BTreeMap::new();
        for (k, r) in records {
            let current = winners.get(&k).or_else(|| inner.records.get(&k));
            match current {
                Some(old) if !supersedes(&k, &r, old) => {
                    // The same record again is routine; a different one
                    // from another node is a concurrent edit that lost.
                    if old.origin != r.origin && old.hlc != r.hlc {
                        tracing::info!(key = %k, winner = %old.origin, loser = %r.origin,
                            loser_hlc = r.hlc, "a concurrent write lost (last writer wins)");
                    }
                }
                // Seen (covered by our vector) yet absent: superseded by
                // a tombstone that has since been collected. Taking it
                // would bring a deleted record back.
                None if r.seq <= inner.vv.get(&r.origin).copied().unwrap_or(0) => {
                    tracing::debug!(key = %k, origin = %r.origin, seq = r.seq,
                        "ignoring a record whose deletion was already collected");
                }
                _ => {
                    winners.insert(k, r);
                }
            }
        }
        let mut hlc = local_clock.map(|(h, _)| h).unwrap_or(inner.hlc);
        for r in winners.values() {
            hlc.observe(r.hlc);
        }
        let nothing_new = winners.is_empty()
            && removed.is_empty()
            && gc_floor.is_none()
            && new_vv == inner.vv
            && local_clock.is_none();
        if nothing_new {
            inner.pending = pending;
            return Ok(0);
        }
        let mut txn = self.db.begin_write()?;
        // Immediate is redb's default; said explicitly because the API's
        // promise ("acknowledged = on disk") depends on it.
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = txn.open_table(RECORDS)?;
            let mut vv = txn.open_table(VV)?;
            let mut meta = txn.open_table(META)?;
            for key in &removed {
                table.remove(key.as_str())?;
            }
            for (key, rec) in &winners {
                table.insert(key.as_str(), codec::encode(rec).as_slice())?;
            }
            for (origin, &seq) in &new_vv {
                if inner.vv.get(origin) != Some(&seq) {
                    vv.insert(origin.as_str(), seq)?;
                }
            }
            meta.insert("hlc", hlc.last().to_le_bytes().as_slice())?;
            if let Some((_, seq)) = local_clock {
                meta.insert("seq", seq.to_le_bytes().as_slice())?;
            }
            if let Some(floor) = &gc_floor {
                meta.insert("gc_floor", encode_vv(floor).as_slice())?;
            }
        }
        txn.commit()?;
        inner.hlc = hlc;
        if let Some((_, seq)) = local_clock {
            inner.seq = seq;
        }
        inner.vv = new_vv;
        inner.pending = pending;
        if let Some(floor) = gc_floor {
            inner.gc_floor = floor;
        }
        let applied = winners.len();
        apply_in_memory(inner, removed, winners);
        self.summary.send_replace(summarise(inner));
        Ok(applied)
    }

    /// What a peer whose vector is `have` is missing. When `have` is behind
    /// the collection floor of some origin (this node has dropped
    /// tombstones the peer may never have seen), the whole state is sent as
    /// a snapshot instead.
    pub fn delta_since(&self, have: &VersionVector) -> Delta {
        let inner = self.inner.lock().expect("store lock");
        let seen = |origin: &str| have.get(origin).copied().unwrap_or(0);
        let snapshot = inner
            .gc_floor
            .iter()
            .any(|(origin, &floor)| floor > seen(origin));
        let records = inner
            .records
            .iter()
            .filter(|(_, r)| snapshot || r.seq > seen(&r.origin))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        Delta {
            records,
            covers: inner.vv.clone(),
            snapshot,
            gc_floor: inner.gc_floor.clone(),
        }
    }

    /// Drops tombstones every member has applied (`min_vv`, the smallest
    /// vector over all members including this one) and older than
    /// `older_than_hlc`, and raises the collection floor so that a peer
    /// which has not seen them gets a snapshot. Returns how many went.
    pub fn collect_tombstones(
        &self,
        min_vv: &VersionVector,
        older_than_hlc: u64,
    ) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        let mut floor = inner.gc_floor.clone();
        let removed: Vec<String> = inner
            .records
            .iter()
            .filter(|(_, r)| {
                r.body.is_none()
                    && r.hlc < older_than_hlc
                    && r.seq <= min_vv.get(&r.origin).copied().unwrap_or(0)
            })
            .map(|(k, r)| {
                let f = floor.entry(r.origin.clone()).or_insert(0);
                *f = (*f).max(r.seq);
                k.clone()
            })
            .collect();
        if removed.is_empty() {
            return Ok(0);
        }
        let n = removed.len();
        let change = Change {
            records: Vec::new(),
            local_clock: None,
            covers: None,
            removed,
            gc_floor: Some(floor),
        };
        self.commit(&mut inner, change)?;
        Ok(n)
    }

    /// Gossip addresses of the peers this node last saw (see
    /// [`Store::remember_peers`]).
    pub fn remembered_peers(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(meta
            .get("peers")?
            .map(|v| {
                String::from_utf8_lossy(v.value())
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Keeps the gossip addresses of the live peers, so that a node
    /// restarted without `--seeds` still finds its cluster and catches up
    /// before it takes writes.
    pub fn remember_peers(&self, peers: &[String]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.open_table(META)?
            .insert("peers", peers.join("\n").as_bytes())?;
        txn.commit()?;
        Ok(())
    }

    pub fn version_vector(&self) -> VersionVector {
        self.inner.lock().expect("store lock").vv.clone()
    }

    pub fn gc_floor(&self) -> VersionVector {
        self.inner.lock().expect("store lock").gc_floor.clone()
    }

    /// Every record with its metadata, tombstones included.
    pub fn records(&self) -> Vec<(String, Record)> {
        let inner = self.inner.lock().expect("store lock");
        inner
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Re-reads the records from disk; used by tests to prove that what the
    /// in-memory state says is what redb holds.
    pub fn read_disk_records(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            out.push(decode_entry(entry?)?);
        }
        Ok(out)
    }
}

/// The in-memory side of a commit that is already on disk: the records,
/// the state hash, the snapshot derived by change (names included), and the
/// subscribers, who get only what changed.
fn apply_in_memory(inner: &mut Inner, removed: Vec<String>, winners: BTreeMap<String, Record>) {
    let before = inner.snapshot.clone();
    let mut snap = (*before).clone();
    let mut changes = Changes::default();
    let mut touched = names::Touched::default();
    for k in removed {
        if let Some(old) = inner.records.remove(&k) {
            inner.hash ^= record_digest(&k, &old);
            derive(&mut snap, &mut changes, &mut touched, &k, None);
        }
    }
    for (k, r) in winners {
        inner.hash ^= record_digest(&k, &r);
        derive(&mut snap, &mut changes, &mut touched, &k, r.body.as_ref());
        if let Some(old) = inner.records.insert(k.clone(), r) {
            inner.hash ^= record_digest(&k, &old);
        }
    }
    // Who holds each affected domain, the conflicts, and the routed
    // hosts that follow: only what this commit touched.
    let touched_any = !touched.is_empty();
    changes.hosts = names::settle(&before, &mut snap, touched, true);
    if touched_any || !changes.is_empty() {
        inner.snapshot = Arc::new(snap);
        if !changes.is_empty() {
            for s in &inner.subscribers {
                s(&inner.snapshot, &changes);
            }
        }
    }
}

/// One change for [`Store::commit`].
struct Change<'a> {
    records: Vec<(String, Record)>,
    local_clock: Option<(Hlc, u64)>,
    covers: Option<&'a VersionVector>,
    removed: Vec<String>,
    gc_floor: Option<VersionVector>,
}

/// The merge order of two versions of the record at `key`: last writer
/// wins on `(hlc, origin)`, except that a host, once deleted, stays
/// deleted. Host ids are never reused, so a live version that meets the
/// host's tombstone can only be an update made on a node that had not yet
/// heard of the delete (a paused or lagging node): taking it would bring
/// an acknowledged delete back. Still a total order per key (tombstones
/// above live versions, each ordered by clock), so merging stays
/// commutative, idempotent and order-free.
fn supersedes(key: &str, new: &Record, old: &Record) -> bool {
    if key.starts_with(HOST_PREFIX) && new.body.is_none() != old.body.is_none() {
        return new.body.is_none();
    }
    new.supersedes(old)
}

fn merge_max(into: &mut VersionVector, from: &VersionVector) {
    for (origin, &seq) in from {
        let e = into.entry(origin.clone()).or_insert(0);
        *e = (*e).max(seq);
    }
}

/// The digest of one record for the state hash; tombstones count as absent.
fn record_digest(key: &str, rec: &Record) -> u64 {
    if rec.body.is_none() {
        return 0;
    }
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(rec.hlc.to_le_bytes());
    h.update(rec.origin.as_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn summarise(inner: &Inner) -> StateSummary {
    StateSummary {
        vv: inner.vv.clone(),
        hash: inner.hash,
        records: inner.records.len(),
    }
}

/// `origin=seq` pairs, one per line: the floor is tiny and rarely written.
fn encode_vv(vv: &VersionVector) -> Vec<u8> {
    vv.iter()
        .map(|(o, s)| format!("{o}={s}\n"))
        .collect::<String>()
        .into_bytes()
}

fn decode_vv(bytes: &[u8]) -> VersionVector {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| {
            let (o, s) = l.split_once('=')?;
            Some((o.to_string(), s.parse().ok()?))
        })
        .collect()
}

type Entry<'a> = (
    redb::AccessGuard<'a, &'static str>,
    redb::AccessGuard<'a, &'static [u8]>,
);

fn decode_entry((k, v): Entry<'_>) -> Result<(String, Record), StoreError> {
    let key = k.value().to_string();
    let rec = codec::decode(v.value()).map_err(|source| StoreError::Decode {
        key: key.clone(),
        source,
    })?;
    Ok((key, rec))
}

/// Sets `live[id]` to `new` and records the change, if there is one (a
/// tombstone replacing a tombstone or an absent record is none).
fn track<T: Clone>(live: &mut Live<T>, out: &mut Vec<Changed<T>>, id: &str, new: Option<&T>) {
    let new = new.map(|v| Arc::new(v.clone()));
    let old = live.set(id, new.clone());
    if old.is_some() || new.is_some() {
        out.push(Changed {
            id: id.to_string(),
            old,
            new,
        });
    }
}

/// Applies the record now at `key` (`None`: absent or a tombstone) to the
/// derived snapshot; what subscribers must apply goes to `changes`, and
/// what the names rule must look at again to `touched` (see
/// [`names::settle`], which turns host changes into routed-host changes).
fn derive(
    snap: &mut Snapshot,
    changes: &mut Changes,
    touched: &mut names::Touched,
    key: &str,
    body: Option<&Body>,
) {
    if let Some(id) = key.strip_prefix(HOST_PREFIX) {
        let mut stored = Vec::with_capacity(1);
        track(
            &mut snap.hosts,
            &mut stored,
            id,
            body.and_then(Body::as_host),
        );
        if let Some(c) = stored.pop() {
            names::host_changed(&mut snap.names, touched, &c);
            let pin = |h: &Option<Arc<ProxyHost>>| {
                h.iter()
                    .filter(|h| !h.cert_id.is_empty())
                    .map(|h| h.cert_id.clone())
                    .collect()
            };
            let create_key = |h: &Option<Arc<ProxyHost>>| {
                h.iter()
                    .filter(|h| !h.create_key.is_empty())
                    .map(|h| h.create_key.clone())
                    .collect()
            };
            reindex(&mut snap.by_cert, &c.id, pin(&c.old), pin(&c.new));
            reindex(
                &mut snap.by_create_key,
                &c.id,
                create_key(&c.old),
                create_key(&c.new),
            );
            let acls = |h: &Option<Arc<ProxyHost>>| h.as_deref().map(acls_used).unwrap_or_default();
            reindex(&mut snap.by_acl, &c.id, acls(&c.old), acls(&c.new));
        }
    } else if let Some(domain) = key.strip_prefix(NAME_PREFIX) {
        let claim = body.and_then(Body::as_claim);
        names::claim_changed(&mut snap.names, touched, domain, claim);
    } else if let Some(id) = key.strip_prefix(CERT_PREFIX) {
        track(
            &mut snap.certs,
            &mut changes.certs,
            id,
            body.and_then(Body::as_cert),
        );
    } else if let Some(id) = key.strip_prefix(TOKEN_PREFIX) {
        track(
            &mut snap.tokens,
            &mut changes.tokens,
            id,
            body.and_then(Body::as_token),
        );
    } else if let Some(id) = key.strip_prefix(DRAIN_PREFIX) {
        track(
            &mut snap.drains,
            &mut changes.drains,
            id,
            body.and_then(Body::as_drain),
        );
    } else if key.starts_with(acme::ACME_PREFIX) {
        derive_acme(snap, changes, key, body);
    } else if let Some(name) = key.strip_prefix(crate::access::ACL_PREFIX) {
        track(
            &mut snap.acls,
            &mut changes.acls,
            name,
            body.and_then(Body::as_acl),
        );
    }
}

/// The access lists a host names, on itself or its locations, each once.
pub fn acls_used(h: &ProxyHost) -> Vec<String> {
    let mut out: Vec<String> = std::iter::once(&h.acl)
        .chain(h.locations.iter().map(|l| &l.acl))
        .filter(|a| !a.is_empty())
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The ACME records: few (one account per directory, one order per
/// certificate, challenges only while validating), so subscribers are only
/// told that something ACME changed and re-read the snapshot's maps.
fn derive_acme(snap: &mut Snapshot, changes: &mut Changes, key: &str, body: Option<&Body>) {
    let before = changes.acme;
    let mut changed = |n: usize| changes.acme = before || n > 0;
    if let Some(id) = key.strip_prefix(acme::ACCOUNT_PREFIX) {
        let mut out = Vec::new();
        track(
            &mut snap.acme_accounts,
            &mut out,
            id,
            body.and_then(Body::as_acme_account),
        );
        changed(out.len());
    } else if let Some(id) = key.strip_prefix(acme::ORDER_PREFIX) {
        let mut out = Vec::new();
        track(
            &mut snap.acme_orders,
            &mut out,
            id,
            body.and_then(Body::as_acme_order),
        );
        changed(out.len());
    } else if let Some(id) = key.strip_prefix(acme::ALPN_PREFIX) {
        let mut out = Vec::new();
        track(
            &mut snap.acme_challenges,
            &mut out,
            id,
            body.and_then(Body::as_acme_challenge),
        );
        changed(out.len());
    }
}

/// Moves record `id` in `index` from the names it listed (`old`) to those
/// it lists now (`new`).
fn reindex(index: &mut Index, id: &str, old: Vec<String>, new: Vec<String>) {
    for name in &old {
        if let Some(ids) = index.get_mut(name) {
            ids.retain(|x| x != id);
            if ids.is_empty() {
                index.remove(name);
            }
        }
    }
    for name in new {
        let ids = index.entry(name).or_default();
        if let Err(i) = ids.binary_search_by(|x| x.as_str().cmp(id)) {
            ids.insert(i, id.to_string());
        }
    }
}

/// The snapshot of `records` from scratch (start-up): the same derivation
/// as a commit's, from an empty state.
fn snapshot(records: &BTreeMap<String, Record>) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut changes = Changes::default();
    let mut touched = names::Touched::default();
    for (k, r) in records {
        derive(&mut snap, &mut changes, &mut touched, k, r.body.as_ref());
    }
    let empty = Snapshot::default();
    names::settle(&empty, &mut snap, touched, false);
    snap
}

pub fn host_key(id: &str) -> String {
    format!("{HOST_PREFIX}{id}")
}

pub fn drain_key(node_id: &str) -> String {
    format!("{DRAIN_PREFIX}{node_id}")
}

pub fn token_key(id: &str) -> String {
    format!("{TOKEN_PREFIX}{id}")
}

pub fn cert_key(id: &str) -> String {
    format!("{CERT_PREFIX}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ProxyHost;

    fn host(id: &str, domain: &str) -> ProxyHost {
        ProxyHost {
            id: id.into(),
            name: domain.into(),
            domains: vec![domain.into()],
            upstreams: vec!["http://127.0.0.1:1".into()],
            enabled: true,
            websocket: true,
            preserve_host: true,
            forwarded_headers: true,
            locations: vec![],
            ws_idle_timeout_secs: 0,
            ws_ping_interval_secs: 0,
            upstream_timeout_ms: 0,
            version: 1,
            ..Default::default()
        }
    }

    fn put(store: &Store, h: ProxyHost) {
        store
            .transact(|_| {
                Ok::<_, StoreError>((
                    vec![Write {
                        key: host_key(&h.id),
                        body: Some(Body::Host(h)),
                    }],
                    (),
                ))
            })
            .unwrap();
    }

    #[test]
    fn writes_survive_reopen_with_node_id_clock_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (id, last) = {
            let store = Store::open(dir.path()).unwrap();
            put(&store, host("a", "a.com"));
            put(&store, host("b", "b.com"));
            store
                .transact(|_| {
                    Ok::<_, StoreError>((
                        vec![Write {
                            key: host_key("a"),
                            body: None,
                        }],
                        (),
                    ))
                })
                .unwrap();
            let recs = store.records();
            assert_eq!(recs.iter().map(|(_, r)| r.seq).max(), Some(3));
            (
                store.node_id().to_string(),
                recs.iter().map(|(_, r)| r.hlc).max().unwrap(),
            )
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.node_id(), id);
        let hosts = store.hosts();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts.to_vec()[0].id, "b");
        put(&store, host("c", "c.com"));
        let c = store
            .records()
            .into_iter()
            .find(|(k, _)| k == "host/c")
            .unwrap()
            .1;
        assert_eq!(c.seq, 4, "seq continues after restart");
        assert!(c.hlc > last, "clock never goes back across restarts");
        assert_eq!(store.read_disk_records().unwrap(), store.records());
    }

    #[test]
    fn second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        match Store::open(dir.path()) {
            Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("second open succeeded"),
        }
    }

    #[test]
    fn failed_transaction_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r: Result<(), String> = store.transact(|_| Err("no".to_string()));
        assert!(r.is_err());
        assert!(store.read_disk_records().unwrap().is_empty());
    }

    #[test]
    fn apply_keeps_the_lww_winner_and_notifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        store.subscribe(move |snap, _| s2.lock().unwrap().push(snap.hosts.len()));
        let newer = Record {
            hlc: 10,
            origin: "x".into(),
            seq: 1,
            body: Some(Body::Host(host("h", "new.com"))),
        };
        let older = Record {
            hlc: 5,
            origin: "y".into(),
            seq: 1,
            body: Some(Body::Host(host("h", "old.com"))),
        };
        assert_eq!(store.apply(vec![("host/h".into(), newer)]).unwrap(), 1);
        assert_eq!(store.apply(vec![("host/h".into(), older)]).unwrap(), 0);
        assert_eq!(store.hosts().to_vec()[0].domains, ["new.com"]);
        assert_eq!(*seen.lock().unwrap(), [0, 1]);
    }

    /// Subscribers get only what a commit changed (tombstones as `None`,
    /// never as values), and the snapshot kept by change equals one built
    /// from the records from scratch.
    #[test]
    fn subscribers_get_changes_and_the_snapshot_matches_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            put(&store, host(&format!("h{i}"), &format!("h{i}.test")));
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        store.subscribe(move |_, ch| {
            let list = ch
                .hosts
                .iter()
                .map(|c| (c.id.clone(), c.old.is_some(), c.new.is_some()))
                .collect::<Vec<_>>();
            s2.lock().unwrap().push(list);
        });
        put(&store, host("h2", "h2-new.test"));
        store
            .transact(|_| {
                let rm = Write {
                    key: host_key("h3"),
                    body: None,
                };
                let again = Write {
                    key: host_key("gone"),
                    body: None,
                };
                Ok::<_, StoreError>((vec![rm, again], ()))
            })
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].len(), 5, "a new subscriber starts from everything");
        assert_eq!(seen[1], [("h2".to_string(), true, true)]);
        assert_eq!(
            seen[2],
            [("h3".to_string(), true, false)],
            "a tombstone for an absent record is no change"
        );
        let snap = store.snapshot();
        let rebuilt = snapshot(&store.inner.lock().unwrap().records);
        let ids = |s: &Snapshot| {
            s.hosts
                .iter()
                .map(|h| (h.id.clone(), h.domains.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&snap), ids(&rebuilt));
        assert_eq!(snap.names, rebuilt.names);
        assert!(snap.names.listers("h2.test").is_empty());
        assert_eq!(snap.names.listers("h2-new.test"), &["h2".to_string()]);
    }

    mod merge {
        use super::*;
        use proptest::prelude::*;

        /// A write as some node made it: key index, origin index, clock,
        /// tombstone or a host with a marker upstream.
        fn writes() -> impl Strategy<Value = Vec<(String, Record)>> {
            prop::collection::vec((0..4usize, 0..3usize, 1..50u64, any::<bool>()), 1..24).prop_map(
                |raw| {
                    let mut seq = [0u64; 3];
                    // Like a real clock: each origin's stamps only grow.
                    let mut clock = [0u64; 3];
                    raw.into_iter()
                        .map(|(k, o, step, dead)| {
                            seq[o] += 1;
                            clock[o] += step;
                            let hlc = clock[o];
                            let id = format!("h{k}");
                            let body = (!dead).then(|| {
                                let mut h = host(&id, &format!("{id}.test"));
                                h.upstreams = vec![format!("http://127.0.0.1:{}", hlc + 1000)];
                                Body::Host(h)
                            });
                            let rec = Record {
                                hlc,
                                origin: format!("n{o}"),
                                seq: seq[o],
                                body,
                            };
                            (host_key(&id), rec)
                        })
                        .collect()
                },
            )
        }

        fn state(store: &Store) -> (Vec<(String, Record)>, u64, VersionVector) {
            let s = store.summary().borrow().clone();
            (store.records(), s.hash, s.vv)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// Any order, duplicates and batching of the same writes give
            /// the same records, hash and vector.
            #[test]
            fn merge_is_order_free_and_idempotent(
                ws in writes(),
                seed in any::<u64>(),
                cut in 1..6usize,
            ) {
                let d1 = tempfile::tempdir().unwrap();
                let d2 = tempfile::tempdir().unwrap();
                let one = Store::open(d1.path()).unwrap();
                let two = Store::open(d2.path()).unwrap();
                one.apply(ws.clone()).unwrap();
                let mut shuffled = ws.clone();
                shuffled.extend(ws.iter().take(seed as usize % ws.len()).cloned());
                let mut rng = seed;
                for i in (1..shuffled.len()).rev() {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    shuffled.swap(i, (rng >> 33) as usize % (i + 1));
                }
                for chunk in shuffled.chunks(cut) {
                    two.apply(chunk.to_vec()).unwrap();
                }
                prop_assert_eq!(state(&one), state(&two));
                // What was derived by change is what a rebuild derives.
                for st in [&one, &two] {
                    let snap = st.snapshot();
                    let rebuilt = snapshot(&st.inner.lock().unwrap().records);
                    let hosts = |s: &Snapshot| s.hosts.iter().map(|h| (**h).clone()).collect::<Vec<_>>();
                    prop_assert_eq!(hosts(&snap), hosts(&rebuilt));
                    prop_assert_eq!(&snap.names, &rebuilt.names);
                }
                // The winner per key is the highest (hlc, origin).
                for (k, r) in one.records() {
                    let best = ws.iter().filter(|(wk, _)| *wk == k)
                        .max_by(|a, b| (a.1.body.is_none(), a.1.hlc, &a.1.origin)
                            .cmp(&(b.1.body.is_none(), b.1.hlc, &b.1.origin)))
                        .unwrap();
                    prop_assert_eq!(&best.1, &r);
                }
                // Every write was seen: the vector covers all of them.
                for (_, r) in &ws {
                    prop_assert!(state(&one).2.get(&r.origin).copied().unwrap_or(0) >= r.seq);
                }
            }

            /// Pulling a delta from a peer in any state gives the union.
            #[test]
            fn delta_sync_converges(a in writes(), b in writes()) {
                let d1 = tempfile::tempdir().unwrap();
                let d2 = tempfile::tempdir().unwrap();
                let one = Store::open(d1.path()).unwrap();
                let two = Store::open(d2.path()).unwrap();
                // Rename b's origins so the two histories do not clash.
                let b: Vec<_> = b.into_iter().map(|(k, mut r)| { r.origin = format!("m{}", r.origin); (k, r) }).collect();
                one.apply(a).unwrap();
                two.apply(b).unwrap();
                one.apply_delta(two.delta_since(&one.version_vector())).unwrap();
                two.apply_delta(one.delta_since(&two.version_vector())).unwrap();
                prop_assert_eq!(state(&one), state(&two));
            }
        }

        /// A host once deleted stays deleted: its id is never reused, so a
        /// later live version is an update made without knowing of the
        /// delete.
        #[test]
        fn a_host_tombstone_beats_every_live_version() {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let live = |hlc, origin: &str, seq| Record {
                hlc,
                origin: origin.into(),
                seq,
                body: Some(Body::Host(host("h", "h.test"))),
            };
            let dead = Record {
                hlc: 20,
                origin: "y".into(),
                seq: 1,
                body: None,
            };
            store
                .apply(vec![("host/h".into(), live(10, "x", 1))])
                .unwrap();
            store.apply(vec![("host/h".into(), dead.clone())]).unwrap();
            assert!(
                store.hosts().is_empty(),
                "the tombstone beats the older write"
            );
            store
                .apply(vec![("host/h".into(), live(15, "z", 1))])
                .unwrap();
            assert!(
                store.hosts().is_empty(),
                "an older write arriving late loses"
            );
            store
                .apply(vec![("host/h".into(), live(30, "x", 2))])
                .unwrap();
            assert!(
                store.hosts().is_empty(),
                "an update made without knowing of the delete brought the host back"
            );
            // The order of arrival does not matter.
            let dir = tempfile::tempdir().unwrap();
            let other = Store::open(dir.path()).unwrap();
            other
                .apply(vec![("host/h".into(), live(30, "x", 2))])
                .unwrap();
            other.apply(vec![("host/h".into(), dead)]).unwrap();
            assert!(other.hosts().is_empty());
        }

        #[test]
        fn collected_tombstones_send_laggards_a_snapshot_and_nothing_comes_back() {
            let d1 = tempfile::tempdir().unwrap();
            let d2 = tempfile::tempdir().unwrap();
            let a = Store::open(d1.path()).unwrap();
            let c = Store::open(d2.path()).unwrap();
            put(&a, host("h", "h.test"));
            c.apply_delta(a.delta_since(&c.version_vector())).unwrap();
            a.transact(|_| {
                Ok::<_, StoreError>((
                    vec![Write {
                        key: host_key("h"),
                        body: None,
                    }],
                    (),
                ))
            })
            .unwrap();
            let everyone = a.version_vector();
            assert_eq!(a.collect_tombstones(&everyone, u64::MAX).unwrap(), 1);
            assert!(a.records().is_empty());
            // c offers its stale copy: a has seen it, so it is refused.
            a.apply_delta(c.delta_since(&VersionVector::new())).unwrap();
            assert!(a.hosts().is_empty(), "resurrected by a stale peer");
            // c pulls: it is behind the floor, gets a snapshot, drops the host.
            let d = a.delta_since(&c.version_vector());
            assert!(d.snapshot);
            c.apply_delta(d).unwrap();
            assert!(c.hosts().is_empty());
            assert_eq!(c.summary().borrow().hash, a.summary().borrow().hash);
        }
    }

    impl From<StoreError> for String {
        fn from(e: StoreError) -> String {
            e.to_string()
        }
    }
}
