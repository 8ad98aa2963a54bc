//! Every way a client connection or tunnel is ended by the proxy rather
//! than by its peers, in one place. From gentlest to hardest:
//!
//! 1. **Draining** ([`Proxy::set_draining`]): the node is leaving; every
//!    HTTP/1.x response says `Connection: close` (h1 reads it through
//!    `closing()`), so keep-alive clients take their next request
//!    elsewhere. Nothing is closed.
//! 2. **Listener shutdown** (`Proxy::serve`'s `shutdown` future): the
//!    listener stops accepting, then [`Shutdown::begin`] ends idle HTTP/1
//!    connections at once and busy ones after their response, and hyper's
//!    `GracefulShutdown` sends h2 clients GOAWAY; `serve` waits for both,
//!    up to the grace period.
//! 3. **Tunnel close** (`TunnelInfo::close`, driven by the drain
//!    module): a WebSocket tunnel gets a Close frame (1001) both ways and
//!    ends when the peers finish the handshake (`tunnel::relay`).
//! 4. **Cut** ([`Proxy::cut_all`]): the last step of a drain: every
//!    connection task (`Cuttable`) and every tunnel ends now, without a
//!    goodbye, counted in [`Proxy::cut_count`].
//!
//! Accounting: `ConnGuard` counts open HTTP connections for
//! [`Proxy::http_connections`]; a connection that becomes a tunnel is
//! counted by the tunnel registry instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Context;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use super::Proxy;

impl Proxy {
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Closes every open connection and tunnel now, without a goodbye;
    /// they are counted in [`Proxy::cut_count`].
    pub fn cut_all(&self) {
        self.cut_epoch.fetch_add(1, Ordering::AcqRel);
        self.cut_notify.notify_waiters();
        for t in self.tunnels.list() {
            t.cut();
        }
    }

    /// Connections and tunnels closed by [`Proxy::cut_all`].
    pub fn cut_count(&self) -> u64 {
        self.cut_count.load(Ordering::Relaxed)
    }

    /// Runs `fut` unless the proxy cuts everything first.
    pub(super) fn cuttable<F: Future<Output = ()> + Send + 'static>(
        self: &Arc<Self>,
        fut: F,
    ) -> Cuttable<F> {
        Cuttable {
            fut: Box::pin(fut),
            epoch: self.cut_epoch.load(Ordering::Acquire),
            proxy: self.clone(),
            notified: None,
        }
    }
}

/// Counts one open connection for as long as it lives.
pub(super) struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    pub(super) fn new(n: &Arc<AtomicUsize>) -> ConnGuard {
        n.fetch_add(1, Ordering::Relaxed);
        ConnGuard(n.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's task, ended early by [`Proxy::cut_all`]. Written by hand:
/// a `select!` over the connection and a watch channel costs a poll of the
/// channel and a random branch draw at every wake-up, and keeps a second
/// copy of the connection's future; here a wake-up costs one atomic load,
/// and the task registers with the cut's `Notify` once.
pub(super) struct Cuttable<F> {
    fut: std::pin::Pin<Box<F>>,
    epoch: u64,
    proxy: Arc<Proxy>,
    notified: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl<F: Future<Output = ()>> Future for Cuttable<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.notified.is_none() {
            let mut n = Box::pin(self.proxy.cut_notify.clone().notified_owned());
            // Registers this task's waker; the flag below is what is read.
            let _ = n.as_mut().poll(cx);
            self.notified = Some(n);
        }
        if self.proxy.cut_epoch.load(Ordering::Acquire) != self.epoch {
            self.proxy.cut_count.fetch_add(1, Ordering::Relaxed);
            return std::task::Poll::Ready(());
        }
        self.fut.as_mut().poll(cx)
    }
}

/// Ends a listener's HTTP/1 connections gracefully: idle ones close at
/// once, busy ones after their response (which then says
/// `Connection: close`).
pub struct Shutdown {
    on: AtomicBool,
    notify: Arc<Notify>,
    live: AtomicUsize,
    all_done: Notify,
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown {
            on: AtomicBool::new(false),
            notify: Arc::new(Notify::new()),
            live: AtomicUsize::new(0),
            all_done: Notify::new(),
        })
    }

    pub fn begin(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        if self.live.load(Ordering::SeqCst) == 0 {
            self.all_done.notify_waiters();
        }
    }

    pub(super) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Resolves once every connection has ended.
    pub async fn wait(&self) {
        loop {
            let done = self.all_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    pub(super) fn enter(self: &Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        LiveGuard(self.clone())
    }
}

pub(super) struct LiveGuard(Arc<Shutdown>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.is_on() {
            self.0.all_done.notify_waiters();
        }
    }
}

/// The listener is shutting down: checked on each wake-up of an idle
/// connection; the first check registers the task with the shutdown's
/// `Notify`, so that it is woken when the shutdown begins.
pub(super) fn stop_requested(
    shutdown: &Arc<Shutdown>,
    stop: &mut Option<Pin<Box<OwnedNotified>>>,
    cx: &mut Context<'_>,
) -> bool {
    if shutdown.is_on() {
        return true;
    }
    if stop.is_none() {
        let mut n = Box::pin(shutdown.notify.clone().notified_owned());
        let _ = n.as_mut().poll(cx);
        *stop = Some(n);
    }
    shutdown.is_on()
}
