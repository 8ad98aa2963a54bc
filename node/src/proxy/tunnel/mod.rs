//! WebSocket tunnels: once an upstream answered an upgrade with 101, the
//! client and upstream connections are handed to [`relay::relay`] in a
//! task of their own, registered in [`registry`] for drains and
//! `charonctl tunnels`; [`frames`] follows the WebSocket frames the relay
//! copies.

pub mod frames;
mod record;
pub mod registry;
pub mod relay;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::upstream::UpstreamState;
use super::{ConnInfo, Proxy};
use crate::host::ProxyHost;
use record::TunnelLog;
use relay::TunnelOptions;

impl Proxy {
    /// Starts the relay of an upgraded connection pair in its own task
    /// (the client connection's task has ended), registered for drains and
    /// `charonctl tunnels`.
    pub(super) fn spawn_tunnel<C, U>(
        self: &Arc<Self>,
        host: &ProxyHost,
        opts: TunnelOptions,
        upstream: &Arc<UpstreamState>,
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
            _slot: conn.client_slot.clone(),
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
    /// The client connection's place under the connection caps: an open
    /// tunnel is an open connection.
    _slot: Option<std::sync::Arc<crate::proxy::limits::ClientSlot>>,
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
