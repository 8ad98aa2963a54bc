//! The proxy's own side of an RFC 6455 opening handshake, for WebSockets
//! that arrive over h2 (RFC 8441): an h2 client sends no
//! `Sec-WebSocket-Key` (the stream is its own proof), but the upstream is
//! spoken to over HTTP/1.1, where the proxy is the client and must send a
//! key and check the upstream's `Sec-WebSocket-Accept` for it. An HTTP/1.1
//! client's handshake needs none of this: its key and the upstream's
//! accept pass through unchanged.

use base64::Engine;

/// The GUID every `Sec-WebSocket-Accept` is derived with (RFC 6455 §1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` an upstream must answer `key` with:
/// base64(SHA-1(key + GUID)).
pub fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_are_16_bytes_and_differ() {
        let (a, b) = (new_key(), new_key());
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&a)
                .unwrap()
                .len(),
            16
        );
        assert_ne!(a, b);
    }
}
