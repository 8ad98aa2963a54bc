//! The response head parser (`proxy::wire::response::parse`): never
//! panics; a prefix of an accepted head is never refused (heads are parsed
//! again as their bytes arrive, and a refusal there would be a spurious
//! 502); interim heads rewritten by `write_interim` parse back as the same
//! interim status with no framing or connection fields.
#![no_main]

use charon_node::proxy::wire::response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let parsed = response::parse(data, &mut headers, head_request);
    let Ok(Some(head)) = parsed else {
        return;
    };
    assert!(head.len <= data.len());
    for cut in [head.len - 1, head.len / 2, usize::from(flags) % head.len] {
        let mut h = [httparse::EMPTY_HEADER; 128];
        if let Err(e) = response::parse(&data[..cut], &mut h, head_request) {
            // A prefix may only fail on framing once it is a whole head.
            let mut h2 = [httparse::EMPTY_HEADER; 128];
            let mut p = httparse::Response::new(&mut h2);
            assert!(
                matches!(p.parse(&data[..cut]), Ok(httparse::Status::Complete(_))),
                "prefix of {} bytes refused ({e}) where the whole head is accepted",
                cut
            );
        }
    }
    if head.is_interim() {
        let mut out = Vec::new();
        response::write_interim(&mut out, &head);
        let mut h = [httparse::EMPTY_HEADER; 128];
        let again = response::parse(&out, &mut h, false)
            .unwrap_or_else(|e| panic!("rewritten interim refused: {e}"))
            .expect("a rewritten interim head is complete");
        assert_eq!(again.len, out.len());
        assert_eq!(again.status, head.status);
        assert!(again.is_interim());
        for f in again.fields {
            let n = f.name.to_ascii_lowercase();
            assert!(!["connection", "content-length", "transfer-encoding"].contains(&n.as_str()));
        }
    }
});
