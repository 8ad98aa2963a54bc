//! Upstreams: passive health, the pools of a host or location and the
//! order their upstreams are tried in (this file); opening connections
//! (`connect`); keeping idle ones, in paired verbs `take_*`/`release*`
//! (`idle`); an h2 request's body on its way up (`body`).
//!
//! The proxy owns its pool rather than using hyper-util's legacy client so
//! that it can connect *before* it touches the request body: when an
//! upstream refuses, the request (and its unread streaming body) is still
//! whole and can go to the next upstream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

pub mod balance;
mod body;
mod connect;
pub mod health;
mod idle;

pub use balance::{Balancer, Lease, Load};
pub use body::{UploadBody, Uploaded};
pub use connect::{ConnectError, Connector, RawConn, Sender, UpstreamIo};

use crate::host::UpstreamUrl;
use crate::tls::upstream::{ClientConfigs, TlsProfile};

/// One upstream address, shared by every host and location that names it,
/// and kept across route-table swaps (so pools and health marks survive
/// config changes).
pub struct UpstreamState {
    pub url: UpstreamUrl,
    /// `Host` for requests to it when the client's is not kept: built once
    /// rather than formatted per request.
    pub host_header: Option<http::HeaderValue>,
    /// The URL as text, for logs and metrics (built once).
    pub url_text: Arc<str>,
    /// Client TLS for `https://` upstreams (per the host's CA settings).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Until when (ms since [`epoch`]) it is skipped after a failure.
    down_until_ms: AtomicU64,
    /// hyper connections, for requests that came over h2; one pool per
    /// worker (`crate::workers::slot`), see `idle`.
    idle: idle::Pools<Sender>,
    /// Plain connections for the HTTP/1 path (`proxy::h1`), newest last;
    /// one pool per worker.
    raw_idle: idle::Pools<RawConn>,
    /// Open tunnels and in-flight requests on this node (least-conn,
    /// bounded load, caps, `host show`).
    pub load: Load,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl UpstreamState {
    fn new(url: UpstreamUrl, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        UpstreamState {
            host_header: http::HeaderValue::from_str(&url.authority()).ok(),
            url_text: Arc::from(url.to_string()),
            url,
            tls,
            down_until_ms: AtomicU64::new(0),
            idle: idle::pools(),
            raw_idle: idle::pools(),
            load: Load::default(),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Passive health: skip this upstream for `cooldown`.
    pub fn mark_down(&self, cooldown: Duration) {
        self.down_until_ms
            .store(now_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn mark_up(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// The upstreams of one host or location and their balancer.
pub struct Pool {
    upstreams: Vec<Arc<UpstreamState>>,
    pub balancer: Balancer,
    /// Active checks, one per upstream in order; empty when the pool has
    /// none (then no lookups per request).
    checks: Box<[Option<Arc<health::Checker>>]>,
    /// Upstreams being drained (upstream drain), in order; empty when none.
    draining: Box<[bool]>,
}

impl Pool {
    /// A round-robin pool without weights, caps or checks.
    pub fn new(upstreams: Vec<Arc<UpstreamState>>) -> Self {
        Pool::with_balancing(upstreams, &crate::host::Balancing::default(), None, None)
    }

    /// A pool balanced as `b` says (computed once, at route-table build);
    /// with `registry`, its active health checks are started (or shared);
    /// `drains` (the host's) name upstreams that get no new work.
    pub fn with_balancing(
        upstreams: Vec<Arc<UpstreamState>>,
        b: &crate::host::Balancing,
        registry: Option<&UpstreamRegistry>,
        drains: Option<&std::collections::BTreeMap<String, crate::host::balance::UpstreamDrain>>,
    ) -> Self {
        let draining: Box<[bool]> = match drains {
            Some(d) if upstreams.iter().any(|u| d.contains_key(&*u.url_text)) => upstreams
                .iter()
                .map(|u| d.contains_key(&*u.url_text))
                .collect(),
            _ => Box::default(),
        };
        let checks: Box<[Option<Arc<health::Checker>>]> = match registry {
            Some(r) if b.health.enabled() => upstreams
                .iter()
                .map(|u| r.checks.get(u, &b.health))
                .collect(),
            _ => Box::default(),
        };
        Pool {
            balancer: Balancer::new(b, &upstreams),
            upstreams,
            checks,
            draining,
        }
    }

    /// Whether upstream `i` failed its active checks or is being drained:
    /// it gets work only when no other upstream can take it.
    fn unhealthy(&self, i: usize) -> bool {
        (!self.checks.is_empty() && self.checks[i].as_ref().is_some_and(|c| !c.is_healthy()))
            || (!self.draining.is_empty() && self.draining[i])
    }

    pub fn upstreams(&self) -> &[Arc<UpstreamState>] {
        &self.upstreams
    }

    /// The order to try upstreams in for one request: the balancer's
    /// first choice (`key`: the request's affinity key, for hash
    /// policies), then the rest in rotation, healthy ones first, then
    /// those cooling down — when every upstream is marked down, trying one
    /// beats failing without trying.
    ///
    /// An iterator rather than a `Vec`: it runs on every request, and the
    /// first upstream nearly always answers. Health is read once, when the
    /// iterator is made, so an upstream marked down during the request is
    /// neither skipped nor tried twice.
    pub fn attempt_order(&self, key: Option<u64>) -> AttemptOrder<'_> {
        let n = self.upstreams.len();
        let now = now_ms();
        let mut down = DownSet::new(n);
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.down_until_ms.load(Ordering::Relaxed) > now || self.unhealthy(i) {
                down.insert(i);
            }
        }
        let start = self
            .balancer
            .first(&self.upstreams, key, |i| !down.contains(i));
        AttemptOrder {
            upstreams: &self.upstreams,
            start,
            step: 0,
            down,
        }
    }

    /// Whether some upstream has room under the cap (always, uncapped).
    pub fn has_room(&self) -> bool {
        let cap = self.balancer.cap;
        cap == 0 || self.upstreams.iter().any(|u| u.load.active() < cap)
    }

    /// A lease on `upstream` for one attempt, unless it is at the cap.
    pub fn lease(&self, upstream: &Arc<UpstreamState>) -> Option<Lease> {
        Lease::take(upstream, self.balancer.cap)
    }
}

/// Which upstreams of a pool were cooling down when an [`AttemptOrder`] was
/// made: a bit set in one word for pools of up to 64 upstreams.
enum DownSet {
    Small(u64),
    Large(Vec<bool>),
}

impl DownSet {
    fn new(n: usize) -> Self {
        if n <= 64 {
            DownSet::Small(0)
        } else {
            DownSet::Large(vec![false; n])
        }
    }

    fn insert(&mut self, i: usize) {
        match self {
            DownSet::Small(bits) => *bits |= 1 << i,
            DownSet::Large(v) => v[i] = true,
        }
    }

    fn contains(&self, i: usize) -> bool {
        match self {
            DownSet::Small(bits) => bits & (1 << i) != 0,
            DownSet::Large(v) => v[i],
        }
    }
}

/// Upstreams in the order [`Pool::attempt_order`] tries them: one pass over
/// the rotated list for healthy ones, a second for those cooling down.
pub struct AttemptOrder<'a> {
    upstreams: &'a [Arc<UpstreamState>],
    start: usize,
    /// 0..n: first pass; n..2n: second pass.
    step: usize,
    down: DownSet,
}

impl AttemptOrder<'static> {
    /// No upstream at all (the request is answered without one).
    pub fn none() -> Self {
        AttemptOrder {
            upstreams: &[],
            start: 0,
            step: 0,
            down: DownSet::Small(0),
        }
    }
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = &'a Arc<UpstreamState>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.upstreams.len();
        while self.step < 2 * n {
            let second_pass = self.step >= n;
            let i = (self.start + self.step) % n;
            self.step += 1;
            if self.down.contains(i) == second_pass {
                return Some(&self.upstreams[i]);
            }
        }
        None
    }
}

/// Hands out one [`UpstreamState`] per upstream URL and TLS profile (two
/// hosts that trust different CAs must not share connections).
#[derive(Default)]
pub struct UpstreamRegistry {
    map: Mutex<HashMap<(UpstreamUrl, TlsProfile), Weak<UpstreamState>>>,
    tls: ClientConfigs,
    /// Active health checks, shared like the states.
    pub checks: health::Checkers,
}

impl UpstreamRegistry {
    /// Every upstream some route (or tunnel) still holds (metrics).
    pub fn live(&self) -> Vec<Arc<UpstreamState>> {
        let map = self.map.lock().expect("registry lock");
        map.values().filter_map(Weak::upgrade).collect()
    }

    pub fn get(&self, url: &UpstreamUrl, ca_pem: &str, insecure: bool) -> Arc<UpstreamState> {
        let profile = if url.tls {
            ClientConfigs::profile(ca_pem, insecure)
        } else {
            TlsProfile::SystemRoots
        };
        let key = (url.clone(), profile);
        let mut map = self.map.lock().expect("registry lock");
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let tls = url.tls.then(|| self.tls.get(ca_pem, insecure));
        let s = Arc::new(UpstreamState::new(url.clone(), tls));
        map.insert(key, Arc::downgrade(&s));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(port: u16) -> UpstreamUrl {
        UpstreamUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn round_robin_puts_cooling_down_upstreams_last() {
        let reg = UpstreamRegistry::default();
        let pool = Pool::new(vec![
            reg.get(&url(1), "", false),
            reg.get(&url(2), "", false),
            reg.get(&url(3), "", false),
        ]);
        let firsts: Vec<u16> = (0..3)
            .map(|_| pool.attempt_order(None).next().unwrap().url.port)
            .collect();
        assert_eq!(firsts, [1, 2, 3]);
        pool.upstreams()[1].mark_down(Duration::from_secs(60));
        for _ in 0..3 {
            let order: Vec<u16> = pool.attempt_order(None).map(|u| u.url.port).collect();
            assert_eq!(order.len(), 3);
            assert_eq!(*order.last().unwrap(), 2, "{order:?}");
        }
        pool.upstreams()[1].mark_up();
        assert!(!pool.upstreams()[1].is_down());
    }

    #[test]
    fn registry_shares_state_per_url() {
        let reg = UpstreamRegistry::default();
        let a = reg.get(&url(1), "", false);
        a.mark_down(Duration::from_secs(60));
        assert!(
            reg.get(&url(1), "", false).is_down(),
            "health survives a table rebuild"
        );
        assert!(!reg.get(&url(2), "", false).is_down());
    }
}
