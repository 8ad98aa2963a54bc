//! Load generators the harness runs as child processes: WebSocket round
//! trips (`ws-load`), idle WebSocket tunnels (`ws-idle`) and new TLS
//! handshakes (`tls-load`).
//!
//! They talk to the harness over stdout, one line per event, so it can
//! sample the proxy's CPU time exactly around the measured window:
//! `connected N F` (N open, F failed), `measure-start`, `measure-end`, and a
//! last line `result {json}`. `ws-idle` prints `ready N F` and holds its
//! connections until its stdin is closed. A tool asked for something the
//! target does not offer (WebSockets over HTTP/2 on a build without RFC
//! 8441) prints `unsupported REASON` instead and exits 0.
//!
//! WebSockets go over HTTP/1.1 upgrades, or with `--h2` over HTTP/2 extended
//! CONNECT streams, `--h2-streams` of them per h2c connection ([`Transport`]).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::h2ws::{H2Conn, H2Io, NotOffered};

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// How many connection attempts are in flight at once while connecting.
const CONNECT_CONCURRENCY: usize = 200;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Connects from 127.0.0.`i % sources + 1`: with several source addresses
/// the idle test never runs short of ephemeral ports.
async fn tcp_connect(target: SocketAddr, i: usize, sources: usize) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if sources > 1 {
        let ip = Ipv4Addr::new(127, 0, 0, (i % sources) as u8 + 1);
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let tcp = sock.connect(target).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// How the WebSockets reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One TCP connection and one HTTP/1.1 upgrade per WebSocket.
    H1,
    /// RFC 8441: extended CONNECT streams, this many per h2c connection.
    H2 { streams_per_conn: usize },
    /// As `H1`, over TLS (`wss://`, SNI `localhost`, certificate not
    /// checked): what a `wss://` tunnel costs the proxy, idle or busy.
    Tls,
}

impl Transport {
    /// The command line's choice: `--tls`, else `--h2`, else HTTP/1.1.
    pub fn pick(tls: bool, h2: bool, streams_per_conn: usize) -> Transport {
        if tls {
            Transport::Tls
        } else if h2 {
            Transport::H2 {
                streams_per_conn: streams_per_conn.max(1),
            }
        } else {
            Transport::H1
        }
    }
}

/// The byte stream under one WebSocket: a TCP connection of its own, or a
/// stream of a shared h2 connection. An enum rather than a trait object,
/// so the HTTP/1.1 case costs a branch, not an indirect call.
pub enum Io {
    Tcp(TcpStream),
    H2(H2Io),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::H2(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::H2(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::H2(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::H2(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type Ws = WebSocketStream<Io>;

async fn ws_connect(
    target: SocketAddr,
    path: &str,
    i: usize,
    sources: usize,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<Ws> {
    let tcp = tcp_connect(target, i, sources).await?;
    let (io, scheme) = match tls {
        None => (Io::Tcp(tcp), "ws"),
        Some(c) => (
            Io::Tls(Box::new(c.connect(bench_server_name(), tcp).await?)),
            "wss",
        ),
    };
    let url = format!("{scheme}://{target}{path}");
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url.as_str(),
        io,
        Some(crate::backend::ws_config()),
    )
    .await?;
    Ok(ws)
}

/// The SNI every load tool sends: the harness gives every proxy a
/// certificate for `localhost`.
fn bench_server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::DnsName(
        rustls::pki_types::DnsName::try_from("localhost").expect("a valid DNS name"),
    )
}

/// A TLS client that does not check the server's certificate: the load
/// tools measure the proxy, not the client.
fn unchecked_tls(resumption: bool) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The h2c connections for `conns` WebSockets, `streams_per_conn` each.
/// Fails with [`NotOffered`] when the target does not take extended CONNECT.
async fn h2_connect_all(
    target: SocketAddr,
    conns: usize,
    streams_per_conn: usize,
    sources: usize,
) -> anyhow::Result<Vec<H2Conn>> {
    let n = conns.div_ceil(streams_per_conn).max(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = tcp_connect(target, i, sources).await?;
        let conn = tokio::time::timeout(Duration::from_secs(20), H2Conn::connect(tcp, target))
            .await
            .map_err(|_| anyhow::anyhow!("h2 connection setup timed out"))??;
        out.push(conn);
    }
    Ok(out)
}

/// Opens WebSocket number `i`, over its own connection or a stream of the
/// h2 connection it falls to.
async fn open_one(
    target: SocketAddr,
    path: &str,
    i: usize,
    sources: usize,
    h2: &[H2Conn],
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<Ws> {
    if h2.is_empty() {
        return ws_connect(target, path, i, sources, tls).await;
    }
    // Round-robin: every connection carries the same number of streams.
    let io = h2[i % h2.len()].open_stream(path).await?;
    Ok(WebSocketStream::from_raw_socket(
        Io::H2(io),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        Some(crate::backend::ws_config()),
    )
    .await)
}

/// One round trip: send `payload`, wait for the same bytes back.
async fn round_trip(ws: &mut Ws, payload: &Bytes) -> anyhow::Result<()> {
    ws.send(Message::Binary(payload.clone())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b == *payload => return Ok(()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => anyhow::bail!("unexpected message {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("connection closed"),
        }
    }
}

/// Opens `conns` WebSockets, `CONNECT_CONCURRENCY` at a time, each proven
/// with one round trip. Failed ones are counted, not fatal. Over h2, the
/// connections are opened first; `Err` only when they cannot be (then no
/// WebSocket could be), e.g. [`NotOffered`].
async fn open_all(
    target: SocketAddr,
    path: &str,
    conns: usize,
    sources: usize,
    transport: Transport,
    payload: &Bytes,
) -> anyhow::Result<(Vec<Ws>, usize)> {
    let h2 = match transport {
        Transport::H1 | Transport::Tls => Vec::new(),
        Transport::H2 { streams_per_conn } => {
            h2_connect_all(target, conns, streams_per_conn, sources).await?
        }
    };
    let h2 = Arc::new(h2);
    let tls = match transport {
        Transport::Tls => Some(unchecked_tls(true)?),
        _ => None,
    };
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let sem = sem.clone();
        let path = path.to_string();
        let payload = payload.clone();
        let (h2, tls) = (h2.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let mut ws = tokio::time::timeout(
                Duration::from_secs(20),
                open_one(target, &path, i, sources, &h2, tls.as_ref()),
            )
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
            tokio::time::timeout(Duration::from_secs(20), round_trip(&mut ws, &payload))
                .await
                .map_err(|_| anyhow::anyhow!("first round trip timed out"))??;
            anyhow::Ok(ws)
        }));
    }
    let mut open = Vec::with_capacity(conns);
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(ws)) => open.push(ws),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{failed} connection(s) failed; first error: {e}");
    }
    Ok((open, failed))
}

/// [`open_all`], or `None` after saying `unsupported …` when the target
/// does not offer what the transport needs.
async fn open_or_say_unsupported(
    target: SocketAddr,
    path: &str,
    conns: usize,
    sources: usize,
    transport: Transport,
    payload: &Bytes,
) -> anyhow::Result<Option<(Vec<Ws>, usize)>> {
    match open_all(target, path, conns, sources, transport, payload).await {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.downcast_ref::<NotOffered>().is_some() => {
            say(&format!("unsupported {e}"));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[derive(Serialize)]
struct WsLoadResult {
    connected: usize,
    failed_connects: usize,
    errors: u64,
    messages: usize,
    secs: f64,
    msgs_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    /// Round trips done by the least served, the median and the most
    /// served connection: how evenly the proxy shares itself out.
    conn_msgs_min: u64,
    conn_msgs_p50: u64,
    conn_msgs_max: u64,
}

#[derive(Debug, Clone)]
pub struct WsLoadArgs {
    pub addr: SocketAddr,
    pub path: String,
    pub conns: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub sources: usize,
    pub transport: Transport,
}

/// Every connection does round trips back to back (one message in flight
/// per connection) for the warm-up, then for the measured window.
pub async fn ws_load(a: WsLoadArgs) -> anyhow::Result<()> {
    let payload = Bytes::from(vec![b'm'; a.size]);
    let Some((open, failed)) =
        open_or_say_unsupported(a.addr, &a.path, a.conns, a.sources, a.transport, &payload).await?
    else {
        return Ok(());
    };
    say(&format!("connected {} {failed}", open.len()));
    let connected = open.len();
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(connected);
    for mut ws in open {
        let phase = phase.clone();
        let errors = errors.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u32> = Vec::with_capacity(4096);
            loop {
                let p = phase.load(Ordering::Relaxed);
                if p == STOP {
                    break;
                }
                let t0 = Instant::now();
                if round_trip(&mut ws, &payload).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return samples;
                }
                if p == MEASURE {
                    samples.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            samples
        }));
    }
    tokio::time::sleep(a.warmup).await;
    phase.store(MEASURE, Ordering::Relaxed);
    let start = Instant::now();
    say("measure-start");
    tokio::time::sleep(a.duration).await;
    phase.store(STOP, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    say("measure-end");
    let mut all = Vec::new();
    let mut per_conn = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            per_conn.push(s.len() as u32);
            all.extend(s);
        }
    }
    all.sort_unstable();
    per_conn.sort_unstable();
    let result = WsLoadResult {
        conn_msgs_min: per_conn.first().copied().map_or(0, u64::from),
        conn_msgs_p50: percentile(&per_conn, 0.50),
        conn_msgs_max: per_conn.last().copied().map_or(0, u64::from),
        connected,
        failed_connects: failed,
        errors: errors.load(Ordering::Relaxed),
        messages: all.len(),
        secs,
        msgs_per_sec: all.len() as f64 / secs,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    };
    say(&format!("result {}", serde_json::to_string(&result)?));
    Ok(())
}

/// Opens `conns` tunnels, proves each with one round trip, says `ready`, and
/// holds them, idle, until stdin closes.
pub async fn ws_idle(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    sources: usize,
    transport: Transport,
) -> anyhow::Result<()> {
    let payload = Bytes::from_static(b"hello");
    let Some((open, failed)) =
        open_or_say_unsupported(addr, path, conns, sources, transport, &payload).await?
    else {
        return Ok(());
    };
    say(&format!("ready {} {failed}", open.len()));
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while stdin.read(&mut buf).await.unwrap_or(0) > 0 {}
    // Closing the sockets (process exit) ends the tunnels with a FIN each.
    drop(open);
    Ok(())
}

#[derive(Serialize)]
struct TlsLoadResult {
    handshakes: usize,
    errors: u64,
    secs: f64,
    handshakes_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Clone)]
pub struct TlsLoadArgs {
    pub addr: SocketAddr,
    pub conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub sources: usize,
}

/// `conns` loops, each: TCP connect, a full TLS handshake (no resumption),
/// close_notify, close. The client does not check the server's certificate
/// or signature: its job is to cost as little as it can, and the server
/// still does all of its work.
pub async fn tls_load(a: TlsLoadArgs) -> anyhow::Result<()> {
    let connector = unchecked_tls(false)?;
    let name = bench_server_name();
    say(&format!("connected {} 0", a.conns));
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let errors = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(a.conns);
    for task_no in 0..a.conns {
        let (phase, errors, counter) = (phase.clone(), errors.clone(), counter.clone());
        let (connector, name) = (connector.clone(), name.clone());
        let (addr, sources) = (a.addr, a.sources);
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u32> = Vec::with_capacity(4096);
            loop {
                let p = phase.load(Ordering::Relaxed);
                if p == STOP {
                    break;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed) as usize + task_no;
                let t0 = Instant::now();
                let hs = async {
                    let tcp = tcp_connect(addr, i, sources).await?;
                    let mut tls = connector.connect(name.clone(), tcp).await?;
                    let elapsed = t0.elapsed();
                    let _ = tls.shutdown().await;
                    std::io::Result::Ok(elapsed)
                };
                match tokio::time::timeout(Duration::from_secs(10), hs).await {
                    Ok(Ok(elapsed)) if p == MEASURE => {
                        samples.push(elapsed.as_micros().min(u128::from(u32::MAX)) as u32)
                    }
                    Ok(Ok(_)) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            samples
        }));
    }
    tokio::time::sleep(a.warmup).await;
    phase.store(MEASURE, Ordering::Relaxed);
    let start = Instant::now();
    say("measure-start");
    tokio::time::sleep(a.duration).await;
    phase.store(STOP, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    say("measure-end");
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(s) = t.await {
            all.extend(s);
        }
    }
    all.sort_unstable();
    let result = TlsLoadResult {
        handshakes: all.len(),
        errors: errors.load(Ordering::Relaxed),
        secs,
        handshakes_per_sec: all.len() as f64 / secs,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    };
    say(&format!("result {}", serde_json::to_string(&result)?));
    Ok(())
}

fn percentile(sorted: &[u32], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    u64::from(sorted[idx])
}

/// Accepts any certificate and any signature (see [`tls_load`]).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
