//! Idle upstream connections, kept per upstream in paired verbs:
//! `take_idle`/`release` for hyper's connections (the h2 front end),
//! `take_raw`/`release_raw` for the HTTP/1 front end's plain ones.
//!
//! Each worker thread (`crate::workers`) has its own pools: a socket is
//! registered with the I/O driver of the runtime that opened it (and a
//! hyper connection's task runs there), so a connection handed to another
//! worker would have every readiness event cross threads. Up to
//! [`MAX_IDLE`] per upstream per worker; a worker cannot reuse another's
//! idle connection, as in nginx.

use std::time::{Duration, Instant};

use std::sync::{Mutex, MutexGuard};

use super::connect::{RawConn, Sender};
use super::UpstreamState;

/// Idle connections with the time each was pooled, newest last: one
/// pool per worker slot (`crate::workers::slots`).
pub(super) type Pools<T> = Box<[Mutex<Vec<(T, Instant)>>]>;

pub(super) fn pools<T>() -> Pools<T> {
    (0..crate::workers::slots())
        .map(|_| Mutex::default())
        .collect()
}

/// The calling worker's pool in `pools`.
fn mine<T>(pools: &[Mutex<T>]) -> MutexGuard<'_, T> {
    let i = crate::workers::slot().min(pools.len() - 1);
    pools[i].lock().expect("pool lock")
}

/// How long an idle pooled connection is kept. Upstreams commonly close
/// idle keep-alive connections after 60–75 s; dropping ours earlier avoids
/// most races with their close.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream and worker.
const MAX_IDLE: usize = 256;

impl UpstreamState {
    /// An idle, open connection if one is pooled. Connections still busy
    /// with the rest of a response stay pooled for a later request; closed
    /// and expired ones are dropped.
    pub fn take_idle(&self) -> Option<Sender> {
        let mut idle = mine(&self.idle);
        let now = Instant::now();
        // Newest first: the most recently used connection is the least
        // likely to have been closed by the upstream.
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let (s, since) = &idle[i];
            // A connection busy for longer than one may idle has a response
            // nobody reads: not worth its slot either.
            if s.is_closed() || now.saturating_duration_since(*since) >= IDLE_TTL {
                idle.swap_remove(i);
            } else if s.is_ready() {
                return Some(idle.swap_remove(i).0);
            }
        }
        None
    }

    /// An idle connection of the HTTP/1 path, newest first (the least
    /// likely to have been closed by the upstream); expired and closed ones
    /// are dropped on the way.
    pub fn take_raw(&self) -> Option<RawConn> {
        let mut idle = mine(&self.raw_idle);
        let now = Instant::now();
        while let Some((mut c, since)) = idle.pop() {
            if now.saturating_duration_since(since) < IDLE_TTL && !c.went_bad() {
                return Some(c);
            }
        }
        None
    }

    /// Pools a connection whose last response was read to its end.
    pub fn release_raw(&self, conn: RawConn) {
        let mut idle = mine(&self.raw_idle);
        if idle.len() >= MAX_IDLE {
            // The oldest is the likeliest to be closed by the upstream soon.
            idle.remove(0);
        }
        idle.push((conn, Instant::now()));
    }

    /// Returns a connection to the pool as soon as its response head has
    /// arrived. hyper only reports it ready once the response body has been
    /// read to the end; until then [`take_idle`](Self::take_idle) passes it
    /// over. This used to spawn a task per response that waited for
    /// readiness: a task's allocation, scheduling and wake-ups for every
    /// request, where a pooled entry costs a push.
    pub fn release(&self, sender: Sender) {
        let mut idle = mine(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }
}
