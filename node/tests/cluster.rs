//! In-process clusters: real stores (redb files), real gRPC sync servers on
//! loopback, chitchat over its in-process `ChannelTransport`. A partition
//! removes the gossip links between two groups and makes sync calls across
//! them fail, so both sides keep accepting writes; healing must converge
//! every node to the same state.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use charon_node::cluster::{Cluster, ClusterConfig};
use charon_node::host::ProxyHost;
use charon_node::store::{host_key, Body, Record, Store, StoreError, Write};
use chitchat::transport::ChannelTransport;
use tokio::net::TcpListener;

type Blocked = Arc<Mutex<HashSet<(String, String)>>>;

#[derive(Clone, Default)]
struct Net {
    transport: ChannelTransport,
    blocked: Blocked,
}

struct Node {
    name: String,
    store: Arc<Store>,
    cluster: Arc<Cluster>,
    gossip: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn fast(c: &mut ClusterConfig) {
    c.gossip_interval = Duration::from_millis(50);
    c.anti_entropy_interval = Duration::from_millis(500);
}

impl Net {
    async fn start(
        &self,
        name: &str,
        port: u16,
        seeds: &[&Node],
        tweak: impl Fn(&mut ClusterConfig),
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = listener.local_addr().unwrap();
        let gossip: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut config = ClusterConfig::local(name, gossip, api);
        config.seeds = seeds.iter().map(|n| n.gossip.to_string()).collect();
        config.secret = Some("in-process-secret-0123456789".into());
        fast(&mut config);
        tweak(&mut config);
        let me = store.node_id().to_string();
        let blocked = self.blocked.clone();
        let reachable = Arc::new(move |peer: &str| {
            !blocked
                .lock()
                .unwrap()
                .contains(&(me.clone(), peer.to_string()))
        });
        let cluster = Cluster::start(config, store.clone(), &self.transport, Some(reachable))
            .await
            .unwrap();
        let sync = cluster.sync_server();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(sync)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Node {
            name: name.into(),
            store,
            cluster,
            gossip,
            server,
            _dir: dir,
        }
    }

    async fn cut(&self, a: &[&Node], b: &[&Node], connected: bool) {
        for x in a {
            for y in b {
                if connected {
                    self.transport.add_link(x.gossip, y.gossip).await;
                } else {
                    self.transport.remove_link(x.gossip, y.gossip).await;
                }
                let (xi, yi) = (x.store.node_id().to_string(), y.store.node_id().to_string());
                let mut blocked = self.blocked.lock().unwrap();
                for pair in [(xi.clone(), yi.clone()), (yi, xi)] {
                    if connected {
                        blocked.remove(&pair);
                    } else {
                        blocked.insert(pair);
                    }
                }
            }
        }
    }

    async fn partition(&self, a: &[&Node], b: &[&Node]) {
        self.cut(a, b, false).await;
    }

    async fn heal(&self, a: &[&Node], b: &[&Node]) {
        self.cut(a, b, true).await;
    }
}

async fn eventually<F: FnMut() -> Result<(), String>>(what: &str, timeout: Duration, mut check: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: still {e} after {timeout:?}")
            }
            // Poll interval for a condition, not a start-up wait.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn members_live(node: &Node) -> usize {
    node.cluster
        .members()
        .await
        .iter()
        .filter(|m| m.live)
        .count()
}

async fn wait_all_live(nodes: &[&Node]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for n in nodes {
        while members_live(n).await != nodes.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never saw {} live members",
                n.name,
                nodes.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn host(id: &str, domain: &str, upstream: &str) -> ProxyHost {
    ProxyHost {
        id: id.into(),
        name: domain.into(),
        domains: vec![domain.into()],
        upstreams: vec![upstream.into()],
        enabled: true,
        websocket: true,
        preserve_host: true,
        forwarded_headers: true,
        version: 1,
        ..Default::default()
    }
}

fn write(node: &Node, key: String, body: Option<Body>) {
    node.store
        .transact(|_| Ok::<_, StoreError>((vec![Write { key, body }], ())))
        .unwrap();
}

fn put(node: &Node, h: ProxyHost) {
    write(node, host_key(&h.id), Some(Body::Host(h)));
}

fn delete(node: &Node, id: &str) {
    write(node, host_key(id), None);
}

fn records(node: &Node) -> Vec<(String, Record)> {
    node.store.records()
}

/// Every node holds exactly the same records (tombstones included) and
/// publishes the same hash.
async fn converged(nodes: &[&Node], timeout: Duration) {
    eventually("convergence", timeout, || {
        let first = records(nodes[0]);
        let hash = nodes[0].store.summary().borrow().hash;
        for n in &nodes[1..] {
            if records(n) != first {
                return Err(format!("{} differs from {}", n.name, nodes[0].name));
            }
            if n.store.summary().borrow().hash != hash {
                return Err(format!("{} hash differs", n.name));
            }
        }
        Ok(())
    })
    .await;
}

fn upstream_of(node: &Node, id: &str) -> Option<String> {
    node.store
        .hosts()
        .iter()
        .find(|h| h.id == id)
        .map(|h| h.upstreams[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_writes_on_both_sides_of_a_partition_converge_with_one_winner() {
    let net = Net::default();
    let a = net.start("a", 1001, &[], fast).await;
    let b = net.start("b", 1002, &[&a], fast).await;
    let c = net.start("c", 1003, &[&a], fast).await;
    wait_all_live(&[&a, &b, &c]).await;
    put(&a, host("shared", "shared.test", "http://127.0.0.1:1"));
    converged(&[&a, &b, &c], Duration::from_secs(10)).await;

    net.partition(&[&a], &[&b, &c]).await;
    // Both sides accept writes, including a conflicting edit of one host.
    put(&a, host("only-a", "a.test", "http://127.0.0.1:2"));
    put(&c, host("only-c", "c.test", "http://127.0.0.1:3"));
    put(&a, host("shared", "shared.test", "http://127.0.0.1:10"));
    put(&c, host("shared", "shared.test", "http://127.0.0.1:30"));
    // The minority side cannot have seen the majority's writes.
    assert_eq!(upstream_of(&a, "only-c"), None);
    eventually("b gets c's writes", Duration::from_secs(10), || {
        upstream_of(&b, "only-c")
            .map(|_| ())
            .ok_or_else(|| "missing".into())
    })
    .await;
    assert_eq!(upstream_of(&b, "only-a"), None, "the partition leaked");

    net.heal(&[&a], &[&b, &c]).await;
    converged(&[&a, &b, &c], Duration::from_secs(20)).await;
    // The winner is the write with the higher (hlc, origin), everywhere.
    let recs = records(&a);
    let shared = &recs.iter().find(|(k, _)| k == "host/shared").unwrap().1;
    let want = if shared.origin == a.store.node_id() {
        "http://127.0.0.1:10"
    } else {
        "http://127.0.0.1:30"
    };
    for n in [&a, &b, &c] {
        assert_eq!(
            upstream_of(n, "shared").as_deref(),
            Some(want),
            "{}",
            n.name
        );
        assert!(upstream_of(n, "only-a").is_some() && upstream_of(n, "only-c").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_a_delete_on_one_side_stays_deleted_after_heal() {
    let net = Net::default();
    let a = net.start("a", 2001, &[], fast).await;
    let b = net.start("b", 2002, &[&a], fast).await;
    let c = net.start("c", 2003, &[&a], fast).await;
    let d = net.start("d", 2004, &[&a], fast).await;
    let e = net.start("e", 2005, &[&a], fast).await;
    let all = [&a, &b, &c, &d, &e];
    wait_all_live(&all).await;
    put(&c, host("doomed", "doomed.test", "http://127.0.0.1:1"));
    put(&d, host("kept", "kept.test", "http://127.0.0.1:2"));
    converged(&all, Duration::from_secs(10)).await;

    net.partition(&[&a, &b], &[&c, &d, &e]).await;
    delete(&b, "doomed");
    put(&e, host("new-e", "e.test", "http://127.0.0.1:3"));
    eventually("a sees the delete", Duration::from_secs(10), || {
        if upstream_of(&a, "doomed").is_none() {
            Ok(())
        } else {
            Err("still there".into())
        }
    })
    .await;
    assert!(
        upstream_of(&c, "doomed").is_some(),
        "the partition leaked the delete"
    );

    net.heal(&[&a, &b], &[&c, &d, &e]).await;
    converged(&all, Duration::from_secs(20)).await;
    for n in all {
        assert_eq!(
            upstream_of(n, "doomed"),
            None,
            "{} resurrected the host",
            n.name
        );
        assert!(upstream_of(n, "kept").is_some() && upstream_of(n, "new-e").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_past_the_tombstone_grace_gets_a_snapshot_and_resurrects_nothing() {
    let short = |c: &mut ClusterConfig| {
        fast(c);
        c.tombstone_grace = Duration::from_millis(500);
        // Forget a dead member quickly, so that it stops holding back the
        // collection of tombstones.
        c.dead_node_grace = Duration::from_secs(2);
    };
    let net = Net::default();
    let a = net.start("a", 3001, &[], short).await;
    let b = net.start("b", 3002, &[&a], short).await;
    let c = net.start("c", 3003, &[&a], short).await;
    wait_all_live(&[&a, &b, &c]).await;
    put(&a, host("doomed", "doomed.test", "http://127.0.0.1:1"));
    converged(&[&a, &b, &c], Duration::from_secs(10)).await;

    net.partition(&[&c], &[&a, &b]).await;
    delete(&a, "doomed");
    // a and b forget c, then collect the tombstone: no trace of the host.
    eventually(
        "tombstone collected on a and b",
        Duration::from_secs(30),
        || {
            for n in [&a, &b] {
                if records(n).iter().any(|(k, _)| k == "host/doomed") {
                    return Err(format!("{} still holds the record", n.name));
                }
            }
            Ok(())
        },
    )
    .await;
    assert!(!a.store.gc_floor().is_empty());
    assert!(upstream_of(&c, "doomed").is_some());

    net.heal(&[&c], &[&a, &b]).await;
    eventually(
        "c drops the host deleted while it was away",
        Duration::from_secs(20),
        || {
            if upstream_of(&c, "doomed").is_none() {
                Ok(())
            } else {
                Err("c still serves it".into())
            }
        },
    )
    .await;
    // Only a snapshot carries the collection floor: c got one.
    assert!(
        !c.store.gc_floor().is_empty(),
        "c caught up without a snapshot"
    );
    // Give anti-entropy (every 500 ms) several rounds to bring anything
    // back, then check nobody did.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        for n in [&a, &b, &c] {
            assert_eq!(
                upstream_of(n, "doomed"),
                None,
                "{} resurrected the host",
                n.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live: Vec<_> = [&a, &b, &c].iter().map(|n| n.store.hosts().len()).collect();
    assert_eq!(live, [0, 0, 0]);
}

/// A write reaches every node while no node pushes it to more than a few
/// peers: down a 3-ary tree rooted at the writer, each node relaying to its
/// children. Before, the origin pushed every write to every live member
/// (seven here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_writes_spread_by_bounded_pushes_and_relays() {
    let net = Net::default();
    let mut nodes = vec![net.start("n1", 5001, &[], fast).await];
    for i in 2..=8u16 {
        let n = net
            .start(&format!("n{i}"), 5000 + i, &[&nodes[0]], fast)
            .await;
        nodes.push(n);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_all_live(&refs).await;
    let before: Vec<u64> = nodes.iter().map(|n| n.cluster.pushes_sent()).collect();
    const WRITES: u64 = 20;
    for i in 0..WRITES {
        let h = host(
            &format!("h{i}"),
            &format!("h{i}.test"),
            "http://127.0.0.1:1",
        );
        put(&nodes[0], h);
    }
    converged(&refs, Duration::from_secs(10)).await;
    for n in &refs {
        assert_eq!(n.store.hosts().len(), WRITES as usize, "{}", n.name);
    }
    let sent: Vec<u64> = nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| n.cluster.pushes_sent() - b)
        .collect();
    assert!(
        sent[0] <= WRITES * 3,
        "the origin pushed {} times for {WRITES} writes",
        sent[0]
    );
    for (n, s) in nodes.iter().zip(&sent).skip(1) {
        assert!(*s <= WRITES * 3, "{} relayed {s} pushes", n.name);
    }
    assert!(
        sent[1..].iter().sum::<u64>() > 0,
        "nobody relayed: the rest came by pull"
    );
    // A tree: about one push per node per write, not one per peer.
    let total: u64 = sent.iter().sum();
    assert!(
        total <= WRITES * 7 + 7,
        "{total} pushes for {WRITES} writes to 7 peers"
    );
}
