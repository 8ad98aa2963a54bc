//! The rate-limit step of the request-policy phase: one GCRA limiter
//! ([`crate::access::rate::Gcra`]) per host that sets `--rate-limit`, and
//! one per location that sets its own (`;rate-limit=` on `--location`: the
//! location's own bucket, used instead of the host's for requests under
//! it), each kept across route rebuilds while its limit stays the same, and,
//! for cluster scope, the exchange with the other nodes: each node
//! publishes how many requests it admitted for its busiest clients
//! ([`RateRegistry::hot`], into its own gossip keys) and charges what the
//! others admitted to its own state ([`RateRegistry::charge`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderName;

use crate::access::rate::{ByKey, Gcra, RateSpec};
use crate::host::ProxyHost;

/// What identifies a client for a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    Ip,
    /// A request header's value; a request without it is keyed by address.
    Header(HeaderName),
}

/// One host's (or location's) limit and its clients' state.
pub struct HostLimiter {
    /// The limiter's id, also in gossip: the host's id, or for a location
    /// `<host id>~<hash of its path>` (gossip entries stay short and free
    /// of the separators the encoding uses).
    pub host_id: Arc<str>,
    /// The metric label and log text of its refusals: `rate limit`, or
    /// `rate limit /path` for a location's.
    pub label: Arc<str>,
    /// The fields it was made from: an update that keeps them keeps the
    /// state.
    config: (String, String, String),
    pub key: RateKey,
    pub cluster: bool,
    state: Mutex<State>,
}

struct State {
    gcra: Gcra,
    /// Per client: requests admitted here in all, and as last published.
    admitted: ByKey<(u64, u64)>,
}

/// Nanoseconds on the process's monotonic clock.
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The 64-bit key of a client (FNV over its bytes).
fn key_hash(bytes: &[u8]) -> u64 {
    let mut h = crate::util::Fnv::default();
    bytes.hash(&mut h);
    h.finish()
}

impl HostLimiter {
    /// The key of the client at `ip` sending `header` (for header keys).
    pub fn client_key(&self, ip: IpAddr, header: Option<&[u8]>) -> u64 {
        match (header, &self.key) {
            (Some(v), RateKey::Header(_)) => key_hash(v),
            _ => match ip.to_canonical() {
                IpAddr::V4(v4) => key_hash(&v4.octets()),
                IpAddr::V6(v6) => key_hash(&v6.octets()),
            },
        }
    }

    /// One request of client `key`: admitted, or how long until it would be.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        let mut s = self.state.lock().expect("rate lock");
        s.gcra.check(key, now_ns())?;
        if self.cluster {
            s.admitted.entry(key).or_default().0 += 1;
        }
        Ok(())
    }
}

/// The limiters by host id, and what peers were last seen to have
/// admitted (to charge only the difference).
#[derive(Default)]
pub struct RateRegistry {
    limiters: Mutex<HashMap<String, Arc<HostLimiter>>>,
    /// (peer, host id, client key) → the peer's count last seen.
    seen: Mutex<HashMap<(String, String, u64), u64>>,
}

/// The id of a location's own limiter: `<host id>~<FNV of the path, 16
/// hex digits>`, the same on every node.
pub fn location_limiter_id(host_id: &str, path: &str) -> String {
    format!("{host_id}~{:016x}", key_hash(path.as_bytes()))
}

/// Published per node at most: each entry is ~30 bytes of gossip.
pub const HOT_KEYS: usize = 24;

impl RateRegistry {
    /// The limiter of `host` (the existing one while its limit is the
    /// same), or `None` when it sets none.
    pub fn limiter(&self, host: &ProxyHost) -> Option<Arc<HostLimiter>> {
        let fields = (&host.rate_limit, &host.rate_key, &host.rate_limit_scope);
        self.make(&host.id, Arc::from("rate limit"), fields)
    }

    /// The own limiter of `host`'s location `loc`, or `None` when it sets
    /// none (the host's limit applies there then).
    pub fn location_limiter(
        &self,
        host: &ProxyHost,
        loc: &crate::host::Location,
    ) -> Option<Arc<HostLimiter>> {
        let id = location_limiter_id(&host.id, &loc.path_prefix);
        let label = Arc::from(format!("rate limit {}", loc.path_prefix));
        let fields = (&loc.rate_limit, &loc.rate_key, &loc.rate_limit_scope);
        self.make(&id, label, fields)
    }

    /// After `old` became `new` (`None`: deleted): forgets the limiters
    /// `old` had that `new` no longer has (the host's when it is gone, a
    /// location's when the location is). O(its locations).
    pub fn forget(&self, old: &ProxyHost, new: Option<&ProxyHost>) {
        let kept = |path: &str| {
            new.is_some_and(|n| {
                n.locations
                    .iter()
                    .any(|l| l.path_prefix == path && !l.rate_limit.is_empty())
            })
        };
        let mut map = self.limiters.lock().expect("rate lock");
        if new.is_none() {
            map.remove(&old.id);
        }
        for l in old.locations.iter().filter(|l| !kept(&l.path_prefix)) {
            map.remove(&location_limiter_id(&old.id, &l.path_prefix));
        }
    }

    fn make(
        &self,
        id: &str,
        label: Arc<str>,
        (limit, rate_key, scope): (&String, &String, &String),
    ) -> Option<Arc<HostLimiter>> {
        let mut map = self.limiters.lock().expect("rate lock");
        if limit.is_empty() {
            map.remove(id);
            return None;
        }
        let config = (limit.clone(), rate_key.clone(), scope.clone());
        if let Some(l) = map.get(id).filter(|l| l.config == config) {
            return Some(l.clone());
        }
        let spec = match RateSpec::parse(limit) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(limiter = %id, error = %e, "ignoring an unreadable rate limit");
                return None;
            }
        };
        let key = match rate_key.strip_prefix("header:") {
            Some(name) => HeaderName::from_bytes(name.as_bytes())
                .map(RateKey::Header)
                .unwrap_or(RateKey::Ip),
            None => RateKey::Ip,
        };
        let l = Arc::new(HostLimiter {
            host_id: Arc::from(id),
            label,
            cluster: scope != "node",
            key,
            config,
            state: Mutex::new(State {
                gcra: Gcra::new(spec),
                admitted: ByKey::default(),
            }),
        });
        map.insert(id.to_string(), l.clone());
        Some(l)
    }

    /// This node's busiest clients of cluster-scope limits since the last
    /// call: (host id, client key, admitted here in all), at most
    /// [`HOT_KEYS`], the most active first.
    pub fn hot(&self) -> Vec<(String, u64, u64)> {
        let limiters: Vec<Arc<HostLimiter>> = self
            .limiters
            .lock()
            .expect("rate lock")
            .values()
            .filter(|l| l.cluster)
            .cloned()
            .collect();
        let mut out: Vec<(u64, String, u64, u64)> = Vec::new();
        for l in limiters {
            let mut s = l.state.lock().expect("rate lock");
            // Clients quiet since the last call need no entry: forgotten
            // when there are many (their peers' view of them just stops).
            if s.admitted.len() > 10_000 {
                s.admitted.retain(|_, (t, p)| t != p);
            }
            for (key, (total, published)) in s.admitted.iter_mut() {
                if total > published {
                    out.push((*total - *published, l.host_id.to_string(), *key, *total));
                    *published = *total;
                }
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out.truncate(HOT_KEYS);
        out.into_iter().map(|(_, h, k, t)| (h, k, t)).collect()
    }

    /// Charges what `peer` says it admitted (running totals) to the
    /// limiters here: only the growth since last seen.
    pub fn charge(&self, peer: &str, entries: &[(String, u64, u64)]) {
        let now = now_ns();
        let limiters = self.limiters.lock().expect("rate lock").clone();
        let mut seen = self.seen.lock().expect("rate lock");
        if seen.len() > 100_000 {
            seen.clear();
        }
        for (host, key, total) in entries {
            let last = seen.insert((peer.to_string(), host.clone(), *key), *total);
            // First sighting: all of it is news (a charge is capped at a
            // burst, so a node that starts late is not misled by history);
            // a smaller total: the peer restarted, counting from 0 again.
            let delta = match last {
                Some(l) if *total >= l => total - l,
                Some(_) | None => *total,
            };
            if delta == 0 {
                continue;
            }
            if let Some(l) = limiters.get(host).filter(|l| l.cluster) {
                l.state
                    .lock()
                    .expect("rate lock")
                    .gcra
                    .charge(*key, delta, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Location;

    #[test]
    fn a_location_has_its_own_bucket_and_takes_part_in_the_cluster_exchange() {
        let reg = RateRegistry::default();
        let mut host = ProxyHost {
            id: "h-1".into(),
            rate_limit: "100/s,burst=100".into(),
            rate_key: "ip".into(),
            rate_limit_scope: "cluster".into(),
            locations: vec![Location {
                path_prefix: "/login".into(),
                rate_limit: "1/s,burst=2".into(),
                rate_key: "ip".into(),
                rate_limit_scope: "cluster".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let main = reg.limiter(&host).unwrap();
        let loc = reg.location_limiter(&host, &host.locations[0]).unwrap();
        assert_eq!(&*loc.label, "rate limit /login");
        let key = loc.client_key("10.0.0.1".parse().unwrap(), None);
        assert!(loc.check(key).is_ok());
        assert!(main.check(key).is_ok(), "the host's bucket is apart");
        // Published under its own id, and what a peer admitted under that
        // id is charged to it.
        let hot = reg.hot();
        let id = location_limiter_id("h-1", "/login");
        assert!(
            hot.iter().any(|(h, k, n)| *h == id && *k == key && *n == 1),
            "{hot:?}"
        );
        reg.charge("peer", &[(id.clone(), key, 1)]);
        assert!(
            loc.check(key).is_err(),
            "burst of 2: one here, one elsewhere"
        );
        assert!(main.check(key).is_ok());
        // Dropping the location's limit forgets its limiter.
        let old = host.clone();
        host.locations[0].rate_limit.clear();
        reg.forget(&old, Some(&host));
        assert!(!reg.limiters.lock().unwrap().contains_key(&id));
        assert!(reg.limiters.lock().unwrap().contains_key("h-1"));
        reg.forget(&host, None);
        assert!(reg.limiters.lock().unwrap().is_empty());
    }
}
