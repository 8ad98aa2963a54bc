//! Replies the HTTP/1 front end writes itself (the pipeline's answers,
//! error pages, refusals of unreadable heads), and the small byte writers
//! every HTTP/1 head here is made with.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Client;
use crate::proxy::error::{self, ProxyError};
use crate::proxy::observe::{ReqFacts, Served};
use crate::proxy::pipeline;
use crate::proxy::routes::Route;

/// A request refused before it reached an upstream.
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) message: String,
    /// Set when the connection cannot go on (unreadable head, or a body
    /// that was not read).
    pub(super) close: bool,
    pub(super) route: Option<Arc<Route>>,
    pub(super) location: Option<String>,
    /// One more field (`WWW-Authenticate`), see `pipeline::Answer`.
    pub(super) header: Option<(http::HeaderName, String)>,
    pub(super) error: Option<ProxyError>,
    pub(super) facts: Option<ReqFacts>,
}

impl Refusal {
    /// A refusal that is an answer of the pipeline's (an error page, a
    /// redirect).
    pub(super) fn answer(
        a: pipeline::Answer,
        close: bool,
        route: Option<Arc<Route>>,
        error: Option<ProxyError>,
        facts: Option<ReqFacts>,
    ) -> Refusal {
        Refusal {
            status: a.status,
            message: a.body,
            close,
            route,
            location: a.location,
            header: a.header,
            error,
            facts,
        }
    }

    /// The error page for a request no upstream answered properly.
    pub(super) fn upstream(
        e: ProxyError,
        route: &Arc<Route>,
        close: bool,
        facts: Option<ReqFacts>,
    ) -> Refusal {
        let status = e.status();
        Refusal {
            status,
            message: error::page(status, &e),
            close,
            route: Some(route.clone()),
            location: None,
            header: None,
            error: Some(e),
            facts,
        }
    }
}

/// Appends `name: value\r\n`.
pub(super) fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal, without `format!`'s machinery.
pub(super) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

/// A field line of an answer: name and value.
type Line<'a> = (&'a [u8], &'a [u8]);

/// A response made by the proxy itself (errors, redirects). `fields` are
/// the answer's own (`Location`, `WWW-Authenticate`), where it has them.
pub(super) fn simple_response(
    out: &mut Vec<u8>,
    minor: u8,
    status: StatusCode,
    body: &str,
    close: bool,
    hsts: Option<&http::HeaderValue>,
    fields: &[Option<Line<'_>>],
) {
    out.extend_from_slice(if minor == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    push_u64(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    field(out, b"Content-Type", b"text/plain; charset=utf-8");
    out.extend_from_slice(b"Content-Length: ");
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    for (name, value) in fields.iter().flatten() {
        field(out, name, value);
    }
    if let Some(v) = hsts {
        field(out, b"Strict-Transport-Security", v.as_bytes());
    }
    if close {
        field(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Answers a request whose head could not be read, then the connection
    /// closes.
    pub(super) async fn refuse_head(&mut self, status: StatusCode, why: &str) {
        tracing::info!(client = %self.info.peer, status = status.as_u16(), "{why}; refused");
        self.out.clear();
        simple_response(
            &mut self.out,
            1,
            status,
            &error::page(status, &why),
            true,
            None,
            &[],
        );
        let _ = self.io.write_all(&self.out).await;
        let _ = self.io.flush().await;
    }

    /// Writes a refusal (error page or redirect) and records it; returns
    /// whether it was written.
    pub(super) async fn refuse(&mut self, r: Refusal, started: Instant) -> bool {
        self.out.clear();
        let close = r.close || self.closing();
        let hsts = pipeline::response_policy(r.route.as_deref(), &self.info);
        simple_response(
            &mut self.out,
            1,
            r.status,
            &r.message,
            close,
            hsts,
            &[
                r.location
                    .as_deref()
                    .map(|l| (&b"Location"[..], l.as_bytes())),
                r.header
                    .as_ref()
                    .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            ],
        );
        let sent = self.io.write_all(&self.out).await.is_ok() && self.io.flush().await.is_ok();
        self.proxy.record(Served {
            started,
            conn: &self.info,
            facts: r.facts.as_ref(),
            status: r.status.as_u16(),
            route: r.route.as_ref(),
            upstream: None,
            error: r.error.as_ref(),
            trace: None,
        });
        self.spare_facts = r.facts;
        sent
    }
}
