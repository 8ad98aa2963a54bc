//! A WebSocket client over h2 (RFC 8441), built on the `h2` crate (the
//! one hyper uses): the h2 connection, an extended CONNECT stream with
//! `:protocol = websocket`, and the stream as a byte pipe under
//! tungstenite's client role, so messages, masking and close codes are a
//! real client's.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use anyhow::{bail, Context as _, Result};
use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::client::{ws_config, IO_TIMEOUT};

/// One h2 stream as an `AsyncRead + AsyncWrite`: DATA frames in and out,
/// END_STREAM at shutdown.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Bytes,
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let n = data.len();
                    let _ = self.recv.flow_control().release_capacity(n);
                    self.buf = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(data.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map_err(io::Error::other)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// A WebSocket over one h2 stream.
pub type H2WsClient = WebSocketStream<H2Stream>;

/// An h2 connection to the proxy, ready for extended CONNECT streams.
pub struct H2Conn {
    pub sender: SendRequest<Bytes>,
    /// `https` or `http`: what `:scheme` says.
    pub scheme: &'static str,
}

impl H2Conn {
    /// The h2 handshake on `io`, then one plain request (its answer does
    /// not matter) so that the server's SETTINGS have been read when this
    /// returns: `extended_connect_enabled` is then the node's word.
    pub async fn handshake<I>(io: I, scheme: &'static str, authority: &str) -> Result<H2Conn>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = h2::client::handshake(io).await.context("h2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut sender = sender.ready().await.context("h2 connection not ready")?;
        let req = http::Request::get(format!("{scheme}://{authority}/settings-probe")).body(())?;
        let (resp, _) = sender.send_request(req, true)?;
        let mut body = tokio::time::timeout(IO_TIMEOUT, resp)
            .await
            .context("h2 probe timed out")??
            .into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Ok(H2Conn { sender, scheme })
    }

    /// The h2 handshake on `io` alone: for a client that sends its
    /// extended CONNECT at once (the node checks `:protocol` against its
    /// own setting, whatever the client has read of it).
    pub async fn handshake_only<I>(io: I, scheme: &'static str) -> Result<H2Conn>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = h2::client::handshake(io).await.context("h2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Conn { sender, scheme })
    }

    /// Whether the node sent `SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`.
    pub fn extended_connect_enabled(&self) -> bool {
        self.sender.is_extended_connect_protocol_enabled()
    }

    /// Sends an extended CONNECT for `authority{path}` with `headers`;
    /// the response head and, on a 2xx, the stream as a WebSocket client
    /// (else the refusal's body).
    pub async fn open(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, Option<H2WsClient>, Bytes)> {
        let (parts, stream, body) = self.open_stream(authority, path, headers).await?;
        let ws = match stream {
            Some(io) => {
                Some(WebSocketStream::from_raw_socket(io, Role::Client, Some(ws_config())).await)
            }
            None => None,
        };
        Ok((parts, ws, body))
    }

    /// [`open`](Self::open) with the stream as bytes.
    pub async fn open_stream(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, Option<H2Stream>, Bytes)> {
        let mut b = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{}://{authority}{path}", self.scheme))
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from("websocket"));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(())?;
        let mut sender = self.sender.clone().ready().await?;
        let (resp, send) = sender.send_request(req, false)?;
        let resp = tokio::time::timeout(IO_TIMEOUT, resp)
            .await
            .context("no answer to the extended CONNECT in time")??;
        let (parts, mut recv) = resp.into_parts();
        if !parts.status.is_success() {
            let mut body = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk?;
                let _ = recv.flow_control().release_capacity(chunk.len());
                body.extend_from_slice(&chunk);
            }
            return Ok((parts, None, Bytes::from(body)));
        }
        let io = H2Stream {
            send,
            recv,
            buf: Bytes::new(),
        };
        Ok((parts, Some(io), Bytes::new()))
    }

    /// [`open`](Self::open), which must succeed with 200.
    pub async fn websocket(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, H2WsClient)> {
        let (parts, ws, body) = self.open(authority, path, headers).await?;
        match ws {
            Some(ws) if parts.status == 200 => Ok((parts, ws)),
            _ => bail!(
                "extended CONNECT answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

/// A plain-TCP front for WebSocket clients that only speak HTTP/1.1
/// (kosoku, the Autobahn client): each connection's upgrade is answered
/// here and carried as an RFC 8441 stream on a new h2 connection (h2c) to
/// `target`, the stream's response fields (subprotocol, extensions)
/// passed back in the 101. After that the shim is byte-transparent both
/// ways, half-closes included (END_STREAM ↔ FIN), so what the node relays
/// is exactly the client's frames: the cases test the node's h2 tunnels.
pub struct H2Shim {
    pub addr: std::net::SocketAddr,
    streams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Shim {
    pub async fn start(target: std::net::SocketAddr) -> Result<H2Shim> {
        let (listener, addr) = crate::backends::bind().await?;
        let streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = streams.clone();
        let task = crate::backends::accept_loop(listener, move |tcp| {
            let n = n.clone();
            async move {
                let _ = shim_one(tcp, target, &n).await;
            }
        });
        Ok(H2Shim {
            addr,
            streams,
            task,
        })
    }

    /// Upgrades carried as h2 streams that the node answered with 200.
    pub fn streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for H2Shim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn shim_one(
    mut tcp: tokio::net::TcpStream,
    target: std::net::SocketAddr,
    streams: &std::sync::atomic::AtomicUsize,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.set_nodelay(true)?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before its request head");
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = crate::client::find(&head, b"\r\n\r\n") {
            break at + 4;
        }
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    req.parse(&head[..end])?;
    let path = req.path.unwrap_or("/").to_string();
    let mut key = String::new();
    let mut host = String::new();
    let mut pass = Vec::new();
    for f in req.headers.iter() {
        let value = String::from_utf8_lossy(f.value).into_owned();
        match f.name.to_ascii_lowercase().as_str() {
            "sec-websocket-key" => key = value,
            "host" => host = value,
            n @ ("sec-websocket-protocol" | "sec-websocket-extensions" | "origin") => {
                pass.push((n.to_string(), value))
            }
            _ => {}
        }
    }
    let h2_io = tokio::net::TcpStream::connect(target).await?;
    h2_io.set_nodelay(true)?;
    let mut conn = H2Conn::handshake_only(h2_io, "http").await?;
    let headers: Vec<(&str, &str)> = pass.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let (parts, stream, body) = conn.open_stream(&host, &path, &headers).await?;
    let Some(mut stream) = stream else {
        let answer = format!(
            "HTTP/1.1 {} Refused\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            parts.status.as_u16(),
            body.len()
        );
        tcp.write_all(answer.as_bytes()).await?;
        tcp.write_all(&body).await?;
        return Ok(());
    };
    streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        crate::client::ws_accept(&key)
    );
    for name in ["sec-websocket-protocol", "sec-websocket-extensions"] {
        if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            answer.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    answer.push_str("\r\n");
    tcp.write_all(answer.as_bytes()).await?;
    if end < head.len() {
        stream.write_all(&head[end..]).await?;
    }
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
    drop(conn);
    Ok(())
}
