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

/// RFC 3339 UTC with milliseconds, for log lines.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339_ms(1_795_513_100_550),
            "2026-11-24T09:38:20.550Z"
        );
        assert_eq!(
            super::rfc3339_ms(951_782_400_001),
            "2000-02-29T00:00:00.001Z"
        );
    }
}
