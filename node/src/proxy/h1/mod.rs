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
//! this front end calls; heads over 64 KiB get 431 here.

use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Context;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;

mod answers;
mod exchange;
mod request;
mod response;

use request::{head_end, Stop, H};

use super::limits::HostSlot;
use super::observe::ReqFacts;
use super::routes::Route;
use super::shutdown::{stop_requested, Shutdown};
use super::upstream::{Lease, RawConn, UpstreamState};
use super::wire::{read_into, Buf, Prefixed, Read};
use super::{ConnInfo, Proxy};

/// Longest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
const MAX_HEADERS: usize = super::wire::request::MAX_HEADERS;
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
                lease,
                held,
            } = *t;
            let client = Prefixed::new(c.buf.take(), c.io);
            let RawConn { io, mut buf } = conn;
            let up = Prefixed::new(buf.take(), io);
            c.proxy.spawn_tunnel(
                (&route.id, &route.name),
                route.tunnel,
                (&upstream, lease, held),
                &c.info,
                (client, up),
                span,
            );
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
    /// Counts the tunnel against its upstream (set by `exchange`).
    lease: Option<Lease>,
    /// Its place under the host's per-client cap.
    held: Option<HostSlot>,
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

            // 2. Parse, route, and write the upstream head's fields (again,
            // once credentials it carries have been verified off the
            // runtime: rare, a credential's verdict is remembered).
            let mut judged = None;
            let parsed = loop {
                match self.parse(head_len, judged) {
                    Err(Stop::Verify(v)) => {
                        judged = Some(Box::pin(v.run(&self.proxy.auth)).await);
                    }
                    Err(Stop::Refuse(r)) => break Err(r),
                    Ok(r) => break Ok(r),
                }
            };
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

    /// Whether responses must say `Connection: close` now.
    fn closing(&self) -> bool {
        self.shutdown.is_on() || self.proxy.draining.load(Ordering::Relaxed)
    }
}

enum Step {
    KeepAlive,
    Close,
    Tunnel(Box<Tunnel>),
}
