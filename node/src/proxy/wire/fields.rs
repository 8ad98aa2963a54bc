//! Field-line rules (RFC 9110 §5, RFC 9112 §5) shared by request heads,
//! response heads and chunked trailer sections, and the framing decision
//! (RFC 9112 §6) made from `Transfer-Encoding` and `Content-Length`.
//!
//! Pure functions over bytes: nothing here knows of routes or policy. The
//! rule throughout is the one the request-smuggling differentials teach:
//! what two parsers could read differently is refused, not repaired.

use super::Framing;

/// `tchar` (RFC 9110 §5.6.2): the characters of a token.
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
        | b'^' | b'_' | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// A non-empty run of `tchar`.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A field value's bytes (RFC 9110 §5.5): HTAB, SP, VCHAR and obs-text.
/// No NUL, no CR or LF, no other control character.
pub fn is_field_value(v: &[u8]) -> bool {
    v.iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// One field line without its CRLF: `token ":" OWS value OWS`. Returns the
/// name and the value with its optional whitespace trimmed. Whitespace
/// before the colon, a line that begins with whitespace (obs-fold), a
/// line without a colon, and control characters are refused.
pub fn parse_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("folded field line");
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or("field line without a colon")?;
    let name = &line[..colon];
    if !is_token(name) {
        return Err("invalid field name");
    }
    let value = trim_ows(&line[colon + 1..]);
    if !is_field_value(value) {
        return Err("invalid field value");
    }
    Ok((name, value))
}

/// Trims optional whitespace (SP and HTAB only) at both ends.
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t');
    let Some(start) = start else { return &[] };
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .unwrap_or(start);
    &v[start..=end]
}

/// The elements of a comma-separated list, each trimmed (empty ones kept,
/// so a caller can refuse them).
pub fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows)
}

pub fn has_token(v: &[u8], t: &str) -> bool {
    tokens(v).any(|x| x.eq_ignore_ascii_case(t.as_bytes()))
}

/// Content-Length: digits only, at most 18 of them (no sign, no list, no
/// whitespace inside: `5, 5` and `+5` are not lengths).
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Why a head's framing is refused: the status to answer with (for a
/// request; a response's refusal is always the proxy's 502) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingError {
    pub status: u16,
    pub why: &'static str,
}

const fn refuse(status: u16, why: &'static str) -> FramingError {
    FramingError { status, why }
}

/// Collects a head's `Transfer-Encoding` and `Content-Length` fields (all
/// of them, however many lines they come on) and decides the framing.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    te: bool,
    /// A `Transfer-Encoding` element that is empty, not a bare token
    /// (parameters), `identity` (no longer a coding, RFC 9112 §7), or a
    /// second `chunked`.
    te_malformed: bool,
    /// A coding other than `chunked` was named.
    te_other: bool,
    chunked_seen: bool,
    /// The last element so far is `chunked`.
    te_last_chunked: bool,
    lengths: u32,
    length: Option<u64>,
    /// A Content-Length that is not a number, or two that differ.
    bad_length: bool,
}

impl Framer {
    pub fn see_transfer_encoding(&mut self, value: &[u8]) {
        self.te = true;
        for t in tokens(value) {
            if t.eq_ignore_ascii_case(b"chunked") {
                if self.chunked_seen {
                    self.te_malformed = true;
                }
                self.chunked_seen = true;
                self.te_last_chunked = true;
                continue;
            }
            self.te_last_chunked = false;
            if !is_token(t) || t.eq_ignore_ascii_case(b"identity") {
                self.te_malformed = true;
            } else {
                self.te_other = true;
            }
        }
    }

    pub fn see_content_length(&mut self, value: &[u8]) {
        self.lengths += 1;
        match parse_length(value) {
            Some(v) if self.length.is_none_or(|l| l == v) => self.length = Some(v),
            _ => self.bad_length = true,
        }
    }

    pub fn has_transfer_encoding(&self) -> bool {
        self.te
    }

    /// A request's framing (RFC 9112 §6.1-6.3), strictly: a request whose
    /// length two parsers could disagree on is refused. `Transfer-Encoding`
    /// with `Content-Length` is refused rather than the length dropped (as
    /// the RFC would allow): the sender is either broken or probing, and a
    /// proxy that repairs the message forwards something its sender did not
    /// mean (nginx and HAProxy in their strict modes refuse it too).
    pub fn request(&self, minor: u8) -> Result<Framing, FramingError> {
        if self.te {
            if self.lengths > 0 {
                return Err(refuse(400, "both Transfer-Encoding and Content-Length"));
            }
            if minor == 0 {
                return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
            }
            if self.te_malformed {
                return Err(refuse(400, "invalid Transfer-Encoding"));
            }
            if !self.te_last_chunked {
                // RFC 9112 §6.3: the length cannot be known; MUST be 400.
                return Err(refuse(400, "Transfer-Encoding does not end in chunked"));
            }
            if self.te_other {
                // RFC 9112 §6.1: a coding the server does not implement.
                return Err(refuse(501, "unsupported transfer coding"));
            }
            return Ok(Framing::Chunked);
        }
        if self.lengths > 1 {
            // Even equal duplicates: RFC 9112 §6.3 lets a recipient take
            // them, but whoever is behind the proxy might not.
            return Err(refuse(400, "more than one Content-Length"));
        }
        if self.bad_length {
            return Err(refuse(400, "invalid Content-Length"));
        }
        Ok(match self.length {
            Some(l) => Framing::Length(l),
            None => Framing::Empty,
        })
    }

    /// A response's framing. `no_body`: the response to a HEAD, a 1xx, 204
    /// or 304. A coding other than exactly `chunked` is refused (nginx does
    /// the same) rather than read to the close: the proxy re-frames the
    /// body and would otherwise hand the client coded bytes it was not told
    /// of. Equal duplicate lengths are taken (RFC 9112 §6.3) and sent on as
    /// one; `Transfer-Encoding` overrides `Content-Length`, which is then
    /// dropped.
    pub fn response(&self, no_body: bool) -> Result<Framing, FramingError> {
        if no_body {
            return Ok(Framing::Empty);
        }
        if self.te {
            if self.te_malformed || self.te_other || !self.te_last_chunked {
                return Err(refuse(502, "unsupported Transfer-Encoding from upstream"));
            }
            return Ok(Framing::Chunked);
        }
        if self.bad_length {
            return Err(refuse(502, "invalid Content-Length from upstream"));
        }
        Ok(match self.length {
            Some(l) => Framing::Length(l),
            None => Framing::Close,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lines() {
        let ok = |l: &[u8], n: &[u8], v: &[u8]| {
            assert_eq!(
                parse_field_line(l),
                Ok((n, v)),
                "{:?}",
                String::from_utf8_lossy(l)
            );
        };
        let err = |l: &[u8], why: &str| {
            assert_eq!(
                parse_field_line(l),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(l)
            );
        };
        ok(b"X-T: 1", b"X-T", b"1");
        ok(b"X-T:1", b"X-T", b"1");
        ok(b"X-T: \t a b \t", b"X-T", b"a b");
        ok(b"X-T:", b"X-T", b"");
        ok(b"X-T: caf\xc3\xa9", b"X-T", b"caf\xc3\xa9");
        err(b"X-T : 1", "invalid field name");
        err(b"X-T\t: 1", "invalid field name");
        err(b": 1", "invalid field name");
        err(b"X-T", "field line without a colon");
        err(b" X-T: 1", "folded field line");
        err(b"\tcontinued", "folded field line");
        err(b"X-T: a\0b", "invalid field value");
        err(b"X-T: a\rb", "invalid field value");
        err(b"X-T: a\nb", "invalid field value");
        err(b"X-T: a\x7fb", "invalid field value");
        err(b"X(T): 1", "invalid field name");
    }

    #[test]
    fn lengths() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"12345"), Some(12345));
        assert_eq!(parse_length(b"+5"), None);
        assert_eq!(parse_length(b"1 2"), None);
        assert_eq!(parse_length(b"5, 5"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"9999999999999999999"), None);
        assert_eq!(
            parse_length(b"999999999999999999"),
            Some(999_999_999_999_999_999)
        );
    }

    fn framer(te: &[&[u8]], cl: &[&[u8]]) -> Framer {
        let mut f = Framer::default();
        for v in te {
            f.see_transfer_encoding(v);
        }
        for v in cl {
            f.see_content_length(v);
        }
        f
    }

    /// One rule per row: the request's framing, or its refusal and why.
    #[test]
    fn request_framing_rule_by_rule() {
        let ok = |te: &[&[u8]], cl: &[&[u8]], f: Framing| {
            assert_eq!(framer(te, cl).request(1), Ok(f), "TE {te:?} CL {cl:?}");
        };
        let err = |te: &[&[u8]], cl: &[&[u8]], status: u16, why: &'static str| {
            assert_eq!(
                framer(te, cl).request(1),
                Err(FramingError { status, why }),
                "TE {te:?} CL {cl:?}"
            );
        };
        ok(&[], &[], Framing::Empty);
        ok(&[], &[b"0"], Framing::Length(0));
        ok(&[], &[b"12"], Framing::Length(12));
        ok(&[b"chunked"], &[], Framing::Chunked);
        ok(&[b"Chunked"], &[], Framing::Chunked);
        ok(&[b" chunked "], &[], Framing::Chunked);
        err(&[], &[b"5", b"5"], 400, "more than one Content-Length");
        err(&[], &[b"5", b"6"], 400, "more than one Content-Length");
        err(&[], &[b"5, 5"], 400, "invalid Content-Length");
        err(&[], &[b"-1"], 400, "invalid Content-Length");
        err(
            &[b"chunked"],
            &[b"5"],
            400,
            "both Transfer-Encoding and Content-Length",
        );
        err(
            &[b"chunked"],
            &[b"x"],
            400,
            "both Transfer-Encoding and Content-Length",
        );
        err(
            &[b"identity, chunked"],
            &[],
            400,
            "invalid Transfer-Encoding",
        );
        err(&[b", chunked"], &[], 400, "invalid Transfer-Encoding");
        err(&[b"chunked,"], &[], 400, "invalid Transfer-Encoding");
        err(
            &[b"chunked, chunked"],
            &[],
            400,
            "invalid Transfer-Encoding",
        );
        err(
            &[b"chunked", b"chunked"],
            &[],
            400,
            "invalid Transfer-Encoding",
        );
        err(&[b"chunked;q=1"], &[], 400, "invalid Transfer-Encoding");
        err(&[b"\"chunked\""], &[], 400, "invalid Transfer-Encoding");
        err(&[b""], &[], 400, "invalid Transfer-Encoding");
        err(
            &[b"chunked, gzip"],
            &[],
            400,
            "Transfer-Encoding does not end in chunked",
        );
        err(
            &[b"chunked", b"gzip"],
            &[],
            400,
            "Transfer-Encoding does not end in chunked",
        );
        err(
            &[b"gzip"],
            &[],
            400,
            "Transfer-Encoding does not end in chunked",
        );
        err(&[b"gzip, chunked"], &[], 501, "unsupported transfer coding");
        err(
            &[b"gzip", b"chunked"],
            &[],
            501,
            "unsupported transfer coding",
        );
        assert_eq!(
            framer(&[b"chunked"], &[]).request(0),
            Err(FramingError {
                status: 400,
                why: "Transfer-Encoding in an HTTP/1.0 request"
            })
        );
    }

    #[test]
    fn response_framing_rule_by_rule() {
        let f = |te: &[&[u8]], cl: &[&[u8]]| framer(te, cl).response(false);
        let bad_te = Err(FramingError {
            status: 502,
            why: "unsupported Transfer-Encoding from upstream",
        });
        assert_eq!(f(&[], &[]), Ok(Framing::Close));
        assert_eq!(f(&[], &[b"3"]), Ok(Framing::Length(3)));
        assert_eq!(f(&[], &[b"3", b"3"]), Ok(Framing::Length(3)));
        assert_eq!(f(&[b"chunked"], &[b"3"]), Ok(Framing::Chunked));
        assert_eq!(f(&[b"chunked"], &[]), Ok(Framing::Chunked));
        assert_eq!(f(&[b"gzip, chunked"], &[]), bad_te);
        assert_eq!(f(&[b"gzip"], &[]), bad_te);
        assert_eq!(f(&[b"chunked, chunked"], &[]), bad_te);
        assert_eq!(
            f(&[], &[b"3", b"4"]),
            Err(FramingError {
                status: 502,
                why: "invalid Content-Length from upstream"
            })
        );
        assert_eq!(
            framer(&[b"gzip"], &[b"x"]).response(true),
            Ok(Framing::Empty)
        );
    }
}
