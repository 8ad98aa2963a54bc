//! The chunked scanner as it normalises request bodies on their way to an
//! upstream (and response bodies to HTTP/1.1 clients): never panics; fed
//! in pieces it does exactly what it does fed whole; what it sends on is a
//! fixed point (scanning it again changes nothing) and carries the same
//! data; an accepted body's end is where the scan stopped.
#![no_main]

use charon_node::proxy::wire::chunked::{scan_all, Chunked, Emit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let whole = scan_all(body, Emit::Normalised);
    let mut c = Chunked::default();
    let mut out = Vec::new();
    let mut used = 0;
    let mut err = None;
    for piece in body.chunks(usize::from(step.max(1))) {
        match c.scan(piece, &mut out, Emit::Normalised) {
            Ok(n) => {
                used += n;
                if n < piece.len() {
                    assert!(c.is_done());
                }
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        if c.is_done() {
            break;
        }
    }
    match whole {
        Err(e) => assert_eq!(err, Some(e)),
        Ok((n, sent, done)) => {
            assert_eq!(err, None);
            assert_eq!(used, n);
            assert_eq!(out, sent);
            assert_eq!(done, c.is_done());
            if !done {
                assert_eq!(n, body.len());
                return;
            }
            let (n2, again, done2) = scan_all(&sent, Emit::Normalised)
                .unwrap_or_else(|e| panic!("normalised output refused: {e}"));
            assert!(done2);
            assert_eq!(n2, sent.len());
            assert_eq!(again, sent);
            let data_in = scan_all(&body[..n], Emit::Decoded)
                .expect("accepted once")
                .1;
            let data_out = scan_all(&sent, Emit::Decoded).expect("accepted once").1;
            assert_eq!(data_in, data_out);
        }
    }
});
