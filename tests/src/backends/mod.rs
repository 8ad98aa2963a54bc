//! Upstreams for the proxy, each listening on `127.0.0.1:0`.
//!
//! - [`EchoBackend`]: HTTP/1.1 + h2 echo (JSON of what it received, tagged
//!   with its name), large streamed bodies, slow answers.
//! - [`WsEchoBackend`]: tungstenite WebSocket echo that records close codes
//!   and picks a subprotocol.
//! - [`RawUpgradeBackend`]: captures the exact bytes of each request head and
//!   answers a correct 101, to check header-name spelling.
//! - [`SilentBackend`]: accepts and never answers (timeouts).
//! - [`RecordingBackend`]: logs the exact bytes of each connection and
//!   answers with fixed bytes (the wire tests).
//! - [`PythonWsBackend`]: `tests/python/ws_backend.py` (Python websockets,
//!   permessage-deflate).
//! - [`HttpsEchoBackend`]: an HTTPS echo server with a test certificate, for
//!   `https://` upstreams; records the SNI it was asked for.
//!
//! Dropping a backend (or calling `stop`) closes its listener and every
//! connection it holds.

pub mod http_echo;
pub mod https_echo;
pub mod python;
pub mod raw_upgrade;
pub mod recording;
pub mod ws_echo;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub use http_echo::EchoBackend;
pub use https_echo::HttpsEchoBackend;
pub use python::PythonWsBackend;
pub use raw_upgrade::{RawUpgradeBackend, SilentBackend};
pub use recording::RecordingBackend;
pub use ws_echo::WsEchoBackend;

/// Binds `127.0.0.1:0`.
pub(crate) async fn bind() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Accepts connections and runs `serve` on each. The connections belong to
/// the returned task: aborting it closes the listener and all of them.
pub(crate) fn accept_loop<F, Fut>(listener: TcpListener, serve: F) -> JoinHandle<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(serve(tcp));
                    }
                    Err(_) => tokio::task::yield_now().await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// An address on which nothing listens (bound, then released), for
/// "connection refused" upstreams.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}
