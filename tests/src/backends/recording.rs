//! [`RecordingBackend`]: a raw TCP upstream that logs the exact bytes it
//! receives on each connection and answers with fixed bytes, for the wire
//! tests (what exactly did the proxy send on, and what does a client get
//! from a crafted response).
//!
//! Each connection is read until it holds one complete request (head, then
//! a `Content-Length` body or a chunked body up to its trailer section's
//! empty line), then answered with the current answer and closed; or until
//! the proxy closes it. Either way its bytes are logged as one
//! [`Received`]. The end of a body is found by a simple walk, not by a
//! strict parser: the tests assert on the bytes themselves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::client::find;

/// What one connection to the backend carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: Vec<u8>,
    /// A whole request arrived (and was answered); otherwise the proxy
    /// closed the connection first.
    pub complete: bool,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

pub struct RecordingBackend {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

/// The answer a backend started with [`RecordingBackend::start`] gives.
pub const OK_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

impl RecordingBackend {
    /// Answers every request with [`OK_ANSWER`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_answering(OK_ANSWER).await
    }

    /// Answers every request with `answer`, verbatim, then closes.
    pub async fn start_answering(answer: &[u8]) -> anyhow::Result<Self> {
        let (listener, addr) = super::bind().await?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer.to_vec()));
        let (l, a) = (log.clone(), answer.clone());
        let task = super::accept_loop(listener, move |tcp| serve(l.clone(), a.clone(), tcp));
        Ok(Self {
            addr,
            log,
            answer,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the answer for the requests to come.
    pub fn answer_with(&self, answer: &[u8]) {
        *self.answer.lock().unwrap() = answer.to_vec();
    }

    /// Every connection logged so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Forgets what was logged.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(log: Arc<Mutex<Vec<Received>>>, answer: Arc<Mutex<Vec<u8>>>, mut tcp: TcpStream) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let complete = loop {
        if request_end(&bytes).is_some() {
            break true;
        }
        match tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&chunk[..n]),
            _ => break false,
        }
    };
    // Logged before the answer goes out: a test that has its response
    // finds the request already logged.
    log.lock().unwrap().push(Received { bytes, complete });
    if complete {
        let a = answer.lock().unwrap().clone();
        let _ = tcp.write_all(&a).await;
        let _ = tcp.shutdown().await;
    }
}

/// Where the first request in `b` ends, once it is all there.
pub fn request_end(b: &[u8]) -> Option<usize> {
    let head = find(b, b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&b[..head]).to_ascii_lowercase();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if field("transfer-encoding:").is_some_and(|v| v.ends_with("chunked")) {
        return chunked_end(b, head);
    }
    let len: usize = field("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (b.len() >= head + len).then_some(head + len)
}

/// The end of the chunked body starting at `at`.
fn chunked_end(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let line_end = at + find(&b[at..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&b[at..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer lines up to the empty one.
            loop {
                let end = at + find(&b[at..], b"\r\n")?;
                if end == at {
                    return Some(end + 2);
                }
                at = end + 2;
            }
        }
        at += size + 2;
        if b.len() < at {
            return None;
        }
    }
}
