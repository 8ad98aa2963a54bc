//! Accept loops: each accepted connection gets its task (cut by
//! [`Proxy::cut_all`]), its TLS handshake when the listener has TLS, and
//! the front end its protocol asks for: h2 by ALPN or by the h2 preface
//! ([`super::h2`]), HTTP/1.x otherwise ([`super::h1`]). Mini-redis's
//! `Listener` versus `Handler`: this file owns sockets, not requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;

use super::forwarded::ClientFacts;
use super::shutdown::{ConnGuard, Shutdown};
use super::{h1, ConnInfo, Proxy};
use crate::tls::{AcceptError, TlsTerminator};

impl Proxy {
    /// Serves HTTP/1.x ([`h1`]) and h2 (ALPN, or prior knowledge in clear
    /// text; hyper) on `listener` until `shutdown` resolves; then stops
    /// accepting and gives open requests up to `grace` to finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<TlsTerminator>>,
        shutdown: impl Future<Output = Duration>,
    ) {
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        if self.config.h2_websockets {
            // SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSockets over h2.
            h2.enable_connect_protocol();
        }
        let h2 = Arc::new(h2);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let h1_shutdown = Shutdown::new();
        tokio::pin!(shutdown);
        let local = listener.local_addr().ok();
        let grace = loop {
            let (stream, peer) = tokio::select! {
                grace = &mut shutdown => break grace,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let local = local.unwrap_or(peer);
            let trusted = self
                .config
                .trusted_proxies
                .iter()
                .any(|c| c.contains(peer.ip()));
            let info = ConnInfo {
                peer,
                peer_text: Arc::from(peer.to_string()),
                local,
                tls: tls.is_some(),
                facts: ClientFacts::new(peer, trusted, tls.is_some(), local.port()),
            };
            let watcher = graceful.watcher();
            let tls = tls.clone();
            let guard = ConnGuard::new(&self.http_conns);
            let proxy = self.clone();
            let h2 = h2.clone();
            let h1_shutdown = h1_shutdown.clone();
            tokio::spawn(self.cuttable(async move {
                let _guard = guard;
                let Some(tls) = tls else {
                    if let h1::Ended::H2(h2_conn) =
                        h1::serve(proxy.clone(), stream, info, h1_shutdown).await
                    {
                        let (io, info) = *h2_conn;
                        proxy.serve_h2(&h2, watcher, io, info).await;
                    }
                    return;
                };
                match tls.accept(stream, local).await {
                    Ok(stream) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(None);
                        }
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            proxy.serve_h2(&h2, watcher, stream, info).await;
                        } else if let h1::Ended::H2(h2_conn) =
                            h1::serve(proxy.clone(), stream, info, h1_shutdown).await
                        {
                            let (io, info) = *h2_conn;
                            proxy.serve_h2(&h2, watcher, io, info).await;
                        }
                    }
                    Err(e @ AcceptError::AcmeChallenge(_)) => {
                        tracing::info!(client = %peer, "TLS: {e}");
                    }
                    Err(e @ AcceptError::UnknownName(_)) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(Some("unknown_name"));
                        }
                        tracing::info!(client = %peer, "TLS: {e}");
                    }
                    Err(e) => {
                        if let Some(t) = proxy.telemetry.get() {
                            t.metrics.tls_handshake(Some("handshake_error"));
                        }
                        tracing::debug!(client = %peer, "TLS: {e}");
                    }
                }
            }));
        };
        drop(listener);
        tracing::info!(?grace, "proxy listener closed; waiting for open requests");
        h1_shutdown.begin();
        let all = async {
            tokio::join!(graceful.shutdown(), h1_shutdown.wait());
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }
}
