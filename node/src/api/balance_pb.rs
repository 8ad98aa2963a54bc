//! Balancing settings (issue 19) between the API's messages and the
//! domain type: used by `hosts` (host fields) and `balance` (the service),
//! kept apart so neither imports the other for them.

use charon_proto::v1 as pb;

use crate::host::balance::{Balancing, HealthCheck, UpstreamDrain};
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
        drains: b
            .drains
            .iter()
            .map(|(url, d)| {
                let d = pb::UpstreamDrain {
                    deadline_ms: d.deadline_ms,
                    spread_secs: d.spread_secs,
                    requested_at_ms: d.requested_at_ms,
                };
                (url.clone(), d)
            })
            .collect(),
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
        drains: b
            .drains
            .into_iter()
            .map(|(url, d)| {
                let d = UpstreamDrain {
                    deadline_ms: d.deadline_ms,
                    spread_secs: d.spread_secs,
                    requested_at_ms: d.requested_at_ms,
                };
                (url, d)
            })
            .collect(),
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
