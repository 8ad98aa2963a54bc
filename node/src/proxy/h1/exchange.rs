//! One request's way to an upstream: the pipeline's attempts phase over
//! the route's pool (failover on a refused connect, a stale pooled
//! connection replaced), the request head and body sent, the response head
//! read; then [`super::response`] takes over.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::answers::{field, Refusal};
use super::request::{Method, Req};
use super::response::{HeadError, RespHead};
use super::{Client, Step, INLINE_BODY};
use crate::proxy::error::ProxyError;
use crate::proxy::observe::ReqFacts;
use crate::proxy::pipeline;
use crate::proxy::upstream::{RawConn, UpstreamIo, UpstreamState};
use crate::proxy::wire::{copy_body, Coding, CopyError, Framing};
use crate::proxy::Proxy;
use crate::telemetry::otel;

/// The upstream end of a request body being streamed. An upstream may
/// answer before the body's end (413, 401, a redirect) and stop reading;
/// a proxy that kept writing would wait on it until a timeout and answer
/// 502. So before each write this looks, without reading, whether the
/// upstream has begun to answer, and if it has, fails the write with
/// `answered` set: the body stops and the answer is read (RFC 9112 asks a
/// client sending a body to watch for an error response meanwhile).
pub(super) struct Heard<'a> {
    pub(super) io: &'a mut UpstreamIo,
    pub(super) answered: bool,
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

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Phase 4 for HTTP/1: sends the request to an upstream (the pool's
    /// next when `pipeline::attempt_failed` says so), then hands the
    /// response to `respond`, or answers the failure.
    pub(super) async fn exchange(&mut self, req: Req, started: Instant) -> Step {
        let proxy = self.proxy.clone();
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
        let pool = req.pool.clone();
        let order = match pipeline::choose(&pool, req.affinity).await {
            Ok(order) => order,
            Err(e) => {
                last_err = Some(e);
                crate::proxy::upstream::AttemptOrder::none()
            }
        };
        'upstreams: for upstream in order {
            let lease = match pipeline::lease(&pool, upstream) {
                Ok(l) => l,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let mut pooled = true;
            loop {
                let (conn, reused) = match pooled.then(|| upstream.take_raw()).flatten() {
                    Some(c) => (c, true),
                    None => match proxy.connector.connect_raw(upstream).await {
                        Ok(c) => (c, false),
                        Err(e) => {
                            let e = ProxyError::Unreachable {
                                upstream: upstream.url.to_string(),
                                source: e,
                            };
                            let cooldown = proxy.config.failure_cooldown;
                            let next = pipeline::attempt_failed(upstream, &e, cooldown);
                            last_err = Some(e);
                            if next {
                                continue 'upstreams;
                            }
                            break 'upstreams;
                        }
                    },
                };
                pooled = false;
                let span = match (tracing, &server_cx) {
                    (Some(tr), Some(parent)) => Some(self.client_span(tr, parent, &req, upstream)),
                    _ => None,
                };
                let sent = Sent {
                    reused,
                    buffered_body,
                };
                let attempt = self
                    .attempt(&req, upstream, conn, sent, &mut body_read, span.as_ref())
                    .await;
                if let Some((cx, _)) = &span {
                    let (status, err) = match &attempt {
                        Attempt::Answered(_, head) => (Some(head.status), None),
                        Attempt::Stale(why) | Attempt::ClientGone(why) => (None, Some(why.clone())),
                        Attempt::Failed(_, why) => (None, Some(why.clone())),
                    };
                    let attrs = status
                        .map(|s| vec![KeyValue::new("http.response.status_code", i64::from(s))])
                        .unwrap_or_default();
                    otel::end(cx, attrs, err);
                }
                match attempt {
                    Attempt::Answered(conn, head) => {
                        upstream.mark_up();
                        outcome = Some((lease, conn, head));
                        break 'upstreams;
                    }
                    Attempt::Stale(_) => continue,
                    Attempt::ClientGone(_) => return Step::Close,
                    Attempt::Failed(e, _) => {
                        last_err = Some(e);
                        break 'upstreams;
                    }
                }
            }
        }
        match outcome {
            Some((lease, conn, head)) => {
                let upstream = lease.upstream().clone();
                let mut step = self
                    .respond(req, started, upstream, conn, head, server_cx)
                    .await;
                // A tunnel keeps counting against its upstream while it
                // is open; a request stops here.
                if let Step::Tunnel(t) = &mut step {
                    t.lease = Some(lease.into_tunnel());
                }
                step
            }
            None => {
                if let (false, Some(n)) = (body_read, buffered_body) {
                    self.buf.consume(n);
                    body_read = true;
                }
                let e = last_err.expect("a pool has at least one upstream");
                self.answer_failure(req, e, body_read, server_cx, started)
                    .await
            }
        }
    }

    /// One attempt on one upstream connection: the head (with a small body
    /// already here) in one write, the rest of the body streamed, the
    /// response head read.
    async fn attempt(
        &mut self,
        req: &Req,
        upstream: &Arc<UpstreamState>,
        mut conn: RawConn,
        sent: Sent,
        body_read: &mut bool,
        span: Option<&(opentelemetry::Context, http::HeaderMap)>,
    ) -> Attempt {
        let url = || upstream.url.to_string();
        self.write_request_head(req, upstream, span.map(|s| &s.1), sent.buffered_body);
        let wrote = async {
            conn.io.write_all(&self.out).await?;
            conn.io.flush().await
        }
        .await;
        if let Err(e) = wrote {
            if sent.reused && sent.buffered_body.is_some() {
                return Attempt::Stale(e.to_string()); // a stale pooled connection
            }
            let why = e.to_string();
            let e = ProxyError::UpstreamIo {
                upstream: url(),
                source: e,
            };
            return Attempt::Failed(e, why);
        }
        // The rest of the body, streamed. A body sent whole with the head
        // is consumed once a response has come: until then it may have to
        // be sent again on a new connection.
        if sent.buffered_body.is_none() {
            match self.send_body(req, upstream, &mut conn).await {
                Ok(true) => *body_read = true,
                Ok(false) => {}
                Err((Some(e), why)) => return Attempt::Failed(e, why),
                // The client went away or stalled mid-body: nobody to answer.
                Err((None, why)) => return Attempt::ClientGone(why),
            }
        }
        // The response head, after any 1xx.
        let timeout = req.route.upstream_timeout;
        let head_only = req.method == Method::Head;
        let got = self
            .read_response_head(&mut conn, timeout, head_only, req.minor == 1)
            .await;
        match got {
            Ok(mut head) => {
                if let (false, Some(n)) = (*body_read, sent.buffered_body) {
                    self.buf.consume(n);
                    *body_read = true;
                }
                if !*body_read {
                    // An early answer: the upstream still expects the rest
                    // of the body, the client is still sending it.
                    head.reusable = false;
                    head.linger = true;
                }
                Attempt::Answered(conn, head)
            }
            Err(HeadError::Closed) if sent.reused && sent.buffered_body.is_some() => {
                Attempt::Stale("closed".into())
            }
            Err(HeadError::ClientGone) => Attempt::ClientGone("client went away".into()),
            Err(e) => {
                let why = e.to_string();
                let e = head_error(e, url(), timeout);
                let cooldown = self.proxy.config.failure_cooldown;
                pipeline::attempt_failed(upstream, &e, cooldown);
                Attempt::Failed(e, why)
            }
        }
    }

    /// The upstream request head into `out`: the request line and fields
    /// made by `parse`, `Host` for this upstream, the client span's trace
    /// context, and the body when it is here whole and small.
    fn write_request_head(
        &mut self,
        req: &Req,
        upstream: &UpstreamState,
        inject: Option<&http::HeaderMap>,
        buffered_body: Option<usize>,
    ) {
        self.out.clear();
        self.out.extend_from_slice(&self.line);
        match (req.route.host.preserve_host, &upstream.host_header) {
            (false, Some(v)) => field(&mut self.out, b"Host", v.as_bytes()),
            _ => field(&mut self.out, b"Host", &self.host),
        }
        self.out.extend_from_slice(&self.fields);
        for (k, v) in inject.into_iter().flatten() {
            field(&mut self.out, k.as_str().as_bytes(), v.as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        if let Some(n) = buffered_body {
            self.out.extend_from_slice(&self.buf.bytes()[..n]);
        }
    }

    /// Streams the request body to the upstream (after `100 Continue` when
    /// the client waits for it). `Ok(true)`: all sent; `Ok(false)`: the
    /// upstream answered before the body's end (the answer is read next,
    /// the rest of the body is not sent, and neither connection is
    /// reused); `Err`: the error for the client (none when the client is
    /// the one that failed) and what to say on the span.
    async fn send_body(
        &mut self,
        req: &Req,
        upstream: &UpstreamState,
        conn: &mut RawConn,
    ) -> Result<bool, (Option<ProxyError>, String)> {
        if req.expect_continue {
            let _ = self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            let _ = self.io.flush().await;
        }
        let mut sink = Heard {
            io: &mut conn.io,
            answered: false,
        };
        let body_timeout = self.proxy.config.header_read_timeout;
        let r = copy_body(
            &mut self.io,
            &mut self.buf,
            &mut sink,
            req.framing,
            Coding::AsIs,
            &mut self.timer,
            body_timeout,
        )
        .await;
        if sink.answered {
            tracing::debug!(host = %req.route.name, upstream = %upstream.url, "upstream answered before the request body's end");
            return Ok(false);
        }
        let url = || upstream.url.to_string();
        r.map(|_| true).map_err(|e| match e {
            CopyError::Sink(e) => {
                let why = e.to_string();
                let e = ProxyError::UpstreamIo {
                    upstream: url(),
                    source: e,
                };
                (Some(e), why)
            }
            CopyError::Source(e) => (None, format!("client: {e}")),
            CopyError::SourceTimedOut => (None, "client stalled".to_string()),
            CopyError::SinkTimedOut => {
                let e = ProxyError::Timeout {
                    upstream: url(),
                    timeout: body_timeout,
                };
                (Some(e), "upstream stopped reading the body".to_string())
            }
            CopyError::Invalid(w) => (Some(ProxyError::BadRequest(w)), w.to_string()),
        })
    }

    /// The error page for a request no upstream answered properly (phases
    /// 5 and 6 of a failure).
    async fn answer_failure(
        &mut self,
        req: Req,
        e: ProxyError,
        body_read: bool,
        server_cx: Option<opentelemetry::Context>,
        started: Instant,
    ) -> Step {
        let h = &req.route.host;
        tracing::warn!(host = %h.name, host_id = %h.id, client = %self.info.peer, status = e.status().as_u16(), "{e}");
        let status = e.status();
        let close = !body_read || !req.keep_alive;
        let r = Refusal::upstream(e, &req.route, close, req.facts);
        let close = r.close;
        if let Some(cx) = &server_cx {
            let route = Some(&req.route);
            let status = status.as_u16();
            self.proxy
                .end_server_span(cx, status, route, None, r.error.as_ref());
        }
        let sent = self.refuse(r, started).await;
        if close || !sent {
            Step::Close
        } else {
            Step::KeepAlive
        }
    }

    /// The client span of one attempt, and the trace context to send
    /// upstream with it.
    fn client_span(
        &self,
        tr: &otel::Tracing,
        parent: &opentelemetry::Context,
        req: &Req,
        upstream: &UpstreamState,
    ) -> (opentelemetry::Context, http::HeaderMap) {
        let method = req.facts.as_ref().map_or("", |f| f.method.as_str());
        // The request line's target: between the method and " HTTP/1.1\r\n".
        let start = self
            .line
            .iter()
            .position(|&b| b == b' ')
            .map_or(0, |p| p + 1);
        let target = String::from_utf8_lossy(&self.line[start..self.line.len().saturating_sub(11)]);
        let mut inject = http::HeaderMap::new();
        let cx = tr.child_span(
            parent,
            format!("{method} upstream"),
            opentelemetry::trace::SpanKind::Client,
            vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("server.address", upstream.url.authority().to_string()),
                KeyValue::new("url.full", format!("{}{target}", upstream.url)),
            ],
            Some(&mut inject),
        );
        (cx, inject)
    }

    pub(super) fn server_span(&self, tr: &otel::Tracing, f: &ReqFacts) -> opentelemetry::Context {
        let mut carrier = http::HeaderMap::new();
        if let Some(v) = &f.traceparent {
            carrier.insert("traceparent", v.clone());
        }
        if let Some(v) = &f.tracestate {
            carrier.insert("tracestate", v.clone());
        }
        Proxy::server_span(tr, &carrier, f, &self.info, "1.1")
    }
}

/// How a pooled connection was used for an attempt.
#[derive(Clone, Copy)]
struct Sent {
    /// It came from the pool (so it may turn out closed).
    reused: bool,
    /// The body's length when it is here whole and goes with the head.
    buffered_body: Option<usize>,
}

/// How one attempt on one upstream connection ended; the strings are what
/// the attempt's span says.
enum Attempt {
    Answered(RawConn, RespHead),
    /// A pooled connection turned out closed with the request still whole:
    /// the same upstream is tried on a new connection.
    Stale(String),
    /// Nobody to answer: the client went away or stalled mid-body.
    ClientGone(String),
    Failed(ProxyError, String),
}

/// The error a failed response-head read means for the client.
fn head_error(e: HeadError, upstream: String, timeout: std::time::Duration) -> ProxyError {
    match e {
        HeadError::TimedOut => ProxyError::Timeout { upstream, timeout },
        HeadError::Io(source) => ProxyError::UpstreamIo { upstream, source },
        HeadError::Closed | HeadError::ClientGone => ProxyError::UpstreamIo {
            upstream,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ),
        },
        HeadError::Invalid(why) => ProxyError::UpstreamBad { upstream, why },
    }
}
