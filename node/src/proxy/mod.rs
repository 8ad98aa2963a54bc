//! The HTTP/WebSocket reverse proxy.
//!
//! Request path: Host/`:authority` → [`routes::RouteTable`] (an `Arc`
//! snapshot, never redb) → location → [`upstream::Pool`] → forwarded over a
//! pooled HTTP/1.1 connection.
//!
//! HTTP/1.x clients are served by [`h1`], the proxy's own HTTP/1 path
//! (WebSocket upgrades included: after the upstream's 101 both connections
//! are handed to [`relay::relay`]). h2 clients (ALPN `h2`, or the h2
//! preface in clear text) are served by hyper, and forwarded through
//! hyper's HTTP/1.1 client.
//!
//! The bytes on the wire (head parsing, framing, the chunked coding, field
//! lines, what is refused) are [`wire`]'s, a layer that knows no policy.

pub mod error;
pub mod forwarded;
pub mod frames;
pub mod h1;
pub mod pipeline;
pub mod relay;
pub mod routes;
pub mod tunnels;
pub mod upstream;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;

use opentelemetry::KeyValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::otel;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, COOKIE, HOST};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::store::HostSet;
use crate::tls::{AcceptError, TlsTerminator};
use error::ProxyError;
use forwarded::{Cidr, ClientFacts};
use routes::{Route, RouteTable};
use tunnels::TunnelRegistry;
use upstream::{ConnectError, Connector, UploadBody, UpstreamRegistry, UpstreamState};

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Proxy settings that are node-wide (per-host ones live on the host).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Peers whose X-Forwarded-* headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Time allowed for an upstream's response headers (hosts may override).
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long an upstream that refused or timed out is skipped.
    pub failure_cooldown: Duration,
    /// Time allowed for a client to send request headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Port that `force_https` redirects to (the HTTPS listener's); 443 is
    /// left out of the URL.
    pub https_port: u16,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            trusted_proxies: Vec::new(),
            upstream_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            failure_cooldown: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            https_port: 443,
        }
    }
}

/// The request's trace context (its server span), from `handle` to the
/// upstream call and the tunnel.
#[derive(Clone)]
struct TraceCx(opentelemetry::Context);

/// Which upstream answered, carried on the response from `forward` to the
/// access log.
#[derive(Clone)]
struct UpstreamUsed(Arc<str>);

/// One request's outcome, for its metrics and access-log line.
struct Served<'a> {
    started: std::time::Instant,
    conn: &'a ConnInfo,
    facts: Option<&'a h1::ReqFacts>,
    status: u16,
    route: Option<&'a Arc<Route>>,
    upstream: Option<&'a Arc<str>>,
    error: Option<&'a ProxyError>,
    trace: Option<&'a opentelemetry::Context>,
}

/// Facts about one accepted client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `peer` as text, for access-log lines: formatted once per connection
    /// rather than per request.
    pub peer_text: Arc<str>,
    pub local: SocketAddr,
    pub tls: bool,
    /// Its forwarded-header values, formatted once for all its requests.
    pub facts: ClientFacts,
}

/// What each request's service call needs: one `Arc` clone per request.
struct Connection {
    proxy: Arc<Proxy>,
    info: ConnInfo,
}

pub struct Proxy {
    routes: ArcSwap<RouteTable>,
    registry: UpstreamRegistry,
    connector: Connector,
    pub tunnels: Arc<TunnelRegistry>,
    config: ProxyConfig,
    /// Open client connections (HTTP/1.1 and h2; a connection that became a
    /// tunnel counts as a tunnel instead).
    http_conns: Arc<AtomicUsize>,
    /// Bumped to cut every open connection and tunnel at once: the last
    /// step of a drain, after the final grace.
    cut_epoch: AtomicU64,
    /// Wakes every connection task at a cut (each registers once).
    cut_notify: Arc<tokio::sync::Notify>,
    cut_count: AtomicU64,
    /// While draining, every HTTP/1.x response says `Connection: close`, so
    /// keep-alive clients go elsewhere for their next request instead of
    /// racing the listener's close.
    draining: AtomicBool,
    /// Metrics, access log and traces; unset in tests of the proxy alone.
    telemetry: std::sync::OnceLock<Arc<crate::telemetry::Telemetry>>,
    /// The host label of requests no host matched (made once, not per
    /// request).
    no_host: Arc<str>,
}

/// Counts one open connection for as long as it lives.
struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    fn new(n: &Arc<AtomicUsize>) -> ConnGuard {
        n.fetch_add(1, Ordering::Relaxed);
        ConnGuard(n.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Self> {
        Arc::new(Proxy {
            routes: ArcSwap::from_pointee(RouteTable::default()),
            registry: UpstreamRegistry::default(),
            connector: Connector::new(config.connect_timeout),
            tunnels: Arc::new(TunnelRegistry::default()),
            config,
            http_conns: Arc::default(),
            cut_epoch: AtomicU64::new(0),
            cut_notify: Arc::new(tokio::sync::Notify::new()),
            cut_count: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            telemetry: std::sync::OnceLock::new(),
            no_host: Arc::from(""),
        })
    }

    pub fn set_telemetry(&self, t: Arc<crate::telemetry::Telemetry>) {
        let _ = self.telemetry.set(t);
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Open client HTTP connections (not counting tunnels).
    pub fn http_connections(&self) -> usize {
        self.http_conns.load(Ordering::Relaxed)
    }

    /// Closes every open connection and tunnel now, without a goodbye;
    /// they are counted in [`Proxy::cut_count`].
    pub fn cut_all(&self) {
        self.cut_epoch.fetch_add(1, Ordering::AcqRel);
        self.cut_notify.notify_waiters();
        for t in self.tunnels.list() {
            t.cut();
        }
    }

    /// Connections and tunnels closed by [`Proxy::cut_all`].
    pub fn cut_count(&self) -> u64 {
        self.cut_count.load(Ordering::Relaxed)
    }

    /// Runs `fut` unless the proxy cuts everything first.
    fn cuttable<F: Future<Output = ()> + Send + 'static>(self: &Arc<Self>, fut: F) -> Cuttable<F> {
        Cuttable {
            fut: Box::pin(fut),
            epoch: self.cut_epoch.load(Ordering::Acquire),
            proxy: self.clone(),
            notified: None,
        }
    }

    /// Builds a new route table from the store's hosts and swaps it in.
    /// Requests and tunnels in flight keep the table they started with.
    pub fn publish(&self, hosts: &HostSet) {
        let defaults = routes::RouteDefaults {
            upstream_timeout: self.config.upstream_timeout,
        };
        let table = RouteTable::build(hosts, &self.registry, &defaults);
        tracing::debug!(names = table.len(), "route table published");
        self.routes.store(Arc::new(table));
    }

    /// Serves HTTP/1.x ([`h1`]) and h2 (ALPN, or prior knowledge in clear
    /// text; hyper) on `listener` until `shutdown` resolves; then stops
    /// accepting and gives open requests up to `grace` to finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<TlsTerminator>>,
        shutdown: impl Future<Output = Duration>,
    ) {
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        let h2 = Arc::new(h2);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let h1_shutdown = h1::Shutdown::new();
        tokio::pin!(shutdown);
        let local = listener.local_addr().ok();
        let grace = loop {
            let (stream, peer) = tokio::select! {
                grace = &mut shutdown => break grace,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let local = local.unwrap_or(peer);
            let trusted = self
                .config
                .trusted_proxies
                .iter()
                .any(|c| c.contains(peer.ip()));
            let info = ConnInfo {
                peer,
                peer_text: Arc::from(peer.to_string()),
                local,
                tls: tls.is_some(),
                facts: ClientFacts::new(peer, trusted, tls.is_some(), local.port()),
            };
            let watcher = graceful.watcher();
            let tls = tls.clone();
            let guard = ConnGuard::new(&self.http_conns);
            let proxy = self.clone();
            let h2 = h2.clone();
            let h1_shutdown = h1_shutdown.clone();
            tokio::spawn(self.cuttable(async move {
                let _guard = guard;
                let Some(tls) = tls else {
                    if let h1::Ended::H2(h2_conn) =
                        h1::serve(proxy.clone(), stream, info, h1_shutdown).await
                    {
                        let (io, info) = *h2_conn;
                        proxy.serve_h2(&h2, watcher, io, info).await;
                    }
                    return;
                };
                match tls.accept(stream, local).await {
                    Ok(stream) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(None);
                        }
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            proxy.serve_h2(&h2, watcher, stream, info).await;
                        } else if let h1::Ended::H2(h2_conn) =
                            h1::serve(proxy.clone(), stream, info, h1_shutdown).await
                        {
                            let (io, info) = *h2_conn;
                            proxy.serve_h2(&h2, watcher, io, info).await;
                        }
                    }
                    Err(e @ AcceptError::UnknownName(_)) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(Some("unknown_name"));
                        }
                        tracing::info!(client = %peer, "TLS: {e}");
                    }
                    Err(e) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(Some("handshake_error"));
                        }
                        tracing::debug!(client = %peer, "TLS: {e}");
                    }
                }
            }));
        };
        drop(listener);
        tracing::info!(?grace, "proxy listener closed; waiting for open requests");
        h1_shutdown.begin();
        let all = async {
            tokio::join!(graceful.shutdown(), h1_shutdown.wait());
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }

    /// Serves one h2 connection with hyper.
    async fn serve_h2<I>(
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
        let facts = h1::ReqFacts {
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
            let cx = tr.server_span(
                req.headers(),
                facts.method.clone(),
                vec![
                    KeyValue::new("http.request.method", facts.method.clone()),
                    KeyValue::new("url.path", facts.path.clone()),
                    KeyValue::new("url.scheme", if conn.tls { "https" } else { "http" }),
                    KeyValue::new("server.address", facts.authority.clone()),
                    KeyValue::new("client.address", conn.peer.ip().to_string()),
                    KeyValue::new("client.port", i64::from(conn.peer.port())),
                    KeyValue::new("network.protocol.version", "2"),
                ],
            );
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
        self.record_h1(Served {
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

    /// Ends a request's server span with its outcome.
    fn end_server_span(
        &self,
        cx: &opentelemetry::Context,
        status: u16,
        route: Option<&Arc<Route>>,
        upstream: Option<&Arc<str>>,
        error: Option<&ProxyError>,
    ) {
        let mut attrs = vec![
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new(
                "charon.host",
                route.map(|r| r.name.to_string()).unwrap_or_default(),
            ),
        ];
        if let Some(r) = route {
            attrs.push(KeyValue::new("charon.host_id", r.host.id.clone()));
        }
        if let Some(u) = upstream {
            attrs.push(KeyValue::new("charon.upstream", u.to_string()));
        }
        let failed = (status >= 500).then(|| {
            error
                .map(|e| e.to_string())
                .unwrap_or_else(|| format!("status {status}"))
        });
        otel::end(cx, attrs, failed);
    }

    /// Counts a served request and writes its access-log line.
    fn record_h1(&self, s: Served<'_>) {
        let Some(t) = self.telemetry.get() else {
            return;
        };
        let took = s.started.elapsed();
        let host_name = s.route.map(|r| &r.name).unwrap_or(&self.no_host);
        t.metrics.request(host_name, s.status, took);
        if let Some(kind) = s.error.and_then(ProxyError::upstream_kind) {
            t.metrics.upstream_error(host_name, kind);
        }
        let ts_ms = crate::util::wall_ms().saturating_sub(took.as_millis() as u64);
        // Filled in place: the strings of a recycled entry are reused.
        t.access_log.record_with(|e| {
            if let Some(cx) = s.trace {
                e.trace_id = otel::trace_id(cx);
            }
            e.ts_ms = ts_ms;
            e.kind = "http";
            e.client = s.conn.peer_text.clone();
            e.host = host_name.clone();
            if let Some(r) = s.route {
                e.host_id = r.id.clone();
            }
            if let Some(f) = s.facts {
                e.method.push_str(&f.method);
                e.authority.push_str(&f.authority);
                e.path.push_str(&f.path);
                e.proto = f.proto;
            }
            e.tls = s.conn.tls;
            e.status = s.status;
            if let Some(u) = s.upstream {
                e.upstream = u.clone();
            }
            e.duration_ms = took.as_secs_f64() * 1000.0;
            if let Some(err) = s.error {
                use std::fmt::Write as _;
                let _ = write!(e.error, "{err}");
            }
        });
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
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let hsts = pipeline::response_policy(Some(&route), conn);
        if let Some(a) =
            pipeline::request_policy(&route, conn, self.config.https_port, host, target)
        {
            return (answer_response(a, hsts), Some(route), None);
        }
        let (mut resp, error) = match self.forward(req, &route, &host_value, conn).await {
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

    /// Forwards an h2 request over hyper's HTTP/1.1 client.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        route: &Arc<Route>,
        host_value: &HeaderValue,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let h = &route.host;
        let pool = route.pool_for(req.uri().path());
        // h2 targets come with scheme and authority: the upstream gets the
        // origin form (path and query).
        let uri = req.uri();
        if uri.scheme().is_some() || uri.authority().is_some() || uri.path_and_query().is_none() {
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = None;
            parts.authority = None;
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts)
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        }
        let client_version = req.version();
        *req.version_mut() = Version::HTTP_11;
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
        let timeout = route.upstream_timeout;

        let tracing = self.telemetry.get().and_then(|t| t.tracing.as_ref());
        let trace_parent = req.extensions().get::<TraceCx>().map(|c| c.0.clone());
        req.extensions_mut().clear();

        let mut req = req.map(UploadBody::new);
        let mut last_err = None;
        for upstream in pool.attempt_order() {
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
                match &sent {
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
                    return Ok(resp.map(Either::Left));
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

    /// Starts the relay of an upgraded connection pair in its own task
    /// (the client connection's task has ended), registered for drains and
    /// `charonctl tunnels`.
    fn spawn_tunnel<C, U>(
        self: &Arc<Self>,
        route: &Arc<Route>,
        upstream: &Arc<UpstreamState>,
        conn: &ConnInfo,
        client: C,
        up: U,
        span: Option<opentelemetry::Context>,
    ) where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let h = &route.host;
        let reg = self
            .tunnels
            .register(&h.id, &h.name, upstream.url.to_string(), conn.peer);
        let opts = route.tunnel;
        let telemetry = self.telemetry.get().cloned();
        let tls = conn.tls;
        let info = reg.info.clone();
        tracing::debug!(tunnel = info.id, host = %info.host_name, upstream = %info.upstream, client = %info.client, "tunnel open");
        if let Some(t) = &telemetry {
            t.metrics.tunnel_opened(&Arc::from(info.host_name.as_str()));
        }
        // Logged however the tunnel ends, even when cut.
        let log = telemetry.map(|t| TunnelLog {
            t,
            info: info.clone(),
            started: std::time::Instant::now(),
            tls,
            span,
        });
        tokio::spawn(TunnelTask {
            relay: relay::relay(client, up, info, opts),
            proxy: self.clone(),
            _log: log,
            _reg: reg,
        });
    }
}

/// A connection's task, ended early by [`Proxy::cut_all`]. Written by hand:
/// a `select!` over the connection and a watch channel costs a poll of the
/// channel and a random branch draw at every wake-up, and keeps a second
/// copy of the connection's future; here a wake-up costs one atomic load,
/// and the task registers with the cut's `Notify` once.
struct Cuttable<F> {
    fut: std::pin::Pin<Box<F>>,
    epoch: u64,
    proxy: Arc<Proxy>,
    notified: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl<F: Future<Output = ()>> Future for Cuttable<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.notified.is_none() {
            let mut n = Box::pin(self.proxy.cut_notify.clone().notified_owned());
            // Registers this task's waker; the flag below is what is read.
            let _ = n.as_mut().poll(cx);
            self.notified = Some(n);
        }
        if self.proxy.cut_epoch.load(Ordering::Acquire) != self.epoch {
            self.proxy.cut_count.fetch_add(1, Ordering::Relaxed);
            return std::task::Poll::Ready(());
        }
        self.fut.as_mut().poll(cx)
    }
}

/// A tunnel's task: its relay, and what must happen when it ends (the
/// access-log line, leaving the registry). A plain struct rather than an
/// `async` block wrapped in a `select!` for the cut: both of those keep a
/// second copy of the relay's state in the task, and an idle tunnel's
/// memory is mostly its task.
struct TunnelTask<C, U> {
    relay: relay::Relay<C, U>,
    proxy: Arc<Proxy>,
    _log: Option<TunnelLog>,
    _reg: tunnels::Registration,
}

impl<C, U> Future for TunnelTask<C, U>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let end = std::task::ready!(std::pin::Pin::new(&mut self.relay).poll(cx));
        if end == relay::RelayEnd::Cut {
            self.proxy.cut_count.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(tunnel = self._reg.info.id, ?end, "tunnel closed");
        std::task::Poll::Ready(())
    }
}

/// Writes a closed tunnel's access-log line and metrics when dropped: at
/// the end of the relay, or when a drain cuts the tunnel.
struct TunnelLog {
    t: Arc<crate::telemetry::Telemetry>,
    info: Arc<tunnels::TunnelInfo>,
    started: std::time::Instant,
    tls: bool,
    span: Option<opentelemetry::Context>,
}

impl Drop for TunnelLog {
    fn drop(&mut self) {
        let i = &self.info;
        let relaxed = Ordering::Relaxed;
        let (up_bytes, down_bytes) = (
            i.to_upstream.bytes.load(relaxed),
            i.to_client.bytes.load(relaxed),
        );
        let lived = self.started.elapsed();
        self.t.metrics.tunnel_closed(lived, up_bytes, down_bytes);
        let by_proxy = i.close_was_requested();
        let (client_close, upstream_close) = (i.to_upstream.close_code(), i.to_client.close_code());
        let closed_by = match (by_proxy, client_close, upstream_close) {
            (true, _, _) => "proxy",
            (false, Some(_), None) => "client",
            (false, None, Some(_)) => "upstream",
            (false, Some(_), Some(_)) => "both",
            (false, None, None) => "none (connection ended without a Close)",
        };
        let close_code = client_close.or(upstream_close).flatten();
        let trace_id = self.span.as_ref().map(|cx| {
            let frames_up = i.to_upstream.frames.load(relaxed);
            let frames_down = i.to_client.frames.load(relaxed);
            let first = [&i.to_upstream, &i.to_client]
                .iter()
                .map(|d| d.first_byte_ms.load(relaxed))
                .filter(|&ms| ms > 0)
                .min();
            if let Some(ms) = first {
                otel::add_event_at(
                    cx,
                    "first byte",
                    std::time::UNIX_EPOCH + Duration::from_millis(ms),
                );
            }
            otel::add_event(
                cx,
                "close",
                vec![KeyValue::new(
                    "websocket.close.code",
                    i64::from(close_code.unwrap_or(0)),
                )],
            );
            otel::end(
                cx,
                vec![
                    KeyValue::new("websocket.bytes_to_upstream", up_bytes as i64),
                    KeyValue::new("websocket.bytes_to_client", down_bytes as i64),
                    KeyValue::new("websocket.frames_to_upstream", frames_up as i64),
                    KeyValue::new("websocket.frames_to_client", frames_down as i64),
                    KeyValue::new("websocket.close.code", i64::from(close_code.unwrap_or(0))),
                    KeyValue::new("websocket.closed_by", closed_by),
                    KeyValue::new(
                        "charon.closed_by_drain",
                        by_proxy && close_code == Some(1001),
                    ),
                ],
                None,
            );
            otel::trace_id(cx)
        });
        let ts_ms = crate::util::wall_ms();
        self.t.access_log.record(crate::telemetry::Entry {
            trace_id: trace_id.unwrap_or_default(),
            ts: crate::util::rfc3339_ms(ts_ms),
            ts_ms,
            kind: "tunnel",
            client: Arc::from(i.client.to_string()),
            host: Arc::from(i.host_name.as_str()),
            host_id: Arc::from(i.host_id.as_str()),
            tls: self.tls,
            status: 101,
            upstream: Arc::from(i.upstream.as_str()),
            duration_ms: lived.as_secs_f64() * 1000.0,
            bytes_to_upstream: Some(up_bytes),
            bytes_to_client: Some(down_bytes),
            frames_to_upstream: Some(i.to_upstream.frames.load(relaxed)),
            frames_to_client: Some(i.to_client.frames.load(relaxed)),
            close_code,
            closed_by: closed_by.to_string(),
            ..Default::default()
        });
    }
}

enum SendError {
    /// The request comes back untouched, boxed to keep the enum small.
    Connect(Box<Request<UploadBody>>, ConnectError),
    Timeout,
    Failed(hyper::Error),
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
