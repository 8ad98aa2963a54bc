//! Autobahn WebSocket conformance through the proxy: the cases run once
//! directly against the Python backend and once through a node, and must
//! give the same results (`tests/conformance/run.sh` compares them).
//!
//! Two variants: through the node's plain-HTTP listener (`ws://`), and
//! through its HTTPS listener (`wss://`). kosoku, the Autobahn client, has
//! no TLS (it refuses `wss://` URLs), so for the second a [`TlsShim`] in the
//! test carries each of its connections over TLS to the node: what the node
//! sees is a `wss://` client.
//!
//! `AUTOBAHN_PROFILE=quick` (and the runner's other `AUTOBAHN_*` variables)
//! pass through from the environment; the default is the full case set.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_tests::backends::python::python;
use charon_tests::tls::{client_config, wait_served, TestCa, TlsShim};
use charon_tests::{repo_root, PythonWsBackend, TestNode};

/// One conformance run at a time: two at once on a small machine would make
/// the timing-sensitive cases differ for reasons that are not the proxy's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `tests/conformance/run.sh DIRECT PROXIED OUT` and requires success.
async fn run_and_compare(node: &TestNode, direct: &str, proxied: &str) -> Result<()> {
    let root = repo_root();
    let script = root.join("tests/conformance/run.sh");
    ensure!(
        script.is_file(),
        "{} is missing: the conformance runner is not in this checkout",
        script.display()
    );
    let python = python().await?;
    let out_dir = tempfile::tempdir()?;
    let venv_bin = python.parent().context("venv bin dir")?.to_path_buf();
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(direct)
        .arg(proxied)
        .arg(out_dir.path())
        .current_dir(&root)
        .env("PATH", path)
        .env("VIRTUAL_ENV", venv_bin.parent().unwrap_or(&venv_bin))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30 * 60), run)
        .await
        .context("the conformance run did not finish in 30 minutes")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    ensure!(
        out.status.success(),
        "tests/conformance/run.sh {direct} {proxied} failed with {}:\n{stdout}\n{stderr}\nnode log tail:\n{}",
        out.status,
        node.log().lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

/// The echo backend as tests/conformance/run.sh asks it to be started.
async fn conformance_backend() -> Result<PythonWsBackend> {
    PythonWsBackend::start_with_args(&["--workers", "2", "--deflate-level", "0"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_match_direct_and_proxied() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    python().await?;
    let backend = conformance_backend().await?;
    let node = TestNode::start().await?;
    // An IP-literal domain lets the runner use a plain ws://127.0.0.1:PORT URL.
    node.add_host(&["127.0.0.1"], &[backend.url()]).await?;
    let direct = format!("ws://{}", backend.addr);
    let proxied = format!("ws://127.0.0.1:{}", node.http.port());
    run_and_compare(&node, &direct, &proxied).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_match_direct_and_proxied_over_wss() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    python().await?;
    let backend = conformance_backend().await?;
    let node = TestNode::start().await?;
    node.add_host(&["127.0.0.1"], &[backend.url()]).await?;
    // A certificate for the IP: the shim connects to 127.0.0.1 without SNI,
    // and the node picks the certificate by the address connected to.
    let ca = TestCa::new("Charon Conformance CA")?;
    let leaf = ca.leaf(&["127.0.0.1"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    let config = client_config(&[&ca.pem], &["http/1.1"])?;
    wait_served(node.https, "127.0.0.1", &config, &leaf.fingerprint).await?;
    let shim = TlsShim::start(node.https, "127.0.0.1", config).await?;

    let direct = format!("ws://{}", backend.addr);
    // The Host header kosoku sends is 127.0.0.1:<shim port>: routed to the
    // 127.0.0.1 host like any port.
    let proxied = format!("ws://127.0.0.1:{}", shim.addr.port());
    run_and_compare(&node, &direct, &proxied).await?;
    ensure!(
        shim.failures() == 0,
        "{} TLS handshakes with the node failed",
        shim.failures()
    );
    ensure!(
        shim.handshakes() > 100,
        "only {} connections went over TLS: the cases did not run through wss://",
        shim.handshakes()
    );
    Ok(())
}

/// The cases over WebSockets over h2 (RFC 8441). No Autobahn client
/// speaks RFC 8441, so an [`H2Shim`] answers kosoku's HTTP/1.1 upgrade
/// itself and carries each connection, byte for byte, as an extended
/// CONNECT stream of its own h2 connection (h2c) to the node: the frames
/// the cases send and expect all cross the node's h2 tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_match_direct_and_proxied_over_h2() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    python().await?;
    let backend = conformance_backend().await?;
    let node = TestNode::start().await?;
    node.add_host(&["127.0.0.1"], &[backend.url()]).await?;
    let shim = charon_tests::h2ws::H2Shim::start(node.http).await?;
    let direct = format!("ws://{}", backend.addr);
    let proxied = format!("ws://127.0.0.1:{}", shim.addr.port());
    run_and_compare(&node, &direct, &proxied).await?;
    ensure!(
        shim.streams() > 100,
        "only {} connections went over h2: the cases did not run through RFC 8441",
        shim.streams()
    );
    Ok(())
}
