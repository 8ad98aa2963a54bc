//! Header rules on the way to and from an upstream, for both front ends:
//! hop-by-hop removal and the forwarded headers (one rule,
//! [`forwarded_fields`], with a writer for HTTP/1 bytes, [`write_h1`], and
//! one for a `HeaderMap`, [`set_forwarded`]).

use std::net::{IpAddr, SocketAddr};

pub use crate::cidr::Cidr;
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

/// The client's address for access rules and limits: the peer's, unless
/// the peer is a trusted proxy; then `X-Forwarded-For` is read from the
/// right (the hop nearest to us) and the first address that is not itself
/// a trusted proxy is the client. Everything left of it may have been
/// written by the client and is never believed, so a client cannot pass
/// itself off as another address, even through a trusted proxy. An
/// unreadable entry stops the walk at the last address known good.
/// `xff` gives the fields' values in the order received.
pub fn client_ip<'a>(
    peer: IpAddr,
    trusted: &[Cidr],
    xff: impl DoubleEndedIterator<Item = &'a [u8]>,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for field in xff.rev() {
        for entry in field.rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_xff_entry(entry) else {
                return client;
            };
            client = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`1.2.3.4:5678`, `[::1]:80`), as some proxies write them.
fn parse_xff_entry(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'))?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
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
    /// They are what [`forwarded_fields`] gives for such a peer (a unit
    /// test holds them to it).
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

/// A forwarded header the proxy sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    For,
    RealIp,
    Proto,
    Port,
    Host,
}

impl Field {
    pub fn name(self) -> &'static HeaderName {
        match self {
            Field::For => &XFF,
            Field::RealIp => &XRI,
            Field::Proto => &XFP,
            Field::Port => &XFPORT,
            Field::Host => &XFH,
        }
    }

    /// The name as written on an HTTP/1 connection.
    pub fn h1(self) -> &'static [u8] {
        match self {
            Field::For => b"X-Forwarded-For",
            Field::RealIp => b"X-Real-IP",
            Field::Proto => b"X-Forwarded-Proto",
            Field::Port => b"X-Forwarded-Port",
            Field::Host => b"X-Forwarded-Host",
        }
    }
}

/// A forwarded field as a request may carry it: one the proxy sets, or
/// the standard `Forwarded` (RFC 7239), which it passes on from trusted
/// peers only and never sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    Forwarded(Field),
    Standard,
}

/// A value for a [`Field`]: one of the connection's [`ClientFacts`] (a
/// reference-count increment to put in a `HeaderMap`) or bytes of the
/// request.
#[derive(Clone, Copy)]
pub enum Value<'a> {
    Fact(&'a HeaderValue),
    Bytes(&'a [u8]),
}

impl Value<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Value::Fact(v) => v.as_bytes(),
            Value::Bytes(b) => b,
        }
    }
}

/// The forwarded fields a request arrived with, as far as the rules need
/// them. Each front end fills it while it reads the request's fields (h1
/// from the parsed head, h2 from the `HeaderMap`), so both apply the same
/// rules to the same facts.
#[derive(Default)]
pub struct Arrived<'a> {
    /// Every `X-Forwarded-For` field's list, joined with `, ` in the order
    /// received: two fields are one list (RFC 9110 §5.3). Empty (and not
    /// allocated) when none came.
    xff: Vec<u8>,
    xri: Option<&'a [u8]>,
    pub proto: bool,
    pub host: bool,
    pub port: bool,
}

impl<'a> Arrived<'a> {
    /// One forwarded field of the request, as a front end reads them one
    /// by one (h1): noted, and whether it goes upstream as it came. Only a
    /// trusted peer's are kept (its `X-Forwarded-For` and `X-Real-IP`
    /// are rewritten rather than kept); a client's are dropped and
    /// replaced.
    pub fn see(&mut self, field: Incoming, value: &'a [u8], trusted: bool) -> bool {
        match field {
            Incoming::Forwarded(Field::For) => {
                if trusted {
                    self.xff(value);
                }
                return false;
            }
            Incoming::Forwarded(Field::RealIp) => {
                if trusted {
                    self.xri(value);
                }
                return false;
            }
            Incoming::Forwarded(Field::Proto) => self.proto = true,
            Incoming::Forwarded(Field::Host) => self.host = true,
            Incoming::Forwarded(Field::Port) => self.port = true,
            Incoming::Standard => {}
        }
        trusted
    }

    /// One `X-Forwarded-For` field.
    pub fn xff(&mut self, value: &[u8]) {
        let v = value.trim_ascii();
        if v.is_empty() {
            return;
        }
        if !self.xff.is_empty() {
            self.xff.extend_from_slice(b", ");
        }
        self.xff.extend_from_slice(v);
    }

    /// One `X-Real-IP` field; the first readable one counts.
    pub fn xri(&mut self, value: &'a [u8]) {
        if self.xri.is_none() && std::str::from_utf8(value).is_ok() {
            self.xri = Some(value);
        }
    }

    /// What a `HeaderMap` holds (the h2 front end). `xri` is the map's
    /// `X-Real-IP`, cloned by the caller so the map stays free to change.
    pub fn from_map(headers: &HeaderMap, xri: Option<&'a HeaderValue>) -> Arrived<'a> {
        let mut a = Arrived::default();
        for v in headers.get_all(&XFF) {
            a.xff(v.as_bytes());
        }
        if let Some(v) = xri {
            a.xri(v.as_bytes());
        }
        a.proto = headers.contains_key(&XFP);
        a.host = headers.contains_key(&XFH);
        a.port = headers.contains_key(&XFPORT);
        a
    }
}

/// The forwarded-header rule, for both front ends: gives each field the
/// upstream gets, in order. `host` is the request's host. Values that came
/// with the request are kept (and `X-Forwarded-For` appended to) only when
/// the peer is a trusted proxy; otherwise a client could forge them, and
/// the front end drops every one it received (`Forwarded` included).
pub fn forwarded_fields(
    facts: &ClientFacts,
    arrived: Arrived<'_>,
    host: Value<'_>,
    mut put: impl FnMut(Field, Value<'_>),
) {
    let peer = Value::Fact(&facts.peer_ip);
    if !facts.trusted {
        put(Field::For, peer);
        put(Field::RealIp, peer);
        put(Field::Proto, Value::Fact(&facts.proto));
        put(Field::Port, Value::Fact(&facts.local_port));
        put(Field::Host, host);
        return;
    }
    let mut xff = arrived.xff;
    if xff.is_empty() {
        put(Field::For, peer);
        put(Field::RealIp, arrived.xri.map_or(peer, Value::Bytes));
    } else {
        // Behind trusted proxies the first address is the client's.
        let first_len = xff.iter().position(|&b| b == b',').unwrap_or(xff.len());
        xff.extend_from_slice(b", ");
        xff.extend_from_slice(facts.peer_ip.as_bytes());
        put(Field::For, Value::Bytes(&xff));
        let first = xff[..first_len].trim_ascii();
        put(
            Field::RealIp,
            arrived.xri.map_or(Value::Bytes(first), Value::Bytes),
        );
    }
    if !arrived.proto {
        put(Field::Proto, Value::Fact(&facts.proto));
    }
    if !arrived.port {
        put(Field::Port, Value::Fact(&facts.local_port));
    }
    if !arrived.host {
        put(Field::Host, host);
    }
}

/// Appends the forwarded fields as HTTP/1 lines (the h1 front end). For an
/// untrusted peer the connection's pre-formatted lines are copied whole.
pub fn write_h1(out: &mut Vec<u8>, facts: &ClientFacts, arrived: Arrived<'_>, host: &[u8]) {
    if !facts.trusted {
        // What `forwarded_fields` gives, in its order, formatted once per
        // connection.
        out.extend_from_slice(&facts.h1_lines);
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
        return;
    }
    forwarded_fields(facts, arrived, Value::Bytes(host), |f, v| {
        out.extend_from_slice(f.h1());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Sets the forwarded headers in a `HeaderMap` (the h2 front end); the
/// same rule as [`write_h1`].
pub fn set_forwarded(headers: &mut HeaderMap, facts: &ClientFacts, host: &HeaderValue) {
    // Room for the five at once, rather than growing the map step by step.
    headers.reserve(5);
    if !facts.trusted {
        headers.remove(FORWARDED);
    }
    let xri = if facts.trusted {
        headers.get(&XRI).cloned()
    } else {
        None
    };
    let arrived = if facts.trusted {
        Arrived::from_map(headers, xri.as_ref())
    } else {
        Arrived::default()
    };
    // `insert` replaces every field of the name a client may have sent.
    forwarded_fields(facts, arrived, Value::Fact(host), |f, v| {
        let value = match v {
            Value::Fact(v) => Some(v.clone()),
            Value::Bytes(b) => HeaderValue::from_bytes(b).ok(),
        };
        if let Some(value) = value {
            headers.insert(f.name(), value);
        }
    });
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
        set_forwarded(&mut h, &facts(false), &host());
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
        set_forwarded(&mut h, &facts(true), &host());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 192.0.2.7");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    /// The h1 writer and the rule agree, for both kinds of peer.
    #[test]
    fn h1_lines_are_the_rule() {
        for trusted in [false, true] {
            let f = facts(trusted);
            let mut fast = Vec::new();
            write_h1(&mut fast, &f, Arrived::default(), b"app.com");
            let mut slow = Vec::new();
            forwarded_fields(&f, Arrived::default(), Value::Bytes(b"app.com"), |k, v| {
                slow.extend_from_slice(k.h1());
                slow.extend_from_slice(b": ");
                slow.extend_from_slice(v.bytes());
                slow.extend_from_slice(b"\r\n");
            });
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow)
            );
        }
    }

    /// Two `X-Forwarded-For` fields are one list, in a map as on the wire.
    #[test]
    fn two_xff_fields_are_one_list() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", " 5.6.7.8 "),
        ]);
        set_forwarded(&mut h, &facts(true), &host());
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.2.3.4, 5.6.7.8, 192.0.2.7"]);
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        let mut a = Arrived::default();
        a.xff(b"1.2.3.4");
        a.xff(b"");
        a.xff(b"5.6.7.8");
        let mut out = Vec::new();
        write_h1(&mut out, &facts(true), a, b"app.com");
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with(
                "X-Forwarded-For: 1.2.3.4, 5.6.7.8, 192.0.2.7\r\nX-Real-IP: 1.2.3.4\r\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn client_address_through_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // (peer, X-Forwarded-For fields, client)
        let cases: &[(&str, &[&str], &str)] = &[
            ("203.0.113.9", &["1.2.3.4"], "203.0.113.9"),
            ("10.0.0.1", &[], "10.0.0.1"),
            ("10.0.0.1", &["1.2.3.4"], "1.2.3.4"),
            ("10.0.0.1", &["6.6.6.6, 1.2.3.4"], "1.2.3.4"),
            ("10.0.0.1", &["6.6.6.6", "1.2.3.4, 10.9.9.9"], "1.2.3.4"),
            ("10.0.0.1", &["10.2.2.2, 10.3.3.3"], "10.2.2.2"),
            ("10.0.0.1", &["1.2.3.4, junk"], "10.0.0.1"),
            ("10.0.0.1", &["[2001:db8::1]:443"], "2001:db8::1"),
            ("10.0.0.1", &["1.2.3.4:5678"], "1.2.3.4"),
            ("::ffff:10.0.0.1", &["1.2.3.4"], "1.2.3.4"),
            ("::1", &["::ffff:1.2.3.4"], "1.2.3.4"),
        ];
        for (peer, xff, want) in cases {
            let got = client_ip(ip(peer), &trusted, xff.iter().map(|s| s.as_bytes()));
            assert_eq!(got, ip(want), "{peer} {xff:?}");
        }
    }

    #[test]
    fn cidr_ranges_and_networks() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.0.0.0/8");
        assert_eq!(c.range(), (0x0a00_0000, 0x0aff_ffff));
        let all: Cidr = "::/0".parse().unwrap();
        assert_eq!(all.range(), (0, u128::MAX));
        let one: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(one.range().0, one.range().1);
    }
}
