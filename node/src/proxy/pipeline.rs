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
//!    itself instead of forwarding: the `force_https` redirect today; the
//!    place for ACME HTTP-01 answers, access rules and limits.
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

use http::{HeaderValue, StatusCode};

use super::error::{page, ProxyError};
use super::routes::{self, Route, RouteTable};
use super::upstream::{balance, AttemptOrder, Lease, Pool, UpstreamState};
use super::ConnInfo;

/// A reply the proxy makes itself rather than an upstream: a redirect or
/// an error page. Each front end writes it in its own protocol; what it
/// says is decided once, here.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Plain text (`text/plain; charset=utf-8`).
    pub body: String,
    pub location: Option<String>,
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

/// Phase 2: whether the proxy answers this request itself. `host` is the
/// request's host as sent, `target` its path and query.
pub fn request_policy(
    route: &Route,
    conn: &ConnInfo,
    https_port: u16,
    host: &str,
    target: &str,
) -> Option<Answer> {
    // ACME HTTP-01 answers come before routing: see `acme_answer`.
    if route.host.force_https && !conn.tls {
        return Some(redirect_to_https(host, https_port, target));
    }
    None
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
