//! HTTP/1.x on the wire, as a layer over bytes that knows nothing of
//! routes or policy: a read buffer, message framing, the chunked coding,
//! field-line rules, head parsing, and the small I/O helpers the proxy's
//! HTTP/1 path is made of.
//!
//! - [`fields`]: field-line rules and the framing decision (TE/CL).
//! - [`chunked`]: the chunked coding, read strictly, written normalised.
//! - [`request`]: a request head's target, host and framing, or its refusal.
//! - [`response`]: a response head's framing; interim heads rewritten.
//!
//! Length-delimited bodies pass through as bytes; a chunked body is
//! re-framed by [`chunked::Chunked`] (or decoded for HTTP/1.0 clients, who
//! cannot take the chunked coding).

pub mod chunked;
pub mod fields;
pub mod request;
pub mod response;

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use chunked::{Chunked, Emit};

/// Grows a buffer by at least this much when it is full.
const READ_CHUNK: usize = 8 * 1024;
/// Size of the buffers bodies are streamed through.
pub const BODY_BUF: usize = 64 * 1024;
/// Body buffers kept per worker thread between uses.
const BODY_BUFS_PER_THREAD: usize = 32;

/// A read buffer: bytes `start..end` of `data` are unread. Plain indices
/// over one zero-initialised `Vec`, so reads need no `unsafe` and the
/// buffer is reused for every message on a connection.
#[derive(Default)]
pub struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    pub fn with_capacity(n: usize) -> Buf {
        Buf {
            data: vec![0; n],
            start: 0,
            end: 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Takes the unread bytes out (for a tunnel's first bytes).
    pub fn take(&mut self) -> Vec<u8> {
        let v = self.bytes().to_vec();
        self.start = 0;
        self.end = 0;
        v
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        let spare = self.spare(bytes.len());
        spare[..bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Room to read into, at least `min` bytes: moves unread bytes to the
    /// front, or grows the buffer.
    fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.data.len() - self.end < min {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < min {
                let want = (self.end + min).max(self.data.len() + READ_CHUNK);
                self.data.resize(want, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Frees the memory of an empty buffer (an idle keep-alive connection
    /// should not hold it).
    pub fn shrink_if_empty(&mut self, keep: usize) {
        if self.is_empty() && self.data.len() > keep {
            self.data = vec![0; keep];
        }
    }
}

/// What one read ended with.
#[derive(Debug)]
pub enum Read {
    /// This many new bytes are in the buffer.
    Data(usize),
    Eof,
    TimedOut,
    /// The listener is shutting down and the caller asked to be told.
    Shutdown,
    Err(io::Error),
}

/// Reads once into `buf` (at least 1 byte of room, growing it when full),
/// giving up at the timer's deadline. `stop` is checked only while the read
/// is pending, so a busy connection is never cut by it.
pub async fn read_into<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Buf,
    mut timer: Option<Pin<&mut Sleep>>,
    mut stop: Option<&mut (dyn FnMut(&mut Context<'_>) -> bool + Send)>,
) -> Read {
    poll_fn(|cx| {
        let room = buf.spare(1024);
        let mut rb = ReadBuf::new(room);
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                buf.end += n;
                return Poll::Ready(if n == 0 { Read::Eof } else { Read::Data(n) });
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Read::Err(e)),
            Poll::Pending => {}
        }
        if let Some(stop) = stop.as_mut() {
            if stop(cx) {
                return Poll::Ready(Read::Shutdown);
            }
        }
        if let Some(t) = timer.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Read::TimedOut);
            }
        }
        Poll::Pending
    })
    .await
}

/// Arms `timer` for `d` from now.
pub fn arm(timer: &mut Pin<Box<Sleep>>, d: std::time::Duration) {
    timer.as_mut().reset(Instant::now() + d);
}

/// How a message's body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

thread_local! {
    static BODY_BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A body buffer lent from a per-thread pool while one body is streamed:
/// a connection that is not streaming holds none.
pub struct BodyBuf(Option<Box<[u8]>>);

impl BodyBuf {
    pub fn take() -> BodyBuf {
        let b = BODY_BUFS
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BODY_BUF].into_boxed_slice());
        BodyBuf(Some(b))
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("taken until dropped")
    }

    pub fn bytes(&self) -> &[u8] {
        self.0.as_deref().expect("taken until dropped")
    }
}

impl Drop for BodyBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            BODY_BUFS.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < BODY_BUFS_PER_THREAD {
                    p.push(b);
                }
            });
        }
    }
}

/// Why a body could not be passed on, by whose side failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the body's source failed, or it ended early.
    Source(io::Error),
    /// The source sent something that is not a valid body.
    Invalid(&'static str),
    /// The source was silent for longer than allowed.
    SourceTimedOut,
    /// Writing to the destination failed (the receiver went away).
    Sink(io::Error),
    /// The destination took nothing for longer than allowed (a receiver
    /// that stopped reading).
    SinkTimedOut,
}

/// How a body is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// In its own framing: a length-delimited body byte for byte, a
    /// chunked one chunked again with normalised framing.
    AsIs,
    /// Chunked in, plain data out (for HTTP/1.0 clients).
    Dechunk,
}

/// Streams one body from `src` (its first bytes already in `buf`) to
/// `dst`, `idle` being the longest silence allowed between reads. Bytes
/// after the body stay in `buf`. Returns the number of bytes written.
#[allow(clippy::too_many_arguments)]
pub async fn copy_body<R, W>(
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    framing: Framing,
    coding: Coding,
    timer: &mut Pin<Box<Sleep>>,
    idle: std::time::Duration,
) -> Result<u64, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunked = (Chunked::default(), Vec::new());
    let mut remaining = match framing {
        Framing::Empty | Framing::Length(0) => return Ok(0),
        Framing::Length(n) => n,
        Framing::Chunked | Framing::Close => u64::MAX,
    };
    let mut written = 0u64;
    // First the bytes already read with the head.
    if !buf.is_empty() {
        let (used, done) = pass(
            buf.bytes(),
            framing,
            coding,
            &mut remaining,
            &mut chunked,
            dst,
            &mut written,
            (&mut *timer, idle),
        )
        .await?;
        buf.consume(used);
        if done {
            return Ok(written);
        }
    }
    let mut scratch = BodyBuf::take();
    loop {
        // The whole buffer's room even when fewer body bytes remain: a read
        // that comes back short tells the reactor the socket is drained, so
        // the next read waits for readiness instead of costing an EAGAIN
        // syscall (as an exact-size read of the body's last bytes did).
        // Whatever follows the body (a pipelining peer's next message) goes
        // back to `buf` below.
        arm(timer, idle);
        let n = read_slice(src, scratch.bytes_mut(), timer.as_mut()).await?;
        if n == 0 {
            return match framing {
                Framing::Close => Ok(written),
                _ => Err(CopyError::Source(io::ErrorKind::UnexpectedEof.into())),
            };
        }
        let data = &scratch.bytes_mut()[..n];
        let (used, done) = pass(
            data,
            framing,
            coding,
            &mut remaining,
            &mut chunked,
            dst,
            &mut written,
            (&mut *timer, idle),
        )
        .await?;
        if done {
            // A pipelining peer's next message: back to the connection's buffer.
            if used < n {
                buf.extend(&scratch.bytes_mut()[used..n]);
            }
            return Ok(written);
        }
    }
}

/// Passes the body's part of `data` on; returns (bytes used, body done).
#[allow(clippy::too_many_arguments)]
async fn pass<W: AsyncWrite + Unpin>(
    data: &[u8],
    framing: Framing,
    coding: Coding,
    remaining: &mut u64,
    (chunked, framed): &mut (Chunked, Vec<u8>),
    dst: &mut W,
    written: &mut u64,
    (timer, idle): (&mut Pin<Box<Sleep>>, std::time::Duration),
) -> Result<(usize, bool), CopyError> {
    match framing {
        Framing::Empty => Ok((0, true)),
        Framing::Length(_) => {
            let n = (*remaining).min(data.len() as u64) as usize;
            write_all(dst, &data[..n], timer, idle).await?;
            *written += n as u64;
            *remaining -= n as u64;
            Ok((n, *remaining == 0))
        }
        Framing::Close => {
            write_all(dst, data, timer, idle).await?;
            *written += data.len() as u64;
            Ok((data.len(), false))
        }
        Framing::Chunked => {
            let emit = match coding {
                Coding::AsIs => Emit::Normalised,
                Coding::Dechunk => Emit::Decoded,
            };
            framed.clear();
            let n = chunked
                .scan(data, framed, emit)
                .map_err(CopyError::Invalid)?;
            write_all(dst, framed, timer, idle).await?;
            *written += framed.len() as u64;
            Ok((n, chunked.is_done()))
        }
    }
}

/// Writes all of `data`, failing with `SinkTimedOut` once the destination
/// has taken nothing for `idle`. The timer is armed only when a write has
/// to wait, so a write that goes through at once costs no timer work.
async fn write_all<W: AsyncWrite + Unpin>(
    dst: &mut W,
    data: &[u8],
    timer: &mut Pin<Box<Sleep>>,
    idle: std::time::Duration,
) -> Result<(), CopyError> {
    if data.is_empty() {
        return Ok(());
    }
    let mut data = data;
    // Whether the timer runs for the current wait (re-armed after progress).
    let mut armed = false;
    poll_fn(|cx| {
        loop {
            let r = if data.is_empty() {
                Pin::new(&mut *dst).poll_flush(cx).map_ok(|()| 0)
            } else {
                Pin::new(&mut *dst).poll_write(cx, data)
            };
            match r {
                Poll::Ready(Ok(0)) if data.is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(CopyError::Sink(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    data = &data[n..];
                    armed = false;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(CopyError::Sink(e))),
                Poll::Pending => break,
            }
        }
        if !armed {
            arm(timer, idle);
            armed = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(CopyError::SinkTimedOut));
        }
        Poll::Pending
    })
    .await
}

/// Runs `fut` (a write) unless it is still pending `idle` after it first
/// had to wait: `None` then. As with [`write_all`], the timer is only
/// armed once the write waits.
pub async fn within<F: Future>(
    fut: F,
    timer: &mut Pin<Box<Sleep>>,
    idle: std::time::Duration,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut armed = false;
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if !armed {
            arm(timer, idle);
            armed = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Reads what `src` has ready now, without waiting: `None` when nothing is
/// (or at its end, or on an error, which the next real read meets again).
///
/// The reactor's readiness decides first, so this costs a syscall only where
/// the last read left the socket marked readable (it filled its buffer), and
/// that read usually finds more. With it a response whose body came right
/// behind its head goes out in one write instead of two.
pub fn read_ready<R: AsyncRead + Unpin>(src: &mut R, dst: &mut [u8]) -> Option<usize> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut rb = ReadBuf::new(dst);
    match Pin::new(src).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) if !rb.filled().is_empty() => Some(rb.filled().len()),
        _ => None,
    }
}

/// Writes the parts in order, in one `writev` where the stream takes
/// vectors (a plain socket does; otherwise one write each), or one plain
/// write when only one part has bytes.
pub async fn write_parts<W: AsyncWrite + Unpin>(dst: &mut W, parts: [&[u8]; 3]) -> io::Result<()> {
    if !dst.is_write_vectored() {
        for p in parts {
            dst.write_all(p).await?;
        }
        return dst.flush().await;
    }
    let mut parts = parts;
    while parts.iter().any(|p| !p.is_empty()) {
        // One part left (a small response is all in the first): a plain
        // `send`, which costs the kernel less than a `writev` of one vector
        // among empty ones (no iovec import, no per-vector copy setup).
        let mut nonempty = parts.iter().filter(|p| !p.is_empty());
        let n = match (nonempty.next(), nonempty.next()) {
            (Some(only), None) => dst.write(only).await?,
            _ => dst.write_vectored(&parts.map(io::IoSlice::new)).await?,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        for p in parts.iter_mut() {
            let k = left.min(p.len());
            *p = &p[k..];
            left -= k;
        }
    }
    dst.flush().await
}

/// [`read_ready`] into `buf`'s free room (without growing it).
pub fn read_ready_into<R: AsyncRead + Unpin>(src: &mut R, buf: &mut Buf) -> Option<usize> {
    let room = buf.spare(1);
    let n = read_ready(src, room)?;
    buf.end += n;
    Some(n)
}

async fn read_slice<R: AsyncRead + Unpin>(
    src: &mut R,
    dst: &mut [u8],
    mut timer: Pin<&mut Sleep>,
) -> Result<usize, CopyError> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(dst);
        match Pin::new(&mut *src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => return Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(CopyError::Source(e))),
            Poll::Pending => {}
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(CopyError::SourceTimedOut));
        }
        Poll::Pending
    })
    .await
}

/// A connection whose first bytes were already read: they are read again
/// first. Used where a connection changes hands with bytes in flight (an
/// h2 preface, a tunnel's first frames).
pub struct Prefixed<S> {
    /// The bytes not yet read again: a boxed slice and no read position,
    /// as a tunnel keeps one of these per side for its whole life (a read
    /// that takes only part of it, which readers with buffers as large as
    /// the head never do, keeps the rest in a new box).
    prefix: Box<[u8]>,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix: prefix.into_boxed_slice(),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            // All read (the usual case): the memory goes back, as a tunnel
            // may live for days.
            self.prefix = self.prefix[n..].into();
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that takes at most `max` bytes per call and logs which
    /// call was made: partial writes, as a full socket buffer gives them.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
        calls: Vec<&'static str>,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            self.calls.push("write");
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
            }
            self.calls.push("writev");
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Every byte goes out in order however the writes are cut, vectors
    /// only while two parts have bytes, and a lone part with a plain write
    /// (the cheaper system call for a small response).
    #[tokio::test]
    async fn write_parts_sends_all_in_order_and_a_lone_part_plainly() {
        let mut t = Trickle {
            out: Vec::new(),
            max: 4,
            calls: Vec::new(),
        };
        write_parts(&mut t, [b"head:", b"", b"body"]).await.unwrap();
        assert_eq!(t.out, b"head:body");
        // "head" | ":" + "bod" | "y" alone.
        assert_eq!(t.calls, ["writev", "writev", "write"]);

        let mut t = Trickle {
            out: Vec::new(),
            max: 1024,
            calls: Vec::new(),
        };
        write_parts(&mut t, [b"", b"only", b""]).await.unwrap();
        assert_eq!(t.out, b"only");
        assert_eq!(t.calls, ["write"]);
    }

    #[test]
    fn buf_reuses_and_grows() {
        let mut b = Buf::with_capacity(4);
        b.extend(b"abc");
        b.consume(2);
        b.extend(b"defghij");
        assert_eq!(b.bytes(), b"cdefghij");
        b.consume(8);
        assert!(b.is_empty());
        assert_eq!(b.take(), b"");
    }

    #[tokio::test]
    async fn prefixed_reads_its_prefix_first() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
