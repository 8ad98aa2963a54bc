//! A cluster of real `charon-node` processes on loopback: replication
//! through gossip + sync, `kill -9` in the middle of writes, restarts (a new
//! chitchat generation) and a node holding the wrong cluster secret.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_tests::{client, eventually, host_request, EchoBackend, TestNode, TestNodeBuilder};

const SECRET: &str = "test-cluster-secret-0123456789";
const TOKEN: &str = "cluster-test-token-0123456789";

fn member(name: &str) -> TestNodeBuilder {
    TestNode::builder()
        .name(name)
        .cluster_secret(SECRET)
        // One token for every node, so that a client can talk to any.
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        // Short anti-entropy so a missed push heals within the test.
        .args(["--anti-entropy-secs", "1"])
}

/// Three nodes, 2 and 3 seeded with 1; returns once each sees three live
/// members.
async fn three() -> Result<Vec<TestNode>> {
    let n1 = member("n1").start().await?;
    let n2 = member("n2").seeds(&[&n1]).start().await?;
    let n3 = member("n3").seeds(&[&n1]).start().await?;
    let nodes = vec![n1, n2, n3];
    for n in &nodes {
        wait_live(n, 3).await?;
    }
    Ok(nodes)
}

async fn wait_live(node: &TestNode, want: usize) -> Result<()> {
    eventually(Duration::from_secs(20), || async {
        let (members, _) = node.members().await?;
        let live: Vec<&str> = members
            .iter()
            .filter(|m| m.live)
            .map(|m| m.name.as_str())
            .collect();
        ensure!(live.len() == want, "live members {live:?}, want {want}");
        Ok(())
    })
    .await
}

/// Waits until `node` lists exactly `want` (host ids).
async fn wait_hosts(node: &TestNode, want: &BTreeSet<String>) -> Result<()> {
    wait_hosts_within(node, want, 0).await.map(|_| ())
}

/// Waits until `node` lists every host of `want` and at most `extra` more
/// (writes committed by a node killed before it could answer: neither
/// acknowledged nor lost). Returns what it lists.
async fn wait_hosts_within(
    node: &TestNode,
    want: &BTreeSet<String>,
    extra_allowed: usize,
) -> Result<BTreeSet<String>> {
    eventually(Duration::from_secs(20), || async {
        let have: BTreeSet<String> = node.host_ids().await?.into_iter().collect();
        let missing: Vec<_> = want.difference(&have).collect();
        let extra: Vec<_> = have.difference(want).collect();
        ensure!(
            missing.is_empty() && extra.len() <= extra_allowed,
            "missing {} hosts (e.g. {:?}), {} unexpected (e.g. {:?})",
            missing.len(),
            missing.first(),
            extra.len(),
            extra.first()
        );
        Ok(have)
    })
    .await
}

#[tokio::test]
async fn a_host_added_with_charonctl_on_one_node_is_served_by_all() -> Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let nodes = three().await?;
    let out = nodes[0]
        .ctl(&[
            "host",
            "add",
            "app.cluster.test",
            "--upstream",
            &backend.url(),
        ])
        .await?;
    ensure!(
        out.status.success(),
        "charonctl host add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in &nodes {
        eventually(Duration::from_secs(10), || async {
            let resp = client::get(n.http, "app.cluster.test", "/hello").await?;
            ensure!(
                resp.status == 200 && resp.backend_name().as_deref() == Some("b1"),
                "node answered {}",
                resp.status
            );
            Ok(())
        })
        .await
        .with_context(|| format!("node {} never served the host", n.api))?;
    }
    // Every node agrees on the members and ends converged.
    eventually(Duration::from_secs(10), || async {
        for n in &nodes {
            let (members, converged) = n.members().await?;
            ensure!(converged, "not converged yet: {members:?}");
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            ensure!(names == ["n1", "n2", "n3"], "members {names:?}");
            ensure!(members.iter().all(|m| m.lag == 0 && m.status == "serving"));
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kill_9_in_the_middle_of_writes_loses_no_acknowledged_write() -> Result<()> {
    let mut nodes = three().await?;
    let mut acked = BTreeSet::new();
    // Writes on node 2 until it is killed: each acknowledged one must
    // survive (on its disk) and reach the others (after its restart).
    let n2_api = nodes[1].grpc_client().await?;
    let writer = tokio::spawn(async move {
        let mut api = n2_api;
        let mut acked = Vec::new();
        for i in 0..10_000 {
            let req = host_request(
                &[&format!("k{i}.kill.test")],
                &["http://127.0.0.1:9".into()],
            );
            match api.create_host(req).await {
                Ok(h) => acked.push(h.into_inner().id),
                Err(_) => break,
            }
        }
        acked
    });
    // Kill once a few dozen writes went through.
    eventually(Duration::from_secs(20), || async {
        let n = nodes[0].host_ids().await?.len();
        ensure!(n >= 30, "{n} replicated so far");
        Ok(())
    })
    .await?;
    nodes[1].kill().await?;
    let acked_on_2 = writer.await?;
    ensure!(acked_on_2.len() >= 30, "only {} writes", acked_on_2.len());
    acked.extend(acked_on_2);
    // Writes elsewhere while node 2 is down: it must catch up on them.
    let mut while_down = BTreeSet::new();
    for i in 0..20 {
        let h = nodes[0]
            .create_host(host_request(
                &[&format!("w{i}.while-down.test")],
                &["http://127.0.0.1:9".into()],
            ))
            .await?;
        while_down.insert(h.id.clone());
        acked.insert(h.id);
    }
    nodes[1].start_again().await?;
    // Ready means caught up: what was written while it was down is there
    // the moment /readyz says 200.
    let have: BTreeSet<String> = nodes[1].host_ids().await?.into_iter().collect();
    let missed: Vec<_> = while_down.difference(&have).collect();
    ensure!(
        missed.is_empty(),
        "ready but missing {} writes made while down",
        missed.len()
    );
    // The one write in flight when the kill came may or may not have been
    // committed; if it was, every node must end up with it too.
    let on_2 = wait_hosts_within(&nodes[1], &acked, 1).await?;
    for n in &nodes {
        wait_hosts(n, &on_2)
            .await
            .with_context(|| format!("node {} after the kill", n.api))?;
    }
    acked = on_2;
    // A restarted node's new writes (new chitchat generation) reach the
    // others.
    let h = nodes[1]
        .create_host(host_request(
            &["after-restart.kill.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    acked.insert(h.id);
    for n in &nodes {
        wait_hosts(n, &acked).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_restarted_node_rejoins_and_its_writes_and_deletes_replicate() -> Result<()> {
    let mut nodes = three().await?;
    let a = nodes[0]
        .create_host(host_request(
            &["a.restart.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    let mut want: BTreeSet<String> = [a.id.clone()].into();
    for n in &nodes {
        wait_hosts(n, &want).await?;
    }
    nodes[2].restart().await?;
    wait_live(&nodes[0], 3).await?;
    let b = nodes[2]
        .create_host(host_request(
            &["b.restart.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    want.insert(b.id);
    // A delete on another node than the one that created the host.
    nodes[1]
        .grpc_client()
        .await?
        .delete_host(charon_proto::v1::DeleteHostRequest {
            id_or_domain: a.id.clone(),
            expected_version: None,
        })
        .await?;
    want.remove(&a.id);
    for n in &nodes {
        wait_hosts(n, &want).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_node_with_the_wrong_cluster_secret_does_not_join() -> Result<()> {
    let n1 = member("n1").start().await?;
    let n2 = member("n2").seeds(&[&n1]).start().await?;
    wait_live(&n1, 2).await?;
    let intruder = TestNode::builder()
        .name("intruder")
        .cluster_secret("another-secret-0123456789")
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        .seeds(&[&n1])
        .start()
        .await?;
    // Proof that gossip reached both ways: each side logs the other's bad
    // membership proof.
    for (node, who) in [(&n1, "n1"), (&intruder, "intruder")] {
        eventually(Duration::from_secs(20), || async {
            ensure!(
                node.log().contains("without a valid cluster secret proof"),
                "{who} has not refused anyone yet"
            );
            Ok(())
        })
        .await?;
    }
    let h = n1
        .create_host(host_request(
            &["secret.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    wait_hosts(&n2, &[h.id.clone()].into()).await?;
    let (members, _) = n1.members().await?;
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    ensure!(names == ["n1", "n2"], "n1 lists {names:?}");
    let (members, _) = intruder.members().await?;
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    ensure!(names == ["intruder"], "the intruder lists {names:?}");
    ensure!(
        intruder.host_ids().await?.is_empty(),
        "the intruder received hosts"
    );
    // Its own write stays with it.
    intruder
        .create_host(host_request(
            &["intruder.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    // n2 has seen n1's host: once n2 also refused the intruder in gossip,
    // it must still hold only that host.
    eventually(Duration::from_secs(20), || async {
        ensure!(n2.log().contains("without a valid cluster secret proof"));
        Ok(())
    })
    .await?;
    ensure!(n1.host_ids().await? == vec![h.id.clone()]);
    ensure!(n2.host_ids().await? == vec![h.id]);
    Ok(())
}

#[tokio::test]
async fn a_token_created_on_one_node_works_on_all_until_revoked() -> Result<()> {
    // Each node has its own bootstrap admin token here.
    let n1 = TestNode::builder()
        .name("n1")
        .cluster_secret(SECRET)
        .start()
        .await?;
    let n2 = TestNode::builder()
        .name("n2")
        .cluster_secret(SECRET)
        .seeds(&[&n1])
        .start()
        .await?;
    wait_live(&n1, 2).await?;
    // n1's admin token is replicated (as a hash) and works on n2.
    eventually(Duration::from_secs(10), || async {
        n2.grpc_client_with(Some(&n1.token))
            .await?
            .list_hosts(charon_proto::v1::ListHostsRequest {})
            .await?;
        Ok(())
    })
    .await
    .context("n1's admin token on n2")?;
    let created = n1
        .tokens_client()
        .await?
        .create_token(charon_proto::v1::CreateTokenRequest { name: "ci".into() })
        .await?
        .into_inner();
    let secret = created.secret.clone();
    eventually(Duration::from_secs(10), || async {
        n2.grpc_client_with(Some(&secret))
            .await?
            .list_hosts(charon_proto::v1::ListHostsRequest {})
            .await?;
        Ok(())
    })
    .await
    .context("a new token on the other node")?;
    // Only the hash is stored: the secret appears nowhere in the list.
    let list = n2
        .tokens_client()
        .await?
        .list_tokens(charon_proto::v1::ListTokensRequest {})
        .await?
        .into_inner();
    ensure!(list.tokens.iter().any(|t| t.name == "ci"));
    ensure!(!format!("{list:?}").contains(&secret));
    n2.tokens_client()
        .await?
        .revoke_token(charon_proto::v1::RevokeTokenRequest {
            id_or_name: "ci".into(),
        })
        .await?;
    for n in [&n1, &n2] {
        eventually(Duration::from_secs(10), || async {
            let r = n
                .grpc_client_with(Some(&secret))
                .await?
                .list_hosts(charon_proto::v1::ListHostsRequest {})
                .await;
            ensure!(
                r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::Unauthenticated),
                "still accepted: {r:?}"
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}
