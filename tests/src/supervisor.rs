//! A `charon-node` run the way production runs it: under a supervisor that
//! starts it again whenever it exits 0, on fixed addresses, so that a
//! restarted node comes back where load balancers and peers expect it.
//!
//! The supervisor is a small bash loop ([`SUPERVISOR`]): it writes the
//! node's pid to `<run-dir>/<name>.pid`, waits for the node, and starts it
//! again with the same arguments when it exited 0, until `<work>/stop`
//! exists; any other exit status ends the supervisor with that status. So
//! `kill -TERM $(cat <run-dir>/<name>.pid)` is a restart, like `systemctl
//! restart` on a real host.
//!
//! The addresses are picked once, before the first start, among ports that
//! are free and outside the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`): while the node is down, an
//! outgoing connection of some other process cannot take its port as a
//! source port and make the restart fail to bind.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use charon_proto::v1::hosts_client::HostsClient;
use charon_proto::v1::{CreateHostRequest, ListHostsRequest, ProxyHost};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::client;
use crate::node::{binary, READY_TIMEOUT};

/// The supervisor: `supervise.sh STOP_FILE PID_FILE LOG NODE-BINARY ARGS...`.
pub const SUPERVISOR: &str = r#"#!/usr/bin/env bash
# Supervisor of one charon-node (tests/src/supervisor.rs): starts it again
# each time it exits 0, until the stop file exists; any other exit status
# ends the supervisor with that status. The node's pid goes to the pid file.
set -u
stop=$1 pidfile=$2 log=$3
shift 3
while [[ ! -e $stop ]]; do
    "$@" </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile.tmp"
    mv -f "$pidfile.tmp" "$pidfile"
    echo "supervisor: started charon-node (pid $pid)" >>"$log"
    status=0
    wait "$pid" || status=$?
    echo "supervisor: charon-node (pid $pid) exited with status $status" >>"$log"
    if ((status != 0)); then exit "$status"; fi
done
echo "supervisor: the stop file exists; not starting charon-node again" >>"$log"
"#;

static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static SEED: AtomicU64 = AtomicU64::new(0);

/// The port range to pick fixed ports from: below the ephemeral range when
/// there is room, else above it.
fn fixed_range() -> (u16, u16) {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if lo >= 12_000 {
        (10_000, (lo - 1).min(u32::from(u16::MAX)) as u16)
    } else if hi <= 63_000 {
        ((hi + 1) as u16, u16::MAX)
    } else {
        // The whole range is ephemeral: nothing better than any free port.
        (10_000, u16::MAX)
    }
}

fn next_random() -> u64 {
    // xorshift64*, seeded from the clock and the pid once.
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        x = t ^ (u64::from(std::process::id()) << 32) | 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    SEED.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A 127.0.0.1 port, outside the ephemeral range, that is free right now
/// for TCP (and for UDP too when `udp`), and not handed out before by this
/// process.
pub fn fixed_port(udp: bool) -> Result<u16> {
    let (lo, hi) = fixed_range();
    let mut taken = TAKEN.lock().expect("port lock");
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = lo + (next_random() % u64::from(hi - lo)) as u16;
        if taken.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp_free = std::net::TcpListener::bind(addr).is_ok();
        let udp_free = !udp || std::net::UdpSocket::bind(addr).is_ok();
        if tcp_free && udp_free {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found in {lo}..{hi} on 127.0.0.1")
}

/// A fixed `127.0.0.1` address (see [`fixed_port`]).
pub fn fixed_addr(udp: bool) -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], fixed_port(udp)?)))
}

/// The addresses of a supervised node, fixed for its whole life.
#[derive(Clone, Copy, Debug)]
pub struct NodeAddrs {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub gossip: SocketAddr,
}

impl NodeAddrs {
    pub fn pick() -> Result<Self> {
        Ok(Self {
            http: fixed_addr(false)?,
            https: fixed_addr(false)?,
            api: fixed_addr(false)?,
            admin: fixed_addr(false)?,
            gossip: fixed_addr(true)?,
        })
    }
}

/// A `charon-node` under the bash supervisor. Dropping it stops the
/// supervisor and kills the node.
pub struct SupervisedNode {
    pub name: String,
    pub addrs: NodeAddrs,
    /// The admin token (`CHARON_ADMIN_TOKEN`).
    pub token: String,
    /// `<run-dir>/<name>.pid`: the pid of the node now running.
    pub pidfile: PathBuf,
    pub data_dir: PathBuf,
    stop_file: PathBuf,
    log_path: PathBuf,
    supervisor: Option<Child>,
    _work: tempfile::TempDir,
}

impl SupervisedNode {
    /// Starts the supervisor of node `name` on `addrs`, its pid file in
    /// `run_dir`, with `args` after the address flags and `env` on top of an
    /// environment cleared of `CHARON_*`; waits until `/readyz` says 200.
    pub async fn start(
        name: &str,
        addrs: NodeAddrs,
        run_dir: &Path,
        token: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let node_bin = binary("charon-node")?;
        let work = tempfile::Builder::new()
            .prefix(&format!("charon-supervised-{name}-"))
            .tempdir()?;
        let data_dir = work.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let script = work.path().join("supervise.sh");
        std::fs::write(&script, SUPERVISOR)?;
        let node = Self {
            name: name.to_owned(),
            addrs,
            token: token.to_owned(),
            pidfile: run_dir.join(format!("{name}.pid")),
            data_dir: data_dir.clone(),
            stop_file: work.path().join("stop"),
            log_path: work.path().join("node.log"),
            supervisor: None,
            _work: work,
        };
        let mut cmd = Command::new("bash");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHARON_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg(&script)
            .arg(&node.stop_file)
            .arg(&node.pidfile)
            .arg(&node.log_path)
            .arg(&node_bin)
            .arg("--node-name")
            .arg(name)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--http-listen")
            .arg(addrs.http.to_string())
            .arg("--https-listen")
            .arg(addrs.https.to_string())
            .arg("--api-listen")
            .arg(addrs.api.to_string())
            .arg("--admin-listen")
            .arg(addrs.admin.to_string())
            .arg("--gossip-listen")
            .arg(addrs.gossip.to_string())
            .args(args)
            .env("CHARON_ADMIN_TOKEN", token)
            // Plain text logs: they go to a file.
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut node = node;
        node.supervisor = Some(cmd.spawn().context("spawning the supervisor")?);
        node.wait_ready(READY_TIMEOUT).await?;
        Ok(node)
    }

    /// Waits until the admin listener answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .supervisor
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the supervisor of {} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail(4000)
                );
            }
            let last = match client::get(self.addrs.admin, "localhost", "/readyz").await {
                Ok(resp) if resp.status == 200 => return Ok(()),
                Ok(resp) => format!("/readyz says {}", resp.status),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {timeout:?} ({last}); log:\n{}",
                    self.name,
                    self.log_tail(4000)
                );
            }
            // Poll interval of a bounded wait for readiness.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pid of the node now running (from the pid file).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// How many times the supervisor started the node.
    pub fn starts(&self) -> usize {
        self.log()
            .matches("supervisor: started charon-node")
            .count()
    }

    /// Everything the node (all its runs) and the supervisor wrote.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `max` bytes of [`log`](Self::log).
    pub fn log_tail(&self, max: usize) -> String {
        let log = self.log();
        let mut start = log.len().saturating_sub(max);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_owned()
    }

    /// `http://<api>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addrs.api)
    }

    /// A Hosts client that sends the admin token.
    pub async fn hosts_client(
        &self,
    ) -> Result<
        HostsClient<
            tonic::service::interceptor::InterceptedService<
                Channel,
                impl tonic::service::Interceptor + use<>,
            >,
        >,
    > {
        let channel = Endpoint::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to the API of {}", self.name))?;
        let value: MetadataValue<Ascii> = format!("Bearer {}", self.token)
            .parse()
            .context("token is not valid metadata")?;
        Ok(HostsClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", value.clone());
                Ok(req)
            },
        ))
    }

    /// Creates a host through this node's API.
    pub async fn create_host(&self, req: CreateHostRequest) -> Result<ProxyHost> {
        Ok(self
            .hosts_client()
            .await?
            .create_host(req)
            .await
            .with_context(|| format!("CreateHost on {}", self.name))?
            .into_inner())
    }

    /// The ids of the hosts this node lists, sorted.
    pub async fn host_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .hosts_client()
            .await?
            .list_hosts(ListHostsRequest {})
            .await
            .with_context(|| format!("ListHosts on {}", self.name))?
            .into_inner()
            .hosts
            .into_iter()
            .map(|h| h.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Stops for good: the stop file, then SIGKILL to the node and the
    /// supervisor.
    pub fn kill(&mut self) {
        let _ = std::fs::write(&self.stop_file, b"");
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(child) = self.supervisor.as_mut() {
            let _ = child.start_kill();
        }
    }
}

impl Drop for SupervisedNode {
    fn drop(&mut self) {
        self.kill();
    }
}
