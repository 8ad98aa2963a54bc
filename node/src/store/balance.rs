//! The on-disk form of balancing settings (`BalancingRecord`), kept out of
//! `codec.rs` so the host codec only gains one line per direction.

use charon_proto::store as pb;

use crate::host::balance::{Balancing, HealthCheck};

pub(super) fn to_pb(b: &Balancing) -> Option<pb::BalancingRecord> {
    if *b == Balancing::default() {
        // Hosts without balancing settings encode as before.
        return None;
    }
    let h = &b.health;
    Some(pb::BalancingRecord {
        lb: b.lb.clone(),
        set_cookie: b.set_cookie,
        weights: b.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        max_conns: b.max_conns,
        queue_timeout_ms: b.queue_timeout_ms,
        health: h.enabled().then(|| pb::HealthCheckRecord {
            path: h.path.clone(),
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            rise: h.rise,
            fall: h.fall,
            status_min: h.status_min,
            status_max: h.status_max,
        }),
    })
}

pub(super) fn from_pb(b: Option<pb::BalancingRecord>) -> Balancing {
    let Some(b) = b else {
        return Balancing::default();
    };
    let health = b
        .health
        .map(|h| HealthCheck {
            path: h.path,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            rise: h.rise,
            fall: h.fall,
            status_min: h.status_min,
            status_max: h.status_max,
        })
        .unwrap_or_default();
    Balancing {
        lb: b.lb,
        set_cookie: b.set_cookie,
        weights: b.weights.into_iter().collect(),
        max_conns: b.max_conns,
        queue_timeout_ms: b.queue_timeout_ms,
        health,
    }
}
