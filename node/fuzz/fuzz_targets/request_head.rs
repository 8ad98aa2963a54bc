//! The request head parser (`proxy::wire::request::parse`): never panics;
//! what it accepts is forwardable without ambiguity; and the head as the
//! proxy rewrites it (CRLF, `name: value`, one Host, one framing field)
//! parses back to the same target, host and framing.
#![no_main]

use charon_node::proxy::wire::{request, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; request::MAX_HEADERS];
    let Ok(head) = request::parse(data, &mut headers) else {
        return;
    };
    assert!(head.minor <= 1);
    assert!(
        head.path == "*" || head.path.starts_with('/'),
        "{:?}",
        head.path
    );
    assert!(!head.path.contains('#'));
    assert_ne!(head.method, "CONNECT");
    assert!(!head.host.is_empty());
    assert!(head
        .host
        .iter()
        .all(|b| b.is_ascii_graphic() && !b"/\\?#@".contains(b)));
    if head.fields.len() + 2 > request::MAX_HEADERS {
        return;
    }
    let mut out = Vec::new();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(head.host);
    out.extend_from_slice(b"\r\n");
    for h in head.fields {
        let n = h.name.to_ascii_lowercase();
        if n == "host" || n == "content-length" || n == "transfer-encoding" {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    match head.framing {
        Framing::Length(n) => out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
    let mut headers2 = [httparse::EMPTY_HEADER; request::MAX_HEADERS];
    let again = request::parse(&out, &mut headers2).unwrap_or_else(|e| {
        panic!(
            "rewritten head refused ({e:?}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(again.path, head.path);
    assert_eq!(again.host, head.host);
    assert_eq!(again.framing, head.framing);
    assert_eq!(again.method, head.method);
});
