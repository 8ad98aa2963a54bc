//! The targets: the backend reached directly, and each proxy configured
//! the same way — one worker, keep-alive to the upstream, WebSocket upgrades
//! passed through, X-Forwarded-* headers added, no access log — so that the
//! differences measured are the proxies'.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Charon,
    Nginx,
    Haproxy,
    Caddy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Charon,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Caddy,
    ];

    pub fn is_proxy(self) -> bool {
        self != Kind::Direct
    }

    /// Whether the harness configures a TLS listener for this peer (Charon
    /// gets one when its build has `--https-listen` and `charonctl cert`).
    fn peer_tls(self) -> bool {
        matches!(self, Kind::Nginx | Kind::Haproxy | Kind::Caddy)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Direct => "direct",
            Kind::Charon => "charon",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        })
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| format!("unknown target {s:?} (direct, charon, nginx, haproxy, caddy)"))
    }
}

/// What every target needs to know.
pub struct Env {
    pub workdir: PathBuf,
    /// Where `charon-node` and `charonctl` are.
    pub bin_dir: PathBuf,
    pub backend: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running target (or, for `direct`, the backend's address).
pub struct Target {
    pub kind: Kind,
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Target {
    /// The process whose tree's CPU time and memory are the proxy's.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn direct(backend: SocketAddr) -> Target {
        Target {
            kind: Kind::Direct,
            http: backend,
            tls: None,
            child: None,
            dir: PathBuf::new(),
        }
    }

    pub fn start(kind: Kind, env: &Env) -> anyhow::Result<Target> {
        let dir = env.workdir.join(kind.to_string());
        // A fresh directory every round: a fresh process, store and cache.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let http = free_port()?;
        let tls = if kind.peer_tls() {
            Some(free_port()?)
        } else {
            None
        };
        let (mut cmd, http) = match kind {
            Kind::Direct => return Ok(Target::direct(env.backend)),
            Kind::Charon => (charon_command(env, &dir), None),
            Kind::Nginx => (
                nginx_command(env, &dir, http, tls.expect("tls"))?,
                Some(http),
            ),
            Kind::Haproxy => (
                haproxy_command(env, &dir, http, tls.expect("tls"))?,
                Some(http),
            ),
            Kind::Caddy => (
                caddy_command(env, &dir, http, tls.expect("tls"))?,
                Some(http),
            ),
        };
        let log = fs::File::create(dir.join("output.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {kind} ({cmd:?})"))?;
        let mut target = Target {
            kind,
            http: http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls,
            child: Some(child),
            dir,
        };
        target.wait_ready(env).with_context(|| {
            format!(
                "{kind} did not become ready; see {}",
                target.log_path().display()
            )
        })?;
        Ok(target)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("output.log")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited with {status}", self.kind);
            }
        }
        Ok(())
    }

    fn wait_ready(&mut self, env: &Env) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        if self.kind == Kind::Charon {
            // listen.json appears once every listener is bound.
            let listen = loop {
                self.check_alive()?;
                if let Ok(s) = fs::read_to_string(self.dir.join("data/listen.json")) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
                        break v;
                    }
                }
                if Instant::now() > deadline {
                    bail!("no listen.json");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let addr = |k: &str| -> anyhow::Result<SocketAddr> {
                Ok(listen[k]
                    .as_str()
                    .with_context(|| format!("listen.json has no {k}"))?
                    .parse()?)
            };
            self.http = addr("http")?;
            let (api, admin) = (addr("api")?, addr("admin")?);
            while http_get(admin, "/readyz").map(|r| r.status) != Ok(200) {
                self.check_alive()?;
                if Instant::now() > deadline {
                    bail!("/readyz never said ready");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = Command::new(env.bin_dir.join("charonctl"))
                .arg("--endpoint")
                .arg(format!("http://{api}"))
                .arg("--token-file")
                .arg(self.dir.join("data/admin.token"))
                .args(["host", "add", "127.0.0.1", "--upstream"])
                .arg(format!("http://{}", env.backend))
                .output()
                .context("cannot run charonctl")?;
            if !out.status.success() {
                bail!(
                    "charonctl host add failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            // The TLS listener, where this build has one: the same
            // certificate as the peers', chosen by SNI (localhost).
            if let Some(https) = listen.get("https").and_then(|v| v.as_str()) {
                let out = Command::new(env.bin_dir.join("charonctl"))
                    .arg("--endpoint")
                    .arg(format!("http://{api}"))
                    .arg("--token-file")
                    .arg(self.dir.join("data/admin.token"))
                    .args(["cert", "add", "--cert"])
                    .arg(&env.cert)
                    .arg("--key")
                    .arg(&env.key)
                    .output()
                    .context("cannot run charonctl")?;
                if !out.status.success() {
                    bail!(
                        "charonctl cert add failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                self.tls = Some(https.parse()?);
            }
        }
        // Ready when a request goes through to the backend.
        loop {
            self.check_alive()?;
            if let Ok(r) = http_get(self.http, "/small") {
                if r.status == 200 && r.body_len == crate::backend::SMALL_LEN {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("no 200 from /small through {}", self.http);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        crate::run::terminate(&mut child, Duration::from_secs(5));
    }

    /// Threads of this process that have used at least `min_secs` of CPU,
    /// with their names: after a round, that shows how many threads did the
    /// proxying (tokio's blocking-pool threads carry the workers' name, so
    /// names alone do not tell).
    pub fn busy_threads(&self, min_secs: f64) -> Vec<String> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in dir.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let name = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if super::procfs::task_cpu_secs(pid, tid) >= min_secs {
                out.push(name.trim().to_string());
            }
        }
        out
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn charon_command(env: &Env, dir: &Path) -> Command {
    let bin = env.bin_dir.join("charon-node");
    // Nodes that have an HTTPS listener get it on a free port too, so that
    // no fixed default port is bound.
    let has_https = Command::new(&bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--https-listen"));
    let mut cmd = Command::new(&bin);
    if has_https {
        cmd.args(["--https-listen", "127.0.0.1:0"]);
    }
    // One worker thread: tokio's multi-thread runtime (Runtime::new) reads
    // this when the worker count is not set in code.
    cmd.env("TOKIO_WORKER_THREADS", "1")
        // Like the peers: no access log. Set through the environment so
        // that builds without these settings still start.
        .env("CHARON_ACCESS_LOG", "off")
        // Its own gossip port, and no drain wait when the run stops it.
        .env("CHARON_GOSSIP_LISTEN", "127.0.0.1:0")
        .env("CHARON_DRAIN_DELAY_SECS", "0")
        .env("CHARON_DRAIN_DEADLINE_SECS", "0")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            // Errors only, like the peers' logs (no access log anywhere).
            "--log",
            "warn",
            "--shutdown-grace-secs",
            "1",
        ]);
    cmd
}

/// nginx as a user would tune it for this: 64 KiB proxy buffers (the
/// default 4 KiB ones make it slow on 64 KiB responses), keep-alive both
/// ways without a request cap, the usual WebSocket `map`.
fn nginx_command(
    env: &Env,
    dir: &Path,
    http: SocketAddr,
    tls: SocketAddr,
) -> anyhow::Result<Command> {
    let d = dir.display();
    let conf = format!(
        r#"user root;
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 19500;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream backend {{
        server {backend};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {http};
        listen {tls} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"#,
        backend = env.backend,
        cert = env.cert.display(),
        key = env.key.display(),
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

/// HAProxy in HTTP mode, one thread; WebSocket upgrades need nothing but
/// `timeout tunnel` (so idle tunnels are not cut by `timeout client`).
fn haproxy_command(
    env: &Env,
    dir: &Path,
    http: SocketAddr,
    tls: SocketAddr,
) -> anyhow::Result<Command> {
    // HAProxy wants the certificate and key in one file.
    let pem = dir.join("cert+key.pem");
    fs::write(&pem, [fs::read(&env.cert)?, fs::read(&env.key)?].concat())?;
    let conf = format!(
        r#"global
    nbthread 1
    maxconn 9900

defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s
    timeout tunnel 1h

frontend fe
    bind {http}
    bind {tls} ssl crt {pem}
    default_backend be

backend be
    http-reuse safe
    server s1 {backend}
"#,
        backend = env.backend,
        pem = pem.display(),
    );
    let path = dir.join("haproxy.cfg");
    fs::write(&path, conf)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    Ok(cmd)
}

/// Caddy with one P (GOMAXPROCS=1), no admin endpoint, no automatic HTTPS;
/// the idle keep-alive pool raised from its default of 32 per host so the 64
/// client connections do not churn upstream connections.
fn caddy_command(
    env: &Env,
    dir: &Path,
    http: SocketAddr,
    tls: SocketAddr,
) -> anyhow::Result<Command> {
    let transport = "transport http {
            keepalive 60s
            keepalive_idle_conns 256
            keepalive_idle_conns_per_host 256
        }";
    let conf = format!(
        r#"{{
    admin off
    auto_https off
}}

http://:{http_port} {{
    bind {ip}
    reverse_proxy {backend} {{
        {transport}
    }}
}}

https://:{tls_port} {{
    bind {ip}
    tls {cert} {key}
    reverse_proxy {backend} {{
        {transport}
    }}
}}
"#,
        http_port = http.port(),
        tls_port = tls.port(),
        ip = http.ip(),
        backend = env.backend,
        cert = env.cert.display(),
        key = env.key.display(),
    );
    let path = dir.join("Caddyfile");
    fs::write(&path, conf)?;
    let mut cmd = Command::new("caddy");
    cmd.env("GOMAXPROCS", "1")
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path);
    Ok(cmd)
}

#[derive(Debug, PartialEq, Eq)]
pub struct SimpleResponse {
    pub status: u16,
    pub body_len: usize,
}

/// A one-shot HTTP/1.1 GET (`Connection: close`), for readiness checks.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<SimpleResponse, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok(SimpleResponse {
        status,
        body_len: buf.len() - head_end - 4,
    })
}
