//! The node's store: one redb file holding every record.
//!
//! Data flows one way: API (or, later, replication) → [`Store::transact`] /
//! [`Store::apply`] → subscribers (the route table). Every change, local or
//! replicated or replayed at start-up, goes through [`Store::apply_locked`],
//! which merges by last-writer-wins and commits durably before returning.
//! Nothing on the request path reads redb: subscribers get the live host set
//! synchronously after each commit, so an API call that returned has already
//! reached the proxy.

pub mod codec;
pub mod hlc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

pub use codec::{Body, Record};
use hlc::Hlc;

use crate::host::ProxyHost;
use crate::tls::cert::StoredCert;

/// key → encoded [`Record`] (see [`codec`]).
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Node facts: `node_id`, `hlc`, `seq`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Version vector: origin node id → highest contiguous seq applied.
const VV: TableDefinition<&str, u64> = TableDefinition::new("vv");

pub const DB_FILE: &str = "charon.redb";
pub const HOST_PREFIX: &str = "host/";
pub const CERT_PREFIX: &str = "cert/";

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

/// The live (non-tombstone) hosts.
pub type HostSet = Vec<Arc<ProxyHost>>;

/// What the data plane is built from, handed to subscribers after each
/// change.
#[derive(Default)]
pub struct Snapshot {
    pub hosts: HostSet,
    pub certs: Vec<Arc<StoredCert>>,
}

type Subscriber = Box<dyn Fn(&Snapshot) + Send + Sync>;

struct Inner {
    records: BTreeMap<String, Record>,
    hlc: Hlc,
    seq: u64,
    subscribers: Vec<Subscriber>,
    snapshot: Arc<Snapshot>,
}

pub struct Store {
    db: Database,
    node_id: String,
    inner: Mutex<Inner>,
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

    pub fn certs(&self) -> &[Arc<StoredCert>] {
        &self.inner.snapshot.certs
    }

    pub fn find_cert(&self, id: &str) -> Option<&Arc<StoredCert>> {
        self.inner.snapshot.certs.iter().find(|c| c.id == id)
    }

    /// A host by id or by one of its domains.
    pub fn find_host(&self, id_or_domain: &str) -> Option<&Arc<ProxyHost>> {
        let needle = id_or_domain.trim().to_ascii_lowercase();
        let hosts = self.hosts();
        hosts
            .iter()
            .find(|h| h.id == id_or_domain)
            .or_else(|| hosts.iter().find(|h| h.domains.contains(&needle)))
    }
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
        Ok(Store {
            db,
            node_id,
            inner: Mutex::new(inner),
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
            subscribers: Vec::new(),
            snapshot: Arc::default(),
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
            let _ = txn.open_table(VV)?;
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

    /// Registers a subscriber and calls it at once with the current state.
    /// Subscribers run under the store lock: keep them quick (build a table,
    /// swap a pointer).
    pub fn subscribe(&self, f: impl Fn(&Snapshot) + Send + Sync + 'static) {
        let mut inner = self.inner.lock().expect("store lock");
        f(&inner.snapshot);
        inner.subscribers.push(Box::new(f));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.lock().expect("store lock").snapshot.clone()
    }

    pub fn hosts(&self) -> HostSet {
        self.snapshot().hosts.clone()
    }

    /// Runs `f` under the store lock; the writes it returns are stamped
    /// (HLC, origin = this node, next seq) and committed durably in one redb
    /// transaction before this returns. If `f` fails nothing is written.
    pub fn transact<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), E>,
    ) -> Result<T, E> {
        let mut inner = self.inner.lock().expect("store lock");
        let (writes, out) = f(&View { inner: &inner })?;
        if writes.is_empty() {
            return Ok(out);
        }
        let wall = hlc::wall_ms();
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
        self.apply_locked(&mut inner, records, Some((hlc, seq)))?;
        Ok(out)
    }

    /// Merges records that came from elsewhere (replication): each is kept
    /// only if it supersedes what is stored. Returns how many were applied.
    pub fn apply(&self, records: Vec<(String, Record)>) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock().expect("store lock");
        self.apply_locked(&mut inner, records, None)
    }

    /// The one merge-and-commit path. `local_clock` carries the advanced
    /// clock and seq of a local write so they persist in the same
    /// transaction as the records they stamped.
    fn apply_locked(
        &self,
        inner: &mut Inner,
        records: Vec<(String, Record)>,
        local_clock: Option<(Hlc, u64)>,
    ) -> Result<usize, StoreError> {
        let winners: Vec<(String, Record)> = records
            .into_iter()
            .filter(|(k, r)| inner.records.get(k).is_none_or(|old| r.supersedes(old)))
            .collect();
        let mut hlc = local_clock.map(|(h, _)| h).unwrap_or(inner.hlc);
        for (_, r) in &winners {
            hlc.observe(r.hlc);
        }
        let mut txn = self.db.begin_write()?;
        // Immediate is redb's default; said explicitly because the API's
        // promise ("acknowledged = on disk") depends on it.
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = txn.open_table(RECORDS)?;
            let mut vv = txn.open_table(VV)?;
            for (key, rec) in &winners {
                table.insert(key.as_str(), codec::encode(rec).as_slice())?;
                let applied = vv.get(rec.origin.as_str())?.map(|v| v.value()).unwrap_or(0);
                if rec.seq == applied + 1 {
                    vv.insert(rec.origin.as_str(), rec.seq)?;
                }
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("hlc", hlc.last().to_le_bytes().as_slice())?;
            if let Some((_, seq)) = local_clock {
                meta.insert("seq", seq.to_le_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        inner.hlc = hlc;
        if let Some((_, seq)) = local_clock {
            inner.seq = seq;
        }
        let applied = winners.len();
        let touched = winners
            .iter()
            .any(|(k, _)| k.starts_with(HOST_PREFIX) || k.starts_with(CERT_PREFIX));
        for (k, r) in winners {
            inner.records.insert(k, r);
        }
        if touched {
            inner.snapshot = Arc::new(snapshot(&inner.records));
            for s in &inner.subscribers {
                s(&inner.snapshot);
            }
        }
        Ok(applied)
    }

    /// Every record with its metadata (for inspection and, later, sync).
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

fn live<T: Clone>(
    records: &BTreeMap<String, Record>,
    prefix: &str,
    get: fn(&Body) -> Option<&T>,
) -> Vec<Arc<T>> {
    records
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .filter_map(|(_, r)| r.body.as_ref().and_then(get).map(|v| Arc::new(v.clone())))
        .collect()
}

fn snapshot(records: &BTreeMap<String, Record>) -> Snapshot {
    Snapshot {
        hosts: live(records, HOST_PREFIX, Body::as_host),
        certs: live(records, CERT_PREFIX, Body::as_cert),
    }
}

pub fn host_key(id: &str) -> String {
    format!("{HOST_PREFIX}{id}")
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
        assert_eq!(hosts[0].id, "b");
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
        store.subscribe(move |snap| s2.lock().unwrap().push(snap.hosts.len()));
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
            body: None,
        };
        assert_eq!(store.apply(vec![("host/h".into(), newer)]).unwrap(), 1);
        assert_eq!(store.apply(vec![("host/h".into(), older)]).unwrap(), 0);
        assert_eq!(store.hosts()[0].domains, ["new.com"]);
        assert_eq!(*seen.lock().unwrap(), [0, 1]);
    }

    impl From<StoreError> for String {
        fn from(e: StoreError) -> String {
            e.to_string()
        }
    }
}
