//! Wiring: one function that takes a validated [`Config`], opens the store,
//! builds the route table, binds the listeners, serves until shutdown, and
//! shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chitchat::transport::UdpTransport;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Health};
use crate::api::{self, auth::Auth, auth::AuthError};
use crate::cluster::{Cluster, ClusterConfig};
use crate::config::{ClusterSettings, Config};
use crate::drain::{Drainer, Listeners, Phase};
use crate::host::ProxyHost;
use crate::proxy::Proxy;
use crate::store::{Changes, Store, StoreError};
use crate::telemetry::metrics::Gauges;
use crate::telemetry::otel::{NodeFacts, Tracing};
use crate::telemetry::{AccessLog, Metrics, Telemetry};
use crate::tls::seal::{DataKey, SealError};
use crate::tls::sni::{CertTable, HostNames};
use crate::tls::TlsTerminator;
use crate::workers::Workers;

/// Written after binding so that tools and tests started with port 0 learn
/// the real addresses.
pub const LISTEN_FILE: &str = "listen.json";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("cannot start the proxy's worker threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("otlp_endpoint: {0}")]
    Tracing(String),
    #[error("access_log: cannot open {sink}: {source}")]
    AccessLog {
        sink: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    ListenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The addresses a running node actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub gossip: SocketAddr,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

fn write_listen_file(dir: &Path, b: &Bound) -> Result<(), NodeError> {
    let path = dir.join(LISTEN_FILE);
    let tmp = dir.join(format!("{LISTEN_FILE}.tmp"));
    let json = serde_json::json!({
        "http": b.http, "https": b.https, "api": b.api, "admin": b.admin, "gossip": b.gossip,
    });
    let err = |source| NodeError::ListenFile {
        path: path.clone(),
        source,
    };
    std::fs::write(&tmp, format!("{json}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Resolves the cluster settings into addresses. Gossip port 0 picks a
/// free UDP port (chitchat binds by address, so the port is found here
/// first); advertised names are resolved once, at start.
async fn cluster_config(s: &ClusterSettings, api: SocketAddr) -> Result<ClusterConfig, NodeError> {
    let mut gossip_listen = s.gossip_listen;
    if gossip_listen.port() == 0 {
        let probe = std::net::UdpSocket::bind(gossip_listen).map_err(|source| NodeError::Bind {
            what: "gossip_listen",
            addr: gossip_listen,
            source,
        })?;
        gossip_listen = probe.local_addr().map_err(|source| NodeError::Bind {
            what: "gossip_listen",
            addr: gossip_listen,
            source,
        })?;
    }
    let gossip_advertise = match &s.gossip_advertise {
        None => gossip_listen,
        Some(name) => tokio::net::lookup_host(name.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                NodeError::Cluster(format!("gossip_advertise: cannot resolve {name}"))
            })?,
    };
    let api_advertise = match &s.api_advertise {
        Some(a) => a.clone(),
        None if api.ip().is_unspecified() => {
            SocketAddr::new(gossip_advertise.ip(), api.port()).to_string()
        }
        None => api.to_string(),
    };
    Ok(ClusterConfig {
        cluster_id: s.cluster_id.clone(),
        node_name: s.node_name.clone(),
        region: s.region.clone(),
        zone: s.zone.clone(),
        gossip_listen,
        gossip_advertise,
        api_advertise,
        seeds: s.seeds.clone(),
        secret: s.secret.clone(),
        gossip_interval: s.gossip_interval,
        phi_threshold: s.phi_threshold,
        max_heartbeat_interval: s.max_heartbeat_interval,
        dead_node_grace: s.dead_node_grace,
        anti_entropy_interval: s.anti_entropy_interval,
        tombstone_grace: s.tombstone_grace,
    })
}

/// Applies a commit's host and certificate changes to the SNI table. Only
/// changed certificates are opened, so each is decrypted once per
/// version, and the cost of a write does not grow with the number stored.
fn apply_tls_changes(table: &mut CertTable, changes: &Changes, data_key: &DataKey) {
    for c in &changes.certs {
        let new = c.new.as_ref().and_then(|new| {
            let unchanged = c.old.as_ref().is_some_and(|old| {
                old.version == new.version && old.key_sealed == new.key_sealed
            });
            if let Some(key) = table.key(&new.id).filter(|_| unchanged) {
                return Some((&**new, key.clone()));
            }
            match new.certified_key(data_key) {
                Ok(key) => Some((&**new, key)),
                Err(e) => {
                    tracing::error!(cert = %new.id, error = %e, "certificate cannot be used; its names get no TLS");
                    None
                }
            }
        });
        table.set_cert(c.old.as_deref(), new);
    }
    fn names(h: &Option<Arc<ProxyHost>>) -> Option<HostNames<'_>> {
        h.as_deref().filter(|h| h.enabled).map(|h| HostNames {
            domains: &h.domains,
            cert_id: &h.cert_id,
        })
    }
    for c in &changes.hosts {
        table.set_host(&c.id, names(&c.old), names(&c.new));
    }
}

/// `/metrics`: counters from the proxy plus gauges read at scrape time.
fn metrics_renderer(
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    cluster: Arc<Cluster>,
    drainer: Arc<Drainer>,
    store: Arc<Store>,
    gate: Arc<api::WriteGate>,
) -> admin::MetricsFn {
    Arc::new(move || {
        let (metrics, proxy, cluster, drainer) = (
            metrics.clone(),
            proxy.clone(),
            cluster.clone(),
            drainer.clone(),
        );
        let (store, gate) = (store.clone(), gate.clone());
        Box::pin(async move {
            let mut by_host: std::collections::BTreeMap<String, u64> = Default::default();
            for t in proxy.tunnels.list() {
                *by_host.entry(t.host_name.to_string()).or_default() += 1;
            }
            let members = cluster.members().await;
            let live = members.iter().filter(|m| m.live).count() as u64;
            let gauges = Gauges {
                http_connections: proxy.http_connections() as u64,
                tunnels_by_host: by_host.into_iter().collect(),
                members_by_state: vec![
                    ("live".into(), live),
                    ("dead".into(), members.len() as u64 - live),
                ],
                config_lag: members.iter().map(|m| (m.name.clone(), m.lag)).collect(),
                drain_state: match drainer.state().borrow().phase {
                    Phase::Serving => 0,
                    Phase::Draining => 1,
                    Phase::Drained => 2,
                },
                name_conflicts: store.snapshot().names.conflict_count() as u64,
                catching_up: u64::from(!gate.is_open()),
            };
            let mut out = metrics.render(&gauges);
            out.push_str(&proxy.upstream_metrics());
            out.push_str(&crate::acme::metrics::render(
                &store.snapshot(),
                crate::util::wall_ms(),
            ));
            out
        })
    })
}

/// Closes the write gate while the node resyncs after a pause (see
/// [`api::WriteGate::watch`]).
async fn watch_for_pauses(gate: Arc<api::WriteGate>, cluster: Arc<Cluster>) {
    gate.watch(|| cluster.resync()).await;
}

/// Binds the proxy's HTTP and HTTPS listeners, one of each per worker
/// (`SO_REUSEPORT`), naming the setting of an address that cannot be had.
fn bind_proxy(config: &Config, workers: usize) -> Result<Listeners, NodeError> {
    let group = |what, addr| {
        crate::workers::bind_group(addr, workers).map_err(|source| NodeError::Bind {
            what,
            addr,
            source,
        })
    };
    Ok(Listeners {
        http: group("http_listen", config.http_listen)?,
        https: group("https_listen", config.https_listen)?,
    })
}

/// Runs a node until `shutdown` resolves, then stops accepting, lets open
/// requests finish within the configured grace, and returns. The proxy
/// runs on `workers` threads of its own ([`crate::workers`]); everything
/// else (store, cluster, API, ACME, admin) on the runtime calling this.
pub async fn run(
    config: Config,
    workers: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let store = Arc::new(Store::open(&dir)?);
    // Only the process holding the store lock may touch the listen file.
    let _ = std::fs::remove_file(dir.join(LISTEN_FILE));
    let auth = Auth::load_or_create(&dir, config.admin_token.as_deref())?;
    let secret = config.cluster.secret.as_deref();
    let data_key = Arc::new(match secret {
        Some(secret)
            if config.encryption_key.is_none()
                && !dir.join(crate::tls::seal::KEY_FILE).exists() =>
        {
            DataKey::from_cluster_secret(secret)
        }
        _ => DataKey::load_or_create(&dir, config.encryption_key.as_deref())?,
    });

    let listeners = bind_proxy(&config, workers)?;
    let workers = Arc::new(Workers::start(workers).map_err(NodeError::Workers)?);
    let api_l = bind("api_listen", config.api_listen).await?;
    let admin_l = bind("admin_listen", config.admin_listen).await?;
    let local = |l: &TcpListener| l.local_addr().expect("bound socket has an address");
    let cluster_config = cluster_config(&config.cluster, local(&api_l)).await?;
    let [http, https] = listeners.addrs().map_err(|source| NodeError::Bind {
        what: "http_listen",
        addr: config.http_listen,
        source,
    })?;
    let bound = Bound {
        gossip: cluster_config.gossip_listen,
        http,
        https,
        api: local(&api_l),
        admin: local(&admin_l),
    };

    // Route and certificate tables first: the proxy must know every stored
    // host and certificate before the node says it is ready.
    let mut proxy_config = config.proxy.clone();
    proxy_config.https_port = bound.https.port();
    let proxy = Proxy::new(proxy_config);
    let metrics = Arc::new(Metrics::default());
    let access_log = AccessLog::new(
        &config.cluster.node_name,
        config.access_log.clone(),
        metrics.clone(),
    )
    .map_err(|source| NodeError::AccessLog {
        sink: format!("{:?}", config.access_log),
        source,
    })?;
    let tracing = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let t = Tracing::start(
                endpoint,
                NodeFacts {
                    node_name: &config.cluster.node_name,
                    node_id: store.node_id(),
                    region: &config.cluster.region,
                },
                metrics.clone(),
            )
            .map_err(NodeError::Tracing)?;
            tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
            Some(t)
        }
    };
    let telemetry = Arc::new(Telemetry {
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        tracing,
    });
    proxy.set_telemetry(telemetry.clone());
    let tls = TlsTerminator::new();
    {
        let (proxy, tls, data_key) = (proxy.clone(), tls.clone(), data_key.clone());
        let auth = auth.clone();
        let acme_directory = config.acme.as_ref().map(|a| a.directory.clone());
        store.subscribe(move |snap, changes| {
            if changes.acme {
                crate::acme::publish(snap, acme_directory.as_deref(), &data_key, &tls);
            }
            auth.apply_tokens(&changes.tokens);
            proxy.apply_acls(&changes.acls);
            // Only routed hosts reach the tables: each domain goes to the
            // one host that holds it (store::names).
            proxy.apply_hosts(&changes.hosts);
            if !changes.hosts.is_empty() || !changes.certs.is_empty() {
                tls.update(|table| apply_tls_changes(table, changes, &data_key));
            }
        });
    }
    let cluster = Cluster::start(cluster_config, store.clone(), &UdpTransport, None)
        .await
        .map_err(|e| NodeError::Cluster(format!("{e:#}")))?;
    spawn_rate_exchange(proxy.clone(), cluster.clone());
    crate::api::tokens::register_admin_token(&store, &config.cluster.node_name, auth.admin_hash())?;
    write_listen_file(&dir, &bound)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let health = Arc::new(Health::default());
    let drainer = Drainer::new(
        proxy.clone(),
        tls,
        health.clone(),
        cluster.clone(),
        config.drain,
        config.shutdown_grace,
        workers.clone(),
        listeners,
    );
    // This node's drain record, as the store has it.
    let (drain_tx, drain_rx) = watch::channel(None);
    {
        let me = store.node_id().to_string();
        store.subscribe(move |snap, changes| {
            if changes.drains.is_empty() {
                return;
            }
            let mine = snap.drains.get(&me).cloned();
            drain_tx.send_if_modified(|cur| {
                if *cur != mine {
                    *cur = mine;
                    true
                } else {
                    false
                }
            });
        });
    }
    let gate = Arc::new(api::WriteGate::default());
    let render = metrics_renderer(
        metrics,
        proxy.clone(),
        cluster.clone(),
        drainer.clone(),
        store.clone(),
        gate.clone(),
    );
    let local_drain = {
        let (d, a) = (drainer.clone(), auth.clone());
        admin::LocalDrain {
            start: Arc::new(move || d.drain_locally()),
            authorize: Arc::new(move |token| a.accepts(token)),
        }
    };
    let admin_task = tokio::spawn(admin::serve(
        admin_l,
        health.clone(),
        Some(render),
        Some(local_drain),
        stopped(),
    ));
    let api_task = tokio::spawn(api::serve(
        api_l,
        api::Deps {
            store: store.clone(),
            auth,
            data_key: data_key.clone(),
            cluster: cluster.clone(),
            drain_defaults: config.drain,
            access_log,
            proxy: proxy.clone(),
            gate: gate.clone(),
        },
        stopped(),
    ));
    // Catch up with the cluster first, then take writes, and be ready
    // unless this node starts drained (the drain outlives restarts).
    cluster.catch_up(config.cluster.catch_up_timeout).await;
    gate.open();
    let watchdog = tokio::spawn(watch_for_pauses(gate.clone(), cluster.clone()));
    health.set_ready(drain_rx.borrow().is_none());
    // Automatic certificates start after the catch-up, so a node that was
    // away sees the cluster's orders and leases before it orders anything.
    let acme_task = config.acme.clone().map(|settings| {
        let manager = crate::acme::manager::Manager::new(crate::acme::client::Ctx {
            settings,
            store: store.clone(),
            key: data_key.clone(),
            cluster: cluster.clone(),
            node_name: config.cluster.node_name.clone(),
        });
        tokio::spawn(manager.run(stopped()))
    });
    tracing::info!(
        node_id = store.node_id(),
        http = %bound.http,
        https = %bound.https,
        api = %bound.api,
        admin = %bound.admin,
        data_dir = %dir.display(),
        hosts = store.hosts().len(),
        "charon-node ready"
    );

    // Serves, drains on request, and returns once SIGTERM's drain is done.
    drainer.clone().run(drain_rx, shutdown).await;
    watchdog.abort();
    let _ = stop_tx.send(true);
    // Idle API clients (a CLI, a peer's channel) must not hold the exit.
    match tokio::time::timeout(std::time::Duration::from_secs(2), api_task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "API server ended with an error"),
        Err(_) => tracing::info!("API connections still open at exit; closing them"),
        _ => {}
    }
    let _ = admin_task.await;
    if let Some(t) = acme_task {
        let _ = t.await;
    }
    cluster.shutdown().await;
    // Whatever the grace left open ends with its worker.
    workers.stop();
    if let Some(t) = &telemetry.tracing {
        t.shutdown();
    }
    let _ = std::fs::remove_file(dir.join(LISTEN_FILE));
    tracing::info!("stopped");
    Ok(())
}

/// Cluster-scope rate limits: every 250 ms, this node's admissions of its
/// busiest clients go into its gossip keys and the other nodes' are
/// charged here (see `proxy::rate`). Cheap when no host has a limit: an
/// empty value, set once.
fn spawn_rate_exchange(proxy: Arc<crate::proxy::Proxy>, cluster: Arc<Cluster>) {
    use crate::cluster::gossip::{decode_rate, encode_rate};
    tokio::spawn(async move {
        // The publish interval; gossip adds about one round (200 ms).
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mine = encode_rate(&proxy.rates.hot());
            for (peer, value) in cluster.rate_exchange(&mine).await {
                proxy.rates.charge(&peer, &decode_rate(&value));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{cert_key, host_key, name_key, Body, NameClaim, Record};
    use crate::tls::cert::parse_and_validate;
    use crate::tls::cert::test_certs::{ca, leaf};
    use std::sync::Mutex;

    /// Two hosts list one domain (accepted concurrently on two nodes), each
    /// pinning its own certificate: TLS answers with the holder's pin, as
    /// the claim moves and as the holder goes, and the table kept by
    /// change equals one applied from the final state at once.
    #[test]
    fn sni_follows_the_holder_of_a_contested_domain() {
        let dk = DataKey::from_bytes([7; 32]);
        let ca = ca("CA");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let table = Arc::new(Mutex::new(CertTable::default()));
        let (t2, dk2) = (table.clone(), DataKey::from_bytes([7; 32]));
        store.subscribe(move |_, ch| apply_tls_changes(&mut t2.lock().unwrap(), ch, &dk2));
        let mut hlc = 0;
        let mut apply = |key: String, body: Option<Body>| {
            hlc += 1;
            let rec = Record {
                hlc,
                origin: "n".into(),
                seq: hlc,
                body,
            };
            store.apply(vec![(key, rec)]).unwrap();
        };
        for id in ["ca", "cb"] {
            let (c, k) = leaf(&ca, &["x.test"], None);
            let mut s = parse_and_validate(&c, &k, crate::util::wall_ms())
                .unwrap()
                .meta;
            s.id = id.into();
            s.seal_key(&dk, &k);
            apply(cert_key(id), Some(Body::Cert(s)));
        }
        let host = |id: &str, cert: &str| {
            Body::Host(ProxyHost {
                id: id.into(),
                domains: vec!["x.test".into()],
                upstreams: vec!["http://127.0.0.1:1".into()],
                enabled: true,
                cert_id: cert.into(),
                ..Default::default()
            })
        };
        let claim = |id: &str| {
            Some(Body::Claim(NameClaim {
                domain: "x.test".into(),
                host_id: id.into(),
            }))
        };
        let serves = |want: &str| {
            let t = table.lock().unwrap();
            let got = t.resolve("x.test").expect("x.test resolves");
            assert!(Arc::ptr_eq(&got, t.key(want).unwrap()), "{want} expected");
        };
        apply(host_key("a"), Some(host("a", "ca")));
        apply(host_key("b"), Some(host("b", "cb")));
        serves("ca"); // no claim: the smallest id holds it
        apply(name_key("x.test"), claim("b"));
        serves("cb");
        apply(name_key("x.test"), claim("a"));
        serves("ca");
        apply(host_key("a"), None);
        serves("cb");
        let mut fresh = CertTable::default();
        apply_tls_changes(&mut fresh, &Changes::everything(&store.snapshot()), &dk);
        let t = table.lock().unwrap();
        let key = |t: &CertTable| t.resolve("x.test").map(|k| k.cert.clone());
        assert_eq!(key(&t), key(&fresh));
    }
}
