//! The HTTP/WebSocket reverse proxy. `LIFECYCLE.md` beside this file
//! follows one request and one WebSocket through it, function by function.
//!
//! - [`listener`]: accept loops, TLS and ALPN dispatch to a front end.
//! - Front ends (protocol only): [`h1`], Charon's own HTTP/1.x path, and
//!   [`h2`], hyper's h2 server with hyper's HTTP/1.1 client upstream;
//!   [`h2_websocket`]: WebSockets over h2 (RFC 8441 extended CONNECT),
//!   upgraded to the upstream over HTTP/1.1 and relayed as a tunnel.
//! - [`wire`]: the bytes on the wire (head parsing, framing, the chunked
//!   coding, field lines, what is refused), a layer that knows no policy.
//! - [`pipeline`]: the phases both front ends call, in order: route,
//!   request policy ([`access`]: access lists), rewrite ([`forwarded`]),
//!   upstream attempts, response policy, record ([`observe`]). Error
//!   pages: [`error`].
//! - [`routes`]: the route table (an `Arc` snapshot, never redb) and each
//!   route's precomputed values. [`upstream`]: health, pools, attempt
//!   order (the balancer), connecting, idle connections;
//!   [`upstream_drain`]: closing a drained upstream's tunnels.
//! - [`tunnel`]: WebSocket tunnels after a 101 (relay, frames, registry).
//! - [`shutdown`]: every way a connection is ended by the proxy.

pub mod access;
pub mod error;
pub mod forwarded;
pub mod h1;
pub mod h2;
pub mod h2_websocket;
pub mod limits;
pub mod listener;
pub mod observe;
pub mod pipeline;
pub mod rate;
pub mod routes;
pub mod shutdown;
pub mod tunnel;
pub mod upstream;
pub mod upstream_drain;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};

use crate::host::ProxyHost;
use crate::store::Changed;
use forwarded::{Cidr, ClientFacts};
use routes::RouteTable;
use tunnel::registry::TunnelRegistry;
use upstream::{Connector, UpstreamRegistry};

/// What the h2 front end answers with: an upstream's body (holding the
/// request's place under its host's cap), or one of the proxy's own.
pub type ProxyBody = Either<h2::HeldBody, Full<Bytes>>;

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
    /// RFC 8441: h2 connections advertise `SETTINGS_ENABLE_CONNECT_PROTOCOL`
    /// and carry WebSockets as extended CONNECT streams ([`h2_websocket`]).
    pub h2_websockets: bool,
    /// `--max-conns-per-ip`, `--max-connections` (see [`limits`]).
    pub limits: limits::LimitConfig,
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
            h2_websockets: true,
            limits: limits::LimitConfig::default(),
        }
    }
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
    /// Its place under the connection caps (see [`limits`]), held for as
    /// long as the connection, or the tunnel it becomes, is open; `None`
    /// when the node sets no cap.
    pub client_slot: Option<Arc<limits::ClientSlot>>,
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
    /// Closing of drained upstreams' tunnels (issue 19).
    upstream_drains: upstream_drain::UpstreamDrains,
    /// Compiled access lists by name; routes hold their slots.
    acls: access::AclRegistry,
    /// Refusals by access lists are logged at most once a minute per host
    /// and client.
    refusal_log: access::LogLimiter,
    /// Open connections per client and in all (see [`limits`]).
    limits: Arc<limits::ConnLimits>,
    /// Rate limiters by host, and what peers admitted (see [`rate`]).
    pub rates: Arc<rate::RateRegistry>,
    /// Per-host caps on requests and tunnels per client (see [`limits`]).
    host_caps: Arc<limits::HostCaps>,
    /// Basic-auth verification off the runtime threads, and the throttle
    /// on clients that keep failing it (see [`access::AuthGuard`]).
    pub(crate) auth: access::AuthGuard,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Self> {
        let conn_limits = limits::ConnLimits::new(config.limits);
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
            upstream_drains: Default::default(),
            acls: access::AclRegistry::default(),
            refusal_log: access::LogLimiter::new(Duration::from_secs(60)),
            limits: conn_limits,
            rates: Arc::default(),
            host_caps: Arc::default(),
            auth: access::AuthGuard::new(),
        })
    }

    pub fn set_telemetry(&self, t: Arc<crate::telemetry::Telemetry>) {
        let _ = self.telemetry.set(t);
    }

    /// Open client HTTP connections (not counting tunnels).
    pub fn http_connections(&self) -> usize {
        self.http_conns.load(Ordering::Relaxed)
    }

    /// The shared state (load, passive health) of one upstream address, as
    /// the route table's pools hold it; for `charon.v1.Balance`.
    pub fn upstream_state(
        &self,
        url: &crate::host::UpstreamUrl,
        ca_pem: &str,
        insecure: bool,
    ) -> Arc<upstream::UpstreamState> {
        self.registry.get(url, ca_pem, insecure)
    }

    /// The active-check verdict on an upstream under `settings`, if a
    /// route runs those checks (`None`: not checked here).
    pub fn upstream_health(
        &self,
        upstream: &Arc<upstream::UpstreamState>,
        settings: &crate::host::balance::HealthCheck,
    ) -> Option<bool> {
        self.registry
            .checks
            .find(upstream, settings)
            .map(|c| c.is_healthy())
    }

    /// Per-upstream metrics (load, health) and the basic-auth
    /// verification count, rendered at scrape time.
    pub fn upstream_metrics(&self) -> String {
        let mut out = upstream::health::render_metrics(&self.registry);
        out.push_str(&self.auth.render_metrics());
        out
    }

    /// Applies the hosts a commit changed to a copy of the route table (O(1)
    /// to make, persistent maps) and swaps it in: a write costs O(change),
    /// whatever the number of hosts. Requests and tunnels in flight keep
    /// the table they started with.
    pub fn apply_hosts(&self, changes: &[Changed<ProxyHost>]) {
        if changes.is_empty() {
            return;
        }
        let defaults = routes::RouteDefaults {
            upstream_timeout: self.config.upstream_timeout,
            acls: self.acls.clone(),
            rates: self.rates.clone(),
            host_caps: self.host_caps.clone(),
        };
        let mut table = RouteTable::clone(&self.routes.load());
        for c in changes {
            table.apply(c.old.as_deref(), c.new.as_ref(), &self.registry, &defaults);
            self.upstream_drains
                .apply(&self.tunnels, c.old.as_deref(), c.new.as_deref());
            if let Some(old) = c.old.as_deref() {
                self.rates.forget(old, c.new.as_deref());
                if c.new.is_none() {
                    self.host_caps.forget(&old.id);
                }
            }
        }
        tracing::debug!(
            names = table.len(),
            changed = changes.len(),
            "route table published"
        );
        self.routes.store(Arc::new(table));
    }

    /// Compiles the access lists a commit changed; routes naming them see
    /// the new version at once (they hold the lists' slots).
    pub fn apply_acls(&self, changes: &[Changed<crate::access::AccessList>]) {
        self.acls.apply(changes);
    }

    /// A request over a rate limit (its host's, or its location's):
    /// counted per host and limit, logged at most once a minute per host
    /// and client.
    fn count_rate_limited(
        &self,
        route: &routes::Route,
        limiter: &rate::HostLimiter,
        client: std::net::IpAddr,
    ) {
        if let Some(t) = self.telemetry.get() {
            t.metrics
                .access_refusal(&route.name, &limiter.label, &limiter.label);
        }
        if let Some(skipped) = self.refusal_log.due(&route.name, client) {
            tracing::info!(host = %route.name, %client, limit = %limiter.label, more_since_last_line = skipped,
                "request over the rate limit: 429");
        }
    }

    /// A request or upgrade over its host's `--max-conns-per-ip`: counted
    /// per host, logged at most once a minute per host and client.
    fn count_over_host_cap(&self, route: &routes::Route, client: std::net::IpAddr, max: u32) {
        static RULE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        let rule = RULE.get_or_init(|| Arc::from("max conns per ip"));
        if let Some(t) = self.telemetry.get() {
            t.metrics.access_refusal(&route.name, rule, rule);
        }
        if let Some(skipped) = self.refusal_log.due(&route.name, client) {
            tracing::info!(host = %route.name, host_id = %route.id, %client, max_conns_per_ip = max,
                more_since_last_line = skipped,
                "client holds the host's --max-conns-per-ip requests and tunnels: 429");
        }
    }

    /// A request an access list refused: counted per host, list and rule,
    /// and logged (at most once a minute per host and client).
    fn count_refusal(&self, route: &routes::Route, client: std::net::IpAddr, r: &access::Refusal) {
        if let Some(t) = self.telemetry.get() {
            t.metrics.access_refusal(&route.name, &r.acl, &r.rule);
        }
        if let Some(skipped) = self.refusal_log.due(&route.name, client) {
            tracing::info!(host = %route.name, host_id = %route.id, %client, acl = %r.acl,
                rule = %r.rule, status = r.status.as_u16(), more_since_last_line = skipped,
                "request refused by access list");
        }
    }
}
