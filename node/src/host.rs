//! The proxy host: the unit of configuration an operator manages.
//!
//! This module owns the domain type and every rule about what a valid host
//! is. The API validates here before anything is written, and the route table
//! trusts what the store holds because it only ever holds validated hosts.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::validate::FieldError;

pub mod balance;
pub use balance::Balancing;

/// A location sends requests under `path_prefix` to its own upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    pub path_prefix: String,
    pub upstreams: Vec<String>,
    /// The location's own balancing (issue 19).
    pub balancing: Balancing,
    /// Access list (name) for this prefix instead of the host's; "" = the
    /// host's.
    pub acl: String,
    /// The location's own rate limit (its own bucket, instead of the
    /// host's), canonical as the host's; "" = the host's limit applies.
    pub rate_limit: String,
    pub rate_key: String,
    pub rate_limit_scope: String,
}

/// One proxy host: the domains it answers for and where traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyHost {
    pub id: String,
    pub name: String,
    /// Lower-cased exact names, `*.suffix` wildcards and IP literals (IPv6
    /// in brackets, as it appears in a Host header).
    pub domains: Vec<String>,
    pub upstreams: Vec<String>,
    pub enabled: bool,
    pub websocket: bool,
    pub preserve_host: bool,
    pub forwarded_headers: bool,
    pub locations: Vec<Location>,
    /// 0 means no idle cut-off: quiet WebSockets are legitimate.
    pub ws_idle_timeout_secs: u32,
    /// 0 means no proxy pings.
    pub ws_ping_interval_secs: u32,
    /// 0 means the node's default.
    pub upstream_timeout_ms: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub version: u64,
    /// Certificate served for this host's domains; empty = best match.
    pub cert_id: String,
    /// 308-redirect plain HTTP to https://.
    pub force_https: bool,
    /// Strict-Transport-Security max-age on HTTPS responses; 0 = none.
    pub hsts_max_age_secs: u32,
    pub hsts_include_subdomains: bool,
    /// PEM CA bundle for https:// upstreams instead of the system roots.
    pub upstream_ca_pem: String,
    /// Explicit opt-out of upstream certificate verification.
    pub upstream_insecure_skip_verify: bool,
    /// The idempotency key of the create that made this host (empty if the
    /// client sent none): a retried create with it returns this host.
    pub create_key: String,
    /// Opted out of automatic certificates (see [`crate::acme`]).
    pub no_acme: bool,
    /// How requests and tunnels are spread over `upstreams` (issue 19).
    pub balancing: Balancing,
    /// Access list (name, see [`crate::access`]) for every request; "" =
    /// none.
    pub acl: String,
    /// A redirect host's target (absolute http(s) URL): every request is
    /// answered with a redirect there; "" = a proxy host.
    pub redirect_to: String,
    /// 301, 302, 307 or 308 (0 is taken as 301).
    pub redirect_code: u32,
    /// Append the request's path and query to `redirect_to`.
    pub redirect_keep_path: bool,
    /// Requests per client, canonical `N/s,burst=B` ([`crate::access::rate`]);
    /// "" = none.
    pub rate_limit: String,
    /// `ip` or `header:name`; "" (no limit) or canonical.
    pub rate_key: String,
    /// `cluster` or `node`.
    pub rate_limit_scope: String,
    /// In-flight requests plus open tunnels to this host per client (IPv4
    /// address or IPv6 /64, as resolved through `--trusted-proxy`); 0 = no
    /// cap. See [`crate::proxy::limits::HostCaps`].
    pub max_conns_per_ip: u32,
}

/// A parsed upstream URL. Only scheme and authority: a path would silently
/// change every request's path, which users rarely mean, so it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    pub tls: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{s:?} must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{s:?} must be scheme://host[:port] without path, query or user info"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?} has an unterminated IPv6 literal"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{s:?} has an invalid IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p, s)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{s:?} is not a valid authority")),
            };
            (addr.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p, s)?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || !(is_hostname(&host) || host.parse::<IpAddr>().is_ok()) {
            return Err(format!("{s:?} has an invalid host"));
        }
        Ok(UpstreamUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `host:port` as it goes into a Host header or a TCP connect.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{whole:?} has an invalid port {p:?}")),
    }
}

fn is_hostname(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Normalises one domain: lower case, IPv6 in brackets. Refuses ports,
/// schemes and anything that can never match a Host header.
pub fn normalize_domain(raw: &str) -> Result<String, String> {
    let d = raw.trim().to_ascii_lowercase();
    let d = d.strip_suffix('.').unwrap_or(&d).to_string();
    if d.is_empty() {
        return Err("must not be empty".into());
    }
    if d.contains("://") {
        return Err(format!("{raw:?} must be a name, not a URL"));
    }
    let unbracketed = d.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    if d.contains(':') {
        return Err(format!(
            "{raw:?} must not contain a port: a host answers on every listener"
        ));
    }
    let name = d.strip_prefix("*.").unwrap_or(&d);
    if name.contains('*') {
        return Err(format!(
            "{raw:?}: a wildcard is only allowed as the whole first label (*.example.com)"
        ));
    }
    if !is_hostname(name) {
        return Err(format!("{raw:?} is not a valid domain name"));
    }
    Ok(d)
}

fn validate_upstreams(field: &str, upstreams: &[String]) -> Result<(), FieldError> {
    if upstreams.is_empty() {
        return Err(FieldError::new(field, "at least one upstream is required"));
    }
    let mut seen = HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let parsed =
            UpstreamUrl::parse(u).map_err(|e| FieldError::new(format!("{field}[{i}]"), e))?;
        if !seen.insert(parsed) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("{u:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

impl ProxyHost {
    /// Normalises (domains lower-cased, upstream URLs canonical, locations
    /// sorted) and validates everything that can be checked without looking
    /// at other hosts. Uniqueness of domains across hosts is the store's job,
    /// because only it sees every host under one lock.
    pub fn normalize_and_validate(&mut self) -> Result<(), FieldError> {
        if self.domains.is_empty() {
            return Err(FieldError::new(
                "domains",
                "at least one domain is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, d) in self.domains.iter_mut().enumerate() {
            *d = normalize_domain(d).map_err(|e| FieldError::new(format!("domains[{i}]"), e))?;
            if !seen.insert(d.clone()) {
                return Err(FieldError::new(
                    format!("domains[{i}]"),
                    format!("{d:?} is listed twice"),
                ));
            }
        }
        if self.redirect_to.trim().is_empty() {
            self.redirect_to.clear();
            if self.redirect_code != 0 || self.redirect_keep_path {
                return Err(FieldError::new(
                    "redirect_to",
                    "is required with a redirect code or --keep-path",
                ));
            }
            validate_upstreams("upstreams", &self.upstreams)?;
            self.upstreams = canonical_upstreams(&self.upstreams);
            self.balancing.normalize_and_validate(
                "balancing",
                &self.upstreams,
                canonical_upstream,
            )?;
        } else {
            self.validate_redirect()?;
        }
        let mut prefixes = HashSet::new();
        for (i, loc) in self.locations.iter_mut().enumerate() {
            let field = format!("locations[{i}]");
            if !loc.path_prefix.starts_with('/') {
                return Err(FieldError::new(
                    format!("{field}.path_prefix"),
                    format!("{:?} must start with /", loc.path_prefix),
                ));
            }
            if loc.path_prefix.contains(['?', '#', ' ']) {
                return Err(FieldError::new(
                    format!("{field}.path_prefix"),
                    format!("{:?} must be a plain path", loc.path_prefix),
                ));
            }
            if !prefixes.insert(loc.path_prefix.clone()) {
                return Err(FieldError::new(
                    format!("{field}.path_prefix"),
                    format!("{:?} is listed twice", loc.path_prefix),
                ));
            }
            validate_upstreams(&format!("{field}.upstreams"), &loc.upstreams)?;
            loc.acl = loc.acl.trim().to_string();
            if !loc.acl.is_empty() {
                crate::access::check_name(&format!("{field}.acl"), &loc.acl)?;
            }
            crate::access::rate::normalize_host_fields(
                &mut loc.rate_limit,
                &mut loc.rate_key,
                &mut loc.rate_limit_scope,
            )
            .map_err(|e| FieldError::new(format!("{field}.{}", e.field), e.reason))?;
            loc.upstreams = canonical_upstreams(&loc.upstreams);
            loc.balancing.normalize_and_validate(
                &format!("{field}.balancing"),
                &loc.upstreams,
                canonical_upstream,
            )?;
            if !loc.balancing.drains.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.balancing.drains"),
                    "upstream drains are kept on the host (they name location upstreams too)",
                ));
            }
        }
        let all: Vec<&String> = self
            .upstreams
            .iter()
            .chain(self.locations.iter().flat_map(|l| &l.upstreams))
            .collect();
        self.balancing.prune_drains(&all);
        self.cert_id = self.cert_id.trim().to_string();
        crate::access::rate::normalize_host_fields(
            &mut self.rate_limit,
            &mut self.rate_key,
            &mut self.rate_limit_scope,
        )?;
        self.acl = self.acl.trim().to_string();
        if !self.acl.is_empty() {
            crate::access::check_name("acl", &self.acl)?;
        }
        if !self.upstream_ca_pem.trim().is_empty() {
            crate::tls::upstream::validate_ca_pem(&self.upstream_ca_pem)
                .map_err(|e| FieldError::new("upstream_ca_pem", e))?;
        } else {
            self.upstream_ca_pem.clear();
        }
        if self.upstream_insecure_skip_verify && !self.upstream_ca_pem.is_empty() {
            return Err(FieldError::new(
                "upstream_insecure_skip_verify",
                "cannot be combined with upstream_ca_pem: either verify with the CA or not at all",
            ));
        }
        self.name = self.name.trim().to_string();
        if self.name.is_empty() {
            self.name = self.domains[0].clone();
        }
        if self.name.len() > 256 {
            return Err(FieldError::new("name", "must be at most 256 characters"));
        }
        Ok(())
    }
}

fn canonical_upstream(u: &str) -> Option<String> {
    UpstreamUrl::parse(u).ok().map(|p| p.to_string())
}

impl ProxyHost {
    /// A redirect host: a target that is an absolute http(s) URL on
    /// another name than the host's own (a redirect to itself would loop),
    /// a redirect code, and no upstreams or locations (nothing is proxied).
    fn validate_redirect(&mut self) -> Result<(), FieldError> {
        self.redirect_to = self.redirect_to.trim().to_string();
        let target = redirect_target_host(&self.redirect_to)
            .map_err(|e| FieldError::new("redirect_to", e))?;
        let own = self.domains.iter().find(|d| match d.strip_prefix("*.") {
            Some(suffix) => target.ends_with(&format!(".{suffix}")),
            None => **d == target,
        });
        if let Some(d) = own {
            return Err(FieldError::new(
                "redirect_to",
                format!(
                    "{:?} points at the host's own domain {d:?}: it would redirect to itself",
                    self.redirect_to
                ),
            ));
        }
        self.redirect_code = match self.redirect_code {
            0 => 301,
            c @ (301 | 302 | 307 | 308) => c,
            c => {
                return Err(FieldError::new(
                    "redirect_code",
                    format!("{c} must be 301, 302, 307 or 308"),
                ))
            }
        };
        if !self.upstreams.is_empty() {
            return Err(FieldError::new(
                "upstreams",
                "a redirect host has no upstreams: it answers every request itself",
            ));
        }
        if !self.locations.is_empty() {
            return Err(FieldError::new(
                "locations",
                "a redirect host has no locations",
            ));
        }
        Ok(())
    }
}

/// The lower-cased host name (IPv6 in brackets) of an absolute http(s)
/// URL, as Host headers spell it.
fn redirect_target_host(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} must be an absolute http:// or https:// URL"))?;
    if url.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(format!(
            "{url:?} must not contain spaces or control characters"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!("{url:?} must not carry user info"));
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => format!("[{}]", v6.split(']').next().unwrap_or("")),
        None => authority.split(':').next().unwrap_or("").to_string(),
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{url:?} has no host"));
    }
    normalize_domain(&host).map_err(|e| format!("{url:?}: {e}"))
}

fn canonical_upstreams(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|u| {
            UpstreamUrl::parse(u)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| u.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> ProxyHost {
        ProxyHost {
            id: "h1".into(),
            name: String::new(),
            domains: vec![
                "App.Example.COM".into(),
                "*.Example.com".into(),
                "127.0.0.1".into(),
                "::1".into(),
            ],
            upstreams: vec!["http://127.0.0.1:3000".into(), "https://backend".into()],
            enabled: true,
            websocket: true,
            preserve_host: true,
            forwarded_headers: true,
            locations: vec![Location {
                path_prefix: "/api".into(),
                upstreams: vec!["http://[::1]:81/".into()],
                ..Default::default()
            }],
            ws_idle_timeout_secs: 0,
            ws_ping_interval_secs: 0,
            upstream_timeout_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn normalizes_domains_upstreams_and_name() {
        let mut h = host();
        h.normalize_and_validate().unwrap();
        assert_eq!(
            h.domains,
            ["app.example.com", "*.example.com", "127.0.0.1", "[::1]"]
        );
        assert_eq!(
            h.upstreams,
            ["http://127.0.0.1:3000", "https://backend:443"]
        );
        assert_eq!(h.locations[0].upstreams, ["http://[::1]:81"]);
        assert_eq!(h.name, "app.example.com");
    }

    #[test]
    fn refusals_name_the_field() {
        type Case = (fn(&mut ProxyHost), &'static str);
        let cases: Vec<Case> = vec![
            (|h| h.domains.clear(), "domains"),
            (|h| h.domains[1] = "a.*.com".into(), "domains[1]"),
            (|h| h.domains[0] = "example.com:8080".into(), "domains[0]"),
            (|h| h.domains[0] = "http://x.com".into(), "domains[0]"),
            (|h| h.domains.push("APP.example.com".into()), "domains[4]"),
            (|h| h.upstreams.clear(), "upstreams"),
            (|h| h.upstreams[0] = "ftp://x".into(), "upstreams[0]"),
            (|h| h.upstreams[1] = "http://x:99999".into(), "upstreams[1]"),
            (|h| h.upstreams[1] = "http://x/path".into(), "upstreams[1]"),
            (
                |h| h.locations[0].path_prefix = "api".into(),
                "locations[0].path_prefix",
            ),
            (
                |h| h.locations[0].upstreams.clear(),
                "locations[0].upstreams",
            ),
        ];
        for (mutate, field) in cases {
            let mut h = host();
            mutate(&mut h);
            let err = h.normalize_and_validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn upstream_authority_round_trips() {
        let u = UpstreamUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(u.authority(), "[::1]:8080");
        let u = UpstreamUrl::parse("https://Example.com").unwrap();
        assert_eq!((u.tls, u.port, u.host.as_str()), (true, 443, "example.com"));
    }

    #[test]
    fn redirect_hosts() {
        let redirect = |to: &str, code: u32| ProxyHost {
            domains: vec!["old.example".into(), "*.old.example".into()],
            redirect_to: to.into(),
            redirect_code: code,
            ..Default::default()
        };
        let mut ok = redirect(" https://new.example/landing ", 0);
        ok.normalize_and_validate().unwrap();
        assert_eq!(
            (ok.redirect_to.as_str(), ok.redirect_code),
            ("https://new.example/landing", 301)
        );
        for to in ["http://[2001:db8::1]:8080/x", "https://NEW.example:8443?q"] {
            redirect(to, 308).normalize_and_validate().unwrap();
        }
        let cases: &[(&str, u32, &str)] = &[
            ("https://old.example/x", 301, "redirect_to"),
            ("http://OLD.example:8080", 301, "redirect_to"),
            ("https://a.old.example", 301, "redirect_to"),
            ("ftp://new.example", 301, "redirect_to"),
            ("new.example", 301, "redirect_to"),
            ("https://", 301, "redirect_to"),
            ("https://user@new.example", 301, "redirect_to"),
            ("https://new.example", 303, "redirect_code"),
        ];
        for (to, code, field) in cases {
            let err = redirect(to, *code).normalize_and_validate().unwrap_err();
            assert_eq!(err.field, *field, "{to}: {err}");
        }
        let mut with_upstream = redirect("https://new.example", 0);
        with_upstream.upstreams = vec!["http://a:1".into()];
        assert_eq!(
            with_upstream.normalize_and_validate().unwrap_err().field,
            "upstreams"
        );
        let mut code_alone = host();
        code_alone.redirect_code = 302;
        assert_eq!(
            code_alone.normalize_and_validate().unwrap_err().field,
            "redirect_to"
        );
    }
}
