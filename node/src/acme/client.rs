//! The ACME protocol side (instant-acme): the cluster's account, and one
//! order from placing (or resuming) to a stored certificate.
//!
//! Everything a node taking over needs is in the order record before the
//! step that needs it: the order URL right after the order is placed (so
//! it is resumed, not placed again), the certificate key before the order
//! is finalised (so the certificate the CA issues can still be used).

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeStatus,
    ChallengeType, ExternalAccountKey, Identifier, NewAccount, NewOrder, Order, OrderStatus,
    RetryPolicy,
};

use super::challenge::alpn_certificate;
use super::names::Wanted;
use super::settings::{AcmeSettings, ChallengeKind};
use crate::cluster::Cluster;
use crate::store::acme::{alpn_key, AcmeAccount, AcmeChallenge, AcmeOrder, Sealed};
use crate::store::{cert_key, Body, Store, StoreError, Write};
use crate::tls::cert::{parse_and_validate, StoredCert};
use crate::tls::seal::DataKey;
use crate::util::wall_ms;

/// What the ordering code needs of the node.
pub struct Ctx {
    pub settings: AcmeSettings,
    pub store: Arc<Store>,
    pub key: Arc<DataKey>,
    pub cluster: Arc<Cluster>,
    pub node_name: String,
}

/// Why an attempt failed, for the record, the log and the backoff.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: String,
    /// Short label for metrics: `ca` (an error the CA answered), `nonce`
    /// (the CA refused the request's anti-replay nonce: nothing happened
    /// at the CA, the same step may be sent again), `validation` (the CA
    /// could not validate a name), `challenge` (none could be offered),
    /// `replication`, `store`, `network`, `certificate`.
    pub kind: &'static str,
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(kind: &'static str, reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            kind,
            retry_after: None,
        }
    }
}

impl From<instant_acme::Error> for Failure {
    fn from(e: instant_acme::Error) -> Failure {
        match &e {
            instant_acme::Error::Api(p) => {
                let rate_limited =
                    p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited");
                // instant-acme already resends a request twice on badNonce;
                // a CA that refuses at random (pebble: 5% of good nonces,
                // as RFC 8555 §6.5 allows) can still refuse all three.
                let bad_nonce = p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce");
                Failure {
                    reason: format!("CA: {p}"),
                    kind: if bad_nonce { "nonce" } else { "ca" },
                    // instant-acme keeps the Retry-After header to itself
                    // on errors; Let's Encrypt repeats it in the detail,
                    // else an hour (its shortest rate-limit window).
                    retry_after: rate_limited.then(|| {
                        p.detail
                            .as_deref()
                            .and_then(|d| retry_after_in_detail(d, wall_ms()))
                            .unwrap_or(Duration::from_secs(3600))
                    }),
                }
            }
            _ => Failure::new("network", format!("talking to the CA: {e}")),
        }
    }
}

/// The wait a rate-limit error's detail names, as Let's Encrypt writes it:
/// "…, retry after 2026-12-05 01:23:45 UTC: see https://…".
fn retry_after_in_detail(detail: &str, now_ms: u64) -> Option<Duration> {
    let at = detail.split("retry after ").nth(1)?.get(..19)?;
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let at = time::PrimitiveDateTime::parse(at, &format)
        .ok()?
        .assume_utc();
    let at_ms = u64::try_from(at.unix_timestamp()).ok()? * 1000;
    Some(Duration::from_millis(at_ms.saturating_sub(now_ms)))
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::new("store", e.to_string())
    }
}

fn builder(s: &AcmeSettings) -> Result<instant_acme::AccountBuilder, Failure> {
    match &s.ca_file {
        Some(f) => Account::builder_with_root(f),
        None => Account::builder(),
    }
    .map_err(|e| Failure::new("network", format!("ACME HTTP client: {e}")))
}

fn open(key: &DataKey, s: &Sealed, aad: &str) -> Result<Vec<u8>, Failure> {
    key.open(&s.key_id, &s.nonce, &s.sealed, aad)
        .map_err(|e| Failure::new("store", format!("cannot open {aad}: {e}")))
}

fn seal(key: &DataKey, plain: &[u8], aad: &str) -> Sealed {
    let (nonce, sealed) = key.seal(plain, aad);
    Sealed {
        sealed,
        nonce,
        key_id: key.id().to_string(),
    }
}

/// Restores the account from its record.
pub async fn load_account(ctx: &Ctx, rec: &AcmeAccount) -> Result<Account, Failure> {
    let aad = crate::store::acme::account_key(&rec.directory);
    let json = open(&ctx.key, &rec.credentials, &aad)?;
    let creds: AccountCredentials = serde_json::from_slice(&json)
        .map_err(|e| Failure::new("store", format!("account credentials unreadable: {e}")))?;
    Ok(builder(&ctx.settings)?.from_credentials(creds).await?)
}

/// Registers a new account and stores it (sealed) for the whole cluster.
/// Only the node responsible for the account calls this, so two nodes do
/// not register two accounts whose thumbprints would disagree.
pub async fn create_account(ctx: &Ctx) -> Result<(Account, AcmeAccount), Failure> {
    let s = &ctx.settings;
    let contact: Vec<String> = s.email.iter().map(|e| format!("mailto:{e}")).collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = s
        .eab
        .as_ref()
        .map(|(kid, hmac)| ExternalAccountKey::new(kid.clone(), hmac));
    let (account, creds) = builder(s)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            s.directory.clone(),
            eab.as_ref(),
        )
        .await?;
    let json = serde_json::to_vec(&creds)
        .map_err(|e| Failure::new("store", format!("account credentials: {e}")))?;
    let key = crate::store::acme::account_key(&s.directory);
    let rec = AcmeAccount {
        directory: s.directory.clone(),
        account_url: account.id().to_string(),
        thumbprint: account.key_thumbprint().to_string(),
        credentials: seal(&ctx.key, &json, &key),
        created_at_ms: wall_ms(),
        created_on: ctx.node_name.clone(),
    };
    let write = Write {
        key,
        body: Some(Body::AcmeAccount(rec.clone())),
    };
    ctx.store
        .transact(|_| Ok::<_, StoreError>((vec![write], ())))?;
    tracing::info!(directory = %s.directory, account = %rec.account_url, "ACME account registered");
    Ok((account, rec))
}

/// Reads, changes and writes the order record in one store transaction;
/// returns the record as written and where the write landed.
pub fn update_order(
    store: &Store,
    id: &str,
    f: impl FnOnce(&mut AcmeOrder),
) -> Result<(AcmeOrder, Option<crate::store::Stamp>), StoreError> {
    store.transact_stamped(|view| {
        let mut o = view
            .acme_order(id)
            .map(|o| (**o).clone())
            .unwrap_or_else(|| AcmeOrder {
                id: id.to_string(),
                ..AcmeOrder::default()
            });
        f(&mut o);
        o.updated_at_ms = wall_ms();
        let write = Write {
            key: crate::store::acme::order_key(id),
            body: Some(Body::AcmeOrder(o.clone())),
        };
        Ok((vec![write], o))
    })
}

/// Appends a line to the order's history (the last 30 are kept).
pub fn note(o: &mut AcmeOrder, node: &str, what: &str) {
    o.history.push(format!(
        "{} {node}: {what}",
        crate::util::rfc3339_secs(wall_ms())
    ));
    let excess = o.history.len().saturating_sub(30);
    o.history.drain(..excess);
}

/// The RFC 9773 identifier of a stored certificate (its leaf's authority
/// key identifier and serial), for renewal information and `replaces`.
pub fn ari_id(cert_pem: &str) -> Result<CertificateIdentifier<'static>, String> {
    use rustls_pki_types::Der;
    let chain = crate::tls::cert::parse_chain(cert_pem)?;
    let leaf = chain.first().ok_or("empty chain")?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("certificate unreadable: {e}"))?;
    let aki = x509
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        })
        .ok_or("the certificate has no authority key identifier")?;
    let serial = x509.tbs_certificate.raw_serial();
    Ok(CertificateIdentifier::new(Der::from_slice(aki), Der::from_slice(serial)).into_owned())
}

/// What the CA's renewal information says: (renew at, ask again at), or
/// `None` when the CA offers no ARI.
pub async fn renewal_info(
    account: &Account,
    id: &str,
    cert_pem: &str,
) -> Result<Option<(u64, u64)>, Failure> {
    let cid = ari_id(cert_pem).map_err(|e| Failure::new("certificate", e))?;
    let (info, retry) = match account.renewal_info(&cid).await {
        Ok(r) => r,
        Err(instant_acme::Error::Unsupported(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let w = &info.suggested_window;
    let at = super::duty::in_window(id, ms(w.start), ms(w.end));
    // Retry-After as the CA says, within sane bounds (RFC 9773 §4.3.2).
    let again = retry.clamp(Duration::from_secs(60), Duration::from_secs(86_400));
    Ok(Some((at, wall_ms() + again.as_millis() as u64)))
}

/// Places a new order, as the replacement of `replaces` when given (a
/// renewal the CA exempts from rate limits, RFC 9773 §5); a CA that
/// refuses the replacement (e.g. already replaced) gets a plain order.
async fn place(
    account: &Account,
    ids: &[Identifier],
    replaces: Option<&CertificateIdentifier<'static>>,
) -> Result<Order, Failure> {
    if let Some(r) = replaces {
        match account
            .new_order(&NewOrder::new(ids).replaces(r.clone()))
            .await
        {
            Ok(o) => return Ok(o),
            Err(e) => {
                tracing::info!(error = %e, "the CA refused the order as a replacement; placing a plain one")
            }
        }
    }
    Ok(account.new_order(&NewOrder::new(ids)).await?)
}

/// Resumes the order in the record when the CA still has it usable, else
/// places a new one and records its URL at once.
async fn resume_or_place(
    ctx: &Ctx,
    account: &Account,
    w: &Wanted,
    rec: &AcmeOrder,
    replaces: Option<&CertificateIdentifier<'static>>,
) -> Result<Order, Failure> {
    if !rec.order_url.is_empty() && rec.directory == ctx.settings.directory {
        let resumed = account.order(rec.order_url.clone()).await.map(|mut o| {
            let usable = o.state().status != OrderStatus::Invalid;
            (o, usable)
        });
        match resumed {
            Ok((o, true)) => {
                tracing::info!(cert = %w.id, order = %rec.order_url, "resuming the ACME order another attempt left");
                let url = rec.order_url.clone();
                update_order(&ctx.store, &w.id, |o| {
                    note(o, &ctx.node_name, &format!("resumed order {url}"))
                })?;
                return Ok(o);
            }
            Ok((_, false)) => {
                tracing::info!(cert = %w.id, "the previous order is invalid; placing a new one")
            }
            Err(e) => {
                tracing::info!(cert = %w.id, error = %e, "the previous order cannot be resumed; placing a new one")
            }
        }
    }
    let ids: Vec<Identifier> = w.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let order = place(account, &ids, replaces).await?;
    let url = order.url().to_string();
    let directory = ctx.settings.directory.clone();
    update_order(&ctx.store, &w.id, |o| {
        o.order_url = url.clone();
        o.directory = directory;
        o.key = Sealed::default();
        o.orders += 1;
        note(o, &ctx.node_name, &format!("placed order {url}"));
    })?;
    tracing::info!(cert = %w.id, names = ?w.names, order = %url, "ACME order placed");
    Ok(order)
}

/// Makes one authorization's challenge ready: HTTP-01 needs nothing (every
/// node answers from the thumbprint); TLS-ALPN-01 first puts the challenge
/// certificate on every live node.
async fn prepare_challenges(ctx: &Ctx, order: &mut Order) -> Result<(), Failure> {
    let mut authzs = order.authorizations();
    while let Some(authz) = authzs.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(Failure::new(
                    "validation",
                    format!("authorization {other:?}"),
                ))
            }
        }
        let kind = ctx
            .settings
            .challenges
            .iter()
            .copied()
            .find(|k| {
                let t = acme_type(*k);
                authz.challenges.iter().any(|c| c.r#type == t)
            })
            .ok_or_else(|| {
                Failure::new(
                    "challenge",
                    "the CA offers none of the challenge types this node may use",
                )
            })?;
        let mut ch = authz
            .challenge(acme_type(kind))
            .expect("checked just above");
        let name = ch.identifier().to_string();
        if kind == ChallengeKind::TlsAlpn01 {
            let digest = ch.key_authorization().digest();
            publish_alpn(ctx, &name, digest.as_ref()).await?;
        }
        if ch.status == ChallengeStatus::Pending {
            ch.set_ready().await?;
        }
        tracing::info!(name = %name, challenge = kind.name(), "ACME challenge ready");
    }
    Ok(())
}

fn acme_type(k: ChallengeKind) -> ChallengeType {
    match k {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// Stores the TLS-ALPN-01 certificate and waits until every live member
/// has applied it: the CA may connect to any of them.
async fn publish_alpn(ctx: &Ctx, name: &str, digest: &[u8]) -> Result<(), Failure> {
    let (cert_pem, key_pem) =
        alpn_certificate(name, digest).map_err(|e| Failure::new("challenge", e))?;
    let key = alpn_key(name);
    let rec = AcmeChallenge {
        domain: name.to_string(),
        cert_pem,
        key: seal(&ctx.key, key_pem.as_bytes(), &key),
        expires_ms: wall_ms() + 3_600_000,
    };
    let stamp = ctx.store.transact_stamped(|_| {
        Ok::<_, StoreError>((
            vec![Write {
                key,
                body: Some(Body::AcmeChallenge(rec)),
            }],
            (),
        ))
    })?;
    if let (_, Some(s)) = stamp {
        let (complete, _, pending) = ctx
            .cluster
            .wait_for_write(&s.origin, s.seq, Duration::from_secs(15))
            .await;
        if !complete {
            return Err(Failure::new(
                "replication",
                format!("TLS-ALPN-01 certificate for {name} not on every live node: {pending:?}"),
            ));
        }
    }
    Ok(())
}

/// The first challenge error the CA reported, for the record.
async fn challenge_error(order: &mut Order) -> String {
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if let Ok(state) = a.refresh().await {
            let name = state.identifier().to_string();
            if let Some(p) = state.challenges.iter().find_map(|c| c.error.as_ref()) {
                return format!("{name}: {p}");
            }
        }
    }
    "the CA marked the order invalid".into()
}

/// The certificate key of this order: the one in the record when a
/// previous attempt made it, else a new ECDSA P-256 key, stored (sealed)
/// before the CA sees its CSR.
fn order_key_pem(ctx: &Ctx, w: &Wanted, rec: &AcmeOrder) -> Result<String, Failure> {
    let aad = crate::store::acme::order_key(&w.id);
    if !rec.key.is_empty() {
        let pem = open(&ctx.key, &rec.key, &aad)?;
        return String::from_utf8(pem).map_err(|_| Failure::new("store", "order key not UTF-8"));
    }
    let kp = rcgen::KeyPair::generate().map_err(|e| Failure::new("certificate", e.to_string()))?;
    let pem = kp.serialize_pem();
    let sealed = seal(&ctx.key, pem.as_bytes(), &aad);
    update_order(&ctx.store, &w.id, |o| o.key = sealed)?;
    Ok(pem)
}

/// One attempt, start to finish: returns the certificate as stored.
/// `replaces`: the certificate this one renews, when the CA offers ARI.
pub async fn run_order(
    ctx: &Ctx,
    account: &Account,
    w: &Wanted,
    replaces: Option<&CertificateIdentifier<'static>>,
) -> Result<StoredCert, Failure> {
    let rec = ctx
        .store
        .snapshot()
        .acme_orders
        .get(&w.id)
        .map(|o| (**o).clone())
        .unwrap_or_default();
    let mut order = resume_or_place(ctx, account, w, &rec, replaces).await?;
    let polls = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(60));
    if matches!(order.state().status, OrderStatus::Pending) {
        prepare_challenges(ctx, &mut order).await?;
        let status = order.poll_ready(&polls).await?;
        if status == OrderStatus::Invalid {
            return Err(Failure::new(
                "validation",
                challenge_error(&mut order).await,
            ));
        }
    }
    let rec = ctx
        .store
        .snapshot()
        .acme_orders
        .get(&w.id)
        .map(|o| (**o).clone())
        .unwrap_or_default();
    let key_pem = order_key_pem(ctx, w, &rec)?;
    if matches!(order.state().status, OrderStatus::Ready) {
        let kp = rcgen::KeyPair::from_pem(&key_pem)
            .map_err(|e| Failure::new("certificate", e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(w.names.clone())
            .map_err(|e| Failure::new("certificate", e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&kp)
            .map_err(|e| Failure::new("certificate", e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
    }
    let chain = order.poll_certificate(&polls).await?;
    store_certificate(ctx, w, &chain, &key_pem)
}

/// Checks the issued chain like an upload and stores it as an ordinary
/// certificate record (same id on renewal: replaced in one write, never
/// deleted first), with the order marked valid and its TLS-ALPN-01
/// certificates removed, in one transaction.
fn store_certificate(
    ctx: &Ctx,
    w: &Wanted,
    chain: &str,
    key_pem: &str,
) -> Result<StoredCert, Failure> {
    let now = wall_ms();
    let parsed = parse_and_validate(chain, key_pem, now)
        .map_err(|e| Failure::new("certificate", format!("the issued certificate: {e}")))?;
    let node = ctx.node_name.clone();
    let key = ctx.key.clone();
    let cert = ctx.store.transact(|view| {
        let old = view.find_cert(&w.id);
        let mut c = parsed.meta;
        c.id = w.id.clone();
        c.name = w.names[0].clone();
        c.source = "acme".into();
        c.created_at_ms = old.map_or(now, |o| o.created_at_ms);
        c.updated_at_ms = now;
        c.version = old.map_or(1, |o| o.version + 1);
        c.seal_key(&key, key_pem);
        let mut o = view
            .acme_order(&w.id)
            .map(|o| (**o).clone())
            .unwrap_or_default();
        o.id = w.id.clone();
        o.names = w.names.clone();
        o.status = "valid".into();
        o.reason.clear();
        o.order_url.clear();
        o.key = Sealed::default();
        o.failures = 0;
        o.next_attempt_ms = 0;
        o.lease_until_ms = 0;
        // The old certificate's renewal window is not the new one's.
        o.ari_renew_at_ms = 0;
        o.ari_check_at_ms = 0;
        o.updated_at_ms = now;
        note(
            &mut o,
            &node,
            &format!(
                "issued serial {} valid until {}",
                c.serial,
                crate::util::rfc3339_secs(c.not_after_ms)
            ),
        );
        let mut writes = vec![
            Write {
                key: cert_key(&c.id),
                body: Some(Body::Cert(c.clone())),
            },
            Write {
                key: crate::store::acme::order_key(&w.id),
                body: Some(Body::AcmeOrder(o)),
            },
        ];
        for n in &w.names {
            if view.acme_challenge(n).is_some() {
                writes.push(Write {
                    key: alpn_key(n),
                    body: None,
                });
            }
        }
        Ok::<_, StoreError>((writes, c))
    })?;
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused nonce is its own kind: the manager runs the order again
    /// for it instead of failing the attempt (and nothing clears the URL).
    #[test]
    fn a_refused_nonce_is_not_a_ca_failure() {
        let problem = |t: &str| {
            instant_acme::Error::Api(instant_acme::Problem {
                r#type: Some(t.to_string()),
                detail: Some("JWS has an invalid anti-replay nonce".into()),
                status: Some(400),
                subproblems: Vec::new(),
            })
        };
        let f = Failure::from(problem("urn:ietf:params:acme:error:badNonce"));
        assert_eq!(f.kind, "nonce");
        assert!(f.retry_after.is_none());
        let f = Failure::from(problem("urn:ietf:params:acme:error:malformed"));
        assert_eq!(f.kind, "ca");
    }

    #[test]
    fn rate_limit_detail_gives_the_wait() {
        let d = "too many certificates (5) already issued for this exact set of identifiers \
                 in the last 168h0m0s, retry after 2026-12-05 01:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/";
        // 2026-12-05T00:00:00Z
        let now = 1_796_428_800_000;
        assert_eq!(
            retry_after_in_detail(d, now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(retry_after_in_detail("rate limited", now), None);
    }

    #[test]
    fn ari_id_is_the_leafs_authority_key_id_and_serial() {
        let ca = crate::tls::cert::test_certs::ca("ARI CA");
        let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[1, 2, 3]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let id = ari_id(&cert.pem()).unwrap();
        assert_eq!(id.serial, "AQID");
        // SHA-1 of the CA key, base64url (RFC 9773 §4.1): 20 bytes, 27 chars.
        assert_eq!(id.authority_key_identifier.len(), 27, "{id}");
        let (plain, _) = crate::tls::cert::test_certs::leaf(&ca, &["b.example"], None);
        assert!(ari_id(&plain).is_err(), "no AKI: no identifier");
    }
}
