//! An HTTP/1.x request head: parsed once (httparse, borrowing the read
//! buffer), checked against RFC 9112's framing rules, routed through the
//! pipeline's first two phases, and written as the upstream's request
//! line and fields (phase 3, the rewrite) into the connection's buffers.

use std::borrow::Cow;
use std::sync::Arc;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};

use super::answers::{field, push_u64, Refusal};
use super::{Client, MAX_HEADERS};
use crate::access::compiled::Judged;
use crate::proxy::error::{self, ProxyError};
use crate::proxy::forwarded::{self, Field, Incoming};
use crate::proxy::limits::HostSlot;
use crate::proxy::observe::ReqFacts;
use crate::proxy::pipeline;
use crate::proxy::routes::Route;
use crate::proxy::upstream::Pool;
use crate::proxy::wire;
use crate::proxy::wire::fields::{has_token, tokens};
use crate::proxy::wire::Framing;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
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
    /// The key a hash policy chooses the upstream by (phase 4), and the
    /// sticky cookie for the response (phase 5).
    pub(super) affinity: pipeline::Affinity,
    /// For the access log and traces, when telemetry is on.
    pub(super) facts: Option<ReqFacts>,
    /// Its place under the host's per-client cap (phase 2), held until the
    /// exchange ends, or by the tunnel it opens.
    pub(super) held: Option<HostSlot>,
}

/// Why [`Client::parse`] gave no request to forward.
pub(super) enum Stop {
    /// The proxy answers it itself.
    Refuse(Box<Refusal>),
    /// Its credentials are verified first; then it is parsed again with
    /// the verdict (`Client::run`).
    Verify(crate::proxy::access::Verify),
}

impl From<Box<Refusal>> for Stop {
    fn from(r: Box<Refusal>) -> Stop {
        Stop::Refuse(r)
    }
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

/// What requests and responses say in `Connection` (framing is decided
/// by `wire::fields::Framer`).
#[derive(Default)]
pub(super) struct MessageFields<'a> {
    pub(super) close: bool,
    pub(super) keep: bool,
    pub(super) upgrade: bool,
    /// Other `Connection` tokens: fields to drop.
    pub(super) named: Vec<&'a [u8]>,
}

impl<'a> MessageFields<'a> {
    pub(super) fn see(&mut self, kind: H, value: &'a [u8]) {
        if kind != H::Connection {
            return;
        }
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

/// A request head parsed and checked against RFC 9112, borrowing the read
/// buffer: what the later phases need of it. Made by [`parse_head`], a
/// function of the head's bytes alone.
pub(super) struct Head<'b, 'h> {
    pub(super) method_s: &'h str,
    pub(super) method: Method,
    pub(super) minor: u8,
    /// Path and query as they go upstream (origin form).
    pub(super) path_q: Cow<'h, str>,
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

/// The head's fields for the request-policy phase (names compared
/// without case, values as received).
impl pipeline::RequestFields for Head<'_, '_> {
    fn values(&self, name: &http::HeaderName) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_str()))
            .map(|f| f.value)
            .collect()
    }
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

fn refused(status: StatusCode, why: &'static str) -> Box<Refusal> {
    Box::new(Refusal {
        status,
        message: error::page(status, &why),
        close: true,
        route: None,
        location: None,
        header: None,
        error: Some(ProxyError::BadRequest(why)),
        facts: None,
    })
}

/// Parses one request head (`buf` is the head, up to its empty line) with
/// `wire::request::parse`, which decides target, host and framing or the
/// refusal, and classes its fields once for the later phases. Refusals
/// close the connection: after an unreadable head nothing says where the
/// next request starts.
pub(super) fn parse_head<'b, 'h>(
    buf: &'h [u8],
    headers: &'b mut [httparse::Header<'h>; MAX_HEADERS],
) -> Result<Head<'b, 'h>, Box<Refusal>> {
    let parsed = wire::request::parse(buf, headers).map_err(|e| {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        refused(status, e.why)
    })?;
    let method = match parsed.method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let minor = parsed.minor;
    let mut kinds = [H::Other; MAX_HEADERS];
    let mut m = MessageFields::default();
    let mut upgrade_value: Option<&[u8]> = None;
    let mut expect_continue = false;
    let (mut traceparent, mut tracestate) = (None, None);
    for (i, h) in parsed.fields.iter().enumerate() {
        let k = classify(h.name);
        kinds[i] = k;
        match k {
            H::Connection => m.see(k, h.value),
            H::Upgrade if has_token(h.value, "websocket") => upgrade_value = Some(h.value),
            H::Expect => expect_continue = h.value.eq_ignore_ascii_case(b"100-continue"),
            H::TraceParent => traceparent = Some(h.value),
            H::TraceState => tracestate = Some(h.value),
            _ => {}
        }
    }
    let framing = parsed.framing;
    let has_body = !matches!(framing, Framing::Empty | Framing::Length(0));
    Ok(Head {
        method_s: parsed.method,
        method,
        minor,
        path_q: parsed.path,
        host: parsed.host,
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
        fields: parsed.fields,
        kinds,
        named: m.named,
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
    /// upstream request line and fields into `line`/`fields`. `judged`:
    /// the verdict on its credentials, when it is parsed again after
    /// [`Stop::Verify`].
    pub(super) fn parse(&mut self, head_len: usize, judged: Option<Judged>) -> Result<Req, Stop> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse_head(&self.buf.bytes()[..head_len], &mut headers)?;
        let telemetry = self.proxy.telemetry.get();
        let facts = telemetry.map(|_| req_facts(&mut self.spare_facts, &head));
        let tracing_on = telemetry.is_some_and(|t| t.tracing.is_some());
        let has_body = head.has_body();
        let host_str = head.host_str();

        // Before phase 1: an ACME HTTP-01 answer (any host, never redirected).
        if let Some(a) = pipeline::acme_answer(&head.path_q) {
            return Err(Box::new(Refusal::answer(a, has_body, None, None, facts)).into());
        }
        // Phases 1 and 2: route, request policy.
        let route = match pipeline::route(&self.proxy.routes.load(), host_str) {
            Ok(r) => r,
            Err(err) => {
                tracing::debug!(host = %host_str, client = %self.info.peer, "{err}");
                let a = pipeline::Answer::error(&err);
                return Err(Box::new(Refusal::answer(a, has_body, None, Some(err), facts)).into());
            }
        };
        let policy_req = pipeline::PolicyRequest {
            host: host_str,
            target: &head.path_q,
            fields: &head,
            judged,
        };
        let held = match pipeline::request_policy(&self.proxy, &route, &self.info, &policy_req) {
            pipeline::Policy::Forward(held) => held,
            pipeline::Policy::Verify(v) => return Err(Stop::Verify(v)),
            pipeline::Policy::Answer(a) => {
                return Err(Box::new(Refusal::answer(a, has_body, Some(route), None, facts)).into())
            }
        };
        let websocket = route.host.websocket
            && head.method == Method::Get
            && head.minor == 1
            && head.websocket.is_some();
        let pool = route.pool_for(head.path_only()).clone();
        let affinity = pipeline::affinity(&pool, &self.info, head.path_only(), |name| {
            head.fields
                .iter()
                .filter(move |f| f.name.eq_ignore_ascii_case(name))
                .map(|f| f.value)
        });

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
            affinity,
            facts,
            held,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse_head` adds to `wire::request::parse` (whose own table
    /// holds every wire rule): keep-alive, `Expect`, the WebSocket upgrade,
    /// and a refusal's status carried into the answer. `Ok((keep-alive,
    /// expect-continue, websocket))` or `Err((status, reason))`.
    type Flags = (bool, bool, bool);
    /// One row: what it checks, the head, and what `parsed` should give.
    type Case = (
        &'static str,
        &'static str,
        Result<Flags, (u16, &'static str)>,
    );

    fn parsed(raw: &str) -> Result<Flags, (u16, String)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse_head(raw.as_bytes(), &mut headers) {
            Ok(h) => Ok((h.keep_alive, h.expect_continue, h.websocket.is_some())),
            Err(r) => Err((r.status.as_u16(), r.message)),
        }
    }

    #[test]
    fn head_rules_of_the_h1_front_end() {
        let cases: &[Case] = &[
            (
                "1.1 keeps alive",
                "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                Ok((true, false, false)),
            ),
            (
                "1.0 closes by default",
                "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
                Ok((false, false, false)),
            ),
            (
                "1.0 keep-alive",
                "GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
                Ok((true, false, false)),
            ),
            (
                "Connection: close",
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Ok((false, false, false)),
            ),
            (
                "Expect with a body",
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                Ok((true, true, false)),
            ),
            (
                "Expect without a body",
                "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
                Ok((true, false, false)),
            ),
            (
                "WebSocket upgrade",
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                Ok((true, false, true)),
            ),
            (
                "Upgrade without Connection",
                "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
                Ok((true, false, false)),
            ),
            (
                "400 carried",
                "GET / HTTP/1.1\r\n\r\n",
                Err((400, "missing Host header")),
            ),
            (
                "405 carried",
                "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
                Err((405, "CONNECT is not supported")),
            ),
            (
                "501 carried",
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err((501, "unsupported transfer coding")),
            ),
        ];
        for (what, raw, want) in cases {
            match (parsed(raw), want) {
                (Ok(got), Ok(w)) => assert_eq!(&got, w, "{what}"),
                (Err((status, msg)), Err((ws, wm))) => {
                    assert!(
                        status == *ws && msg.contains(wm),
                        "{what}: {status} {msg:?}"
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
