//! The Python `websockets` backend (`tests/python/ws_backend.py`): an echo
//! server with permessage-deflate that prints `LISTENING <port>`, selects
//! subprotocol `chat`, and answers the text `headers?` with JSON
//! `{"headers":{...},"extensions":"...","subprotocol":...}`.
//!
//! The Python environment (`.venv`) is prepared by
//! `scripts/setup-test-env.sh`, run once per test process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::repo_root;

static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn setup() -> Result<PathBuf, String> {
    let root = repo_root();
    let script = root.join("scripts/setup-test-env.sh");
    if !script.is_file() {
        return Err(format!(
            "{} is missing: the Python test tooling is not in this checkout",
            script.display()
        ));
    }
    let out = std::process::Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed with {}:\n{}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        return Err(format!(
            "{} ran but {} does not exist",
            script.display(),
            python.display()
        ));
    }
    Ok(python)
}

/// The virtualenv's Python, after running `scripts/setup-test-env.sh` once
/// per test process. Blocking: call it from `spawn_blocking`.
pub fn python_blocking() -> Result<PathBuf> {
    PYTHON.get_or_init(setup).clone().map_err(|e| anyhow!(e))
}

/// [`python_blocking`] from async code.
pub async fn python() -> Result<PathBuf> {
    tokio::task::spawn_blocking(python_blocking).await?
}

pub struct PythonWsBackend {
    pub addr: SocketAddr,
    _child: Child,
}

impl PythonWsBackend {
    pub async fn start() -> Result<Self> {
        Self::start_with_args(&[]).await
    }

    /// With extra arguments for `ws_backend.py` (`--workers 2`,
    /// `--deflate-level 0`, ...). Worker processes end with the main one.
    pub async fn start_with_args(args: &[&str]) -> Result<Self> {
        let python = python().await?;
        let script = repo_root().join("tests/python/ws_backend.py");
        if !script.is_file() {
            bail!("{} is missing", script.display());
        }
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--port", "0"])
            .args(args)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning ws_backend.py")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(port) = line.trim().strip_prefix("LISTENING ") {
                    return port.trim().parse::<u16>().context("port after LISTENING");
                }
            }
            let mut err = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err).await;
            bail!("ws_backend.py ended without printing LISTENING <port>; stderr:\n{err}")
        })
        .await
        .context("ws_backend.py did not print LISTENING <port> within 30 s")??;
        // Keep draining both pipes so the backend never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut stderr, &mut sink).await;
        });
        Ok(Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A Python `websockets` client (with permessage-deflate) that connects to
/// the proxy at `proxy` with `Host: host`, offers subprotocol `chat`, asks
/// `headers?`, sends a large compressible text and checks its echo. Prints
/// JSON: `{response_extensions, subprotocol, server, big_echo_ok}`.
const PY_CLIENT: &str = r#"
import asyncio, json, socket, sys
from websockets.asyncio.client import connect

async def main():
    proxy_host, proxy_port, host = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.create_connection((proxy_host, proxy_port))
    async with connect(f"ws://{host}/", sock=sock, subprotocols=["chat"],
                       compression="deflate", max_size=None) as ws:
        await ws.send("headers?")
        server = json.loads(await ws.recv())
        big = "charon relays deflate frames untouched " * 50000
        await ws.send(big)
        echo = await ws.recv()
        print(json.dumps({
            "response_extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
            "subprotocol": ws.subprotocol,
            "server": server,
            "big_echo_ok": echo == big,
        }))

asyncio.run(main())
"#;

/// Runs [`PY_CLIENT`] and returns its JSON.
pub async fn python_ws_client(proxy: SocketAddr, host: &str) -> Result<serde_json::Value> {
    let python = python().await?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(python)
            .arg("-c")
            .arg(PY_CLIENT)
            .arg(proxy.ip().to_string())
            .arg(proxy.port().to_string())
            .arg(host)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the Python client did not finish in 60 s")??;
    if !out.status.success() {
        bail!(
            "the Python client failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| format!("Python client output: {stdout}"))
}
