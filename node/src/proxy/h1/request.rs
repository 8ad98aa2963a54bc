//! An HTTP/1.x request head: parsed once (httparse, borrowing the read
//! buffer), checked against RFC 9112's framing rules, routed through the
//! pipeline's first two phases, and written as the upstream's request
//! line and fields (phase 3, the rewrite) into the connection's buffers.

use std::sync::Arc;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};

use super::answers::{field, push_u64, Refusal};
use super::{Client, MAX_HEADERS};
use crate::proxy::error::{self, ProxyError};
use crate::proxy::forwarded::{self, Field, Incoming};
use crate::proxy::observe::ReqFacts;
use crate::proxy::pipeline;
use crate::proxy::routes::Route;
use crate::proxy::upstream::Pool;
use crate::proxy::wire::Framing;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
    Connect,
    Other,
}

/// A parsed request, owning everything the exchange needs (the head's
/// bytes are consumed from the buffer before the exchange starts).
pub(super) struct Req {
    pub(super) minor: u8,
    pub(super) method: Method,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) expect_continue: bool,
    pub(super) websocket: bool,
    pub(super) route: Arc<Route>,
    pub(super) pool: Arc<Pool>,
    /// For the access log and traces, when telemetry is on.
    pub(super) facts: Option<ReqFacts>,
}

/// The classes of header field the proxy looks at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum H {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Expect,
    /// keep-alive, proxy-connection, te, trailer.
    HopByHop,
    Xff,
    Xri,
    Xfp,
    Xfh,
    Xfport,
    Forwarded,
    TraceParent,
    TraceState,
    Sts,
    Other,
}

pub(super) fn classify(name: &str) -> H {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => H::HopByHop,
        4 if is("host") => H::Host,
        6 if is("expect") => H::Expect,
        7 if is("upgrade") => H::Upgrade,
        7 if is("trailer") => H::HopByHop,
        9 if is("forwarded") => H::Forwarded,
        9 if is("x-real-ip") => H::Xri,
        10 if is("connection") => H::Connection,
        10 if is("keep-alive") => H::HopByHop,
        10 if is("tracestate") => H::TraceState,
        11 if is("traceparent") => H::TraceParent,
        14 if is("content-length") => H::ContentLength,
        15 if is("x-forwarded-for") => H::Xff,
        16 if is("proxy-connection") => H::HopByHop,
        16 if is("x-forwarded-host") => H::Xfh,
        16 if is("x-forwarded-port") => H::Xfport,
        17 if is("transfer-encoding") => H::TransferEncoding,
        17 if is("x-forwarded-proto") => H::Xfp,
        25 if is("strict-transport-security") => H::Sts,
        _ => H::Other,
    }
}

pub(super) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(|t| t.trim_ascii())
}

pub(super) fn has_token(v: &[u8], t: &str) -> bool {
    tokens(v).any(|x| x.eq_ignore_ascii_case(t.as_bytes()))
}

/// Content-Length: digits only, at most 18 of them.
pub(super) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The fields requests and responses share: framing and `Connection`.
#[derive(Default)]
pub(super) struct MessageFields<'a> {
    pub(super) length: Option<u64>,
    /// A Content-Length that is not a number, or two that disagree.
    pub(super) bad_length: bool,
    pub(super) te: Option<&'a [u8]>,
    pub(super) close: bool,
    pub(super) keep: bool,
    pub(super) upgrade: bool,
    /// Other `Connection` tokens: fields to drop.
    pub(super) named: Vec<&'a [u8]>,
}

impl<'a> MessageFields<'a> {
    pub(super) fn see(&mut self, kind: H, value: &'a [u8]) {
        match kind {
            H::ContentLength => match parse_length(value) {
                Some(v) if self.length.is_none_or(|l| l == v) => self.length = Some(v),
                _ => self.bad_length = true,
            },
            H::TransferEncoding => self.te = Some(value),
            H::Connection => {
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        self.upgrade = true;
                    } else if !t.is_empty() {
                        self.named.push(t);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The length of the head at the start of `b` once its empty line has
/// arrived (CRLF or bare LF line ends, as httparse takes them). Only the
/// end is looked for here: the head is parsed once, by `Client::parse`.
pub(super) fn head_end(b: &[u8]) -> Option<usize> {
    // Empty lines before a request line are skipped (RFC 9112 §2.2).
    let mut from = 0;
    while from < b.len() && (b[from] == b'\r' || b[from] == b'\n') {
        from += 1;
    }
    let mut i = from;
    while let Some(p) = b[i..].iter().position(|&c| c == b'\n') {
        let at = i + p;
        match (b.get(at + 1), b.get(at + 2)) {
            (Some(b'\n'), _) => return Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(at + 3),
            (Some(_), _) | (None, _) => {}
        }
        i = at + 1;
    }
    None
}

pub(super) fn strip_scheme(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
}

/// A request head parsed and checked against RFC 9112, borrowing the read
/// buffer: what the later phases need of it. Made by [`parse_head`], a
/// function of the head's bytes alone.
pub(super) struct Head<'b, 'h> {
    pub(super) method_s: &'h str,
    pub(super) method: Method,
    pub(super) minor: u8,
    /// Path and query as they go upstream (origin form).
    pub(super) path_q: &'h str,
    /// The request's host: the target's authority, else the one `Host`.
    pub(super) host: &'h [u8],
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) expect_continue: bool,
    /// `Upgrade: websocket` (its value) with `Connection: upgrade`.
    pub(super) websocket: Option<&'h [u8]>,
    pub(super) traceparent: Option<&'h [u8]>,
    pub(super) tracestate: Option<&'h [u8]>,
    /// Every field, with its class in `kinds` at the same index.
    pub(super) fields: &'b [httparse::Header<'h>],
    pub(super) kinds: [H; MAX_HEADERS],
    /// Tokens of `Connection` naming fields to drop.
    pub(super) named: Vec<&'h [u8]>,
}

impl Head<'_, '_> {
    pub(super) fn has_body(&self) -> bool {
        !matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    pub(super) fn host_str(&self) -> &str {
        std::str::from_utf8(self.host).expect("checked ASCII")
    }

    pub(super) fn path_only(&self) -> &str {
        self.path_q.split('?').next().unwrap_or("/")
    }
}

/// A 400 refusal that ends the connection.
fn bad(why: &'static str) -> Box<Refusal> {
    refused(StatusCode::BAD_REQUEST, why)
}

fn refused(status: StatusCode, why: &'static str) -> Box<Refusal> {
    Box::new(Refusal {
        status,
        message: error::page(status, &why),
        close: true,
        route: None,
        location: None,
        error: Some(ProxyError::BadRequest(why)),
        facts: None,
    })
}

/// Parses and checks one request head (`buf` is the head, up to its empty
/// line). Refusals close the connection: after an unreadable head nothing
/// says where the next request starts.
pub(super) fn parse_head<'b, 'h>(
    buf: &'h [u8],
    headers: &'b mut [httparse::Header<'h>; MAX_HEADERS],
) -> Result<Head<'b, 'h>, Box<Refusal>> {
    let mut p = httparse::Request::new(headers);
    match p.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields",
            ))
        }
        _ => return Err(bad("malformed request")),
    }
    let (Some(method_s), Some(target), Some(minor)) = (p.method, p.path, p.version) else {
        return Err(bad("malformed request"));
    };
    let method = match method_s {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "CONNECT" => Method::Connect,
        _ => Method::Other,
    };
    let fields: &'b [httparse::Header<'h>] = p.headers;
    let mut kinds = [H::Other; MAX_HEADERS];
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut m = MessageFields::default();
    let mut upgrade_value: Option<&[u8]> = None;
    let mut expect_continue = false;
    let (mut traceparent, mut tracestate) = (None, None);
    for (i, h) in fields.iter().enumerate() {
        let k = classify(h.name);
        kinds[i] = k;
        match k {
            H::Host => {
                hosts += 1;
                host = Some(h.value);
            }
            H::ContentLength | H::TransferEncoding | H::Connection => m.see(k, h.value),
            H::Upgrade if has_token(h.value, "websocket") => upgrade_value = Some(h.value),
            H::Expect => expect_continue = h.value.eq_ignore_ascii_case(b"100-continue"),
            H::TraceParent => traceparent = Some(h.value),
            H::TraceState => tracestate = Some(h.value),
            _ => {}
        }
    }
    let (authority, path_q) = split_target(target, method)?;
    let host: &[u8] = match authority {
        Some(a) if !a.is_empty() => a.as_bytes(),
        Some(_) => return Err(bad("invalid request target")),
        None => match (hosts, host) {
            (0, _) | (_, None) => return Err(bad("missing Host header")),
            (1, Some(h)) => h,
            _ => return Err(bad("more than one Host header")),
        },
    };
    if host.is_empty() || !host.iter().all(|b| b.is_ascii_graphic()) {
        return Err(bad("invalid Host header"));
    }
    let framing = request_framing(&m, minor).map_err(bad)?;
    let has_body = !matches!(framing, Framing::Empty | Framing::Length(0));
    Ok(Head {
        method_s,
        method,
        minor,
        path_q,
        host,
        framing,
        keep_alive: if minor == 0 {
            m.keep && !m.close
        } else {
            !m.close
        },
        expect_continue: expect_continue && minor == 1 && has_body,
        websocket: upgrade_value.filter(|_| m.upgrade),
        traceparent,
        tracestate,
        fields,
        kinds,
        named: m.named,
    })
}

/// The target: origin-form, absolute-form (whose authority wins over
/// Host, RFC 9112 §3.2.2), or `*`. Gives the authority, if any, and the
/// path and query.
fn split_target(target: &str, method: Method) -> Result<(Option<&str>, &str), Box<Refusal>> {
    if target.starts_with('/') || target == "*" {
        Ok((None, target))
    } else if let Some(rest) = strip_scheme(target) {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let path = &rest[end..];
        Ok((Some(&rest[..end]), if path.is_empty() { "/" } else { path }))
    } else if method == Method::Connect {
        Err(refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported by a reverse proxy",
        ))
    } else {
        Err(bad("invalid request target"))
    }
}

/// Framing (RFC 9112 §6.1-6.3): the smuggling cases are refused.
fn request_framing(m: &MessageFields<'_>, minor: u8) -> Result<Framing, &'static str> {
    Ok(match (m.te, m.length) {
        (Some(_), Some(_)) | (Some(_), None) if m.bad_length || m.length.is_some() => {
            return Err("both Transfer-Encoding and Content-Length")
        }
        (Some(_), _) if minor == 0 => return Err("Transfer-Encoding in an HTTP/1.0 request"),
        (Some(t), _) => match tokens(t).last() {
            Some(last) if last.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => return Err("unsupported Transfer-Encoding"),
        },
        (None, _) if m.bad_length => return Err("invalid Content-Length"),
        (None, Some(0)) => Framing::Length(0),
        (None, None) => Framing::Empty,
        (None, Some(l)) => Framing::Length(l),
    })
}

/// The access-log and trace facts of a request, in the strings of the
/// last request's (`spare`) rather than new ones.
fn req_facts(spare: &mut Option<ReqFacts>, head: &Head<'_, '_>) -> ReqFacts {
    let mut f = spare.take().unwrap_or_default();
    for (s, v) in [
        (&mut f.method, head.method_s),
        (&mut f.path, head.path_only()),
        (&mut f.authority, head.host_str()),
    ] {
        s.clear();
        s.push_str(v);
    }
    f.proto = if head.minor == 0 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    f.traceparent = head
        .traceparent
        .and_then(|v| http::HeaderValue::from_bytes(v).ok());
    f.tracestate = head
        .tracestate
        .and_then(|v| http::HeaderValue::from_bytes(v).ok());
    f
}

/// Phase 3 for HTTP/1: the upstream request line into `line` and its
/// fields, less `Host` (which depends on the upstream), into `out`:
/// hop-by-hop fields and those `Connection` names dropped, the forwarded
/// headers by their one rule, trace context left to the client span when
/// tracing is on, the framing re-stated.
fn write_upstream_head(
    line: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head: &Head<'_, '_>,
    route: &Route,
    client: &forwarded::ClientFacts,
    tracing_on: bool,
    websocket: bool,
) {
    line.clear();
    line.extend_from_slice(head.method_s.as_bytes());
    line.push(b' ');
    line.extend_from_slice(head.path_q.as_bytes());
    line.extend_from_slice(b" HTTP/1.1\r\n");
    let fwd = route.host.forwarded_headers;
    let trusted = client.trusted;
    let mut arrived = forwarded::Arrived::default();
    out.clear();
    for (hd, kind) in head.fields.iter().zip(head.kinds) {
        let keep = match kind {
            H::Host
            | H::ContentLength
            | H::TransferEncoding
            | H::Connection
            | H::Upgrade
            | H::Expect
            | H::HopByHop => false,
            H::TraceParent | H::TraceState => !tracing_on,
            H::Xff if fwd => arrived.see(Incoming::Forwarded(Field::For), hd.value, trusted),
            H::Xri if fwd => arrived.see(Incoming::Forwarded(Field::RealIp), hd.value, trusted),
            H::Xfp if fwd => arrived.see(Incoming::Forwarded(Field::Proto), hd.value, trusted),
            H::Xfh if fwd => arrived.see(Incoming::Forwarded(Field::Host), hd.value, trusted),
            H::Xfport if fwd => arrived.see(Incoming::Forwarded(Field::Port), hd.value, trusted),
            H::Forwarded if fwd => arrived.see(Incoming::Standard, hd.value, trusted),
            _ => !head
                .named
                .iter()
                .any(|t| t.eq_ignore_ascii_case(hd.name.as_bytes())),
        };
        if keep {
            field(out, hd.name.as_bytes(), hd.value);
        }
    }
    if fwd {
        forwarded::write_h1(out, client, arrived, head.host);
    }
    if websocket {
        field(out, b"Upgrade", head.websocket.unwrap_or(b"websocket"));
        field(out, b"Connection", b"Upgrade");
    }
    match head.framing {
        Framing::Length(l) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, l);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => field(out, b"Transfer-Encoding", b"chunked"),
        Framing::Empty | Framing::Close => {}
    }
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Parses the head in the buffer (`head_len` bytes), runs the
    /// pipeline's route and request-policy phases on it, and writes its
    /// upstream request line and fields into `line`/`fields`.
    pub(super) fn parse(&mut self, head_len: usize) -> Result<Req, Box<Refusal>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse_head(&self.buf.bytes()[..head_len], &mut headers)?;
        let telemetry = self.proxy.telemetry.get();
        let facts = telemetry.map(|_| req_facts(&mut self.spare_facts, &head));
        let tracing_on = telemetry.is_some_and(|t| t.tracing.is_some());
        let has_body = head.has_body();
        let host_str = head.host_str();

        // Phases 1 and 2: route, request policy.
        let route = match pipeline::route(&self.proxy.routes.load(), host_str) {
            Ok(r) => r,
            Err(err) => {
                tracing::debug!(host = %host_str, client = %self.info.peer, "{err}");
                let a = pipeline::Answer::error(&err);
                return Err(Box::new(Refusal::answer(
                    a,
                    has_body,
                    None,
                    Some(err),
                    facts,
                )));
            }
        };
        let https_port = self.proxy.config.https_port;
        if let Some(a) =
            pipeline::request_policy(&route, &self.info, https_port, host_str, head.path_q)
        {
            return Err(Box::new(Refusal::answer(
                a,
                has_body,
                Some(route),
                None,
                facts,
            )));
        }
        let websocket = route.host.websocket
            && head.method == Method::Get
            && head.minor == 1
            && head.websocket.is_some();
        let pool = route.pool_for(head.path_only()).clone();

        // Phase 3: the upstream head.
        self.host.clear();
        self.host.extend_from_slice(head.host);
        write_upstream_head(
            &mut self.line,
            &mut self.fields,
            &head,
            &route,
            &self.info.facts,
            tracing_on,
            websocket,
        );
        Ok(Req {
            minor: head.minor,
            method: head.method,
            framing: head.framing,
            keep_alive: head.keep_alive,
            expect_continue: head.expect_continue,
            websocket,
            route,
            pool,
            facts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse_head` makes of one head: `Ok((host, path, framing,
    /// keep-alive))` or `Err(status, reason)`.
    type Fine = (String, String, Framing, bool);

    fn parsed(raw: &str) -> Result<Fine, (u16, String)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse_head(raw.as_bytes(), &mut headers) {
            Ok(h) => Ok((
                h.host_str().to_string(),
                h.path_q.to_string(),
                h.framing,
                h.keep_alive,
            )),
            Err(r) => Err((r.status.as_u16(), r.message)),
        }
    }

    /// The request-head rules, one case each.
    #[test]
    fn request_head_rules() {
        use Framing::*;
        let ok = |host: &str, path: &str, framing, keep| {
            Ok((host.to_string(), path.to_string(), framing, keep))
        };
        let cases: &[(&str, &str, Result<Fine, &str>)] = &[
            ("origin form", "GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n", ok("x", "/a?b", Empty, true)),
            ("absolute form wins over Host", "GET http://y:8/p HTTP/1.1\r\nHost: x\r\n\r\n", ok("y:8", "/p", Empty, true)),
            ("absolute form without path", "GET https://y HTTP/1.1\r\nHost: y\r\n\r\n", ok("y", "/", Empty, true)),
            ("HTTP/1.0 closes by default", "GET / HTTP/1.0\r\nHost: x\r\n\r\n", ok("x", "/", Empty, false)),
            ("HTTP/1.0 keep-alive", "GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", ok("x", "/", Empty, true)),
            ("Connection: close", "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ok("x", "/", Empty, false)),
            ("length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", ok("x", "/", Length(5), true)),
            ("length 0", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", ok("x", "/", Length(0), true)),
            ("equal lengths", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", ok("x", "/", Length(5), true)),
            ("chunked", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", ok("x", "/", Chunked, true)),
            ("no Host", "GET / HTTP/1.1\r\n\r\n", Err("missing Host header")),
            ("two Hosts", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", Err("more than one Host header")),
            ("empty authority", "GET http:///p HTTP/1.1\r\nHost: x\r\n\r\n", Err("invalid request target")),
            ("odd target", "GET p HTTP/1.1\r\nHost: x\r\n\r\n", Err("invalid request target")),
            ("CONNECT", "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", Err("CONNECT is not supported")),
            ("TE and CL", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", Err("both Transfer-Encoding and Content-Length")),
            ("TE in 1.0", "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", Err("Transfer-Encoding in an HTTP/1.0")),
            ("TE not ending chunked", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", Err("unsupported Transfer-Encoding")),
            ("bad length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", Err("invalid Content-Length")),
            ("lengths disagree", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", Err("invalid Content-Length")),
            ("not a field line", "GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", Err("malformed request")),
        ];
        for (what, raw, want) in cases {
            match (parsed(raw), want) {
                (Ok(got), Ok(w)) => assert_eq!(&got, w, "{what}"),
                (Err((status, msg)), Err(w)) => {
                    assert!(
                        msg.contains(w) && (status == 400 || status == 405),
                        "{what}: {status} {msg:?}, want {w:?}"
                    )
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(parsed(&raw).unwrap_err().0, 431);
    }

    #[test]
    fn header_classes() {
        assert_eq!(classify("Host"), H::Host);
        assert_eq!(classify("content-LENGTH"), H::ContentLength);
        assert_eq!(classify("Transfer-Encoding"), H::TransferEncoding);
        assert_eq!(classify("X-Forwarded-For"), H::Xff);
        assert_eq!(classify("x-forwarded-proto"), H::Xfp);
        assert_eq!(classify("TE"), H::HopByHop);
        assert_eq!(classify("x-custom"), H::Other);
    }

    #[test]
    fn lengths() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"12345"), Some(12345));
        assert_eq!(parse_length(b"+5"), None);
        assert_eq!(parse_length(b"1 2"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"9999999999999999999"), None);
    }

    #[test]
    fn head_ends_are_found() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(
            head_end(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(31)
        );
        let mut n = 0;
        push_u64(&mut Vec::new(), 0);
        let mut v = Vec::new();
        push_u64(&mut v, 1_234_567);
        n += v.len();
        assert_eq!((v, n), (b"1234567".to_vec(), 7));
    }
}
