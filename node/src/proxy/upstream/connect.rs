//! Opening upstream connections: TCP with a deadline, then TLS for
//! `https://` upstreams; hyper's HTTP/1.1 handshake for the h2 front end,
//! a bare connection with a read buffer for the HTTP/1 front end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::UploadBody;
use super::UpstreamState;

pub type Sender = http1::SendRequest<UploadBody>;

/// An upstream connection of the HTTP/1 path, with what has been read from
/// it and not yet used (normally nothing between two responses).
pub struct RawConn {
    pub io: UpstreamIo,
    pub buf: crate::proxy::wire::Buf,
}

impl RawConn {
    /// Whether the upstream has closed (or sent something unasked) while
    /// the connection sat in the pool. The reactor's readiness says so
    /// without a system call in the usual case (nothing happened); only a
    /// connection marked readable is read from to see what it was.
    pub(super) fn went_bad(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let tcp = match &self.io {
            UpstreamIo::Plain(s) => s,
            // TLS could have buffered a close_notify: any readiness means
            // something arrived, which an idle connection should not get.
            UpstreamIo::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                return s.get_ref().0.poll_read_ready(&mut cx).is_ready();
            }
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if tcp.poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        let mut probe = [0u8; 1];
        !matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// First size of an HTTP/1 upstream connection's read buffer: a response
/// head and a small body fit in one read.
const RAW_BUF: usize = 8 * 1024;
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused or failed: {0}")]
    Refused(io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamIo {
    pub fn is_plain(&self) -> bool {
        matches!(self, UpstreamIo::Plain(_))
    }

    /// Ready once the reactor reports a plain connection readable, without
    /// reading (so a caller can take a buffer only then). A TLS connection
    /// is ready at once: its layer may already hold decrypted bytes.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            UpstreamIo::Plain(s) => s.poll_read_ready(cx),
            UpstreamIo::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl UpstreamIo {
    /// Ready once the upstream has sent something or closed, looked at
    /// without reading it (`MSG_PEEK`, and only when the reactor says the
    /// socket is readable); pending, with the waker registered for
    /// readability, until then. Always pending on TLS, whose layer cannot
    /// peek: there the answer is only heard after the request.
    pub fn poll_has_input(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            UpstreamIo::Plain(s) => {
                let mut one = [0u8; 1];
                let mut rb = ReadBuf::new(&mut one);
                s.poll_peek(cx, &mut rb).map(|_| ())
            }
            UpstreamIo::Tls(_) => Poll::Pending,
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens new upstream connections.
pub struct Connector {
    pub connect_timeout: Duration,
}

impl Connector {
    pub fn new(connect_timeout: Duration) -> Self {
        Connector { connect_timeout }
    }

    /// TCP (+ TLS, SNI = the upstream's host name) connect and HTTP/1.1
    /// handshake, bounded by the connect timeout. The connection task is
    /// spawned with upgrade support, so the same connection can carry a
    /// WebSocket after a 101. With `preserve_case` the responses keep the
    /// upstream's header-name spelling (for WebSocket upgrades); pooled
    /// connections do without, which spares a second header map per
    /// response. Requests are written with the client's spelling whenever
    /// they carry hyper's record of it, whatever the connection.
    pub async fn connect(
        &self,
        upstream: &UpstreamState,
        preserve_case: bool,
    ) -> Result<Sender, ConnectError> {
        let fut = async {
            let io = self.open(upstream).await?;
            let (sender, conn) = http1::Builder::new()
                .preserve_header_case(preserve_case)
                .handshake(TokioIo::new(io))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            Ok(sender)
        };
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(self.connect_timeout)),
        }
    }

    /// A new connection for the HTTP/1 path, bounded by the connect timeout.
    pub async fn connect_raw(&self, upstream: &UpstreamState) -> Result<RawConn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.open(upstream)).await {
            Ok(r) => r.map(|io| RawConn {
                io,
                buf: crate::proxy::wire::Buf::with_capacity(RAW_BUF),
            }),
            Err(_) => Err(ConnectError::Timeout(self.connect_timeout)),
        }
    }

    /// TCP, and TLS for `https://` upstreams (SNI = the upstream's name).
    async fn open(&self, upstream: &UpstreamState) -> Result<UpstreamIo, ConnectError> {
        let url = &upstream.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(ConnectError::Refused)?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &upstream.tls else {
            return Ok(UpstreamIo::Plain(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(UpstreamIo::Tls(Box::new(tls)))
    }
}
