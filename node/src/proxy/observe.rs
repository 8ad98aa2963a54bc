//! The record phase: one request's metrics, access-log line and spans,
//! written the same way whichever front end served it. A WebSocket
//! tunnel's record, written when it closes, is `tunnel::record`.

use std::sync::Arc;

use opentelemetry::KeyValue;

use super::error::ProxyError;
use super::routes::Route;
use super::{ConnInfo, Proxy};
use crate::telemetry::otel;

/// What the access log and traces need of a request, gathered by the
/// front end that parsed it (empty, and never filled, without telemetry).
#[derive(Default)]
pub(super) struct ReqFacts {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) authority: String,
    pub(super) proto: &'static str,
    pub(super) traceparent: Option<http::HeaderValue>,
    pub(super) tracestate: Option<http::HeaderValue>,
}

/// One request's outcome, for its metrics and access-log line.
pub(super) struct Served<'a> {
    pub(super) started: std::time::Instant,
    pub(super) conn: &'a ConnInfo,
    pub(super) facts: Option<&'a ReqFacts>,
    pub(super) status: u16,
    pub(super) route: Option<&'a Arc<Route>>,
    pub(super) upstream: Option<&'a Arc<str>>,
    pub(super) error: Option<&'a ProxyError>,
    pub(super) trace: Option<&'a opentelemetry::Context>,
}

impl Proxy {
    /// Starts a request's server span (the parent of its upstream and
    /// tunnel spans), continuing the client's trace context if it sent
    /// one. `version` is the client's protocol version (`1.1`, `2`).
    pub(super) fn server_span(
        tr: &otel::Tracing,
        carrier: &http::HeaderMap,
        f: &ReqFacts,
        conn: &ConnInfo,
        version: &'static str,
    ) -> opentelemetry::Context {
        tr.server_span(
            carrier,
            f.method.clone(),
            vec![
                KeyValue::new("http.request.method", f.method.clone()),
                KeyValue::new("url.path", f.path.clone()),
                KeyValue::new("url.scheme", if conn.tls { "https" } else { "http" }),
                KeyValue::new("server.address", f.authority.clone()),
                KeyValue::new("client.address", conn.peer.ip().to_string()),
                KeyValue::new("client.port", i64::from(conn.peer.port())),
                KeyValue::new("network.protocol.version", version),
            ],
        )
    }

    /// Ends a request's server span with its outcome.
    pub(super) fn end_server_span(
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

    /// The record phase of a request: counts it and writes its
    /// access-log line.
    pub(super) fn record(&self, s: Served<'_>) {
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
}
