//! Headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol with the tungstenite client: a real browser's HTTP/2,
//! WebSocket and permessage-deflate stacks against the proxy.
//!
//! [`Chromium::start`] launches it on a fresh profile with
//! `--remote-debugging-port=0` (the port it picks is read from its
//! stderr), with every `*.test` name resolved to 127.0.0.1 and the test
//! certificates accepted (`--ignore-certificate-errors`: the test CA is
//! not in a system store). [`Page::eval`] runs a script in a tab and
//! returns its (awaited) value as JSON.
//!
//! `scripts/setup-test-env.sh` installs the package with apt-get; where it
//! cannot, [`find_chromium`] is `None` and tests say SKIPPED.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools command may take (a page script included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The browser binary: `CHROMIUM_BIN`, else `chromium` on the `PATH` or
/// in /usr/bin.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file()))
}

type Cdp = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running headless Chromium and its DevTools connection.
pub struct Chromium {
    child: Child,
    cdp: Mutex<Cdp>,
    next_id: AtomicU64,
    _profile: tempfile::TempDir,
}

/// A tab, attached to with a DevTools session.
pub struct Page<'b> {
    browser: &'b Chromium,
    session: String,
}

impl Chromium {
    pub async fn start(binary: &std::path::Path) -> Result<Chromium> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--ignore-certificate-errors",
                "--host-resolver-rules=MAP *.test 127.0.0.1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Ok(url.trim().to_string());
                }
                seen.push(line);
            }
            Err(anyhow!("chromium exited: {}", seen.join("\n")))
        })
        .await
        .context("chromium did not print its DevTools address")??;
        // Keep reading stderr so the browser never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (cdp, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("DevTools connection to {url}"))?;
        Ok(Chromium {
            child,
            cdp: Mutex::new(cdp),
            next_id: AtomicU64::new(1),
            _profile: profile,
        })
    }

    /// Sends one DevTools command (to the browser, or to a tab's session)
    /// and returns its result; events in between are skipped.
    async fn command(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut cdp = self.cdp.lock().await;
        cdp.send(Message::text(msg.to_string())).await?;
        tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let m = cdp.next().await.context("DevTools connection ended")??;
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["id"] != json!(id) {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        })
        .await
        .with_context(|| format!("{method} did not answer in time"))?
    }

    /// Opens a tab on `url` and attaches to it.
    pub async fn open(&self, url: &str) -> Result<Page<'_>> {
        let target = self
            .command(None, "Target.createTarget", json!({ "url": url }))
            .await?;
        let id = target["targetId"].as_str().context("no targetId")?;
        let attached = self
            .command(
                None,
                "Target.attachToTarget",
                json!({"targetId": id, "flatten": true}),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_string();
        Ok(Page {
            browser: self,
            session,
        })
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Page<'_> {
    /// Evaluates `script` in the page, awaiting it if it is a promise;
    /// its value as JSON, or the exception it threw as an error.
    pub async fn eval(&self, script: &str) -> Result<Value> {
        let r = self
            .browser
            .command(
                Some(&self.session),
                "Runtime.evaluate",
                json!({"expression": script, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("page script threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }
}
