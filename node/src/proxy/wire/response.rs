//! An upstream's response head, parsed (a pure function over bytes), and
//! the serialiser for the interim (1xx) responses passed on to clients.
//!
//! Rules: httparse's strict defaults (no whitespace before a colon, no
//! obs-fold, no control characters in values: 502); framing by
//! [`Framer::response`] (a `Transfer-Encoding` other than `chunked`, or
//! differing lengths: 502). Final heads are rewritten field by field by
//! the caller; interim ones are rewritten here, never passed on raw.

use super::fields::Framer;
use super::Framing;

/// A response head as far as the wire is concerned.
#[derive(Debug)]
pub struct ResponseHead<'b, 'h> {
    /// Bytes of the head, its empty line included.
    pub len: usize,
    pub status: u16,
    pub minor: u8,
    pub reason: &'b str,
    /// `Framing::Empty` for an interim (1xx) response.
    pub framing: Framing,
    /// `Transfer-Encoding` was present (so any `Content-Length` is dropped).
    pub te: bool,
    pub fields: &'h [httparse::Header<'b>],
}

impl ResponseHead<'_, '_> {
    /// A 1xx other than 101: more heads follow.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses the response head at the start of `buf`: `Ok(None)` while it is
/// incomplete. `head_request`: the response answers a HEAD (no body).
pub fn parse<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
    head_request: bool,
) -> Result<Option<ResponseHead<'b, 'h>>, &'static str> {
    let mut p = httparse::Response::new(headers);
    let len = match p.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many fields in the response head"),
        Err(_) => return Err("malformed response head"),
    };
    let httparse::Response {
        version: Some(minor),
        code: Some(status),
        reason,
        headers,
    } = p
    else {
        return Err("malformed response head");
    };
    let fields: &'h [httparse::Header<'b>] = headers;
    let mut framer = Framer::default();
    for h in fields {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            framer.see_content_length(h.value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framer.see_transfer_encoding(h.value);
        }
    }
    let interim = (100..200).contains(&status) && status != 101;
    let no_body = interim || head_request || status == 204 || status == 304 || status == 101;
    let framing = framer.response(no_body).map_err(|e| e.why)?;
    Ok(Some(ResponseHead {
        len,
        status,
        minor,
        reason: reason.unwrap_or(""),
        framing,
        te: framer.has_transfer_encoding(),
        fields,
    }))
}

/// Fields never passed on in an interim response: it has no body, and its
/// connection fields are the upstream connection's, not the client's.
const INTERIM_DROPPED: [&str; 7] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "proxy-connection",
    "trailer",
];

/// Appends an interim response (a 103 Early Hints, say) rewritten as
/// HTTP/1.1 with CRLF line ends and `name: value` fields.
pub fn write_interim(out: &mut Vec<u8>, head: &ResponseHead<'_, '_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.to_string().as_bytes());
    out.push(b' ');
    let reason = match head.reason {
        "" => http::StatusCode::from_u16(head.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or(""),
        r => r,
    };
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in head.fields {
        if INTERIM_DROPPED
            .iter()
            .any(|d| h.name.eq_ignore_ascii_case(d))
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(buf: &[u8], head_request: bool) -> (u16, Framing, usize) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match parse(buf, &mut headers, head_request) {
            Ok(Some(r)) => (r.status, r.framing, r.len),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn parse_err(buf: &[u8], why: &str) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match parse(buf, &mut headers, false) {
            Err(e) => assert_eq!(e, why, "{:?}", String::from_utf8_lossy(buf)),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn framing_rule_by_rule() {
        assert_eq!(
            parse_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false),
            (200, Framing::Length(3), 38)
        );
        assert_eq!(
            parse_ok(b"HTTP/1.1 200 OK\r\n\r\n", false).1,
            Framing::Close
        );
        assert_eq!(
            parse_ok(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .1,
            Framing::Chunked
        );
        assert_eq!(
            parse_ok(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .1,
            Framing::Chunked
        );
        assert_eq!(
            parse_ok(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .1,
            Framing::Length(3)
        );
        assert_eq!(
            parse_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).1,
            Framing::Empty
        );
        assert_eq!(
            parse_ok(b"HTTP/1.1 204 No Content\r\n\r\n", false).1,
            Framing::Empty
        );
        assert_eq!(
            parse_ok(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            )
            .1,
            Framing::Empty
        );
        assert_eq!(
            parse_ok(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false).1,
            Framing::Empty
        );
        assert_eq!(
            parse_ok(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", false),
            (200, Framing::Length(0), 35)
        );
        let mut headers = [httparse::EMPTY_HEADER; 32];
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nX: 1", &mut headers, false),
            Ok(None)
        ));
        parse_err(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "unsupported Transfer-Encoding from upstream",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "unsupported Transfer-Encoding from upstream",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "invalid Content-Length from upstream",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3 \x00\r\n\r\n",
            "malformed response head",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nX-T : 1\r\n\r\n",
            "malformed response head",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nX-T: 1\r\n folded\r\n\r\n",
            "malformed response head",
        );
        parse_err(
            b"HTTP/1.1 200 OK\r\nX-T: a\rb\r\n\r\n",
            "malformed response head",
        );
        parse_err(b"HTTP/1.1 2000 OK\r\n\r\n", "malformed response head");
    }

    #[test]
    fn interim_heads_are_rewritten() {
        let raw = b"HTTP/1.1 103 \nLink:   </a>; rel=preload \nConnection: keep-alive\nContent-Length: 0\n\n";
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let head = parse(raw, &mut headers, false).unwrap().unwrap();
        assert!(head.is_interim());
        let mut out = Vec::new();
        write_interim(&mut out, &head);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
        );
    }
}
