//! The access-list step of the request-policy phase
//! ([`super::pipeline::request_policy`]): which list a request answers to,
//! the client's address it is judged by, and the refusal it gets.
//!
//! Routes hold an [`AclSlot`] per list they name, taken from the
//! [`AclRegistry`] when the route is compiled; a change to a list swaps the
//! compiled list in its slot, so neither the route table nor a request
//! pays for lists that did not change, and a host without a list pays one
//! `bool` test.
//!
//! Basic auth: a credential not judged in the last minute is verified by
//! [`Verify::run`] on a blocking thread, at most one per core at once
//! (argon2 takes tens of ms and 19 MiB: on the runtime's threads it
//! stalled every connection they serve); the verdict is remembered by the
//! list. A client (IPv4 address or IPv6 /64) that fails [`MAX_FAILURES`]
//! times within [`FAILURE_WINDOW`] gets 429 for [`LOCKOUT`] instead of
//! more guesses ([`AuthGuard`]); credentials already known good still pass.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::header::{HeaderName, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;

use super::limits::ClientKey;
use crate::access::compiled::{CompiledAcl, Decision, Judged, Pending};
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
    /// `#3 deny 0.0.0.0/0`, `default deny`, `basic auth`, `basic auth
    /// throttled` or `unknown list`.
    pub rule: Arc<str>,
    /// 403; 401 with `WWW-Authenticate`; 429 with `Retry-After`.
    pub status: StatusCode,
    pub detail: String,
    /// The one field the answer carries besides the page.
    pub header: Option<(HeaderName, String)>,
}

/// What the access-list step says of one request.
pub enum Checked {
    Pass,
    Refuse(Refusal),
    /// Credentials to verify first ([`Verify::run`]); then the step is run
    /// again with the verdict.
    Verify(Verify),
}

/// One credential to verify, and the list that remembers the verdict.
pub struct Verify {
    acl: Arc<CompiledAcl>,
    pending: Pending,
}

impl Verify {
    /// Runs argon2 on a blocking thread once one of `guard`'s permits is
    /// free; the list remembers the verdict, which is also returned for
    /// the request's next check. A client that leaves meanwhile leaves
    /// the verification to finish (its verdict is remembered all the same).
    pub async fn run(self, guard: &AuthGuard) -> Judged {
        let digest = self.pending.digest;
        guard.verifications.fetch_add(1, Ordering::Relaxed);
        let permit = guard.verifiers.clone().acquire_owned().await;
        let pending = self.pending;
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pending.verify()
        })
        .await
        .unwrap_or(false);
        self.acl.remember(digest, ok);
        Judged { digest, ok }
    }
}

/// Judges one request by `slot`'s list. `authorization` gives the
/// request's `Authorization` values; it is only read when the address
/// rules allow and the list has users. `judged`: the verdict of a
/// verification this request waited for.
pub fn check<'a>(
    slot: &AclSlot,
    client: IpAddr,
    authorization: impl Iterator<Item = &'a [u8]>,
    guard: &AuthGuard,
    judged: Option<Judged>,
) -> Checked {
    let Some(acl) = slot.load() else {
        return Checked::Refuse(Refusal {
            acl: slot.name.clone(),
            rule: Arc::from("unknown list"),
            status: StatusCode::FORBIDDEN,
            detail: format!(
                "access list {:?} of this host is not known on this node yet",
                slot.name
            ),
            header: None,
        });
    };
    let now = Instant::now();
    let locked = match acl.decide(client, authorization, judged) {
        Decision::Allow => return Checked::Pass,
        Decision::Deny { rule } => {
            let verdict = crate::access::compiled::Verdict { allow: false, rule };
            return Checked::Refuse(Refusal {
                acl: acl.name.clone(),
                rule: acl.describe(verdict).clone(),
                status: StatusCode::FORBIDDEN,
                detail: format!("access from {client} is not allowed here"),
                header: None,
            });
        }
        Decision::Verify(pending) => match guard.locked(client, now) {
            None => return Checked::Verify(Verify { acl, pending }),
            locked => locked,
        },
        Decision::Unauthorized { presented: true } => guard.failed(client, now),
        Decision::Unauthorized { presented: false } => guard.locked(client, now),
    };
    Checked::Refuse(match locked {
        Some(left) => {
            let secs = left.as_secs().max(1);
            Refusal {
                acl: acl.name.clone(),
                rule: Arc::from("basic auth throttled"),
                status: StatusCode::TOO_MANY_REQUESTS,
                detail: format!("too many failed sign-ins from {client}; retry in {secs} s"),
                header: Some((RETRY_AFTER, secs.to_string())),
            }
        }
        None => Refusal {
            acl: acl.name.clone(),
            rule: acl.auth_text.clone(),
            status: StatusCode::UNAUTHORIZED,
            detail: "this site needs a user name and password".to_string(),
            header: Some((WWW_AUTHENTICATE, acl.challenge.clone())),
        },
    })
}

/// Failed sign-ins that lock a client out when reached within
/// [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a locked-out client gets 429 for anything but credentials
/// already known good.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Clients whose failures are tracked at most (then the table is pruned,
/// then emptied: a spread-out attack gets more guesses, never memory).
const FAILURE_KEYS: usize = 10_000;

/// Node-wide basic-auth state: the permits for argon2 verifications and
/// each client's recent failures.
pub struct AuthGuard {
    verifiers: Arc<tokio::sync::Semaphore>,
    failures: Mutex<HashMap<ClientKey, Failures>>,
    /// argon2 verifications run (`charon_basic_auth_verifications_total`):
    /// about one per credential and minute when the memory works.
    verifications: AtomicU64,
}

struct Failures {
    since: Instant,
    count: u32,
    locked_until: Option<Instant>,
}

impl Default for AuthGuard {
    fn default() -> Self {
        AuthGuard::new()
    }
}

impl AuthGuard {
    /// One verification at a time per core: argon2 is CPU (and 19 MiB
    /// each), more at once would only queue on the CPU.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        AuthGuard {
            verifiers: Arc::new(tokio::sync::Semaphore::new(cores.clamp(1, 8))),
            failures: Mutex::default(),
            verifications: AtomicU64::new(0),
        }
    }

    /// Its counter in the Prometheus text format, rendered at scrape time.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP charon_basic_auth_verifications_total Basic-auth credentials verified with argon2 (a credential's verdict is remembered for a minute).\n\
             # TYPE charon_basic_auth_verifications_total counter\n\
             charon_basic_auth_verifications_total {}\n",
            self.verifications.load(Ordering::Relaxed)
        )
    }

    /// How much longer `client` is locked out, if it is.
    pub fn locked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.failures.lock().expect("auth failures");
        let until = map.get(&ClientKey::of(client))?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failed sign-in of `client`; how long it is locked out
    /// now, if it is (this failure reached the limit, or it already was).
    pub fn failed(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let mut map = self.failures.lock().expect("auth failures");
        if map.len() >= FAILURE_KEYS {
            map.retain(|_, f| {
                now.duration_since(f.since) < FAILURE_WINDOW
                    || f.locked_until.is_some_and(|u| u > now)
            });
            if map.len() >= FAILURE_KEYS {
                map.clear();
            }
        }
        let f = map.entry(ClientKey::of(client)).or_insert(Failures {
            since: now,
            count: 0,
            locked_until: None,
        });
        if let Some(until) = f.locked_until.filter(|u| *u > now) {
            return Some(until - now);
        }
        if f.locked_until.is_some() || now.duration_since(f.since) >= FAILURE_WINDOW {
            *f = Failures {
                since: now,
                count: 0,
                locked_until: None,
            };
        }
        f.count += 1;
        if f.count >= MAX_FAILURES {
            f.locked_until = Some(now + LOCKOUT);
            return Some(LOCKOUT);
        }
        None
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
        let g = AuthGuard::new();
        let refused = |ip: IpAddr| match check(&slot, ip, std::iter::empty(), &g, None) {
            Checked::Refuse(r) => Some(r),
            Checked::Pass => None,
            Checked::Verify(_) => panic!("no users, nothing to verify"),
        };
        let r = refused(ip).expect("unknown list refuses");
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
        assert!(refused(ip).is_none());
        let r = refused("11.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(&*r.rule, "default deny");
        assert!(r.detail.contains("11.0.0.1"), "{}", r.detail);
        reg.apply(&[changed(None)]);
        assert!(refused(ip).is_some());
    }

    #[test]
    fn failed_sign_ins_lock_a_client_out_for_a_while() {
        let g = AuthGuard::new();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        for i in 1..MAX_FAILURES {
            assert_eq!(g.failed(a, t0), None, "failure {i}");
        }
        assert_eq!(g.locked(a, t0), None);
        assert_eq!(g.failed(a, t0), Some(LOCKOUT), "the last one locks");
        assert_eq!(
            g.locked(a, t0 + Duration::from_secs(1)),
            Some(LOCKOUT - Duration::from_secs(1))
        );
        assert_eq!(g.locked(b, t0), None, "another client is not affected");
        assert_eq!(g.locked(a, t0 + LOCKOUT), None, "over after the lockout");
        assert_eq!(g.failed(a, t0 + LOCKOUT), None, "and counting from 0 again");
        // Failures spread wider than the window never lock.
        for i in 0..3 * MAX_FAILURES {
            let at = t0 + LOCKOUT + FAILURE_WINDOW * (i / (MAX_FAILURES - 1) + 1);
            assert_eq!(g.failed(b, at), None, "spread failure {i}");
        }
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
