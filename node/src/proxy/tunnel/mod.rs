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

use super::limits::{ClientSlot, HostSlot};
use super::upstream::{Lease, UpstreamState};
use super::{ConnInfo, Proxy};
use crate::telemetry::otel;
use record::TunnelLog;

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
        (host_id, host_name): (&Arc<str>, &Arc<str>),
        opts: relay::TunnelOptions,
        (upstream, lease, held): (&Arc<UpstreamState>, Option<Lease>, Option<HostSlot>),
        conn: &ConnInfo,
        (client, up): (C, U),
        span: Option<opentelemetry::Context>,
    ) where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let info = self
            .tunnels
            .register((host_id, host_name), &upstream.url_text, conn.peer);
        tracing::debug!(tunnel = info.id, host = %info.host_name, upstream = %info.upstream, client = %info.client, "tunnel open");
        if let Some(t) = self.telemetry.get() {
            t.metrics.tunnel_opened(&info.host_name);
        }
        let slots = (conn.client_slot.clone(), held);
        tokio::spawn(TunnelTask {
            relay: relay::relay(client, up, info, opts),
            proxy: self.clone(),
            log: TunnelLog {
                tls: conn.tls,
                span,
            },
            _lease: lease,
            _slots: (slots.0.is_some() || slots.1.is_some()).then(|| Box::new(slots)),
        });
    }
}

/// A tunnel's task: its relay, and what must happen when it ends (the
/// access-log line, leaving the registry: its `Drop`, which runs however
/// the tunnel ends, cut included). A plain struct rather than an `async`
/// block wrapped in a `select!` for the cut: both of those keep a second
/// copy of the relay's state in the task, and an idle tunnel's memory is
/// mostly its task — which is why nothing here is kept twice (the
/// registry is reached through `proxy`, the tunnel's entry through the
/// relay). `size_tests` below keeps it from growing unnoticed.
struct TunnelTask<C, U> {
    relay: relay::Relay<C, U>,
    proxy: Arc<Proxy>,
    log: TunnelLog,
    /// The tunnel counted against its upstream (least-conn, caps).
    _lease: Option<Lease>,
    /// Its places under the caps, when the node or its host sets any
    /// (boxed: most set none): the client connection's under the
    /// connection caps (an open tunnel is an open connection), and its
    /// place under its host's `--max-conns-per-ip`.
    _slots: Option<Box<HeldSlots>>,
}

type HeldSlots = (Option<Arc<ClientSlot>>, Option<HostSlot>);

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
        tracing::debug!(tunnel = self.relay.info().id, ?end, "tunnel closed");
        std::task::Poll::Ready(())
    }
}

impl<C, U> Drop for TunnelTask<C, U> {
    fn drop(&mut self) {
        let info = self.relay.info();
        if let Some(t) = self.proxy.telemetry.get() {
            self.log.write(t, info);
        }
        self.proxy.tunnels.remove(info.id);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::proxy::wire::Prefixed;
    use tokio::net::TcpStream;

    /// An idle tunnel's memory is mostly its task (plus tokio's two
    /// registrations and its [`registry::TunnelInfo`]); the bench's idle
    /// test measures the whole, this keeps the parts from growing
    /// unnoticed. tokio allocates a task in steps of 128 bytes, and its
    /// header and trailer take about 100 of them: 416 keeps the whole task
    /// in 512 (it was 1,024 before this test, with 832 here).
    #[test]
    fn an_idle_tunnel_stays_small() {
        use crate::proxy::upstream::UpstreamIo;
        type Up = Prefixed<UpstreamIo>;
        // Over HTTP/1.1 (plain) and over h2 (RFC 8441): the types the two
        // front ends spawn.
        let h1 = std::mem::size_of::<TunnelTask<Prefixed<TcpStream>, Up>>();
        type H2Stream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
        let h2 = std::mem::size_of::<TunnelTask<H2Stream, Up>>();
        let info = std::mem::size_of::<registry::TunnelInfo>();
        assert!(h1 <= 416, "TunnelTask grew to {h1} bytes");
        assert!(h2 <= 416, "TunnelTask over h2 grew to {h2} bytes");
        assert!(info <= 216, "TunnelInfo grew to {info} bytes");
    }
}
