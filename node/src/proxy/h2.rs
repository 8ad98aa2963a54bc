//! The h2 front end: hyper serves the connection (ALPN `h2`, or the h2
//! preface in clear text, handed over by [`super::h1`]), and each request
//! goes through the [`super::pipeline`] phases and out over hyper's
//! HTTP/1.1 client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, COOKIE, HOST};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::KeyValue;

use super::error::ProxyError;
use super::forwarded;
use super::limits::HostSlot;
use super::observe::{ReqFacts, Served};
use super::pipeline;
use super::routes::Route;
use super::upstream::{self, ConnectError, UploadBody, UpstreamState};
use super::{ConnInfo, Proxy, ProxyBody};
use crate::telemetry::otel;

/// The request's trace context (its server span), from `handle` to the
/// upstream call and the tunnel.
#[derive(Clone)]
struct TraceCx(opentelemetry::Context);

/// Which upstream answered, carried on the response from `forward` to the
/// access log.
#[derive(Clone)]
struct UpstreamUsed(Arc<str>);

/// What each request's service call needs: one `Arc` clone per request.
struct Connection {
    proxy: Arc<Proxy>,
    info: ConnInfo,
}

impl Proxy {
    /// Serves one h2 connection with hyper.
    pub(super) async fn serve_h2<I>(
        self: &Arc<Self>,
        builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
        watcher: hyper_util::server::graceful::Watcher,
        io: I,
        info: ConnInfo,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let conn = Arc::new(Connection {
            proxy: self.clone(),
            info,
        });
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.proxy.handle(req, &conn.info).await) }
        });
        let c = builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(c).await {
            log_connection_error(peer, &e);
        }
    }

    /// Proxies one request that came over h2; never fails (errors become
    /// responses). With telemetry set, counts it and writes its access-log
    /// line.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let Some(t) = self.telemetry.get().cloned() else {
            return self.handle_inner(req, conn).await.0;
        };
        let started = std::time::Instant::now();
        let facts = ReqFacts {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            authority: request_host(&req)
                .ok()
                .and_then(|h| h.to_str().ok().map(str::to_string))
                .unwrap_or_default(),
            proto: match req.version() {
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            traceparent: None,
            tracestate: None,
        };
        let mut req = req;
        let trace = t.tracing.as_ref().map(|tr| {
            let cx = Proxy::server_span(tr, req.headers(), &facts, conn, "2");
            req.extensions_mut().insert(TraceCx(cx.clone()));
            cx
        });
        let (mut resp, route, error) = self.handle_inner(req, conn).await;
        let status = resp.status().as_u16();
        let upstream = resp.extensions_mut().remove::<UpstreamUsed>();
        if let Some(cx) = &trace {
            self.end_server_span(
                cx,
                status,
                route.as_ref(),
                upstream.as_ref().map(|u| &u.0),
                error.as_ref(),
            );
        }
        self.record(Served {
            started,
            conn,
            facts: Some(&facts),
            status,
            route: route.as_ref(),
            upstream: upstream.as_ref().map(|u| &u.0),
            error: error.as_ref(),
            trace: trace.as_ref(),
        });
        resp
    }

    async fn handle_inner(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> (Response<ProxyBody>, Option<Arc<Route>>, Option<ProxyError>) {
        // The request's own Host value (a reference-count increment), not a
        // copy: it is also what Host and X-Forwarded-Host are set to.
        let host_value = match request_host(&req) {
            Ok(h) => h,
            Err(why) => {
                tracing::info!(client = %conn.peer, "bad request: {why}");
                let e = ProxyError::BadRequest(why);
                return (
                    answer_response(pipeline::Answer::error(&e), None),
                    None,
                    Some(e),
                );
            }
        };
        let Ok(host) = host_value.to_str() else {
            let e = ProxyError::BadRequest("invalid Host header");
            return (
                answer_response(pipeline::Answer::error(&e), None),
                None,
                Some(e),
            );
        };
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // Before phase 1: an ACME HTTP-01 answer (any host, never redirected).
        if let Some(a) = pipeline::acme_answer(target) {
            return (answer_response(a, None), None, None);
        }
        let route = match pipeline::route(&self.routes.load(), host) {
            Ok(r) => r,
            Err(err) => {
                // Debug only: scanners would flood the log (the access log
                // and the 4xx metrics still count them).
                tracing::debug!(host = %host, client = %conn.peer, "{err}");
                return (
                    answer_response(pipeline::Answer::error(&err), None),
                    None,
                    Some(err),
                );
            }
        };
        let hsts = pipeline::response_policy(Some(&route), conn);
        let mut policy_req = pipeline::PolicyRequest {
            host,
            target,
            fields: req.headers(),
            judged: None,
        };
        let held = loop {
            match pipeline::request_policy(self, &route, conn, &policy_req) {
                pipeline::Policy::Forward(held) => break held,
                pipeline::Policy::Answer(a) => {
                    return (answer_response(a, hsts), Some(route), None)
                }
                pipeline::Policy::Verify(v) => policy_req.judged = Some(v.run(&self.auth).await),
            }
        };
        // RFC 8441: an extended CONNECT (`:protocol`) is a WebSocket, or
        // something this proxy does not tunnel.
        let websocket = super::h2_websocket::extended_connect(&req)
            .map(|p| p.eq_ignore_ascii_case("websocket"));
        let forwarded = match websocket {
            None => self.forward(req, &route, &host_value, conn, held).await,
            Some(true) => self.websocket(req, &route, &host_value, conn, held).await,
            Some(false) => Err(ProxyError::NotImplemented(
                "extended CONNECT for a protocol other than websocket",
            )),
        };
        let (mut resp, error) = match forwarded {
            Ok(resp) => (resp, None),
            Err(e) => {
                tracing::warn!(host = %host, host_id = %route.host.id, client = %conn.peer, status = e.status().as_u16(), "{e}");
                (answer_response(pipeline::Answer::error(&e), None), Some(e))
            }
        };
        if let Some(v) = pipeline::response_policy(Some(&route), conn) {
            resp.headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, v.clone());
        }
        (resp, Some(route), error)
    }

    /// Forwards an h2 request over hyper's HTTP/1.1 client. `held` (its
    /// place under the host's per-client cap) goes with the response body,
    /// so the stream counts until its body has ended or it was reset.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        route: &Arc<Route>,
        host_value: &HeaderValue,
        conn: &ConnInfo,
        held: Option<HostSlot>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let h = &route.host;
        let pool = route.pool_for(req.uri().path());
        let affinity = pipeline::affinity(pool, conn, req.uri().path(), |name| {
            req.headers()
                .get_all(name)
                .into_iter()
                .map(|v| v.as_bytes())
        });
        let client_version = req.version();
        rewrite_request(&mut req, route, host_value, conn)?;
        let timeout = route.upstream_timeout;

        let tracing = self.telemetry.get().and_then(|t| t.tracing.as_ref());
        let trace_parent = req.extensions().get::<TraceCx>().map(|c| c.0.clone());
        req.extensions_mut().clear();

        let mut req = req.map(UploadBody::new);
        let mut last_err = None;
        // In flight until the response head is here: hyper streams the
        // body on after this returns (an h2 WebSocket takes the other
        // path, `forward_websocket`, whose lease lasts as long as its tunnel).
        for upstream in pipeline::choose(pool, affinity.key).await? {
            let _lease = match pipeline::lease(pool, upstream) {
                Ok(l) => l,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            if !h.preserve_host {
                if let Some(v) = &upstream.host_header {
                    req.headers_mut().insert(HOST, v.clone());
                }
            }
            let client_span = match (tracing, &trace_parent) {
                (Some(tr), Some(parent)) => {
                    let method = req.method().to_string();
                    Some(tr.child_span(
                        parent,
                        format!("{method} upstream"),
                        opentelemetry::trace::SpanKind::Client,
                        vec![
                            KeyValue::new("http.request.method", method),
                            KeyValue::new("server.address", upstream.url.authority().to_string()),
                            KeyValue::new("url.full", format!("{}{}", upstream.url, req.uri())),
                        ],
                        Some(req.headers_mut()),
                    ))
                }
                _ => None,
            };
            let sent = self.send(upstream, req, timeout).await;
            if let Some(cx) = &client_span {
                end_client_span(cx, &sent);
            }
            match sent {
                Ok((mut resp, sender)) => {
                    upstream.mark_up();
                    if self.telemetry.get().is_some() {
                        resp.extensions_mut()
                            .insert(UpstreamUsed(upstream.url_text.clone()));
                    }
                    *resp.version_mut() = client_version;
                    upstream.release(sender);
                    forwarded::remove_hop_by_hop(resp.headers_mut());
                    // Phase 5: the sticky cookie the balancer chose the
                    // upstream by, for a client that had none.
                    if let Some(cookie) = &affinity.set_cookie {
                        resp.headers_mut()
                            .append(http::header::SET_COOKIE, cookie.clone());
                    }
                    return Ok(resp.map(|body| Either::Left(HeldBody { body, _held: held })));
                }
                Err(SendError::Connect(r, e)) => {
                    req = *r;
                    let e = ProxyError::Unreachable {
                        upstream: upstream.url.to_string(),
                        source: e,
                    };
                    if !pipeline::attempt_failed(upstream, &e, self.config.failure_cooldown) {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
                Err(SendError::Timeout) => {
                    let e = ProxyError::Timeout {
                        upstream: upstream.url.to_string(),
                        timeout,
                    };
                    pipeline::attempt_failed(upstream, &e, self.config.failure_cooldown);
                    return Err(e);
                }
                Err(SendError::Failed(e)) => {
                    let e = ProxyError::Upstream {
                        upstream: upstream.url.to_string(),
                        source: e,
                    };
                    pipeline::attempt_failed(upstream, &e, self.config.failure_cooldown);
                    return Err(e);
                }
            }
        }
        Err(last_err.expect("a pool has at least one upstream"))
    }

    /// An RFC 8441 WebSocket: phase 3 as for any h2 request, then the
    /// upgrade and tunnel of [`super::h2_websocket`].
    async fn websocket(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        route: &Arc<Route>,
        host_value: &HeaderValue,
        conn: &ConnInfo,
        held: Option<HostSlot>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if !route.host.websocket {
            return Err(ProxyError::NotImplemented(
                "WebSockets are turned off for this host",
            ));
        }
        // Taken before the request is consumed: resolves to the stream once
        // the 200 has been sent.
        let client_stream = hyper::upgrade::on(&mut req);
        let trace_parent = req.extensions().get::<TraceCx>().map(|c| c.0.clone());
        rewrite_request(&mut req, route, host_value, conn)?;
        let (parts, _) = req.into_parts();
        let (mut resp, used) = self
            .forward_websocket(
                parts,
                (client_stream, held),
                route,
                host_value,
                conn,
                trace_parent,
            )
            .await?;
        if self.telemetry.get().is_some() {
            resp.extensions_mut().insert(UpstreamUsed(used));
        }
        Ok(resp)
    }

    /// Sends on a pooled connection (or a new one). A pooled connection that
    /// turns out closed hands the request back untouched and is replaced by
    /// a new connection; a connect failure also hands it back, so the caller
    /// can try the next upstream without losing the body.
    async fn send(
        &self,
        upstream: &Arc<UpstreamState>,
        mut req: Request<UploadBody>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, upstream::Sender), SendError> {
        loop {
            let (mut sender, reused) = match upstream.take_idle() {
                Some(s) => (s, true),
                None => match self.connector.connect(upstream, false).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(SendError::Connect(Box::new(req), e)),
                },
            };
            // The response timeout starts once the request body has been
            // sent: a slow upload is not a silent upstream.
            let uploaded = req.body().uploaded();
            let response = sender.try_send_request(req);
            let deadline = async move {
                uploaded.await;
                tokio::time::sleep(timeout).await;
            };
            let result = tokio::select! {
                biased;
                r = response => r,
                () = deadline => return Err(SendError::Timeout),
            };
            match result {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => {
                        req = r;
                        continue;
                    }
                    _ => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
    }
}

/// An upstream response body with the request's place under its host's
/// per-client cap: hyper drops it when the body has been sent, or the
/// stream was reset or the client left, which gives the place back.
pub struct HeldBody {
    body: Incoming,
    _held: Option<HostSlot>,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

enum SendError {
    /// The request comes back untouched, boxed to keep the enum small.
    Connect(Box<Request<UploadBody>>, ConnectError),
    Timeout,
    Failed(hyper::Error),
}

/// Phase 3 for h2: the request as it goes upstream over HTTP/1.1: the
/// origin-form target (h2 targets come with scheme and authority),
/// hop-by-hop fields out (`Expect` too: hyper answers it), cookies in one
/// field, `Host` when the host keeps the client's, the forwarded headers.
fn rewrite_request(
    req: &mut Request<Incoming>,
    route: &Route,
    host_value: &HeaderValue,
    conn: &ConnInfo,
) -> Result<(), ProxyError> {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() || uri.path_and_query().is_none() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    }
    *req.version_mut() = Version::HTTP_11;
    let h = &route.host;
    let headers = req.headers_mut();
    forwarded::remove_hop_by_hop(headers);
    headers.remove(http::header::EXPECT);
    join_cookies(headers);
    if h.preserve_host {
        headers.insert(HOST, host_value.clone());
    }
    if h.forwarded_headers {
        forwarded::set_forwarded(headers, &conn.facts, host_value);
    }
    Ok(())
}

/// Ends an attempt's client span with its outcome.
fn end_client_span(
    cx: &opentelemetry::Context,
    sent: &Result<(Response<Incoming>, upstream::Sender), SendError>,
) {
    match sent {
        Ok((resp, _)) => otel::end(
            cx,
            vec![KeyValue::new(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            )],
            None,
        ),
        Err(SendError::Connect(_, e)) => otel::end(cx, vec![], Some(e.to_string())),
        Err(SendError::Timeout) => otel::end(cx, vec![], Some("timeout".into())),
        Err(SendError::Failed(e)) => otel::end(cx, vec![], Some(e.to_string())),
    }
}

/// An answer of the proxy's own, as an h2 (hyper) response.
fn answer_response(a: pipeline::Answer, hsts: Option<&HeaderValue>) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(a.body))));
    *resp.status_mut() = a.status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(l) = a.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(http::header::LOCATION, l);
    }
    if let Some(v) = hsts {
        headers.insert(http::header::STRICT_TRANSPORT_SECURITY, v.clone());
    }
    if let Some((name, value)) = a.header {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    resp
}

/// The host a request is for: the target's authority when it has one
/// (h2 `:authority`, HTTP/1.1 absolute-form, which wins over `Host` per
/// RFC 9112 §3.2.2), else the one `Host` header. Two `Host` headers are
/// refused (RFC 9112 §3.2): an upstream reading the other one would
/// disagree with us about whose request this is.
fn request_host(req: &Request<Incoming>) -> Result<HeaderValue, &'static str> {
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).map_err(|_| "invalid request target");
    }
    let mut values = req.headers().get_all(HOST).iter();
    match (values.next(), values.next()) {
        (None, _) => Err("missing Host header"),
        (Some(_), Some(_)) => Err("more than one Host header"),
        (Some(v), None) => match v.to_str() {
            Ok(h) if !h.is_empty() => Ok(v.clone()),
            _ => Err("invalid Host header"),
        },
    }
}

/// h2 may split cookies over several fields; HTTP/1.1 needs one
/// (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut http::HeaderMap) {
    if headers.get_all(COOKIE).iter().count() > 1 {
        let joined: Vec<&str> = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if let Ok(v) = HeaderValue::from_str(&joined.join("; ")) {
            headers.insert(COOKIE, v);
        }
    }
}

fn log_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    match e.downcast_ref::<hyper::Error>() {
        // hyper has already answered 400 (or 431) to a malformed request.
        Some(he) if he.is_parse() || he.is_parse_too_large() => {
            tracing::info!(client = %peer, error = %he, "malformed request refused with 400");
        }
        _ => tracing::debug!(client = %peer, error = %e, "client connection ended with an error"),
    }
}
