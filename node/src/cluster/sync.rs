//! The node-to-node sync service (`charon.cluster.v1.Sync`): push of fresh
//! writes and pull of deltas, both landing in the store's one merge path.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use charon_proto::cluster as pb;
use charon_proto::cluster::sync_client::SyncClient;
use charon_proto::cluster::sync_server::{Sync, SyncServer};
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::auth::ClusterAuth;
use crate::store::{codec, Delta, Record, Store, VersionVector};

/// A pull answer is cut into chunks of about this many bytes, well under
/// tonic's 4 MiB message limit.
const CHUNK_BYTES: usize = 1 << 20;

pub fn encode_entries(records: &[(String, Record)]) -> Vec<pb::Entry> {
    records
        .iter()
        .map(|(k, r)| pb::Entry {
            key: k.clone(),
            record: codec::encode(r),
        })
        .collect()
}

fn decode_entries(entries: &[pb::Entry]) -> Result<Vec<(String, Record)>, Status> {
    entries
        .iter()
        .map(|e| {
            codec::decode(&e.record)
                .map(|r| (e.key.clone(), r))
                .map_err(|err| Status::invalid_argument(format!("record {}: {err}", e.key)))
        })
        .collect()
}

fn to_pb_vv(vv: &VersionVector) -> pb::VersionVector {
    pb::VersionVector {
        seqs: vv.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

fn from_pb_vv(vv: Option<pb::VersionVector>) -> VersionVector {
    vv.map(|v| v.seqs.into_iter().collect()).unwrap_or_default()
}

/// A push this node received: the cluster relays it on
/// ([`super::Cluster::sync_server`]) unless it relayed the same before.
pub struct Relayed {
    pub from_node: String,
    pub hops: u32,
    pub root: String,
    pub tree: Vec<String>,
    pub entries: Vec<pb::Entry>,
    /// Records the push brought that were new here.
    pub applied: usize,
}

/// The server side, mounted on the node's gRPC listener.
pub struct SyncApi {
    store: Arc<Store>,
    relay: Option<mpsc::UnboundedSender<Relayed>>,
}

/// A sync server that relays nothing (tests of the merge alone).
pub fn server(
    store: Arc<Store>,
    auth: ClusterAuth,
) -> InterceptedService<SyncServer<SyncApi>, impl tonic::service::Interceptor + Clone> {
    server_with_relay(store, auth, None)
}

/// A sync server handing pushes that brought something new to `relay`.
pub fn server_with_relay(
    store: Arc<Store>,
    auth: ClusterAuth,
    relay: Option<mpsc::UnboundedSender<Relayed>>,
) -> InterceptedService<SyncServer<SyncApi>, impl tonic::service::Interceptor + Clone> {
    SyncServer::with_interceptor(SyncApi { store, relay }, move |req| auth.check(req))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::PullChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Sync for SyncApi {
    async fn push(
        &self,
        req: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let req = req.into_inner();
        let records = decode_entries(&req.entries)?;
        let store = self.store.clone();
        let applied = blocking(move || store.apply(records))
            .await?
            .map_err(|e| Status::internal(e.to_string()))?;
        if applied > 0 {
            tracing::debug!(to = %self.store.node_id(), from = %req.from_node, applied, hops = req.hops, "applied pushed records");
        }
        // Even a push that taught nothing may have to go on: this node can
        // have the records by pull already while its subtree has not.
        // The cluster relays each push once.
        if let Some(relay) = &self.relay {
            let _ = relay.send(Relayed {
                from_node: req.from_node,
                hops: req.hops,
                root: req.root,
                tree: req.tree,
                entries: req.entries,
                applied,
            });
        }
        Ok(Response::new(pb::PushResponse {
            applied: applied as u32,
        }))
    }

    type PullStream = ChunkStream;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<ChunkStream>, Status> {
        let req = req.into_inner();
        let have = from_pb_vv(req.have);
        let store = self.store.clone();
        let delta = blocking(move || store.delta_since(&have)).await?;
        if delta.snapshot {
            tracing::info!(to = %req.from_node, records = delta.records.len(),
                "peer is behind the tombstone collection floor: sending a full snapshot");
        }
        let mut chunks = Vec::new();
        let mut cur = Vec::new();
        let mut size = 0;
        for e in encode_entries(&delta.records) {
            size += e.key.len() + e.record.len() + 8;
            cur.push(e);
            if size >= CHUNK_BYTES {
                chunks.push(pb::PullChunk {
                    entries: std::mem::take(&mut cur),
                    ..Default::default()
                });
                size = 0;
            }
        }
        chunks.push(pb::PullChunk {
            entries: cur,
            last: true,
            covers: Some(to_pb_vv(&delta.covers)),
            snapshot: delta.snapshot,
            gc_floor: Some(to_pb_vv(&delta.gc_floor)),
        });
        let stream = futures_util::stream::iter(chunks.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Clients to peers, one lazily connected channel per API address.
#[derive(Clone)]
pub struct Peers {
    auth: ClusterAuth,
    node_id: String,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    timeout: Duration,
}

impl Peers {
    pub fn new(auth: ClusterAuth, node_id: String) -> Peers {
        Peers {
            auth,
            node_id,
            channels: Arc::default(),
            timeout: Duration::from_secs(10),
        }
    }

    fn client(&self, addr: &str) -> Result<SyncClient<Channel>, Status> {
        let mut map = self.channels.lock().expect("peers lock");
        if let Some(ch) = map.get(addr) {
            return Ok(SyncClient::new(ch.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("bad peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let ch = endpoint.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(SyncClient::new(ch))
    }

    pub async fn push(
        &self,
        addr: &str,
        entries: Vec<pb::Entry>,
        hops: u32,
        root: String,
        tree: Vec<String>,
    ) -> Result<u32, Status> {
        let mut client = self.client(addr)?;
        let req = self.auth.outgoing(Request::new(pb::PushRequest {
            from_node: self.node_id.clone(),
            entries,
            hops,
            root,
            tree,
        }));
        Ok(client.push(req).await?.into_inner().applied)
    }

    /// Asks `addr` for everything newer than `have` and returns it as one
    /// delta (the chunks joined).
    pub async fn pull(&self, addr: &str, have: &VersionVector) -> Result<Delta, Status> {
        let mut client = self.client(addr)?;
        let req = self.auth.outgoing(Request::new(pb::PullRequest {
            from_node: self.node_id.clone(),
            have: Some(to_pb_vv(have)),
        }));
        let mut stream = client.pull(req).await?.into_inner();
        let mut delta = Delta::default();
        while let Some(chunk) = stream.message().await? {
            delta.records.extend(decode_entries(&chunk.entries)?);
            if chunk.last {
                delta.covers = from_pb_vv(chunk.covers);
                delta.gc_floor = from_pb_vv(chunk.gc_floor);
                delta.snapshot = chunk.snapshot;
                return Ok(delta);
            }
        }
        Err(Status::unavailable(
            "pull stream ended before its last chunk",
        ))
    }
}
