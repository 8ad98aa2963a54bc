//! Rendering API answers: aligned text for people, JSON for scripts.
//!
//! The functions return strings instead of printing so that tests can check
//! the exact output. JSON uses the proto field names, so a script reads the
//! same names as the API documentation.
//!
//! A certificate's private key is never returned by the API, so it cannot be
//! printed; its (public) PEM chain appears in JSON only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use charon_proto::v1::{
    ApiToken, Certificate, ClusterStatusResponse, CreateTokenResponse, DrainResponse,
    DrainStatusResponse, Location, LogEvent, Member, ProxyHost, Tunnel, UndrainResponse,
    WaitForWriteResponse,
};
use serde::Serialize;
use serde_json::Value;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// An API answer as JSON, printed: pretty, with a final newline. The proto
/// types derive `Serialize` (proto/build.rs), so every field appears under
/// its proto name and nothing here mirrors them by hand.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("proto types always serialize");
    text.push('\n');
    text
}

/// The wall clock in Unix milliseconds: what relative times (days left,
/// ages, deadlines) and `--since` are measured from.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `host list` in table mode: one row per host.
pub fn hosts_table(hosts: &[ProxyHost]) -> String {
    if hosts.is_empty() {
        return "no hosts\n".to_string();
    }
    let header = [
        "ID",
        "NAME",
        "DOMAINS",
        "UPSTREAMS",
        "ENABLED",
        "WS",
        "VERSION",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(hosts.iter().map(|h| {
        vec![
            h.id.clone(),
            h.name.clone(),
            marked_domains(h),
            h.upstreams.join(","),
            yes_no(h.enabled),
            yes_no(h.websocket),
            h.version.to_string(),
        ]
    }));
    let mut out = align(&rows);
    if hosts.iter().any(|h| !h.conflicts.is_empty()) {
        out.push_str(CONFLICT_NOTE);
    }
    out
}

/// Under a host table with conflicts.
const CONFLICT_NOTE: &str = "\
! = the domain is served by another host: both hosts were given it at once on two \
nodes. Remove it from one of them (host update ID --domain ...) or remove one host; \
`host show ID` names the other host.\n";

/// The host's domains, each one another host holds marked with `!`.
fn marked_domains(h: &ProxyHost) -> String {
    h.domains
        .iter()
        .map(|d| {
            if h.conflicts.iter().any(|c| &c.domain == d) {
                format!("{d}!")
            } else {
                d.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `host show` in table mode: one `key: value` line per field; each location
/// gets its own line.
pub fn host_details(h: &ProxyHost) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", h.id.clone()),
        ("name", h.name.clone()),
        ("domains", h.domains.join(", ")),
    ];
    for (i, c) in h.conflicts.iter().enumerate() {
        rows.push((
            if i == 0 { "NOT SERVED" } else { "" },
            format!(
                "{} is served by host {} ({}): both were given it at once on two nodes; \
                 remove it from one of them or remove one host",
                c.domain,
                c.holder_id,
                or_dash(&c.holder_name)
            ),
        ));
    }
    rows.extend([
        ("upstreams", h.upstreams.join(", ")),
        ("enabled", yes_no(h.enabled)),
        ("websocket", yes_no(h.websocket)),
        ("preserve host", yes_no(h.preserve_host)),
        ("forwarded headers", yes_no(h.forwarded_headers)),
        (
            "ws idle timeout",
            or_zero(h.ws_idle_timeout_secs, "s", "never"),
        ),
        (
            "ws ping interval",
            or_zero(h.ws_ping_interval_secs, "s", "off"),
        ),
        (
            "upstream timeout",
            or_zero(h.upstream_timeout_ms, "ms", "node default"),
        ),
        ("upstream tls", upstream_tls(h)),
        (
            "cert",
            if h.cert_id.is_empty() {
                "auto (best match)".to_string()
            } else {
                h.cert_id.clone()
            },
        ),
        ("force https", yes_no(h.force_https)),
        ("hsts", hsts(h)),
    ]);
    rows.extend(crate::balance::details(h.balancing.as_ref()));
    if !h.acl.is_empty() {
        rows.push(("access list", h.acl.clone()));
    }
    if !h.rate_limit.is_empty() {
        rows.push((
            "rate limit",
            format!(
                "{} per {} ({} scope)",
                h.rate_limit, h.rate_key, h.rate_limit_scope
            ),
        ));
    }
    if h.max_conns_per_ip > 0 {
        rows.push((
            "max conns per ip",
            format!("{} requests and WebSockets per client", h.max_conns_per_ip),
        ));
    }
    if !h.redirect_to.is_empty() {
        let path = if h.redirect_keep_path {
            " (path and query appended)"
        } else {
            ""
        };
        rows.push((
            "redirect",
            format!("{} to {}{path}", h.redirect_code, h.redirect_to),
        ));
    }
    if h.locations.is_empty() {
        rows.push(("locations", "none".to_string()));
    }
    for (i, loc) in h.locations.iter().enumerate() {
        rows.push((if i == 0 { "locations" } else { "" }, location(loc)));
    }
    rows.push(("created", unix_ms(h.created_at_ms)));
    rows.push(("updated", unix_ms(h.updated_at_ms)));
    rows.push(("version", h.version.to_string()));
    key_values(&rows)
}

/// How https:// upstreams are verified.
fn upstream_tls(h: &ProxyHost) -> String {
    if h.upstream_insecure_skip_verify {
        return "INSECURE: not verified".to_string();
    }
    if h.upstream_ca_pem.trim().is_empty() {
        return "system roots".to_string();
    }
    let n = h
        .upstream_ca_pem
        .matches("-----BEGIN CERTIFICATE-----")
        .count();
    format!("custom CA ({n} cert{})", if n == 1 { "" } else { "s" })
}

/// The Strict-Transport-Security header the host sends, or `off`.
fn hsts(h: &ProxyHost) -> String {
    match (h.hsts_max_age_secs, h.hsts_include_subdomains) {
        (0, _) => "off".to_string(),
        (age, false) => format!("max-age={age}"),
        (age, true) => format!("max-age={age}; includeSubDomains"),
    }
}

/// `cert list` in table mode: one row per certificate. `now_ms` (Unix
/// milliseconds) is the clock the days left are counted from.
pub fn certs_table(certs: &[Certificate], now_ms: u64) -> String {
    if certs.is_empty() {
        return "no certificates\n".to_string();
    }
    let header = [
        "ID",
        "NAME",
        "DOMAINS",
        "SOURCE",
        "STATUS",
        "EXPIRES",
        "DAYS LEFT",
        "NEXT ATTEMPT",
        "HOSTS",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(certs.iter().map(|c| {
        // An ACME order without a certificate yet has no dates.
        let issued = !c.cert_pem.is_empty() || c.not_after_ms != 0;
        vec![
            c.id.clone(),
            c.name.clone(),
            c.domains.join(","),
            source(c),
            dash(&c.status),
            if issued {
                unix_date(c.not_after_ms)
            } else {
                "-".to_string()
            },
            match days_left(c.not_after_ms, now_ms) {
                _ if !issued => "-".to_string(),
                None => "expired".to_string(),
                Some(d) => d.to_string(),
            },
            if c.next_attempt_ms == 0 {
                "-".to_string()
            } else {
                unix_ms(c.next_attempt_ms)
            },
            if c.used_by_hosts.is_empty() {
                "-".to_string()
            } else {
                c.used_by_hosts.join(",")
            },
        ]
    }));
    align(&rows)
}

/// `acme` or `uploaded` (servers before automatic HTTPS send nothing).
fn source(c: &Certificate) -> String {
    if c.source.is_empty() {
        "uploaded".to_string()
    } else {
        c.source.clone()
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// `cert show` in table mode: every metadata field, one `key: value` line
/// each, then an ACME certificate's order history. The PEM chain is left
/// to `-o json`.
pub fn cert_details(c: &Certificate, now_ms: u64) -> String {
    let not_before = if now_ms < c.not_before_ms {
        format!("{} (not yet valid)", unix_ms(c.not_before_ms))
    } else {
        unix_ms(c.not_before_ms)
    };
    let not_after = match days_left(c.not_after_ms, now_ms) {
        _ if c.not_after_ms == 0 => unix_ms(0),
        None => format!("{} (expired)", unix_ms(c.not_after_ms)),
        Some(1) => format!("{} (1 day left)", unix_ms(c.not_after_ms)),
        Some(d) => format!("{} ({d} days left)", unix_ms(c.not_after_ms)),
    };
    let used_by = if c.used_by_hosts.is_empty() {
        "none".to_string()
    } else {
        c.used_by_hosts.join(", ")
    };
    let mut acme = Vec::new();
    if c.source == "acme" {
        acme.push(("status", dash(&c.status)));
        acme.push((
            "next attempt",
            if c.next_attempt_ms == 0 {
                "-".to_string()
            } else {
                unix_ms(c.next_attempt_ms)
            },
        ));
        acme.push(("ordering node", dash(&c.holder)));
    }
    let mut out = key_values(
        &[
            vec![
                ("id", c.id.clone()),
                ("name", c.name.clone()),
                ("domains", c.domains.join(", ")),
                ("source", source(c)),
            ],
            acme,
            vec![
                ("subject", c.subject.clone()),
                ("issuer", c.issuer.clone()),
                ("serial", c.serial.clone()),
                ("sha256 fingerprint", c.fingerprint_sha256.clone()),
                ("key type", c.key_type.clone()),
                ("chain length", c.chain_length.to_string()),
                ("not before", not_before),
                ("not after", not_after),
                ("used by", used_by),
                ("created", unix_ms(c.created_at_ms)),
                ("updated", unix_ms(c.updated_at_ms)),
                ("version", c.version.to_string()),
            ],
        ]
        .concat(),
    );
    if !c.history.is_empty() {
        out.push_str("order history:\n");
        for h in &c.history {
            out.push_str("  ");
            out.push_str(h);
            out.push('\n');
        }
    }
    out
}

/// `cluster members` in table mode: one row per member, in the node's
/// order; `*` after a name marks the member that answered.
pub fn members_table(members: &[Member]) -> String {
    if members.is_empty() {
        return "no members\n".to_string();
    }
    let header = [
        "NAME", "NODE ID", "REGION", "ZONE", "API", "STATUS", "STATE", "LAG",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(members.iter().map(|m| {
        vec![
            member_name(m),
            short_id(&m.node_id),
            or_dash(&m.region),
            or_dash(&m.zone),
            or_dash(&m.api_address),
            member_status(m),
            live_dead(m.live),
            m.lag.to_string(),
        ]
    }));
    align(&rows)
}

/// The status, with what a draining member still has open.
fn member_status(m: &Member) -> String {
    match m.status.as_str() {
        "draining" => format!(
            "draining ({} conns, {} tunnels)",
            m.http_connections, m.tunnels
        ),
        s => or_dash(s),
    }
}

/// `cluster status` in table mode: a line saying whether the live members
/// converged, then one row per member with what it has applied.
pub fn status_table(status: &ClusterStatusResponse) -> String {
    let live = status.members.iter().filter(|m| m.live).count();
    let mut out = format!(
        "{}: cluster {}, {live} of {} members live\n",
        if status.converged {
            "converged"
        } else {
            "not converged"
        },
        or_dash(&status.cluster_id),
        status.members.len(),
    );
    if status.catching_up {
        out.push_str(
            "this node is catching up with the cluster since it started: it refuses writes until then\n",
        );
    }
    if status.name_conflicts > 0 {
        out.push_str(&format!(
            "{} domain conflict{}: a domain was given to two hosts at once; `charonctl host list` marks them with !\n",
            status.name_conflicts,
            if status.name_conflicts == 1 { "" } else { "s" }
        ));
    }
    if status.members.is_empty() {
        return out;
    }
    let header = ["NAME", "STATE", "HASH", "LAG", "APPLIED"];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(status.members.iter().map(|m| {
        vec![
            member_name(m),
            live_dead(m.live),
            or_dash(&m.state_hash),
            m.lag.to_string(),
            applied(m),
        ]
    }));
    out.push_str(&align(&rows));
    out
}

/// The stderr line after `--wait`: how long replication took, or which
/// live nodes had not applied the write within `timeout`.
pub fn wait_report(reply: &WaitForWriteResponse, timeout: Duration) -> String {
    if reply.complete {
        let n = reply.applied.len();
        return format!(
            "replicated to {n} live node{} in {} ms\n",
            if n == 1 { "" } else { "s" },
            reply.waited_ms
        );
    }
    let names = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    format!(
        "not applied within {} on: {} (applied on: {})\n",
        format_duration(timeout),
        names(&reply.pending),
        names(&reply.applied)
    )
}

/// `token create` in table mode: what was created, then the secret on a
/// line of its own (the only time it is shown), so that it can be copied
/// or cut out whole.
pub fn token_created(reply: &CreateTokenResponse) -> String {
    let token = reply.token.clone().unwrap_or_default();
    format!(
        "created token {}\n{}secret (shown once; store it now):\n{}\n",
        token.id,
        token_details(&token),
        reply.secret
    )
}

/// One token, one `key: value` line per field.
fn token_details(t: &ApiToken) -> String {
    key_values(&[
        ("id", t.id.clone()),
        ("name", t.name.clone()),
        ("created", unix_ms(t.created_at_ms)),
        ("created on", or_dash(&t.created_on)),
    ])
}

/// `token list` in table mode: one row per token, in the node's order.
pub fn tokens_table(tokens: &[ApiToken]) -> String {
    if tokens.is_empty() {
        return "no tokens\n".to_string();
    }
    let header = ["ID", "NAME", "CREATED", "CREATED ON"];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(tokens.iter().map(|t| {
        vec![
            t.id.clone(),
            t.name.clone(),
            unix_ms(t.created_at_ms),
            or_dash(&t.created_on),
        ]
    }));
    align(&rows)
}

/// A node as people name it: its name, or its short id when it has none.
fn node_label(name: &str, node_id: &str) -> String {
    if name.is_empty() {
        short_id(node_id)
    } else {
        name.to_string()
    }
}

/// A node with its short id: `n2 (7b2d4e6f)`, or the short id alone.
fn node_with_id(name: &str, node_id: &str) -> String {
    match (name.is_empty(), node_id.is_empty()) {
        (false, false) => format!("{name} ({})", short_id(node_id)),
        (false, true) => name.to_string(),
        (true, _) => short_id(node_id),
    }
}

/// `node drain` in table mode: when the node's WebSocket tunnels close.
pub fn drain_started(reply: &DrainResponse) -> String {
    let close = if reply.deadline_ms == 0 {
        "at the node's deadline".to_string()
    } else {
        format!("at {}", unix_ms(reply.deadline_ms))
    };
    let spread = if reply.spread_secs == 0 {
        String::new()
    } else {
        format!(
            " (+ spread {})",
            format_duration(Duration::from_secs(reply.spread_secs.into()))
        )
    };
    format!(
        "draining {}: WebSocket tunnels close {close}{spread}\n",
        node_with_id(&reply.name, &reply.node_id)
    )
}

/// `node undrain` in table mode.
pub fn undrained(reply: &UndrainResponse) -> String {
    format!(
        "undrained {}: it serves again\n",
        node_with_id(&reply.name, &reply.node_id)
    )
}

/// `node status` in table mode: one `key: value` line per field; `now_ms`
/// (Unix milliseconds) is the clock the time to the deadline is counted from.
pub fn drain_status_details(s: &DrainStatusResponse, now_ms: u64) -> String {
    let node = match (s.name.is_empty(), s.node_id.is_empty()) {
        (false, false) => format!("{} ({})", s.name, s.node_id),
        _ => node_label(&s.name, &s.node_id),
    };
    let deadline = match deadline_left(s.deadline_ms, now_ms) {
        None => "-".to_string(),
        Some(None) => format!("{} (passed)", unix_ms(s.deadline_ms)),
        Some(Some(left)) => format!("{} (in {left})", unix_ms(s.deadline_ms)),
    };
    key_values(&[
        ("node", node),
        ("status", or_dash(&s.status)),
        ("state", live_dead(s.live)),
        ("drain requested", yes_no(s.requested)),
        ("http connections", s.http_connections.to_string()),
        ("tunnels", s.tunnels.to_string()),
        (
            "listeners",
            if s.listeners_closed { "closed" } else { "open" }.to_string(),
        ),
        ("deadline", deadline),
        ("cut", s.cut.to_string()),
    ])
}

/// The width of the progress bar of `node drain --wait`, in characters.
pub const BAR_WIDTH: u64 = 10;

/// One progress line of `node drain --wait`, without a line end:
/// `[#####-----] n2 draining: 12 HTTP connections, 340 tunnels, 2m10s to
/// deadline`. The bar fills with the share of the connections and tunnels
/// of the first poll (`first_total`) that are gone; `now_ms` (Unix
/// milliseconds) is the clock the time to the deadline is counted from.
pub fn drain_progress(s: &DrainStatusResponse, first_total: u64, now_ms: u64) -> String {
    let total = s.http_connections.saturating_add(s.tunnels);
    let gone = first_total.saturating_sub(total);
    let filled = if first_total == 0 {
        BAR_WIDTH
    } else {
        (u128::from(gone) * u128::from(BAR_WIDTH) / u128::from(first_total)) as u64
    };
    let bar: String = (0..BAR_WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    let state = if !s.live {
        "not live"
    } else if s.status.is_empty() {
        "-"
    } else {
        &s.status
    };
    let deadline = match deadline_left(s.deadline_ms, now_ms) {
        None => String::new(),
        Some(None) => ", deadline passed".to_string(),
        Some(Some(left)) => format!(", {left} to deadline"),
    };
    format!(
        "[{bar}] {} {state}: {}{deadline}",
        node_label(&s.name, &s.node_id),
        drain_counts(s)
    )
}

/// `12 HTTP connections, 340 tunnels`.
fn drain_counts(s: &DrainStatusResponse) -> String {
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}, {}",
        plural(s.http_connections, "HTTP connection"),
        plural(s.tunnels, "tunnel")
    )
}

/// How long until the deadline, in whole seconds rounded up: `None` when
/// there is no deadline, `Some(None)` once it has passed.
fn deadline_left(deadline_ms: u64, now_ms: u64) -> Option<Option<String>> {
    if deadline_ms == 0 {
        return None;
    }
    Some((deadline_ms > now_ms).then(|| {
        let secs = (deadline_ms - now_ms).div_ceil(1000);
        format_duration(Duration::from_secs(secs))
    }))
}

/// The last line of `node drain --wait` when the node is drained:
/// `n2 drained in 41s (cut: 0)`, the time rounded to whole seconds.
pub fn drain_summary(s: &DrainStatusResponse, node: &str, elapsed: Duration) -> String {
    let label = if s.name.is_empty() && s.node_id.is_empty() {
        node.to_string()
    } else {
        node_label(&s.name, &s.node_id)
    };
    format!(
        "{label} drained in {} (cut: {})\n",
        whole_seconds(elapsed),
        s.cut
    )
}

/// The last line of `node drain --wait` when `--wait-timeout` passed: what
/// was left at the last poll (`None`: no answer yet).
pub fn drain_timeout_report(
    s: Option<&DrainStatusResponse>,
    node: &str,
    timeout: Duration,
) -> String {
    let within = format_duration(timeout);
    match s {
        None => {
            format!("{node} not drained within {within}: no drain status yet (the drain goes on)\n")
        }
        Some(s) => {
            let label = if s.name.is_empty() && s.node_id.is_empty() {
                node.to_string()
            } else {
                node_label(&s.name, &s.node_id)
            };
            format!(
                "{label} not drained within {within}: {} left (the drain goes on)\n",
                drain_counts(s)
            )
        }
    }
}

/// A duration rounded to whole seconds, as `format_duration` writes them:
/// `0s`, `41s`, `2m10s`.
fn whole_seconds(d: Duration) -> String {
    let secs = (d.as_millis() + 500) / 1000;
    if secs == 0 {
        return "0s".to_string();
    }
    format_duration(Duration::from_secs(secs as u64))
}

/// A duration as `--wait-timeout` reads it: `500ms`, `10s`, `2m`, `1m30s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".to_string();
    }
    let parts = [
        (ms / 3_600_000, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// One access-log event as a line for people, without a line end:
///
/// `2026-11-24T10:00:00.123Z n1 GET app.test /path 200 3.1ms -> http://127.0.0.1:3000 (client 127.0.0.1:5555)`
///
/// `2026-11-24T10:00:00.123Z n1 TUNNEL app.test 101 closed by client code 1000, 12.3s, 1.2 KiB up / 3.4 KiB down -> http://127.0.0.1:3000 (client 127.0.0.1:5555)`
///
/// The time, node, kind, host and status come from the event's own fields;
/// the rest from its JSON line, and are left out when it lacks them (or is
/// not JSON). A request that matched no proxy host shows the Host it asked
/// for; an error the node logged comes last.
pub fn log_line(e: &LogEvent) -> String {
    let line: Value = serde_json::from_str(&e.json).unwrap_or(Value::Null);
    let text = |key: &str| line.get(key).and_then(Value::as_str).unwrap_or("");
    let number = |key: &str| line.get(key).and_then(Value::as_u64);
    let node = if e.node.is_empty() {
        text("node")
    } else {
        &e.node
    };
    let kind = if e.kind.is_empty() {
        text("kind")
    } else {
        &e.kind
    };
    let host = [e.host.as_str(), text("host"), text("authority")]
        .into_iter()
        .find(|h| !h.is_empty())
        .unwrap_or("-");
    let status = match e.status {
        0 => number("status").unwrap_or(0),
        status => status.into(),
    };
    let duration = line
        .get("duration_ms")
        .and_then(Value::as_f64)
        .map(human_ms);
    let mut out = format!("{} {}", unix_ms_precise(e.ts_ms), or_dash(node));
    match kind {
        "http" => {
            out.push_str(&format!(
                " {} {host} {} {status}",
                or_dash(text("method")),
                or_dash(text("path"))
            ));
            if let Some(duration) = duration {
                out.push_str(&format!(" {duration}"));
            }
        }
        "tunnel" => {
            out.push_str(&format!(" TUNNEL {host} {status} "));
            out.push_str(&match text("closed_by") {
                "" => "closed".to_string(),
                by if by.starts_with("none") => "ended without a Close".to_string(),
                by => format!("closed by {by}"),
            });
            if let Some(code) = number("close_code") {
                out.push_str(&format!(" code {code}"));
            }
            if let Some(duration) = duration {
                out.push_str(&format!(", {duration}"));
            }
            if let (Some(up), Some(down)) = (number("bytes_to_upstream"), number("bytes_to_client"))
            {
                out.push_str(&format!(
                    ", {} up / {} down",
                    human_bytes(up),
                    human_bytes(down)
                ));
            }
        }
        other => out.push_str(&format!(
            " {} {host} {status}",
            or_dash(&other.to_ascii_uppercase())
        )),
    }
    let upstream = text("upstream");
    if !upstream.is_empty() {
        out.push_str(&format!(" -> {upstream}"));
    }
    let client = text("client");
    if !client.is_empty() {
        out.push_str(&format!(" (client {client})"));
    }
    let error = text("error");
    if !error.is_empty() {
        out.push_str(&format!(" error: {error}"));
    }
    out
}

/// `tunnels` in table mode: one row per tunnel; `now_ms` (Unix
/// milliseconds) is the clock the ages are counted from.
pub fn tunnels_table(tunnels: &[Tunnel], now_ms: u64) -> String {
    if tunnels.is_empty() {
        return "no tunnels\n".to_string();
    }
    let header = [
        "NODE", "ID", "HOST", "CLIENT", "UPSTREAM", "AGE", "UP", "DOWN",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(tunnels.iter().map(|t| {
        vec![
            or_dash(&t.node),
            t.id.to_string(),
            or_dash(&t.host),
            or_dash(&t.client),
            or_dash(&t.upstream),
            age(t.started_ms, now_ms),
            human_bytes(t.bytes_to_upstream),
            human_bytes(t.bytes_to_client),
        ]
    }));
    align(&rows)
}

/// How long ago `started_ms` was, in whole seconds: `0s`, `42s`, `3m12s`,
/// `2h5m`; `-` when unknown.
fn age(started_ms: u64, now_ms: u64) -> String {
    if started_ms == 0 {
        return "-".to_string();
    }
    let secs = now_ms.saturating_sub(started_ms) / 1000;
    if secs == 0 {
        return "0s".to_string();
    }
    format_duration(Duration::from_secs(secs))
}

/// A byte count in binary units with one decimal: `512 B`, `1.2 KiB`,
/// `3.4 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut unit = 0;
    let mut size = 1024u128;
    loop {
        // Tenths of the unit, rounded half up.
        let tenths = (u128::from(n) * 10 + size / 2) / size;
        if tenths < 10_240 || unit + 1 == UNITS.len() {
            return format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit]);
        }
        unit += 1;
        size *= 1024;
    }
}

/// A duration in milliseconds as the access log measured it: `0.4ms`,
/// `3.1ms`, `250.0ms`, `12.3s`, then whole seconds (`1m30s`, `2h5m`).
fn human_ms(ms: f64) -> String {
    if !ms.is_finite() || ms <= 0.0 {
        return "0.0ms".to_string();
    }
    let tenths_ms = (ms * 10.0).round() as u64;
    if tenths_ms < 10_000 {
        return format!("{}.{}ms", tenths_ms / 10, tenths_ms % 10);
    }
    let tenths_s = (ms / 100.0).round() as u64;
    if tenths_s < 600 {
        return format!("{}.{}s", tenths_s / 10, tenths_s % 10);
    }
    format_duration(Duration::from_secs((ms / 1000.0).round() as u64))
}

/// A member's name, with `*` after it when it is the answering node.
fn member_name(m: &Member) -> String {
    let name = if m.name.is_empty() {
        short_id(&m.node_id)
    } else {
        m.name.clone()
    };
    if m.self_ {
        format!("{name}*")
    } else {
        name
    }
}

/// The first 8 characters of a node id: enough to tell members apart.
fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// The applied vector as `origin:seq` pairs, origins shortened and sorted.
fn applied(m: &Member) -> String {
    let mut pairs: Vec<(&String, &u64)> = m.applied.iter().collect();
    pairs.sort();
    if pairs.is_empty() {
        return "-".to_string();
    }
    pairs
        .iter()
        .map(|(origin, seq)| format!("{}:{seq}", short_id(origin)))
        .collect::<Vec<_>>()
        .join(",")
}

fn live_dead(live: bool) -> String {
    if live { "live" } else { "dead" }.to_string()
}

fn or_dash(value: &str) -> String {
    if value.is_empty() {
        "-".to_string()
    } else {
        value.to_string()
    }
}

/// The node's warnings (e.g. "expires in 12 days"), one stderr line each.
pub fn warnings(warnings: &[String]) -> String {
    warnings.iter().map(|w| format!("warning: {w}\n")).collect()
}

/// Whole days until `not_after_ms`; `None` once it has passed.
fn days_left(not_after_ms: u64, now_ms: u64) -> Option<u64> {
    const DAY_MS: u64 = 86_400_000;
    (not_after_ms > now_ms).then(|| (not_after_ms - now_ms) / DAY_MS)
}

/// One `key: value` line per row, the values aligned; an empty key continues
/// the row above.
pub(crate) fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| {
            let key = if key.is_empty() {
                String::new()
            } else {
                format!("{key}:")
            };
            format!("{key:<width$}  {value}\n")
        })
        .collect()
}

/// Pads every column but the last to its widest cell, two spaces apart.
pub(crate) fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A duration field where 0 has a meaning of its own rather than "no time".
fn or_zero(value: u32, unit: &str, zero: &str) -> String {
    if value == 0 {
        zero.to_string()
    } else {
        format!("{value}{unit}")
    }
}

fn location(loc: &Location) -> String {
    let mut line = format!("{} -> {}", loc.path_prefix, loc.upstreams.join(", "));
    line.push_str(&crate::balance::location_suffix(loc.balancing.as_ref()));
    if !loc.acl.is_empty() {
        line.push_str(&format!(" (access list {})", loc.acl));
    }
    if !loc.rate_limit.is_empty() {
        line.push_str(&format!(
            " (rate limit {} per {}, {} scope)",
            loc.rate_limit, loc.rate_key, loc.rate_limit_scope
        ));
    }
    line
}

/// The UTC date (`YYYY-MM-DD`) of Unix milliseconds.
fn unix_date(ms: u64) -> String {
    utc(ms, format_description!("[year]-[month]-[day]"))
}

/// Unix milliseconds as UTC RFC 3339 with the milliseconds, as the access
/// log writes them: `2026-11-24T10:00:00.123Z`.
fn unix_ms_precise(ms: u64) -> String {
    utc(
        ms,
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"),
    )
}

/// Unix milliseconds as UTC RFC 3339: `2026-11-24T10:00:00Z`.
fn unix_ms(ms: u64) -> String {
    utc(
        ms,
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"),
    )
}

/// `ms` in `format`, UTC; 0 (a field the node left unset) is `-`.
fn utc(ms: u64, format: &[BorrowedFormatItem<'_>]) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `-o json` prints for `value`, read back.
    fn printed<T: Serialize + ?Sized>(value: &T) -> Value {
        serde_json::from_str(&to_json(value)).expect("to_json prints JSON")
    }

    fn sample() -> ProxyHost {
        ProxyHost {
            id: "h1".into(),
            name: "app".into(),
            domains: vec!["app.example".into(), "www.app.example".into()],
            upstreams: vec!["http://10.0.0.5:8080".into()],
            enabled: true,
            websocket: true,
            preserve_host: true,
            forwarded_headers: false,
            locations: vec![
                Location {
                    path_prefix: "/api".into(),
                    upstreams: vec!["http://10.0.0.6:1".into(), "http://10.0.0.7:1".into()],
                    balancing: None,
                    ..Default::default()
                },
                Location {
                    path_prefix: "/ws".into(),
                    upstreams: vec!["http://10.0.0.8:1".into()],
                    balancing: None,
                    ..Default::default()
                },
            ],
            ws_idle_timeout_secs: 0,
            ws_ping_interval_secs: 30,
            upstream_timeout_ms: 0,
            created_at_ms: 1_714_564_800_000,
            updated_at_ms: 1_714_564_861_999,
            version: 3,
            cert_id: String::new(),
            force_https: false,
            hsts_max_age_secs: 0,
            hsts_include_subdomains: false,
            upstream_ca_pem: String::new(),
            upstream_insecure_skip_verify: false,
            conflicts: vec![],
            no_acme: false,
            balancing: None,
            acl: String::new(),
            ..ProxyHost::default()
        }
    }

    #[test]
    fn a_conflicted_domain_is_marked_and_explained() {
        let mut h = sample();
        h.conflicts = vec![charon_proto::v1::DomainConflict {
            domain: "www.app.example".into(),
            holder_id: "h9".into(),
            holder_name: "other".into(),
        }];
        let table = hosts_table(std::slice::from_ref(&h));
        assert!(table.contains("app.example,www.app.example!"), "{table}");
        assert!(
            table.contains("! = the domain is served by another host"),
            "{table}"
        );
        assert!(!hosts_table(&[sample()]).contains("! ="));
        let details = host_details(&h);
        assert!(
            details.contains("NOT SERVED")
                && details.contains("www.app.example is served by host h9 (other)"),
            "{details}"
        );
        let status = status_table(&ClusterStatusResponse {
            converged: true,
            cluster_id: "prod".into(),
            catching_up: true,
            name_conflicts: 2,
            ..Default::default()
        });
        assert!(status.contains("catching up"), "{status}");
        assert!(status.contains("2 domain conflicts"), "{status}");
    }

    #[test]
    fn list_columns_are_aligned() {
        let mut other = sample();
        other.id = "a-much-longer-id".into();
        other.name = "x".into();
        other.domains = vec!["x.example".into()];
        other.enabled = false;
        other.version = 12;
        let table = hosts_table(&[sample(), other]);
        let want = "\
ID                NAME  DOMAINS                      UPSTREAMS             ENABLED  WS   VERSION
h1                app   app.example,www.app.example  http://10.0.0.5:8080  yes      yes  3
a-much-longer-id  x     x.example                    http://10.0.0.5:8080  no       yes  12
";
        assert_eq!(table, want);
    }

    #[test]
    fn an_empty_list_says_so() {
        assert_eq!(hosts_table(&[]), "no hosts\n");
    }

    #[test]
    fn details_show_every_field_and_each_location() {
        let text = host_details(&sample());
        let want = "\
id:                 h1
name:               app
domains:            app.example, www.app.example
upstreams:          http://10.0.0.5:8080
enabled:            yes
websocket:          yes
preserve host:      yes
forwarded headers:  no
ws idle timeout:    never
ws ping interval:   30s
upstream timeout:   node default
upstream tls:       system roots
cert:               auto (best match)
force https:        no
hsts:               off
balancing:          round-robin
locations:          /api -> http://10.0.0.6:1, http://10.0.0.7:1
                    /ws -> http://10.0.0.8:1
created:            2024-05-01T12:00:00Z
updated:            2024-05-01T12:01:01Z
version:            3
";
        assert_eq!(text, want);
    }

    #[test]
    fn json_uses_proto_field_names() {
        let v = printed(&sample());
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "id",
            "name",
            "domains",
            "upstreams",
            "enabled",
            "websocket",
            "preserve_host",
            "forwarded_headers",
            "locations",
            "ws_idle_timeout_secs",
            "ws_ping_interval_secs",
            "upstream_timeout_ms",
            "cert_id",
            "force_https",
            "hsts_max_age_secs",
            "hsts_include_subdomains",
            "upstream_ca_pem",
            "upstream_insecure_skip_verify",
            "no_acme",
            "created_at_ms",
            "updated_at_ms",
            "version",
            "conflicts",
            "balancing",
            "acl",
            "redirect_to",
            "redirect_code",
            "redirect_keep_path",
            "rate_limit",
            "rate_key",
            "rate_limit_scope",
            "max_conns_per_ip",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["locations"][0]["path_prefix"], "/api");
        assert_eq!(v["locations"][0]["upstreams"][1], "http://10.0.0.7:1");
        assert_eq!(v["version"], 3);
        assert_eq!(v["forwarded_headers"], false);
        assert!(printed(&[sample()]).is_array());
    }

    #[test]
    fn host_tls_fields_in_details_and_json() {
        let ca = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n";
        let host = ProxyHost {
            cert_id: "c1".into(),
            force_https: true,
            hsts_max_age_secs: 600,
            upstream_ca_pem: ca.repeat(2),
            ..sample()
        };
        let text = host_details(&host);
        for line in [
            "upstream tls:       custom CA (2 certs)\n",
            "cert:               c1\n",
            "force https:        yes\n",
            "hsts:               max-age=600\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let v = printed(&host);
        assert_eq!(v["cert_id"], "c1");
        assert_eq!(v["force_https"], true);
        assert_eq!(v["hsts_max_age_secs"], 600);
        assert_eq!(v["upstream_ca_pem"], ca.repeat(2));
        assert_eq!(v["upstream_insecure_skip_verify"], false);
    }

    #[test]
    fn upstream_tls_and_hsts_wording() {
        let ca = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n";
        let with = |pem: &str, insecure: bool| ProxyHost {
            upstream_ca_pem: pem.into(),
            upstream_insecure_skip_verify: insecure,
            ..sample()
        };
        assert_eq!(upstream_tls(&with("", false)), "system roots");
        assert_eq!(upstream_tls(&with(ca, false)), "custom CA (1 cert)");
        assert_eq!(upstream_tls(&with("", true)), "INSECURE: not verified");
        // Not verifying wins over a CA that would not be used.
        assert_eq!(upstream_tls(&with(ca, true)), "INSECURE: not verified");

        let hsts_of = |age, sub| {
            hsts(&ProxyHost {
                hsts_max_age_secs: age,
                hsts_include_subdomains: sub,
                ..sample()
            })
        };
        assert_eq!(hsts_of(0, true), "off");
        assert_eq!(hsts_of(60, false), "max-age=60");
        assert_eq!(hsts_of(60, true), "max-age=60; includeSubDomains");
    }

    const NOW: u64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z
    const DAY: u64 = 86_400_000;

    fn cert() -> Certificate {
        Certificate {
            id: "c1".into(),
            name: "app".into(),
            domains: vec!["app.example".into(), "*.app.example".into()],
            not_before_ms: NOW - 10 * DAY,
            not_after_ms: NOW + 80 * DAY + 5,
            issuer: "CN=Test CA, O=Charon".into(),
            subject: "CN=app.example".into(),
            serial: "0A:1B".into(),
            fingerprint_sha256: "AB:CD:EF".into(),
            key_type: "ECDSA P-256".into(),
            chain_length: 2,
            created_at_ms: NOW,
            updated_at_ms: NOW + 1000,
            version: 4,
            used_by_hosts: vec!["h1".into(), "h2".into()],
            cert_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
            ..Default::default()
        }
    }

    #[test]
    fn cert_list_columns() {
        let expired = Certificate {
            id: "c-old".into(),
            name: "old".into(),
            domains: vec!["old.example".into()],
            not_after_ms: NOW - 1,
            used_by_hosts: vec![],
            ..cert()
        };
        let failed = Certificate {
            id: "acme-1".into(),
            name: "new.example".into(),
            domains: vec!["new.example".into()],
            source: "acme".into(),
            status: "failed: CA: unreachable".into(),
            next_attempt_ms: NOW + 60_000,
            ..Certificate::default()
        };
        let table = certs_table(&[cert(), expired, failed], NOW);
        let want = "\
ID      NAME         DOMAINS                    SOURCE    STATUS                   EXPIRES     DAYS LEFT  NEXT ATTEMPT          HOSTS
c1      app          app.example,*.app.example  uploaded  -                        2024-07-20  80         -                     h1,h2
c-old   old          old.example                uploaded  -                        2024-05-01  expired    -                     -
acme-1  new.example  new.example                acme      failed: CA: unreachable  -           -          2024-05-01T12:01:00Z  -
";
        assert_eq!(table, want);
        assert_eq!(certs_table(&[], NOW), "no certificates\n");
    }

    #[test]
    fn cert_details_show_all_metadata_but_no_pem() {
        let text = cert_details(&cert(), NOW);
        let want = "\
id:                  c1
name:                app
domains:             app.example, *.app.example
source:              uploaded
subject:             CN=app.example
issuer:              CN=Test CA, O=Charon
serial:              0A:1B
sha256 fingerprint:  AB:CD:EF
key type:            ECDSA P-256
chain length:        2
not before:          2024-04-21T12:00:00Z
not after:           2024-07-20T12:00:00Z (80 days left)
used by:             h1, h2
created:             2024-05-01T12:00:00Z
updated:             2024-05-01T12:00:01Z
version:             4
";
        assert_eq!(text, want);
        assert!(!text.contains("BEGIN"));
    }

    #[test]
    fn acme_cert_details_show_status_and_history() {
        let c = Certificate {
            source: "acme".into(),
            status: "renewing".into(),
            holder: "n2".into(),
            history: vec!["2024-05-01T12:00:00Z n2: placed order https://ca/o/1".into()],
            ..cert()
        };
        let text = cert_details(&c, NOW);
        assert!(
            text.contains("source:              acme\nstatus:              renewing\n"),
            "{text}"
        );
        assert!(text.contains("ordering node:       n2\n"), "{text}");
        assert!(
            text.ends_with(
                "order history:\n  2024-05-01T12:00:00Z n2: placed order https://ca/o/1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn cert_validity_wording() {
        let at = |not_before_ms, not_after_ms| {
            cert_details(
                &Certificate {
                    not_before_ms,
                    not_after_ms,
                    used_by_hosts: vec![],
                    ..cert()
                },
                NOW,
            )
        };
        let text = at(NOW - DAY, NOW + DAY + 1);
        assert!(text.contains("(1 day left)\n"), "{text}");
        assert!(text.contains("used by:             none\n"), "{text}");
        assert!(at(NOW - DAY, NOW).contains("(expired)\n"));
        assert!(at(NOW + 1, NOW + DAY).contains("(not yet valid)\n"));
        assert_eq!(days_left(NOW + DAY - 1, NOW), Some(0));
        assert_eq!(days_left(NOW, NOW), None);
    }

    #[test]
    fn cert_json_uses_proto_field_names() {
        let v = printed(&cert());
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "id",
            "name",
            "domains",
            "not_before_ms",
            "not_after_ms",
            "issuer",
            "subject",
            "serial",
            "fingerprint_sha256",
            "key_type",
            "chain_length",
            "created_at_ms",
            "updated_at_ms",
            "version",
            "used_by_hosts",
            "cert_pem",
            "source",
            "status",
            "next_attempt_ms",
            "history",
            "holder",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["used_by_hosts"][1], "h2");
        assert_eq!(v["chain_length"], 2);
        assert!(printed(&[cert()]).is_array());
    }

    #[test]
    fn warnings_are_one_line_each() {
        assert_eq!(warnings(&[]), "");
        assert_eq!(
            warnings(&["expires in 12 days".into(), "self-signed".into()]),
            "warning: expires in 12 days\nwarning: self-signed\n"
        );
    }

    fn member(name: &str, node_id: &str) -> Member {
        Member {
            node_id: node_id.into(),
            name: name.into(),
            region: "eu-west".into(),
            zone: "a".into(),
            api_address: format!("http://{name}:7070"),
            gossip_address: "10.0.0.1:7946".into(),
            status: "serving".into(),
            live: true,
            self_: false,
            generation: 1_714_564_800_000_000_000,
            build_version: "0.1.0".into(),
            applied: [
                ("0f3a9c2e-1111-4000-8000-000000000001".to_string(), 12),
                ("7b2d4e6f-2222-4000-8000-000000000002".to_string(), 3),
            ]
            .into(),
            state_hash: "9f86d081884c7d65".into(),
            lag: 0,
            http_connections: 0,
            tunnels: 0,
        }
    }

    /// n1 answered; n2 is behind and draining; n3 is dead and knows nothing.
    fn members() -> Vec<Member> {
        vec![
            Member {
                self_: true,
                ..member("n1", "0f3a9c2e-1111-4000-8000-000000000001")
            },
            Member {
                zone: "b".into(),
                status: "draining".into(),
                applied: [("0f3a9c2e-1111-4000-8000-000000000001".to_string(), 10)].into(),
                state_hash: "2c26b46b68ffc68f".into(),
                lag: 5,
                http_connections: 2,
                tunnels: 40,
                ..member("n2-long-name", "7b2d4e6f-2222-4000-8000-000000000002")
            },
            Member {
                region: String::new(),
                zone: String::new(),
                live: false,
                applied: Default::default(),
                state_hash: String::new(),
                lag: 15,
                ..member("n3", "c0ffee00-3333-4000-8000-000000000003")
            },
        ]
    }

    #[test]
    fn members_table_marks_the_answering_node_and_keeps_the_order() {
        let want = "\
NAME          NODE ID   REGION   ZONE  API                       STATUS                          STATE  LAG
n1*           0f3a9c2e  eu-west  a     http://n1:7070            serving                         live   0
n2-long-name  7b2d4e6f  eu-west  b     http://n2-long-name:7070  draining (2 conns, 40 tunnels)  live   5
n3            c0ffee00  -        -     http://n3:7070            serving                         dead   15
";
        assert_eq!(members_table(&members()), want);
        assert_eq!(members_table(&[]), "no members\n");
    }

    #[test]
    fn a_member_without_a_name_shows_its_short_id() {
        let nameless = Member {
            self_: true,
            ..member("", "abcdef0123456789")
        };
        let table = members_table(&[nameless]);
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("abcdef01*  abcdef01  "),
            "{table}"
        );
    }

    #[test]
    fn status_table_says_converged_or_not_first() {
        let status = ClusterStatusResponse {
            converged: false,
            members: members(),
            cluster_id: "prod".into(),
            ..Default::default()
        };
        let want = "\
not converged: cluster prod, 2 of 3 members live
NAME          STATE  HASH              LAG  APPLIED
n1*           live   9f86d081884c7d65  0    0f3a9c2e:12,7b2d4e6f:3
n2-long-name  live   2c26b46b68ffc68f  5    0f3a9c2e:10
n3            dead   -                 15   -
";
        assert_eq!(status_table(&status), want);

        let status = ClusterStatusResponse {
            converged: true,
            members: members()[..1].to_vec(),
            cluster_id: "prod".into(),
            ..Default::default()
        };
        let text = status_table(&status);
        assert!(
            text.starts_with("converged: cluster prod, 1 of 1 members live\n"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn applied_pairs_are_sorted_by_origin() {
        let m = Member {
            applied: [
                ("zz000000-x".to_string(), 1),
                ("aa000000-y".to_string(), 2),
                ("mm".to_string(), 3),
            ]
            .into(),
            ..member("n1", "n1")
        };
        assert_eq!(applied(&m), "aa000000:2,mm:3,zz000000:1");
    }

    #[test]
    fn member_json_has_every_field_and_the_full_id() {
        let v = printed(&members()[0]);
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "node_id",
            "name",
            "region",
            "zone",
            "api_address",
            "gossip_address",
            "status",
            "live",
            "self",
            "generation",
            "build_version",
            "applied",
            "state_hash",
            "lag",
            "http_connections",
            "tunnels",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["node_id"], "0f3a9c2e-1111-4000-8000-000000000001");
        assert_eq!(v["self"], true);
        assert_eq!(v["applied"]["0f3a9c2e-1111-4000-8000-000000000001"], 12);
        assert_eq!(v["generation"], 1_714_564_800_000_000_000u64);
        assert_eq!(printed(&members()).as_array().unwrap().len(), 3);

        let status = printed(&ClusterStatusResponse {
            converged: true,
            members: members(),
            cluster_id: "prod".into(),
            ..Default::default()
        });
        assert_eq!(status["converged"], true);
        assert_eq!(status["cluster_id"], "prod");
        assert_eq!(status["members"][2]["live"], false);
    }

    #[test]
    fn wait_reports() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let done = WaitForWriteResponse {
            complete: true,
            applied: names(&["n1", "n2", "n3"]),
            pending: vec![],
            waited_ms: 42,
        };
        let ten = Duration::from_secs(10);
        assert_eq!(
            wait_report(&done, ten),
            "replicated to 3 live nodes in 42 ms\n"
        );
        let alone = WaitForWriteResponse {
            applied: names(&["n1"]),
            waited_ms: 0,
            ..done
        };
        assert_eq!(
            wait_report(&alone, ten),
            "replicated to 1 live node in 0 ms\n"
        );
        let late = WaitForWriteResponse {
            complete: false,
            applied: names(&["n1"]),
            pending: names(&["n2", "n3"]),
            waited_ms: 1500,
        };
        assert_eq!(
            wait_report(&late, Duration::from_millis(1500)),
            "not applied within 1s500ms on: n2, n3 (applied on: n1)\n"
        );
        let none = WaitForWriteResponse {
            applied: vec![],
            ..late
        };
        assert_eq!(
            wait_report(&none, ten),
            "not applied within 10s on: n2, n3 (applied on: none)\n"
        );
    }

    fn token(id: &str, name: &str, created_on: &str) -> ApiToken {
        ApiToken {
            id: id.into(),
            name: name.into(),
            created_at_ms: NOW,
            created_on: created_on.into(),
        }
    }

    #[test]
    fn token_created_shows_the_secret_once_on_its_own_line() {
        let reply = CreateTokenResponse {
            token: Some(token("t-0a1b2c3d4e", "ci", "n1")),
            secret: "charon_5ecret".into(),
        };
        let want = "\
created token t-0a1b2c3d4e
id:          t-0a1b2c3d4e
name:        ci
created:     2024-05-01T12:00:00Z
created on:  n1
secret (shown once; store it now):
charon_5ecret
";
        assert_eq!(token_created(&reply), want);
        assert_eq!(
            printed(&reply),
            json!({
                "token": {
                    "id": "t-0a1b2c3d4e",
                    "name": "ci",
                    "created_at_ms": NOW,
                    "created_on": "n1",
                },
                "secret": "charon_5ecret",
            })
        );
    }

    #[test]
    fn tokens_table_columns() {
        let tokens = [
            token("admin-0f3a9c2e", "admin-n1", "n1"),
            ApiToken {
                created_at_ms: NOW + 61_000,
                ..token("t-0a1b2c3d4e", "ci", "")
            },
        ];
        let want = "\
ID              NAME      CREATED               CREATED ON
admin-0f3a9c2e  admin-n1  2024-05-01T12:00:00Z  n1
t-0a1b2c3d4e    ci        2024-05-01T12:01:01Z  -
";
        assert_eq!(tokens_table(&tokens), want);
        assert_eq!(tokens_table(&[]), "no tokens\n");
        let v = printed(&tokens);
        assert_eq!(v[1]["id"], "t-0a1b2c3d4e");
        assert_eq!(v[1]["created_on"], "");
        assert!(v[0].get("secret").is_none());
    }

    const N2_ID: &str = "7b2d4e6f-2222-4000-8000-000000000002";

    fn drain_status(http_connections: u64, tunnels: u64) -> DrainStatusResponse {
        DrainStatusResponse {
            node_id: N2_ID.into(),
            name: "n2".into(),
            status: "draining".into(),
            live: true,
            http_connections,
            tunnels,
            deadline_ms: NOW + 130_000,
            listeners_closed: false,
            cut: 0,
            requested: true,
        }
    }

    #[test]
    fn drain_started_says_when_tunnels_close() {
        let reply = DrainResponse {
            node_id: N2_ID.into(),
            name: "n2".into(),
            deadline_ms: NOW + 300_000,
            spread_secs: 30,
        };
        assert_eq!(
            drain_started(&reply),
            "draining n2 (7b2d4e6f): WebSocket tunnels close at 2024-05-01T12:05:00Z \
             (+ spread 30s)\n"
        );
        let plain = DrainResponse {
            name: String::new(),
            deadline_ms: 0,
            spread_secs: 0,
            ..reply.clone()
        };
        assert_eq!(
            drain_started(&plain),
            "draining 7b2d4e6f: WebSocket tunnels close at the node's deadline\n"
        );
        let v = printed(&reply);
        assert_eq!(v["node_id"], N2_ID);
        assert_eq!(v["spread_secs"], 30);
        assert_eq!(v["deadline_ms"], NOW + 300_000);
        assert_eq!(
            undrained(&UndrainResponse {
                node_id: N2_ID.into(),
                name: "n2".into()
            }),
            "undrained n2 (7b2d4e6f): it serves again\n"
        );
    }

    #[test]
    fn drain_progress_lines() {
        let line = |s: &DrainStatusResponse, first, now| drain_progress(s, first, now);
        assert_eq!(
            line(&drain_status(12, 340), 352, NOW),
            "[----------] n2 draining: 12 HTTP connections, 340 tunnels, 2m10s to deadline"
        );
        assert_eq!(
            line(&drain_status(1, 175), 352, NOW + 500),
            "[#####-----] n2 draining: 1 HTTP connection, 175 tunnels, 2m10s to deadline"
        );
        // More than at the first poll: nothing is gone.
        assert_eq!(
            line(&drain_status(400, 0), 352, NOW + 129_001),
            "[----------] n2 draining: 400 HTTP connections, 0 tunnels, 1s to deadline"
        );
        assert_eq!(
            line(&drain_status(0, 1), 352, NOW + 130_000),
            "[#########-] n2 draining: 0 HTTP connections, 1 tunnel, deadline passed"
        );
        // Nothing at the first poll: full, waiting for the listeners.
        let no_deadline = DrainStatusResponse {
            deadline_ms: 0,
            ..drain_status(0, 0)
        };
        assert_eq!(
            line(&no_deadline, 0, NOW),
            "[##########] n2 draining: 0 HTTP connections, 0 tunnels"
        );
        let down = DrainStatusResponse {
            live: false,
            name: String::new(),
            ..drain_status(3, 4)
        };
        assert_eq!(
            line(&down, 14, NOW),
            "[#####-----] 7b2d4e6f not live: 3 HTTP connections, 4 tunnels, 2m10s to deadline"
        );
        let width = |s: &str| s.find(']').unwrap() - 1;
        assert_eq!(
            width(&line(&drain_status(1, 1), 3, NOW)),
            BAR_WIDTH as usize
        );
    }

    #[test]
    fn drain_summary_and_timeout_report() {
        let done = DrainStatusResponse {
            status: "drained".into(),
            cut: 2,
            ..drain_status(0, 0)
        };
        let secs = Duration::from_millis;
        assert_eq!(
            drain_summary(&done, "n2", secs(41_400)),
            "n2 drained in 41s (cut: 2)\n"
        );
        assert_eq!(
            drain_summary(&done, "n2", secs(130_600)),
            "n2 drained in 2m11s (cut: 2)\n"
        );
        assert_eq!(
            drain_summary(&DrainStatusResponse::default(), "n9", secs(200)),
            "n9 drained in 0s (cut: 0)\n"
        );
        assert_eq!(
            drain_timeout_report(
                Some(&drain_status(12, 340)),
                N2_ID,
                Duration::from_secs(600)
            ),
            "n2 not drained within 10m: 12 HTTP connections, 340 tunnels left \
             (the drain goes on)\n"
        );
        assert_eq!(
            drain_timeout_report(None, "n2", Duration::from_secs(1)),
            "n2 not drained within 1s: no drain status yet (the drain goes on)\n"
        );
    }

    #[test]
    fn drain_status_details_and_json() {
        let want = "\
node:              n2 (7b2d4e6f-2222-4000-8000-000000000002)
status:            draining
state:             live
drain requested:   yes
http connections:  12
tunnels:           340
listeners:         open
deadline:          2024-05-01T12:02:10Z (in 2m10s)
cut:               0
";
        assert_eq!(drain_status_details(&drain_status(12, 340), NOW), want);
        let serving = DrainStatusResponse {
            status: "serving".into(),
            requested: false,
            deadline_ms: 0,
            ..drain_status(3, 0)
        };
        let text = drain_status_details(&serving, NOW);
        assert!(text.contains("deadline:          -\n"), "{text}");
        assert!(text.contains("drain requested:   no\n"), "{text}");
        let text = drain_status_details(&drain_status(0, 0), NOW + 200_000);
        assert!(
            text.contains("deadline:          2024-05-01T12:02:10Z (passed)\n"),
            "{text}"
        );

        let v = printed(&drain_status(12, 340));
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "node_id",
            "name",
            "status",
            "live",
            "http_connections",
            "tunnels",
            "deadline_ms",
            "listeners_closed",
            "cut",
            "requested",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["tunnels"], 340);
    }

    #[test]
    fn timestamps() {
        assert_eq!(unix_ms(0), "-");
        assert_eq!(unix_ms(1), "1970-01-01T00:00:00Z");
        assert_eq!(unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(unix_ms(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(unix_date(4_102_444_799_000), "2099-12-31");
        assert_eq!(unix_date(0), "-");
        assert_eq!(unix_ms_precise(0), "-");
        assert_eq!(unix_ms_precise(7), "1970-01-01T00:00:00.007Z");
        assert_eq!(unix_ms_precise(TS), "2026-11-24T10:00:00.123Z");
    }

    /// 2026-11-24T10:00:00.123Z.
    const TS: u64 = 1_795_514_400_123;

    fn log_event(json: Value) -> LogEvent {
        LogEvent {
            ts_ms: TS,
            node: json["node"].as_str().unwrap_or_default().into(),
            kind: json["kind"].as_str().unwrap_or_default().into(),
            host: json["host"].as_str().unwrap_or_default().into(),
            status: json["status"].as_u64().unwrap_or_default() as u32,
            json: json.to_string(),
        }
    }

    /// An access-log line of a request, as the node writes it.
    fn http_line() -> Value {
        json!({
            "ts": "2026-11-24T10:00:00.123Z",
            "ts_ms": TS,
            "node": "n1",
            "kind": "http",
            "client": "127.0.0.1:5555",
            "host": "app.test",
            "host_id": "h1",
            "method": "GET",
            "authority": "app.test",
            "path": "/path",
            "proto": "HTTP/1.1",
            "tls": false,
            "status": 200,
            "upstream": "http://127.0.0.1:3000",
            "duration_ms": 3.08,
        })
    }

    /// An access-log line of a closed tunnel.
    fn tunnel_line() -> Value {
        json!({
            "ts": "2026-11-24T10:00:00.123Z",
            "ts_ms": TS,
            "node": "n1",
            "kind": "tunnel",
            "client": "127.0.0.1:5556",
            "host": "app.test",
            "host_id": "h1",
            "tls": true,
            "status": 101,
            "upstream": "http://127.0.0.1:3000",
            "duration_ms": 12_345.6,
            "bytes_to_upstream": 1229,
            "bytes_to_client": 3482,
            "frames_to_upstream": 4,
            "frames_to_client": 9,
            "close_code": 1000,
            "closed_by": "client",
        })
    }

    #[test]
    fn an_http_event_is_one_line() {
        assert_eq!(
            log_line(&log_event(http_line())),
            "2026-11-24T10:00:00.123Z n1 GET app.test /path 200 3.1ms \
             -> http://127.0.0.1:3000 (client 127.0.0.1:5555)"
        );
        // No host matched: the Host asked for; no upstream; the error last.
        let mut line = http_line();
        line["host"] = json!("");
        line["host_id"] = json!("");
        line["authority"] = json!("nope.test");
        line["status"] = json!(502);
        line["upstream"] = json!("");
        line["duration_ms"] = json!(1500.0);
        line["error"] = json!("upstream refused the connection");
        assert_eq!(
            log_line(&log_event(line)),
            "2026-11-24T10:00:00.123Z n1 GET nope.test /path 502 1.5s \
             (client 127.0.0.1:5555) error: upstream refused the connection"
        );
    }

    #[test]
    fn a_tunnel_event_says_who_closed_it_how_long_and_how_much() {
        assert_eq!(
            log_line(&log_event(tunnel_line())),
            "2026-11-24T10:00:00.123Z n1 TUNNEL app.test 101 closed by client code 1000, \
             12.3s, 1.2 KiB up / 3.4 KiB down -> http://127.0.0.1:3000 (client 127.0.0.1:5556)"
        );
        let mut line = tunnel_line();
        line["closed_by"] = json!("none (connection ended without a Close)");
        line.as_object_mut().unwrap().remove("close_code");
        line["duration_ms"] = json!(5_400_000.0);
        line["bytes_to_upstream"] = json!(0);
        line["bytes_to_client"] = json!(5 * 1024 * 1024 * 1024u64);
        assert_eq!(
            log_line(&log_event(line)),
            "2026-11-24T10:00:00.123Z n1 TUNNEL app.test 101 ended without a Close, \
             1h30m, 0 B up / 5.0 GiB down -> http://127.0.0.1:3000 (client 127.0.0.1:5556)"
        );
        let mut line = tunnel_line();
        line["closed_by"] = json!("proxy");
        line["close_code"] = json!(1001);
        let text = log_line(&log_event(line));
        assert!(text.contains(" 101 closed by proxy code 1001, "), "{text}");
    }

    #[test]
    fn an_event_whose_line_is_not_json_still_shows_its_fields() {
        let e = LogEvent {
            json: "not json".into(),
            ts_ms: TS,
            node: "n2".into(),
            kind: "http".into(),
            host: "app.test".into(),
            status: 404,
        };
        assert_eq!(log_line(&e), "2026-11-24T10:00:00.123Z n2 - app.test - 404");
        let e = LogEvent {
            kind: "grpc".into(),
            host: String::new(),
            ..e
        };
        assert_eq!(log_line(&e), "2026-11-24T10:00:00.123Z n2 GRPC - 404");
    }

    #[test]
    fn byte_counts_in_binary_units() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1229, "1.2 KiB"),
            (1_048_524, "1023.9 KiB"),
            (1_048_575, "1.0 MiB"),
            (3 * 1024 * 1024 + 400 * 1024, "3.4 MiB"),
            (u64::MAX, "16384.0 PiB"),
        ];
        for (n, want) in cases {
            assert_eq!(human_bytes(n), want, "{n}");
        }
    }

    #[test]
    fn durations_of_requests_and_tunnels() {
        let cases = [
            (0.0, "0.0ms"),
            (0.04, "0.0ms"),
            (0.35, "0.4ms"),
            (3.1, "3.1ms"),
            (250.0, "250.0ms"),
            (999.94, "999.9ms"),
            (999.96, "1.0s"),
            (12_345.0, "12.3s"),
            (59_949.0, "59.9s"),
            (59_951.0, "1m"),
            (90_400.0, "1m30s"),
            (7_500_000.0, "2h5m"),
            (f64::NAN, "0.0ms"),
        ];
        for (ms, want) in cases {
            assert_eq!(human_ms(ms), want, "{ms}");
        }
    }

    fn tunnel(node: &str, id: u64, started_ms: u64) -> Tunnel {
        Tunnel {
            id,
            host: "app.test".into(),
            host_id: "h1".into(),
            client: "127.0.0.1:5556".into(),
            upstream: "http://127.0.0.1:3000".into(),
            started_ms,
            bytes_to_upstream: 1229,
            bytes_to_client: 3 * 1024 * 1024 + 400 * 1024,
            frames_to_upstream: 4,
            frames_to_client: 9,
            node: node.into(),
        }
    }

    #[test]
    fn tunnels_table_columns() {
        let tunnels = [
            tunnel("n1", 7, TS - 192_500),
            Tunnel {
                host: String::new(),
                bytes_to_upstream: 0,
                bytes_to_client: 12,
                ..tunnel("n2-long", 12, TS - 400)
            },
            tunnel("n2-long", 13, 0),
        ];
        let want = "\
NODE     ID  HOST      CLIENT          UPSTREAM               AGE    UP       DOWN
n1       7   app.test  127.0.0.1:5556  http://127.0.0.1:3000  3m12s  1.2 KiB  3.4 MiB
n2-long  12  -         127.0.0.1:5556  http://127.0.0.1:3000  0s     0 B      12 B
n2-long  13  app.test  127.0.0.1:5556  http://127.0.0.1:3000  -      1.2 KiB  3.4 MiB
";
        assert_eq!(tunnels_table(&tunnels, TS), want);
        assert_eq!(tunnels_table(&[], TS), "no tunnels\n");
        // A clock behind the node's: not a negative age.
        assert_eq!(age(TS + 5000, TS), "0s");
        assert_eq!(age(TS - 7_200_000, TS), "2h");
    }

    #[test]
    fn tunnel_json_has_every_field() {
        let v = printed(&[tunnel("n1", 7, TS)]);
        let t = &v[0];
        let mut keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "node",
            "id",
            "host",
            "host_id",
            "client",
            "upstream",
            "started_ms",
            "bytes_to_upstream",
            "bytes_to_client",
            "frames_to_upstream",
            "frames_to_client",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(t["id"], 7);
        assert_eq!(t["started_ms"], TS);
        assert_eq!(t["bytes_to_client"], 3 * 1024 * 1024 + 400 * 1024);
    }
}
