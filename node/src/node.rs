//! Wiring: one function that takes a validated [`Config`], opens the store,
//! builds the route table, binds the listeners, serves until shutdown, and
//! shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Health};
use crate::api::{self, auth::Auth, auth::AuthError};
use crate::config::Config;
use crate::proxy::Proxy;
use crate::store::{Store, StoreError};

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
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
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
    pub http: SocketAddr,
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
    let json = serde_json::json!({ "http": b.http, "api": b.api, "admin": b.admin });
    let err = |source| NodeError::ListenFile {
        path: path.clone(),
        source,
    };
    std::fs::write(&tmp, format!("{json}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Runs a node until `shutdown` resolves, then stops accepting, lets open
/// requests finish within the configured grace, and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let store = Arc::new(Store::open(&dir)?);
    // Only the process holding the store lock may touch the listen file.
    let _ = std::fs::remove_file(dir.join(LISTEN_FILE));
    let auth = Auth::load_or_create(&dir, config.admin_token.as_deref())?;

    // Route table first: the proxy must know every stored host before the
    // node says it is ready.
    let proxy = Proxy::new(config.proxy.clone());
    {
        let proxy = proxy.clone();
        store.subscribe(move |hosts| proxy.publish(hosts));
    }

    let http = bind("http_listen", config.http_listen).await?;
    let api_l = bind("api_listen", config.api_listen).await?;
    let admin_l = bind("admin_listen", config.admin_listen).await?;
    let local = |l: &TcpListener| l.local_addr().expect("bound socket has an address");
    let bound = Bound {
        http: local(&http),
        api: local(&api_l),
        admin: local(&admin_l),
    };
    write_listen_file(&dir, &bound)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let health = Arc::new(Health::default());
    let admin_task = tokio::spawn(admin::serve(admin_l, health.clone(), stopped()));
    let api_task = tokio::spawn(api::serve(api_l, store.clone(), auth, stopped()));
    let proxy_task = tokio::spawn(proxy.clone().serve(http, stopped(), config.shutdown_grace));
    health.set_ready(true);
    tracing::info!(
        node_id = store.node_id(),
        http = %bound.http,
        api = %bound.api,
        admin = %bound.admin,
        data_dir = %dir.display(),
        hosts = store.hosts().len(),
        "charon-node ready"
    );

    shutdown.await;
    tracing::info!(
        "shutting down: no new connections; open requests get {:?}",
        config.shutdown_grace
    );
    health.set_ready(false);
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!(error = %e, "API server ended with an error");
    }
    let _ = admin_task.await;
    let open = proxy.tunnels.len();
    if open > 0 {
        tracing::warn!(
            tunnels = open,
            "closing WebSocket tunnels still open at exit"
        );
    }
    let _ = std::fs::remove_file(dir.join(LISTEN_FILE));
    tracing::info!("stopped");
    Ok(())
}
