//! Balancing settings between the API's messages and the domain type
//! (issue 19), and the `charon.v1.Balance` service: per-upstream state of
//! a host on this node.

use charon_proto::v1 as pb;

use crate::host::balance::{Balancing, HealthCheck};
use crate::validate::FieldError;

pub fn to_pb(b: &Balancing) -> Option<pb::Balancing> {
    if *b == Balancing::default() {
        return None;
    }
    Some(pb::Balancing {
        lb: b.lb.clone(),
        set_cookie: b.set_cookie,
        weights: b.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        max_conns: b.max_conns,
        queue_timeout_ms: b.queue_timeout_ms,
        health: b.health.enabled().then(|| health_to_pb(&b.health)),
    })
}

fn health_to_pb(h: &HealthCheck) -> pb::HealthCheck {
    pb::HealthCheck {
        path: h.path.clone(),
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        rise: h.rise,
        fall: h.fall,
        status_min: h.status_min,
        status_max: h.status_max,
    }
}

fn health_from_pb(h: pb::HealthCheck) -> HealthCheck {
    HealthCheck {
        path: h.path,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        rise: h.rise,
        fall: h.fall,
        status_min: h.status_min,
        status_max: h.status_max,
    }
}

pub fn from_pb(b: Option<pb::Balancing>) -> Balancing {
    let Some(b) = b else {
        return Balancing::default();
    };
    Balancing {
        lb: b.lb,
        set_cookie: b.set_cookie,
        weights: b.weights.into_iter().collect(),
        max_conns: b.max_conns,
        queue_timeout_ms: b.queue_timeout_ms,
        health: b.health.map(health_from_pb).unwrap_or_default(),
    }
}

/// Applies an update's balancing changes to `b`. `upstreams_replaced`:
/// the same update sets new upstreams, so its weights replace the old
/// ones (weights name upstreams; alone they would be ambiguous).
pub fn apply_update(
    b: &mut Balancing,
    u: Option<pb::BalancingUpdate>,
    upstreams_replaced: bool,
) -> Result<(), FieldError> {
    if upstreams_replaced {
        b.weights.clear();
    }
    let Some(u) = u else {
        return Ok(());
    };
    if !u.weights.is_empty() {
        if !upstreams_replaced {
            return Err(FieldError::new(
                "balancing.weights",
                "weights are set together with the upstreams they name (give upstreams too)",
            ));
        }
        b.weights = u.weights.into_iter().collect();
    }
    if let Some(lb) = u.lb {
        b.lb = lb;
    }
    if let Some(v) = u.set_cookie {
        b.set_cookie = v;
    }
    if let Some(v) = u.max_conns {
        b.max_conns = v;
    }
    if let Some(v) = u.queue_timeout_ms {
        b.queue_timeout_ms = v;
    }
    if let Some(h) = u.health {
        b.health = health_from_pb(h);
    }
    Ok(())
}

/// `charon.v1.Balance`: a host's upstreams as this node sees them.
pub struct BalanceApi {
    store: std::sync::Arc<crate::store::Store>,
    proxy: std::sync::Arc<crate::proxy::Proxy>,
    node_id: String,
    node_name: String,
}

impl BalanceApi {
    pub fn new(
        store: std::sync::Arc<crate::store::Store>,
        proxy: std::sync::Arc<crate::proxy::Proxy>,
        node_id: String,
        node_name: String,
    ) -> Self {
        BalanceApi {
            store,
            proxy,
            node_id,
            node_name,
        }
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
}
