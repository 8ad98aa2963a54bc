//! WebSocket tunnels: once an upstream answered an upgrade with 101, the
//! client and upstream connections are handed to [`relay::relay`] in a
//! task of their own, registered in [`registry`] for drains and
//! `charonctl tunnels`; [`frames`] follows the WebSocket frames the relay
//! copies.

pub mod frames;
pub mod handshake;
mod record;
pub mod registry;
pub mod relay;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use opentelemetry::KeyValue;

use super::limits::HostSlot;
use super::upstream::{Lease, UpstreamState};
use super::{ConnInfo, Proxy};
use crate::host::ProxyHost;
use crate::telemetry::otel;
use record::TunnelLog;
use relay::TunnelOptions;

impl Proxy {
    /// The span of a tunnel's whole life, a child of the request that
    /// opened it (`parent`, its server span), when tracing is on: the same
    /// for a tunnel opened over HTTP/1.1 or h2.
    pub(super) fn tunnel_span(
        &self,
        parent: Option<&opentelemetry::Context>,
        host_name: &str,
        upstream: &UpstreamState,
        conn: &ConnInfo,
        subprotocol: Option<&str>,
        extensions: Option<&str>,
    ) -> Option<opentelemetry::Context> {
        let tr = self.telemetry.get()?.tracing.as_ref()?;
        let cx = tr.child_span(
            parent?,
            format!("WebSocket {host_name}"),
            opentelemetry::trace::SpanKind::Internal,
            vec![
                KeyValue::new("charon.host", host_name.to_string()),
                KeyValue::new("charon.upstream", upstream.url.to_string()),
                KeyValue::new("client.address", conn.peer.ip().to_string()),
                KeyValue::new(
                    "websocket.subprotocol",
                    subprotocol.unwrap_or_default().to_string(),
                ),
                KeyValue::new(
                    "websocket.extensions",
                    extensions.unwrap_or_default().to_string(),
                ),
            ],
            None,
        );
        otel::add_event(&cx, "upgrade", vec![]);
        Some(cx)
    }

    /// Starts the relay of an upgraded connection pair in its own task
    /// (the client connection's task has ended), registered for drains and
    /// `charonctl tunnels`. `lease` counts the tunnel against its upstream
    /// (least-conn, caps) for as long as it is open, `held` against its
    /// host's per-client cap.
    pub(super) fn spawn_tunnel<C, U>(
        self: &Arc<Self>,
        host: &ProxyHost,
        opts: TunnelOptions,
        (upstream, lease, held): (&Arc<UpstreamState>, Option<Lease>, Option<HostSlot>),
        conn: &ConnInfo,
        (client, up): (C, U),
        span: Option<opentelemetry::Context>,
    ) where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let reg = self
            .tunnels
            .register(&host.id, &host.name, upstream.url.to_string(), conn.peer);
        let telemetry = self.telemetry.get().cloned();
        let tls = conn.tls;
        let info = reg.info.clone();
        tracing::debug!(tunnel = info.id, host = %info.host_name, upstream = %info.upstream, client = %info.client, "tunnel open");
        if let Some(t) = &telemetry {
            t.metrics.tunnel_opened(&Arc::from(info.host_name.as_str()));
        }
        // Logged however the tunnel ends, even when cut.
        let log = telemetry.map(|t| TunnelLog {
            t,
            info: info.clone(),
            started: std::time::Instant::now(),
            tls,
            span,
        });
        tokio::spawn(TunnelTask {
            relay: relay::relay(client, up, info, opts),
            proxy: self.clone(),
            _log: log,
            _reg: reg,
            _lease: lease,
            _slot: conn.client_slot.clone(),
            _held: held,
        });
    }
}

/// A tunnel's task: its relay, and what must happen when it ends (the
/// access-log line, leaving the registry). A plain struct rather than an
/// `async` block wrapped in a `select!` for the cut: both of those keep a
/// second copy of the relay's state in the task, and an idle tunnel's
/// memory is mostly its task.
struct TunnelTask<C, U> {
    relay: relay::Relay<C, U>,
    proxy: Arc<Proxy>,
    _log: Option<TunnelLog>,
    _reg: registry::Registration,
    /// The tunnel counted against its upstream (least-conn, caps).
    _lease: Option<Lease>,
    /// The client connection's place under the connection caps: an open
    /// tunnel is an open connection.
    _slot: Option<std::sync::Arc<crate::proxy::limits::ClientSlot>>,
    /// Its place under its host's `--max-conns-per-ip`.
    _held: Option<HostSlot>,
}

impl<C, U> Future for TunnelTask<C, U>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let end = std::task::ready!(std::pin::Pin::new(&mut self.relay).poll(cx));
        if end == relay::RelayEnd::Cut {
            self.proxy.cut_count.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(tunnel = self._reg.info.id, ?end, "tunnel closed");
        std::task::Poll::Ready(())
    }
}
