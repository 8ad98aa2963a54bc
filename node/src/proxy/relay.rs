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

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use super::frames::{close_frame, control_frame, FrameTracker, OP_PING};
use super::tunnels::{Control, DirStats, TunnelInfo};

const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept per worker thread between uses.
const POOL_PER_THREAD: usize = 64;
/// After both Close frames have passed, how long to wait for the peers to
/// close their TCP connections before the proxy closes them.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

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

/// Reads once with a lent buffer. While the read is pending the buffer is
/// back in the pool, so waiting costs no memory.
fn poll_read_lent<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
) -> Poll<io::Result<(Box<[u8]>, usize)>> {
    let mut buf = take_buf();
    let mut rb = ReadBuf::new(&mut buf);
    match Pin::new(r).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            Poll::Ready(Ok((buf, n)))
        }
        Poll::Ready(Err(e)) => {
            give_buf(buf);
            Poll::Ready(Err(e))
        }
        Poll::Pending => {
            give_buf(buf);
            Poll::Pending
        }
    }
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

struct Direction<'a> {
    stats: &'a DirStats,
    /// Frames the proxy inserts towards an upstream must be masked.
    mask: bool,
    /// Shared with the other direction and the timers: last byte seen.
    activity: &'a watch::Sender<Instant>,
}

/// Relays one direction until it ends. Control requests (close, ping) are
/// acted on at the next frame boundary of this direction's stream.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    dir: Direction<'_>,
    mut ctl: watch::Receiver<Control>,
) -> io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut tracker = FrameTracker::default();
    let mut pending: Option<(Vec<u8>, bool)> = None; // (frame, is_close)
    let mut closed_by_proxy = false;
    let mut last_ping = 0u64;
    let mut ctl_open = true;
    loop {
        tokio::select! {
            changed = ctl.changed(), if ctl_open => {
                if changed.is_err() {
                    ctl_open = false;
                    continue;
                }
                let c = ctl.borrow_and_update().clone();
                if closed_by_proxy || tracker.close.is_some() {
                    continue;
                }
                if let Some((code, reason)) = &c.close {
                    pending = Some((close_frame(*code, reason, dir.mask), true));
                } else if c.ping_seq > last_ping && pending.is_none() {
                    last_ping = c.ping_seq;
                    pending = Some((control_frame(OP_PING, b"charon", dir.mask), false));
                }
                if tracker.at_boundary() {
                    if let Some((frame, is_close)) = pending.take() {
                        w.write_all(&frame).await?;
                        w.flush().await?;
                        closed_by_proxy |= is_close;
                    }
                }
            }
            read = poll_fn(|cx| poll_read_lent(&mut r, cx)) => {
                let (buf, n) = read?;
                if n == 0 {
                    give_buf(buf);
                    // Half-close: the other direction may still have data.
                    let _ = w.shutdown().await;
                    return Ok(End::Eof);
                }
                dir.activity.send_replace(Instant::now());
                dir.stats.bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let before = tracker.frames;
                let peer_closed_before = tracker.close.is_some();
                let mut pos = 0;
                let mut result = Ok(());
                while pos < n {
                    if tracker.at_boundary() {
                        if let Some((frame, is_close)) = pending.take() {
                            if let Err(e) = w.write_all(&frame).await {
                                result = Err(e);
                                break;
                            }
                            closed_by_proxy |= is_close;
                        }
                    }
                    let k = tracker.advance(&buf[pos..n], pending.is_some());
                    // After the proxy sent Close this way, nothing more may
                    // follow it: what the reader still sends (up to its own
                    // Close) is dropped.
                    if !closed_by_proxy {
                        if let Err(e) = w.write_all(&buf[pos..pos + k]).await {
                            result = Err(e);
                            break;
                        }
                    }
                    pos += k;
                }
                give_buf(buf);
                result?;
                if pending.is_some() && tracker.at_boundary() {
                    let (frame, is_close) = pending.take().expect("checked");
                    w.write_all(&frame).await?;
                    closed_by_proxy |= is_close;
                }
                w.flush().await?;
                dir.stats.frames.fetch_add(tracker.frames - before, std::sync::atomic::Ordering::Relaxed);
                if let (Some(code), false) = (tracker.close, peer_closed_before) {
                    dir.stats.record_close(code);
                    if closed_by_proxy {
                        return Ok(End::Handshake);
                    }
                }
            }
        }
    }
}

/// Relays between an upgraded client connection and an upgraded upstream
/// connection until both sides are done. Returns when the tunnel is over.
pub async fn relay<C, U>(client: C, upstream: U, info: Arc<TunnelInfo>, opts: TunnelOptions)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let activity = watch::Sender::new(Instant::now());
    let up = pump(
        cr,
        uw,
        Direction {
            stats: &info.to_upstream,
            mask: true,
            activity: &activity,
        },
        info.control.subscribe(),
    );
    let down = pump(
        ur,
        cw,
        Direction {
            stats: &info.to_client,
            mask: false,
            activity: &activity,
        },
        info.control.subscribe(),
    );
    tokio::pin!(up, down);
    let timers = timers(&info, &activity, opts);
    tokio::pin!(timers);
    let (mut up_done, mut down_done) = (false, false);
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                if let Err(e) = r {
                    tracing::debug!(tunnel = info.id, error = %e, "client side of tunnel failed");
                    break;
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if let Err(e) = r {
                    tracing::debug!(tunnel = info.id, error = %e, "upstream side of tunnel failed");
                    break;
                }
            }
            () = &mut timers => {}
            () = async { linger.as_mut().expect("guarded").await }, if linger.is_some() => break,
        }
        // Once a Close has passed both ways, the peers normally hang up;
        // bound how long we wait for them to.
        if linger.is_none()
            && info.to_client.close_code().is_some()
            && info.to_upstream.close_code().is_some()
        {
            linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
        }
    }
}

/// Idle timeout and keep-alive pings. Never completes on its own unless it
/// has nothing to do, in which case it pends forever (costing nothing).
async fn timers(info: &TunnelInfo, activity: &watch::Sender<Instant>, opts: TunnelOptions) {
    let tick = match (opts.idle_timeout, opts.ping_interval) {
        (None, None) => return std::future::pending().await,
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
    };
    let mut pings_unanswered = 0u32;
    let mut last_seen = *activity.borrow();
    loop {
        tokio::time::sleep(tick).await;
        let last = *activity.borrow();
        let quiet = last.elapsed();
        if let Some(idle) = opts.idle_timeout {
            if quiet >= idle {
                tracing::info!(tunnel = info.id, host = %info.host_name, "closing idle tunnel");
                info.close(1001, "idle timeout");
                return std::future::pending().await;
            }
        }
        if let Some(interval) = opts.ping_interval {
            if last != last_seen {
                pings_unanswered = 0;
                last_seen = last;
            }
            if quiet >= interval {
                if pings_unanswered >= 2 {
                    tracing::info!(tunnel = info.id, host = %info.host_name, "peer stopped answering pings; closing tunnel");
                    info.close(1001, "ping timeout");
                    return std::future::pending().await;
                }
                pings_unanswered += 1;
                info.control.send_modify(|c| c.ping_seq += 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tunnels::TunnelRegistry;
    use tokio::io::{duplex, AsyncReadExt};

    async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.unwrap();
        v
    }

    fn registry_info() -> (Arc<TunnelRegistry>, crate::proxy::tunnels::Registration) {
        let reg = Arc::new(TunnelRegistry::default());
        let r = reg.register("h", "h", "http://u".into(), "127.0.0.1:1".parse().unwrap());
        (reg, r)
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
    async fn passes_bytes_verbatim_and_injects_close_at_boundaries() {
        let (_reg, r) = registry_info();
        let info = r.info.clone();
        let (client_proxy, mut client) = duplex(1 << 16);
        let (upstream_proxy, mut upstream) = duplex(1 << 16);
        let task = tokio::spawn(relay(
            client_proxy,
            upstream_proxy,
            info.clone(),
            TunnelOptions::default(),
        ));

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
        let (_reg, r) = registry_info();
        let info = r.info.clone();
        let (client_proxy, mut client) = duplex(1 << 16);
        let (upstream_proxy, mut upstream) = duplex(1 << 16);
        let task = tokio::spawn(relay(
            client_proxy,
            upstream_proxy,
            info.clone(),
            TunnelOptions::default(),
        ));
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
        let (_reg, r) = registry_info();
        let info = r.info.clone();
        let (client_proxy, mut client) = duplex(1 << 16);
        let (upstream_proxy, _upstream) = duplex(1 << 16);
        let opts = TunnelOptions {
            idle_timeout: Some(Duration::from_secs(30)),
            ping_interval: None,
        };
        tokio::spawn(relay(client_proxy, upstream_proxy, info.clone(), opts));
        let mut head = [0u8; 4];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head, [0x88, 14, 0x03, 0xe9]);
    }
}
