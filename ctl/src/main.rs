//! `charonctl`: the command-line client of a Charon cluster.
//!
//! - [`access`]: `acl`, access lists
//! - [`redirect`]: `redirect`, redirect hosts
//! - [`cli`]: clap types, flag parsing, arguments → API requests
//! - [`balance`]: balancing flags (issue 19); [`balance_cmd`]: `host
//!   upstream drain|undrain` and the per-upstream table of `host show`
//! - [`duration`]: durations as flags write them
//! - [`client`]: token lookup, connection, bearer-token interceptor
//! - [`commands`]: one API call per command, rendered on stdout
//! - [`drain`]: `node drain --wait`, following a drain with live progress
//! - [`observe`]: `logs` and `tunnels`, from one node or every member
//! - [`output`]: table and JSON rendering
//! - [`error`]: failures worded for the operator
//!
//! Exit codes: 0 on success, 1 when the call failed, 2 on a usage error,
//! 4 when `--wait` ran out of time (see [`error::EXIT_NOT_REPLICATED`] and
//! [`error::EXIT_NOT_DRAINED`]).

#![forbid(unsafe_code)]

mod access;
mod balance;
mod balance_cmd;
mod cli;
mod client;
mod commands;
mod drain;
mod duration;
mod error;
mod observe;
mod output;
mod redirect;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_args();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A single-threaded runtime is plenty: even `--all-nodes` mostly waits
/// on the network, its tasks taking turns on this thread.
fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(commands::run(cli))?)
}
