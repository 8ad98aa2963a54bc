//! Accept loops: each accepted connection gets its task (cut by
//! [`Proxy::cut_all`]), its TLS handshake when the listener has TLS, and
//! the front end its protocol asks for: h2 by ALPN or by the h2 preface
//! ([`super::h2`]), HTTP/1.x otherwise ([`super::h1`]). Mini-redis's
//! `Listener` versus `Handler`: this file owns sockets, not requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::forwarded::ClientFacts;
use super::limits::{over_cap_response, Admission};
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
            // At --max-connections, accept nothing (new connections wait in
            // the backlog) while the open ones are served.
            if let Some(grace) = self.wait_below_capacity(shutdown.as_mut()).await {
                break grace;
            }
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
            // Another worker may have filled the node while this one sat
            // in `accept`: the connection waits unanswered, as it would
            // in the backlog, until some close.
            if let Some(grace) = self.wait_below_capacity(shutdown.as_mut()).await {
                break grace;
            }
            let _ = stream.set_nodelay(true);
            if let Some(t) = self.telemetry.get() {
                t.metrics.connection_accepted(crate::workers::slot());
            }
            let local = local.unwrap_or(peer);
            let trusted = self
                .config
                .trusted_proxies
                .iter()
                .any(|c| c.contains(peer.ip()));
            let client_slot = match self.limits.admit(peer.ip(), trusted) {
                Admission::Serve(slot) => slot,
                Admission::OverClientCap { open } => {
                    self.refuse_over_cap(stream, peer, tls.is_some(), open);
                    continue;
                }
            };
            let info = ConnInfo {
                peer,
                peer_text: Arc::from(peer.to_string()),
                local,
                tls: tls.is_some(),
                facts: ClientFacts::new(peer, trusted, tls.is_some(), local.port()),
                client_slot,
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

impl Proxy {
    /// Waits while the node holds `--max-connections`; `Some(grace)` if
    /// the listener is shut down meanwhile.
    async fn wait_below_capacity(
        &self,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = Duration>>,
    ) -> Option<Duration> {
        while self.limits.at_capacity() {
            tokio::select! {
                grace = &mut shutdown => return Some(grace),
                // Back-off between looks at the count.
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        None
    }
}

/// Slots of the over-cap log: one line per client a minute.
const OVER_CAP_LOG: &str = "(connection cap)";

impl Proxy {
    /// A connection over `--max-conns-per-ip`: in clear text, its request
    /// head is read and answered with a canned 429, what follows is read
    /// and dropped (closing with unread data would reset the connection
    /// and lose the 429), all within one second, then it closes (a
    /// slowloris that never finishes its head holds a descriptor for that
    /// second at most); over TLS it closes at once, before the handshake. Logged once a minute per
    /// client at most, counted always.
    fn refuse_over_cap(
        self: &Arc<Self>,
        mut stream: TcpStream,
        peer: std::net::SocketAddr,
        tls: bool,
        open: u32,
    ) {
        if let Some(t) = self.telemetry.get() {
            t.metrics.connection_refused("per_client_cap");
        }
        let key: Arc<str> = Arc::from(OVER_CAP_LOG);
        if let Some(skipped) = self.refusal_log.due(&key, peer.ip()) {
            tracing::warn!(client = %peer.ip(), open, more_since_last_line = skipped,
                "connection refused: the client holds --max-conns-per-ip connections already");
        }
        if tls {
            return;
        }
        let answer = over_cap_response(peer.ip(), open);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                // The request head first (up to 8 KiB): an HTTP/1 client
                // takes a response that comes before its request for a
                // broken connection, not for a 429.
                let mut head = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                stream.write_all(&answer).await?;
                stream.shutdown().await?;
                while stream.read(&mut chunk).await? > 0 {}
                std::io::Result::Ok(())
            })
            .await;
        });
    }
}
