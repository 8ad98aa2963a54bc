//! Upstreams: connecting, pooling keep-alive connections, passive health.
//!
//! The proxy owns its pool rather than using hyper-util's legacy client so
//! that it can connect *before* it touches the request body: when an
//! upstream refuses, the request (and its unread streaming body) is still
//! whole and can go to the next upstream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::host::UpstreamUrl;
use crate::tls::upstream::{ClientConfigs, TlsProfile};

/// How long an idle pooled connection is kept. Upstreams commonly close
/// idle keep-alive connections after 60–75 s; dropping ours earlier avoids
/// most races with their close.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream.
const MAX_IDLE: usize = 256;
/// First size of an HTTP/1 upstream connection's read buffer: a response
/// head and a small body fit in one read.
const RAW_BUF: usize = 8 * 1024;

pub type Sender = http1::SendRequest<UploadBody>;

/// A client's request body on its way upstream. It reports when it has
/// been sent completely, because the upstream's response timeout only
/// starts then: a slow upload is not a silent upstream.
///
/// Most requests have no body at all: they get no signal (and no
/// allocation); [`uploaded`](Self::uploaded) is then ready at once.
pub struct UploadBody {
    inner: Incoming,
    done: Option<Arc<UploadSignal>>,
}

/// Set once a body has been sent (or dropped); wakes the one waiter.
#[derive(Default)]
struct UploadSignal {
    done: AtomicBool,
    waker: AtomicWaker,
}

impl UploadSignal {
    fn set(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

impl UploadBody {
    pub fn new(inner: Incoming) -> Self {
        let done = (!inner.is_end_stream()).then(Arc::default);
        UploadBody { inner, done }
    }

    /// Resolves once the body is sent, or is dropped.
    pub fn uploaded(&self) -> Uploaded {
        Uploaded(self.done.clone())
    }

    fn set_done(&self) {
        if let Some(d) = &self.done {
            d.set();
        }
    }
}

impl Drop for UploadBody {
    fn drop(&mut self) {
        self.set_done();
    }
}

/// See [`UploadBody::uploaded`].
pub struct Uploaded(Option<Arc<UploadSignal>>);

impl Future for Uploaded {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(signal) = &self.0 else {
            return Poll::Ready(());
        };
        if signal.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        signal.waker.register(cx.waker());
        if signal.done.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl http_body::Body for UploadBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            self.set_done();
        } else if let Poll::Ready(Some(Ok(_))) = polled {
            if self.inner.is_end_stream() {
                self.set_done();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One upstream address, shared by every host and location that names it,
/// and kept across route-table swaps (so pools and health marks survive
/// config changes).
pub struct UpstreamState {
    pub url: UpstreamUrl,
    /// `Host` for requests to it when the client's is not kept: built once
    /// rather than formatted per request.
    pub host_header: Option<http::HeaderValue>,
    /// The URL as text, for logs and metrics (built once).
    pub url_text: Arc<str>,
    /// Client TLS for `https://` upstreams (per the host's CA settings).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Until when (ms since [`epoch`]) it is skipped after a failure.
    down_until_ms: AtomicU64,
    /// hyper connections, for requests that came over h2.
    idle: Mutex<Vec<(Sender, Instant)>>,
    /// Plain connections for the HTTP/1 path (`proxy::h1`), newest last.
    raw_idle: Mutex<Vec<(RawConn, Instant)>>,
}

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
    fn went_bad(&mut self) -> bool {
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

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl UpstreamState {
    fn new(url: UpstreamUrl, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        UpstreamState {
            host_header: http::HeaderValue::from_str(&url.authority()).ok(),
            url_text: Arc::from(url.to_string()),
            url,
            tls,
            down_until_ms: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            raw_idle: Mutex::new(Vec::new()),
        }
    }

    pub fn is_down(&self) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Passive health: skip this upstream for `cooldown`.
    pub fn mark_down(&self, cooldown: Duration) {
        self.down_until_ms
            .store(now_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn mark_up(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// An idle, open connection if one is pooled. Connections still busy
    /// with the rest of a response stay pooled for a later request; closed
    /// and expired ones are dropped.
    pub fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        let now = Instant::now();
        // Newest first: the most recently used connection is the least
        // likely to have been closed by the upstream.
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let (s, since) = &idle[i];
            // A connection busy for longer than one may idle has a response
            // nobody reads: not worth its slot either.
            if s.is_closed() || now.saturating_duration_since(*since) >= IDLE_TTL {
                idle.swap_remove(i);
            } else if s.is_ready() {
                return Some(idle.swap_remove(i).0);
            }
        }
        None
    }

    /// An idle connection of the HTTP/1 path, newest first (the least
    /// likely to have been closed by the upstream); expired and closed ones
    /// are dropped on the way.
    pub fn take_raw(&self) -> Option<RawConn> {
        let mut idle = self.raw_idle.lock().expect("pool lock");
        let now = Instant::now();
        while let Some((mut c, since)) = idle.pop() {
            if now.saturating_duration_since(since) < IDLE_TTL && !c.went_bad() {
                return Some(c);
            }
        }
        None
    }

    /// Pools a connection whose last response was read to its end.
    pub fn release_raw(&self, conn: RawConn) {
        let mut idle = self.raw_idle.lock().expect("pool lock");
        if idle.len() >= MAX_IDLE {
            // The oldest is the likeliest to be closed by the upstream soon.
            idle.remove(0);
        }
        idle.push((conn, Instant::now()));
    }

    /// Returns a connection to the pool as soon as its response head has
    /// arrived. hyper only reports it ready once the response body has been
    /// read to the end; until then [`take_idle`](Self::take_idle) passes it
    /// over. This used to spawn a task per response that waited for
    /// readiness: a task's allocation, scheduling and wake-ups for every
    /// request, where a pooled entry costs a push.
    pub fn release(&self, sender: Sender) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }
}

/// The upstreams of one host or location, tried round-robin.
pub struct Pool {
    upstreams: Vec<Arc<UpstreamState>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(upstreams: Vec<Arc<UpstreamState>>) -> Self {
        Pool {
            upstreams,
            next: AtomicUsize::new(0),
        }
    }

    pub fn upstreams(&self) -> &[Arc<UpstreamState>] {
        &self.upstreams
    }

    /// The order to try upstreams in for one request: round-robin start,
    /// healthy ones first, then those cooling down — when every upstream is
    /// marked down, trying one beats failing without trying.
    ///
    /// An iterator rather than a `Vec`: it runs on every request, and the
    /// first upstream nearly always answers. Health is read once, when the
    /// iterator is made, so an upstream marked down during the request is
    /// neither skipped nor tried twice.
    pub fn attempt_order(&self) -> AttemptOrder<'_> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = now_ms();
        let mut down = DownSet::new(n);
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.down_until_ms.load(Ordering::Relaxed) > now {
                down.insert(i);
            }
        }
        AttemptOrder {
            upstreams: &self.upstreams,
            start,
            step: 0,
            down,
        }
    }
}

/// Which upstreams of a pool were cooling down when an [`AttemptOrder`] was
/// made: a bit set in one word for pools of up to 64 upstreams.
enum DownSet {
    Small(u64),
    Large(Vec<bool>),
}

impl DownSet {
    fn new(n: usize) -> Self {
        if n <= 64 {
            DownSet::Small(0)
        } else {
            DownSet::Large(vec![false; n])
        }
    }

    fn insert(&mut self, i: usize) {
        match self {
            DownSet::Small(bits) => *bits |= 1 << i,
            DownSet::Large(v) => v[i] = true,
        }
    }

    fn contains(&self, i: usize) -> bool {
        match self {
            DownSet::Small(bits) => bits & (1 << i) != 0,
            DownSet::Large(v) => v[i],
        }
    }
}

/// Upstreams in the order [`Pool::attempt_order`] tries them: one pass over
/// the rotated list for healthy ones, a second for those cooling down.
pub struct AttemptOrder<'a> {
    upstreams: &'a [Arc<UpstreamState>],
    start: usize,
    /// 0..n: first pass; n..2n: second pass.
    step: usize,
    down: DownSet,
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = &'a Arc<UpstreamState>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.upstreams.len();
        while self.step < 2 * n {
            let second_pass = self.step >= n;
            let i = (self.start + self.step) % n;
            self.step += 1;
            if self.down.contains(i) == second_pass {
                return Some(&self.upstreams[i]);
            }
        }
        None
    }
}

/// Hands out one [`UpstreamState`] per upstream URL and TLS profile (two
/// hosts that trust different CAs must not share connections).
#[derive(Default)]
pub struct UpstreamRegistry {
    map: Mutex<HashMap<(UpstreamUrl, TlsProfile), Weak<UpstreamState>>>,
    tls: ClientConfigs,
}

impl UpstreamRegistry {
    pub fn get(&self, url: &UpstreamUrl, ca_pem: &str, insecure: bool) -> Arc<UpstreamState> {
        let profile = if url.tls {
            ClientConfigs::profile(ca_pem, insecure)
        } else {
            TlsProfile::SystemRoots
        };
        let key = (url.clone(), profile);
        let mut map = self.map.lock().expect("registry lock");
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let tls = url.tls.then(|| self.tls.get(ca_pem, insecure));
        let s = Arc::new(UpstreamState::new(url.clone(), tls));
        map.insert(key, Arc::downgrade(&s));
        s
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn url(port: u16) -> UpstreamUrl {
        UpstreamUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn round_robin_puts_cooling_down_upstreams_last() {
        let reg = UpstreamRegistry::default();
        let pool = Pool::new(vec![
            reg.get(&url(1), "", false),
            reg.get(&url(2), "", false),
            reg.get(&url(3), "", false),
        ]);
        let firsts: Vec<u16> = (0..3)
            .map(|_| pool.attempt_order().next().unwrap().url.port)
            .collect();
        assert_eq!(firsts, [1, 2, 3]);
        pool.upstreams()[1].mark_down(Duration::from_secs(60));
        for _ in 0..3 {
            let order: Vec<u16> = pool.attempt_order().map(|u| u.url.port).collect();
            assert_eq!(order.len(), 3);
            assert_eq!(*order.last().unwrap(), 2, "{order:?}");
        }
        pool.upstreams()[1].mark_up();
        assert!(!pool.upstreams()[1].is_down());
    }

    #[test]
    fn registry_shares_state_per_url() {
        let reg = UpstreamRegistry::default();
        let a = reg.get(&url(1), "", false);
        a.mark_down(Duration::from_secs(60));
        assert!(
            reg.get(&url(1), "", false).is_down(),
            "health survives a table rebuild"
        );
        assert!(!reg.get(&url(2), "", false).is_down());
    }
}
