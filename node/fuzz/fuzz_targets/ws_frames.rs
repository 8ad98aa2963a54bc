//! The WebSocket frame tracker (`proxy::tunnel::frames::FrameTracker`): never
//! panics; fed in pieces, stopping at every boundary or not, it finds the
//! same frames and Close code as fed whole, consumes every byte, and makes
//! progress on every call.
#![no_main]

use charon_node::proxy::tunnel::frames::FrameTracker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let mut whole = FrameTracker::default();
    assert_eq!(whole.advance(stream, false), stream.len());
    let mut split = FrameTracker::default();
    let mut boundaries = 0u64;
    for piece in stream.chunks(usize::from(step.max(1))) {
        let mut i = 0;
        while i < piece.len() {
            let n = split.advance(&piece[i..], true);
            assert!(n > 0, "no progress");
            i += n;
            if split.at_boundary() {
                boundaries += 1;
            }
        }
    }
    assert_eq!(split.frames, whole.frames);
    assert_eq!(split.close, whole.close);
    assert_eq!(split.at_boundary(), whole.at_boundary());
    // Every frame end was a stop.
    assert_eq!(boundaries, split.frames);
});
