//! The chunked scanner on the response side: decoding for HTTP/1.0
//! clients (fed in pieces or whole, the same data or the same refusal),
//! and `check`, which decides between a 502 and a cut response before the
//! head goes out, agreeing with the scan on every prefix.
#![no_main]

use charon_node::proxy::wire::chunked::{check, scan_all, Chunked, Emit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let whole = scan_all(body, Emit::Decoded);
    assert_eq!(
        check(body).is_ok(),
        scan_all(body, Emit::Normalised).is_ok()
    );
    assert_eq!(check(body).is_ok(), whole.is_ok());
    let mut c = Chunked::default();
    let mut out = Vec::new();
    let mut res = Ok(());
    for piece in body.chunks(usize::from(step.max(1))) {
        if let Err(e) = c.scan(piece, &mut out, Emit::Decoded) {
            res = Err(e);
            break;
        }
        if c.is_done() {
            break;
        }
    }
    match whole {
        Ok((_, decoded, done)) => {
            assert_eq!(res, Ok(()));
            assert_eq!(out, decoded);
            assert_eq!(done, c.is_done());
            let cut = usize::from(step) % (body.len() + 1);
            assert!(
                check(&body[..cut]).is_ok(),
                "a prefix of an accepted body refused"
            );
        }
        Err(e) => assert_eq!(res, Err(e)),
    }
});
