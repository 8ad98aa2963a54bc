//! Which certificate answers a TLS server name.
//!
//! The host that would route the name decides first (the table is fed the
//! store's routed hosts, so that is the one host holding the name
//! cluster-wide): if it pins a certificate, that one is served. Otherwise the best stored certificate
//! for the name: an exact SAN match, then a wildcard SAN (`*.example.com`
//! covers one label, as clients check it), the one valid longest first.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use super::cert::StoredCert;
use crate::names::NameMap;
use crate::util::Fnv;

/// What the table needs of a proxy host that routes: the names it answers
/// for and the certificate it pins (empty: none). Plain data, so TLS does
/// not depend on the host type (whose validation uses TLS to check CA
/// bundles).
#[derive(Debug, Clone, Copy)]
pub struct HostNames<'a> {
    pub domains: &'a [String],
    pub cert_id: &'a str,
}

type Map<K, V> =
    imbl::GenericHashMap<K, V, BuildHasherDefault<Fnv>, imbl::shared_ptr::DefaultSharedPtr>;

/// A certificate naming a SAN, with what ranks it against others that do.
#[derive(Clone)]
struct San {
    not_after_ms: u64,
    id: Arc<str>,
    key: Arc<CertifiedKey>,
}

/// Name → certificate, updated by change (issue 16): persistent maps, so
/// a clone is O(1) and a host or certificate change touches only its own
/// names. Readers load it from an `ArcSwap` and never wait.
#[derive(Clone, Default)]
pub struct CertTable {
    /// Host domain → the certificate id the routing host pins ("" none).
    host_exact: NameMap<Arc<str>>,
    host_wild: NameMap<Arc<str>>,
    /// SAN → every certificate naming it, the one valid longest first
    /// (then by id), so it wins a name two certificates share.
    san_exact: Map<String, Vec<San>>,
    san_wild: Map<String, Vec<San>>,
    /// Certificate id → its opened key.
    keys: Map<String, Arc<CertifiedKey>>,
}

impl CertTable {
    /// The table at once (start-up, tests). `hosts` are the enabled hosts,
    /// with their ids; `certs` the stored certificates with their opened
    /// keys.
    pub fn build<'a>(
        hosts: impl IntoIterator<Item = (&'a str, HostNames<'a>)>,
        certs: &[(Arc<StoredCert>, Arc<CertifiedKey>)],
    ) -> CertTable {
        let mut t = CertTable::default();
        for (c, key) in certs {
            t.set_cert(None, Some((c, key.clone())));
        }
        for (id, names) in hosts {
            t.set_host(id, None, Some(names));
        }
        t
    }

    /// Host `id` changed: `old`/`new` are its names while enabled (`None`
    /// when it was or is absent, deleted or disabled).
    pub fn set_host(&mut self, id: &str, old: Option<HostNames<'_>>, new: Option<HostNames<'_>>) {
        for d in old.iter().flat_map(|h| h.domains) {
            match d.strip_prefix("*.") {
                Some(suffix) => self.host_wild.remove(suffix, id),
                None => self.host_exact.remove(d, id),
            }
        }
        let Some(new) = new else { return };
        let holder: Arc<str> = Arc::from(id);
        let pin: Arc<str> = Arc::from(new.cert_id);
        for d in new.domains {
            match d.strip_prefix("*.") {
                Some(suffix) => self.host_wild.insert(suffix, &holder, pin.clone()),
                None => self.host_exact.insert(d, &holder, pin.clone()),
            }
        }
    }

    /// A certificate changed: `old` as it was (if it was stored), `new`
    /// with its opened key (`None`: deleted, or its key cannot be opened).
    pub fn set_cert(
        &mut self,
        old: Option<&StoredCert>,
        new: Option<(&StoredCert, Arc<CertifiedKey>)>,
    ) {
        if let Some(old) = old {
            for d in &old.domains {
                let (map, name) = san_slot(&mut self.san_exact, &mut self.san_wild, d);
                if let Some(list) = map.get_mut(name) {
                    list.retain(|s| *s.id != *old.id);
                    if list.is_empty() {
                        map.remove(name);
                    }
                }
            }
            self.keys.remove(&old.id);
        }
        let Some((c, key)) = new else { return };
        let id: Arc<str> = Arc::from(c.id.as_str());
        for d in &c.domains {
            let (map, name) = san_slot(&mut self.san_exact, &mut self.san_wild, d);
            let entry = San {
                not_after_ms: c.not_after_ms,
                id: id.clone(),
                key: key.clone(),
            };
            let mut list = map.get(name).cloned().unwrap_or_default();
            list.retain(|s| s.id != id);
            let rank = |s: &San| (std::cmp::Reverse(s.not_after_ms), s.id.clone());
            let at = list.partition_point(|s| rank(s) < rank(&entry));
            list.insert(at, entry);
            map.insert(name.to_string(), list);
        }
        self.keys.insert(c.id.clone(), key);
    }

    /// The opened key of certificate `id`, if the table has it.
    pub fn key(&self, id: &str) -> Option<&Arc<CertifiedKey>> {
        self.keys.get(id)
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
        if let Some(pinned) = host_pin
            .filter(|id| !id.is_empty())
            .and_then(|id| self.keys.get(&**id))
        {
            return Some(pinned.clone());
        }
        self.san_exact
            .get(&name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.san_wild.get(parent))
            })
            .and_then(|list| list.first())
            .map(|s| s.key.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.san_exact.is_empty() && self.san_wild.is_empty()
    }
}

/// The SAN map and key a certificate name goes under (`*.example.com`
/// under `example.com` in the wildcard map).
fn san_slot<'m, 'd>(
    exact: &'m mut Map<String, Vec<San>>,
    wild: &'m mut Map<String, Vec<San>>,
    d: &'d str,
) -> (&'m mut Map<String, Vec<San>>, &'d str) {
    match d.strip_prefix("*.") {
        Some(suffix) => (wild, suffix),
        None => (exact, d),
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
            .enumerate()
            .map(|(i, (domains, cert_id))| (["h0", "h1"][i], HostNames { domains, cert_id }));
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

    /// Changes applied one by one give what a table built from the final
    /// state gives: a replaced certificate's old names go, a deleted pin
    /// falls back to the SAN match, the later expiry wins a shared name.
    #[test]
    fn changes_match_a_build() {
        let ca = ca("CA");
        let a1 = stored("a", &["a.example.com", "old.example.com"], &ca);
        let a2 = stored("a", &["a.example.com"], &ca);
        let b = stored("b", &["a.example.com", "b.example.com"], &ca);
        let (hd, hc) = host(&["b.example.com"], "a");
        let mut t = CertTable::default();
        t.set_cert(None, Some((&a1.0, a1.1.clone())));
        t.set_cert(None, Some((&b.0, b.1.clone())));
        t.set_host(
            "h",
            None,
            Some(HostNames {
                domains: &hd,
                cert_id: &hc,
            }),
        );
        assert!(
            Arc::ptr_eq(&t.resolve("b.example.com").unwrap(), &a1.1),
            "the pin wins"
        );
        t.set_cert(Some(&a1.0), Some((&a2.0, a2.1.clone())));
        assert!(
            t.resolve("old.example.com").is_none(),
            "the replaced cert's name went"
        );
        assert!(
            Arc::ptr_eq(&t.resolve("b.example.com").unwrap(), &a2.1),
            "the pin follows"
        );
        t.set_cert(Some(&a2.0), None);
        assert!(
            Arc::ptr_eq(&t.resolve("b.example.com").unwrap(), &b.1),
            "falls back to SAN"
        );
        assert!(Arc::ptr_eq(&t.resolve("a.example.com").unwrap(), &b.1));
        let built = CertTable::build(
            [(
                "h",
                HostNames {
                    domains: &hd,
                    cert_id: &hc,
                },
            )],
            std::slice::from_ref(&b),
        );
        for name in ["a.example.com", "b.example.com", "old.example.com"] {
            let key = |t: &CertTable| t.resolve(name).map(|k| Arc::as_ptr(&k));
            assert_eq!(key(&t), key(&built), "{name}");
        }
    }
}
