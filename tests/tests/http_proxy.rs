//! The HTTP proxy: routing by Host, wildcards, locations, round-robin and
//! failover, forwarded and hop-by-hop headers, streamed bodies, h2c, and the
//! error statuses 400, 404, 502 and 504.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use charon_proto::v1::{CreateHostRequest, Location, ProxyHost};
use charon_tests::backends::{refused_addr, SilentBackend};
use charon_tests::client::{self, HttpResponse};
use charon_tests::{host_request, pattern_byte, pattern_chunk, procfs, EchoBackend, TestNode};
use http::{Method, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const MIB: u64 = 1024 * 1024;

/// The values the echo backend received for header `name` (lower case).
fn echoed(resp: &HttpResponse, name: &str) -> Vec<String> {
    let json = resp.json().unwrap_or_default();
    json["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Comma-separated list values of header `name`, over all its lines.
fn echoed_list(resp: &HttpResponse, name: &str) -> Vec<String> {
    echoed(resp, name)
        .iter()
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .collect()
}

async fn expect_backend(
    node: &TestNode,
    host: &str,
    path: &str,
    want: &str,
) -> Result<HttpResponse> {
    let resp = client::get(node.http, host, path).await?;
    ensure!(
        resp.status == 200,
        "GET {path} with Host {host}: status {}, body {}",
        resp.status,
        resp.text()
    );
    ensure!(
        resp.backend_name().as_deref() == Some(want),
        "GET {path} with Host {host} reached {:?}, expected {want}",
        resp.backend_name()
    );
    Ok(resp)
}

#[tokio::test]
async fn routes_by_exact_host() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    node.add_host(&["a.test"], &[a.url()]).await?;
    node.add_host(&["b.test", "b2.test"], &[b.url()]).await?;

    expect_backend(&node, "a.test", "/x", "a").await?;
    expect_backend(&node, "b.test", "/x", "b").await?;
    expect_backend(&node, "b2.test", "/x", "b").await?;
    // Host names are case-insensitive, and a port in Host does not change the host.
    expect_backend(&node, "B.Test", "/x", "b").await?;
    expect_backend(&node, "a.test:8080", "/x", "a").await?;

    // Method, path with query and body reach the upstream unchanged.
    let resp = client::request(
        node.http,
        Method::POST,
        "a.test",
        "/p/q?x=1&y=2",
        &[("content-type", "text/plain")],
        "hello body",
    )
    .await?;
    let json = resp.json()?;
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/p/q?x=1&y=2");
    assert_eq!(json["body_len"], 10);
    Ok(())
}

#[tokio::test]
async fn unknown_host_is_404_naming_the_host() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["known.test"], &[a.url()]).await?;
    let resp = client::get(node.http, "nobody-here.test", "/").await?;
    assert_eq!(resp.status, 404, "body: {}", resp.text());
    assert!(
        resp.text().contains("nobody-here.test"),
        "the 404 body does not name the host: {:?}",
        resp.text()
    );
    assert_eq!(a.hits(), 1, "only the readiness probe reached the backend");
    Ok(())
}

#[tokio::test]
async fn wildcard_domains_and_exact_precedence() -> Result<()> {
    let node = TestNode::start().await?;
    let wild = EchoBackend::start("wild").await?;
    let exact = EchoBackend::start("exact").await?;
    node.add_host(&["*.wild.test"], &[wild.url()]).await?;
    node.add_host(&["exact.wild.test"], &[exact.url()]).await?;

    expect_backend(&node, "x.wild.test", "/", "wild").await?;
    expect_backend(&node, "other.wild.test", "/", "wild").await?;
    expect_backend(&node, "exact.wild.test", "/", "exact").await?;
    // The wildcard does not cover the bare domain.
    let resp = client::get(node.http, "wild.test", "/").await?;
    assert_eq!(resp.status, 404, "wild.test: {}", resp.text());
    Ok(())
}

#[tokio::test]
async fn ip_literal_domain() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("ip").await?;
    node.add_host(&["127.0.0.1"], &[a.url()]).await?;
    let host = format!("127.0.0.1:{}", node.http.port());
    expect_backend(&node, &host, "/", "ip").await?;
    let resp = client::get(node.http, &format!("127.0.0.2:{}", node.http.port()), "/").await?;
    assert_eq!(resp.status, 404, "127.0.0.2: {}", resp.text());
    Ok(())
}

#[tokio::test]
async fn longest_location_prefix_wins() -> Result<()> {
    let node = TestNode::start().await?;
    let root = EchoBackend::start("root").await?;
    let api = EchoBackend::start("api").await?;
    let v2 = EchoBackend::start("v2").await?;
    let mut req = host_request(&["loc.test"], &[root.url()]);
    req.host.as_mut().unwrap().locations = vec![
        Location {
            path_prefix: "/api".into(),
            upstreams: vec![api.url()],
            balancing: None,
            ..Default::default()
        },
        Location {
            path_prefix: "/api/v2".into(),
            upstreams: vec![v2.url()],
            balancing: None,
            ..Default::default()
        },
    ];
    node.create_host(req).await?;
    node.wait_routed("loc.test").await?;

    let resp = expect_backend(&node, "loc.test", "/api/v2/users?x=1", "v2").await?;
    assert_eq!(resp.json()?["path"], "/api/v2/users?x=1", "path changed");
    expect_backend(&node, "loc.test", "/api/v2", "v2").await?;
    expect_backend(&node, "loc.test", "/api/users", "api").await?;
    expect_backend(&node, "loc.test", "/api", "api").await?;
    expect_backend(&node, "loc.test", "/other", "root").await?;
    expect_backend(&node, "loc.test", "/", "root").await?;
    Ok(())
}

#[tokio::test]
async fn round_robin_over_upstreams() -> Result<()> {
    let node = TestNode::start().await?;
    let backends = [
        EchoBackend::start("r0").await?,
        EchoBackend::start("r1").await?,
        EchoBackend::start("r2").await?,
    ];
    let urls: Vec<String> = backends.iter().map(EchoBackend::url).collect();
    node.add_host(&["rr.test"], &urls).await?;

    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..30 {
        let resp = client::get(node.http, "rr.test", "/").await?;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let name = resp.backend_name().context("no backend name")?;
        order.push(name.clone());
        *counts.entry(name).or_default() += 1;
    }
    for b in &backends {
        let n = counts.get(&b.name).copied().unwrap_or(0);
        assert!(
            (9..=11).contains(&n),
            "{} got {n} of 30 requests; order: {order:?}",
            b.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn refused_upstream_fails_over() -> Result<()> {
    let node = TestNode::start().await?;
    let live = EchoBackend::start("live").await?;
    let dead = format!("http://{}", refused_addr());
    node.add_host(&["fo.test"], &[dead, live.url()]).await?;
    for i in 0..20 {
        let resp = client::get(node.http, "fo.test", "/").await?;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.backend_name().as_deref(), Some("live"));
    }

    // A request body is not lost on the way past a refusing upstream.
    let upload = pattern_chunk(0, 1 << 20);
    for i in 0..4 {
        let resp = client::request(
            node.http,
            Method::POST,
            "fo.test",
            "/upload",
            &[],
            upload.clone(),
        )
        .await?;
        assert_eq!(resp.status, 200, "upload {i}: {}", resp.text());
        let json = resp.json()?;
        assert_eq!(json["bytes"].as_u64(), Some(1 << 20), "upload {i}: {json}");
        assert_eq!(json["pattern_ok"], true, "upload {i}: {json}");
    }

    // An upstream that goes away while configured is also skipped.
    let second = EchoBackend::start("second").await?;
    let third = EchoBackend::start("third").await?;
    node.add_host(&["fo2.test"], &[second.url(), third.url()])
        .await?;
    second.stop();
    for i in 0..10 {
        let resp = client::get(node.http, "fo2.test", "/").await?;
        assert_eq!(resp.status, 200, "request {i} after stop: {}", resp.text());
        assert_eq!(resp.backend_name().as_deref(), Some("third"));
    }
    Ok(())
}

#[tokio::test]
async fn all_upstreams_refused_is_502() -> Result<()> {
    let node = TestNode::start().await?;
    let upstreams = [
        format!("http://{}", refused_addr()),
        format!("http://{}", refused_addr()),
    ];
    node.add_host(&["dead.test"], &upstreams).await?;
    for _ in 0..3 {
        let started = Instant::now();
        let resp = client::get(node.http, "dead.test", "/").await?;
        assert_eq!(resp.status, 502, "body: {}", resp.text());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "502 took {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test]
async fn host_upstream_timeout_is_504() -> Result<()> {
    let node = TestNode::start().await?;
    let slow = EchoBackend::start("slow").await?;
    let mut req = host_request(&["slow.test"], &[slow.url()]);
    req.host.as_mut().unwrap().upstream_timeout_ms = 300;
    node.create_host(req).await?;
    node.wait_routed("slow.test").await?;

    let started = Instant::now();
    let resp = client::get(node.http, "slow.test", "/slow?ms=10000").await?;
    let took = started.elapsed();
    assert_eq!(resp.status, 504, "body: {}", resp.text());
    assert!(took < Duration::from_secs(5), "504 came after {took:?}");
    // Fast answers on the same host are unaffected.
    expect_backend(&node, "slow.test", "/slow?ms=10", "slow").await?;
    Ok(())
}

#[tokio::test]
async fn node_default_upstream_timeout_is_504() -> Result<()> {
    let node = TestNode::builder().upstream_timeout_ms(300).start().await?;
    let silent = SilentBackend::start().await?;
    node.add_host(&["silent.test"], &[silent.url()]).await?;
    let started = Instant::now();
    let resp = client::get(node.http, "silent.test", "/").await?;
    let took = started.elapsed();
    assert_eq!(resp.status, 504, "body: {}", resp.text());
    assert!(took < Duration::from_secs(5), "504 came after {took:?}");
    assert!(silent.accepted() >= 1, "the upstream was never contacted");
    Ok(())
}

/// Sends each raw request for `domain` (routed to a fresh echo backend) on
/// its own connection and expects 400, the connection's end, and nothing
/// reaching the upstream.
async fn expect_refused_with_400(domain: &str, cases: &[&[u8]]) -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&[domain], &[a.url()]).await?;
    let hits = a.hits();
    for raw in cases {
        let resp = client::raw_exchange(node.http, raw).await?;
        assert_eq!(
            client::raw_status(&resp),
            Some(400),
            "request {:?} got {resp:?}",
            String::from_utf8_lossy(raw)
        );
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "a refused request must end the connection: {resp:?}"
        );
    }
    assert_eq!(a.hits(), hits, "a refused request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn malformed_requests_are_400() -> Result<()> {
    expect_refused_with_400(
        "a.test",
        &[
            b"GET / HTTP/1.1\r\nHost: a.test\r\nthis line is not a header\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: twelve\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nBad Name: x\r\n\r\n",
        ],
    )
    .await
}

#[tokio::test]
async fn forwarded_headers_from_untrusted_peer_are_replaced() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["fwd.test"], &[a.url()]).await?;
    let spoofed = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "443"),
    ];
    let resp = client::request(node.http, Method::GET, "fwd.test", "/", &spoofed, "").await?;
    assert_eq!(resp.status, 200);
    let port = node.http.port().to_string();
    assert_eq!(echoed(&resp, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echoed(&resp, "x-real-ip"), ["127.0.0.1"]);
    assert_eq!(echoed(&resp, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed(&resp, "x-forwarded-host"), ["fwd.test"]);
    assert_eq!(echoed(&resp, "x-forwarded-port"), [port.as_str()]);
    assert_eq!(echoed(&resp, "host"), ["fwd.test"], "Host not preserved");
    Ok(())
}

#[tokio::test]
async fn forwarded_headers_from_trusted_peer_are_kept_and_appended() -> Result<()> {
    let node = TestNode::builder()
        .trusted_proxy("127.0.0.0/8")
        .start()
        .await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["fwd.test"], &[a.url()]).await?;
    let incoming = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "orig.example"),
        ("X-Forwarded-Port", "443"),
    ];
    let resp = client::request(node.http, Method::GET, "fwd.test", "/", &incoming, "").await?;
    assert_eq!(resp.status, 200);
    assert_eq!(
        echoed_list(&resp, "x-forwarded-for"),
        ["203.0.113.9", "127.0.0.1"]
    );
    assert_eq!(echoed(&resp, "x-forwarded-proto"), ["https"]);
    assert_eq!(echoed(&resp, "x-forwarded-host"), ["orig.example"]);
    assert_eq!(echoed(&resp, "x-forwarded-port"), ["443"]);
    assert_eq!(echoed(&resp, "host"), ["fwd.test"]);

    // A trusted peer that sends nothing gets the usual values.
    let resp = client::get(node.http, "fwd.test", "/").await?;
    assert_eq!(echoed_list(&resp, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echoed(&resp, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed(&resp, "x-forwarded-host"), ["fwd.test"]);
    Ok(())
}

#[tokio::test]
async fn forwarded_headers_can_be_switched_off_and_host_rewritten() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let req = CreateHostRequest {
        host: Some(ProxyHost {
            domains: vec!["plain.test".into()],
            upstreams: vec![a.url()],
            ..Default::default()
        }),
        preserve_host: Some(false),
        forwarded_headers: Some(false),
        ..Default::default()
    };
    node.create_host(req).await?;
    node.wait_routed("plain.test").await?;
    let resp = client::get(node.http, "plain.test", "/").await?;
    assert_eq!(resp.status, 200);
    assert_eq!(
        echoed(&resp, "host"),
        [a.addr.to_string()],
        "Host is not the upstream's authority"
    );
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        assert!(
            echoed(&resp, name).is_empty(),
            "{name} was added although switched off"
        );
    }
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["hop.test"], &[a.url()]).await?;
    let headers = [
        ("Connection", "keep-alive, X-Custom-Hop"),
        ("X-Custom-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("X-End-To-End", "yes"),
    ];
    let resp = client::request(node.http, Method::GET, "hop.test", "/", &headers, "").await?;
    assert_eq!(resp.status, 200);
    for name in ["x-custom-hop", "keep-alive", "proxy-connection"] {
        assert!(
            echoed(&resp, name).is_empty(),
            "hop-by-hop header {name} reached the upstream: {:?}",
            echoed(&resp, name)
        );
    }
    let connection = echoed(&resp, "connection").join(",").to_ascii_lowercase();
    assert!(
        !connection.contains("x-custom-hop"),
        "Connection: {connection}"
    );
    assert_eq!(echoed(&resp, "x-end-to-end"), ["yes"]);
    Ok(())
}

#[tokio::test]
async fn one_client_connection_routes_each_request() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    node.add_host(&["a.test"], &[a.url()]).await?;
    node.add_host(&["b.test"], &[b.url()]).await?;
    let mut conn = client::http1_connect(node.http).await?;
    for (host, want) in [("a.test", "a"), ("b.test", "b"), ("a.test", "a")] {
        let req = client::build_request(Method::GET, host, "/", &[], Bytes::new())?;
        let resp = HttpResponse::read(conn.send_request(req).await?).await?;
        assert_eq!(resp.backend_name().as_deref(), Some(want), "Host {host}");
    }
    Ok(())
}

#[tokio::test]
async fn h2_prior_knowledge_clients_are_proxied() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("h2").await?;
    node.add_host(&["h2.test"], &[a.url()]).await?;
    let resp = client::h2_get(node.http, "h2.test", "/over/h2?q=1").await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.backend_name().as_deref(), Some("h2"));
    let json = resp.json()?;
    assert_eq!(json["path"], "/over/h2?q=1");
    assert_eq!(
        echoed(&resp, "host"),
        ["h2.test"],
        "the :authority did not become Host"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_is_streamed() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("big").await?;
    node.add_host(&["big.test"], &[a.url()]).await?;
    let pid = node.pid().context("no pid")?;
    procfs::reset_peak_rss(pid);
    let peak_before = procfs::peak_rss_kib(pid).context("no VmHWM")?;

    let total = 64 * MIB;
    let req = client::build_request(
        Method::GET,
        "big.test",
        &format!("/stream?bytes={total}"),
        &[],
        Bytes::new(),
    )?;
    let resp = client::send(node.http, req).await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut n, mut mismatches) = (0u64, 0u64);
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                for b in data.iter() {
                    mismatches += u64::from(*b != pattern_byte(n));
                    n += 1;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .context("body not read within 120 s")??;
    assert_eq!(n, total, "received {n} of {total} bytes");
    assert_eq!(mismatches, 0, "corrupted bytes");

    let peak_after = procfs::peak_rss_kib(pid).context("no VmHWM")?;
    let grew = peak_after.saturating_sub(peak_before);
    println!(
        "node peak RSS grew by {grew} KiB while streaming a {} MiB response",
        total / MIB
    );
    assert!(
        grew < 32 * 1024,
        "node peak RSS grew by {grew} KiB for a 64 MiB body: it buffers instead of streaming"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_is_streamed() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("big").await?;
    node.add_host(&["big.test"], &[a.url()]).await?;
    let pid = node.pid().context("no pid")?;
    procfs::reset_peak_rss(pid);
    let peak_before = procfs::peak_rss_kib(pid).context("no VmHWM")?;

    let total = 64 * MIB;
    let chunks = futures_util::stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let len = (total - offset).min(64 * 1024);
        let frame = Frame::data(pattern_chunk(offset, len as usize));
        Some((Ok::<_, Infallible>(frame), offset + len))
    });
    let req = Request::post("/upload")
        .header("host", "big.test")
        .body(StreamBody::new(chunks))?;
    let resp = tokio::time::timeout(Duration::from_secs(120), async {
        HttpResponse::read(client::send(node.http, req).await?).await
    })
    .await
    .context("upload not done within 120 s")??;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let json = resp.json()?;
    assert_eq!(json["bytes"].as_u64(), Some(total), "{json}");
    assert_eq!(json["pattern_ok"], true, "upload corrupted: {json}");

    let peak_after = procfs::peak_rss_kib(pid).context("no VmHWM")?;
    let grew = peak_after.saturating_sub(peak_before);
    println!(
        "node peak RSS grew by {grew} KiB while streaming a {} MiB upload",
        total / MIB
    );
    assert!(
        grew < 32 * 1024,
        "node peak RSS grew by {grew} KiB for a 64 MiB upload: it buffers instead of streaming"
    );
    Ok(())
}

#[tokio::test]
async fn host_with_port_and_encoded_paths_reach_upstream_unchanged() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["port.test"], &[a.url()]).await?;
    let resp = client::get(node.http, "port.test:8080", "/a%2Fb/%20x;p=1?q=%2F&r=a+b").await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        echoed(&resp, "host"),
        ["port.test:8080"],
        "Host (with port) not preserved"
    );
    assert_eq!(
        resp.json()?["path"],
        "/a%2Fb/%20x;p=1?q=%2F&r=a+b",
        "path re-encoded"
    );
    Ok(())
}

#[tokio::test]
async fn requests_without_or_with_two_hosts_are_400() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["a.test"], &[a.url()]).await?;
    let hits = a.hits();
    let cases: [&[u8]; 2] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: other.test\r\n\r\n",
    ];
    for raw in cases {
        let resp = client::raw_exchange(node.http, raw).await?;
        assert_eq!(
            client::raw_status(&resp),
            Some(400),
            "request {:?} got {resp:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(a.hits(), hits, "the request reached the upstream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_all_succeed() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    node.add_host(&["many.test"], &[a.url(), b.url()]).await?;
    let http = node.http;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        tasks.spawn(async move { client::get(http, "many.test", &format!("/n/{i}")).await });
    }
    let mut ok = 0;
    while let Some(res) = tasks.join_next().await {
        let resp = res??;
        assert_eq!(resp.status, 200, "{}", resp.text());
        ok += 1;
    }
    assert_eq!(ok, 200);
    Ok(())
}

#[tokio::test]
async fn expect_100_continue_upload() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["cont.test"], &[a.url()]).await?;
    let body = pattern_chunk(0, 100_000);
    let mut tcp = tokio::net::TcpStream::connect(node.http).await?;
    tcp.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: cont.test\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    // The body goes only after 100 Continue (as curl does, with a deadline).
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .context("no 100 Continue within 10 s")??;
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(client::raw_status(&interim), Some(100), "got {interim:?}");
    tcp.write_all(&body).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut rest))
        .await
        .context("no final response")??;
    let rest = format!("{interim}{}", String::from_utf8_lossy(&rest));
    let final_part = rest
        .split("\r\n\r\n")
        .skip(1)
        .collect::<Vec<_>>()
        .join("\r\n\r\n");
    assert!(
        final_part.starts_with("HTTP/1.1 200"),
        "final response: {rest:?}"
    );
    assert!(
        final_part.contains("\"bytes\":100000") && final_part.contains("\"pattern_ok\":true"),
        "upload not received whole: {rest:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_stops_the_upstream_stream() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["abort.test"], &[a.url()]).await?;
    let req = client::build_request(
        Method::GET,
        "abort.test",
        &format!("/stream?bytes={}", 1024 * MIB),
        &[],
        Bytes::new(),
    )?;
    let resp = client::send(node.http, req).await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got < MIB as usize {
        let frame = body.frame().await.context("body ended early")??;
        got += frame.data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(a.active_streams(), 1);
    drop(body); // closes the client connection
    charon_tests::eventually(Duration::from_secs(10), || async {
        ensure!(
            a.active_streams() == 0,
            "the upstream is still streaming after the client went away"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn disabled_hosts_are_not_routed() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let mut req = host_request(&["off.test"], &[a.url()]);
    req.enabled = Some(false);
    node.create_host(req).await?;
    // A second, enabled host proves the route table has been published.
    let b = EchoBackend::start("b").await?;
    node.add_host(&["on.test"], &[b.url()]).await?;
    let resp = client::get(node.http, "off.test", "/").await?;
    assert_ne!(
        resp.status,
        200,
        "a disabled host answered: {}",
        resp.text()
    );
    assert_eq!(a.hits(), 0, "a disabled host's upstream was reached");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_is_not_cut_by_the_response_timeout() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let mut req = host_request(&["slowup.test"], &[a.url()]);
    req.host.as_mut().unwrap().upstream_timeout_ms = 1000;
    node.create_host(req).await?;
    node.wait_routed("slowup.test").await?;

    // 6 chunks 400 ms apart: the client takes ~2.4 s to send the body; the
    // upstream answers as soon as it has it.
    const CHUNK: u64 = 10 * 1024;
    let chunks = futures_util::stream::unfold(0u64, |i| async move {
        if i == 6 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(400)).await; // pacing the upload
        }
        let frame = Frame::data(pattern_chunk(i * CHUNK, CHUNK as usize));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    let req = Request::post("/upload")
        .header("host", "slowup.test")
        .body(StreamBody::new(chunks))?;
    let resp = HttpResponse::read(client::send(node.http, req).await?).await?;
    assert_eq!(
        resp.status,
        200,
        "a 2.4 s upload to an upstream that answers at once got: {}",
        resp.text()
    );
    assert_eq!(resp.json()?["bytes"].as_u64(), Some(6 * CHUNK));
    Ok(())
}

#[tokio::test]
async fn upstream_hanging_up_is_502() -> Result<()> {
    let node = TestNode::start().await?;
    let hangup = SilentBackend::start_hanging_up().await?;
    node.add_host(&["hangup.test"], &[hangup.url()]).await?;
    let resp = client::get(node.http, "hangup.test", "/").await?;
    assert_eq!(resp.status, 502, "{}", resp.text());
    Ok(())
}

#[tokio::test]
async fn absolute_form_target_wins_over_host() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    node.add_host(&["a.test"], &[a.url()]).await?;
    node.add_host(&["b.test"], &[b.url()]).await?;
    // RFC 9112 §3.2.2: with an absolute-form target the Host field is ignored.
    let resp = client::raw_exchange(
        node.http,
        b"GET http://b.test/abs?x=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(client::raw_status(&resp), Some(200), "{resp}");
    assert!(
        resp.contains("\"name\":\"b\""),
        "routed by Host, not by the target: {resp}"
    );
    assert!(resp.contains("\"path\":\"/abs?x=1\""), "{resp}");
    Ok(())
}

#[tokio::test]
async fn http_1_0_client_gets_a_whole_streamed_body() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["old.test"], &[a.url()]).await?;
    let resp = client::raw_exchange(
        node.http,
        b"GET /stream?bytes=100000 HTTP/1.0\r\nHost: old.test\r\n\r\n",
    )
    .await?;
    assert_eq!(client::raw_status(&resp), Some(200), "{:.300}", resp);
    let head_end = resp.find("\r\n\r\n").context("no head")?;
    assert!(
        !resp[..head_end].to_ascii_lowercase().contains("chunked"),
        "chunked encoding sent to an HTTP/1.0 client:\n{}",
        &resp[..head_end]
    );
    // The raw text is lossy for bytes >= 0x80; count bytes instead.
    let body_len = resp.len() - head_end - 4;
    let expected = String::from_utf8_lossy(&pattern_chunk(0, 100_000)).len();
    assert_eq!(body_len, expected, "truncated or padded body");
    Ok(())
}

#[tokio::test]
async fn location_prefix_is_a_path_segment() -> Result<()> {
    let node = TestNode::start().await?;
    let root = EchoBackend::start("root").await?;
    let api = EchoBackend::start("api").await?;
    let mut req = host_request(&["seg.test"], &[root.url()]);
    req.host.as_mut().unwrap().locations = vec![Location {
        path_prefix: "/api".into(),
        upstreams: vec![api.url()],
        balancing: None,
        ..Default::default()
    }];
    node.create_host(req).await?;
    node.wait_routed("seg.test").await?;
    expect_backend(&node, "seg.test", "/api?x=1", "api").await?;
    expect_backend(&node, "seg.test", "/api/", "api").await?;
    expect_backend(&node, "seg.test", "/apix", "root").await?;
    Ok(())
}

/// Reads a connection to its end (the last request said `Connection: close`).
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .context("the proxy did not close the connection")??;
    Ok(String::from_utf8_lossy(&all).into_owned())
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused() -> Result<()> {
    expect_refused_with_400(
        "smuggle.test",
        &[
            b"POST / HTTP/1.1\r\nHost: smuggle.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: smuggle.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: smuggle.test\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
            b"POST / HTTP/1.1\r\nHost: smuggle.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"POST / HTTP/1.0\r\nHost: smuggle.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ],
    )
    .await
}

#[tokio::test]
async fn pipelined_requests_and_chunked_uploads_keep_their_order() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    node.add_host(&["pipe.test"], &[a.url()]).await?;
    let mut tcp = tokio::net::TcpStream::connect(node.http).await?;
    // Three requests in one write: a GET, a chunked upload (with a chunk
    // extension and a trailer), and a GET that closes.
    tcp.write_all(
        b"GET /one HTTP/1.1\r\nHost: pipe.test\r\n\r\n\
          POST /upload HTTP/1.1\r\nHost: pipe.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;x=y\r\n\x00\x01\x02\r\n2\r\n\x03\x04\r\n0\r\nX-Trailer: 1\r\n\r\n\
          GET /three HTTP/1.1\r\nHost: pipe.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let all = read_to_close(&mut tcp).await?;
    assert_eq!(all.matches("HTTP/1.1 200").count(), 3, "{all}");
    let one = all.find("\"path\":\"/one\"").context("first answer")?;
    let upload = all.find("\"bytes\":5").context("upload answer")?;
    let three = all.find("\"path\":\"/three\"").context("third answer")?;
    assert!(
        one < upload && upload < three,
        "answers out of order: {all}"
    );
    assert!(all.contains("\"pattern_ok\":true"), "{all}");
    Ok(())
}

/// A loopback listener that runs `conn` on each accepted connection, in a
/// task of its own: the raw upstreams below. Returns its URL.
async fn raw_server<F, Fut>(conn: F) -> Result<String>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(conn(s));
        }
    });
    Ok(url)
}

/// A raw HTTP/1.1 upstream: for each connection it reads one request
/// head, hands it over on the returned channel, answers `reply` and closes
/// the connection (without saying so in the reply). Returns its URL.
async fn raw_upstream(
    reply: &'static [u8],
) -> Result<(String, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let url = raw_server(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut head = Vec::new();
            let mut b = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(reply).await;
        }
    })
    .await?;
    Ok((url, heads))
}

#[tokio::test]
async fn header_names_keep_the_clients_spelling() -> Result<()> {
    let (url, mut heads) =
        raw_upstream(b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Yes\r\nContent-Length: 2\r\n\r\nok")
            .await?;
    let node = TestNode::start().await?;
    node.add_host(&["case.test"], &[url]).await?;
    let resp = client::raw_exchange(
        node.http,
        b"GET / HTTP/1.1\r\nHost: case.test\r\nX-Mixed-Case: 1\r\nACCEPT: */*\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(client::raw_status(&resp), Some(200), "{resp}");
    assert!(
        resp.contains("X-Upstream-Case: Yes"),
        "response spelling lost: {resp}"
    );
    let mut head = String::new();
    while !head.contains("X-Mixed-Case") {
        head = tokio::time::timeout(Duration::from_secs(10), heads.recv())
            .await
            .context("no request reached the upstream")?
            .context("upstream gone")?;
    }
    assert!(
        head.contains("X-Mixed-Case: 1") && head.contains("ACCEPT: */*"),
        "{head}"
    );
    Ok(())
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() -> Result<()> {
    // Answers one request per connection and closes it without saying so
    // (no `Connection: close`), as upstreams with short keep-alive timeouts
    // do: the proxy pools each connection and finds it closed next time.
    let (url, _heads) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await?;
    let node = TestNode::start().await?;
    node.add_host(&["closer.test"], &[url]).await?;
    for i in 0..20 {
        let resp = client::get(node.http, "closer.test", "/").await?;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        if i % 2 == 0 {
            // Sometimes give the close time to arrive before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await; // let the FIN land
        }
    }
    Ok(())
}

/// A raw HTTP/1.1 upstream that keeps its connections open and answers each
/// request head (requests without bodies) with `reply(head)`, in one write,
/// so whatever the reply holds tends to arrive in one read. Returns its URL
/// and the number of connections it has accepted.
async fn raw_keepalive_upstream(
    reply: fn(&str) -> Vec<u8>,
) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    let url = raw_server(move |mut s| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head: Vec<u8> = buf.drain(..end + 4).collect();
                    let out = reply(&String::from_utf8_lossy(&head));
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
        }
    })
    .await?;
    Ok((url, conns))
}

#[tokio::test]
async fn responses_of_every_size_arrive_whole() -> Result<()> {
    // Sizes around the proxy's buffers: the 8 KiB head buffer, the 16 KiB
    // inlined with the head, the 64 KiB body buffer (a head plus 64 KiB
    // does not fit it), and beyond. Each reply is one write upstream.
    let (url, conns) = raw_keepalive_upstream(|head| {
        let n: usize = head
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.trim_start_matches('/').parse().ok())
            .unwrap_or(0);
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
        out.extend((0..n).map(|i| pattern_byte(i as u64)));
        out
    })
    .await?;
    // Idle upstream connections are pooled per worker, and each request
    // below is a new client connection the kernel may give to any worker:
    // with one worker, every request must reuse the one connection.
    let node = TestNode::builder()
        .env("TOKIO_WORKER_THREADS", "1")
        .start()
        .await?;
    node.add_host(&["sizes.test"], &[url]).await?;
    let sizes = [
        0, 1, 100, 8_000, 8_192, 16_384, 20_000, 40_000, 65_400, 65_536, 70_000, 200_000,
    ];
    for round in 0..2 {
        for n in sizes {
            let resp = client::get(node.http, "sizes.test", &format!("/{n}")).await?;
            assert_eq!(resp.status, 200, "{n} bytes, round {round}");
            assert_eq!(resp.body.len(), n, "{n} bytes, round {round}");
            let bad = resp
                .body
                .iter()
                .enumerate()
                .position(|(i, b)| *b != pattern_byte(i as u64));
            assert_eq!(bad, None, "{n} bytes, round {round}: first wrong byte");
        }
    }
    // Sequential requests: the pooled connection carried them all.
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn bytes_past_a_response_body_are_never_read_as_the_next_response() -> Result<()> {
    // A broken upstream sends a second, unasked-for response right behind
    // each one. Were the connection reused, the next request would get it.
    let (url, conns) = raw_keepalive_upstream(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
          HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
            .to_vec()
    })
    .await?;
    let node = TestNode::start().await?;
    node.add_host(&["past.test"], &[url]).await?;
    let before = conns.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..5 {
        let resp = client::get(node.http, "past.test", "/").await?;
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.text(), "ok", "request {i}");
    }
    // One new connection per request (`add_host` may have used one too).
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst) - before, 5);
    Ok(())
}

#[tokio::test]
async fn early_hints_reach_http_1_1_clients_only() -> Result<()> {
    // 103 Early Hints and the 200 in one write, so in one read.
    let (url, conns) = raw_keepalive_upstream(|_| {
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            .to_vec()
    })
    .await?;
    // One worker: its one pool must carry every request (pools are per
    // worker, and each request here is a new client connection).
    let node = TestNode::builder()
        .env("TOKIO_WORKER_THREADS", "1")
        .start()
        .await?;
    node.add_host(&["hints.test"], &[url]).await?;
    for i in 0..3 {
        let resp = client::get(node.http, "hints.test", "/").await?;
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.text(), "hello", "request {i}");
    }
    // On the wire: the 103 with its Link, then the 200, for HTTP/1.1; only
    // the 200 for HTTP/1.0, which has no interim responses.
    for (version, hints) in [("1.1", true), ("1.0", false)] {
        let mut tcp = tokio::net::TcpStream::connect(node.http).await?;
        let req = format!("GET / HTTP/{version}\r\nHost: hints.test\r\nConnection: close\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes()).await?;
        let mut got = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut got),
        )
        .await??;
        let text = String::from_utf8_lossy(&got);
        if hints {
            assert!(
                text.starts_with("HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"),
                "{text}"
            );
            assert!(text.contains("\r\n\r\nHTTP/1.1 200 OK\r\n"), "{text}");
        } else {
            assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        }
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    Ok(())
}

/// An upstream that answers requests without a body with 200 (as the
/// node's own route check sends), and a request with a body, once it has
/// read `read_first` bytes of it, with 413; after which it either closes
/// its side (and drops what still comes) or stops reading (holding the
/// connection open for a minute). Returns its URL.
async fn early_answer_upstream(
    read_first: usize,
    then_close: bool,
) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let total = received.clone();
    let url = raw_server(move |mut s| {
        let total = total.clone();
        async move {
            let mut got = Vec::new();
            let mut b = vec![0u8; 64 * 1024];
            loop {
                if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    if !head.contains("content-length") {
                        got.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if got.len() - (end + 4) >= read_first {
                        break;
                    }
                }
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        total.fetch_add(n as u64, Ordering::SeqCst);
                        got.extend_from_slice(&b[..n]);
                    }
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
                .await;
            if then_close {
                // Closes its side, reading and dropping the rest as a
                // careful server does: a plain close with unread bytes
                // would reset the connection and could destroy its own
                // answer before the proxy has read it.
                let _ = s.shutdown().await;
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n as u64, Ordering::SeqCst);
                }
            } else {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    })
    .await?;
    Ok((url, received))
}

/// Starts a 64 MiB upload through the node and returns what the client
/// read before the connection closed, or an error after 15 s. The body is
/// written from another task, as a client that watches for an early answer
/// does (the proxy may read and drop the rest of it meanwhile).
async fn upload_and_read_answer(node: &TestNode, host: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(node.http).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let len = 64u64 << 20;
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\r\n");
    wr.write_all(head.as_bytes()).await?;
    let sender = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0u64;
        while sent < len && wr.write_all(&chunk).await.is_ok() {
            sent += chunk.len() as u64;
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        let mut b = [0u8; 4096];
        loop {
            match rd.read(&mut b).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    sender.abort();
    let text = String::from_utf8_lossy(&got).into_owned();
    match read {
        Err(_) => anyhow::bail!("no answer within 15 s (read so far: {text:?})"),
        Ok(Err(e)) => anyhow::bail!("{e} after reading {text:?}"),
        Ok(Ok(())) => Ok(text),
    }
}

#[tokio::test]
async fn an_upstream_answering_before_the_body_ends_is_heard() -> Result<()> {
    // Answers at once, or after 1 MiB of the body; then stops reading but
    // keeps the connection: a proxy that only listens after sending the
    // whole body waits until its timeout.
    let node = TestNode::start().await?;
    for (name, read_first) in [("at-once.test", 0), ("later.test", 1 << 20)] {
        let (url, _) = early_answer_upstream(read_first, false).await?;
        node.add_host(&[name], &[url]).await?;
        let answer = upload_and_read_answer(&node, name).await?;
        assert_eq!(client::raw_status(&answer), Some(413), "{name}: {answer}");
        assert!(answer.ends_with("\r\n\r\ntoo big!"), "{name}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{name}: the rest of the body was not read, so the connection closes: {answer}"
        );
    }
    // The node is fine afterwards.
    let backend = EchoBackend::start("after").await?;
    node.add_host(&["after.test"], &[backend.url()]).await?;
    let resp = client::get(node.http, "after.test", "/").await?;
    assert_eq!(resp.status, 200);
    Ok(())
}

#[tokio::test]
async fn an_upstream_answering_and_closing_before_the_body_ends_is_heard() -> Result<()> {
    let node = TestNode::start().await?;
    let (url, received) = early_answer_upstream(0, true).await?;
    node.add_host(&["closes.test"], &[url]).await?;
    for i in 0..3 {
        let before = received.load(std::sync::atomic::Ordering::SeqCst);
        let answer = upload_and_read_answer(&node, "closes.test").await?;
        assert_eq!(client::raw_status(&answer), Some(413), "try {i}: {answer}");
        // The proxy stopped passing the body on once the answer came.
        let passed = received.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(
            passed < 32 << 20,
            "try {i}: {passed} bytes reached the upstream"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_given_up_on() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream with a 1 GiB answer for GET /big, and "ok" for the
    // node's own route check.
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let url = raw_server(move |mut s| {
        let gone_tx = gone_tx.clone();
        async move {
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head: Vec<u8> = got.drain(..end + 4).collect();
                    if !head.starts_with(b"GET /big ") {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n";
                    let chunk = vec![b'z'; 256 * 1024];
                    let mut sent = 0u64;
                    let _ = s.write_all(head).await;
                    while sent < 1 << 30 && s.write_all(&chunk).await.is_ok() {
                        sent += chunk.len() as u64;
                    }
                    let _ = gone_tx.send(sent);
                    return;
                }
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&b[..n]),
                }
            }
        }
    })
    .await?;
    let node = TestNode::start().await?;
    let mut req = host_request(&["big.test"], &[url]);
    req.host.as_mut().unwrap().upstream_timeout_ms = 1000;
    node.create_host(req).await?;
    node.wait_routed("big.test").await?;

    // Asks for the answer and never reads it.
    let mut tcp = tokio::net::TcpStream::connect(node.http).await?;
    tcp.write_all(b"GET /big HTTP/1.1\r\nHost: big.test\r\n\r\n")
        .await?;
    let started = Instant::now();
    let sent = tokio::time::timeout(Duration::from_secs(20), gone.recv())
        .await
        .context("the upstream connection was still open after 20 s")?
        .context("upstream task ended")?;
    assert!(sent < 1 << 30, "the whole body went out: {sent}");
    eprintln!(
        "upstream connection closed after {:?}, {sent} bytes sent",
        started.elapsed()
    );
    drop(tcp);
    Ok(())
}
