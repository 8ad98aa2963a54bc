//! Chaos: five real `charon-node` processes, several writers sending
//! creates, updates, deletes, re-creates and creates of taken names to
//! random nodes, while a nemesis kills (`SIGKILL`), pauses
//! (`SIGSTOP`/`SIGCONT`) and stops (`SIGTERM`) nodes — sometimes three of
//! five at once — and restarts them. Then everything heals and the history
//! is checked:
//! - every acknowledged write is on every node unless a later acknowledged
//!   write replaced it (`lost`);
//! - no host whose delete was acknowledged comes back (`resurrected`);
//! - every domain names the same host on every node (`split names`), and a
//!   create of a name every node knows is taken is refused;
//! - every name can still be updated, removed and added again;
//! - how long the cluster took to converge after the heal.
//!
//! Each writer owns its domains, so the order of the writes to a domain is
//! the writer's order. A write whose outcome is unknown (timed out, node
//! killed) may or may not have happened: a domain whose last acknowledged
//! write is followed by one is not judged.
//!
//! The CI profile runs about 45 s of chaos; a longer run:
//! `CHARON_CHAOS_SECS=600 cargo test -p charon-tests --test chaos -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use charon_proto::v1::hosts_client::HostsClient;
use charon_proto::v1::{
    DeleteHostRequest, GetHostRequest, ListHostsRequest, ProxyHost, UpdateHostRequest,
};
use charon_tests::{eventually, host_request, TestNode, TestNodeBuilder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

const SECRET: &str = "chaos-cluster-secret-0123456789";
const TOKEN: &str = "chaos-test-token-0123456789";
const NODES: usize = 5;
const WRITERS: usize = 4;
const DOMAINS_PER_WRITER: usize = 3;
const PINNED: [&str; 2] = ["pinned-0.chaos.test", "pinned-1.chaos.test"];
/// Names every writer creates, updates and deletes at once: only checked
/// for one holder everywhere, no comeback and being manageable, since
/// concurrent writers give them no order to judge by.
const CONTESTED: [&str; 2] = ["shared-0.chaos.test", "shared-1.chaos.test"];
const UPSTREAM: &str = "http://127.0.0.1:9";
/// How long one write may take before the writer gives up on it.
const CALL_BUDGET: Duration = Duration::from_millis(1500);

fn member(name: &str) -> TestNodeBuilder {
    TestNode::builder()
        .name(name)
        .cluster_secret(SECRET)
        .env("CHARON_ADMIN_TOKEN", TOKEN)
        .args(["--anti-entropy-secs", "1"])
}

fn chaos_secs() -> u64 {
    std::env::var("CHARON_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A small xorshift generator: the seed is printed, so a failing run can be
/// looked at again with `CHARON_CHAOS_SEED`.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    Update,
    Delete,
    CreateTaken,
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Acknowledged: the host the write made, changed or removed.
    Acked { id: String },
    /// Refused: certainly not applied.
    Refused,
    /// Timed out, connection lost: may or may not have happened.
    Unknown,
}

#[derive(Debug, Clone)]
struct Op {
    domain: String,
    kind: Kind,
    /// The host name the write sets: identifies it in the final state.
    marker: String,
    outcome: Outcome,
}

/// The API address of each node while it runs.
type Addrs = Arc<Mutex<Vec<Option<SocketAddr>>>>;

/// A channel per node address, kept like a real client keeps its
/// connections: a call to a node paused since then is really sent, sits in
/// the node's socket buffer, and is read when the node resumes.
type Channels = HashMap<SocketAddr, Channel>;

async fn call(
    channels: &mut Channels,
    addr: SocketAddr,
    kind: Kind,
    domain: &str,
    marker: &str,
) -> Result<String, Status> {
    let channel = match channels.get(&addr) {
        Some(c) => c.clone(),
        None => {
            let c = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| Status::internal(e.to_string()))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(CALL_BUDGET)
                .connect()
                .await
                .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
            channels.insert(addr, c.clone());
            c
        }
    };
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
    let deadline = (unix_ms() + CALL_BUDGET.as_millis() as u64).to_string();
    let mut api = HostsClient::with_interceptor(channel, move |mut r: Request<()>| {
        r.metadata_mut().insert("authorization", token.clone());
        r.metadata_mut()
            .insert("charon-deadline-ms", deadline.parse().unwrap());
        Ok(r)
    });
    match kind {
        Kind::Create | Kind::CreateTaken => {
            let mut req = host_request(&[domain], &[UPSTREAM.into()]);
            req.host.as_mut().unwrap().name = marker.into();
            let mut req = Request::new(req);
            req.metadata_mut()
                .insert("charon-idempotency-key", marker.parse().unwrap());
            Ok(api.create_host(req).await?.into_inner().id)
        }
        Kind::Update => Ok(api
            .update_host(UpdateHostRequest {
                id_or_domain: domain.into(),
                name: Some(marker.into()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .id),
        Kind::Delete => Ok(api
            .delete_host(DeleteHostRequest {
                id_or_domain: domain.into(),
                expected_version: None,
            })
            .await?
            .into_inner()
            .id),
    }
}

fn outcome(r: Result<String, Status>) -> Outcome {
    match r {
        Ok(id) => Outcome::Acked { id },
        Err(s) => match s.code() {
            Code::AlreadyExists | Code::NotFound | Code::FailedPrecondition => Outcome::Refused,
            Code::Unavailable if s.message().contains("not caught up") => Outcome::Refused,
            // A connection refused before anything was sent cannot apply.
            Code::Unavailable if s.message().starts_with("connect:") => Outcome::Refused,
            _ => Outcome::Unknown,
        },
    }
}

/// One writer: its own domains, random nodes, until `end`.
async fn writer(w: usize, addrs: Addrs, end: Instant, mut rng: Rng) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut channels = Channels::new();
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let node = rng.below(NODES);
        let Some(addr) = addrs.lock().unwrap()[node] else {
            // The node is down: pick another after a breath.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (kind, domain) = match rng.below(10) {
            0..=3 => (Kind::Update, None),
            4..=5 => (Kind::Delete, None),
            6..=8 => (Kind::Create, None),
            _ => (Kind::CreateTaken, Some(PINNED[rng.below(PINNED.len())])),
        };
        // One write in four goes to a name every writer fights over.
        let contested = kind != Kind::CreateTaken && rng.below(4) == 0;
        let domain = match domain {
            Some(d) => d.to_string(),
            None if contested => CONTESTED[rng.below(CONTESTED.len())].to_string(),
            None => format!("w{w}-{}.chaos.test", rng.below(DOMAINS_PER_WRITER)),
        };
        let marker = format!("w{w}-op{n}");
        if contested && kind == Kind::Create && rng.below(2) == 0 {
            // Two clients create the same name on two nodes at once.
            let other = rng.below(NODES);
            let addr2 = addrs.lock().unwrap()[other].filter(|a| *a != addr);
            if let Some(addr2) = addr2 {
                let marker2 = format!("{marker}b");
                let mut channels2 = Channels::new();
                let (r1, r2) = tokio::join!(
                    call(&mut channels, addr, kind, &domain, &marker),
                    call(&mut channels2, addr2, kind, &domain, &marker2),
                );
                for (r, marker) in [(r1, marker), (r2, marker2)] {
                    ops.push(Op {
                        domain: domain.clone(),
                        kind,
                        marker,
                        outcome: outcome(r),
                    });
                }
                channels.clear();
                continue;
            }
        }
        let r = call(&mut channels, addr, kind, &domain, &marker).await;
        if r.is_err() {
            // Reconnect next time: the node may have been restarted.
            channels.remove(&addr);
        }
        ops.push(Op {
            domain,
            kind,
            marker,
            outcome: outcome(r),
        });
    }
    ops
}

#[derive(Default, Debug)]
struct Faults {
    kill: usize,
    kill_three: usize,
    pause: usize,
    term: usize,
}

/// The nemesis: one fault at a time, each healed before the next.
async fn nemesis(
    nodes: &mut [TestNode],
    addrs: &Addrs,
    end: Instant,
    rng: &mut Rng,
) -> Result<Faults> {
    let mut f = Faults::default();
    while Instant::now() < end {
        // Chaos timing: the gap between faults.
        tokio::time::sleep(rng.ms(1000, 2500)).await;
        match rng.below(10) {
            0..=2 => {
                let i = rng.below(NODES);
                addrs.lock().unwrap()[i] = None;
                nodes[i].kill().await?;
                tokio::time::sleep(rng.ms(300, 2000)).await;
                restart(&mut nodes[i], addrs, i).await?;
                f.kill += 1;
            }
            3 => {
                let mut picked = BTreeSet::new();
                while picked.len() < 3 {
                    picked.insert(rng.below(NODES));
                }
                for &i in &picked {
                    addrs.lock().unwrap()[i] = None;
                    nodes[i].kill().await?;
                }
                tokio::time::sleep(rng.ms(500, 2000)).await;
                for &i in &picked {
                    restart(&mut nodes[i], addrs, i).await?;
                }
                f.kill_three += 1;
            }
            4..=7 => {
                let count = 1 + rng.below(3);
                let mut picked = BTreeSet::new();
                while picked.len() < count {
                    picked.insert(rng.below(NODES));
                }
                for &i in &picked {
                    nodes[i].signal("STOP")?;
                }
                tokio::time::sleep(rng.ms(500, 3000)).await;
                for &i in &picked {
                    nodes[i].signal("CONT")?;
                }
                f.pause += 1;
            }
            _ => {
                let i = rng.below(NODES);
                addrs.lock().unwrap()[i] = None;
                let _ = nodes[i].stop().await?;
                restart(&mut nodes[i], addrs, i).await?;
                f.term += 1;
            }
        }
    }
    Ok(f)
}

/// Restarts a node and hands its address to the writers as soon as its
/// API listens, before it has caught up: writes then must wait for it.
async fn restart(node: &mut TestNode, addrs: &Addrs, i: usize) -> Result<()> {
    node.start_again_unready()
        .await
        .with_context(|| format!("restarting node {i}"))?;
    addrs.lock().unwrap()[i] = Some(node.api);
    Ok(())
}

async fn list(node: &TestNode) -> Result<Vec<ProxyHost>> {
    let mut hosts = node
        .grpc_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(hosts)
}

/// domain → (id, name) of the host `GetHost(domain)` answers, on one node.
async fn resolve(
    node: &TestNode,
    domains: &[String],
) -> Result<BTreeMap<String, Option<(String, String)>>> {
    let mut api = node.grpc_client().await?;
    let mut out = BTreeMap::new();
    for d in domains {
        let r = api
            .get_host(GetHostRequest {
                id_or_domain: d.clone(),
            })
            .await;
        let v = match r {
            Ok(h) => {
                let h = h.into_inner();
                Some((h.id, h.name))
            }
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(s.into()),
        };
        out.insert(d.clone(), v);
    }
    Ok(out)
}

async fn wait_converged(nodes: &[TestNode], within: Duration) -> Result<()> {
    eventually(within, || async {
        let mut lists = Vec::new();
        for n in nodes {
            let (members, converged) = n.members().await?;
            let live = members.iter().filter(|m| m.live).count();
            ensure!(
                converged && live == NODES,
                "converged {converged}, {live} live"
            );
            lists.push(list(n).await?);
        }
        ensure!(lists.windows(2).all(|w| w[0] == w[1]), "host lists differ");
        Ok(())
    })
    .await
}

#[derive(Default, Debug)]
struct Verdict {
    judged: usize,
    lost: Vec<String>,
    stale: Vec<String>,
    /// Deleted by name, yet another host that listed the name (it lost a
    /// concurrent claim) holds it now: a different host, not a comeback.
    survivors: Vec<String>,
    resurrected: Vec<String>,
}

/// Judges each writer-owned domain by its last acknowledged write.
fn judge(
    ops: &[Op],
    finals: &BTreeMap<String, Option<(String, String)>>,
    alive: &BTreeSet<String>,
) -> Verdict {
    let mut v = Verdict::default();
    let deleted: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.kind == Kind::Delete)
        .filter_map(|o| match &o.outcome {
            Outcome::Acked { id } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    for id in &deleted {
        if alive.contains(*id) {
            v.resurrected.push(id.to_string());
        }
    }
    let mut by_domain: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    let judged = |o: &&Op| o.kind != Kind::CreateTaken && !CONTESTED.contains(&o.domain.as_str());
    for o in ops.iter().filter(judged) {
        by_domain.entry(&o.domain).or_default().push(o);
    }
    for (d, ops) in by_domain {
        let Some(last) = ops
            .iter()
            .rposition(|o| matches!(o.outcome, Outcome::Acked { .. }))
        else {
            continue;
        };
        if ops[last + 1..]
            .iter()
            .any(|o| matches!(o.outcome, Outcome::Unknown))
        {
            continue;
        }
        v.judged += 1;
        let op = ops[last];
        let Outcome::Acked { id } = &op.outcome else {
            unreachable!()
        };
        let now = finals.get(d).cloned().flatten();
        match op.kind {
            Kind::Delete => {
                // The deleted host itself coming back is counted above.
                if let Some((other, name)) = now.filter(|(other, _)| other != id) {
                    v.survivors
                        .push(format!("{d}: {id} deleted, {other} ({name}) holds it"));
                }
            }
            _ => {
                let ok = now.as_ref().is_some_and(|(_, name)| *name == op.marker);
                if ok {
                    continue;
                }
                let line = format!(
                    "{d}: {} by {} acked on {id}, now {now:?}",
                    op.marker,
                    kind_name(op.kind)
                );
                // Acked by a node that had not heard of the host's delete
                // (a paused node): the delete stands.
                if deleted.contains(id.as_str()) {
                    v.stale.push(line);
                } else {
                    v.lost.push(line);
                }
            }
        }
    }
    v
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Create => "create",
        Kind::Update => "update",
        Kind::Delete => "delete",
        Kind::CreateTaken => "create of a taken name",
    }
}

#[tokio::test]
async fn five_nodes_under_kill_pause_and_restart_lose_nothing() -> Result<()> {
    let seed = std::env::var("CHARON_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| unix_ms() | 1);
    eprintln!("chaos seed {seed} (CHARON_CHAOS_SEED), {} s", chaos_secs());
    let mut rng = Rng(seed);
    let mut nodes: Vec<TestNode> = vec![member("n1").start().await?];
    for i in 2..=NODES {
        let seeds: Vec<&TestNode> = nodes.iter().collect();
        let node = member(&format!("n{i}")).seeds(&seeds).start().await?;
        nodes.push(node);
    }
    for p in PINNED {
        nodes[0]
            .create_host(host_request(&[p], &[UPSTREAM.into()]))
            .await?;
    }
    wait_converged(&nodes, Duration::from_secs(30)).await?;
    let addrs: Addrs = Arc::new(Mutex::new(nodes.iter().map(|n| Some(n.api)).collect()));

    let end = Instant::now() + Duration::from_secs(chaos_secs());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, addrs.clone(), end, Rng(rng.next() | 1))))
        .collect();
    let faults = nemesis(&mut nodes, &addrs, end, &mut rng).await?;
    let mut ops = Vec::new();
    for w in writers {
        ops.extend(w.await?);
    }
    let healed = Instant::now();
    wait_converged(&nodes, Duration::from_secs(60)).await?;
    let convergence = healed.elapsed();

    // The final state, the same on every node.
    let mut domains: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..DOMAINS_PER_WRITER).map(move |k| format!("w{w}-{k}.chaos.test")))
        .collect();
    domains.extend(PINNED.iter().chain(&CONTESTED).map(|p| p.to_string()));
    let finals = resolve(&nodes[0], &domains).await?;
    let mut split = Vec::new();
    for n in &nodes[1..] {
        let here = resolve(n, &domains).await?;
        for d in &domains {
            if here[d].as_ref().map(|x| &x.0) != finals[d].as_ref().map(|x| &x.0) {
                split.push(format!(
                    "{d}: {:?} vs {:?} on {}",
                    finals[d], here[d], n.api
                ));
            }
        }
    }
    let hosts = list(&nodes[0]).await?;
    let conflicts: usize = hosts.iter().map(|h| h.conflicts.len()).sum();
    let alive: BTreeSet<String> = hosts.iter().map(|h| h.id.clone()).collect();
    let verdict = judge(&ops, &finals, &alive);
    let taken_accepted = ops
        .iter()
        .filter(|o| o.kind == Kind::CreateTaken && matches!(o.outcome, Outcome::Acked { .. }))
        .count();

    // Every name can still be updated, removed and added again.
    let mut stuck = Vec::new();
    for (i, d) in domains.iter().enumerate() {
        let n = &nodes[i % NODES];
        let mut api = n.grpc_client().await?;
        if finals[d].is_some() {
            if let Err(s) = api
                .update_host(UpdateHostRequest {
                    id_or_domain: d.clone(),
                    name: Some("final".into()),
                    ..Default::default()
                })
                .await
            {
                stuck.push(format!("update {d}: {s:?}"));
            }
        }
        for _ in 0..4 {
            match api
                .delete_host(DeleteHostRequest {
                    id_or_domain: d.clone(),
                    expected_version: None,
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => break,
                Err(s) => {
                    stuck.push(format!("rm {d}: {s:?}"));
                    break;
                }
            }
        }
        if let Err(e) = n.create_host(host_request(&[d], &[UPSTREAM.into()])).await {
            stuck.push(format!("re-add {d}: {e:#}"));
        }
    }
    wait_converged(&nodes, Duration::from_secs(30)).await?;
    let left: usize = list(&nodes[0])
        .await?
        .iter()
        .map(|h| h.conflicts.len())
        .sum();

    let count = |f: fn(&Outcome) -> bool| ops.iter().filter(|o| f(&o.outcome)).count();
    eprintln!(
        "chaos: {} s, {} ops: {} acknowledged, {} refused, {} unknown outcome",
        chaos_secs(),
        ops.len(),
        count(|o| matches!(o, Outcome::Acked { .. })),
        count(|o| matches!(o, Outcome::Refused)),
        count(|o| matches!(o, Outcome::Unknown)),
    );
    eprintln!(
        "faults injected: {} (kill -9: {}, kill -9 of 3 at once: {}, SIGSTOP/SIGCONT: {}, SIGTERM+restart: {})",
        faults.kill + faults.kill_three + faults.pause + faults.term,
        faults.kill,
        faults.kill_three,
        faults.pause,
        faults.term
    );
    eprintln!(
        "domains judged {}: lost {}, resurrected {}, duplicate names {} (split {}, taken names accepted {}), \
         stale acks {}, conflict survivors {}, conflicts marked {conflicts} (after fixing {left}), \
         stuck names {}, convergence {} ms",
        verdict.judged,
        verdict.lost.len(),
        verdict.resurrected.len(),
        split.len() + taken_accepted,
        split.len(),
        taken_accepted,
        verdict.stale.len(),
        verdict.survivors.len(),
        stuck.len(),
        convergence.as_millis()
    );
    for line in verdict.stale.iter().chain(&verdict.survivors) {
        eprintln!("  {line}");
    }
    ensure!(verdict.lost.is_empty(), "lost: {:#?}", verdict.lost);
    ensure!(
        verdict.resurrected.is_empty(),
        "resurrected: {:?}",
        verdict.resurrected
    );
    ensure!(split.is_empty(), "split names: {split:#?}");
    ensure!(
        taken_accepted == 0,
        "a create of a name every node knew was taken was accepted"
    );
    ensure!(
        stuck.is_empty(),
        "names that could not be managed: {stuck:#?}"
    );
    ensure!(left == 0, "conflicts left after removing every host");
    Ok(())
}
