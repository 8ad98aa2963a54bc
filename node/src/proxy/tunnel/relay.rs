//! The WebSocket relay: bytes both ways after the 101, following frame
//! boundaries.
//!
//! Bytes are forwarded exactly as read — masked client frames, compressed
//! (permessage-deflate) payloads and close codes pass through untouched —
//! while a [`FrameTracker`] per direction knows where frames begin. That is
//! what lets the proxy insert its own Close or Ping frame between two frames
//! of the stream (drain, idle timeout, keep-alive pings).
//!
//! Memory: an idle tunnel holds no read buffer. A buffer is lent from a
//! per-thread pool only for the duration of one `poll_read` call and goes
//! back at once when the read is pending, or when the data has been written
//! out. Payload is copied once (socket → buffer → socket), with no
//! allocation per message.
//!
//! Cost: the relay is one hand-written future that owns both connections
//! and polls both directions, the timers and the close request itself. No
//! `select!` (which builds futures and draws a random branch order on every
//! turn), no `tokio::io::split` (a lock per read and write), no watch
//! channel woken on every read: activity is a timestamp kept in the relay,
//! read by its own timer.
//!
//! Fairness: each wake-up relays at most one buffer's worth of bytes per
//! direction; a tunnel with more to do wakes itself and goes to the back of
//! the run queue, so a thousand busy tunnels on one worker take turns.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::frames::{close_frame, control_frame, FrameTracker, OP_PING};
use super::registry::{DirStats, TunnelInfo};

const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept per worker thread between uses.
const POOL_PER_THREAD: usize = 64;
/// After both Close frames have passed, how long to wait for the peers to
/// close their TCP connections before the proxy closes them.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Bytes one direction relays per wake-up before the tunnel yields.
const BYTES_PER_WAKE: usize = BUF_SIZE;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOL_PER_THREAD {
            b.push(buf);
        }
    });
}

/// Reads once with a lent buffer: `spare`, else one from the pool. When
/// the read is pending or fails the buffer goes back to `spare`, which the
/// relay returns to the pool before it waits: waiting costs no memory, and
/// one poll of a tunnel lends itself one buffer however many reads it tries.
fn poll_read_lent<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
    spare: &mut Option<Box<[u8]>>,
) -> Poll<io::Result<(Box<[u8]>, usize)>> {
    let mut buf = spare.take().unwrap_or_else(take_buf);
    let mut rb = ReadBuf::new(&mut buf);
    match Pin::new(r).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            Poll::Ready(Ok((buf, n)))
        }
        Poll::Ready(Err(e)) => {
            *spare = Some(buf);
            Poll::Ready(Err(e))
        }
        Poll::Pending => {
            *spare = Some(buf);
            Poll::Pending
        }
    }
}

/// Keeps `buf` as the poll's spare buffer, or returns it to the pool.
fn keep_spare(spare: &mut Option<Box<[u8]>>, buf: Box<[u8]>) {
    if spare.is_none() {
        *spare = Some(buf);
    } else {
        give_buf(buf);
    }
}

/// Writes all of `data[*pos..]`, resumably: `pos` says how far it got.
fn poll_write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    data: &[u8],
    pos: &mut usize,
) -> Poll<io::Result<()>> {
    while *pos < data.len() {
        let n = ready!(Pin::new(&mut *w).poll_write(cx, &data[*pos..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *pos += n;
    }
    Poll::Ready(Ok(()))
}

/// Per-host tunnel options.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelOptions {
    /// Close the tunnel after this long without a byte either way.
    pub idle_timeout: Option<Duration>,
    /// Ping both sides this often while quiet; a side that sends nothing for
    /// two intervals is taken as dead and the tunnel is closed.
    pub ping_interval: Option<Duration>,
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The reader closed its side (TCP FIN).
    Eof,
    /// The proxy closed this direction and the reader answered with its
    /// Close: the closing handshake is complete on this side.
    Handshake,
}

/// A frame the proxy inserts into a direction's stream.
struct Inserted {
    frame: Vec<u8>,
    /// Bytes of it written so far.
    written: usize,
    is_close: bool,
}

/// One direction of a tunnel: what it has read and not yet written, and
/// where its frames begin.
struct Direction {
    /// Frames the proxy inserts towards an upstream must be masked.
    mask: bool,
    tracker: FrameTracker,
    /// A frame waiting for the next frame boundary (boxed, as `inserting`:
    /// an idle tunnel pays a pointer for each instead of a whole frame).
    pending: Option<Box<Inserted>>,
    /// The frame being written (it has left `pending`).
    inserting: Option<Box<Inserted>>,
    /// The proxy has sent Close this way: what the reader still sends (up
    /// to its own Close) is dropped.
    closed_by_proxy: bool,
    /// The lent buffer while its bytes are being relayed.
    buf: Option<Box<[u8]>>,
    /// Bytes in `buf` (offsets into a buffer of `BUF_SIZE`: `u32`, as
    /// every idle tunnel holds two of these).
    filled: u32,
    /// Bytes of `buf` the tracker has walked.
    walked: u32,
    /// `buf[write_from..write_to]` is still to be written.
    write_from: u32,
    write_to: u32,
    /// Whether the peer's Close had been seen when `buf` was read.
    peer_closed_before: bool,
    needs_flush: bool,
    /// The reader hit EOF: the writer is being shut down.
    eof: bool,
    done: bool,
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buf(buf);
        }
    }
}

impl Direction {
    fn new(mask: bool) -> Self {
        Direction {
            mask,
            tracker: FrameTracker::default(),
            pending: None,
            inserting: None,
            closed_by_proxy: false,
            buf: None,
            filled: 0,
            walked: 0,
            write_from: 0,
            write_to: 0,
            peer_closed_before: false,
            needs_flush: false,
            eof: false,
            done: false,
        }
    }

    /// Queues a Close (when the tunnel is being closed) or else a Ping, to
    /// go out at this direction's next frame boundary. Nothing is sent
    /// after a Close either way.
    fn request(&mut self, close: Option<&(u16, String)>, ping: bool) {
        if self.closed_by_proxy || self.tracker.close.is_some() {
            return;
        }
        let frame = if let Some((code, reason)) = close {
            (close_frame(*code, reason, self.mask), true)
        } else if ping && self.pending.is_none() {
            (control_frame(OP_PING, b"charon", self.mask), false)
        } else {
            return;
        };
        self.pending = Some(Box::new(Inserted {
            frame: frame.0,
            written: 0,
            is_close: frame.1,
        }));
    }

    /// Moves the pending frame to be written next, if this direction is at
    /// a frame boundary.
    fn insert_if_at_boundary(&mut self) -> bool {
        if self.pending.is_some() && self.tracker.at_boundary() {
            self.inserting = self.pending.take();
            true
        } else {
            false
        }
    }

    /// Relays until the reader has nothing more, the writer cannot take
    /// more, or this wake-up's share of bytes is used up. `Ready` only when
    /// the direction has ended. `read` is set when bytes were read.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        stats: &DirStats,
        read: &mut bool,
        spare: &mut Option<Box<[u8]>>,
    ) -> Poll<io::Result<End>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.eof {
            // Half-close: the other direction may still have data.
            let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
            return Poll::Ready(Ok(End::Eof));
        }
        let mut budget = BYTES_PER_WAKE;
        loop {
            if let Some(ins) = &mut self.inserting {
                ready!(poll_write_all(w, cx, &ins.frame, &mut ins.written))?;
                self.closed_by_proxy |= ins.is_close;
                self.inserting = None;
                self.needs_flush = true;
            }
            if let Some(buf) = &self.buf {
                if self.write_from < self.write_to {
                    let mut from = self.write_from as usize;
                    let wrote = poll_write_all(w, cx, &buf[..self.write_to as usize], &mut from);
                    self.write_from = from as u32;
                    ready!(wrote)?;
                    self.needs_flush = true;
                }
                // (Field by field here: `buf` borrows `self.buf`.)
                let at_boundary = self.tracker.at_boundary();
                if self.walked < self.filled {
                    if at_boundary && self.pending.is_some() {
                        self.inserting = self.pending.take();
                        continue;
                    }
                    let k = self.tracker.advance(
                        &buf[self.walked as usize..self.filled as usize],
                        self.pending.is_some(),
                    ) as u32;
                    if !self.closed_by_proxy {
                        self.write_from = self.walked;
                        self.write_to = self.walked + k;
                    }
                    self.walked += k;
                    continue;
                }
                if at_boundary && self.pending.is_some() {
                    self.inserting = self.pending.take();
                    continue;
                }
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                self.needs_flush = false;
                keep_spare(spare, self.buf.take().expect("checked"));
                stats.frames.fetch_add(
                    u64::from(std::mem::take(&mut self.tracker.frames)),
                    Ordering::Relaxed,
                );
                if let (Some(code), false) = (self.tracker.close, self.peer_closed_before) {
                    stats.record_close(code);
                    if self.closed_by_proxy {
                        return Poll::Ready(Ok(End::Handshake));
                    }
                }
                continue;
            }
            // Between reads: a frame the proxy wants to send goes now if
            // the stream is at a boundary.
            if self.insert_if_at_boundary() {
                continue;
            }
            if self.needs_flush {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                self.needs_flush = false;
            }
            if budget == 0 {
                // More may be waiting: let other tunnels have their turn
                // first (a self-wake puts this task at the back of the run
                // queue).
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let (buf, n) = ready!(poll_read_lent(r, cx, spare))?;
            if n == 0 {
                keep_spare(spare, buf);
                self.eof = true;
                let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
                return Poll::Ready(Ok(End::Eof));
            }
            *read = true;
            if stats.bytes.fetch_add(n as u64, Ordering::Relaxed) == 0 {
                stats
                    .first_byte_ms
                    .store(crate::util::wall_ms(), Ordering::Relaxed);
            }
            budget = budget.saturating_sub(n);
            self.peer_closed_before = self.tracker.close.is_some();
            self.buf = Some(buf);
            self.filled = n as u32;
            self.walked = 0;
            self.write_from = 0;
            self.write_to = 0;
        }
    }
}

/// Idle timeout and keep-alive pings, checked every `tick`: only for
/// hosts that set one, so the relay keeps them boxed.
struct Timers {
    tick: Duration,
    idle_timeout: Option<Duration>,
    ping_interval: Option<Duration>,
    pings_unanswered: u32,
    /// Activity as of the previous tick.
    last_seen: Instant,
    /// When a byte last came in either way.
    last_activity: Instant,
    sleep: Pin<Box<Sleep>>,
}

/// What a timer tick asks of the relay.
enum Tick {
    Nothing,
    Ping,
    /// The tunnel has been asked to close; the timers are done.
    Closed,
}

impl Timers {
    fn on_tick(&mut self, info: &TunnelInfo) -> Tick {
        let last_activity = self.last_activity;
        let quiet = last_activity.elapsed();
        if let Some(idle) = self.idle_timeout {
            if quiet >= idle {
                tracing::info!(tunnel = info.id, host = %info.host_name, "closing idle tunnel");
                info.close(1001, "idle timeout");
                return Tick::Closed;
            }
        }
        if let Some(interval) = self.ping_interval {
            if last_activity != self.last_seen {
                self.pings_unanswered = 0;
                self.last_seen = last_activity;
            }
            if quiet >= interval {
                if self.pings_unanswered >= 2 {
                    tracing::info!(tunnel = info.id, host = %info.host_name, "peer stopped answering pings; closing tunnel");
                    info.close(1001, "ping timeout");
                    return Tick::Closed;
                }
                self.pings_unanswered += 1;
                return Tick::Ping;
            }
        }
        Tick::Nothing
    }
}

/// Both directions of a tunnel and what they share.
/// A tunnel's relay: a future that ends when the tunnel is over. Written
/// by hand rather than as an `async fn`, whose frame would keep a second
/// copy of both connections (the arguments) next to the state: an idle
/// tunnel's memory is mostly this struct.
pub struct Relay<C, U> {
    client: C,
    upstream: U,
    info: Arc<TunnelInfo>,
    /// Client → upstream.
    up: Direction,
    /// Upstream → client.
    down: Direction,
    /// The close request, once seen.
    close: Option<Box<(u16, String)>>,
    /// The idle/ping tick, for tunnels that have one (boxed: most have
    /// none, and a `Sleep` is over 100 bytes).
    timers: Option<Box<Timers>>,
    /// The proxy has closed its side of the client's TCP connection.
    client_shut: bool,
    /// Bounds the wait for the peers to hang up after the closing handshake.
    linger: Option<Pin<Box<Sleep>>>,
    /// The task's waker is with the tunnel's registry entry.
    registered: bool,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides are done (or one failed).
    Done,
    /// The proxy cut it ([`TunnelInfo::cut`]).
    Cut,
}

impl<C, U> std::future::Future for Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.get_mut();
        // Once, before the flags are first looked at: a close request or a
        // cut made after that wakes this task.
        if !this.registered {
            this.info.register_relay(cx);
            this.registered = true;
        }
        if this.info.is_cut() {
            return Poll::Ready(RelayEnd::Cut);
        }
        let mut spare = None;
        let poll = this.poll_with(cx, &mut spare);
        if let Some(buf) = spare {
            give_buf(buf);
        }
        poll.map(|()| RelayEnd::Done)
    }
}

impl<C, U> Relay<C, U> {
    /// The tunnel's registry entry.
    pub fn info(&self) -> &Arc<TunnelInfo> {
        &self.info
    }
}

impl<C, U> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_with(&mut self, cx: &mut Context<'_>, spare: &mut Option<Box<[u8]>>) -> Poll<()> {
        while let Some(timers) = &mut self.timers {
            if timers.sleep.as_mut().poll(cx).is_pending() {
                break;
            }
            match timers.on_tick(&self.info) {
                Tick::Nothing => {}
                Tick::Ping => {
                    self.up.request(self.close.as_deref(), true);
                    self.down.request(self.close.as_deref(), true);
                }
                Tick::Closed => {
                    self.timers = None;
                    break;
                }
            }
            let next = Instant::now() + timers.tick;
            timers.sleep.as_mut().reset(next);
        }
        if self.close.is_none() {
            if let Some(close) = self.info.close_request() {
                self.up.request(Some(&close), false);
                self.down.request(Some(&close), false);
                self.close = Some(close);
            }
        }

        let mut read = false;
        if !self.up.done {
            match self.up.poll(
                cx,
                &mut self.client,
                &mut self.upstream,
                &self.info.to_upstream,
                &mut read,
                spare,
            ) {
                Poll::Ready(Ok(_)) => self.up.done = true,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(tunnel = self.info.id, error = %e, "client side of tunnel failed");
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
        }
        if !self.down.done {
            match self.down.poll(
                cx,
                &mut self.upstream,
                &mut self.client,
                &self.info.to_client,
                &mut read,
                spare,
            ) {
                Poll::Ready(Ok(_)) => self.down.done = true,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(tunnel = self.info.id, error = %e, "upstream side of tunnel failed");
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
        }
        if let (true, Some(timers)) = (read, &mut self.timers) {
            timers.last_activity = Instant::now();
        }
        // Towards the client the proxy is the server, and after the closing
        // handshake the server closes the TCP connection first (RFC 6455
        // §7.1.1): once a Close has gone to the client (fully written) and
        // one has come from it, send FIN instead of waiting for the client,
        // which waits for us — whichever direction saw its Close first.
        let close_sent_to_client = self.info.to_client.close_code().is_some()
            || (self.down.closed_by_proxy
                && self.down.inserting.is_none()
                && !self.down.needs_flush);
        if !self.client_shut
            && close_sent_to_client
            && self.info.to_upstream.close_code().is_some()
            && Pin::new(&mut self.client).poll_shutdown(cx).is_ready()
        {
            self.client_shut = true;
            self.down.done = true;
        }
        if self.up.done && self.down.done {
            return Poll::Ready(());
        }
        // Once a Close has passed both ways, the peers normally hang up;
        // bound how long we wait for them to.
        if self.linger.is_none()
            && self.info.to_client.close_code().is_some()
            && self.info.to_upstream.close_code().is_some()
        {
            self.linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
        }
        match self.linger.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Relays between an upgraded client connection and an upgraded upstream
/// connection until both sides are done: the returned future ends when
/// the tunnel is over.
pub fn relay<C, U>(
    client: C,
    upstream: U,
    info: Arc<TunnelInfo>,
    opts: TunnelOptions,
) -> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let tick = match (opts.idle_timeout, opts.ping_interval) {
        (None, None) => None,
        (Some(a), Some(b)) => Some(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(a),
    };
    let now = Instant::now();
    Relay {
        client,
        upstream,
        info,
        up: Direction::new(true),
        down: Direction::new(false),
        close: None,
        timers: tick.map(|tick| {
            Box::new(Timers {
                tick,
                idle_timeout: opts.idle_timeout,
                ping_interval: opts.ping_interval,
                pings_unanswered: 0,
                last_seen: now,
                last_activity: now,
                sleep: Box::pin(tokio::time::sleep(tick)),
            })
        }),
        client_shut: false,
        linger: None,
        registered: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tunnel::registry::TunnelRegistry;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.unwrap();
        v
    }

    fn registry_info() -> (Arc<TunnelRegistry>, Arc<TunnelInfo>) {
        let reg = Arc::new(TunnelRegistry::default());
        let h: Arc<str> = Arc::from("h");
        let info = reg.register(
            (&h, &h),
            &Arc::from("http://u"),
            "127.0.0.1:1".parse().unwrap(),
        );
        (reg, info)
    }

    /// Keeps a test tunnel's registry alive.
    type Entry = Arc<TunnelRegistry>;

    /// A relay between two in-memory pipes, in a task of its own: its
    /// registry entry (keep it), its info, the test's ends of the client's
    /// and the upstream's pipes, and the task.
    fn spawn_relay(
        opts: TunnelOptions,
    ) -> (
        Entry,
        Arc<TunnelInfo>,
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<RelayEnd>,
    ) {
        let (reg, info) = registry_info();
        let (client_proxy, client) = duplex(1 << 16);
        let (upstream_proxy, upstream) = duplex(1 << 16);
        let task = tokio::spawn(relay(client_proxy, upstream_proxy, info.clone(), opts));
        (reg, info, client, upstream, task)
    }

    fn text(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![
            0x81,
            payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 },
        ];
        match mask {
            Some(m) => {
                f.extend_from_slice(&m);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    #[tokio::test]
    async fn a_cut_after_a_close_request_ends_a_quiet_relay() {
        // Peers that never answer the Close: nothing but the cut can wake
        // the relay, after the close request has already woken it once.
        let (_entry, info, mut client, mut upstream, task) = spawn_relay(TunnelOptions::default());
        tokio::task::yield_now().await;
        info.close(1001, "bye");
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.unwrap();
        upstream.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x88, "the close request was acted on");
        info.cut();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the cut reached the relay")
            .unwrap();
        assert_eq!(end, RelayEnd::Cut);
    }

    #[tokio::test]
    async fn passes_bytes_verbatim_and_injects_close_at_boundaries() {
        let (_entry, info, mut client, mut upstream, task) = spawn_relay(TunnelOptions::default());

        let hello = text(b"hello", Some([1, 2, 3, 4]));
        client.write_all(&hello).await.unwrap();
        let mut got = vec![0u8; hello.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hello, "client frame reaches the upstream unchanged");

        // Half a frame from the upstream, then a close request: the Close
        // must come only after the frame is complete.
        let reply = text(b"world", None);
        upstream.write_all(&reply[..3]).await.unwrap();
        tokio::task::yield_now().await;
        info.close(1001, "bye");
        // The upstream gets a masked Close 1001 at once (its direction is
        // at a boundary).
        let mut head = [0u8; 2];
        upstream.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x88);
        assert_eq!(
            head[1] & 0x80,
            0x80,
            "towards the upstream the Close is masked"
        );
        let mut rest = vec![0u8; 4 + (head[1] & 0x7f) as usize];
        upstream.read_exact(&mut rest).await.unwrap();
        let code = u16::from_be_bytes([rest[4] ^ rest[0], rest[5] ^ rest[1]]);
        assert_eq!(code, 1001);

        upstream.write_all(&reply[3..]).await.unwrap();
        let mut got = vec![0u8; reply.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, reply, "the frame in flight is completed first");
        let mut head = [0u8; 4];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(
            head,
            [0x88, 0x05, 0x03, 0xe9],
            "then an unmasked Close 1001"
        );
        let mut reason = [0u8; 3];
        client.read_exact(&mut reason).await.unwrap();

        // Both peers answer with their Close; the tunnel then ends.
        client
            .write_all(&close_frame(1001, "", true))
            .await
            .unwrap();
        upstream
            .write_all(&close_frame(1001, "", false))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.to_upstream.close_code(), Some(Some(1001)));
        assert_eq!(info.to_client.close_code(), Some(Some(1001)));
        assert!(
            read_all(&mut client).await.is_empty(),
            "nothing after the Close"
        );
    }

    #[tokio::test]
    async fn close_codes_pass_through_and_eof_half_closes() {
        let (_entry, info, mut client, mut upstream, task) = spawn_relay(TunnelOptions::default());
        let c = close_frame(4001, "done", true);
        client.write_all(&c).await.unwrap();
        let mut got = vec![0u8; c.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, c);
        upstream
            .write_all(&close_frame(4001, "", false))
            .await
            .unwrap();
        drop(upstream);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, close_frame(4001, "", false));
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.to_upstream.close_code(), Some(Some(4001)));
        assert_eq!(
            info.to_upstream
                .frames
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes_quiet_tunnels() {
        let (_entry, _info, mut client, _upstream, _task) = spawn_relay(TunnelOptions {
            idle_timeout: Some(Duration::from_secs(30)),
            ping_interval: None,
        });
        let mut head = [0u8; 4];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head, [0x88, 14, 0x03, 0xe9]);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_peers_are_pinged_then_closed() {
        let (_entry, _info, mut client, mut upstream, _task) = spawn_relay(TunnelOptions {
            idle_timeout: None,
            ping_interval: Some(Duration::from_secs(10)),
        });
        let ping = [0x89, 6, b'c', b'h', b'a', b'r', b'o', b'n'];
        let mut got = [0u8; 8];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ping, "an unmasked Ping towards the client");
        let mut head = [0u8; 2];
        upstream.read_exact(&mut head).await.unwrap();
        assert_eq!(head, [0x89, 0x86], "a masked Ping towards the upstream");
        let mut rest = [0u8; 10];
        upstream.read_exact(&mut rest).await.unwrap();
        // Nobody answers: a second Ping, then Close 1001.
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ping);
        let mut head = [0u8; 4];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head[..2], [0x88, 14], "then Close 1001 (ping timeout)");
        assert_eq!(head[2..], [0x03, 0xe9]);
    }

    #[tokio::test]
    async fn a_busy_direction_yields_between_buffers() {
        let (_reg, info) = registry_info();
        let (client_proxy, mut client) = duplex(1 << 20);
        let (upstream_proxy, mut upstream) = duplex(1 << 20);
        // One binary frame of 256 KiB, already waiting in full.
        let payload = vec![7u8; 256 * 1024];
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        frame.extend_from_slice(&payload);
        client.write_all(&frame).await.unwrap();
        let mut relay = Box::pin(relay(
            client_proxy,
            upstream_proxy,
            info.clone(),
            TunnelOptions::default(),
        ));
        // One poll relays at most one buffer's worth, and asks to be polled
        // again rather than pending on I/O.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        let sent = info.to_upstream.bytes.load(Ordering::Relaxed);
        assert!(
            sent > 0 && sent <= BYTES_PER_WAKE as u64,
            "{sent} bytes in one poll"
        );
        let task = tokio::spawn(relay);
        let mut got = vec![0u8; frame.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert!(got == frame, "the frame arrives whole");
        drop(client);
        drop(upstream);
        task.await.unwrap();
    }
}
