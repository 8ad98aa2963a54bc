//! The node as a process: hosts survive restarts (graceful and kill -9),
//! one process per data dir, bad config exits 64, SIGTERM finishes
//! in-flight requests and exits 0.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_proto::v1::{ListHostsRequest, Location};
use charon_tests::{client, eventually, host_request, EchoBackend, TestNode};

#[tokio::test]
async fn hosts_are_routed_after_restart_without_resaving() -> Result<()> {
    let mut node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    node.add_host(&["keep.test"], &[a.url()]).await?;
    let mut req = host_request(&["*.wild.test"], &[a.url()]);
    req.host.as_mut().unwrap().locations = vec![Location {
        path_prefix: "/b".into(),
        upstreams: vec![b.url()],
        balancing: None,
        ..Default::default()
    }];
    node.create_host(req).await?;
    node.wait_routed("*.wild.test").await?;
    let before = node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;

    let token = node.token.clone();
    node.restart().await?;
    assert_eq!(node.token, token, "the admin token changed across restart");

    // Ready means routed: no eventually here.
    for (host, path, want) in [
        ("keep.test", "/", "a"),
        ("x.wild.test", "/", "a"),
        ("x.wild.test", "/b/c", "b"),
    ] {
        let resp = client::get(node.http, host, path).await?;
        assert_eq!(
            resp.status,
            200,
            "{host}{path} after restart: {}",
            resp.text()
        );
        assert_eq!(resp.backend_name().as_deref(), Some(want), "{host}{path}");
    }
    let after = node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    let key = |h: &charon_proto::v1::ProxyHost| (h.id.clone(), h.version, h.domains.clone());
    let mut before: Vec<_> = before.iter().map(key).collect();
    let mut after: Vec<_> = after.iter().map(key).collect();
    before.sort();
    after.sort();
    assert_eq!(before, after, "hosts changed across restart");
    Ok(())
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() -> Result<()> {
    let mut node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    // Not waiting for routing: the API answer alone promises durability.
    let created = node
        .create_host(host_request(&["durable.test"], &[a.url()]))
        .await?;
    node.kill().await?;
    node.start_again().await?;
    let resp = client::get(node.http, "durable.test", "/").await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let hosts = node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].id, created.id);
    Ok(())
}

#[tokio::test]
async fn a_second_node_on_the_same_data_dir_is_refused() -> Result<()> {
    let node = TestNode::start().await?;
    let out = TestNode::builder()
        .data_dir(&node.data_dir)
        .run_to_exit(Duration::from_secs(30))
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second node exited with {}",
        out.status
    );
    assert!(
        stderr.contains("already in use"),
        "stderr does not say 'already in use':\n{stderr}"
    );
    // The first node is unharmed.
    assert_eq!(node.admin_get("/readyz").await?, 200);
    let hosts = node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?;
    assert!(hosts.into_inner().hosts.is_empty());
    Ok(())
}

#[tokio::test]
async fn bad_config_exits_64() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("charon.toml");
    std::fs::write(&config, "this is = = not [ toml\n")?;
    let out = TestNode::builder()
        .arg("--config")
        .arg(config.to_string_lossy())
        .run_to_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(
        out.status.code(),
        Some(64),
        "exit status {}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn health_and_sigterm_finishes_in_flight_requests() -> Result<()> {
    let mut node = TestNode::start().await?;
    assert_eq!(node.admin_get("/healthz").await?, 200);
    let slow = EchoBackend::start("slow").await?;
    node.add_host(&["slow.test"], &[slow.url()]).await?;
    let probes = slow.hits();

    let http = node.http;
    let in_flight =
        tokio::spawn(async move { client::get(http, "slow.test", "/slow?ms=3000").await });
    eventually(Duration::from_secs(10), || async {
        ensure!(
            slow.hits() > probes,
            "the slow request has not reached the backend"
        );
        Ok(())
    })
    .await?;
    node.signal("TERM")?;
    // New connections are refused while the in-flight request still runs.
    eventually(Duration::from_secs(2), || async {
        ensure!(
            tokio::net::TcpStream::connect(http).await.is_err(),
            "the proxy still accepts connections after SIGTERM"
        );
        Ok(())
    })
    .await?;
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the listener closed"
    );
    let resp = in_flight.await?.context("the in-flight request failed")?;
    assert_eq!(
        resp.status,
        200,
        "in-flight request after SIGTERM: {}",
        resp.text()
    );
    assert_eq!(resp.backend_name().as_deref(), Some("slow"));
    let status = node.wait_exit(Duration::from_secs(30)).await?;
    assert!(
        status.success(),
        "exit after SIGTERM: {status}; log:\n{}",
        node.log()
    );
    Ok(())
}

/// A worker count that is not a positive number is a configuration error
/// (exit 64, named in one line), not a panic in the runtime's builder.
#[tokio::test]
async fn a_bad_worker_count_exits_64_naming_it() -> Result<()> {
    for bad in ["0", "two"] {
        let out = TestNode::builder()
            .env("TOKIO_WORKER_THREADS", bad)
            .run_to_exit(Duration::from_secs(30))
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bad}: {}; stderr:\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS") && !stderr.contains("panicked"),
            "{bad}: stderr:\n{stderr}"
        );
    }
    Ok(())
}
