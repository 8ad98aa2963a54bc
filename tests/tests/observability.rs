//! What operators see: `/metrics` in Prometheus text format moving with
//! traffic, the JSON access log (stdout and the Logs stream), and the list
//! of open tunnels.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use charon_proto::v1::{FollowLogsRequest, ListTunnelsRequest, LogFilter, RecentLogsRequest};
use charon_tests::client::{self, ws_connect};
use charon_tests::{eventually, EchoBackend, TestNode, WsEchoBackend};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Parses the text exposition format strictly enough to catch mistakes:
/// every sample belongs to a family declared by `# TYPE`, label sets are
/// well-formed, values are numbers. Returns sample → value.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut families = Vec::<String>::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().context("TYPE without a name")?;
            let kind = it.next().context("TYPE without a kind")?;
            ensure!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "line {n}: kind {kind}"
            );
            families.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("no value")?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("line {n}: value {value:?}"))?;
        let name = series.split('{').next().unwrap_or(series);
        ensure!(
            families.iter().any(|f| name == f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str()))),
            "line {n}: sample {name} has no # TYPE"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                ensure!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "line {n}: labels {labels}"
                );
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair.split_once("=\"").context("label without =\"")?;
                    ensure!(
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "line {n}: label name {k:?}"
                    );
                    let _ = v;
                }
            }
        }
        samples.insert(series.to_string(), value);
    }
    Ok(samples)
}

async fn scrape(node: &TestNode) -> Result<BTreeMap<String, f64>> {
    let resp = client::get(node.admin, "localhost", "/metrics").await?;
    ensure!(resp.status == 200, "/metrics answered {}", resp.status);
    parse_prometheus(&resp.text())
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() -> Result<()> {
    let node = TestNode::start().await?;
    let http = EchoBackend::start("b").await?;
    let ws = WsEchoBackend::start("w").await?;
    node.add_host(&["m.obs.test"], &[http.url()]).await?;
    node.add_host(&["ws.obs.test"], &[ws.url()]).await?;
    let before = scrape(&node).await?;
    let ok = "charon_http_requests_total{host=\"m.obs.test\",status=\"2xx\"}";
    let lost = "charon_http_requests_total{host=\"\",status=\"4xx\"}";
    for _ in 0..5 {
        ensure!(client::get(node.http, "m.obs.test", "/").await?.status == 200);
    }
    ensure!(client::get(node.http, "nobody.obs.test", "/").await?.status == 404);
    let (mut sock, _) = ws_connect(node.http, "ws.obs.test", "/", &[]).await?;
    sock.send(Message::text("hi")).await?;
    sock.next().await.context("no echo")??;
    let during = scrape(&node).await?;
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    ensure!(
        get(&during, ok) - get(&before, ok) >= 5.0,
        "{ok}: {} → {}",
        get(&before, ok),
        get(&during, ok)
    );
    ensure!(get(&during, lost) - get(&before, lost) >= 1.0);
    ensure!(get(&during, "charon_tunnels{host=\"ws.obs.test\"}") == 1.0);
    ensure!(get(&during, "charon_tunnels_opened_total{host=\"ws.obs.test\"}") == 1.0);
    ensure!(
        get(
            &during,
            "charon_http_request_duration_seconds_count{host=\"m.obs.test\"}"
        ) >= 5.0
    );
    ensure!(get(&during, "charon_cluster_members{state=\"live\"}") == 1.0);
    ensure!(during.contains_key("charon_drain_state"));
    sock.close(None).await?;
    eventually(Duration::from_secs(10), || async {
        let after = scrape(&node).await?;
        ensure!(get(&after, "charon_tunnel_duration_seconds_count") == 1.0);
        ensure!(get(&after, "charon_tunnels{host=\"ws.obs.test\"}") == 0.0);
        ensure!(
            get(
                &after,
                "charon_tunnel_bytes_total{direction=\"to_upstream\"}"
            ) > 0.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_access_log_is_json_on_stdout_and_streams_through_the_api() -> Result<()> {
    let node = TestNode::start().await?;
    let http = EchoBackend::start("b").await?;
    let ws = WsEchoBackend::start("w").await?;
    let h = node.add_host(&["log.obs.test"], &[http.url()]).await?;
    node.add_host(&["wslog.obs.test"], &[ws.url()]).await?;
    let mut logs = charon_proto::v1::logs_client::LogsClient::with_interceptor(
        node.grpc_channel().await?,
        node.bearer()?,
    );
    let mut follow = logs
        .follow(FollowLogsRequest {
            filter: Some(LogFilter {
                host: "log.obs.test".into(),
                status: "4xx".into(),
            }),
            since_ms: 0,
        })
        .await?
        .into_inner();
    // Filtered out (2xx), then one that matches (the backend's 404).
    ensure!(
        client::get(node.http, "log.obs.test", "/fine")
            .await?
            .status
            == 200
    );
    let resp = client::get(node.http, "log.obs.test", "/status?code=404").await?;
    let ev = tokio::time::timeout(Duration::from_secs(10), follow.message())
        .await
        .context("no event followed")??
        .context("stream ended")?;
    ensure!(ev.status == 404 && resp.status == 404, "{ev:?}");
    let line: serde_json::Value = serde_json::from_str(&ev.json)?;
    ensure!(
        line["path"] == "/status" && line["host_id"] == h.id.as_str(),
        "{line}"
    );
    ensure!(
        line["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1")),
        "{line}"
    );
    // A tunnel's line when it closes.
    let (mut sock, _) = ws_connect(node.http, "wslog.obs.test", "/", &[]).await?;
    sock.send(Message::text("x")).await?;
    sock.next().await.context("no echo")??;
    sock.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await?;
    // Read the server's Close so the client finishes its side too.
    while let Some(Ok(_)) = sock.next().await {}
    let recent = eventually(Duration::from_secs(10), || {
        let mut logs = logs.clone();
        async move {
            let r = logs
                .recent(RecentLogsRequest {
                    filter: Some(LogFilter {
                        host: "wslog.obs.test".into(),
                        status: String::new(),
                    }),
                    since_ms: 0,
                    limit: 0,
                })
                .await?
                .into_inner();
            let Some(t) = r.events.iter().find(|e| e.kind == "tunnel") else {
                bail!("no tunnel line yet: {:?}", r.events);
            };
            Ok(t.json.clone())
        }
    })
    .await?;
    let t: serde_json::Value = serde_json::from_str(&recent)?;
    ensure!(t["close_code"] == 1000 && t["closed_by"] == "both", "{t}");
    ensure!(t["frames_to_upstream"].as_u64() >= Some(2), "{t}");
    // The same lines went to stdout (the harness keeps it in the node's log).
    let stdout = node.log();
    ensure!(
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["kind"] == "tunnel" && v["host"] == "wslog.obs.test"),
        "no JSON tunnel line on stdout"
    );
    // Bad filters are refused with the field named.
    let err = logs
        .recent(RecentLogsRequest {
            filter: Some(LogFilter {
                host: String::new(),
                status: "9zz".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::InvalidArgument && err.message().contains("status"));
    Ok(())
}

/// Requests on one keep-alive connection reuse the strings of the one
/// before (and, once the ring is full, of old log events): each line must
/// still show only its own request, whatever the previous one left behind.
#[tokio::test]
async fn each_request_of_a_connection_logs_its_own_fields() -> Result<()> {
    let node = TestNode::start().await?;
    let http = EchoBackend::start("b").await?;
    node.add_host(&["seq.obs.test"], &[http.url()]).await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    node.add_host(&["down.obs.test"], &[format!("http://{closed}")])
        .await?;
    let logs = charon_proto::v1::logs_client::LogsClient::with_interceptor(
        node.grpc_channel().await?,
        node.bearer()?,
    );
    let mut sender = client::http1_connect(node.http).await?;
    // Long, then short: each shorter than the last in some field. Then a
    // proxy error (an upstream that refuses connections), whose error field
    // must not stay on the line after it.
    let requests = [
        ("GET", "seq.obs.test:80", "/a/much/longer/first/path", 200),
        ("HEAD", "seq.obs.test", "/b", 200),
        ("GET", "seq.obs.test", "/status?code=503", 503),
        ("GET", "down.obs.test", "/d", 502),
        ("GET", "seq.obs.test", "/c", 200),
    ];
    for (method, host, path, want) in requests {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .context("no response in time")??;
        ensure!(resp.status() == want, "{method} {path}: {}", resp.status());
        http_body_util::BodyExt::collect(resp.into_body()).await?;
    }
    let lines = eventually(Duration::from_secs(10), || {
        let mut logs = logs.clone();
        async move {
            let r = logs
                .recent(RecentLogsRequest {
                    filter: None,
                    since_ms: 0,
                    limit: 0,
                })
                .await?
                .into_inner();
            // Less the probes of `add_host`, which ask for `/`.
            let lines = r
                .events
                .iter()
                .map(|e| Ok(serde_json::from_str::<serde_json::Value>(&e.json)?))
                .filter(|l| !matches!(l, Ok(l) if l["path"] == "/"))
                .collect::<Result<Vec<_>>>()?;
            ensure!(lines.len() == 5, "{} lines so far: {lines:?}", lines.len());
            Ok(lines)
        }
    })
    .await?;
    for ((method, host, path, status), line) in requests.iter().zip(&lines) {
        let path_only = path.split('?').next().unwrap_or_default();
        ensure!(
            line["method"] == *method
                && line["authority"] == *host
                && line["path"] == path_only
                && line["status"] == *status,
            "{line}"
        );
    }
    // Only the 502 has an error (naming the upstream) and no upstream that
    // answered; the backend's own 503 is a response.
    for (i, l) in lines.iter().enumerate() {
        ensure!(
            l.get("error").is_some() == (i == 3) && l.get("upstream").is_some() == (i != 3),
            "{l}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn open_tunnels_are_listed() -> Result<()> {
    let node = TestNode::start().await?;
    let ws = WsEchoBackend::start("w").await?;
    node.add_host(&["tl.obs.test"], &[ws.url()]).await?;
    let (mut sock, _) = ws_connect(node.http, "tl.obs.test", "/", &[]).await?;
    sock.send(Message::text("x")).await?;
    sock.next().await.context("no echo")??;
    let mut api = charon_proto::v1::tunnels_client::TunnelsClient::with_interceptor(
        node.grpc_channel().await?,
        node.bearer()?,
    );
    let list = api
        .list_tunnels(ListTunnelsRequest {
            host: "tl.obs.test".into(),
        })
        .await?
        .into_inner();
    ensure!(list.tunnels.len() == 1, "{list:?}");
    let t = &list.tunnels[0];
    ensure!(
        t.upstream.starts_with("http://127.0.0.1") && t.bytes_to_upstream > 0,
        "{t:?}"
    );
    ensure!(api
        .list_tunnels(ListTunnelsRequest {
            host: "other.test".into()
        })
        .await?
        .into_inner()
        .tunnels
        .is_empty());
    Ok(())
}

/// Spans reach an OTLP collector: a server span continuing the client's
/// `traceparent`, a client span for the upstream call whose context the
/// upstream receives, a tunnel span covering the WebSocket's life; with the
/// collector gone the node keeps serving and counts what it drops.
#[tokio::test]
async fn traces_reach_an_otlp_collector_and_a_dead_collector_costs_nothing_but_spans() -> Result<()>
{
    let collector = charon_tests::otlp::OtlpCollector::start().await?;
    let node = TestNode::builder()
        .name("traced")
        .args(["--otlp-endpoint", &collector.endpoint()])
        .start()
        .await?;
    let http = EchoBackend::start("b").await?;
    let ws = WsEchoBackend::start("w").await?;
    let h = node.add_host(&["tr.obs.test"], &[http.url()]).await?;
    node.add_host(&["trws.obs.test"], &[ws.url()]).await?;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let req = client::build_request(
        http::Method::GET,
        "tr.obs.test",
        "/traced",
        &[("traceparent", &format!("00-{trace}-{parent}-01"))],
        bytes::Bytes::new(),
    )?;
    let resp = client::HttpResponse::read(client::send(node.http, req).await?).await?;
    ensure!(resp.status == 200);
    // The upstream got the context of the proxy's client span.
    let seen = resp.json()?["headers"]["traceparent"][0]
        .as_str()
        .context("no traceparent at the upstream")?
        .to_string();
    let parts: Vec<&str> = seen.split('-').collect();
    ensure!(parts.len() == 4 && parts[1] == trace, "upstream saw {seen}");
    let upstream_parent = parts[2].to_string();

    let (mut sock, _) = ws_connect(node.http, "trws.obs.test", "/", &[]).await?;
    sock.send(Message::text("hi")).await?;
    sock.next().await.context("no echo")??;
    sock.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await?;
    while let Some(Ok(_)) = sock.next().await {}

    let spans = eventually(Duration::from_secs(20), || async {
        let spans = collector.spans();
        ensure!(
            spans.iter().any(|s| s.span.name.starts_with("WebSocket")),
            "{} spans so far, no tunnel span",
            spans.len()
        );
        Ok(spans)
    })
    .await?;
    let server = spans
        .iter()
        .find(|s| s.trace_id() == trace && s.parent_id() == parent)
        .context("no server span continuing the client's trace")?;
    ensure!(server.attr("http.request.method").as_deref() == Some("GET"));
    ensure!(server.attr("url.path").as_deref() == Some("/traced"));
    ensure!(server.attr("http.response.status_code").as_deref() == Some("200"));
    ensure!(server.attr("charon.host_id").as_deref() == Some(h.id.as_str()));
    ensure!(server.attr("client.address").as_deref() == Some("127.0.0.1"));
    ensure!(server.resource_attr("service.name").as_deref() == Some("charon"));
    ensure!(server.resource_attr("charon.node.name").as_deref() == Some("traced"));
    let upstream = spans
        .iter()
        .find(|s| s.span_id() == upstream_parent)
        .context("the upstream's parent span was not exported")?;
    ensure!(
        upstream.parent_id() == server.span_id() && upstream.trace_id() == trace,
        "client span not a child of the server span"
    );
    ensure!(upstream.attr("http.response.status_code").as_deref() == Some("200"));
    let tunnel = spans
        .iter()
        .find(|s| s.span.name == "WebSocket trws.obs.test")
        .context("no tunnel span")?;
    ensure!(
        tunnel.attr("websocket.close.code").as_deref() == Some("1000"),
        "{tunnel:?}"
    );
    ensure!(tunnel
        .attr("websocket.frames_to_upstream")
        .is_some_and(|f| f != "0"));
    let events: Vec<&str> = tunnel.span.events.iter().map(|e| e.name.as_str()).collect();
    ensure!(
        events == ["upgrade", "first byte", "close"],
        "tunnel events {events:?}"
    );
    let tunnel_parent = spans
        .iter()
        .find(|s| s.span_id() == tunnel.parent_id())
        .context("the tunnel span's parent is missing")?;
    ensure!(tunnel_parent.attr("http.response.status_code").as_deref() == Some("101"));

    // The collector goes away: requests still work, drops are counted.
    collector.stop();
    for _ in 0..20 {
        ensure!(client::get(node.http, "tr.obs.test", "/").await?.status == 200);
    }
    eventually(Duration::from_secs(30), || async {
        let m = scrape(&node).await?;
        let dropped = m
            .get("charon_trace_spans_dropped_total")
            .copied()
            .unwrap_or(0.0);
        ensure!(dropped > 0.0, "no drops counted yet");
        Ok(())
    })
    .await?;
    ensure!(client::get(node.http, "tr.obs.test", "/").await?.status == 200);
    Ok(())
}

/// `charonctl logs -f --all-nodes`, asked on node 1, shows a request that
/// went through node 2; `charonctl tunnels --all-nodes` lists node 2's
/// tunnel.
#[tokio::test]
async fn charonctl_follows_the_logs_of_every_node() -> Result<()> {
    let secret = "observability-secret-0123456789";
    let token = "observability-token-0123456789";
    let n1 = TestNode::builder()
        .name("n1")
        .cluster_secret(secret)
        .env("CHARON_ADMIN_TOKEN", token)
        .start()
        .await?;
    let n2 = TestNode::builder()
        .name("n2")
        .cluster_secret(secret)
        .env("CHARON_ADMIN_TOKEN", token)
        .seeds(&[&n1])
        .start()
        .await?;
    let http = EchoBackend::start("b").await?;
    let ws = WsEchoBackend::start("w").await?;
    n1.add_host(&["follow.obs.test"], &[http.url()]).await?;
    n1.add_host(&["ftun.obs.test"], &[ws.url()]).await?;
    n2.wait_routed("follow.obs.test").await?;
    eventually(Duration::from_secs(20), || async {
        let (members, _) = n1.members().await?;
        ensure!(members.iter().filter(|m| m.live).count() == 2);
        Ok(())
    })
    .await?;

    let mut follow = tokio::process::Command::new(charon_tests::node::binary("charonctl")?)
        .args([
            "--endpoint",
            &format!("http://{}", n1.api),
            "--token",
            token,
        ])
        .args([
            "-o",
            "json",
            "logs",
            "-f",
            "--all-nodes",
            "--host",
            "follow.obs.test",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        follow.stdout.take().context("no stdout")?,
    ));
    // Requests through node 2 until one shows up (the follower may still
    // be connecting to node 2 when the first ones are made).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "charonctl never showed the request made through n2"
        );
        ensure!(
            client::get(n2.http, "follow.obs.test", "/via-n2")
                .await?
                .status
                == 200
        );
        match tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await {
            Ok(Ok(Some(l))) => break l,
            Ok(other) => bail!("charonctl output ended: {other:?}"),
            Err(_) => continue,
        }
    };
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(v["node"] == "n2" && v["path"] == "/via-n2", "{v}");
    drop(follow);

    let (mut sock, _) = ws_connect(n2.http, "ftun.obs.test", "/", &[]).await?;
    sock.send(Message::text("x")).await?;
    sock.next().await.context("no echo")??;
    let out = n1.ctl(&["-o", "json", "tunnels", "--all-nodes"]).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tunnels = list.as_array().context("not an array")?;
    ensure!(
        tunnels.len() == 1 && tunnels[0]["node"] == "n2" && tunnels[0]["host"] == "ftun.obs.test",
        "{list}"
    );
    Ok(())
}

/// Logs written to a file (not a terminal) carry no ANSI escape codes, even
/// with `NO_COLOR` empty (which means unset): colours are for terminals.
#[tokio::test]
async fn logs_to_a_file_have_no_ansi_colours() -> Result<()> {
    let node = TestNode::builder().env("NO_COLOR", "").start().await?;
    let backend = EchoBackend::start("b").await?;
    node.add_host(&["colour.test"], &[backend.url()]).await?;
    let resp = client::get(node.http, "colour.test", "/").await?;
    ensure!(resp.status == 200, "status {}", resp.status);
    let log = node.log();
    ensure!(log.contains("INFO"), "no INFO line in the log:\n{log}");
    ensure!(
        !log.contains('\u{1b}'),
        "an ANSI escape in the log:\n{}",
        log.escape_debug()
    );
    Ok(())
}
