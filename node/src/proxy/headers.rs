//! Header rules on the way to and from an upstream: hop-by-hop removal and
//! the forwarded headers.

use std::net::{IpAddr, SocketAddr};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, FORWARDED, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1).
/// `HeaderName`s rather than strings: a `&str` key is parsed (lower-cased,
/// matched against the standard names) on every lookup, and this list is
/// applied twice per proxied request.
static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Whether `name` is one of [`HOP_BY_HOP`]. Names are compared, not hashed:
/// a message rarely has more than a dozen headers, and usually none of
/// these.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names is cheaper than seven hashed removals, and a
    // typical keep-alive request or response has none of them.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Most messages have no Connection header (HTTP/1.1 keeps alive by
    // default); only when there is one are its tokens looked at. Each value
    // is cloned (a reference-count increment) so that the map can be
    // changed while its tokens are read, and names are removed by `&str`,
    // which hyper's `HeaderMap` parses on the stack without allocating.
    let mut i = 0;
    while let Some(value) = headers.get_all(CONNECTION).iter().nth(i).cloned() {
        i += 1;
        let Ok(tokens) = value.to_str() else {
            continue;
        };
        for token in tokens.split(',').map(str::trim) {
            // `close` and `keep-alive` are the usual tokens: `close` names no
            // header and the other is removed below anyway.
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            headers.remove(token);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
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

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
static XFPORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static XRI: HeaderName = HeaderName::from_static("x-real-ip");

/// Facts about the client connection that go into forwarded headers,
/// already in header form. They are the same for every request on a
/// connection, so they are built once when it is accepted: cloning a
/// `HeaderValue` is a reference-count increment, formatting an IP address
/// is not.
#[derive(Debug, Clone)]
pub struct ClientFacts {
    /// The peer's IP address (IPv4-mapped IPv6 shown as IPv4).
    pub peer_ip: HeaderValue,
    /// Whether the peer is a trusted proxy whose forwarded headers we keep.
    pub trusted: bool,
    /// `http` or `https`.
    pub proto: HeaderValue,
    /// The port the client connected to.
    pub local_port: HeaderValue,
    /// For an untrusted peer, the HTTP/1 lines of every forwarded header
    /// but `X-Forwarded-Host` (which depends on the request): the same for
    /// all of the connection's requests, so they are copied in one piece.
    pub h1_lines: bytes::Bytes,
}

impl ClientFacts {
    pub fn new(peer: SocketAddr, trusted: bool, tls: bool, local_port: u16) -> Self {
        let peer_ip = peer.ip().to_canonical().to_string();
        let scheme = if tls { "https" } else { "http" };
        let h1_lines = format!(
            "X-Forwarded-For: {peer_ip}\r\nX-Real-IP: {peer_ip}\r\nX-Forwarded-Proto: {scheme}\r\nX-Forwarded-Port: {local_port}\r\n"
        );
        ClientFacts {
            h1_lines: bytes::Bytes::from(h1_lines),
            peer_ip: HeaderValue::from_str(&peer_ip)
                .expect("an IP address is a valid header value"),
            trusted,
            proto: HeaderValue::from_static(scheme),
            local_port: HeaderValue::from(local_port),
        }
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host/-Port` and `X-Real-IP` (`host` is the
/// request's host). Values that came with the request are kept (and
/// `X-Forwarded-For` appended to) only when the peer is a trusted proxy;
/// otherwise a client could forge them.
pub fn set_forwarded(headers: &mut HeaderMap, facts: &ClientFacts, host: Option<&HeaderValue>) {
    // Room for the five at once, rather than growing the map step by step.
    headers.reserve(5);
    if !facts.trusted {
        // `insert` replaces every value a client may have sent, so only the
        // headers that are not set here need removing.
        headers.remove(FORWARDED);
        headers.insert(&XFF, facts.peer_ip.clone());
        headers.insert(&XRI, facts.peer_ip.clone());
        headers.insert(&XFP, facts.proto.clone());
        match host {
            Some(h) => headers.insert(&XFH, h.clone()),
            None => headers.remove(&XFH),
        };
        headers.insert(&XFPORT, facts.local_port.clone());
        return;
    }
    let xff = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let peer = facts.peer_ip.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prev}, {peer}")).ok()
        }
        _ => Some(facts.peer_ip.clone()),
    };
    let real_ip = match headers.get(&XRI) {
        Some(v) if v.to_str().is_ok() => Some(v.clone()),
        // Behind trusted proxies the first address is the client's.
        _ => xff
            .as_ref()
            .and_then(|x| x.to_str().ok())
            .and_then(|x| x.split(',').next())
            .and_then(|first| HeaderValue::from_str(first.trim()).ok()),
    };
    if let Some(v) = xff {
        headers.insert(&XFF, v);
    }
    headers.insert(&XRI, real_ip.unwrap_or_else(|| facts.peer_ip.clone()));
    if !headers.contains_key(&XFP) {
        headers.insert(&XFP, facts.proto.clone());
    }
    if !headers.contains_key(&XFH) {
        if let Some(h) = host {
            headers.insert(&XFH, h.clone());
        }
    }
    if !headers.contains_key(&XFPORT) {
        headers.insert(&XFPORT, facts.local_port.clone());
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

    fn facts(trusted: bool) -> ClientFacts {
        ClientFacts::new("192.0.2.7:5555".parse().unwrap(), trusted, false, 8080)
    }

    fn host() -> HeaderValue {
        HeaderValue::from_static("app.com:8080")
    }

    #[test]
    fn untrusted_peers_cannot_forge_forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &facts(false), Some(&host()));
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
        set_forwarded(&mut h, &facts(true), Some(&host()));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 192.0.2.7");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
