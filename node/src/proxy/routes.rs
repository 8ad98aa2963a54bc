//! The route table: an immutable value derived from the store's hosts.
//!
//! The proxy holds it behind an `ArcSwap`; each change in the store applies
//! the changed hosts to a copy (O(1) to make, persistent maps) and swaps the
//! pointer. Requests in flight and open tunnels keep the `Arc`s they already
//! hold, so a change never disturbs them.

use std::sync::Arc;
use std::time::Duration;

use crate::host::{ProxyHost, UpstreamUrl};
use crate::names::NameMap;
use crate::proxy::access::{AclRegistry, AclSlot};
use crate::proxy::limits::{HostCap, HostCaps};
use crate::proxy::rate::{HostLimiter, RateRegistry};
use crate::proxy::tunnel::relay::TunnelOptions;
use crate::proxy::upstream::{Pool, UpstreamRegistry};

/// Where one path prefix of a host goes.
pub struct LocationRoute {
    pub prefix: String,
    pub pool: Arc<Pool>,
    /// The location's own access list, if it names one.
    pub acl: Option<Arc<AclSlot>>,
    /// The location's own rate limiter, if it sets one (instead of the
    /// host's).
    pub rate: Option<Arc<HostLimiter>>,
}

/// A host ready for the request path: parsed upstreams, sorted locations.
pub struct Route {
    pub host: Arc<ProxyHost>,
    /// The host's name for metrics and logs, shared rather than copied
    /// per request.
    pub name: Arc<str>,
    /// The host's id, shared likewise.
    pub id: Arc<str>,
    pub pool: Arc<Pool>,
    /// Strict-Transport-Security value for HTTPS responses, built once.
    pub hsts: Option<http::HeaderValue>,
    /// Longest prefix first, so the first match is the most specific.
    pub locations: Vec<LocationRoute>,
    /// Time allowed for an upstream's response head: the host's own, else
    /// the node's. Worked out here once rather than on every request.
    pub upstream_timeout: Duration,
    /// The host's WebSocket tunnel options, likewise.
    pub tunnel: TunnelOptions,
    /// The host's access list (requests under a location naming its own
    /// answer to that one instead).
    pub acl: Option<Arc<AclSlot>>,
    /// Whether the host or any location names a list: a host without one
    /// pays this test and nothing else.
    pub any_acl: bool,
    /// A redirect host's answer, made ready here.
    pub redirect: Option<Redirect>,
    /// The host's rate limiter (kept across rebuilds while its limit stays).
    pub rate: Option<Arc<HostLimiter>>,
    /// Whether the host or a location sets a rate limit.
    pub any_rate: bool,
    /// The host's per-client cap on requests and tunnels (kept across
    /// rebuilds with its counts).
    pub conn_cap: Option<Arc<HostCap>>,
}

/// Where a redirect host sends every request.
pub struct Redirect {
    pub status: http::StatusCode,
    /// The target without a trailing `/` when the path is appended.
    pub to: String,
    pub keep_path: bool,
}

impl Redirect {
    /// The `Location` for a request to `target` (its path and query).
    pub fn location(&self, target: &str) -> String {
        if self.keep_path {
            format!("{}{target}", self.to)
        } else {
            self.to.clone()
        }
    }
}

/// Node-wide values a route falls back on where its host sets none.
#[derive(Clone)]
pub struct RouteDefaults {
    pub upstream_timeout: Duration,
    /// Where routes find the compiled access lists they name.
    pub acls: AclRegistry,
    /// Where routes find their host's rate limiter.
    pub rates: Arc<RateRegistry>,
    /// Where routes find their host's per-client cap.
    pub host_caps: Arc<HostCaps>,
}

impl Default for RouteDefaults {
    fn default() -> Self {
        RouteDefaults {
            upstream_timeout: Duration::from_secs(60),
            acls: AclRegistry::default(),
            rates: Arc::default(),
            host_caps: Arc::default(),
        }
    }
}

impl Route {
    pub fn pool_for(&self, path: &str) -> &Arc<Pool> {
        self.locations
            .iter()
            .find(|l| path_has_prefix(path, &l.prefix))
            .map(|l| &l.pool)
            .unwrap_or(&self.pool)
    }

    /// The access list a request for `path` answers to: its location's
    /// own, else the host's.
    pub fn acl_for(&self, path: &str) -> Option<&Arc<AclSlot>> {
        self.locations
            .iter()
            .find(|l| path_has_prefix(path, &l.prefix))
            .and_then(|l| l.acl.as_ref())
            .or(self.acl.as_ref())
    }

    /// The rate limiter a request for `path` is counted on: its
    /// location's own, else the host's.
    pub fn rate_for(&self, path: &str) -> Option<&Arc<HostLimiter>> {
        self.locations
            .iter()
            .find(|l| path_has_prefix(path, &l.prefix))
            .and_then(|l| l.rate.as_ref())
            .or(self.rate.as_ref())
    }
}

impl Route {
    /// Everything the request path needs of one host, computed once per
    /// table build: parsed upstream pools, sorted locations, the HSTS
    /// value, the upstream timeout and tunnel options. `None` (logged) for
    /// a host whose upstreams do not parse.
    pub fn compile(
        host: &Arc<ProxyHost>,
        registry: &UpstreamRegistry,
        defaults: &RouteDefaults,
    ) -> Option<Route> {
        let pool = |urls: &[String], balancing: &crate::host::Balancing| -> Option<Arc<Pool>> {
            let parsed: Result<Vec<UpstreamUrl>, _> =
                urls.iter().map(|u| UpstreamUrl::parse(u)).collect();
            match parsed {
                Ok(list) => Some(Arc::new(Pool::with_balancing(
                    list.iter()
                        .map(|u| {
                            registry.get(
                                u,
                                &host.upstream_ca_pem,
                                host.upstream_insecure_skip_verify,
                            )
                        })
                        .collect(),
                    balancing,
                    Some(registry),
                    Some(&host.balancing.drains),
                ))),
                Err(e) => {
                    // Only validated hosts are stored, so this means a file
                    // from a release with other rules: skip the host rather
                    // than fail every other one.
                    tracing::error!(host = %host.id, error = %e, "skipping host with an invalid upstream");
                    None
                }
            }
        };
        let main = pool(&host.upstreams, &host.balancing)?;
        let slot = |name: &str| (!name.is_empty()).then(|| defaults.acls.slot(name));
        let mut locations = Vec::new();
        for loc in &host.locations {
            if let Some(p) = pool(&loc.upstreams, &loc.balancing) {
                locations.push(LocationRoute {
                    prefix: loc.path_prefix.clone(),
                    pool: p,
                    acl: slot(&loc.acl),
                    rate: defaults.rates.location_limiter(host, loc),
                });
            }
        }
        locations.sort_by_key(|l| std::cmp::Reverse(l.prefix.len()));
        let hsts = (host.hsts_max_age_secs > 0).then(|| {
            let sub = if host.hsts_include_subdomains {
                "; includeSubDomains"
            } else {
                ""
            };
            http::HeaderValue::from_str(&format!("max-age={}{sub}", host.hsts_max_age_secs))
                .expect("ascii")
        });
        let secs = |s: u32| (s > 0).then(|| Duration::from_secs(u64::from(s)));
        Some(Route {
            hsts,
            name: Arc::from(host.name.as_str()),
            id: Arc::from(host.id.as_str()),
            host: host.clone(),
            pool: main,
            locations,
            upstream_timeout: match host.upstream_timeout_ms {
                0 => defaults.upstream_timeout,
                ms => Duration::from_millis(u64::from(ms)),
            },
            tunnel: TunnelOptions {
                idle_timeout: secs(host.ws_idle_timeout_secs),
                ping_interval: secs(host.ws_ping_interval_secs),
            },
            any_acl: !host.acl.is_empty() || host.locations.iter().any(|l| !l.acl.is_empty()),
            redirect: (!host.redirect_to.is_empty()).then(|| Redirect {
                status: http::StatusCode::from_u16(host.redirect_code as u16)
                    .ok()
                    .filter(|s| s.is_redirection())
                    .unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
                to: if host.redirect_keep_path {
                    host.redirect_to.trim_end_matches('/').to_string()
                } else {
                    host.redirect_to.clone()
                },
                keep_path: host.redirect_keep_path,
            }),
            acl: slot(&host.acl),
            rate: defaults.rates.limiter(host),
            any_rate: !host.rate_limit.is_empty()
                || host.locations.iter().any(|l| !l.rate_limit.is_empty()),
            conn_cap: defaults.host_caps.for_host(host),
        })
    }
}

/// `/api` matches `/api`, `/api/x` and `/api?q`, but not `/apix`: a prefix
/// ending without a slash is taken as a path segment, as users expect.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
        None => false,
    }
}

/// Domain → route, for the request path. Persistent maps ([`NameMap`]):
/// cloning the table is O(1) and [`RouteTable::apply`] touches only the
/// changed host's names, so a write costs the same at 100 hosts as at
/// 100,000 (issue 16). It is fed the store's routed hosts, where each
/// name has one holder (`store::names`), so it never picks between two
/// hosts itself.
#[derive(Clone, Default)]
pub struct RouteTable {
    exact: NameMap<Arc<Route>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: NameMap<Arc<Route>>,
}

impl RouteTable {
    /// The table for `hosts` at once (start-up, tests). Pools come from
    /// `registry` so connection pools and passive-health marks outlive
    /// table changes.
    pub fn build(
        hosts: &[Arc<ProxyHost>],
        registry: &UpstreamRegistry,
        defaults: &RouteDefaults,
    ) -> RouteTable {
        let mut table = RouteTable::default();
        for host in hosts {
            table.apply(None, Some(host), registry, defaults);
        }
        table
    }

    /// One host changed from `old` to `new` (`None`: absent or deleted).
    /// Disabled hosts route nothing.
    pub fn apply(
        &mut self,
        old: Option<&ProxyHost>,
        new: Option<&Arc<ProxyHost>>,
        registry: &UpstreamRegistry,
        defaults: &RouteDefaults,
    ) {
        if let Some(old) = old.filter(|h| h.enabled) {
            for d in &old.domains {
                match d.strip_prefix("*.") {
                    Some(suffix) => self.wildcard.remove(suffix, &old.id),
                    None => self.exact.remove(d, &old.id),
                }
            }
        }
        let Some(host) = new.filter(|h| h.enabled) else {
            return;
        };
        let Some(route) = Route::compile(host, registry, defaults) else {
            return;
        };
        let route = Arc::new(route);
        for d in &host.domains {
            match d.strip_prefix("*.") {
                Some(suffix) => self.wildcard.insert(suffix, &route.id, route.clone()),
                None => self.exact.insert(d, &route.id, route.clone()),
            };
        }
    }

    /// Finds the route for a Host header value (port and trailing dot
    /// ignored, case-insensitive): exact name first, then the most specific
    /// wildcard.
    pub fn lookup(&self, host_header: &str) -> Option<&Arc<Route>> {
        let name = strip_port(host_header);
        let name = name.strip_suffix('.').unwrap_or(name);
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(r) = self.exact.get(name) {
            return Some(r);
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(r) = self.wildcard.get(suffix) {
                return Some(r);
            }
            rest = suffix;
        }
        None
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Location;

    fn host(id: &str, domains: &[&str], locs: &[(&str, &str)]) -> Arc<ProxyHost> {
        Arc::new(ProxyHost {
            id: id.into(),
            name: id.into(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            upstreams: vec!["http://127.0.0.1:1".into()],
            enabled: true,
            websocket: true,
            preserve_host: true,
            forwarded_headers: true,
            locations: locs
                .iter()
                .map(|(p, u)| Location {
                    path_prefix: p.to_string(),
                    upstreams: vec![u.to_string()],
                    ..Default::default()
                })
                .collect(),
            version: 1,
            ..Default::default()
        })
    }

    #[test]
    fn exact_then_most_specific_wildcard() {
        let reg = UpstreamRegistry::default();
        let hosts = vec![
            host("exact", &["a.example.com", "127.0.0.1", "[::1]"], &[]),
            host("wild", &["*.example.com"], &[]),
            host("deeper", &["*.b.example.com"], &[]),
        ];
        let t = RouteTable::build(&hosts, &reg, &RouteDefaults::default());
        let id = |h: &str| t.lookup(h).map(|r| r.host.id.clone());
        assert_eq!(id("a.example.com").as_deref(), Some("exact"));
        assert_eq!(id("A.Example.com:8080").as_deref(), Some("exact"));
        assert_eq!(id("x.example.com").as_deref(), Some("wild"));
        assert_eq!(id("x.y.example.com").as_deref(), Some("wild"));
        assert_eq!(id("x.b.example.com").as_deref(), Some("deeper"));
        assert_eq!(id("example.com"), None);
        assert_eq!(id("127.0.0.1:8080").as_deref(), Some("exact"));
        assert_eq!(id("[::1]:8080").as_deref(), Some("exact"));
        assert_eq!(id("other.org"), None);
    }

    /// A table kept by change answers as a table built from the hosts now
    /// stored: renames, disabling, deletes, a name moving between hosts.
    #[test]
    fn applied_changes_match_a_rebuild() {
        let reg = UpstreamRegistry::default();
        let mut table = RouteTable::default();
        let mut stored: std::collections::BTreeMap<String, Arc<ProxyHost>> = Default::default();
        type Step<'a> = (&'a str, Option<(&'a [&'a str], bool)>);
        let steps: Vec<Step> = vec![
            ("a", Some((&["a.com", "*.w.com"], true))),
            ("b", Some((&["b.com"], true))),
            ("c", Some((&["c.com"], false))),
            ("a", Some((&["a2.com", "*.w.com"], true))),
            ("b", None),
            ("c", Some((&["c.com", "b.com"], true))),
            ("a", Some((&["a2.com"], true))),
            ("d", Some((&["*.w.com"], true))),
            ("d", Some((&["*.w.com"], false))),
            ("a", None),
        ];
        for (changed, change) in steps {
            let id = changed;
            let new = change.map(|(domains, enabled)| {
                let mut h = (*host(id, domains, &[])).clone();
                h.enabled = enabled;
                Arc::new(h)
            });
            let old = match &new {
                Some(h) => stored.insert(id.to_string(), h.clone()),
                None => stored.remove(id),
            };
            table.apply(
                old.as_deref(),
                new.as_ref(),
                &reg,
                &RouteDefaults::default(),
            );
            let hosts: Vec<_> = stored.values().cloned().collect();
            let built = RouteTable::build(&hosts, &reg, &RouteDefaults::default());
            for name in ["a.com", "a2.com", "b.com", "c.com", "x.w.com", "none.org"] {
                let id = |t: &RouteTable| t.lookup(name).map(|r| r.host.id.clone());
                assert_eq!(id(&table), id(&built), "{name} after a change to {changed}");
            }
            assert_eq!(table.len(), built.len());
        }
    }

    /// Fed by a store, whatever the claims and concurrent writes: the
    /// changes applied one by one give the table built from the routed
    /// hosts at the end, and every name routes to its one holder.
    mod from_the_store {
        use super::*;
        use crate::store::{host_key, name_key, Body, NameClaim, Record, Store};
        use proptest::prelude::*;
        use std::sync::Mutex;

        const DOMAINS: [&str; 4] = ["a.test", "b.test", "*.w.test", "d.test"];

        /// (origin, host index, domain mask, enabled, claim domain index,
        /// claim host index, delete)
        type Raw = (usize, usize, u8, bool, usize, usize, bool);

        fn records(raw: Vec<Raw>) -> Vec<(String, Record)> {
            let mut seq = [0u64; 3];
            let mut out = Vec::new();
            for (i, (o, h, mask, enabled, cd, ch, dead)) in raw.into_iter().enumerate() {
                let mut stamp = |body| {
                    seq[o] += 1;
                    Record {
                        hlc: i as u64 + 1,
                        origin: format!("n{o}"),
                        seq: seq[o],
                        body,
                    }
                };
                let id = format!("h{h}");
                let mut hst = (*host(&id, &[], &[])).clone();
                hst.domains = (0..4)
                    .filter(|b| mask & (1 << b) != 0)
                    .map(|b| DOMAINS[b].to_string())
                    .collect();
                hst.enabled = enabled;
                let body = (!dead && !hst.domains.is_empty()).then_some(Body::Host(hst));
                out.push((host_key(&id), stamp(body)));
                let claim = Body::Claim(NameClaim {
                    domain: DOMAINS[cd].to_string(),
                    host_id: format!("h{ch}"),
                });
                out.push((name_key(DOMAINS[cd]), stamp(Some(claim))));
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn changes_give_the_table_of_the_routed_hosts(
                raw in prop::collection::vec((0..3usize, 0..4usize, 0..16u8, any::<bool>(), 0..4usize, 0..4usize, any::<bool>()), 1..30),
                cut in 1..5usize,
            ) {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path()).unwrap();
                let table = Arc::new(Mutex::new(RouteTable::default()));
                let t2 = table.clone();
                store.subscribe(move |_, ch| {
                    let reg = UpstreamRegistry::default();
                    let mut t = t2.lock().unwrap();
                    for c in &ch.hosts {
                        t.apply(c.old.as_deref(), c.new.as_ref(), &reg, &RouteDefaults::default());
                    }
                });
                for chunk in records(raw).chunks(cut) {
                    store.apply(chunk.to_vec()).unwrap();
                    let snap = store.snapshot();
                    let reg = UpstreamRegistry::default();
                    let built = RouteTable::build(&snap.routed.to_vec(), &reg, &RouteDefaults::default());
                    let table = table.lock().unwrap();
                    for d in DOMAINS {
                        let name = d.replace('*', "x");
                        let id = |t: &RouteTable| t.lookup(&name).map(|r| r.host.id.clone());
                        prop_assert_eq!(id(&table), id(&built), "{}", d);
                        let holder = snap.names.holder(d)
                            .filter(|h| snap.hosts.get(h).is_some_and(|h| h.enabled));
                        let routed = id(&table);
                        prop_assert_eq!(routed.as_deref(), holder, "{} routes to its holder", d);
                    }
                    prop_assert_eq!(table.len(), built.len());
                }
            }
        }
    }

    #[test]
    fn disabled_hosts_are_not_routed() {
        let reg = UpstreamRegistry::default();
        let mut h = (*host("x", &["x.com"], &[])).clone();
        h.enabled = false;
        let t = RouteTable::build(&[Arc::new(h)], &reg, &RouteDefaults::default());
        assert!(t.lookup("x.com").is_none());
    }

    #[test]
    fn longest_location_prefix_wins_on_segment_boundaries() {
        let reg = UpstreamRegistry::default();
        let hosts = vec![host(
            "h",
            &["h.com"],
            &[
                ("/api", "http://127.0.0.1:2"),
                ("/api/v2", "http://127.0.0.1:3"),
                ("/static/", "http://127.0.0.1:4"),
            ],
        )];
        let t = RouteTable::build(&hosts, &reg, &RouteDefaults::default());
        let r = t.lookup("h.com").unwrap();
        let port = |p: &str| r.pool_for(p).upstreams()[0].url.port;
        assert_eq!(port("/api"), 2);
        assert_eq!(port("/api/users"), 2);
        assert_eq!(port("/api?x=1"), 2);
        assert_eq!(port("/api/v2/x"), 3);
        assert_eq!(port("/apix"), 1);
        assert_eq!(port("/static/a.css"), 4);
        assert_eq!(port("/"), 1);
    }
}
