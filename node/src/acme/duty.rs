//! Who orders, and when: one live node per certificate, so N nodes never
//! place N orders.
//!
//! Two layers. Rendezvous hashing of the certificate id over the live,
//! serving members picks the same node on every node that sees the same
//! membership, with no message exchanged; when a member dies or drains,
//! only its certificates move. The lease in the order record settles the
//! moments when views differ (a member just joined or died): a node starts
//! only if no other node holds an unexpired lease, writes its own lease,
//! waits until every live member has it, and goes on only if the lease it
//! then reads is still its own (last writer wins everywhere alike). The
//! holder refreshes the lease while it works; a holder that dies stops
//! refreshing, and the next node in rendezvous order takes over once the
//! lease has run out.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::store::acme::AcmeOrder;
use crate::tls::cert::StoredCert;

/// The member (node id) responsible for `id` among `candidates`.
pub fn responsible<'a>(id: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .max_by_key(|node| {
            let h = Sha256::digest(format!("{id}\n{node}").as_bytes());
            u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
        })
        .copied()
}

/// Whether `me` may take the order now: nobody holds it, it is ours, or
/// the holder's lease ran out.
pub fn may_take(order: Option<&AcmeOrder>, me: &str, now_ms: u64) -> bool {
    match order {
        None => true,
        Some(o) => o.holder.is_empty() || o.holder == me || o.lease_until_ms <= now_ms,
    }
}

/// A spread of ±1/20 of `span` derived from the id, so certificates issued
/// together (a cluster's first start) do not all renew together, and every
/// node computes the same time.
fn jitter(id: &str, span: u64) -> i64 {
    let h = Sha256::digest(id.as_bytes());
    let r = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    let width = span / 10;
    if width == 0 {
        return 0;
    }
    (r % width) as i64 - (width / 2) as i64
}

/// When the certificate should be renewed: two thirds into its lifetime
/// (with jitter), or `renew_after` past the time it was stored when set
/// (not its notBefore, which CAs may backdate).
pub fn renew_at(cert: &StoredCert, renew_after: Option<Duration>) -> u64 {
    let (nb, na) = (
        cert.not_before_ms,
        cert.not_after_ms.max(cert.not_before_ms),
    );
    match renew_after {
        Some(d) => nb
            .max(cert.updated_at_ms)
            .saturating_add(d.as_millis() as u64),
        None => {
            let life = na - nb;
            let at = nb + life * 2 / 3;
            at.saturating_add_signed(jitter(&cert.id, life))
        }
    }
}

/// A moment in the CA's suggested renewal window `[start, end)` (RFC
/// 9773 §4.2 asks for a random one, so a CA's clients spread out), derived
/// from the id so every node computes the same.
pub fn in_window(id: &str, start_ms: u64, end_ms: u64) -> u64 {
    let width = end_ms.saturating_sub(start_ms);
    if width == 0 {
        return start_ms;
    }
    let h = Sha256::digest(format!("ari\n{id}").as_bytes());
    start_ms + u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % width
}

/// When this certificate needs work next: now if it has none yet (or its
/// current one is not from ACME, e.g. a record left by a deleted host),
/// else at its renewal time — the CA's renewal window when it gave one
/// (ARI), unless `renew_after` overrides both; never before the backoff's
/// next attempt.
pub fn due_at(
    order: Option<&AcmeOrder>,
    cert: Option<&StoredCert>,
    renew_after: Option<Duration>,
) -> u64 {
    let ari = order.map_or(0, |o| o.ari_renew_at_ms);
    let base = match cert {
        Some(c) if c.source == "acme" && ari > 0 && renew_after.is_none() => ari,
        Some(c) if c.source == "acme" => renew_at(c, renew_after),
        _ => 0,
    };
    let not_before = order.map_or(0, |o| o.next_attempt_ms);
    base.max(not_before)
}

/// Consecutive failed validations after which the next attempt waits an
/// hour: Let's Encrypt refuses a name after 5 failed validations per
/// account per hour, and a refused name only lengthens the wait.
pub const VALIDATION_FAILURES_PER_HOUR: u32 = 4;

/// The backoff after `failures` consecutive failures: `min` doubled per
/// failure, at most a day, at least what the CA asked for, and at least an
/// hour once [`VALIDATION_FAILURES_PER_HOUR`] failures in a row were
/// failed validations (`validation`: this one was).
pub fn backoff(
    min: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    validation: bool,
) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let limit = if validation && failures >= VALIDATION_FAILURES_PER_HOUR {
        Duration::from_secs(3600)
    } else {
        Duration::ZERO
    };
    exp.min(Duration::from_secs(86_400))
        .max(retry_after.unwrap_or_default())
        .max(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_leavers_work() {
        let all = ["n1", "n2", "n3"];
        let ids: Vec<String> = (0..60).map(|i| format!("acme-{i}")).collect();
        let before: Vec<&str> = ids
            .iter()
            .map(|id| responsible(id, &all).unwrap())
            .collect();
        // Every node picks the same: the function depends on its inputs only.
        assert_eq!(responsible(&ids[0], &["n3", "n1", "n2"]), Some(before[0]));
        // All three get some work.
        for n in all {
            assert!(before.contains(&n), "{n} never chosen");
        }
        let without_n2 = ["n1", "n3"];
        for (id, was) in ids.iter().zip(&before) {
            let now = responsible(id, &without_n2).unwrap();
            if *was != "n2" {
                assert_eq!(now, *was, "{id} moved although its node stayed");
            }
        }
        assert_eq!(responsible("x", &[]), None);
    }

    #[test]
    fn leases_block_others_until_they_expire() {
        let o = AcmeOrder {
            holder: "a".into(),
            lease_until_ms: 1000,
            ..AcmeOrder::default()
        };
        assert!(may_take(None, "b", 0));
        assert!(may_take(Some(&o), "a", 500));
        assert!(!may_take(Some(&o), "b", 999));
        assert!(may_take(Some(&o), "b", 1000));
    }

    #[test]
    fn renewal_at_two_thirds_with_bounded_jitter() {
        let day = 86_400_000;
        let c = StoredCert {
            id: "acme-1".into(),
            not_before_ms: 0,
            not_after_ms: 90 * day,
            source: "acme".into(),
            ..StoredCert::default()
        };
        let at = renew_at(&c, None);
        assert!(
            at >= 60 * day - 90 * day / 20 && at <= 60 * day + 90 * day / 20,
            "{at}"
        );
        assert_eq!(renew_at(&c, Some(Duration::from_secs(10))), 10_000);
        let o = AcmeOrder {
            next_attempt_ms: 70 * day,
            ..AcmeOrder::default()
        };
        assert_eq!(due_at(Some(&o), Some(&c), None), 70 * day);
        assert_eq!(due_at(None, None, None), 0);
        // The CA's renewal window (ARI) wins over two thirds.
        let w = in_window("acme-1", 50 * day, 52 * day);
        assert!((50 * day..52 * day).contains(&w), "{w}");
        assert_eq!(w, in_window("acme-1", 50 * day, 52 * day));
        let o = AcmeOrder {
            ari_renew_at_ms: w,
            ..AcmeOrder::default()
        };
        assert_eq!(due_at(Some(&o), Some(&c), None), w);
        assert_eq!(
            due_at(Some(&o), Some(&c), Some(Duration::from_secs(10))),
            10_000
        );
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let m = Duration::from_secs(60);
        assert_eq!(backoff(m, 1, None, false), m);
        assert_eq!(backoff(m, 3, None, false), m * 4);
        assert_eq!(backoff(m, 40, None, false), Duration::from_secs(86_400));
        let hour = Duration::from_secs(3600);
        assert_eq!(backoff(m, 1, Some(hour), false), hour);
        // Failed validations: quick retries first, then at most 4 an hour.
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 3, None, true), s * 4);
        assert_eq!(backoff(s, 4, None, true), hour);
        assert_eq!(backoff(s, 4, None, false), s * 8);
    }
}
