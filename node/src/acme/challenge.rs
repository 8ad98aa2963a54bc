//! Challenge answers, given by every node.
//!
//! HTTP-01 needs no replication: the answer to
//! `/.well-known/acme-challenge/<token>` is `<token>.<account thumbprint>`
//! for any well-formed token, so any node that knows the cluster's account
//! thumbprint (a replicated, public value) answers, whichever node ordered.
//! The front ends call [`http01_answer`] before routing: validation also
//! works for hosts that are disabled or force HTTPS.
//!
//! TLS-ALPN-01 carries no token, so its certificate ([`alpn_certificate`])
//! is replicated as a record and served by `tls` to handshakes offering
//! `acme-tls/1`.

use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair};

pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The thumbprint of the account of this node's directory. Process-wide
/// because the front ends that answer hold no ACME state; a process runs
/// one node, and a node one ACME account.
static THUMBPRINT: RwLock<Option<Arc<str>>> = RwLock::new(None);

/// Set when the account record appears (or changes); `None` turns HTTP-01
/// answers off.
pub fn set_thumbprint(thumbprint: Option<&str>) {
    let mut t = THUMBPRINT.write().unwrap_or_else(|e| e.into_inner());
    if t.as_deref() != thumbprint {
        *t = thumbprint.map(Arc::from);
    }
}

/// A token as RFC 8555 §8.3 makes them: base64url, no padding. Anything
/// else is not ours to answer (and never echoed back).
fn well_formed(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The HTTP-01 key authorization for a request target (origin-form or
/// absolute-form), or `None` when it is no challenge path, the token is
/// malformed, or this node has no ACME account. The host does not matter:
/// the answer only proves control of the account key, and the CA asks for
/// the name it validates.
pub fn http01_answer(target: &str) -> Option<String> {
    let path = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    let path = path.split(['?', '#']).next()?;
    let token = path.strip_prefix(HTTP01_PREFIX)?;
    if !well_formed(token) {
        return None;
    }
    let t = THUMBPRINT.read().unwrap_or_else(|e| e.into_inner());
    t.as_ref().map(|thumb| format!("{token}.{thumb}"))
}

/// A TLS-ALPN-01 certificate for `domain` (RFC 8737): self-signed, the
/// name as its only SAN, and the critical acmeIdentifier extension holding
/// the SHA-256 of the key authorization. Returns (cert PEM, key PEM).
pub fn alpn_certificate(domain: &str, key_auth_sha256: &[u8]) -> Result<(String, String), String> {
    if key_auth_sha256.len() != 32 {
        return Err("the key authorization digest must be 32 bytes".into());
    }
    let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(key_auth_sha256)];
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";

    #[test]
    fn answers_well_formed_tokens_only_with_an_account() {
        set_thumbprint(None);
        let path = format!("{HTTP01_PREFIX}{TOKEN}");
        assert_eq!(http01_answer(&path), None);
        set_thumbprint(Some("THUMB"));
        assert_eq!(http01_answer(&path), Some(format!("{TOKEN}.THUMB")));
        assert_eq!(
            http01_answer(&format!("http://a.example{path}?x=1")),
            Some(format!("{TOKEN}.THUMB"))
        );
        for bad in [
            format!("{HTTP01_PREFIX}short"),
            format!("{HTTP01_PREFIX}{TOKEN}/x"),
            format!("{HTTP01_PREFIX}{TOKEN}%2e"),
            format!("{HTTP01_PREFIX}../{TOKEN}"),
            "/.well-known/other/x".to_string(),
            "/".to_string(),
        ] {
            assert_eq!(http01_answer(&bad), None, "{bad}");
        }
    }

    #[test]
    fn alpn_certificate_carries_the_identifier() {
        let (cert, key) = alpn_certificate("a.example", &[7u8; 32]).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let chain = crate::tls::cert::parse_chain(&cert).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
        let ext = x509
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // OCTET STRING (0x04, 32 bytes) of the digest.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], &[7u8; 32]);
    }
}
