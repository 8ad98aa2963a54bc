//! Upstream drains (issue 19): a host's `balancing.drains` names upstreams
//! being taken out for a rollout. The route table stops choosing them
//! (`Pool`'s draining set, precomputed per route); this module closes
//! their open tunnels with 1001 at frame boundaries, from the drain's
//! deadline, spread over its window — the same `TunnelInfo::close` a node
//! drain uses (`crate::drain`), for the tunnels of one host and upstream
//! only. Every node does it from the replicated host record, so the whole
//! cluster drains the upstream at once; an undrain before the deadline
//! cancels the closing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::host::ProxyHost;
use crate::proxy::tunnel::registry::TunnelRegistry;

/// (host id, upstream URL) → (deadline, spread, cancel flag).
type Active = HashMap<(String, String), (u64, u32, Arc<AtomicBool>)>;

/// The closing tasks of this node's upstream drains.
#[derive(Default)]
pub struct UpstreamDrains {
    active: Mutex<Active>,
}

impl UpstreamDrains {
    /// A host changed: starts closing for drains it gained (or whose
    /// deadline moved), cancels those it lost.
    pub fn apply(
        &self,
        tunnels: &Arc<TunnelRegistry>,
        old: Option<&ProxyHost>,
        new: Option<&ProxyHost>,
    ) {
        let Some(id) = new.or(old).map(|h| h.id.clone()) else {
            return;
        };
        let wanted = new.map(|h| &h.balancing.drains);
        let mut active = self.active.lock().expect("drains lock");
        active.retain(|(host, url), (deadline, spread, cancel)| {
            let keep = *host != id
                || wanted
                    .and_then(|w| w.get(url))
                    .is_some_and(|d| d.deadline_ms == *deadline && d.spread_secs == *spread);
            if !keep {
                cancel.store(true, Ordering::Relaxed);
                tracing::info!(host_id = %host, upstream = %url, "upstream drain ended (undrained or changed)");
            }
            keep
        });
        let Some(wanted) = wanted else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (url, d) in wanted {
            let key = (id.clone(), url.clone());
            if active.contains_key(&key) {
                continue;
            }
            let cancel = Arc::new(AtomicBool::new(false));
            active.insert(key, (d.deadline_ms, d.spread_secs, cancel.clone()));
            tracing::info!(host_id = %id, upstream = %url, deadline_ms = d.deadline_ms, spread_secs = d.spread_secs, "upstream draining: no new work; tunnels closed from the deadline");
            let spread = Duration::from_secs(u64::from(d.spread_secs));
            let job = Closing {
                tunnels: tunnels.clone(),
                host_id: id.clone(),
                url: url.clone(),
                cancel,
            };
            rt.spawn(job.run(d.deadline_ms, spread));
        }
    }
}

/// The tunnels of one host's upstream, closed from a deadline on.
struct Closing {
    tunnels: Arc<TunnelRegistry>,
    host_id: String,
    url: String,
    cancel: Arc<AtomicBool>,
}

impl Closing {
    async fn run(self, deadline_ms: u64, spread: Duration) {
        let wait = deadline_ms.saturating_sub(crate::util::wall_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if self.cancel.load(Ordering::Relaxed) {
            return;
        }
        let list: Vec<_> = self
            .tunnels
            .list()
            .into_iter()
            .filter(|t| *t.host_id == *self.host_id && *t.upstream == *self.url)
            .collect();
        tracing::info!(host_id = %self.host_id, upstream = %self.url, tunnels = list.len(), ?spread, "upstream drain deadline: closing its tunnels with 1001 (going away)");
        let n = list.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (i, t) in list.iter().enumerate() {
            tokio::time::sleep_until(start + spread * i as u32 / n).await;
            if self.cancel.load(Ordering::Relaxed) {
                return;
            }
            t.close(1001, "going away");
        }
    }
}
