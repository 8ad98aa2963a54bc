//! Can a user trust what the cluster says it holds? Real `charon-node`
//! processes, each test a way the promise used to break (issue 16):
//! - the same domain accepted on two nodes at once must end with one owner,
//!   the same on every node, and every name must stay updatable and
//!   removable (it used to wedge: two hosts, every update `AlreadyExists`);
//! - a freshly restarted node must not act on its stale copy before it has
//!   caught up (an update by name used to resurrect a deleted host), and a
//!   node restarted without `--seeds` must still catch up from the peers its
//!   store remembers;
//! - a write whose client deadline passed while the node was paused must
//!   not commit later over a newer acknowledged write;
//! - a create retried with the same idempotency key must not make a second
//!   host, on the same node or on another one;
//! - a node that has not caught up refuses writes (UNAVAILABLE), serves
//!   reads, says so, and charonctl waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use charon_proto::v1::{
    DeleteHostRequest, GetHostRequest, ListHostsRequest, ProxyHost, StringList, UpdateHostRequest,
};
use charon_tests::{client, eventually, host_request, EchoBackend, TestNode, TestNodeBuilder};
use tonic::{Code, Request};

const SECRET: &str = "trust-cluster-secret-0123456789";
const TOKEN: &str = "trust-test-token-0123456789";
/// Request metadata: the client's deadline as Unix milliseconds (the
/// relative `grpc-timeout` cannot say when a request was sent).
const DEADLINE_HEADER: &str = "charon-deadline-ms";
/// Request metadata: one key per logical write, the same on every retry.
const KEY_HEADER: &str = "charon-idempotency-key";

fn member(name: &str) -> TestNodeBuilder {
    TestNode::builder()
        .name(name)
        .cluster_secret(SECRET)
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        .args(["--anti-entropy-secs", "1"])
}

async fn cluster(n: usize) -> Result<Vec<TestNode>> {
    let first = member("n1").start().await?;
    let mut nodes = vec![first];
    for i in 2..=n {
        let node = member(&format!("n{i}")).seeds(&[&nodes[0]]).start().await?;
        nodes.push(node);
    }
    for node in &nodes {
        wait_live(node, n).await?;
    }
    Ok(nodes)
}

async fn wait_live(node: &TestNode, want: usize) -> Result<()> {
    eventually(Duration::from_secs(20), || async {
        let (members, _) = node.members().await?;
        let live = members.iter().filter(|m| m.live).count();
        ensure!(live == want, "{live} live members, want {want}");
        Ok(())
    })
    .await
}

async fn wait_converged(nodes: &[TestNode]) -> Result<()> {
    eventually(Duration::from_secs(20), || async {
        for n in nodes {
            let (members, converged) = n.members().await?;
            ensure!(converged, "not converged: {members:?}");
        }
        Ok(())
    })
    .await
}

async fn list(node: &TestNode) -> Result<Vec<ProxyHost>> {
    Ok(node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await
        .context("ListHosts")?
        .into_inner()
        .hosts)
}

/// domain → ids of the hosts listing it, on one node.
async fn holders(node: &TestNode) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for h in list(node).await? {
        for d in &h.domains {
            map.entry(d.clone()).or_default().insert(h.id.clone());
        }
    }
    Ok(map)
}

async fn get(node: &TestNode, id_or_domain: &str) -> Result<ProxyHost, tonic::Status> {
    let mut api = node
        .grpc_client()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    api.get_host(GetHostRequest {
        id_or_domain: id_or_domain.into(),
    })
    .await
    .map(|r| r.into_inner())
}

fn set_upstream(id_or_domain: &str, upstream: &str) -> UpdateHostRequest {
    UpdateHostRequest {
        id_or_domain: id_or_domain.into(),
        upstreams: Some(StringList {
            values: vec![upstream.into()],
        }),
        ..Default::default()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Retries `call` while the node answers UNAVAILABLE (catching up), as
/// charonctl does; gives up after 20 s.
async fn while_unavailable<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                // Poll interval while the node catches up.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn the_same_domain_accepted_on_two_nodes_ends_with_one_owner_and_stays_manageable(
) -> Result<()> {
    let b1 = EchoBackend::start("b1").await?;
    let b2 = EchoBackend::start("b2").await?;
    let nodes = cluster(3).await?;
    let domains: Vec<String> = (0..12).map(|i| format!("d{i}.wedge.test")).collect();
    let mut both = 0;
    for d in &domains {
        // Both at once, as two operators (or a retrying script) would.
        let (mut c1, mut c2) = (nodes[0].grpc_client().await?, nodes[1].grpc_client().await?);
        let (r1, r2) = tokio::join!(
            c1.create_host(host_request(&[d], &[b1.url()])),
            c2.create_host(host_request(&[d], &[b2.url()])),
        );
        for r in [&r1, &r2] {
            if let Err(s) = r {
                ensure!(s.code() == Code::AlreadyExists, "create {d}: {s:?}");
            }
        }
        if r1.is_ok() && r2.is_ok() {
            both += 1;
        }
    }
    eprintln!(
        "{both} of {} domains were accepted on both nodes",
        domains.len()
    );
    ensure!(
        both > 0,
        "the race was never reproduced: no domain accepted twice"
    );
    wait_converged(&nodes).await?;
    // One owner per domain, the same on every node, and it is what the
    // proxy routes to.
    for d in &domains {
        let mut owners = BTreeSet::new();
        for n in &nodes {
            let owner = get(n, d).await.with_context(|| format!("GetHost {d}"))?;
            let backend = if owner.upstreams[0] == b1.url() {
                "b1"
            } else {
                "b2"
            };
            eventually(Duration::from_secs(10), || async {
                let resp = client::get(n.http, d, "/").await?;
                ensure!(
                    resp.backend_name().as_deref() == Some(backend),
                    "{d} on {} routed to {:?}, owner {} is on {backend}",
                    n.api,
                    resp.backend_name(),
                    owner.id
                );
                Ok(())
            })
            .await?;
            owners.insert(owner.id);
        }
        ensure!(owners.len() == 1, "{d} has owners {owners:?} across nodes");
    }
    // The losers are visible: each domain held twice marks exactly one
    // host as conflicted, on every node, and the count is in the status,
    // the metrics and a log line naming both hosts.
    let mut marked = 0;
    for n in &nodes {
        let twice: usize = holders(n)
            .await?
            .values()
            .filter(|ids| ids.len() == 2)
            .count();
        let hosts = list(n).await?;
        let conflicts: Vec<_> = hosts.iter().flat_map(|h| &h.conflicts).collect();
        ensure!(
            conflicts.len() == twice,
            "{} conflicts marked, {twice} domains held twice",
            conflicts.len()
        );
        let status = n
            .cluster_client()
            .await?
            .status(charon_proto::v1::ClusterStatusRequest {})
            .await?
            .into_inner();
        ensure!(status.name_conflicts as usize == twice);
        let metrics = client::get(n.admin, "localhost", "/metrics").await?.text();
        ensure!(
            metrics.contains(&format!("charon_name_conflicts {twice}\n")),
            "{metrics}"
        );
        marked = twice;
    }
    if marked > 0 {
        ensure!(
            nodes
                .iter()
                .any(|n| n.log().contains("two hosts list the same domain")),
            "no node logged the conflict"
        );
    }
    // Every name can be updated, then removed (all its hosts), then added
    // again.
    for (i, d) in domains.iter().enumerate() {
        let n = &nodes[i % nodes.len()];
        n.grpc_client()
            .await?
            .update_host(set_upstream(d, &b1.url()))
            .await
            .with_context(|| format!("update {d} on {}", n.api))?;
        for _ in 0..3 {
            match n
                .grpc_client()
                .await?
                .delete_host(DeleteHostRequest {
                    id_or_domain: d.clone(),
                    expected_version: None,
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => break,
                Err(s) => bail!("rm {d}: {s:?}"),
            }
        }
        n.create_host(host_request(&[d], &[b2.url()]))
            .await
            .with_context(|| format!("re-adding {d}"))?;
    }
    wait_converged(&nodes).await?;
    for n in &nodes {
        for (d, ids) in holders(n).await? {
            ensure!(ids.len() == 1, "{d} is held by {ids:?} on {}", n.api);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_restarted_node_takes_no_write_before_it_has_caught_up() -> Result<()> {
    let mut nodes = cluster(3).await?;
    let old = nodes[0]
        .create_host(host_request(
            &["a.restart.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    wait_converged(&nodes).await?;
    nodes[2].stop().await?;
    // While n3 is down the cluster deletes the host and creates the name
    // again, as another host.
    let mut api = nodes[0].grpc_client().await?;
    api.delete_host(DeleteHostRequest {
        id_or_domain: "a.restart.test".into(),
        expected_version: None,
    })
    .await?;
    let new = nodes[0]
        .create_host(host_request(
            &["a.restart.test"],
            &["http://127.0.0.1:10".into()],
        ))
        .await?;
    // n3 comes back; the update goes to it as soon as its API listens.
    nodes[2].start_again_unready().await?;
    let n3 = &nodes[2];
    let updated = while_unavailable(|| async {
        let mut api = n3
            .grpc_client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        api.update_host(set_upstream("a.restart.test", "http://127.0.0.1:11"))
            .await
            .map(|r| r.into_inner())
    })
    .await
    .context("update on the restarted node")?;
    ensure!(
        updated.id == new.id,
        "the update acted on {} (deleted), not on {}",
        updated.id,
        new.id
    );
    wait_converged(&nodes).await?;
    for n in &nodes {
        let ids: BTreeSet<String> = list(n).await?.into_iter().map(|h| h.id).collect();
        ensure!(
            !ids.contains(&old.id),
            "the deleted host {} came back on {}",
            old.id,
            n.api
        );
        ensure!(ids.contains(&new.id));
    }
    Ok(())
}

#[tokio::test]
async fn a_node_restarted_without_seeds_catches_up_from_the_peers_it_remembers() -> Result<()> {
    let mut nodes = cluster(2).await?;
    nodes[1].stop().await?;
    let host = nodes[0]
        .create_host(host_request(
            &["late.seedless.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await?;
    // The same data dir, no --seeds: only the store knows n1.
    let again = member("n2")
        .data_dir(nodes[1].data_dir.clone())
        .start()
        .await?;
    let ids: Vec<String> = list(&again).await?.into_iter().map(|h| h.id).collect();
    ensure!(
        ids.contains(&host.id),
        "ready without the host written while it was down: {ids:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_write_whose_client_deadline_passed_is_never_applied() -> Result<()> {
    let nodes = cluster(2).await?;
    let h = nodes[0]
        .create_host(host_request(
            &["late.deadline.test"],
            &["http://127.0.0.1:1".into()],
        ))
        .await?;
    wait_converged(&nodes).await?;
    let mut paused_api = nodes[0].grpc_client().await?;
    nodes[0].signal("STOP")?;
    let mut req = Request::new(set_upstream(&h.id, "http://127.0.0.1:2"));
    let budget = Duration::from_millis(400);
    req.set_timeout(budget);
    req.metadata_mut().insert(
        DEADLINE_HEADER,
        (unix_ms() + budget.as_millis() as u64)
            .to_string()
            .parse()?,
    );
    // The client gives up at its deadline (tonic's own timeout, or ours).
    let late = tokio::time::timeout(budget * 2, paused_api.update_host(req)).await;
    ensure!(
        !matches!(late, Ok(Ok(_))),
        "the paused node acknowledged: {late:?}"
    );
    // A newer write, acknowledged by the other node.
    nodes[1]
        .grpc_client()
        .await?
        .update_host(set_upstream(&h.id, "http://127.0.0.1:3"))
        .await?;
    nodes[0].signal("CONT")?;
    // The paused node reads the stale request first, then this one.
    nodes[0]
        .create_host(host_request(
            &["marker.deadline.test"],
            &["http://127.0.0.1:4".into()],
        ))
        .await?;
    wait_converged(&nodes).await?;
    for n in &nodes {
        let now = get(n, &h.id).await?;
        ensure!(
            now.upstreams == ["http://127.0.0.1:3"],
            "on {} the host has {:?}: the write that timed out was applied later",
            n.api,
            now.upstreams
        );
    }
    Ok(())
}

/// CreateHost of `retried.key.test` with one fixed idempotency key.
async fn create(node: &TestNode) -> Result<ProxyHost> {
    let mut api = node.grpc_client().await?;
    let mut req = Request::new(host_request(
        &["retried.key.test"],
        &["http://127.0.0.1:1".into()],
    ));
    req.metadata_mut()
        .insert(KEY_HEADER, "retry-test-key-1".parse()?);
    Ok(api.create_host(req).await?.into_inner())
}

#[tokio::test]
async fn a_create_retried_with_its_key_makes_one_host_on_any_node() -> Result<()> {
    let nodes = cluster(2).await?;
    let first = create(&nodes[0]).await?;
    let again = create(&nodes[0])
        .await
        .context("the retry on the same node")?;
    ensure!(again.id == first.id, "{} vs {}", again.id, first.id);
    eventually(Duration::from_secs(10), || async {
        ensure!(get(&nodes[1], &first.id).await.is_ok());
        Ok(())
    })
    .await?;
    let elsewhere = create(&nodes[1])
        .await
        .context("the retry on another node")?;
    ensure!(elsewhere.id == first.id, "{} vs {}", elsewhere.id, first.id);
    wait_converged(&nodes).await?;
    for n in &nodes {
        let ids: Vec<String> = list(n).await?.into_iter().map(|h| h.id).collect();
        ensure!(ids == [first.id.clone()], "hosts {ids:?} on {}", n.api);
    }
    // A delete guarded by a stale version is refused.
    let stale = nodes[0]
        .grpc_client()
        .await?
        .delete_host(DeleteHostRequest {
            id_or_domain: first.id.clone(),
            expected_version: Some(first.version + 1),
        })
        .await;
    ensure!(
        matches!(&stale, Err(s) if s.code() == Code::FailedPrecondition),
        "{stale:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_that_has_not_caught_up_refuses_writes_and_charonctl_waits_for_it() -> Result<()> {
    // A seed that never answers: the node waits for it (4 s here).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let node = member("lonely")
        .arg("--seeds")
        .arg(silent.local_addr()?.to_string())
        .args(["--catch-up-timeout-secs", "4"])
        .start_unready()
        .await?;
    let refused = node
        .create_host(host_request(
            &["early.test"],
            &["http://127.0.0.1:9".into()],
        ))
        .await
        .expect_err("a write before catch-up was taken");
    let status = refused
        .downcast_ref::<tonic::Status>()
        .context("not a status")?;
    ensure!(
        status.code() == Code::Unavailable && status.message().contains("retry"),
        "{status:?}"
    );
    ensure!(node.admin_get("/readyz").await? == 503);
    let metrics = client::get(node.admin, "localhost", "/metrics")
        .await?
        .text();
    ensure!(metrics.contains("charon_catching_up 1"), "{metrics}");
    let out = node.ctl(&["cluster", "status"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("catching up"), "{text}");
    // Reads are served meanwhile.
    ensure!(list(&node).await?.is_empty());
    // charonctl waits for the node by itself and says so.
    let out = node
        .ctl(&[
            "host",
            "add",
            "early.test",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "charonctl failed: {stderr}");
    ensure!(
        stderr.contains("catching up"),
        "no word on stderr: {stderr}"
    );
    eventually(Duration::from_secs(5), || async {
        ensure!(node.admin_get("/readyz").await? == 200);
        Ok(())
    })
    .await?;
    Ok(())
}
