//! Certificates: the stored record, and the checks an upload must pass.

use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use super::seal::{DataKey, SealError};
use crate::validate::FieldError;

/// Certificates expiring sooner than this are accepted with a warning.
pub const EXPIRY_WARNING_DAYS: u64 = 30;
const DAY_MS: u64 = 86_400_000;

/// A certificate as stored: the public chain in PEM, the private key sealed
/// with the node's data key, and metadata derived once at upload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredCert {
    pub id: String,
    pub name: String,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
    pub key_nonce: Vec<u8>,
    pub key_id: String,
    pub domains: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub issuer: String,
    pub subject: String,
    pub serial: String,
    pub fingerprint_sha256: String,
    pub key_type: String,
    pub chain_length: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub version: u64,
    /// `acme` for a certificate the cluster ordered; empty = uploaded.
    pub source: String,
}

/// What an upload yields once it passed every check.
pub struct ParsedCert {
    pub meta: StoredCert,
    pub key_pem: String,
    pub warnings: Vec<String>,
}

fn bad(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(field, reason)
}

fn ms(t: ASN1Time) -> u64 {
    u64::try_from(t.timestamp())
        .unwrap_or(0)
        .saturating_mul(1000)
}

fn date(ms: u64) -> String {
    crate::util::rfc3339_secs(ms)
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(chain)
}

/// Parses and checks an upload: PEM, key matches the leaf, chain in order,
/// currently valid. Nothing here touches the store.
pub fn parse_and_validate(
    cert_pem: &str,
    key_pem: &str,
    now_ms: u64,
) -> Result<ParsedCert, FieldError> {
    let chain = parse_chain(cert_pem).map_err(|e| bad("cert_pem", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        bad(
            "key_pem",
            format!("no usable private key (PKCS#8, RSA or EC PEM expected): {e}"),
        )
    })?;
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            parse_x509_certificate(der.as_ref())
                .map(|(_, c)| c)
                .map_err(|e| {
                    bad(
                        "cert_pem",
                        format!("certificate {} cannot be parsed: {e}", i + 1),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(bad(
                "cert_pem",
                format!(
                    "chain out of order: certificate {} ({}) is not issued by certificate {} ({}); put the leaf first, then each issuer",
                    i + 1,
                    pair[0].subject(),
                    i + 2,
                    pair[1].subject()
                ),
            ));
        }
    }
    let leaf = &parsed[0];
    let not_before_ms = ms(leaf.validity().not_before);
    let not_after_ms = ms(leaf.validity().not_after);
    if not_after_ms <= now_ms {
        return Err(bad(
            "cert_pem",
            format!("the certificate expired on {}", date(not_after_ms)),
        ));
    }
    if not_before_ms > now_ms {
        return Err(bad(
            "cert_pem",
            format!(
                "the certificate is not valid before {}",
                date(not_before_ms)
            ),
        ));
    }
    let mut warnings = Vec::new();
    let days_left = (not_after_ms - now_ms) / DAY_MS;
    if days_left < EXPIRY_WARNING_DAYS {
        warnings.push(format!(
            "the certificate expires in {days_left} days ({})",
            date(not_after_ms)
        ));
    }
    let mut domains = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => domains.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => domains.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("len 4"))
                            .to_string(),
                    ),
                    16 => domains.push(format!(
                        "[{}]",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("len 16"))
                    )),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if domains.is_empty() {
        return Err(bad(
            "cert_pem",
            "the certificate has no subjectAltName DNS names or IPs; clients would refuse it",
        ));
    }
    let key_type = match leaf.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(x509_parser::public_key::PublicKey::EC(ec)) => format!("ECDSA P-{}", ec.key_size()),
        _ if leaf.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            "Ed25519".into()
        }
        _ => leaf.public_key().algorithm.algorithm.to_id_string(),
    };
    let meta = StoredCert {
        domains,
        not_before_ms,
        not_after_ms,
        issuer: leaf.issuer().to_string(),
        subject: leaf.subject().to_string(),
        serial: colon_hex(leaf.raw_serial()),
        fingerprint_sha256: colon_hex(&Sha256::digest(chain[0].as_ref())),
        key_type,
        chain_length: chain.len() as u32,
        cert_pem: cert_pem.trim().to_string() + "\n",
        ..Default::default()
    };
    drop(parsed);
    CertifiedKey::from_der(chain, key, &default_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            bad("key_pem", "the private key does not match the certificate")
        }
        other => bad("key_pem", format!("unsupported private key: {other}")),
    })?;
    Ok(ParsedCert {
        meta,
        key_pem: key_pem.to_string(),
        warnings,
    })
}

/// A PEM chain and PEM private key, ready for rustls.
pub fn certified_key_from_pem(cert_pem: &str, key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("stored key unreadable: {e}"))?;
    let chain = parse_chain(cert_pem)?;
    CertifiedKey::from_der(chain, der, &default_provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

impl StoredCert {
    /// Seals `key_pem` into this record (bound to its id).
    pub fn seal_key(&mut self, key: &DataKey, key_pem: &str) {
        let (nonce, sealed) = key.seal(key_pem.as_bytes(), &self.id);
        self.key_nonce = nonce;
        self.key_sealed = sealed;
        self.key_id = key.id().to_string();
    }

    /// The chain and opened key, ready for rustls.
    pub fn certified_key(&self, key: &DataKey) -> Result<Arc<CertifiedKey>, String> {
        let pem = key
            .open(&self.key_id, &self.key_nonce, &self.key_sealed, &self.id)
            .map_err(|e: SealError| e.to_string())?;
        certified_key_from_pem(&self.cert_pem, &pem)
    }

    pub fn days_left(&self, now_ms: u64) -> i64 {
        (self.not_after_ms as i64 - now_ms as i64).div_euclid(DAY_MS as i64)
    }
}

#[cfg(test)]
pub mod test_certs {
    //! Certificates made at test time with rcgen.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    pub struct Ca {
        pub issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    pub fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// (chain PEM, key PEM) for `names`, valid from `from` to `to` (unix s).
    pub fn leaf(ca: &Ca, names: &[&str], valid: Option<(i64, i64)>) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        if let Some((from, to)) = valid {
            p.not_before = time_at(from);
            p.not_after = time_at(to);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn time_at(unix: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::*;
    use super::*;

    fn now() -> u64 {
        crate::util::wall_ms()
    }

    #[test]
    fn accepts_a_valid_chain_and_derives_metadata() {
        let ca = ca("Test CA");
        let (cert, key) = leaf(
            &ca,
            &["App.Example.com", "*.example.com", "127.0.0.1"],
            None,
        );
        let chain = format!("{cert}{}", ca.pem);
        let p = parse_and_validate(&chain, &key, now()).unwrap();
        assert_eq!(
            p.meta.domains,
            ["app.example.com", "*.example.com", "127.0.0.1"]
        );
        assert_eq!(p.meta.chain_length, 2);
        assert_eq!(p.meta.key_type, "ECDSA P-256");
        assert!(p.meta.issuer.contains("Test CA"));
        assert_eq!(p.meta.fingerprint_sha256.len(), 32 * 3 - 1);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let ca = ca("Test CA");
        let (cert, key) = leaf(&ca, &["a.com"], None);
        let (_, other_key) = leaf(&ca, &["b.com"], None);
        let t = now() as i64 / 1000;
        let (expired, expired_key) = leaf(&ca, &["a.com"], Some((t - 86400 * 10, t - 86400)));
        let cases = [
            ("garbage", key.as_str(), "cert_pem", "no CERTIFICATE"),
            (cert.as_str(), "garbage", "key_pem", "private key"),
            (
                cert.as_str(),
                other_key.as_str(),
                "key_pem",
                "does not match",
            ),
            (
                expired.as_str(),
                expired_key.as_str(),
                "cert_pem",
                "expired",
            ),
        ];
        for (c, k, field, text) in cases {
            let err = parse_and_validate(c, k, now()).err().expect(text);
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(text), "{err}");
        }
        let out_of_order = format!("{}{cert}", ca.pem);
        let err = parse_and_validate(&out_of_order, &key, now())
            .err()
            .unwrap();
        assert!(
            err.reason.contains("out of order") || err.reason.contains("does not match"),
            "{err}"
        );
        let (leaf2, _) = leaf(&ca, &["c.com"], None);
        let err = parse_and_validate(&format!("{cert}{leaf2}"), &key, now())
            .err()
            .unwrap();
        assert!(err.reason.contains("out of order"), "{err}");
    }

    #[test]
    fn soon_expiring_is_a_warning() {
        let ca = ca("Test CA");
        let t = now() as i64 / 1000;
        let (c, k) = leaf(&ca, &["a.com"], Some((t - 60, t + 86400 * 5)));
        let p = parse_and_validate(&c, &k, now()).unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("expires in"));
    }

    #[test]
    fn sealed_key_round_trips_into_a_certified_key() {
        let ca = ca("Test CA");
        let (c, k) = leaf(&ca, &["a.com"], None);
        let p = parse_and_validate(&c, &k, now()).unwrap();
        let dk = DataKey::from_bytes([7; 32]);
        let mut stored = p.meta;
        stored.id = "c-1".into();
        stored.seal_key(&dk, &p.key_pem);
        assert!(!String::from_utf8_lossy(&stored.key_sealed).contains("PRIVATE KEY"));
        assert!(stored.certified_key(&dk).is_ok());
        assert!(stored.certified_key(&DataKey::from_bytes([8; 32])).is_err());
    }
}
