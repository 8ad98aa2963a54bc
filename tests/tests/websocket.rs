//! WebSocket through the proxy: messages of every kind and size,
//! fragmentation, ping/pong, close codes both ways, subprotocols,
//! permessage-deflate end to end, header-name spelling, tunnels that survive
//! host updates, and a thousand concurrent tunnels.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use charon_proto::v1::{StringList, UpdateHostRequest};
use charon_tests::backends::python::python_ws_client;
use charon_tests::client::{self, opcode, ws_accept, ws_connect, ws_upgrade_head, RawWs, WsClient};
use charon_tests::{
    eventually, pattern_chunk, PythonWsBackend, RawUpgradeBackend, TestNode, WsEchoBackend,
};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

async fn node_with_ws_backend(domain: &str, name: &str) -> Result<(TestNode, WsEchoBackend)> {
    let node = TestNode::start().await?;
    let backend = WsEchoBackend::start(name).await?;
    node.add_host(&[domain], &[backend.url()]).await?;
    Ok((node, backend))
}

use client::{ask, next_message};

#[tokio::test]
async fn text_and_binary_messages_are_echoed() -> Result<()> {
    let (node, backend) = node_with_ws_backend("ws.test", "echo").await?;
    let (mut ws, resp) = ws_connect(node.http, "ws.test", "/socket", &[]).await?;
    assert_eq!(resp.status(), 101);
    assert_eq!(
        ask(&mut ws, "hello through charon").await?,
        "hello through charon"
    );
    assert_eq!(ask(&mut ws, "whoami?").await?, "echo");
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(payload.clone())).await?;
    match next_message(&mut ws).await? {
        Message::Binary(b) => assert!(b[..] == payload[..], "binary echo differs"),
        other => bail!("expected binary, got {other:?}"),
    }
    // The request path reached the backend.
    assert_eq!(backend.accepted(), 1);
    ws.close(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_messages() -> Result<()> {
    let (node, _backend) = node_with_ws_backend("big.test", "big").await?;
    let (mut ws, _) = ws_connect(node.http, "big.test", "/", &[]).await?;
    let payload = pattern_chunk(0, 16 << 20);
    ws.send(Message::Binary(payload.clone())).await?;
    match next_message(&mut ws).await? {
        Message::Binary(b) => {
            assert_eq!(b.len(), payload.len());
            assert!(b == payload, "16 MiB binary echo differs");
        }
        other => bail!("expected binary, got {:?}", other.len()),
    }
    let text = "0123456789abcdef".repeat(1 << 20); // 16 MiB of text
    ws.send(Message::text(text.clone())).await?;
    match next_message(&mut ws).await? {
        Message::Text(t) => assert!(t.as_str() == text, "16 MiB text echo differs"),
        other => bail!("expected text, got {:?}", other.len()),
    }
    ws.close(None).await?;
    Ok(())
}

#[tokio::test]
async fn fragmented_messages_with_interleaved_ping() -> Result<()> {
    let (node, _backend) = node_with_ws_backend("frag.test", "frag").await?;
    let (head, key) = ws_upgrade_head("frag.test", "/", &[]);
    let mut ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    assert_eq!(ws.header("sec-websocket-accept"), Some(ws_accept(&key)));

    ws.send_frame(false, opcode::TEXT, b"hello ").await?;
    ws.send_frame(false, opcode::CONTINUATION, b"fragmented ")
        .await?;
    ws.send_frame(true, opcode::PING, b"in-between").await?;
    ws.send_frame(true, opcode::CONTINUATION, b"world").await?;
    let (mut pong, mut message) = (None, None);
    for _ in 0..10 {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            opcode::PONG => pong = Some(frame.payload),
            opcode::TEXT => {
                ensure!(frame.fin, "the backend echo is one frame");
                message = Some(frame.payload);
            }
            other => bail!("unexpected frame opcode {other}"),
        }
        if pong.is_some() && message.is_some() {
            break;
        }
    }
    assert_eq!(pong.as_deref(), Some(&b"in-between"[..]));
    assert_eq!(message.as_deref(), Some(&b"hello fragmented world"[..]));

    // Large binary fragments, each bigger than a typical relay buffer.
    let parts: Vec<Vec<u8>> = (0..3)
        .map(|i| pattern_chunk(i * 300_000, 300_000).to_vec())
        .collect();
    ws.send_frame(false, opcode::BINARY, &parts[0]).await?;
    ws.send_frame(false, opcode::CONTINUATION, &parts[1])
        .await?;
    ws.send_frame(true, opcode::CONTINUATION, &parts[2]).await?;
    let (kind, data) = ws.read_message().await?;
    assert_eq!(kind, opcode::BINARY);
    assert!(data == parts.concat(), "reassembled binary differs");

    ws.send_frame(true, opcode::CLOSE, &1000u16.to_be_bytes())
        .await?;
    let close = ws.read_frame().await?;
    assert_eq!(close.opcode, opcode::CLOSE);
    Ok(())
}

#[tokio::test]
async fn ping_is_answered_with_pong() -> Result<()> {
    let (node, _backend) = node_with_ws_backend("ping.test", "ping").await?;
    let (mut ws, _) = ws_connect(node.http, "ping.test", "/", &[]).await?;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await?;
    let pong = loop {
        let msg = tokio::time::timeout(client::IO_TIMEOUT, ws.next())
            .await
            .context("no pong in time")?
            .context("tunnel ended")??;
        if let Message::Pong(p) = msg {
            break p;
        }
    };
    assert_eq!(&pong[..], b"are you there");
    Ok(())
}

#[tokio::test]
async fn client_close_code_reaches_backend() -> Result<()> {
    let (node, backend) = node_with_ws_backend("close.test", "close").await?;
    let (mut ws, _) = ws_connect(node.http, "close.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "ready").await?, "ready");
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "client leaves".into(),
    }))
    .await?;
    // The backend answers the Close; the tunnel then ends.
    let mut echoed_code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(client::IO_TIMEOUT, ws.next())
        .await
        .context("the tunnel did not end")
    {
        match msg {
            Ok(Message::Close(frame)) => echoed_code = frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    eventually(WAIT, || async {
        ensure!(
            backend.close_codes() == [4001],
            "backend close codes: {:?}",
            backend.close_codes()
        );
        Ok(())
    })
    .await?;
    assert_eq!(
        echoed_code,
        Some(4001),
        "the backend's Close reply did not come back"
    );
    eventually(WAIT, || async {
        ensure!(
            backend.open_connections() == 0,
            "the backend side is still open"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn backend_close_code_reaches_client() -> Result<()> {
    let (node, backend) = node_with_ws_backend("close.test", "close").await?;
    let (mut ws, _) = ws_connect(node.http, "close.test", "/", &[]).await?;
    ws.send(Message::text("close:4002")).await?;
    match next_message(&mut ws).await? {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4002);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => bail!("expected Close 4002, got {other:?}"),
    }
    // tungstenite answers the Close; the backend must receive that answer.
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    eventually(WAIT, || async {
        ensure!(
            backend.close_codes() == [4002],
            "the client's Close reply did not reach the backend: {:?}",
            backend.close_codes()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn backend_chooses_the_subprotocol() -> Result<()> {
    let (node, _backend) = node_with_ws_backend("proto.test", "proto").await?;
    let (mut ws, resp) = ws_connect(
        node.http,
        "proto.test",
        "/",
        &[("Sec-WebSocket-Protocol", "unknown.v9, chat")],
    )
    .await?;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat")
    );
    assert_eq!(
        ask(&mut ws, "after subprotocol").await?,
        "after subprotocol"
    );

    let (_ws, resp) = ws_connect(node.http, "proto.test", "/", &[]).await?;
    assert!(
        resp.headers().get("sec-websocket-protocol").is_none(),
        "a subprotocol appeared although none was offered"
    );
    Ok(())
}

#[tokio::test]
async fn origin_and_handshake_headers_reach_backend() -> Result<()> {
    let (node, backend) = node_with_ws_backend("origin.test", "origin").await?;
    let (mut ws, _) = ws_connect(
        node.http,
        "origin.test",
        "/",
        &[("Origin", "https://app.example:8443")],
    )
    .await?;
    let headers: serde_json::Value = serde_json::from_str(&ask(&mut ws, "headers?").await?)?;
    assert_eq!(headers["origin"], "https://app.example:8443");
    assert_eq!(headers["host"], "origin.test");
    assert_eq!(headers["sec-websocket-version"], "13");
    assert_eq!(backend.handshakes().len(), 1);
    Ok(())
}

#[tokio::test]
async fn header_names_are_spelled_as_the_client_sent_them() -> Result<()> {
    let node = TestNode::start().await?;
    let raw = RawUpgradeBackend::start().await?;
    node.add_host(&["raw.test"], &[raw.url()]).await?;

    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let exact = [
        format!("sec-WebSocket-Key: {key}"),
        "SEC-WEBSOCKET-VERSION: 13".to_owned(),
        "sec-WebSocket-Protocol: chat, superchat".to_owned(),
        "Sec-Websocket-Extensions: permessage-deflate; client_max_window_bits".to_owned(),
        "origin: http://Origin.Example:8080".to_owned(),
    ];
    let mut head = "GET /chat?room=1 HTTP/1.1\r\nHost: raw.test\r\nupgrade: websocket\r\n\
                    Connection: Upgrade\r\n"
        .to_owned();
    for line in &exact {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");

    let ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    assert_eq!(ws.header("sec-websocket-accept"), Some(ws_accept(&key)));
    assert_eq!(ws.header("sec-websocket-protocol").as_deref(), Some("chat"));
    assert_eq!(
        ws.header("x-raw-backend").as_deref(),
        Some("yes"),
        "not the backend's 101"
    );

    let seen = eventually(WAIT, || async {
        raw.upgrade_heads()
            .pop()
            .context("the backend saw no upgrade request")
    })
    .await?;
    assert!(
        seen.starts_with("GET /chat?room=1 HTTP/1.1\r\n"),
        "request line: {seen:?}"
    );
    for line in &exact {
        assert!(
            seen.contains(&format!("\r\n{line}")),
            "the upstream did not get {line:?} verbatim; it got:\n{seen}"
        );
    }
    let lower = seen.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nupgrade: websocket"),
        "no Upgrade header:\n{seen}"
    );
    assert!(
        lower
            .lines()
            .any(|l| l.starts_with("connection:") && l.contains("upgrade")),
        "no Connection: upgrade:\n{seen}"
    );
    assert!(
        lower.contains("\r\nhost: raw.test"),
        "Host not preserved:\n{seen}"
    );
    Ok(())
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_end_to_end() -> Result<()> {
    let backend = PythonWsBackend::start().await?;
    let node = TestNode::start().await?;
    node.add_host(&["py.test"], &[backend.url()]).await?;

    // A raw handshake offering deflate: the backend's acceptance comes back.
    let (head, key) = ws_upgrade_head(
        "py.test",
        "/",
        &[
            (
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("Sec-WebSocket-Protocol", "chat"),
        ],
    );
    let ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    assert_eq!(ws.header("sec-websocket-accept"), Some(ws_accept(&key)));
    let ext = ws.header("sec-websocket-extensions").unwrap_or_default();
    assert!(
        ext.contains("permessage-deflate"),
        "101 without deflate: {}",
        ws.head
    );
    assert_eq!(ws.header("sec-websocket-protocol").as_deref(), Some("chat"));
    drop(ws);

    // A real deflate client (Python websockets) through the proxy.
    let out = python_ws_client(node.http, "py.test").await?;
    let client_ext = out["response_extensions"].as_str().unwrap_or_default();
    assert!(
        client_ext.contains("permessage-deflate"),
        "client side: {out}"
    );
    let server_ext = out["server"]["extensions"].as_str().unwrap_or_default();
    assert!(
        server_ext.contains("permessage-deflate"),
        "server side: {out}"
    );
    assert_eq!(out["subprotocol"], "chat", "{out}");
    assert_eq!(out["big_echo_ok"], true, "compressed echo differs: {out}");
    Ok(())
}

#[tokio::test]
async fn python_backend_sees_header_spelling_of_client() -> Result<()> {
    let backend = PythonWsBackend::start().await?;
    let node = TestNode::start().await?;
    node.add_host(&["py.test"], &[backend.url()]).await?;
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let head = format!(
        "GET /path?x=1 HTTP/1.1\r\nHost: py.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\nsec-WebSocket-Protocol: chat\r\n\
         ORIGIN: http://o.example\r\n\r\n"
    );
    let mut ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    ws.send_frame(true, opcode::TEXT, b"headers?").await?;
    let (kind, data) = ws.read_message().await?;
    assert_eq!(kind, opcode::TEXT);
    let reply: serde_json::Value = serde_json::from_slice(&data)?;
    let headers = reply["headers"].as_object().context("no headers")?;
    for name in ["sec-WebSocket-Protocol", "ORIGIN", "sec-websocket-key"] {
        assert!(
            headers.contains_key(name),
            "the backend did not get {name:?} as spelled; it got {:?}",
            headers.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(reply["path"], "/path?x=1");
    assert_eq!(reply["subprotocol"], "chat");
    Ok(())
}

#[tokio::test]
async fn host_update_keeps_open_tunnels() -> Result<()> {
    let node = TestNode::start().await?;
    let one = WsEchoBackend::start("one").await?;
    let two = WsEchoBackend::start("two").await?;
    let host = node.add_host(&["upd.test"], &[one.url()]).await?;
    let (mut ws, _) = ws_connect(node.http, "upd.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "whoami?").await?, "one");

    let mut api = node.grpc_client().await?;
    api.update_host(UpdateHostRequest {
        id_or_domain: host.id.clone(),
        upstreams: Some(StringList {
            values: vec![two.url()],
        }),
        ..Default::default()
    })
    .await?;
    // An unrelated change too.
    let other = WsEchoBackend::start("other").await?;
    node.add_host(&["other.test"], &[other.url()]).await?;

    // New connections follow the new config...
    eventually(WAIT, || async {
        let (mut fresh, _) = ws_connect(node.http, "upd.test", "/", &[]).await?;
        let who = ask(&mut fresh, "whoami?").await?;
        ensure!(who == "two", "a new tunnel reached {who}");
        Ok(())
    })
    .await?;
    // ...and the old tunnel is still open, to the old upstream.
    assert_eq!(ask(&mut ws, "whoami?").await?, "one");
    assert_eq!(ask(&mut ws, "still here").await?, "still here");
    assert_eq!(one.open_connections(), 1);
    ws.close(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tunnels() -> Result<()> {
    const TUNNELS: usize = 1000;
    let (node, backend) = node_with_ws_backend("many.test", "many").await?;
    let rss_before = node.rss_kib().context("no RSS")?;
    let http = node.http;
    let tunnels: Vec<WsClient> = futures_util::stream::iter(0..TUNNELS)
        .map(|i| async move {
            let (mut ws, _) = ws_connect(http, "many.test", "/", &[]).await?;
            let text = format!("tunnel {i}");
            ensure!(ask(&mut ws, &text).await? == text, "tunnel {i}: wrong echo");
            anyhow::Ok(ws)
        })
        .buffer_unordered(50)
        .try_collect()
        .await?;
    eventually(WAIT, || async {
        let open = backend.open_connections();
        ensure!(open == TUNNELS, "{open} of {TUNNELS} open at the backend");
        Ok(())
    })
    .await?;
    let rss_after = node.rss_kib().context("no RSS")?;
    let delta = rss_after.saturating_sub(rss_before);
    println!(
        "node RSS: {rss_before} KiB before, {rss_after} KiB with {TUNNELS} open tunnels: \
         {:.1} KiB per tunnel",
        delta as f64 / TUNNELS as f64
    );

    // Every tunnel still works after all are open.
    let mut tunnels = tunnels;
    for (i, ws) in tunnels.iter_mut().enumerate() {
        let text = format!("again {i}");
        assert_eq!(ask(ws, &text).await?, text);
    }
    for mut ws in tunnels {
        ws.close(None).await?;
        // Read the close reply so the close completes from our side.
        let _ = tokio::time::timeout(WAIT, ws.next()).await;
    }
    eventually(Duration::from_secs(30), || async {
        let open = backend.open_connections();
        ensure!(
            open == 0,
            "{open} tunnels still open at the backend after closing"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sigterm_with_an_open_tunnel_exits_0_and_ends_the_tunnel() -> Result<()> {
    let node = TestNode::builder()
        .args(["--shutdown-grace-secs", "2"])
        .start()
        .await?;
    let backend = WsEchoBackend::start("term").await?;
    node.add_host(&["term.test"], &[backend.url()]).await?;
    let mut node = node;
    let (mut ws, _) = ws_connect(node.http, "term.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "before").await?, "before");
    node.signal("TERM")?;
    let status = node.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    // The client's side of the tunnel ends (it does not hang).
    let mut close_code = None;
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => close_code = frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the tunnel is still open after the node exited"
    );
    println!("close code seen by the client on SIGTERM: {close_code:?}");
    Ok(())
}

/// The architecture's drain: at the deadline, Close 1001 to both sides.
#[tokio::test]
async fn sigterm_sends_close_1001_to_both_sides() -> Result<()> {
    let node = TestNode::builder()
        .args(["--shutdown-grace-secs", "1"])
        .start()
        .await?;
    let backend = WsEchoBackend::start("drain").await?;
    node.add_host(&["drain.test"], &[backend.url()]).await?;
    let mut node = node;
    let (mut ws, _) = ws_connect(node.http, "drain.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "before").await?, "before");
    node.signal("TERM")?;
    match next_message(&mut ws).await? {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => bail!("expected Close 1001, got {other:?}"),
    }
    eventually(WAIT, || async {
        ensure!(
            backend.close_codes() == [1001],
            "backend close codes: {:?}",
            backend.close_codes()
        );
        Ok(())
    })
    .await?;
    let status = node.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    Ok(())
}

#[tokio::test]
async fn data_sent_right_behind_either_handshake_is_not_lost() -> Result<()> {
    let node = TestNode::start().await?;
    // The server speaks first, in the same write as its 101.
    let raw = RawUpgradeBackend::start_with_greeting(Some("hello from the backend")).await?;
    node.add_host(&["greet.test"], &[raw.url()]).await?;
    let (head, _) = ws_upgrade_head("greet.test", "/", &[]);
    let mut ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    let frame = ws.read_frame().await?;
    assert_eq!(frame.opcode, opcode::TEXT);
    assert_eq!(frame.payload, b"hello from the backend");

    // The client sends a frame in the same write as its handshake.
    let echo = WsEchoBackend::start("early").await?;
    node.add_host(&["early.test"], &[echo.url()]).await?;
    let (head, _) = ws_upgrade_head("early.test", "/", &[]);
    let early = client::client_frame(true, opcode::TEXT, b"sent with the handshake");
    let mut ws = RawWs::handshake_with(node.http, &head, &early).await?;
    assert_eq!(ws.status(), Some(101), "{}", ws.head);
    let (kind, data) = ws.read_message().await?;
    assert_eq!(kind, opcode::TEXT);
    assert_eq!(data, b"sent with the handshake");
    Ok(())
}

#[tokio::test]
async fn upgrades_that_cannot_be_tunnelled() -> Result<()> {
    let node = TestNode::start().await?;
    // websocket = false: the upgrade is not passed through.
    let ws_backend = WsEchoBackend::start("nows").await?;
    let mut req = charon_tests::host_request(&["nows.test"], &[ws_backend.url()]);
    req.websocket = Some(false);
    node.create_host(req).await?;
    node.wait_routed("nows.test").await?;
    let (head, _) = ws_upgrade_head("nows.test", "/", &[]);
    let ws = RawWs::handshake(node.http, &head).await?;
    assert_ne!(
        ws.status(),
        Some(101),
        "upgrade passed although websocket=false"
    );
    assert_eq!(ws_backend.accepted(), 0);

    // All upstreams refuse: 502.
    let dead = format!("http://{}", charon_tests::backends::refused_addr());
    node.add_host(&["deadws.test"], &[dead]).await?;
    let (head, _) = ws_upgrade_head("deadws.test", "/", &[]);
    let ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(502), "{}", ws.head);

    // An upstream that answers the upgrade with a plain 200: passed back as is.
    let plain = charon_tests::EchoBackend::start("plain").await?;
    node.add_host(&["plain.test"], &[plain.url()]).await?;
    let (head, _) = ws_upgrade_head("plain.test", "/", &[]);
    let ws = RawWs::handshake(node.http, &head).await?;
    assert_eq!(ws.status(), Some(200), "{}", ws.head);
    Ok(())
}

#[tokio::test]
async fn host_idle_timeout_closes_quiet_tunnels_with_1001() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = WsEchoBackend::start("idle").await?;
    let mut req = charon_tests::host_request(&["idle.test"], &[backend.url()]);
    req.host.as_mut().unwrap().ws_idle_timeout_secs = 1;
    node.create_host(req).await?;
    node.wait_routed("idle.test").await?;
    let (mut ws, _) = ws_connect(node.http, "idle.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "then silence").await?, "then silence");
    let msg = tokio::time::timeout(Duration::from_secs(10), next_message(&mut ws))
        .await
        .context("the idle tunnel was not closed within 10 s")??;
    match msg {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => bail!("expected Close 1001, got {other:?}"),
    }
    eventually(WAIT, || async {
        ensure!(
            backend.close_codes().contains(&1001),
            "backend close codes: {:?}",
            backend.close_codes()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn host_ping_interval_pings_the_client() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = WsEchoBackend::start("pinged").await?;
    let mut req = charon_tests::host_request(&["pinged.test"], &[backend.url()]);
    req.host.as_mut().unwrap().ws_ping_interval_secs = 1;
    node.create_host(req).await?;
    node.wait_routed("pinged.test").await?;
    let (mut ws, _) = ws_connect(node.http, "pinged.test", "/", &[]).await?;
    let pinged = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Message::Ping(_) = msg? {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await
    .context("no proxy ping within 10 s")??;
    assert!(pinged, "the tunnel ended without a ping");
    // The tunnel still works after the pings.
    assert_eq!(ask(&mut ws, "after ping").await?, "after ping");
    Ok(())
}

#[tokio::test]
async fn tunnel_survives_switching_websocket_off_and_renaming_domains() -> Result<()> {
    let (node, backend) = node_with_ws_backend("sw.test", "sw").await?;
    let (mut ws, _) = ws_connect(node.http, "sw.test", "/", &[]).await?;
    assert_eq!(ask(&mut ws, "one").await?, "one");
    let mut api = node.grpc_client().await?;
    api.update_host(UpdateHostRequest {
        id_or_domain: "sw.test".into(),
        websocket: Some(false),
        domains: Some(StringList {
            values: vec!["renamed.test".into()],
        }),
        ..Default::default()
    })
    .await?;
    node.wait_routed("renamed.test").await?;
    assert_eq!(ask(&mut ws, "two").await?, "two");
    assert_eq!(backend.open_connections(), 1);
    Ok(())
}
