//! Automatic HTTPS against a real ACME server: Debian's pebble and its fake
//! DNS (tests/src/pebble.rs), three real `charon-node` processes.
//!
//! pebble validates through relays ([`Relay`]) that the test points at a
//! node *other than* the one that orders (predicted with the cluster's own
//! rendezvous hash, and checked afterwards against the order's history),
//! so every passing case also proves that any node answers any challenge.
//!
//! Short settings keep the file near a minute: leases of 4 s, a 300 ms
//! tick, retries after 1 s.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use charon_proto::v1::{Certificate, GetCertificateRequest, ListCertificatesRequest};
use charon_tests::pebble::{self, cert_id, responsible, Pebble, PebbleOptions, Relay};
use charon_tests::tls::{peer_fingerprint, tls_connect, wss_connect};
use charon_tests::{eventually, TestNode, TestNodeBuilder, WsEchoBackend};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "acme-test-cluster-secret-0123456789";
const TOKEN: &str = "acme-test-token-0123456789";
const ISSUE: Duration = Duration::from_secs(40);

/// Installed by scripts/setup-test-env.sh; a machine without apt says so.
fn pebble_or_skip(test: &str) -> bool {
    if pebble::available() {
        return true;
    }
    eprintln!("SKIPPED {test}: pebble not installed (scripts/setup-test-env.sh installs it)");
    false
}

/// pebble plus the two relays its validation goes through.
struct Ca {
    pebble: Pebble,
    http: Relay,
    tls: Relay,
}

async fn ca() -> Result<Ca> {
    let http = Relay::start().await?;
    let tls = Relay::start().await?;
    let pebble = Pebble::start(PebbleOptions {
        http_port: http.port,
        tls_port: tls.port,
        reject_nonces: true,
    })
    .await?;
    Ok(Ca { pebble, http, tls })
}

fn member(name: &str, ca: &Ca, extra: &[&str]) -> TestNodeBuilder {
    TestNode::builder()
        .name(name)
        .cluster_secret(SECRET)
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        .args(["--anti-entropy-secs", "1"])
        .arg("--acme-directory")
        .arg(ca.pebble.directory.clone())
        .arg("--acme-ca-file")
        .arg(ca.pebble.ca_file.display().to_string())
        .args(["--acme-email", "ops@charon.test"])
        .args(["--acme-lease-secs", "4", "--acme-tick-ms", "300"])
        .args(["--acme-retry-min-secs", "1"])
        .args(extra.iter().copied())
}

async fn three(ca: &Ca, extra: &[&str]) -> Result<Vec<TestNode>> {
    let n1 = member("n1", ca, extra).start().await?;
    let n2 = member("n2", ca, extra).seeds(&[&n1]).start().await?;
    let n3 = member("n3", ca, extra).seeds(&[&n1]).start().await?;
    let nodes = vec![n1, n2, n3];
    for n in &nodes {
        eventually(Duration::from_secs(20), || async {
            let (members, _) = n.members().await?;
            let live = members.iter().filter(|m| m.live).count();
            ensure!(live == 3, "{live} live members");
            Ok(())
        })
        .await?;
    }
    Ok(nodes)
}

/// (node id, name) of each member, in `nodes` order.
async fn ids(nodes: &[TestNode]) -> Result<Vec<(String, String)>> {
    let (members, _) = nodes[0].members().await?;
    let mut out = Vec::new();
    for n in nodes {
        let m = members
            .iter()
            .find(|m| m.api_address == n.api.to_string())
            .with_context(|| format!("no member with API {}", n.api))?;
        out.push((m.node_id.clone(), m.name.clone()));
    }
    Ok(out)
}

/// The index of the node that will order `names`, and of another one.
async fn orderer_and_other(nodes: &[TestNode], names: &[&str]) -> Result<(usize, usize)> {
    let ids = ids(nodes).await?;
    let refs: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    let chosen = responsible(&cert_id(names), &refs).context("no members")?;
    let i = refs
        .iter()
        .position(|r| *r == chosen)
        .expect("chosen is a member");
    Ok((i, (i + 1) % nodes.len()))
}

async fn cert(node: &TestNode, id: &str) -> Result<Certificate> {
    Ok(node
        .certs_client()
        .await?
        .get_certificate(GetCertificateRequest { id: id.into() })
        .await?
        .into_inner())
}

/// Waits until a handshake for `name` on every node presents a certificate
/// that verifies against pebble's root; returns their fingerprints.
async fn wait_issued(ca: &Ca, nodes: &[&TestNode], name: &str, not: &str) -> Result<Vec<String>> {
    let config = ca.pebble.client_config(&["http/1.1"]).await?;
    let mut fps = Vec::new();
    for n in nodes {
        let fp = eventually(ISSUE, || {
            let config = config.clone();
            async move {
                let tls = tls_connect(n.https, name, &config).await?;
                let fp = peer_fingerprint(&tls)?;
                ensure!(fp != not, "still the old certificate");
                Ok(fp)
            }
        })
        .await
        .with_context(|| format!("{name} on node {}", n.api))?;
        fps.push(fp);
    }
    Ok(fps)
}

async fn echo(ws: &mut charon_tests::tls::WssClient, text: &str) -> Result<String> {
    ws.send(Message::text(text)).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!("expected an echo, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn host_added_on_one_node_gets_a_pebble_certificate_on_all_three() -> Result<()> {
    if !pebble_or_skip("host_added_on_one_node_gets_a_pebble_certificate_on_all_three") {
        return Ok(());
    }
    let ca = ca().await?;
    let nodes = three(&ca, &[]).await?;
    let backend = WsEchoBackend::start("ws-echo").await?;
    let name = "app.acme.test";
    let (orderer, other) = orderer_and_other(&nodes, &[name]).await?;
    ca.http.point_at(Some(nodes[other].http));
    ca.tls.point_at(Some(nodes[other].https));

    let started = Instant::now();
    // Added on a node that is not the orderer: the cluster decides who orders.
    let added_on = (orderer + 2) % 3;
    nodes[added_on].add_host(&[name], &[backend.url()]).await?;
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let fps = wait_issued(&ca, &refs, name, "").await?;
    let took = started.elapsed();
    eprintln!("issuance on pebble: {took:?} from host add to served on all three nodes");
    ensure!(
        fps.iter().all(|f| *f == fps[0]),
        "nodes serve different certificates: {fps:?}"
    );

    // A wss:// echo through each node.
    let config = ca.pebble.client_config(&["http/1.1"]).await?;
    for n in &nodes {
        let (mut ws, resp, _) = wss_connect(n.https, name, &config, "/", &[]).await?;
        ensure!(resp.status() == 101);
        ensure!(echo(&mut ws, "over wss").await? == "over wss");
    }

    // One order, placed by the predicted node, validated through another.
    let ids = ids(&nodes).await?;
    let c = cert(&nodes[other], &cert_id(&[name])).await?;
    ensure!(c.source == "acme" && c.status == "valid", "{c:?}");
    let orderer_name = &ids[orderer].1;
    ensure!(
        c.history
            .iter()
            .any(|h| h.contains(&format!("{orderer_name}: placed order"))),
        "history {:?} should show {orderer_name} placing the order",
        c.history
    );
    ensure!(
        ca.http.relayed() + ca.tls.relayed() >= 1,
        "pebble never validated"
    );
    ensure!(ca.pebble.orders() == 1, "orders: {}", ca.pebble.orders());
    let listed = nodes[0]
        .certs_client()
        .await?
        .list_certificates(ListCertificatesRequest {})
        .await?
        .into_inner()
        .certificates;
    ensure!(
        listed.len() == 1 && listed[0].source == "acme",
        "{listed:?}"
    );
    Ok(())
}
