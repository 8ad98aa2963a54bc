//! The gRPC management API (`charon.v1`), served with tonic.
//!
//! Handlers translate between protobuf and domain types, validate, and hand
//! writes to [`crate::store::Store::transact`]. Internal errors are logged
//! here and turned into statuses a client can act on.

pub mod access;
pub mod auth;
pub mod balance;
pub mod balance_pb;
pub mod certs;
pub mod cluster;
pub mod hosts;
pub mod nodes;
pub mod observe;
pub mod tokens;
pub mod writes;

use std::future::Future;
use std::sync::Arc;

use charon_proto::v1::access_lists_server::AccessListsServer;
use charon_proto::v1::certificates_server::CertificatesServer;
use charon_proto::v1::cluster_server::ClusterServer;
use charon_proto::v1::hosts_server::HostsServer;
use charon_proto::v1::logs_server::LogsServer;
use charon_proto::v1::nodes_server::NodesServer;
use charon_proto::v1::tokens_server::TokensServer;
use charon_proto::v1::tunnels_server::TunnelsServer;
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::store::{Stamp, Store};
use crate::tls::seal::DataKey;
use auth::Auth;
pub use writes::{WriteCtx, WriteGate};

/// The write context of a request (read before the handler takes its body).
fn write_ctx<M>(req: &tonic::Request<M>, gate: &WriteGate) -> Result<WriteCtx, tonic::Status> {
    WriteCtx::from_metadata(req.metadata(), gate)
}

/// Runs a store transaction off the async runtime (a commit waits for
/// fsync) and turns its error into a status. Also returns where the write
/// landed, for [`stamped`]. A transaction that writes is refused under the
/// store lock, right before its commit, when `ctx` says the node has not
/// caught up or the client's deadline has passed (see [`writes`]).
async fn transact<T: Send + 'static>(
    store: &Arc<Store>,
    ctx: WriteCtx,
    f: impl FnOnce(&crate::store::View<'_>) -> Result<(Vec<crate::store::Write>, T), hosts::HostsError>
        + Send
        + 'static,
) -> Result<(T, Option<Stamp>), tonic::Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store.transact_stamped(|view| {
            let (writes, out) = f(view)?;
            if !writes.is_empty() {
                ctx.check()?;
            }
            Ok::<_, hosts::HostsError>((writes, out))
        })
    })
    .await
    .map_err(|e| tonic::Status::internal(format!("store task failed: {e}")))?
    .map_err(tonic::Status::from)
}

/// Response metadata naming the version of a write: `charonctl --wait`
/// (or any client) hands it to `Cluster.WaitForWrite`.
pub const WRITE_ORIGIN_HEADER: &str = "charon-write-origin";
pub const WRITE_SEQ_HEADER: &str = "charon-write-seq";

fn stamped<M>(msg: M, stamp: Option<Stamp>) -> tonic::Response<M> {
    let mut resp = tonic::Response::new(msg);
    if let Some(s) = stamp {
        let md = resp.metadata_mut();
        if let Ok(v) = s.origin.parse() {
            md.insert(WRITE_ORIGIN_HEADER, v);
        }
        if let Ok(v) = s.seq.to_string().parse() {
            md.insert(WRITE_SEQ_HEADER, v);
        }
    }
    resp
}

/// What the API services work with.
pub struct Deps {
    pub store: Arc<Store>,
    pub auth: Auth,
    pub data_key: Arc<DataKey>,
    pub cluster: Arc<Cluster>,
    pub drain_defaults: crate::config::DrainSettings,
    pub access_log: Arc<crate::telemetry::AccessLog>,
    pub proxy: Arc<crate::proxy::Proxy>,
    /// Opened once the node has caught up after start.
    pub gate: Arc<WriteGate>,
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let Deps {
        store,
        auth,
        data_key,
        cluster,
        drain_defaults,
        access_log,
        proxy,
        gate,
    } = deps;
    let logs_auth = auth.clone();
    let logs = LogsServer::with_interceptor(observe::LogsApi::new(access_log), move |req| {
        logs_auth.check(req)
    });
    let tunnels_auth = auth.clone();
    let tunnels_api = TunnelsServer::with_interceptor(
        observe::TunnelsApi::new(proxy.clone(), cluster.config().node_name.clone()),
        move |req| tunnels_auth.check(req),
    );
    let nodes_auth = auth.clone();
    let nodes = NodesServer::with_interceptor(
        nodes::NodesApi::new(store.clone(), cluster.clone(), drain_defaults, gate.clone()),
        move |req| nodes_auth.check(req),
    );
    let cluster_auth = auth.clone();
    let cluster_api = ClusterServer::with_interceptor(
        cluster::ClusterApi::new(cluster.clone(), store.clone(), gate.clone()),
        move |req| cluster_auth.check(req),
    );
    let sync = cluster.sync_server();
    let tokens_auth = auth.clone();
    let tokens = TokensServer::with_interceptor(
        tokens::TokensApi::new(
            store.clone(),
            cluster.config().node_name.clone(),
            gate.clone(),
        ),
        move |req| tokens_auth.check(req),
    );
    let access_auth = auth.clone();
    let access_api = AccessListsServer::with_interceptor(
        access::AccessApi::new(store.clone(), gate.clone()),
        move |req| access_auth.check(req),
    );
    let hosts_auth = auth.clone();
    let hosts = HostsServer::with_interceptor(
        hosts::HostsApi::new(store.clone(), gate.clone()),
        move |req| hosts_auth.check(req),
    );
    let balance_auth = auth.clone();
    let balance = charon_proto::v1::balance_server::BalanceServer::with_interceptor(
        balance::BalanceApi::new(
            store.clone(),
            proxy.clone(),
            gate.clone(),
            (
                cluster.node_id().to_string(),
                cluster.config().node_name.clone(),
            ),
        ),
        move |req| balance_auth.check(req),
    );
    let certs = CertificatesServer::with_interceptor(
        certs::CertsApi::new(store, data_key, gate),
        move |req| auth.check(req),
    );
    tonic::transport::Server::builder()
        .add_service(hosts)
        .add_service(certs)
        .add_service(cluster_api)
        .add_service(tokens)
        .add_service(nodes)
        .add_service(logs)
        .add_service(tunnels_api)
        .add_service(balance)
        .add_service(access_api)
        .add_service(sync)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
