//! Just enough of RFC 6455 framing for a relay: where frames begin and end,
//! which are Close frames and with what code, and how to build the few
//! frames the proxy itself sends (Close, Ping). Payloads are never copied or
//! decoded, except the two bytes of a close code.

/// Opcode of a Close frame.
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// Follows frame boundaries in one direction of a byte stream.
#[derive(Debug, Default)]
pub struct FrameTracker {
    header: [u8; 14],
    have: u8,
    in_payload: bool,
    remaining: u64,
    opcode: u8,
    /// The current frame's masking key; all zeros for an unmasked frame
    /// (unmasking with it changes nothing).
    mask: [u8; 4],
    /// Payload bytes of the current frame walked so far, counted up to 2:
    /// only a Close frame's first two (its code) are ever read.
    payload_pos: u8,
    code: [u8; 2],
    /// Frames completed since the owner last took the count (the relay
    /// adds it to the tunnel's counters after each buffer). Small fields
    /// throughout: every idle tunnel holds two trackers.
    pub frames: u32,
    /// Set when a Close frame has completed: its status code, if it had one.
    pub close: Option<Option<u16>>,
}

fn header_len(b0_b1: [u8; 2]) -> usize {
    let len7 = b0_b1[1] & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b0_b1[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The length of the frame at the start of `data` when all of it is
/// there and it is not a Close (whose code the tracker must read).
fn whole_frame_len(data: &[u8]) -> Option<usize> {
    let [b0, b1, ..] = *data else { return None };
    if b0 & 0x0f == OP_CLOSE {
        return None;
    }
    let hlen = header_len([b0, b1]);
    let payload = match b1 & 0x7f {
        126 => u64::from(u16::from_be_bytes(data.get(2..4)?.try_into().ok()?)),
        127 => u64::from_be_bytes(data.get(2..10)?.try_into().ok()?),
        n => u64::from(n),
    };
    let len = (hlen as u64).checked_add(payload)?;
    (len <= data.len() as u64).then_some(len as usize)
}

impl FrameTracker {
    /// True between frames: the only place another frame may be inserted.
    pub fn at_boundary(&self) -> bool {
        !self.in_payload && self.have == 0
    }

    /// Walks `data`. With `stop_at_boundary`, returns as soon as a frame
    /// completes (so the caller can insert a frame there); otherwise consumes
    /// everything. Returns the number of bytes consumed.
    pub fn advance(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut i = 0;
        while i < data.len() {
            // The usual case for small messages: a whole frame other than
            // a Close starts here and ends within `data`. Step over it
            // without gathering its header.
            if self.at_boundary() {
                if let Some(len) = whole_frame_len(&data[i..]) {
                    i += len;
                    self.frames += 1;
                    if stop_at_boundary {
                        return i;
                    }
                    continue;
                }
            }
            if self.in_payload {
                let take = (data.len() - i).min(self.remaining.min(usize::MAX as u64) as usize);
                if self.opcode == OP_CLOSE && self.payload_pos < 2 {
                    for (k, &b) in data[i..i + take]
                        .iter()
                        .enumerate()
                        .take(2 - self.payload_pos as usize)
                    {
                        let pos = self.payload_pos as usize + k;
                        self.code[pos] = b ^ self.mask[pos % 4];
                    }
                }
                i += take;
                self.remaining -= take as u64;
                self.payload_pos = (self.payload_pos as usize + take).min(2) as u8;
                if self.remaining == 0 {
                    self.finish_frame();
                    if stop_at_boundary {
                        return i;
                    }
                }
            } else {
                // A whole header in `data` (the usual case) is taken at
                // once; one split across reads is gathered byte by byte.
                let whole = (self.have == 0 && data.len() - i >= 2)
                    .then(|| header_len([data[i], data[i + 1]]))
                    .filter(|&len| data.len() - i >= len);
                if let Some(len) = whole {
                    self.header[..len].copy_from_slice(&data[i..i + len]);
                    self.have = len as u8;
                    i += len;
                } else {
                    self.header[self.have as usize] = data[i];
                    self.have += 1;
                    i += 1;
                }
                if self.have >= 2
                    && self.have as usize == header_len([self.header[0], self.header[1]])
                {
                    self.start_frame();
                    if !self.in_payload {
                        self.finish_frame();
                        if stop_at_boundary {
                            return i;
                        }
                    }
                }
            }
        }
        i
    }

    fn start_frame(&mut self) {
        let h = &self.header;
        self.opcode = h[0] & 0x0f;
        let len7 = h[1] & 0x7f;
        let (len, mut at) = match len7 {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
                10,
            ),
            n => (u64::from(n), 2),
        };
        self.mask = if h[1] & 0x80 != 0 {
            let m = [h[at], h[at + 1], h[at + 2], h[at + 3]];
            at += 4;
            m
        } else {
            [0; 4]
        };
        debug_assert_eq!(at, self.have as usize);
        self.have = 0;
        self.remaining = len;
        self.payload_pos = 0;
        self.in_payload = len > 0;
    }

    fn finish_frame(&mut self) {
        self.in_payload = false;
        self.frames += 1;
        if self.opcode == OP_CLOSE && self.close.is_none() {
            self.close = Some((self.payload_pos >= 2).then(|| u16::from_be_bytes(self.code)));
        }
    }
}

/// Builds a control frame. Frames towards an upstream are masked (the proxy
/// is its client there, RFC 6455 §5.3); frames towards a client are not.
pub fn control_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    debug_assert!(
        payload.len() <= 125,
        "control frames carry at most 125 bytes"
    );
    let mut out = Vec::with_capacity(2 + 4 + payload.len());
    out.push(0x80 | opcode);
    let len = payload.len() as u8;
    if masked {
        let key: [u8; 4] = rand::random();
        out.push(0x80 | len);
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.push(len);
        out.extend_from_slice(payload);
    }
    out
}

/// A Close frame with a status code and a (truncated) reason.
pub fn close_frame(code: u16, reason: &str, masked: bool) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut r = reason.as_bytes();
    if r.len() > 123 {
        r = &r[..123];
    }
    payload.extend_from_slice(r);
    control_frame(OP_CLOSE, &payload, masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mbit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mbit | n as u8),
            n if n <= 0xffff => {
                out.push(mbit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mbit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(m) = mask {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    #[test]
    fn follows_boundaries_across_any_chunking() {
        let mut stream = Vec::new();
        stream.extend(frame(0x1, false, b"hel", None));
        stream.extend(frame(0x0, true, b"lo", None));
        stream.extend(frame(0x2, true, &vec![7u8; 300], Some([1, 2, 3, 4])));
        stream.extend(frame(0x2, true, &vec![9u8; 70_000], None));
        stream.extend(frame(OP_PING, true, b"", None));
        stream.extend(frame(
            OP_CLOSE,
            true,
            &[0x0f, 0xa1, b'b', b'y'],
            Some([9, 8, 7, 6]),
        ));
        for chunk in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut t = FrameTracker::default();
            for c in stream.chunks(chunk) {
                assert_eq!(t.advance(c, false), c.len());
            }
            assert!(t.at_boundary(), "chunk {chunk}");
            assert_eq!(t.frames, 6);
            assert_eq!(t.close, Some(Some(4001)), "chunk {chunk}");
        }
    }

    #[test]
    fn whole_frames_in_one_read_stop_at_each_boundary_too() {
        // Several small frames waiting in one buffer (the fast path), a
        // Close among them: every boundary is still reported, and the
        // Close's code read, as when the bytes come one at a time.
        let mut stream = Vec::new();
        for n in 0..5u8 {
            stream.extend(frame(0x2, true, &[n; 128], Some([n, 1, 2, 3])));
        }
        stream.extend(frame(OP_PING, true, b"", None));
        let close = frame(OP_CLOSE, true, &[0x03, 0xe9], Some([4, 3, 2, 1]));
        stream.extend(&close);
        stream.extend(frame(0x1, true, b"late", None));
        let mut t = FrameTracker::default();
        let mut at = 0;
        let mut stops = Vec::new();
        while at < stream.len() {
            at += t.advance(&stream[at..], true);
            stops.push(at);
        }
        let sizes: Vec<usize> = stops
            .iter()
            .scan(0, |prev, &s| Some(s - std::mem::replace(prev, s)))
            .collect();
        // 128 bytes take the 16-bit length: 2 + 2 + 4 bytes of header.
        assert_eq!(sizes, [136, 136, 136, 136, 136, 2, close.len(), 6]);
        assert_eq!(t.frames, 8);
        assert_eq!(t.close, Some(Some(1001)));
        let mut slow = FrameTracker::default();
        for b in stream.chunks(1) {
            slow.advance(b, false);
        }
        assert_eq!((slow.frames, slow.close), (t.frames, t.close));
    }

    #[test]
    fn stops_exactly_at_each_boundary() {
        let a = frame(0x1, true, b"abc", None);
        let b = frame(0x1, true, b"de", None);
        let stream = [a.clone(), b.clone()].concat();
        let mut t = FrameTracker::default();
        assert_eq!(t.advance(&stream, true), a.len());
        assert!(t.at_boundary());
        assert_eq!(t.advance(&stream[a.len()..], true), b.len());
        assert_eq!(t.frames, 2);
        // Mid-frame: not at a boundary until the frame ends.
        let mut t = FrameTracker::default();
        assert_eq!(t.advance(&a[..2], true), 2);
        assert!(!t.at_boundary());
    }

    #[test]
    fn close_without_code_and_built_frames_parse() {
        let mut t = FrameTracker::default();
        t.advance(&frame(OP_CLOSE, true, b"", None), false);
        assert_eq!(t.close, Some(None));
        for masked in [false, true] {
            let mut t = FrameTracker::default();
            let f = close_frame(1001, "going away", masked);
            assert_eq!(t.advance(&f, false), f.len());
            assert_eq!(t.close, Some(Some(1001)));
            assert_eq!(f[1] & 0x80 != 0, masked);
        }
    }
}
