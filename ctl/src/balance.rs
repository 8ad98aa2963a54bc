//! Balancing flags (issue 19) of `host add` / `host update` and of
//! `--location` entries, turned into the API's `Balancing` messages, and
//! their rendering in `host show`. Kept apart from `cli.rs` and
//! `output.rs` so those big files only gain a line or two.
//!
//! - `--upstream URL@weight=3`: a weight per upstream (1..=100, default 1);
//! - `--lb POLICY`: round-robin, least-conn, random-two, hash:cookie=NAME,
//!   hash:header=NAME, hash:ip, hash:path; `--lb-set-cookie`;
//! - `--upstream-max-conns N`, `--upstream-queue-timeout DURATION`;
//! - `--health-path /healthz --health-interval 2s --health-timeout 1s
//!   --health-rise 2 --health-fall 3 --health-status 200-399`;
//! - in `--location PATH=URL[@weight=N],...;lb=POLICY;max-conns=N;...`
//!   the same settings for one location, as `;key=value` after the URLs.

use std::collections::HashMap;
use std::time::Duration;

use charon_proto::v1::{Balancing, BalancingUpdate, HealthCheck, UpstreamStatus};
use clap::Args;

use crate::cli::parse_duration;

const BALANCE: &str = "Balancing (issue 19)";

/// Balancing flags of `host add`.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = BALANCE)]
pub struct BalanceArgs {
    /// How requests and tunnels are spread over the upstreams:
    /// round-robin (default), least-conn, random-two, hash:cookie=NAME,
    /// hash:header=NAME, hash:ip or hash:path.
    #[arg(long, value_name = "POLICY")]
    pub lb: Option<String>,

    /// With hash:cookie=NAME: give a client that has no such cookie one.
    #[arg(long)]
    pub lb_set_cookie: bool,

    /// At most N open tunnels + in-flight requests per upstream on each
    /// node; beyond it a request waits (--upstream-queue-timeout), then 503.
    #[arg(long, value_name = "N")]
    pub upstream_max_conns: Option<u32>,

    /// How long a request waits for room under --upstream-max-conns
    /// (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_queue_timeout: Option<Duration>,

    #[command(flatten)]
    pub health: HealthArgs,
}

/// Active health-check flags, shared by add and update.
#[derive(Debug, Args, Default)]
pub struct HealthArgs {
    /// Check every upstream with GET PATH (turns active checks on).
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,

    /// Time between checks (default 2s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_interval: Option<Duration>,

    /// Time a check may take (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,

    /// Successes in a row that make an upstream healthy (default 2).
    #[arg(long, value_name = "N")]
    pub health_rise: Option<u32>,

    /// Failures in a row that make an upstream unhealthy (default 3).
    #[arg(long, value_name = "N")]
    pub health_fall: Option<u32>,

    /// Statuses that count as healthy (default 200-399).
    #[arg(long, value_name = "LOW-HIGH", value_parser = parse_status_range)]
    pub health_status: Option<(u32, u32)>,
}

impl HealthArgs {
    fn given(&self) -> bool {
        self.health_path.is_some()
            || self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_rise.is_some()
            || self.health_fall.is_some()
            || self.health_status.is_some()
    }

    /// The check these flags describe (0 = the node's default); `None`
    /// when none was given.
    fn to_pb(&self) -> Option<HealthCheck> {
        if !self.given() {
            return None;
        }
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u32).unwrap_or(0);
        let (status_min, status_max) = self.health_status.unwrap_or((0, 0));
        Some(HealthCheck {
            path: self.health_path.clone().unwrap_or_default(),
            interval_ms: ms(self.health_interval),
            timeout_ms: ms(self.health_timeout),
            rise: self.health_rise.unwrap_or(0),
            fall: self.health_fall.unwrap_or(0),
            status_min,
            status_max,
        })
    }
}

impl BalanceArgs {
    /// The host's balancing, with the weights given on `--upstream`.
    pub fn to_pb(&self, weights: HashMap<String, u32>) -> Option<Balancing> {
        let b = Balancing {
            lb: self.lb.clone().unwrap_or_default(),
            set_cookie: self.lb_set_cookie,
            weights,
            max_conns: self.upstream_max_conns.unwrap_or(0),
            queue_timeout_ms: self
                .upstream_queue_timeout
                .map(|d| d.as_millis() as u32)
                .unwrap_or(0),
            health: self.health.to_pb(),
        };
        (b != Balancing::default()).then_some(b)
    }
}

/// Balancing flags of `host update`: only what is named changes.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = BALANCE)]
pub struct BalanceUpdateArgs {
    /// New balancing policy (see `host add --help`).
    #[arg(long, value_name = "POLICY")]
    pub lb: Option<String>,

    /// With hash:cookie=NAME: set the cookie for clients without one.
    #[arg(long, value_name = "true|false")]
    pub lb_set_cookie: Option<bool>,

    /// Per-upstream cap on open tunnels + in-flight requests (0 = none).
    #[arg(long, value_name = "N")]
    pub upstream_max_conns: Option<u32>,

    /// Queue wait under the cap before a 503.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_queue_timeout: Option<Duration>,

    /// Turn active health checks off.
    #[arg(long, conflicts_with = "health_path")]
    pub no_health_check: bool,

    /// Replace the health-check settings (unnamed ones get the defaults).
    #[command(flatten)]
    pub health: HealthArgs,
}

impl BalanceUpdateArgs {
    pub fn changes_something(&self) -> bool {
        self.lb.is_some()
            || self.lb_set_cookie.is_some()
            || self.upstream_max_conns.is_some()
            || self.upstream_queue_timeout.is_some()
            || self.no_health_check
            || self.health.given()
    }

    pub fn to_pb(&self, weights: HashMap<String, u32>) -> Option<BalancingUpdate> {
        let health = if self.no_health_check {
            Some(HealthCheck::default())
        } else {
            self.health.to_pb()
        };
        let u = BalancingUpdate {
            lb: self.lb.clone(),
            set_cookie: self.lb_set_cookie,
            weights,
            max_conns: self.upstream_max_conns,
            queue_timeout_ms: self.upstream_queue_timeout.map(|d| d.as_millis() as u32),
            health,
        };
        (u != BalancingUpdate::default()).then_some(u)
    }
}

/// `200-399` (or one status).
pub fn parse_status_range(value: &str) -> Result<(u32, u32), String> {
    let shape = || format!("{value:?}: expected LOW-HIGH, e.g. 200-399");
    let (lo, hi) = value.split_once('-').unwrap_or((value, value));
    let lo: u32 = lo.trim().parse().map_err(|_| shape())?;
    let hi: u32 = hi.trim().parse().map_err(|_| shape())?;
    Ok((lo, hi))
}

/// Checks `--upstream URL[@weight=N]` (the node checks the URL itself).
pub fn parse_upstream(value: &str) -> Result<String, String> {
    split_weight(value).map(|_| value.trim().to_string())
}

/// `URL@weight=N` → (URL, Some(N)); a plain URL → (URL, None).
fn split_weight(value: &str) -> Result<(String, Option<u32>), String> {
    let value = value.trim();
    match value.rsplit_once("@weight=") {
        None => Ok((value.to_string(), None)),
        Some((url, w)) => {
            let w: u32 = w
                .parse()
                .ok()
                .filter(|w| (1..=100).contains(w))
                .ok_or_else(|| format!("{value:?}: the weight must be a number from 1 to 100"))?;
            Ok((url.to_string(), Some(w)))
        }
    }
}

/// The URLs of `--upstream` values and the weights some of them carry.
pub fn split_weights(values: &[String]) -> (Vec<String>, HashMap<String, u32>) {
    let mut urls = Vec::new();
    let mut weights = HashMap::new();
    for v in values {
        // parse_upstream accepted every value already.
        let (url, w) = split_weight(v).unwrap_or((v.clone(), None));
        if let Some(w) = w {
            weights.insert(url.clone(), w);
        }
        urls.push(url);
    }
    (urls, weights)
}

/// The part of `--location` after `PATH=`: `URL[@weight=N],...` then
/// optional `;key=value` settings (lb, set-cookie, max-conns,
/// queue-timeout, health-path, health-interval, health-timeout,
/// health-rise, health-fall, health-status).
pub fn parse_location_rest(rest: &str) -> Result<(Vec<String>, Option<Balancing>), String> {
    let mut parts = rest.split(';');
    let urls = parts.next().unwrap_or_default();
    let mut values = Vec::new();
    for u in urls.split(',') {
        let u = u.trim();
        if u.is_empty() {
            return Err("an upstream URL is empty".into());
        }
        values.push(parse_upstream(u)?);
    }
    let (upstreams, weights) = split_weights(&values);
    let mut args = BalanceArgs::default();
    for opt in parts {
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        location_option(&mut args, key.trim(), value.trim())?;
    }
    Ok((upstreams, args.to_pb(weights)))
}

fn location_option(a: &mut BalanceArgs, key: &str, value: &str) -> Result<(), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{key}={v:?}: expected a number"))
    };
    let h = &mut a.health;
    match key {
        "lb" => a.lb = Some(value.to_string()),
        "set-cookie" => a.lb_set_cookie = true,
        "max-conns" => a.upstream_max_conns = Some(num(value)?),
        "queue-timeout" => a.upstream_queue_timeout = Some(parse_duration(value)?),
        "health-path" => h.health_path = Some(value.to_string()),
        "health-interval" => h.health_interval = Some(parse_duration(value)?),
        "health-timeout" => h.health_timeout = Some(parse_duration(value)?),
        "health-rise" => h.health_rise = Some(num(value)?),
        "health-fall" => h.health_fall = Some(num(value)?),
        "health-status" => h.health_status = Some(parse_status_range(value)?),
        _ => {
            return Err(format!(
                "unknown location setting {key:?}: use lb, set-cookie, max-conns, queue-timeout \
                 or health-path/-interval/-timeout/-rise/-fall/-status"
            ))
        }
    }
    Ok(())
}

/// `host show` lines for a host's balancing (nothing when it has none).
pub fn details(b: Option<&Balancing>) -> Vec<(&'static str, String)> {
    let Some(b) = b else {
        return vec![("balancing", "round-robin".into())];
    };
    let mut policy = if b.lb.is_empty() {
        "round-robin".to_string()
    } else {
        b.lb.clone()
    };
    if b.set_cookie {
        policy.push_str(" (sets the cookie)");
    }
    let mut rows = vec![("balancing", policy)];
    if !b.weights.is_empty() {
        let mut w: Vec<String> = b.weights.iter().map(|(u, w)| format!("{u}={w}")).collect();
        w.sort();
        rows.push(("weights", w.join(", ")));
    }
    if b.max_conns > 0 {
        let queue = match b.queue_timeout_ms {
            0 => "1000".to_string(),
            ms => ms.to_string(),
        };
        rows.push((
            "max conns",
            format!("{} per upstream, queue {queue} ms", b.max_conns),
        ));
    }
    if let Some(h) = b.health.as_ref().filter(|h| !h.path.is_empty()) {
        rows.push((
            "health check",
            format!(
                "GET {} every {} ms (timeout {} ms, rise {}, fall {}, status {}-{})",
                h.path, h.interval_ms, h.timeout_ms, h.rise, h.fall, h.status_min, h.status_max
            ),
        ));
    }
    rows
}

/// After a location's upstreams in `host show`: its balancing settings
/// in the `;key=value` form `--location` takes ("" when it has none).
pub fn location_suffix(b: Option<&Balancing>) -> String {
    let Some(b) = b else {
        return String::new();
    };
    let mut out = String::new();
    if !b.lb.is_empty() {
        out.push_str(&format!(";lb={}", b.lb));
    }
    if b.set_cookie {
        out.push_str(";set-cookie");
    }
    let mut w: Vec<String> = b.weights.iter().map(|(u, w)| format!("{u}={w}")).collect();
    w.sort();
    if !w.is_empty() {
        out.push_str(&format!(" (weights {})", w.join(", ")));
    }
    if b.max_conns > 0 {
        out.push_str(&format!(";max-conns={}", b.max_conns));
    }
    if let Some(h) = b.health.as_ref().filter(|h| !h.path.is_empty()) {
        out.push_str(&format!(";health-path={}", h.path));
    }
    out
}

/// The per-upstream table of `host show`: one row per upstream, as the
/// node that answered sees it.
pub fn status_table(rows: &[UpstreamStatus]) -> String {
    let mut table = vec![[
        "NODE",
        "LOCATION",
        "UPSTREAM",
        "STATE",
        "WEIGHT",
        "TUNNELS",
        "IN-FLIGHT",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let node = if r.node_name.is_empty() {
            &r.node_id
        } else {
            &r.node_name
        };
        table.push(vec![
            node.clone(),
            if r.location.is_empty() {
                "-".into()
            } else {
                r.location.clone()
            },
            r.url.clone(),
            r.state.clone(),
            r.weight.to_string(),
            r.open_tunnels.to_string(),
            r.in_flight.to_string(),
        ]);
    }
    format!("\n{}", crate::output::align(&table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_off_urls() {
        let (urls, w) = split_weights(&["http://a:1@weight=3".into(), "http://b:2".into()]);
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        assert_eq!(w.get("http://a:1"), Some(&3));
        assert_eq!(w.len(), 1);
        for bad in [
            "http://a@weight=0",
            "http://a@weight=101",
            "http://a@weight=x",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn location_settings() {
        let (urls, b) =
            parse_location_rest("http://a:1@weight=2, http://b:2;lb=least-conn;max-conns=10")
                .unwrap();
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        let b = b.unwrap();
        assert_eq!(b.lb, "least-conn");
        assert_eq!(b.max_conns, 10);
        assert_eq!(b.weights.get("http://a:1"), Some(&2));
        let (_, b) = parse_location_rest("http://a:1").unwrap();
        assert!(b.is_none());
        assert!(parse_location_rest("http://a:1;speed=3").is_err());
        let (_, b) =
            parse_location_rest("http://a:1;health-path=/h;health-status=200-299").unwrap();
        let h = b.unwrap().health.unwrap();
        assert_eq!(
            (h.path.as_str(), h.status_min, h.status_max),
            ("/h", 200, 299)
        );
    }
}
