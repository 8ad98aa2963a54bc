//! ACME records: the cluster's account, the state of each certificate it
//! orders, and TLS-ALPN-01 challenge certificates. They replicate like every
//! record; secrets in them (the account key, certificate keys, challenge
//! keys) are sealed with the data key, as uploaded keys are.
//!
//! Keys: `acme/account/<hash of the directory URL>`, `acme/order/<id>` (the
//! id of the certificate record the order produces), `acme/alpn/<domain>`.

use charon_proto::store as pb;

pub const ACME_PREFIX: &str = "acme/";
pub const ACCOUNT_PREFIX: &str = "acme/account/";
pub const ORDER_PREFIX: &str = "acme/order/";
pub const ALPN_PREFIX: &str = "acme/alpn/";

/// A sealed secret: ciphertext, nonce and the id of the data key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub nonce: Vec<u8>,
    pub key_id: String,
}

impl Sealed {
    pub fn is_empty(&self) -> bool {
        self.sealed.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcmeAccount {
    pub directory: String,
    pub account_url: String,
    /// JWK thumbprint of the account key: HTTP-01 answers are
    /// `<token>.<thumbprint>`.
    pub thumbprint: String,
    /// The instant-acme credentials (JSON), sealed.
    pub credentials: Sealed,
    pub created_at_ms: u64,
    pub created_on: String,
}

/// Where one certificate's order stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcmeOrder {
    pub id: String,
    pub names: Vec<String>,
    pub holder: String,
    pub holder_name: String,
    pub lease_until_ms: u64,
    /// `pending`, `valid`, `renewing` or `failed`.
    pub status: String,
    pub reason: String,
    pub order_url: String,
    /// The private key of the certificate being ordered, sealed.
    pub key: Sealed,
    pub next_attempt_ms: u64,
    pub failures: u32,
    pub history: Vec<String>,
    pub updated_at_ms: u64,
    /// New orders placed for these names so far.
    pub orders: u64,
    pub directory: String,
    /// When the CA's renewal information (RFC 9773) says to renew; 0 =
    /// none (the CA offers no ARI, or was not asked yet).
    pub ari_renew_at_ms: u64,
    /// When to ask the CA for renewal information again.
    pub ari_check_at_ms: u64,
}

/// A TLS-ALPN-01 challenge certificate for one name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcmeChallenge {
    pub domain: String,
    pub cert_pem: String,
    pub key: Sealed,
    pub expires_ms: u64,
}

pub fn account_key(directory: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(directory.as_bytes());
    format!("{ACCOUNT_PREFIX}{}", hex::encode(&h[..8]))
}

pub fn order_key(id: &str) -> String {
    format!("{ORDER_PREFIX}{id}")
}

pub fn alpn_key(domain: &str) -> String {
    format!("{ALPN_PREFIX}{domain}")
}

pub(super) fn account_to_pb(a: &AcmeAccount) -> pb::AcmeAccountRecord {
    pb::AcmeAccountRecord {
        directory: a.directory.clone(),
        account_url: a.account_url.clone(),
        thumbprint: a.thumbprint.clone(),
        credentials_sealed: a.credentials.sealed.clone(),
        credentials_nonce: a.credentials.nonce.clone(),
        key_id: a.credentials.key_id.clone(),
        created_at_ms: a.created_at_ms,
        created_on: a.created_on.clone(),
    }
}

pub(super) fn account_from_pb(a: pb::AcmeAccountRecord) -> AcmeAccount {
    AcmeAccount {
        directory: a.directory,
        account_url: a.account_url,
        thumbprint: a.thumbprint,
        credentials: Sealed {
            sealed: a.credentials_sealed,
            nonce: a.credentials_nonce,
            key_id: a.key_id,
        },
        created_at_ms: a.created_at_ms,
        created_on: a.created_on,
    }
}

pub(super) fn order_to_pb(o: &AcmeOrder) -> pb::AcmeOrderRecord {
    pb::AcmeOrderRecord {
        id: o.id.clone(),
        names: o.names.clone(),
        holder: o.holder.clone(),
        holder_name: o.holder_name.clone(),
        lease_until_ms: o.lease_until_ms,
        status: o.status.clone(),
        reason: o.reason.clone(),
        order_url: o.order_url.clone(),
        key_sealed: o.key.sealed.clone(),
        key_nonce: o.key.nonce.clone(),
        key_id: o.key.key_id.clone(),
        next_attempt_ms: o.next_attempt_ms,
        failures: o.failures,
        history: o.history.clone(),
        updated_at_ms: o.updated_at_ms,
        orders: o.orders,
        directory: o.directory.clone(),
        ari_renew_at_ms: o.ari_renew_at_ms,
        ari_check_at_ms: o.ari_check_at_ms,
    }
}

pub(super) fn order_from_pb(o: pb::AcmeOrderRecord) -> AcmeOrder {
    AcmeOrder {
        id: o.id,
        names: o.names,
        holder: o.holder,
        holder_name: o.holder_name,
        lease_until_ms: o.lease_until_ms,
        status: o.status,
        reason: o.reason,
        order_url: o.order_url,
        key: Sealed {
            sealed: o.key_sealed,
            nonce: o.key_nonce,
            key_id: o.key_id,
        },
        next_attempt_ms: o.next_attempt_ms,
        failures: o.failures,
        history: o.history,
        updated_at_ms: o.updated_at_ms,
        orders: o.orders,
        directory: o.directory,
        ari_renew_at_ms: o.ari_renew_at_ms,
        ari_check_at_ms: o.ari_check_at_ms,
    }
}

pub(super) fn challenge_to_pb(c: &AcmeChallenge) -> pb::AcmeChallengeRecord {
    pb::AcmeChallengeRecord {
        domain: c.domain.clone(),
        cert_pem: c.cert_pem.clone(),
        key_sealed: c.key.sealed.clone(),
        key_nonce: c.key.nonce.clone(),
        key_id: c.key.key_id.clone(),
        expires_ms: c.expires_ms,
    }
}

pub(super) fn challenge_from_pb(c: pb::AcmeChallengeRecord) -> AcmeChallenge {
    AcmeChallenge {
        domain: c.domain,
        cert_pem: c.cert_pem,
        key: Sealed {
            sealed: c.key_sealed,
            nonce: c.key_nonce,
            key_id: c.key_id,
        },
        expires_ms: c.expires_ms,
    }
}
