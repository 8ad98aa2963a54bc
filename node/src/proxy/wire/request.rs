//! A request head, parsed: a pure function over the head's bytes that
//! decides the target, the host and the framing, or the refusal. Nothing
//! here knows of routes or policy (hyper's `role.rs` is the model).
//!
//! Rules (RFC 9112), each with a row in the tests below:
//! - the head itself: httparse, which refuses whitespace before a colon,
//!   obs-fold, bare CR, NUL and other control characters (400), and more
//!   than [`MAX_HEADERS`] fields (431). Bare LF line ends are taken
//!   (§2.2 allows it): the head is rewritten with CRLF before it goes on,
//!   so no one behind the proxy sees them.
//! - the target: origin-form (`/p?q`); absolute-form (`http://a/p`, whose
//!   authority is the host, §3.2.2; userinfo refused); `*` only with
//!   OPTIONS; a `#fragment` is refused (no form of §3.2 has one, and
//!   servers differ on whether it is part of the path); `CONNECT` is 405
//!   (a reverse proxy makes no tunnels to arbitrary authorities).
//! - Host: exactly one Host field in HTTP/1.1 (§3.2, even with an
//!   absolute-form target), with a value of visible ASCII that cannot be
//!   read as a path or userinfo.
//! - framing: [`Framer::request`].

use std::borrow::Cow;

use super::fields::{Framer, FramingError};
use super::Framing;

/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;

/// A request head the proxy will pass on.
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    pub method: &'b str,
    /// HTTP/1.`minor`.
    pub minor: u8,
    /// The target as it goes upstream: origin-form, or `*`.
    pub path: Cow<'b, str>,
    /// The request's host: an absolute-form target's authority, or the
    /// Host field's value.
    pub host: &'b [u8],
    pub framing: Framing,
    pub fields: &'h [httparse::Header<'b>],
}

/// A refused request head: the status to answer with, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub why: &'static str,
}

const fn refuse(status: u16, why: &'static str) -> Refused {
    Refused { status, why }
}

impl From<FramingError> for Refused {
    fn from(e: FramingError) -> Self {
        refuse(e.status, e.why)
    }
}

/// Parses the complete head `head` (request line to the empty line).
pub fn parse<'b, 'h>(
    head: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> Result<RequestHead<'b, 'h>, Refused> {
    let mut p = httparse::Request::new(headers);
    match p.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header fields")),
        _ => return Err(refuse(400, "malformed request")),
    }
    let httparse::Request {
        method: Some(method),
        path: Some(target),
        version: Some(minor),
        headers,
    } = p
    else {
        return Err(refuse(400, "malformed request"));
    };
    let fields: &'h [httparse::Header<'b>] = headers;
    if method == "CONNECT" {
        return Err(refuse(405, "CONNECT is not supported by a reverse proxy"));
    }
    let (authority, path) = target_parts(method, target)?;

    let mut framer = Framer::default();
    let mut hosts = 0;
    let mut host_field: &[u8] = b"";
    for h in fields {
        let name = h.name.as_bytes();
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                host_field = h.value;
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                framer.see_content_length(h.value)
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                framer.see_transfer_encoding(h.value)
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Err(refuse(400, "more than one Host header"));
    }
    if hosts == 0 && (minor == 1 || authority.is_none()) {
        return Err(refuse(400, "missing Host header"));
    }
    if hosts == 1 && !valid_host(host_field) {
        return Err(refuse(400, "invalid Host header"));
    }
    let host = match authority {
        Some(a) => a.as_bytes(),
        None => host_field,
    };
    let framing = framer.request(minor)?;
    Ok(RequestHead {
        method,
        minor,
        path,
        host,
        framing,
        fields,
    })
}

/// Splits a target into (absolute-form authority, origin-form path).
fn target_parts<'b>(
    method: &str,
    target: &'b str,
) -> Result<(Option<&'b str>, Cow<'b, str>), Refused> {
    if target.contains('#') {
        return Err(refuse(400, "fragment in the request target"));
    }
    if target == "*" {
        return match method {
            "OPTIONS" => Ok((None, Cow::Borrowed(target))),
            _ => Err(refuse(
                400,
                "request target * with a method other than OPTIONS",
            )),
        };
    }
    if target.starts_with('/') {
        return Ok((None, Cow::Borrowed(target)));
    }
    let Some(rest) = strip_scheme(target) else {
        return Err(refuse(400, "invalid request target"));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err(refuse(400, "userinfo in the request target"));
    }
    if !valid_host(authority.as_bytes()) {
        return Err(refuse(400, "invalid request target"));
    }
    let path = &rest[end..];
    let path = match path.as_bytes().first() {
        None => Cow::Borrowed("/"),
        Some(b'?') => Cow::Owned(format!("/{path}")),
        Some(_) => Cow::Borrowed(path),
    };
    Ok((Some(authority), path))
}

fn strip_scheme(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
}

/// A host (with an optional port) as it may appear in Host or an
/// absolute-form target: visible ASCII, none of the characters that would
/// make it a path, query, fragment or userinfo, or a quoted string.
fn valid_host(h: &[u8]) -> bool {
    !h.is_empty()
        && h.iter().all(|&b| {
            b.is_ascii_graphic()
                && !matches!(
                    b,
                    b'/' | b'\\'
                        | b'?'
                        | b'#'
                        | b'@'
                        | b'"'
                        | b'<'
                        | b'>'
                        | b'{'
                        | b'}'
                        | b'|'
                        | b'^'
                        | b'`'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `head` and returns (method, path, host, framing).
    fn parse_ok(head: &str) -> (String, String, String, Framing) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse(head.as_bytes(), &mut headers) {
            Ok(r) => (
                r.method.to_string(),
                r.path.into_owned(),
                String::from_utf8_lossy(r.host).into_owned(),
                r.framing,
            ),
            Err(e) => panic!("{head:?} refused: {e:?}"),
        }
    }

    fn parse_err(head: &[u8], status: u16, why: &str) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse(head, &mut headers) {
            Ok(r) => panic!("{:?} accepted: {r:?}", String::from_utf8_lossy(head)),
            Err(e) => assert_eq!(
                (e.status, e.why),
                (status, why),
                "{:?}",
                String::from_utf8_lossy(head)
            ),
        }
    }

    #[test]
    fn well_formed_heads() {
        let (m, p, h, f) = parse_ok("GET /a?b=1 HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert_eq!(
            (m.as_str(), p.as_str(), h.as_str(), f),
            ("GET", "/a?b=1", "a.test", Framing::Empty)
        );
        let (_, p, h, _) = parse_ok("GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert_eq!((p.as_str(), h.as_str()), ("/x", "b.test"));
        let (_, p, h, _) = parse_ok("GET HTTP://b.test:8080 HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert_eq!((p.as_str(), h.as_str()), ("/", "b.test:8080"));
        let (_, p, _, _) = parse_ok("GET http://b.test?q=1 HTTP/1.1\r\nHost: b.test\r\n\r\n");
        assert_eq!(p, "/?q=1");
        let (_, p, _, _) = parse_ok("OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert_eq!(p, "*");
        let (_, _, h, _) = parse_ok("GET http://b.test/ HTTP/1.0\r\n\r\n");
        assert_eq!(h, "b.test");
        let (_, _, _, f) = parse_ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(f, Framing::Length(3));
        let (_, _, _, f) =
            parse_ok("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(f, Framing::Chunked);
        // Bare LF line ends: taken, the head is rewritten before it goes on.
        let (_, _, h, _) = parse_ok("GET / HTTP/1.1\nHost: a.test\n\n");
        assert_eq!(h, "a.test");
    }

    /// One rule per row.
    #[test]
    fn refusals_rule_by_rule() {
        parse_err(
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            405,
            "CONNECT is not supported by a reverse proxy",
        );
        parse_err(
            b"CONNECT / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            405,
            "CONNECT is not supported by a reverse proxy",
        );
        parse_err(
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "request target * with a method other than OPTIONS",
        );
        parse_err(
            b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "fragment in the request target",
        );
        parse_err(
            b"GET /a?b#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "fragment in the request target",
        );
        parse_err(
            b"GET a.test/x HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "invalid request target",
        );
        parse_err(
            b"GET ftp://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "invalid request target",
        );
        parse_err(
            b"GET http:/// HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "invalid request target",
        );
        parse_err(
            b"GET http://u@b.test/ HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "userinfo in the request target",
        );
        parse_err(b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header");
        parse_err(
            b"GET http://b.test/ HTTP/1.1\r\n\r\n",
            400,
            "missing Host header",
        );
        parse_err(b"GET / HTTP/1.0\r\n\r\n", 400, "missing Host header");
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            400,
            "more than one Host header",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            400,
            "invalid Host header",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            400,
            "invalid Host header",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            400,
            "invalid Host header",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            400,
            "invalid Host header",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-T\t: 1\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-T: 1\r\n folded\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-T: a\rb\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-T: a\0b\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-T 1\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400, "malformed request");
        parse_err(
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "malformed request",
        );
        parse_err(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400, "both Transfer-Encoding and Content-Length");
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
            400,
            "invalid Transfer-Encoding",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked\r\n\r\n",
            400,
            "invalid Transfer-Encoding",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            400,
            "invalid Transfer-Encoding",
        );
        parse_err(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "invalid Transfer-Encoding");
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "unsupported transfer coding",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            400,
            "Transfer-Encoding does not end in chunked",
        );
        parse_err(
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "Transfer-Encoding in an HTTP/1.0 request",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            400,
            "more than one Content-Length",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
            "more than one Content-Length",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
            400,
            "invalid Content-Length",
        );
        parse_err(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            400,
            "invalid Content-Length",
        );
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        parse_err(&many, 431, "too many header fields");
    }
}
