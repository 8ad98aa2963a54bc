//! The proxy's worker threads: N current-thread tokio runtimes, one per
//! thread, each serving its own `SO_REUSEPORT` listeners (HTTP and HTTPS;
//! the kernel spreads new connections over them by a hash of the 4-tuple).
//!
//! Why not tokio's multi-thread runtime: its work-stealing bookkeeping on
//! every wake-up (the run queue's atomics, the LIFO slot, unparking idle
//! workers) was measured costlier per WebSocket message and per request
//! than a current-thread runtime (docs/benchmarks.md). A connection stays
//! on the worker that accepted it for its whole life, as in nginx, and
//! each worker is an epoll loop with nothing to share per wake-up.
//!
//! The store, the cluster, the API, ACME and the admin listener run on
//! the control runtime (the main thread, `main.rs`), so a burst of
//! control work never sits in a worker's run queue. State the workers
//! share (route and SNI tables, tunnel registry, limits, metrics) is
//! `Sync` and lives in `Arc`s; the one thing kept per worker is the idle
//! upstream connections ([`slot`]), whose sockets belong to the I/O
//! driver of the runtime that opened them.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Workers started in this process (0 until [`Workers::start`]).
static COUNT: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// This thread's worker number; `None` off the workers.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Pending connections each listener queues before `accept` (per worker).
const BACKLOG: u32 = 1024;

/// The worker number of the calling thread, `None` on any other thread
/// (the control runtime, blocking threads, unit tests).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Slots for per-worker state: one per worker plus one shared by every
/// other thread.
pub fn slots() -> usize {
    COUNT.get().copied().unwrap_or(0) + 1
}

/// The calling thread's slot in `0..slots()`: its worker number, or the
/// last slot off the workers.
pub fn slot() -> usize {
    current().unwrap_or_else(|| slots() - 1)
}

/// The running workers. Dropping it (or [`Workers::stop`]) ends every
/// worker runtime, with whatever tasks it still holds.
pub struct Workers {
    handles: Vec<Handle>,
    stop: Mutex<Vec<oneshot::Sender<()>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` worker threads (`charon-worker-<i>`), each blocked on its
    /// own current-thread runtime until [`stop`](Self::stop).
    ///
    /// Each runtime polls its I/O driver after every 1,024 task polls
    /// instead of tokio's 61: with a thousand busy WebSocket tunnels,
    /// looking for I/O every 61 polls let tunnels woken by the latest
    /// events go ahead of those already waiting: the least-served tunnels
    /// got about 0.8× the median's round trips, and p99 latency was 2–3×
    /// nginx's. Now every tunnel that is ready runs once before any runs
    /// again, as in an epoll loop; each does bounded work per poll (see
    /// `proxy::tunnel::relay`).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        if COUNT.set(n).is_err() && COUNT.get() != Some(&n) {
            return Err(std::io::Error::other(
                "workers were already started with another count",
            ));
        }
        let (mut handles, mut stop, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("charon-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(Some(i)));
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .event_interval(1024)
                        .build();
                    match rt {
                        Ok(rt) => {
                            let _ = tx.send(Ok(rt.handle().clone()));
                            // Runs the tasks spawned onto it until told to stop.
                            let _ = rt.block_on(stop_rx);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread died while starting"))??;
            handles.push(handle);
            stop.push(stop_tx);
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            stop: Mutex::new(stop),
            threads: Mutex::new(threads),
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `fut` on worker `i`'s runtime.
    pub fn spawn<F>(&self, i: usize, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i].spawn(fut)
    }

    /// Ends every worker runtime (dropping the tasks left on it) and waits
    /// for the threads.
    pub fn stop(&self) {
        for s in self.stop.lock().expect("workers lock").drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.lock().expect("workers lock").drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `n` listeners on `addr` that share it through `SO_REUSEPORT`, one
/// per worker, to be served with [`tokio::net::TcpListener::from_std`] on
/// the worker's runtime. Port 0 picks one free port for all of them.
///
/// An address another socket holds is refused as a plain bind would
/// refuse it: the group's first socket is bound only after a probe bind
/// without `SO_REUSEPORT` succeeds, so a second node started on the same
/// port fails instead of silently sharing it. Must be called on a runtime
/// (each socket is made listening there, then handed over).
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        drop(socket_for(addr, false)?);
    }
    let first = listen_shared(addr)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n.max(1) {
        all.push(listen_shared(addr)?);
    }
    Ok(all)
}

/// A socket bound to `addr` (not listening), with `SO_REUSEADDR` as every
/// tokio listener has it, and `SO_REUSEPORT` when `shared`.
fn socket_for(addr: SocketAddr, shared: bool) -> std::io::Result<tokio::net::TcpSocket> {
    let s = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    s.set_reuseaddr(true)?;
    if shared {
        s.set_reuseport(true)?;
    }
    s.bind(addr)?;
    Ok(s)
}

fn listen_shared(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    socket_for(addr, true)?.listen(BACKLOG)?.into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two groups cannot share a port; the members of one group all
    /// accept on it.
    #[tokio::test]
    async fn a_group_shares_its_port_and_refuses_another() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert!(group.iter().all(|l| l.local_addr().unwrap() == addr));
        let err = bind_group(addr, 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(group);
        bind_group(addr, 2).expect("the port is free again");
    }
}
