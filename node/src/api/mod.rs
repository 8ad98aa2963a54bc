//! The gRPC management API (`charon.v1`), served with tonic.
//!
//! Handlers translate between protobuf and domain types, validate, and hand
//! writes to [`crate::store::Store::transact`]. Internal errors are logged
//! here and turned into statuses a client can act on.

pub mod auth;
pub mod certs;
pub mod hosts;

use std::future::Future;
use std::sync::Arc;

use charon_proto::v1::certificates_server::CertificatesServer;
use charon_proto::v1::hosts_server::HostsServer;
use tokio::net::TcpListener;

use crate::store::Store;
use crate::tls::seal::DataKey;
use auth::Auth;

/// Runs a store transaction off the async runtime (a commit waits for
/// fsync) and turns its error into a status.
async fn transact<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&crate::store::View<'_>) -> Result<(Vec<crate::store::Write>, T), hosts::HostsError>
        + Send
        + 'static,
) -> Result<T, tonic::Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.transact(f))
        .await
        .map_err(|e| tonic::Status::internal(format!("store task failed: {e}")))?
        .map_err(tonic::Status::from)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    auth: Auth,
    data_key: Arc<DataKey>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let hosts_auth = auth.clone();
    let hosts = HostsServer::with_interceptor(hosts::HostsApi::new(store.clone()), move |req| {
        hosts_auth.check(req)
    });
    let certs =
        CertificatesServer::with_interceptor(certs::CertsApi::new(store, data_key), move |req| {
            auth.check(req)
        });
    tonic::transport::Server::builder()
        .add_service(hosts)
        .add_service(certs)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
