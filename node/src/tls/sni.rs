//! Which certificate answers a TLS server name.
//!
//! The host that would route the name decides first: if it pins a
//! certificate, that one is served. Otherwise the best stored certificate
//! for the name: an exact SAN match, then a wildcard SAN (`*.example.com`
//! covers one label, as clients check it), the one valid longest first.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use super::cert::StoredCert;

/// What the table needs of a proxy host that routes: the names it answers
/// for and the certificate it pins (empty: none). Plain data, so TLS does
/// not depend on the host type (whose validation uses TLS to check CA
/// bundles).
#[derive(Debug, Clone, Copy)]
pub struct HostNames<'a> {
    pub domains: &'a [String],
    pub cert_id: &'a str,
}

#[derive(Default)]
pub struct CertTable {
    /// Host domain → the host's pinned certificate (None: host has no pin).
    host_exact: HashMap<String, Option<Arc<CertifiedKey>>>,
    host_wild: HashMap<String, Option<Arc<CertifiedKey>>>,
    san_exact: HashMap<String, Arc<CertifiedKey>>,
    san_wild: HashMap<String, Arc<CertifiedKey>>,
}

impl CertTable {
    /// `hosts` are the enabled hosts; `certs` the stored certificates with
    /// their opened keys.
    pub fn build<'a>(
        hosts: impl IntoIterator<Item = HostNames<'a>>,
        certs: &[(Arc<StoredCert>, Arc<CertifiedKey>)],
    ) -> CertTable {
        let mut t = CertTable::default();
        let mut sorted: Vec<_> = certs.iter().collect();
        // Later expiry first, so it wins a name two certificates share.
        sorted.sort_by_key(|(c, _)| std::cmp::Reverse(c.not_after_ms));
        for (c, key) in &sorted {
            for d in &c.domains {
                let map = match d.strip_prefix("*.") {
                    Some(suffix) => t.san_wild.entry(suffix.to_string()),
                    None => t.san_exact.entry(d.clone()),
                };
                map.or_insert_with(|| key.clone());
            }
        }
        let by_id: HashMap<&str, &Arc<CertifiedKey>> =
            certs.iter().map(|(c, k)| (c.id.as_str(), k)).collect();
        for h in hosts {
            let pin = (!h.cert_id.is_empty())
                .then(|| by_id.get(h.cert_id).map(|k| (*k).clone()))
                .flatten();
            for d in h.domains {
                match d.strip_prefix("*.") {
                    Some(suffix) => t.host_wild.insert(suffix.to_string(), pin.clone()),
                    None => t.host_exact.insert(d.clone(), pin.clone()),
                };
            }
        }
        t
    }

    pub fn resolve(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let host_pin = self.host_exact.get(&name).or_else(|| {
            let mut rest = name.as_str();
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(p) = self.host_wild.get(suffix) {
                    return Some(p);
                }
                rest = suffix;
            }
            None
        });
        if let Some(Some(pinned)) = host_pin {
            return Some(pinned.clone());
        }
        self.san_exact
            .get(&name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.san_wild.get(parent))
            })
            .cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.san_exact.is_empty() && self.san_wild.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cert::parse_and_validate;
    use crate::tls::cert::test_certs::{ca, leaf};
    use crate::tls::seal::DataKey;

    fn stored(
        id: &str,
        names: &[&str],
        ca: &crate::tls::cert::test_certs::Ca,
    ) -> (Arc<StoredCert>, Arc<CertifiedKey>) {
        let (c, k) = leaf(ca, names, None);
        let p = parse_and_validate(&c, &k, crate::util::wall_ms()).unwrap();
        let dk = DataKey::from_bytes([1; 32]);
        let mut s = p.meta;
        s.id = id.into();
        s.seal_key(&dk, &p.key_pem);
        let key = s.certified_key(&dk).unwrap();
        (Arc::new(s), key)
    }

    fn host(domains: &[&str], cert: &str) -> (Vec<String>, String) {
        (domains.iter().map(|s| s.to_string()).collect(), cert.into())
    }

    #[test]
    fn pins_then_exact_then_wildcard() {
        let ca = ca("CA");
        let a = stored("a", &["a.example.com"], &ca);
        let wild = stored("w", &["*.example.com"], &ca);
        let pinned = stored("p", &["other.org"], &ca);
        let hosts = [
            host(&["pinned.example.com"], "p"),
            host(&["a.example.com"], ""),
        ];
        let names = hosts
            .iter()
            .map(|(domains, cert_id)| HostNames { domains, cert_id });
        let t = CertTable::build(names, &[a.clone(), wild.clone(), pinned.clone()]);
        let is = |name: &str, want: &Arc<CertifiedKey>| {
            let got = t
                .resolve(name)
                .unwrap_or_else(|| panic!("{name} unresolved"));
            assert!(Arc::ptr_eq(&got, want), "{name}");
        };
        is("pinned.example.com", &pinned.1);
        is("a.example.com", &a.1);
        is("A.Example.COM", &a.1);
        is("b.example.com", &wild.1);
        assert!(
            t.resolve("x.b.example.com").is_none(),
            "wildcards cover one label"
        );
        assert!(t.resolve("example.com").is_none());
        assert!(t.resolve("unknown.org").is_none());
    }
}
