//! Automatic HTTPS over ACME (RFC 8555): every enabled host's DNS names get
//! a certificate, ordered once per cluster, answered from any node.
//!
//! - [`settings`]: the `--acme-*` node settings.
//! - [`names`]: which certificates the cluster should hold (one per host
//!   that neither pins a certificate nor opts out; DNS names only: no IP
//!   literals, no wildcards, as DNS-01 is out of scope).
//! - [`duty`]: which node orders (rendezvous hashing + a replicated lease)
//!   and when (two thirds into the lifetime, with jitter, or in the CA's
//!   renewal window where it offers ARI, RFC 9773; backoff).
//! - [`client`]: the protocol (instant-acme): account, order, challenges,
//!   finalisation; the result is an ordinary certificate record, hot-loaded
//!   by SNI on every node.
//! - [`challenge`]: HTTP-01 answers from the account thumbprint (any node,
//!   any host, before routing) and TLS-ALPN-01 certificates.
//! - [`manager`]: the per-node loop that ties them together.
//! - [`metrics`]: orders, failures by kind, days left.
//!
//! [`publish`] runs on every store change: it hands the account thumbprint
//! to the HTTP-01 answerer and the TLS-ALPN-01 certificates to `tls`.

pub mod challenge;
pub mod client;
pub mod duty;
pub mod manager;
pub mod metrics;
pub mod names;
pub mod settings;

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::Snapshot;
use crate::tls::seal::DataKey;
use crate::tls::TlsTerminator;

/// Publishes what challenge answers need from the store: called from a
/// store subscriber (quick: only the few challenge keys are opened).
pub fn publish(snap: &Snapshot, directory: Option<&str>, key: &DataKey, tls: &TlsTerminator) {
    let thumb = directory.and_then(|d| {
        snap.acme_accounts
            .iter()
            .find(|a| a.directory == d)
            .map(|a| a.thumbprint.as_str())
    });
    challenge::set_thumbprint(thumb);
    let now = crate::util::wall_ms();
    let mut alpn = HashMap::new();
    for c in snap.acme_challenges.iter().filter(|c| c.expires_ms > now) {
        let aad = crate::store::acme::alpn_key(&c.domain);
        let opened = key
            .open(&c.key.key_id, &c.key.nonce, &c.key.sealed, &aad)
            .map_err(|e| e.to_string())
            .and_then(|pem| alpn_certified_key(&c.cert_pem, &pem));
        match opened {
            Ok(k) => {
                alpn.insert(c.domain.clone(), k);
            }
            Err(e) => {
                tracing::warn!(name = %c.domain, error = %e, "TLS-ALPN-01 certificate unusable")
            }
        }
    }
    tls.publish_acme_challenges(Arc::new(alpn));
}

/// The challenge certificate for rustls, without the check that parses it
/// as a server certificate: webpki refuses the critical acmeIdentifier
/// extension that TLS-ALPN-01 requires (the CA, not webpki, reads it).
fn alpn_certified_key(
    cert_pem: &str,
    key_pem: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("challenge key unreadable: {e}"))?;
    let key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    let chain = crate::tls::cert::parse_chain(cert_pem)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, key)))
}
