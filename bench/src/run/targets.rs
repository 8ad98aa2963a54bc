//! The targets: the backend reached directly, and each proxy configured
//! the same way — the same number of workers, keep-alive to the upstream,
//! WebSocket upgrades passed through, X-Forwarded-* headers added, no access
//! log — so that the differences measured are the proxies'.
//!
//! Charon may appear several times in one run: one target per build
//! (`--charon-bin LABEL=DIR`, to compare two builds interleaved) and per
//! config variant (`--charon-variant NAME=FLAGS`: extra `charonctl host add`
//! flags, e.g. an ACL or a balancing policy). Each is a [`TargetSpec`].

use std::ffi::OsStr;
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

/// One Charon build: where its `charon-node` and `charonctl` are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharonBuild {
    /// Empty for the only build of a run; else what `--charon-bin` named it.
    pub label: String,
    pub bin_dir: PathBuf,
}

/// A per-host configuration variant: extra `charonctl host add` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub host_flags: Vec<String>,
}

impl Variant {
    /// `NAME=FLAGS`: FLAGS split at white space; an argument `@FILE` is
    /// replaced by FILE's lines, one argument each (blank lines and lines
    /// starting with `#` skipped), for flag lists too long for a command
    /// line (an ACL of 1,000 CIDRs).
    pub fn parse(s: &str) -> Result<Variant, String> {
        let (name, flags) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=FLAGS"))?;
        check_label(name)?;
        let mut host_flags = Vec::new();
        for arg in flags.split_whitespace() {
            match arg.strip_prefix('@') {
                Some(file) => {
                    let text = fs::read_to_string(file)
                        .map_err(|e| format!("variant {name}: cannot read {file}: {e}"))?;
                    host_flags.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(String::from),
                    );
                }
                None => host_flags.push(arg.to_string()),
            }
        }
        Ok(Variant {
            name: name.to_string(),
            host_flags,
        })
    }
}

impl CharonBuild {
    /// `LABEL=DIR`, DIR holding `charon-node` and `charonctl`.
    pub fn parse(s: &str) -> Result<CharonBuild, String> {
        let (label, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LABEL=DIR"))?;
        check_label(label)?;
        Ok(CharonBuild {
            label: label.to_string(),
            bin_dir: PathBuf::from(dir),
        })
    }
}

/// Labels become parts of target names, directory names and table cells.
fn check_label(l: &str) -> Result<(), String> {
    let ok = !l.is_empty()
        && l.len() <= 32
        && l.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label {l:?}: use 1 to 32 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// What to start: a kind of target and, for Charon, which build and which
/// host configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// `charon`, `charon@LABEL`, `charon+VARIANT`, `charon@LABEL+VARIANT`,
    /// or the kind's name for the others: the key of every table row.
    pub name: String,
    pub kind: Kind,
    pub build: Option<CharonBuild>,
    pub variant: Option<Variant>,
}

impl TargetSpec {
    pub fn plain(kind: Kind) -> TargetSpec {
        TargetSpec {
            name: kind.to_string(),
            kind,
            build: None,
            variant: None,
        }
    }

    /// The run's targets, in the order given: `charon` expands to one
    /// target per build, then per build and variant.
    pub fn expand(kinds: &[Kind], builds: &[CharonBuild], variants: &[Variant]) -> Vec<TargetSpec> {
        let mut out = Vec::new();
        for &kind in kinds {
            if kind != Kind::Charon {
                out.push(TargetSpec::plain(kind));
                continue;
            }
            let variants: Vec<Option<&Variant>> = std::iter::once(None)
                .chain(variants.iter().map(Some))
                .collect();
            for v in &variants {
                for b in builds {
                    let mut name = "charon".to_string();
                    if !b.label.is_empty() {
                        name = format!("{name}@{}", b.label);
                    }
                    if let Some(v) = v {
                        name = format!("{name}+{}", v.name);
                    }
                    out.push(TargetSpec {
                        name,
                        kind,
                        build: Some(b.clone()),
                        variant: v.cloned(),
                    });
                }
            }
        }
        out
    }
}

/// What every target needs to know.
pub struct Env {
    pub workdir: PathBuf,
    pub backend: SocketAddr,
    /// The backend's h2c listener (extended CONNECT WebSockets), reached
    /// by the `direct` target in the WebSocket-over-h2 tests.
    pub backend_h2: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Workers per proxy (`--workers`).
    pub workers: usize,
    /// CPUs each proxy is pinned to, in pinned mode.
    pub proxy_cpus: Option<Vec<usize>>,
}

/// A running target (or, for `direct`, the backend's address).
pub struct Target {
    pub spec: TargetSpec,
    pub kind: Kind,
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    /// Where WebSockets over HTTP/2 (RFC 8441, h2c prior knowledge) go:
    /// Charon's HTTP listener, or the backend's h2c listener for `direct`.
    pub h2c: Option<SocketAddr>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Target {
    /// The process whose tree's CPU time and memory are the proxy's.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn direct(env: &Env) -> Target {
        Target {
            spec: TargetSpec::plain(Kind::Direct),
            kind: Kind::Direct,
            http: env.backend,
            tls: None,
            h2c: Some(env.backend_h2),
            child: None,
            dir: PathBuf::new(),
        }
    }

    pub fn start(spec: &TargetSpec, env: &Env) -> anyhow::Result<Target> {
        let kind = spec.kind;
        if kind == Kind::Direct {
            return Ok(Target::direct(env));
        }
        let dir = env.workdir.join(&spec.name);
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
            Kind::Direct => return Ok(Target::direct(env)),
            Kind::Charon => (charon_command(env, spec, &dir)?, None),
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
            spec: spec.clone(),
            kind,
            http: http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls,
            h2c: None,
            child: Some(child),
            dir,
        };
        target.wait_ready(env).with_context(|| {
            format!(
                "{} did not become ready; see {}",
                spec.name,
                target.log_path().display()
            )
        })?;
        if kind == Kind::Charon {
            target.h2c = Some(target.http);
        }
        if let Some(cpus) = &env.proxy_cpus {
            target.check_pinned(cpus)?;
        }
        Ok(target)
    }

    /// Every process of the proxy (nginx's workers too) may run only on
    /// `cpus`: proof that pinned mode pinned what it says.
    fn check_pinned(&self, cpus: &[usize]) -> anyhow::Result<()> {
        let pid = self.pid().context("no process")?;
        for p in super::procfs::tree(pid) {
            let got = super::cpus::allowed(p)?;
            if got != cpus {
                bail!(
                    "{} process {p} may run on CPUs {} instead of {}",
                    self.spec.name,
                    super::cpus::list(&got),
                    super::cpus::list(cpus)
                );
            }
        }
        Ok(())
    }

    /// `pid N (P processes) on CPUs …`, read back from /proc.
    pub fn placement(&self) -> String {
        let Some(pid) = self.pid() else {
            return String::new();
        };
        let procs = super::procfs::tree(pid);
        let cpus = super::cpus::allowed(pid)
            .map(|c| super::cpus::list(&c))
            .unwrap_or_else(|_| "?".into());
        format!(
            "{}: pid {pid}, {} process(es), CPUs {cpus}",
            self.spec.name,
            procs.len()
        )
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
            self.configure_charon(env, deadline)?;
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

    /// Waits for the node's listeners and readiness, then adds the host
    /// (with the variant's extra flags) and, where the build has a TLS
    /// listener, the certificate, with the build's own `charonctl`.
    fn configure_charon(&mut self, env: &Env, deadline: Instant) -> anyhow::Result<()> {
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
        let build = self
            .spec
            .build
            .as_ref()
            .context("a Charon target without a build")?;
        let ctl = |args: &[&OsStr]| -> anyhow::Result<()> {
            let out = Command::new(build.bin_dir.join("charonctl"))
                .arg("--endpoint")
                .arg(format!("http://{api}"))
                .arg("--token-file")
                .arg(self.dir.join("data/admin.token"))
                .args(args)
                .output()
                .context("cannot run charonctl")?;
            if !out.status.success() {
                bail!(
                    "charonctl {} failed: {}",
                    args.iter()
                        .take(2)
                        .map(|a| a.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let upstream = format!("http://{}", env.backend);
        let mut host: Vec<&OsStr> = ["host", "add", "127.0.0.1", "--upstream", &upstream]
            .map(OsStr::new)
            .to_vec();
        if let Some(v) = &self.spec.variant {
            host.extend(v.host_flags.iter().map(OsStr::new));
        }
        ctl(&host)?;
        // The TLS listener, where this build has one: the same certificate
        // as the peers', chosen by SNI (localhost).
        if let Some(https) = listen.get("https").and_then(|v| v.as_str()) {
            ctl(&[
                OsStr::new("cert"),
                OsStr::new("add"),
                OsStr::new("--cert"),
                env.cert.as_os_str(),
                OsStr::new("--key"),
                env.key.as_os_str(),
            ])?;
            self.tls = Some(https.parse()?);
        }
        Ok(())
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

fn charon_command(env: &Env, spec: &TargetSpec, dir: &Path) -> anyhow::Result<Command> {
    let build = spec
        .build
        .as_ref()
        .context("a Charon target without a build")?;
    let bin = build.bin_dir.join("charon-node");
    if !bin.is_file() {
        bail!("no charon-node in {}", build.bin_dir.display());
    }
    // Nodes that have an HTTPS listener get it on a free port too, so that
    // no fixed default port is bound.
    let has_https = Command::new(&bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--https-listen"));
    let mut cmd = super::cpus::command(&bin, env.proxy_cpus.as_deref());
    if has_https {
        cmd.args(["--https-listen", "127.0.0.1:0"]);
    }
    // The worker count: `charon-node` reads it (that many worker threads,
    // each a current-thread runtime with its own SO_REUSEPORT listeners).
    cmd.env("TOKIO_WORKER_THREADS", env.workers.to_string())
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
    Ok(cmd)
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
worker_processes {workers};
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
        workers = env.workers,
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    let mut cmd = super::cpus::command("nginx", env.proxy_cpus.as_deref());
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

/// HAProxy in HTTP mode, one thread per worker; WebSocket upgrades need nothing but
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
    nbthread {workers}
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
        workers = env.workers,
    );
    let path = dir.join("haproxy.cfg");
    fs::write(&path, conf)?;
    let mut cmd = super::cpus::command("haproxy", env.proxy_cpus.as_deref());
    cmd.arg("-db").arg("-f").arg(&path);
    Ok(cmd)
}

/// Caddy with one P per worker (GOMAXPROCS), no admin endpoint, no automatic HTTPS;
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
    let mut cmd = super::cpus::command("caddy", env.proxy_cpus.as_deref());
    cmd.env("GOMAXPROCS", env.workers.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn build(label: &str) -> CharonBuild {
        CharonBuild {
            label: label.into(),
            bin_dir: PathBuf::from(format!("/b/{label}")),
        }
    }

    #[test]
    fn one_build_keeps_the_plain_names() {
        let specs = TargetSpec::expand(
            &[Kind::Direct, Kind::Charon, Kind::Nginx],
            &[build("")],
            &[],
        );
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["direct", "charon", "nginx"]);
        assert_eq!(
            specs[1].build.as_ref().unwrap().bin_dir,
            PathBuf::from("/b/")
        );
    }

    #[test]
    fn builds_and_variants_multiply_charon_only() {
        let v = Variant::parse("acl=--allow 10.0.0.0/8 --allow 192.168.0.0/16").unwrap();
        let specs = TargetSpec::expand(
            &[Kind::Charon, Kind::Haproxy],
            &[build("base"), build("new")],
            &[v],
        );
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "charon@base",
                "charon@new",
                "charon@base+acl",
                "charon@new+acl",
                "haproxy"
            ]
        );
        assert_eq!(specs[3].build.as_ref().unwrap().label, "new");
        assert_eq!(
            specs[3].variant.as_ref().unwrap().host_flags,
            ["--allow", "10.0.0.0/8", "--allow", "192.168.0.0/16"]
        );
        assert!(specs[0].variant.is_none());
    }

    #[test]
    fn variant_flags_come_from_a_file_one_per_line() {
        let dir = std::env::temp_dir().join(format!("charon-bench-variant-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("acl.txt");
        fs::write(
            &file,
            "# 2 CIDRs\n--allow\n10.0.0.0/8\n\n--allow\n10.1.0.0/16\n",
        )
        .unwrap();
        let v = Variant::parse(&format!("acl=--lb least-conn @{}", file.display())).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            v.host_flags,
            [
                "--lb",
                "least-conn",
                "--allow",
                "10.0.0.0/8",
                "--allow",
                "10.1.0.0/16"
            ]
        );
        assert!(Variant::parse("acl=@/nonexistent/file").is_err());
    }

    #[test]
    fn labels_are_checked() {
        assert!(CharonBuild::parse("base=target/release").is_ok());
        assert!(CharonBuild::parse("target/release").is_err());
        assert!(CharonBuild::parse("a b=dir").is_err());
        assert!(CharonBuild::parse("=dir").is_err());
        assert!(Variant::parse("x/y=--a").is_err());
    }
}
