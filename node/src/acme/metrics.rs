//! ACME counters and gauges for `/metrics`: orders started, certificates
//! issued, failures by kind, and days left per ACME certificate. Counters
//! are process-wide (one node per process), read at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::Snapshot;

pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Order attempts this node ran.
pub static ORDERS: Counter = Counter(AtomicU64::new(0));
/// Certificates this node obtained.
pub static ISSUED: Counter = Counter(AtomicU64::new(0));
static FAILURES: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

pub fn failed(kind: &'static str) {
    let mut f = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    match f.iter_mut().find(|(k, _)| *k == kind) {
        Some((_, n)) => *n += 1,
        None => f.push((kind, 1)),
    }
}

/// The Prometheus text of the ACME metrics.
pub fn render(snap: &Snapshot, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP charon_acme_orders_total ACME order attempts this node ran.\n\
         # TYPE charon_acme_orders_total counter\ncharon_acme_orders_total {}",
        ORDERS.get()
    );
    let _ = writeln!(
        out,
        "# HELP charon_acme_issued_total Certificates this node obtained over ACME.\n\
         # TYPE charon_acme_issued_total counter\ncharon_acme_issued_total {}",
        ISSUED.get()
    );
    let _ = writeln!(
        out,
        "# HELP charon_acme_failures_total Failed ACME attempts on this node by kind.\n\
         # TYPE charon_acme_failures_total counter"
    );
    let mut f = FAILURES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    f.sort();
    for (kind, n) in f {
        let _ = writeln!(out, "charon_acme_failures_total{{reason=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP charon_acme_certificate_days_left Days until an ACME certificate expires.\n\
         # TYPE charon_acme_certificate_days_left gauge"
    );
    for c in snap.certs.iter().filter(|c| c.source == "acme") {
        let _ = writeln!(
            out,
            "charon_acme_certificate_days_left{{cert=\"{}\",name=\"{}\"}} {}",
            c.id,
            c.name,
            c.days_left(now_ms)
        );
    }
    out
}
