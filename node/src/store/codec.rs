//! The on-disk encoding of records: one version byte, then a protobuf
//! `charon.store.v1.Record`. Self-describing and extensible, unlike redb's
//! own tuple encoding, so a later release can read files written today.

use charon_proto::store as pb;
use prost::Message;

use super::acme::{self, AcmeAccount, AcmeChallenge, AcmeOrder};
use crate::access::AccessList;
use crate::host::{Location, ProxyHost};
use crate::tls::cert::StoredCert;

/// The only encoding version so far.
const VERSION_1: u8 = 1;

/// What a record holds; `None` body = tombstone.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Host(ProxyHost),
    Cert(StoredCert),
    Token(ApiToken),
    Drain(DrainRecord),
    /// Who holds a domain: see [`super::names`].
    Claim(NameClaim),
    AcmeAccount(AcmeAccount),
    AcmeOrder(AcmeOrder),
    AcmeChallenge(AcmeChallenge),
    /// An access list (key `acl/<name>`): see [`crate::access`].
    Acl(AccessList),
}

/// The holder of one domain (key `name/<domain>`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NameClaim {
    pub domain: String,
    pub host_id: String,
}

/// A replicated drain request for one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrainRecord {
    pub node_id: String,
    pub deadline_ms: u64,
    pub spread_secs: u32,
    pub requested_at_ms: u64,
    pub requested_on: String,
}

/// A replicated API token: its SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub sha256_hex: String,
    pub created_at_ms: u64,
    pub created_on: String,
}

impl Body {
    pub fn as_host(&self) -> Option<&ProxyHost> {
        match self {
            Body::Host(h) => Some(h),
            _ => None,
        }
    }

    pub fn as_drain(&self) -> Option<&DrainRecord> {
        match self {
            Body::Drain(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_token(&self) -> Option<&ApiToken> {
        match self {
            Body::Token(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_claim(&self) -> Option<&NameClaim> {
        match self {
            Body::Claim(c) => Some(c),
            _ => None,
        }
    }

    pub fn as_acme_account(&self) -> Option<&AcmeAccount> {
        match self {
            Body::AcmeAccount(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_acme_order(&self) -> Option<&AcmeOrder> {
        match self {
            Body::AcmeOrder(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_acme_challenge(&self) -> Option<&AcmeChallenge> {
        match self {
            Body::AcmeChallenge(c) => Some(c),
            _ => None,
        }
    }

    pub fn as_acl(&self) -> Option<&AccessList> {
        match self {
            Body::Acl(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_cert(&self) -> Option<&StoredCert> {
        match self {
            Body::Cert(c) => Some(c),
            _ => None,
        }
    }
}

/// A stored record with the metadata replication needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub hlc: u64,
    pub origin: String,
    pub seq: u64,
    /// `None` is a tombstone: a deletion that must win over older writes.
    pub body: Option<Body>,
}

impl Record {
    /// Last-writer-wins order: higher HLC, then higher origin id, so every
    /// node picks the same winner whatever order records arrive in.
    pub fn supersedes(&self, other: &Record) -> bool {
        (self.hlc, &self.origin) > (other.hlc, &other.origin)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("unknown record encoding version {0} (written by a newer release?)")]
    UnknownVersion(u8),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] prost::DecodeError),
    #[error("record has no body and is not a tombstone")]
    NoBody,
}

pub fn encode(rec: &Record) -> Vec<u8> {
    let msg = pb::Record {
        hlc: rec.hlc,
        origin: rec.origin.clone(),
        seq: rec.seq,
        tombstone: rec.body.is_none(),
        body: rec.body.as_ref().map(|b| match b {
            Body::Host(h) => pb::record::Body::Host(host_to_pb(h)),
            Body::Cert(c) => pb::record::Body::Cert(cert_to_pb(c)),
            Body::Token(t) => pb::record::Body::Token(pb::TokenRecord {
                id: t.id.clone(),
                name: t.name.clone(),
                sha256_hex: t.sha256_hex.clone(),
                created_at_ms: t.created_at_ms,
                created_on: t.created_on.clone(),
            }),
            Body::Drain(d) => pb::record::Body::Drain(pb::DrainRecord {
                node_id: d.node_id.clone(),
                deadline_ms: d.deadline_ms,
                spread_secs: d.spread_secs,
                requested_at_ms: d.requested_at_ms,
                requested_on: d.requested_on.clone(),
            }),
            Body::Claim(c) => pb::record::Body::Claim(pb::NameClaim {
                domain: c.domain.clone(),
                host_id: c.host_id.clone(),
            }),
            Body::AcmeAccount(a) => pb::record::Body::AcmeAccount(acme::account_to_pb(a)),
            Body::AcmeOrder(o) => pb::record::Body::AcmeOrder(acme::order_to_pb(o)),
            Body::AcmeChallenge(c) => pb::record::Body::AcmeChallenge(acme::challenge_to_pb(c)),
            Body::Acl(a) => pb::record::Body::Acl(crate::access::to_pb(a)),
        }),
    };
    let mut out = Vec::with_capacity(1 + msg.encoded_len());
    out.push(VERSION_1);
    msg.encode(&mut out).expect("Vec grows as needed");
    out
}

pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION_1 {
        return Err(DecodeError::UnknownVersion(version));
    }
    let msg = pb::Record::decode(rest)?;
    let body = if msg.tombstone {
        None
    } else {
        Some(match msg.body.ok_or(DecodeError::NoBody)? {
            pb::record::Body::Host(h) => Body::Host(host_from_pb(h)),
            pb::record::Body::Cert(c) => Body::Cert(cert_from_pb(c)),
            pb::record::Body::Token(t) => Body::Token(ApiToken {
                id: t.id,
                name: t.name,
                sha256_hex: t.sha256_hex,
                created_at_ms: t.created_at_ms,
                created_on: t.created_on,
            }),
            pb::record::Body::Drain(d) => Body::Drain(DrainRecord {
                node_id: d.node_id,
                deadline_ms: d.deadline_ms,
                spread_secs: d.spread_secs,
                requested_at_ms: d.requested_at_ms,
                requested_on: d.requested_on,
            }),
            pb::record::Body::Claim(c) => Body::Claim(NameClaim {
                domain: c.domain,
                host_id: c.host_id,
            }),
            pb::record::Body::AcmeAccount(a) => Body::AcmeAccount(acme::account_from_pb(a)),
            pb::record::Body::AcmeOrder(o) => Body::AcmeOrder(acme::order_from_pb(o)),
            pb::record::Body::AcmeChallenge(c) => Body::AcmeChallenge(acme::challenge_from_pb(c)),
            pb::record::Body::Acl(a) => Body::Acl(crate::access::from_pb(a)),
        })
    };
    Ok(Record {
        hlc: msg.hlc,
        origin: msg.origin,
        seq: msg.seq,
        body,
    })
}

fn host_to_pb(h: &ProxyHost) -> pb::HostRecord {
    pb::HostRecord {
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
            .map(|l| pb::LocationRecord {
                path_prefix: l.path_prefix.clone(),
                upstreams: l.upstreams.clone(),
                balancing: super::balance::to_pb(&l.balancing),
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
        create_key: h.create_key.clone(),
        no_acme: h.no_acme,
        balancing: super::balance::to_pb(&h.balancing),
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

fn host_from_pb(h: pb::HostRecord) -> ProxyHost {
    ProxyHost {
        id: h.id,
        name: h.name,
        domains: h.domains,
        upstreams: h.upstreams,
        enabled: h.enabled,
        websocket: h.websocket,
        preserve_host: h.preserve_host,
        forwarded_headers: h.forwarded_headers,
        locations: h
            .locations
            .into_iter()
            .map(|l| Location {
                path_prefix: l.path_prefix,
                upstreams: l.upstreams,
                balancing: super::balance::from_pb(l.balancing),
                acl: l.acl,
                rate_limit: l.rate_limit,
                rate_key: l.rate_key,
                rate_limit_scope: l.rate_limit_scope,
            })
            .collect(),
        ws_idle_timeout_secs: h.ws_idle_timeout_secs,
        ws_ping_interval_secs: h.ws_ping_interval_secs,
        upstream_timeout_ms: h.upstream_timeout_ms,
        created_at_ms: h.created_at_ms,
        updated_at_ms: h.updated_at_ms,
        version: h.version,
        cert_id: h.cert_id,
        force_https: h.force_https,
        hsts_max_age_secs: h.hsts_max_age_secs,
        hsts_include_subdomains: h.hsts_include_subdomains,
        upstream_ca_pem: h.upstream_ca_pem,
        upstream_insecure_skip_verify: h.upstream_insecure_skip_verify,
        create_key: h.create_key,
        no_acme: h.no_acme,
        balancing: super::balance::from_pb(h.balancing),
        acl: h.acl,
        redirect_to: h.redirect_to,
        redirect_code: h.redirect_code,
        redirect_keep_path: h.redirect_keep_path,
        rate_limit: h.rate_limit,
        rate_key: h.rate_key,
        rate_limit_scope: h.rate_limit_scope,
        max_conns_per_ip: h.max_conns_per_ip,
    }
}

fn cert_to_pb(c: &StoredCert) -> pb::CertRecord {
    pb::CertRecord {
        id: c.id.clone(),
        name: c.name.clone(),
        cert_pem: c.cert_pem.clone(),
        key_sealed: c.key_sealed.clone(),
        key_nonce: c.key_nonce.clone(),
        key_id: c.key_id.clone(),
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
        source: c.source.clone(),
    }
}

fn cert_from_pb(c: pb::CertRecord) -> StoredCert {
    StoredCert {
        id: c.id,
        name: c.name,
        cert_pem: c.cert_pem,
        key_sealed: c.key_sealed,
        key_nonce: c.key_nonce,
        key_id: c.key_id,
        domains: c.domains,
        not_before_ms: c.not_before_ms,
        not_after_ms: c.not_after_ms,
        issuer: c.issuer,
        subject: c.subject,
        serial: c.serial,
        fingerprint_sha256: c.fingerprint_sha256,
        key_type: c.key_type,
        chain_length: c.chain_length,
        created_at_ms: c.created_at_ms,
        updated_at_ms: c.updated_at_ms,
        version: c.version,
        source: c.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_hosts_and_tombstones() {
        let host = ProxyHost {
            id: "x".into(),
            name: "n".into(),
            domains: vec!["a.com".into()],
            upstreams: vec!["http://1.2.3.4:80".into()],
            enabled: true,
            websocket: false,
            preserve_host: true,
            forwarded_headers: false,
            locations: vec![Location {
                path_prefix: "/a".into(),
                upstreams: vec!["http://b:1".into()],
                balancing: crate::host::Balancing {
                    lb: "least-conn".into(),
                    max_conns: 3,
                    ..Default::default()
                },
                acl: "loc".into(),
                rate_limit: "3/s,burst=3".into(),
                rate_key: "header:x-key".into(),
                rate_limit_scope: "node".into(),
            }],
            ws_idle_timeout_secs: 5,
            ws_ping_interval_secs: 6,
            upstream_timeout_ms: 7,
            created_at_ms: 8,
            updated_at_ms: 9,
            version: 10,
            cert_id: "c".into(),
            force_https: true,
            hsts_max_age_secs: 11,
            hsts_include_subdomains: true,
            upstream_ca_pem: "pem".into(),
            upstream_insecure_skip_verify: true,
            create_key: "k".into(),
            no_acme: true,
            balancing: crate::host::Balancing {
                lb: "hash:cookie=sid".into(),
                set_cookie: true,
                weights: [("http://1.2.3.4:80".to_string(), 3)].into(),
                health: crate::host::balance::HealthCheck {
                    path: "/healthz".into(),
                    interval_ms: 2000,
                    timeout_ms: 1000,
                    rise: 2,
                    fall: 3,
                    status_min: 200,
                    status_max: 399,
                },
                ..Default::default()
            },
            acl: "office".into(),
            redirect_to: "https://b.com".into(),
            redirect_code: 307,
            redirect_keep_path: true,
            rate_limit: "5/s,burst=5".into(),
            rate_key: "ip".into(),
            rate_limit_scope: "node".into(),
            max_conns_per_ip: 7,
        };
        let cert = StoredCert {
            id: "c".into(),
            key_sealed: vec![1, 2],
            domains: vec!["a.com".into()],
            chain_length: 2,
            ..Default::default()
        };
        let claim = Body::Claim(NameClaim {
            domain: "a.com".into(),
            host_id: "x".into(),
        });
        for body in [
            Some(Body::Host(host)),
            Some(Body::Cert(cert)),
            Some(claim),
            None,
        ] {
            let rec = Record {
                hlc: 42,
                origin: "node-a".into(),
                seq: 3,
                body,
            };
            let bytes = encode(&rec);
            assert_eq!(bytes[0], 1);
            assert_eq!(decode(&bytes).unwrap(), rec);
        }
    }

    #[test]
    fn refuses_unknown_versions() {
        assert!(matches!(
            decode(&[9, 1, 2]),
            Err(DecodeError::UnknownVersion(9))
        ));
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
    }

    #[test]
    fn lww_order_is_total() {
        let a = Record {
            hlc: 1,
            origin: "a".into(),
            seq: 1,
            body: None,
        };
        let b = Record {
            hlc: 1,
            origin: "b".into(),
            seq: 1,
            body: None,
        };
        let c = Record {
            hlc: 2,
            origin: "a".into(),
            seq: 2,
            body: None,
        };
        assert!(b.supersedes(&a) && !a.supersedes(&b));
        assert!(c.supersedes(&b));
        assert!(!a.supersedes(&a));
    }
}
