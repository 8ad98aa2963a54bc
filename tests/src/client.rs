//! Clients that talk to the proxy the way real clients do, with the `Host`
//! header chosen by the test (the proxy routes by it), plus raw-socket
//! clients for what well-behaved libraries refuse to send.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response as WsResponse;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// Upper bound of one exchange in these helpers, so that a hanging proxy
/// fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response read in full.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub async fn read(resp: Response<Incoming>) -> Result<Self> {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.context("reading response body")?;
        Ok(Self {
            status: parts.status,
            headers: parts.headers,
            body: body.to_bytes(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON (status {}): {:.300}",
                self.status,
                self.text()
            )
        })
    }

    /// The echo backend's `name` tag, if this response came from one.
    pub fn backend_name(&self) -> Option<String> {
        self.json().ok()?["name"].as_str().map(str::to_owned)
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Opens one HTTP/1.1 connection; requests sent on it share the connection.
pub async fn http1_connect<B>(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tcp = connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request on a new HTTP/1.1 connection and returns the response
/// with its body still streaming. The request's URI should be origin-form
/// (`/path`) and carry its own `Host` header.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Result<Response<Incoming>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut sender = http1_connect(addr).await?;
    tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .context("no response headers in time")?
        .context("sending request")
}

/// Builds an HTTP/1.1 request for `host` and `path` with extra headers.
pub fn build_request(
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(Full::new(body.into()))?)
}

/// One request on a new connection, response read in full.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<HttpResponse> {
    let req = build_request(method, host, path, headers, body)?;
    tokio::time::timeout(IO_TIMEOUT, async {
        HttpResponse::read(send(addr, req).await?).await
    })
    .await
    .context("request did not complete in time")?
}

/// `GET path` with `Host: host` on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<HttpResponse> {
    request(addr, Method::GET, host, path, &[], Bytes::new()).await
}

/// `GET` over HTTP/2 with prior knowledge (h2c); the authority is `host`.
pub async fn h2_get(addr: SocketAddr, host: &str, path: &str) -> Result<HttpResponse> {
    let tcp = connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .context("h2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .uri(format!("http://{host}{path}"))
        .body(Full::new(Bytes::new()))?;
    tokio::time::timeout(IO_TIMEOUT, async {
        HttpResponse::read(sender.send_request(req).await?).await
    })
    .await
    .context("h2 request did not complete in time")?
}

/// Writes `request` verbatim on a new connection and returns what comes back:
/// the head plus `Content-Length` bytes of body, the head plus a chunked body
/// up to its last chunk, or else everything up to EOF.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Result<String> {
    let mut tcp = connect(addr).await?;
    tcp.write_all(request).await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let chunked = head
                    .lines()
                    .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
                match length {
                    Some(len) if buf.len() >= end + 4 + len => break,
                    None if chunked && buf.ends_with(b"0\r\n\r\n") => break,
                    _ => {}
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .context("no complete response to the raw request in time")??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The status code of a raw HTTP/1.x response (`HTTP/1.1 400 Bad Request`).
pub fn raw_status(response: &str) -> Option<u16> {
    let line = response.lines().next()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------- WebSocket

/// A tungstenite client over a plain TCP connection to the proxy.
pub type WsClient = WebSocketStream<TcpStream>;

/// Limits large enough for the 16 MiB message tests (defaults are 16 MiB
/// per frame, 64 MiB per message).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(128 << 20))
        .max_frame_size(Some(128 << 20))
}

/// Opens a WebSocket to `ws://host{path}` through the proxy at `proxy`.
pub async fn ws_connect(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WsClient, WsResponse)> {
    let mut req = format!("ws://{host}{path}").into_client_request()?;
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let tcp = connect(proxy).await?;
    let (ws, resp) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config())),
    )
    .await
    .context("WebSocket handshake timed out")?
    .with_context(|| format!("WebSocket handshake with ws://{host}{path} via {proxy}"))?;
    Ok((ws, resp))
}

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One frame as read from the wire.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == opcode::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A WebSocket client that writes its handshake verbatim and sends and reads
/// single frames: for odd header spellings, fragmentation and interleaved
/// control frames.
pub struct RawWs {
    stream: TcpStream,
    buf: BytesMut,
    /// The response head, up to and without the blank line.
    pub head: String,
}

/// A handshake request head with the usual spelling and a fresh key.
/// Returns the head (ending with the blank line) and the key.
pub fn ws_upgrade_head(host: &str, path: &str, extra: &[(&str, &str)]) -> (String, String) {
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    (head, key)
}

/// One masked client frame, encoded.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The `Sec-WebSocket-Accept` a server must answer to `key`.
pub fn ws_accept(key: &str) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

impl RawWs {
    /// Sends `request_head` as is and reads the response head.
    pub async fn handshake(addr: SocketAddr, request_head: &str) -> Result<Self> {
        Self::handshake_with(addr, request_head, &[]).await
    }

    /// Sends `request_head` and `early` (say, a first frame) in one write,
    /// before any answer, then reads the response head.
    pub async fn handshake_with(
        addr: SocketAddr,
        request_head: &str,
        early: &[u8],
    ) -> Result<Self> {
        let mut stream = connect(addr).await?;
        let mut first = request_head.as_bytes().to_vec();
        first.extend_from_slice(early);
        stream.write_all(&first).await?;
        let mut this = Self {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            head: String::new(),
        };
        let read_head = async {
            loop {
                if let Some(end) = find(&this.buf, b"\r\n\r\n") {
                    let head = this.buf.split_to(end + 4);
                    this.head = String::from_utf8_lossy(&head[..end]).into_owned();
                    return anyhow::Ok(());
                }
                if this.stream.read_buf(&mut this.buf).await? == 0 {
                    bail!(
                        "connection closed before a complete response head; got {:?}",
                        String::from_utf8_lossy(&this.buf)
                    );
                }
            }
        };
        tokio::time::timeout(IO_TIMEOUT, read_head)
            .await
            .context("no handshake response in time")??;
        Ok(this)
    }

    pub fn status(&self) -> Option<u16> {
        raw_status(&self.head)
    }

    /// The first value of header `name` (case-insensitive) in the response.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// Sends one masked frame (as a client must).
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> Result<()> {
        let frame = client_frame(fin, opcode, payload);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    async fn fill(&mut self, n: usize) -> Result<()> {
        while self.buf.len() < n {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed in the middle of a frame");
            }
        }
        Ok(())
    }

    /// Reads the next frame (unmasking it if the peer masked it).
    pub async fn read_frame(&mut self) -> Result<RawFrame> {
        tokio::time::timeout(IO_TIMEOUT, self.read_frame_inner())
            .await
            .context("no frame in time")?
    }

    async fn read_frame_inner(&mut self) -> Result<RawFrame> {
        self.fill(2).await?;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let masked = b1 & 0x80 != 0;
        let (len, header) = match b1 & 0x7f {
            126 => {
                self.fill(4).await?;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.fill(10).await?;
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let mask_len = if masked { 4 } else { 0 };
        self.fill(header + mask_len + len).await?;
        self.buf.advance(header);
        let mask = if masked {
            let m = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
            self.buf.advance(4);
            Some(m)
        } else {
            None
        };
        let mut payload = self.buf.split_to(len).to_vec();
        if let Some(m) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= m[i % 4]);
        }
        Ok(RawFrame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// Reads frames until the end of a data message, answering nothing and
    /// skipping pongs; returns the message's opcode and whole payload.
    pub async fn read_message(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut kind = None;
        let mut data = Vec::new();
        loop {
            let frame = self.read_frame().await?;
            match frame.opcode {
                opcode::PONG | opcode::PING => continue,
                opcode::CLOSE => bail!("got Close {:?} instead of a message", frame.close_code()),
                opcode::CONTINUATION if kind.is_none() => {
                    bail!("continuation frame without a first frame")
                }
                op => {
                    if kind.is_none() {
                        kind = Some(op);
                    }
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        return Ok((kind.unwrap_or(op), data));
                    }
                }
            }
        }
    }
}

/// The next data or close message on a WebSocket of any transport (TCP,
/// TLS, an h2 stream), skipping pings and pongs.
pub async fn next_message<S>(
    ws: &mut WebSocketStream<S>,
) -> Result<tokio_tungstenite::tungstenite::Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .context("no message in time")?
            .context("the tunnel ended")??;
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return Ok(other),
        }
    }
}

/// Sends `text` and returns the text answer.
pub async fn ask<S>(ws: &mut WebSocketStream<S>, text: &str) -> Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await?;
    match next_message(ws).await? {
        Message::Text(t) => Ok(t.as_str().to_owned()),
        other => bail!("expected a text answer to {text:?}, got {other:?}"),
    }
}
