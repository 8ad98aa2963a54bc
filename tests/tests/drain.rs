//! Drain: `/readyz` first, then the listeners, keep-alive and h2 connections
//! ended politely, WebSocket tunnels closed with 1001 on both sides at the
//! deadline, a drain that outlives a restart, and SIGTERM's own drain.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use charon_proto::v1::{CreateTokenRequest, DrainRequest, DrainStatusRequest, UndrainRequest};
use charon_tests::client::{self, ws_connect, WsClient};
use charon_tests::{eventually, EchoBackend, TestNode, WsEchoBackend};
use futures_util::{SinkExt, StreamExt};
use http::Method;
use http_body_util::{BodyExt, Empty};
use tokio_tungstenite::tungstenite::Message;

async fn drain(node: &TestNode, deadline_secs: u32, spread_secs: u32) -> Result<()> {
    node.nodes_client()
        .await?
        .drain(DrainRequest {
            node: "me".into(),
            deadline_secs,
            spread_secs,
        })
        .await
        .context("Nodes.Drain")?;
    Ok(())
}

async fn drain_status(node: &TestNode) -> Result<charon_proto::v1::DrainStatusResponse> {
    Ok(node
        .nodes_client()
        .await?
        .drain_status(DrainStatusRequest { node: "me".into() })
        .await?
        .into_inner())
}

fn named(name: &str) -> charon_tests::TestNodeBuilder {
    TestNode::builder().name(name)
}

async fn echo(ws: &mut WsClient, text: &str) -> Result<()> {
    ws.send(Message::text(text)).await?;
    match tokio::time::timeout(client::IO_TIMEOUT, ws.next()).await? {
        Some(Ok(Message::Text(t))) if t.as_str() == text => Ok(()),
        other => bail!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// Reads until the server's Close; returns its code and whether the
/// connection then ended cleanly (tungstenite answers the Close itself).
async fn close_of(ws: &mut WsClient) -> Result<(u16, bool)> {
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .context("no Close in time")?
        {
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(Message::Close(None))) => bail!("Close without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("the tunnel failed before a Close: {e}"),
            None => bail!("the tunnel ended without a Close (1006)"),
        }
    };
    let clean = matches!(
        tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
        Ok(None)
            | Ok(Some(Err(
                tokio_tungstenite::tungstenite::Error::ConnectionClosed
            )))
    );
    Ok((code, clean))
}

#[tokio::test]
async fn tunnels_get_close_1001_on_both_sides_at_the_deadline_spread_over_the_window() -> Result<()>
{
    let node = named("me").start().await?;
    let backend = WsEchoBackend::start("ws").await?;
    node.add_host(&["ws.drain.test"], &[backend.url()]).await?;
    let mut clients = Vec::new();
    for i in 0..4 {
        let (mut ws, _) = ws_connect(node.http, "ws.drain.test", "/", &[]).await?;
        echo(&mut ws, &format!("hello {i}")).await?;
        clients.push(ws);
    }
    let asked = Instant::now();
    drain(&node, 2, 2).await?;
    // The tunnels keep working until the deadline.
    echo(&mut clients[0], "still here").await?;
    // Every client waits for its Close at the same time: the order the
    // proxy closes them in is its own.
    let waits = clients.iter_mut().map(|ws| async move {
        let r = close_of(ws).await;
        r.map(|(code, clean)| (code, clean, asked.elapsed()))
    });
    let closes: Vec<(u16, bool, Duration)> = futures_util::future::join_all(waits)
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    for (code, clean, at) in &closes {
        ensure!(*code == 1001, "close code {code}");
        ensure!(*clean, "the closing handshake did not complete");
        ensure!(
            *at >= Duration::from_millis(1900),
            "closed {at:?} after the drain, before the 2 s deadline"
        );
        ensure!(
            *at <= Duration::from_secs(6),
            "closed {at:?} after the drain: deadline 2 s + spread 2 s"
        );
    }
    let first = closes.iter().map(|c| c.2).min().unwrap();
    let last = closes.iter().map(|c| c.2).max().unwrap();
    ensure!(
        last - first >= Duration::from_millis(1000),
        "closes not spread: {first:?}..{last:?}"
    );
    // The upstream saw (masked, or tungstenite would have failed) Close 1001s.
    eventually(Duration::from_secs(10), || async {
        let codes = backend.close_codes();
        ensure!(codes == [1001; 4], "backend close codes {codes:?}");
        Ok(())
    })
    .await?;
    let status = drain_status(&node).await?;
    eventually(Duration::from_secs(10), || async {
        let s = drain_status(&node).await?;
        ensure!(
            s.status == "drained" && s.tunnels == 0 && s.cut == 0 && s.listeners_closed,
            "{s:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(status.requested);
    Ok(())
}

#[tokio::test]
async fn readyz_flips_first_then_keep_alive_ends_h2_gets_goaway_and_in_flight_finishes(
) -> Result<()> {
    let node = named("me")
        .env("CHARON_DRAIN_DELAY_SECS", "2")
        .start()
        .await?;
    let slow = EchoBackend::start("slow").await?;
    node.add_host(&["slow.drain.test"], &[slow.url()]).await?;
    let req = |path: &str| {
        http::Request::builder()
            .uri(path)
            .header("host", "slow.drain.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // A keep-alive HTTP/1.1 connection and an h2 connection, both used once.
    let mut h1 = client::http1_connect(node.http).await?;
    let resp = h1.send_request(req("/one")).await?;
    ensure!(resp.status() == 200 && resp.headers().get("connection").is_none());
    resp.into_body().collect().await?;
    let tcp = tokio::net::TcpStream::connect(node.http).await?;
    let (mut h2, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    let h2_task = tokio::spawn(h2_conn);
    let resp = h2.send_request(req("/h2")).await?;
    ensure!(resp.status() == 200);
    resp.into_body().collect().await?;
    // A slow streamed response in flight through the drain.
    let http = node.http;
    let in_flight =
        tokio::spawn(async move { client::get(http, "slow.drain.test", "/slow?ms=4000").await });
    eventually(Duration::from_secs(10), || async {
        ensure!(slow.hits() >= 3, "the slow request has not arrived");
        Ok(())
    })
    .await?;

    drain(&node, 30, 1).await?;
    // 1. /readyz says no while the listener still accepts.
    eventually(Duration::from_secs(2), || async {
        ensure!(node.admin_get("/readyz").await? == 503);
        Ok(())
    })
    .await?;
    ensure!(node.admin_get("/healthz").await? == 200);
    ensure!(
        tokio::net::TcpStream::connect(node.http).await.is_ok(),
        "the listener closed before /readyz said 503"
    );
    // 2. The keep-alive connection's next response says Connection: close.
    let resp = h1.send_request(req("/two")).await?;
    ensure!(
        resp.headers().get("connection").map(|v| v.as_bytes()) == Some(b"close"),
        "keep-alive response during a drain: {:?}",
        resp.headers()
    );
    resp.into_body().collect().await?;
    // 3. The listener closes; the h2 connection ends with GOAWAY (cleanly).
    eventually(Duration::from_secs(5), || async {
        ensure!(
            tokio::net::TcpStream::connect(node.http).await.is_err(),
            "still accepting"
        );
        Ok(())
    })
    .await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), h2_task)
        .await
        .context("the h2 connection was not ended")??;
    ensure!(
        ended.is_ok(),
        "the h2 connection ended with an error: {ended:?}"
    );
    // 4. The in-flight request completes.
    let resp = in_flight.await?.context("the in-flight request failed")?;
    ensure!(resp.status == 200, "in-flight: {}", resp.status);
    ensure!(resp.backend_name().as_deref() == Some("slow"));
    Ok(())
}

#[tokio::test]
async fn a_drain_outlives_a_restart_and_undrain_restores_service() -> Result<()> {
    let mut node = named("me").start().await?;
    let backend = EchoBackend::start("b").await?;
    node.add_host(&["svc.drain.test"], &[backend.url()]).await?;
    drain(&node, 1, 0).await?;
    eventually(Duration::from_secs(10), || async {
        ensure!(tokio::net::TcpStream::connect(node.http).await.is_err());
        Ok(())
    })
    .await?;
    node.signal("TERM")?;
    ensure!(node.wait_exit(Duration::from_secs(20)).await?.success());
    node.start_again_unready().await?;
    // Still drained after the restart: not ready, not accepting.
    ensure!(node.admin_get("/readyz").await? == 503);
    eventually(Duration::from_secs(10), || async {
        ensure!(tokio::net::TcpStream::connect(node.http).await.is_err());
        Ok(())
    })
    .await?;
    node.nodes_client()
        .await?
        .undrain(UndrainRequest { node: "me".into() })
        .await?;
    eventually(Duration::from_secs(10), || async {
        ensure!(node.admin_get("/readyz").await? == 200);
        let resp = client::get(node.http, "svc.drain.test", "/").await?;
        ensure!(resp.status == 200 && resp.backend_name().as_deref() == Some("b"));
        Ok(())
    })
    .await?;
    let err = node
        .nodes_client()
        .await?
        .undrain(UndrainRequest { node: "me".into() })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::NotFound, "{err:?}");
    let err = node
        .nodes_client()
        .await?
        .drain(DrainRequest {
            node: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::NotFound && err.message().contains("nobody"));
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_then_exits_0_and_cuts_a_client_that_never_closes() -> Result<()> {
    let mut node = named("me")
        .env("CHARON_DRAIN_DEADLINE_SECS", "1")
        .args(["--shutdown-grace-secs", "1"])
        .start()
        .await?;
    let backend = WsEchoBackend::start("ws").await?;
    node.add_host(&["stuck.drain.test"], &[backend.url()])
        .await?;
    // A raw client that completes the upgrade and then never reads again,
    // so it never answers the proxy's Close.
    let (head, _) = client::ws_upgrade_head("stuck.drain.test", "/", &[]);
    let ws = client::RawWs::handshake(node.http, &head).await?;
    ensure!(ws.status() == Some(101));
    let signalled = Instant::now();
    node.signal("TERM")?;
    let status = node.wait_exit(Duration::from_secs(20)).await?;
    ensure!(status.success(), "exit after SIGTERM: {status}");
    let took = signalled.elapsed();
    ensure!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1 s deadline"
    );
    ensure!(
        took <= Duration::from_secs(8),
        "exited after {took:?}: deadline 1 s + grace 1 s"
    );
    let log = node.log();
    ensure!(
        log.contains("cutting what is left"),
        "the stuck tunnel was not reported as cut:\n{log}"
    );
    drop(ws);
    Ok(())
}

/// Connections the node accepted, per worker thread, from `/metrics`
/// (`charon_worker_connections_accepted_total`).
async fn accepted_per_worker(node: &TestNode) -> Result<std::collections::BTreeMap<String, u64>> {
    let resp = client::get(node.admin, "localhost", "/metrics").await?;
    ensure!(resp.status == 200, "/metrics answered {}", resp.status);
    let text = resp.text();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("charon_worker_connections_accepted_total{worker=\"")
        {
            let (worker, value) = rest.split_once("\"} ").context("malformed sample")?;
            out.insert(worker.to_string(), value.trim().parse()?);
        }
    }
    Ok(out)
}

/// With two workers (two current-thread runtimes, each with its own
/// `SO_REUSEPORT` listeners), tunnels land on both, and a drain closes
/// every one of them with 1001 on both sides, whichever worker relays it.
/// Each tunnel is its own connection from its own port: the kernel's
/// 4-tuple hash puts all 16 on one worker with probability 2^-15.
#[tokio::test]
async fn a_drain_closes_every_tunnel_with_1001_on_every_worker() -> Result<()> {
    const TUNNELS: usize = 16;
    let node = named("me").env("TOKIO_WORKER_THREADS", "2").start().await?;
    ensure!(
        node.log().contains("proxy on 2 worker thread(s)"),
        "log:\n{}",
        node.log()
    );
    let backend = WsEchoBackend::start("ws").await?;
    node.add_host(&["two.drain.test"], &[backend.url()]).await?;
    let before = accepted_per_worker(&node).await?;
    let mut clients = Vec::new();
    for i in 0..TUNNELS {
        let (mut ws, _) = ws_connect(node.http, "two.drain.test", "/", &[]).await?;
        echo(&mut ws, &format!("hello {i}")).await?;
        clients.push(ws);
    }
    // Only the tunnels came to the proxy's listeners meanwhile (the API
    // and the metrics have their own): every worker accepted some.
    let after = accepted_per_worker(&node).await?;
    let tunnels_per_worker: Vec<(&str, u64)> = after
        .iter()
        .map(|(w, n)| (w.as_str(), n - before.get(w).copied().unwrap_or(0)))
        .collect();
    ensure!(
        tunnels_per_worker.len() == 2
            && tunnels_per_worker.iter().all(|(_, n)| *n > 0)
            && tunnels_per_worker.iter().map(|(_, n)| n).sum::<u64>() == TUNNELS as u64,
        "tunnels accepted per worker: {tunnels_per_worker:?}"
    );
    drain(&node, 1, 0).await?;
    let closes = futures_util::future::join_all(clients.iter_mut().map(close_of)).await;
    for (i, c) in closes.into_iter().enumerate() {
        let (code, clean) = c.with_context(|| format!("tunnel {i}"))?;
        ensure!(code == 1001, "tunnel {i}: close code {code}");
        ensure!(clean, "tunnel {i} did not end cleanly after the Close");
    }
    eventually(Duration::from_secs(10), || async {
        let codes = backend.close_codes();
        ensure!(codes == [1001; TUNNELS], "backend close codes {codes:?}");
        Ok(())
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        let s = drain_status(&node).await?;
        ensure!(
            s.status == "drained" && s.tunnels == 0 && s.cut == 0,
            "{s:?}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// One worker (`TOKIO_WORKER_THREADS=1`, or a one-CPU container): the
/// proxy's one thread serves a tunnel and the drain's Close 1001 while
/// the API runs on the control thread.
#[tokio::test]
async fn one_worker_serves_and_drains_with_1001() -> Result<()> {
    let node = named("me").env("TOKIO_WORKER_THREADS", "1").start().await?;
    ensure!(
        node.log().contains("proxy on 1 worker thread(s)"),
        "log:\n{}",
        node.log()
    );
    let backend = WsEchoBackend::start("ws").await?;
    node.add_host(&["one.drain.test"], &[backend.url()]).await?;
    let (mut ws, _) = ws_connect(node.http, "one.drain.test", "/", &[]).await?;
    echo(&mut ws, "before the drain").await?;
    drain(&node, 1, 0).await?;
    let (code, clean) = close_of(&mut ws).await?;
    ensure!(code == 1001, "close code {code}");
    ensure!(clean, "the tunnel did not end cleanly after the Close");
    Ok(())
}

async fn admin_drain(node: &TestNode, method: Method, auth: Option<&str>) -> Result<u16> {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let resp = client::request(node.admin, method, "localhost", "/drain", &headers, "").await?;
    Ok(resp.status.as_u16())
}

/// The admin port is open to anyone who reaches it (every pod of a
/// Kubernetes cluster, any web page through `<img src>`): `/drain` is
/// refused without a valid token or with any method but POST, and a
/// refused request changes nothing.
#[tokio::test]
async fn admin_drain_without_a_valid_token_or_by_get_is_refused_and_changes_nothing() -> Result<()>
{
    let node = named("me").start().await?;
    let backend = EchoBackend::start("b").await?;
    node.add_host(&["guarded.drain.test"], &[backend.url()])
        .await?;
    let valid = format!("Bearer {}", node.token);
    let gets = [None, Some("Bearer wrong"), Some(valid.as_str())];
    for auth in gets {
        let status = admin_drain(&node, Method::GET, auth).await?;
        ensure!(status == 405, "GET /drain with {auth:?}: {status}");
    }
    let posts = [
        None,
        Some("Bearer wrong"),
        Some("Bearer "),
        Some("Basic YWRtaW46YWRtaW4="),
        Some(node.token.as_str()),
    ];
    for auth in posts {
        let status = admin_drain(&node, Method::POST, auth).await?;
        ensure!(status == 401, "POST /drain with {auth:?}: {status}");
    }
    // Each refusal is logged before its answer, and a drain request would
    // have been logged before that: once the last refusal is in the log,
    // so would any drain be.
    eventually(Duration::from_secs(5), || async {
        let refused = node.log().matches("refused a /drain").count();
        ensure!(refused == posts.len(), "{refused} refusals logged");
        Ok(())
    })
    .await?;
    ensure!(
        !node.log().contains("local drain requested"),
        "a refused request started a drain:
{}",
        node.log()
    );
    ensure!(
        node.admin_get("/readyz").await? == 200,
        "not ready any more"
    );
    let resp = client::get(node.http, "guarded.drain.test", "/").await?;
    ensure!(resp.status == 200, "proxy: {}", resp.status);
    ensure!(drain_status(&node).await?.status == "serving");

    // The same request with the token drains.
    ensure!(admin_drain(&node, Method::POST, Some(&valid)).await? == 202);
    eventually(Duration::from_secs(2), || async {
        ensure!(node.admin_get("/readyz").await? == 503);
        Ok(())
    })
    .await?;
    Ok(())
}

/// `POST /drain` with a token on the admin listener drains this node only:
/// not ready at once, listeners closed after the delay, and the SIGTERM
/// that follows exits 0; the next start serves (nothing was replicated or
/// stored). A token made through the API works too, like on the API.
#[tokio::test]
async fn admin_drain_is_local_and_ends_with_the_process() -> Result<()> {
    let mut node = named("me")
        .env("CHARON_DRAIN_DELAY_SECS", "1")
        .start()
        .await?;
    let backend = EchoBackend::start("b").await?;
    node.add_host(&["local.drain.test"], &[backend.url()])
        .await?;
    let token = node
        .tokens_client()
        .await?
        .create_token(CreateTokenRequest { name: "ops".into() })
        .await?
        .into_inner()
        .secret;
    let status = admin_drain(&node, Method::POST, Some(&format!("bearer {token}"))).await?;
    ensure!(status == 202, "/drain answered {status}");
    eventually(Duration::from_secs(2), || async {
        ensure!(node.admin_get("/readyz").await? == 503);
        Ok(())
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        ensure!(tokio::net::TcpStream::connect(node.http).await.is_err());
        Ok(())
    })
    .await?;
    let status = drain_status(&node).await?;
    ensure!(
        !status.requested,
        "a local drain must not be a replicated record"
    );
    node.signal("TERM")?;
    ensure!(node.wait_exit(Duration::from_secs(20)).await?.success());
    node.start_again().await?;
    let resp = client::get(node.http, "local.drain.test", "/").await?;
    ensure!(resp.status == 200, "after restart: {}", resp.status);
    Ok(())
}
