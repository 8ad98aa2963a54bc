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
    // One worker (TOKIO_WORKER_THREADS=1, or a one-CPU machine or
    // container): a current-thread runtime. With one worker nothing can be
    // stolen, and the work-stealing scheduler's bookkeeping per wake-up (the
    // run queue's atomics, the LIFO slot, unparking) is pure cost: an
    // interleaved A/B measured 0.93× the CPU per WebSocket message and
    // 0.97× per 100-byte request with the current-thread runtime
    // (docs/benchmarks.md). Nothing in the node blocks a runtime thread
    // (store writes go through `spawn_blocking`), so one thread serves all.
    //
    // Either way the I/O driver is polled after every 1,024 task polls
    // instead of tokio's 61: with a thousand busy WebSocket tunnels, looking
    // for I/O every 61 polls let tunnels woken by the latest events go
    // ahead of those already waiting in the overflow queue: the least-served
    // tunnels got about 0.8× the median's round trips, and p99 latency was
    // 2–3× nginx's. Now every tunnel that is ready runs once before any runs
    // again, as in an epoll loop; each does bounded work per poll (see
    // `proxy::tunnel::relay`).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    if workers == 1 {
        tracing::info!("runtime: current-thread (1 worker)");
    } else {
        tracing::info!("runtime: multi-thread ({workers} workers)");
    }
    let runtime = match builder.enable_all().event_interval(1024).build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("charon-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(charon_node::node::run(config, shutdown_signal())) {
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

/// Worker threads for the runtime: `TOKIO_WORKER_THREADS` as tokio reads it,
/// else one per CPU. Read here rather than by tokio so that one worker can
/// pick the current-thread runtime, and so that a bad value is a
/// configuration error instead of a panic.
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
