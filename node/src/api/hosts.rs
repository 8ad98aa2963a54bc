//! `charon.v1.Hosts`: create, read, update and delete proxy hosts.

use std::sync::Arc;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::host::{Location, ProxyHost};
use crate::store::names::claim_writes;
use crate::store::{host_key, Body, Snapshot, Store, StoreError, View, Write};
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
    #[error(
        "host {loser} lost domain {domain:?} to host {holder_id} ({holder_name}) when both were \
         accepted at once on two nodes; drop the domain from one of them (charonctl host update \
         <id> --domain ...) or remove one of the hosts"
    )]
    Conflicted {
        domain: String,
        loser: String,
        holder_id: String,
        holder_name: String,
    },
    #[error("no host with id or domain {0:?}")]
    NotFound(String),
    /// Not found, for other kinds of record; the message says what.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Exists(String),
    /// A record others still refer to.
    #[error("{0}")]
    InUse(String),
    #[error("{what} {id} is at version {actual}, not {expected}: it was changed meanwhile; re-read it and retry")]
    VersionMismatch {
        what: &'static str,
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "this node has not caught up with the cluster since it started, so it takes no \
         writes yet (reads are served); retry in a second, or send the write to another node"
    )]
    CatchingUp,
    #[error(
        "the client's deadline passed before the write could be committed; nothing was written{0}"
    )]
    DeadlinePassed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<HostsError> for Status {
    fn from(e: HostsError) -> Status {
        match e {
            HostsError::Invalid(f) => Status::invalid_argument(f.to_string()),
            e @ (HostsError::DomainTaken { .. } | HostsError::Conflicted { .. }) => {
                Status::already_exists(e.to_string())
            }
            e @ (HostsError::NotFound(_) | HostsError::Missing(_)) => {
                Status::not_found(e.to_string())
            }
            e @ HostsError::Exists(_) => Status::already_exists(e.to_string()),
            e @ HostsError::InUse(_) => Status::failed_precondition(e.to_string()),
            e @ HostsError::VersionMismatch { .. } => Status::failed_precondition(e.to_string()),
            e @ HostsError::CatchingUp => Status::unavailable(e.to_string()),
            e @ HostsError::DeadlinePassed(_) => Status::deadline_exceeded(e.to_string()),
            HostsError::Store(e) => {
                tracing::error!(error = %e, "store write failed");
                Status::internal("the node could not write to its store; nothing was changed (see the node's log)")
            }
        }
    }
}

pub struct HostsApi {
    store: Arc<Store>,
    gate: Arc<super::WriteGate>,
}

impl HostsApi {
    pub fn new(store: Arc<Store>, gate: Arc<super::WriteGate>) -> Self {
        HostsApi { store, gate }
    }

    async fn transact<T: Send + 'static>(
        &self,
        ctx: super::WriteCtx,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), HostsError> + Send + 'static,
    ) -> Result<(T, Option<crate::store::Stamp>), Status> {
        super::transact(&self.store, ctx, f).await
    }
}

fn require_field(field: &str, value: &str) -> Result<(), HostsError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "is required").into());
    }
    Ok(())
}

/// Domains must be unique across hosts: each of `host`'s domains must be
/// free or held by `host` itself. `current` is the stored version of the
/// host being updated: a domain it already lists but lost in a concurrent
/// claim gets an error that says how to resolve the conflict.
fn check_domains_free(
    view: &View<'_>,
    host: &ProxyHost,
    current: Option<&ProxyHost>,
) -> Result<(), HostsError> {
    for d in &host.domains {
        let Some(holder) = view.names().holder(d).filter(|h| *h != host.id) else {
            continue;
        };
        let holder_name = view
            .find_host(holder)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        if current.is_some_and(|c| c.domains.contains(d)) {
            return Err(HostsError::Conflicted {
                domain: d.clone(),
                loser: host.id.clone(),
                holder_id: holder.to_string(),
                holder_name,
            });
        }
        return Err(HostsError::DomainTaken {
            domain: d.clone(),
            host_id: holder.to_string(),
            host_name: holder_name,
        });
    }
    Ok(())
}

/// The writes of putting `new` in place of `old` (or deleting `old`):
/// the host record (or its tombstone) and its domains' claims.
pub(super) fn host_writes(
    view: &View<'_>,
    old: Option<&ProxyHost>,
    new: Option<&ProxyHost>,
) -> Vec<Write> {
    let mut writes = match (new, old) {
        (Some(h), _) => vec![put(h.clone())],
        (None, Some(h)) => vec![Write {
            key: host_key(&h.id),
            body: None,
        }],
        (None, None) => vec![],
    };
    writes.extend(claim_writes(
        |d| view.names().claim(d).map(str::to_string),
        old,
        new,
    ));
    writes
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

/// Every access list the host names must exist: a typo would otherwise
/// lock every client out (an unknown list refuses all requests).
fn check_acls_exist(view: &View<'_>, host: &ProxyHost) -> Result<(), HostsError> {
    let acls = &view.snapshot().acls;
    let named = std::iter::once(("acl".to_string(), &host.acl)).chain(
        host.locations
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("locations[{i}].acl"), &l.acl)),
    );
    for (field, name) in named {
        if !name.is_empty() && acls.get(name).is_none() {
            return Err(FieldError::new(
                field,
                format!("no access list named {name:?} (charonctl acl list)"),
            )
            .into());
        }
    }
    Ok(())
}

/// A new host id. With an idempotency key the id is derived from it, so
/// that the same create retried on two nodes before they hear of each
/// other writes the same record (one host, merged last-writer-wins)
/// instead of two; unless that id was ever used (a tombstone counts).
fn new_id(view: &View<'_>, key: Option<&str>) -> String {
    if let Some(key) = key {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("charon-create-key\0{key}").as_bytes());
        let id = format!("h-{}", hex::encode(&digest[..5]));
        if view.record(&host_key(&id)).is_none() {
            return id;
        }
    }
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
            balancing: super::balance_pb::from_pb(l.balancing),
            acl: l.acl,
            rate_limit: l.rate_limit,
            rate_key: l.rate_key,
            rate_limit_scope: l.rate_limit_scope,
        })
        .collect()
}

/// `h` for the API; `snap` (when given) marks the domains it lost to
/// another host. O(log n + its conflicts).
pub fn host_to_pb(h: &ProxyHost, snap: Option<&Snapshot>) -> pb::ProxyHost {
    let conflicts = snap
        .into_iter()
        .flat_map(|s| {
            s.names.conflicts_of(&h.id).map(|c| pb::DomainConflict {
                holder_name: s
                    .hosts
                    .get(&c.holder)
                    .map(|o| o.name.clone())
                    .unwrap_or_default(),
                domain: c.domain,
                holder_id: c.holder,
            })
        })
        .collect();
    pb::ProxyHost {
        conflicts,
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
                balancing: super::balance_pb::to_pb(&l.balancing),
                acl: l.acl.clone(),
                rate_limit: l.rate_limit.clone(),
                rate_key: l.rate_key.clone(),
                rate_limit_scope: l.rate_limit_scope.clone(),
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
        balancing: super::balance_pb::to_pb(&h.balancing),
        acl: h.acl.clone(),
        redirect_to: h.redirect_to.clone(),
        redirect_code: h.redirect_code,
        redirect_keep_path: h.redirect_keep_path,
        rate_limit: h.rate_limit.clone(),
        rate_key: h.rate_key.clone(),
        rate_limit_scope: h.rate_limit_scope.clone(),
        max_conns_per_ip: h.max_conns_per_ip,
    }
}

#[tonic::async_trait]
impl pb::hosts_server::Hosts for HostsApi {
    async fn create_host(
        &self,
        req: Request<pb::CreateHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let key = ctx.key.clone();
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
            create_key: key.clone().unwrap_or_default(),
            no_acme: h.no_acme,
            balancing: super::balance_pb::from_pb(h.balancing),
            acl: h.acl,
            redirect_to: h.redirect_to,
            redirect_code: h.redirect_code,
            redirect_keep_path: h.redirect_keep_path,
            rate_limit: h.rate_limit,
            rate_key: h.rate_key,
            rate_limit_scope: h.rate_limit_scope,
            max_conns_per_ip: h.max_conns_per_ip,
        };
        host.normalize_and_validate().map_err(HostsError::from)?;
        let ((created, fresh), stamp) = self
            .transact(ctx, move |view| {
                // A retry of a create that already happened (here or on a
                // node that replicated it here) returns what it made.
                if let Some(k) = key.as_deref() {
                    if let Some(done) = view.snapshot().host_created_with(k) {
                        return Ok((vec![], ((**done).clone(), false)));
                    }
                }
                host.id = new_id(view, key.as_deref());
                check_domains_free(view, &host, None)?;
                check_cert_exists(view, &host)?;
                check_acls_exist(view, &host)?;
                Ok((host_writes(view, None, Some(&host)), (host, true)))
            })
            .await?;
        if fresh {
            tracing::info!(host_id = %created.id, domains = ?created.domains, "host created");
        } else {
            tracing::info!(host_id = %created.id, "create retried with the same idempotency key: nothing written");
        }
        // Just written (or found by its key): it holds its domains.
        Ok(super::stamped(host_to_pb(&created, None), stamp))
    }

    async fn get_host(
        &self,
        req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let key = req.into_inner().id_or_domain;
        require_field("id_or_domain", &key)?;
        let snap = self.store.snapshot();
        let h = crate::store::find_host(&snap, &key).ok_or(HostsError::NotFound(key))?;
        Ok(Response::new(host_to_pb(h, Some(&snap))))
    }

    async fn list_hosts(
        &self,
        _req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let snap = self.store.snapshot();
        let mut hosts: Vec<pb::ProxyHost> = snap
            .hosts
            .iter()
            .map(|h| host_to_pb(h, Some(&snap)))
            .collect();
        hosts.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn update_host(
        &self,
        req: Request<pb::UpdateHostRequest>,
    ) -> Result<Response<pb::ProxyHost>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        require_field("id_or_domain", &r.id_or_domain)?;
        let (updated, stamp) = self
            .transact(ctx, move |view| {
                let current = view
                    .find_host(&r.id_or_domain)
                    .ok_or_else(|| HostsError::NotFound(r.id_or_domain.clone()))?;
                if let Some(expected) = r.expected_version {
                    if expected != current.version {
                        return Err(HostsError::VersionMismatch {
                            what: "host",
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
                let upstreams_replaced = r.upstreams.is_some();
                if let Some(v) = r.upstreams {
                    h.upstreams = v.values;
                }
                super::balance_pb::apply_update(&mut h.balancing, r.balancing, upstreams_replaced)?;
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
                h.acl = r.acl.unwrap_or(h.acl);
                h.redirect_to = r.redirect_to.unwrap_or(h.redirect_to);
                h.redirect_code = r.redirect_code.unwrap_or(h.redirect_code);
                h.redirect_keep_path = r.redirect_keep_path.unwrap_or(h.redirect_keep_path);
                h.rate_limit = r.rate_limit.unwrap_or(h.rate_limit);
                h.rate_key = r.rate_key.unwrap_or(h.rate_key);
                h.rate_limit_scope = r.rate_limit_scope.unwrap_or(h.rate_limit_scope);
                h.max_conns_per_ip = r.max_conns_per_ip.unwrap_or(h.max_conns_per_ip);
                if h.redirect_to.is_empty() {
                    // Back to a proxy host: the redirect's settings go too.
                    (h.redirect_code, h.redirect_keep_path) = (0, false);
                }
                h.normalize_and_validate()?;
                check_domains_free(view, &h, Some(current))?;
                check_cert_exists(view, &h)?;
                check_acls_exist(view, &h)?;
                if h == **current {
                    // Nothing changed: no write, no new version.
                    return Ok((vec![], h));
                }
                h.version += 1;
                h.updated_at_ms = wall_ms().max(h.updated_at_ms);
                Ok((host_writes(view, Some(current), Some(&h)), h))
            })
            .await?;
        tracing::info!(host_id = %updated.id, version = updated.version, "host updated");
        // The check above passed: it holds every domain it lists.
        Ok(super::stamped(host_to_pb(&updated, None), stamp))
    }

    async fn delete_host(
        &self,
        req: Request<pb::DeleteHostRequest>,
    ) -> Result<Response<pb::DeleteHostResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let (key, expected) = (r.id_or_domain, r.expected_version);
        require_field("id_or_domain", &key)?;
        let (id, stamp) = self
            .transact(ctx, move |view| {
                let h = view
                    .find_host(&key)
                    .ok_or(HostsError::NotFound(key.clone()))?;
                if let Some(expected) = expected.filter(|e| *e != h.version) {
                    return Err(HostsError::VersionMismatch {
                        what: "host",
                        id: h.id.clone(),
                        expected,
                        actual: h.version,
                    });
                }
                Ok((host_writes(view, Some(h), None), h.id.clone()))
            })
            .await?;
        tracing::info!(host_id = %id, "host deleted");
        Ok(super::stamped(pb::DeleteHostResponse { id }, stamp))
    }
}
