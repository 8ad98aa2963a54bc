//! Balancing for long-lived connections (issue 19), with real backends and
//! real node processes: weights over HTTP/1.1 and h2c, least-conn evening
//! out WebSocket tunnels after one backend's tunnels closed, cookie hashing
//! landing a client on the same backend through every node of a cluster,
//! bounded load under one dominant key, the per-upstream connection cap
//! (queue, then a readable 503, over both protocols), `charonctl` flags and
//! `host show`'s per-upstream state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use charon_proto::v1::{Balancing, HealthCheck, UpstreamStatusRequest};
use charon_tests::backends::RecordingBackend;
use charon_tests::client::{self, WsClient};
use charon_tests::{
    eventually, host_request, EchoBackend, TestNode, TestNodeBuilder, WsEchoBackend,
};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::Message;

/// `n` WebSocket echo backends named `{prefix}0`, `{prefix}1`, …, and their
/// URLs (kept together: a backend stops when dropped).
async fn echo_backends(prefix: &str, n: usize) -> Result<(Vec<WsEchoBackend>, Vec<String>)> {
    let mut b = Vec::with_capacity(n);
    for i in 0..n {
        b.push(WsEchoBackend::start(&format!("{prefix}{i}")).await?);
    }
    let urls = b.iter().map(|x| x.url()).collect();
    Ok((b, urls))
}

/// Creates a host with `balancing` and waits until `node` routes it.
async fn add_balanced(
    node: &TestNode,
    domain: &str,
    upstreams: &[String],
    balancing: Balancing,
) -> Result<()> {
    let mut req = host_request(&[domain], upstreams);
    req.host.as_mut().context("host")?.balancing = Some(balancing);
    node.create_host(req).await?;
    node.wait_routed(domain).await
}

/// `n` GETs of `/` on one keep-alive connection: HTTP/1.1 or h2c.
async fn send_many(addr: SocketAddr, host: &str, n: usize, h2: bool) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let req = || {
        http::Request::builder()
            .uri(if h2 {
                format!("http://{host}/")
            } else {
                "/".to_string()
            })
            .header("host", host)
            .body(Full::new(Bytes::new()))
    };
    if h2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        for _ in 0..n {
            let r = client::HttpResponse::read(s.send_request(req()?).await?).await?;
            ensure!(r.status == 200, "h2c: {} {}", r.status, r.text());
        }
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        for _ in 0..n {
            let r = client::HttpResponse::read(s.send_request(req()?).await?).await?;
            ensure!(r.status == 200, "HTTP/1.1: {} {}", r.status, r.text());
        }
    }
    Ok(())
}

/// Weights 3:1:1 hold within 10% over 3,000 requests, half over HTTP/1.1,
/// half over h2c (two front ends, one pipeline phase).
#[tokio::test]
async fn weights_are_respected() -> Result<()> {
    let node = TestNode::start().await?;
    let b: Vec<EchoBackend> = vec![
        EchoBackend::start("w0").await?,
        EchoBackend::start("w1").await?,
        EchoBackend::start("w2").await?,
    ];
    let urls: Vec<String> = b.iter().map(|x| x.url()).collect();
    let balancing = Balancing {
        weights: [(urls[0].clone(), 3)].into(),
        ..Default::default()
    };
    add_balanced(&node, "weights.test", &urls, balancing).await?;
    let probe: Vec<usize> = b.iter().map(EchoBackend::hits).collect();
    for h2 in [false, true] {
        send_many(node.http, "weights.test", 1500, h2).await?;
    }
    let hits: Vec<f64> = b
        .iter()
        .zip(&probe)
        .map(|(x, p)| (x.hits() - p) as f64)
        .collect();
    let total: f64 = hits.iter().sum();
    for (i, want) in [0.6, 0.2, 0.2].iter().enumerate() {
        let share = hits[i] / total;
        ensure!(
            (share - want).abs() <= want * 0.1,
            "backend {i} got {share:.3} of {total} requests, want {want} ± 10%: {hits:?}"
        );
    }
    Ok(())
}

/// Opens a tunnel to `host` and asks the backend its name.
async fn tunnel(
    node: &TestNode,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(WsClient, String)> {
    let (mut ws, _) = client::ws_connect(node.http, host, "/", headers).await?;
    ws.send(Message::text("whoami?")).await?;
    let name = loop {
        match tokio::time::timeout(client::IO_TIMEOUT, ws.next())
            .await
            .context("no whoami answer")?
        {
            Some(Ok(Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => continue,
            other => anyhow::bail!("tunnel ended: {other:?}"),
        }
    };
    Ok((ws, name))
}

fn counts<'a>(names: impl Iterator<Item = &'a String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// This node's view of a host's upstreams, from `charon.v1.Balance`.
async fn upstream_status(
    node: &TestNode,
    host: &str,
) -> Result<Vec<charon_proto::v1::UpstreamStatus>> {
    let mut api = charon_proto::v1::balance_client::BalanceClient::with_interceptor(
        node.grpc_channel().await?,
        node.bearer()?,
    );
    Ok(api
        .upstream_status(UpstreamStatusRequest {
            id_or_domain: host.into(),
        })
        .await?
        .into_inner()
        .upstreams)
}

/// This node's tunnels per upstream URL.
async fn tunnels_per_upstream(node: &TestNode, host: &str) -> Result<HashMap<String, u64>> {
    let rows = upstream_status(node, host).await?;
    Ok(rows.into_iter().map(|r| (r.url, r.open_tunnels)).collect())
}

/// This node's health state per upstream URL.
async fn states(node: &TestNode, host: &str) -> Result<HashMap<String, String>> {
    let rows = upstream_status(node, host).await?;
    Ok(rows.into_iter().map(|r| (r.url, r.state)).collect())
}

/// 300 long-lived tunnels over 3 backends with least-conn; one backend's
/// tunnels close; the next 100 all go to it, so all three end even
/// (within 10%). Round-robin would have put a third there.
#[tokio::test]
async fn least_conn_refills_the_backend_whose_tunnels_closed() -> Result<()> {
    let node = TestNode::start().await?;
    let (_backends, urls) = echo_backends("l", 3).await?;
    let balancing = Balancing {
        lb: "least-conn".into(),
        ..Default::default()
    };
    add_balanced(&node, "least.test", &urls, balancing).await?;
    let mut open = Vec::new();
    for _ in 0..300 {
        open.push(tunnel(&node, "least.test", &[]).await?);
    }
    let c = counts(open.iter().map(|(_, n)| n));
    ensure!(c.values().all(|n| *n == 100), "first 300: {c:?}");
    // Every tunnel on l0 closes (its clients go away).
    let (closing, mut kept): (Vec<_>, Vec<_>) = open.into_iter().partition(|(_, n)| n == "l0");
    for (mut ws, _) in closing {
        ws.close(None).await?;
        while let Some(Ok(_)) = ws.next().await {}
    }
    eventually(Duration::from_secs(10), || async {
        let t = tunnels_per_upstream(&node, "least.test").await?;
        ensure!(
            t.get(&urls[0]) == Some(&0),
            "proxy still counts tunnels on l0: {t:?}"
        );
        Ok(())
    })
    .await?;
    for _ in 0..100 {
        kept.push(tunnel(&node, "least.test", &[]).await?);
    }
    let c = counts(kept.iter().map(|(_, n)| n));
    for name in ["l0", "l1", "l2"] {
        let n = c.get(name).copied().unwrap_or(0);
        ensure!(
            (90..=110).contains(&n),
            "{name} has {n} tunnels, want 100 ± 10%: {c:?}"
        );
    }
    let t = tunnels_per_upstream(&node, "least.test").await?;
    ensure!(t.values().all(|n| *n == 100), "host show's view: {t:?}");
    Ok(())
}

const SECRET: &str = "balancing-cluster-secret-0123456789";
const TOKEN: &str = "balancing-test-token-0123456789";

fn member(name: &str) -> TestNodeBuilder {
    TestNode::builder()
        .name(name)
        .cluster_secret(SECRET)
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        .args(["--anti-entropy-secs", "1"])
}

/// hash:cookie=sid in a 3-node cluster: each client lands on the same
/// backend across 20 reconnects through the three nodes in turn, and
/// different clients spread over the backends (twelve clients all on one
/// of three backends would happen once in 177,000 runs).
#[tokio::test]
async fn cookie_hash_is_the_same_on_every_node() -> Result<()> {
    let n1 = member("b1").start().await?;
    let n2 = member("b2").seeds(&[&n1]).start().await?;
    let n3 = member("b3").seeds(&[&n1]).start().await?;
    let (_backends, urls) = echo_backends("c", 3).await?;
    let balancing = Balancing {
        lb: "hash:cookie=sid".into(),
        ..Default::default()
    };
    add_balanced(&n1, "sticky.test", &urls, balancing).await?;
    let nodes = [&n1, &n2, &n3];
    for n in &nodes[1..] {
        n.wait_routed("sticky.test").await?;
    }
    let mut seen = HashMap::new();
    for client in 0..12 {
        let cookie = format!("theme=dark; sid=client-{client}");
        let mut names = Vec::new();
        for i in 0..20 {
            let (mut ws, name) =
                tunnel(nodes[i % 3], "sticky.test", &[("cookie", &cookie)]).await?;
            ws.close(None).await?;
            names.push(name);
        }
        ensure!(
            names.iter().all(|n| *n == names[0]),
            "client {client} moved between backends: {names:?}"
        );
        seen.insert(client, names[0].clone());
    }
    let distinct: std::collections::HashSet<_> = seen.values().collect();
    ensure!(
        distinct.len() > 1,
        "six clients all on one backend: {seen:?}"
    );
    Ok(())
}

/// One dominant key (every tunnel sends the same header): bounded load
/// keeps every backend at most ~1.25 × the mean.
#[tokio::test]
async fn bounded_load_holds_with_one_dominant_key() -> Result<()> {
    let node = TestNode::start().await?;
    let (_backends, urls) = echo_backends("h", 3).await?;
    let balancing = Balancing {
        lb: "hash:header=x-user".into(),
        ..Default::default()
    };
    add_balanced(&node, "hot.test", &urls, balancing).await?;
    let mut open = Vec::new();
    for _ in 0..60 {
        open.push(tunnel(&node, "hot.test", &[("x-user", "celebrity")]).await?);
    }
    let c = counts(open.iter().map(|(_, n)| n));
    let max = c.values().copied().max().unwrap_or(0);
    // Mean 20; the bound is checked before each new tunnel, so 26 at most.
    ensure!(
        max <= 27,
        "one backend took {max} of 60 (bound 1.25 × 20 + 1): {c:?}"
    );
    ensure!(
        c.len() == 3,
        "the hot key spilled over every backend: {c:?}"
    );
    Ok(())
}

/// A cap of 2 per upstream: with two tunnels open, a request waits the
/// queue timeout, then gets a readable 503, over HTTP/1.1 and h2c; once a
/// tunnel closes, requests go through again.
#[tokio::test]
async fn a_cap_answers_503_after_the_queue_timeout() -> Result<()> {
    let node = TestNode::start().await?;
    let ws = WsEchoBackend::start("capped").await?;
    let balancing = Balancing {
        max_conns: 2,
        queue_timeout_ms: 300,
        ..Default::default()
    };
    add_balanced(&node, "cap.test", &[ws.url()], balancing).await?;
    let (mut first, _) = tunnel(&node, "cap.test", &[]).await?;
    let (_second, _) = tunnel(&node, "cap.test", &[]).await?;
    for h2 in [false, true] {
        let started = Instant::now();
        let r = if h2 {
            client::h2_get(node.http, "cap.test", "/").await?
        } else {
            client::get(node.http, "cap.test", "/").await?
        };
        let waited = started.elapsed();
        ensure!(r.status == 503, "h2={h2}: {} {}", r.status, r.text());
        ensure!(
            r.text().starts_with("503 Service Unavailable: ") && r.text().contains("cap"),
            "h2={h2}: body {:?}",
            r.text()
        );
        ensure!(
            waited >= Duration::from_millis(280),
            "h2={h2}: answered after {waited:?}, before the queue timeout"
        );
    }
    first.close(None).await?;
    while let Some(Ok(_)) = first.next().await {}
    drop(first);
    eventually(Duration::from_secs(5), || async {
        let r = client::get(node.http, "cap.test", "/").await?;
        // The WebSocket backend answers a plain GET itself (not 503).
        ensure!(r.status != 503, "still capped: {}", r.text());
        Ok(())
    })
    .await
}

/// charonctl: weights on --upstream, --lb, --upstream-max-conns; `host
/// show` prints them and the per-upstream table; -o json carries them;
/// a bad policy is refused naming the field, and nothing is written.
#[tokio::test]
async fn charonctl_sets_and_shows_balancing() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    let wa = format!("{}@weight=3", a.url());
    let out = node
        .ctl(&[
            "host",
            "add",
            "ctl.test",
            "--upstream",
            &wa,
            "--upstream",
            &b.url(),
            "--lb",
            "least-conn",
            "--upstream-max-conns",
            "50",
            "--location",
            &format!("/ws={};lb=hash:ip", b.url()),
        ])
        .await?;
    ensure!(
        out.status.success(),
        "add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.ctl(&["host", "show", "ctl.test"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "least-conn",
        "weights:",
        "=3",
        "50 per upstream",
        "lb=hash:ip",
        "UPSTREAM",
        "unchecked",
    ] {
        ensure!(text.contains(want), "host show lacks {want:?}:\n{text}");
    }
    let out = node
        .ctl(&["-o", "json", "host", "show", "ctl.test"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["balancing"]["lb"] == "least-conn", "{v}");
    ensure!(v["balancing"]["weights"][a.url()] == 3, "{v}");
    ensure!(v["balancing"]["max_conns"] == 50, "{v}");
    ensure!(v["locations"][0]["balancing"]["lb"] == "hash:ip", "{v}");
    let out = node
        .ctl(&["host", "update", "ctl.test", "--lb", "fastest"])
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("balancing.lb"),
        "{err}"
    );
    let out = node
        .ctl(&["-o", "json", "host", "show", "ctl.test"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["balancing"]["lb"] == "least-conn",
        "a refused update wrote: {v}"
    );
    let out = node
        .ctl(&[
            "host",
            "update",
            "ctl.test",
            "--lb",
            "round-robin",
            "--upstream-max-conns",
            "0",
        ])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node
        .ctl(&["-o", "json", "host", "show", "ctl.test"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["balancing"]["weights"][a.url()] == 3, "weights kept: {v}");
    ensure!(v["balancing"]["lb"] == "", "{v}");
    let out = node
        .ctl(&[
            "host",
            "update",
            "ctl.test",
            "--health-path",
            "/healthz",
            "--health-interval",
            "500ms",
            "--health-status",
            "200-299",
        ])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(5), || async {
        let out = node.ctl(&["host", "show", "ctl.test"]).await?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        ensure!(
            text.contains(
                "GET /healthz every 500 ms (timeout 500 ms, rise 2, fall 3, status 200-299)"
            ),
            "{text}"
        );
        ensure!(
            text.matches(" healthy ").count() == 2,
            "both upstreams checked healthy:\n{text}"
        );
        Ok(())
    })
    .await?;
    let out = node
        .ctl(&["host", "update", "ctl.test", "--no-health-check"])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node
        .ctl(&["-o", "json", "host", "show", "ctl.test"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["balancing"]["health"].is_null(), "checks off: {v}");
    Ok(())
}

/// A backend's fixed answer: `status` with its name as the body.
fn answer(status: &str, name: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    )
    .into_bytes()
}

/// Active checks every 200 ms, fall 3, rise 2: a backend answering 503 is
/// out within fall × interval (plus a check's slack), no request fails
/// meanwhile since two others are up; back within rise × interval once
/// it answers 200; with every backend failing, requests still try one
/// (the backend's own 503 comes back, not a proxy error).
#[tokio::test]
async fn health_checks_take_a_backend_out_and_back() -> Result<()> {
    let node = TestNode::start().await?;
    let mut b = Vec::new();
    for name in ["k0", "k1", "k2"] {
        b.push(RecordingBackend::start_answering(&answer("200 OK", name)).await?);
    }
    let urls: Vec<String> = b.iter().map(RecordingBackend::url).collect();
    let balancing = Balancing {
        health: Some(HealthCheck {
            path: "/healthz".into(),
            interval_ms: 200,
            timeout_ms: 150,
            rise: 2,
            fall: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    add_balanced(&node, "health.test", &urls, balancing).await?;
    let state_of = |want: &'static str, url: String| {
        let node = &node;
        move || {
            let url = url.clone();
            async move {
                let s = states(node, "health.test").await?;
                ensure!(
                    s.get(&url).map(String::as_str) == Some(want),
                    "{url} not {want}: {s:?}"
                );
                Ok(())
            }
        }
    };
    eventually(Duration::from_secs(5), state_of("healthy", urls[0].clone())).await?;
    // Out: 3 failed checks 200 ms apart; the first may come up to one
    // interval after the change, and a loaded machine gets 500 ms more.
    b[0].answer_with(&answer("503 Service Unavailable", "k0"));
    let t0 = Instant::now();
    eventually(
        Duration::from_secs(5),
        state_of("unhealthy", urls[0].clone()),
    )
    .await?;
    let out_after = t0.elapsed();
    ensure!(
        out_after <= Duration::from_millis(3 * 200 + 200 + 500),
        "out after {out_after:?}"
    );
    for _ in 0..60 {
        let r = client::get(node.http, "health.test", "/").await?;
        ensure!(
            r.status == 200 && r.text() != "k0",
            "{} {}",
            r.status,
            r.text()
        );
    }
    b[0].answer_with(&answer("200 OK", "k0"));
    let t1 = Instant::now();
    eventually(Duration::from_secs(5), state_of("healthy", urls[0].clone())).await?;
    let back_after = t1.elapsed();
    ensure!(
        back_after <= Duration::from_millis(2 * 200 + 200 + 500),
        "back after {back_after:?}"
    );
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(client::get(node.http, "health.test", "/").await?.text());
    }
    ensure!(
        names.iter().any(|n| n == "k0"),
        "k0 gets no requests again: {names:?}"
    );
    // Every backend failing: try anyway.
    for (x, name) in b.iter().zip(["k0", "k1", "k2"]) {
        x.answer_with(&answer("503 Service Unavailable", name));
    }
    for url in &urls {
        eventually(Duration::from_secs(5), state_of("unhealthy", url.clone())).await?;
    }
    let r = client::get(node.http, "health.test", "/").await?;
    ensure!(
        r.status == 503 && r.text().starts_with('k'),
        "all unhealthy: {} {:?} (want a backend's own answer)",
        r.status,
        r.text()
    );
    ensure!(
        node.log().contains("upstream unhealthy"),
        "state change not logged"
    );
    let metrics = client::get(node.admin, "localhost", "/metrics")
        .await?
        .text();
    ensure!(
        metrics.contains(&format!(
            "charon_upstream_healthy{{upstream=\"{}\",path=\"/healthz\"}} 0",
            urls[0]
        )),
        "metrics lack the health gauge"
    );
    Ok(())
}

/// What one tunnel saw when the proxy closed it.
struct Closed {
    code: Option<u16>,
    at: Instant,
}

/// Reads `ws` until it ends (answering a Close as tungstenite does) and
/// reports the close code the proxy sent and when.
fn watch_close(mut ws: WsClient) -> tokio::task::JoinHandle<Closed> {
    tokio::spawn(async move {
        let mut code = None;
        let mut at = Instant::now();
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(frame) = m {
                code = frame.map(|f| u16::from(f.code));
                at = Instant::now();
            }
        }
        Closed { code, at }
    })
}

/// Upstream drain on a 2-node cluster through charonctl: both nodes stop
/// choosing the upstream at once (new tunnels avoid it), every tunnel on
/// it gets 1001 by deadline + spread on both nodes (both ends: the
/// backend records 1001 too), none on the other upstream is touched;
/// `--wait` exits 0 once no node has a tunnel on it; undrain brings it
/// back.
#[tokio::test]
async fn upstream_drain_closes_its_tunnels_on_every_node() -> Result<()> {
    let n1 = member("d1").start().await?;
    let n2 = member("d2").seeds(&[&n1]).start().await?;
    let (b, urls) = echo_backends("d", 2).await?;
    add_balanced(&n1, "drain.test", &urls, Balancing::default()).await?;
    n2.wait_routed("drain.test").await?;
    let (mut on_d0, mut on_d1) = (Vec::new(), Vec::new());
    for n in [&n1, &n2] {
        for _ in 0..10 {
            let (ws, name) = tunnel(n, "drain.test", &[]).await?;
            if name == "d0" {
                on_d0.push(watch_close(ws));
            } else {
                on_d1.push(ws);
            }
        }
    }
    ensure!(
        on_d0.len() == 10 && on_d1.len() == 10,
        "round-robin split: {} / {}",
        on_d0.len(),
        on_d1.len()
    );
    let t0 = Instant::now();
    let drain = [
        "host",
        "upstream",
        "drain",
        "drain.test",
        &urls[0],
        "--deadline",
        "3s",
        "--spread",
        "1s",
        "--wait",
        "--wait-timeout",
        "20s",
    ];
    // charonctl follows the drain while new tunnels are opened meanwhile.
    let meanwhile = async {
        for n in [&n1, &n2] {
            eventually(Duration::from_secs(3), || async {
                let s = states(n, "drain.test").await?;
                ensure!(
                    s.get(&urls[0]).map(String::as_str) == Some("draining"),
                    "{s:?}"
                );
                Ok(())
            })
            .await?;
        }
        for n in [&n1, &n2] {
            for _ in 0..4 {
                let (ws, name) = tunnel(n, "drain.test", &[]).await?;
                ensure!(name == "d1", "a new tunnel went to the draining upstream");
                on_d1.push(ws);
            }
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(3),
            "too slow to test before the deadline"
        );
        Ok::<_, anyhow::Error>(())
    };
    let (out, meanwhile) = tokio::join!(n1.ctl(&drain), meanwhile);
    meanwhile?;
    let out = out?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "drain --wait: {err}");
    ensure!(err.contains("no tunnels or requests left"), "{err}");
    for w in on_d0 {
        let c = w.await?;
        ensure!(c.code == Some(1001), "a d0 tunnel closed with {:?}", c.code);
        let by = c.at.duration_since(t0);
        ensure!(
            by <= Duration::from_millis(3000 + 1000 + 1500),
            "closed after {by:?}"
        );
        ensure!(
            by >= Duration::from_millis(2500),
            "closed before the deadline: {by:?}"
        );
    }
    eventually(Duration::from_secs(5), || async {
        let codes = b[0].close_codes();
        ensure!(
            codes.len() == 10 && codes.iter().all(|c| *c == 1001),
            "d0 saw {codes:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(
        b[1].close_codes().is_empty(),
        "d1 tunnels were closed: {:?}",
        b[1].close_codes()
    );
    for ws in on_d1.iter_mut() {
        ws.send(Message::text("whoami?")).await?;
        let m = tokio::time::timeout(client::IO_TIMEOUT, ws.next()).await?;
        ensure!(
            matches!(m, Some(Ok(Message::Text(_)))),
            "a d1 tunnel is gone: {m:?}"
        );
    }
    let out = n2
        .ctl(&["host", "upstream", "undrain", "drain.test", &urls[0]])
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(5), || async {
        let (_ws, name) = tunnel(&n1, "drain.test", &[]).await?;
        ensure!(name == "d0", "d0 gets no tunnels after undrain");
        Ok(())
    })
    .await
}

/// Cookie mode (`set_cookie`): a client without the cookie gets one with
/// the 101 (and with a plain response, over HTTP/1.1 and h2c) and, sending
/// it back, sticks to the backend it was given.
#[tokio::test]
async fn cookie_mode_gives_new_clients_a_sticky_cookie() -> Result<()> {
    let node = TestNode::start().await?;
    let (_backends, urls) = echo_backends("s", 3).await?;
    let balancing = Balancing {
        lb: "hash:cookie=charon_sticky".into(),
        set_cookie: true,
        ..Default::default()
    };
    add_balanced(&node, "cookie.test", &urls, balancing).await?;
    let mut firsts = Vec::new();
    for _ in 0..6 {
        let (mut ws, resp) = client::ws_connect(node.http, "cookie.test", "/", &[]).await?;
        let set = resp
            .headers()
            .get("set-cookie")
            .context("no Set-Cookie on the 101")?
            .to_str()?
            .to_string();
        ensure!(
            set.starts_with("charon_sticky=") && set.contains("HttpOnly"),
            "{set}"
        );
        ws.send(Message::text("whoami?")).await?;
        let first = match ws.next().await {
            Some(Ok(Message::Text(t))) => t.to_string(),
            other => anyhow::bail!("{other:?}"),
        };
        let cookie = set.split(';').next().unwrap_or_default().to_string();
        for _ in 0..5 {
            let (mut again, resp) =
                client::ws_connect(node.http, "cookie.test", "/", &[("cookie", &cookie)]).await?;
            ensure!(
                resp.headers().get("set-cookie").is_none(),
                "a cookie was set again"
            );
            again.send(Message::text("whoami?")).await?;
            match again.next().await {
                Some(Ok(Message::Text(t))) => {
                    ensure!(t.as_str() == first, "moved from {first} to {t}")
                }
                other => anyhow::bail!("{other:?}"),
            }
            again.close(None).await?;
            while let Some(Ok(_)) = again.next().await {}
        }
        firsts.push(first);
    }
    let distinct: std::collections::HashSet<_> = firsts.iter().collect();
    ensure!(
        distinct.len() > 1,
        "new clients all sent to one backend: {firsts:?}"
    );
    // Plain requests, over both front ends, with HTTP backends.
    let e = [
        EchoBackend::start("e0").await?,
        EchoBackend::start("e1").await?,
    ];
    let urls: Vec<String> = e.iter().map(|x| x.url()).collect();
    let balancing = Balancing {
        lb: "hash:cookie=charon_sticky".into(),
        set_cookie: true,
        ..Default::default()
    };
    add_balanced(&node, "cookie-http.test", &urls, balancing).await?;
    let name = |r: &client::HttpResponse| -> Result<String> {
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        Ok(v["name"].as_str().unwrap_or_default().to_string())
    };
    for h2 in [false, true] {
        let r = if h2 {
            client::h2_get(node.http, "cookie-http.test", "/").await?
        } else {
            client::get(node.http, "cookie-http.test", "/").await?
        };
        let set = r
            .headers
            .get("set-cookie")
            .context("no Set-Cookie")?
            .to_str()?;
        ensure!(set.starts_with("charon_sticky="), "h2={h2}: {set}");
        let cookie = set.split(';').next().unwrap_or_default().to_string();
        let first = name(&r)?;
        for _ in 0..5 {
            let r = client::request(
                node.http,
                http::Method::GET,
                "cookie-http.test",
                "/",
                &[("cookie", &cookie)],
                Bytes::new(),
            )
            .await?;
            ensure!(r.headers.get("set-cookie").is_none(), "set again");
            ensure!(name(&r)? == first, "h2={h2}: moved from {first}");
        }
    }
    Ok(())
}
