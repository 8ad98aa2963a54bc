//! `charon.v1.Balance` (issue 19): a host's upstreams as this node sees
//! them (load, health, drain), and upstream drains, written on the host's
//! record so they replicate like every host field.

use charon_proto::v1 as pb;

use crate::host::balance::{Balancing, UpstreamDrain};
use crate::validate::FieldError;

/// `charon.v1.Balance`: a host's upstreams as this node sees them.
pub struct BalanceApi {
    store: std::sync::Arc<crate::store::Store>,
    proxy: std::sync::Arc<crate::proxy::Proxy>,
    gate: std::sync::Arc<super::WriteGate>,
    node_id: String,
    node_name: String,
}

/// What an upstream drain (or undrain) changes: the URL and, for a
/// drain, its deadline and spread.
type DrainChange = (String, Option<(u32, u32)>);

impl BalanceApi {
    pub fn new(
        store: std::sync::Arc<crate::store::Store>,
        proxy: std::sync::Arc<crate::proxy::Proxy>,
        gate: std::sync::Arc<super::WriteGate>,
        (node_id, node_name): (String, String),
    ) -> Self {
        BalanceApi {
            store,
            proxy,
            gate,
            node_id,
            node_name,
        }
    }

    /// Writes a drain (or removes one) on the host's record, so it
    /// replicates like every host field and survives restarts.
    async fn change_drain<M>(
        &self,
        req: tonic::Request<M>,
        key: String,
        (url, drain): DrainChange,
    ) -> Result<tonic::Response<pb::UpstreamDrainResponse>, tonic::Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        if key.trim().is_empty() {
            return Err(tonic::Status::invalid_argument("id_or_domain: is required"));
        }
        let canonical = crate::host::UpstreamUrl::parse(&url)
            .map_err(|e| tonic::Status::invalid_argument(format!("url: {e}")))?
            .to_string();
        let (resp, stamp) = super::transact(&self.store, ctx, move |view| {
            let current = view
                .find_host(&key)
                .ok_or_else(|| super::hosts::HostsError::NotFound(key.clone()))?;
            let listed = current
                .upstreams
                .iter()
                .chain(current.locations.iter().flat_map(|l| &l.upstreams))
                .any(|u| *u == canonical);
            if !listed {
                return Err(FieldError::new(
                    "url",
                    format!("{canonical} is not an upstream of host {}", current.id),
                )
                .into());
            }
            let mut h = (**current).clone();
            let now = crate::util::wall_ms();
            match drain {
                Some((deadline, spread)) => {
                    let d = UpstreamDrain {
                        deadline_ms: now + u64::from(deadline) * 1000,
                        spread_secs: spread,
                        requested_at_ms: now,
                    };
                    h.balancing.drains.insert(canonical.clone(), d);
                }
                None => {
                    h.balancing.drains.remove(&canonical);
                }
            }
            let d = h
                .balancing
                .drains
                .get(&canonical)
                .cloned()
                .unwrap_or_default();
            let mut resp = pb::UpstreamDrainResponse {
                host_id: h.id.clone(),
                version: h.version,
                url: canonical.clone(),
                deadline_ms: d.deadline_ms,
                spread_secs: d.spread_secs,
            };
            if h == **current {
                return Ok((vec![], resp));
            }
            h.version += 1;
            h.updated_at_ms = now.max(h.updated_at_ms);
            resp.version = h.version;
            Ok((
                super::hosts::host_writes(view, Some(current), Some(&h)),
                resp,
            ))
        })
        .await?;
        tracing::info!(host_id = %resp.host_id, upstream = %resp.url, deadline_ms = resp.deadline_ms, "upstream drain changed");
        Ok(super::stamped(resp, stamp))
    }

    fn row(
        &self,
        h: &crate::host::ProxyHost,
        loc: &str,
        url: &str,
        b: &Balancing,
    ) -> Option<pb::UpstreamStatus> {
        let parsed = crate::host::UpstreamUrl::parse(url).ok()?;
        let s =
            self.proxy
                .upstream_state(&parsed, &h.upstream_ca_pem, h.upstream_insecure_skip_verify);
        let state = match self.proxy.upstream_health(&s, &b.health) {
            _ if h.balancing.drains.contains_key(url) => "draining",
            Some(false) => "unhealthy",
            _ if s.is_down() => "cooling-down",
            Some(true) => "healthy",
            None => "unchecked",
        };
        Some(pb::UpstreamStatus {
            url: url.to_string(),
            location: loc.to_string(),
            state: state.to_string(),
            open_tunnels: u64::from(s.load.tunnels()),
            in_flight: u64::from(s.load.in_flight()),
            weight: b.weight(url),
            node_id: self.node_id.clone(),
            node_name: self.node_name.clone(),
        })
    }
}

#[tonic::async_trait]
impl pb::balance_server::Balance for BalanceApi {
    async fn upstream_status(
        &self,
        req: tonic::Request<pb::UpstreamStatusRequest>,
    ) -> Result<tonic::Response<pb::UpstreamStatusResponse>, tonic::Status> {
        let key = req.into_inner().id_or_domain;
        if key.trim().is_empty() {
            return Err(tonic::Status::invalid_argument("id_or_domain: is required"));
        }
        let snap = self.store.snapshot();
        let h = crate::store::find_host(&snap, &key).ok_or_else(|| {
            tonic::Status::not_found(format!("no host with id or domain {key:?}"))
        })?;
        let mut upstreams: Vec<pb::UpstreamStatus> = h
            .upstreams
            .iter()
            .filter_map(|u| self.row(h, "", u, &h.balancing))
            .collect();
        for loc in &h.locations {
            upstreams.extend(
                loc.upstreams
                    .iter()
                    .filter_map(|u| self.row(h, &loc.path_prefix, u, &loc.balancing)),
            );
        }
        Ok(tonic::Response::new(pb::UpstreamStatusResponse {
            upstreams,
        }))
    }

    async fn drain_upstream(
        &self,
        req: tonic::Request<pb::DrainUpstreamRequest>,
    ) -> Result<tonic::Response<pb::UpstreamDrainResponse>, tonic::Status> {
        let r = req.get_ref().clone();
        let deadline = match r.deadline_secs {
            0 => 300,
            s => s,
        };
        let spread = match r.spread_secs {
            0 => 30,
            s => s,
        };
        self.change_drain(req, r.id_or_domain, (r.url, Some((deadline, spread))))
            .await
    }

    async fn undrain_upstream(
        &self,
        req: tonic::Request<pb::UndrainUpstreamRequest>,
    ) -> Result<tonic::Response<pb::UpstreamDrainResponse>, tonic::Status> {
        let r = req.get_ref().clone();
        self.change_drain(req, r.id_or_domain, (r.url, None)).await
    }
}
