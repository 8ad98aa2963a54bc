//! `charon-bench scale`: what one node's writes, start-up and lookups cost
//! as the stored configuration grows (issue 16: a write must cost
//! O(change), not O(everything stored)).
//!
//! For each size N in `--sizes`:
//! 1. **Seed**: a fresh data dir is filled in-process through the node's own
//!    [`Store`] (the same records and encoding the API writes, committed in
//!    batches, far faster than N API calls): N hosts, each with its own
//!    domain, and `N × --cert-ratio` certificates (distinct ECDSA keys,
//!    sealed with the key the node derives from the cluster secret).
//! 2. **Start**: one real `charon-node` on that dir; time from spawn to
//!    `/readyz` 200, and its RSS then (`VmRSS`).
//! 3. **Writes**: `--writes` sequential `CreateHost` calls over one gRPC
//!    channel after `--warmup-writes` uncounted ones; p50/p90/p99/max of the
//!    acknowledged round trip, and the RSS after them.
//! 4. **Lookup** (in this process, no node): the route table built from the
//!    same N hosts; nanoseconds per `lookup` of a stored name (in a
//!    scattered order, so caches do not flatter it) and of an unknown name.
//!
//! Every wait is a poll bounded in time; the node is killed on exit
//! (`kill_on_drop`).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use charon_node::host::ProxyHost;
use charon_node::proxy::routes::{RouteDefaults, RouteTable};
use charon_node::proxy::upstream::UpstreamRegistry;
use charon_node::store::{self, Body, Store, StoreError, Write};
use charon_node::tls::cert::{parse_and_validate, StoredCert};
use charon_node::tls::seal::DataKey;
use serde::Serialize;

use crate::propagation::{self, percentiles, Percentiles};

const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Records per redb transaction while seeding.
const SEED_BATCH: usize = 2000;

pub struct Args {
    pub bin_dir: PathBuf,
    pub workdir: PathBuf,
    pub sizes: Vec<usize>,
    pub cert_ratio: f64,
    pub writes: usize,
    pub warmup_writes: usize,
    pub lookups: usize,
    pub out: Option<PathBuf>,
    pub command: String,
}

#[derive(Debug, Serialize)]
struct Row {
    hosts: usize,
    certs: usize,
    seed_s: f64,
    start_ms: f64,
    rss_start_kib: u64,
    rss_after_writes_kib: u64,
    writes: Option<Percentiles>,
    lookup_hit_ns: f64,
    lookup_miss_ns: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    loadavg_before: String,
    rows: Vec<Row>,
}

pub fn run(a: Args) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let loadavg_before = propagation::loadavg();
    let mut rows = Vec::new();
    for &n in &a.sizes {
        eprintln!("== {n} hosts");
        let row = rt.block_on(one_size(&a, n))?;
        eprintln!("{}", serde_json::to_string(&row)?);
        rows.push(row);
    }
    let report = Report {
        command: a.command.clone(),
        loadavg_before,
        rows,
    };
    let md = markdown(&report);
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("{md}");
    if let Some(out) = &a.out {
        fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        fs::write(
            out.with_extension("json"),
            serde_json::to_string_pretty(&report)?,
        )?;
    }
    Ok(true)
}

async fn one_size(a: &Args, n: usize) -> anyhow::Result<Row> {
    let certs = (n as f64 * a.cert_ratio).round() as usize;
    let shared = propagation::Shared {
        bin: a.bin_dir.join("charon-node"),
        token: propagation::token("scale-admin"),
        secret: propagation::token("scale-secret"),
        gossip_interval_ms: 200,
        seed: propagation::free_udp()?,
    };
    let workdir = a.workdir.join(format!("{n}-hosts"));
    let mut node = propagation::Node::new(1, &workdir)?;
    let t = Instant::now();
    seed(&node.data_dir, n, certs, &shared.secret)?;
    let seed_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    node.spawn(&shared)?;
    node.wait_ready(START_TIMEOUT).await?;
    let start_ms = propagation::ms(t.elapsed());
    let pid = node.child.as_ref().and_then(|c| c.id()).context("no pid")?;
    let rss_start_kib = rss_kib(pid)?;

    let bearer = propagation::Bearer(format!("Bearer {}", shared.token).parse()?);
    let (mut api, _) = propagation::connect(node.listen().api, &bearer).await?;
    let mut samples = Vec::with_capacity(a.writes);
    for i in 0..a.warmup_writes + a.writes {
        let req = propagation::host_request(&format!("w{i}.write.test"), "http://127.0.0.1:9");
        let t = Instant::now();
        api.create_host(req)
            .await
            .with_context(|| format!("CreateHost #{i} at {n} hosts"))?;
        if i >= a.warmup_writes {
            samples.push(propagation::ms(t.elapsed()));
        }
    }
    let rss_after_writes_kib = rss_kib(pid)?;
    node.kill().await?;

    let (lookup_hit_ns, lookup_miss_ns) = lookup_cost(n, a.lookups);
    let _ = fs::remove_dir_all(&workdir);
    Ok(Row {
        hosts: n,
        certs,
        seed_s,
        start_ms,
        rss_start_kib,
        rss_after_writes_kib,
        writes: percentiles(&samples),
        lookup_hit_ns,
        lookup_miss_ns,
    })
}

fn host(i: usize) -> ProxyHost {
    ProxyHost {
        id: format!("h-scale-{i:07}"),
        name: format!("s{i}.scale.test"),
        domains: vec![format!("s{i}.scale.test")],
        upstreams: vec!["http://127.0.0.1:9".into()],
        enabled: true,
        websocket: true,
        preserve_host: true,
        forwarded_headers: true,
        version: 1,
        ..Default::default()
    }
}

/// Writes `hosts` hosts and `certs` certificates into a fresh store in
/// `dir`, through [`Store::transact`] like the API, in batches.
fn seed(dir: &Path, hosts: usize, certs: usize, secret: &str) -> anyhow::Result<()> {
    let store = Store::open(dir)?;
    let key = DataKey::from_cluster_secret(secret);
    let commit = |writes: Vec<Write>| {
        store.transact(|_| Ok::<_, StoreError>((writes, ())))?;
        anyhow::Ok(())
    };
    let mut batch = Vec::with_capacity(SEED_BATCH);
    for i in 0..hosts {
        let h = host(i);
        batch.push(Write {
            key: store::host_key(&h.id),
            body: Some(Body::Host(h)),
        });
        if batch.len() == SEED_BATCH {
            commit(std::mem::take(&mut batch))?;
        }
    }
    let ca = test_ca()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for i in 0..certs {
        let c = cert(&ca, i, &key, now)?;
        batch.push(Write {
            key: store::cert_key(&c.id),
            body: Some(Body::Cert(c)),
        });
        if batch.len() == SEED_BATCH {
            commit(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        commit(batch)?;
    }
    Ok(())
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn test_ca() -> anyhow::Result<Ca> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "scale bench CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate()?;
    Ok(Ca {
        issuer: rcgen::Issuer::new(p, key),
    })
}

/// Certificate `i` for `c{i}.scale.test`, checked and sealed as an upload is.
fn cert(ca: &Ca, i: usize, key: &DataKey, now: u64) -> anyhow::Result<StoredCert> {
    let name = format!("c{i}.scale.test");
    let p = rcgen::CertificateParams::new(vec![name.clone()])?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = p.signed_by(&leaf_key, &ca.issuer)?;
    let parsed = parse_and_validate(&leaf.pem(), &leaf_key.serialize_pem(), now)
        .map_err(|e| anyhow::anyhow!("seeded certificate refused: {e}"))?;
    let mut c = parsed.meta;
    c.id = format!("c-scale-{i:07}");
    c.name = name;
    c.created_at_ms = now;
    c.updated_at_ms = now;
    c.version = 1;
    c.seal_key(key, &parsed.key_pem);
    Ok(c)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// ns per lookup of a stored name and of an unknown one, in a table of `n`
/// hosts.
fn lookup_cost(n: usize, lookups: usize) -> (f64, f64) {
    let hosts: Vec<Arc<ProxyHost>> = (0..n).map(|i| Arc::new(host(i))).collect();
    let table = RouteTable::build(
        &hosts,
        &UpstreamRegistry::default(),
        &RouteDefaults::default(),
    );
    assert_eq!(table.len(), n, "every seeded host is routed");
    // A scattered order: a multiplicative step coprime with n.
    let names: Vec<String> = (0..n.min(65_536))
        .map(|i| format!("s{}.scale.test", (i * 2_654_435_761) % n))
        .collect();
    let misses: Vec<String> = (0..1024).map(|i| format!("m{i}.other.test")).collect();
    let time = |names: &[String], want: bool| {
        let t = Instant::now();
        for i in 0..lookups {
            let r = table.lookup(std::hint::black_box(&names[i % names.len()]));
            assert_eq!(r.is_some(), want);
        }
        t.elapsed().as_nanos() as f64 / lookups.max(1) as f64
    };
    (time(&names, true), time(&misses, false))
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### One node as the configuration grows\n");
    let _ = writeln!(
        s,
        "`{}`; load average before: {}\n",
        r.command, r.loadavg_before
    );
    let _ = writeln!(
        s,
        "| hosts | certs | seed s | start → ready ms | RSS at start MiB | RSS after writes MiB | writes | write p50 ms | p90 | p99 | max | lookup hit ns | lookup miss ns |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.rows {
        let w = |f: fn(&Percentiles) -> f64| {
            row.writes
                .as_ref()
                .map(|p| format!("{:.2}", f(p)))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            row.hosts,
            row.certs,
            row.seed_s,
            row.start_ms,
            row.rss_start_kib as f64 / 1024.0,
            row.rss_after_writes_kib as f64 / 1024.0,
            row.writes.as_ref().map(|p| p.count).unwrap_or(0),
            w(|p| p.p50_ms),
            w(|p| p.p90_ms),
            w(|p| p.p99_ms),
            w(|p| p.max_ms),
            row.lookup_hit_ns,
            row.lookup_miss_ns,
        );
    }
    if let (Some(first), Some(last)) = (r.rows.first(), r.rows.last()) {
        if let (Some(a), Some(b)) = (&first.writes, &last.writes) {
            let _ = writeln!(
                s,
                "\nWrite p50 at {} hosts ÷ p50 at {} hosts: **{:.2}×** (issue 16's target: ≤ 2×).",
                last.hosts,
                first.hosts,
                b.p50_ms / a.p50_ms
            );
        }
    }
    s
}

/// Parses `100,1000,10k,100k`.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|p| {
            let p = p.trim();
            let (num, mul) = match p.strip_suffix(['k', 'K']) {
                Some(n) => (n, 1000),
                None => (p, 1),
            };
            num.parse::<usize>()
                .map(|v| v * mul)
                .map_err(|e| format!("{p}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.contains(&0) {
                Err("sizes must be > 0".into())
            } else {
                Ok(v)
            }
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(
            super::parse_sizes("100,1k,10K").unwrap(),
            [100, 1000, 10000]
        );
        assert!(super::parse_sizes("0").is_err());
        assert!(super::parse_sizes("x").is_err());
    }
}
