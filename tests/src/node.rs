//! A real `charon-node` process on a temporary data dir, with all listeners
//! on `127.0.0.1:0`.
//!
//! Start-up is awaited by condition, never by a fixed sleep: the node writes
//! `<data-dir>/listen.json` once its listeners are bound, and answers
//! `GET /readyz` with 200 on its admin listener once its route table is built.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use charon_proto::v1::certificates_client::CertificatesClient;
use charon_proto::v1::cluster_client::ClusterClient;
use charon_proto::v1::hosts_client::HostsClient;
use charon_proto::v1::{AddCertificateRequest, Certificate, CreateHostRequest, ProxyHost};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::client;

/// How long a node may take from spawn to `/readyz` 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `target/<profile>/` of the running test binary
/// (`target/debug/deps/<test>-<hash>` → `target/debug`).
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("test binary {} has no parent", exe.display()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary (`charon-node`, `charonctl`) next to the test
/// binary; `CHARON_NODE_BIN` / `CHARONCTL_BIN` override it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = match name {
        "charon-node" => Some("CHARON_NODE_BIN"),
        "charonctl" => Some("CHARONCTL_BIN"),
        _ => None,
    };
    if let Some(path) = var.and_then(std::env::var_os) {
        return Ok(PathBuf::from(path));
    }
    let path = target_dir()?.join(name);
    ensure!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    // `cargo test -p charon-tests` does not rebuild other crates' binaries:
    // refuse to test an old build rather than report its results as current.
    let sources: &[&str] = match name {
        "charon-node" => &["node/src", "proto/proto", "proto/src"],
        "charonctl" => &["ctl/src", "proto/proto", "proto/src"],
        _ => &[],
    };
    let built = std::fs::metadata(&path)?.modified()?;
    for dir in sources {
        if let Some((newer, _)) =
            newest_file(&crate::repo_root().join(dir)).filter(|(_, modified)| *modified > built)
        {
            bail!(
                "{} is older than {}: rebuild with `cargo build --workspace --bins`",
                path.display(),
                newer.display()
            );
        }
    }
    Ok(path)
}

/// The most recently modified file under `dir`, if any.
fn newest_file(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if let Ok(modified) = meta.modified() {
                if newest.as_ref().is_none_or(|(_, m)| modified > *m) {
                    newest = Some((entry.path(), modified));
                }
            }
        }
    }
    newest
}

/// Builds a [`TestNode`]. Every node gets its own temporary directory
/// holding the data dir (unless one is given) and the node's log.
#[derive(Clone, Debug, Default)]
pub struct TestNodeBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    /// Picked once, on the first start, and kept across restarts so that
    /// peers seeded with this node's gossip address find it again.
    gossip: Option<SocketAddr>,
}

/// A UDP port free right now on 127.0.0.1 (chitchat binds by address, so
/// the node cannot be given port 0 and report back like the TCP listeners).
fn free_udp_addr() -> Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("probing for a free UDP port")?;
    Ok(s.local_addr()?)
}

impl TestNodeBuilder {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Use this data dir instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// `--trusted-proxy CIDR`.
    pub fn trusted_proxy(self, cidr: &str) -> Self {
        self.arg("--trusted-proxy").arg(cidr)
    }

    /// `--node-name NAME`.
    pub fn name(self, name: &str) -> Self {
        self.arg("--node-name").arg(name)
    }

    /// `--seeds` with the gossip addresses of running nodes.
    pub fn seeds(self, nodes: &[&TestNode]) -> Self {
        let list: Vec<String> = nodes.iter().map(|n| n.gossip.to_string()).collect();
        self.arg("--seeds").arg(list.join(","))
    }

    /// `CHARON_CLUSTER_SECRET`.
    pub fn cluster_secret(self, secret: &str) -> Self {
        self.env("CHARON_CLUSTER_SECRET", secret)
    }

    /// `--upstream-timeout-ms N`.
    pub fn upstream_timeout_ms(self, ms: u64) -> Self {
        self.arg("--upstream-timeout-ms").arg(ms.to_string())
    }

    /// Starts the node and waits until it is ready.
    pub async fn start(self) -> Result<TestNode> {
        self.start_waiting_for("/readyz").await
    }

    /// Starts the node and waits only until it is up (`/healthz`), not
    /// ready: for a node that is still catching up or starts drained.
    pub async fn start_unready(self) -> Result<TestNode> {
        self.start_waiting_for("/healthz").await
    }

    async fn start_waiting_for(mut self, check: &'static str) -> Result<TestNode> {
        if !self.args.iter().any(|a| a == "--gossip-listen") {
            self.gossip = Some(free_udp_addr()?);
        }
        let work = Arc::new(
            tempfile::Builder::new()
                .prefix("charon-test-")
                .tempdir()
                .context("creating a temporary dir")?,
        );
        let data_dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => work.path().join("data"),
        };
        std::fs::create_dir_all(&data_dir)?;
        let mut node = TestNode {
            gossip: self.gossip.unwrap_or_else(unspecified),
            http: unspecified(),
            https: unspecified(),
            api: unspecified(),
            admin: unspecified(),
            token: String::new(),
            data_dir,
            child: None,
            log_path: work.path().join("node.log"),
            spec: self,
            _work: work,
        };
        node.spawn_and_wait_for(check).await?;
        Ok(node)
    }

    /// Runs a node that is expected to exit on its own (refused data dir, bad
    /// config) and returns its output; fails if it is still running after
    /// `timeout` (it is killed then).
    pub async fn run_to_exit(self, timeout: Duration) -> Result<Output> {
        let work = tempfile::Builder::new().prefix("charon-test-").tempdir()?;
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| work.path().join("data"));
        std::fs::create_dir_all(&data_dir)?;
        let mut cmd = self.command(&data_dir)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().context("spawning charon-node")?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => Ok(output?),
            // The child is killed on drop (kill_on_drop).
            Err(_) => bail!("charon-node was still running after {timeout:?}; expected it to exit"),
        }
    }

    fn command(&self, data_dir: &Path) -> Result<Command> {
        let mut cmd = Command::new(binary("charon-node")?);
        // Only what the test says configures the node, not the caller's shell.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHARON_") {
                cmd.env_remove(key);
            }
        }
        if !self.args.iter().any(|a| a == "--gossip-listen") {
            let gossip = self.gossip.map(|g| g.to_string());
            cmd.arg("--gossip-listen")
                .arg(gossip.as_deref().unwrap_or("127.0.0.1:0"));
        }
        // Drains (and SIGTERM) act at once unless a test asks otherwise.
        for (key, flag) in [
            ("CHARON_DRAIN_DELAY_SECS", "--drain-delay-secs"),
            ("CHARON_DRAIN_DEADLINE_SECS", "--drain-deadline-secs"),
            ("CHARON_DRAIN_SPREAD_SECS", "--drain-spread-secs"),
        ] {
            if self.env_value(key).is_none() && !self.args.iter().any(|a| a == flag) {
                cmd.env(key, "0");
            }
        }
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--https-listen", "127.0.0.1:0"])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(cmd)
    }

    fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A running `charon-node`. Dropping it kills the process.
pub struct TestNode {
    /// The gossip (UDP) address: what other nodes' `--seeds` name.
    pub gossip: SocketAddr,
    /// The proxy's plain-HTTP listener.
    pub http: SocketAddr,
    /// The proxy's HTTPS listener (TLS termination; `wss://`).
    pub https: SocketAddr,
    /// The gRPC API listener.
    pub api: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`, metrics).
    pub admin: SocketAddr,
    /// The admin token (from `CHARON_ADMIN_TOKEN` or `<data-dir>/admin.token`).
    pub token: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    spec: TestNodeBuilder,
    /// Keeps the temporary dir (data dir and log) alive as long as the node.
    _work: Arc<tempfile::TempDir>,
}

/// The Hosts client with a bearer-token interceptor.
pub type HostsApi = HostsClient<InterceptedService<Channel, BearerToken>>;
/// The Nodes client with a bearer-token interceptor.
pub type NodesApi =
    charon_proto::v1::nodes_client::NodesClient<InterceptedService<Channel, BearerToken>>;
/// The Tokens client with a bearer-token interceptor.
pub type TokensApi =
    charon_proto::v1::tokens_client::TokensClient<InterceptedService<Channel, BearerToken>>;
/// The Cluster client with a bearer-token interceptor.
pub type ClusterApi = ClusterClient<InterceptedService<Channel, BearerToken>>;
/// The Certificates client with a bearer-token interceptor.
pub type CertsApi = CertificatesClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call (or nothing).
#[derive(Clone, Debug)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

impl TestNode {
    pub fn builder() -> TestNodeBuilder {
        TestNodeBuilder::default()
    }

    /// A node with default options.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// The node's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The node's stdout and stderr so far (all starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        self.spawn_and_wait_for("/readyz").await
    }

    /// Starts the node again after [`stop`](Self::stop) or
    /// [`kill`](Self::kill) and waits only until it is up (`/healthz` 200),
    /// not ready: for a node that starts drained.
    pub async fn start_again_unready(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the node is still running");
        self.spawn_and_wait_for("/healthz").await
    }

    async fn spawn_and_wait_for(&mut self, check: &'static str) -> Result<()> {
        // A listen.json left by a previous run of this node would be read
        // before the new process replaces it.
        let listen = self.data_dir.join("listen.json");
        match std::fs::remove_file(&listen) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing a stale listen.json"),
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = self.spec.command(&self.data_dir)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        self.child = Some(cmd.spawn().context("spawning charon-node")?);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut step = "listen.json";
        let mut last_error = String::new();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "charon-node exited with {status} before it was ready (waiting for {step}); log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "charon-node not ready within {READY_TIMEOUT:?} (waiting for {step}{last_error}); log:\n{}",
                    self.log_tail()
                );
            }
            match self.try_ready(&mut step, check).await {
                Ok(true) => return Ok(()),
                Ok(false) => last_error.clear(),
                Err(err) => last_error = format!(": {err:#}"),
            }
            // Poll interval while waiting for the conditions above.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One readiness check: listen.json present, token known, /readyz 200.
    async fn try_ready(&mut self, step: &mut &'static str, check: &'static str) -> Result<bool> {
        *step = "listen.json";
        let text = match std::fs::read_to_string(self.data_dir.join("listen.json")) {
            Ok(text) => text,
            Err(_) => return Ok(false),
        };
        let listen: serde_json::Value = serde_json::from_str(&text)?;
        let addr = |key: &str| -> Result<SocketAddr> {
            listen[key]
                .as_str()
                .ok_or_else(|| anyhow!("listen.json has no {key:?}: {text}"))?
                .parse()
                .with_context(|| format!("listen.json {key:?}"))
        };
        self.http = addr("http")?;
        self.https = addr("https")?;
        self.api = addr("api")?;
        self.admin = addr("admin")?;
        self.gossip = addr("gossip")?;

        *step = "admin token";
        self.token = match self.spec.env_value("CHARON_ADMIN_TOKEN") {
            Some(token) => token.to_owned(),
            None => match std::fs::read_to_string(self.data_dir.join("admin.token")) {
                Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
                _ => return Ok(false),
            },
        };

        *step = check;
        Ok(self.admin_get(check).await? == 200)
    }

    /// Status of `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Result<u16> {
        let resp = client::get(self.admin, "localhost", path).await?;
        Ok(resp.status.as_u16())
    }

    /// Sends a signal (`TERM`, `KILL`, ...) to the node.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("the node is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -{signal} {pid} failed: {status}");
        Ok(())
    }

    /// Waits for the node to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("the node is not running")?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .with_context(|| format!("charon-node did not exit within {timeout:?}"))??;
        self.child = None;
        Ok(status)
    }

    /// SIGTERM, then waits for the exit and returns its status.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        self.signal("TERM")?;
        match self.wait_exit(STOP_TIMEOUT).await {
            Ok(status) => Ok(status),
            Err(err) => {
                let _ = self.kill().await;
                Err(err.context("after SIGTERM"))
            }
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Stops the node (it must exit 0) and starts it again on the same data
    /// dir with the same options. The addresses change.
    pub async fn restart(&mut self) -> Result<()> {
        let status = self.stop().await?;
        ensure!(
            status.success(),
            "charon-node exited with {status} after SIGTERM; log:\n{}",
            self.log_tail()
        );
        self.spawn_and_wait().await
    }

    /// Starts the node again after [`kill`](Self::kill) or [`stop`](Self::stop).
    pub async fn start_again(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the node is still running");
        self.spawn_and_wait().await
    }

    /// RSS of the node in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::procfs::rss_kib(self.pid()?)
    }

    /// The gRPC channel to the API listener.
    pub async fn grpc_channel(&self) -> Result<Channel> {
        Endpoint::from_shared(format!("http://{}", self.api))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connecting to the gRPC API at {}", self.api))
    }

    /// A Hosts client that sends the node's admin token.
    pub async fn grpc_client(&self) -> Result<HostsApi> {
        self.grpc_client_with(Some(&self.token.clone())).await
    }

    /// A Hosts client that sends `token` (or no authorization at all).
    pub async fn grpc_client_with(&self, token: Option<&str>) -> Result<HostsApi> {
        let value = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .context("token is not valid metadata")?,
            ),
            None => None,
        };
        Ok(HostsClient::with_interceptor(
            self.grpc_channel().await?,
            BearerToken(value),
        ))
    }

    /// The interceptor that sends this node's admin token.
    pub fn bearer(&self) -> Result<BearerToken> {
        let value = format!("Bearer {}", self.token)
            .parse::<MetadataValue<Ascii>>()
            .context("token is not valid metadata")?;
        Ok(BearerToken(Some(value)))
    }

    /// A Certificates client that sends the node's admin token.
    pub async fn certs_client(&self) -> Result<CertsApi> {
        Ok(CertificatesClient::with_interceptor(
            self.grpc_channel().await?,
            self.bearer()?,
        ))
    }

    /// A Cluster client that sends the node's admin token.
    pub async fn cluster_client(&self) -> Result<ClusterApi> {
        Ok(ClusterClient::with_interceptor(
            self.grpc_channel().await?,
            self.bearer()?,
        ))
    }

    /// A Nodes client (drain, undrain) that sends the node's admin token.
    pub async fn nodes_client(&self) -> Result<NodesApi> {
        Ok(
            charon_proto::v1::nodes_client::NodesClient::with_interceptor(
                self.grpc_channel().await?,
                self.bearer()?,
            ),
        )
    }

    /// A Tokens client that sends the node's admin token.
    pub async fn tokens_client(&self) -> Result<TokensApi> {
        Ok(
            charon_proto::v1::tokens_client::TokensClient::with_interceptor(
                self.grpc_channel().await?,
                self.bearer()?,
            ),
        )
    }

    /// The members this node sees: (name, live) pairs, and whether the
    /// cluster is converged.
    pub async fn members(&self) -> Result<(Vec<charon_proto::v1::Member>, bool)> {
        let status = self
            .cluster_client()
            .await?
            .status(charon_proto::v1::ClusterStatusRequest {})
            .await
            .context("Cluster.Status")?
            .into_inner();
        Ok((status.members, status.converged))
    }

    /// The ids of the hosts this node's API lists.
    pub async fn host_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .grpc_client()
            .await?
            .list_hosts(charon_proto::v1::ListHostsRequest {})
            .await
            .context("ListHosts")?
            .into_inner()
            .hosts
            .into_iter()
            .map(|h| h.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Stores a certificate chain and key through the API; returns the
    /// stored record (its warnings are dropped: use the client for those).
    pub async fn add_cert(&self, cert_pem: &str, key_pem: &str) -> Result<Certificate> {
        let reply = self
            .certs_client()
            .await?
            .add_certificate(AddCertificateRequest {
                name: String::new(),
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            })
            .await
            .context("AddCertificate")?
            .into_inner();
        reply
            .certificate
            .context("AddCertificate replied without a certificate")
    }

    /// Creates a host through the API.
    pub async fn create_host(&self, req: CreateHostRequest) -> Result<ProxyHost> {
        let mut api = self.grpc_client().await?;
        Ok(api
            .create_host(req)
            .await
            .context("CreateHost")?
            .into_inner())
    }

    /// Creates a host with default options and waits until the proxy routes
    /// its first domain.
    pub async fn add_host(&self, domains: &[&str], upstreams: &[String]) -> Result<ProxyHost> {
        let host = self.create_host(host_request(domains, upstreams)).await?;
        self.wait_routed(domains.first().context("no domain")?)
            .await?;
        Ok(host)
    }

    /// Waits until a request for `domain` (`*.x` → `probe.x`) is no longer
    /// answered with the node's unknown-host 404. The probe request reaches
    /// the upstream.
    pub async fn wait_routed(&self, domain: &str) -> Result<()> {
        let host = match domain.strip_prefix("*.") {
            Some(rest) => format!("probe.{rest}"),
            None => domain.to_owned(),
        };
        let http = self.http;
        crate::eventually(Duration::from_secs(10), || {
            let host = host.clone();
            async move {
                let resp = client::get(http, &host, "/").await?;
                ensure!(
                    !(resp.status == 404 && resp.text().contains(&host)),
                    "{host} is still unknown to the proxy: {} {}",
                    resp.status,
                    resp.text()
                );
                Ok(())
            }
        })
        .await
    }

    /// Runs `charonctl --endpoint http://<api> --token <token> ARGS`.
    pub async fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.ctl_with_token(Some(&self.token.clone()), args).await
    }

    /// Runs `charonctl` against this node with the given token (or none).
    pub async fn ctl_with_token(&self, token: Option<&str>, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(binary("charonctl")?);
        cmd.arg("--endpoint").arg(format!("http://{}", self.api));
        if let Some(token) = token {
            cmd.arg("--token").arg(token);
        }
        cmd.args(args)
            .env_remove("CHARON_TOKEN")
            .env_remove("CHARON_ENDPOINT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .with_context(|| format!("charonctl {args:?} did not finish in 30 s"))?
            .context("running charonctl")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// A CreateHostRequest with the documented defaults (booleans unset).
pub fn host_request(domains: &[&str], upstreams: &[String]) -> CreateHostRequest {
    CreateHostRequest {
        host: Some(ProxyHost {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            upstreams: upstreams.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
