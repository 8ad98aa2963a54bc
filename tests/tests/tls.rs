//! TLS termination: real `charon-node` processes, real TLS clients (rustls,
//! trusting a CA made at test time with rcgen), real backends.
//!
//! - SNI picks the certificate per name (exact, wildcard, IP without SNI);
//!   an unknown name gets the `unrecognized_name` alert.
//! - ALPN: h2 and http/1.1; `wss://` with a subprotocol.
//! - Rotation (ReplaceCertificate, same id): open connections and tunnels
//!   stay and keep working; new handshakes get the new certificate.
//! - Bad uploads are refused with InvalidArgument naming the field, and
//!   change nothing.
//! - Private keys are sealed at rest and never returned.
//! - Pinning; `force_https` (308) and HSTS; `https://` upstreams verified
//!   with a host's CA, refused with the wrong one, or not verified at all.
//! - Certificates survive a restart.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use charon_proto::v1::{
    Certificate, CreateHostRequest, DeleteCertificateRequest, GetCertificateRequest,
    ListCertificatesRequest, ProxyHost, ReplaceCertificateRequest, UpdateHostRequest,
};
use charon_tests::client::{self, HttpResponse};
use charon_tests::node::{host_request, CertsApi};
use charon_tests::tls::{
    client_config, expect_alert, h2_connect, h2_get, http1_get, https1_connect, https_get,
    served_fingerprint, tls_connect, wait_served, wss_connect, Leaf, TestCa,
};
use charon_tests::{eventually, EchoBackend, HttpsEchoBackend, TestNode, WsEchoBackend};
use futures_util::SinkExt;
use http::{Method, StatusCode};
use rustls::{AlertDescription, ClientConfig};
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// A client config trusting `ca` and offering HTTP/1.1 only.
fn http1_config(ca: &TestCa) -> Result<Arc<ClientConfig>> {
    client_config(&[&ca.pem], &["http/1.1"])
}

/// The `headers` of the echo backend's JSON: the first value of `name`.
fn echoed_header(resp: &HttpResponse, name: &str) -> Result<Option<String>> {
    Ok(resp.json()?["headers"][name][0].as_str().map(str::to_owned))
}

/// The status and message of a failed gRPC call.
fn status_of<T: std::fmt::Debug>(
    result: std::result::Result<tonic::Response<T>, tonic::Status>,
    what: &str,
) -> Result<tonic::Status> {
    match result {
        Ok(r) => bail!("{what}: expected a refusal, got {:?}", r.into_inner()),
        Err(status) => Ok(status),
    }
}

async fn list_certs(api: &mut CertsApi) -> Result<Vec<Certificate>> {
    Ok(api
        .list_certificates(ListCertificatesRequest {})
        .await?
        .into_inner()
        .certificates)
}

/// What identifies a stored certificate's state: id, version, fingerprint,
/// chain, update time.
fn cert_states(certs: &[Certificate]) -> Vec<(String, u64, String, String, u64)> {
    certs
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.version,
                c.fingerprint_sha256.clone(),
                c.cert_pem.clone(),
                c.updated_at_ms,
            )
        })
        .collect()
}

/// Writes `text` to `dir/name` and returns the path as a string.
fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> Result<String> {
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs charonctl and requires exit status 0; returns stdout.
async fn ctl_ok(node: &TestNode, args: &[&str]) -> Result<String> {
    let out = node.ctl(args).await?;
    ensure!(
        out.status.success(),
        "charonctl {args:?} failed with {}:\n{}{}",
        out.status,
        stdout_of(&out),
        stderr_of(&out)
    );
    Ok(stdout_of(&out))
}

// ------------------------------------------------------------------ SNI

#[tokio::test]
async fn sni_picks_the_certificate_for_each_name() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let a = ca.leaf(&["a.test"])?;
    let b = ca.leaf(&["b.test"])?;
    let wild = ca.leaf(&["*.wild.test"])?;
    let exact_in_wild = ca.leaf(&["exact.wild.test"])?;
    let ip = ca.leaf(&["127.0.0.1"])?;
    for leaf in [&a, &b, &wild, &exact_in_wild, &ip] {
        let stored = node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
        assert_eq!(
            stored.fingerprint_sha256, leaf.fingerprint,
            "the API's fingerprint is the leaf's"
        );
    }
    for domain in ["a.test", "b.test", "*.wild.test", "127.0.0.1"] {
        node.add_host(&[domain], &[backend.url()]).await?;
    }
    let config = http1_config(&ca)?;
    // The certificate table follows the store shortly after each change.
    wait_served(node.https, "a.test", &config, &a.fingerprint).await?;

    let expected: &[(&str, &Leaf)] = &[
        ("a.test", &a),
        ("b.test", &b),
        ("one.wild.test", &wild),
        ("two.wild.test", &wild),
        // An exact SAN beats a wildcard one.
        ("exact.wild.test", &exact_in_wild),
        // No SNI (an IP literal): the address the client connected to.
        ("127.0.0.1", &ip),
    ];
    for (name, leaf) in expected {
        wait_served(node.https, name, &config, &leaf.fingerprint).await?;
        let (resp, fp) = https_get(node.https, name, &config, "/hello?x=1").await?;
        assert_eq!(fp, leaf.fingerprint, "{name}: served leaf");
        assert_eq!(resp.status, StatusCode::OK, "{name}: {}", resp.text());
        let echo = resp.json()?;
        assert_eq!(echo["name"], "echo", "{name}");
        assert_eq!(echo["path"], "/hello?x=1", "{name}");
        assert_eq!(echoed_header(&resp, "host")?.as_deref(), Some(*name));
        assert_eq!(
            echoed_header(&resp, "x-forwarded-proto")?.as_deref(),
            Some("https"),
            "{name}: the upstream is told the client used HTTPS"
        );
    }

    // Unknown names and names a wildcard does not cover (two labels) are
    // refused with unrecognized_name, even when a host would route them.
    for name in ["unknown.test", "deep.one.wild.test", "wild.test"] {
        expect_alert(
            tls_connect(node.https, name, &config).await,
            AlertDescription::UnrecognisedName,
            name,
        )?;
    }
    // The refusal is logged with the name.
    eventually(WAIT, || async {
        ensure!(
            node.log().contains("unknown.test"),
            "no log line names unknown.test"
        );
        Ok(())
    })
    .await?;
    // The listener is still fine after refusals.
    let (resp, fp) = https_get(node.https, "a.test", &config, "/").await?;
    assert_eq!((resp.status, fp), (StatusCode::OK, a.fingerprint.clone()));
    Ok(())
}

// ------------------------------------------------------------------ ALPN

#[tokio::test]
async fn alpn_negotiates_h2_and_http1() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["h2.test"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    node.add_host(&["h2.test"], &[backend.url()]).await?;
    let both = client_config(&[&ca.pem], &["h2", "http/1.1"])?;
    wait_served(node.https, "h2.test", &both, &leaf.fingerprint).await?;

    // h2 first in the client's list: the node picks h2.
    let (mut h2, fp) = h2_connect(node.https, "h2.test", &both).await?;
    assert_eq!(fp, leaf.fingerprint);
    // Several requests, concurrently, on the one h2 connection.
    let mut requests = Vec::new();
    for i in 0..4 {
        let mut sender = h2.clone();
        requests.push(tokio::spawn(async move {
            h2_get(&mut sender, "h2.test", &format!("/multiplexed/{i}")).await
        }));
    }
    for (i, r) in requests.into_iter().enumerate() {
        let resp = r.await??;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        let echo = resp.json()?;
        assert_eq!(echo["path"], format!("/multiplexed/{i}"));
        assert_eq!(echoed_header(&resp, "host")?.as_deref(), Some("h2.test"));
        assert_eq!(
            echoed_header(&resp, "x-forwarded-proto")?.as_deref(),
            Some("https")
        );
    }
    let resp = h2_get(&mut h2, "h2.test", "/again").await?;
    assert_eq!(resp.status, StatusCode::OK);

    // http/1.1 only, or no ALPN at all: HTTP/1.1.
    for alpn in [&["http/1.1"][..], &[][..]] {
        let config = client_config(&[&ca.pem], alpn)?;
        let (mut sender, fp, negotiated) = https1_connect(node.https, "h2.test", &config).await?;
        assert_eq!(fp, leaf.fingerprint);
        assert_eq!(
            negotiated.as_deref(),
            alpn.first().copied(),
            "ALPN offered {alpn:?}"
        );
        let resp = http1_get(&mut sender, "h2.test", "/one").await?;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        // Keep-alive: a second request on the same connection.
        let resp = http1_get(&mut sender, "h2.test", "/two").await?;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.json()?["path"], "/two");
    }
    // An ALPN protocol the node does not speak is refused
    // (no_application_protocol, RFC 7301 §3.2).
    let odd = client_config(&[&ca.pem], &["spdy/3"])?;
    expect_alert(
        tls_connect(node.https, "h2.test", &odd).await,
        AlertDescription::NoApplicationProtocol,
        "ALPN spdy/3",
    )?;
    Ok(())
}

// ------------------------------------------------------------------ wss://

use client::{ask, next_message};

#[tokio::test]
async fn websocket_over_tls_with_a_subprotocol() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = WsEchoBackend::start("ws-echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["ws.test"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    node.add_host(&["ws.test"], &[backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "ws.test", &config, &leaf.fingerprint).await?;

    let (mut ws, resp, fp) = wss_connect(
        node.https,
        "ws.test",
        &config,
        "/chat?room=1",
        &[("Sec-WebSocket-Protocol", "nope, superchat")],
    )
    .await?;
    assert_eq!(fp, leaf.fingerprint);
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("superchat"),
        "the backend's subprotocol choice comes back through the node"
    );
    assert_eq!(ask(&mut ws, "hello over wss").await?, "hello over wss");
    assert_eq!(ask(&mut ws, "whoami?").await?, "ws-echo");
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(payload.clone())).await?;
    match next_message(&mut ws).await? {
        Message::Binary(b) => assert!(b[..] == payload[..], "binary echo differs"),
        other => bail!("expected binary, got {other:?}"),
    }
    // The upstream got a plain ws:// handshake marked as coming over HTTPS.
    let handshakes = backend.handshakes();
    assert_eq!(handshakes.len(), 1);
    let header = |name: &str| {
        handshakes[0]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        header("sec-websocket-protocol").as_deref(),
        Some("nope, superchat")
    );
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await?;
    eventually(WAIT, || async {
        ensure!(
            backend.close_codes() == [1000],
            "close codes at the backend: {:?}",
            backend.close_codes()
        );
        Ok(())
    })
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ rotation

#[tokio::test]
async fn rotation_keeps_open_connections_and_serves_the_new_certificate() -> Result<()> {
    let node = TestNode::start().await?;
    let http_backend = EchoBackend::start("echo").await?;
    let ws_backend = WsEchoBackend::start("ws-echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let names = ["rot.test", "ws.rot.test"];
    let v1 = ca.leaf(&names)?;
    let v2 = ca.leaf(&names)?;
    let v3 = ca.leaf(&names)?;
    assert_ne!(v1.fingerprint, v2.fingerprint);
    let original = node.add_cert(&v1.cert_pem, &v1.key_pem).await?;
    node.add_host(&["rot.test"], &[http_backend.url()]).await?;
    node.add_host(&["ws.rot.test"], &[ws_backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "rot.test", &config, &v1.fingerprint).await?;

    // A keep-alive HTTPS connection and a wss:// tunnel, both on v1.
    let (mut keep_alive, fp, _) = https1_connect(node.https, "rot.test", &config).await?;
    assert_eq!(fp, v1.fingerprint);
    let resp = http1_get(&mut keep_alive, "rot.test", "/before").await?;
    assert_eq!(resp.status, StatusCode::OK);
    let (mut ws, _, fp) = wss_connect(node.https, "ws.rot.test", &config, "/", &[]).await?;
    assert_eq!(fp, v1.fingerprint);
    assert_eq!(ask(&mut ws, "before").await?, "before");

    // Rotate through the API: same id, new chain and key.
    let mut api = node.certs_client().await?;
    let reply = api
        .replace_certificate(ReplaceCertificateRequest {
            id: original.id.clone(),
            cert_pem: v2.cert_pem.clone(),
            key_pem: v2.key_pem.clone(),
            name: None,
        })
        .await?
        .into_inner();
    let replaced = reply.certificate.context("no certificate in the reply")?;
    assert_eq!(replaced.id, original.id, "rotation keeps the id");
    assert_eq!(replaced.name, original.name, "and the name");
    assert_eq!(replaced.version, original.version + 1);
    assert_eq!(replaced.fingerprint_sha256, v2.fingerprint);
    assert_eq!(replaced.created_at_ms, original.created_at_ms);
    assert!(reply.warnings.is_empty(), "{:?}", reply.warnings);

    // New handshakes get v2, for both names.
    wait_served(node.https, "rot.test", &config, &v2.fingerprint).await?;
    wait_served(node.https, "ws.rot.test", &config, &v2.fingerprint).await?;
    let (resp, fp) = https_get(node.https, "rot.test", &config, "/new").await?;
    assert_eq!((resp.status, fp), (StatusCode::OK, v2.fingerprint.clone()));

    // The connections opened before are still open and still work.
    assert!(
        !keep_alive.is_closed(),
        "the keep-alive connection was closed"
    );
    let resp = http1_get(&mut keep_alive, "rot.test", "/after").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["path"], "/after");
    assert_eq!(ask(&mut ws, "after rotation").await?, "after rotation");

    // The store holds one certificate, at v2.
    let certs = list_certs(&mut api).await?;
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0].fingerprint_sha256, v2.fingerprint);
    assert_eq!(certs[0].version, original.version + 1);

    // Rotate again with charonctl.
    let dir = tempfile::tempdir()?;
    let cert_file = write_file(&dir, "v3.pem", &v3.cert_pem)?;
    let key_file = write_file(&dir, "v3.key", &v3.key_pem)?;
    let out = ctl_ok(
        &node,
        &[
            "cert",
            "replace",
            &original.id,
            "--cert",
            &cert_file,
            "--key",
            &key_file,
        ],
    )
    .await?;
    assert!(out.contains(&original.id), "{out}");
    wait_served(node.https, "rot.test", &config, &v3.fingerprint).await?;
    let resp = http1_get(&mut keep_alive, "rot.test", "/after-v3").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(ask(&mut ws, "after v3").await?, "after v3");
    assert_eq!(
        ws_backend.accepted(),
        1,
        "the tunnel is the one opened first"
    );
    ws.close(None).await?;
    Ok(())
}

// ------------------------------------------------------------------ bad input

#[tokio::test]
async fn bad_certificates_are_refused_and_change_nothing() -> Result<()> {
    let node = TestNode::start().await?;
    let root = TestCa::new("Charon Test Root")?;
    let inter = root.intermediate("Charon Test Intermediate")?;
    let good = inter.leaf(&["good.test"])?;
    let other = inter.leaf(&["other.test"])?;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let expired = inter.leaf_valid(&["old.test"], now - day * 30, now - day)?;
    let not_yet = inter.leaf_valid(&["future.test"], now + day, now + day * 90)?;
    let no_san = inter.leaf_without_san("nosan.test")?;
    let soon = inter.leaf_valid(&["soon.test"], now - day, now + day * 5)?;

    // A chain in order (leaf, then its issuer) is accepted.
    let mut api = node.certs_client().await?;
    let stored = node.add_cert(&good.chain(&[&inter]), &good.key_pem).await?;
    assert_eq!(stored.chain_length, 2);
    assert_eq!(stored.domains, ["good.test"]);
    let before = cert_states(&list_certs(&mut api).await?);

    let broken_base64 =
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
    let garbage_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let out_of_order = format!("{}{}", inter.pem, good.cert_pem);
    let leaf_root_inter = format!("{}{}{}", good.cert_pem, root.pem, inter.pem);
    // (what, cert_pem, key_pem, field, words the message must contain)
    let cases: Vec<(&str, String, String, &str, &[&str])> = vec![
        (
            "garbage certificate",
            "this is not a certificate".into(),
            good.key_pem.clone(),
            "cert_pem",
            &["certificate"],
        ),
        (
            "broken base64 in the certificate PEM",
            broken_base64.into(),
            good.key_pem.clone(),
            "cert_pem",
            &["pem"],
        ),
        (
            "garbage key",
            good.cert_pem.clone(),
            "this is not a key".into(),
            "key_pem",
            &["private key"],
        ),
        (
            "malformed key",
            good.cert_pem.clone(),
            garbage_key.into(),
            "key_pem",
            &["key"],
        ),
        (
            "empty key",
            good.cert_pem.clone(),
            String::new(),
            "key_pem",
            &["private key"],
        ),
        (
            "key of another certificate",
            good.cert_pem.clone(),
            other.key_pem.clone(),
            "key_pem",
            &["does not match"],
        ),
        (
            "expired",
            expired.chain(&[&inter]),
            expired.key_pem.clone(),
            "cert_pem",
            &["expired"],
        ),
        (
            "not yet valid",
            not_yet.cert_pem.clone(),
            not_yet.key_pem.clone(),
            "cert_pem",
            &["not valid before"],
        ),
        (
            "chain out of order (issuer first)",
            out_of_order,
            good.key_pem.clone(),
            "cert_pem",
            &["out of order", "leaf first"],
        ),
        (
            "chain out of order (root before intermediate)",
            leaf_root_inter,
            good.key_pem.clone(),
            "cert_pem",
            &["out of order"],
        ),
        (
            "no subjectAltName",
            no_san.cert_pem.clone(),
            no_san.key_pem.clone(),
            "cert_pem",
            &["subjectaltname"],
        ),
    ];
    for (what, cert_pem, key_pem, field, words) in &cases {
        let add = api
            .add_certificate(charon_proto::v1::AddCertificateRequest {
                name: String::new(),
                cert_pem: cert_pem.clone(),
                key_pem: key_pem.clone(),
            })
            .await;
        let replace = api
            .replace_certificate(ReplaceCertificateRequest {
                id: stored.id.clone(),
                cert_pem: cert_pem.clone(),
                key_pem: key_pem.clone(),
                name: None,
            })
            .await;
        for (call, status) in [
            ("AddCertificate", status_of(add, what)?),
            ("ReplaceCertificate", status_of(replace, what)?),
        ] {
            let msg = status.message().to_ascii_lowercase();
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{call} {what}: {status:?}"
            );
            assert!(
                msg.starts_with(&format!("{field}:")),
                "{call} {what}: the message names {field}: {msg:?}"
            );
            for word in *words {
                assert!(
                    msg.contains(word),
                    "{call} {what}: the message says {word:?}: {msg:?}"
                );
            }
        }
    }
    let after = cert_states(&list_certs(&mut api).await?);
    assert_eq!(before, after, "refused uploads changed the store");

    // charonctl shows the same refusal and exits non-zero.
    let dir = tempfile::tempdir()?;
    let cert_file = write_file(&dir, "expired.pem", &expired.cert_pem)?;
    let key_file = write_file(&dir, "expired.key", &expired.key_pem)?;
    let out = node
        .ctl(&["cert", "add", "--cert", &cert_file, "--key", &key_file])
        .await?;
    assert!(!out.status.success(), "charonctl accepted an expired cert");
    let err = stderr_of(&out);
    assert!(
        err.contains("cert_pem") && err.contains("expired"),
        "charonctl's error: {err}"
    );
    assert_eq!(
        cert_states(&list_certs(&mut api).await?),
        before,
        "charonctl's refused upload changed the store"
    );

    // Expiring within 30 days: stored, with a warning.
    let reply = api
        .add_certificate(charon_proto::v1::AddCertificateRequest {
            name: "soon".into(),
            cert_pem: soon.chain(&[&inter]),
            key_pem: soon.key_pem.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(reply.warnings.len(), 1, "{:?}", reply.warnings);
    assert!(
        reply.warnings[0].contains("expires in"),
        "{:?}",
        reply.warnings
    );
    let soon2 = inter.leaf_valid(&["soon2.test"], now - day, now + day * 5)?;
    let cert_file = write_file(&dir, "soon2.pem", &soon2.cert_pem)?;
    let key_file = write_file(&dir, "soon2.key", &soon2.key_pem)?;
    let out = node
        .ctl(&["cert", "add", "--cert", &cert_file, "--key", &key_file])
        .await?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("warning: ") && stderr_of(&out).contains("expires in"),
        "charonctl prints the warning: {}",
        stderr_of(&out)
    );
    assert_eq!(list_certs(&mut api).await?.len(), 3);
    Ok(())
}

// ------------------------------------------------------------------ at rest

/// The private scalar of a PKCS#8 P-256 key (`02 01 01 04 20` + 32 bytes
/// in its ECPrivateKey).
fn ec_private_scalar(pkcs8: &[u8]) -> Result<Vec<u8>> {
    let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = pkcs8
        .windows(marker.len())
        .position(|w| w == marker)
        .context("no ECPrivateKey in the PKCS#8 key")?;
    Ok(pkcs8[at + marker.len()..at + marker.len() + 32].to_vec())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The base64 lines of a PEM block (without the armor lines).
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn private_keys_are_sealed_at_rest_and_never_returned() -> Result<()> {
    let mut node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["sealed.test"])?;
    let scalar = ec_private_scalar(&leaf.key_der)?;
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("the key PEM".into(), leaf.key_pem.as_bytes().to_vec()),
        ("the key DER".into(), leaf.key_der.clone()),
        ("the private scalar".into(), scalar.clone()),
        (
            "the private scalar in hex".into(),
            hex::encode(&scalar).into_bytes(),
        ),
    ];
    for line in pem_body_lines(&leaf.key_pem) {
        secrets.push((format!("the key PEM line {line}"), line.into_bytes()));
    }

    // Added with charonctl, from files.
    let dir = tempfile::tempdir()?;
    let cert_file = write_file(&dir, "sealed.pem", &leaf.cert_pem)?;
    let key_file = write_file(&dir, "sealed.key", &leaf.key_pem)?;
    let added = ctl_ok(
        &node,
        &[
            "-o", "json", "cert", "add", "--cert", &cert_file, "--key", &key_file, "--name",
            "sealed",
        ],
    )
    .await?;
    let added: serde_json::Value = serde_json::from_str(&added).context("cert add -o json")?;
    let id = added["id"]
        .as_str()
        .context("no id in cert add's JSON")?
        .to_owned();
    assert_eq!(added["fingerprint_sha256"], leaf.fingerprint.as_str());
    node.add_host(&["sealed.test"], &[backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "sealed.test", &config, &leaf.fingerprint).await?;

    // Nothing the API or charonctl returns holds the key.
    let mut outputs = vec![
        ("cert add -o json".to_owned(), added.to_string()),
        (
            "cert show -o json".into(),
            ctl_ok(&node, &["-o", "json", "cert", "show", &id]).await?,
        ),
        (
            "cert show".into(),
            ctl_ok(&node, &["cert", "show", &id]).await?,
        ),
        (
            "cert list -o json".into(),
            ctl_ok(&node, &["-o", "json", "cert", "list"]).await?,
        ),
        ("cert list".into(), ctl_ok(&node, &["cert", "list"]).await?),
    ];
    let shown: serde_json::Value = serde_json::from_str(&outputs[1].1)?;
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["name"], "sealed");
    for field in shown.as_object().context("cert show JSON")?.keys() {
        assert!(
            !field.contains("key") || field == "key_type",
            "cert show -o json has a field {field:?}"
        );
    }
    let mut api = node.certs_client().await?;
    let got = api
        .get_certificate(GetCertificateRequest { id: id.clone() })
        .await?
        .into_inner();
    assert_eq!(got.fingerprint_sha256, leaf.fingerprint);
    outputs.push(("GetCertificate".into(), format!("{got:?}")));
    outputs.push((
        "ListCertificates".into(),
        format!("{:?}", list_certs(&mut api).await?),
    ));
    for (what, text) in &outputs {
        assert!(!text.contains("PRIVATE KEY"), "{what} shows a private key");
        for (secret, bytes) in &secrets {
            assert!(
                !contains(text.as_bytes(), bytes),
                "{what} contains {secret}"
            );
        }
    }

    // The data key: a 0600 file of 64 hex characters.
    let key_path = node.data_dir.join("encryption.key");
    let meta = std::fs::metadata(&key_path).context("encryption.key")?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let data_key = std::fs::read_to_string(&key_path)?;
    assert_eq!(data_key.trim().len(), 64);
    assert!(data_key.trim().chars().all(|c| c.is_ascii_hexdigit()));

    // Stopped: no file of the data dir but the data key holds the key in
    // clear; the redb file does hold the (public) certificate.
    let status = node.stop().await?;
    assert!(status.success(), "the node exited with {status}");
    let redb = std::fs::read(node.data_dir.join("charon.redb")).context("reading charon.redb")?;
    let cert_lines = pem_body_lines(&leaf.cert_pem);
    assert!(
        contains(&redb, &leaf.der) || contains(&redb, cert_lines[0].as_bytes()),
        "charon.redb holds neither the certificate's DER nor its PEM: wrong file?"
    );
    for entry in std::fs::read_dir(&node.data_dir)? {
        let entry = entry?;
        if entry.file_name() == "encryption.key" || !entry.file_type()?.is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path())?;
        for (secret, needle) in &secrets {
            assert!(
                !contains(&bytes, needle),
                "{} contains {secret} in clear",
                entry.path().display()
            );
        }
    }
    assert!(
        !node.log().contains("PRIVATE KEY"),
        "the node's log shows a private key"
    );

    // Without the data key the stored key is useless: the same data dir
    // with another CHARON_ENCRYPTION_KEY serves no certificate and says why.
    let mut other = TestNode::builder()
        .data_dir(node.data_dir.clone())
        .env("CHARON_ENCRYPTION_KEY", "ab".repeat(32))
        .start()
        .await?;
    expect_alert(
        tls_connect(other.https, "sealed.test", &config).await,
        AlertDescription::UnrecognisedName,
        "sealed.test with the wrong data key",
    )?;
    assert!(
        other.log().contains("wrong CHARON_ENCRYPTION_KEY"),
        "the log says the data key is wrong:\n{}",
        other.log()
    );
    other.stop().await?;
    drop(other);

    // With its own data key again, the node serves it.
    node.start_again().await?;
    let (resp, fp) = https_get(node.https, "sealed.test", &config, "/").await?;
    assert_eq!(
        (resp.status, fp),
        (StatusCode::OK, leaf.fingerprint.clone())
    );
    Ok(())
}

// ------------------------------------------------------------------ pinning

#[tokio::test]
async fn a_pinned_certificate_wins_and_cannot_be_deleted() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    // Both cover app.pin.test; B is the better match (exact SAN).
    let a_leaf = ca.leaf(&["*.pin.test"])?;
    let b_leaf = ca.leaf(&["app.pin.test"])?;
    let a = node.add_cert(&a_leaf.cert_pem, &a_leaf.key_pem).await?;
    let b = node.add_cert(&b_leaf.cert_pem, &b_leaf.key_pem).await?;
    let host = node.add_host(&["app.pin.test"], &[backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "app.pin.test", &config, &b_leaf.fingerprint).await?;

    // A pin to a certificate that does not exist is refused.
    let mut hosts = node.grpc_client().await?;
    let status = status_of(
        hosts
            .update_host(UpdateHostRequest {
                id_or_domain: host.id.clone(),
                cert_id: Some("c-nonexistent".into()),
                ..Default::default()
            })
            .await,
        "pin to a missing certificate",
    )?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("cert_id"), "{status:?}");

    // Pin A.
    ctl_ok(&node, &["host", "update", "app.pin.test", "--cert", &a.id]).await?;
    wait_served(node.https, "app.pin.test", &config, &a_leaf.fingerprint).await?;
    let (resp, fp) = https_get(node.https, "app.pin.test", &config, "/pinned").await?;
    assert_eq!(
        (resp.status, fp),
        (StatusCode::OK, a_leaf.fingerprint.clone())
    );
    // The record says who pins it.
    let mut api = node.certs_client().await?;
    let got = api
        .get_certificate(GetCertificateRequest { id: a.id.clone() })
        .await?
        .into_inner();
    assert_eq!(got.used_by_hosts, std::slice::from_ref(&host.id));

    // Deleting A is refused, naming the host, by the API and by charonctl.
    let status = status_of(
        api.delete_certificate(DeleteCertificateRequest {
            id: a.id.clone(),
            expected_version: None,
        })
        .await,
        "delete a pinned certificate",
    )?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&host.id),
        "the refusal names the host: {status:?}"
    );
    let out = node.ctl(&["cert", "rm", &a.id]).await?;
    assert!(
        !out.status.success(),
        "charonctl cert rm of a pinned cert succeeded"
    );
    assert!(
        stderr_of(&out).contains(&host.id),
        "charonctl names the host: {}",
        stderr_of(&out)
    );
    let ids: Vec<String> = list_certs(&mut api)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(ids.contains(&a.id), "A was deleted: {ids:?}");
    // Still served.
    assert_eq!(
        served_fingerprint(node.https, "app.pin.test", &config).await?,
        a_leaf.fingerprint
    );

    // B is not pinned: it can go, and the pin still holds.
    ctl_ok(&node, &["cert", "rm", &b.id]).await?;
    let ids: Vec<String> = list_certs(&mut api)
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&a.id));
    assert_eq!(
        served_fingerprint(node.https, "app.pin.test", &config).await?,
        a_leaf.fingerprint
    );

    // Unpinned, A can be deleted; then the name has no certificate.
    ctl_ok(&node, &["host", "update", "app.pin.test", "--no-cert"]).await?;
    ctl_ok(&node, &["cert", "rm", &a.id]).await?;
    assert!(list_certs(&mut api).await?.is_empty());
    eventually(WAIT, || async {
        expect_alert(
            tls_connect(node.https, "app.pin.test", &config).await,
            AlertDescription::UnrecognisedName,
            "app.pin.test after its certificates were deleted",
        )
    })
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ force_https, HSTS

fn header_str(resp: &HttpResponse, name: &str) -> Option<String> {
    resp.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn force_https_redirects_and_hsts_is_sent_on_https_only() -> Result<()> {
    let node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["secure.test", "hsts.test", "plain.test"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    let with = |domain: &str, force: bool, hsts: u32, sub: bool| {
        let mut req: CreateHostRequest = host_request(&[domain], &[backend.url()]);
        let h: &mut ProxyHost = req.host.as_mut().expect("host");
        h.force_https = force;
        h.hsts_max_age_secs = hsts;
        h.hsts_include_subdomains = sub;
        req
    };
    node.create_host(with("secure.test", true, 31_536_000, true))
        .await?;
    node.create_host(with("hsts.test", false, 600, false))
        .await?;
    node.create_host(with("plain.test", false, 0, false))
        .await?;
    for d in ["secure.test", "hsts.test", "plain.test"] {
        node.wait_routed(d).await?;
    }
    let config = http1_config(&ca)?;
    wait_served(node.https, "secure.test", &config, &leaf.fingerprint).await?;
    let port = node.https.port();

    // Plain HTTP to a force_https host: 308 to the HTTPS listener, path and
    // query kept, the backend not involved, no HSTS on plain HTTP.
    let hits = backend.hits();
    for (method, host) in [
        (Method::GET, "secure.test".to_owned()),
        (Method::POST, format!("secure.test:{}", node.http.port())),
    ] {
        let resp = client::request(
            node.http,
            method.clone(),
            &host,
            "/a/b?x=1&y=two",
            &[],
            Bytes::from_static(b"body"),
        )
        .await?;
        assert_eq!(
            resp.status,
            StatusCode::PERMANENT_REDIRECT,
            "{method} {host}: {}",
            resp.text()
        );
        assert_eq!(
            header_str(&resp, "location").as_deref(),
            Some(format!("https://secure.test:{port}/a/b?x=1&y=two").as_str()),
            "{method} {host}"
        );
        assert_eq!(header_str(&resp, "strict-transport-security"), None);
    }
    assert_eq!(
        backend.hits(),
        hits,
        "a redirected request reached the backend"
    );

    // Following the redirect works, and carries HSTS.
    let (resp, fp) = https_get(node.https, "secure.test", &config, "/a/b?x=1&y=two").await?;
    assert_eq!(fp, leaf.fingerprint);
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["path"], "/a/b?x=1&y=two");
    assert_eq!(
        header_str(&resp, "strict-transport-security").as_deref(),
        Some("max-age=31536000; includeSubDomains")
    );
    // Over h2 too.
    let h2 = client_config(&[&ca.pem], &["h2"])?;
    let (mut sender, _) = h2_connect(node.https, "secure.test", &h2).await?;
    let resp = h2_get(&mut sender, "secure.test", "/h2").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        header_str(&resp, "strict-transport-security").as_deref(),
        Some("max-age=31536000; includeSubDomains")
    );

    // HSTS without force_https: plain HTTP is served, without the header.
    let resp = client::get(node.http, "hsts.test", "/").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(header_str(&resp, "strict-transport-security"), None);
    let (resp, _) = https_get(node.https, "hsts.test", &config, "/").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        header_str(&resp, "strict-transport-security").as_deref(),
        Some("max-age=600")
    );

    // Neither: no header anywhere, no redirect.
    let resp = client::get(node.http, "plain.test", "/").await?;
    assert_eq!(resp.status, StatusCode::OK);
    let (resp, _) = https_get(node.https, "plain.test", &config, "/").await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(header_str(&resp, "strict-transport-security"), None);

    // Switched on with charonctl.
    ctl_ok(
        &node,
        &["host", "update", "plain.test", "--force-https", "true"],
    )
    .await?;
    eventually(WAIT, || async {
        let resp = client::get(node.http, "plain.test", "/q?k=v").await?;
        ensure!(
            resp.status == StatusCode::PERMANENT_REDIRECT,
            "still {}",
            resp.status
        );
        ensure!(
            header_str(&resp, "location").as_deref()
                == Some(format!("https://plain.test:{port}/q?k=v").as_str()),
            "location {:?}",
            header_str(&resp, "location")
        );
        Ok(())
    })
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ https:// upstreams

#[tokio::test]
async fn https_upstreams_are_verified_with_the_hosts_ca() -> Result<()> {
    let node = TestNode::start().await?;
    let upstream_ca = TestCa::new("Upstream Test CA")?;
    let other_ca = TestCa::new("Some Other CA")?;
    let upstream_leaf = upstream_ca.leaf(&["localhost", "127.0.0.1"])?;
    let backend = HttpsEchoBackend::start("tls-upstream", &upstream_leaf, &[]).await?;
    let dir = tempfile::tempdir()?;
    let ca_file = write_file(&dir, "upstream-ca.pem", &upstream_ca.pem)?;
    let by_name = backend.url_with_host("localhost");

    // The right CA, given to charonctl as a file; SNI is the upstream's name.
    ctl_ok(
        &node,
        &[
            "host",
            "add",
            "good.up",
            "--upstream",
            &by_name,
            "--upstream-ca",
            &ca_file,
        ],
    )
    .await?;
    // By IP: no SNI (IP literals are not sent as SNI), verified by IP SAN.
    let mut by_ip = host_request(&["ip.up"], &[backend.url()]);
    by_ip.host.as_mut().expect("host").upstream_ca_pem = upstream_ca.pem.clone();
    node.create_host(by_ip).await?;
    // The wrong CA; the system roots; no verification.
    let mut wrong = host_request(&["wrong.up"], std::slice::from_ref(&by_name));
    wrong.host.as_mut().expect("host").upstream_ca_pem = other_ca.pem.clone();
    node.create_host(wrong).await?;
    node.create_host(host_request(&["system.up"], std::slice::from_ref(&by_name)))
        .await?;
    let mut insecure = host_request(&["insecure.up"], std::slice::from_ref(&by_name));
    insecure
        .host
        .as_mut()
        .expect("host")
        .upstream_insecure_skip_verify = true;
    node.create_host(insecure).await?;
    for d in ["good.up", "ip.up", "wrong.up", "system.up", "insecure.up"] {
        node.wait_routed(d).await?;
    }

    let resp = client::get(node.http, "good.up", "/verified?a=1").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let echo = resp.json()?;
    assert_eq!(echo["name"], "tls-upstream");
    assert_eq!(echo["path"], "/verified?a=1");
    assert_eq!(echo["sni"], "localhost", "SNI is the upstream's host name");
    assert_eq!(echo["host"], "good.up", "the client's Host is kept");

    let resp = client::get(node.http, "ip.up", "/").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["sni"], serde_json::Value::Null);

    let failed_before = backend.failed_handshakes();
    let requests_before = backend.requests();
    for name in ["wrong.up", "system.up"] {
        let resp = client::get(node.http, name, "/").await?;
        assert_eq!(
            resp.status,
            StatusCode::BAD_GATEWAY,
            "{name}: {}",
            resp.text()
        );
    }
    assert_eq!(
        backend.requests(),
        requests_before,
        "a request reached the upstream over an unverified connection"
    );
    eventually(WAIT, || async {
        ensure!(
            backend.failed_handshakes() >= failed_before + 2,
            "the backend saw {} failed handshakes",
            backend.failed_handshakes() - failed_before
        );
        let log = node.log();
        ensure!(
            log.lines()
                .filter(|l| l.contains("TLS handshake failed"))
                .any(|l| l.contains("wrong.up")),
            "no log line says the TLS handshake for wrong.up failed"
        );
        Ok(())
    })
    .await?;

    let resp = client::get(node.http, "insecure.up", "/anything").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["name"], "tls-upstream");

    // Over HTTPS on the front too.
    let front_ca = TestCa::new("Front CA")?;
    let front = front_ca.leaf(&["good.up"])?;
    node.add_cert(&front.cert_pem, &front.key_pem).await?;
    let config = http1_config(&front_ca)?;
    wait_served(node.https, "good.up", &config, &front.fingerprint).await?;
    let (resp, _) = https_get(node.https, "good.up", &config, "/both-ends").await?;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["path"], "/both-ends");

    // Fixing the CA of wrong.up fixes it, despite the earlier failures.
    let mut hosts = node.grpc_client().await?;
    hosts
        .update_host(UpdateHostRequest {
            id_or_domain: "wrong.up".into(),
            upstream_ca_pem: Some(upstream_ca.pem.clone()),
            ..Default::default()
        })
        .await?;
    eventually(WAIT, || async {
        let resp = client::get(node.http, "wrong.up", "/fixed").await?;
        ensure!(
            resp.status == StatusCode::OK,
            "{} {}",
            resp.status,
            resp.text()
        );
        Ok(())
    })
    .await?;

    // A CA bundle that is not one is refused, naming the field.
    let status = status_of(
        hosts
            .update_host(UpdateHostRequest {
                id_or_domain: "good.up".into(),
                upstream_ca_pem: Some("not a CA".into()),
                ..Default::default()
            })
            .await,
        "garbage upstream CA",
    )?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("upstream_ca_pem"), "{status:?}");
    Ok(())
}

// ------------------------------------------------------------------ persistence

#[tokio::test]
async fn certificates_survive_a_restart() -> Result<()> {
    let mut node = TestNode::start().await?;
    let backend = EchoBackend::start("echo").await?;
    let ws_backend = WsEchoBackend::start("ws-echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["persist.test", "ws.persist.test"])?;
    let wild = ca.leaf(&["*.persist.test"])?;
    let stored = node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    let stored_wild = node.add_cert(&wild.cert_pem, &wild.key_pem).await?;
    node.add_host(&["persist.test"], &[backend.url()]).await?;
    node.add_host(&["ws.persist.test"], &[ws_backend.url()])
        .await?;
    node.add_host(&["*.persist.test"], &[backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "persist.test", &config, &leaf.fingerprint).await?;
    wait_served(node.https, "other.persist.test", &config, &wild.fingerprint).await?;
    let before = cert_states(&list_certs(&mut node.certs_client().await?).await?);

    node.restart().await?;

    // Ready means the certificates are loaded: no waiting here.
    let (resp, fp) = https_get(node.https, "persist.test", &config, "/after-restart").await?;
    assert_eq!(fp, leaf.fingerprint);
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()?["path"], "/after-restart");
    let (resp, fp) = https_get(node.https, "other.persist.test", &config, "/").await?;
    assert_eq!(
        (resp.status, fp),
        (StatusCode::OK, wild.fingerprint.clone())
    );
    let (mut ws, _, fp) = wss_connect(node.https, "ws.persist.test", &config, "/", &[]).await?;
    assert_eq!(fp, leaf.fingerprint);
    assert_eq!(ask(&mut ws, "after restart").await?, "after restart");
    ws.close(None).await?;

    let mut api = node.certs_client().await?;
    let after = cert_states(&list_certs(&mut api).await?);
    assert_eq!(
        before, after,
        "the stored certificates changed over a restart"
    );
    let ids: Vec<String> = after.iter().map(|c| c.0.clone()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&stored.id) && ids.contains(&stored_wild.id));
    Ok(())
}

#[tokio::test]
async fn an_encryption_key_from_the_environment_is_used_and_not_written() -> Result<()> {
    let key = "0123456789abcdef".repeat(4);
    let mut node = TestNode::builder()
        .env("CHARON_ENCRYPTION_KEY", key.clone())
        .start()
        .await?;
    let backend = EchoBackend::start("echo").await?;
    let ca = TestCa::new("Charon Test CA")?;
    let leaf = ca.leaf(&["envkey.test"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    node.add_host(&["envkey.test"], &[backend.url()]).await?;
    let config = http1_config(&ca)?;
    wait_served(node.https, "envkey.test", &config, &leaf.fingerprint).await?;
    assert!(
        !node.data_dir.join("encryption.key").exists(),
        "encryption.key was written although CHARON_ENCRYPTION_KEY is set"
    );
    node.restart().await?;
    let (resp, fp) = https_get(node.https, "envkey.test", &config, "/").await?;
    assert_eq!(
        (resp.status, fp),
        (StatusCode::OK, leaf.fingerprint.clone())
    );
    Ok(())
}

// ------------------------------------------------------------------ misc

#[tokio::test]
async fn plain_http_on_the_https_port_and_no_certificates_at_all() -> Result<()> {
    let node = TestNode::start().await?;
    let ca = TestCa::new("Charon Test CA")?;
    let config = http1_config(&ca)?;
    // No certificate stored: every name is refused, the IP too.
    for name in ["any.test", "127.0.0.1"] {
        expect_alert(
            tls_connect(node.https, name, &config).await,
            AlertDescription::UnrecognisedName,
            name,
        )?;
    }
    // Plain HTTP on the HTTPS port gets no HTTP answer (and the node
    // carries on).
    let raw = client::raw_exchange(node.https, b"GET / HTTP/1.1\r\nHost: any.test\r\n\r\n").await;
    let text = raw.context("plain HTTP on the HTTPS port: the node should close the connection")?;
    assert!(
        client::raw_status(&text).is_none(),
        "plain HTTP on the HTTPS port was answered: {text:?}"
    );
    assert_eq!(
        text.as_bytes().first(),
        Some(&0x15),
        "the answer is a TLS alert record: {text:?}"
    );
    let leaf = ca.leaf(&["any.test"])?;
    node.add_cert(&leaf.cert_pem, &leaf.key_pem).await?;
    wait_served(node.https, "any.test", &config, &leaf.fingerprint).await?;
    Ok(())
}
