//! Rate limits: `N/s` or `N/m` per client with a burst, decided by GCRA
//! (the generic cell rate algorithm: one "theoretical arrival time" per
//! client, no timers, no buckets to refill), the same on every node.
//!
//! In cluster scope every node also learns, through gossip, how many
//! requests of each busy client the others admitted, and charges them to
//! its own state ([`Gcra::charge`]): the nodes together admit about the
//! rate. How far over it a burst spread over all nodes can get: each node
//! admits its own burst before it hears of the others (so up to N bursts),
//! and then each node's admissions reach the others one publish interval
//! plus one gossip round later (250 ms + ~200 ms here): every node's state
//! knows all admissions but the last ~0.45 s of the others', so over W
//! seconds the total is at most about rate × (W + 0.45 s) + N × burst.
//! Measured (tests/tests/access.rs, 3 nodes, 20/s, burst 10, 10 s): 211
//! admitted for 210 expected; node scope 617.

use std::collections::HashMap;
use std::time::Duration;

use crate::validate::FieldError;

/// A parsed `--rate-limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    pub per_sec: f64,
    pub burst: u32,
}

impl RateSpec {
    /// `50/s`, `600/m`, either with `,burst=N` (at least 1; default: one
    /// second's worth, at least 1).
    pub fn parse(s: &str) -> Result<RateSpec, String> {
        const SHAPE: &str = "expected N/s or N/m, optionally with ,burst=N (e.g. 50/s,burst=100)";
        let s = s.trim().to_ascii_lowercase();
        let (rate, burst) = match s.split_once(',') {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (s.as_str(), None),
        };
        let (n, unit) = rate.split_once('/').ok_or(SHAPE)?;
        let n: u32 = n.trim().parse().map_err(|_| format!("{s:?}: {SHAPE}"))?;
        let per_sec = match unit.trim() {
            "s" | "sec" | "second" => f64::from(n),
            "m" | "min" | "minute" => f64::from(n) / 60.0,
            _ => return Err(format!("{s:?}: {SHAPE}")),
        };
        if n == 0 {
            return Err(format!("{s:?}: the rate must be above 0"));
        }
        let burst = match burst {
            None => (per_sec.ceil() as u32).max(1),
            Some(b) => b
                .strip_prefix("burst=")
                .and_then(|v| v.trim().parse::<u32>().ok())
                .filter(|b| *b >= 1)
                .ok_or_else(|| format!("{s:?}: {SHAPE}"))?,
        };
        Ok(RateSpec { per_sec, burst })
    }

    /// The canonical text the store keeps.
    pub fn canonical(&self) -> String {
        if self.per_sec.fract() == 0.0 {
            format!("{}/s,burst={}", self.per_sec as u64, self.burst)
        } else {
            format!(
                "{}/m,burst={}",
                (self.per_sec * 60.0).round() as u64,
                self.burst
            )
        }
    }

    /// Time between two requests at the rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_sec)
    }
}

/// Checks and canonicalises a host's rate-limit fields in place: no limit
/// clears the key and scope; a limit gets `ip` and `cluster` by default.
pub fn normalize_host_fields(
    limit: &mut String,
    key: &mut String,
    scope: &mut String,
) -> Result<(), FieldError> {
    if limit.trim().is_empty() {
        limit.clear();
        key.clear();
        scope.clear();
        return Ok(());
    }
    *limit = RateSpec::parse(limit)
        .map_err(|e| FieldError::new("rate_limit", e))?
        .canonical();
    let k = key.trim().to_ascii_lowercase();
    *key = match k.as_str() {
        "" | "ip" => "ip".to_string(),
        _ => match k.strip_prefix("header:") {
            Some(name) if http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() => {
                format!("header:{}", name.trim())
            }
            _ => {
                return Err(FieldError::new(
                    "rate_key",
                    format!("{key:?} must be \"ip\" or \"header:NAME\""),
                ))
            }
        },
    };
    *scope = match scope.trim().to_ascii_lowercase().as_str() {
        "" | "cluster" => "cluster".to_string(),
        "node" => "node".to_string(),
        other => {
            return Err(FieldError::new(
                "rate_limit_scope",
                format!("{other:?} must be \"cluster\" or \"node\""),
            ))
        }
    };
    Ok(())
}

/// GCRA state of every client of one limit, by the client key's hash.
/// Times are nanoseconds on a monotonic clock the caller passes in, so the
/// algorithm is tested without sleeping.
#[derive(Debug)]
pub struct Gcra {
    interval_ns: u64,
    /// How far ahead of now a client's arrival time may run: (burst - 1)
    /// intervals.
    tolerance_ns: u64,
    tat: ByKey<u64>,
}

/// Client keys are already hashes: FNV rather than SipHash over them
/// (these maps are touched on every rate-limited request).
pub type ByKey<V> = HashMap<u64, V, std::hash::BuildHasherDefault<crate::util::Fnv>>;

/// Beyond this many clients, those whose arrival time has passed (who
/// are back to a full burst anyway) are forgotten.
const MAX_CLIENTS: usize = 100_000;

impl Gcra {
    pub fn new(spec: RateSpec) -> Gcra {
        let interval_ns = (1e9 / spec.per_sec) as u64;
        Gcra {
            interval_ns,
            tolerance_ns: interval_ns * u64::from(spec.burst.saturating_sub(1)),
            tat: ByKey::default(),
        }
    }

    /// One request of `key` at `now`: admitted, or how long until it
    /// would be.
    pub fn check(&mut self, key: u64, now: u64) -> Result<(), Duration> {
        if self.tat.len() >= MAX_CLIENTS {
            self.tat.retain(|_, t| *t > now);
        }
        let tat = self.tat.get(&key).copied().unwrap_or(now).max(now);
        if tat - now > self.tolerance_ns {
            return Err(Duration::from_nanos(tat - now - self.tolerance_ns));
        }
        self.tat.insert(key, tat + self.interval_ns);
        Ok(())
    }

    /// Charges `n` requests that other nodes admitted for `key`, as if they
    /// had come here. The debt is capped at a burst plus a second beyond
    /// now: enough for what the others admit between two exchanges at any
    /// rate (the cap is in time, not requests), yet a client is never
    /// locked out for much longer than a burst takes to earn, whatever a
    /// peer reports (a restarted node's first totals, say).
    pub fn charge(&mut self, key: u64, n: u64, now: u64) {
        let tat = self.tat.get(&key).copied().unwrap_or(now).max(now);
        let cap = now + self.tolerance_ns + self.interval_ns.max(1_000_000_000);
        let charged = tat.saturating_add(n.saturating_mul(self.interval_ns));
        self.tat.insert(key, charged.min(cap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_canonically() {
        let cases = [
            ("50/s", "50/s,burst=50"),
            ("50/s,burst=100", "50/s,burst=100"),
            (" 600/M , burst=5", "10/s,burst=5"),
            ("90/m", "90/m,burst=2"),
            ("30/m", "30/m,burst=1"),
        ];
        for (input, want) in cases {
            assert_eq!(RateSpec::parse(input).unwrap().canonical(), want, "{input}");
        }
        for bad in ["50", "0/s", "50/h", "x/s", "50/s,burst=0", "50/s,bust=3"] {
            assert!(RateSpec::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn host_fields_default_and_name_the_field() {
        let (mut l, mut k, mut s) = ("10/s".to_string(), String::new(), String::new());
        normalize_host_fields(&mut l, &mut k, &mut s).unwrap();
        assert_eq!(
            (l.as_str(), k.as_str(), s.as_str()),
            ("10/s,burst=10", "ip", "cluster")
        );
        let (mut l, mut k, mut s) = (String::new(), "ip".to_string(), "node".to_string());
        normalize_host_fields(&mut l, &mut k, &mut s).unwrap();
        assert!(k.is_empty() && s.is_empty(), "no limit, no key or scope");
        let cases = [
            ("10/q", "", "", "rate_limit"),
            ("10/s", "cookie:x", "", "rate_key"),
            ("10/s", "header:bad name", "", "rate_key"),
            ("10/s", "ip", "region", "rate_limit_scope"),
        ];
        for (l, k, s, field) in cases {
            let (mut l, mut k, mut s) = (l.to_string(), k.to_string(), s.to_string());
            let err = normalize_host_fields(&mut l, &mut k, &mut s).unwrap_err();
            assert_eq!(err.field, field);
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let mut g = Gcra::new(RateSpec::parse("10/s,burst=5").unwrap());
        let admitted = (0..20).filter(|_| g.check(1, 0).is_ok()).count();
        assert_eq!(admitted, 5, "the burst at once");
        let wait = g.check(1, 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Over 10 s of constant pressure: the burst plus the rate.
        let mut n = 0;
        for ms in 0..10_000u64 {
            if g.check(1, ms * 1_000_000).is_ok() {
                n += 1;
            }
        }
        assert!((98..=102).contains(&n), "{n} admitted in 10 s at 10/s");
        assert!(g.check(2, 0).is_ok(), "another client has its own state");
    }

    #[test]
    fn charges_from_other_nodes_count_and_are_capped() {
        let mut g = Gcra::new(RateSpec::parse("10/s,burst=5").unwrap());
        g.charge(1, 3, 0);
        let admitted = (0..10).filter(|_| g.check(1, 0).is_ok()).count();
        assert_eq!(admitted, 2, "3 of the burst were used elsewhere");
        // What other nodes admit between two exchanges is all charged...
        g.charge(2, 8, 0);
        assert_eq!((0..10).filter(|_| g.check(2, 0).is_ok()).count(), 0);
        assert!(g.check(2, 300_000_000).is_err(), "8 charged, 3 earned");
        assert!(g.check(2, 400_000_000).is_ok(), "earned back at the rate");
        // ...and a huge report locks out for a burst and a second at most.
        g.charge(1, 1_000_000, 0);
        assert!(g.check(1, SEC).is_ok(), "locked out beyond the cap");
    }
}
