//! The balancer of one pool (issue 19): which upstream a request or a
//! tunnel goes to first. Built once per pool when the route table is built
//! (weights expanded into a schedule, URL hash seeds computed), so a
//! request pays only for the policy its host chose; round-robin without
//! weights costs what it did before.
//!
//! Load is counted per upstream address ([`Load`], in the shared
//! [`UpstreamState`]), so counters survive host updates and are shared by
//! every host naming the upstream. A [`Lease`] is one in-flight request or
//! one open tunnel: taken when an attempt starts, given back on drop.
//!
//! Hash policies use weighted rendezvous hashing over the upstream URLs
//! with a fixed hash (FNV-1a + a SplitMix64 finaliser, no per-process
//! seed), so every node ranks the upstreams of a key the same way, and a
//! client that reconnects through another node lands on the same backend.
//! Bounded load: an upstream whose load would exceed 1.25 × its weighted
//! share of this node's load is passed over for the next in the ranking,
//! so one hot key cannot sink a backend. The bound uses this node's load,
//! so under skew two nodes may spill a key differently; at even load the
//! choice is the same everywhere.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::host::balance::{Balancing, HashKey, Policy, DEFAULT_QUEUE_TIMEOUT_MS};
use crate::util::Fnv;

use super::UpstreamState;

/// Bounded load: at most this times an upstream's share of the load.
const LOAD_BOUND: f64 = 1.25;

/// Open tunnels and in-flight requests of one upstream on this node.
#[derive(Default)]
pub struct Load {
    in_flight: AtomicU32,
    tunnels: AtomicU32,
}

impl Load {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn tunnels(&self) -> u32 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// What least-conn and bounded load compare.
    pub fn active(&self) -> u32 {
        self.in_flight() + self.tunnels()
    }
}

/// Requests waiting for room under a connection cap, process-wide: a
/// lease given back wakes them only when there are some, so uncapped
/// hosts never touch the `Notify`'s lock.
static WAITING: AtomicU32 = AtomicU32::new(0);
static ROOM: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// One request in flight to an upstream, or one open tunnel to it.
pub struct Lease {
    upstream: Arc<UpstreamState>,
    tunnel: bool,
}

impl Lease {
    /// Takes a lease unless the upstream already has `cap` (0 = no cap).
    pub fn take(upstream: &Arc<UpstreamState>, cap: u32) -> Option<Lease> {
        let load = &upstream.load;
        let before = load.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            upstream: upstream.clone(),
            tunnel: false,
        };
        if cap > 0 && before + load.tunnels() >= cap {
            drop(lease);
            return None;
        }
        Some(lease)
    }

    /// The request became a WebSocket tunnel: it now counts as one.
    pub fn into_tunnel(mut self) -> Lease {
        if !self.tunnel {
            let load = &self.upstream.load;
            load.tunnels.fetch_add(1, Ordering::Relaxed);
            load.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.tunnel = true;
        }
        self
    }

    pub fn upstream(&self) -> &Arc<UpstreamState> {
        &self.upstream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let load = &self.upstream.load;
        match self.tunnel {
            true => load.tunnels.fetch_sub(1, Ordering::Relaxed),
            false => load.in_flight.fetch_sub(1, Ordering::Relaxed),
        };
        if WAITING.load(Ordering::Relaxed) > 0 {
            ROOM.notify_waiters();
        }
    }
}

/// Waits until `has_room` says yes, or `timeout` passes (false).
pub async fn wait_for_room(timeout: Duration, has_room: impl Fn() -> bool) -> bool {
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            WAITING.fetch_sub(1, Ordering::Relaxed);
        }
    }
    WAITING.fetch_add(1, Ordering::Relaxed);
    let _w = Waiting;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = ROOM.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if has_room() {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return has_room();
        }
    }
}

/// A pool's policy, precomputed.
pub struct Balancer {
    pub policy: Policy,
    /// Weight per upstream, in pool order.
    weights: Box<[u32]>,
    /// Smooth weighted round-robin order of indices; empty when every
    /// weight is 1 (plain rotation).
    schedule: Box<[u16]>,
    /// Per-upstream rendezvous seed: the hash of its URL.
    seeds: Box<[u64]>,
    /// Per-upstream cap on [`Load::active`]; 0 = none.
    pub cap: u32,
    pub queue_timeout: Duration,
    /// The request field a hash policy reads (lower case), if any.
    pub key_field: Option<&'static str>,
    cookie: Option<Box<str>>,
    header: Option<Box<str>>,
    next: AtomicUsize,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer::new(&Balancing::default(), &[])
    }
}

impl Balancer {
    /// `upstreams` are the pool's, in order (their URLs weigh and seed).
    pub fn new(b: &Balancing, upstreams: &[Arc<UpstreamState>]) -> Balancer {
        let weights: Box<[u32]> = upstreams
            .iter()
            .map(|u| b.weight(&u.url_text).max(1))
            .collect();
        let schedule = if weights.iter().all(|w| *w == 1) {
            Box::default()
        } else {
            smooth_schedule(&weights)
        };
        let seeds = upstreams
            .iter()
            .map(|u| hash(u.url_text.as_bytes()))
            .collect();
        let policy = b.policy();
        let (key_field, cookie, header) = match &policy {
            Policy::Hash(HashKey::Cookie(n)) => (Some("cookie"), Some(n.as_str().into()), None),
            Policy::Hash(HashKey::Header(n)) => (None, None, Some(n.as_str().into())),
            _ => (None, None, None),
        };
        Balancer {
            policy,
            weights,
            schedule,
            seeds,
            cap: b.max_conns,
            queue_timeout: Duration::from_millis(u64::from(match b.queue_timeout_ms {
                0 => DEFAULT_QUEUE_TIMEOUT_MS,
                ms => ms,
            })),
            key_field,
            cookie,
            header,
            next: AtomicUsize::new(0),
        }
    }

    pub fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(1)
    }

    /// The header a hash policy reads (lower case): `cookie` for
    /// hash:cookie, the named header for hash:header.
    pub fn field(&self) -> Option<&str> {
        self.key_field.or(self.header.as_deref())
    }

    /// The affinity key of a request: a hash of the property the policy
    /// names, or `None` (no such property, or not a hash policy).
    /// `values` are the request's values of [`Balancer::field`].
    pub fn key<'v>(
        &self,
        ip: std::net::IpAddr,
        path: &str,
        values: impl Iterator<Item = &'v [u8]>,
    ) -> Option<u64> {
        let Policy::Hash(key) = &self.policy else {
            return None;
        };
        match key {
            HashKey::Ip => Some(match ip.to_canonical() {
                std::net::IpAddr::V4(v4) => hash(&v4.octets()),
                std::net::IpAddr::V6(v6) => hash(&v6.octets()),
            }),
            HashKey::Path => {
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                Some(hash(path.as_bytes()))
            }
            HashKey::Header(_) => {
                let mut values = values.peekable();
                values.peek()?;
                let mut h = Fnv::default();
                for v in values {
                    h.write(v);
                    h.write_u8(0);
                }
                Some(mix(h.finish()))
            }
            HashKey::Cookie(_) => {
                let name = self.cookie.as_deref()?.as_bytes();
                values
                    .flat_map(|v| v.split(|b| *b == b';'))
                    .find_map(|pair| {
                        let pair = pair.trim_ascii();
                        let (n, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                        (n.trim_ascii() == name).then(|| hash(v[1..].trim_ascii()))
                    })
            }
        }
    }

    /// The index of the upstream tried first. `eligible(i)`: not down,
    /// unhealthy or draining (when none is, every upstream counts).
    pub fn first(
        &self,
        ups: &[Arc<UpstreamState>],
        key: Option<u64>,
        eligible: impl Fn(usize) -> bool,
    ) -> usize {
        let n = ups.len().max(1);
        let any = (0..ups.len()).any(&eligible);
        let ok = |i: usize| !any || eligible(i);
        match (&self.policy, key) {
            (Policy::LeastConn, _) => {
                self.least(ups, ok, self.next.fetch_add(1, Ordering::Relaxed))
            }
            (Policy::RandomTwo, _) => self.random_two(ups, ok),
            (Policy::Hash(_), Some(k)) => self.rendezvous(ups, k, ok),
            _ => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                if self.schedule.is_empty() {
                    turn % n
                } else {
                    usize::from(self.schedule[turn % self.schedule.len()])
                }
            }
        }
    }

    /// Fewest active per weight; ties go round, starting at `turn`.
    fn least(&self, ups: &[Arc<UpstreamState>], ok: impl Fn(usize) -> bool, turn: usize) -> usize {
        let n = ups.len().max(1);
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..ups.len() {
            let i = (turn + k) % n;
            if !ok(i) {
                continue;
            }
            let (a, w) = (u64::from(ups[i].load.active()), u64::from(self.weight(i)));
            match best {
                Some((_, ba, bw)) if a * bw >= ba * w => {}
                _ => best = Some((i, a, w)),
            }
        }
        best.map_or(turn % n, |b| b.0)
    }

    /// Two random eligible upstreams; the less loaded (per weight) wins.
    fn random_two(&self, ups: &[Arc<UpstreamState>], ok: impl Fn(usize) -> bool) -> usize {
        let n = ups.len();
        if n <= 1 {
            return 0;
        }
        let r: u64 = rand::random();
        let a = (r % n as u64) as usize;
        let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
        match (ok(a), ok(b)) {
            (true, true) => {
                let (la, lb) = (
                    u64::from(ups[a].load.active()),
                    u64::from(ups[b].load.active()),
                );
                let (wa, wb) = (u64::from(self.weight(a)), u64::from(self.weight(b)));
                if la * wb <= lb * wa {
                    a
                } else {
                    b
                }
            }
            (true, false) => a,
            (false, true) => b,
            (false, false) => self.least(ups, ok, a),
        }
    }

    /// Weighted rendezvous: the highest score among eligible upstreams
    /// under the load bound (if every one is over it, the highest score).
    fn rendezvous(
        &self,
        ups: &[Arc<UpstreamState>],
        key: u64,
        ok: impl Fn(usize) -> bool,
    ) -> usize {
        let (mut total, mut wsum) = (0u64, 0u64);
        for (i, u) in ups.iter().enumerate() {
            if ok(i) {
                total += u64::from(u.load.active());
                wsum += u64::from(self.weight(i));
            }
        }
        let uniform = self.schedule.is_empty();
        let mut best: Option<(usize, f64, bool)> = None;
        for (i, u) in ups.iter().enumerate() {
            if !ok(i) {
                continue;
            }
            let w = self.weight(i);
            let bound =
                (LOAD_BOUND * (total + 1) as f64 * f64::from(w) / wsum.max(1) as f64).ceil();
            let under = f64::from(u.load.active() + 1) <= bound;
            let h = mix(key ^ self.seeds[i]);
            let score = if uniform {
                h as f64
            } else {
                // u in (0, 1]; w / -ln(u) (Schindelhauer & Schomaker).
                let unit = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                f64::from(w) / -unit.ln().min(-f64::MIN_POSITIVE)
            };
            let better = match best {
                None => true,
                Some((_, s, b_under)) => (under, score) > (b_under, s),
            };
            if better {
                best = Some((i, score, under));
            }
        }
        best.map_or(0, |b| b.0)
    }
}

/// FNV-1a then SplitMix64's finaliser: fixed, the same on every node.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    h.write(bytes);
    mix(h.finish())
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// nginx's smooth weighted round-robin, unrolled once: weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_schedule(weights: &[u32]) -> Box<[u16]> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::UpstreamUrl;
    use crate::proxy::upstream::UpstreamRegistry;

    fn ups(n: u16) -> Vec<Arc<UpstreamState>> {
        let reg = UpstreamRegistry::default();
        (1..=n)
            .map(|p| {
                let url = UpstreamUrl {
                    tls: false,
                    host: "127.0.0.1".into(),
                    port: p,
                };
                reg.get(&url, "", false)
            })
            .collect()
    }

    fn balancer(lb: &str, ups: &[Arc<UpstreamState>]) -> Balancer {
        let b = Balancing {
            lb: lb.into(),
            ..Default::default()
        };
        Balancer::new(&b, ups)
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(&*smooth_schedule(&[5, 1, 1]), &[0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(&*smooth_schedule(&[1, 2]), &[1, 0, 1]);
    }

    #[test]
    fn weights_shape_round_robin() {
        let u = ups(3);
        let b = Balancing {
            weights: [(u[0].url_text.to_string(), 3)].into(),
            ..Default::default()
        };
        let bal = Balancer::new(&b, &u);
        let mut counts = [0; 3];
        for _ in 0..500 {
            counts[bal.first(&u, None, |_| true)] += 1;
        }
        assert_eq!(counts, [300, 100, 100]);
    }

    #[test]
    fn least_conn_fills_the_emptiest() {
        let u = ups(3);
        let bal = balancer("least-conn", &u);
        let held: Vec<Lease> = (0..10).map(|_| Lease::take(&u[0], 0).unwrap()).collect();
        let mut leases = Vec::new();
        for _ in 0..20 {
            let i = bal.first(&u, None, |_| true);
            leases.push(Lease::take(&u[i], 0).unwrap());
        }
        let active: Vec<u32> = u.iter().map(|x| x.load.active()).collect();
        assert_eq!(active, [10, 10, 10], "new work evened out the load");
        drop(held);
        assert_eq!(u[0].load.active(), 0, "leases give back what they took");
        assert_eq!(bal.first(&u, None, |_| true), 0, "the emptiest");
        assert_ne!(bal.first(&u, None, |i| i != 0), 0, "ineligible skipped");
    }

    #[test]
    fn rendezvous_is_stable_and_bounded() {
        let u = ups(5);
        let bal = balancer("hash:ip", &u);
        let other = balancer("hash:ip", &ups(5));
        let key = |s: &str| hash(s.as_bytes());
        // Same key, same choice, on another balancer (another node).
        for k in 0..50 {
            let k = key(&format!("client-{k}"));
            assert_eq!(
                bal.first(&u, Some(k), |_| true),
                other.first(&u, Some(k), |_| true)
            );
        }
        // Keys spread.
        let mut counts = [0; 5];
        for k in 0..5000 {
            counts[bal.first(&u, Some(key(&format!("c{k}"))), |_| true)] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        // One dominant key: no upstream above 1.25 × mean (+1).
        let hot = key("hot");
        let mut leases = Vec::new();
        for _ in 0..100 {
            let i = bal.first(&u, Some(hot), |_| true);
            leases.push(Lease::take(&u[i], 0).unwrap());
        }
        let max = u.iter().map(|x| x.load.active()).max().unwrap();
        assert!(max <= 26, "max {max} over the bound of 1.25 × 20");
        drop(leases);
        // Taking an upstream out moves only its keys.
        let moved = (0..1000)
            .filter(|k| {
                let k = key(&format!("m{k}"));
                let before = bal.first(&u, Some(k), |_| true);
                let after = bal.first(&u, Some(k), |i| i != 4);
                before != 4 && before != after
            })
            .count();
        assert_eq!(moved, 0);
    }

    #[test]
    fn cookie_and_header_keys() {
        let u = ups(3);
        let bal = balancer("hash:cookie=sid", &u);
        let ip = "127.0.0.1".parse().unwrap();
        let k1 = bal.key(ip, "/", [&b"a=1; sid=abc"[..]].into_iter());
        let k2 = bal.key(ip, "/x", [&b"sid=abc"[..]].into_iter());
        assert_eq!(k1, Some(hash(b"abc")));
        assert_eq!(k1, k2);
        assert_eq!(bal.key(ip, "/", [&b"other=abc"[..]].into_iter()), None);
        let bal = balancer("hash:header=x-user", &u);
        assert_eq!(bal.field(), Some("x-user"));
        assert!(bal.key(ip, "/", std::iter::empty()).is_none());
        let bal = balancer("hash:path", &u);
        assert_eq!(
            bal.key(ip, "/a?x", std::iter::empty()),
            bal.key(ip, "/a", std::iter::empty())
        );
    }

    #[test]
    fn caps_refuse_past_the_limit() {
        let u = ups(1);
        let a = Lease::take(&u[0], 2).unwrap();
        let b = Lease::take(&u[0], 2).unwrap().into_tunnel();
        assert!(Lease::take(&u[0], 2).is_none());
        assert_eq!((u[0].load.in_flight(), u[0].load.tunnels()), (1, 1));
        drop(a);
        assert!(Lease::take(&u[0], 2).is_some());
        drop(b);
        assert_eq!(u[0].load.active(), 0);
    }
}
