//! Prometheus metrics, written in the text exposition format on the admin
//! listener's `/metrics`.
//!
//! Hand-rolled on atomics: the request path touches one read-locked map
//! lookup and a few relaxed atomic adds; everything else (sorting, label
//! escaping, gauges read from the proxy and the cluster) happens at scrape
//! time. Label values are proxy host names (bounded by configuration), never
//! client-supplied strings, so cardinality stays bounded.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// Keys are proxy host names and fixed labels, looked up on every request:
/// FNV rather than SipHash (see `util::Fnv`).
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<crate::util::Fnv>>;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Upper bounds (seconds) of the tunnel-duration buckets.
const TUNNEL_BUCKETS: [f64; 10] = [
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    7.0 * 86400.0,
];

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// A family of counters keyed by label values.
struct Family<K> {
    map: RwLock<FastMap<K, Arc<AtomicU64>>>,
}

impl<K: std::hash::Hash + Eq + Clone + Ord> Family<K> {
    fn new() -> Self {
        Family {
            map: RwLock::new(FastMap::default()),
        }
    }

    fn add(&self, key: &K, n: u64) {
        if let Some(c) = self.map.read().expect("metrics lock").get(key) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.map
            .write()
            .expect("metrics lock")
            .entry(key.clone())
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    fn sorted(&self) -> Vec<(K, u64)> {
        let mut v: Vec<(K, u64)> = self
            .map
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub struct Metrics {
    requests: Family<(Arc<str>, &'static str)>,
    latency: RwLock<FastMap<Arc<str>, Arc<Histogram>>>,
    upstream_errors: Family<(Arc<str>, &'static str)>,
    tunnels_opened: Family<Arc<str>>,
    tunnel_duration: Histogram,
    tunnel_bytes: Family<&'static str>,
    tls_handshakes: AtomicU64,
    tls_failures: Family<&'static str>,
    /// Requests refused by access lists: (host, list, rule).
    access_refusals: Family<(Arc<str>, Arc<str>, Arc<str>)>,
    /// Connections refused by the connection caps, by reason.
    conn_refusals: Family<&'static str>,
    /// Client connections accepted, by worker thread (`crate::workers`):
    /// how the kernel spread them.
    accepted: Family<usize>,
    /// Spans the exporter had to drop (queue full or collector failing).
    pub spans_dropped: AtomicU64,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new(),
            latency: RwLock::default(),
            upstream_errors: Family::new(),
            tunnels_opened: Family::new(),
            tunnel_duration: Histogram::new(&TUNNEL_BUCKETS),
            tunnel_bytes: Family::new(),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: Family::new(),
            access_refusals: Family::new(),
            conn_refusals: Family::new(),
            accepted: Family::new(),
            spans_dropped: AtomicU64::new(0),
            access_log_dropped: AtomicU64::new(0),
        }
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// What is read at scrape time rather than counted.
#[derive(Default)]
pub struct Gauges {
    pub http_connections: u64,
    pub tunnels_by_host: Vec<(String, u64)>,
    pub members_by_state: Vec<(String, u64)>,
    /// (peer name, writes behind).
    pub config_lag: Vec<(String, u64)>,
    /// 0 serving, 1 draining, 2 drained.
    pub drain_state: u64,
    /// Hosts listing a domain another host holds (store::names).
    pub name_conflicts: u64,
    /// 1 until the node has caught up with the cluster after start.
    pub catching_up: u64,
}

impl Metrics {
    /// One proxied request; `host` is the proxy host's name ("" for none).
    pub fn request(&self, host: &Arc<str>, status: u16, took: Duration) {
        self.requests.add(&(host.clone(), status_class(status)), 1);
        let h = self
            .latency
            .read()
            .expect("metrics lock")
            .get(host)
            .cloned();
        let h = match h {
            Some(h) => h,
            None => self
                .latency
                .write()
                .expect("metrics lock")
                .entry(host.clone())
                .or_insert_with(|| Arc::new(Histogram::new(&LATENCY_BUCKETS)))
                .clone(),
        };
        h.observe(took);
    }

    /// An upstream that failed: kind is `refused`, `timeout` or `error`.
    pub fn upstream_error(&self, host: &Arc<str>, kind: &'static str) {
        self.upstream_errors.add(&(host.clone(), kind), 1);
    }

    pub fn tunnel_opened(&self, host: &Arc<str>) {
        self.tunnels_opened.add(host, 1);
    }

    pub fn tunnel_closed(&self, lived: Duration, to_upstream: u64, to_client: u64) {
        self.tunnel_duration.observe(lived);
        self.tunnel_bytes.add(&"to_upstream", to_upstream);
        self.tunnel_bytes.add(&"to_client", to_client);
    }

    /// A request an access list refused; `rule` is the deciding rule
    /// (`#3 deny 0.0.0.0/0`, `default deny`, `basic auth`).
    pub fn access_refusal(&self, host: &Arc<str>, acl: &Arc<str>, rule: &Arc<str>) {
        self.access_refusals
            .add(&(host.clone(), acl.clone(), rule.clone()), 1);
    }

    /// A connection refused by the connection caps (`per_client_cap`).
    pub fn connection_refused(&self, reason: &'static str) {
        self.conn_refusals.add(&reason, 1);
    }

    /// A client connection accepted by worker `worker`.
    pub fn connection_accepted(&self, worker: usize) {
        self.accepted.add(&worker, 1);
    }

    pub fn tls_handshake(&self, failure: Option<&'static str>) {
        match failure {
            None => {
                self.tls_handshakes.fetch_add(1, Ordering::Relaxed);
            }
            Some(reason) => self.tls_failures.add(&reason, 1),
        }
    }

    /// The whole exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut x = Exposition {
            out: String::with_capacity(4096),
        };
        self.render_requests(&mut x);
        self.render_connections(&mut x, g);
        render_cluster(&mut x, g);
        x.single(
            "charon_trace_spans_dropped_total",
            "counter",
            "Spans dropped because the exporter queue was full or the collector failed.",
            self.spans_dropped.load(Ordering::Relaxed),
        );
        x.single(
            "charon_access_log_dropped_total",
            "counter",
            "Access-log lines dropped because the writer fell behind.",
            self.access_log_dropped.load(Ordering::Relaxed),
        );
        x.out
    }

    fn render_requests(&self, x: &mut Exposition) {
        x.family(
            "charon_http_requests_total",
            "counter",
            "Proxied HTTP requests by proxy host and status class.",
            self.requests
                .sorted()
                .into_iter()
                .map(|((host, class), n)| {
                    (format!("host=\"{}\",status=\"{class}\"", escape(&host)), n)
                }),
        );
        x.head(
            "charon_http_request_duration_seconds",
            "histogram",
            "Time from request to response headers, by proxy host.",
        );
        let mut hosts: Vec<(Arc<str>, Arc<Histogram>)> = self
            .latency
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        for (host, h) in hosts {
            h.render(
                &mut x.out,
                "charon_http_request_duration_seconds",
                &format!("host=\"{}\"", escape(&host)),
            );
        }
        x.family(
            "charon_upstream_errors_total",
            "counter",
            "Upstream failures by proxy host and kind (refused, timeout, error).",
            self.upstream_errors
                .sorted()
                .into_iter()
                .map(|((host, kind), n)| {
                    (format!("host=\"{}\",kind=\"{kind}\"", escape(&host)), n)
                }),
        );
        x.family(
            "charon_access_refusals_total",
            "counter",
            "Requests refused by an access list (403 or 401), by proxy host, list and deciding rule.",
            self.access_refusals.sorted().into_iter().map(|((host, acl, rule), n)| {
                let labels = format!(
                    "host=\"{}\",acl=\"{}\",rule=\"{}\"",
                    escape(&host),
                    escape(&acl),
                    escape(&rule)
                );
                (labels, n)
            }),
        );
    }

    fn render_connections(&self, x: &mut Exposition, g: &Gauges) {
        x.family(
            "charon_connections_refused_total",
            "counter",
            "Client connections refused by --max-conns-per-ip (429, or closed before TLS).",
            label("reason", self.conn_refusals.sorted()),
        );
        x.family(
            "charon_worker_connections_accepted_total",
            "counter",
            "Client connections accepted, by worker thread (SO_REUSEPORT spreads them).",
            label("worker", self.accepted.sorted()),
        );
        x.single(
            "charon_http_connections",
            "gauge",
            "Open client HTTP connections (tunnels not counted).",
            g.http_connections,
        );
        x.family(
            "charon_tunnels",
            "gauge",
            "Open WebSocket tunnels by proxy host.",
            label("host", g.tunnels_by_host.iter().map(|(h, n)| (h, *n))),
        );
        x.family(
            "charon_tunnels_opened_total",
            "counter",
            "WebSocket tunnels opened, by proxy host.",
            label("host", self.tunnels_opened.sorted()),
        );
        x.head(
            "charon_tunnel_duration_seconds",
            "histogram",
            "Lifetime of closed WebSocket tunnels.",
        );
        self.tunnel_duration
            .render(&mut x.out, "charon_tunnel_duration_seconds", "");
        x.family(
            "charon_tunnel_bytes_total",
            "counter",
            "Bytes relayed by closed WebSocket tunnels, by direction.",
            label("direction", self.tunnel_bytes.sorted()),
        );
        x.single(
            "charon_tls_handshakes_total",
            "counter",
            "Completed TLS handshakes.",
            self.tls_handshakes.load(Ordering::Relaxed),
        );
        x.family(
            "charon_tls_handshake_failures_total",
            "counter",
            "Failed TLS handshakes by reason.",
            label("reason", self.tls_failures.sorted()),
        );
    }
}

/// What this node sees of the cluster: members, lag, drain, names, catch-up.
fn render_cluster(x: &mut Exposition, g: &Gauges) {
    x.family(
        "charon_cluster_members",
        "gauge",
        "Cluster members by state, as this node sees them.",
        label("state", g.members_by_state.iter().map(|(s, n)| (s, *n))),
    );
    x.family(
        "charon_config_lag_writes",
        "gauge",
        "Writes a member has not applied that some live member has.",
        label("peer", g.config_lag.iter().map(|(p, n)| (p, *n))),
    );
    x.single(
        "charon_drain_state",
        "gauge",
        "0 serving, 1 draining, 2 drained.",
        g.drain_state,
    );
    x.single(
        "charon_name_conflicts",
        "gauge",
        "Domains listed by a host that lost them in a concurrent claim (see host list).",
        g.name_conflicts,
    );
    x.single(
        "charon_catching_up",
        "gauge",
        "1 while the node has not caught up with the cluster since it started (writes refused).",
        g.catching_up,
    );
}

/// Samples with one label, its value escaped.
fn label<V: std::fmt::Display>(
    name: &'static str,
    rows: impl IntoIterator<Item = (V, u64)>,
) -> impl Iterator<Item = (String, u64)> {
    rows.into_iter()
        .map(move |(v, n)| (format!("{name}=\"{}\"", escape(&v.to_string())), n))
}

/// The text exposition being written: every family is its HELP/TYPE head
/// and then its samples, so a family is written in one call and cannot
/// lose its head or mistype its name between the two.
struct Exposition {
    out: String,
}

impl Exposition {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family with labels: `labels` is the `k="v",…` text, escaped.
    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, u64)>,
    ) {
        self.head(name, kind, help);
        for (labels, n) in samples {
            let _ = writeln!(self.out, "{name}{{{labels}}} {n}");
        }
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, n: u64) {
        self.head(name, kind, help);
        let _ = writeln!(self.out, "{name} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::default();
        let h: Arc<str> = Arc::from("a\"b.test");
        m.request(&h, 200, Duration::from_millis(3));
        m.request(&h, 503, Duration::from_millis(300));
        m.upstream_error(&h, "refused");
        let text = m.render(&Gauges {
            http_connections: 2,
            ..Default::default()
        });
        assert!(
            text.contains("charon_http_requests_total{host=\"a\\\"b.test\",status=\"2xx\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("charon_http_requests_total{host=\"a\\\"b.test\",status=\"5xx\"} 1\n")
        );
        assert!(text.contains(
            "charon_http_request_duration_seconds_bucket{host=\"a\\\"b.test\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "charon_http_request_duration_seconds_bucket{host=\"a\\\"b.test\",le=\"0.5\"} 2\n"
        ));
        assert!(
            text.contains("charon_http_request_duration_seconds_count{host=\"a\\\"b.test\"} 2\n")
        );
        assert!(text
            .contains("charon_upstream_errors_total{host=\"a\\\"b.test\",kind=\"refused\"} 1\n"));
        assert!(text.contains("charon_http_connections 2\n"));
        assert!(text.contains("charon_tunnel_duration_seconds_count 0\n"));
    }
}
