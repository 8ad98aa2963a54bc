//! `charon.v1.Nodes`: drain and undrain any member, from any member.
//!
//! A drain is the replicated record `drain/<node id>`; the drained node
//! acts on it (see [`crate::drain`]) and publishes its progress in gossip,
//! which is what `DrainStatus` reads — so any node can answer for any other.

use std::sync::Arc;
use std::time::Duration;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::hosts::HostsError;
use crate::cluster::{Cluster, Member};
use crate::config::DrainSettings;
use crate::store::{drain_key, Body, DrainRecord, Store, Write};
use crate::util::wall_ms;

pub struct NodesApi {
    store: Arc<Store>,
    cluster: Arc<Cluster>,
    defaults: DrainSettings,
    gate: Arc<super::WriteGate>,
}

impl NodesApi {
    pub fn new(
        store: Arc<Store>,
        cluster: Arc<Cluster>,
        defaults: DrainSettings,
        gate: Arc<super::WriteGate>,
    ) -> Self {
        NodesApi {
            store,
            cluster,
            defaults,
            gate,
        }
    }

    /// A member by name, full id or id prefix (at least 4 characters).
    async fn find(&self, node: &str) -> Result<Member, Status> {
        let node = node.trim();
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "node: is required (a name or id from `charonctl cluster members`)",
            ));
        }
        let members = self.cluster.members().await;
        let found: Vec<&Member> = members
            .iter()
            .filter(|m| {
                m.name == node
                    || m.node_id == node
                    || (node.len() >= 4 && m.node_id.starts_with(node))
            })
            .collect();
        match found.as_slice() {
            [m] => Ok((*m).clone()),
            [] => Err(Status::not_found(format!(
                "no member named {node:?} (see `charonctl cluster members`)"
            ))),
            _ => Err(Status::invalid_argument(format!(
                "node: {node:?} matches several members; use the node id"
            ))),
        }
    }
}

fn status_of(m: &Member, requested: bool) -> pb::DrainStatusResponse {
    pb::DrainStatusResponse {
        node_id: m.node_id.clone(),
        name: m.name.clone(),
        status: m.status.clone(),
        live: m.live,
        http_connections: m.drain.http_connections,
        tunnels: m.drain.tunnels,
        deadline_ms: m.drain.deadline_ms,
        listeners_closed: m.drain.listeners_closed,
        cut: m.drain.cut,
        requested,
    }
}

#[tonic::async_trait]
impl pb::nodes_server::Nodes for NodesApi {
    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let m = self.find(&r.node).await?;
        let deadline = match r.deadline_secs {
            0 => self.defaults.deadline,
            s => Duration::from_secs(u64::from(s)),
        };
        let spread = match r.spread_secs {
            0 => self.defaults.spread.as_secs() as u32,
            s => s,
        };
        let now = wall_ms();
        let rec = DrainRecord {
            node_id: m.node_id.clone(),
            deadline_ms: now + deadline.as_millis() as u64,
            spread_secs: spread,
            requested_at_ms: now,
            requested_on: self.cluster.config().node_name.clone(),
        };
        let (rec, stamp) = super::transact(&self.store, ctx, move |_| {
            Ok::<_, HostsError>((
                vec![Write {
                    key: drain_key(&rec.node_id),
                    body: Some(Body::Drain(rec.clone())),
                }],
                rec,
            ))
        })
        .await?;
        tracing::info!(node = %m.name, node_id = %m.node_id, deadline_ms = rec.deadline_ms, spread_secs = rec.spread_secs, "drain requested");
        Ok(super::stamped(
            pb::DrainResponse {
                node_id: m.node_id,
                name: m.name,
                deadline_ms: rec.deadline_ms,
                spread_secs: rec.spread_secs,
            },
            stamp,
        ))
    }

    async fn undrain(
        &self,
        req: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let m = self.find(&req.into_inner().node).await?;
        let id = m.node_id.clone();
        let (_, stamp) = super::transact(&self.store, ctx, move |view| {
            if !view.drains().iter().any(|d| d.node_id == id) {
                return Err(HostsError::Missing(format!(
                    "node {id} is not being drained"
                )));
            }
            Ok((
                vec![Write {
                    key: drain_key(&id),
                    body: None,
                }],
                (),
            ))
        })
        .await?;
        tracing::info!(node = %m.name, node_id = %m.node_id, "undrain requested");
        Ok(super::stamped(
            pb::UndrainResponse {
                node_id: m.node_id,
                name: m.name,
            },
            stamp,
        ))
    }

    async fn drain_status(
        &self,
        req: Request<pb::DrainStatusRequest>,
    ) -> Result<Response<pb::DrainStatusResponse>, Status> {
        let m = self.find(&req.into_inner().node).await?;
        let requested = self
            .store
            .snapshot()
            .drains
            .iter()
            .any(|d| d.node_id == m.node_id);
        Ok(Response::new(status_of(&m, requested)))
    }
}
