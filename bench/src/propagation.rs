//! `charon-bench propagation`: how fast a config write reaches every node of
//! a real `charon-node` cluster, and how fast a killed node catches up.
//!
//! 1. Starts N nodes on 127.0.0.1 (node 1 founds the cluster, the others
//!    seed with its gossip address; one secret, one admin token) and waits
//!    until every node's `Cluster.Status` lists N live members.
//! 2. Propagation: one `CreateHost` at a time (on node 1, or round-robin);
//!    from the moment the API acknowledged it, every *other* node's HTTP
//!    listener is polled for the new domain until it stops answering the
//!    unknown-host 404. A write's latency is the time until the last other
//!    node serves it; per-node times are kept too.
//! 3. Catch-up: SIGKILL the last node, write on node 1, start the killed
//!    node again on the same data dir and ports, and time spawn → `/readyz`
//!    and spawn → its `ListHosts` count equals node 1's.
//!
//! While a write is awaited, each other node is probed from a thread of its
//! own over one keep-alive HTTP/1.1 connection, so that the poll period is
//! what `--poll-interval-us` says. Every wait is a poll bounded in time;
//! every child is killed when the harness exits (`kill_on_drop`).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use charon_proto::v1::cluster_client::ClusterClient;
use charon_proto::v1::hosts_client::HostsClient;
use charon_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, CreateHostRequest, ListHostsRequest, ProxyHost,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Spawn → `/readyz` 200 on a first start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// All nodes see each other as live.
const FORMATION_TIMEOUT: Duration = Duration::from_secs(90);
/// One write served by every other node.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The restarted node has everything.
const CATCHUP_TIMEOUT: Duration = Duration::from_secs(120);
/// One HTTP probe or gRPC call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for start-up and cluster formation.
const SLOW_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteTo {
    /// Every write goes to node 1.
    First,
    /// Write i goes to node (i mod N) + 1.
    RoundRobin,
}

#[derive(Debug, Clone)]
pub struct Args {
    pub bin_dir: PathBuf,
    pub workdir: PathBuf,
    pub nodes: usize,
    pub writes: usize,
    pub warmup_writes: usize,
    pub catchup_writes: usize,
    pub gossip_interval_ms: u64,
    pub write_to: WriteTo,
    pub poll_interval_us: u64,
    pub catchup_poll_ms: u64,
    pub out: Option<PathBuf>,
    pub command: String,
}

// ---------------------------------------------------------------------------
// Results

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentiles of `values` (ms); `None` when empty.
pub fn percentiles(values: &[f64]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = (p / 100.0 * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    };
    Some(Percentiles {
        count: v.len(),
        p50_ms: rank(50.0),
        p90_ms: rank(90.0),
        p99_ms: rank(99.0),
        max_ms: v[v.len() - 1],
    })
}

#[derive(Debug, Clone, Serialize)]
struct WriteSample {
    domain: String,
    /// Node (1-based) the write went to.
    writer: usize,
    /// `CreateHost` round trip.
    ack_ms: f64,
    /// Per node (index 0 = node 1): ms from the acknowledgement until the
    /// node served the domain; `None` for the writer and on timeout.
    per_node_ms: Vec<Option<f64>>,
    /// The last other node; `None` when one of them timed out.
    last_ms: Option<f64>,
    /// Lower bound of `last_ms`: the latest "last 404 probe sent" of the
    /// other nodes (so the true time lies in `lower_ms..=last_ms`).
    lower_ms: f64,
    /// Per node: when its last 404 probe was sent.
    per_node_lower_ms: Vec<Option<f64>>,
    write_origin: String,
    write_seq: String,
}

#[derive(Debug, Clone, Serialize)]
struct NodeStats {
    node: String,
    stats: Option<Percentiles>,
    timeouts: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Propagation {
    writes: usize,
    warmup_writes: usize,
    write_to: WriteTo,
    /// Writes some other node did not serve within the timeout.
    timeouts: usize,
    /// Time until the last other node served the write.
    last: Option<Percentiles>,
    /// The same, lower bounds (the last 404 probe's send time).
    lower: Option<Percentiles>,
    /// `CreateHost` round trips.
    ack: Option<Percentiles>,
    per_node: Vec<NodeStats>,
    samples: Vec<WriteSample>,
}

#[derive(Debug, Clone, Serialize)]
struct Catchup {
    node: String,
    writes: usize,
    /// How long the writes took on node 1 while the node was down.
    write_secs: f64,
    /// Node 1's ListHosts count, which the restarted node must reach.
    hosts: usize,
    /// The restarted node's count when it was killed.
    hosts_before: usize,
    readyz_ms: Option<f64>,
    caught_up_ms: Option<f64>,
    /// Spawn → node 1's Cluster.Status says converged with N live members.
    converged_ms: Option<f64>,
    /// `pulled records` lines of the restarted node's log (after restart).
    pulls: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    command: String,
    nodes: usize,
    gossip_interval_ms: u64,
    poll_interval_us: u64,
    catchup_poll_ms: u64,
    loadavg_start: String,
    loadavg_end: String,
    /// Spawn of the first node → every node sees N live members.
    formation_ms: f64,
    propagation: Propagation,
    catchup: Option<Catchup>,
    /// Warnings and errors the nodes logged (first ones, per node).
    log_warnings: Vec<String>,
}

// ---------------------------------------------------------------------------
// HTTP probe: one keep-alive connection, reconnected on error.

struct Probe {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl Probe {
    fn new(addr: SocketAddr) -> Probe {
        Probe { addr, sender: None }
    }

    /// `GET path` with `Host: host`; the status.
    async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<u16> {
        match tokio::time::timeout(CALL_TIMEOUT, self.try_get(host, path)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                bail!("GET {path} on {} timed out", self.addr)
            }
        }
    }

    async fn try_get(&mut self, host: &str, path: &str) -> anyhow::Result<u16> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// The propagation probe: blocking, on a thread of its own per node while
/// a write is awaited, so that the poll period is what it says (a tokio
/// timer rounds 1 ms up to the next millisecond tick, about 2 ms apart).
/// One keep-alive HTTP/1.1 connection, reconnected on error.
struct BlockingProbe {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

fn io_error(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

impl BlockingProbe {
    fn new(addr: SocketAddr) -> BlockingProbe {
        BlockingProbe { addr, conn: None }
    }

    /// `GET path` with `Host: host`; the status.
    fn get(&mut self, host: &str, path: &str) -> std::io::Result<u16> {
        let r = self.try_get(host, path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, host: &str, path: &str) -> std::io::Result<u16> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(CALL_TIMEOUT))?;
            s.set_write_timeout(Some(CALL_TIMEOUT))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        let read_line = |conn: &mut BufReader<TcpStream>, line: &mut String| {
            line.clear();
            match conn.read_line(line)? {
                0 => Err(io_error("connection closed")),
                _ => Ok(()),
            }
        };
        read_line(conn, &mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io_error("no status line"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            read_line(conn, &mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                match name.as_str() {
                    "content-length" => length = value.parse::<u64>().ok(),
                    "transfer-encoding" => chunked = value.contains("chunked"),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let skip = |conn: &mut BufReader<TcpStream>, n: u64| -> std::io::Result<()> {
            let got = std::io::copy(&mut conn.by_ref().take(n), &mut std::io::sink())?;
            if got == n {
                Ok(())
            } else {
                Err(io_error("body cut short"))
            }
        };
        if chunked {
            loop {
                read_line(conn, &mut line)?;
                let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| io_error("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        read_line(conn, &mut line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                skip(conn, size + 2)?;
            }
        } else if let Some(n) = length {
            skip(conn, n)?;
        } else {
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(status)
    }

    /// Probes for `domain` every `every` (start to start; 0: back to back)
    /// until it is served (anything but 404) or `limit` has passed since
    /// `since`. The node started serving the domain between two times
    /// after `since`: when the last 404 probe was sent (0 if none) and when
    /// the served answer arrived.
    fn wait_served(
        &mut self,
        domain: &str,
        since: Instant,
        limit: Duration,
        every: Duration,
    ) -> Served {
        let mut not_before = Duration::ZERO;
        loop {
            let start = Instant::now();
            match self.get(domain, "/") {
                Ok(404) => not_before = start.saturating_duration_since(since),
                Ok(_) => {
                    return Served {
                        at: Some(since.elapsed()),
                        not_before,
                    }
                }
                Err(_) => {}
            }
            if since.elapsed() >= limit {
                return Served {
                    at: None,
                    not_before,
                };
            }
            let next = start + every;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }
}

/// When a node started serving a write's domain, from the acknowledgement.
#[derive(Debug, Clone, Copy, Default)]
struct Served {
    /// The served answer arrived (`None`: timed out).
    at: Option<Duration>,
    /// The last 404 probe was sent (0: the first probe was served).
    not_before: Duration,
}

// ---------------------------------------------------------------------------
// gRPC

#[derive(Clone)]
pub(crate) struct Bearer(pub(crate) MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub(crate) type HostsApi = HostsClient<InterceptedService<Channel, Bearer>>;
type ClusterApi = ClusterClient<InterceptedService<Channel, Bearer>>;

pub(crate) async fn connect(
    api: SocketAddr,
    token: &Bearer,
) -> anyhow::Result<(HostsApi, ClusterApi)> {
    let channel = Endpoint::from_shared(format!("http://{api}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the gRPC API at {api}"))?;
    Ok((
        HostsClient::with_interceptor(channel.clone(), token.clone()),
        ClusterClient::with_interceptor(channel, token.clone()),
    ))
}

fn live_count(status: &ClusterStatusResponse) -> usize {
    status.members.iter().filter(|m| m.live).count()
}

pub(crate) fn host_request(domain: &str, upstream: &str) -> CreateHostRequest {
    CreateHostRequest {
        host: Some(ProxyHost {
            domains: vec![domain.to_string()],
            upstreams: vec![upstream.to_string()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Nodes

/// What every node shares.
pub(crate) struct Shared {
    pub(crate) bin: PathBuf,
    pub(crate) token: String,
    pub(crate) secret: String,
    pub(crate) gossip_interval_ms: u64,
    /// Node 1's gossip address: everyone else's seed.
    pub(crate) seed: SocketAddr,
}

/// The listeners a node reported in `listen.json`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listen {
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    pub(crate) api: SocketAddr,
    pub(crate) admin: SocketAddr,
}

pub(crate) struct Node {
    /// 1-based.
    index: usize,
    name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_path: PathBuf,
    gossip: SocketAddr,
    listen: Option<Listen>,
    pub(crate) child: Option<Child>,
    /// Log length before the current start (for reading only this start).
    log_offset: u64,
}

/// A UDP port free right now on 127.0.0.1 (the gossip listener takes its
/// port from the command line, so that a restart keeps it).
pub(crate) fn free_udp() -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("probing for a free UDP port")?;
    Ok(s.local_addr()?)
}

impl Node {
    pub(crate) fn new(index: usize, workdir: &Path) -> anyhow::Result<Node> {
        let dir = workdir.join(format!("node-{index}"));
        // A fresh store on every run.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data"))?;
        Ok(Node {
            index,
            name: format!("node-{index}"),
            data_dir: dir.join("data"),
            log_path: dir.join("node.log"),
            gossip: free_udp()?,
            listen: None,
            child: None,
            log_offset: 0,
        })
    }

    pub(crate) fn listen(&self) -> Listen {
        self.listen.expect("the node has started")
    }

    /// Spawns the process. The first start lets the node pick its TCP
    /// ports; a restart passes the same ones again.
    pub(crate) fn spawn(&mut self, shared: &Shared) -> anyhow::Result<()> {
        // A listen.json from the previous start would be read as this one's.
        match fs::remove_file(self.data_dir.join("listen.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("removing a stale listen.json")
            }
            _ => {}
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        self.log_offset = log.metadata()?.len();
        let mut cmd = Command::new(&shared.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHARON_") {
                cmd.env_remove(key);
            }
        }
        let port = |a: Option<SocketAddr>| {
            a.map(|a| a.to_string())
                .unwrap_or_else(|| "127.0.0.1:0".into())
        };
        let l = self.listen;
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--node-name", &self.name])
            .args(["--region", "bench"])
            .args(["--gossip-listen", &self.gossip.to_string()])
            .args([
                "--gossip-interval-ms",
                &shared.gossip_interval_ms.to_string(),
            ])
            .args(["--http-listen", &port(l.map(|l| l.http))])
            .args(["--https-listen", &port(l.map(|l| l.https))])
            .args(["--api-listen", &port(l.map(|l| l.api))])
            .args(["--admin-listen", &port(l.map(|l| l.admin))])
            .env("CHARON_ADMIN_TOKEN", &shared.token)
            .env("CHARON_CLUSTER_SECRET", &shared.secret)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if self.index != 1 {
            cmd.args(["--seeds", &shared.seed.to_string()]);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start {}", shared.bin.display()))?,
        );
        Ok(())
    }

    /// Fails when the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// This start's log lines.
    fn log_since_start(&self) -> String {
        let log = fs::read(&self.log_path).unwrap_or_default();
        let from = (self.log_offset as usize).min(log.len());
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// Reads `listen.json` once the node wrote it.
    fn read_listen(&self) -> Option<Listen> {
        let text = fs::read_to_string(self.data_dir.join("listen.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let addr = |k: &str| v[k].as_str()?.parse::<SocketAddr>().ok();
        Some(Listen {
            http: addr("http")?,
            https: addr("https")?,
            api: addr("api")?,
            admin: addr("admin")?,
        })
    }

    /// Waits for `listen.json` and `/readyz` 200.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let listen = loop {
            self.check_alive()?;
            if let Some(l) = self.read_listen() {
                break l;
            }
            if Instant::now() >= deadline {
                bail!("{}: no listen.json within {timeout:?}", self.name);
            }
            tokio::time::sleep(SLOW_POLL).await;
        };
        self.listen = Some(listen);
        let mut probe = Probe::new(listen.admin);
        loop {
            self.check_alive()?;
            if probe.get("localhost", "/readyz").await.ok() == Some(200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{}: /readyz not 200 within {timeout:?}", self.name);
            }
            tokio::time::sleep(SLOW_POLL).await;
        }
    }

    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// WARN and ERROR lines of the whole log (all starts).
    fn warnings(&self) -> Vec<String> {
        fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| format!("{}: {l}", self.name))
            .collect()
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Milliseconds, to the microsecond.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A token nobody else has: time and pid, as hex.
pub(crate) fn token(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}-{:x}", std::process::id())
}

// ---------------------------------------------------------------------------
// The run

pub fn run(a: Args) -> anyhow::Result<bool> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The backend on its own thread, so that it never waits for the poller.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let backend = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("backend listener");
                let _ = crate::backend::serve_on(listener).await;
            });
        })?;
    rt.block_on(run_async(a, backend))
}

async fn run_async(a: Args, backend: SocketAddr) -> anyhow::Result<bool> {
    fs::create_dir_all(&a.workdir)?;
    let bin = a.bin_dir.join("charon-node");
    if !bin.is_file() {
        bail!("{} not found (see --bin-dir)", bin.display());
    }
    let loadavg_start = loadavg();
    let mut nodes = (1..=a.nodes)
        .map(|i| Node::new(i, &a.workdir))
        .collect::<anyhow::Result<Vec<Node>>>()?;
    let shared = Shared {
        bin,
        token: token("bench-admin"),
        secret: token("bench-cluster-secret"),
        gossip_interval_ms: a.gossip_interval_ms,
        seed: nodes[0].gossip,
    };
    let bearer = Bearer(format!("Bearer {}", shared.token).parse()?);
    let upstream = format!("http://{backend}");

    // 1. The cluster.
    eprintln!(
        "propagation: starting {} nodes in {}",
        a.nodes,
        a.workdir.display()
    );
    let started = Instant::now();
    for n in nodes.iter_mut() {
        n.spawn(&shared)?;
    }
    for n in nodes.iter_mut() {
        n.wait_ready(START_TIMEOUT).await?;
    }
    let mut hosts = Vec::new();
    let mut clusters = Vec::new();
    for n in &nodes {
        let (h, c) = connect(n.listen().api, &bearer).await?;
        hosts.push(h);
        clusters.push(c);
    }
    wait_formed(&mut nodes, &mut clusters, started + FORMATION_TIMEOUT).await?;
    let formation_ms = ms(started.elapsed());
    eprintln!(
        "propagation: {} nodes live everywhere after {:.0} ms",
        a.nodes, formation_ms
    );

    // 2. Propagation.
    let propagation = measure(&a, &mut nodes, &mut hosts, &upstream).await?;

    // 3. Catch-up.
    let catchup = if a.catchup_writes > 0 {
        Some(
            catchup(
                &a,
                &shared,
                &mut nodes,
                &mut hosts,
                &mut clusters[0],
                &upstream,
                &bearer,
            )
            .await?,
        )
    } else {
        None
    };

    let mut log_warnings = Vec::new();
    for n in &nodes {
        log_warnings.extend(n.warnings());
    }
    // SIGKILL: the figures are in, and a graceful drain would wait for
    // this harness's own connections.
    drop((hosts, clusters));
    for n in nodes.iter_mut() {
        n.kill().await?;
    }
    let report = Report {
        command: a.command.clone(),
        nodes: a.nodes,
        gossip_interval_ms: a.gossip_interval_ms,
        poll_interval_us: a.poll_interval_us,
        catchup_poll_ms: a.catchup_poll_ms,
        loadavg_start,
        loadavg_end: loadavg(),
        formation_ms,
        propagation,
        catchup,
        log_warnings,
    };
    let json = serde_json::to_string_pretty(&report)?;
    let md = markdown(&report);
    println!("{json}");
    println!();
    print!("{md}");
    if let Some(out) = &a.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        fs::write(out.with_extension("json"), format!("{json}\n"))?;
        eprintln!("propagation: wrote {}", out.display());
    }
    let ok = report.propagation.timeouts == 0
        && report
            .catchup
            .as_ref()
            .is_none_or(|c| c.readyz_ms.is_some() && c.caught_up_ms.is_some());
    Ok(ok)
}

/// Waits until every node's `Cluster.Status` lists all nodes as live.
async fn wait_formed(
    nodes: &mut [Node],
    clusters: &mut [ClusterApi],
    deadline: Instant,
) -> anyhow::Result<()> {
    let want = nodes.len();
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for c in clusters.iter_mut() {
            let live = match c.status(ClusterStatusRequest {}).await {
                Ok(r) => live_count(r.get_ref()),
                Err(_) => 0,
            };
            seen.push(live);
            all &= live == want;
        }
        if all {
            return Ok(());
        }
        for n in nodes.iter_mut() {
            n.check_alive()?;
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster did not form within {FORMATION_TIMEOUT:?}: live members seen per node: {seen:?}"
            );
        }
        tokio::time::sleep(SLOW_POLL).await;
    }
}

/// One write at a time; after each, every other node is probed until it
/// serves the write's domain.
async fn measure(
    a: &Args,
    nodes: &mut [Node],
    hosts: &mut [HostsApi],
    upstream: &str,
) -> anyhow::Result<Propagation> {
    let mut probes: Vec<BlockingProbe> = nodes
        .iter()
        .map(|n| BlockingProbe::new(n.listen().http))
        .collect();
    let every = Duration::from_micros(a.poll_interval_us);
    let mut samples = Vec::new();
    for w in 0..a.warmup_writes + a.writes {
        let writer = match a.write_to {
            WriteTo::First => 0,
            WriteTo::RoundRobin => w % a.nodes,
        };
        let domain = format!("w{w}.propagation.bench");
        let sent = Instant::now();
        let reply = hosts[writer]
            .create_host(host_request(&domain, upstream))
            .await
            .with_context(|| format!("CreateHost {domain} on node-{}", writer + 1))?;
        let acked = Instant::now();
        let meta = |k: &str| {
            reply
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (write_origin, write_seq) = (meta("charon-write-origin"), meta("charon-write-seq"));
        // One thread per other node, each on its own connection.
        let served: Vec<Option<Served>> = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let threads: Vec<_> = probes
                    .iter_mut()
                    .enumerate()
                    .map(|(i, p)| {
                        let domain = &domain;
                        (i != writer).then(|| {
                            scope.spawn(move || p.wait_served(domain, acked, SERVE_TIMEOUT, every))
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.map(|t| t.join().unwrap_or_default()))
                    .collect()
            })
        });
        let per_node: Vec<Option<f64>> = served
            .iter()
            .map(|s| s.and_then(|s| s.at).map(ms))
            .collect();
        let per_node_lower: Vec<Option<f64>> =
            served.iter().map(|s| s.map(|s| ms(s.not_before))).collect();
        let lower_ms = per_node_lower.iter().flatten().fold(0f64, |a, &b| a.max(b));
        let others: Vec<Option<f64>> = (0..a.nodes)
            .filter(|&i| i != writer)
            .map(|i| per_node[i])
            .collect();
        let last_ms = others.iter().try_fold(0f64, |acc, v| v.map(|v| acc.max(v)));
        for n in nodes.iter_mut() {
            n.check_alive()?;
        }
        if w < a.warmup_writes {
            continue;
        }
        if last_ms.is_none() {
            eprintln!(
                "propagation: {domain} not served everywhere within {SERVE_TIMEOUT:?}: {per_node:?}"
            );
        }
        samples.push(WriteSample {
            domain,
            writer: writer + 1,
            ack_ms: ms(acked - sent),
            per_node_ms: per_node,
            last_ms,
            lower_ms,
            per_node_lower_ms: per_node_lower,
            write_origin,
            write_seq,
        });
        let done = samples.len();
        if done % 25 == 0 || done == a.writes {
            eprintln!("propagation: {done}/{} writes measured", a.writes);
        }
    }
    let lasts: Vec<f64> = samples.iter().filter_map(|s| s.last_ms).collect();
    let lowers: Vec<f64> = samples
        .iter()
        .filter(|s| s.last_ms.is_some())
        .map(|s| s.lower_ms)
        .collect();
    let acks: Vec<f64> = samples.iter().map(|s| s.ack_ms).collect();
    let per_node = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mine: Vec<&WriteSample> = samples.iter().filter(|s| s.writer != i + 1).collect();
            let v: Vec<f64> = mine.iter().filter_map(|s| s.per_node_ms[i]).collect();
            NodeStats {
                node: n.name.clone(),
                timeouts: mine.len() - v.len(),
                stats: percentiles(&v),
            }
        })
        .collect();
    Ok(Propagation {
        writes: a.writes,
        warmup_writes: a.warmup_writes,
        write_to: a.write_to,
        timeouts: samples.len() - lasts.len(),
        last: percentiles(&lasts),
        lower: percentiles(&lowers),
        ack: percentiles(&acks),
        per_node,
        samples,
    })
}

async fn list_count(api: &mut HostsApi) -> anyhow::Result<usize> {
    Ok(api
        .list_hosts(ListHostsRequest {})
        .await
        .context("ListHosts")?
        .into_inner()
        .hosts
        .len())
}

async fn catchup(
    a: &Args,
    shared: &Shared,
    nodes: &mut [Node],
    hosts: &mut [HostsApi],
    first_cluster: &mut ClusterApi,
    upstream: &str,
    bearer: &Bearer,
) -> anyhow::Result<Catchup> {
    let victim = nodes.len() - 1;
    let hosts_before = list_count(&mut hosts[victim]).await?;
    eprintln!(
        "propagation: SIGKILL {} ({hosts_before} hosts), {} writes on node-1",
        nodes[victim].name, a.catchup_writes
    );
    nodes[victim].kill().await?;
    let t = Instant::now();
    for i in 0..a.catchup_writes {
        let domain = format!("c{i}.catchup.bench");
        hosts[0]
            .create_host(host_request(&domain, upstream))
            .await
            .with_context(|| format!("CreateHost {domain} on node-1"))?;
    }
    let write_secs = t.elapsed().as_secs_f64();
    let expected = list_count(&mut hosts[0]).await?;
    eprintln!(
        "propagation: {} writes took {write_secs:.1} s; node-1 lists {expected} hosts; restarting {}",
        a.catchup_writes, nodes[victim].name
    );

    let node = &mut nodes[victim];
    let listen = node.listen();
    let spawned = Instant::now();
    node.spawn(shared)?;
    let deadline = spawned + CATCHUP_TIMEOUT;
    let every = Duration::from_millis(a.catchup_poll_ms.max(1));
    let mut admin = Probe::new(listen.admin);
    let mut api: Option<HostsApi> = None;
    let (mut readyz, mut caught_up, mut converged) = (None, None, None);
    while readyz.is_none() || caught_up.is_none() || converged.is_none() {
        node.check_alive()?;
        if Instant::now() >= deadline {
            eprintln!(
                "propagation: {} not caught up within {CATCHUP_TIMEOUT:?}",
                node.name
            );
            break;
        }
        let (r, c, v) = tokio::join!(
            async {
                if readyz.is_none() && admin.get("localhost", "/readyz").await.ok() == Some(200) {
                    return Some(spawned.elapsed());
                }
                None
            },
            async {
                if caught_up.is_some() {
                    return None;
                }
                if api.is_none() {
                    api = connect(listen.api, bearer).await.ok().map(|(h, _)| h);
                }
                let h = api.as_mut()?;
                match list_count(h).await {
                    Ok(n) if n == expected => Some(spawned.elapsed()),
                    Ok(_) => None,
                    Err(_) => {
                        api = None;
                        None
                    }
                }
            },
            async {
                if converged.is_some() {
                    return None;
                }
                let s = first_cluster
                    .status(ClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                (s.converged && live_count(&s) == a.nodes).then(|| spawned.elapsed())
            },
        );
        readyz = readyz.or(r);
        caught_up = caught_up.or(c);
        converged = converged.or(v);
        tokio::time::sleep(every).await;
    }
    let pulls = node
        .log_since_start()
        .lines()
        .filter(|l| l.contains("pulled records") || l.contains("pull failed"))
        .map(strip_ansi)
        .collect();
    Ok(Catchup {
        node: node.name.clone(),
        writes: a.catchup_writes,
        write_secs,
        hosts: expected,
        hosts_before,
        readyz_ms: readyz.map(ms),
        caught_up_ms: caught_up.map(ms),
        converged_ms: converged.map(ms),
        pulls,
    })
}

// ---------------------------------------------------------------------------
// Markdown

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms"))
        .unwrap_or_else(|| "n/a".into())
}

fn row(out: &mut String, label: &str, p: &Option<Percentiles>, extra: &str) {
    let cell = |f: fn(&Percentiles) -> f64| fmt_ms(p.as_ref().map(f));
    let _ = writeln!(
        out,
        "| {label} | {} | {} | {} | {} | {} |{extra}",
        cell(|p| p.p50_ms),
        cell(|p| p.p90_ms),
        cell(|p| p.p99_ms),
        cell(|p| p.max_ms),
        p.as_ref().map(|p| p.count).unwrap_or(0),
    );
}

fn markdown(r: &Report) -> String {
    let p = &r.propagation;
    let mut out = String::new();
    let _ = writeln!(out, "### {} nodes\n", r.nodes);
    let _ = writeln!(out, "`{}`\n", r.command);
    let writer = match p.write_to {
        WriteTo::First => "node-1".to_string(),
        WriteTo::RoundRobin => "each node in turn".to_string(),
    };
    let poll = match r.poll_interval_us {
        0 => "back to back".to_string(),
        us if us % 1000 == 0 => format!("every {} ms", us / 1000),
        us => format!("every {us} µs"),
    };
    let _ = writeln!(
        out,
        "Gossip interval {} ms; {} `CreateHost` writes to {writer}, one at a time ({} warm-up writes \
         not counted); every other node's HTTP listener polled {poll} (one thread per node, one \
         keep-alive connection each) from the API's acknowledgement until the new domain is no \
         longer a 404. A node started serving between its last 404 probe and its first served \
         answer: the lower-bound row, and the poll period, tell how coarse the figures are. Cluster \
         formed (N live members everywhere) {:.0} ms after the first spawn. Load average {} at the \
         start, {} at the end.\n",
        r.gossip_interval_ms, p.writes, p.warmup_writes, r.formation_ms, r.loadavg_start, r.loadavg_end
    );
    let _ = writeln!(
        out,
        "| ack → served | p50 | p90 | p99 | max | writes |\n|---|---|---|---|---|---|"
    );
    row(&mut out, "**last other node**", &p.last, "");
    row(
        &mut out,
        "(same, lower bound: its last 404 probe sent)",
        &p.lower,
        "",
    );
    for n in &p.per_node {
        let extra = if n.timeouts > 0 {
            format!(" {} timed out", n.timeouts)
        } else {
            String::new()
        };
        if n.stats.is_some() || n.timeouts > 0 {
            row(&mut out, &n.node, &n.stats, &extra);
        }
    }
    row(&mut out, "(`CreateHost` round trip)", &p.ack, "");
    if p.timeouts > 0 {
        let _ = writeln!(
            out,
            "\n{} of {} writes were not served by every other node within {} s.",
            p.timeouts,
            p.writes,
            SERVE_TIMEOUT.as_secs()
        );
    }
    out.push('\n');
    if let Some(c) = &r.catchup {
        let _ = writeln!(
            out,
            "Catch-up: {} SIGKILLed with {} hosts; {} writes on node-1 while it was down ({:.1} s, \
             {:.0} writes/s); then started again on the same data dir and ports (polled every {} ms).\n",
            c.node,
            c.hosts_before,
            c.writes,
            c.write_secs,
            c.writes as f64 / c.write_secs.max(1e-9),
            r.catchup_poll_ms
        );
        let _ = writeln!(out, "| catch-up, from spawn | time |\n|---|---|");
        let _ = writeln!(out, "| `/readyz` 200 | {} |", fmt_ms(c.readyz_ms));
        let _ = writeln!(
            out,
            "| `ListHosts` count = node-1's ({}) | {} |",
            c.hosts,
            fmt_ms(c.caught_up_ms)
        );
        let _ = writeln!(
            out,
            "| node-1's `Cluster.Status`: converged, {} live | {} |",
            r.nodes,
            fmt_ms(c.converged_ms)
        );
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v).unwrap();
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        let p = percentiles(&[3.0]).unwrap();
        assert_eq!((p.p50_ms, p.p99_ms), (3.0, 3.0));
        assert!(percentiles(&[]).is_none());
    }

    #[test]
    fn ansi_stripped() {
        assert_eq!(strip_ansi("\u{1b}[2mx\u{1b}[0m WARN y"), "x WARN y");
    }
}
