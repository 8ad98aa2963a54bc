//! Header rules on the way to and from an upstream: hop-by-hop removal and
//! the forwarded headers.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1),
/// plus `Expect` (the proxy already answered any 100-continue itself).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// True for a WebSocket opening handshake (RFC 6455 §4.1): `Upgrade:
/// websocket` and an `upgrade` token in `Connection`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers.get_all(UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    });
    upgrade && connection_upgrade_token(headers).is_some()
}

/// The `upgrade` token of `Connection` exactly as the client spelled it, so
/// a backend that compares case-sensitively sees what the client sent.
pub fn connection_upgrade_token(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|t| t.eq_ignore_ascii_case("upgrade"))
        .and_then(|t| HeaderValue::from_str(t).ok())
}

/// An address range in CIDR notation, for `--trusted-proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

const XFF: &str = "x-forwarded-for";
const XFP: &str = "x-forwarded-proto";
const XFH: &str = "x-forwarded-host";
const XFPORT: &str = "x-forwarded-port";
const XRI: &str = "x-real-ip";

/// Facts about the client connection that go into forwarded headers.
pub struct ClientFacts<'a> {
    pub peer: SocketAddr,
    /// Whether the peer is a trusted proxy whose forwarded headers we keep.
    pub trusted: bool,
    pub proto: &'static str,
    pub host: Option<&'a str>,
    pub local_port: u16,
}

/// Sets `X-Forwarded-For/-Proto/-Host/-Port` and `X-Real-IP`. Values that
/// came with the request are kept (and `X-Forwarded-For` appended to) only
/// when the peer is a trusted proxy; otherwise a client could forge them.
pub fn set_forwarded(headers: &mut HeaderMap, facts: &ClientFacts<'_>) {
    let peer_ip = facts.peer.ip().to_canonical().to_string();
    if !facts.trusted {
        for h in [XFF, XFP, XFH, XFPORT, XRI, "forwarded"] {
            headers.remove(h);
        }
    }
    let xff = match headers.get(XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer_ip}"),
        _ => peer_ip.clone(),
    };
    let real_ip = headers
        .get(XRI)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            // Behind trusted proxies the first address is the client's.
            facts
                .trusted
                .then(|| xff.split(',').next().map(|s| s.trim().to_string()))
                .flatten()
        })
        .unwrap_or(peer_ip);
    let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(headers, XFF, &xff);
    set(headers, XRI, &real_ip);
    if !headers.contains_key(XFP) {
        set(headers, XFP, facts.proto);
    }
    if !headers.contains_key(XFH) {
        if let Some(h) = facts.host {
            set(headers, XFH, h);
        }
    }
    if !headers.contains_key(XFPORT) {
        set(headers, XFPORT, &facts.local_port.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn detects_upgrades_and_keeps_token_spelling() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_websocket_upgrade(&h));
        assert_eq!(connection_upgrade_token(&h).unwrap(), "Upgrade");
        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn cidr_matching() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    fn facts(trusted: bool) -> ClientFacts<'static> {
        ClientFacts {
            peer: "192.0.2.7:5555".parse().unwrap(),
            trusted,
            proto: "http",
            host: Some("app.com:8080"),
            local_port: 8080,
        }
    }

    #[test]
    fn untrusted_peers_cannot_forge_forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &facts(false));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.com:8080");
        assert_eq!(h["x-forwarded-port"], "8080");
    }

    #[test]
    fn trusted_peers_are_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &facts(true));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 192.0.2.7");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
