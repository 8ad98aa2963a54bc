//! The chunked transfer coding (RFC 9112 §7.1), read strictly and written
//! out normalised, in both directions (request bodies to upstreams,
//! response bodies to clients).
//!
//! The framing is never passed on as it came: each chunk-size line is
//! re-emitted as `{size:x}\r\n`, extensions are validated
//! (`;token[=token|quoted-string]`, no whitespace) and dropped, and the
//! trailer section is parsed as field lines and re-emitted as
//! `name: value\r\n` (fields that could be taken for framing or routing are
//! dropped). Chunk data is copied as it is and never looked at as framing.
//! Anything a lenient parser could read differently is refused: a bare LF
//! or CR anywhere in the framing (`0\r\n\n`, `5\n`), whitespace after a
//! size (`5 `), an empty or unterminated extension (`5;`, `5;a="x`),
//! garbage around a size, sizes of more than 15 hex digits, trailer lines
//! without a colon, with control characters or folded. Before this, such
//! bytes went through raw and an LF-tolerant origin read what followed a
//! bare LF as a request the proxy never saw.

/// Longest trailer section accepted (bytes as received).
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Most chunk-extension bytes accepted over one body (they are dropped, but
/// reading them costs: an unbounded run of them is a cheap slow attack).
pub const MAX_EXTENSIONS: usize = 16 * 1024;
/// Most hex digits in a chunk size (60 bits; leading zeros count).
const MAX_SIZE_DIGITS: u8 = 15;

/// Trailer fields never passed on: they could be read as framing,
/// routing or connection control by whoever receives them (RFC 9110
/// §6.5.1).
const DROPPED_TRAILERS: [&str; 9] = [
    "transfer-encoding",
    "content-length",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// What [`Chunked::scan`] writes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// The body, chunked again with normalised framing.
    Normalised,
    /// The chunk data only (for an HTTP/1.0 client, which cannot take the
    /// chunked coding); trailers are dropped.
    Decoded,
    /// Nothing: the bytes are only checked.
    Nothing,
}

/// Where the scanner is in the coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Size,
    /// After `;`: an extension name must follow.
    ExtName,
    ExtNameMore,
    /// After `=`: a token or a quoted string.
    ExtValue,
    ExtToken,
    Quoted,
    QuotedEscape,
    /// After a closing quote.
    ExtEnd,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// In a trailer line (or at the empty line that ends the section).
    Trailer,
    TrailerLf,
    Done,
}

/// Reads a chunked body along, writing it out normalised or decoded.
#[derive(Debug)]
pub struct Chunked {
    st: St,
    size: u64,
    digits: u8,
    ext_bytes: usize,
    /// The trailer line being read.
    line: Vec<u8>,
    /// Trailer fields read so far, normalised; they go out with the last
    /// chunk once the section has ended well.
    trailers: Vec<u8>,
    trailer_bytes: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            st: St::Size,
            size: 0,
            digits: 0,
            ext_bytes: 0,
            line: Vec::new(),
            trailers: Vec::new(),
            trailer_bytes: 0,
        }
    }
}

/// Appends `n` in lower-case hex.
fn push_hex(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut d = [0u8; 16];
    let mut i = d.len();
    let mut n = n;
    loop {
        i -= 1;
        d[i] = HEX[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

/// `qdtext` (RFC 9110 §5.6.4).
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff)
}

use super::fields::{is_tchar, parse_field_line};

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Scans `input`, appending what is to be sent on to `out`; returns
    /// how many of its bytes belong to the body (all of them unless the
    /// body ends inside). On an error nothing more may be sent: what `out`
    /// holds is framing-consistent up to the error (a chunk's data never
    /// goes out without its size line, the last chunk only with a
    /// well-formed trailer section).
    pub fn scan(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        emit: Emit,
    ) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() && self.st != St::Done {
            if self.st == St::Data {
                let n = (self.size.min((input.len() - i) as u64)) as usize;
                if emit != Emit::Nothing {
                    out.extend_from_slice(&input[i..i + n]);
                }
                i += n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.st = St::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.st = match self.st {
                St::Size => self.size_byte(b)?,
                St::ExtName
                | St::ExtNameMore
                | St::ExtValue
                | St::ExtToken
                | St::Quoted
                | St::QuotedEscape
                | St::ExtEnd => self.ext_byte(b)?,
                St::SizeLf => match b {
                    b'\n' if self.size == 0 => St::Trailer,
                    b'\n' => {
                        if emit == Emit::Normalised {
                            push_hex(out, self.size);
                            out.extend_from_slice(b"\r\n");
                        }
                        St::Data
                    }
                    _ => return Err("CR without LF in a chunk-size line"),
                },
                St::DataCr => match b {
                    b'\r' => St::DataLf,
                    b'\n' => return Err("bare LF after chunk data"),
                    _ => return Err("chunk longer than its size"),
                },
                St::DataLf => match b {
                    b'\n' => {
                        if emit == Emit::Normalised {
                            out.extend_from_slice(b"\r\n");
                        }
                        self.digits = 0;
                        St::Size
                    }
                    _ => return Err("CR without LF after chunk data"),
                },
                St::Trailer => match b {
                    b'\r' => St::TrailerLf,
                    b'\n' => return Err("bare LF in the trailer section"),
                    _ => {
                        self.trailer_bytes += 1;
                        if self.trailer_bytes > MAX_TRAILERS {
                            return Err("trailer section too large");
                        }
                        self.line.push(b);
                        St::Trailer
                    }
                },
                St::TrailerLf => match b {
                    b'\n' => self.trailer_line_end(out, emit)?,
                    _ => return Err("CR without LF in the trailer section"),
                },
                St::Data | St::Done => unreachable!("handled above"),
            };
        }
        Ok(i)
    }

    fn size_byte(&mut self, b: u8) -> Result<St, &'static str> {
        Ok(match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                if self.digits == MAX_SIZE_DIGITS {
                    return Err("chunk size too large");
                }
                let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                self.size = self.size * 16 + d;
                self.digits += 1;
                St::Size
            }
            b'\n' => return Err("bare LF in a chunk-size line"),
            _ if self.digits == 0 => return Err("invalid chunk size"),
            b';' => St::ExtName,
            b'\r' => St::SizeLf,
            _ => return Err("invalid chunk size"),
        })
    }

    /// One byte of a chunk extension: `;name`, `;name=token` or
    /// `;name="quoted"`, repeated, with no whitespace anywhere.
    fn ext_byte(&mut self, b: u8) -> Result<St, &'static str> {
        self.ext_bytes += 1;
        if self.ext_bytes > MAX_EXTENSIONS {
            return Err("chunk extensions too large");
        }
        let bad = Err("invalid chunk extension");
        Ok(match (self.st, b) {
            (St::ExtName, b) if is_tchar(b) => St::ExtNameMore,
            (St::ExtNameMore, b) if is_tchar(b) => St::ExtNameMore,
            (St::ExtNameMore, b'=') => St::ExtValue,
            (St::ExtValue, b'"') => St::Quoted,
            (St::ExtValue | St::ExtToken, b) if is_tchar(b) => St::ExtToken,
            (St::Quoted, b'"') => St::ExtEnd,
            (St::Quoted, b'\\') => St::QuotedEscape,
            (St::Quoted, b) if is_qdtext(b) => St::Quoted,
            (St::QuotedEscape, b) if b == b'\t' || (b >= b' ' && b != 0x7f) => St::Quoted,
            (St::ExtNameMore | St::ExtToken | St::ExtEnd, b';') => St::ExtName,
            (St::ExtNameMore | St::ExtToken | St::ExtEnd, b'\r') => St::SizeLf,
            (_, b'\n') => return Err("bare LF in a chunk-size line"),
            _ => return bad,
        })
    }

    /// A trailer line has ended (its CRLF read): the empty line ends the
    /// body, any other must be a field line.
    fn trailer_line_end(&mut self, out: &mut Vec<u8>, emit: Emit) -> Result<St, &'static str> {
        if self.line.is_empty() {
            if emit == Emit::Normalised {
                out.extend_from_slice(b"0\r\n");
                out.extend_from_slice(&self.trailers);
                out.extend_from_slice(b"\r\n");
            }
            self.trailers = Vec::new();
            return Ok(St::Done);
        }
        let (name, value) = parse_field_line(&self.line)
            .map_err(|_| "invalid field line in the trailer section")?;
        let dropped = DROPPED_TRAILERS
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d.as_bytes()));
        if !dropped {
            self.trailers.extend_from_slice(name);
            self.trailers.extend_from_slice(b": ");
            self.trailers.extend_from_slice(value);
            self.trailers.extend_from_slice(b"\r\n");
        }
        self.line.clear();
        Ok(St::Trailer)
    }
}

/// Whether `input`, the start of a chunked body (or all of it), holds
/// nothing malformed: for answering 502 before a response head goes out
/// rather than cutting the response after it.
pub fn check(input: &[u8]) -> Result<(), &'static str> {
    Chunked::default()
        .scan(input, &mut Vec::new(), Emit::Nothing)
        .map(|_| ())
}

/// Scans a whole body at once: (bytes used, what is sent on, done).
pub fn scan_all(input: &[u8], emit: Emit) -> Result<(usize, Vec<u8>, bool), &'static str> {
    let mut c = Chunked::default();
    let mut out = Vec::new();
    let n = c.scan(input, &mut out, emit)?;
    Ok((n, out, c.is_done()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalises `input` fed whole and fed one byte at a time; both must
    /// agree.
    fn norm(input: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        let (n, out, done) = scan_all(input, Emit::Normalised)?;
        assert!(done, "body not done: {:?}", String::from_utf8_lossy(input));
        let mut c = Chunked::default();
        let mut bytewise = Vec::new();
        for (k, b) in input[..n].iter().enumerate() {
            assert!(!c.is_done());
            let used = c.scan(std::slice::from_ref(b), &mut bytewise, Emit::Normalised);
            assert_eq!(used, Ok(1), "byte {k}");
        }
        assert!(c.is_done());
        assert_eq!(bytewise, out);
        Ok((out, n))
    }

    fn ok(input: &[u8], expect: &[u8]) {
        let (out, n) = norm(input)
            .unwrap_or_else(|e| panic!("{:?} refused: {e}", String::from_utf8_lossy(input)));
        assert_eq!(n, input.len(), "{:?}", String::from_utf8_lossy(input));
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(expect),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }

    /// Refused at some point (whole or byte by byte), with `why`.
    fn err(input: &[u8], why: &str) {
        assert_eq!(
            scan_all(input, Emit::Normalised).map(|_| ()),
            Err(why),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let mut got = Ok(0);
        for b in input {
            got = c.scan(std::slice::from_ref(b), &mut out, Emit::Normalised);
            if got.is_err() {
                break;
            }
        }
        assert_eq!(
            got,
            Err(why),
            "byte by byte: {:?}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn well_formed_bodies_are_normalised() {
        ok(b"0\r\n\r\n", b"0\r\n\r\n");
        ok(b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n");
        ok(b"00005\r\nhello\r\n000\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n");
        ok(
            b"A\r\n0123456789\r\n0\r\n\r\n",
            b"a\r\n0123456789\r\n0\r\n\r\n",
        );
        ok(b"5;a\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n");
        ok(
            b"5;a=b;c\r\nhello\r\n0;z=1\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
        );
        ok(
            b"5;a=\"x y;\\\"\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
        );
        ok(
            b"3\r\nabc\r\n0\r\nX-T:  1 \r\nX-U:\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-T: 1\r\nX-U: \r\n\r\n",
        );
        // Framing fields in the trailers are dropped.
        ok(
            b"0\r\nContent-Length: 5\r\nHost: x\r\nX-T: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"0\r\nX-T: 1\r\n\r\n",
        );
        // Data is data: framing bytes inside a chunk are not framing.
        ok(
            b"7\r\n0\r\n\r\nGE\r\n0\r\n\r\n",
            b"7\r\n0\r\n\r\nGE\r\n0\r\n\r\n",
        );
    }

    #[test]
    fn the_end_is_found_and_the_rest_left() {
        let body = b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let (n, out, done) = scan_all(body, Emit::Normalised).unwrap();
        assert!(done);
        assert_eq!(&body[n..], b"GET / HTTP/1.1\r\n");
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn decoded_is_the_data_only() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        let (n, out, done) = scan_all(body, Emit::Decoded).unwrap();
        assert!(done);
        assert_eq!(n, body.len());
        assert_eq!(out, b"hello world");
    }

    /// One rule per row, the smuggling differential's cases among them.
    #[test]
    fn malformed_framing_is_refused_rule_by_rule() {
        err(b"0\r\n\n", "bare LF in the trailer section");
        err(
            b"0\r\n\nGET /x HTTP/1.1\r\n\r\n",
            "bare LF in the trailer section",
        );
        err(b"0\r\nX-T: 1\n\r\n", "bare LF in the trailer section");
        err(b"0\r\nX-T: 1\r\r\n", "CR without LF in the trailer section");
        err(b"5\nhello\r\n", "bare LF in a chunk-size line");
        err(b"5\r\r\nhello", "CR without LF in a chunk-size line");
        err(b"5\r\nhello\n0\r\n\r\n", "bare LF after chunk data");
        err(b"5\r\nhello\r0\r\n\r\n", "CR without LF after chunk data");
        err(b"5\r\nhelloX\r\n", "chunk longer than its size");
        err(b"5 \r\nhello\r\n", "invalid chunk size");
        err(b"5\t\r\nhello\r\n", "invalid chunk size");
        err(b" 5\r\nhello\r\n", "invalid chunk size");
        err(b"5 x\r\nhello\r\n", "invalid chunk size");
        err(b"5x\r\nhello\r\n", "invalid chunk size");
        err(b"0x5\r\nhello\r\n", "invalid chunk size");
        err(b"+5\r\nhello\r\n", "invalid chunk size");
        err(b"\r\nhello\r\n", "invalid chunk size");
        err(b";a\r\n", "invalid chunk size");
        err(b"5;\r\nhello\r\n", "invalid chunk extension");
        err(b"5; a\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a =b\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a=\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a=\"x\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a=\"x\"y\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a=b c\r\nhello\r\n", "invalid chunk extension");
        err(b"5;a\nhello\r\n", "bare LF in a chunk-size line");
        err(b"5;a=\"\0\"\r\nhello\r\n", "invalid chunk extension");
        err(b"1000000000000000\r\n", "chunk size too large");
        err(b"0000000000000005\r\n", "chunk size too large");
        err(
            b"0\r\nX-T\r\n\r\n",
            "invalid field line in the trailer section",
        );
        err(
            b"0\r\nX-T: a\0b\r\n\r\n",
            "invalid field line in the trailer section",
        );
        err(
            b"0\r\nX-T : 1\r\n\r\n",
            "invalid field line in the trailer section",
        );
        err(
            b"0\r\nX-T: 1\r\n folded\r\n\r\n",
            "invalid field line in the trailer section",
        );
        err(
            b"0\r\n: 1\r\n\r\n",
            "invalid field line in the trailer section",
        );
    }

    #[test]
    fn limits_hold() {
        let mut big = b"0\r\nX-T: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TRAILERS));
        err(&big, "trailer section too large");
        let mut ext = b"1".to_vec();
        for _ in 0..=MAX_EXTENSIONS / 2 {
            ext.extend_from_slice(b";a");
        }
        err(&ext, "chunk extensions too large");
    }

    /// A refused body sends nothing of the part that was not well formed:
    /// the last chunk never goes out before its trailer section is whole.
    #[test]
    fn nothing_unchecked_goes_out() {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let r = c.scan(
            b"5\r\nhello\r\n0\r\n\nGET /x HTTP/1.1\r\n\r\n",
            &mut out,
            Emit::Normalised,
        );
        assert!(r.is_err());
        assert_eq!(out, b"5\r\nhello\r\n");
    }

    #[test]
    fn check_finds_what_scan_refuses() {
        assert_eq!(check(b"5\r\nhel"), Ok(()));
        assert_eq!(check(b"5\r\nhello\r\n0\r\n\r\n"), Ok(()));
        assert_eq!(
            check(b"5\r\nhello\r\n0\r\n\n"),
            Err("bare LF in the trailer section")
        );
        assert_eq!(check(b"5 \r\n"), Err("invalid chunk size"));
    }

    #[test]
    fn hex_is_written_in_lower_case() {
        for (n, s) in [
            (0u64, "0"),
            (10, "a"),
            (255, "ff"),
            (0xfff_ffff_ffff_ffff, "fffffffffffffff"),
        ] {
            let mut v = Vec::new();
            push_hex(&mut v, n);
            assert_eq!(v, s.as_bytes());
        }
    }
}
