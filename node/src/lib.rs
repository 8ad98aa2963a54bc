//! charon-node: one node of a Charon reverse-proxy cluster.
//!
//! Modules and the direction data flows in:
//!
//! - [`config`]: flags, `CHARON_*` env and TOML file, validated before any
//!   port is bound.
//! - [`host`]: the proxy host type and its validation rules.
//! - [`store`]: redb records (LWW + HLC stamps); the single `apply` path.
//! - [`proxy`]: the reverse proxy: listeners, the HTTP/1 and h2 front ends,
//!   one pipeline of request phases both call, the route table (an
//!   immutable snapshot the store publishes after each change), upstream
//!   pools and WebSocket tunnels (its `LIFECYCLE.md` walks a request).
//! - [`api`]: tonic services; API → store → route table.
//! - [`admin`]: `/healthz`, `/readyz`.
//! - [`node`]: wiring: opens the store, binds listeners, serves, shuts down.
//! - [`validate`]: `FieldError`, what every validation returns.
//! - [`util`]: the wall clock, the FNV hasher, date formatting.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod cluster;
pub mod config;
pub mod drain;
pub mod host;
pub mod node;
pub mod proxy;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod util;
pub mod validate;
