//! One request's way to an upstream: the pipeline's attempts phase over
//! the route's pool (failover on a refused connect, a stale pooled
//! connection replaced), the request head and body sent, the response head
//! read; then [`super::response`] takes over.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::answers::{field, Refusal};
use super::request::{Method, Req};
use super::response::HeadError;
use super::{Client, Step, INLINE_BODY};
use crate::proxy::error::ProxyError;
use crate::proxy::observe::ReqFacts;
use crate::proxy::pipeline;
use crate::proxy::upstream::UpstreamIo;
use crate::proxy::wire::{copy_body, Coding, CopyError, Framing};
use crate::proxy::Proxy;
use crate::telemetry::otel;

/// The upstream end of a request body being streamed. An upstream may
/// answer before the body's end (413, 401, a redirect) and stop reading;
/// a proxy that kept writing would wait on it until a timeout and answer
/// 502. So before each write this looks, without reading, whether the
/// upstream has begun to answer, and if it has, fails the write with
/// `answered` set: the body stops and the answer is read (RFC 9112 asks a
/// client sending a body to watch for an error response meanwhile).
pub(super) struct Heard<'a> {
    pub(super) io: &'a mut UpstreamIo,
    pub(super) answered: bool,
}

impl AsyncWrite for Heard<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.io.poll_has_input(cx).is_ready() {
            this.answered = true;
            return Poll::Ready(Err(io::Error::other(
                "the upstream answered before the request body's end",
            )));
        }
        match Pin::new(&mut *this.io).poll_write(cx, buf) {
            // An upstream that answered and closed: its answer may be
            // there to read all the same.
            Poll::Ready(Err(e)) => {
                this.answered = this.io.poll_has_input(cx).is_ready();
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Sends the request to an upstream (trying the pool's others when one
    /// cannot be reached) and the response back.
    pub(super) async fn exchange(&mut self, req: Req, started: Instant) -> Step {
        let proxy = self.proxy.clone();
        let h = &req.route.host;
        let resp_timeout = req.route.upstream_timeout;
        let tracing = proxy.telemetry.get().and_then(|t| t.tracing.as_ref());
        let server_cx = match (tracing, &req.facts) {
            (Some(tr), Some(f)) => Some(self.server_span(tr, f)),
            _ => None,
        };
        // A body that is already here whole can be sent again if a pooled
        // connection turns out to be closed.
        let buffered_body = match req.framing {
            Framing::Empty => Some(0),
            Framing::Length(l) if l as usize <= self.buf.len() && l as usize <= INLINE_BODY => {
                Some(l as usize)
            }
            _ => None,
        };
        // Whether the request's body has been read from the client (so the
        // connection can take another request after an error response).
        let mut body_read = matches!(req.framing, Framing::Empty | Framing::Length(0));
        let mut last_err: Option<ProxyError> = None;
        let mut outcome = None;
        'upstreams: for upstream in req.pool.attempt_order() {
            let mut pooled = true;
            loop {
                let (mut conn, reused) = match pooled.then(|| upstream.take_raw()).flatten() {
                    Some(c) => (c, true),
                    None => match proxy.connector.connect_raw(upstream).await {
                        Ok(c) => (c, false),
                        Err(e) => {
                            let e = ProxyError::Unreachable {
                                upstream: upstream.url.to_string(),
                                source: e,
                            };
                            let next = pipeline::attempt_failed(
                                upstream,
                                &e,
                                proxy.config.failure_cooldown,
                            );
                            last_err = Some(e);
                            if next {
                                continue 'upstreams;
                            }
                            break 'upstreams;
                        }
                    },
                };
                pooled = false;
                let client_cx = match (tracing, &server_cx) {
                    (Some(tr), Some(parent)) => {
                        let mut inject = http::HeaderMap::new();
                        let cx = tr.child_span(
                            parent,
                            format!(
                                "{} upstream",
                                req.facts.as_ref().map_or("", |f| f.method.as_str())
                            ),
                            opentelemetry::trace::SpanKind::Client,
                            vec![
                                KeyValue::new(
                                    "http.request.method",
                                    req.facts
                                        .as_ref()
                                        .map(|f| f.method.clone())
                                        .unwrap_or_default(),
                                ),
                                KeyValue::new(
                                    "server.address",
                                    upstream.url.authority().to_string(),
                                ),
                                KeyValue::new(
                                    "url.full",
                                    format!(
                                        "{}{}",
                                        upstream.url,
                                        String::from_utf8_lossy(
                                            &self.line[self
                                                .line
                                                .iter()
                                                .position(|&b| b == b' ')
                                                .map_or(0, |p| p + 1)
                                                ..self.line.len().saturating_sub(11)]
                                        )
                                    ),
                                ),
                            ],
                            Some(&mut inject),
                        );
                        Some((cx, inject))
                    }
                    _ => None,
                };
                // Head, and the body when it is here whole and small.
                self.out.clear();
                self.out.extend_from_slice(&self.line);
                match (h.preserve_host, &upstream.host_header) {
                    (false, Some(v)) => field(&mut self.out, b"Host", v.as_bytes()),
                    _ => field(&mut self.out, b"Host", &self.host),
                }
                self.out.extend_from_slice(&self.fields);
                if let Some((_, inject)) = &client_cx {
                    for (k, v) in inject {
                        field(&mut self.out, k.as_str().as_bytes(), v.as_bytes());
                    }
                }
                self.out.extend_from_slice(b"\r\n");
                if let Some(n) = buffered_body {
                    self.out.extend_from_slice(&self.buf.bytes()[..n]);
                }
                let sent = async {
                    conn.io.write_all(&self.out).await?;
                    conn.io.flush().await
                }
                .await;
                let end_span = |cx: &Option<(opentelemetry::Context, http::HeaderMap)>,
                                status: Option<u16>,
                                err: Option<String>| {
                    if let Some((cx, _)) = cx {
                        let attrs = status
                            .map(|s| vec![KeyValue::new("http.response.status_code", i64::from(s))])
                            .unwrap_or_default();
                        otel::end(cx, attrs, err);
                    }
                };
                if let Err(e) = sent {
                    if reused && buffered_body.is_some() {
                        end_span(&client_cx, None, Some(e.to_string()));
                        continue; // a stale pooled connection: a new one
                    }
                    end_span(&client_cx, None, Some(e.to_string()));
                    last_err = Some(ProxyError::UpstreamIo {
                        upstream: upstream.url.to_string(),
                        source: e,
                    });
                    break 'upstreams;
                }
                // The rest of the body, streamed.
                match buffered_body {
                    // Consumed once a response has come: until then it may
                    // have to be sent again on a new connection.
                    Some(_) => {}
                    None => {
                        if req.expect_continue {
                            let _ = self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                            let _ = self.io.flush().await;
                        }
                        let mut sink = Heard {
                            io: &mut conn.io,
                            answered: false,
                        };
                        let r = copy_body(
                            &mut self.io,
                            &mut self.buf,
                            &mut sink,
                            req.framing,
                            Coding::AsIs,
                            &mut self.timer,
                            proxy.config.header_read_timeout,
                        )
                        .await;
                        if sink.answered {
                            // The upstream answered before the body's end:
                            // the answer is read below, the rest of the body
                            // is not sent, and neither connection is reused.
                            tracing::debug!(host = %h.name, upstream = %upstream.url, "upstream answered before the request body's end");
                        } else if let Err(e) = r {
                            let (msg, err) = match e {
                                CopyError::Sink(e) => (
                                    e.to_string(),
                                    Some(ProxyError::UpstreamIo {
                                        upstream: upstream.url.to_string(),
                                        source: e,
                                    }),
                                ),
                                CopyError::Source(e) => (format!("client: {e}"), None),
                                CopyError::SourceTimedOut => ("client stalled".to_string(), None),
                                CopyError::SinkTimedOut => (
                                    "upstream stopped reading the body".to_string(),
                                    Some(ProxyError::Timeout {
                                        upstream: upstream.url.to_string(),
                                        timeout: proxy.config.header_read_timeout,
                                    }),
                                ),
                                CopyError::Invalid(w) => {
                                    (w.to_string(), Some(ProxyError::BadRequest(w)))
                                }
                            };
                            end_span(&client_cx, None, Some(msg));
                            match err {
                                Some(err) => last_err = Some(err),
                                // The client went away or stalled mid-body:
                                // nobody to answer.
                                None => return Step::Close,
                            }
                            break 'upstreams;
                        } else {
                            body_read = true;
                        }
                    }
                }
                // The response head, after any 1xx.
                match self
                    .read_response_head(
                        &mut conn,
                        resp_timeout,
                        req.method == Method::Head,
                        req.minor == 1,
                    )
                    .await
                {
                    Ok(mut head) => {
                        if let (false, Some(n)) = (body_read, buffered_body) {
                            self.buf.consume(n);
                            body_read = true;
                        }
                        if !body_read {
                            // An early answer: the upstream still expects the
                            // rest of the body, the client is still sending it.
                            head.reusable = false;
                            head.linger = true;
                        }
                        end_span(&client_cx, Some(head.status), None);
                        upstream.mark_up();
                        outcome = Some((upstream.clone(), conn, head));
                        break 'upstreams;
                    }
                    Err(HeadError::Closed) if reused && buffered_body.is_some() => {
                        end_span(&client_cx, None, Some("closed".into()));
                        continue;
                    }
                    Err(HeadError::ClientGone) => {
                        end_span(&client_cx, None, Some("client went away".into()));
                        return Step::Close;
                    }
                    Err(e) => {
                        end_span(&client_cx, None, Some(e.to_string()));
                        let e = match e {
                            HeadError::TimedOut => ProxyError::Timeout {
                                upstream: upstream.url.to_string(),
                                timeout: resp_timeout,
                            },
                            HeadError::Io(e) => ProxyError::UpstreamIo {
                                upstream: upstream.url.to_string(),
                                source: e,
                            },
                            HeadError::Closed => ProxyError::UpstreamIo {
                                upstream: upstream.url.to_string(),
                                source: std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "connection closed before a response",
                                ),
                            },
                            HeadError::Invalid(w) => ProxyError::UpstreamBad {
                                upstream: upstream.url.to_string(),
                                why: w,
                            },
                            HeadError::ClientGone => unreachable!("handled above"),
                        };
                        pipeline::attempt_failed(upstream, &e, proxy.config.failure_cooldown);
                        last_err = Some(e);
                        break 'upstreams;
                    }
                }
            }
        }
        let Some((upstream, conn, head)) = outcome else {
            let e = last_err.expect("a pool has at least one upstream");
            tracing::warn!(host = %h.name, host_id = %h.id, client = %self.info.peer, status = e.status().as_u16(), "{e}");
            if let (false, Some(n)) = (body_read, buffered_body) {
                self.buf.consume(n);
                body_read = true;
            }
            let close = !body_read;
            let status = e.status();
            let r = Refusal::upstream(e, &req.route, close || !req.keep_alive, req.facts);
            let close = r.close;
            if let Some(cx) = &server_cx {
                self.proxy.end_server_span(
                    cx,
                    status.as_u16(),
                    Some(&req.route),
                    None,
                    r.error.as_ref(),
                );
            }
            let sent = self.refuse(r, started).await;
            return if close || !sent {
                Step::Close
            } else {
                Step::KeepAlive
            };
        };
        self.respond(req, started, upstream, conn, head, server_cx)
            .await
    }

    pub(super) fn server_span(&self, tr: &otel::Tracing, f: &ReqFacts) -> opentelemetry::Context {
        let mut carrier = http::HeaderMap::new();
        if let Some(v) = &f.traceparent {
            carrier.insert("traceparent", v.clone());
        }
        if let Some(v) = &f.tracestate {
            carrier.insert("tracestate", v.clone());
        }
        Proxy::server_span(tr, &carrier, f, &self.info, "1.1")
    }
}
