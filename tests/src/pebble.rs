//! A real ACME server for the automatic-HTTPS tests: Debian's `pebble`
//! (RFC 8555 test CA) and `pebble-challtestsrv` (its fake DNS), both started
//! on loopback ports of their own.
//!
//! - challtestsrv answers every A query with 127.0.0.1 (and no AAAA), so
//!   every name a test orders resolves to this machine;
//! - pebble validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`:
//!   a test points them at a node *other than* the one that orders, which
//!   proves that any node answers any challenge;
//! - pebble's own HTTPS listener uses a certificate from a test CA made
//!   here ([`Pebble::ca_file`] is what `--acme-ca-file` takes);
//! - issued certificates chain to a root pebble makes at start, read from
//!   its management interface ([`Pebble::issuer_roots`]).
//!
//! Readiness is polled (a TCP connect to each listener, then the
//! directory), never slept for. Both processes die with the value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::tls::{client_config, tls_connect, TestCa};

/// Where Debian installs the binaries (`dpkg -L pebble`); `PATH` first.
pub fn find(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = PathBuf::from("/usr/bin").join(name);
        p.is_file().then_some(p)
    })
}

/// Whether pebble and challtestsrv are installed
/// (`scripts/setup-test-env.sh` installs them).
pub fn available() -> bool {
    find("pebble").is_some() && find("pebble-challtestsrv").is_some()
}

/// How to start pebble.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Port pebble connects to for HTTP-01 (a node's plain-HTTP listener).
    pub http_port: u16,
    /// Port pebble connects to for TLS-ALPN-01 (a node's HTTPS listener).
    pub tls_port: u16,
    /// Make pebble reject 5 % of nonces, as it does by default (the client
    /// must retry `badNonce`); off keeps timings steady.
    pub reject_nonces: bool,
}

/// The running pair.
pub struct Pebble {
    /// `https://127.0.0.1:<port>/dir`.
    pub directory: String,
    pub management: SocketAddr,
    /// The test CA that signed pebble's listener certificate, as a file.
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub dns: SocketAddr,
    pebble: Child,
    challtestsrv: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_tcp_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("probing for a free TCP port")?;
    Ok(l.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("probing for a free UDP port")?;
    Ok(s.local_addr()?.port())
}

async fn wait_tcp(addr: SocketAddr, what: &str, log: &Path) -> Result<()> {
    crate::eventually(Duration::from_secs(20), || async move {
        TcpStream::connect(addr)
            .await
            .with_context(|| format!("{what} not listening on {addr} yet"))?;
        Ok(())
    })
    .await
    .with_context(|| {
        format!(
            "{what} did not start; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

impl Pebble {
    pub async fn start(opts: PebbleOptions) -> Result<Pebble> {
        let (Some(pebble_bin), Some(chall_bin)) = (find("pebble"), find("pebble-challtestsrv"))
        else {
            bail!("pebble is not installed (scripts/setup-test-env.sh installs it)");
        };
        let dir = tempfile::Builder::new()
            .prefix("charon-pebble-")
            .tempdir()?;
        let ca = TestCa::new("Charon test CA for pebble's listener")?;
        let leaf = ca.leaf(&["127.0.0.1", "localhost", "pebble"])?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem)?;
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem)?;
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem)?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let management = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let dns = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let chall_mgmt = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": opts.http_port,
                "tlsPort": opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string())?;
        let log = dir.path().join("pebble.log");
        let out = std::fs::File::create(&log)?;
        let challtestsrv = Command::new(chall_bin)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &chall_mgmt.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .kill_on_drop(true)
            .spawn()
            .context("starting pebble-challtestsrv")?;
        wait_tcp(chall_mgmt, "pebble-challtestsrv", &log).await?;
        let pebble = Command::new(pebble_bin)
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns.to_string()])
            // Validation at once, not after pebble's random 0-15 s pause.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env(
                "PEBBLE_WFE_NONCEREJECT",
                if opts.reject_nonces { "5" } else { "0" },
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting pebble")?;
        let mut p = Pebble {
            directory: format!("https://{listen}/dir"),
            management,
            ca_file,
            ca_pem: ca.pem.clone(),
            dns,
            pebble,
            challtestsrv,
            log,
            _dir: dir,
        };
        wait_tcp(listen, "pebble", &p.log).await?;
        wait_tcp(management, "pebble (management)", &p.log).await?;
        let status = p
            .get(listen, "/dir")
            .await
            .context("reading pebble's directory")?;
        ensure!(status.contains("newOrder"), "pebble's directory: {status}");
        if let Some(code) = p.pebble.try_wait()? {
            bail!("pebble exited at start ({code}): {}", p.log());
        }
        Ok(p)
    }

    /// pebble's and challtestsrv's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A body fetched over HTTPS (HTTP/1.0, so the server closes).
    async fn get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let config = client_config(&[&self.ca_pem], &[])?;
        let mut tls = tls_connect(addr, "127.0.0.1", &config).await?;
        tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        ensure!(head.contains(" 200 "), "GET {path}: {head}");
        Ok(body.to_owned())
    }

    /// The root (and intermediate) of the chain pebble issues under, for
    /// clients that verify served certificates.
    pub async fn issuer_roots(&self) -> Result<Vec<String>> {
        let root = self.get(self.management, "/roots/0").await?;
        let inter = self.get(self.management, "/intermediates/0").await?;
        Ok(vec![root, inter])
    }

    /// A TLS client configuration trusting pebble's issuing root.
    pub async fn client_config(&self, alpn: &[&str]) -> Result<Arc<rustls::ClientConfig>> {
        let roots = self.issuer_roots().await?;
        client_config(&[&roots[0]], alpn)
    }

    /// The number of orders pebble received so far, counted from its log
    /// lines (`POST /order-plz`), for "one order per name set" checks.
    /// pebble's log lines about orders and nonces: what a test that
    /// counts orders prints when the count is off.
    pub fn order_log(&self) -> String {
        self.log()
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("order") || l.contains("nonce")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Orders the CA created. Not the `POST /order-plz` requests: with
    /// `reject_nonces` pebble refuses 5% of good nonces and the ACME client
    /// sends the same order again with a fresh one (one order, two POSTs).
    pub fn orders(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Added order "))
            .count()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.start_kill();
        let _ = self.challtestsrv.start_kill();
    }
}

/// Where a [`Relay`] sends pebble's validation connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Closed at once: the challenge is unreachable.
    Closed,
    /// Accepted and held until the relay is pointed somewhere: the
    /// validation waits (pebble's own timeout is longer than the tests').
    Hold,
    To(SocketAddr),
}

/// A TCP relay standing between pebble's validation and the nodes: pebble
/// is configured once with the relay's port, and the test points the relay
/// at the node that must answer (never the one that orders), holds the
/// validation, or refuses it.
pub struct Relay {
    pub port: u16,
    route: tokio::sync::watch::Sender<Route>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start() -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (route, rx) = tokio::sync::watch::channel(Route::Closed);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let n = n.clone();
                tokio::spawn(async move {
                    let route = match rx.wait_for(|r| *r != Route::Hold).await {
                        Ok(r) => *r,
                        Err(_) => return,
                    };
                    let Route::To(to) = route else {
                        return;
                    };
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut out) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(Relay {
            port,
            route,
            connections,
            task,
        })
    }

    pub fn point_at(&self, to: Option<SocketAddr>) {
        self.set(to.map_or(Route::Closed, Route::To));
    }

    pub fn set(&self, route: Route) {
        self.route.send_replace(route);
    }

    /// Connections relayed to a node so far.
    pub fn relayed(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node (by id) the cluster makes responsible for a certificate: the
/// same rendezvous hash as `charon_node::acme::duty::responsible`, so a
/// test can point validation elsewhere before the order starts (and then
/// checks, from the order's history, that the prediction held).
pub fn responsible<'a>(cert_id: &str, node_ids: &[&'a str]) -> Option<&'a str> {
    use sha2::Digest;
    node_ids
        .iter()
        .max_by_key(|node| {
            let h = sha2::Sha256::digest(format!("{cert_id}\n{node}").as_bytes());
            u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
        })
        .copied()
}

/// The certificate id the cluster gives a host's DNS names (as
/// `charon_node::acme::names::set_id`).
pub fn cert_id(names: &[&str]) -> String {
    use sha2::Digest;
    let mut names: Vec<&str> = names.to_vec();
    names.sort();
    names.dedup();
    let h = sha2::Sha256::digest(names.join(",").as_bytes());
    format!("acme-{}", hex::encode(&h[..6]))
}
