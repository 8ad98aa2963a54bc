//! WebSockets over HTTP/2 (RFC 8441) through the proxy, over h2 with
//! prior knowledge in clear text and over TLS (ALPN h2): the node
//! advertises extended CONNECT, a client built on the `h2` crate opens
//! `:protocol = websocket` streams, and the upstream sees an ordinary
//! HTTP/1.1 upgrade. Messages both ways (up to 1 MiB), several sockets on
//! one connection, subprotocols, permessage-deflate, close codes both
//! ways, refusals and failover, a drain's 1001 inside the stream, and the
//! node setting that turns it all off.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use charon_tests::backends::recording::RecordingBackend;
use charon_tests::backends::refused_addr;
use charon_tests::client::{self, client_frame, opcode};
use charon_tests::h2ws::{H2Conn, H2WsClient};
use charon_tests::tls::{client_config, tls_connect, wait_served, TestCa};
use charon_tests::{
    eventually, PythonWsBackend, RawUpgradeBackend, TestNode, TestNodeBuilder, WsEchoBackend,
};
use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// How the client reaches the node.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// h2 with prior knowledge on the plain listener.
    H2c,
    /// h2 chosen by ALPN on the TLS listener.
    Tls,
}

const VIAS: [Via; 2] = [Via::H2c, Via::Tls];

/// A node whose TLS listener serves `*.h2.test` with a test CA's leaf.
struct Front {
    node: TestNode,
    tls: Arc<ClientConfig>,
}

impl Front {
    async fn start(builder: TestNodeBuilder) -> Result<Front> {
        let node = builder.start().await?;
        let ca = TestCa::new("Charon h2 WebSocket CA")?;
        let leaf = ca.leaf(&["*.h2.test"])?;
        node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
        let tls = client_config(&[&ca.pem], &["h2"])?;
        wait_served(node.https, "probe.h2.test", &tls, &leaf.fingerprint).await?;
        Ok(Front { node, tls })
    }

    /// A new h2 connection to the node for `authority`.
    async fn connect(&self, via: Via, authority: &str) -> Result<H2Conn> {
        match via {
            Via::H2c => {
                let tcp = tokio::net::TcpStream::connect(self.node.http).await?;
                tcp.set_nodelay(true)?;
                H2Conn::handshake(tcp, "http", authority).await
            }
            Via::Tls => {
                let tls = tls_connect(self.node.https, authority, &self.tls).await?;
                H2Conn::handshake(tls, "https", authority).await
            }
        }
    }

    /// A new connection and one WebSocket on it.
    async fn websocket(
        &self,
        via: Via,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> Result<(H2Conn, http::response::Parts, H2WsClient)> {
        let mut conn = self.connect(via, authority).await?;
        ensure!(
            conn.extended_connect_enabled(),
            "{via:?}: the node did not advertise extended CONNECT"
        );
        let (parts, ws) = conn.websocket(authority, "/socket", headers).await?;
        Ok((conn, parts, ws))
    }
}

use client::{ask, next_message};

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn text_and_binary_up_to_1_mib_are_echoed_over_both_listeners() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let backend = WsEchoBackend::start("echo").await?;
    front
        .node
        .add_host(&["echo.h2.test"], &[backend.url()])
        .await?;
    for (i, via) in VIAS.into_iter().enumerate() {
        let (_conn, parts, mut ws) = front
            .websocket(via, "echo.h2.test", &[("origin", "https://app.h2.test")])
            .await?;
        assert_eq!(parts.status, 200, "{via:?}");
        assert_eq!(ask(&mut ws, "hello over h2").await?, "hello over h2");
        assert_eq!(ask(&mut ws, "whoami?").await?, "echo");
        for size in [0usize, 125, 126, 65_535, 65_536, 1 << 20] {
            let payload: Vec<u8> = (0..size).map(|n| (n % 251) as u8).collect();
            ws.send(Message::binary(payload.clone())).await?;
            match next_message(&mut ws).await? {
                Message::Binary(b) => ensure!(b[..] == payload[..], "{via:?}: {size} B differ"),
                other => bail!("{via:?}: expected binary, got {other:?}"),
            }
        }
        let text = "é".repeat(1 << 19);
        assert_eq!(ask(&mut ws, &text).await?.len(), text.len(), "{via:?}");

        // The upstream saw an HTTP/1.1 upgrade with a key of the proxy's
        // and the client's Origin and path; the forwarded headers say how
        // the client came.
        let seen = ask(&mut ws, "headers?").await?;
        let seen: serde_json::Value = serde_json::from_str(&seen)?;
        assert_eq!(seen["origin"], "https://app.h2.test", "{via:?}: {seen}");
        assert_eq!(seen["upgrade"], "websocket", "{via:?}: {seen}");
        assert_eq!(seen["sec-websocket-version"], "13", "{via:?}: {seen}");
        ensure!(
            seen["sec-websocket-key"]
                .as_str()
                .is_some_and(|k| k.len() == 24),
            "{via:?}: no key of the proxy's: {seen}"
        );
        let proto = match via {
            Via::H2c => "http",
            Via::Tls => "https",
        };
        assert_eq!(seen["x-forwarded-proto"], proto, "{via:?}: {seen}");
        assert_eq!(backend.accepted(), i + 1);
        ws.close(None).await?;
    }
    Ok(())
}

#[tokio::test]
async fn several_sockets_share_one_h2_connection() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let backend = WsEchoBackend::start("many").await?;
    front
        .node
        .add_host(&["many.h2.test"], &[backend.url()])
        .await?;
    for via in VIAS {
        let mut conn = front.connect(via, "many.h2.test").await?;
        let mut sockets = Vec::new();
        for _ in 0..4 {
            let (parts, ws) = conn.websocket("many.h2.test", "/s", &[]).await?;
            assert_eq!(parts.status, 200);
            sockets.push(ws);
        }
        // Interleaved: each stream gets its own answers.
        for round in 0..3 {
            for (i, ws) in sockets.iter_mut().enumerate() {
                let text = format!("{via:?} socket {i} round {round}");
                assert_eq!(ask(ws, &text).await?, text);
            }
        }
        // Each is a tunnel of the registry, as an HTTP/1.1 one is.
        let out = front.node.ctl(&["-o", "json", "tunnels"]).await?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let n = list.as_array().context("not an array")?.len();
        ensure!(n == 4, "{via:?}: {n} tunnels listed: {list}");
        eventually(WAIT, || async {
            ensure!(
                backend.open_connections() == 4,
                "{}",
                backend.open_connections()
            );
            Ok(())
        })
        .await?;
        for ws in &mut sockets {
            ws.close(None).await?;
            while ws.next().await.is_some() {}
        }
        eventually(WAIT, || async {
            ensure!(
                backend.open_connections() == 0,
                "{}",
                backend.open_connections()
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn subprotocol_is_negotiated_by_the_backend() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let backend = WsEchoBackend::start("proto").await?;
    front
        .node
        .add_host(&["proto.h2.test"], &[backend.url()])
        .await?;
    for via in VIAS {
        let (_c, parts, mut ws) = front
            .websocket(
                via,
                "proto.h2.test",
                &[("sec-websocket-protocol", "mqtt, superchat, chat")],
            )
            .await?;
        assert_eq!(
            header(&parts, "sec-websocket-protocol"),
            Some("superchat"),
            "{via:?}"
        );
        // The 101's connection-level fields stay on the upstream side.
        for name in ["sec-websocket-accept", "upgrade", "connection"] {
            assert_eq!(header(&parts, name), None, "{via:?}: {name}");
        }
        let seen: serde_json::Value = serde_json::from_str(&ask(&mut ws, "headers?").await?)?;
        assert_eq!(
            seen["sec-websocket-protocol"], "mqtt, superchat, chat",
            "{via:?}"
        );
        // No offer, no choice.
        let (_c, parts, _ws) = front.websocket(via, "proto.h2.test", &[]).await?;
        assert_eq!(header(&parts, "sec-websocket-protocol"), None);
    }
    Ok(())
}

/// Reads one WebSocket frame from the server: (first byte, payload).
async fn read_raw_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    ensure!(h[1] & 0x80 == 0, "a server frame is never masked");
    let len = match h[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((h[0], payload))
}

#[tokio::test]
async fn permessage_deflate_is_agreed_end_to_end() -> Result<()> {
    // Level 0: the backend's compressed messages are stored deflate
    // blocks, so their text can be found in the frames without inflating.
    let backend = PythonWsBackend::start_with_args(&["--deflate-level", "0"]).await?;
    let front = Front::start(TestNode::builder()).await?;
    front
        .node
        .add_host(&["py.h2.test"], &[backend.url()])
        .await?;
    for via in VIAS {
        let mut conn = front.connect(via, "py.h2.test").await?;
        let offer = "permessage-deflate; client_max_window_bits";
        let (parts, _, _) = conn
            .open(
                "py.h2.test",
                "/deflate",
                &[
                    ("sec-websocket-extensions", offer),
                    ("sec-websocket-protocol", "chat"),
                ],
            )
            .await?;
        assert_eq!(parts.status, 200, "{via:?}");
        let agreed = header(&parts, "sec-websocket-extensions").unwrap_or_default();
        ensure!(
            agreed.contains("permessage-deflate"),
            "{via:?}: 200 without deflate: {parts:?}"
        );
        assert_eq!(header(&parts, "sec-websocket-protocol"), Some("chat"));

        // Raw frames on a second stream: an uncompressed question (RSV1
        // clear is allowed), and the backend's answer comes compressed
        // (RSV1 set), passed through untouched.
        let (_, ws, _) = conn
            .open(
                "py.h2.test",
                "/deflate",
                &[("sec-websocket-extensions", offer)],
            )
            .await?;
        let mut io = ws.context("no stream")?.into_inner();
        io.write_all(&client_frame(true, opcode::TEXT, b"headers?"))
            .await?;
        let (b0, payload) = tokio::time::timeout(client::IO_TIMEOUT, read_raw_frame(&mut io))
            .await
            .context("no answer")??;
        assert_eq!(b0 & 0x0f, opcode::TEXT, "{via:?}");
        assert_eq!(b0 & 0x40, 0x40, "{via:?}: answer not compressed (RSV1)");
        let text = String::from_utf8_lossy(&payload);
        ensure!(
            text.contains("permessage-deflate") && text.contains("Sec-WebSocket-Key"),
            "{via:?}: backend's view: {text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn close_codes_travel_both_ways() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let backend = WsEchoBackend::start("close").await?;
    front
        .node
        .add_host(&["close.h2.test"], &[backend.url()])
        .await?;
    let mut expected = Vec::new();
    for (i, via) in VIAS.into_iter().enumerate() {
        // Client → backend.
        let code = 4000 + i as u16;
        let (_c, _, mut ws) = front.websocket(via, "close.h2.test", &[]).await?;
        assert_eq!(ask(&mut ws, "x").await?, "x");
        ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "client done".into(),
        }))
        .await?;
        while let Some(Ok(_)) = ws.next().await {}
        // Gone, as a browser's socket is after its close: the stream ends.
        drop(ws);
        expected.push(code);
        eventually(WAIT, || async {
            ensure!(
                backend.close_codes() == expected,
                "{:?}",
                backend.close_codes()
            );
            Ok(())
        })
        .await?;
        // Telemetry as for an HTTP/1.1 tunnel: the CONNECT's access-log
        // line (200 over HTTP/2) and the tunnel's line when it closed.
        let tls = matches!(via, Via::Tls);
        eventually(WAIT, || async {
            let lines: Vec<serde_json::Value> = front
                .node
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            ensure!(
                lines.iter().any(|v| v["kind"] == "tunnel"
                    && v["host"] == "close.h2.test"
                    && v["close_code"] == code
                    && v["tls"] == tls
                    && v["frames_to_upstream"].as_u64() >= Some(2)),
                "{via:?}: no tunnel line with close code {code}"
            );
            ensure!(
                lines.iter().any(|v| v["method"] == "CONNECT"
                    && v["status"] == 200
                    && v["proto"] == "HTTP/2.0"
                    && v["tls"] == tls),
                "{via:?}: no access-log line for the CONNECT"
            );
            Ok(())
        })
        .await?;

        // Backend → client.
        let code = 4100 + i as u16;
        let (_c, _, mut ws) = front.websocket(via, "close.h2.test", &[]).await?;
        ws.send(Message::text(format!("close:{code}"))).await?;
        match next_message(&mut ws).await? {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), code, "{via:?}"),
            other => bail!("{via:?}: expected Close {code}, got {other:?}"),
        }
        // The client's answering Close goes back (tungstenite sends it as
        // the stream is read on); the backend logs it too.
        while let Some(Ok(_)) = ws.next().await {}
        // Gone, as a browser's socket is after its close: the stream ends.
        drop(ws);
        expected.push(code);
        eventually(WAIT, || async {
            ensure!(
                backend.close_codes() == expected,
                "{:?}",
                backend.close_codes()
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn upgrade_head_is_spelled_canonically_with_a_valid_key() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let raw = RawUpgradeBackend::start().await?;
    front.node.add_host(&["raw.h2.test"], &[raw.url()]).await?;
    for via in VIAS {
        // The raw backend answers with the accept for the key it got: the
        // 200 says the proxy found it right.
        let (_c, parts, _ws) = front.websocket(via, "raw.h2.test", &[]).await?;
        assert_eq!(parts.status, 200);
    }
    let heads = raw.upgrade_heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in heads {
        ensure!(
            head.starts_with("GET /socket HTTP/1.1\r\nHost: raw.h2.test\r\n"),
            "{head}"
        );
        for line in ["\r\nUpgrade: websocket\r\n", "\r\nConnection: Upgrade\r\n"] {
            ensure!(head.contains(line), "{line:?} missing: {head}");
        }
        ensure!(head.contains("\r\nSec-WebSocket-Key: "), "{head}");
    }

    // A host that does not keep the client's Host: the upstream's own.
    let mut req = charon_tests::host_request(&["own.h2.test"], &[raw.url()]);
    req.preserve_host = Some(false);
    front.node.create_host(req).await?;
    front.node.wait_routed("own.h2.test").await?;
    let (_c, parts, _ws) = front.websocket(Via::Tls, "own.h2.test", &[]).await?;
    assert_eq!(parts.status, 200);
    let heads = raw.upgrade_heads();
    let head = heads.last().context("no upgrade head")?;
    ensure!(
        head.starts_with(&format!("GET /socket HTTP/1.1\r\nHost: {}\r\n", raw.addr)),
        "{head}"
    );
    Ok(())
}

#[tokio::test]
async fn refusals_failover_and_hosts_without_websockets() -> Result<()> {
    let front = Front::start(TestNode::builder()).await?;
    let node = &front.node;
    let refuses = RecordingBackend::start_answering(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nX-Why: origin\r\nConnection: close\r\n\r\nforbidden",
    )
    .await?;
    node.add_host(&["refuse.h2.test"], &[refuses.url()]).await?;
    let forged = RecordingBackend::start_answering(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: not-the-one\r\n\r\n",
    )
    .await?;
    node.add_host(&["forged.h2.test"], &[forged.url()]).await?;
    let plain = charon_tests::EchoBackend::start("plain").await?;
    node.add_host(&["plain.h2.test"], &[plain.url()]).await?;
    let ws = WsEchoBackend::start("second").await?;
    let dead = format!("http://{}", refused_addr());
    node.add_host(&["failover.h2.test"], &[dead.clone(), ws.url()])
        .await?;
    node.add_host(&["dead.h2.test"], &[dead]).await?;
    let mut off = charon_tests::host_request(&["off.h2.test"], &[ws.url()]);
    off.websocket = Some(false);
    node.create_host(off).await?;
    node.wait_routed("off.h2.test").await?;

    for via in VIAS {
        let mut conn = front.connect(via, "refuse.h2.test").await?;
        let (parts, ws_opened, body) = conn.open("refuse.h2.test", "/", &[]).await?;
        assert_eq!(parts.status, 403, "{via:?}");
        assert!(ws_opened.is_none());
        assert_eq!(&body[..], b"forbidden");
        assert_eq!(header(&parts, "x-why"), Some("origin"));
        for (host, status) in [
            ("forged.h2.test", 502),
            ("plain.h2.test", 502),
            ("dead.h2.test", 502),
            ("off.h2.test", 501),
            ("nobody.h2.test", 404),
        ] {
            let (parts, opened, body) = conn.open(host, "/", &[]).await?;
            assert_eq!(
                parts.status.as_u16(),
                status,
                "{via:?} {host}: {}",
                String::from_utf8_lossy(&body)
            );
            assert!(opened.is_none());
        }
        // Extended CONNECT for anything but a WebSocket: 501.
        let (parts, opened, _) = conn
            .open_protocol("failover.h2.test", "/", "connect-udp", &[])
            .await?;
        assert_eq!(parts.status, 501, "{via:?}");
        assert!(opened.is_none());
        // The first upstream refuses the connection: the next one is tried.
        let (parts, ws_opened, _) = conn.open("failover.h2.test", "/", &[]).await?;
        assert_eq!(parts.status, 200, "{via:?}");
        let mut ws_opened = ws_opened.context("no socket")?;
        assert_eq!(ask(&mut ws_opened, "whoami?").await?, "second");
    }
    Ok(())
}

/// A drain: the connection gets GOAWAY (no new streams) but its open
/// WebSockets keep working until the deadline, then get Close 1001 inside
/// their stream, and the stream ends.
#[tokio::test]
async fn drain_keeps_tunnels_until_the_deadline_then_sends_1001() -> Result<()> {
    for via in VIAS {
        let front = Front::start(TestNode::builder().args([
            "--drain-delay-secs",
            "0",
            "--drain-deadline-secs",
            "3",
            "--drain-spread-secs",
            "0",
            "--shutdown-grace-secs",
            "2",
        ]))
        .await?;
        let backend = WsEchoBackend::start("drain").await?;
        front
            .node
            .add_host(&["drain.h2.test"], &[backend.url()])
            .await?;
        let (conn, _, mut ws) = front.websocket(via, "drain.h2.test", &[]).await?;
        assert_eq!(ask(&mut ws, "before").await?, "before");
        let mut node = front.node;
        node.signal("TERM")?;
        // GOAWAY: new streams on this connection are refused...
        eventually(WAIT, || {
            let sender = conn.sender.clone();
            async move {
                let req = http::Request::get("http://drain.h2.test/").body(())?;
                match sender.ready().await {
                    Err(_) => Ok(()),
                    Ok(mut s) => match s.send_request(req, true) {
                        Err(_) => Ok(()),
                        Ok((resp, _)) => match resp.await {
                            Err(_) => Ok(()),
                            Ok(r) => bail!("a new stream was served: {}", r.status()),
                        },
                    },
                }
            }
        })
        .await?;
        // ...while the open tunnel still relays.
        assert_eq!(ask(&mut ws, "during").await?, "during", "{via:?}");
        match next_message(&mut ws).await? {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001, "{via:?}"),
            other => bail!("{via:?}: expected Close 1001, got {other:?}"),
        }
        // The closing handshake completes (tungstenite sends its answering
        // Close as it reads on), then the node ends the stream cleanly
        // (END_STREAM: a read gives EOF, not a reset).
        let end = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} });
        end.await
            .context("the closing handshake did not complete")?;
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(WAIT, ws.get_mut().read_to_end(&mut rest)).await;
        let eof = eof.context("the stream did not end")?;
        ensure!(
            eof.is_ok() && rest.is_empty(),
            "{via:?}: the stream ended with {eof:?} after {} more bytes",
            rest.len()
        );
        eventually(WAIT, || async {
            ensure!(
                backend.close_codes() == [1001],
                "{:?}",
                backend.close_codes()
            );
            Ok(())
        })
        .await?;
        let status = node.wait_exit(Duration::from_secs(15)).await?;
        assert!(status.success(), "{via:?}: exit after SIGTERM: {status}");
    }
    Ok(())
}

#[tokio::test]
async fn the_setting_off_advertises_nothing_and_refuses_connect() -> Result<()> {
    let front = Front::start(TestNode::builder().args(["--h2-websockets", "false"])).await?;
    let backend = WsEchoBackend::start("off").await?;
    front
        .node
        .add_host(&["off.h2.test"], &[backend.url()])
        .await?;
    for via in VIAS {
        let mut conn = front.connect(via, "off.h2.test").await?;
        assert!(
            !conn.extended_connect_enabled(),
            "{via:?}: SETTINGS_ENABLE_CONNECT_PROTOCOL sent although off"
        );
        match conn.open("off.h2.test", "/", &[]).await {
            Ok((parts, _, _)) => bail!("{via:?}: extended CONNECT answered {}", parts.status),
            // The node's h2 layer resets the stream: `:protocol` without
            // the setting is a malformed request (RFC 8441 §4).
            Err(e) => ensure!(
                format!("{e:#}").to_lowercase().contains("protocol"),
                "{via:?}: {e:#}"
            ),
        }
    }
    // WebSockets over HTTP/1.1 are not affected.
    let (mut ws, resp) = client::ws_connect(front.node.http, "off.h2.test", "/", &[]).await?;
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("h1")).await?;
    assert_eq!(ws.next().await.context("ended")??, Message::text("h1"));
    // On by default: the other tests' nodes advertise it.
    let on = TestNode::start().await?;
    let tcp = tokio::net::TcpStream::connect(on.http).await?;
    let conn = H2Conn::handshake(tcp, "http", "any.h2.test").await?;
    assert!(conn.extended_connect_enabled());
    Ok(())
}

// ---------------------------------------------------------------- Chromium

/// `charon_tls_handshakes_total` from the node's admin listener.
async fn tls_handshakes(node: &TestNode) -> Result<u64> {
    let resp = client::get(node.admin, "localhost", "/metrics").await?;
    let text = resp.text();
    text.lines()
        .find_map(|l| l.strip_prefix("charon_tls_handshakes_total "))
        .context("no charon_tls_handshakes_total in /metrics")?
        .trim()
        .parse()
        .context("charon_tls_handshakes_total")
}

/// Opens `window.s`: two sockets to the Python backend (subprotocol
/// `chat`, Chromium's own permessage-deflate offer) and one to the
/// tungstenite echo; each with a promise of its close event.
const OPEN_SOCKETS: &str = r#"(async () => {
  const base = `wss://${location.host}`;
  const open = (path, protos) => new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path, protos);
    ws.binaryType = "arraybuffer";
    ws.closed = new Promise(r => ws.addEventListener("close",
      e => r({code: e.code, reason: e.reason, clean: e.wasClean})));
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error("WebSocket to " + path + " failed"));
  });
  window.s = await Promise.all([open("/py/a", ["chat"]), open("/py/b", ["chat"]), open("/echo/c", [])]);
  return window.s.map(ws => ({protocol: ws.protocol, extensions: ws.extensions}));
})()"#;

/// Echoes on every socket (1 MiB binary and text through deflate), then
/// closes one from the browser (4000) and has the echo backend close
/// another (4001).
const ECHO_AND_CLOSE: &str = r#"(async () => {
  const next = ws => new Promise(r => ws.addEventListener("message", e => r(e.data), {once: true}));
  const [a, b, c] = window.s;
  const out = {};
  let p = next(a); a.send("hello from chromium"); out.text = await p;
  const big = new Uint8Array(1 << 20);
  for (let i = 0; i < big.length; i++) big[i] = (i * 7) % 251;
  p = next(b); b.send(big);
  const back = new Uint8Array(await p);
  out.binary_ok = back.length === big.length && back.every((v, i) => v === big[i]);
  const long = "charon ".repeat(150000);
  p = next(b); b.send(long); out.long_text_ok = (await p) === long;
  p = next(c); c.send("plain echo"); out.echo = await p;
  a.close(4000, "browser done"); out.client_close = await a.closed;
  c.send("close:4001"); out.server_close = await c.closed;
  return out;
})()"#;

/// Chromium loads a page over h2 from the node and opens its `wss://`
/// sockets on the page's own TLS connection (RFC 8441): no TLS handshake
/// after the page's, every tunnel from the same client address.
#[tokio::test]
async fn chromium_opens_websockets_over_the_pages_h2_connection() -> Result<()> {
    // The Python backend runs scripts/setup-test-env.sh, which also
    // installs chromium where apt-get can.
    let py = PythonWsBackend::start().await?;
    let Some(chromium) = charon_tests::chromium::find_chromium() else {
        eprintln!(
            "SKIPPED: chromium not installed (scripts/setup-test-env.sh installs Debian's \
             chromium with apt-get where it can; or set CHROMIUM_BIN): the browser test \
             of WebSockets over h2 was not run"
        );
        return Ok(());
    };
    let front = Front::start(TestNode::builder().args([
        "--drain-delay-secs",
        "0",
        "--drain-deadline-secs",
        "1",
        "--drain-spread-secs",
        "0",
        "--shutdown-grace-secs",
        "2",
    ]))
    .await?;
    let page_backend = charon_tests::EchoBackend::start("page").await?;
    let echo = WsEchoBackend::start("echo").await?;
    let mut req = charon_tests::host_request(&["app.h2.test"], &[page_backend.url()]);
    if let Some(h) = req.host.as_mut() {
        for (prefix, url) in [("/py", py.url()), ("/echo", echo.url())] {
            h.locations.push(charon_proto::v1::Location {
                path_prefix: prefix.into(),
                upstreams: vec![url],
                ..Default::default()
            });
        }
    }
    front.node.create_host(req).await?;
    front.node.wait_routed("app.h2.test").await?;

    let before = tls_handshakes(&front.node).await?;
    let browser = charon_tests::chromium::Chromium::start(&chromium).await?;
    let url = format!("https://app.h2.test:{}/page", front.node.https.port());
    let page = browser.open(&url).await?;
    let loaded = eventually(WAIT, || async {
        let v = page
            .eval("[document.readyState, location.href, performance.getEntriesByType('navigation')[0]?.nextHopProtocol]")
            .await?;
        ensure!(v[0] == "complete" && v[1] == url.as_str(), "page: {v}");
        Ok(v)
    })
    .await?;
    assert_eq!(loaded[2], "h2", "the page did not come over h2: {loaded}");
    // Chromium opens a second, speculative connection while it loads the
    // page (2 handshakes here; no request ever comes on it): the sockets
    // are counted from here.
    let page_handshakes = tls_handshakes(&front.node).await? - before;
    ensure!(
        page_handshakes >= 1,
        "the page came without a TLS handshake?"
    );
    println!("TLS handshakes while Chromium loaded the page: {page_handshakes}");
    let before = before + page_handshakes;

    let opened = page.eval(OPEN_SOCKETS).await?;
    for i in 0..2 {
        assert_eq!(opened[i]["protocol"], "chat", "{opened}");
        ensure!(
            opened[i]["extensions"]
                .as_str()
                .is_some_and(|e| e.contains("permessage-deflate")),
            "deflate not agreed: {opened}"
        );
    }
    // Every socket is a tunnel from the page's one connection.
    let out = front.node.ctl(&["-o", "json", "tunnels"]).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let clients: Vec<&str> = list
        .as_array()
        .context("not an array")?
        .iter()
        .filter_map(|t| t["client"].as_str())
        .collect();
    ensure!(
        clients.len() == 3 && clients.iter().all(|c| *c == clients[0]),
        "tunnels' clients: {list}"
    );
    // ...and that connection is the one the page itself came over (the
    // access-log line of `GET /page` names its client address and port).
    let page_clients: Vec<String> = front
        .node
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["method"] == "GET" && v["path"] == "/page")
        .filter_map(|v| v["client"].as_str().map(str::to_string))
        .collect();
    ensure!(
        page_clients == [clients[0]],
        "the page came from {page_clients:?}, the sockets from {}",
        clients[0]
    );

    let r = page.eval(ECHO_AND_CLOSE).await?;
    assert_eq!(r["text"], "hello from chromium", "{r}");
    assert_eq!(r["binary_ok"], true, "1 MiB binary echo differs: {r}");
    assert_eq!(r["long_text_ok"], true, "long text echo differs: {r}");
    assert_eq!(r["echo"], "plain echo", "{r}");
    assert_eq!(r["client_close"]["code"], 4000, "{r}");
    assert_eq!(r["server_close"]["code"], 4001, "{r}");
    eventually(WAIT, || async {
        ensure!(echo.close_codes() == [4001], "{:?}", echo.close_codes());
        Ok(())
    })
    .await?;
    assert_eq!(
        tls_handshakes(&front.node).await? - before,
        0,
        "the sockets should use the page's TLS connection, not their own"
    );

    // A drain: the remaining socket gets 1001 inside its stream.
    let mut node = front.node;
    node.signal("TERM")?;
    let closed = page.eval("window.s[1].closed").await?;
    assert_eq!(closed["code"], 1001, "{closed}");
    let status = node.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    Ok(())
}

/// A thousand WebSockets as streams of ten h2c connections (a hundred
/// each, as the benchmark's `idle-h2`): all open at once, all still
/// relaying, and the node's memory per idle h2 tunnel under the
/// architecture's 10 KiB target for any idle tunnel (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tunnels_over_ten_h2_connections() -> Result<()> {
    const CONNS: usize = 10;
    const PER_CONN: usize = 100;
    let node = TestNode::start().await?;
    let backend = WsEchoBackend::start("many").await?;
    node.add_host(&["many.h2.test"], &[backend.url()]).await?;
    let rss_before = node.rss_kib().context("no RSS")?;
    let mut conns = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..CONNS {
        let tcp = tokio::net::TcpStream::connect(node.http).await?;
        let conn = H2Conn::handshake(tcp, "http", "many.h2.test").await?;
        let opened: Vec<H2WsClient> = futures_util::future::try_join_all((0..PER_CONN).map(|_| {
            let mut c = H2Conn {
                sender: conn.sender.clone(),
                scheme: conn.scheme,
            };
            async move { anyhow::Ok(c.websocket("many.h2.test", "/", &[]).await?.1) }
        }))
        .await?;
        sockets.extend(opened);
        conns.push(conn);
    }
    let total = CONNS * PER_CONN;
    eventually(WAIT, || async {
        let open = backend.open_connections();
        ensure!(open == total, "{open} of {total} open at the backend");
        Ok(())
    })
    .await?;
    let rss_after = node.rss_kib().context("no RSS")?;
    let per_tunnel = rss_after.saturating_sub(rss_before) as f64 / total as f64;
    println!(
        "node RSS: {rss_before} KiB before, {rss_after} KiB with {total} idle h2 tunnels \
         on {CONNS} connections: {per_tunnel:.1} KiB per tunnel"
    );
    // Measured 6.5-6.7 KiB (debug build) against 4.6-5.0 for the HTTP/1.1
    // test's tunnels: the h2 stream, hyper's upgraded-stream bridge and its
    // send task come on top of the relay.
    ensure!(
        per_tunnel < 10.0,
        "{per_tunnel:.1} KiB per idle h2 tunnel: over the 10 KiB target"
    );
    for (i, ws) in sockets.iter_mut().enumerate() {
        let text = format!("again {i}");
        assert_eq!(ask(ws, &text).await?, text);
    }
    drop(sockets);
    drop(conns);
    eventually(Duration::from_secs(30), || async {
        let open = backend.open_connections();
        ensure!(open == 0, "{open} tunnels still open at the backend");
        Ok(())
    })
    .await
}

/// Traces as for an HTTP/1.1 WebSocket: the CONNECT's server span
/// continues the client's trace, the upgrade's client span is its child
/// and its context reaches the upstream, and the tunnel's span (a child of
/// the server span) ends with the close code, frames and its events.
#[tokio::test]
async fn h2_tunnels_are_traced_like_http1_ones() -> Result<()> {
    let collector = charon_tests::otlp::OtlpCollector::start().await?;
    let node = TestNode::builder()
        .args(["--otlp-endpoint", &collector.endpoint()])
        .start()
        .await?;
    let backend = WsEchoBackend::start("traced").await?;
    node.add_host(&["tr.h2.test"], &[backend.url()]).await?;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tcp = tokio::net::TcpStream::connect(node.http).await?;
    let mut conn = H2Conn::handshake(tcp, "http", "tr.h2.test").await?;
    let traceparent = format!("00-{trace}-{parent}-01");
    let (_, mut ws) = conn
        .websocket("tr.h2.test", "/t", &[("traceparent", &traceparent)])
        .await?;
    let seen: serde_json::Value = serde_json::from_str(&ask(&mut ws, "headers?").await?)?;
    let upstream_parent = seen["traceparent"]
        .as_str()
        .and_then(|t| t.split('-').nth(2))
        .context("no traceparent at the upstream")?
        .to_string();
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await?;
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);

    let spans = eventually(Duration::from_secs(20), || async {
        let spans = collector.spans();
        ensure!(
            spans.iter().any(|s| s.span.name == "WebSocket tr.h2.test"),
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
    ensure!(server.attr("http.request.method").as_deref() == Some("CONNECT"));
    ensure!(server.attr("http.response.status_code").as_deref() == Some("200"));
    let upstream = spans
        .iter()
        .find(|s| s.span_id() == upstream_parent)
        .context("the upstream's parent span was not exported")?;
    ensure!(upstream.parent_id() == server.span_id() && upstream.trace_id() == trace);
    ensure!(upstream.attr("http.response.status_code").as_deref() == Some("101"));
    let tunnel = spans
        .iter()
        .find(|s| s.span.name == "WebSocket tr.h2.test")
        .context("no tunnel span")?;
    ensure!(tunnel.parent_id() == server.span_id(), "{tunnel:?}");
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
    Ok(())
}
