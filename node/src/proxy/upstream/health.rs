//! Active health checks (issue 19): one task per upstream address and
//! check settings, shared by every host and location that names the same
//! upstream with the same settings. A [`Checker`] lives as long as some
//! pool of the route table holds it: built by `Route::compile`, dropped
//! with the last route using it, and its task stops then (started and
//! stopped by route-table changes, nothing else).
//!
//! Every `interval` the task sends `GET path` over HTTP/1.1 (TLS for
//! `https://` upstreams, with the host's CA settings); a status in the
//! configured range within `timeout` is a success. `fall` failures in a row
//! take a healthy upstream out of rotation, `rise` successes in a row bring
//! it back. An upstream starts healthy, so a new host serves at once.
//! Passive marking (a refused connect cools an upstream down) works beside
//! it; when every upstream of a pool is out, requests try them anyway.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Connector, UpstreamState};
use crate::host::balance::HealthCheck;

/// The most of a response head a check reads.
const MAX_HEAD: usize = 8 * 1024;

/// The health of one upstream under one set of check settings.
pub struct Checker {
    pub settings: HealthCheck,
    pub url_text: Arc<str>,
    healthy: AtomicBool,
    /// State changes since the checker started (for metrics).
    pub changes: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Checker {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().expect("checker lock").take() {
            t.abort();
        }
    }
}

/// Upstream (by its shared state's address) and settings → its checker.
type Key = (usize, HealthCheck);

/// The checkers of one node, keyed so that hosts naming the same upstream
/// with the same settings share one task.
#[derive(Default)]
pub struct Checkers {
    map: Mutex<Vec<(Key, Weak<Checker>)>>,
}

impl Checkers {
    /// The checker of `upstream` under `settings`, started if new; `None`
    /// when checks are off (or outside a runtime: unit tests of routes).
    pub fn get(
        &self,
        upstream: &Arc<UpstreamState>,
        settings: &HealthCheck,
    ) -> Option<Arc<Checker>> {
        if !settings.enabled() {
            return None;
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let key = (Arc::as_ptr(upstream) as usize, settings.clone());
        let mut map = self.map.lock().expect("checkers lock");
        if let Some(c) = map
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Some(c);
        }
        map.retain(|(_, w)| w.strong_count() > 0);
        let checker = Arc::new(Checker {
            settings: settings.clone(),
            url_text: upstream.url_text.clone(),
            healthy: AtomicBool::new(true),
            changes: AtomicU64::new(0),
            task: Mutex::new(None),
        });
        // The task holds the upstream (so the key's address stays its own)
        // and only a weak reference to the checker (so dropping the last
        // route drops the checker, which stops the task).
        let task = handle.spawn(run(Arc::downgrade(&checker), upstream.clone()));
        *checker.task.lock().expect("checker lock") = Some(task);
        map.push((key, Arc::downgrade(&checker)));
        tracing::info!(upstream = %upstream.url_text, path = %settings.path, interval_ms = settings.interval_ms, "health checks started");
        Some(checker)
    }

    /// The live checker of `upstream` under `settings`, without starting one.
    pub fn find(
        &self,
        upstream: &Arc<UpstreamState>,
        settings: &HealthCheck,
    ) -> Option<Arc<Checker>> {
        let key = (Arc::as_ptr(upstream) as usize, settings.clone());
        let map = self.map.lock().expect("checkers lock");
        map.iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
    }

    /// Every live checker (metrics).
    pub fn all(&self) -> Vec<Arc<Checker>> {
        let map = self.map.lock().expect("checkers lock");
        map.iter().filter_map(|(_, w)| w.upgrade()).collect()
    }
}

/// The check loop of one checker; ends when the checker is dropped.
async fn run(checker: Weak<Checker>, upstream: Arc<UpstreamState>) {
    let Some(settings) = checker.upgrade().map(|c| c.settings.clone()) else {
        return;
    };
    let timeout = Duration::from_millis(u64::from(settings.timeout_ms));
    let connector = Connector::new(timeout);
    let mut interval =
        tokio::time::interval(Duration::from_millis(u64::from(settings.interval_ms)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let outcome =
            match tokio::time::timeout(timeout, probe(&connector, &upstream, &settings)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", settings.timeout_ms)),
            };
        let Some(c) = checker.upgrade() else {
            return;
        };
        match outcome {
            Ok(_) => {
                (successes, failures) = (successes + 1, 0);
                if !c.is_healthy() && successes >= settings.rise {
                    c.healthy.store(true, Ordering::Relaxed);
                    c.changes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(upstream = %upstream.url_text, successes, "upstream healthy again: back in rotation");
                }
            }
            Err(why) => {
                (successes, failures) = (0, failures + 1);
                if c.is_healthy() && failures >= settings.fall {
                    c.healthy.store(false, Ordering::Relaxed);
                    c.changes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(upstream = %upstream.url_text, failures, reason = %why, "upstream unhealthy: out of rotation");
                }
            }
        }
    }
}

/// One check: the status of `GET path`, if it is in range.
async fn probe(
    connector: &Connector,
    upstream: &UpstreamState,
    s: &HealthCheck,
) -> Result<u16, String> {
    let mut conn = connector
        .connect_raw(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: charon-health-check\r\nConnection: close\r\n\r\n",
        s.path,
        upstream.url.authority()
    );
    conn.io
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = conn.io.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let status = status_of(&head).ok_or("no HTTP response")?;
    if (s.status_min..=s.status_max).contains(&u32::from(status)) {
        Ok(status)
    } else {
        Err(format!(
            "status {status} (healthy: {}-{})",
            s.status_min, s.status_max
        ))
    }
}

/// The status of an HTTP/1.x status line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.parse().ok()
}

/// Prometheus lines for every upstream a route holds: open tunnels and
/// in-flight requests on this node, and, where checked, health (1/0) and
/// state changes. Labels are upstream URLs from configuration.
pub fn render_metrics(registry: &super::UpstreamRegistry) -> String {
    use std::fmt::Write as _;
    let esc = crate::telemetry::metrics::escape;
    let mut ups = registry.live();
    ups.sort_by(|a, b| a.url_text.cmp(&b.url_text));
    ups.dedup_by(|a, b| a.url_text == b.url_text);
    let mut out = String::new();
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        &mut out,
        "charon_upstream_tunnels",
        "gauge",
        "Open WebSocket tunnels per upstream on this node.",
    );
    for u in &ups {
        let _ = writeln!(
            out,
            "charon_upstream_tunnels{{upstream=\"{}\"}} {}",
            esc(&u.url_text),
            u.load.tunnels()
        );
    }
    head(
        &mut out,
        "charon_upstream_in_flight",
        "gauge",
        "Requests in flight per upstream on this node.",
    );
    for u in &ups {
        let _ = writeln!(
            out,
            "charon_upstream_in_flight{{upstream=\"{}\"}} {}",
            esc(&u.url_text),
            u.load.in_flight()
        );
    }
    let mut checks = registry.checks.all();
    checks.sort_by(|a, b| (&a.url_text, &a.settings.path).cmp(&(&b.url_text, &b.settings.path)));
    head(
        &mut out,
        "charon_upstream_healthy",
        "gauge",
        "1 while an actively checked upstream passes its checks.",
    );
    for c in &checks {
        let _ = writeln!(
            out,
            "charon_upstream_healthy{{upstream=\"{}\",path=\"{}\"}} {}",
            esc(&c.url_text),
            esc(&c.settings.path),
            u8::from(c.is_healthy())
        );
    }
    head(
        &mut out,
        "charon_upstream_health_changes_total",
        "counter",
        "Healthy/unhealthy transitions of actively checked upstreams.",
    );
    for c in &checks {
        let _ = writeln!(
            out,
            "charon_upstream_health_changes_total{{upstream=\"{}\",path=\"{}\"}} {}",
            esc(&c.url_text),
            esc(&c.settings.path),
            c.changes.load(Ordering::Relaxed)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::status_of;

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}
