//! WebSockets over HTTP/2 (RFC 8441) from the client side, with the `h2`
//! crate: one h2c connection (prior knowledge) carries many WebSockets, as a
//! browser's one connection per origin does. Each WebSocket is an extended
//! CONNECT stream (`:method CONNECT`, `:protocol websocket`) whose DATA
//! frames carry the WebSocket's frames; [`H2Io`] makes such a stream an
//! ordinary byte stream for tungstenite.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The server did not offer extended CONNECT (no
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`): the build under test has no
/// RFC 8441 support. Not a failure of the measurement: the harness reports
/// the figure as n/a.
#[derive(Debug)]
pub struct NotOffered(pub SocketAddr);

impl fmt::Display for NotOffered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No address: the report shows this once per target, and the
        // ports change from round to round.
        let _ = self.0;
        f.write_str("no WebSockets over HTTP/2 in this build (no SETTINGS_ENABLE_CONNECT_PROTOCOL)")
    }
}

impl std::error::Error for NotOffered {}

/// One h2c connection that has said it takes extended CONNECT.
#[derive(Clone)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    authority: String,
}

impl H2Conn {
    /// Connects with prior knowledge and waits until the server's SETTINGS
    /// are known: they come first on the connection, so once a PING sent
    /// after the preface has its answer, they have been applied.
    pub async fn connect(tcp: TcpStream, addr: SocketAddr) -> anyhow::Result<H2Conn> {
        let (send, mut conn) = h2::client::Builder::new()
            .handshake::<_, Bytes>(tcp)
            .await
            .context("h2 handshake")?;
        let mut ping = conn.ping_pong().context("h2: no ping handle")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        ping.ping(h2::Ping::opaque())
            .await
            .context("h2: no answer to PING")?;
        let send = send.ready().await.context("h2 connection")?;
        if !send.is_extended_connect_protocol_enabled() {
            return Err(NotOffered(addr).into());
        }
        Ok(H2Conn {
            send,
            authority: addr.to_string(),
        })
    }

    /// Opens the stream of one WebSocket: extended CONNECT to `path`; once
    /// the answer is 200 the stream carries the WebSocket protocol (RFC 8441
    /// §5: no key, no accept, no Upgrade header).
    pub async fn open_stream(&self, path: &str) -> anyhow::Result<H2Io> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://{}{path}", self.authority))
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from_static("websocket"))
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, stream) = send.send_request(req, false)?;
        let response = response.await.context("extended CONNECT")?;
        if response.status() != http::StatusCode::OK {
            anyhow::bail!("extended CONNECT answered {}", response.status());
        }
        Ok(H2Io {
            send: stream,
            recv: response.into_body(),
            pending: Bytes::new(),
            ended: false,
        })
    }
}

/// One extended CONNECT stream as a byte stream. Received data is handed
/// back to flow control as soon as it is taken off the stream.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    ended: bool,
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.pending.is_empty() {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    me.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                // END_STREAM: the peer's half is closed.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(me.pending.len());
        buf.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        me.send.reserve_capacity(buf.len());
        // Send no more than the peer's flow-control window allows.
        let granted = loop {
            let c = me.send.capacity();
            if c > 0 {
                break c;
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = granted.min(buf.len());
        me.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    /// The connection's task writes frames out as they are queued.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// END_STREAM on our half (RFC 8441 §4: the TCP FIN's equivalent).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.ended {
            me.ended = true;
            let _ = me.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    use super::*;

    async fn backend_h2() -> SocketAddr {
        let (h1, h2) = (
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let addr = h2.local_addr().unwrap();
        tokio::spawn(crate::backend::serve_both(h1, h2));
        addr
    }

    /// Several WebSockets on one h2c connection each get their own echo,
    /// text and binary, up to a size that needs several DATA frames and
    /// flow-control updates.
    #[tokio::test]
    async fn websockets_share_one_connection_and_echo() {
        let addr = backend_h2().await;
        let conn = H2Conn::connect(TcpStream::connect(addr).await.unwrap(), addr)
            .await
            .unwrap();
        let mut sockets = Vec::new();
        for _ in 0..3 {
            let io = conn.open_stream("/ws").await.unwrap();
            sockets.push(
                WebSocketStream::from_raw_socket(
                    io,
                    Role::Client,
                    Some(crate::backend::ws_config()),
                )
                .await,
            );
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
            let big = vec![i as u8; 200_000];
            ws.send(Message::binary(big.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
        }
        for mut ws in sockets {
            ws.close(None).await.unwrap();
        }
    }

    /// An h2 server that does not send SETTINGS_ENABLE_CONNECT_PROTOCOL:
    /// the client says so instead of sending a CONNECT it would refuse.
    #[tokio::test]
    async fn a_server_without_extended_connect_is_not_offered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok(_)) = conn.accept().await {}
        });
        let err = H2Conn::connect(TcpStream::connect(addr).await.unwrap(), addr)
            .await
            .err()
            .expect("no extended CONNECT offered");
        assert!(err.downcast_ref::<NotOffered>().is_some(), "{err:#}");
    }
}
