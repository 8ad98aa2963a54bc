//! `charon.v1.Cluster`: members, convergence and waiting for a write.

use std::sync::Arc;
use std::time::Duration;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Member};

pub struct ClusterApi {
    cluster: Arc<Cluster>,
    store: Arc<crate::store::Store>,
    gate: Arc<super::WriteGate>,
}

impl ClusterApi {
    pub fn new(
        cluster: Arc<Cluster>,
        store: Arc<crate::store::Store>,
        gate: Arc<super::WriteGate>,
    ) -> Self {
        ClusterApi {
            cluster,
            store,
            gate,
        }
    }
}

fn member_to_pb(m: Member) -> pb::Member {
    pb::Member {
        node_id: m.node_id,
        name: m.name,
        region: m.region,
        zone: m.zone,
        api_address: m.api,
        gossip_address: m.gossip.to_string(),
        status: m.status,
        live: m.live,
        self_: m.is_self,
        generation: m.generation,
        build_version: m.version,
        applied: m.vv.iter().map(|(o, s)| (o.clone(), *s)).collect(),
        state_hash: m.hash,
        lag: m.lag,
        http_connections: m.drain.http_connections,
        tunnels: m.drain.tunnels,
    }
}

/// Converged: every live member has the same vector and the same hash.
pub fn converged(members: &[Member]) -> bool {
    let mut live = members.iter().filter(|m| m.live);
    let Some(first) = live.next() else {
        return true;
    };
    live.all(|m| m.vv == first.vv && m.hash == first.hash)
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterApi {
    async fn list_members(
        &self,
        _req: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let members = self.cluster.members().await;
        Ok(Response::new(pb::ListMembersResponse {
            members: members.into_iter().map(member_to_pb).collect(),
            cluster_id: self.cluster.config().cluster_id.clone(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let members = self.cluster.members().await;
        Ok(Response::new(pb::ClusterStatusResponse {
            converged: converged(&members),
            members: members.into_iter().map(member_to_pb).collect(),
            cluster_id: self.cluster.config().cluster_id.clone(),
            catching_up: !self.gate.is_open(),
            name_conflicts: self.store.snapshot().names.conflict_count() as u64,
        }))
    }

    async fn wait_for_write(
        &self,
        req: Request<pb::WaitForWriteRequest>,
    ) -> Result<Response<pb::WaitForWriteResponse>, Status> {
        let r = req.into_inner();
        if r.origin.is_empty() || r.seq == 0 {
            return Err(Status::invalid_argument(
                "origin and seq are required (from the charon-write-* metadata of a write)",
            ));
        }
        let timeout = Duration::from_millis(match r.timeout_ms {
            0 => 10_000,
            t => u64::from(t).min(600_000),
        });
        let started = std::time::Instant::now();
        let (complete, applied, pending) =
            self.cluster.wait_for_write(&r.origin, r.seq, timeout).await;
        Ok(Response::new(pb::WaitForWriteResponse {
            complete,
            applied,
            pending,
            waited_ms: started.elapsed().as_millis() as u64,
        }))
    }
}
