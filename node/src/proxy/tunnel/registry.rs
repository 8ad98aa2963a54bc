//! The registry of open WebSocket tunnels.
//!
//! Every tunnel is registered for its whole life so that drain, metrics and
//! `charonctl` can see it and act on it (close it with a proper Close frame).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::SystemTime;

/// Counters for one direction of a tunnel.
#[derive(Debug, Default)]
pub struct DirStats {
    pub bytes: AtomicU64,
    pub frames: AtomicU64,
    /// When the first byte went this way (ms since the epoch, 0 = none
    /// yet): the tunnel span's "first byte" event.
    pub first_byte_ms: AtomicU64,
    /// Close code seen travelling this way, plus one (0 = none yet;
    /// 1 = a Close without a code).
    close_code: AtomicU32,
}

impl DirStats {
    pub fn record_close(&self, code: Option<u16>) {
        let v = code.map(|c| u32::from(c) + 1).unwrap_or(1);
        let _ = self
            .close_code
            .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// `None` = no Close yet; `Some(None)` = a Close without a code.
    pub fn close_code(&self) -> Option<Option<u16>> {
        match self.close_code.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(None),
            v => Some(Some((v - 1) as u16)),
        }
    }
}

/// One open tunnel.
#[derive(Debug)]
pub struct TunnelInfo {
    pub id: u64,
    pub host_id: String,
    pub host_name: String,
    pub upstream: String,
    pub client: SocketAddr,
    pub started: SystemTime,
    /// Client → upstream.
    pub to_upstream: DirStats,
    /// Upstream → client.
    pub to_client: DirStats,
    /// Close with this code and reason, asked for once (drain, timers,
    /// `charonctl`). The relay polls `close_requested`, one atomic load,
    /// and takes the lock only when it is set.
    close_request: Mutex<Option<(u16, String)>>,
    close_requested: AtomicBool,
    /// Set by [`TunnelInfo::cut`]: the relay ends at its next wake-up.
    cut: AtomicBool,
    /// The relay's task, woken by [`close`](Self::close) and
    /// [`cut`](Self::cut). Set on the relay's first poll and not used up
    /// by a wake (as an `AtomicWaker`'s would be), so the relay does not
    /// register again at every wake-up: a tunnel task's waker stays the
    /// same for its life.
    relay_waker: Mutex<Option<Waker>>,
}

impl TunnelInfo {
    /// Asks the relay to close both sides with `code` at frame boundaries,
    /// then finish the closing handshake and end the tunnel. Only the first
    /// request counts.
    pub fn close(&self, code: u16, reason: &str) {
        {
            let mut req = self.close_request.lock().expect("close lock");
            if req.is_some() {
                return;
            }
            *req = Some((code, reason.to_string()));
        }
        self.close_requested.store(true, Ordering::Release);
        self.wake_relay();
    }

    /// Whether the proxy asked this tunnel to close (drain, idle timeout,
    /// shutdown) — as opposed to one of its ends.
    /// Ends the tunnel now, without a goodbye (the last step of a drain).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.wake_relay();
    }

    fn wake_relay(&self) {
        if let Some(w) = &*self.relay_waker.lock().expect("relay waker lock") {
            w.wake_by_ref();
        }
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// The relay's task, to be woken by [`close`](Self::close) and
    /// [`cut`](Self::cut); the relay calls this before it first looks at
    /// either flag.
    pub fn register_relay(&self, cx: &Context<'_>) {
        let mut w = self.relay_waker.lock().expect("relay waker lock");
        match &*w {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
    }

    pub fn close_was_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// For the relay (registered with [`register_relay`](Self::register_relay)):
    /// the close request, if one has been made; otherwise the relay's task
    /// is woken when one is.
    pub(crate) fn close_request(&self) -> Option<(u16, String)> {
        if !self.close_requested.load(Ordering::Acquire) {
            return None;
        }
        self.close_request.lock().expect("close lock").clone()
    }
}

#[derive(Default)]
pub struct TunnelRegistry {
    next_id: AtomicU64,
    map: Mutex<HashMap<u64, Arc<TunnelInfo>>>,
}

/// Removes its tunnel from the registry when the relay ends, however it
/// ends.
pub struct Registration {
    registry: Arc<TunnelRegistry>,
    pub info: Arc<TunnelInfo>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .map
            .lock()
            .expect("tunnels lock")
            .remove(&self.info.id);
    }
}

impl TunnelRegistry {
    pub fn register(
        self: &Arc<Self>,
        host_id: &str,
        host_name: &str,
        upstream: String,
        client: SocketAddr,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(TunnelInfo {
            id,
            host_id: host_id.to_string(),
            host_name: host_name.to_string(),
            upstream,
            client,
            started: SystemTime::now(),
            to_upstream: DirStats::default(),
            to_client: DirStats::default(),
            close_request: Mutex::new(None),
            close_requested: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            relay_waker: Mutex::new(None),
        });
        self.map
            .lock()
            .expect("tunnels lock")
            .insert(id, info.clone());
        Registration {
            registry: self.clone(),
            info,
        }
    }

    pub fn list(&self) -> Vec<Arc<TunnelInfo>> {
        self.map
            .lock()
            .expect("tunnels lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("tunnels lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
