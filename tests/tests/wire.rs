//! The proxy's strictness on the wire, over real sockets: a raw client in
//! front of a node and a [`RecordingBackend`] behind it. For each request
//! case, either the exact refusal the client gets (and nothing complete
//! reached the upstream), or the exact normalised bytes the upstream
//! received; for each crafted response, the exact bytes the client gets, or
//! a 502, or the cut. Among them the cases of the request-smuggling
//! differential of issue 17 (`0\r\n\n` in a trailer section, `5 `, `5;`,
//! `5 x`, `5;a="x` chunk lines, colon-less/NUL/folded trailers, TE lists).
//! Plus the request-head deadline: a client dripping its head is cut with
//! 408 at `--header-read-timeout-ms`, however often it sends a byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use charon_tests::backends::recording::Received;
use charon_tests::backends::RecordingBackend;
use charon_tests::client::raw_status;
use charon_tests::{eventually, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "wire.test";

struct Wire {
    node: TestNode,
    backend: RecordingBackend,
}

impl Wire {
    async fn start() -> Result<Wire> {
        let backend = RecordingBackend::start().await?;
        let node = TestNode::start().await?;
        node.add_host(&[HOST], &[backend.url()]).await?;
        backend.clear();
        Ok(Wire { node, backend })
    }

    /// The head the proxy sends upstream for `line` (`GET / HTTP/1.1`) with
    /// the client's `fields` (lines with CRLF) kept, and `framing` (a
    /// `Transfer-Encoding`/`Content-Length` line, or ""). Hosts keep the
    /// client's Host by default.
    fn upstream_head(&self, line: &str, fields: &str, framing: &str) -> String {
        format!(
            "{line}\r\nHost: {HOST}\r\n{fields}X-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Port: {port}\r\nX-Forwarded-Host: {HOST}\r\n{framing}\r\n",
            port = self.node.http.port(),
        )
    }

    /// What the upstream got for the last request: waits for its
    /// connection to end (the proxy answers the client before it closes a
    /// connection it gives up on).
    async fn last_received(&self) -> Result<Received> {
        eventually(Duration::from_secs(5), || async {
            let r = self.backend.received();
            ensure!(
                r.len() == 1,
                "{} upstream connections so far: {r:?}",
                r.len()
            );
            Ok(r[0].clone())
        })
        .await
    }
}

/// Writes `bytes` on a new connection and reads until the proxy closes it
/// (every request here says `Connection: close` or is refused).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(bytes).await?;
    let mut out = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("the proxy did not close the connection in 10 s")?;
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A chunked POST with `body` (framing included).
fn chunked_post(body: &str) -> String {
    format!(
        "POST /up HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
    )
}

/// Requests the proxy must refuse, with the status it must answer; nothing
/// complete may reach the upstream, and nothing after a refused framing.
fn refused_requests() -> Vec<(&'static str, String, u16)> {
    let te = |v: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: {v}\r\nConnection: close\r\n\r\n0\r\n\r\n"
        )
    };
    let get = |line: &str, fields: &str| {
        format!("{line}\r\nHost: {HOST}\r\n{fields}Connection: close\r\n\r\n")
    };
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: wire.test\r\n\r\n";
    vec![
        ("bare LF ending the trailer section", chunked_post(&format!("5\r\nhello\r\n0\r\n\n{smuggled}")), 400),
        ("bare LF in a trailer line", chunked_post("0\r\nX-T: 1\n\r\n"), 400),
        ("bare LF after a chunk size", chunked_post("5\nhello\r\n0\r\n\r\n"), 400),
        ("bare LF after chunk data", chunked_post("5\r\nhello\n0\r\n\r\n"), 400),
        ("space after a chunk size", chunked_post("5 \r\nhello\r\n0\r\n\r\n"), 400),
        ("empty chunk extension", chunked_post("5;\r\nhello\r\n0\r\n\r\n"), 400),
        ("garbage after a chunk size", chunked_post("5 x\r\nhello\r\n0\r\n\r\n"), 400),
        ("unterminated quoted extension", chunked_post("5;a=\"x\r\nhello\r\n0\r\n\r\n"), 400),
        ("overlong chunk size", chunked_post("10000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
        ("chunk longer than its size", chunked_post("3\r\nhello\r\n0\r\n\r\n"), 400),
        ("trailer without a colon", chunked_post("0\r\nX-T\r\n\r\n"), 400),
        ("NUL in a trailer", chunked_post("0\r\nX-T: a\0b\r\n\r\n"), 400),
        ("folded trailer", chunked_post("0\r\nX-T: a\r\n b\r\n\r\n"), 400),
        ("TE identity, chunked", te("identity, chunked"), 400),
        ("TE , chunked", te(", chunked"), 400),
        ("TE chunked, chunked", te("chunked, chunked"), 400),
        ("TE gzip, chunked", te("gzip, chunked"), 501),
        ("TE gzip", te("gzip"), 400),
        ("TE chunked, gzip", te("chunked, gzip"), 400),
        ("TE with Content-Length", format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
        ("two equal Content-Lengths", get("POST / HTTP/1.1", "Content-Length: 2\r\nContent-Length: 2\r\n") + "ab", 400),
        ("two differing Content-Lengths", get("POST / HTTP/1.1", "Content-Length: 2\r\nContent-Length: 3\r\n") + "abc", 400),
        ("Content-Length list", get("POST / HTTP/1.1", "Content-Length: 2, 2\r\n") + "ab", 400),
        ("target * without OPTIONS", get("GET * HTTP/1.1", ""), 400),
        ("CONNECT", get("CONNECT wire.test:443 HTTP/1.1", ""), 405),
        ("CONNECT with an origin-form target", get("CONNECT / HTTP/1.1", ""), 405),
        ("fragment in the target", get("GET /a#frag HTTP/1.1", ""), 400),
        ("userinfo in an absolute-form target", get("GET http://u@wire.test/ HTTP/1.1", ""), 400),
        ("whitespace before a colon", get("GET / HTTP/1.1", "X-T : 1\r\n"), 400),
        ("obs-fold in the head", get("GET / HTTP/1.1", "X-T: 1\r\n folded\r\n"), 400),
        ("bare CR in the head", get("GET / HTTP/1.1", "X-T: a\rb\r\n"), 400),
        ("NUL in the head", get("GET / HTTP/1.1", "X-T: a\0b\r\n"), 400),
        ("two Host fields", get("GET / HTTP/1.1", "Host: wire.test\r\n"), 400),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_nothing_whole_reaches_the_upstream() -> Result<()> {
    let w = Wire::start().await?;
    let mut failures = Vec::new();
    for (name, request, status) in refused_requests() {
        w.backend.clear();
        let got = exchange(w.node.http, request.as_bytes()).await?;
        let got = text(&got);
        if raw_status(&got) != Some(status) {
            failures.push(format!("{name}: expected {status}, got {got:?}"));
            continue;
        }
        // A request refused in its body reached the upstream as a head and
        // well-formed chunks, never whole and never past the bad framing.
        for r in w.backend.received() {
            if r.complete || r.text().contains("smuggled") {
                failures.push(format!("{name}: the upstream got {:?}", r.text()));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of the cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_upstream_normalised() -> Result<()> {
    let w = Wire::start().await?;
    let te = "Transfer-Encoding: chunked\r\n";
    let cases: Vec<(&str, String, String)> = vec![
        (
            "chunk extensions dropped, trailer re-emitted",
            chunked_post("5;a=b;c=\"q;\\\"\"\r\nhello\r\n0;z\r\nX-T:  1 \r\n\r\n"),
            w.upstream_head("POST /up HTTP/1.1", "", te) + "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        ),
        (
            "chunk sizes rewritten",
            chunked_post("00005\r\nhello\r\nA\r\n0123456789\r\n000\r\n\r\n"),
            w.upstream_head("POST /up HTTP/1.1", "", te) + "5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n",
        ),
        (
            "framing fields dropped from the trailers",
            chunked_post("0\r\nContent-Length: 5\r\nHost: evil\r\nX-T: 1\r\n\r\n"),
            w.upstream_head("POST /up HTTP/1.1", "", te) + "0\r\nX-T: 1\r\n\r\n",
        ),
        (
            "framing bytes inside chunk data are data",
            chunked_post("7\r\n0\r\n\r\nGE\r\n0\r\n\r\n"),
            w.upstream_head("POST /up HTTP/1.1", "", te) + "7\r\n0\r\n\r\nGE\r\n0\r\n\r\n",
        ),
        (
            "absolute-form with only a query",
            format!("GET http://{HOST}?q=1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
            w.upstream_head("GET /?q=1 HTTP/1.1", "", ""),
        ),
        (
            "OPTIONS *",
            format!("OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
            w.upstream_head("OPTIONS * HTTP/1.1", "", ""),
        ),
        (
            "bare LF head rewritten with CRLF",
            format!("GET /lf HTTP/1.1\nHost: {HOST}\nX-A:  1\nConnection: close\n\n"),
            w.upstream_head("GET /lf HTTP/1.1", "X-A: 1\r\n", ""),
        ),
        (
            "Content-Length body as it is",
            format!("POST /cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nConnection: close\r\n\r\n0\r\n\n"),
            w.upstream_head("POST /cl HTTP/1.1", "", "Content-Length: 4\r\n") + "0\r\n\n",
        ),
    ];
    let mut failures = Vec::new();
    for (name, request, expect) in cases {
        w.backend.clear();
        let got = text(&exchange(w.node.http, request.as_bytes()).await?);
        if raw_status(&got) != Some(200) {
            failures.push(format!("{name}: expected 200, got {got:?}"));
            continue;
        }
        let r = w.last_received().await?;
        if r.text() != expect || !r.complete {
            failures.push(format!(
                "{name}:\n  upstream got {:?}\n  expected     {expect:?}",
                r.text()
            ));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of the cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// What a client gets from a crafted response.
enum Gets {
    /// Exactly these bytes, then the close.
    Exactly(&'static str),
    /// A 502 made by the proxy.
    BadGateway,
    /// A 502, or (when the head had already gone out) this head and
    /// well-formed framing up to the bad byte, then the cut.
    BadGatewayOrCut(&'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_the_client_normalised_or_not_at_all() -> Result<()> {
    let w = Wire::start().await?;
    let chunked_head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases: Vec<(&str, String, Gets)> = vec![
        (
            "chunked response normalised",
            format!("{chunked_head}5;ext=\"1\"\r\nhello\r\n0005\r\nworld\r\n0\r\nX-T:  1\r\n\r\n"),
            Gets::Exactly("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n"),
        ),
        (
            "bare LF ending the trailer section",
            format!("{chunked_head}5\r\nhello\r\n0\r\n\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"),
            Gets::BadGatewayOrCut("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n"),
        ),
        (
            "space after a chunk size",
            format!("{chunked_head}5 \r\nhello\r\n0\r\n\r\n"),
            Gets::BadGatewayOrCut("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
        ),
        (
            "trailer without a colon",
            format!("{chunked_head}5\r\nhello\r\n0\r\nX-T\r\n\r\n"),
            Gets::BadGatewayOrCut("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n"),
        ),
        (
            "Transfer-Encoding gzip, chunked",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_string(),
            Gets::BadGateway,
        ),
        (
            "differing Content-Lengths",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".to_string(),
            Gets::BadGateway,
        ),
        (
            "obs-fold in the head",
            "HTTP/1.1 200 OK\r\nX-T: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok".to_string(),
            Gets::BadGateway,
        ),
        (
            "103 rewritten, not passed raw",
            "HTTP/1.1 103 \nLink:  </s.css>; rel=preload\nConnection: keep-alive\n\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
            Gets::Exactly("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
        ),
    ];
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let mut failures = Vec::new();
    for (name, answer, gets) in cases {
        w.backend.answer_with(answer.as_bytes());
        let got = text(&exchange(w.node.http, request.as_bytes()).await?);
        let ok = match &gets {
            Gets::Exactly(e) => got == *e,
            Gets::BadGateway => raw_status(&got) == Some(502),
            Gets::BadGatewayOrCut(prefix) => raw_status(&got) == Some(502) || got == *prefix,
        };
        if !ok {
            failures.push(format!("{name}: the client got {got:?}"));
        }
    }
    // HTTP/1.0 clients get the data only.
    w.backend
        .answer_with(format!("{chunked_head}5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n").as_bytes());
    let got = text(
        &exchange(
            w.node.http,
            format!("GET / HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        )
        .await?,
    );
    if got != "HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nhello" {
        failures.push(format!("HTTP/1.0 client: got {got:?}"));
    }
    // A 101 is rewritten too (its fields all kept).
    w.backend.answer_with(
        b"HTTP/1.1 101 \nUpgrade:  websocket\nConnection: Upgrade\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\n\n",
    );
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let got = text(&exchange(w.node.http, upgrade.as_bytes()).await?);
    let expect =
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    if got != expect {
        failures.push(format!("101: got {got:?}"));
    }
    if !failures.is_empty() {
        bail!(
            "{} of the cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// A client that sends its head one byte every 300 ms is answered 408 and
/// closed at the 2 s head deadline, not held for as long as it drips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_request_head_is_cut_at_the_deadline() -> Result<()> {
    let deadline = Duration::from_secs(2);
    let node = TestNode::builder()
        .arg("--header-read-timeout-ms")
        .arg(deadline.as_millis().to_string())
        .start()
        .await?;
    let mut tcp = TcpStream::connect(node.http).await?;
    let started = Instant::now();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Drip: {}\r\n\r\n",
        "a".repeat(64)
    );
    let (mut rd, mut wr) = tcp.split();
    let drip = async {
        for b in head.as_bytes() {
            if wr.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The whole head went out: the proxy never cut it.
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let got = tokio::select! {
        got = read => got,
        _ = drip => unreachable!("the drip never ends"),
        _ = tokio::time::sleep(deadline * 4) => {
            bail!("still open after {:?}: the head deadline is re-armed per read", deadline * 4)
        }
    };
    let took = started.elapsed();
    let got = text(&got);
    ensure!(raw_status(&got) == Some(408), "expected 408, got {got:?}");
    ensure!(
        took >= deadline - Duration::from_millis(100)
            && took < deadline + Duration::from_millis(1500),
        "closed after {took:?}, expected about {deadline:?}"
    );
    Ok(())
}
