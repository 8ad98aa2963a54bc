//! `charon.v1.Certificates`: upload, rotate, inspect and delete the
//! certificates the HTTPS listener serves. Private keys go in, sealed, and
//! never come out.

use std::sync::Arc;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::hosts::HostsError;
use crate::store::acme::AcmeOrder;
use crate::store::{cert_key, Body, Snapshot, Store, View, Write};
use crate::tls::cert::{parse_and_validate, StoredCert};
use crate::tls::seal::DataKey;
use crate::util::wall_ms;
use crate::validate::FieldError;

pub struct CertsApi {
    store: Arc<Store>,
    key: Arc<DataKey>,
    gate: Arc<super::WriteGate>,
}

impl CertsApi {
    pub fn new(store: Arc<Store>, key: Arc<DataKey>, gate: Arc<super::WriteGate>) -> Self {
        CertsApi { store, key, gate }
    }

    async fn transact<T: Send + 'static>(
        &self,
        ctx: super::WriteCtx,
        f: impl FnOnce(&View<'_>) -> Result<(Vec<Write>, T), HostsError> + Send + 'static,
    ) -> Result<(T, Option<crate::store::Stamp>), Status> {
        super::transact(&self.store, ctx, f).await
    }
}

/// The status column of `cert list`: an ACME order's state, with the
/// failure reason; empty for uploaded certificates.
fn order_status(o: &AcmeOrder) -> String {
    match o.status.as_str() {
        "failed" => format!("failed: {}", o.reason),
        s => s.to_string(),
    }
}

/// Adds the ACME order's state (status, next attempt, history, holder).
fn with_order(mut c: pb::Certificate, order: Option<&AcmeOrder>, history: bool) -> pb::Certificate {
    if let Some(o) = order {
        c.source = "acme".into();
        c.status = order_status(o);
        c.next_attempt_ms = o.next_attempt_ms;
        if o.lease_until_ms > wall_ms() {
            c.holder = o.holder_name.clone();
        }
        if history {
            c.history = o.history.clone();
        }
    }
    c
}

/// An ACME order that has no certificate yet (pending or failed).
fn order_only_to_pb(o: &AcmeOrder, snap: &Snapshot, history: bool) -> pb::Certificate {
    let c = pb::Certificate {
        id: o.id.clone(),
        name: o.names.first().cloned().unwrap_or_default(),
        domains: o.names.clone(),
        updated_at_ms: o.updated_at_ms,
        used_by_hosts: used_by(snap, &o.id, "acme"),
        ..Default::default()
    };
    with_order(c, Some(o), history)
}

fn find_order<'a>(snap: &'a Snapshot, id: &str) -> Option<&'a AcmeOrder> {
    snap.acme_orders.get(id).map(|o| &**o)
}

fn cert_to_pb(c: &StoredCert, snap: &Snapshot) -> pb::Certificate {
    pb::Certificate {
        source: if c.source.is_empty() {
            "uploaded".into()
        } else {
            c.source.clone()
        },
        id: c.id.clone(),
        name: c.name.clone(),
        domains: c.domains.clone(),
        not_before_ms: c.not_before_ms,
        not_after_ms: c.not_after_ms,
        issuer: c.issuer.clone(),
        subject: c.subject.clone(),
        serial: c.serial.clone(),
        fingerprint_sha256: c.fingerprint_sha256.clone(),
        key_type: c.key_type.clone(),
        chain_length: c.chain_length,
        created_at_ms: c.created_at_ms,
        updated_at_ms: c.updated_at_ms,
        version: c.version,
        used_by_hosts: used_by(snap, &c.id, &c.source),
        cert_pem: c.cert_pem.clone(),
        ..Default::default()
    }
}

/// The hosts that pin an uploaded certificate, or that an ACME one was
/// ordered for.
fn used_by(snap: &Snapshot, id: &str, source: &str) -> Vec<String> {
    if source == "acme" {
        let hosts = snap.hosts.iter().map(|h| &**h);
        crate::acme::names::hosts_of(hosts, id)
            .map(|h| h.id.clone())
            .collect()
    } else {
        snap.hosts_pinning(id).map(|h| h.id.clone()).collect()
    }
}

fn not_found(id: &str) -> HostsError {
    HostsError::Missing(format!("no certificate with id {id:?}"))
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CertsApi {
    async fn add_certificate(
        &self,
        req: Request<pb::AddCertificateRequest>,
    ) -> Result<Response<pb::CertificateReply>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let now = wall_ms();
        let parsed = parse_and_validate(&r.cert_pem, &r.key_pem, now).map_err(HostsError::from)?;
        let key = self.key.clone();
        let name = r.name.trim().to_string();
        let ((cert, hosts), stamp) = self
            .transact(ctx, move |view| {
                let mut c = parsed.meta;
                c.id = loop {
                    let id = format!("c-{}", hex::encode(rand::random::<[u8; 5]>()));
                    if view.find_cert(&id).is_none() {
                        break id;
                    }
                };
                c.name = if name.is_empty() {
                    c.domains[0].clone()
                } else {
                    name
                };
                c.created_at_ms = now;
                c.updated_at_ms = now;
                c.version = 1;
                c.seal_key(&key, &parsed.key_pem);
                let write = Write {
                    key: cert_key(&c.id),
                    body: Some(Body::Cert(c.clone())),
                };
                Ok((vec![write], (c, view.snapshot().clone())))
            })
            .await?;
        tracing::info!(cert = %cert.id, domains = ?cert.domains, "certificate added");
        Ok(super::stamped(
            pb::CertificateReply {
                certificate: Some(cert_to_pb(&cert, &hosts)),
                warnings: parsed.warnings,
            },
            stamp,
        ))
    }

    async fn replace_certificate(
        &self,
        req: Request<pb::ReplaceCertificateRequest>,
    ) -> Result<Response<pb::CertificateReply>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        if r.id.trim().is_empty() {
            return Err(HostsError::from(FieldError::new("id", "is required")).into());
        }
        let now = wall_ms();
        let parsed = parse_and_validate(&r.cert_pem, &r.key_pem, now).map_err(HostsError::from)?;
        let key = self.key.clone();
        let ((cert, hosts), stamp) = self
            .transact(ctx, move |view| {
                let old = view.find_cert(&r.id).ok_or_else(|| not_found(&r.id))?;
                let mut c = parsed.meta;
                c.id = old.id.clone();
                c.name = r
                    .name
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| old.name.clone());
                c.created_at_ms = old.created_at_ms;
                c.updated_at_ms = now.max(old.updated_at_ms);
                c.version = old.version + 1;
                c.seal_key(&key, &parsed.key_pem);
                let write = Write {
                    key: cert_key(&c.id),
                    body: Some(Body::Cert(c.clone())),
                };
                Ok((vec![write], (c, view.snapshot().clone())))
            })
            .await?;
        tracing::info!(cert = %cert.id, version = cert.version, "certificate replaced");
        Ok(super::stamped(
            pb::CertificateReply {
                certificate: Some(cert_to_pb(&cert, &hosts)),
                warnings: parsed.warnings,
            },
            stamp,
        ))
    }

    async fn get_certificate(
        &self,
        req: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::Certificate>, Status> {
        let id = req.into_inner().id;
        let snap = self.store.snapshot();
        let order = find_order(&snap, &id);
        match snap.certs.get(&id) {
            Some(c) => Ok(Response::new(with_order(cert_to_pb(c, &snap), order, true))),
            None => match order {
                Some(o) => Ok(Response::new(order_only_to_pb(o, &snap, true))),
                None => Err(Status::from(not_found(&id))),
            },
        }
    }

    async fn list_certificates(
        &self,
        _req: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let snap = self.store.snapshot();
        let mut certificates: Vec<pb::Certificate> = snap
            .certs
            .iter()
            .map(|c| {
                let order = find_order(&snap, &c.id);
                with_order(cert_to_pb(c, &snap), order, false)
            })
            .collect();
        certificates.extend(
            snap.acme_orders
                .iter()
                .filter(|o| snap.certs.get(&o.id).is_none())
                .map(|o| order_only_to_pb(o, &snap, false)),
        );
        certificates.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(Response::new(pb::ListCertificatesResponse { certificates }))
    }

    async fn delete_certificate(
        &self,
        req: Request<pb::DeleteCertificateRequest>,
    ) -> Result<Response<pb::DeleteCertificateResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let (id, expected) = (r.id, r.expected_version);
        let (pinned_by, stamp) = self
            .transact(ctx, move |view| {
                let c = view.find_cert(&id).ok_or_else(|| not_found(&id))?;
                if let Some(expected) = expected.filter(|e| *e != c.version) {
                    return Err(HostsError::VersionMismatch {
                        what: "certificate",
                        id: c.id.clone(),
                        expected,
                        actual: c.version,
                    });
                }
                if let Some(h) = view.snapshot().hosts_pinning(&c.id).next() {
                    return Ok((vec![], Err((c.id.clone(), h.id.clone(), h.name.clone()))));
                }
                Ok((
                    vec![Write {
                        key: cert_key(&c.id),
                        body: None,
                    }],
                    Ok(c.id.clone()),
                ))
            })
            .await?;
        match pinned_by {
            Ok(id) => {
                tracing::info!(cert = %id, "certificate deleted");
                Ok(super::stamped(pb::DeleteCertificateResponse { id }, stamp))
            }
            Err((cert, host, name)) => Err(Status::failed_precondition(format!(
                "certificate {cert} is pinned by host {host} ({name}); unpin it first: charonctl host update {host} --cert \"\""
            ))),
        }
    }
}
