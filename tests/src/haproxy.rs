//! HAProxy (the distribution's package, installed by
//! `scripts/setup-test-env.sh`) in front of Charon nodes, the way a load
//! balancer is deployed in front of a cluster: each server's health is
//! `GET /readyz` on the node's admin port, so that a draining node is taken
//! out of rotation before its listeners close.
//!
//! [`Haproxy::start`] writes the configuration to a temporary dir, checks
//! it with `haproxy -c`, runs `haproxy -f <cfg> -db` (foreground) as a child
//! process and waits until the frontend accepts. A stats listener serves
//! `/stats;csv`, from which [`Haproxy::server_states`] reads each server's
//! state (`UP`, `DOWN`, ...).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::process::{Child, Command};

use crate::client;
use crate::supervisor::fixed_addr;

/// One backend server: where requests go and where `/readyz` is asked.
#[derive(Clone, Debug)]
pub struct HaproxyServer {
    pub name: String,
    pub addr: SocketAddr,
    pub check_port: u16,
}

/// A running `haproxy -db`. Dropping it kills the process.
pub struct Haproxy {
    /// The frontend: send requests and WebSocket upgrades here.
    pub addr: SocketAddr,
    /// The stats listener (`/stats;csv`).
    pub stats: SocketAddr,
    pub config: String,
    child: Child,
    log_path: PathBuf,
    _work: tempfile::TempDir,
}

/// The HAProxy binary: `HAPROXY_BIN`, else `haproxy` on PATH, else the
/// Debian package's `/usr/sbin/haproxy` (not on a non-root PATH).
pub fn find_haproxy() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HAPROXY_BIN") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("haproxy"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// The configuration: HTTP mode, keep-alive on both sides, health checks
/// of `/readyz` every 200 ms (2 failures take a server out, 2 successes
/// put it back), and the retries that keep a request from being lost when
/// a server closes a connection at the wrong moment:
/// - `retry-on conn-failure empty-response response-timeout` with
///   `retries 3`: a request whose connection failed, or that got nothing
///   back (a reused idle connection the server closed as the request went
///   out), is sent again: GETs without a body are always fully buffered, so
///   HAProxy can resend them;
/// - `option redispatch 1`: every retry may go to another server;
/// - `http-reuse safe` (the default, spelled out): idle server connections
///   are shared, but a client's first request never goes on one, so a
///   request that cannot be retried never meets a closing connection;
/// - `timeout tunnel 1h`: upgraded WebSocket connections live on.
pub fn config(frontend: SocketAddr, stats: SocketAddr, servers: &[HaproxyServer]) -> String {
    let maxconn = maxconn();
    let mut cfg = format!(
        "\
global
    nbthread 1
    maxconn {maxconn}
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    # Only errors and retries are logged.
    option dontlog-normal
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    timeout tunnel 1h
    timeout client-fin 5s
    timeout server-fin 5s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    http-reuse safe

frontend fe
    bind {frontend}
    default_backend charon

backend charon
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr host localhost
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
"
    );
    for s in servers {
        cfg.push_str(&format!(
            "    server {} {} check port {}\n",
            s.name, s.addr, s.check_port
        ));
    }
    cfg.push_str(&format!(
        "
listen stats
    bind {stats}
    stats enable
    stats uri /stats
"
    ));
    cfg
}

/// HAProxy refuses to start when it cannot raise its file limit to about
/// two descriptors per connection: stay within the hard limit it inherits.
fn maxconn() -> u64 {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            let hard = line.split_whitespace().nth(4)?;
            Some(hard.parse::<u64>().unwrap_or(u64::MAX))
        })
        .unwrap_or(4096);
    (hard.saturating_sub(200) / 2).clamp(256, 10_000)
}

impl Haproxy {
    /// Writes the configuration, checks it and starts HAProxy on free
    /// 127.0.0.1 ports; returns once the frontend accepts.
    pub async fn start(bin: &Path, servers: &[HaproxyServer]) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("charon-haproxy-")
            .tempdir()?;
        let addr = fixed_addr(false)?;
        let stats = fixed_addr(false)?;
        let config = config(addr, stats, servers);
        let cfg_path = work.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, &config)?;
        let check = Command::new(bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} -c", bin.display()))?;
        ensure!(
            check.status.success(),
            "haproxy -c refused the configuration:\n{}{}\n{config}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log_path = work.path().join("haproxy.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut this = Self {
            addr,
            stats,
            config,
            child,
            log_path,
            _work: work,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = this.child.try_wait()? {
                bail!("haproxy exited with {status}:\n{}", this.log());
            }
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => return Ok(this),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!(
                        "HAProxy's frontend {addr} does not accept: {e}\n{}",
                        this.log()
                    )
                }
                // Poll interval of a bounded wait for the frontend.
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    /// The `/stats;csv` rows of the `charon` backend (its servers and the
    /// `BACKEND` total), each as (column name, value) pairs.
    pub async fn stats_rows(&self) -> Result<Vec<Vec<(String, String)>>> {
        let resp = client::get(self.stats, "localhost", "/stats;csv").await?;
        ensure!(resp.status == 200, "stats answered {}", resp.status);
        let text = resp.text();
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty stats")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        Ok(lines
            .filter(|l| l.starts_with("charon,"))
            .map(|l| {
                header
                    .iter()
                    .zip(l.split(','))
                    .map(|(h, v)| (h.to_string(), v.to_string()))
                    .collect()
            })
            .collect())
    }

    /// Every server's state as the stats page says: (name, status), e.g.
    /// `("n1", "UP")`, `("n2", "DOWN")`.
    pub async fn server_states(&self) -> Result<Vec<(String, String)>> {
        let field = |row: &[(String, String)], name: &str| {
            row.iter()
                .find(|(h, _)| h == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        Ok(self
            .stats_rows()
            .await?
            .iter()
            .filter(|row| field(row, "svname") != "BACKEND")
            .map(|row| (field(row, "svname"), field(row, "status")))
            .collect())
    }

    /// Counters of the backend as a whole: `wretr` (retries), `wredis`
    /// (redispatches), `econ` (connection errors), `eresp` (response
    /// errors), `hrsp_5xx`, ... (see HAProxy's management guide, 9.1).
    pub async fn backend_counter(&self, name: &str) -> Result<u64> {
        let rows = self.stats_rows().await?;
        let backend = rows
            .iter()
            .find(|row| row.iter().any(|(h, v)| h == "svname" && v == "BACKEND"))
            .context("no BACKEND row in the stats")?;
        let value = backend
            .iter()
            .find(|(h, _)| h == name)
            .with_context(|| format!("no {name} column in the stats"))?;
        Ok(value.1.parse().unwrap_or(0))
    }

    /// Waits until every server is `UP`.
    pub async fn wait_all_up(&self, timeout: Duration) -> Result<()> {
        crate::eventually(timeout, || async {
            let states = self.server_states().await?;
            ensure!(
                !states.is_empty() && states.iter().all(|(_, s)| s == "UP"),
                "server states {states:?}"
            );
            Ok(())
        })
        .await
    }

    /// What HAProxy logged (errors, retries, server state changes).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}
