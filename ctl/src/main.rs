//! `charonctl`: the command-line client of a Charon cluster.
//!
//! - [`cli`]: clap types, flag parsing, arguments → API requests
//! - [`client`]: token lookup, connection, bearer-token interceptor
//! - [`commands`]: one API call per command, rendered on stdout
//! - [`output`]: table and JSON rendering
//! - [`error`]: failures worded for the operator
//!
//! Exit codes: 0 on success, 1 when the call failed, 2 on a usage error.

#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod error;
mod output;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_args();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A single-threaded runtime is plenty for one call at a time.
fn run(cli: cli::Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(commands::run(cli))?;
    Ok(())
}
