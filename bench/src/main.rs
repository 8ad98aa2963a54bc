//! `charon-bench`: the benchmark harness (see `bench/README.md`).
//!
//! `run` is the orchestrator `bench/run.sh` calls; the other subcommands
//! are the pieces it starts as separate processes: the backend and the load
//! generators. Each load generator runs on one thread unless told otherwise.
//! `propagation` (what `bench/propagation.sh` runs) measures a cluster of
//! `charon-node` processes on its own.

mod backend;
mod h2ws;
mod load;
mod otlp_sink;
mod propagation;
mod run;
mod scale;
mod sim;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// One allocator for every subcommand (backend, load generators, sim),
/// so every proxy is measured against the same load generator. Chosen for
/// `sim`: 100 simulated nodes' gossip allocates on two runtime threads, and
/// glibc's malloc had them wait on each other's arena locks about half the
/// time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use run::targets::{CharonBuild, Kind, Variant};
use run::Test;

#[derive(Parser)]
#[command(
    about = "Charon next to nginx, HAProxy and Caddy: backend, load generators, orchestrator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP (/small: 100 B, /large: 64 KiB) and WebSocket echo backend.
    Backend {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// h2c only, with RFC 8441 WebSockets (the `direct` target of the
        /// WebSocket-over-h2 tests).
        #[arg(long, default_value = "127.0.0.1:0")]
        h2_listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// WebSocket round trips over many connections; prints a JSON result.
    WsLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Connect from 127.0.0.1..=127.0.0.N (1: let the kernel choose).
        #[arg(long, default_value_t = 1)]
        sources: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// WebSockets over HTTP/2 (RFC 8441, h2c prior knowledge).
        #[arg(long)]
        h2: bool,
        /// With --h2: WebSockets per h2 connection.
        #[arg(long, default_value_t = 100)]
        h2_streams: usize,
        /// `wss://`: each WebSocket over its own TLS connection (SNI
        /// localhost, the certificate not checked).
        #[arg(long, conflicts_with = "h2")]
        tls: bool,
    },
    /// Opens idle WebSockets and holds them until stdin closes.
    WsIdle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long, default_value_t = 9000)]
        conns: usize,
        #[arg(long, default_value_t = 1)]
        sources: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// WebSockets over HTTP/2 (RFC 8441, h2c prior knowledge).
        #[arg(long)]
        h2: bool,
        /// With --h2: WebSockets per h2 connection.
        #[arg(long, default_value_t = 100)]
        h2_streams: usize,
        /// `wss://`: each WebSocket over its own TLS connection (SNI
        /// localhost, the certificate not checked).
        #[arg(long, conflicts_with = "h2")]
        tls: bool,
    },
    /// New TLS handshakes per second; prints a JSON result.
    TlsLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 1)]
        sources: usize,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Starts the backend and the given proxies as a run would, prints their
    /// addresses and PIDs, and keeps them up until stdin closes (profiling).
    Serve {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        workdir: PathBuf,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "charon,nginx,haproxy,caddy"
        )]
        targets: Vec<Kind>,
        /// Workers per proxy, as in `run --workers`.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// An OTLP/gRPC trace collector that counts and discards spans.
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Runs the whole comparison and writes the Markdown report.
    Run {
        /// Directory holding charon-node and charonctl (the build measured
        /// unless --charon-bin is given).
        #[arg(long)]
        bin_dir: PathBuf,
        /// Scratch directory for configurations, data and logs.
        #[arg(long)]
        workdir: PathBuf,
        /// The report (a .json with the raw measurements goes next to it).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds of warm-up before each measurement.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 64)]
        http_conns: usize,
        #[arg(long, default_value_t = 1000)]
        ws_conns: usize,
        #[arg(long, default_value_t = 128)]
        ws_size: usize,
        #[arg(long, default_value_t = 9000)]
        idle_conns: usize,
        #[arg(long, default_value_t = 16)]
        tls_conns: usize,
        #[arg(long, default_value_t = 1)]
        sources: usize,
        /// Workers per proxy: Charon TOKIO_WORKER_THREADS, nginx
        /// worker_processes, HAProxy nbthread, Caddy GOMAXPROCS.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Pin each proxy to CPUs of its own (taskset), the load generators
        /// and the backend to the others (see bench/README.md).
        #[arg(long)]
        pin: bool,
        /// Threads of each load generator (wrk -t, ws-load, tls-load);
        /// default: --workers.
        #[arg(long)]
        load_threads: Option<usize>,
        /// Threads of the backend; default: --workers.
        #[arg(long)]
        backend_threads: Option<usize>,
        /// A Charon build to measure, as LABEL=DIR (DIR holds charon-node
        /// and charonctl); repeat to compare builds in one interleaved run.
        /// The first is the reference of the builds table. Default: the
        /// build in --bin-dir, unlabelled.
        #[arg(long = "charon-bin", value_name = "LABEL=DIR", value_parser = CharonBuild::parse)]
        charon_bins: Vec<CharonBuild>,
        /// A host-configuration variant of every Charon target, as
        /// NAME='FLAGS' (extra `charonctl host add` flags; an argument @FILE
        /// reads one argument per line from FILE). Repeatable.
        #[arg(long = "charon-variant", value_name = "NAME=FLAGS", value_parser = Variant::parse)]
        charon_variants: Vec<Variant>,
        /// WebSockets per h2 connection in the WebSocket-over-h2 tests.
        #[arg(long, default_value_t = 100)]
        h2_streams: usize,
        /// Comma-separated: direct,charon,nginx,haproxy,caddy.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,charon,nginx,haproxy,caddy"
        )]
        targets: Vec<Kind>,
        /// Comma-separated: idle,http-small,http-large,ws,tls,ws-h2,idle-h2,idle-tls,ws-tls.
        #[arg(long, value_delimiter = ',', default_value = "idle,http-small,http-large,ws,tls,ws-h2,idle-h2,idle-tls,ws-tls", value_parser = parse_test)]
        tests: Vec<Test>,
        /// The command line to print in the report.
        #[arg(long, default_value = "charon-bench run")]
        command: String,
        /// "full" or "smoke" (printed in the report).
        #[arg(long, default_value = "full")]
        mode: String,
    },
    /// Config propagation in a simulated cluster of many nodes in this one
    /// process (real stores and sync, in-process gossip): see
    /// bench/README.md, "Simulated cluster".
    Sim {
        /// Cluster sizes.
        #[arg(long, default_value = "50,100", value_parser = scale::parse_sizes)]
        nodes: std::vec::Vec<usize>,
        /// Measured writes per size, one at a time, round-robin.
        #[arg(long, default_value_t = 200)]
        writes: usize,
        #[arg(long, default_value_t = 200)]
        gossip_interval_ms: u64,
        /// Seconds for every node to see every other live.
        #[arg(long, default_value_t = 180)]
        formation_timeout_secs: u64,
        /// Also write the Markdown here (and the JSON next to it, .json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One node as the stored configuration grows: write latency, start
    /// time and RSS, route lookup cost (see bench/README.md, "Scale").
    Scale {
        /// Directory holding charon-node.
        #[arg(long)]
        bin_dir: PathBuf,
        /// Scratch directory (one sub-directory per size, removed after).
        #[arg(long)]
        workdir: PathBuf,
        /// Host counts, e.g. 100,1k,10k,100k.
        #[arg(long, default_value = "100,1k,10k,100k", value_parser = scale::parse_sizes)]
        sizes: std::vec::Vec<usize>,
        /// Certificates stored per host (0.1: 10,000 with 100,000 hosts).
        #[arg(long, default_value_t = 0.1)]
        cert_ratio: f64,
        /// Measured sequential CreateHost calls per size.
        #[arg(long, default_value_t = 200)]
        writes: usize,
        #[arg(long, default_value_t = 10)]
        warmup_writes: usize,
        /// Route-table lookups timed per size (hits, then as many misses).
        #[arg(long, default_value_t = 2_000_000)]
        lookups: usize,
        /// Also write the Markdown here (and the JSON next to it, .json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The command line to print in the Markdown.
        #[arg(long)]
        command: Option<String>,
    },
    /// Config propagation in a cluster of real charon-node processes:
    /// write → served on every other node, and a killed node's catch-up.
    /// Prints a JSON result, then a Markdown table.
    Propagation {
        /// Directory holding charon-node.
        #[arg(long)]
        bin_dir: PathBuf,
        /// Scratch directory for the nodes' data and logs (node-N/ in it
        /// are replaced).
        #[arg(long)]
        workdir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Measured writes.
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Writes before the measured ones, not counted (peer connections
        /// are opened lazily on the first push).
        #[arg(long, default_value_t = 5)]
        warmup_writes: usize,
        /// Writes while the last node is down (0: no catch-up test).
        #[arg(long, default_value_t = 1000)]
        catchup_writes: usize,
        /// Passed to every node.
        #[arg(long, default_value_t = 200)]
        gossip_interval_ms: u64,
        /// Which node takes the writes.
        #[arg(long, value_enum, default_value = "first")]
        write_to: propagation::WriteTo,
        /// Pause between two probes of one node, in µs (0: back to back).
        #[arg(long, default_value_t = 1000)]
        poll_interval_us: u64,
        /// Pause between two checks of the restarted node, in ms.
        #[arg(long, default_value_t = 5)]
        catchup_poll_ms: u64,
        /// Also write the Markdown here (and the JSON next to it, .json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The command line to print in the Markdown.
        #[arg(long)]
        command: Option<String>,
    },
}

fn parse_test(s: &str) -> Result<Test, String> {
    Ok(match s {
        "idle" => Test::Idle,
        "http-small" => Test::HttpSmall,
        "http-large" => Test::HttpLarge,
        "ws" => Test::Ws,
        "tls" => Test::Tls,
        "ws-h2" => Test::WsH2,
        "idle-h2" => Test::IdleH2,
        "idle-tls" => Test::IdleTls,
        "ws-tls" => Test::WsTls,
        _ => {
            return Err(format!(
            "unknown test {s:?} (idle, http-small, http-large, ws, tls, ws-h2, idle-h2, idle-tls, ws-tls)"
        ))
        }
    })
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("charon-bench: some measurements failed (see the report)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("charon-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let secs = Duration::from_secs;
    match Cli::parse().cmd {
        Cmd::Backend {
            listen,
            h2_listen,
            threads,
        } => runtime(threads)?.block_on(backend::serve(listen, h2_listen))?,
        Cmd::OtlpSink { listen } => runtime(1)?.block_on(otlp_sink::serve(listen))?,
        Cmd::WsLoad {
            addr,
            path,
            conns,
            size,
            warmup,
            duration,
            sources,
            threads,
            h2,
            h2_streams,
            tls,
        } => runtime(threads)?.block_on(load::ws_load(load::WsLoadArgs {
            addr,
            path,
            conns,
            size,
            warmup: secs(warmup),
            duration: secs(duration),
            sources,
            transport: load::Transport::pick(tls, h2, h2_streams),
        }))?,
        Cmd::WsIdle {
            addr,
            path,
            conns,
            sources,
            threads,
            h2,
            h2_streams,
            tls,
        } => runtime(threads)?.block_on(load::ws_idle(
            addr,
            &path,
            conns,
            sources,
            load::Transport::pick(tls, h2, h2_streams),
        ))?,
        Cmd::TlsLoad {
            addr,
            conns,
            warmup,
            duration,
            sources,
            threads,
        } => runtime(threads)?.block_on(load::tls_load(load::TlsLoadArgs {
            addr,
            conns,
            warmup: secs(warmup),
            duration: secs(duration),
            sources,
        }))?,
        Cmd::Serve {
            bin_dir,
            workdir,
            targets,
            workers,
        } => run::serve(bin_dir, workdir, &targets, workers)?,
        Cmd::Sim {
            nodes,
            writes,
            gossip_interval_ms,
            formation_timeout_secs,
            out,
        } => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            return sim::run(sim::Args {
                sizes: nodes,
                writes,
                gossip_interval_ms,
                formation_timeout: Duration::from_secs(formation_timeout_secs),
                out,
                command: format!("charon-bench {}", args.join(" ")),
            });
        }
        Cmd::Scale {
            bin_dir,
            workdir,
            sizes,
            cert_ratio,
            writes,
            warmup_writes,
            lookups,
            out,
            command,
        } => {
            let command = command.unwrap_or_else(|| {
                let args: Vec<String> = std::env::args().skip(1).collect();
                format!("charon-bench {}", args.join(" "))
            });
            return scale::run(scale::Args {
                bin_dir,
                workdir,
                sizes,
                cert_ratio,
                writes,
                warmup_writes,
                lookups,
                out,
                command,
            });
        }
        Cmd::Propagation {
            bin_dir,
            workdir,
            nodes,
            writes,
            warmup_writes,
            catchup_writes,
            gossip_interval_ms,
            write_to,
            poll_interval_us,
            catchup_poll_ms,
            out,
            command,
        } => {
            let command = command.unwrap_or_else(|| {
                let args: Vec<String> = std::env::args().skip(1).collect();
                format!("charon-bench {}", args.join(" "))
            });
            return propagation::run(propagation::Args {
                bin_dir,
                workdir,
                nodes,
                writes,
                warmup_writes,
                catchup_writes,
                gossip_interval_ms,
                write_to,
                poll_interval_us,
                catchup_poll_ms,
                out,
                command,
            });
        }
        Cmd::Run {
            bin_dir,
            workdir,
            out,
            rounds,
            duration,
            warmup,
            http_conns,
            ws_conns,
            ws_size,
            idle_conns,
            tls_conns,
            sources,
            workers,
            pin,
            load_threads,
            backend_threads,
            charon_bins,
            charon_variants,
            h2_streams,
            targets,
            tests,
            command,
            mode,
        } => {
            let workers = workers.max(1);
            let builds = if charon_bins.is_empty() {
                vec![CharonBuild {
                    label: String::new(),
                    bin_dir,
                }]
            } else {
                charon_bins
            };
            return run::run(run::RunArgs {
                workdir,
                out,
                rounds: rounds.max(1),
                duration: duration.max(1),
                warmup,
                http_conns,
                ws_conns,
                ws_size,
                idle_conns,
                tls_conns,
                sources,
                workers,
                pin,
                load_threads: load_threads.unwrap_or(workers).max(1),
                backend_threads: backend_threads.unwrap_or(workers).max(1),
                h2_streams: h2_streams.max(1),
                targets: run::targets::TargetSpec::expand(&targets, &builds, &charon_variants),
                builds,
                tests,
                command,
                mode,
            });
        }
    }
    Ok(true)
}

/// Now, as `2025-01-31 12:34 UTC`.
pub fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
