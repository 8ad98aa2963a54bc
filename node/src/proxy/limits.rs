//! Connection limits. Per host ([`HostCaps`], `host add
//! --max-conns-per-ip`): requests and tunnels per client, counted in the
//! request-policy phase. Of the accept loop ([`super::listener`]): at most
//! `--max-conns-per-ip` open connections per client (an IPv4 address, or
//! an IPv6 /64, since one host holds a whole /64), and at most
//! `--max-connections` in all. A connection that became a WebSocket
//! tunnel still counts, because its [`ClientSlot`] moves into the tunnel's
//! task: an open WebSocket is a connection, not a request.
//!
//! Over the per-client cap, a plain-text connection gets a canned `429`
//! to its first request head (within a second, or it is just closed) and
//! is closed (an upgrade is refused the same way); a TLS one is closed
//! before the handshake, which is the
//! expensive part an abuser would want the node to do. At the node-wide
//! cap the listener stops accepting (new connections wait in the kernel's
//! backlog) and existing connections are served on. Peers that are
//! `--trusted-proxy` are not capped per address: many clients share them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::host::ProxyHost;

/// Whose connections are counted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The node-wide settings; 0 = no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitConfig {
    pub max_conns_per_ip: u32,
    pub max_connections: usize,
}

#[derive(Default)]
pub struct ConnLimits {
    config: LimitConfig,
    per_client: Mutex<HashMap<ClientKey, u32>>,
    total: AtomicUsize,
    /// Set while the node-wide cap is reached, so it is logged once per
    /// episode.
    full: AtomicBool,
}

/// One counted connection; dropping it (with the connection, or with the
/// tunnel it became) gives its place back.
pub struct ClientSlot {
    limits: Arc<ConnLimits>,
    key: Option<ClientKey>,
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSlot")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.key {
            let mut map = self.limits.per_client.lock().expect("limits lock");
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

/// What the accept loop does with a new connection.
pub enum Admission {
    /// Serve it, holding this slot for its life (`None` when no limit is
    /// set: nothing is counted then).
    Serve(Option<Arc<ClientSlot>>),
    /// Over the per-client cap: refuse it.
    OverClientCap { open: u32 },
}

impl ConnLimits {
    pub fn new(config: LimitConfig) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            config,
            ..Default::default()
        })
    }

    pub fn config(&self) -> LimitConfig {
        self.config
    }

    fn active(&self) -> bool {
        self.config.max_conns_per_ip > 0 || self.config.max_connections > 0
    }

    /// Open connections counted (0 when no limit is set).
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether the node-wide cap is reached: the accept loop waits while
    /// it is. Logs the first time of each episode, and when it ends.
    pub fn at_capacity(&self) -> bool {
        let max = self.config.max_connections;
        let full = max > 0 && self.open() >= max;
        if full != self.full.swap(full, Ordering::Relaxed) {
            if full {
                tracing::warn!(max_connections = max, "the node holds --max-connections open connections: accepting no more until some close (existing ones are served)");
            } else {
                tracing::info!(
                    max_connections = max,
                    "below --max-connections again: accepting"
                );
            }
        }
        full
    }

    /// Counts a new connection from `peer`; `exempt` (a trusted proxy)
    /// skips the per-client cap.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, exempt: bool) -> Admission {
        if !self.active() {
            return Admission::Serve(None);
        }
        let cap = self.config.max_conns_per_ip;
        let key = (cap > 0 && !exempt).then(|| ClientKey::of(peer));
        if let Some(key) = key {
            let mut map = self.per_client.lock().expect("limits lock");
            let n = map.entry(key).or_insert(0);
            if *n >= cap {
                return Admission::OverClientCap { open: *n };
            }
            *n += 1;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Admission::Serve(Some(Arc::new(ClientSlot {
            limits: self.clone(),
            key,
        })))
    }
}

/// One host's `--max-conns-per-ip`: in-flight requests plus open tunnels
/// to that host per client. Unlike the node's cap, which counts
/// connections at accept, this one counts per request, after routing, by
/// the client address as resolved through `--trusted-proxy` (so clients
/// behind a trusted proxy are told apart): an h1 request, an h2 stream, a
/// WebSocket over h1 or h2 each hold a [`HostSlot`] until the response has
/// ended or the tunnel has closed.
pub struct HostCap {
    cap: AtomicU32,
    per_client: Mutex<HashMap<ClientKey, u32>>,
}

/// One counted request or tunnel on a host; dropping it (however the
/// request ends: answered, failed, client gone, tunnel closed or cut)
/// gives the place back.
pub struct HostSlot {
    host: Arc<HostCap>,
    key: ClientKey,
}

impl std::fmt::Debug for HostSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSlot").field("key", &self.key).finish()
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut map = self.host.per_client.lock().expect("host cap lock");
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl HostCap {
    pub fn cap(&self) -> u32 {
        self.cap.load(Ordering::Relaxed)
    }

    /// A place for one more request or tunnel of `client`, or `Err(cap)`
    /// when it holds the cap already.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<HostSlot, u32> {
        let key = ClientKey::of(client);
        let cap = self.cap();
        let mut map = self.per_client.lock().expect("host cap lock");
        let n = map.entry(key).or_insert(0);
        if *n >= cap {
            return Err(cap);
        }
        *n += 1;
        Ok(HostSlot {
            host: self.clone(),
            key,
        })
    }

    /// Requests and tunnels counted for `client` now.
    pub fn open(&self, client: IpAddr) -> u32 {
        let map = self.per_client.lock().expect("host cap lock");
        map.get(&ClientKey::of(client)).copied().unwrap_or(0)
    }
}

/// Every host's [`HostCap`] by host id, kept across route rebuilds so that
/// the requests and tunnels open when a host is updated still count (and
/// are released into the same counts); a changed cap applies to the next
/// request.
#[derive(Default)]
pub struct HostCaps(Mutex<HashMap<String, Arc<HostCap>>>);

impl HostCaps {
    /// The cap of `host`, or `None` when it sets none.
    pub fn for_host(&self, host: &ProxyHost) -> Option<Arc<HostCap>> {
        let mut map = self.0.lock().expect("host caps lock");
        if host.max_conns_per_ip == 0 {
            map.remove(&host.id);
            return None;
        }
        let cap = map.entry(host.id.clone()).or_insert_with(|| {
            Arc::new(HostCap {
                cap: AtomicU32::new(host.max_conns_per_ip),
                per_client: Mutex::default(),
            })
        });
        cap.cap.store(host.max_conns_per_ip, Ordering::Relaxed);
        Some(cap.clone())
    }

    /// A deleted host's counts (its open slots keep their own reference).
    pub fn forget(&self, host_id: &str) {
        self.0.lock().expect("host caps lock").remove(host_id);
    }
}

/// The whole answer to a connection over the per-client cap (written
/// after its first request head, then the connection closes).
pub fn over_cap_response(peer: IpAddr, cap: u32) -> Vec<u8> {
    let body = format!(
        "429 Too Many Requests: {peer} has {cap} connections open here already (the most one client may hold); close some and retry\n"
    );
    format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(a: Admission) -> Option<Arc<ClientSlot>> {
        match a {
            Admission::Serve(s) => s,
            Admission::OverClientCap { open } => panic!("refused with {open} open"),
        }
    }

    #[test]
    fn per_client_caps_count_v4_addresses_and_v6_slash_64s() {
        let l = ConnLimits::new(LimitConfig {
            max_conns_per_ip: 2,
            max_connections: 0,
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a1 = serve(l.admit(ip("10.0.0.1"), false));
        let a2 = serve(l.admit(ip("::ffff:10.0.0.1"), false));
        assert!(matches!(
            l.admit(ip("10.0.0.1"), false),
            Admission::OverClientCap { open: 2 }
        ));
        // Another address, and a trusted proxy, are not affected.
        let _b = serve(l.admit(ip("10.0.0.2"), false));
        let _p1 = serve(l.admit(ip("10.0.0.1"), true));
        // One /64 is one client.
        let _v1 = serve(l.admit(ip("2001:db8::1"), false));
        let _v2 = serve(l.admit(ip("2001:db8::ffff:2"), false));
        assert!(matches!(
            l.admit(ip("2001:db8::3"), false),
            Admission::OverClientCap { .. }
        ));
        let _v3 = serve(l.admit(ip("2001:db8:0:1::1"), false));
        // A closed connection (or ended tunnel) gives its place back.
        drop(a1);
        let _a3 = serve(l.admit(ip("10.0.0.1"), false));
        drop(a2);
        assert_eq!(l.open(), 6);
    }

    #[test]
    fn a_host_cap_counts_per_client_and_survives_an_update() {
        let caps = HostCaps::default();
        let mut host = ProxyHost {
            id: "h".into(),
            max_conns_per_ip: 2,
            ..Default::default()
        };
        let cap = caps.for_host(&host).expect("a cap");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = cap.admit(ip("10.0.0.1")).unwrap();
        let _b = cap.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(cap.admit(ip("10.0.0.1")).err(), Some(2));
        let _v = cap.admit(ip("2001:db8::1")).unwrap();
        let _w = cap.admit(ip("2001:db8::2")).unwrap();
        assert!(
            cap.admit(ip("2001:db8::3")).is_err(),
            "one /64 is one client"
        );
        assert!(cap.admit(ip("10.0.0.2")).is_ok(), "another client");
        // An update keeps the counts; a higher cap lets one more in.
        host.max_conns_per_ip = 3;
        let same = caps.for_host(&host).unwrap();
        assert!(Arc::ptr_eq(&cap, &same));
        let c = same.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(same.open(ip("10.0.0.1")), 3);
        drop((a, c));
        assert_eq!(
            same.open(ip("10.0.0.1")),
            1,
            "dropped slots give places back"
        );
        host.max_conns_per_ip = 0;
        assert!(caps.for_host(&host).is_none());
    }

    #[test]
    fn the_node_wide_cap_is_reached_and_left() {
        let l = ConnLimits::new(LimitConfig {
            max_conns_per_ip: 0,
            max_connections: 2,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = serve(l.admit(ip, false));
        assert!(!l.at_capacity());
        let _b = serve(l.admit(ip, false));
        assert!(l.at_capacity());
        drop(a);
        assert!(!l.at_capacity());
        let off = ConnLimits::new(LimitConfig::default());
        assert!(
            serve(off.admit(ip, false)).is_none(),
            "nothing is counted without limits"
        );
    }
}
