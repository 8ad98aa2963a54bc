//! Automatic HTTPS over ACME (RFC 8555): every enabled host's DNS names get
//! a certificate, ordered once per cluster, answered from any node.
//!
//! - [`settings`]: the `--acme-*` node settings.
pub mod settings;
