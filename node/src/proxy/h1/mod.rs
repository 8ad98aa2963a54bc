//! The proxy's own HTTP/1.x path: client connection in, upstream
//! connection out, both driven by the connection's one task.
//!
//! Why not hyper here (it still serves h2): proxying through hyper's
//! server and client costs a header map built and torn down twice per
//! request, a connection task and channels per upstream connection, and a
//! wake-up between tasks at every step; the benchmark (docs/benchmarks.md)
//! measured the result at about 1.3× nginx's CPU per request. Here a
//! request is parsed once (httparse, borrowing the read buffer), its head
//! is rewritten straight into the upstream's write buffer, header names
//! keep the client's spelling for free, and bodies pass through as bytes:
//! one read and one write per side for a small exchange, and no
//! allocation on the way once the connection's buffers exist.
//!
//! What is checked and refused lives in `proxy::wire` (request and
//! response heads, framing, the chunked coding), a layer over bytes that
//! this file calls; heads over 64 KiB get 431 here.

use std::future::{poll_fn, Future};
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::StatusCode;
use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Sleep;

use super::error::{self, ProxyError};
use super::forwarded;
use super::pipeline;
use super::routes::Route;
use super::upstream::{Pool, RawConn, UpstreamIo, UpstreamState};
use super::wire;
use super::wire::fields::{has_token, tokens};
use super::wire::{
    arm, copy_body, read_into, read_ready, read_ready_into, within, write_parts, BodyBuf, Buf,
    Coding, CopyError, Framing, Prefixed, Read,
};
use super::{ConnInfo, Proxy, Served};
use crate::telemetry::otel;

/// Longest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
const MAX_HEADERS: usize = wire::request::MAX_HEADERS;
/// A client connection's read buffer to start with (and to shrink back to
/// while idle).
const CLIENT_BUF: usize = 4 * 1024;
/// Bodies up to this size that are already read go out with their head,
/// in one write.
const INLINE_BODY: usize = 16 * 1024;
/// How long a client that was answered before its request body's end is
/// given to stop sending (see `Client::linger`).
const LINGER: Duration = Duration::from_secs(5);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Ends a listener's HTTP/1 connections gracefully: idle ones close at
/// once, busy ones after their response (which then says
/// `Connection: close`).
pub struct Shutdown {
    on: AtomicBool,
    notify: Arc<Notify>,
    live: AtomicUsize,
    all_done: Notify,
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown {
            on: AtomicBool::new(false),
            notify: Arc::new(Notify::new()),
            live: AtomicUsize::new(0),
            all_done: Notify::new(),
        })
    }

    pub fn begin(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        if self.live.load(Ordering::SeqCst) == 0 {
            self.all_done.notify_waiters();
        }
    }

    fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Resolves once every connection has ended.
    pub async fn wait(&self) {
        loop {
            let done = self.all_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    fn enter(self: &Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        LiveGuard(self.clone())
    }
}

struct LiveGuard(Arc<Shutdown>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.is_on() {
            self.0.all_done.notify_waiters();
        }
    }
}

/// How a client connection's HTTP/1 service ended.
pub enum Ended<S> {
    Closed,
    /// It opened with the h2 preface: hyper takes it from here.
    H2(Box<(Prefixed<S>, ConnInfo)>),
}

/// Serves HTTP/1.x requests on one client connection until it closes.
pub async fn serve<S>(proxy: Arc<Proxy>, io: S, info: ConnInfo, shutdown: Arc<Shutdown>) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _live = shutdown.enter();
    let header_timeout = proxy.config.header_read_timeout;
    let mut c = Client {
        proxy,
        info,
        io,
        buf: Buf::with_capacity(CLIENT_BUF),
        out: Vec::with_capacity(1024),
        fields: Vec::with_capacity(1024),
        line: Vec::with_capacity(256),
        host: Vec::with_capacity(64),
        resp_fields: Vec::with_capacity(32),
        timer: Box::pin(tokio::time::sleep(header_timeout)),
        shutdown,
        stop: None,
        first: true,
        spare_facts: None,
    };
    match c.run().await {
        Next::Close => Ended::Closed,
        Next::H2 => {
            let prefix = c.buf.take();
            Ended::H2(Box::new((Prefixed::new(prefix, c.io), c.info)))
        }
        Next::Tunnel(t) => {
            let Tunnel {
                route,
                upstream,
                conn,
                span,
            } = *t;
            let client = Prefixed::new(c.buf.take(), c.io);
            let RawConn { io, mut buf } = conn;
            let up = Prefixed::new(buf.take(), io);
            c.proxy
                .spawn_tunnel(&route, &upstream, &c.info, client, up, span);
            Ended::Closed
        }
    }
}

/// One client connection.
struct Client<S> {
    proxy: Arc<Proxy>,
    info: ConnInfo,
    io: S,
    buf: Buf,
    /// What is written next (a head, maybe with a small body).
    out: Vec<u8>,
    /// The request's header fields as they go upstream (all but Host).
    fields: Vec<u8>,
    /// The request line as it goes upstream.
    line: Vec<u8>,
    /// The request's host, as the client sent it.
    host: Vec<u8>,
    /// The upstream response head's fields: class, name and value offsets.
    resp_fields: Vec<(H, Range<usize>, Range<usize>)>,
    /// One timer, re-armed for whatever is awaited: the next request head,
    /// a body's next bytes, the upstream's response.
    timer: Pin<Box<Sleep>>,
    shutdown: Arc<Shutdown>,
    /// Registered with the shutdown's `Notify` on the first idle wait; after
    /// that, a flag check is all an idle wait costs.
    stop: Option<Pin<Box<OwnedNotified>>>,
    first: bool,
    /// The last request's facts, given back after it is recorded so that the
    /// next request's reuse their strings instead of allocating three.
    spare_facts: Option<ReqFacts>,
}

enum Next {
    Close,
    H2,
    Tunnel(Box<Tunnel>),
}

struct Tunnel {
    route: Arc<Route>,
    upstream: Arc<UpstreamState>,
    conn: RawConn,
    span: Option<opentelemetry::Context>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Other,
}

/// A parsed request, owning everything the exchange needs (the head's
/// bytes are consumed from the buffer before the exchange starts).
struct Req {
    minor: u8,
    method: Method,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    websocket: bool,
    route: Arc<Route>,
    pool: Arc<Pool>,
    /// For the access log and traces, when telemetry is on.
    facts: Option<ReqFacts>,
}

#[derive(Default)]
pub(super) struct ReqFacts {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) authority: String,
    pub(super) proto: &'static str,
    pub(super) traceparent: Option<http::HeaderValue>,
    pub(super) tracestate: Option<http::HeaderValue>,
}

/// A request refused before it reached an upstream.
struct Refusal {
    status: StatusCode,
    message: String,
    /// Set when the connection cannot go on (unreadable head, or a body
    /// that was not read).
    close: bool,
    route: Option<Arc<Route>>,
    location: Option<String>,
    error: Option<ProxyError>,
    facts: Option<ReqFacts>,
}

impl Refusal {
    /// A refusal that is an answer of the pipeline's (an error page, a
    /// redirect).
    fn answer(
        a: pipeline::Answer,
        close: bool,
        route: Option<Arc<Route>>,
        error: Option<ProxyError>,
        facts: Option<ReqFacts>,
    ) -> Refusal {
        Refusal {
            status: a.status,
            message: a.body,
            close,
            route,
            location: a.location,
            error,
            facts,
        }
    }

    /// The error page for a request no upstream answered properly.
    fn upstream(
        e: ProxyError,
        route: &Arc<Route>,
        close: bool,
        facts: Option<ReqFacts>,
    ) -> Refusal {
        let status = e.status();
        Refusal {
            status,
            message: error::page(status, &e),
            close,
            route: Some(route.clone()),
            location: None,
            error: Some(e),
            facts,
        }
    }
}

/// The classes of header field the proxy looks at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum H {
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

fn classify(name: &str) -> H {
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

/// Appends `name: value\r\n`.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal, without `format!`'s machinery.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self) -> Next {
        loop {
            // 1. A whole request head, by one deadline for all of it (and
            // the idle wait before it): re-armed per read, a client
            // dripping a byte at a time held the connection forever.
            let deadline = tokio::time::Instant::now() + self.proxy.config.header_read_timeout;
            let head_len = loop {
                if self.first && !self.buf.is_empty() {
                    let b = self.buf.bytes();
                    let n = b.len().min(H2_PREFACE.len());
                    if b[..n] == H2_PREFACE[..n] {
                        if n == H2_PREFACE.len() {
                            return Next::H2;
                        }
                        // Too short to tell yet.
                    } else {
                        self.first = false;
                    }
                }
                if !(self.buf.is_empty() || self.first && self.buf.len() < H2_PREFACE.len()) {
                    match head_end(self.buf.bytes()) {
                        Some(n) => break n,
                        None if self.buf.len() >= MAX_HEAD => {
                            self.refuse_head(
                                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                                "request head too large",
                            )
                            .await;
                            return Next::Close;
                        }
                        None => {}
                    }
                }
                let idle = self.buf.is_empty();
                if idle {
                    if self.shutdown.is_on() {
                        return Next::Close;
                    }
                    self.buf.shrink_if_empty(CLIENT_BUF);
                }
                self.timer.as_mut().reset(deadline);
                let shutdown = &self.shutdown;
                let stop = &mut self.stop;
                let mut check = |cx: &mut Context<'_>| stop_requested(shutdown, stop, cx);
                let stop_fn: Option<&mut (dyn FnMut(&mut Context<'_>) -> bool + Send)> =
                    if idle { Some(&mut check) } else { None };
                match read_into(
                    &mut self.io,
                    &mut self.buf,
                    Some(self.timer.as_mut()),
                    stop_fn,
                )
                .await
                {
                    Read::Data(_) => {}
                    Read::Eof | Read::Shutdown | Read::Err(_) => return Next::Close,
                    Read::TimedOut => {
                        if !idle {
                            self.refuse_head(
                                StatusCode::REQUEST_TIMEOUT,
                                "request head not received in time",
                            )
                            .await;
                        }
                        return Next::Close;
                    }
                }
            };
            self.first = false;
            let started = Instant::now();

            // 2. Parse, route, and write the upstream head's fields.
            let parsed = self.parse(head_len);
            self.buf.consume(head_len);
            let req = match parsed {
                Ok(r) => r,
                Err(refusal) => {
                    let close = refusal.close;
                    let sent = self.refuse(*refusal, started).await;
                    if close || !sent {
                        return Next::Close;
                    }
                    continue;
                }
            };

            // 3. The exchange.
            match self.exchange(req, started).await {
                Step::KeepAlive => {}
                Step::Close => return Next::Close,
                Step::Tunnel(t) => return Next::Tunnel(t),
            }
        }
    }

    /// Answers a request whose head could not be read, then the connection
    /// closes.
    async fn refuse_head(&mut self, status: StatusCode, why: &str) {
        tracing::info!(client = %self.info.peer, status = status.as_u16(), "{why}; refused");
        self.out.clear();
        simple_response(
            &mut self.out,
            1,
            status,
            &error::page(status, &why),
            true,
            None,
            None,
        );
        let _ = self.io.write_all(&self.out).await;
        let _ = self.io.flush().await;
    }

    /// Writes a refusal (error page or redirect) and records it; returns
    /// whether it was written.
    async fn refuse(&mut self, r: Refusal, started: Instant) -> bool {
        self.out.clear();
        let close = r.close || self.closing();
        let hsts = pipeline::response_policy(r.route.as_deref(), &self.info);
        simple_response(
            &mut self.out,
            1,
            r.status,
            &r.message,
            close,
            r.location.as_deref(),
            hsts,
        );
        let sent = self.io.write_all(&self.out).await.is_ok() && self.io.flush().await.is_ok();
        self.proxy.record_h1(Served {
            started,
            conn: &self.info,
            facts: r.facts.as_ref(),
            status: r.status.as_u16(),
            route: r.route.as_ref(),
            upstream: None,
            error: r.error.as_ref(),
            trace: None,
        });
        self.spare_facts = r.facts;
        sent
    }

    /// Whether responses must say `Connection: close` now.
    fn closing(&self) -> bool {
        self.shutdown.is_on() || self.proxy.draining.load(Ordering::Relaxed)
    }

    /// Parses the head in the buffer (`head_len` bytes), routes it, and
    /// writes its upstream request line and fields into `line`/`fields`.
    fn parse(&mut self, head_len: usize) -> Result<Req, Box<Refusal>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = &self.buf.bytes()[..head_len];
        let parsed = wire::request::parse(head, &mut headers).map_err(|e| {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            Box::new(Refusal {
                status,
                message: error::page(status, &e.why),
                close: true,
                route: None,
                location: None,
                error: Some(ProxyError::BadRequest(e.why)),
                facts: None,
            })
        })?;
        let (method_s, minor, framing, host) =
            (parsed.method, parsed.minor, parsed.framing, parsed.host);
        let path_q: &str = &parsed.path;
        let method = match method_s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        let n = parsed.fields.len();
        let mut kinds = [H::Other; MAX_HEADERS];
        let mut m = MessageFields::default();
        let mut upgrade_ws = false;
        let mut upgrade_value: Option<&[u8]> = None;
        let mut expect_continue = false;
        let mut traceparent = None;
        let mut tracestate = None;
        for (i, h) in parsed.fields.iter().enumerate() {
            let k = classify(h.name);
            kinds[i] = k;
            match k {
                H::Connection => m.see(k, h.value),
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
        let host_str = std::str::from_utf8(host).expect("checked ASCII");

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
        for (i, hd) in parsed.fields.iter().enumerate().take(n) {
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

    /// Sends the request to an upstream (trying the pool's others when one
    /// cannot be reached) and the response back.
    async fn exchange(&mut self, req: Req, started: Instant) -> Step {
        let proxy = self.proxy.clone();
        let h = &req.route.host;
        let resp_timeout = req.route.upstream_timeout;
        let tracing = proxy.telemetry.get().and_then(|t| t.tracing.as_ref());
        let server_cx = match (tracing, &req.facts) {
            (Some(tr), Some(f)) => Some(self.server_span(tr, f)),
            _ => None,
        };
        // A body that is already here whole can be sent again if a pooled
        // connection turns out to be closed.
        let buffered_body = match req.framing {
            Framing::Empty => Some(0),
            Framing::Length(l) if l as usize <= self.buf.len() && l as usize <= INLINE_BODY => {
                Some(l as usize)
            }
            _ => None,
        };
        // Whether the request's body has been read from the client (so the
        // connection can take another request after an error response).
        let mut body_read = matches!(req.framing, Framing::Empty | Framing::Length(0));
        let mut last_err: Option<ProxyError> = None;
        let mut outcome = None;
        'upstreams: for upstream in req.pool.attempt_order() {
            let mut pooled = true;
            loop {
                let (mut conn, reused) = match pooled.then(|| upstream.take_raw()).flatten() {
                    Some(c) => (c, true),
                    None => match proxy.connector.connect_raw(upstream).await {
                        Ok(c) => (c, false),
                        Err(e) => {
                            let e = ProxyError::Unreachable {
                                upstream: upstream.url.to_string(),
                                source: e,
                            };
                            let next = pipeline::attempt_failed(
                                upstream,
                                &e,
                                proxy.config.failure_cooldown,
                            );
                            last_err = Some(e);
                            if next {
                                continue 'upstreams;
                            }
                            break 'upstreams;
                        }
                    },
                };
                pooled = false;
                let client_cx = match (tracing, &server_cx) {
                    (Some(tr), Some(parent)) => {
                        let mut inject = http::HeaderMap::new();
                        let cx = tr.child_span(
                            parent,
                            format!(
                                "{} upstream",
                                req.facts.as_ref().map_or("", |f| f.method.as_str())
                            ),
                            opentelemetry::trace::SpanKind::Client,
                            vec![
                                KeyValue::new(
                                    "http.request.method",
                                    req.facts
                                        .as_ref()
                                        .map(|f| f.method.clone())
                                        .unwrap_or_default(),
                                ),
                                KeyValue::new(
                                    "server.address",
                                    upstream.url.authority().to_string(),
                                ),
                                KeyValue::new(
                                    "url.full",
                                    format!(
                                        "{}{}",
                                        upstream.url,
                                        String::from_utf8_lossy(
                                            &self.line[self
                                                .line
                                                .iter()
                                                .position(|&b| b == b' ')
                                                .map_or(0, |p| p + 1)
                                                ..self.line.len().saturating_sub(11)]
                                        )
                                    ),
                                ),
                            ],
                            Some(&mut inject),
                        );
                        Some((cx, inject))
                    }
                    _ => None,
                };
                // Head, and the body when it is here whole and small.
                self.out.clear();
                self.out.extend_from_slice(&self.line);
                match (h.preserve_host, &upstream.host_header) {
                    (false, Some(v)) => field(&mut self.out, b"Host", v.as_bytes()),
                    _ => field(&mut self.out, b"Host", &self.host),
                }
                self.out.extend_from_slice(&self.fields);
                if let Some((_, inject)) = &client_cx {
                    for (k, v) in inject {
                        field(&mut self.out, k.as_str().as_bytes(), v.as_bytes());
                    }
                }
                self.out.extend_from_slice(b"\r\n");
                if let Some(n) = buffered_body {
                    self.out.extend_from_slice(&self.buf.bytes()[..n]);
                }
                let sent = async {
                    conn.io.write_all(&self.out).await?;
                    conn.io.flush().await
                }
                .await;
                let end_span = |cx: &Option<(opentelemetry::Context, http::HeaderMap)>,
                                status: Option<u16>,
                                err: Option<String>| {
                    if let Some((cx, _)) = cx {
                        let attrs = status
                            .map(|s| vec![KeyValue::new("http.response.status_code", i64::from(s))])
                            .unwrap_or_default();
                        otel::end(cx, attrs, err);
                    }
                };
                if let Err(e) = sent {
                    if reused && buffered_body.is_some() {
                        end_span(&client_cx, None, Some(e.to_string()));
                        continue; // a stale pooled connection: a new one
                    }
                    end_span(&client_cx, None, Some(e.to_string()));
                    last_err = Some(ProxyError::UpstreamIo {
                        upstream: upstream.url.to_string(),
                        source: e,
                    });
                    break 'upstreams;
                }
                // The rest of the body, streamed.
                match buffered_body {
                    // Consumed once a response has come: until then it may
                    // have to be sent again on a new connection.
                    Some(_) => {}
                    None => {
                        if req.expect_continue {
                            let _ = self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                            let _ = self.io.flush().await;
                        }
                        let mut sink = Heard {
                            io: &mut conn.io,
                            answered: false,
                        };
                        let r = copy_body(
                            &mut self.io,
                            &mut self.buf,
                            &mut sink,
                            req.framing,
                            Coding::AsIs,
                            &mut self.timer,
                            proxy.config.header_read_timeout,
                        )
                        .await;
                        if sink.answered {
                            // The upstream answered before the body's end:
                            // the answer is read below, the rest of the body
                            // is not sent, and neither connection is reused.
                            tracing::debug!(host = %h.name, upstream = %upstream.url, "upstream answered before the request body's end");
                        } else if let Err(e) = r {
                            let (msg, err) = match e {
                                CopyError::Sink(e) => (
                                    e.to_string(),
                                    Some(ProxyError::UpstreamIo {
                                        upstream: upstream.url.to_string(),
                                        source: e,
                                    }),
                                ),
                                CopyError::Source(e) => (format!("client: {e}"), None),
                                CopyError::SourceTimedOut => ("client stalled".to_string(), None),
                                CopyError::SinkTimedOut => (
                                    "upstream stopped reading the body".to_string(),
                                    Some(ProxyError::Timeout {
                                        upstream: upstream.url.to_string(),
                                        timeout: proxy.config.header_read_timeout,
                                    }),
                                ),
                                CopyError::Invalid(w) => {
                                    (w.to_string(), Some(ProxyError::BadRequest(w)))
                                }
                            };
                            end_span(&client_cx, None, Some(msg));
                            match err {
                                Some(err) => last_err = Some(err),
                                // The client went away or stalled mid-body:
                                // nobody to answer.
                                None => return Step::Close,
                            }
                            break 'upstreams;
                        } else {
                            body_read = true;
                        }
                    }
                }
                // The response head, after any 1xx.
                match self
                    .read_response_head(
                        &mut conn,
                        resp_timeout,
                        req.method == Method::Head,
                        req.minor == 1,
                    )
                    .await
                {
                    Ok(mut head) => {
                        if let (false, Some(n)) = (body_read, buffered_body) {
                            self.buf.consume(n);
                            body_read = true;
                        }
                        if !body_read {
                            // An early answer: the upstream still expects the
                            // rest of the body, the client is still sending it.
                            head.reusable = false;
                            head.linger = true;
                        }
                        end_span(&client_cx, Some(head.status), None);
                        upstream.mark_up();
                        outcome = Some((upstream.clone(), conn, head));
                        break 'upstreams;
                    }
                    Err(HeadError::Closed) if reused && buffered_body.is_some() => {
                        end_span(&client_cx, None, Some("closed".into()));
                        continue;
                    }
                    Err(HeadError::ClientGone) => {
                        end_span(&client_cx, None, Some("client went away".into()));
                        return Step::Close;
                    }
                    Err(e) => {
                        end_span(&client_cx, None, Some(e.to_string()));
                        let e = match e {
                            HeadError::TimedOut => ProxyError::Timeout {
                                upstream: upstream.url.to_string(),
                                timeout: resp_timeout,
                            },
                            HeadError::Io(e) => ProxyError::UpstreamIo {
                                upstream: upstream.url.to_string(),
                                source: e,
                            },
                            HeadError::Closed => ProxyError::UpstreamIo {
                                upstream: upstream.url.to_string(),
                                source: std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "connection closed before a response",
                                ),
                            },
                            HeadError::Invalid(w) => ProxyError::UpstreamBad {
                                upstream: upstream.url.to_string(),
                                why: w,
                            },
                            HeadError::ClientGone => unreachable!("handled above"),
                        };
                        pipeline::attempt_failed(upstream, &e, proxy.config.failure_cooldown);
                        last_err = Some(e);
                        break 'upstreams;
                    }
                }
            }
        }
        let Some((upstream, conn, head)) = outcome else {
            let e = last_err.expect("a pool has at least one upstream");
            tracing::warn!(host = %h.name, host_id = %h.id, client = %self.info.peer, status = e.status().as_u16(), "{e}");
            if let (false, Some(n)) = (body_read, buffered_body) {
                self.buf.consume(n);
                body_read = true;
            }
            let close = !body_read;
            let status = e.status();
            let r = Refusal::upstream(e, &req.route, close || !req.keep_alive, req.facts);
            let close = r.close;
            if let Some(cx) = &server_cx {
                self.proxy.end_server_span(
                    cx,
                    status.as_u16(),
                    Some(&req.route),
                    None,
                    r.error.as_ref(),
                );
            }
            let sent = self.refuse(r, started).await;
            return if close || !sent {
                Step::Close
            } else {
                Step::KeepAlive
            };
        };
        self.respond(req, started, upstream, conn, head, server_cx)
            .await
    }

    fn server_span(&self, tr: &otel::Tracing, f: &ReqFacts) -> opentelemetry::Context {
        let mut carrier = http::HeaderMap::new();
        if let Some(v) = &f.traceparent {
            carrier.insert("traceparent", v.clone());
        }
        if let Some(v) = &f.tracestate {
            carrier.insert("tracestate", v.clone());
        }
        let conn = &self.info;
        tr.server_span(
            &carrier,
            f.method.clone(),
            vec![
                KeyValue::new("http.request.method", f.method.clone()),
                KeyValue::new("url.path", f.path.clone()),
                KeyValue::new("url.scheme", if conn.tls { "https" } else { "http" }),
                KeyValue::new("server.address", f.authority.clone()),
                KeyValue::new("client.address", conn.peer.ip().to_string()),
                KeyValue::new("client.port", i64::from(conn.peer.port())),
                KeyValue::new("network.protocol.version", "1.1"),
            ],
        )
    }

    /// Reads the upstream's response head and works out its framing.
    /// Interim (1xx) responses other than 101 come before it: 100 Continue
    /// is dropped (the proxy answers `Expect` itself), the others (103
    /// Early Hints) are passed on, rewritten (`wire::response::write_interim`),
    /// when `forward_interim` (an HTTP/1.1 client; HTTP/1.0 has no 1xx) and
    /// dropped otherwise.
    async fn read_response_head(
        &mut self,
        conn: &mut RawConn,
        timeout: Duration,
        head_request: bool,
        forward_interim: bool,
    ) -> Result<RespHead, HeadError> {
        let mut armed = false;
        let mut behind: Option<Behind> = None;
        loop {
            if !conn.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let parsed =
                    match wire::response::parse(conn.buf.bytes(), &mut headers, head_request) {
                        Ok(Some(r)) if r.is_interim() => {
                            // Rewritten (never passed on raw), or dropped.
                            if forward_interim && r.status != 100 {
                                let mut interim = Vec::with_capacity(r.len);
                                wire::response::write_interim(&mut interim, &r);
                                Some((r.len, Err(interim)))
                            } else {
                                Some((r.len, Err(Vec::new())))
                            }
                        }
                        Ok(Some(r)) => {
                            let base = conn.buf.bytes().as_ptr() as usize;
                            let head = RespHead::from_parsed(&r, base, &mut self.resp_fields);
                            Some((r.len, Ok(head)))
                        }
                        Ok(None) if conn.buf.len() >= MAX_HEAD => {
                            return Err(HeadError::Invalid("response head too large"))
                        }
                        Ok(None) => None,
                        Err(why) => return Err(HeadError::Invalid(why)),
                    };
                // Body bytes read past the head stay in their body buffer only
                // for a final response of known length, whose head is all the
                // connection's buffer holds; otherwise they join that buffer
                // and are parsed (or streamed) from there.
                let keep = matches!(&parsed, Some((len, Ok(h)))
                    if matches!(h.framing, Framing::Length(_)) && *len == conn.buf.len());
                let mut folded = false;
                if !keep {
                    if let Some(b) = behind.take() {
                        conn.buf.extend(b.bytes());
                        folded = true;
                    }
                }
                match parsed {
                    // A 1xx: passed on or dropped; what follows is parsed next.
                    Some((len, Err(interim))) => {
                        if !interim.is_empty() {
                            let sent = self.io.write_all(&interim).await;
                            if sent.is_err() || self.io.flush().await.is_err() {
                                return Err(HeadError::ClientGone);
                            }
                        }
                        conn.buf.consume(len);
                        continue;
                    }
                    Some((_, Ok(mut head))) => {
                        head.behind = behind.take();
                        return Ok(head);
                    }
                    // More bytes were already here: parse again with them.
                    None if folded => continue,
                    None => {}
                }
            }
            if !armed {
                arm(&mut self.timer, timeout);
                armed = true;
            }
            let read = if conn.buf.is_empty() && conn.io.is_plain() {
                let (read, b) = read_behind(conn, self.timer.as_mut()).await;
                behind = b;
                read
            } else {
                read_into(&mut conn.io, &mut conn.buf, Some(self.timer.as_mut()), None).await
            };
            match read {
                Read::Data(_) => {}
                Read::Eof if conn.buf.is_empty() => return Err(HeadError::Closed),
                Read::Eof => {
                    return Err(HeadError::Invalid(
                        "connection closed inside the response head",
                    ))
                }
                Read::TimedOut => return Err(HeadError::TimedOut),
                Read::Err(e) => return Err(HeadError::Io(e)),
                Read::Shutdown => unreachable!("no stop check given"),
            }
        }
    }

    /// Writes the response head and streams the body to the client.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &mut self,
        req: Req,
        started: Instant,
        upstream: Arc<UpstreamState>,
        mut conn: RawConn,
        head: RespHead,
        server_cx: Option<opentelemetry::Context>,
    ) -> Step {
        let proxy = self.proxy.clone();
        // A 101 to a WebSocket upgrade: the head goes back rewritten, then
        // the connections become a tunnel.
        if head.status == 101 {
            if !req.websocket {
                let e = ProxyError::UpstreamBad {
                    upstream: upstream.url.to_string(),
                    why: "101 Switching Protocols to a request that asked for no upgrade",
                };
                let r = Refusal::upstream(e, &req.route, true, req.facts);
                self.refuse(r, started).await;
                return Step::Close;
            }
            // Rewritten like every head (CRLF, `name: value`), its fields
            // all kept: they are the handshake's.
            let mut out = Vec::with_capacity(head.len + 32);
            {
                let raw = conn.buf.bytes();
                out.extend_from_slice(b"HTTP/1.1 101 ");
                out.extend_from_slice(match &raw[head.reason.clone()] {
                    r if !r.is_empty() => r,
                    _ => b"Switching Protocols",
                });
                out.extend_from_slice(b"\r\n");
                for (_, name, value) in self.resp_fields.iter() {
                    field(&mut out, &raw[name.clone()], &raw[value.clone()]);
                }
                out.extend_from_slice(b"\r\n");
            }
            conn.buf.consume(head.len);
            if self.io.write_all(&out).await.is_err() || self.io.flush().await.is_err() {
                return Step::Close;
            }
            let span = match (
                proxy.telemetry.get().and_then(|t| t.tracing.as_ref()),
                &server_cx,
            ) {
                (Some(tr), Some(parent)) => {
                    let cx = tr.child_span(
                        parent,
                        format!("WebSocket {}", req.route.host.name),
                        opentelemetry::trace::SpanKind::Internal,
                        vec![
                            KeyValue::new("charon.host", req.route.host.name.clone()),
                            KeyValue::new("charon.upstream", upstream.url.to_string()),
                            KeyValue::new("client.address", self.info.peer.ip().to_string()),
                            KeyValue::new(
                                "websocket.subprotocol",
                                head.subprotocol.clone().unwrap_or_default(),
                            ),
                            KeyValue::new(
                                "websocket.extensions",
                                head.extensions.clone().unwrap_or_default(),
                            ),
                        ],
                        None,
                    );
                    otel::add_event(&cx, "upgrade", vec![]);
                    Some(cx)
                }
                _ => None,
            };
            if let Some(cx) = &server_cx {
                proxy.end_server_span(cx, 101, Some(&req.route), Some(&upstream.url_text), None);
            }
            proxy.record_h1(Served {
                started,
                conn: &self.info,
                facts: req.facts.as_ref(),
                status: 101,
                route: Some(&req.route),
                upstream: Some(&upstream.url_text),
                error: None,
                trace: server_cx.as_ref(),
            });
            return Step::Tunnel(Box::new(Tunnel {
                route: req.route,
                upstream,
                conn,
                span,
            }));
        }

        let client_minor = req.minor;
        let linger = head.linger;
        let (framing, coding, chunked_out) = match head.framing {
            Framing::Chunked if client_minor == 0 => (Framing::Chunked, Coding::Dechunk, false),
            Framing::Chunked => (Framing::Chunked, Coding::AsIs, true),
            f => (f, Coding::AsIs, false),
        };
        let close = !req.keep_alive
            || linger
            || self.closing()
            || framing == Framing::Close
            || coding == Coding::Dechunk;
        let hsts = pipeline::response_policy(Some(&req.route), &self.info).cloned();
        // A chunked body whose first bytes are already malformed: a 502
        // while nothing has gone out (later, the response is cut).
        if head.framing == Framing::Chunked {
            if let Err(why) = wire::chunked::check(&conn.buf.bytes()[head.len..]) {
                let e = ProxyError::UpstreamBad {
                    upstream: upstream.url.to_string(),
                    why,
                };
                if let Some(cx) = &server_cx {
                    proxy.end_server_span(cx, 502, Some(&req.route), None, Some(&e));
                }
                let r = Refusal::upstream(e, &req.route, true, req.facts);
                self.refuse(r, started).await;
                return Step::Close;
            }
        }

        // The head, rewritten from the upstream's.
        self.out.clear();
        {
            let raw = conn.buf.bytes();
            let out = &mut self.out;
            out.extend_from_slice(if client_minor == 0 {
                b"HTTP/1.0 "
            } else {
                b"HTTP/1.1 "
            });
            push_u64(out, u64::from(head.status));
            out.push(b' ');
            match &raw[head.reason.clone()] {
                r if !r.is_empty() => out.extend_from_slice(r),
                _ => out.extend_from_slice(
                    StatusCode::from_u16(head.status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("")
                        .as_bytes(),
                ),
            }
            out.extend_from_slice(b"\r\n");
            let mut wrote_length = false;
            for (kind, name, value) in self.resp_fields.iter() {
                let name = &raw[name.clone()];
                let keep = match kind {
                    H::Connection | H::Upgrade | H::HopByHop | H::TransferEncoding => false,
                    H::ContentLength => {
                        let k = !wrote_length && head.te.is_none();
                        wrote_length = true;
                        k
                    }
                    H::Sts => hsts.is_none(),
                    _ => !head.named.iter().any(|t| t.eq_ignore_ascii_case(name)),
                };
                if keep {
                    field(out, name, &raw[value.clone()]);
                }
            }
            if chunked_out {
                field(out, b"Transfer-Encoding", b"chunked");
            }
            if close {
                field(out, b"Connection", b"close");
            } else if client_minor == 0 {
                field(out, b"Connection", b"keep-alive");
            }
            if let Some(v) = &hsts {
                field(out, b"Strict-Transport-Security", v.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        conn.buf.consume(head.len);
        // What of the body is already here goes out with the head, in one
        // write (all of a small body; the first part of a large one).
        let mut body_done = false;
        let mut framing = framing;
        // Body bytes that came right behind the head but past the head's read
        // buffer: they join the head's write too (a vectored one).
        let mut behind: Option<Behind> = None;
        let mut tail = 0;
        if let Framing::Length(l) = framing {
            let n = (l as usize).min(conn.buf.len()).min(INLINE_BODY);
            self.out.extend_from_slice(&conn.buf.bytes()[..n]);
            conn.buf.consume(n);
            let mut rest = l - n as u64;
            behind = head.behind.or_else(|| {
                if rest == 0 || !conn.buf.is_empty() {
                    return None;
                }
                let mut buf = BodyBuf::take();
                let end = read_ready(&mut conn.io, buf.bytes_mut())?;
                Some(Behind { buf, at: 0, end })
            });
            if let Some(b) = &mut behind {
                let take = ((b.end - b.at) as u64).min(rest) as usize;
                // Past the body: kept, so the connection is not reused.
                conn.buf.extend(&b.buf.bytes()[b.at + take..b.end]);
                b.end = b.at + take;
                rest -= take as u64;
            }
            // A body longer than the body buffer: what more is ready now
            // joins the same write, from the connection's buffer.
            if rest > 0 && behind.is_some() && conn.buf.is_empty() {
                if let Some(got) = read_ready_into(&mut conn.io, &mut conn.buf) {
                    tail = (got as u64).min(rest) as usize;
                    rest -= tail as u64;
                }
            }
            framing = Framing::Length(rest);
            body_done = rest == 0;
        }
        if matches!(framing, Framing::Empty) {
            body_done = true;
        }
        let status = head.status;
        let mut error = None;
        let mut client_gone = false;
        let mut upstream_ok = head.reusable;
        // A client that stopped reading is given up on after the response's
        // inactivity timeout, here as while the body streams.
        let idle = self.response_idle(&req);
        let parts = match &behind {
            Some(b) => [&self.out[..], b.bytes(), &conn.buf.bytes()[..tail]],
            None => [&self.out[..], &[][..], &[][..]],
        };
        let wrote = within(write_parts(&mut self.io, parts), &mut self.timer, idle).await;
        let wrote = wrote.unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()));
        drop(behind);
        conn.buf.consume(tail);
        if wrote.is_err() {
            client_gone = true;
            upstream_ok = upstream_ok && body_done;
        } else if !body_done {
            let r = copy_body(
                &mut conn.io,
                &mut conn.buf,
                &mut self.io,
                framing,
                coding,
                &mut self.timer,
                idle,
            )
            .await;
            match r {
                Ok(_) => {}
                Err(CopyError::Sink(_)) => {
                    client_gone = true;
                    upstream_ok = false;
                }
                Err(CopyError::SinkTimedOut) => {
                    tracing::info!(host = %req.route.host.name, client = %self.info.peer, "client stopped reading the response; closing");
                    client_gone = true;
                    upstream_ok = false;
                }
                Err(e) => {
                    // The head has gone out: the client learns of it by
                    // the connection closing before the body's end.
                    tracing::warn!(host = %req.route.host.name, upstream = %upstream.url, client = %self.info.peer, "upstream response body failed: {e:?}");
                    upstream_ok = false;
                    client_gone = true;
                    error = Some(ProxyError::UpstreamBad {
                        upstream: upstream.url.to_string(),
                        why: "response body ended early or was malformed",
                    });
                }
            }
        }
        if upstream_ok && conn.buf.is_empty() {
            upstream.release_raw(conn);
        }
        if let Some(cx) = &server_cx {
            proxy.end_server_span(
                cx,
                status,
                Some(&req.route),
                Some(&upstream.url_text),
                error.as_ref(),
            );
        }
        proxy.record_h1(Served {
            started,
            conn: &self.info,
            facts: req.facts.as_ref(),
            status,
            route: Some(&req.route),
            upstream: Some(&upstream.url_text),
            error: error.as_ref(),
            trace: server_cx.as_ref(),
        });
        self.spare_facts = req.facts;
        if close || client_gone {
            let _ = self.io.shutdown().await;
            if linger && !client_gone {
                self.linger().await;
            }
            Step::Close
        } else {
            Step::KeepAlive
        }
    }

    /// After an answer that came before the request body's end, with the
    /// write side already shut: reads and drops what the client still
    /// sends, until it closes or for `LINGER` at most. Closing a socket
    /// with unread bytes resets the connection, and a reset can reach the
    /// client before it has read the answer, which it would then lose (the
    /// lingering close of nginx and HAProxy).
    async fn linger(&mut self) {
        arm(&mut self.timer, LINGER);
        loop {
            let n = self.buf.len();
            self.buf.consume(n);
            match read_into(&mut self.io, &mut self.buf, Some(self.timer.as_mut()), None).await {
                Read::Data(_) => {}
                _ => return,
            }
        }
    }

    fn response_idle(&self, req: &Req) -> Duration {
        let h = &req.route.host;
        if h.upstream_timeout_ms > 0 {
            Duration::from_millis(u64::from(h.upstream_timeout_ms))
        } else {
            self.proxy.config.upstream_timeout
        }
    }
}

enum Step {
    KeepAlive,
    Close,
    Tunnel(Box<Tunnel>),
}

#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("connection closed before a response")]
    Closed,
    #[error("no response in time")]
    TimedOut,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Invalid(&'static str),
    /// Passing an interim response on to the client failed.
    #[error("the client went away")]
    ClientGone,
}

/// What requests and responses say in `Connection` (framing is decided
/// by `wire::fields::Framer`).
#[derive(Default)]
struct MessageFields<'a> {
    close: bool,
    keep: bool,
    upgrade: bool,
    /// Other `Connection` tokens: fields to drop.
    named: Vec<&'a [u8]>,
}

impl<'a> MessageFields<'a> {
    fn see(&mut self, kind: H, value: &'a [u8]) {
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

/// What the proxy needs of an upstream's response head.
struct RespHead {
    len: usize,
    status: u16,
    /// Where the reason phrase lies in the head.
    reason: Range<usize>,
    framing: Framing,
    /// Transfer-Encoding was present.
    te: Option<()>,
    /// The connection may carry another request afterwards.
    reusable: bool,
    /// Fields named in `Connection`, to be dropped.
    named: Vec<Vec<u8>>,
    subprotocol: Option<String>,
    extensions: Option<String>,
    /// Body bytes that came in the head's read but were left in the body
    /// buffer it was read into (see [`read_behind`]).
    behind: Option<Behind>,
    /// The answer came before the request's body had all been read from
    /// the client: the client connection closes after it, lingering.
    linger: bool,
}

impl RespHead {
    /// Also records where each field lies in the head (offsets from
    /// `base`, the head's first byte) in `fields`, so that the head is
    /// parsed once even though it is rewritten later.
    fn from_parsed(
        p: &wire::response::ResponseHead<'_, '_>,
        base: usize,
        fields: &mut Vec<(H, Range<usize>, Range<usize>)>,
    ) -> RespHead {
        let range = |s: &[u8]| {
            let at = s.as_ptr() as usize - base;
            at..at + s.len()
        };
        fields.clear();
        let status = p.status;
        let mut m = MessageFields::default();
        let mut subprotocol = None;
        let mut extensions = None;
        for h in p.fields {
            let kind = classify(h.name);
            fields.push((kind, range(h.name.as_bytes()), range(h.value)));
            match kind {
                H::Connection => m.see(kind, h.value),
                H::Other if status == 101 => {
                    if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                        subprotocol = Some(String::from_utf8_lossy(h.value).into_owned());
                    } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
                        extensions = Some(String::from_utf8_lossy(h.value).into_owned());
                    }
                }
                _ => {}
            }
        }
        let framing = p.framing;
        let reusable =
            framing != Framing::Close && !m.close && (p.minor == 1 || m.keep) && status != 101;
        RespHead {
            len: p.len,
            status,
            reason: match p.reason {
                "" => 0..0,
                r => range(r.as_bytes()),
            },
            framing,
            te: p.te.then_some(()),
            reusable,
            named: m.named.iter().map(|t| t.to_vec()).collect(),
            subprotocol,
            extensions,
            behind: None,
            linger: false,
        }
    }
}

/// The upstream end of a request body being streamed. An upstream may
/// answer before the body's end (413, 401, a redirect) and stop reading;
/// a proxy that kept writing would wait on it until a timeout and answer
/// 502. So before each write this looks, without reading, whether the
/// upstream has begun to answer, and if it has, fails the write with
/// `answered` set: the body stops and the answer is read (RFC 9112 asks a
/// client sending a body to watch for an error response meanwhile).
struct Heard<'a> {
    io: &'a mut UpstreamIo,
    answered: bool,
}

impl AsyncWrite for Heard<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.io.poll_has_input(cx).is_ready() {
            this.answered = true;
            return Poll::Ready(Err(io::Error::other(
                "the upstream answered before the request body's end",
            )));
        }
        match Pin::new(&mut *this.io).poll_write(cx, buf) {
            // An upstream that answered and closed: its answer may be
            // there to read all the same.
            Poll::Ready(Err(e)) => {
                this.answered = this.io.poll_has_input(cx).is_ready();
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// Bytes read past a response head into a body buffer.
struct Behind {
    buf: BodyBuf,
    at: usize,
    end: usize,
}

impl Behind {
    fn bytes(&self) -> &[u8] {
        &self.buf.bytes()[self.at..self.end]
    }
}

/// Reads a response head from a plain upstream connection whose buffer is
/// empty, into a 64 KiB body buffer taken only once the socket is readable
/// (so no connection holds one while it waits). The head goes to the
/// connection's buffer; body bytes that came with it stay where they are,
/// and leave with the head in one write. A response of up to 64 KiB then
/// costs one read, where an 8 KiB head read made it two. Up to
/// `INLINE_BODY` it all goes to the connection's buffer (one small copy).
async fn read_behind(conn: &mut RawConn, mut timer: Pin<&mut Sleep>) -> (Read, Option<Behind>) {
    let got = poll_fn(|cx| {
        if let Poll::Ready(r) = conn.io.poll_readable(cx) {
            if let Err(e) = r {
                return Poll::Ready(Err(Some(e)));
            }
            let mut scratch = BodyBuf::take();
            let mut rb = ReadBuf::new(scratch.bytes_mut());
            match Pin::new(&mut conn.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    return Poll::Ready(Ok((scratch, n)));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e))),
                // Readiness was stale: now cleared, and the waker registered
                // (the buffer goes back to the pool).
                Poll::Pending => {}
            }
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(None));
        }
        Poll::Pending
    })
    .await;
    match got {
        Ok((_, 0)) => (Read::Eof, None),
        Ok((scratch, n)) => {
            let bytes = &scratch.bytes()[..n];
            // A small response goes whole to the connection's buffer and out
            // with the head in one plain write, as before this path existed.
            let end = if n > INLINE_BODY {
                head_end(bytes)
            } else {
                None
            };
            match end {
                Some(end) if end < n => {
                    conn.buf.extend(&bytes[..end]);
                    let b = Behind {
                        buf: scratch,
                        at: end,
                        end: n,
                    };
                    (Read::Data(n), Some(b))
                }
                _ => {
                    conn.buf.extend(bytes);
                    (Read::Data(n), None)
                }
            }
        }
        Err(None) => (Read::TimedOut, None),
        Err(Some(e)) => (Read::Err(e), None),
    }
}

/// The length of the head at the start of `b` once its empty line has
/// arrived (CRLF or bare LF line ends, as httparse takes them). Only the
/// end is looked for here: the head is parsed once, by `Client::parse`.
fn head_end(b: &[u8]) -> Option<usize> {
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

/// The listener is shutting down: checked on each wake-up of an idle
/// connection; the first check registers the task with the shutdown's
/// `Notify`, so that it is woken when the shutdown begins.
fn stop_requested(
    shutdown: &Arc<Shutdown>,
    stop: &mut Option<Pin<Box<OwnedNotified>>>,
    cx: &mut Context<'_>,
) -> bool {
    if shutdown.is_on() {
        return true;
    }
    if stop.is_none() {
        let mut n = Box::pin(shutdown.notify.clone().notified_owned());
        let _ = n.as_mut().poll(cx);
        *stop = Some(n);
    }
    shutdown.is_on()
}

/// A response made by the proxy itself (errors, redirects).
fn simple_response(
    out: &mut Vec<u8>,
    minor: u8,
    status: StatusCode,
    body: &str,
    close: bool,
    location: Option<&str>,
    hsts: Option<&http::HeaderValue>,
) {
    out.extend_from_slice(if minor == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    push_u64(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    field(out, b"Content-Type", b"text/plain; charset=utf-8");
    out.extend_from_slice(b"Content-Length: ");
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if let Some(l) = location {
        field(out, b"Location", l.as_bytes());
    }
    if let Some(v) = hsts {
        field(out, b"Strict-Transport-Security", v.as_bytes());
    }
    if close {
        field(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
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
