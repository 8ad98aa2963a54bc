//! Which certificates the cluster should hold: one per enabled host that
//! neither pins a certificate (`--cert`) nor opts out (`--no-acme`), for
//! the host's DNS names. IP literals are left out (public CAs do not issue
//! for them over HTTP-01 here), and so are wildcards: those need DNS-01,
//! which Charon does not do.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::host::ProxyHost;

/// One certificate to hold: its id (also the id of the certificate record
/// and of the order record) and its names, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub id: String,
    pub names: Vec<String>,
    pub host_id: String,
}

/// The id is derived from the names, so every node computes the same one
/// and a host whose names change gets a new certificate (the old one stays
/// until deleted by hand).
pub fn set_id(names: &[String]) -> String {
    let h = Sha256::digest(names.join(",").as_bytes());
    format!("acme-{}", hex::encode(&h[..6]))
}

pub fn orderable(domain: &str) -> bool {
    !domain.starts_with("*.")
        && !domain.starts_with('[')
        && domain.parse::<IpAddr>().is_err()
        && domain.contains('.')
}

/// The certificate a host should get automatically, if any.
fn wanted_for(h: &ProxyHost) -> Option<Wanted> {
    if !h.enabled || h.no_acme || !h.cert_id.is_empty() {
        return None;
    }
    let mut names: Vec<String> = h.domains.iter().filter(|d| orderable(d)).cloned().collect();
    names.sort();
    names.dedup();
    (!names.is_empty()).then(|| Wanted {
        id: set_id(&names),
        names,
        host_id: h.id.clone(),
    })
}

/// The hosts an ACME certificate is for (the `HOSTS` column of `cert
/// list`: such a certificate is served by name, not pinned).
pub fn hosts_of<'a>(
    hosts: impl IntoIterator<Item = &'a ProxyHost>,
    cert_id: &'a str,
) -> impl Iterator<Item = &'a ProxyHost> {
    hosts
        .into_iter()
        .filter(move |h| wanted_for(h).is_some_and(|w| w.id == cert_id))
}

pub fn wanted<'a>(hosts: impl IntoIterator<Item = &'a ProxyHost>) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = hosts.into_iter().filter_map(wanted_for).collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    // Hosts added with the same names on several nodes at once exist side
    // by side until one is removed: they share one certificate.
    out.dedup_by(|a, b| a.id == b.id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(domains: &[&str]) -> ProxyHost {
        ProxyHost {
            id: domains[0].into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            enabled: true,
            ..ProxyHost::default()
        }
    }

    #[test]
    fn dns_names_of_enabled_unpinned_hosts_only() {
        let mut pinned = host(&["p.example"]);
        pinned.cert_id = "c-1".into();
        let mut opted_out = host(&["o.example"]);
        opted_out.no_acme = true;
        let mut disabled = host(&["d.example"]);
        disabled.enabled = false;
        let hosts = [
            host(&["b.example", "a.example", "*.w.example", "10.0.0.1", "[::1]"]),
            host(&["*.only.example", "127.0.0.1"]),
            pinned,
            opted_out,
            disabled,
            host(&["a.example", "b.example"]),
        ];
        let w = wanted(&hosts);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].names, vec!["a.example", "b.example"]);
        assert_eq!(w[0].id, set_id(&w[0].names));
        assert!(w[0].id.starts_with("acme-"));
        let of: Vec<&str> = hosts_of(&hosts, &w[0].id).map(|h| h.id.as_str()).collect();
        assert_eq!(of, vec!["b.example", "a.example"]);
    }
}
