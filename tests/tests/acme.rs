//! Automatic HTTPS against a real ACME server: Debian's pebble and its fake
//! DNS (tests/src/pebble.rs), real `charon-node` processes.
//!
//! pebble validates on the ports of a node *other than* the one that
//! orders, so every passing case also proves that any node answers.

use std::time::Duration;

use anyhow::Result;
use charon_tests::pebble::{self, Pebble, PebbleOptions};

/// Installed by scripts/setup-test-env.sh; a machine without apt says so.
fn pebble_or_skip(test: &str) -> bool {
    if pebble::available() {
        return true;
    }
    eprintln!("SKIPPED {test}: pebble not installed (scripts/setup-test-env.sh installs it)");
    false
}

#[tokio::test]
async fn pebble_harness_serves_its_directory_and_roots() -> Result<()> {
    if !pebble_or_skip("pebble_harness_serves_its_directory_and_roots") {
        return Ok(());
    }
    let p = Pebble::start(PebbleOptions {
        http_port: 1,
        tls_port: 1,
        reject_nonces: false,
    })
    .await?;
    let roots = tokio::time::timeout(Duration::from_secs(10), p.issuer_roots()).await??;
    anyhow::ensure!(
        roots.iter().all(|r| r.contains("BEGIN CERTIFICATE")),
        "roots: {roots:?}"
    );
    Ok(())
}
