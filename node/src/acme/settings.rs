//! The `--acme-*` node settings, validated before any port is bound.
//!
//! Every node of a cluster is normally given the same settings. When they
//! differ: only nodes with a directory take part in ordering (rendezvous
//! hashing counts every live member, so a name whose responsible node has
//! no directory waits until that node leaves or gets one — the log says
//! so); the account record is per directory URL, so nodes pointed at
//! different CAs keep separate accounts; and the challenge types a node
//! offers are its own.

use std::path::PathBuf;
use std::time::Duration;

/// A refused setting; `config` turns it into its own error (this module
/// does not depend on `config`, which depends on it).
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub setting: &'static str,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
pub const ZEROSSL: &str = "https://acme.zerossl.com/v2/DV90";

/// Which challenge types the node may use, in the order it prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Validated ACME settings; `None` in [`crate::config::Config`] = off.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL (a name such as `letsencrypt` already expanded).
    pub directory: String,
    pub email: Option<String>,
    /// Extra root(s) trusted when talking to the directory (a test CA).
    pub ca_file: Option<PathBuf>,
    /// External account binding: key id and the HMAC key (decoded).
    pub eab: Option<(String, Vec<u8>)>,
    pub challenges: Vec<ChallengeKind>,
    /// Renew a certificate this long after it was issued instead of at two
    /// thirds of its lifetime (tests; CAs with unusual lifetimes).
    pub renew_after: Option<Duration>,
    /// How long a node's claim on an order lasts without being refreshed:
    /// the takeover time when the node dies.
    pub lease: Duration,
    /// First retry delay after a failure; doubles per failure up to a day.
    pub retry_min: Duration,
    /// How often the node looks for certificates to order or renew.
    pub tick: Duration,
}

/// What the flags, env and TOML file said (already merged by precedence).
#[derive(Debug, Default)]
pub struct Raw {
    pub directory: Option<String>,
    pub email: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub eab_kid: Option<String>,
    pub eab_hmac: Option<String>,
    pub challenges: Vec<String>,
    pub renew_after_secs: Option<u64>,
    pub lease_secs: Option<u64>,
    pub retry_min_secs: Option<u64>,
    pub tick_ms: Option<u64>,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        setting,
        message: message.into(),
    }
}

/// Expands the well-known names; anything else must be an https:// URL
/// (http:// only for loopback test servers).
fn directory_url(v: &str) -> Result<String, Invalid> {
    let url = match v.trim() {
        "letsencrypt" => LETSENCRYPT.to_string(),
        "letsencrypt-staging" => LETSENCRYPT_STAGING.to_string(),
        "zerossl" => ZEROSSL.to_string(),
        other => other.to_string(),
    };
    let ok = match url.parse::<http::Uri>() {
        Ok(u) => u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()),
        Err(_) => false,
    };
    if !ok {
        return Err(invalid(
            "acme_directory",
            format!(
                "{v:?} is not an https:// URL nor one of letsencrypt, letsencrypt-staging, zerossl"
            ),
        ));
    }
    Ok(url)
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl AcmeSettings {
    /// `Ok(None)` when no directory is set: ACME is off, and the other
    /// `acme_*` settings must then be unset too (a forgotten directory
    /// should not look like a working setup).
    pub fn from_raw(raw: Raw) -> Result<Option<AcmeSettings>, Invalid> {
        let Some(dir) = raw.directory.filter(|d| !d.trim().is_empty()) else {
            if raw.email.is_some() || raw.eab_kid.is_some() || raw.ca_file.is_some() {
                return Err(invalid(
                    "acme_directory",
                    "required when other acme_* settings are given",
                ));
            }
            return Ok(None);
        };
        let directory = directory_url(&dir)?;
        let email = raw.email.filter(|e| !e.trim().is_empty());
        if let Some(e) = &email {
            let valid = e.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty() && d.contains('.') && !e.chars().any(|c| c.is_whitespace())
            });
            if !valid {
                return Err(invalid(
                    "acme_email",
                    format!("{e:?} is not an e-mail address"),
                ));
            }
        }
        if let Some(f) = &raw.ca_file {
            let pem = std::fs::read(f).map_err(|e| {
                invalid("acme_ca_file", format!("cannot read {}: {e}", f.display()))
            })?;
            use rustls_pki_types::pem::PemObject;
            let n = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .filter(|c| c.is_ok())
                .count();
            if n == 0 {
                return Err(invalid(
                    "acme_ca_file",
                    format!("{} holds no PEM certificate", f.display()),
                ));
            }
        }
        let eab = match (raw.eab_kid, raw.eab_hmac) {
            (None, None) => None,
            (Some(kid), Some(hmac)) if !kid.is_empty() => {
                let key = base64url_decode(hmac.trim())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        invalid("acme_eab_hmac", "must be base64url (as the CA gives it)")
                    })?;
                Some((kid, key))
            }
            (Some(_), None) => return Err(invalid("acme_eab_hmac", "required with acme_eab_kid")),
            (_, _) => return Err(invalid("acme_eab_kid", "required with acme_eab_hmac")),
        };
        let mut challenges = Vec::new();
        let names: Vec<&str> = raw
            .challenges
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for n in &names {
            let kind = match n.to_ascii_lowercase().as_str() {
                "http-01" => ChallengeKind::Http01,
                "tls-alpn-01" => ChallengeKind::TlsAlpn01,
                "dns-01" => {
                    return Err(invalid(
                        "acme_challenges",
                        "dns-01 is not supported (so no wildcard certificates either)",
                    ))
                }
                _ => {
                    return Err(invalid(
                        "acme_challenges",
                        format!("{n:?} must be http-01 or tls-alpn-01"),
                    ))
                }
            };
            if !challenges.contains(&kind) {
                challenges.push(kind);
            }
        }
        if challenges.is_empty() {
            challenges = vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01];
        }
        let positive = |setting, v: Option<u64>| match v {
            Some(0) => Err(invalid(setting, "must be greater than 0")),
            v => Ok(v),
        };
        Ok(Some(AcmeSettings {
            directory,
            email,
            ca_file: raw.ca_file,
            eab,
            challenges,
            renew_after: positive("acme_renew_after_secs", raw.renew_after_secs)?
                .map(Duration::from_secs),
            lease: Duration::from_secs(positive("acme_lease_secs", raw.lease_secs)?.unwrap_or(45)),
            retry_min: Duration::from_secs(
                positive("acme_retry_min_secs", raw.retry_min_secs)?.unwrap_or(60),
            ),
            tick: Duration::from_millis(positive("acme_tick_ms", raw.tick_ms)?.unwrap_or(2000)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &str) -> Raw {
        Raw {
            directory: Some(dir.into()),
            ..Raw::default()
        }
    }

    #[test]
    fn names_expand_and_defaults_hold() {
        let s = AcmeSettings::from_raw(raw("letsencrypt")).unwrap().unwrap();
        assert_eq!(s.directory, LETSENCRYPT);
        assert_eq!(
            s.challenges,
            vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01]
        );
        assert_eq!(s.lease, Duration::from_secs(45));
        assert!(AcmeSettings::from_raw(Raw::default()).unwrap().is_none());
    }

    #[test]
    fn refusals_name_the_setting() {
        let e = |r: Raw| AcmeSettings::from_raw(r).unwrap_err().to_string();
        assert!(e(raw("http://ca.example/dir")).starts_with("acme_directory:"));
        assert!(e(raw("nonsense")).starts_with("acme_directory:"));
        let mut r = raw("zerossl");
        r.challenges = vec!["dns-01".into()];
        assert!(e(r).starts_with("acme_challenges:"));
        let mut r = raw("zerossl");
        r.eab_kid = Some("kid".into());
        assert!(e(r).starts_with("acme_eab_hmac:"));
        let mut r = raw("zerossl");
        r.email = Some("not-mail".into());
        assert!(e(r).starts_with("acme_email:"));
        let r = Raw {
            email: Some("a@b.c".into()),
            ..Raw::default()
        };
        assert!(e(r).starts_with("acme_directory:"));
        let mut r = raw("letsencrypt");
        r.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(e(r).starts_with("acme_ca_file:"));
    }

    #[test]
    fn eab_and_challenges_parse() {
        let mut r = raw("https://127.0.0.1:14000/dir");
        r.eab_kid = Some("kid-1".into());
        r.eab_hmac = Some("AAEC_w".into());
        r.challenges = vec!["tls-alpn-01".into()];
        let s = AcmeSettings::from_raw(r).unwrap().unwrap();
        assert_eq!(s.eab, Some(("kid-1".to_string(), vec![0, 1, 2, 255])));
        assert_eq!(s.challenges, vec![ChallengeKind::TlsAlpn01]);
    }
}
