//! Access lists (issue 20), through `charonctl` and real clients, each
//! case over every front end: HTTP/1.1 and h2 with prior knowledge in
//! clear text, HTTP/1.1 and h2 over TLS, and WebSocket upgrades (plain and
//! over TLS).
//!
//! Clients connect from chosen loopback addresses (127.0.0.2, .3, ...:
//! all of 127.0.0.0/8 is local on Linux), so rules on the client's
//! address are tested with real peers, and `--trusted-proxy 127.0.0.9`
//! makes one of them a trusted proxy whose `X-Forwarded-For` counts.
//!
//! Rules: allow/deny order (first match wins, then the default); a
//! location's own list instead of the host's; the client address through
//! a trusted proxy, and a spoofed `X-Forwarded-For` from an untrusted peer
//! (or left of the proxy's entry) that does not get past a deny; basic
//! auth right, wrong and missing (401 with `WWW-Authenticate`); refusals
//! counted per host and rule; validation naming the field; hashes never
//! shown; lists and attachments replicated and kept across a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use charon_tests::client::{self, ws_upgrade_head, HttpResponse, IO_TIMEOUT};
use charon_tests::tls::{client_config, wait_served, TestCa};
use charon_tests::wait::eventually;
use charon_tests::{EchoBackend, TestNode, TestNodeBuilder, WsEchoBackend};
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2c,
    H1Tls,
    H2Tls,
    /// A WebSocket upgrade over HTTP/1.1 in clear text.
    Ws,
    /// The same over TLS (`wss://`).
    Wss,
    /// A WebSocket over h2 (RFC 8441 extended CONNECT) in clear text:
    /// success is 200 rather than 101.
    H2Ws,
    /// The same over TLS.
    H2Wss,
}

/// Every way a WebSocket reaches the node.
const WS: [Proto; 4] = [Proto::Ws, Proto::Wss, Proto::H2Ws, Proto::H2Wss];

const HTTP: [Proto; 4] = [Proto::H1, Proto::H2c, Proto::H1Tls, Proto::H2Tls];

impl Proto {
    fn tls(self) -> bool {
        matches!(
            self,
            Proto::H1Tls | Proto::H2Tls | Proto::Wss | Proto::H2Wss
        )
    }
}

const SNI: &str = "sni.access.test";
/// The trusted proxy of [`Front::start`]'s node.
const PROXY: &str = "127.0.0.9";

struct Front {
    node: TestNode,
    h1_tls: Arc<ClientConfig>,
    h2_tls: Arc<ClientConfig>,
}

/// One request of a case.
struct Case<'a> {
    from: &'a str,
    host: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    /// The status every front end must give (101 for an allowed upgrade
    /// to a WebSocket location, 200 for an allowed request elsewhere).
    want: u16,
}

/// What a response said, whatever the protocol.
struct Answer {
    status: u16,
    body: String,
    www_authenticate: Option<String>,
    location: Option<String>,
}

async fn connect_from(from: &str, addr: SocketAddr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse()?, 0))
        .with_context(|| format!("binding a client socket to {from}"))?;
    let tcp = tokio::time::timeout(IO_TIMEOUT, sock.connect(addr))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

impl Front {
    async fn start(builder: TestNodeBuilder) -> Result<Front> {
        let node = builder.start().await?;
        let ca = TestCa::new("Charon Access CA")?;
        let leaf = ca.leaf(&[SNI])?;
        node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
        let h1_tls = client_config(&[&ca.pem], &["http/1.1"])?;
        let h2_tls = client_config(&[&ca.pem], &["h2"])?;
        wait_served(node.https, SNI, &h1_tls, &leaf.fingerprint).await?;
        Ok(Front {
            node,
            h1_tls,
            h2_tls,
        })
    }

    async fn send(&self, p: Proto, c: &Case<'_>) -> Result<Answer> {
        tokio::time::timeout(IO_TIMEOUT, self.send_inner(p, c))
            .await
            .with_context(|| format!("{p:?}: no response in time"))?
    }

    async fn send_inner(&self, p: Proto, c: &Case<'_>) -> Result<Answer> {
        let addr = if p.tls() {
            self.node.https
        } else {
            self.node.http
        };
        let tcp = connect_from(c.from, addr).await?;
        let connector = |cfg: &Arc<ClientConfig>| tokio_rustls::TlsConnector::from(cfg.clone());
        let name = rustls_pki_types::ServerName::try_from(SNI.to_string())?;
        match p {
            Proto::H1 => h1_send(tcp, c).await,
            Proto::H1Tls => h1_send(connector(&self.h1_tls).connect(name, tcp).await?, c).await,
            Proto::H2c => h2_send(tcp, "http", c).await,
            Proto::H2Tls => {
                h2_send(
                    connector(&self.h2_tls).connect(name, tcp).await?,
                    "https",
                    c,
                )
                .await
            }
            Proto::Ws => upgrade(tcp, c).await,
            Proto::Wss => upgrade(connector(&self.h1_tls).connect(name, tcp).await?, c).await,
            Proto::H2Ws => h2_upgrade(tcp, "http", c).await,
            Proto::H2Wss => {
                h2_upgrade(
                    connector(&self.h2_tls).connect(name, tcp).await?,
                    "https",
                    c,
                )
                .await
            }
        }
    }

    /// Runs `c` over each of `protos`; fails listing every front end that
    /// gave another status, or a 401 without a challenge.
    async fn each(&self, protos: &[Proto], c: &Case<'_>) -> Result<()> {
        let mut failed = Vec::new();
        for &p in protos {
            // An h2 WebSocket is accepted with 200, not 101.
            let want = match (p, c.want) {
                (Proto::H2Ws | Proto::H2Wss, 101) => 200,
                (_, w) => w,
            };
            match self.send(p, c).await {
                Ok(a) if a.status != want => {
                    failed.push(format!("{p:?}: status {}, body {:.200}", a.status, a.body))
                }
                Ok(a) if a.status == 401 && a.www_authenticate.is_none() => {
                    failed.push(format!("{p:?}: 401 without WWW-Authenticate"))
                }
                Ok(a) if a.status == 403 && !a.body.starts_with("403 Forbidden") => {
                    failed.push(format!("{p:?}: 403 body {:?}", a.body))
                }
                Ok(_) => {}
                Err(e) => failed.push(format!("{p:?}: {e:#}")),
            }
        }
        ensure!(
            failed.is_empty(),
            "from {} {}{} {:?}, want {}: broken on\n  {}",
            c.from,
            c.host,
            c.path,
            c.headers,
            c.want,
            failed.join("\n  ")
        );
        Ok(())
    }

    async fn ctl(&self, args: &[&str]) -> Result<String> {
        ctl_ok(&self.node, args).await
    }
}

/// `charonctl ARGS` must succeed; its stdout.
async fn ctl_ok(node: &TestNode, args: &[&str]) -> Result<String> {
    let out = node.ctl(args).await?;
    ensure!(
        out.status.success(),
        "charonctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `charonctl ARGS` must fail; its stderr.
async fn ctl_err(node: &TestNode, args: &[&str]) -> Result<String> {
    let out = node.ctl(args).await?;
    ensure!(
        !out.status.success(),
        "charonctl {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Result<Answer> {
    let field = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (www_authenticate, location) = (field("www-authenticate"), field("location"));
    let r = HttpResponse::read(resp).await?;
    Ok(Answer {
        status: r.status.as_u16(),
        body: r.text(),
        www_authenticate,
        location,
    })
}

async fn h1_send<I>(io: I, c: &Case<'_>) -> Result<Answer>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = client::build_request(Method::GET, c.host, c.path, c.headers, Bytes::new())?;
    answer(sender.send_request(req).await?).await
}

async fn h2_send<I>(io: I, scheme: &str, c: &Case<'_>) -> Result<Answer>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut b = Request::builder().uri(format!("{scheme}://{}{}", c.host, c.path));
    for (name, value) in c.headers {
        b = b.header(*name, *value);
    }
    answer(
        sender
            .send_request(b.body(Full::new(Bytes::new()))?)
            .await?,
    )
    .await
}

/// A WebSocket upgrade request; the response head (and the body of a
/// refusal, which is sent with a Content-Length).
async fn upgrade<I>(mut io: I, c: &Case<'_>) -> Result<Answer>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (head, _) = ws_upgrade_head(c.host, c.path, c.headers);
    io.write_all(head.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if io.read_buf(&mut buf).await? == 0 {
            bail!(
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = client::raw_status(&head).context("no status line")?;
    let field = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let mut body = buf[end..].to_vec();
    if status != 101 {
        let len: usize = field("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < len {
            let mut more = [0u8; 1024];
            let n = io.read(&mut more).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&more[..n]);
        }
    }
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        www_authenticate: field("www-authenticate"),
        location: field("location"),
    })
}

/// An RFC 8441 WebSocket: an extended CONNECT on a new h2 connection.
async fn h2_upgrade<I>(io: I, scheme: &'static str, c: &Case<'_>) -> Result<Answer>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = charon_tests::h2ws::H2Conn::handshake_only(io, scheme).await?;
    let (parts, _stream, body) = conn.open_stream(c.host, c.path, c.headers).await?;
    let field = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(Answer {
        status: parts.status.as_u16(),
        body: String::from_utf8_lossy(&body).into_owned(),
        www_authenticate: field("www-authenticate"),
        location: field("location"),
    })
}

fn basic(user_pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

/// A node trusting [`PROXY`], with hosts `acl.test` (list `lan`, and
/// `/admin` with its own list `admins`, `/ws` to a WebSocket backend) and
/// `auth.test` (basic auth), all made with `charonctl`.
async fn setup() -> Result<(Front, EchoBackend, WsEchoBackend)> {
    let f = Front::start(TestNode::builder().trusted_proxy(&format!("{PROXY}/32"))).await?;
    let echo = EchoBackend::start("echo").await?;
    let ws = WsEchoBackend::start("ws").await?;
    f.ctl(&[
        "acl",
        "add",
        "lan",
        "--deny",
        "127.0.0.3",
        "--allow",
        "127.0.0.0/8",
        "--default",
        "deny",
    ])
    .await?;
    f.ctl(&[
        "acl",
        "add",
        "admins",
        "--allow",
        "127.0.0.5/32",
        "--default",
        "deny",
    ])
    .await?;
    f.ctl(&[
        "acl",
        "add",
        "staff",
        "--user",
        "alice:s3cret",
        "--user",
        "bob:hunter2",
        "--realm",
        "staff only",
    ])
    .await?;
    let echo_url = echo.url();
    let admin = format!("/admin={echo_url}");
    let ws_loc = format!("/ws={}", ws.url());
    f.ctl(&[
        "host",
        "add",
        "acl.test",
        "--upstream",
        &echo_url,
        "--acl",
        "lan",
        "--location",
        &admin,
        "--location-acl",
        "/admin=admins",
        "--location",
        &ws_loc,
    ])
    .await?;
    f.ctl(&[
        "host",
        "add",
        "auth.test",
        "--upstream",
        &echo_url,
        "--location",
        &ws_loc,
        "--acl",
        "staff",
    ])
    .await?;
    f.node.wait_routed("acl.test").await.ok();
    Ok((f, echo, ws))
}

#[tokio::test]
async fn allow_deny_order_locations_and_trusted_proxies_over_every_front_end() -> Result<()> {
    let (f, _echo, _ws) = setup().await?;
    let case = |from, path, headers, want| Case {
        from,
        host: "acl.test",
        path,
        headers,
        want,
    };
    let cases = [
        // First match wins: .3 is denied before 127/8 allows.
        case("127.0.0.2", "/", &[][..], 200),
        case("127.0.0.3", "/", &[], 403),
        case("127.0.0.2", "/ws", &[], 101),
        case("127.0.0.3", "/ws", &[], 403),
        // The location's own list instead of the host's.
        case("127.0.0.2", "/admin", &[], 403),
        case("127.0.0.5", "/admin", &[], 200),
        case("127.0.0.5", "/admin/x?y", &[], 200),
        case("127.0.0.2", "/administrator", &[], 200),
        // A client's own X-Forwarded-For is never believed...
        case("127.0.0.3", "/", &[("x-forwarded-for", "127.0.0.2")], 403),
        case(
            "127.0.0.2",
            "/admin",
            &[("x-forwarded-for", "127.0.0.5")],
            403,
        ),
        // ...a trusted proxy's is, from its own entry leftwards...
        case(PROXY, "/", &[("x-forwarded-for", "127.0.0.3")], 403),
        case(PROXY, "/", &[("x-forwarded-for", "127.0.0.2")], 200),
        case(PROXY, "/admin", &[("x-forwarded-for", "127.0.0.5")], 200),
        case(PROXY, "/ws", &[("x-forwarded-for", "127.0.0.3")], 403),
        // ...but what the client wrote left of it is not.
        case(
            PROXY,
            "/",
            &[("x-forwarded-for", "127.0.0.2, 127.0.0.3")],
            403,
        ),
        case(
            PROXY,
            "/admin",
            &[("x-forwarded-for", "127.0.0.5, 127.0.0.2")],
            403,
        ),
    ];
    for c in &cases {
        let protos: &[Proto] = if c.path == "/ws" { &WS } else { &HTTP };
        f.each(protos, c).await?;
    }
    // The refusal's body says who was refused.
    let a = f
        .send(Proto::H2c, &case("127.0.0.3", "/", &[], 403))
        .await?;
    ensure!(a.body.contains("127.0.0.3"), "body {:?}", a.body);

    // Counted per host, list and deciding rule, on the admin listener.
    let metrics = client::get(f.node.admin, "admin", "/metrics").await?.text();
    for line in [
        r##"charon_access_refusals_total{host="acl.test",acl="lan",rule="#1 deny 127.0.0.3/32"}"##,
        r#"charon_access_refusals_total{host="acl.test",acl="admins",rule="default deny"}"#,
    ] {
        ensure!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    // A changed list applies at once, without touching the host.
    f.ctl(&["acl", "update", "lan", "--allow", "127.0.0.0/8"])
        .await?;
    f.each(&HTTP, &case("127.0.0.3", "/", &[], 200)).await?;
    Ok(())
}

/// (path, the `Authorization` field sent if any, status).
type AuthCase<'a> = (&'a str, Option<&'a [(&'a str, String); 1]>, u16);

#[tokio::test]
async fn basic_auth_right_wrong_and_missing_over_every_front_end() -> Result<()> {
    let (f, _echo, _ws) = setup().await?;
    let (alice, bob) = (basic("alice:s3cret"), basic("bob:hunter2"));
    let (wrong, nobody) = (basic("alice:hunter2"), basic("carol:s3cret"));
    let auth = |v: &str| [("authorization", v.to_string())];
    let (alice_h, bob_h) = (auth(&alice), auth(&bob));
    let (wrong_h, nobody_h, bearer_h) = (auth(&wrong), auth(&nobody), auth("Bearer abc"));
    // (path, Authorization sent, status)
    let cases: [AuthCase<'_>; 8] = [
        ("/", None, 401),
        ("/", Some(&wrong_h), 401),
        ("/", Some(&nobody_h), 401),
        ("/", Some(&bearer_h), 401),
        ("/", Some(&alice_h), 200),
        ("/", Some(&bob_h), 200),
        ("/ws", None, 401),
        ("/ws", Some(&alice_h), 101),
    ];
    for (path, sent, want) in cases {
        let headers: Vec<(&str, &str)> = sent
            .into_iter()
            .flatten()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        let c = Case {
            from: "127.0.0.2",
            host: "auth.test",
            path,
            headers: &headers,
            want,
        };
        let protos: &[Proto] = if path == "/ws" { &WS } else { &HTTP };
        f.each(protos, &c).await?;
    }
    let missing = Case {
        from: "127.0.0.2",
        host: "auth.test",
        path: "/",
        headers: &[],
        want: 401,
    };
    for p in HTTP {
        let a = f.send(p, &missing).await?;
        ensure!(
            a.www_authenticate.as_deref() == Some(r#"Basic realm="staff only", charset="UTF-8""#),
            "{p:?}: WWW-Authenticate {:?}",
            a.www_authenticate
        );
    }
    Ok(())
}

#[tokio::test]
async fn lists_are_validated_named_in_errors_and_never_show_hashes() -> Result<()> {
    let node = TestNode::start().await?;
    let echo = EchoBackend::start("echo").await?;
    let err = ctl_err(&node, &["acl", "add", "bad", "--allow", "10.0.0.0/33"]).await?;
    ensure!(err.contains("rules[0].cidr"), "{err}");
    let err = ctl_err(&node, &["acl", "add", "bad/name"]).await?;
    ensure!(err.contains("name"), "{err}");
    let err = ctl_err(&node, &["acl", "add", "x", "--default", "maybe"]).await?;
    ensure!(err.contains("default_action"), "{err}");
    let err = ctl_err(&node, &["acl", "add", "x", "--user-hash", "a:$2b$10$abc"]).await?;
    ensure!(err.contains("users[0].password_hash"), "{err}");
    let listed = ctl_ok(&node, &["acl", "list", "-o", "json"]).await?;
    ensure!(
        listed.trim() == "[]",
        "refused lists were written: {listed}"
    );

    let err = ctl_err(
        &node,
        &[
            "host",
            "add",
            "v.test",
            "--upstream",
            &echo.url(),
            "--acl",
            "nope",
        ],
    )
    .await?;
    ensure!(err.contains("acl") && err.contains("nope"), "{err}");
    ctl_ok(
        &node,
        &[
            "acl",
            "add",
            "team",
            "--user",
            "alice:s3cret",
            "--deny",
            "10.0.0.0/8",
        ],
    )
    .await?;
    let loc = format!("/x={}", echo.url());
    let err = ctl_err(
        &node,
        &[
            "host",
            "add",
            "v.test",
            "--upstream",
            &echo.url(),
            "--location",
            &loc,
            "--location-acl",
            "/x=nope",
        ],
    )
    .await?;
    ensure!(err.contains("locations[0].acl"), "{err}");
    let host = ctl_ok(
        &node,
        &[
            "host",
            "add",
            "v.test",
            "--upstream",
            &echo.url(),
            "--acl",
            "team",
            "-o",
            "json",
        ],
    )
    .await?;
    let host: serde_json::Value = serde_json::from_str(&host)?;
    ensure!(host["acl"] == "team", "{host}");

    let shown = ctl_ok(&node, &["acl", "show", "team", "-o", "json"]).await?;
    let json: serde_json::Value = serde_json::from_str(&shown)?;
    ensure!(json["users"] == serde_json::json!(["alice"]), "{json}");
    ensure!(
        json["rules"][0]["action"] == "deny" && json["rules"][0]["cidr"] == "10.0.0.0/8",
        "{json}"
    );
    ensure!(json["used_by"][0] == host["id"], "{json}");
    ensure!(
        !shown.contains("argon2") && !shown.contains("s3cret"),
        "a secret is shown: {shown}"
    );
    let table = ctl_ok(&node, &["acl", "show", "team"]).await?;
    ensure!(
        !table.contains("argon2") && table.contains("alice"),
        "{table}"
    );

    // In use: refused, nothing removed; detached: removed.
    let err = ctl_err(&node, &["acl", "rm", "team"]).await?;
    ensure!(
        err.contains("used by") && err.contains(host["id"].as_str().unwrap_or("?")),
        "{err}"
    );
    ctl_ok(&node, &["host", "update", "v.test", "--acl", ""]).await?;
    ctl_ok(&node, &["acl", "rm", "team"]).await?;
    let listed = ctl_ok(&node, &["acl", "list"]).await?;
    ensure!(listed.contains("no access lists"), "{listed}");
    Ok(())
}

/// The status a request from `from` to `host` gets from `node`.
async fn status_from(node: &TestNode, from: &str, host: &str) -> Result<u16> {
    let tcp = connect_from(from, node.http).await?;
    let c = Case {
        from,
        host,
        path: "/",
        headers: &[],
        want: 0,
    };
    Ok(h1_send(tcp, &c).await?.status)
}

/// `rep.test` on `node` has the cap and location limit the test gave it.
async fn limits_on(node: &TestNode) -> Result<()> {
    let out = ctl_ok(node, &["host", "show", "rep.test", "-o", "json"]).await?;
    let h: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        h["max_conns_per_ip"] == 7 && h["locations"][0]["rate_limit"] == "3/s,burst=4",
        "{h}"
    );
    Ok(())
}

#[tokio::test]
async fn lists_and_redirects_replicate_and_survive_a_restart() -> Result<()> {
    const TOKEN: &str = "access-test-token";
    let member = |name: &str| {
        TestNode::builder()
            .name(name)
            .cluster_secret("access-test-cluster-secret")
            .env("CHARON_ADMIN_TOKEN", TOKEN)
            .args(["--anti-entropy-secs", "1"])
    };
    let n1 = member("n1").start().await?;
    let mut n2 = member("n2").seeds(&[&n1]).start().await?;
    let echo = EchoBackend::start("echo").await?;
    ctl_ok(
        &n1,
        &[
            "acl",
            "add",
            "lan",
            "--deny",
            "127.0.0.3",
            "--allow",
            "127.0.0.0/8",
        ],
    )
    .await?;
    ctl_ok(
        &n1,
        &[
            "host",
            "add",
            "rep.test",
            "--upstream",
            &echo.url(),
            "--acl",
            "lan",
            "--wait",
        ],
    )
    .await?;
    // The per-host cap and a location's limit replicate and are kept too.
    let login = format!(
        "/login={};rate-limit=3/s,burst=4;rate-scope=node",
        echo.url()
    );
    let limits = ["--max-conns-per-ip", "7", "--location", &login, "--wait"];
    ctl_ok(
        &n1,
        &[&["host", "update", "rep.test"][..], &limits[..]].concat(),
    )
    .await?;
    let moved = ["redirect", "add", "moved.test", "--to", "https://rep.test"];
    ctl_ok(&n1, &[&moved[..], &["--code", "307", "--wait"]].concat()).await?;
    eventually(Duration::from_secs(20), || async {
        let ok = status_from(&n2, "127.0.0.2", "rep.test").await?;
        let denied = status_from(&n2, "127.0.0.3", "rep.test").await?;
        let moved = status_from(&n2, "127.0.0.2", "moved.test").await?;
        ensure!(
            (ok, denied, moved) == (200, 403, 307),
            "from .2: {ok}, from .3: {denied}, redirect host: {moved}"
        );
        limits_on(&n2).await
    })
    .await?;
    // An update on the other node reaches this one.
    ctl_ok(
        &n2,
        &[
            "acl",
            "update",
            "lan",
            "--deny",
            "127.0.0.2",
            "--allow",
            "127.0.0.0/8",
        ],
    )
    .await?;
    eventually(Duration::from_secs(20), || async {
        let s = status_from(&n1, "127.0.0.2", "rep.test").await?;
        ensure!(s == 403, "n1 still lets .2 in: {s}");
        Ok(())
    })
    .await?;
    n2.restart().await?;
    n2.wait_routed("rep.test").await.ok();
    let (a, b) = (
        status_from(&n2, "127.0.0.2", "rep.test").await?,
        status_from(&n2, "127.0.0.3", "rep.test").await?,
    );
    ensure!((a, b) == (403, 200), "after restart: .2 {a}, .3 {b}");
    let moved = status_from(&n2, "127.0.0.2", "moved.test").await?;
    ensure!(moved == 307, "redirect host after restart: {moved}");
    limits_on(&n2).await
}

#[tokio::test]
async fn redirect_hosts_with_each_code_and_path_handling() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let echo = EchoBackend::start("echo").await?;
    f.ctl(&["host", "add", "proxied.test", "--upstream", &echo.url()])
        .await?;
    // (code, keep path, what /a/b?c=d is sent to): without --keep-path
    // the target as given, slash included; with it, the slash is dropped
    // before the request's path.
    let cases = [
        (301, false, "https://new.test/base/"),
        (302, true, "https://new.test/base/a/b?c=d"),
        (307, false, "https://new.test/base/"),
        (308, true, "https://new.test/base/a/b?c=d"),
    ];
    for (code, keep, _) in cases {
        let domain = format!("r{code}.test");
        let code_s = code.to_string();
        let mut args = vec![
            "redirect",
            "add",
            &domain,
            "--to",
            "https://new.test/base/",
            "--code",
            &code_s,
        ];
        if keep {
            args.push("--keep-path");
        }
        f.ctl(&args).await?;
    }
    for (code, _, want) in cases {
        let host = format!("r{code}.test");
        let c = Case {
            from: "127.0.0.1",
            host: &host,
            path: "/a/b?c=d",
            headers: &[],
            want: code,
        };
        f.each(&HTTP, &c).await?;
        for p in HTTP {
            let a = f.send(p, &c).await?;
            ensure!(
                a.location.as_deref() == Some(want),
                "{p:?} {host}: Location {:?}, want {want}",
                a.location
            );
        }
    }
    // Domains are unique together with proxy hosts, both ways.
    let err = ctl_err(
        &f.node,
        &["redirect", "add", "proxied.test", "--to", "https://x.test"],
    )
    .await?;
    ensure!(
        err.contains("proxied.test") && err.contains("already used"),
        "{err}"
    );
    let err = ctl_err(
        &f.node,
        &["host", "add", "r301.test", "--upstream", &echo.url()],
    )
    .await?;
    ensure!(
        err.contains("r301.test") && err.contains("already used"),
        "{err}"
    );
    // No redirect to itself, no code other than the four, no upstreams.
    let err = ctl_err(
        &f.node,
        &[
            "redirect",
            "add",
            "self.test",
            "*.self.test",
            "--to",
            "http://www.self.test/x",
        ],
    )
    .await?;
    ensure!(
        err.contains("redirect_to") && err.contains("itself"),
        "{err}"
    );
    let err = ctl_err(
        &f.node,
        &["redirect", "add", "rel.test", "--to", "/relative"],
    )
    .await?;
    ensure!(err.contains("redirect_to"), "{err}");
    let err = ctl_err(
        &f.node,
        &[
            "redirect",
            "update",
            "r301.test",
            "--to",
            "https://r301.test/",
        ],
    )
    .await?;
    ensure!(err.contains("redirect_to"), "{err}");

    let listed: serde_json::Value =
        serde_json::from_str(&f.ctl(&["redirect", "list", "-o", "json"]).await?)?;
    let codes: Vec<u64> = listed
        .as_array()
        .context("a JSON array")?
        .iter()
        .filter_map(|h| h["redirect_code"].as_u64())
        .collect();
    ensure!(
        codes == [301, 302, 307, 308],
        "listed codes {codes:?}: {listed}"
    );
    // An update changes the answer at once; rm frees the domain.
    f.ctl(&["redirect", "update", "r301.test", "--code", "302"])
        .await?;
    f.each(
        &HTTP,
        &Case {
            from: "127.0.0.1",
            host: "r301.test",
            path: "/",
            headers: &[],
            want: 302,
        },
    )
    .await?;
    f.ctl(&["redirect", "rm", "r301.test"]).await?;
    f.ctl(&["host", "add", "r301.test", "--upstream", &echo.url()])
        .await?;
    Ok(())
}

/// A WebSocket upgrade from `from` to `host` on `node`'s plain listener:
/// the status, and the connection when it became a tunnel.
async fn open_tunnel(node: &TestNode, from: &str, host: &str) -> Result<(u16, TcpStream)> {
    let mut tcp = connect_from(from, node.http).await?;
    let (head, _) = ws_upgrade_head(host, "/", &[]);
    tcp.write_all(head.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    // Byte by byte up to the blank line: nothing of the tunnel is read.
    while !buf.ends_with(b"\r\n\r\n") {
        ensure!(
            tcp.read(&mut byte).await? == 1,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let status = client::raw_status(&String::from_utf8_lossy(&buf)).context("no status")?;
    Ok((status, tcp))
}

#[tokio::test]
async fn a_connection_cap_counts_open_tunnels_per_client_and_spares_other_clients() -> Result<()> {
    let node = TestNode::builder()
        .args(["--max-conns-per-ip", "200"])
        .start()
        .await?;
    let ws = WsEchoBackend::start("ws").await?;
    let echo = EchoBackend::start("echo").await?;
    ctl_ok(&node, &["host", "add", "ws.test", "--upstream", &ws.url()]).await?;
    ctl_ok(
        &node,
        &["host", "add", "web.test", "--upstream", &echo.url()],
    )
    .await?;
    node.wait_routed("web.test").await?;
    let mut tunnels = Vec::new();
    for i in 0..200 {
        let (status, tcp) = open_tunnel(&node, "127.0.0.2", "ws.test").await?;
        ensure!(status == 101, "tunnel {i}: {status}");
        tunnels.push(tcp);
    }
    // The 201st connection of 127.0.0.2, upgrade or request, is refused...
    let (status, _) = open_tunnel(&node, "127.0.0.2", "ws.test").await?;
    ensure!(status == 429, "a 201st upgrade got {status}");
    let node = &node;
    let web = |from: &'static str| async move { status_from(node, from, "web.test").await };
    let s = web("127.0.0.2").await?;
    ensure!(s == 429, "a request over the cap got {s}");
    // ...another client is not affected...
    ensure!(web("127.0.0.3").await? == 200, "another client was refused");
    let (status, _other) = open_tunnel(node, "127.0.0.3", "ws.test").await?;
    ensure!(status == 101, "another client's upgrade got {status}");
    // ...and a tunnel that ends gives its place back.
    drop(tunnels.pop());
    eventually(Duration::from_secs(10), || async {
        let s = web("127.0.0.2").await?;
        ensure!(s == 200, "still refused after a tunnel closed: {s}");
        Ok(())
    })
    .await?;
    let metrics = client::get(node.admin, "admin", "/metrics").await?.text();
    ensure!(
        metrics.contains(r#"charon_connections_refused_total{reason="per_client_cap"}"#),
        "{metrics}"
    );
    Ok(())
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[tokio::test]
async fn a_slowloris_of_2000_connections_from_one_client_cannot_take_the_descriptors() -> Result<()>
{
    let node = TestNode::builder()
        .args(["--max-conns-per-ip", "100"])
        .start()
        .await?;
    let echo = EchoBackend::start("echo").await?;
    ctl_ok(
        &node,
        &["host", "add", "web.test", "--upstream", &echo.url()],
    )
    .await?;
    node.wait_routed("web.test").await?;
    let pid = node.pid().context("the node's pid")?;
    let before = descriptors(pid)?;
    // 2,000 connections each sending half a head and then nothing.
    let mut slow = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut tcp = connect_from("127.0.0.2", node.http).await?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Slow: ")
            .await?;
        slow.push(tcp);
    }
    // The node holds at most the cap of them (plus a few being turned
    // away), whatever the client keeps open.
    let held = eventually(Duration::from_secs(20), || async {
        let now = descriptors(pid)?;
        ensure!(
            now <= before + 100 + 20,
            "{now} descriptors open (was {before})"
        );
        Ok(now)
    })
    .await?;
    // Other clients are served meanwhile.
    let s = status_from(&node, "127.0.0.3", "web.test").await?;
    ensure!(s == 200, "another client got {s} during the slowloris");
    println!("descriptors: {before} before, {held} with 2,000 slow connections open");
    drop(slow);
    Ok(())
}

#[tokio::test]
async fn at_max_connections_the_node_stops_accepting_and_serves_what_it_has() -> Result<()> {
    let node = TestNode::builder()
        .args(["--max-connections", "20"])
        .start()
        .await?;
    let ws = WsEchoBackend::start("ws").await?;
    let echo = EchoBackend::start("echo").await?;
    ctl_ok(&node, &["host", "add", "ws.test", "--upstream", &ws.url()]).await?;
    ctl_ok(
        &node,
        &["host", "add", "web.test", "--upstream", &echo.url()],
    )
    .await?;
    node.wait_routed("web.test").await?;
    let mut tunnels = Vec::new();
    for i in 0..20 {
        let (status, tcp) = open_tunnel(&node, "127.0.0.2", "ws.test").await?;
        ensure!(status == 101, "tunnel {i}: {status}");
        tunnels.push(tcp);
    }
    // Full: a new connection is not answered (it waits in the backlog)...
    let waiting = tokio::spawn({
        let http = node.http;
        async move {
            let tcp = connect_from("127.0.0.3", http).await?;
            let c = Case {
                from: "127.0.0.3",
                host: "web.test",
                path: "/",
                headers: &[],
                want: 200,
            };
            h1_send(tcp, &c).await.map(|a| a.status)
        }
    });
    tokio::time::timeout(Duration::from_millis(500), async {
        while !waiting.is_finished() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .err()
    .context("a connection over --max-connections was served at once")?;
    // ...the open tunnels still work...
    let last = tunnels.last_mut().context("a tunnel")?;
    last.write_all(&client::client_frame(
        true,
        client::opcode::TEXT,
        b"still here",
    ))
    .await?;
    let mut frame = [0u8; 12];
    last.read_exact(&mut frame).await?;
    ensure!(&frame[2..] == b"still here", "echo {:?}", &frame[2..]);
    // ...and once one closes, the waiting connection is served.
    drop(tunnels.pop());
    let status = tokio::time::timeout(IO_TIMEOUT, waiting).await???;
    ensure!(status == 200, "the waiting request got {status}");
    ensure!(
        node.log().contains("--max-connections"),
        "no log line about the cap"
    );
    Ok(())
}

/// Requests to `host` on one keep-alive connection from `from` for
/// `length`, a few ms apart (well above any rate tested): how many were
/// admitted and how many got 429 (each with a `Retry-After`).
async fn hammer(addr: SocketAddr, from: &str, host: &str, length: Duration) -> Result<(u64, u64)> {
    let tcp = connect_from(from, addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let end = tokio::time::Instant::now() + length;
    let (mut ok, mut limited) = (0, 0);
    while tokio::time::Instant::now() < end {
        let req = client::build_request(Method::GET, host, "/", &[], Bytes::new())?;
        let resp = sender.send_request(req).await?;
        let retry = resp.headers().get("retry-after").cloned();
        let r = HttpResponse::read(resp).await?;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                let secs: u64 = retry
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .context("a 429 without a Retry-After in seconds")?;
                ensure!((1..=2).contains(&secs), "Retry-After {secs}");
                limited += 1;
            }
            s => bail!("status {s}: {}", r.text()),
        }
        // Pacing between requests: hundreds a second, far above the rates.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((ok, limited))
}

/// Admitted in `secs` seconds at `rate`/s with `burst`: the rate's worth
/// plus the burst the client starts with.
fn expected(rate: f64, burst: f64, secs: f64) -> f64 {
    rate * secs + burst
}

#[tokio::test]
async fn a_rate_limit_on_one_node_admits_the_rate_within_ten_percent() -> Result<()> {
    let node = TestNode::start().await?;
    let echo = EchoBackend::start("echo").await?;
    let args = ["host", "add", "rl.test", "--upstream", &echo.url()];
    let limit = [
        "--rate-limit",
        "20/s,burst=10",
        "--rate-limit-scope",
        "node",
    ];
    ctl_ok(&node, &[&args[..], &limit[..]].concat()).await?;
    node.wait_routed("rl.test").await?;
    let length = Duration::from_secs(10);
    // Two connections of one client share its budget; another client
    // has its own.
    let (a, b, other) = tokio::join!(
        hammer(node.http, "127.0.0.2", "rl.test", length),
        hammer(node.http, "127.0.0.2", "rl.test", length),
        hammer(node.http, "127.0.0.3", "rl.test", length),
    );
    let ((a_ok, a_lim), (b_ok, b_lim), (o_ok, _)) = (a?, b?, other?);
    let admitted = (a_ok + b_ok) as f64;
    let want = expected(20.0, 10.0, 10.0);
    println!("one node, 20/s burst 10, 10 s: admitted {admitted} (want {want}), refused {}, other client {o_ok}", a_lim + b_lim);
    ensure!(
        (admitted - want).abs() <= want * 0.1,
        "admitted {admitted}, want {want} ± 10%"
    );
    ensure!(a_lim + b_lim > 0, "nothing was refused");
    ensure!(
        (o_ok as f64 - want).abs() <= want * 0.1,
        "the other client was admitted {o_ok}"
    );
    let metrics = client::get(node.admin, "admin", "/metrics").await?.text();
    ensure!(
        metrics.contains(
            r#"charon_access_refusals_total{host="rl.test",acl="rate limit",rule="rate limit"}"#
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_cluster_rate_limit_holds_across_three_nodes_and_a_node_one_does_not() -> Result<()> {
    const TOKEN: &str = "rate-test-token-0123456789";
    let member = |name: &str| {
        TestNode::builder()
            .name(name)
            .cluster_secret("rate-test-cluster-secret")
            .env("CHARON_ADMIN_TOKEN", TOKEN)
    };
    let n1 = member("n1").start().await?;
    let n2 = member("n2").seeds(&[&n1]).start().await?;
    let n3 = member("n3").seeds(&[&n1]).start().await?;
    let nodes = [&n1, &n2, &n3];
    let echo = EchoBackend::start("echo").await?;
    let limit = ["--rate-limit", "20/s,burst=10"];
    let cluster = [
        "host",
        "add",
        "cl.test",
        "--upstream",
        &echo.url(),
        "--wait",
    ];
    ctl_ok(&n1, &[&cluster[..], &limit[..]].concat()).await?;
    let per_node = [
        "host",
        "add",
        "nd.test",
        "--upstream",
        &echo.url(),
        "--wait",
        "--rate-limit-scope",
        "node",
    ];
    ctl_ok(&n1, &[&per_node[..], &limit[..]].concat()).await?;
    for n in nodes {
        n.wait_routed("cl.test").await?;
        n.wait_routed("nd.test").await?;
        // Every member live here, so its admissions reach the others.
        eventually(Duration::from_secs(20), || async {
            let (members, _) = n.members().await?;
            ensure!(
                members.iter().filter(|m| m.live).count() == 3,
                "not 3 live members yet"
            );
            Ok(())
        })
        .await?;
    }
    let length = Duration::from_secs(10);
    let run = |host: &'static str| async move {
        let (a, b, c) = tokio::join!(
            hammer(n1.http, "127.0.0.2", host, length),
            hammer(n2.http, "127.0.0.2", host, length),
            hammer(n3.http, "127.0.0.2", host, length),
        );
        anyhow::Ok(a?.0 + b?.0 + c?.0)
    };
    let (cl, nd) = tokio::join!(run("cl.test"), run("nd.test"));
    let (cl, nd) = (cl? as f64, nd? as f64);
    let want = expected(20.0, 10.0, 10.0);
    println!("3 nodes, 20/s burst 10, 10 s, one client on all three: cluster scope admitted {cl} ({:.2}x), node scope {nd} ({:.2}x)", cl / want, nd / want);
    ensure!(
        cl <= want * 1.2,
        "cluster scope admitted {cl}, more than 1.2 x {want}"
    );
    ensure!(
        cl >= want * 0.8,
        "cluster scope admitted only {cl} of {want}"
    );
    ensure!(
        nd >= want * 2.5,
        "node scope admitted {nd}: expected about 3 x {want}"
    );
    Ok(())
}

/// The status of a plain request from `from` to `host{path}` over `proto`
/// (h1 or h2c) on `node`'s clear-text listener.
async fn status_at(
    node: &TestNode,
    proto: Proto,
    from: &str,
    host: &str,
    path: &str,
) -> Result<u16> {
    let tcp = connect_from(from, node.http).await?;
    let c = Case {
        from,
        host,
        path,
        headers: &[],
        want: 0,
    };
    let a = match proto {
        Proto::H2c => h2_send(tcp, "http", &c).await?,
        _ => h1_send(tcp, &c).await?,
    };
    Ok(a.status)
}

#[tokio::test]
async fn a_host_cap_counts_requests_and_tunnels_per_client_over_h1_and_h2() -> Result<()> {
    let node = TestNode::start().await?;
    let ws = WsEchoBackend::start("ws").await?;
    let echo = EchoBackend::start("echo").await?;
    // WebSockets at /, plain requests under /web; each host caps each
    // client at 20 requests and tunnels together.
    let web = format!("/web={}", echo.url());
    for host in ["cap1.test", "cap2.test"] {
        let args = [
            "host",
            "add",
            host,
            "--upstream",
            &ws.url(),
            "--location",
            &web,
        ];
        ctl_ok(&node, &[&args[..], &["--max-conns-per-ip", "20"]].concat()).await?;
        node.wait_routed(host).await?;
    }
    let shown = ctl_ok(&node, &["host", "show", "cap1.test"]).await?;
    ensure!(
        shown.contains("max conns per ip") && shown.contains("20 requests"),
        "{shown}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&node, &["host", "show", "cap1.test", "-o", "json"]).await?)?;
    ensure!(json["max_conns_per_ip"] == 20, "{json}");

    // Over HTTP/1.1: 20 idle tunnels from 127.0.0.2 fill its share...
    let mut tunnels = Vec::new();
    for i in 0..20 {
        let (status, tcp) = open_tunnel(&node, "127.0.0.2", "cap1.test").await?;
        ensure!(status == 101, "tunnel {i}: {status}");
        tunnels.push(tcp);
    }
    // ...the 21st upgrade is refused with a readable 429, so is a request
    // over h1 or h2...
    let over = Case {
        from: "127.0.0.2",
        host: "cap1.test",
        path: "/",
        headers: &[],
        want: 429,
    };
    let a = upgrade(connect_from("127.0.0.2", node.http).await?, &over).await?;
    ensure!(
        a.status == 429 && a.body.contains("20 requests and WebSockets open"),
        "21st upgrade: {} {:?}",
        a.status,
        a.body
    );
    for p in [Proto::H1, Proto::H2c] {
        let s = status_at(&node, p, "127.0.0.2", "cap1.test", "/web").await?;
        ensure!(s == 429, "{p:?} request over the cap got {s}");
    }
    // ...another client and another host are not affected...
    ensure!(status_at(&node, Proto::H1, "127.0.0.3", "cap1.test", "/web").await? == 200);
    let (status, _other) = open_tunnel(&node, "127.0.0.3", "cap1.test").await?;
    ensure!(status == 101, "another client's upgrade got {status}");
    ensure!(status_at(&node, Proto::H2c, "127.0.0.2", "cap2.test", "/web").await? == 200);
    // ...and a tunnel that closes gives its place back.
    drop(tunnels.pop());
    let node_ref = &node;
    eventually(Duration::from_secs(10), || async {
        let s = status_at(node_ref, Proto::H1, "127.0.0.2", "cap1.test", "/web").await?;
        ensure!(s == 200, "still refused after a tunnel closed: {s}");
        Ok(())
    })
    .await?;

    // Over h2: 20 WebSocket streams on one connection fill the share on
    // cap2.test; the 21st stream and a request are refused.
    let tcp = connect_from("127.0.0.2", node.http).await?;
    let mut h2 = charon_tests::h2ws::H2Conn::handshake_only(tcp, "http").await?;
    let mut streams = Vec::new();
    for i in 0..20 {
        let (parts, stream, _) = h2.open_stream("cap2.test", "/", &[]).await?;
        ensure!(parts.status == 200, "h2 stream {i}: {}", parts.status);
        streams.push(stream.context("an open stream")?);
    }
    let (parts, stream, body) = h2.open_stream("cap2.test", "/", &[]).await?;
    ensure!(
        parts.status == 429 && stream.is_none(),
        "21st h2 stream: {}",
        parts.status
    );
    ensure!(
        String::from_utf8_lossy(&body).contains("20 requests"),
        "{body:?}"
    );
    ensure!(status_at(&node, Proto::H1, "127.0.0.2", "cap2.test", "/web").await? == 429);
    ensure!(status_at(&node, Proto::H2c, "127.0.0.3", "cap2.test", "/web").await? == 200);
    let mut one = streams.pop().context("a stream")?;
    one.shutdown().await?;
    drop(one);
    eventually(Duration::from_secs(10), || async {
        let s = status_at(node_ref, Proto::H2c, "127.0.0.2", "cap2.test", "/web").await?;
        ensure!(s == 200, "still refused after an h2 tunnel closed: {s}");
        Ok(())
    })
    .await?;

    // Counted per host; logged once per client and minute, not per
    // refusal (three at least, above).
    let metrics = client::get(node.admin, "admin", "/metrics").await?.text();
    let line = r#"charon_access_refusals_total{host="cap1.test",acl="max conns per ip",rule="max conns per ip"}"#;
    ensure!(metrics.contains(line), "no {line} in\n{metrics}");
    let logged = node
        .log()
        .lines()
        .filter(|l| l.contains("cap1.test") && l.contains("--max-conns-per-ip"))
        .count();
    ensure!(
        logged == 1,
        "{logged} log lines for 3 refusals of one client"
    );
    Ok(())
}

/// `n` requests to `host{path}` from `from` on one connection over `proto`
/// (h1 or h2c), as fast as they are answered: how many got 200 and 429.
async fn burst(
    node: &TestNode,
    proto: Proto,
    from: &str,
    host: &str,
    path: &str,
    n: usize,
) -> Result<(usize, usize)> {
    let tcp = connect_from(from, node.http).await?;
    let mut statuses = Vec::with_capacity(n);
    if proto == Proto::H2c {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        for _ in 0..n {
            let req = Request::builder()
                .uri(format!("http://{host}{path}"))
                .body(Full::new(Bytes::new()))?;
            statuses.push(answer(sender.send_request(req).await?).await?.status);
        }
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        for _ in 0..n {
            let req = client::build_request(Method::GET, host, path, &[], Bytes::new())?;
            statuses.push(answer(sender.send_request(req).await?).await?.status);
        }
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    ensure!(ok + limited == n, "other statuses: {statuses:?}");
    Ok((ok, limited))
}

#[tokio::test]
async fn a_location_rate_limit_uses_its_own_bucket_over_h1_and_h2() -> Result<()> {
    let node = TestNode::start().await?;
    let echo = EchoBackend::start("echo").await?;
    let login = format!(
        "/login={};rate-limit=2/s,burst=5;rate-scope=node",
        echo.url()
    );
    let args = [
        "host",
        "add",
        "loc.test",
        "--upstream",
        &echo.url(),
        "--location",
        &login,
    ];
    ctl_ok(&node, &[&args[..], &["--rate-limit", "1000/s"]].concat()).await?;
    node.wait_routed("loc.test").await?;
    let shown = ctl_ok(&node, &["host", "show", "loc.test"]).await?;
    ensure!(
        shown.contains("(rate limit 2/s,burst=5 per ip, node scope)"),
        "{shown}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(&node, &["host", "show", "loc.test", "-o", "json"]).await?)?;
    ensure!(
        json["locations"][0]["rate_limit"] == "2/s,burst=5",
        "{json}"
    );
    // Each client gets the location's burst (and the rate's trickle while
    // the 20 requests last), over either protocol; the rest of the host
    // answers to the host's far higher limit.
    for (proto, from) in [(Proto::H1, "127.0.0.2"), (Proto::H2c, "127.0.0.3")] {
        let (ok, limited) = burst(&node, proto, from, "loc.test", "/login", 20).await?;
        ensure!(
            (5..=7).contains(&ok) && limited == 20 - ok,
            "{proto:?}: {ok} admitted of 20"
        );
        let (ok, _) = burst(&node, proto, from, "loc.test", "/", 20).await?;
        ensure!(
            ok == 20,
            "{proto:?}: the host's own limit admitted {ok} of 20"
        );
    }
    let metrics = client::get(node.admin, "admin", "/metrics").await?.text();
    let line = r#"charon_access_refusals_total{host="loc.test",acl="rate limit /login",rule="rate limit /login"}"#;
    ensure!(metrics.contains(line), "no {line} in\n{metrics}");
    // A bad location limit is refused naming the field; nothing written.
    let bad = format!("/x={};rate-limit=5/h", echo.url());
    let err = ctl_err(&node, &["host", "update", "loc.test", "--location", &bad]).await?;
    ensure!(err.contains("locations[0].rate_limit"), "{err}");
    Ok(())
}

#[tokio::test]
async fn basic_auth_is_verified_once_and_repeated_failures_lock_a_client_out() -> Result<()> {
    let (f, _echo, _ws) = setup().await?;
    let verifications = || async {
        let m = client::get(f.node.admin, "admin", "/metrics").await?.text();
        m.lines()
            .find_map(|l| l.strip_prefix("charon_basic_auth_verifications_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("no charon_basic_auth_verifications_total")
    };
    let alice = [("authorization", basic("alice:s3cret"))];
    let alice: Vec<(&str, &str)> = alice.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let case = |from, headers, want| Case {
        from,
        host: "auth.test",
        path: "/",
        headers,
        want,
    };
    // A valid client pays argon2 once, not per request, over every front end.
    let before = verifications().await?;
    for _ in 0..5 {
        f.each(&HTTP, &case("127.0.0.2", &alice, 200)).await?;
    }
    let after = verifications().await?;
    ensure!(
        after - before == 1,
        "{} verifications for 20 requests",
        after - before
    );

    // Ten wrong passwords from one client within a minute lock it out:
    // 429 with Retry-After, even with a password not known good yet...
    let bob_wrong = [("authorization", basic("bob:wrong"))];
    let bob_wrong: Vec<(&str, &str)> = bob_wrong.iter().map(|(n, v)| (*n, v.as_str())).collect();
    for i in 1..10 {
        let a = f
            .send(Proto::H1, &case("127.0.0.4", &bob_wrong, 401))
            .await?;
        ensure!(a.status == 401, "wrong password {i}: {}", a.status);
    }
    let a = f
        .send(Proto::H2c, &case("127.0.0.4", &bob_wrong, 429))
        .await?;
    ensure!(
        a.status == 429 && a.body.contains("too many failed sign-ins"),
        "10th: {} {:?}",
        a.status,
        a.body
    );
    let bob = [("authorization", basic("bob:hunter2"))];
    let bob: Vec<(&str, &str)> = bob.iter().map(|(n, v)| (*n, v.as_str())).collect();
    f.each(&HTTP, &case("127.0.0.4", &bob, 429)).await?;
    f.each(
        &WS,
        &Case {
            path: "/ws",
            ..case("127.0.0.4", &bob, 429)
        },
    )
    .await?;
    // ...while credentials already known good still pass, and other
    // clients are not affected.
    f.each(&HTTP, &case("127.0.0.4", &alice, 200)).await?;
    f.each(&HTTP, &case("127.0.0.5", &bob, 200)).await?;
    let metrics = client::get(f.node.admin, "admin", "/metrics").await?.text();
    let line =
        r#"charon_access_refusals_total{host="auth.test",acl="staff",rule="basic auth throttled"}"#;
    ensure!(metrics.contains(line), "no {line} in\n{metrics}");
    Ok(())
}
