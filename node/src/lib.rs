//! charon-node: one node of a Charon reverse-proxy cluster.
//!
//! Modules and the direction data flows in:
//!
//! - [`access`]: access lists (address rules, basic-auth users), the
//!   records and their compiled form the proxy's request policy uses.
//! - [`acme`]: automatic certificates: which names need one, which node
//!   orders it (once per cluster), challenge answers, renewal.
//! - [`config`]: flags, `CHARON_*` env and TOML file, validated before any
//!   port is bound.
//! - [`host`]: the proxy host type and its validation rules.
//! - [`store`]: redb records (LWW + HLC stamps); the single `apply` path,
//!   which hands subscribers each commit's changed records ([`store::Changes`]);
//!   [`store::names`]: which host holds each domain, the same on every node
//!   (claim records), and the conflicts a concurrent claim leaves, kept by
//!   change like the rest.
//! - [`proxy`]: the reverse proxy: listeners, the HTTP/1 and h2 front ends,
//!   one pipeline of request phases both call, the route table (persistent
//!   maps the store's changes are applied to, swapped in whole), upstream
//!   pools and WebSocket tunnels (its `LIFECYCLE.md` walks a request).
//! - [`names`]: the persistent name → holder map under the route and SNI
//!   tables.
//! - [`api`]: tonic services; API → store → route table; [`api::writes`]:
//!   no write before catch-up, client deadlines, idempotency keys.
//! - [`admin`]: `/healthz`, `/readyz`.
//! - [`node`]: wiring: opens the store, binds listeners, serves, shuts down.
//! - [`workers`]: the proxy's threads, one current-thread runtime and one
//!   `SO_REUSEPORT` listener pair each; the control plane runs apart.
//! - [`validate`]: `FieldError`, what every validation returns.
//! - [`cidr`]: address ranges (`--trusted-proxy`, access rules).
//! - [`util`]: the wall clock, the FNV hasher, date formatting.
#![forbid(unsafe_code)]

pub mod access;
pub mod acme;
pub mod admin;
pub mod api;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod drain;
pub mod host;
pub mod names;
pub mod node;
pub mod proxy;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod util;
pub mod validate;
pub mod workers;
