//! The cluster: chitchat for membership and small per-node facts, gRPC for
//! the config itself.
//!
//! Each node gossips only what fits in a datagram: API address, name,
//! region, zone, status, build version, its store's version vector (in 16
//! buckets) and
//! state hash, drain progress, and a membership proof (see [`auth`]); every
//! key and how its value is written is in [`gossip`]. Records move over
//! the sync service ([`sync`]) in three ways:
//! - **push**: every local write goes down a 3-ary tree over this region's
//!   members rooted at the writer, the same tree at every hop ([`tree`]),
//!   and to one member of each other region, which roots that region's
//!   tree; each receiver relays it once to its children. A host added on
//!   one node is usually served everywhere within milliseconds, every node
//!   gets it about once, and none sends more than a few pushes per write,
//!   whatever the cluster's size;
//! - **pull**: when gossip shows a member's vector ahead of ours, we ask it
//!   for everything newer than our vector — this heals missed pushes,
//!   partitions and restarts, and is what a node catching up uses;
//! - **anti-entropy**: every few seconds, compare state hashes with a random
//!   member and pull everything from it if they differ with equal vectors.
//!
//! All three land in [`Store::apply`]/[`Store::apply_delta`], the same
//! last-writer-wins merge that local writes use, so the order of arrival
//! never matters. Tombstones are collected once every known member's vector
//! covers them and they are older than the grace period; a node behind that
//! floor is sent a snapshot.

pub mod auth;
pub mod gossip;
pub mod sync;
mod tree;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use charon_proto::cluster as sync_pb;
use chitchat::transport::Transport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{Record, Store, VersionVector};
use auth::ClusterAuth;
pub use gossip::DrainFacts;
use gossip::{
    hash_hex, read_vv, vv_changes, vv_keys, K_API, K_AUTH, K_HASH, K_NAME, K_REGION, K_STATUS,
    K_VERSION, K_ZONE, STATUS_SERVING,
};
use sync::Peers;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub cluster_id: String,
    pub node_name: String,
    pub region: String,
    pub zone: String,
    /// Where the gossip UDP socket binds.
    pub gossip_listen: SocketAddr,
    /// What peers send gossip to.
    pub gossip_advertise: SocketAddr,
    /// The gRPC address peers use for sync (and clients for the API).
    pub api_advertise: String,
    /// host:port, re-resolved by chitchat while it runs.
    pub seeds: Vec<String>,
    pub secret: Option<String>,
    pub gossip_interval: Duration,
    /// Failure detector: phi above which a member is dead. Raise it for
    /// WAN links with jitter.
    pub phi_threshold: f64,
    /// Heartbeat gaps longer than this are ignored by the detector.
    pub max_heartbeat_interval: Duration,
    /// How long a dead member is remembered (and holds back tombstone
    /// collection) before it is forgotten.
    pub dead_node_grace: Duration,
    pub anti_entropy_interval: Duration,
    /// A tombstone is kept at least this long after the delete.
    pub tombstone_grace: Duration,
}

impl ClusterConfig {
    /// A single-node default, for tests and tools; `charon-node` builds its
    /// own from flags.
    pub fn local(name: &str, gossip: SocketAddr, api: SocketAddr) -> ClusterConfig {
        ClusterConfig {
            cluster_id: "charon".into(),
            node_name: name.into(),
            region: "local".into(),
            zone: String::new(),
            gossip_listen: gossip,
            gossip_advertise: gossip,
            api_advertise: api.to_string(),
            seeds: Vec::new(),
            secret: None,
            gossip_interval: Duration::from_millis(200),
            phi_threshold: 8.0,
            max_heartbeat_interval: Duration::from_secs(10),
            dead_node_grace: Duration::from_secs(3600),
            anti_entropy_interval: Duration::from_secs(10),
            tombstone_grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node_id: String,
    pub name: String,
    pub region: String,
    pub zone: String,
    pub api: String,
    pub gossip: SocketAddr,
    pub status: String,
    pub live: bool,
    pub is_self: bool,
    pub generation: u64,
    pub version: String,
    /// Shared with [`Cluster::members`]' cache: rebuilt only when the
    /// member's gossiped state changed.
    pub vv: Arc<VersionVector>,
    pub hash: String,
    /// Writes this member lacks that some live member has applied.
    pub lag: u64,
    /// Drain progress the member publishes while it drains.
    pub drain: DrainFacts,
}

/// A test hook standing in for the network between nodes: when it says a
/// peer (by node id) is unreachable, no sync call goes to it. In-process
/// partition tests pair it with chitchat's `ChannelTransport` links.
pub type Reachable = Arc<dyn Fn(&str) -> bool + Send + Sync>;

pub struct Cluster {
    store: Arc<Store>,
    /// `--seeds` and the peers the store remembers from the last run.
    seeds: Vec<String>,
    config: ClusterConfig,
    auth: ClusterAuth,
    handle: ChitchatHandle,
    peers: Peers,
    reachable: Option<Reachable>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    refused: Mutex<HashSet<ChitchatId>>,
    /// Known peers as of the time noted ([`Cluster::push_peers`]).
    push_peers: Mutex<Option<(Instant, Arc<Vec<Member>>)>>,
    /// Per peer API address, its send queue ([`Cluster::enqueue`]).
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Outgoing>>>,
    pushes_sent: AtomicU64,
    /// Records applied from pulls ([`Cluster::pulled_records`]).
    pulled_records: AtomicU64,
    /// Each member's decoded version vector, with the chitchat version of
    /// its state it was read at ([`Cluster::member_vv`]).
    vv_cache: Mutex<HashMap<ChitchatId, (u64, Arc<VersionVector>)>>,
    /// Member proofs already verified, per member ([`Cluster::proven`]).
    proven: Mutex<HashMap<ChitchatId, String>>,
    relay_tx: mpsc::UnboundedSender<sync::Relayed>,
    /// Digests of the pushes this node relayed lately ([`Cluster::first_relay`]).
    relayed: Mutex<(HashSet<u64>, VecDeque<u64>)>,
}

/// Pushes remembered as relayed, so each is relayed once.
const RELAYED_MEMORY: usize = 4096;
/// A relay chain longer than this stops (a relay also stops when the push
/// taught it nothing); pulls cover whatever it missed.
const MAX_RELAY_HOPS: u32 = 8;
/// The pull loop looks at the members' vectors at most this often.
const MIN_PULL_LOOK: Duration = Duration::from_millis(50);
/// Entries merged into one push at most; the rest go in the next.
const MAX_PUSH_BATCH: usize = 1024;

/// Entries waiting to be pushed to one peer, with their relay depth and
/// the root of the tree they follow.
struct Outgoing {
    entries: Vec<sync_pb::Entry>,
    hops: u32,
    root: String,
    /// The tree's node ids ([`tree::order`]); empty for a legacy push.
    tree: Arc<Vec<String>>,
}

/// One peer's send queue: pushes one batch at a time, merging whatever
/// queued up meanwhile for the same tree. Ends when the cluster drops the
/// sender.
async fn push_queue(
    peers: Peers,
    name: String,
    api: String,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut next = None;
    loop {
        let mut batch = match next.take() {
            Some(b) => b,
            None => match rx.recv().await {
                Some(b) => b,
                None => return,
            },
        };
        while batch.entries.len() < MAX_PUSH_BATCH {
            let Ok(more) = rx.try_recv() else { break };
            if more.root != batch.root || more.tree != batch.tree {
                next = Some(more);
                break;
            }
            batch.entries.extend(more.entries);
            batch.hops = batch.hops.min(more.hops);
        }
        let started = Instant::now();
        let sent = batch.entries.len();
        if let Err(e) = peers
            .push(
                &api,
                batch.entries,
                batch.hops,
                batch.root,
                batch.tree.to_vec(),
            )
            .await
        {
            tracing::debug!(peer = %name, api = %api, error = %e,
                "push failed; the peer will pull");
        }
        tracing::trace!(peer = %name, entries = sent, took_ms = started.elapsed().as_millis() as u64, "pushed");
    }
}

/// Whether `theirs` has a write `ours` lacks. One merged walk over both
/// sorted vectors rather than a tree lookup per origin: when the pull loop
/// asked this of every member on every look, at 100 members of 100 origins
/// the lookups' key compares were a seventh of a simulated cluster's CPU.
fn ahead(theirs: &VersionVector, ours: &VersionVector) -> bool {
    let mut ours = ours.iter().peekable();
    theirs.iter().any(|(o, &s)| {
        while ours.next_if(|(k, _)| *k < o).is_some() {}
        let have = match ours.peek() {
            Some((k, &v)) if *k == o => v,
            _ => 0,
        };
        s > have
    })
}

/// What the pull loop remembers between looks, so that a look costs the
/// members whose gossip changed since the last one, not every member.
#[derive(Default)]
struct Looks {
    /// Per member, the version of its gossiped state at the last look
    /// that found it not ahead of us (0 is never one: a member's first
    /// key is version 1).
    not_ahead: HashMap<ChitchatId, u64>,
    /// Our vector at the last look: a "not ahead" verdict holds while
    /// the member's state is unchanged and ours only grew since.
    ours: VersionVector,
}

impl Cluster {
    /// Joins (or founds) the cluster: starts gossip on `transport` and the
    /// replication loops. The sync server is mounted by the caller with
    /// [`Cluster::sync_server`] (which relays pushes on).
    pub async fn start(
        config: ClusterConfig,
        store: Arc<Store>,
        transport: &dyn Transport,
        reachable: Option<Reachable>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let auth = ClusterAuth::new(&config.cluster_id, config.secret.as_deref());
        if !auth.has_secret() {
            tracing::warn!(
                "no cluster secret (--cluster-secret / CHARON_CLUSTER_SECRET): any node that \
                 reaches this node's gossip and API ports with the same cluster id can join"
            );
        }
        // A new generation on every start: peers then take this node's
        // fresh state instead of ignoring it as old.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let node_id = store.node_id().to_string();
        // The peers remembered from the last run join the given seeds: a
        // node restarted without --seeds still finds its cluster.
        let mut seeds = config.seeds.clone();
        for p in store.remembered_peers().unwrap_or_default() {
            if !seeds.contains(&p) && p != config.gossip_advertise.to_string() {
                seeds.push(p);
            }
        }
        let chitchat_id = ChitchatId::new(node_id.clone(), generation, config.gossip_advertise);
        let summary = store.summary().borrow().clone();
        let mut initial = vec![
            (K_API.to_string(), config.api_advertise.clone()),
            (K_NAME.to_string(), config.node_name.clone()),
            (K_REGION.to_string(), config.region.clone()),
            (K_ZONE.to_string(), config.zone.clone()),
            (K_STATUS.to_string(), STATUS_SERVING.to_string()),
            (K_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (K_HASH.to_string(), hash_hex(summary.hash)),
            (K_AUTH.to_string(), auth.member_proof(&node_id, generation)),
        ];
        initial.extend(vv_keys(&summary.vv));
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.gossip_listen,
            seed_nodes: seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: config.max_heartbeat_interval,
                initial_interval: config.gossip_interval * 5,
                dead_node_grace_period: config.dead_node_grace,
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(chitchat_config, initial, transport).await?;
        let peers = Peers::new(auth.clone(), node_id);
        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            store,
            seeds,
            config,
            auth,
            handle,
            peers,
            reachable,
            tasks: Mutex::default(),
            refused: Mutex::default(),
            push_peers: Mutex::default(),
            queues: Mutex::default(),
            pushes_sent: AtomicU64::new(0),
            pulled_records: AtomicU64::new(0),
            proven: Mutex::default(),
            vv_cache: Mutex::default(),
            relay_tx,
            relayed: Mutex::default(),
        });
        // The loops' subscriptions are taken here, before this returns, not
        // when their tasks first run: on a current-thread runtime they run
        // only after the caller's next await, and a write made meanwhile
        // (the admin token's registration, at start) was neither pushed
        // nor published in gossip: peers never learned to pull it.
        let summaries = cluster.store.summary();
        let local_writes = cluster.store.local_writes();
        let tasks = vec![
            tokio::spawn(cluster.clone().publish_loop(summaries, summary.vv)),
            tokio::spawn(cluster.clone().push_loop(local_writes)),
            tokio::spawn(cluster.clone().relay_loop(relay_rx)),
            tokio::spawn(cluster.clone().pull_loop()),
            tokio::spawn(cluster.clone().anti_entropy_loop()),
            tokio::spawn(cluster.clone().gc_loop()),
            tokio::spawn(cluster.clone().remember_loop()),
        ];
        *cluster.tasks.lock().expect("tasks lock") = tasks;
        tracing::info!(
            cluster_id = %cluster.config.cluster_id,
            node = %cluster.config.node_name,
            region = %cluster.config.region,
            gossip = %cluster.config.gossip_advertise,
            seeds = ?cluster.seeds,
            "joined the cluster gossip"
        );
        Ok(cluster)
    }

    pub fn auth(&self) -> &ClusterAuth {
        &self.auth
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn node_id(&self) -> &str {
        self.store.node_id()
    }

    /// Stops gossip and the loops (the node leaves; peers see it die).
    pub async fn shutdown(&self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        let _ = self.handle.initiate_shutdown();
    }

    /// Publishes a fact about this node (e.g. `status`).
    pub async fn set_fact(&self, key: &str, value: &str) {
        let cc = self.handle.chitchat();
        cc.lock().await.self_node_state().set(key, value);
    }

    /// Publishes several facts in one go.
    pub async fn set_facts(&self, facts: &[(&str, String)]) {
        let cc = self.handle.chitchat();
        let mut cc = cc.lock().await;
        let me = cc.self_node_state();
        for (k, v) in facts {
            if me.get(k) != Some(v.as_str()) {
                me.set(*k, v);
            }
        }
    }

    /// Publishes this node's rate-limit admissions (cluster scope) and
    /// returns every live peer's: (peer node id with generation, value).
    pub async fn rate_exchange(&self, mine: &str) -> Vec<(String, String)> {
        let cc = self.handle.chitchat();
        let mut cc = cc.lock().await;
        if cc.self_node_state().get(gossip::K_RATE) != Some(mine) {
            cc.self_node_state().set(gossip::K_RATE, mine);
        }
        let me = cc.self_chitchat_id().clone();
        let live: Vec<ChitchatId> = cc.live_nodes().filter(|id| **id != me).cloned().collect();
        live.into_iter()
            .filter_map(|id| {
                let v = cc.node_state(&id)?.get(gossip::K_RATE)?.to_string();
                Some((format!("{}/{}", id.node_id, id.generation_id), v))
            })
            .collect()
    }

    pub async fn set_status(&self, status: &str) {
        self.set_fact(K_STATUS, status).await;
    }

    /// Publishes this node's status (a `gossip::STATUS_*`) with its drain
    /// progress, in one go so peers never see one without the other.
    pub async fn publish_drain(&self, status: &str, facts: &DrainFacts) {
        let mut all = vec![(K_STATUS, status.to_string())];
        all.extend(facts.encode());
        self.set_facts(&all).await;
    }

    /// Whether `proof` proves `id` holds the cluster secret; each (member,
    /// proof) is checked once (an HMAC per member per look was most of the
    /// cost of building the member list).
    fn proven(&self, id: &ChitchatId, proof: &str) -> bool {
        // Looked up without allocating: this runs for every member on
        // every look at the membership.
        if self
            .proven
            .lock()
            .expect("proven lock")
            .get(id)
            .map(String::as_str)
            == Some(proof)
        {
            return true;
        }
        let ok = self
            .auth
            .verify_member(&id.node_id, id.generation_id, proof);
        if ok {
            let mut set = self.proven.lock().expect("proven lock");
            // Generations of restarted members pile up: start over now
            // and then rather than keep them all.
            if set.len() > 4096 {
                set.clear();
            }
            set.insert(id.clone(), proof.to_string());
        }
        ok
    }

    /// `state`'s version vector, decoded again only when the member's
    /// gossiped state changed since the last look. Decoding every member's
    /// vector on every look was most of a node's CPU in the 50-node
    /// simulation (read_vv, its string allocations and compares: over 60%
    /// of samples), since the pull loop looks up to 20 times a second.
    fn member_vv(&self, id: &ChitchatId, state: &chitchat::NodeState) -> Arc<VersionVector> {
        let version = state.max_version();
        let mut cache = self.vv_cache.lock().expect("vv cache lock");
        if let Some((v, vv)) = cache.get(id) {
            if *v == version {
                return vv.clone();
            }
        }
        let vv = Arc::new(read_vv(state));
        // Generations of restarted members pile up: start over now and then.
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(id.clone(), (version, vv.clone()));
        vv
    }

    fn can_reach(&self, node_id: &str) -> bool {
        self.reachable.as_ref().is_none_or(|f| f(node_id))
    }

    /// One member as gossip shows it, if it proved it holds the cluster
    /// secret and published its API address (its facts arrive over a few
    /// rounds: no proof yet means "not a member yet", not "wrong secret").
    fn member(
        &self,
        id: &ChitchatId,
        state: &chitchat::NodeState,
        live: bool,
        is_self: bool,
        with_vv: bool,
    ) -> Option<Member> {
        let proof = state.get(K_AUTH)?;
        if !self.proven(id, proof) {
            if self
                .refused
                .lock()
                .expect("refused lock")
                .insert(id.clone())
            {
                tracing::warn!(node = %id.node_id, gossip = %id.gossip_advertise_addr,
                    name = state.get(K_NAME).unwrap_or(""),
                    "ignoring a gossip peer without a valid cluster secret proof (wrong --cluster-secret?)");
            }
            return None;
        }
        let api = state.get(K_API)?;
        let get = |k| state.get(k).unwrap_or("").to_string();
        Some(Member {
            node_id: id.node_id.to_string(),
            name: get(K_NAME),
            region: get(K_REGION),
            zone: get(K_ZONE),
            api: api.to_string(),
            gossip: id.gossip_advertise_addr,
            status: get(K_STATUS),
            live,
            is_self,
            generation: id.generation_id,
            version: get(K_VERSION),
            vv: if with_vv {
                self.member_vv(id, state)
            } else {
                Arc::default()
            },
            hash: get(K_HASH),
            lag: 0,
            drain: DrainFacts::decode(|k| state.get(k).map(str::to_string)),
        })
    }

    /// Every known member (live or dead but not yet forgotten) that proved
    /// it holds the cluster secret, newest generation of each; with their
    /// vectors only if `with_vv` (an empty one otherwise).
    async fn known_members(&self, with_vv: bool) -> Vec<Member> {
        let cc = self.handle.chitchat();
        let cc = cc.lock().await;
        let self_id = cc.self_chitchat_id().clone();
        let live: HashSet<&ChitchatId> = cc.live_nodes().collect();
        // Several generations of one node may be known for a while after a
        // restart: keep the newest.
        let mut newest: BTreeMap<String, Member> = BTreeMap::new();
        for (id, state) in cc.node_states() {
            let Some(m) = self.member(id, state, live.contains(id), *id == self_id, with_vv) else {
                continue;
            };
            match newest.get(&m.node_id) {
                Some(old) if old.generation >= m.generation => {}
                _ => {
                    newest.insert(m.node_id.clone(), m);
                }
            }
        }
        newest.into_values().collect()
    }

    /// Every known member (live or dead but not yet forgotten) that proved
    /// it holds the cluster secret, with lag computed against the live ones.
    pub async fn members(&self) -> Vec<Member> {
        let mut members = self.known_members(true).await;
        // Our own facts straight from the store, not from the last publish.
        let summary = self.store.summary().borrow().clone();
        for m in members.iter_mut().filter(|m| m.is_self) {
            m.vv = Arc::new(summary.vv.clone());
            m.hash = hash_hex(summary.hash);
        }
        // Borrowed keys: at 100 members of 100 origins, owned ones were
        // 10,000 allocations per look.
        let mut max: HashMap<&str, u64> = HashMap::new();
        for m in members.iter().filter(|m| m.live) {
            for (o, &s) in m.vv.iter() {
                let e = max.entry(o.as_str()).or_insert(0);
                *e = (*e).max(s);
            }
        }
        let lags: Vec<u64> = members
            .iter()
            .map(|m| {
                max.iter()
                    .map(|(o, &s)| s.saturating_sub(m.vv.get(*o).copied().unwrap_or(0)))
                    .sum()
            })
            .collect();
        drop(max);
        for (m, lag) in members.iter_mut().zip(lags) {
            m.lag = lag;
        }
        members.sort_by(|a, b| {
            (&a.region, &a.name, &a.node_id).cmp(&(&b.region, &b.name, &b.node_id))
        });
        members
    }

    /// The live peers this node may sync with whose gossiped vector is
    /// ahead of `ours`. The pull loop looks up to 20 times a second, so
    /// this builds a [`Member`] only for peers ahead (usually none), not
    /// the whole list: building it for every member on every look was a
    /// quarter of the CPU in the 100-node simulation. A member found not
    /// ahead at an earlier look is skipped while its state is unchanged,
    /// and otherwise only the vector keys it set since are read
    /// ([`gossip::ahead_since`]): comparing every member's whole vector on
    /// every look was, again, a quarter of that CPU.
    async fn live_peers_ahead(&self, ours: &VersionVector, looks: &mut Looks) -> Vec<Member> {
        // Ours lost an origin (compaction) or went back (a snapshot):
        // the old verdicts say nothing about the new vector.
        if ahead(&looks.ours, ours) {
            looks.not_ahead.clear();
        }
        looks.ours.clone_from(ours);
        let cc = self.handle.chitchat();
        let cc = cc.lock().await;
        let self_id = cc.self_chitchat_id().clone();
        let mut out = Vec::new();
        for id in cc.live_nodes().filter(|id| **id != self_id) {
            let Some(state) = cc.node_state(id) else {
                continue;
            };
            let version = state.max_version();
            let since = looks.not_ahead.get(id).copied().unwrap_or(0);
            if since == version && since > 0 {
                continue;
            }
            if !gossip::ahead_since(state, since, ours) {
                looks.not_ahead.insert(id.clone(), version);
                continue;
            }
            looks.not_ahead.remove(id);
            if self.can_reach(&id.node_id) {
                out.extend(self.member(id, state, true, false, true));
            }
        }
        // Restarted members' old generations pile up: start over now and then.
        if looks.not_ahead.len() > 4096 {
            looks.not_ahead.clear();
        }
        out
    }

    /// The gossip addresses of the live members (not this node) that
    /// proved they hold the secret: what the store remembers for a restart.
    async fn live_gossip_addrs(&self) -> Vec<String> {
        let cc = self.handle.chitchat();
        let cc = cc.lock().await;
        let self_id = cc.self_chitchat_id().clone();
        let mut out: Vec<String> = cc
            .live_nodes()
            .filter(|id| **id != self_id)
            .filter(|id| {
                cc.node_state(id)
                    .and_then(|s| s.get(K_AUTH))
                    .is_some_and(|proof| self.proven(id, proof))
            })
            .map(|id| id.gossip_advertise_addr.to_string())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Live peers (not this node) that this node may sync with, this
    /// node's region first.
    async fn live_peers(&self) -> Vec<Member> {
        let mut peers: Vec<Member> = self
            .members()
            .await
            .into_iter()
            .filter(|m| m.live && !m.is_self && self.can_reach(&m.node_id))
            .collect();
        peers.sort_by_key(|m| m.region != self.config.region);
        peers
    }

    /// Keeps this node's gossiped vector and hash in step with the store.
    /// Only the buckets of origins whose sequence moved are set
    /// ([`gossip::vv_changes`]): chitchat gossips changed keys, so a write
    /// costs each node one bucket, about 1/16 of its vector. `rx` and
    /// `published` (the vector `Cluster::start` gossiped) are taken in
    /// `start`, so no write between start and this task's first run is
    /// missed (on a current-thread runtime that was the admin token's).
    async fn publish_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::watch::Receiver<crate::store::StateSummary>,
        mut published: VersionVector,
    ) {
        loop {
            let s = rx.borrow_and_update().clone();
            {
                let cc = self.handle.chitchat();
                let mut cc = cc.lock().await;
                let me = cc.self_node_state();
                for (key, value) in vv_changes(&published, &s.vv) {
                    match value {
                        Some(value) => me.set(key, value),
                        None => me.delete(&key),
                    }
                }
                me.set(K_HASH, hash_hex(s.hash));
            }
            published = s.vv;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Eager push of local writes down this node's tree ([`tree`]) and to
    /// one live member of each other region, which roots that region's
    /// tree. Writes queued meanwhile go as one batch. A failed push is only
    /// logged: pulls and anti-entropy repair it.
    async fn push_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Vec<(String, Record)>>) {
        while let Some(first) = rx.recv().await {
            let mut records: Vec<(String, Record)> = first;
            while let Ok(more) = rx.try_recv() {
                records.extend(more);
            }
            let entries = sync::encode_entries(&records);
            let peers = self.push_peers().await;
            let me = self.node_id();
            let tree = Arc::new(self.region_tree(&peers, me));
            self.send_down(&peers, &tree, me, &entries, 0, None);
            for peer in self.other_region_roots(&peers) {
                let root = peer.node_id.clone();
                self.enqueue(
                    peer,
                    Outgoing {
                        entries: entries.clone(),
                        hops: 0,
                        root,
                        tree: Arc::default(),
                    },
                );
            }
        }
    }

    /// Relays each push once to this node's children in the push's tree,
    /// so a write reaches every node in a few hops while each node sends
    /// O(fan-out), not O(cluster), pushes. A push with no tree roots this
    /// region's tree here (it came from another region), or comes from a
    /// node of an earlier version (then it goes on only if it taught us
    /// something, down a tree of our own view, as that version did).
    async fn relay_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<sync::Relayed>) {
        while let Some(r) = rx.recv().await {
            let me = self.node_id();
            let legacy = r.tree.is_empty() && r.root != me;
            if r.hops >= MAX_RELAY_HOPS || (legacy && r.applied == 0) || !self.first_relay(&r) {
                continue;
            }
            let peers = self.push_peers().await;
            let tree = if r.tree.is_empty() {
                Arc::new(self.region_tree(&peers, &r.root))
            } else {
                Arc::new(r.tree)
            };
            self.send_down(
                &peers,
                &tree,
                &r.root,
                &r.entries,
                r.hops + 1,
                Some(&r.from_node),
            );
        }
    }

    /// True the first time this node sees this push (same root, same
    /// records): each push is relayed once, however many copies arrive.
    fn first_relay(&self, r: &sync::Relayed) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        r.root.hash(&mut h);
        for e in &r.entries {
            e.key.hash(&mut h);
            e.record.hash(&mut h);
        }
        let digest = h.finish();
        let mut guard = self.relayed.lock().expect("relayed lock");
        let (seen, order) = &mut *guard;
        if !seen.insert(digest) {
            return false;
        }
        order.push_back(digest);
        if order.len() > RELAYED_MEMORY {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        true
    }

    /// The tree of a write rooted at `root` over every member of this
    /// region this node knows, live or not ([`tree::order`]).
    fn region_tree(&self, peers: &[Member], root: &str) -> Vec<String> {
        let region = peers
            .iter()
            .filter(|m| m.region == self.config.region)
            .map(|m| m.node_id.as_str());
        tree::order(root, region.chain([self.node_id()]))
    }

    /// Queues `entries` for this node's targets in `tree`
    /// ([`tree::targets`]), except the node they came from.
    fn send_down(
        &self,
        peers: &[Member],
        tree: &Arc<Vec<String>>,
        root: &str,
        entries: &[sync_pb::Entry],
        hops: u32,
        from: Option<&str>,
    ) {
        let by_id: HashMap<&str, &Member> = peers.iter().map(|m| (m.node_id.as_str(), m)).collect();
        let reach = |id: &str| match by_id.get(id) {
            Some(m) if self.can_reach(id) && m.live => tree::Reach::Live,
            Some(_) if self.can_reach(id) => tree::Reach::Suspect,
            _ => tree::Reach::Absent,
        };
        for id in tree::targets(tree, self.node_id(), reach) {
            if Some(id) == from {
                continue;
            }
            self.enqueue(
                by_id[id],
                Outgoing {
                    entries: entries.to_vec(),
                    hops,
                    root: root.to_string(),
                    tree: tree.clone(),
                },
            );
        }
    }

    /// One random live, reachable member of each other region.
    fn other_region_roots<'a>(&self, peers: &'a [Member]) -> Vec<&'a Member> {
        let mut others: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
        for m in peers {
            if m.region != self.config.region && m.live && self.can_reach(&m.node_id) {
                others.entry(m.region.as_str()).or_default().push(m);
            }
        }
        let mut rng = rand::rng();
        others
            .values()
            .filter_map(|list| list.choose(&mut rng).copied())
            .collect()
    }

    /// The peers pushes may go to: every known member but this node, live
    /// or not, rebuilt at most once per gossip interval rather than for
    /// every write, and without their vectors: decoding every member's
    /// vector and computing lags for each relayed write was a sixth of a
    /// 100-node simulated cluster's CPU, for facts the tree does not use.
    async fn push_peers(&self) -> Arc<Vec<Member>> {
        {
            let cached = self.push_peers.lock().expect("push peers lock");
            if let Some((at, peers)) = &*cached {
                if at.elapsed() < self.config.gossip_interval {
                    return peers.clone();
                }
            }
        }
        let mut peers = self.known_members(false).await;
        peers.retain(|m| !m.is_self);
        let peers = Arc::new(peers);
        *self.push_peers.lock().expect("push peers lock") = Some((Instant::now(), peers.clone()));
        peers
    }

    /// Hands `entries` to `peer`'s send queue: one push in flight per peer,
    /// whatever queued behind it goes as the next batch (pipelined, and
    /// batched under load).
    fn enqueue(&self, peer: &Member, item: Outgoing) {
        self.pushes_sent.fetch_add(1, Ordering::Relaxed);
        let mut queues = self.queues.lock().expect("queues lock");
        let item = match queues.get(&peer.api) {
            Some(tx) => match tx.send(item) {
                Ok(()) => return,
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(item);
        queues.insert(peer.api.clone(), tx);
        tokio::spawn(push_queue(
            self.peers.clone(),
            peer.name.clone(),
            peer.api.clone(),
            rx,
        ));
    }

    /// Pushes queued so far, counting each (batch, peer) pair once: what a
    /// test checks to see that the fan-out is bounded.
    pub fn pushes_sent(&self) -> u64 {
        self.pushes_sent.load(Ordering::Relaxed)
    }

    /// Records this node applied from pulls (gossip-driven or
    /// anti-entropy): writes the push tree did not bring in time. What the
    /// simulation reports to tell a tree that works from pulls doing its job.
    pub fn pulled_records(&self) -> u64 {
        self.pulled_records.load(Ordering::Relaxed)
    }

    /// The sync server for this node's gRPC listener, wired to relay
    /// pushes that brought something new.
    pub fn sync_server(
        &self,
    ) -> tonic::service::interceptor::InterceptedService<
        charon_proto::cluster::sync_server::SyncServer<sync::SyncApi>,
        impl tonic::service::Interceptor + Clone,
    > {
        sync::server_with_relay(
            self.store.clone(),
            self.auth.clone(),
            Some(self.relay_tx.clone()),
        )
    }

    /// Pulls from the member that is furthest ahead of us, whenever gossip
    /// shows one, preferring our region.
    async fn pull_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.gossip_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Woken when a member's gossiped vector changes, by a key listener
        // (every vector key, this version's and earlier ones'), when the
        // set of live members changes, and on the tick. Not by chitchat's
        // live-node watcher: while one is out, chitchat clones every live
        // member's whole state on each round where any member changed
        // (node/vendor/chitchat/README.md).
        let changed = Arc::new(tokio::sync::Notify::new());
        let (_listeners, mut live_set) = {
            let cc = self.handle.chitchat();
            let cc = cc.lock().await;
            let listeners = [gossip::K_VV, gossip::K_SEQ_PREFIX].map(|prefix| {
                let changed = changed.clone();
                cc.subscribe_event(prefix, move |_| changed.notify_one())
            });
            (listeners, cc.live_set_watcher())
        };
        let mut seen_ahead: HashSet<String> = HashSet::new();
        let mut looks = Looks::default();
        let mut last_look = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changed.notified() => {}
                r = live_set.changed() => if r.is_err() { return },
            }
            // Every write anywhere changes some member's gossiped vector and
            // wakes this loop on every node: look at most every
            // MIN_PULL_LOOK, or the member list is rebuilt O(writes × nodes)
            // times across the cluster.
            let since = last_look.elapsed();
            if since < MIN_PULL_LOOK {
                tokio::time::sleep(MIN_PULL_LOOK - since).await;
            }
            last_look = Instant::now();
            let ours = self.store.version_vector();
            let mut ahead_now = self.live_peers_ahead(&ours, &mut looks).await;
            ahead_now.sort_by_key(|m| m.region != self.config.region);
            // Only peers that were already ahead at the last look: a write
            // being pushed to us right now is not worth a pull racing it.
            let candidates: Vec<Member> = ahead_now
                .iter()
                .filter(|m| seen_ahead.contains(&m.node_id))
                .cloned()
                .collect();
            seen_ahead = ahead_now.into_iter().map(|m| m.node_id).collect();
            let Some(first) = candidates.first() else {
                continue;
            };
            let region = first.region.clone();
            let same: Vec<&Member> = candidates.iter().filter(|m| m.region == region).collect();
            let peer = (*same.choose(&mut rand::rng()).expect("non-empty")).clone();
            self.pull_from(&peer, &ours).await;
        }
    }

    async fn pull_from(&self, peer: &Member, have: &VersionVector) -> bool {
        let started = Instant::now();
        match self.peers.pull(&peer.api, have).await {
            Ok(delta) => {
                let n = delta.records.len();
                let snapshot = delta.snapshot;
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.apply_delta(delta)).await {
                    Ok(Ok(applied)) => {
                        self.pulled_records
                            .fetch_add(applied as u64, Ordering::Relaxed);
                        if applied > 0 || snapshot {
                            tracing::info!(peer = %peer.name, received = n, applied, snapshot,
                                took_ms = started.elapsed().as_millis() as u64, "pulled records");
                        }
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::error!(peer = %peer.name, error = %e, "cannot apply pulled records");
                        false
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store task failed");
                        false
                    }
                }
            }
            Err(e) => {
                tracing::warn!(peer = %peer.name, api = %peer.api, error = %e.message(), "pull failed");
                false
            }
        }
    }

    /// Every interval, compares state hashes with one random live peer
    /// (from this region two times in three) and pulls on a difference.
    async fn anti_entropy_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.anti_entropy_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let peers = self.live_peers().await;
            let local: Vec<&Member> = peers
                .iter()
                .filter(|m| m.region == self.config.region)
                .collect();
            let pick = if !local.is_empty() && !rand::random::<u8>().is_multiple_of(3) {
                local.choose(&mut rand::rng()).copied()
            } else {
                peers.choose(&mut rand::rng())
            };
            let Some(peer) = pick.cloned() else { continue };
            let summary = self.store.summary().borrow().clone();
            if peer.hash == hash_hex(summary.hash) {
                continue;
            }
            // A peer ahead: pull the delta. A peer behind: it will pull from
            // us (its gossiped facts may just be a round old). Equal vectors
            // with another hash: something the vectors cannot explain, so
            // ask for everything.
            let have = if ahead(&peer.vv, &summary.vv) {
                summary.vv
            } else if *peer.vv == summary.vv {
                VersionVector::new()
            } else {
                continue;
            };
            tracing::debug!(peer = %peer.name, full = have.is_empty(), "anti-entropy: state hashes differ");
            self.pull_from(&peer, &have).await;
        }
    }

    /// Keeps the store's list of peers (gossip addresses) in step with the
    /// live members, for the next start's catch-up.
    async fn remember_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.gossip_interval * 5);
        // Who is live, not chitchat's live-node watcher (see `pull_loop`).
        let mut live_set = {
            let cc = self.handle.chitchat();
            let cc = cc.lock().await;
            cc.live_set_watcher()
        };
        let mut last: Vec<String> = self.store.remembered_peers().unwrap_or_default();
        last.sort();
        loop {
            // A member's facts (its proof) may arrive a round after it
            // turns live: look again on the tick too.
            tokio::select! {
                _ = tick.tick() => {}
                r = live_set.changed() => if r.is_err() { return },
            }
            let now = self.live_gossip_addrs().await;
            if now.is_empty() || now == last {
                continue;
            }
            let store = self.store.clone();
            let list = now.clone();
            match tokio::task::spawn_blocking(move || store.remember_peers(&list)).await {
                Ok(Ok(())) => last = now,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot remember the peers"),
                Err(e) => tracing::warn!(error = %e, "store task failed"),
            }
        }
    }

    /// Collects tombstones every member (live or remembered dead) has
    /// applied and that are older than the grace period.
    async fn gc_loop(self: Arc<Self>) {
        let period = (self.config.tombstone_grace / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let members = self.members().await;
            let Some(mut min) = members
                .iter()
                .find(|m| m.is_self)
                .map(|m| VersionVector::clone(&m.vv))
            else {
                continue;
            };
            for m in &members {
                for (o, s) in min.iter_mut() {
                    *s = (*s).min(m.vv.get(o).copied().unwrap_or(0));
                }
            }
            let cutoff_ms = crate::util::wall_ms()
                .saturating_sub(self.config.tombstone_grace.as_millis() as u64);
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || {
                store.collect_tombstones(&min, cutoff_ms << 16)
            })
            .await
            {
                Ok(Ok(n)) if n > 0 => tracing::info!(
                    collected = n,
                    "collected tombstones every member has applied"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "tombstone collection failed"),
                _ => {}
            }
        }
    }

    /// Start-up catch-up, before the node says it is ready: waits (up to
    /// `timeout`) for the seeds to answer, then pulls from any live peer
    /// ahead of this node until none is. A node restarted after missing
    /// writes so serves them from its first ready moment.
    pub async fn catch_up(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let started = Instant::now();
        loop {
            let peers = self.live_peers().await;
            let ours = self.store.version_vector();
            let behind: Vec<&Member> = peers.iter().filter(|m| ahead(&m.vv, &ours)).collect();
            let waiting_for_seeds = peers.is_empty() && !self.seeds.is_empty();
            if behind.is_empty() && !waiting_for_seeds {
                if !peers.is_empty() {
                    tracing::info!(
                        peers = peers.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "caught up with the cluster"
                    );
                }
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    ?timeout,
                    behind = behind.len(),
                    seeds_answered = !peers.is_empty(),
                    "start-up catch-up timed out; serving what this node has"
                );
                return;
            }
            if let Some(peer) = behind.first() {
                let peer = (*peer).clone();
                self.pull_from(&peer, &ours).await;
            } else {
                // Poll interval while the seeds' gossip arrives.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// After this process was paused: its gossiped view of the peers is as
    /// old as the pause (they may even look dead for a moment), so rather
    /// than trust it, pull from up to two known members directly, this
    /// region first, each bounded by the sync timeout.
    pub async fn resync(&self) {
        let started = Instant::now();
        let mut members: Vec<Member> = self
            .members()
            .await
            .into_iter()
            .filter(|m| !m.is_self && self.can_reach(&m.node_id))
            .collect();
        members.sort_by_key(|m| (!m.live, m.region != self.config.region));
        let mut pulled = 0;
        for m in &members {
            let ours = self.store.version_vector();
            if self.pull_from(m, &ours).await {
                pulled += 1;
                if pulled == 2 {
                    break;
                }
            }
        }
        tracing::info!(
            pulled_from = pulled,
            took_ms = started.elapsed().as_millis() as u64,
            "resynced after a pause"
        );
    }

    /// Waits until every member live when the wait began has applied
    /// `(origin, seq)`, or the timeout passes. Returns (complete, applied,
    /// pending) member names; a member that died meanwhile without the
    /// write stays pending, marked "(dead)", rather than being dropped
    /// from the count.
    pub async fn wait_for_write(
        &self,
        origin: &str,
        seq: u64,
        timeout: Duration,
    ) -> (bool, Vec<String>, Vec<String>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let started: HashSet<String> = self
            .members()
            .await
            .into_iter()
            .filter(|m| m.live)
            .map(|m| m.node_id)
            .collect();
        loop {
            let members = self.members().await;
            let mut applied = Vec::new();
            let mut pending = Vec::new();
            for m in members
                .iter()
                .filter(|m| m.live || started.contains(&m.node_id))
            {
                if m.vv.get(origin).copied().unwrap_or(0) >= seq {
                    applied.push(m.name.clone());
                } else if m.live {
                    pending.push(m.name.clone());
                } else {
                    pending.push(format!("{} (dead)", m.name));
                }
            }
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                return (pending.is_empty(), applied, pending);
            }
            // Poll interval: gossip carries the vectors every few hundred ms.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|(o, s)| (o.to_string(), *s)).collect()
    }

    /// The merged walk agrees with a lookup per origin, whatever origins
    /// either side lacks.
    #[test]
    fn ahead_compares_every_origin() {
        let ours = vv(&[("b", 5), ("d", 2)]);
        assert!(!ahead(&vv(&[]), &ours));
        assert!(!ahead(&vv(&[("b", 5)]), &ours));
        assert!(!ahead(&vv(&[("b", 4), ("d", 2)]), &ours));
        assert!(ahead(&vv(&[("b", 6)]), &ours));
        assert!(ahead(&vv(&[("a", 1)]), &ours));
        assert!(ahead(&vv(&[("c", 1)]), &ours));
        assert!(ahead(&vv(&[("b", 1), ("e", 1)]), &ours));
        assert!(ahead(&vv(&[("d", 3)]), &ours));
        assert!(ahead(&ours, &vv(&[])));
        assert!(!ahead(&vv(&[("a", 0)]), &vv(&[])));
        let theirs = vv(&[("a", 1), ("b", 5), ("d", 2)]);
        for (o, s) in &theirs {
            let lookup = ours.get(o).copied().unwrap_or(0) < *s;
            assert_eq!(lookup, ahead(&vv(&[(o, *s)]), &ours), "{o}");
        }
    }
}
