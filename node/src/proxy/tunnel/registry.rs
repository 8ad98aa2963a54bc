//! The registry of open WebSocket tunnels.
//!
//! Every tunnel is registered for its whole life so that drain, metrics and
//! `charonctl` can see it and act on it (close it with a proper Close frame).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::{Instant, SystemTime};

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

/// One open tunnel. Every open tunnel has one, for as long as it is open:
/// what it holds is paid per idle tunnel, so the names are shared with the
/// route and the upstream (`Arc<str>`, no copy) and what is rarely used
/// sits behind one lock.
#[derive(Debug)]
pub struct TunnelInfo {
    pub id: u64,
    pub host_id: Arc<str>,
    pub host_name: Arc<str>,
    pub upstream: Arc<str>,
    pub client: SocketAddr,
    /// When it opened (monotonic: its duration in the access log does not
    /// jump with the wall clock); see [`started`](Self::started).
    pub opened: Instant,
    /// Client → upstream.
    pub to_upstream: DirStats,
    /// Upstream → client.
    pub to_client: DirStats,
    /// The relay polls `close_requested`, one atomic load, and takes the
    /// lock only when it is set.
    control: Mutex<Control>,
    close_requested: AtomicBool,
    /// Set by [`TunnelInfo::cut`]: the relay ends at its next wake-up.
    cut: AtomicBool,
}

/// What the proxy asks of a tunnel's relay, and how to wake it.
#[derive(Debug, Default)]
struct Control {
    /// Close with this code and reason, asked for once (drain, timers,
    /// `charonctl`). Boxed: almost every tunnel ends without one.
    close: Option<Box<(u16, String)>>,
    /// The relay's task, woken by [`TunnelInfo::close`] and
    /// [`TunnelInfo::cut`]. Set on the relay's first poll and not used up
    /// by a wake (as an `AtomicWaker`'s would be), so the relay does not
    /// register again at every wake-up: a tunnel task's waker stays the
    /// same for its life.
    relay: Option<Waker>,
}

impl TunnelInfo {
    /// Asks the relay to close both sides with `code` at frame boundaries,
    /// then finish the closing handshake and end the tunnel. Only the first
    /// request counts.
    pub fn close(&self, code: u16, reason: &str) {
        let mut c = self.control.lock().expect("tunnel control lock");
        if c.close.is_some() {
            return;
        }
        c.close = Some(Box::new((code, reason.to_string())));
        self.close_requested.store(true, Ordering::Release);
        if let Some(w) = &c.relay {
            w.wake_by_ref();
        }
    }

    /// When it opened, by the wall clock (for `charonctl tunnels`).
    pub fn started(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.opened.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Whether the proxy asked this tunnel to close (drain, idle timeout,
    /// shutdown) — as opposed to one of its ends.
    /// Ends the tunnel now, without a goodbye (the last step of a drain).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.wake_relay();
    }

    fn wake_relay(&self) {
        if let Some(w) = &self.control.lock().expect("tunnel control lock").relay {
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
        let mut c = self.control.lock().expect("tunnel control lock");
        match &c.relay {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => c.relay = Some(cx.waker().clone()),
        }
    }

    pub fn close_was_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// For the relay (registered with [`register_relay`](Self::register_relay)):
    /// the close request, if one has been made; otherwise the relay's task
    /// is woken when one is.
    pub(crate) fn close_request(&self) -> Option<Box<(u16, String)>> {
        if !self.close_requested.load(Ordering::Acquire) {
            return None;
        }
        self.control
            .lock()
            .expect("tunnel control lock")
            .close
            .clone()
    }
}

#[derive(Default)]
pub struct TunnelRegistry {
    next_id: AtomicU64,
    map: Mutex<HashMap<u64, Arc<TunnelInfo>>>,
}

impl TunnelRegistry {
    /// Enters a new tunnel; whoever opened it calls [`remove`](Self::remove)
    /// when it ends, however it ends (the tunnel task's `Drop`).
    pub fn register(
        &self,
        (host_id, host_name): (&Arc<str>, &Arc<str>),
        upstream: &Arc<str>,
        client: SocketAddr,
    ) -> Arc<TunnelInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(TunnelInfo {
            id,
            host_id: host_id.clone(),
            host_name: host_name.clone(),
            upstream: upstream.clone(),
            client,
            opened: Instant::now(),
            to_upstream: DirStats::default(),
            to_client: DirStats::default(),
            control: Mutex::new(Control::default()),
            close_requested: AtomicBool::new(false),
            cut: AtomicBool::new(false),
        });
        self.map
            .lock()
            .expect("tunnels lock")
            .insert(id, info.clone());
        info
    }

    pub fn remove(&self, id: u64) {
        self.map.lock().expect("tunnels lock").remove(&id);
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
