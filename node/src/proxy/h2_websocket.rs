//! WebSockets over h2 (RFC 8441). An h2 client opens a WebSocket as an
//! extended CONNECT stream (`:method = CONNECT`, `:protocol = websocket`,
//! offered only when the node advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`,
//! `--h2-websockets`). The request has gone through the same phases as any
//! other ([`super::h2`]'s `handle_inner`: route, request policy, rewrite,
//! then this file for the attempts, then response policy and record); here it
//! becomes an HTTP/1.1 upgrade to the upstream — upstreams speak WebSocket
//! over HTTP/1.1, and the architecture never sends an upgrade upstream over
//! h2 — with a key the proxy makes and an accept it checks
//! ([`super::tunnel::handshake`]). The upstream's 101 becomes a 200 on the
//! stream; its refusal goes back with its status. The stream and the
//! upstream connection are then a tunnel like an HTTP/1.1 one: the same
//! frame-aware relay, registry, drain (Close 1001 inside the stream, then
//! the end of the stream) and telemetry ([`super::tunnel`]).
//!
//! The h2 connection itself stays open through a drain for as long as it
//! carries tunnels: hyper's graceful shutdown sends GOAWAY (no new
//! streams) and ends the connection once its streams, tunnels included,
//! have ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::error::ProxyError;
use super::limits::HostSlot;
use super::pipeline;
use super::routes::Route;
use super::tunnel::handshake;
use super::upstream::{Lease, RawConn, UpstreamState};
use super::wire::{self, Framing, Prefixed, Read};
use super::{ConnInfo, Proxy, ProxyBody};

/// Most bytes of an upstream's answer head, and of a refusal's body that
/// is passed on (a longer or chunked refusal body is left out: the status
/// is what a WebSocket client acts on).
const MAX_ANSWER: usize = 64 * 1024;
/// Most fields in an upstream's answer head.
const MAX_FIELDS: usize = 100;

/// The `:protocol` of an RFC 8441 extended CONNECT, `None` for any other
/// request. (hyper and h2 accept `:protocol` only when the node
/// advertised extended CONNECT.)
pub(super) fn extended_connect(req: &Request<Incoming>) -> Option<&str> {
    if req.method() != http::Method::CONNECT {
        return None;
    }
    req.extensions()
        .get::<hyper::ext::Protocol>()
        .map(hyper::ext::Protocol::as_str)
}

/// The upstream's answer to the upgrade, its head parsed and owned; the
/// connection (with any bytes read past the head) stays in the `RawConn`.
struct Answer {
    status: u16,
    fields: HeaderMap,
    framing: Framing,
}

impl Answer {
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.fields
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Proxy {
    /// Phases 3 and 4 for a WebSocket over h2: the HTTP/1.1 upgrade to
    /// each upstream of the pool in attempt order (a refused connect tries
    /// the next one, as every request does), then the 200 that opens the
    /// tunnel, or the upstream's refusal.
    ///
    /// `parts` is the request as phase 3 ([`super::h2`]'s
    /// `rewrite_request`) left it; `client_stream` resolves to the h2
    /// stream once the 200 is out; `trace_parent` is the request's server
    /// span. Returns the answer and the upstream that gave it.
    pub(super) async fn forward_websocket(
        self: &Arc<Self>,
        parts: http::request::Parts,
        (client_stream, held): (hyper::upgrade::OnUpgrade, Option<HostSlot>),
        route: &Arc<Route>,
        host_value: &HeaderValue,
        conn: &ConnInfo,
        trace_parent: Option<opentelemetry::Context>,
    ) -> Result<(Response<ProxyBody>, Arc<str>), ProxyError> {
        let pool = route.pool_for(parts.uri.path());
        let affinity = pipeline::affinity(pool, conn, parts.uri.path(), |name| {
            parts
                .headers
                .get_all(name)
                .into_iter()
                .map(|v| v.as_bytes())
        });
        let path_q = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let key = handshake::new_key();
        let mut last_err = None;
        for upstream in pipeline::choose(pool, affinity.key).await? {
            // Counts against the upstream while the upgrade is in flight,
            // then for the tunnel's life (least-conn, caps).
            let lease = match pipeline::lease(pool, upstream) {
                Ok(l) => l,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let host = match (&upstream.host_header, route.host.preserve_host) {
                (Some(h), false) => h,
                _ => host_value,
            };
            let mut fields = parts.headers.clone();
            let attempt_span = self.attempt_span(trace_parent.as_ref(), upstream, &mut fields);
            let head = upgrade_head(path_q, host, &fields, &key);
            let opened = self
                .open_upgrade(upstream, &head, route.upstream_timeout)
                .await;
            if let Some(cx) = &attempt_span {
                let status = opened.as_ref().map(|(_, a)| a.status);
                let error = opened.as_ref().err().map(|e| e.to_string());
                crate::telemetry::otel::end(
                    cx,
                    vec![opentelemetry::KeyValue::new(
                        "http.response.status_code",
                        i64::from(status.unwrap_or(0)),
                    )],
                    error,
                );
            }
            match opened {
                Ok((raw, answer)) => {
                    upstream.mark_up();
                    let resp = match answer.status {
                        101 => {
                            check_switch(&answer, &key, upstream)?;
                            let mut resp = switched_response(&answer);
                            // Phase 5: the sticky cookie of cookie mode.
                            if let Some(cookie) = &affinity.set_cookie {
                                resp.headers_mut()
                                    .append(http::header::SET_COOKIE, cookie.clone());
                            }
                            let tunnel = Switched {
                                raw,
                                route: route.clone(),
                                upstream: upstream.clone(),
                                conn: conn.clone(),
                                lease: lease.into_tunnel(),
                                held,
                            };
                            self.start_tunnel(
                                client_stream,
                                tunnel,
                                trace_parent.as_ref(),
                                &answer,
                            );
                            resp
                        }
                        200..=299 => {
                            return Err(ProxyError::UpstreamBad {
                                upstream: upstream.url.to_string(),
                                why: "answered a WebSocket upgrade with a success other than 101",
                            })
                        }
                        _ => refusal_response(raw, answer, route.upstream_timeout).await,
                    };
                    return Ok((resp, upstream.url_text.clone()));
                }
                Err(e) => {
                    if !pipeline::attempt_failed(upstream, &e, self.config.failure_cooldown) {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("a pool has at least one upstream"))
    }

    /// The client span of one upstream attempt, its context injected into
    /// the upgrade's fields, when tracing is on.
    fn attempt_span(
        &self,
        parent: Option<&opentelemetry::Context>,
        upstream: &UpstreamState,
        fields: &mut HeaderMap,
    ) -> Option<opentelemetry::Context> {
        let tr = self.telemetry.get()?.tracing.as_ref()?;
        Some(tr.child_span(
            parent?,
            "GET upstream".to_string(),
            opentelemetry::trace::SpanKind::Client,
            vec![
                opentelemetry::KeyValue::new("http.request.method", "GET"),
                opentelemetry::KeyValue::new(
                    "server.address",
                    upstream.url.authority().to_string(),
                ),
            ],
            Some(fields),
        ))
    }

    /// A new connection to `upstream`, the upgrade head written and the
    /// answer's head read, all within `timeout` once connected (the
    /// connect has its own).
    async fn open_upgrade(
        &self,
        upstream: &UpstreamState,
        head: &[u8],
        timeout: Duration,
    ) -> Result<(RawConn, Answer), ProxyError> {
        let mut raw = self
            .connector
            .connect_raw(upstream)
            .await
            .map_err(|source| ProxyError::Unreachable {
                upstream: upstream.url.to_string(),
                source,
            })?;
        let exchange = async {
            raw.io.write_all(head).await?;
            raw.io.flush().await?;
            read_answer(&mut raw).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) => Ok((raw, answer)),
            Ok(Err(AnswerError::Io(source))) => Err(ProxyError::UpstreamIo {
                upstream: upstream.url.to_string(),
                source,
            }),
            Ok(Err(AnswerError::Bad(why))) => Err(ProxyError::UpstreamBad {
                upstream: upstream.url.to_string(),
                why,
            }),
            Err(_) => Err(ProxyError::Timeout {
                upstream: upstream.url.to_string(),
                timeout,
            }),
        }
    }

    /// Once the 200 has gone out on the stream (hyper then hands the
    /// stream over), the stream and the upstream connection become a
    /// tunnel ([`Proxy::spawn_tunnel`], as for HTTP/1.1).
    fn start_tunnel(
        self: &Arc<Self>,
        client_stream: hyper::upgrade::OnUpgrade,
        t: Switched,
        parent: Option<&opentelemetry::Context>,
        answer: &Answer,
    ) {
        let span = self.tunnel_span(
            parent,
            &t.route.host.name,
            &t.upstream,
            &t.conn,
            answer.text("sec-websocket-protocol"),
            answer.text("sec-websocket-extensions"),
        );
        let proxy = self.clone();
        tokio::spawn(async move {
            match client_stream.await {
                Ok(stream) => {
                    let RawConn { io, mut buf } = t.raw;
                    let up = Prefixed::new(buf.take(), io);
                    proxy.spawn_tunnel(
                        (&t.route.id, &t.route.name),
                        t.route.tunnel,
                        (&t.upstream, Some(t.lease), t.held),
                        &t.conn,
                        (TokioIo::new(stream), up),
                        span,
                    );
                }
                Err(e) => {
                    tracing::debug!(client = %t.conn.peer, error = %e, "h2 stream ended before its tunnel started");
                    if let Some(cx) = &span {
                        crate::telemetry::otel::end(cx, vec![], Some(e.to_string()));
                    }
                }
            }
        });
    }
}

/// What a tunnel is made of once the upstream switched protocols.
struct Switched {
    raw: RawConn,
    route: Arc<Route>,
    upstream: Arc<UpstreamState>,
    conn: ConnInfo,
    lease: Lease,
    /// The place under the host's per-client cap, held by the tunnel.
    held: Option<HostSlot>,
}

/// The HTTP/1.1 upgrade request for an h2 WebSocket: the client's fields
/// as phase 3 left them (hop-by-hop out, forwarded headers in; names in
/// h2's lower case, as the client spelled them), with `Host`, the
/// upgrade fields and the proxy's key in their usual spelling (some
/// upstreams compare names case-sensitively). `Sec-WebSocket-Version`,
/// `-Protocol`, `-Extensions` and `Origin` pass through as sent.
fn upgrade_head(path_q: &str, host: &HeaderValue, fields: &HeaderMap, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path_q.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut version = false;
    for (name, value) in fields {
        if name == HOST
            || name == CONTENT_LENGTH
            || name == "sec-websocket-key"
            || name == "sec-websocket-accept"
        {
            continue;
        }
        version |= name == "sec-websocket-version";
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !version {
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    }
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

enum AnswerError {
    Io(std::io::Error),
    Bad(&'static str),
}

impl From<std::io::Error> for AnswerError {
    fn from(e: std::io::Error) -> Self {
        AnswerError::Io(e)
    }
}

/// Reads the upstream's answer head (interim 1xx heads other than 101 are
/// skipped), leaving what follows it in `raw.buf`.
async fn read_answer(raw: &mut RawConn) -> Result<Answer, AnswerError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match wire::response::parse(raw.buf.bytes(), &mut fields, false) {
            Ok(Some(h)) => {
                let len = h.len;
                let answer = (!h.is_interim()).then(|| Answer {
                    status: h.status,
                    fields: h
                        .fields
                        .iter()
                        .filter_map(|f| {
                            Some((
                                HeaderName::from_bytes(f.name.as_bytes()).ok()?,
                                HeaderValue::from_bytes(f.value).ok()?,
                            ))
                        })
                        .collect(),
                    framing: h.framing,
                });
                raw.buf.consume(len);
                if let Some(a) = answer {
                    return Ok(a);
                }
                continue;
            }
            Ok(None) if raw.buf.len() >= MAX_ANSWER => {
                return Err(AnswerError::Bad("response head too large"))
            }
            Ok(None) => {}
            Err(why) => return Err(AnswerError::Bad(why)),
        }
        match wire::read_into(&mut raw.io, &mut raw.buf, None, None).await {
            Read::Data(_) => {}
            Read::Err(e) => return Err(AnswerError::Io(e)),
            _ => return Err(AnswerError::Bad("closed before answering the upgrade")),
        }
    }
}

/// A 101 must be a WebSocket upgrade with the accept for the proxy's key:
/// anything else would be a tunnel the client cannot trust (RFC 6455
/// §4.1).
fn check_switch(answer: &Answer, key: &str, upstream: &UpstreamState) -> Result<(), ProxyError> {
    let why = if !answer.has_token("upgrade", "websocket") {
        "101 without Upgrade: websocket"
    } else if answer.text("sec-websocket-accept") != Some(handshake::accept_for(key).as_str()) {
        "101 without the Sec-WebSocket-Accept for the proxy's key"
    } else {
        return Ok(());
    };
    Err(ProxyError::UpstreamBad {
        upstream: upstream.url.to_string(),
        why,
    })
}

/// The 200 that opens the tunnel on the h2 stream: the 101's fields but
/// the connection-level ones (hop-by-hop, and the accept, which answers
/// the proxy's key, not the client). `Sec-WebSocket-Protocol` and
/// `-Extensions` pass through unchanged.
fn switched_response(answer: &Answer) -> Response<ProxyBody> {
    let mut fields = answer.fields.clone();
    super::forwarded::remove_hop_by_hop(&mut fields);
    fields.remove("sec-websocket-accept");
    fields.remove(CONTENT_LENGTH);
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.headers_mut() = fields;
    resp
}

/// The upstream's refusal (its status, fields and a short body) as the
/// answer on the stream; the upstream connection is closed after it.
async fn refusal_response(
    mut raw: RawConn,
    answer: Answer,
    timeout: Duration,
) -> Response<ProxyBody> {
    let mut body = Vec::new();
    if let Framing::Length(n) = answer.framing {
        let n = n as usize;
        let read_body = async {
            while raw.buf.len() < n {
                if !matches!(
                    wire::read_into(&mut raw.io, &mut raw.buf, None, None).await,
                    Read::Data(_)
                ) {
                    return;
                }
            }
        };
        if n <= MAX_ANSWER
            && tokio::time::timeout(timeout, read_body).await.is_ok()
            && raw.buf.len() >= n
        {
            body.extend_from_slice(&raw.buf.bytes()[..n]);
        }
    }
    let mut fields = answer.fields;
    super::forwarded::remove_hop_by_hop(&mut fields);
    fields.remove(CONTENT_LENGTH);
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = fields;
    resp
}
