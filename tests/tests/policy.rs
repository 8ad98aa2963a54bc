//! The proxy's request and response policy, one table per rule, each case
//! run over every front end: HTTP/1.1 and h2 with prior knowledge in clear
//! text, and HTTP/1.1 and h2 over TLS. HTTP/1 and h2 are served by
//! different protocol code (Charon's own and hyper's), so a rule written
//! for one of them and not the other shows up here as a protocol name in a
//! failure list.
//!
//! Rules: host selection, the `force_https` redirect, HSTS, the forwarded
//! headers with and without `--trusted-proxy` (two `X-Forwarded-For`
//! fields included), hop-by-hop removal both ways, error pages (404, 502,
//! 504: status, content type and body format), the upstream timeout and
//! failover to the next upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use charon_tests::backends::{refused_addr, SilentBackend};
use charon_tests::client::{self, HttpResponse, IO_TIMEOUT};
use charon_tests::tls::{client_config, tls_connect, wait_served, TestCa};
use charon_tests::{host_request, pattern_chunk, EchoBackend, TestNode, TestNodeBuilder};
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;

/// One front end of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2c,
    H1Tls,
    H2Tls,
}

const ALL: [Proto; 4] = [Proto::H1, Proto::H2c, Proto::H1Tls, Proto::H2Tls];

impl Proto {
    fn tls(self) -> bool {
        matches!(self, Proto::H1Tls | Proto::H2Tls)
    }
}

/// The name every TLS client asks for (SNI): the certificate is chosen by
/// it, the host by the request's Host or `:authority`, which the cases
/// vary freely.
const SNI: &str = "sni.policy.test";

/// A node with a certificate for [`SNI`] and clients for its four front
/// ends.
struct Front {
    node: TestNode,
    h1_tls: Arc<ClientConfig>,
    h2_tls: Arc<ClientConfig>,
}

/// A request of a case: extra header fields are sent in order, and a name
/// given twice is sent as two fields.
struct Req<'a> {
    method: Method,
    host: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Bytes,
}

fn get<'a>(host: &'a str, path: &'a str) -> Req<'a> {
    Req {
        method: Method::GET,
        host,
        path,
        headers: &[],
        body: Bytes::new(),
    }
}

impl Front {
    async fn start(builder: TestNodeBuilder) -> Result<Front> {
        let node = builder.start().await?;
        let ca = TestCa::new("Charon Policy CA")?;
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

    /// The listener port a request over `p` arrives on.
    fn port(&self, p: Proto) -> u16 {
        if p.tls() {
            self.node.https.port()
        } else {
            self.node.http.port()
        }
    }

    /// Sends `r` on a new connection over `p`; the whole response.
    async fn send(&self, p: Proto, r: &Req<'_>) -> Result<HttpResponse> {
        tokio::time::timeout(IO_TIMEOUT, self.send_inner(p, r))
            .await
            .with_context(|| format!("{p:?}: no response in time"))?
            .with_context(|| format!("{p:?} {} {}{}", r.method, r.host, r.path))
    }

    async fn send_inner(&self, p: Proto, r: &Req<'_>) -> Result<HttpResponse> {
        let addr = if p.tls() {
            self.node.https
        } else {
            self.node.http
        };
        match p {
            Proto::H1 => {
                client::request(
                    addr,
                    r.method.clone(),
                    r.host,
                    r.path,
                    r.headers,
                    r.body.clone(),
                )
                .await
            }
            Proto::H1Tls => {
                let tls = tls_connect(addr, SNI, &self.h1_tls).await?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .context("HTTP/1.1 handshake over TLS")?;
                tokio::spawn(conn);
                let req = client::build_request(
                    r.method.clone(),
                    r.host,
                    r.path,
                    r.headers,
                    r.body.clone(),
                )?;
                HttpResponse::read(sender.send_request(req).await?).await
            }
            Proto::H2c => {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                h2_send(TokioIo::new(tcp), "http", r).await
            }
            Proto::H2Tls => {
                let tls = tls_connect(addr, SNI, &self.h2_tls).await?;
                h2_send(TokioIo::new(tls), "https", r).await
            }
        }
    }

    /// Runs `check` on the response to `r` over every front end and fails
    /// with the list of every front end that broke the rule.
    async fn each<F>(&self, what: &str, r: &Req<'_>, check: F) -> Result<()>
    where
        F: Fn(Proto, &HttpResponse) -> Result<()>,
    {
        let mut failed = Vec::new();
        for p in ALL {
            let outcome = match self.send(p, r).await {
                Ok(resp) => check(p, &resp)
                    .with_context(|| format!("status {}, body {:.300}", resp.status, resp.text())),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                failed.push(format!("{p:?}: {e:#}"));
            }
        }
        ensure!(
            failed.is_empty(),
            "{what}: broken on {} front end(s):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
        Ok(())
    }
}

async fn h2_send<I>(io: I, scheme: &str, r: &Req<'_>) -> Result<HttpResponse>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .context("h2 handshake")?;
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(r.method.clone())
        .uri(format!("{scheme}://{}{}", r.host, r.path));
    for (name, value) in r.headers {
        b = b.header(*name, *value);
    }
    let req = b.body(Full::new(r.body.clone()))?;
    HttpResponse::read(sender.send_request(req).await?).await
}

/// The values the echo backend received for header `name`, one per field.
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

fn header(resp: &HttpResponse, name: &str) -> Option<String> {
    resp.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn expect_status(resp: &HttpResponse, want: u16) -> Result<()> {
    ensure!(
        resp.status.as_u16() == want,
        "status {}, want {want}",
        resp.status
    );
    Ok(())
}

fn expect_backend(resp: &HttpResponse, want: &str) -> Result<()> {
    expect_status(resp, 200)?;
    ensure!(
        resp.backend_name().as_deref() == Some(want),
        "reached {:?}, want {want}",
        resp.backend_name()
    );
    Ok(())
}

/// An error page: `status`, plain text, and a body of the one format
/// `"{code} {reason}: {what went wrong}\n"` that starts with `prefix`.
fn expect_error_page(resp: &HttpResponse, status: u16, prefix: &str) -> Result<()> {
    expect_status(resp, status)?;
    ensure!(
        header(resp, "content-type").as_deref() == Some("text/plain; charset=utf-8"),
        "content-type {:?}",
        header(resp, "content-type")
    );
    let text = resp.text();
    ensure!(
        text.starts_with(prefix) && text.ends_with('\n') && text.lines().count() == 1,
        "error page {text:?} is not one line starting with {prefix:?}"
    );
    Ok(())
}

#[tokio::test]
async fn host_selection() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let a = EchoBackend::start("a").await?;
    let wild = EchoBackend::start("wild").await?;
    let exact = EchoBackend::start("exact").await?;
    let api = EchoBackend::start("api").await?;
    f.node.add_host(&["a.pol.test"], &[a.url()]).await?;
    f.node.add_host(&["*.w.pol.test"], &[wild.url()]).await?;
    f.node.add_host(&["x.w.pol.test"], &[exact.url()]).await?;
    let mut req = host_request(&["loc.pol.test"], &[a.url()]);
    req.host.as_mut().context("host")?.locations = vec![charon_proto::v1::Location {
        path_prefix: "/api".into(),
        upstreams: vec![api.url()],
        balancing: None,
        ..Default::default()
    }];
    f.node.create_host(req).await?;
    f.node.wait_routed("loc.pol.test").await?;

    let cases: &[(&str, &str, Option<&str>)] = &[
        ("a.pol.test", "/", Some("a")),
        ("A.Pol.Test", "/", Some("a")),
        ("a.pol.test:8080", "/", Some("a")),
        ("a.pol.test.", "/", Some("a")),
        ("y.w.pol.test", "/", Some("wild")),
        ("z.y.w.pol.test", "/", Some("wild")),
        ("x.w.pol.test", "/", Some("exact")),
        ("w.pol.test", "/", None),
        ("loc.pol.test", "/api/x?q=1", Some("api")),
        ("loc.pol.test", "/apix", Some("a")),
        ("nobody.pol.test", "/", None),
    ];
    for (host, path, want) in cases {
        f.each(
            &format!("{host}{path}"),
            &get(host, path),
            |_, resp| match want {
                Some(name) => {
                    expect_backend(resp, name)?;
                    let json = resp.json()?;
                    ensure!(json["path"] == *path, "upstream path {}", json["path"]);
                    Ok(())
                }
                None => {
                    let name = host.strip_suffix('.').unwrap_or(host);
                    expect_error_page(
                        resp,
                        404,
                        &format!("404 Not Found: no proxy host for {name:?}"),
                    )
                }
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn force_https_and_hsts() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let backend = EchoBackend::start("echo").await?;
    let dead = format!("http://{}", refused_addr());
    let with = |domain: &str, upstream: &str, force: bool, hsts: u32, sub: bool| {
        let mut req = host_request(&[domain], &[upstream.to_owned()]);
        let h = req.host.as_mut().expect("host");
        h.force_https = force;
        h.hsts_max_age_secs = hsts;
        h.hsts_include_subdomains = sub;
        req
    };
    for req in [
        with("secure.pol.test", &backend.url(), true, 31_536_000, true),
        with("hsts.pol.test", &backend.url(), false, 600, false),
        with("plain.pol.test", &backend.url(), false, 0, false),
        with("hstsdead.pol.test", &dead, false, 600, false),
    ] {
        let domain = req.host.as_ref().context("host")?.domains[0].clone();
        f.node.create_host(req).await?;
        f.node.wait_routed(&domain).await?;
    }
    let https_port = f.node.https.port();
    let hits = backend.hits();

    // force_https: plain text gets a 308 to the HTTPS listener with path and
    // query (method and body kept by the client), TLS is served with HSTS.
    let post = Req {
        method: Method::POST,
        host: "secure.pol.test",
        path: "/a/b?x=1&y=two",
        headers: &[],
        body: Bytes::from_static(b"body"),
    };
    let location = format!("https://secure.pol.test:{https_port}/a/b?x=1&y=two");
    f.each("force_https", &post, |p, resp| {
        if p.tls() {
            expect_backend(resp, "echo")?;
            ensure!(
                header(resp, "strict-transport-security").as_deref()
                    == Some("max-age=31536000; includeSubDomains"),
                "HSTS {:?}",
                header(resp, "strict-transport-security")
            );
            return Ok(());
        }
        expect_status(resp, 308)?;
        ensure!(
            header(resp, "location").as_deref() == Some(location.as_str()),
            "location {:?}",
            header(resp, "location")
        );
        ensure!(
            header(resp, "strict-transport-security").is_none(),
            "HSTS on plain HTTP"
        );
        ensure!(
            header(resp, "content-type").as_deref() == Some("text/plain; charset=utf-8"),
            "content-type {:?}",
            header(resp, "content-type")
        );
        ensure!(
            resp.text() == format!("redirecting to {location}\n"),
            "body {:?}",
            resp.text()
        );
        Ok(())
    })
    .await?;
    ensure!(
        backend.hits() == hits + 2,
        "only the two TLS requests may reach the backend: {} more hits",
        backend.hits() - hits
    );

    // HSTS alone: every front end is served; only TLS responses carry it.
    f.each("hsts", &get("hsts.pol.test", "/"), |p, resp| {
        expect_backend(resp, "echo")?;
        let want = p.tls().then_some("max-age=600");
        ensure!(
            header(resp, "strict-transport-security").as_deref() == want,
            "HSTS {:?}, want {want:?}",
            header(resp, "strict-transport-security")
        );
        Ok(())
    })
    .await?;
    f.each("no hsts", &get("plain.pol.test", "/"), |_, resp| {
        expect_backend(resp, "echo")?;
        ensure!(header(resp, "strict-transport-security").is_none(), "HSTS");
        Ok(())
    })
    .await?;
    // An error page of an HSTS host over TLS carries it too.
    f.each("hsts on 502", &get("hstsdead.pol.test", "/"), |p, resp| {
        expect_error_page(resp, 502, "502 Bad Gateway: upstream ")?;
        let want = p.tls().then_some("max-age=600");
        ensure!(
            header(resp, "strict-transport-security").as_deref() == want,
            "HSTS {:?}, want {want:?}",
            header(resp, "strict-transport-security")
        );
        Ok(())
    })
    .await
}

/// Header fields a case sends, in order.
type Fields = &'static [(&'static str, &'static str)];

const SPOOFED: &[(&str, &str)] = &[
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Real-IP", "203.0.113.9"),
    ("X-Forwarded-Proto", "gopher"),
    ("X-Forwarded-Host", "evil.test"),
    ("X-Forwarded-Port", "1"),
    ("Forwarded", "for=203.0.113.9"),
];

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let a = EchoBackend::start("a").await?;
    f.node.add_host(&["fwd.pol.test"], &[a.url()]).await?;
    let req = Req {
        headers: SPOOFED,
        ..get("fwd.pol.test", "/")
    };
    f.each("untrusted", &req, |p, resp| {
        expect_backend(resp, "a")?;
        let port = f.port(p).to_string();
        let proto = if p.tls() { "https" } else { "http" };
        for (name, want) in [
            ("x-forwarded-for", "127.0.0.1"),
            ("x-real-ip", "127.0.0.1"),
            ("x-forwarded-proto", proto),
            ("x-forwarded-host", "fwd.pol.test"),
            ("x-forwarded-port", port.as_str()),
            ("host", "fwd.pol.test"),
        ] {
            ensure!(
                echoed(resp, name) == [want],
                "{name}: {:?}",
                echoed(resp, name)
            );
        }
        ensure!(
            echoed(resp, "forwarded").is_empty(),
            "Forwarded: {:?}",
            echoed(resp, "forwarded")
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_peer_are_kept_and_appended() -> Result<()> {
    let f = Front::start(TestNode::builder().trusted_proxy("127.0.0.0/8")).await?;
    let a = EchoBackend::start("a").await?;
    f.node.add_host(&["fwd.pol.test"], &[a.url()]).await?;

    // (fields sent, X-Forwarded-For upstream, X-Real-IP upstream)
    let cases: &[(Fields, &str, &str)] = &[
        (&[], "127.0.0.1", "127.0.0.1"),
        (
            &[("X-Forwarded-For", "203.0.113.9")],
            "203.0.113.9, 127.0.0.1",
            "203.0.113.9",
        ),
        (
            &[("X-Forwarded-For", "203.0.113.9, 198.51.100.2")],
            "203.0.113.9, 198.51.100.2, 127.0.0.1",
            "203.0.113.9",
        ),
        // Two fields are one list (RFC 9110 §5.3): `a, b, peer`, whichever
        // protocol carried them.
        (
            &[
                ("X-Forwarded-For", "203.0.113.9"),
                ("X-Forwarded-For", "198.51.100.2"),
            ],
            "203.0.113.9, 198.51.100.2, 127.0.0.1",
            "203.0.113.9",
        ),
        (
            &[
                ("X-Forwarded-For", "203.0.113.9"),
                ("X-Real-IP", "192.0.2.1"),
            ],
            "203.0.113.9, 127.0.0.1",
            "192.0.2.1",
        ),
    ];
    for (sent, xff, xri) in cases {
        let req = Req {
            headers: sent,
            ..get("fwd.pol.test", "/")
        };
        f.each(&format!("trusted, sent {sent:?}"), &req, |_, resp| {
            expect_backend(resp, "a")?;
            ensure!(
                echoed(resp, "x-forwarded-for") == [*xff],
                "X-Forwarded-For {:?}, want one field {xff:?}",
                echoed(resp, "x-forwarded-for")
            );
            ensure!(
                echoed(resp, "x-real-ip") == [*xri],
                "X-Real-IP {:?}, want {xri:?}",
                echoed(resp, "x-real-ip")
            );
            Ok(())
        })
        .await?;
    }

    // A trusted peer's other forwarded values are kept as they came.
    let kept: &[(&str, &str)] = &[
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "orig.example"),
        ("X-Forwarded-Port", "443"),
        ("Forwarded", "for=203.0.113.9"),
    ];
    let req = Req {
        headers: kept,
        ..get("fwd.pol.test", "/")
    };
    f.each("trusted, kept", &req, |_, resp| {
        for (name, want) in kept {
            let name = name.to_ascii_lowercase();
            ensure!(
                echoed(resp, &name) == [*want],
                "{name}: {:?}",
                echoed(resp, &name)
            );
        }
        Ok(())
    })
    .await?;
    // And filled in when absent.
    f.each("trusted, absent", &get("fwd.pol.test", "/"), |p, resp| {
        let proto = if p.tls() { "https" } else { "http" };
        let port = f.port(p).to_string();
        for (name, want) in [
            ("x-forwarded-proto", proto),
            ("x-forwarded-host", "fwd.pol.test"),
            ("x-forwarded-port", port.as_str()),
        ] {
            ensure!(
                echoed(resp, name) == [want],
                "{name}: {:?}",
                echoed(resp, name)
            );
        }
        Ok(())
    })
    .await
}

/// A raw HTTP/1.1 upstream that keeps its connections and answers every
/// request head (no bodies) with `reply`. Returns its URL.
async fn raw_keepalive_upstream(reply: &'static [u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
            });
        }
    });
    Ok(url)
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let a = EchoBackend::start("a").await?;
    f.node.add_host(&["hop.pol.test"], &[a.url()]).await?;
    // h2 clients may not send connection-specific fields at all (RFC 9113
    // §8.2.2; hyper's client drops them), but `TE: trailers` is allowed and
    // is still hop-by-hop.
    let headers: &[(&str, &str)] = &[
        ("Connection", "keep-alive, X-Custom-Hop"),
        ("X-Custom-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("X-End-To-End", "yes"),
    ];
    let req = Req {
        headers,
        ..get("hop.pol.test", "/")
    };
    f.each("request hop-by-hop", &req, |_, resp| {
        expect_backend(resp, "a")?;
        for name in ["x-custom-hop", "keep-alive", "proxy-connection", "te"] {
            ensure!(
                echoed(resp, name).is_empty(),
                "{name} reached the upstream: {:?}",
                echoed(resp, name)
            );
        }
        let connection = echoed(resp, "connection").join(",").to_ascii_lowercase();
        ensure!(
            !connection.contains("x-custom-hop"),
            "Connection: {connection}"
        );
        ensure!(
            echoed(resp, "x-end-to-end") == ["yes"],
            "X-End-To-End {:?}",
            echoed(resp, "x-end-to-end")
        );
        Ok(())
    })
    .await?;

    let url = raw_keepalive_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
    )
    .await?;
    f.node.add_host(&["rhop.pol.test"], &[url]).await?;
    f.each(
        "response hop-by-hop",
        &get("rhop.pol.test", "/"),
        |_, resp| {
            expect_status(resp, 200)?;
            ensure!(resp.text() == "ok", "body {:?}", resp.text());
            for name in ["x-resp-hop", "keep-alive", "proxy-connection"] {
                ensure!(header(resp, name).is_none(), "{name} reached the client");
            }
            ensure!(
                header(resp, "connection")
                    .is_none_or(|c| !c.to_ascii_lowercase().contains("x-resp-hop")),
                "Connection: {:?}",
                header(resp, "connection")
            );
            ensure!(
                header(resp, "x-kept").as_deref() == Some("yes"),
                "X-Kept lost"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn error_pages_timeout_and_failover() -> Result<()> {
    let f = Front::start(TestNode::builder()).await?;
    let live = EchoBackend::start("live").await?;
    let silent = SilentBackend::start().await?;
    let hanging_up = SilentBackend::start_hanging_up().await?;
    let dead1 = refused_addr();
    let dead2 = refused_addr();
    let url = |a: SocketAddr| format!("http://{a}");
    f.node
        .add_host(&["dead.pol.test"], &[url(dead1), url(dead2)])
        .await?;
    f.node
        .add_host(&["fo.pol.test"], &[url(dead1), live.url()])
        .await?;
    f.node
        .add_host(&["hup.pol.test"], &[hanging_up.url()])
        .await?;
    let mut req = host_request(&["slow.pol.test"], &[silent.url()]);
    req.host.as_mut().context("host")?.upstream_timeout_ms = 300;
    f.node.create_host(req).await?;

    // Every upstream refused: 502 naming one of them.
    f.each("all refused", &get("dead.pol.test", "/"), |_, resp| {
        expect_error_page(resp, 502, "502 Bad Gateway: upstream http://127.0.0.1:")?;
        ensure!(resp.text().contains("unreachable"), "{:?}", resp.text());
        Ok(())
    })
    .await?;

    // An upstream that closes without answering: 502.
    f.each("hang-up", &get("hup.pol.test", "/"), |_, resp| {
        expect_error_page(
            resp,
            502,
            &format!("502 Bad Gateway: upstream {} failed: ", hanging_up.url()),
        )
    })
    .await?;

    // Silent past the host's upstream timeout: 504 in about that time, the
    // same page on every front end.
    let mut pages = Vec::new();
    for p in ALL {
        let started = Instant::now();
        let resp = f.send(p, &get("slow.pol.test", "/")).await?;
        let took = started.elapsed();
        expect_error_page(&resp, 504, "504 Gateway Timeout: upstream ")
            .with_context(|| format!("{p:?}: {:?}", resp.text()))?;
        ensure!(took < Duration::from_secs(5), "{p:?}: 504 after {took:?}");
        pages.push((p, resp.text()));
    }
    ensure!(
        pages.iter().all(|(_, t)| *t == pages[0].1),
        "504 pages differ between front ends: {pages:#?}"
    );
    ensure!(silent.accepted() >= 4, "the upstream was not contacted");

    // Failover: a refused upstream is skipped, a request body is not lost
    // on the way.
    f.each("failover GET", &get("fo.pol.test", "/"), |_, resp| {
        expect_backend(resp, "live")
    })
    .await?;
    let upload = Req {
        method: Method::POST,
        body: pattern_chunk(0, 64 * 1024),
        ..get("fo.pol.test", "/upload")
    };
    f.each("failover POST", &upload, |_, resp| {
        expect_backend(resp, "live")?;
        let json = resp.json()?;
        ensure!(json["bytes"].as_u64() == Some(64 * 1024), "{json}");
        ensure!(json["pattern_ok"] == true, "{json}");
        Ok(())
    })
    .await
}
