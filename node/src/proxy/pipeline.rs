//! The phases of every proxied request, in the order both front ends call
//! them. [`super::h1`] (HTTP/1.x, Charon's own) and [`super::h2`] (h2,
//! hyper's) own the protocol: parsing, framing, serialising, connection
//! reuse. Every decision about *what* happens to a request is made here or
//! in the module a phase names, so a rule is written once and holds for
//! both protocols (`tests/tests/policy.rs` runs each rule over both).
//!
//! 1. **route** — [`route`]: the request's host to its [`Route`] (exact
//!    name, then the most specific wildcard), then [`Route::pool_for`]: the
//!    path to its location's upstream pool.
//! 2. **request policy** — [`request_policy`]: answers the proxy gives
//!    itself instead of forwarding: a redirect host's redirect, the
//!    `force_https` redirect, then the
//!    route's access list ([`super::access`]: 403, or 401 asking for
//!    basic auth), the host's per-client cap on requests and tunnels
//!    ([`super::limits::HostCaps`]: 429, the place held as a
//!    [`HostSlot`] while the request or tunnel lasts) and the rate limit
//!    ([`super::rate`]: 429), all judged on the client address resolved
//!    through `--trusted-proxy` ([`super::forwarded::client_ip`]). The same
//!    code for HTTP/1, h2 and WebSocket upgrades (an upgrade is a GET until
//!    the upstream's 101).
//! 3. **request rewrite** — [`super::forwarded`]: hop-by-hop fields
//!    removed, forwarded headers set (one rule, two writers).
//! 4. **upstream choice and attempts** — [`affinity`] reads the key a
//!    hash policy needs (or makes one, with a sticky cookie for phase 5), [`choose`] waits for room under a connection cap
//!    and gives the order (`Pool::attempt_order`: the pool's balancer,
//!    `upstream/balance.rs`, picks the first), [`lease`] counts each
//!    attempt against its upstream, [`attempt_failed`] decides after each
//!    failure whether the next upstream is tried, and with what
//!    passive-health mark; the timeout is [`Route::upstream_timeout`].
//! 5. **response policy** — [`response_policy`]: what a response gets on
//!    the way out (HSTS), error pages included.
//! 6. **record** — [`super::observe`]: metrics, access-log line and the
//!    request's spans, once per request whatever its outcome.

use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderValue, StatusCode};

use super::access::Checked;
use super::error::{page, ProxyError};
use super::limits::HostSlot;
use super::routes::{self, Route, RouteTable};
use super::upstream::{balance, AttemptOrder, Lease, Pool, UpstreamState};
use super::{ConnInfo, Proxy};

/// A reply the proxy makes itself rather than an upstream: a redirect or
/// an error page. Each front end writes it in its own protocol; what it
/// says is decided once, here.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Plain text (`text/plain; charset=utf-8`).
    pub body: String,
    pub location: Option<String>,
    /// One more header field: `WWW-Authenticate` on a 401.
    pub header: Option<(HeaderName, String)>,
}

impl Answer {
    /// The error page a client gets for `e`.
    pub fn error(e: &ProxyError) -> Answer {
        Answer::page(e.status(), e)
    }

    /// An error page in the one format of [`super::error::page`].
    pub fn page(status: StatusCode, detail: &dyn std::fmt::Display) -> Answer {
        Answer {
            status,
            body: page(status, detail),
            location: None,
            header: None,
        }
    }
}

/// Before phase 1 — ACME hook: the answer to an HTTP-01 validation
/// (`/.well-known/acme-challenge/<token>`), given before routing, so it
/// also reaches hosts that are disabled (or not yet replicated here) and
/// is never redirected by `force_https`. See [`crate::acme::challenge`].
pub fn acme_answer(target: &str) -> Option<Answer> {
    crate::acme::challenge::http01_answer(target).map(|body| Answer {
        status: StatusCode::OK,
        body,
        location: None,
        header: None,
    })
}

/// Phase 1: the route for a request's host (its `Host`, or the authority
/// of its target), or the 404 error naming the host.
pub fn route(table: &RouteTable, host: &str) -> Result<Arc<Route>, ProxyError> {
    match table.lookup(host) {
        Some(r) => Ok(r.clone()),
        None => {
            let name = routes::strip_port(host);
            Err(ProxyError::UnknownHost(
                name.strip_suffix('.').unwrap_or(name).to_string(),
            ))
        }
    }
}

/// The header fields of a request as each front end holds them (h1:
/// the parsed head; h2: hyper's `HeaderMap`), for the policies that read
/// one. Only called for routes that use such a policy.
pub trait RequestFields: Sync {
    /// Every value of field `name`, in the order received.
    fn values(&self, name: &HeaderName) -> Vec<&[u8]>;
}

impl RequestFields for http::HeaderMap {
    fn values(&self, name: &HeaderName) -> Vec<&[u8]> {
        self.get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    }
}

/// What phase 2 reads of a request besides its route.
pub struct PolicyRequest<'a> {
    /// The request's host as sent.
    pub host: &'a str,
    /// Its path and query.
    pub target: &'a str,
    pub fields: &'a dyn RequestFields,
    /// The verdict on its basic-auth credentials, once it waited for one
    /// ([`Policy::Verify`]).
    pub judged: Option<crate::access::compiled::Judged>,
}

/// What phase 2 decided.
pub enum Policy {
    /// Forward it, holding this place under the host's
    /// `--max-conns-per-ip` (when it sets one) until the response has
    /// ended, or the tunnel it opens has closed.
    Forward(Option<HostSlot>),
    /// The proxy answers it itself.
    Answer(Answer),
    /// Its basic-auth credentials need verifying first, off the runtime
    /// ([`super::access::Verify::run`]); then phase 2 runs again with
    /// [`PolicyRequest::judged`] set.
    Verify(super::access::Verify),
}

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Phase 2: whether the proxy answers this request itself: a redirect
/// host's redirect, the `force_https` redirect (credentials are never asked
/// for over plain HTTP when HTTPS is forced), the access list of the
/// request's location (else its host's), the host's per-client cap on
/// requests and tunnels, then the location's rate limit (else its host's).
pub fn request_policy(
    proxy: &Proxy,
    route: &Route,
    conn: &ConnInfo,
    req: &PolicyRequest<'_>,
) -> Policy {
    // ACME HTTP-01 answers come before routing: see `acme_answer`.
    if let Some(r) = &route.redirect {
        let location = r.location(req.target);
        return Policy::Answer(Answer {
            status: r.status,
            body: format!("redirecting to {location}\n"),
            location: Some(location),
            header: None,
        });
    }
    if route.host.force_https && !conn.tls {
        return Policy::Answer(redirect_to_https(
            req.host,
            proxy.config.https_port,
            req.target,
        ));
    }
    if !(route.any_acl || route.any_rate || route.conn_cap.is_some()) {
        return Policy::Forward(None);
    }
    let path = req.target.split('?').next().unwrap_or("/");
    let client = client_ip(proxy, conn, req.fields);
    if let Some(slot) = route.acl_for(path).filter(|_| route.any_acl) {
        // Read only if the list has users (a lazy iterator): an
        // address-only list costs no header scan.
        let auth = std::iter::once(()).flat_map(|()| req.fields.values(&AUTHORIZATION));
        match super::access::check(slot, client, auth, &proxy.auth, req.judged) {
            Checked::Pass => {}
            Checked::Verify(v) => return Policy::Verify(v),
            Checked::Refuse(r) => {
                proxy.count_refusal(route, client, &r);
                let mut answer = Answer::page(r.status, &r.detail);
                answer.header = r.header;
                return Policy::Answer(answer);
            }
        }
    }
    let held = match &route.conn_cap {
        Some(cap) => match cap.admit(client) {
            Ok(slot) => Some(slot),
            Err(max) => return Policy::Answer(over_host_cap(proxy, route, client, max)),
        },
        None => None,
    };
    if let Some(limiter) = route.rate_for(path).filter(|_| route.any_rate) {
        if let Some(a) = rate_limit(proxy, limiter, route, client, req) {
            return Policy::Answer(a);
        }
    }
    Policy::Forward(held)
}

/// The 429 of a request (or upgrade) over its host's `--max-conns-per-ip`.
fn over_host_cap(proxy: &Proxy, route: &Route, client: IpAddr, max: u32) -> Answer {
    proxy.count_over_host_cap(route, client, max);
    let mut answer = Answer::page(
        StatusCode::TOO_MANY_REQUESTS,
        &format_args!(
            "{client} has {max} requests and WebSockets open to this site already (the most one client may); close some and retry"
        ),
    );
    answer.header = Some((http::header::RETRY_AFTER, "1".to_string()));
    answer
}

/// The rate limit on this request's client: `None` when admitted, else
/// 429 with `Retry-After` (whole seconds, at least 1).
fn rate_limit(
    proxy: &Proxy,
    limiter: &super::rate::HostLimiter,
    route: &Route,
    client: IpAddr,
    req: &PolicyRequest<'_>,
) -> Option<Answer> {
    let header = match &limiter.key {
        super::rate::RateKey::Header(name) => req.fields.values(name).first().copied(),
        super::rate::RateKey::Ip => None,
    };
    let wait = limiter.check(limiter.client_key(client, header)).err()?;
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    proxy.count_rate_limited(route, limiter, client);
    let mut answer = Answer::page(
        StatusCode::TOO_MANY_REQUESTS,
        &format_args!("rate limit of this site reached; retry in {secs} s"),
    );
    answer.header = Some((http::header::RETRY_AFTER, secs.max(1).to_string()));
    Some(answer)
}

/// The client's address as policies see it: the peer's, or, from a
/// trusted proxy, the one `X-Forwarded-For` gives (see
/// [`super::forwarded::client_ip`]).
pub fn client_ip(proxy: &Proxy, conn: &ConnInfo, fields: &dyn RequestFields) -> IpAddr {
    if !conn.facts.trusted {
        return conn.peer.ip().to_canonical();
    }
    let xff = fields.values(&XFF);
    super::forwarded::client_ip(
        conn.peer.ip(),
        &proxy.config.trusted_proxies,
        xff.into_iter(),
    )
}

/// `force_https`: 308 (method and body kept) to the same host, path and
/// query on the HTTPS listener; port 443 is left out of the URL.
fn redirect_to_https(host: &str, https_port: u16, target: &str) -> Answer {
    let name = routes::strip_port(host);
    let location = match https_port {
        443 => format!("https://{name}{target}"),
        p => format!("https://{name}:{p}{target}"),
    };
    Answer {
        status: StatusCode::PERMANENT_REDIRECT,
        body: format!("redirecting to {location}\n"),
        location: Some(location),
        header: None,
    }
}

/// What phase 4 knows of a request's affinity (hash policies): the key,
/// and, when the proxy chose the key itself (`hash:cookie=NAME` with the
/// cookie mode, for a client without the cookie), the `Set-Cookie` that
/// phase 5 adds to the response so the client sticks from then on.
#[derive(Debug, Default)]
pub struct Affinity {
    pub key: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

/// Phase 4: the affinity of a request for its pool's hash policy (none
/// for other policies, or when the request lacks the property).
/// `field(name)` gives the request's values of header `name` (lower case);
/// it is called only when the policy reads a header or cookie.
pub fn affinity<'p, 'v, I>(
    pool: &'p Pool,
    conn: &ConnInfo,
    path: &str,
    field: impl FnOnce(&'p str) -> I,
) -> Affinity
where
    I: Iterator<Item = &'v [u8]>,
{
    let b = &pool.balancer;
    if !matches!(b.policy, crate::host::balance::Policy::Hash(_)) {
        return Affinity::default();
    }
    let ip = conn.peer.ip();
    let key = match b.field() {
        Some(name) => b.key(ip, path, field(name)),
        None => b.key(ip, path, std::iter::empty()),
    };
    match (key, b.sticky_cookie()) {
        (None, Some(name)) => {
            let token = hex::encode(rand::random::<[u8; 12]>());
            let cookie = format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax");
            Affinity {
                key: Some(balance::hash(token.as_bytes())),
                set_cookie: HeaderValue::from_str(&cookie).ok(),
            }
        }
        (key, _) => Affinity {
            key,
            set_cookie: None,
        },
    }
}

/// Phase 4: the order in which a request tries the pool's upstreams.
/// Under a connection cap with every upstream full, it first waits up to
/// the pool's queue timeout for room, then gives up with a 503.
pub async fn choose(pool: &Pool, key: Option<u64>) -> Result<AttemptOrder<'_>, ProxyError> {
    let b = &pool.balancer;
    if b.cap > 0
        && !pool.has_room()
        && !balance::wait_for_room(b.queue_timeout, || pool.has_room()).await
    {
        return Err(at_capacity(pool));
    }
    Ok(pool.attempt_order(key))
}

/// Phase 4: counts one attempt against `upstream` (in flight; a tunnel
/// later). `Err` when it is at its cap: the caller tries the next one.
pub fn lease(pool: &Pool, upstream: &Arc<UpstreamState>) -> Result<Lease, ProxyError> {
    pool.lease(upstream).ok_or_else(|| at_capacity(pool))
}

fn at_capacity(pool: &Pool) -> ProxyError {
    ProxyError::AtCapacity {
        cap: pool.balancer.cap,
        waited: pool.balancer.queue_timeout,
    }
}

/// Phase 4: after an attempt on `upstream` failed with `e`, marks the
/// upstream down if the failure says it is, and says whether the next
/// upstream of the pool is tried. Only a refused or timed-out connect is
/// retried elsewhere: then the request has not left the proxy. After a
/// response timeout the request may have been acted on, so it is not sent
/// twice.
pub fn attempt_failed(upstream: &UpstreamState, e: &ProxyError, cooldown: Duration) -> bool {
    match e {
        ProxyError::Unreachable { .. } => {
            tracing::warn!(upstream = %upstream.url, error = %e, "upstream unreachable; trying the next one");
            upstream.mark_down(cooldown);
            true
        }
        ProxyError::Timeout { .. } => {
            upstream.mark_down(cooldown);
            false
        }
        _ => false,
    }
}

/// Phase 5: the `Strict-Transport-Security` value a response to this
/// request carries (responses over TLS, for hosts that set it), error
/// pages and redirects included.
pub fn response_policy<'r>(route: Option<&'r Route>, conn: &ConnInfo) -> Option<&'r HeaderValue> {
    match route {
        Some(r) if conn.tls => r.hsts.as_ref(),
        _ => None,
    }
}
