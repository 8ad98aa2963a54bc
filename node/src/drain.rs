//! Drain: take a node out of service without dropping a user.
//!
//! A drain starts when this node's `drain/<node id>` record appears (from
//! `charonctl node drain` on any node; replicated, so it survives restarts)
//! or on SIGTERM. In order:
//! 1. `/readyz` answers 503 and gossip says `draining`, so load balancers and
//!    peers stop sending new work;
//! 2. after `delay`, the listeners close: HTTP/1.1 keep-alive connections
//!    get `Connection: close` on their next response, h2 connections a
//!    GOAWAY, and in-flight requests finish;
//! 3. WebSocket tunnels stay open until the deadline, then each gets Close
//!    1001 (going away) on both sides at a frame boundary, spread over
//!    `spread` so clients do not all reconnect at once;
//! 4. whatever is left after the final grace is cut, and counted.
//!
//! Undrain (the record deleted) before the end puts the node back in
//! service: listeners bound again on the same addresses, ready again. While
//! it drains, the node publishes its remaining connections in gossip, which
//! is what `charonctl node drain --wait` shows.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::Health;
use crate::cluster::gossip::{STATUS_DRAINED, STATUS_DRAINING, STATUS_SERVING};
use crate::cluster::{Cluster, DrainFacts};
use crate::config::DrainSettings;
use crate::proxy::Proxy;
use crate::store::DrainRecord;
use crate::tls::TlsTerminator;
use crate::util::wall_ms;
use crate::workers::{self, Workers};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Serving,
    Draining,
    Drained,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrainState {
    pub phase: Phase,
    pub deadline_ms: u64,
    pub listeners_closed: bool,
    pub cut: u64,
}

struct Serving {
    stop: watch::Sender<Option<Duration>>,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Drainer {
    proxy: Arc<Proxy>,
    tls: Arc<TlsTerminator>,
    health: Arc<Health>,
    cluster: Arc<Cluster>,
    settings: DrainSettings,
    final_grace: Duration,
    /// The proxy's threads; each serves its own listeners on `addrs`.
    workers: Arc<Workers>,
    /// HTTP and HTTPS.
    addrs: [SocketAddr; 2],
    serving: Mutex<Option<Serving>>,
    state: watch::Sender<DrainState>,
    terminating: watch::Sender<bool>,
    /// A drain of this node only, asked on the admin listener (`POST
    /// /drain` with a token): not replicated, so it ends with the process
    /// and the next start serves.
    local: watch::Sender<bool>,
}

enum Outcome {
    Finished,
    Undrained,
}

/// The proxy's listeners: per worker, its HTTP and its HTTPS one, bound
/// with `SO_REUSEPORT` ([`workers::bind_group`]) and not yet served.
pub struct Listeners {
    pub http: Vec<std::net::TcpListener>,
    pub https: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// One HTTP and one HTTPS listener per worker.
    pub fn bind(addrs: [SocketAddr; 2], workers: usize) -> std::io::Result<Listeners> {
        Ok(Listeners {
            http: workers::bind_group(addrs[0], workers)?,
            https: workers::bind_group(addrs[1], workers)?,
        })
    }

    /// The addresses bound (port 0 resolved): HTTP, HTTPS.
    pub fn addrs(&self) -> std::io::Result<[SocketAddr; 2]> {
        Ok([self.http[0].local_addr()?, self.https[0].local_addr()?])
    }
}

/// When a drain's steps happen.
#[derive(Debug, Clone, Copy)]
struct Plan {
    delay: Duration,
    deadline: Instant,
    deadline_ms: u64,
    spread: Duration,
}

impl Drainer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        proxy: Arc<Proxy>,
        tls: Arc<TlsTerminator>,
        health: Arc<Health>,
        cluster: Arc<Cluster>,
        settings: DrainSettings,
        final_grace: Duration,
        workers: Arc<Workers>,
        listeners: Listeners,
    ) -> Arc<Drainer> {
        let addrs = listeners.addrs().expect("bound sockets have addresses");
        let d = Arc::new(Drainer {
            proxy,
            tls,
            health,
            cluster,
            settings,
            final_grace,
            workers,
            addrs,
            serving: Mutex::new(None),
            state: watch::Sender::new(DrainState::default()),
            terminating: watch::Sender::new(false),
            local: watch::Sender::new(false),
        });
        *d.serving.try_lock().expect("new") = Some(d.serve(listeners));
        d
    }

    /// Starts a local drain with the configured defaults (see `local`).
    pub fn drain_locally(&self) {
        if !self.local.send_replace(true) {
            tracing::info!("local drain requested on the admin listener");
        }
    }

    pub fn state(&self) -> watch::Receiver<DrainState> {
        self.state.subscribe()
    }

    /// Serves each worker's listeners on that worker; one `stop` ends
    /// them all.
    fn serve(&self, listeners: Listeners) -> Serving {
        let (stop, rx) = watch::channel(None::<Duration>);
        let stopped = move || {
            let mut rx = rx.clone();
            async move {
                match rx.wait_for(|g| g.is_some()).await {
                    Ok(g) => g.unwrap_or_default(),
                    Err(_) => Duration::ZERO,
                }
            }
        };
        let mut tasks = Vec::new();
        let pairs = listeners.http.into_iter().zip(listeners.https);
        for (i, (http, https)) in pairs.enumerate() {
            for (listener, tls) in [(http, None), (https, Some(self.tls.clone()))] {
                let (proxy, stopped) = (self.proxy.clone(), stopped());
                // Registered with the worker's own I/O driver, so made a
                // tokio listener there.
                tasks.push(self.workers.spawn(i, async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => proxy.serve(l, tls, stopped).await,
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "cannot serve a listener")
                        }
                    }
                }));
            }
        }
        Serving { stop, tasks }
    }

    /// Stops accepting; open connections get `grace` to finish (in the
    /// background).
    async fn close_listeners(&self, grace: Duration) {
        if let Some(s) = self.serving.lock().await.take() {
            // The accept loops end and drop their sockets at once; the
            // graceful part runs on in the same tasks.
            let _ = s.stop.send(Some(grace));
            drop(s.tasks);
        }
        tracing::info!(?grace, "listeners closed; open connections are ending");
        self.state.send_modify(|s| s.listeners_closed = true);
    }

    /// Back in service: listeners on the same addresses again, ready.
    async fn resume(&self) {
        let mut serving = self.serving.lock().await;
        if serving.is_none() {
            // The old sockets may linger for a moment after close.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Listeners::bind(self.addrs, self.workers.len()) {
                    Ok(l) => {
                        *serving = Some(self.serve(l));
                        break;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        tracing::error!(addrs = ?self.addrs, error = %e, "cannot listen again after undrain");
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        drop(serving);
        self.proxy.set_draining(false);
        self.state.send_replace(DrainState::default());
        self.health.set_ready(true);
        self.cluster.set_status(STATUS_SERVING).await;
        self.publish_progress().await;
        tracing::info!("undrained: serving again");
    }

    /// The plan of a drain record (its deadline is wall-clock time).
    fn plan_of(&self, r: &DrainRecord) -> Plan {
        let left = Duration::from_millis(r.deadline_ms.saturating_sub(wall_ms()));
        Plan {
            delay: self.settings.delay.min(left),
            deadline: Instant::now() + left,
            deadline_ms: r.deadline_ms,
            spread: Duration::from_secs(u64::from(r.spread_secs)),
        }
    }

    fn default_plan(&self) -> Plan {
        Plan {
            delay: self.settings.delay,
            deadline: Instant::now() + self.settings.deadline,
            deadline_ms: wall_ms() + self.settings.deadline.as_millis() as u64,
            spread: self.settings.spread,
        }
    }

    /// Publishes the counts in gossip (only while draining; zeros after).
    async fn publish_progress(&self) {
        let s = self.state.borrow().clone();
        let (conns, tunnels) = if s.phase == Phase::Serving {
            (0, 0)
        } else {
            (self.proxy.http_connections(), self.proxy.tunnels.len())
        };
        let status = match s.phase {
            Phase::Serving => STATUS_SERVING,
            Phase::Draining => STATUS_DRAINING,
            Phase::Drained => STATUS_DRAINED,
        };
        let facts = DrainFacts {
            http_connections: conns as u64,
            tunnels: tunnels as u64,
            deadline_ms: s.deadline_ms,
            listeners_closed: s.listeners_closed,
            cut: s.cut,
        };
        self.cluster.publish_drain(status, &facts).await;
    }

    /// Runs until `shutdown` (SIGTERM) has been followed by a finished
    /// drain. `requests` carries this node's drain record.
    pub async fn run(
        self: Arc<Self>,
        mut requests: watch::Receiver<Option<Arc<DrainRecord>>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let term = self.terminating.clone();
        tokio::spawn(async move {
            shutdown.await;
            term.send_replace(true);
        });
        let progress = {
            let d = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    if d.state.borrow().phase != Phase::Serving {
                        d.publish_progress().await;
                    }
                }
            })
        };
        let mut term = self.terminating.subscribe();
        let mut local = self.local.subscribe();
        loop {
            let record = requests.borrow_and_update().clone();
            let terminating = *term.borrow_and_update() || *local.borrow_and_update();
            let plan = match (&record, terminating) {
                (Some(r), _) => self.plan_of(r),
                (None, true) => self.default_plan(),
                (None, false) => {
                    tokio::select! {
                        _ = requests.changed() => {}
                        _ = term.changed() => {}
                        _ = local.changed() => {}
                    }
                    continue;
                }
            };
            if let Some(r) = &record {
                tracing::info!(deadline_ms = r.deadline_ms, spread_secs = r.spread_secs, requested_on = %r.requested_on, "drain requested");
            } else if *self.local.borrow() && !*self.terminating.borrow() {
                tracing::info!(deadline = ?self.settings.deadline, "draining this node (local drain)");
            } else {
                tracing::info!(deadline = ?self.settings.deadline, "SIGTERM: draining before exit");
            }
            match self.drain(plan, &mut requests).await {
                Outcome::Undrained => {
                    self.resume().await;
                    continue;
                }
                Outcome::Finished => {}
            }
            // Drained: exit if terminating, else wait for undrain.
            loop {
                if *term.borrow_and_update() {
                    progress.abort();
                    self.publish_progress().await;
                    return;
                }
                if requests.borrow_and_update().is_none() && !*self.local.borrow() {
                    self.resume().await;
                    break;
                }
                tokio::select! {
                    _ = requests.changed() => {}
                    _ = term.changed() => {}
                }
            }
        }
    }

    /// True once the drain record is gone and no SIGTERM came.
    fn undrained(&self, requests: &watch::Receiver<Option<Arc<DrainRecord>>>) -> bool {
        requests.borrow().is_none() && !*self.terminating.borrow() && !*self.local.borrow()
    }

    /// Sleeps until `at`, or returns false early on undrain.
    async fn wait_until(
        &self,
        at: Instant,
        requests: &mut watch::Receiver<Option<Arc<DrainRecord>>>,
    ) -> bool {
        let sleep = tokio::time::sleep_until(at);
        tokio::pin!(sleep);
        loop {
            if self.undrained(requests) {
                return false;
            }
            tokio::select! {
                _ = &mut sleep => return !self.undrained(requests),
                r = requests.changed() => if r.is_err() { (&mut sleep).await; return true },
            }
        }
    }

    async fn drain(
        &self,
        plan: Plan,
        requests: &mut watch::Receiver<Option<Arc<DrainRecord>>>,
    ) -> Outcome {
        self.health.set_ready(false);
        self.proxy.set_draining(true);
        self.state.send_modify(|s| {
            s.phase = Phase::Draining;
            s.deadline_ms = plan.deadline_ms;
        });
        self.publish_progress().await;
        let started = Instant::now();
        if !self.wait_until(started + plan.delay, requests).await {
            return Outcome::Undrained;
        }
        let end = plan.deadline.max(Instant::now()) + plan.spread;
        self.close_listeners(end.saturating_duration_since(Instant::now()) + self.final_grace)
            .await;
        // Tunnels stay until the deadline; a node with nothing open left
        // need not wait for it.
        loop {
            let now = Instant::now();
            if now >= plan.deadline
                || (self.proxy.tunnels.is_empty() && self.proxy.http_connections() == 0)
            {
                break;
            }
            let step = (now + Duration::from_millis(50)).min(plan.deadline);
            if !self.wait_until(step, requests).await {
                return Outcome::Undrained;
            }
        }
        // Close 1001 to every tunnel, spread over the window.
        let tunnels = self.proxy.tunnels.list();
        let n = tunnels.len().max(1) as u32;
        if !tunnels.is_empty() {
            tracing::info!(tunnels = tunnels.len(), spread = ?plan.spread, "closing WebSocket tunnels with 1001 (going away)");
        }
        let start = Instant::now();
        for (i, t) in tunnels.iter().enumerate() {
            tokio::time::sleep_until(start + plan.spread * i as u32 / n).await;
            t.close(1001, "going away");
        }
        drop(tunnels);
        // Wait for the closing handshakes and in-flight requests.
        let hard = Instant::now() + self.final_grace;
        while (!self.proxy.tunnels.is_empty() || self.proxy.http_connections() > 0)
            && Instant::now() < hard
        {
            // Poll interval of a bounded wait for connections to end.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (conns, tunnels) = (self.proxy.http_connections(), self.proxy.tunnels.len());
        if conns + tunnels > 0 {
            tracing::warn!(
                http_connections = conns,
                tunnels,
                "final grace over: cutting what is left"
            );
            self.proxy.cut_all();
            let deadline = Instant::now() + Duration::from_secs(2);
            while (self.proxy.http_connections() > 0 || !self.proxy.tunnels.is_empty())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let cut = self.proxy.cut_count();
        self.state.send_modify(|s| {
            s.phase = Phase::Drained;
            s.cut = cut;
        });
        self.publish_progress().await;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            cut,
            "drained"
        );
        Outcome::Finished
    }
}
