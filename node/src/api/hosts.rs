//! `charon.v1.Hosts`: create, read, update and delete proxy hosts.

use std::sync::Arc;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::host::{Location, ProxyHost};
use crate::store::{host_key, Body, Store, StoreError, View, Write};
use crate::util::wall_ms;
use crate::validate::FieldError;

/// Why a host call failed; converted to a status at the boundary.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("domain {domain:?} is already used by host {host_id} ({host_name})")]
    DomainTaken {
        domain: String,
        host_id: String,
        host_name: String,
    },
    #[error("no host with id or domain {0:?}")]
    NotFound(String),
    /// Not found, for other kinds of record; the message says what.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Exists(String),
    #[error("host {id} is at version {actual}, not {expected}: it was changed meanwhile; re-read it and retry")]
    VersionMismatch {
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<HostsError> for Status {
    fn from(e: HostsError) -> Status {
        match e {
            HostsError::Invalid(f) => Status::invalid_argument(f.to_string()),
            e @ HostsError::DomainTaken { .. } => Status::already_exists(e.to_string()),
            e @ (HostsError::NotFound(_) | HostsError::Missing(_)) => {
                Status::not_found(e.to_string())
            }
            e @ HostsError::Exists(_) => Status::already_exists(e.to_string()),
            e @ HostsError::VersionMismatch { .. } => Status::failed_precondition(e.to_string()),
            HostsError::Store(e) => {
                tracing::error!(error = %e, "store write failed");
                Status::internal("the node could not write to its store; nothing was changed (see the node's log)")
            }
        }
    }
}

pub struct HostsApi {
    store: Arc<Store>,
}

impl HostsApi {
    pub fn new(store: Arc<Store>) -> Self {
        HostsApi { store }
    }

    async fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), HostsError> + Send + 'static,
    ) -> Result<(T, Option<crate::store::Stamp>), Status> {
        super::transact(&self.store, f).await
    }
}

fn require_field(field: &str, value: &str) -> Result<(), HostsError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "is required").into());
    }
    Ok(())
}

/// Domains must be unique across hosts; `except` is the host being updated.
fn check_domains_free(view: &View<'_>, host: &ProxyHost) -> Result<(), HostsError> {
    for other in view.hosts().iter().filter(|o| o.id != host.id) {
        if let Some(d) = host.domains.iter().find(|d| other.domains.contains(d)) {
            return Err(HostsError::DomainTaken {
                domain: d.clone(),
                host_id: other.id.clone(),
                host_name: other.name.clone(),
            });
        }
    }
    Ok(())
}

/// A pinned certificate must exist (deleting a pinned one is refused).
fn check_cert_exists(view: &View<'_>, host: &ProxyHost) -> Result<(), HostsError> {
    if !host.cert_id.is_empty() && view.find_cert(&host.cert_id).is_none() {
        return Err(FieldError::new(
            "cert_id",
            format!("no certificate with id {:?}", host.cert_id),
        )
        .into());
    }
    Ok(())
}

fn new_id(view: &View<'_>) -> String {
    loop {
        let id = format!("h-{}", hex::encode(rand::random::<[u8; 5]>()));
        if view.find_host(&id).is_none() {
            return id;
        }
    }
}

fn put(host: ProxyHost) -> Write {
    Write {
        key: host_key(&host.id),
        body: Some(Body::Host(host)),
    }
}

fn locations_from_pb(list: Vec<pb::Location>) -> Vec<Location> {
    list.into_iter()
        .map(|l| Location {
            path_prefix: l.path_prefix,
            upstreams: l.upstreams,
        })
        .collect()
}

pub fn host_to_pb(h: &ProxyHost) -> pb::ProxyHost {
    pb::ProxyHost {
        id: h.id.clone(),
        name: h.name.clone(),
        domains: h.domains.clone(),
        upstreams: h.upstreams.clone(),
        enabled: h.enabled,
        websocket: h.websocket,
        preserve_host: h.preserve_host,
        forwarded_headers: h.forwarded_headers,
        locations: h
            .locations
            .iter()
            .map(|l| pb::Location {
                path_prefix: l.path_prefix.clone(),
                upstreams: l.upstreams.clone(),
            })
            .collect(),
        ws_idle_timeout_secs: h.ws_idle_timeout_secs,
        ws_ping_interval_secs: h.ws_ping_interval_secs,
        upstream_timeout_ms: h.upstream_timeout_ms,
        created_at_ms: h.created_at_ms,
        updated_at_ms: h.updated_at_ms,
        version: h.version,
        cert_id: h.cert_id.clone(),
        force_https: h.force_https,
        hsts_max_age_secs: h.hsts_max_age_secs,
        hsts_include_subdomains: h.hsts_include_subdomains,
        upstream_ca_pem: h.upstream_ca_pem.clone(),
        upstream_insecure_skip_verify: h.upstream_insecure_skip_verify,
        no_acme: h.no_acme,
    }
}

#[tonic::async_trait]
impl pb::hosts_server::Hosts for HostsApi {
    async fn create_host(
        &self,
        req: Request<pb::CreateHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let req = req.into_inner();
        let h = req
            .host
            .ok_or_else(|| Status::invalid_argument("host: is required"))?;
        let now = wall_ms();
        let mut host = ProxyHost {
            id: String::new(),
            name: h.name,
            domains: h.domains,
            upstreams: h.upstreams,
            enabled: req.enabled.unwrap_or(true),
            websocket: req.websocket.unwrap_or(true),
            preserve_host: req.preserve_host.unwrap_or(true),
            forwarded_headers: req.forwarded_headers.unwrap_or(true),
            locations: locations_from_pb(h.locations),
            ws_idle_timeout_secs: h.ws_idle_timeout_secs,
            ws_ping_interval_secs: h.ws_ping_interval_secs,
            upstream_timeout_ms: h.upstream_timeout_ms,
            created_at_ms: now,
            updated_at_ms: now,
            version: 1,
            cert_id: h.cert_id,
            force_https: h.force_https,
            hsts_max_age_secs: h.hsts_max_age_secs,
            hsts_include_subdomains: h.hsts_include_subdomains,
            upstream_ca_pem: h.upstream_ca_pem,
            upstream_insecure_skip_verify: h.upstream_insecure_skip_verify,
            no_acme: h.no_acme,
        };
        host.normalize_and_validate().map_err(HostsError::from)?;
        let (created, stamp) = self
            .transact(move |view| {
                host.id = new_id(view);
                check_domains_free(view, &host)?;
                check_cert_exists(view, &host)?;
                Ok((vec![put(host.clone())], host))
            })
            .await?;
        tracing::info!(host_id = %created.id, domains = ?created.domains, "host created");
        Ok(super::stamped(host_to_pb(&created), stamp))
    }

    async fn get_host(
        &self,
        req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let key = req.into_inner().id_or_domain;
        require_field("id_or_domain", &key)?;
        let found = self.transact(move |view| {
            let h = view
                .find_host(&key)
                .map(|h| (**h).clone())
                .ok_or(HostsError::NotFound(key))?;
            Ok((vec![], h))
        });
        Ok(Response::new(host_to_pb(&found.await?.0)))
    }

    async fn list_hosts(
        &self,
        _req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let mut hosts: Vec<pb::ProxyHost> =
            self.store.hosts().iter().map(|h| host_to_pb(h)).collect();
        hosts.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn update_host(
        &self,
        req: Request<pb::UpdateHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let r = req.into_inner();
        require_field("id_or_domain", &r.id_or_domain)?;
        let (updated, stamp) = self
            .transact(move |view| {
                let current = view
                    .find_host(&r.id_or_domain)
                    .ok_or_else(|| HostsError::NotFound(r.id_or_domain.clone()))?;
                if let Some(expected) = r.expected_version {
                    if expected != current.version {
                        return Err(HostsError::VersionMismatch {
                            id: current.id.clone(),
                            expected,
                            actual: current.version,
                        });
                    }
                }
                let mut h = (**current).clone();
                if let Some(v) = r.name {
                    h.name = v;
                }
                if let Some(v) = r.domains {
                    h.domains = v.values;
                }
                if let Some(v) = r.upstreams {
                    h.upstreams = v.values;
                }
                if let Some(v) = r.locations {
                    h.locations = locations_from_pb(v.values);
                }
                h.enabled = r.enabled.unwrap_or(h.enabled);
                h.websocket = r.websocket.unwrap_or(h.websocket);
                h.preserve_host = r.preserve_host.unwrap_or(h.preserve_host);
                h.forwarded_headers = r.forwarded_headers.unwrap_or(h.forwarded_headers);
                h.ws_idle_timeout_secs = r.ws_idle_timeout_secs.unwrap_or(h.ws_idle_timeout_secs);
                h.ws_ping_interval_secs =
                    r.ws_ping_interval_secs.unwrap_or(h.ws_ping_interval_secs);
                h.upstream_timeout_ms = r.upstream_timeout_ms.unwrap_or(h.upstream_timeout_ms);
                h.cert_id = r.cert_id.unwrap_or(h.cert_id);
                h.force_https = r.force_https.unwrap_or(h.force_https);
                h.hsts_max_age_secs = r.hsts_max_age_secs.unwrap_or(h.hsts_max_age_secs);
                h.hsts_include_subdomains = r
                    .hsts_include_subdomains
                    .unwrap_or(h.hsts_include_subdomains);
                h.upstream_ca_pem = r.upstream_ca_pem.unwrap_or(h.upstream_ca_pem);
                h.upstream_insecure_skip_verify = r
                    .upstream_insecure_skip_verify
                    .unwrap_or(h.upstream_insecure_skip_verify);
                h.no_acme = r.no_acme.unwrap_or(h.no_acme);
                h.normalize_and_validate()?;
                check_domains_free(view, &h)?;
                check_cert_exists(view, &h)?;
                if h == **current {
                    // Nothing changed: no write, no new version.
                    return Ok((vec![], h));
                }
                h.version += 1;
                h.updated_at_ms = wall_ms().max(h.updated_at_ms);
                Ok((vec![put(h.clone())], h))
            })
            .await?;
        tracing::info!(host_id = %updated.id, version = updated.version, "host updated");
        Ok(super::stamped(host_to_pb(&updated), stamp))
    }

    async fn delete_host(
        &self,
        req: Request<pb::DeleteHostRequest>,
    ) -> Result<Response<pb::DeleteHostResponse>, Status> {
        let key = req.into_inner().id_or_domain;
        require_field("id_or_domain", &key)?;
        let (id, stamp) = self
            .transact(move |view| {
                let h = view
                    .find_host(&key)
                    .ok_or(HostsError::NotFound(key.clone()))?;
                let id = h.id.clone();
                Ok((
                    vec![Write {
                        key: host_key(&id),
                        body: None,
                    }],
                    id,
                ))
            })
            .await?;
        tracing::info!(host_id = %id, "host deleted");
        Ok(super::stamped(pb::DeleteHostResponse { id }, stamp))
    }
}
