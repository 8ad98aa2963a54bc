//! The access-list step of the request-policy phase
//! ([`super::pipeline::request_policy`]): which list a request answers to,
//! the client's address it is judged by, and the refusal it gets.
//!
//! Routes hold an [`AclSlot`] per list they name, taken from the
//! [`AclRegistry`] when the route is compiled; a change to a list swaps the
//! compiled list in its slot, so neither the route table nor a request
//! pays for lists that did not change, and a host without a list pays one
//! `bool` test.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::StatusCode;

use crate::access::compiled::{CompiledAcl, Decision};
use crate::access::AccessList;
use crate::store::Changed;

/// The compiled form of one named list, swapped when the list changes.
/// Empty while the list is unknown here (deleted, or not yet replicated):
/// requests to a host naming it are then refused, never let through.
pub struct AclSlot {
    pub name: Arc<str>,
    current: ArcSwapOption<CompiledAcl>,
}

impl AclSlot {
    pub fn load(&self) -> Option<Arc<CompiledAcl>> {
        self.current.load_full()
    }
}

/// Every list a route may name, by name; shared by the proxy and the
/// route builder. Slots stay once made (a few bytes per name ever used).
#[derive(Clone, Default)]
pub struct AclRegistry(Arc<Mutex<HashMap<String, Arc<AclSlot>>>>);

impl AclRegistry {
    /// The slot for `name`, made empty if the list is not known yet.
    pub fn slot(&self, name: &str) -> Arc<AclSlot> {
        self.0
            .lock()
            .expect("acl registry")
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(AclSlot {
                    name: Arc::from(name),
                    current: ArcSwapOption::empty(),
                })
            })
            .clone()
    }

    /// Compiles the lists a commit changed into their slots.
    pub fn apply(&self, changes: &[Changed<AccessList>]) {
        for c in changes {
            let compiled = c.new.as_deref().map(|l| Arc::new(CompiledAcl::compile(l)));
            self.slot(&c.id).current.store(compiled);
            tracing::debug!(acl = %c.id, present = c.new.is_some(), "access list published");
        }
    }
}

/// Why a request was refused, for the log line and the metric label,
/// and what the client is told (the pipeline makes it an error page).
pub struct Refusal {
    pub acl: Arc<str>,
    /// `#3 deny 0.0.0.0/0`, `default deny`, `basic auth` or `unknown list`.
    pub rule: Arc<str>,
    /// 403, or 401 with `challenge` for `WWW-Authenticate`.
    pub status: StatusCode,
    pub detail: String,
    pub challenge: Option<String>,
}

/// Judges one request by `slot`'s list: `None` lets it through.
/// `authorization` gives the request's `Authorization` values; it is only
/// read when the address rules allow and the list has users.
pub fn check<'a>(
    slot: &AclSlot,
    client: IpAddr,
    authorization: impl Iterator<Item = &'a [u8]>,
) -> Option<Refusal> {
    let Some(acl) = slot.load() else {
        return Some(Refusal {
            acl: slot.name.clone(),
            rule: Arc::from("unknown list"),
            status: StatusCode::FORBIDDEN,
            detail: format!(
                "access list {:?} of this host is not known on this node yet",
                slot.name
            ),
            challenge: None,
        });
    };
    match acl.decide(client, authorization) {
        Decision::Allow => None,
        Decision::Deny { rule } => {
            let verdict = crate::access::compiled::Verdict { allow: false, rule };
            Some(Refusal {
                acl: acl.name.clone(),
                rule: acl.describe(verdict).clone(),
                status: StatusCode::FORBIDDEN,
                detail: format!("access from {client} is not allowed here"),
                challenge: None,
            })
        }
        Decision::Unauthorized => Some(Refusal {
            acl: acl.name.clone(),
            rule: acl.auth_text.clone(),
            status: StatusCode::UNAUTHORIZED,
            detail: "this site needs a user name and password".to_string(),
            challenge: Some(acl.challenge.clone()),
        }),
    }
}

/// At most one log line per key and interval: a client hammering a denied
/// host must not flood the log. The lines left out are counted into the
/// next one.
pub struct LogLimiter {
    every: Duration,
    seen: Mutex<Seen>,
}

/// (host, client) → when a line was last logged, lines left out since.
type Seen = HashMap<(Arc<str>, IpAddr), (Instant, u64)>;

/// Beyond this many keys the table is emptied (a scan from many addresses
/// then logs a little more, never unbounded memory).
const LIMITER_KEYS: usize = 10_000;

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::default(),
        }
    }

    /// `Some(n)` when a line is due now, `n` being how many were left out
    /// since the last one.
    pub fn due(&self, host: &Arc<str>, client: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("log limiter");
        if seen.len() >= LIMITER_KEYS {
            seen.clear();
        }
        match seen.get_mut(&(host.clone(), client)) {
            Some((last, skipped)) if now.duration_since(*last) < self.every => {
                *skipped += 1;
                None
            }
            Some((last, skipped)) => {
                let n = *skipped;
                (*last, *skipped) = (now, 0);
                Some(n)
            }
            None => {
                seen.insert((host.clone(), client), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AccessRule;

    fn changed(list: Option<AccessList>) -> Changed<AccessList> {
        Changed {
            id: "office".into(),
            old: None,
            new: list.map(Arc::new),
        }
    }

    #[test]
    fn a_slot_follows_its_list_and_refuses_while_unknown() {
        let reg = AclRegistry::default();
        let slot = reg.slot("office");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let r = check(&slot, ip, std::iter::empty()).expect("unknown list refuses");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(&*r.rule, "unknown list");
        let list = AccessList {
            name: "office".into(),
            rules: vec![AccessRule {
                allow: true,
                cidr: "10.0.0.0/8".into(),
            }],
            default_allow: false,
            ..Default::default()
        };
        reg.apply(&[changed(Some(list))]);
        assert!(check(&slot, ip, std::iter::empty()).is_none());
        let r = check(&slot, "11.0.0.1".parse().unwrap(), std::iter::empty()).unwrap();
        assert_eq!(&*r.rule, "default deny");
        assert!(r.detail.contains("11.0.0.1"), "{}", r.detail);
        reg.apply(&[changed(None)]);
        assert!(check(&slot, ip, std::iter::empty()).is_some());
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_interval() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        let h: Arc<str> = Arc::from("h");
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(l.due(&h, a), Some(0));
        assert_eq!(l.due(&h, a), None);
        assert_eq!(l.due(&h, a), None);
        assert_eq!(l.due(&h, b), Some(0));
        let l = LogLimiter::new(Duration::ZERO);
        assert_eq!(l.due(&h, a), Some(0));
        assert_eq!(l.due(&h, a), Some(0));
    }
}
