//! Autobahn WebSocket conformance through the proxy: the cases run once
//! directly against the Python backend and once through a node, and must
//! give the same results (`tests/conformance/run.sh` compares them).
//!
//! `AUTOBAHN_PROFILE=quick` (and the runner's other `AUTOBAHN_*` variables)
//! pass through from the environment; the default is the full case set.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_tests::backends::python::python;
use charon_tests::{repo_root, PythonWsBackend, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_match_direct_and_proxied() -> Result<()> {
    let root = repo_root();
    let script = root.join("tests/conformance/run.sh");
    ensure!(
        script.is_file(),
        "{} is missing: the conformance runner is not in this checkout",
        script.display()
    );
    let python = python().await?;
    // As tests/conformance/run.sh asks its echo backend to be started.
    let backend =
        PythonWsBackend::start_with_args(&["--workers", "2", "--deflate-level", "0"]).await?;
    let node = TestNode::start().await?;
    // An IP-literal domain lets the runner use a plain ws://127.0.0.1:PORT URL.
    node.add_host(&["127.0.0.1"], &[backend.url()]).await?;

    let out_dir = tempfile::tempdir()?;
    let direct = format!("ws://{}", backend.addr);
    let proxied = format!("ws://127.0.0.1:{}", node.http.port());
    let venv_bin = python.parent().context("venv bin dir")?.to_path_buf();
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&direct)
        .arg(&proxied)
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
