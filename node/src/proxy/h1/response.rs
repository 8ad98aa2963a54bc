//! The upstream's response on its way to the client: its head read
//! (interim responses handled) and rewritten (hop-by-hop fields out, the
//! pipeline's response policy in), its body streamed or, after a 101, both
//! connections handed to a tunnel.

use std::future::{poll_fn, Future};
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use super::answers::{field, push_u64, Refusal};
use super::request::{classify, head_end, MessageFields, Req, H};
use super::{Client, Step, Tunnel, INLINE_BODY, LINGER, MAX_HEAD, MAX_HEADERS};
use crate::proxy::error::ProxyError;
use crate::proxy::observe::Served;
use crate::proxy::pipeline;
use crate::proxy::upstream::{RawConn, UpstreamState};
use crate::proxy::wire;
use crate::proxy::wire::{
    arm, copy_body, read_into, read_ready, read_ready_into, within, write_parts, BodyBuf, Coding,
    CopyError, Framing, Read,
};

#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    #[error("connection closed before a response")]
    Closed,
    #[error("no response in time")]
    TimedOut,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Invalid(&'static str),
    /// Passing an interim response on to the client failed.
    #[error("the client went away")]
    ClientGone,
}

/// What the proxy needs of an upstream's response head.
pub(super) struct RespHead {
    pub(super) len: usize,
    pub(super) status: u16,
    /// Where the reason phrase lies in the head.
    pub(super) reason: Range<usize>,
    pub(super) framing: Framing,
    /// Transfer-Encoding was present.
    pub(super) te: Option<()>,
    /// The connection may carry another request afterwards.
    pub(super) reusable: bool,
    /// Fields named in `Connection`, to be dropped.
    pub(super) named: Vec<Vec<u8>>,
    pub(super) subprotocol: Option<String>,
    pub(super) extensions: Option<String>,
    /// Body bytes that came in the head's read but were left in the body
    /// buffer it was read into (see [`read_behind`]).
    pub(super) behind: Option<Behind>,
    /// The answer came before the request's body had all been read from
    /// the client: the client connection closes after it, lingering.
    pub(super) linger: bool,
}

impl RespHead {
    /// Also records where each field lies in the head (offsets from
    /// `base`, the head's first byte) in `fields`, so that the head is
    /// parsed once even though it is rewritten later.
    pub(super) fn from_parsed(
        p: &wire::response::ResponseHead<'_, '_>,
        base: usize,
        fields: &mut Vec<(H, Range<usize>, Range<usize>)>,
    ) -> RespHead {
        let range = |s: &[u8]| {
            let at = s.as_ptr() as usize - base;
            at..at + s.len()
        };
        fields.clear();
        let status = p.status;
        let mut m = MessageFields::default();
        let mut subprotocol = None;
        let mut extensions = None;
        for h in p.fields {
            let kind = classify(h.name);
            fields.push((kind, range(h.name.as_bytes()), range(h.value)));
            match kind {
                H::Connection => m.see(kind, h.value),
                H::Other if status == 101 => {
                    if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                        subprotocol = Some(String::from_utf8_lossy(h.value).into_owned());
                    } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
                        extensions = Some(String::from_utf8_lossy(h.value).into_owned());
                    }
                }
                _ => {}
            }
        }
        let framing = p.framing;
        let reusable =
            framing != Framing::Close && !m.close && (p.minor == 1 || m.keep) && status != 101;
        RespHead {
            len: p.len,
            status,
            reason: match p.reason {
                "" => 0..0,
                r => range(r.as_bytes()),
            },
            framing,
            te: p.te.then_some(()),
            reusable,
            named: m.named.iter().map(|t| t.to_vec()).collect(),
            subprotocol,
            extensions,
            behind: None,
            linger: false,
        }
    }
}

/// Bytes read past a response head into a body buffer.
pub(super) struct Behind {
    pub(super) buf: BodyBuf,
    pub(super) at: usize,
    pub(super) end: usize,
}

impl Behind {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf.bytes()[self.at..self.end]
    }
}

/// Reads a response head from a plain upstream connection whose buffer is
/// empty, into a 64 KiB body buffer taken only once the socket is readable
/// (so no connection holds one while it waits). The head goes to the
/// connection's buffer; body bytes that came with it stay where they are,
/// and leave with the head in one write. A response of up to 64 KiB then
/// costs one read, where an 8 KiB head read made it two. Up to
/// `INLINE_BODY` it all goes to the connection's buffer (one small copy).
pub(super) async fn read_behind(
    conn: &mut RawConn,
    mut timer: Pin<&mut Sleep>,
) -> (Read, Option<Behind>) {
    let got = poll_fn(|cx| {
        if let Poll::Ready(r) = conn.io.poll_readable(cx) {
            if let Err(e) = r {
                return Poll::Ready(Err(Some(e)));
            }
            let mut scratch = BodyBuf::take();
            let mut rb = ReadBuf::new(scratch.bytes_mut());
            match Pin::new(&mut conn.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    return Poll::Ready(Ok((scratch, n)));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e))),
                // Readiness was stale: now cleared, and the waker registered
                // (the buffer goes back to the pool).
                Poll::Pending => {}
            }
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(None));
        }
        Poll::Pending
    })
    .await;
    match got {
        Ok((_, 0)) => (Read::Eof, None),
        Ok((scratch, n)) => {
            let bytes = &scratch.bytes()[..n];
            // A small response goes whole to the connection's buffer and out
            // with the head in one plain write, as before this path existed.
            let end = if n > INLINE_BODY {
                head_end(bytes)
            } else {
                None
            };
            match end {
                Some(end) if end < n => {
                    conn.buf.extend(&bytes[..end]);
                    let b = Behind {
                        buf: scratch,
                        at: end,
                        end: n,
                    };
                    (Read::Data(n), Some(b))
                }
                _ => {
                    conn.buf.extend(bytes);
                    (Read::Data(n), None)
                }
            }
        }
        Err(None) => (Read::TimedOut, None),
        Err(Some(e)) => (Read::Err(e), None),
    }
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Reads the upstream's response head and works out its framing.
    /// Interim (1xx) responses other than 101 come before it: 100 Continue
    /// is dropped (the proxy answers `Expect` itself), the others (103
    /// Early Hints) are passed on, rewritten (`wire::response::write_interim`),
    /// when `forward_interim` (an HTTP/1.1 client; HTTP/1.0 has no 1xx) and
    /// dropped otherwise.
    pub(super) async fn read_response_head(
        &mut self,
        conn: &mut RawConn,
        timeout: Duration,
        head_request: bool,
        forward_interim: bool,
    ) -> Result<RespHead, HeadError> {
        let mut armed = false;
        let mut behind: Option<Behind> = None;
        loop {
            if !conn.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let parsed =
                    match wire::response::parse(conn.buf.bytes(), &mut headers, head_request) {
                        Ok(Some(r)) if r.is_interim() => {
                            // Rewritten (never passed on raw), or dropped.
                            if forward_interim && r.status != 100 {
                                let mut interim = Vec::with_capacity(r.len);
                                wire::response::write_interim(&mut interim, &r);
                                Some((r.len, Err(interim)))
                            } else {
                                Some((r.len, Err(Vec::new())))
                            }
                        }
                        Ok(Some(r)) => {
                            let base = conn.buf.bytes().as_ptr() as usize;
                            let head = RespHead::from_parsed(&r, base, &mut self.resp_fields);
                            Some((r.len, Ok(head)))
                        }
                        Ok(None) if conn.buf.len() >= MAX_HEAD => {
                            return Err(HeadError::Invalid("response head too large"))
                        }
                        Ok(None) => None,
                        Err(why) => return Err(HeadError::Invalid(why)),
                    };
                // Body bytes read past the head stay in their body buffer only
                // for a final response of known length, whose head is all the
                // connection's buffer holds; otherwise they join that buffer
                // and are parsed (or streamed) from there.
                let keep = matches!(&parsed, Some((len, Ok(h)))
                    if matches!(h.framing, Framing::Length(_)) && *len == conn.buf.len());
                let mut folded = false;
                if !keep {
                    if let Some(b) = behind.take() {
                        conn.buf.extend(b.bytes());
                        folded = true;
                    }
                }
                match parsed {
                    // A 1xx: passed on or dropped; what follows is parsed next.
                    Some((len, Err(interim))) => {
                        if !interim.is_empty() {
                            let sent = self.io.write_all(&interim).await;
                            if sent.is_err() || self.io.flush().await.is_err() {
                                return Err(HeadError::ClientGone);
                            }
                        }
                        conn.buf.consume(len);
                        continue;
                    }
                    Some((_, Ok(mut head))) => {
                        head.behind = behind.take();
                        return Ok(head);
                    }
                    // More bytes were already here: parse again with them.
                    None if folded => continue,
                    None => {}
                }
            }
            if !armed {
                arm(&mut self.timer, timeout);
                armed = true;
            }
            let read = if conn.buf.is_empty() && conn.io.is_plain() {
                let (read, b) = read_behind(conn, self.timer.as_mut()).await;
                behind = b;
                read
            } else {
                read_into(&mut conn.io, &mut conn.buf, Some(self.timer.as_mut()), None).await
            };
            match read {
                Read::Data(_) => {}
                Read::Eof if conn.buf.is_empty() => return Err(HeadError::Closed),
                Read::Eof => {
                    return Err(HeadError::Invalid(
                        "connection closed inside the response head",
                    ))
                }
                Read::TimedOut => return Err(HeadError::TimedOut),
                Read::Err(e) => return Err(HeadError::Io(e)),
                Read::Shutdown => unreachable!("no stop check given"),
            }
        }
    }

    /// Writes the response head and streams the body to the client.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn respond(
        &mut self,
        req: Req,
        started: Instant,
        upstream: Arc<UpstreamState>,
        mut conn: RawConn,
        mut head: RespHead,
        server_cx: Option<opentelemetry::Context>,
    ) -> Step {
        if head.status == 101 {
            return self
                .upgrade(req, started, upstream, conn, head, server_cx)
                .await;
        }
        let client_minor = req.minor;
        let linger = head.linger;
        let (framing, coding, chunked_out) = match head.framing {
            Framing::Chunked if client_minor == 0 => (Framing::Chunked, Coding::Dechunk, false),
            Framing::Chunked => (Framing::Chunked, Coding::AsIs, true),
            f => (f, Coding::AsIs, false),
        };
        let close = !req.keep_alive
            || linger
            || self.closing()
            || framing == Framing::Close
            || coding == Coding::Dechunk;
        let hsts = pipeline::response_policy(Some(&req.route), &self.info).cloned();
        // A chunked body whose first bytes are already malformed: a 502
        // while nothing has gone out (later, the response is cut).
        if head.framing == Framing::Chunked {
            if let Err(why) = wire::chunked::check(&conn.buf.bytes()[head.len..]) {
                return self
                    .refuse_bad_body(why, req, started, &upstream, server_cx.as_ref())
                    .await;
            }
        }

        // The head, rewritten from the upstream's.
        self.out.clear();
        let how = HeadOut {
            minor: client_minor,
            close,
            chunked: chunked_out,
        };
        write_response_head(
            &mut self.out,
            conn.buf.bytes(),
            &head,
            &self.resp_fields,
            how,
            hsts.as_ref(),
        );
        if let Some(cookie) = &req.affinity.set_cookie {
            add_field(&mut self.out, b"Set-Cookie", cookie.as_bytes());
        }
        conn.buf.consume(head.len);
        // What of the body is already here goes out with the head, in one
        // write (all of a small body; the first part of a large one).
        let (framing, body_done, behind, tail) =
            inline_body(&mut self.out, &mut conn, head.behind.take(), framing);
        let status = head.status;
        let mut error = None;
        let mut client_gone = false;
        let mut upstream_ok = head.reusable;
        // A client that stopped reading is given up on after the response's
        // inactivity timeout (the route's upstream timeout), here as while
        // the body streams.
        let idle = req.route.upstream_timeout;
        let parts = match &behind {
            Some(b) => [&self.out[..], b.bytes(), &conn.buf.bytes()[..tail]],
            None => [&self.out[..], &[][..], &[][..]],
        };
        let wrote = within(write_parts(&mut self.io, parts), &mut self.timer, idle).await;
        let wrote = wrote.unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()));
        drop(behind);
        conn.buf.consume(tail);
        if wrote.is_err() {
            client_gone = true;
            upstream_ok = upstream_ok && body_done;
        } else if !body_done {
            let r = copy_body(
                &mut conn.io,
                &mut conn.buf,
                &mut self.io,
                framing,
                coding,
                &mut self.timer,
                idle,
            )
            .await;
            if let Err(e) = r {
                // The head has gone out: the client learns of a failure by
                // the connection closing before the body's end.
                client_gone = true;
                upstream_ok = false;
                error = self.body_failed(e, &req, &upstream);
            }
        }
        if upstream_ok && conn.buf.is_empty() {
            upstream.release_raw(conn);
        }
        let answered = Answered {
            status,
            upstream: &upstream,
            error: error.as_ref(),
        };
        self.record_answer(&req, started, answered, server_cx.as_ref());
        self.spare_facts = req.facts;
        if close || client_gone {
            let _ = self.io.shutdown().await;
            if linger && !client_gone {
                self.linger().await;
            }
            Step::Close
        } else {
            Step::KeepAlive
        }
    }

    /// The record phase for a request the upstream answered: the server
    /// span ends, and metrics and the access log take the exchange.
    fn record_answer(
        &self,
        req: &Req,
        started: Instant,
        answered: Answered<'_>,
        server_cx: Option<&opentelemetry::Context>,
    ) {
        let upstream = Some(&answered.upstream.url_text);
        if let Some(cx) = server_cx {
            let route = Some(&req.route);
            let error = answered.error;
            self.proxy
                .end_server_span(cx, answered.status, route, upstream, error);
        }
        self.proxy.record(Served {
            started,
            conn: &self.info,
            facts: req.facts.as_ref(),
            status: answered.status,
            route: Some(&req.route),
            upstream,
            error: answered.error,
            trace: server_cx,
        });
    }

    /// Answers 502 for an upstream response whose body is malformed before
    /// anything of it has gone to the client, and closes.
    async fn refuse_bad_body(
        &mut self,
        why: &'static str,
        req: Req,
        started: Instant,
        upstream: &UpstreamState,
        server_cx: Option<&opentelemetry::Context>,
    ) -> Step {
        let e = ProxyError::UpstreamBad {
            upstream: upstream.url.to_string(),
            why,
        };
        if let Some(cx) = server_cx {
            self.proxy
                .end_server_span(cx, 502, Some(&req.route), None, Some(&e));
        }
        let r = Refusal::upstream(e, &req.route, true, req.facts);
        self.refuse(r, started).await;
        Step::Close
    }

    /// Logs why a response body could not be passed on whole; the error
    /// to record when it was the upstream's fault.
    fn body_failed(&self, e: CopyError, req: &Req, upstream: &UpstreamState) -> Option<ProxyError> {
        let host = &req.route.name;
        match e {
            CopyError::Sink(_) => None,
            CopyError::SinkTimedOut => {
                tracing::info!(host = %host, client = %self.info.peer, "client stopped reading the response; closing");
                None
            }
            e => {
                tracing::warn!(host = %host, upstream = %upstream.url, client = %self.info.peer, "upstream response body failed: {e:?}");
                Some(ProxyError::UpstreamBad {
                    upstream: upstream.url.to_string(),
                    why: "response body ended early or was malformed",
                })
            }
        }
    }

    /// A 101 to a WebSocket upgrade: the head goes back rewritten, the
    /// request is recorded, then the connections become a tunnel.
    async fn upgrade(
        &mut self,
        req: Req,
        started: Instant,
        upstream: Arc<UpstreamState>,
        mut conn: RawConn,
        head: RespHead,
        server_cx: Option<opentelemetry::Context>,
    ) -> Step {
        let proxy = self.proxy.clone();
        if !req.websocket {
            let e = ProxyError::UpstreamBad {
                upstream: upstream.url.to_string(),
                why: "101 Switching Protocols to a request that asked for no upgrade",
            };
            let r = Refusal::upstream(e, &req.route, true, req.facts);
            self.refuse(r, started).await;
            return Step::Close;
        }
        let mut out = Vec::with_capacity(head.len + 32);
        write_switching_head(&mut out, conn.buf.bytes(), &head, &self.resp_fields);
        if let Some(cookie) = &req.affinity.set_cookie {
            add_field(&mut out, b"Set-Cookie", cookie.as_bytes());
        }
        conn.buf.consume(head.len);
        if self.io.write_all(&out).await.is_err() || self.io.flush().await.is_err() {
            return Step::Close;
        }
        let span = proxy.tunnel_span(
            server_cx.as_ref(),
            &req.route.host.name,
            &upstream,
            &self.info,
            head.subprotocol.as_deref(),
            head.extensions.as_deref(),
        );
        let answered = Answered {
            status: 101,
            upstream: &upstream,
            error: None,
        };
        self.record_answer(&req, started, answered, server_cx.as_ref());
        Step::Tunnel(Box::new(Tunnel {
            route: req.route,
            upstream,
            conn,
            span,
            lease: None,
            held: req.held,
        }))
    }

    /// After an answer that came before the request body's end, with the
    /// write side already shut: reads and drops what the client still
    /// sends, until it closes or for `LINGER` at most. Closing a socket
    /// with unread bytes resets the connection, and a reset can reach the
    /// client before it has read the answer, which it would then lose (the
    /// lingering close of nginx and HAProxy).
    pub(super) async fn linger(&mut self) {
        arm(&mut self.timer, LINGER);
        loop {
            let n = self.buf.len();
            self.buf.consume(n);
            match read_into(&mut self.io, &mut self.buf, Some(self.timer.as_mut()), None).await {
                Read::Data(_) => {}
                _ => return,
            }
        }
    }
}

/// What the upstream answered, for [`Client::record_answer`].
struct Answered<'a> {
    status: u16,
    upstream: &'a UpstreamState,
    error: Option<&'a ProxyError>,
}

/// How a response head goes to the client.
#[derive(Clone, Copy)]
pub(super) struct HeadOut {
    /// The client's HTTP minor version.
    pub(super) minor: u8,
    /// `Connection: close` is said.
    pub(super) close: bool,
    /// The body goes chunked.
    pub(super) chunked: bool,
}

/// A 101's head, rewritten like every head (CRLF, `name: value`) rather
/// than passed on raw, its fields all kept: they are the handshake's.
/// Adds one field to a head already written whole into `out` (it ends
/// with the blank line): the sticky cookie of phase 5.
fn add_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    debug_assert!(out.ends_with(b"\r\n\r\n"));
    out.truncate(out.len() - 2);
    field(out, name, value);
    out.extend_from_slice(b"\r\n");
}

fn write_switching_head(
    out: &mut Vec<u8>,
    raw: &[u8],
    head: &RespHead,
    fields: &[(H, Range<usize>, Range<usize>)],
) {
    out.extend_from_slice(b"HTTP/1.1 101 ");
    out.extend_from_slice(match &raw[head.reason.clone()] {
        r if !r.is_empty() => r,
        _ => b"Switching Protocols",
    });
    out.extend_from_slice(b"\r\n");
    for (_, name, value) in fields {
        field(out, &raw[name.clone()], &raw[value.clone()]);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the response head for the client from the upstream's (`raw` is
/// the upstream connection's buffer, which the head's ranges index):
/// hop-by-hop fields and those `Connection` names out, the framing and
/// connection fields re-stated, `hsts` (the pipeline's response policy)
/// in place of the upstream's own.
pub(super) fn write_response_head(
    out: &mut Vec<u8>,
    raw: &[u8],
    head: &RespHead,
    fields: &[(H, Range<usize>, Range<usize>)],
    how: HeadOut,
    hsts: Option<&http::HeaderValue>,
) {
    out.extend_from_slice(if how.minor == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    push_u64(out, u64::from(head.status));
    out.push(b' ');
    match &raw[head.reason.clone()] {
        r if !r.is_empty() => out.extend_from_slice(r),
        _ => out.extend_from_slice(
            StatusCode::from_u16(head.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    let mut wrote_length = false;
    for (kind, name, value) in fields {
        let name = &raw[name.clone()];
        let keep = match kind {
            H::Connection | H::Upgrade | H::HopByHop | H::TransferEncoding => false,
            H::ContentLength => {
                let k = !wrote_length && head.te.is_none();
                wrote_length = true;
                k
            }
            H::Sts => hsts.is_none(),
            _ => !head.named.iter().any(|t| t.eq_ignore_ascii_case(name)),
        };
        if keep {
            field(out, name, &raw[value.clone()]);
        }
    }
    if how.chunked {
        field(out, b"Transfer-Encoding", b"chunked");
    }
    if how.close {
        field(out, b"Connection", b"close");
    } else if how.minor == 0 {
        field(out, b"Connection", b"keep-alive");
    }
    if let Some(v) = hsts {
        field(out, b"Strict-Transport-Security", v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Takes what of a response body is already here into `out`, behind the
/// head, so that it leaves in the head's write: all of a small body, the
/// first part of a large one. Body bytes that came right behind the head
/// but past the head's read buffer (`behind`, or read now if ready) join
/// that write too, as a vectored one, with `tail` more bytes from the
/// connection's buffer. Returns the framing of what is still to come,
/// whether the body is all here, the bytes behind and `tail`.
fn inline_body(
    out: &mut Vec<u8>,
    conn: &mut RawConn,
    behind: Option<Behind>,
    framing: Framing,
) -> (Framing, bool, Option<Behind>, usize) {
    let Framing::Length(l) = framing else {
        return (framing, framing == Framing::Empty, None, 0);
    };
    let mut tail = 0;
    let n = (l as usize).min(conn.buf.len()).min(INLINE_BODY);
    out.extend_from_slice(&conn.buf.bytes()[..n]);
    conn.buf.consume(n);
    let mut rest = l - n as u64;
    let mut behind = behind.or_else(|| {
        if rest == 0 || !conn.buf.is_empty() {
            return None;
        }
        let mut buf = BodyBuf::take();
        let end = read_ready(&mut conn.io, buf.bytes_mut())?;
        Some(Behind { buf, at: 0, end })
    });
    if let Some(b) = &mut behind {
        let take = ((b.end - b.at) as u64).min(rest) as usize;
        // Past the body: kept, so the connection is not reused.
        conn.buf.extend(&b.buf.bytes()[b.at + take..b.end]);
        b.end = b.at + take;
        rest -= take as u64;
    }
    // A body longer than the body buffer: what more is ready now joins the
    // same write, from the connection's buffer.
    if rest > 0 && behind.is_some() && conn.buf.is_empty() {
        if let Some(got) = read_ready_into(&mut conn.io, &mut conn.buf) {
            tail = (got as u64).min(rest) as usize;
            rest -= tail as u64;
        }
    }
    (Framing::Length(rest), rest == 0, behind, tail)
}
