//! Backends on raw sockets.
//!
//! [`RawUpgradeBackend`] keeps the exact bytes of every request head it
//! receives (so a test can check how header names were spelled) and answers
//! a WebSocket handshake with a correct `101` (the first offered subprotocol
//! is echoed); it then reads and discards until the peer closes. A request
//! without `Sec-WebSocket-Key` gets `200 raw ok`. Started with a greeting, it
//! sends that text frame in the same write as the `101`, as servers that
//! speak first do.
//!
//! [`SilentBackend`] accepts connections, reads, and never answers (or,
//! started with [`SilentBackend::start_hanging_up`], closes the connection
//! as soon as a request head has arrived).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::client::{find, ws_accept};

pub struct RawUpgradeBackend {
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl RawUpgradeBackend {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_greeting(None).await
    }

    /// Sends `greeting` as an unmasked text frame right behind the `101`,
    /// in the same write.
    pub async fn start_with_greeting(greeting: Option<&str>) -> anyhow::Result<Self> {
        let (listener, addr) = super::bind().await?;
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        let greeting: Option<Arc<str>> = greeting.map(Arc::from);
        let task = super::accept_loop(listener, move |tcp| serve(h.clone(), greeting.clone(), tcp));
        Ok(Self { addr, heads, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request head received, verbatim (up to and without the blank line).
    pub fn heads(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect()
    }

    /// The heads of WebSocket handshakes only.
    pub fn upgrade_heads(&self) -> Vec<String> {
        self.heads()
            .into_iter()
            .filter(|h| h.to_ascii_lowercase().contains("sec-websocket-key"))
            .collect()
    }
}

impl Drop for RawUpgradeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

async fn serve(heads: Arc<Mutex<Vec<Vec<u8>>>>, greeting: Option<Arc<str>>, mut tcp: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    heads.lock().unwrap().push(buf[..end].to_vec());

    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut parsed);
    if req.parse(&buf[..end + 4]).is_err() {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return;
    }
    let Some(key) = header(req.headers, "sec-websocket-key") else {
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nraw ok")
            .await;
        return;
    };
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        ws_accept(key)
    );
    if let Some(protocols) = header(req.headers, "sec-websocket-protocol") {
        if let Some(first) = protocols.split(',').next() {
            resp.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", first.trim()));
        }
    }
    resp.push_str("X-Raw-Backend: yes\r\n\r\n");
    let mut out = resp.into_bytes();
    if let Some(text) = greeting {
        // A server frame: FIN + text, unmasked; greetings stay under 126 bytes.
        out.extend_from_slice(&[0x81, text.len().min(125) as u8]);
        out.extend_from_slice(&text.as_bytes()[..text.len().min(125)]);
    }
    if tcp.write_all(&out).await.is_err() {
        return;
    }
    while let Ok(n) = tcp.read(&mut chunk).await {
        if n == 0 {
            break;
        }
    }
}

/// Accepts connections and never answers; counts them.
pub struct SilentBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentBackend {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_inner(false).await
    }

    /// Closes each connection, unanswered, once a request head has arrived.
    pub async fn start_hanging_up() -> anyhow::Result<Self> {
        Self::start_inner(true).await
    }

    async fn start_inner(hang_up: bool) -> anyhow::Result<Self> {
        let (listener, addr) = super::bind().await?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let task = super::accept_loop(listener, move |mut tcp| {
            a.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&chunk[..n]);
                    if hang_up && find(&seen, b"\r\n\r\n").is_some() {
                        break;
                    }
                }
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
