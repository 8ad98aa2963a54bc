//! What operators see of connections: Prometheus metrics ([`metrics`]), the
//! JSON access log with its live stream ([`accesslog`]) and OpenTelemetry
//! traces ([`otel`]).

pub mod accesslog;
pub mod metrics;
pub mod otel;

use std::sync::Arc;

pub use accesslog::{AccessLog, Entry, Sink};
pub use metrics::Metrics;

/// Everything the proxy reports to, shared.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    /// Set when `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is.
    pub tracing: Option<otel::Tracing>,
}
