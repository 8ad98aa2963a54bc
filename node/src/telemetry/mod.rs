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

/// Whether log lines get ANSI colours: only on a terminal, and not when
/// `NO_COLOR` is set to anything non-empty (<https://no-color.org>). Logs
/// piped to a file, journald or a container runtime would otherwise carry
/// escape codes into every line.
pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    )
}

fn colours(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some("".into())), "an empty NO_COLOR is unset");
        assert!(!colours(true, Some("1".into())));
        assert!(!colours(false, None));
        assert!(!colours(false, Some("1".into())));
    }
}
