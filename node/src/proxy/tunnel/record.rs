//! A tunnel's record phase: its metrics, access-log line and span end,
//! written when the tunnel closes however it closes (cut included).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;

use super::registry::TunnelInfo;
use crate::telemetry::otel;

/// What a tunnel's record phase needs besides its [`TunnelInfo`]; the
/// tunnel task writes it when it ends (at the end of the relay, or when a
/// drain cuts the tunnel).
pub(super) struct TunnelLog {
    pub(super) tls: bool,
    pub(super) span: Option<opentelemetry::Context>,
}

impl TunnelLog {
    /// Writes the closed tunnel's metrics, span end and access-log line.
    pub(super) fn write(&self, t: &crate::telemetry::Telemetry, i: &TunnelInfo) {
        let relaxed = Ordering::Relaxed;
        let (up_bytes, down_bytes) = (
            i.to_upstream.bytes.load(relaxed),
            i.to_client.bytes.load(relaxed),
        );
        let lived = i.opened.elapsed();
        t.metrics.tunnel_closed(lived, up_bytes, down_bytes);
        let by_proxy = i.close_was_requested();
        let (client_close, upstream_close) = (i.to_upstream.close_code(), i.to_client.close_code());
        let closed_by = match (by_proxy, client_close, upstream_close) {
            (true, _, _) => "proxy",
            (false, Some(_), None) => "client",
            (false, None, Some(_)) => "upstream",
            (false, Some(_), Some(_)) => "both",
            (false, None, None) => "none (connection ended without a Close)",
        };
        let close_code = client_close.or(upstream_close).flatten();
        let trace_id = self.span.as_ref().map(|cx| {
            let frames_up = i.to_upstream.frames.load(relaxed);
            let frames_down = i.to_client.frames.load(relaxed);
            let first = [&i.to_upstream, &i.to_client]
                .iter()
                .map(|d| d.first_byte_ms.load(relaxed))
                .filter(|&ms| ms > 0)
                .min();
            if let Some(ms) = first {
                otel::add_event_at(
                    cx,
                    "first byte",
                    std::time::UNIX_EPOCH + Duration::from_millis(ms),
                );
            }
            otel::add_event(
                cx,
                "close",
                vec![KeyValue::new(
                    "websocket.close.code",
                    i64::from(close_code.unwrap_or(0)),
                )],
            );
            otel::end(
                cx,
                vec![
                    KeyValue::new("websocket.bytes_to_upstream", up_bytes as i64),
                    KeyValue::new("websocket.bytes_to_client", down_bytes as i64),
                    KeyValue::new("websocket.frames_to_upstream", frames_up as i64),
                    KeyValue::new("websocket.frames_to_client", frames_down as i64),
                    KeyValue::new("websocket.close.code", i64::from(close_code.unwrap_or(0))),
                    KeyValue::new("websocket.closed_by", closed_by),
                    KeyValue::new(
                        "charon.closed_by_drain",
                        by_proxy && close_code == Some(1001),
                    ),
                ],
                None,
            );
            otel::trace_id(cx)
        });
        let ts_ms = crate::util::wall_ms();
        t.access_log.record(crate::telemetry::Entry {
            trace_id: trace_id.unwrap_or_default(),
            ts: crate::util::rfc3339_ms(ts_ms),
            ts_ms,
            kind: "tunnel",
            client: Arc::from(i.client.to_string()),
            host: i.host_name.clone(),
            host_id: i.host_id.clone(),
            tls: self.tls,
            status: 101,
            upstream: i.upstream.clone(),
            duration_ms: lived.as_secs_f64() * 1000.0,
            bytes_to_upstream: Some(up_bytes),
            bytes_to_client: Some(down_bytes),
            frames_to_upstream: Some(i.to_upstream.frames.load(relaxed)),
            frames_to_client: Some(i.to_client.frames.load(relaxed)),
            close_code,
            closed_by: closed_by.to_string(),
            ..Default::default()
        });
    }
}
