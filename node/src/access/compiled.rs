//! An access list ready for the request path, built once per version of
//! the list (when it changes), never per request.
//!
//! The address rules become sorted, disjoint ranges per address family,
//! each carrying the verdict of the first rule that covers it, so a
//! decision is one binary search whatever the number of rules: 1,000
//! CIDRs cost about ten comparisons. A credential's verdict is remembered
//! (by the SHA-256 of the `Authorization` value, for [`VERIFIED_TTL`], at
//! most [`VERIFIED_CAP`] of them) so argon2, deliberately slow, runs once a
//! minute per user and password rather than on every request; and it runs
//! off the runtime's threads ([`Pending::verify`], called by
//! `proxy/access.rs` in `spawn_blocking`): [`CompiledAcl::decide`] says
//! [`Decision::Verify`] for a credential it has not judged yet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::{action_name, AccessList};
use crate::cidr::Cidr;

/// What the rules say of one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// Index of the deciding rule; `None` = the default.
    pub rule: Option<u32>,
}

/// Disjoint ranges covering a whole address space, by start.
#[derive(Debug, Default)]
struct Ranges {
    starts: Vec<u128>,
    verdicts: Vec<Verdict>,
}

impl Ranges {
    /// `rules` are (first, last, allow) in rule order; the earliest rule
    /// covering an address decides. Built by cutting the space at every
    /// range edge and painting the pieces with the rules from last to
    /// first, so earlier rules paint over later ones.
    fn build(rules: &[(u128, u128, bool, u32)], default: Verdict) -> Ranges {
        let mut cuts: Vec<u128> = Vec::with_capacity(rules.len() * 2 + 1);
        cuts.push(0);
        for &(first, last, _, _) in rules {
            cuts.push(first);
            if let Some(after) = last.checked_add(1) {
                cuts.push(after);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut verdicts = vec![default; cuts.len()];
        for &(first, last, allow, rule) in rules.iter().rev() {
            let from = cuts.partition_point(|&c| c < first);
            let to = cuts.partition_point(|&c| c <= last);
            for v in &mut verdicts[from..to] {
                *v = Verdict {
                    allow,
                    rule: Some(rule),
                };
            }
        }
        // Neighbours decided by the same rule are one range.
        let mut out = Ranges::default();
        for (c, v) in cuts.into_iter().zip(verdicts) {
            if out.verdicts.last() != Some(&v) {
                out.starts.push(c);
                out.verdicts.push(v);
            }
        }
        out
    }

    fn lookup(&self, x: u128) -> Verdict {
        // `starts[0]` is 0, so there is always a range at or below x.
        let i = self.starts.partition_point(|&s| s <= x);
        self.verdicts[i - 1]
    }
}

/// The outcome of a list for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused by the address rules (`rule`: the deciding rule's index,
    /// `None` = the default).
    Deny {
        rule: Option<u32>,
    },
    /// Allowed by address but the list needs basic auth and the request
    /// carried no valid credentials; `presented`: it carried wrong ones
    /// (`Basic` with an unknown user or a wrong password), which count
    /// towards the client's failures.
    Unauthorized {
        presented: bool,
    },
    /// Allowed by address; the request's `Basic` credentials have not been
    /// judged recently: verify them ([`Pending::verify`], slow), tell the
    /// list ([`CompiledAcl::remember`]) and decide again.
    Verify(Pending),
}

/// A credential to verify against a user's argon2 hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Pending {
    /// SHA-256 of the `Authorization` value: the key of its verdict.
    pub digest: [u8; 32],
    hash: String,
    password: String,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending { .. }")
    }
}

impl Pending {
    /// Whether the password matches: argon2 (tens of ms of CPU and 19 MiB),
    /// so callers run it off the async runtime.
    pub fn verify(&self) -> bool {
        PasswordHash::new(&self.hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(self.password.as_bytes(), &h)
                .is_ok()
        })
    }
}

/// A verdict just reached for one credential, handed to the next
/// [`CompiledAcl::decide`] of the same request: it holds even if the
/// list's memory of it was emptied meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub digest: [u8; 32],
    pub ok: bool,
}

pub struct CompiledAcl {
    pub name: Arc<str>,
    pub version: u64,
    v4: Ranges,
    v6: Ranges,
    /// Rule text for logs and metric labels: `#2 deny 0.0.0.0/0`, made
    /// once so a refusal allocates nothing.
    rule_text: Vec<Arc<str>>,
    default_text: Arc<str>,
    /// The label of refusals for want of credentials.
    pub auth_text: Arc<str>,
    users: Vec<(String, String)>,
    /// `Basic realm="..."`, made once.
    pub challenge: String,
    /// Verdicts on `Authorization` values by their SHA-256, with when each
    /// was reached: argon2 runs once per credential and [`VERIFIED_TTL`].
    /// Bounded: at [`VERIFIED_CAP`], expired ones go, then all.
    verified: Mutex<HashMap<[u8; 32], (bool, Instant)>>,
}

/// Most credentials remembered per list.
pub const VERIFIED_CAP: usize = 4096;
/// How long a verdict is remembered: a client keeps its credentials for
/// a session, so this saves all but one argon2 a minute; short, so the
/// memory of a credential does not outlive much of what an operator does
/// (a changed list is compiled afresh and forgets all of them at once).
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);

impl CompiledAcl {
    pub fn compile(list: &AccessList) -> CompiledAcl {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut rule_text = Vec::with_capacity(list.rules.len());
        for (i, r) in list.rules.iter().enumerate() {
            rule_text.push(Arc::from(format!(
                "#{} {} {}",
                i + 1,
                action_name(r.allow),
                r.cidr
            )));
            // Stored lists are validated; one that does not parse (an
            // older release's rules) is skipped, logged.
            let Ok(c) = r.cidr.parse::<Cidr>() else {
                tracing::error!(acl = %list.name, rule = i, cidr = %r.cidr, "skipping an unreadable access rule");
                continue;
            };
            let (first, last) = c.range();
            let entry = (first, last, r.allow, i as u32);
            if c.is_v4() {
                v4.push(entry);
            } else {
                v6.push(entry);
            }
        }
        let default = Verdict {
            allow: list.default_allow,
            rule: None,
        };
        CompiledAcl {
            name: Arc::from(list.name.as_str()),
            version: list.version,
            v4: Ranges::build(&v4, default),
            v6: Ranges::build(&v6, default),
            rule_text,
            default_text: Arc::from(format!("default {}", action_name(list.default_allow))),
            auth_text: Arc::from("basic auth"),
            users: list
                .users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            challenge: format!("Basic realm=\"{}\", charset=\"UTF-8\"", list.realm()),
            verified: Mutex::default(),
        }
    }

    /// The address rules' verdict for `ip` (IPv4-mapped IPv6 as IPv4).
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.lookup(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => self.v6.lookup(u128::from(v6)),
        }
    }

    pub fn needs_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// `#n action cidr` of a rule, or `default deny|allow`.
    pub fn describe(&self, v: Verdict) -> &Arc<str> {
        match v.rule {
            Some(i) => &self.rule_text[i as usize],
            None => &self.default_text,
        }
    }

    /// The whole decision: address rules, then (if the list has users)
    /// `authorization`, the request's `Authorization` values, each judged
    /// from memory, from `judged` (a verdict this request waited for), or
    /// else to be verified ([`Decision::Verify`]). Never runs argon2.
    pub fn decide<'a>(
        &self,
        ip: IpAddr,
        authorization: impl Iterator<Item = &'a [u8]>,
        judged: Option<Judged>,
    ) -> Decision {
        let v = self.verdict(ip);
        if !v.allow {
            return Decision::Deny { rule: v.rule };
        }
        if !self.needs_auth() {
            return Decision::Allow;
        }
        let now = Instant::now();
        let mut presented = false;
        for value in authorization {
            let digest: [u8; 32] = Sha256::digest(value).into();
            let known = match judged.filter(|j| j.digest == digest) {
                Some(j) => Some(j.ok),
                None => self.recall(&digest, now),
            };
            match known {
                Some(true) => return Decision::Allow,
                Some(false) => presented = true,
                None => match self.pending(value, digest) {
                    Some(p) => return Decision::Verify(p),
                    None if basic_credentials(value).is_some() => {
                        // An unknown user: wrong without argon2.
                        presented = true;
                        self.remember(digest, false);
                    }
                    None => {}
                },
            }
        }
        Decision::Unauthorized { presented }
    }

    /// What is remembered of `digest`, if not expired.
    fn recall(&self, digest: &[u8; 32], now: Instant) -> Option<bool> {
        let cache = self.verified.lock().expect("acl cache");
        cache
            .get(digest)
            .filter(|(_, at)| now.duration_since(*at) < VERIFIED_TTL)
            .map(|(ok, _)| *ok)
    }

    /// The verification a `Basic` value for a known user needs.
    fn pending(&self, value: &[u8], digest: [u8; 32]) -> Option<Pending> {
        let (user, password) = basic_credentials(value)?;
        let (_, hash) = self.users.iter().find(|(n, _)| *n == user)?;
        Some(Pending {
            digest,
            hash: hash.clone(),
            password,
        })
    }

    /// Remembers a verdict for [`VERIFIED_TTL`].
    pub fn remember(&self, digest: [u8; 32], ok: bool) {
        let now = Instant::now();
        let mut cache = self.verified.lock().expect("acl cache");
        if cache.len() >= VERIFIED_CAP {
            cache.retain(|_, (_, at)| now.duration_since(*at) < VERIFIED_TTL);
            if cache.len() >= VERIFIED_CAP {
                cache.clear();
            }
        }
        cache.insert(digest, (ok, now));
    }
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{hash_password, AccessRule, AccessUser};

    fn list(rules: &[(&str, &str)], default_allow: bool) -> AccessList {
        AccessList {
            name: "t".into(),
            rules: rules
                .iter()
                .map(|(a, c)| AccessRule {
                    allow: *a == "allow",
                    cidr: c.to_string(),
                })
                .collect(),
            default_allow,
            ..Default::default()
        }
    }

    /// The compiled ranges against the plain first-match scan of the
    /// rules, over addresses at and around every edge.
    fn first_match(l: &AccessList, ip: IpAddr) -> bool {
        l.rules
            .iter()
            .find(|r| r.cidr.parse::<Cidr>().unwrap().contains(ip))
            .map_or(l.default_allow, |r| r.allow)
    }

    #[test]
    fn first_match_wins_in_order() {
        let l = list(
            &[
                ("deny", "10.1.0.0/16"),
                ("allow", "10.0.0.0/8"),
                ("allow", "2001:db8::/32"),
                ("deny", "0.0.0.0/0"),
            ],
            true,
        );
        let c = CompiledAcl::compile(&l);
        let cases = [
            ("10.1.2.3", false, Some(0)),
            ("10.2.0.1", true, Some(1)),
            ("11.0.0.1", false, Some(3)),
            ("::ffff:10.2.0.1", true, Some(1)),
            ("2001:db8::5", true, Some(2)),
            ("2001:db9::5", true, None),
        ];
        for (ip, allow, rule) in cases {
            let v = c.verdict(ip.parse().unwrap());
            assert_eq!((v.allow, v.rule), (allow, rule), "{ip}");
        }
        assert_eq!(
            &**c.describe(c.verdict("11.0.0.1".parse().unwrap())),
            "#4 deny 0.0.0.0/0"
        );
        assert_eq!(
            &**c.describe(c.verdict("2001:db9::5".parse().unwrap())),
            "default allow"
        );
    }

    #[test]
    fn ranges_agree_with_a_linear_scan() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..20 {
            let mut rules = Vec::new();
            for _ in 0..rng.random_range(1..40) {
                let a: u32 = rng.random::<u32>() & 0xff0f_0000;
                let p = rng.random_range(4..=32);
                let act = if rng.random() { "allow" } else { "deny" };
                rules.push((act, format!("{}/{p}", std::net::Ipv4Addr::from(a))));
            }
            let refs: Vec<(&str, &str)> = rules.iter().map(|(a, c)| (*a, c.as_str())).collect();
            let l = list(&refs, rng.random());
            let c = CompiledAcl::compile(&l);
            for r in &l.rules {
                let (first, last) = r.cidr.parse::<Cidr>().unwrap().range();
                for x in [
                    first.saturating_sub(1),
                    first,
                    last,
                    last.saturating_add(1).min(u32::MAX as u128),
                ] {
                    let ip = IpAddr::V4((x as u32).into());
                    assert_eq!(
                        c.verdict(ip).allow,
                        first_match(&l, ip),
                        "{ip} in {rules:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_thousand_rules_compile_to_a_search() {
        let rules: Vec<(String, String)> = (0..1000u32)
            .map(|i| {
                (
                    "deny".to_string(),
                    format!("{}/24", std::net::Ipv4Addr::from(0x0b00_0000 + (i << 8))),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = rules
            .iter()
            .map(|(a, c)| (a.as_str(), c.as_str()))
            .collect();
        let c = CompiledAcl::compile(&list(&refs, true));
        assert!(c.v4.starts.len() <= 1002, "{}", c.v4.starts.len());
        assert!(!c.verdict("11.0.3.9".parse().unwrap()).allow);
        assert!(c.verdict("12.0.0.1".parse().unwrap()).allow);
    }

    #[test]
    fn basic_auth_right_wrong_missing() {
        let mut l = list(&[("deny", "192.0.2.0/24")], true);
        l.users = vec![AccessUser {
            name: "alice".into(),
            password_hash: hash_password("s3cret"),
        }];
        let c = CompiledAcl::compile(&l);
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let good = basic("alice:s3cret");
        // Judged as the proxy does: verify what is asked, then decide again
        // with the verdict.
        let judge = |auth: &[String]| {
            let values = || auth.iter().map(|s| s.as_bytes());
            match c.decide(ip, values(), None) {
                Decision::Verify(p) => {
                    let j = Judged {
                        digest: p.digest,
                        ok: p.verify(),
                    };
                    c.remember(j.digest, j.ok);
                    (true, c.decide(ip, values(), Some(j)))
                }
                d => (false, d),
            }
        };
        let wrong = Decision::Unauthorized { presented: true };
        let cases: Vec<(Vec<String>, (bool, Decision))> = vec![
            (vec![], (false, Decision::Unauthorized { presented: false })),
            (vec![basic("alice:wrong")], (true, wrong.clone())),
            // Remembered: a wrong password again costs no argon2 either.
            (vec![basic("alice:wrong")], (false, wrong.clone())),
            (vec![basic("bob:s3cret")], (false, wrong.clone())),
            (
                vec!["Bearer x".into()],
                (false, Decision::Unauthorized { presented: false }),
            ),
            (vec![good.clone()], (true, Decision::Allow)),
            (vec![good.clone()], (false, Decision::Allow)),
        ];
        for (auth, want) in cases {
            assert_eq!(judge(&auth), want, "{auth:?}");
        }
        let denied = c.decide(
            "192.0.2.7".parse().unwrap(),
            [good.as_bytes()].into_iter(),
            None,
        );
        assert_eq!(denied, Decision::Deny { rule: Some(0) });
        // A verdict this request waited for holds even when the memory of
        // it is gone (emptied at the cap).
        c.verified.lock().unwrap().clear();
        let values = || [good.as_bytes()].into_iter();
        assert!(matches!(c.decide(ip, values(), None), Decision::Verify(_)));
        let digest: [u8; 32] = Sha256::digest(good.as_bytes()).into();
        let j = Judged { digest, ok: true };
        assert_eq!(c.decide(ip, values(), Some(j)), Decision::Allow);
        assert!(c.challenge.starts_with("Basic realm=\"t\""));
    }
}
