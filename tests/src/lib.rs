//! Test harness of Charon: it starts real `charon-node` processes and real
//! backends on `127.0.0.1:0` and talks to them only through public protocols
//! (HTTP/1.1, h2c, WebSocket, gRPC and the `charonctl` binary).
//!
//! - [`node`]: [`TestNode`] — spawn a node on a temporary data dir, wait until
//!   it is ready, stop / kill / restart it, reach its gRPC API and `charonctl`.
//! - [`backends`]: upstreams for the proxy: an HTTP echo server, a WebSocket
//!   echo server, a raw socket that captures the exact upgrade bytes, and the
//!   Python `websockets` server (permessage-deflate).
//! - [`client`]: small clients that set the `Host` header themselves: HTTP/1.1,
//!   h2 with prior knowledge, raw bytes on a socket, WebSocket (tungstenite and
//!   a frame-by-frame raw client).
//! - [`chromium`]: headless Chromium driven over the DevTools protocol.
//! - [`h2ws`]: a WebSocket client over h2 (RFC 8441 extended CONNECT, the
//!   `h2` crate) with tungstenite's client role on the stream.
//! - [`wait`]: [`eventually`] — poll a condition with a deadline; tests never
//!   sleep a fixed time to wait for something to happen.
//! - [`procfs`]: memory of a process, read from `/proc`.
//! - [`pebble`]: a real ACME server (pebble + its fake DNS) on loopback
//!   ports, for the automatic-HTTPS tests.
//! - [`tls`]: certificates made at test time (rcgen), TLS clients that trust
//!   a test CA and report the served certificate, HTTPS/h2/`wss://` helpers.

pub mod backends;
pub mod chromium;
pub mod client;
pub mod h2ws;
pub mod haproxy;
pub mod node;
pub mod otlp;
pub mod pebble;
pub mod procfs;
pub mod supervisor;
pub mod tls;
pub mod wait;

use std::path::PathBuf;

pub use backends::{
    EchoBackend, HttpsEchoBackend, PythonWsBackend, RawUpgradeBackend, WsEchoBackend,
};
pub use node::{host_request, ClusterApi, TestNode, TestNodeBuilder};
pub use wait::eventually;

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or(manifest)
}

/// A byte of the deterministic pattern used for large bodies and messages:
/// the byte at `offset` of a stream. Both ends can check every byte without
/// keeping the whole body in memory.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// `len` bytes of the pattern, starting at stream offset `offset`.
pub fn pattern_chunk(offset: u64, len: usize) -> bytes::Bytes {
    (0..len as u64)
        .map(|i| pattern_byte(offset + i))
        .collect::<Vec<u8>>()
        .into()
}
