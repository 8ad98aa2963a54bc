//! What every API write must respect besides its own checks: the node must
//! have caught up with the cluster since it started ([`WriteGate`]), and the
//! client must still be waiting for the answer ([`WriteCtx`]'s deadline).
//! Both are checked under the store lock, right before the commit, so a
//! write is either acknowledged or never happens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use super::hosts::HostsError;

/// Request metadata: the client's deadline as Unix milliseconds. The
/// standard `grpc-timeout` is relative to when the node *reads* the
/// request, so a node that was paused with the request in its socket buffer
/// would count it from the moment it resumed; an absolute deadline does not
/// have that blind spot (clocks of client and node must roughly agree).
pub const DEADLINE_HEADER: &str = "charon-deadline-ms";
/// Request metadata: one key per logical write, the same on every retry.
pub const KEY_HEADER: &str = "charon-idempotency-key";
/// Keys longer than this are refused (they are stored with the record).
const MAX_KEY_LEN: usize = 128;

/// A process that did not run for this long (SIGSTOP, a VM paused, a
/// stall) has probably missed pushes: it catches up again before it takes
/// writes.
pub const PAUSE_LIMIT: Duration = Duration::from_millis(1000);

/// Closed until the node has caught up with the cluster after it started,
/// and again after the process was paused: a write on a stale copy could
/// act on records the cluster has already deleted or replaced. A
/// watchdog ([`WriteGate::watch`]) beats every 100 ms; a beat older than
/// [`PAUSE_LIMIT`] also closes it, so the requests a paused node reads the
/// moment it resumes are refused before the watchdog has even run.
#[derive(Debug, Default)]
pub struct WriteGate {
    open: AtomicBool,
    /// Milliseconds since [`epoch`] of the watchdog's last beat; 0 = no
    /// watchdog (tests of the gate alone).
    beat_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl WriteGate {
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    pub fn is_open(&self) -> bool {
        self.is_open_at(since_epoch_ms())
    }

    /// [`WriteGate::is_open`] at `now` (ms since [`epoch`]).
    fn is_open_at(&self, now: u64) -> bool {
        let beat = self.beat_ms.load(Ordering::SeqCst);
        let fresh = beat == 0 || now.saturating_sub(beat) < PAUSE_LIMIT.as_millis() as u64;
        fresh && self.open.load(Ordering::SeqCst)
    }

    /// Beats every 100 ms; when a beat comes more than [`PAUSE_LIMIT`]
    /// late, closes the gate, runs `catch_up` and opens it again.
    pub async fn watch<F, Fut>(&self, catch_up: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut last = Instant::now();
        loop {
            self.beat_ms.store(since_epoch_ms(), Ordering::SeqCst);
            // The watchdog's period.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let gap = last.elapsed();
            last = Instant::now();
            if gap > PAUSE_LIMIT && self.open.load(Ordering::SeqCst) {
                self.close();
                tracing::warn!(paused_ms = gap.as_millis() as u64,
                    "this process did not run for a while (paused?): catching up with the cluster before taking writes again");
                self.beat_ms.store(since_epoch_ms(), Ordering::SeqCst);
                catch_up().await;
                self.open();
            }
        }
    }
}

/// One write request's context, read from its metadata when it arrives.
#[derive(Debug, Clone, Default)]
pub struct WriteCtx {
    /// The earliest of `grpc-timeout` (from arrival) and
    /// [`DEADLINE_HEADER`].
    deadline: Option<Instant>,
    /// [`KEY_HEADER`], validated.
    pub key: Option<String>,
    gate_open: Option<bool>,
    /// How far [`DEADLINE_HEADER`] was already in the past when the
    /// request arrived, in ms: far more than any pause suggests that the
    /// client's clock is behind, which the error then says.
    late_on_arrival_ms: u64,
}

/// A deadline already this far past on arrival is more likely a client
/// clock that is behind than a request that waited.
const SKEW_HINT_MS: u64 = 60_000;

impl WriteCtx {
    pub fn from_metadata(md: &MetadataMap, gate: &WriteGate) -> Result<WriteCtx, tonic::Status> {
        let now = Instant::now();
        let relative = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| now + d);
        let wall = crate::util::wall_ms();
        let absolute_ms = md
            .get(DEADLINE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let absolute = absolute_ms.map(|ms| now + Duration::from_millis(ms.saturating_sub(wall)));
        let late_on_arrival_ms = absolute_ms.map_or(0, |ms| wall.saturating_sub(ms));
        let deadline = match (relative, absolute) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let key = match md.get(KEY_HEADER).map(|v| v.to_str()) {
            None => None,
            Some(Ok(k)) if !k.trim().is_empty() && k.len() <= MAX_KEY_LEN => {
                Some(k.trim().to_string())
            }
            Some(_) => {
                return Err(tonic::Status::invalid_argument(format!(
                    "{KEY_HEADER}: must be 1 to {MAX_KEY_LEN} visible ASCII characters"
                )))
            }
        };
        Ok(WriteCtx {
            deadline,
            key,
            gate_open: Some(gate.is_open()),
            late_on_arrival_ms,
        })
    }

    /// Called under the store lock just before a commit.
    pub fn check(&self) -> Result<(), HostsError> {
        if self.gate_open == Some(false) {
            return Err(HostsError::CatchingUp);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            let hint = if self.late_on_arrival_ms > SKEW_HINT_MS {
                format!(
                    " ({DEADLINE_HEADER} was already {} s past when the request arrived: is the \
                     client's clock behind this node's?)",
                    self.late_on_arrival_ms / 1000
                )
            } else {
                String::new()
            };
            return Err(HostsError::DeadlinePassed(hint));
        }
        Ok(())
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    #[test]
    fn a_closed_gate_and_a_passed_deadline_refuse_the_write() {
        let gate = WriteGate::default();
        let ctx = WriteCtx::from_metadata(&md(&[]), &gate).unwrap();
        assert!(matches!(ctx.check(), Err(HostsError::CatchingUp)));
        gate.open();
        let ctx = WriteCtx::from_metadata(&md(&[]), &gate).unwrap();
        assert!(ctx.check().is_ok());
        let past = (crate::util::wall_ms() - 1).to_string();
        let ctx = WriteCtx::from_metadata(&md(&[(DEADLINE_HEADER, &past)]), &gate).unwrap();
        assert!(matches!(ctx.check(), Err(HostsError::DeadlinePassed(h)) if h.is_empty()));
        let skewed = (crate::util::wall_ms() - 3_600_000).to_string();
        let ctx = WriteCtx::from_metadata(&md(&[(DEADLINE_HEADER, &skewed)]), &gate).unwrap();
        assert!(
            matches!(ctx.check(), Err(HostsError::DeadlinePassed(h)) if h.contains("clock")),
            "a deadline an hour past does not mention the clock"
        );
        let later = (crate::util::wall_ms() + 60_000).to_string();
        let ctx = WriteCtx::from_metadata(
            &md(&[(DEADLINE_HEADER, &later), ("grpc-timeout", "10S")]),
            &gate,
        )
        .unwrap();
        assert!(ctx.check().is_ok());
    }

    #[test]
    fn a_stale_watchdog_beat_closes_the_gate() {
        let gate = WriteGate::default();
        gate.open();
        gate.beat_ms.store(5_000, Ordering::SeqCst);
        assert!(gate.is_open_at(5_500));
        let paused = 5_000 + PAUSE_LIMIT.as_millis() as u64;
        assert!(!gate.is_open_at(paused), "a paused node took a write");
        gate.close();
        assert!(!gate.is_open_at(5_100));
    }

    #[test]
    fn keys_are_bounded() {
        let gate = WriteGate::default();
        let ctx = WriteCtx::from_metadata(&md(&[(KEY_HEADER, "abc")]), &gate).unwrap();
        assert_eq!(ctx.key.as_deref(), Some("abc"));
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(WriteCtx::from_metadata(&md(&[(KEY_HEADER, &long)]), &gate).is_err());
    }
}
