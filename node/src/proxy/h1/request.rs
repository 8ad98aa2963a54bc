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
use crate::proxy::forwarded;
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

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Parses the head in the buffer (`head_len` bytes), routes it, and
    /// writes its upstream request line and fields into `line`/`fields`.
    pub(super) fn parse(&mut self, head_len: usize) -> Result<Req, Box<Refusal>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut p = httparse::Request::new(&mut headers);
        let bad = |why: &'static str, close: bool| {
            Box::new(Refusal {
                status: StatusCode::BAD_REQUEST,
                message: error::page(StatusCode::BAD_REQUEST, &why),
                close,
                route: None,
                location: None,
                error: Some(ProxyError::BadRequest(why)),
                facts: None,
            })
        };
        let head = &self.buf.bytes()[..head_len];
        match p.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Err(httparse::Error::TooManyHeaders) => {
                let mut r = bad("too many header fields", true);
                r.status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                r.message = error::page(r.status, &"too many header fields");
                return Err(r);
            }
            _ => return Err(bad("malformed request", true)),
        }
        let (Some(method_s), Some(target), Some(minor)) = (p.method, p.path, p.version) else {
            return Err(bad("malformed request", true));
        };
        let method = match method_s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "CONNECT" => Method::Connect,
            _ => Method::Other,
        };
        let n = p.headers.len();
        let mut kinds = [H::Other; MAX_HEADERS];
        let mut host: Option<&[u8]> = None;
        let mut hosts = 0;
        let mut m = MessageFields::default();
        let mut upgrade_ws = false;
        let mut upgrade_value: Option<&[u8]> = None;
        let mut expect_continue = false;
        let mut traceparent = None;
        let mut tracestate = None;
        for (i, h) in p.headers.iter().enumerate() {
            let k = classify(h.name);
            kinds[i] = k;
            match k {
                H::Host => {
                    hosts += 1;
                    host = Some(h.value);
                }
                H::ContentLength | H::TransferEncoding | H::Connection => m.see(k, h.value),
                H::Upgrade if has_token(h.value, "websocket") => {
                    upgrade_ws = true;
                    upgrade_value = Some(h.value);
                }
                H::Expect => expect_continue = h.value.eq_ignore_ascii_case(b"100-continue"),
                H::TraceParent => traceparent = Some(h.value),
                H::TraceState => tracestate = Some(h.value),
                _ => {}
            }
        }

        // The target: origin-form, absolute-form (whose authority wins over
        // Host, RFC 9112 §3.2.2), or `*`.
        let (authority, path_q): (Option<&str>, &str) = if target.starts_with('/') || target == "*"
        {
            (None, target)
        } else if let Some(rest) = strip_scheme(target) {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let path = &rest[end..];
            (Some(&rest[..end]), if path.is_empty() { "/" } else { path })
        } else if method == Method::Connect {
            let mut r = bad("CONNECT is not supported by a reverse proxy", true);
            r.status = StatusCode::METHOD_NOT_ALLOWED;
            r.message = error::page(r.status, &"CONNECT is not supported by a reverse proxy");
            return Err(r);
        } else {
            return Err(bad("invalid request target", true));
        };
        let host: &[u8] = match authority {
            Some(a) if !a.is_empty() => a.as_bytes(),
            Some(_) => return Err(bad("invalid request target", true)),
            None => match (hosts, host) {
                (0, _) | (_, None) => return Err(bad("missing Host header", true)),
                (1, Some(h)) => h,
                _ => return Err(bad("more than one Host header", true)),
            },
        };
        if host.is_empty() || !host.iter().all(|b| b.is_ascii_graphic()) {
            return Err(bad("invalid Host header", true));
        }
        let host_str = std::str::from_utf8(host).expect("checked ASCII");

        // Framing (RFC 9112 §6.1-6.3): the smuggling cases are refused.
        let framing = match (m.te, m.length) {
            (Some(_), Some(_)) | (Some(_), None) if m.bad_length || m.length.is_some() => {
                return Err(bad("both Transfer-Encoding and Content-Length", true))
            }
            (Some(_), _) if minor == 0 => {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request", true))
            }
            (Some(t), _) => match tokens(t).last() {
                Some(last) if last.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
                _ => return Err(bad("unsupported Transfer-Encoding", true)),
            },
            (None, _) if m.bad_length => return Err(bad("invalid Content-Length", true)),
            (None, Some(0)) | (None, None) => {
                if m.length == Some(0) {
                    Framing::Length(0)
                } else {
                    Framing::Empty
                }
            }
            (None, Some(l)) => Framing::Length(l),
        };
        let has_body = !matches!(framing, Framing::Empty | Framing::Length(0));
        let keep_alive = if minor == 0 {
            m.keep && !m.close
        } else {
            !m.close
        };

        let telemetry = self.proxy.telemetry.get();
        let path_only = path_q.split('?').next().unwrap_or("/");
        let facts = telemetry.map(|_| {
            let mut f = self.spare_facts.take().unwrap_or_default();
            for (s, v) in [
                (&mut f.method, method_s),
                (&mut f.path, path_only),
                (&mut f.authority, host_str),
            ] {
                s.clear();
                s.push_str(v);
            }
            f.proto = if minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" };
            f.traceparent = traceparent.and_then(|v| http::HeaderValue::from_bytes(v).ok());
            f.tracestate = tracestate.and_then(|v| http::HeaderValue::from_bytes(v).ok());
            f
        });
        let tracing_on = telemetry.is_some_and(|t| t.tracing.is_some());

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
        if let Some(a) = pipeline::request_policy(&route, &self.info, https_port, host_str, path_q)
        {
            return Err(Box::new(Refusal::answer(
                a,
                has_body,
                Some(route),
                None,
                facts,
            )));
        }
        let h = &route.host;
        let websocket =
            h.websocket && method == Method::Get && minor == 1 && upgrade_ws && m.upgrade;
        let pool = route.pool_for(path_only).clone();

        // The upstream head, less Host (which depends on the upstream).
        self.line.clear();
        self.line.extend_from_slice(method_s.as_bytes());
        self.line.push(b' ');
        self.line.extend_from_slice(path_q.as_bytes());
        self.line.extend_from_slice(b" HTTP/1.1\r\n");
        self.host.clear();
        self.host.extend_from_slice(host);
        let fwd = h.forwarded_headers;
        let trusted = self.info.facts.trusted;
        let mut arrived = forwarded::Arrived::default();
        let f = &mut self.fields;
        f.clear();
        for (i, hd) in p.headers.iter().enumerate().take(n) {
            let keep = match kinds[i] {
                H::Host
                | H::ContentLength
                | H::TransferEncoding
                | H::Connection
                | H::Upgrade
                | H::Expect
                | H::HopByHop => false,
                H::TraceParent | H::TraceState => !tracing_on,
                H::Xff if fwd => {
                    if trusted {
                        arrived.xff(hd.value);
                    }
                    false
                }
                H::Xri if fwd => {
                    if trusted {
                        arrived.xri(hd.value);
                    }
                    false
                }
                H::Xfp if fwd => {
                    arrived.proto = true;
                    trusted
                }
                H::Xfh if fwd => {
                    arrived.host = true;
                    trusted
                }
                H::Xfport if fwd => {
                    arrived.port = true;
                    trusted
                }
                H::Forwarded if fwd => trusted,
                _ => !m
                    .named
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(hd.name.as_bytes())),
            };
            if keep {
                field(f, hd.name.as_bytes(), hd.value);
            }
        }
        if fwd {
            forwarded::write_h1(f, &self.info.facts, arrived, host);
        }
        if websocket {
            field(f, b"Upgrade", upgrade_value.unwrap_or(b"websocket"));
            field(f, b"Connection", b"Upgrade");
        }
        match framing {
            Framing::Length(l) => {
                f.extend_from_slice(b"Content-Length: ");
                push_u64(f, l);
                f.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => field(f, b"Transfer-Encoding", b"chunked"),
            Framing::Empty | Framing::Close => {}
        }
        Ok(Req {
            minor,
            method,
            framing,
            keep_alive,
            expect_continue: expect_continue && minor == 1 && has_body,
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
