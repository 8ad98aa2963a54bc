//! `charon-node`: parse and validate configuration, then run the node until
//! SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use charon_node::config::{Args, Config, LogFormat};
use clap::Parser;

/// EX_USAGE: the configuration is wrong; nothing was started.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("charon-node: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::new(&config.log);
    let json_logs = config.log_format == LogFormat::Json;
    let colours = charon_node::telemetry::log_colours();
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colours)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_ansi(colours)
            .with_writer(std::io::stderr)
            .init(),
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let workers = match worker_threads() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("charon-node: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The proxy runs on `workers` current-thread runtimes of its own
    // (`charon_node::workers`: why not tokio's work-stealing runtime);
    // this thread's runtime runs the control plane: store, cluster, API,
    // ACME, admin. Nothing there blocks it (store writes go through
    // `spawn_blocking`).
    tracing::info!("proxy on {workers} worker thread(s), one current-thread runtime each");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("charon-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(charon_node::node::run(config, workers, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line for the operator; JSON logs also get it as an event.
            if json_logs {
                tracing::error!("{e}");
            }
            eprintln!("charon-node: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The proxy's worker threads: `TOKIO_WORKER_THREADS` (the name tokio
/// reads, kept from when the proxy ran on tokio's multi-thread runtime),
/// else one per CPU. A bad value is a configuration error naming the
/// variable.
fn worker_threads() -> Result<usize, String> {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "TOKIO_WORKER_THREADS must be a whole number of threads, at least 1 (got {v:?})"
            )),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once:
/// an operator who asks twice does not want to wait for the grace period.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("charon-node: cannot install signal handlers");
        std::process::exit(1);
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("charon-node: second signal, exiting now");
        std::process::exit(130);
    });
}
