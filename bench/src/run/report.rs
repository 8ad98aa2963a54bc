//! The Markdown report. Per test, two tables: **total** figures (what the
//! target served, its latency) and **per-core** figures (work per second of
//! the proxy's CPU time, all its threads and processes counted), each as the
//! median over rounds with the range, and ratios to nginx and HAProxy taken
//! within a round. Then, when the run had them, Charon builds and variants
//! against the first Charon target, and WebSockets over HTTP/2 against
//! HTTP/1.1.

use std::fmt::Write as _;
use std::time::Duration;

pub use super::machine::Machine;
use super::stats::{cell, median, num, range_cell, ratio_cell, ratios_between, Table};
use super::targets::{Kind, TargetSpec};
use super::{RunArgs, Sample, Test};

const NGINX: &str = "nginx";
const HAPROXY: &str = "haproxy";
const DIRECT: &str = "direct";

/// Everything the report is made of, besides the machine.
pub struct Run<'a> {
    pub when: &'a str,
    pub args: &'a RunArgs,
    pub samples: &'a [Sample],
    pub notes: &'a [String],
    pub took: Duration,
}

impl Run<'_> {
    fn table(&self, test: Test) -> Table<'_> {
        Table {
            samples: self.samples,
            test,
        }
    }

    fn charon_targets(&self) -> impl Iterator<Item = &TargetSpec> {
        self.args.targets.iter().filter(|t| t.kind == Kind::Charon)
    }
}

/// A progress line for one sample.
pub fn one_line(s: &Sample) -> String {
    let v = |k: &str| s.values.get(k).copied().unwrap_or(f64::NAN);
    let body = match s.test {
        Test::HttpSmall | Test::HttpLarge => format!(
            "{:.0} req/s  p50 {:.2} ms  p99 {:.2} ms  cpu {:.1} µs/req",
            v("rps"),
            v("p50_ms"),
            v("p99_ms"),
            v("cpu_us")
        ),
        Test::Ws | Test::WsH2 | Test::WsTls => format!(
            "{:.0} msg/s  p50 {:.2} ms  p99 {:.2} ms  cpu {:.1} µs/msg",
            v("mps"),
            v("p50_ms"),
            v("p99_ms"),
            v("cpu_us")
        ),
        Test::Idle | Test::IdleH2 | Test::IdleTls => format!(
            "{:.2} KiB per idle tunnel ({:.0} tunnels)",
            v("kib_per_tunnel"),
            v("tunnels")
        ),
        Test::Tls => format!(
            "{:.0} handshakes/s  p99 {:.2} ms  cpu {:.1} µs/handshake",
            v("hps"),
            v("p99_ms"),
            v("cpu_us")
        ),
    };
    let tail = match (&s.error, &s.skipped) {
        (Some(e), _) => format!("  FAILED: {e}"),
        (None, Some(why)) => format!("  n/a: {why}"),
        (None, None) => String::new(),
    };
    let body = if s.skipped.is_some() {
        String::new()
    } else {
        body
    };
    format!("{:<10} {:<14} {body}{tail}", test_name(s.test), s.target)
}

fn test_name(t: Test) -> &'static str {
    match t {
        Test::Idle => "idle-ws",
        Test::HttpSmall => "http-100B",
        Test::HttpLarge => "http-64K",
        Test::Ws => "ws",
        Test::Tls => "tls",
        Test::WsH2 => "ws-h2",
        Test::IdleH2 => "idle-ws-h2",
        Test::IdleTls => "idle-wss",
        Test::WsTls => "wss",
    }
}

/// How a throughput test names its work.
struct Unit {
    /// The sample's rate metric.
    rate: &'static str,
    rate_name: &'static str,
    /// One unit of work, and several.
    one: &'static str,
    many: &'static str,
}

fn unit(test: Test) -> Option<Unit> {
    let (rate, rate_name, one, many) = match test {
        Test::HttpSmall | Test::HttpLarge => ("rps", "req/s", "req", "requests"),
        Test::Ws | Test::WsH2 | Test::WsTls => ("mps", "msg/s", "msg", "messages"),
        Test::Tls => ("hps", "handshakes/s", "handshake", "handshakes"),
        Test::Idle | Test::IdleH2 | Test::IdleTls => return None,
    };
    Some(Unit {
        rate,
        rate_name,
        one,
        many,
    })
}

/// `1.00×` against itself, `—` where there is nothing to compare.
fn ratio_to(t: &Table, name: &str, reference: &str, metric: &str, invert: bool) -> String {
    if name == reference && t.tried(name) {
        return "1.00×".into();
    }
    ratio_cell(&t.ratios(name, reference, metric, invert))
}

/// Whether `spec` has a row in `t`'s tables: the HTTP/2 WebSocket tests
/// only concern Charon (and the backend reached directly).
fn shown(t: &Table, spec: &TargetSpec) -> bool {
    match t.test {
        Test::WsH2 | Test::IdleH2 => {
            matches!(spec.kind, Kind::Charon | Kind::Direct) || t.tried(&spec.name)
        }
        _ => true,
    }
}

/// A row for a target with no figure: why.
fn missing_row(t: &Table, spec: &TargetSpec, cols: usize) -> Option<String> {
    let why = if let Some(reason) = t.skipped(&spec.name) {
        format!("n/a: {reason}")
    } else if !t.tried(&spec.name) {
        match (spec.kind, t.test) {
            (Kind::Charon, Test::Tls | Test::WsTls) => "n/a (no TLS listener in this build)".into(),
            (Kind::Direct, Test::Tls | Test::WsTls) => "— (the backend has no TLS)".into(),
            _ => "not measured".into(),
        }
    } else {
        return None;
    };
    Some(format!(
        "| {} | {why} |{}",
        spec.name,
        " |".repeat(cols - 1)
    ))
}

fn throughput_section(out: &mut String, run: &Run, test: Test, u: &Unit) {
    let t = run.table(test);
    let _ = writeln!(out, "Total:\n");
    let _ = writeln!(
        out,
        "| target | {rn} | × nginx | × HAProxy | × direct | p50 ms | p99 ms | p99 × nginx | p99 × HAProxy |",
        rn = u.rate_name
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for spec in run.args.targets.iter().filter(|s| shown(&t, s)) {
        if let Some(row) = missing_row(&t, spec, 9) {
            let _ = writeln!(out, "{row}");
            continue;
        }
        let k = spec.name.as_str();
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} | {} | {} | {} |",
            range_cell(&t.values(k, u.rate), 0),
            ratio_to(&t, k, NGINX, u.rate, false),
            ratio_to(&t, k, HAPROXY, u.rate, false),
            ratio_to(&t, k, DIRECT, u.rate, false),
            cell(&t.values(k, "p50_ms"), 2),
            range_cell(&t.values(k, "p99_ms"), 2),
            ratio_to(&t, k, NGINX, "p99_ms", false),
            ratio_to(&t, k, HAPROXY, "p99_ms", false),
        );
    }
    let _ = writeln!(
        out,
        "\nPer core ({} per second of the proxy's CPU time, every thread and process of it):\n",
        u.many
    );
    let _ = writeln!(
        out,
        "| target | {m} per proxy CPU-second | × nginx | × HAProxy | proxy CPU µs/{o} | of which system (kernel) | proxy cores busy |",
        m = u.many,
        o = u.one
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for spec in run
        .args
        .targets
        .iter()
        .filter(|s| s.kind.is_proxy() && shown(&t, s))
    {
        if let Some(row) = missing_row(&t, spec, 7) {
            let _ = writeln!(out, "{row}");
            continue;
        }
        let k = spec.name.as_str();
        let per = |r: &str| {
            if k == r {
                "1.00×".to_string()
            } else {
                ratio_cell(&t.per_core_ratios(k, r))
            }
        };
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} | {} |",
            range_cell(&t.per_core(k), 0),
            per(NGINX),
            per(HAPROXY),
            cell(&t.values(k, "cpu_us"), 1),
            system_share(&t, k),
            range_cell(&t.values(k, "proxy_cores"), 2),
        );
    }
    out.push('\n');
}

/// The system-time part of a target's CPU per unit: µs, and its share of
/// the whole (medians over rounds).
fn system_share(t: &Table, k: &str) -> String {
    let shares: Vec<f64> = t
        .rounds()
        .into_iter()
        .filter_map(|r| Some(t.value(k, r, "sys_us")? / t.value(k, r, "cpu_us")?))
        .filter(|v| v.is_finite())
        .collect();
    match median(&shares) {
        Some(share) => format!(
            "{} ({:.0}%)",
            cell(&t.values(k, "sys_us"), 1),
            share * 100.0
        ),
        None => "—".into(),
    }
}

/// Per round, `reference`'s whole CPU per unit over `target`'s system
/// time alone: the per-core ratio `target` would reach if its own code cost
/// nothing and the kernel's work stayed as it is. A goal above this ceiling
/// cannot be met by user-space changes, only by asking less of the kernel.
fn user_space_ceiling(t: &Table, target: &str, reference: &str) -> Vec<f64> {
    t.rounds()
        .into_iter()
        .filter_map(|r| {
            let theirs = t.value(reference, r, "cpu_us")?;
            let kernel = t.value(target, r, "sys_us")?;
            (kernel > 0.0).then(|| theirs / kernel)
        })
        .collect()
}

/// How evenly a proxy shares itself among the WebSocket connections: the
/// round trips done by the least served, the median and the most served
/// connection (median over rounds). Even sharing keeps p99 near p50.
fn fairness_section(out: &mut String, run: &Run, test: Test) {
    let t = run.table(test);
    let _ = writeln!(
        out,
        "Round trips per connection in the measured window (fairness between tunnels):\n"
    );
    let _ = writeln!(
        out,
        "| target | least served | median | most served | least ÷ median |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for spec in &run.args.targets {
        let k = spec.name.as_str();
        let (min, p50, max) = (
            t.values(k, "conn_min"),
            t.values(k, "conn_p50"),
            t.values(k, "conn_max"),
        );
        if p50.is_empty() {
            continue;
        }
        let share: Vec<f64> = min
            .iter()
            .zip(&p50)
            .filter(|(_, m)| **m > 0.0)
            .map(|(a, m)| a / m)
            .collect();
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} |",
            cell(&min, 0),
            cell(&p50, 0),
            cell(&max, 0),
            cell(&share, 2)
        );
    }
    out.push('\n');
}

fn idle_section(out: &mut String, run: &Run, test: Test) {
    let t = run.table(test);
    let _ = writeln!(
        out,
        "| target | KiB per idle tunnel | × nginx | × HAProxy | tunnels open | RSS before → after (MiB, median) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for spec in run
        .args
        .targets
        .iter()
        .filter(|k| k.kind.is_proxy() && shown(&t, k))
    {
        if let Some(row) = missing_row(&t, spec, 6) {
            let _ = writeln!(out, "{row}");
            continue;
        }
        let k = spec.name.as_str();
        let mib = |m: &str| {
            median(&t.values(k, m)).map_or("—".into(), |x| format!("{:.1}", x / 1024.0))
        };
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} → {} |",
            range_cell(&t.values(k, "kib_per_tunnel"), 2),
            ratio_to(&t, k, NGINX, "kib_per_tunnel", false),
            ratio_to(&t, k, HAPROXY, "kib_per_tunnel", false),
            cell(&t.values(k, "tunnels"), 0),
            mib("rss_before_kib"),
            mib("rss_after_kib"),
        );
    }
    out.push('\n');
}

/// Each Charon build or variant against the first Charon target, per round:
/// the before/after comparison of a change, or the cost of a host option.
fn builds_section(out: &mut String, run: &Run) {
    let charon: Vec<&TargetSpec> = run.charon_targets().collect();
    let Some((reference, others)) = charon.split_first() else {
        return;
    };
    if others.is_empty() {
        return;
    }
    let r = reference.name.as_str();
    let _ = writeln!(out, "## Charon builds and variants against {r}\n");
    let _ = writeln!(
        out,
        "Ratios taken within each round (the targets ran interleaved), median with the range. \
         Per core > 1 and p99 < 1 mean better than {r}.\n"
    );
    let _ = writeln!(
        out,
        "| target | test | per core × {r} | total × {r} | p99 × {r} | KiB per idle tunnel × {r} |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for spec in others {
        let k = spec.name.as_str();
        for &test in &run.args.tests {
            let t = run.table(test);
            if t.values(k, "cpu_us").is_empty() && t.values(k, "kib_per_tunnel").is_empty() {
                continue;
            }
            let (per_core, total, p99, idle) = match unit(test) {
                Some(u) => (
                    ratio_cell(&t.per_core_ratios(k, r)),
                    ratio_cell(&t.ratios(k, r, u.rate, false)),
                    ratio_cell(&t.ratios(k, r, "p99_ms", false)),
                    String::new(),
                ),
                None => (
                    String::new(),
                    String::new(),
                    String::new(),
                    ratio_cell(&t.ratios(k, r, "kib_per_tunnel", false)),
                ),
            };
            let _ = writeln!(
                out,
                "| {k} | {} | {per_core} | {total} | {p99} | {idle} |",
                test_name(test)
            );
        }
    }
    out.push('\n');
}

/// The same Charon target with WebSockets over HTTP/2 (RFC 8441) and over
/// HTTP/1.1 upgrades, ratios per round.
fn h2_section(out: &mut String, run: &Run) {
    let tests = &run.args.tests;
    if !(tests.contains(&Test::WsH2) || tests.contains(&Test::IdleH2)) {
        return;
    }
    let _ = writeln!(
        out,
        "## WebSockets over HTTP/2 (RFC 8441) against HTTP/1.1, through Charon\n"
    );
    let _ = writeln!(
        out,
        "{} WebSockets per h2c connection. Per core > 1 and memory < 1 mean HTTP/2 is cheaper.\n",
        run.args.h2_streams
    );
    let _ = writeln!(
        out,
        "| target | CPU µs/msg h1 → h2 | per core h2 × h1 | msg/s h2 × h1 | p99 ms h1 → h2 | KiB per idle tunnel h1 → h2 | memory h2 × h1 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let (ws, h2, idle, idle_h2) = (
        run.table(Test::Ws),
        run.table(Test::WsH2),
        run.table(Test::Idle),
        run.table(Test::IdleH2),
    );
    for spec in run.charon_targets() {
        let k = spec.name.as_str();
        if h2.values(k, "cpu_us").is_empty() && idle_h2.values(k, "kib_per_tunnel").is_empty() {
            let why = h2
                .skipped(k)
                .or(idle_h2.skipped(k))
                .unwrap_or("not measured");
            let _ = writeln!(out, "| {k} | n/a: {why} | | | | | |");
            continue;
        }
        let arrow = |a: &Table, b: &Table, m: &str, d: usize| {
            format!(
                "{} → {}",
                cell(&a.values(k, m), d),
                cell(&b.values(k, m), d)
            )
        };
        let between = |test_a: Test, test_b: Test, m: &str, invert: bool| {
            ratio_cell(&ratios_between(
                run.samples,
                (test_a, k),
                (test_b, k),
                m,
                invert,
            ))
        };
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} | {} |",
            arrow(&ws, &h2, "cpu_us", 1),
            between(Test::WsH2, Test::Ws, "cpu_us", true),
            between(Test::WsH2, Test::Ws, "mps", false),
            arrow(&ws, &h2, "p99_ms", 2),
            arrow(&idle, &idle_h2, "kib_per_tunnel", 2),
            between(Test::IdleH2, Test::Idle, "kib_per_tunnel", false),
        );
    }
    out.push('\n');
}

/// One line of the goals table: the median, and whether the goal was met
/// in every round, in none, or in some (then the difference is within this
/// machine's noise and the verdict says so).
fn goal_row(out: &mut String, target: &str, what: &str, values: &[f64], goal: Goal) {
    let met = values.iter().filter(|&&v| goal.met(v)).count();
    let verdict = match (values.len(), met) {
        (0, _) => "not measured".to_string(),
        (n, m) if m == n => "met".into(),
        (_, 0) => "**not met**".into(),
        (n, m) => format!("met in {m} of {n} rounds (within noise)"),
    };
    let figure = if goal.ratio {
        ratio_cell(values)
    } else {
        range_cell(values, 2)
    };
    let _ = writeln!(out, "| {target} | {what} | {figure} | {verdict} |");
}

#[derive(Clone, Copy)]
struct Goal {
    threshold: f64,
    at_least: bool,
    /// A ratio (shown as ×) rather than an absolute figure.
    ratio: bool,
}

impl Goal {
    fn at_least(threshold: f64) -> Goal {
        Goal {
            threshold,
            at_least: true,
            ratio: true,
        }
    }

    fn at_most(threshold: f64) -> Goal {
        Goal {
            threshold,
            at_least: false,
            ratio: true,
        }
    }

    fn met(self, v: f64) -> bool {
        if self.at_least {
            v >= self.threshold
        } else {
            v <= self.threshold
        }
    }
}

/// Issue 21's targets (WebSocket per core ≥ 1.2× nginx at one worker,
/// ≥ 1.1× at more; p99 no worse; ≤ 2.5 KiB per idle tunnel) and issue 17's
/// (HTTP per core not below nginx and HAProxy), for each Charon build.
fn goals(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "| target | goal | median (range over rounds) | verdict |"
    );
    let _ = writeln!(out, "|---|---|---:|---|");
    let ws_goal = if run.args.workers >= 2 { 1.1 } else { 1.2 };
    for spec in run.charon_targets().filter(|s| s.variant.is_none()) {
        let k = spec.name.as_str();
        for (test, label) in [
            (Test::HttpSmall, "HTTP 100 B"),
            (Test::HttpLarge, "HTTP 64 KiB"),
        ] {
            let t = run.table(test);
            for (peer, name) in [(NGINX, "nginx"), (HAPROXY, "HAProxy")] {
                goal_row(
                    out,
                    k,
                    &format!("{label}: requests per proxy CPU-second ≥ 1.0× {name}"),
                    &t.per_core_ratios(k, peer),
                    Goal::at_least(1.0),
                );
            }
        }
        let ws = run.table(Test::Ws);
        goal_row(
            out,
            k,
            &format!("WebSocket messages per proxy CPU-second ≥ {ws_goal:.1}× nginx"),
            &ws.per_core_ratios(k, NGINX),
            Goal::at_least(ws_goal),
        );
        goal_row(
            out,
            k,
            &format!(
                "ceiling of that ratio with no user-space time (nginx's CPU ÷ {k}'s system time) ≥ {ws_goal:.1}×"
            ),
            &user_space_ceiling(&ws, k, NGINX),
            Goal::at_least(ws_goal),
        );
        goal_row(
            out,
            k,
            "WebSocket messages/s ≥ 1.0× nginx",
            &ws.ratios(k, NGINX, "mps", false),
            Goal::at_least(1.0),
        );
        goal_row(
            out,
            k,
            "WebSocket p99 round trip ≤ 1.0× nginx",
            &ws.ratios(k, NGINX, "p99_ms", false),
            Goal::at_most(1.0),
        );
        let idle = run.table(Test::Idle);
        goal_row(
            out,
            k,
            "KiB per idle WebSocket ≤ 2.5",
            &idle.values(k, "kib_per_tunnel"),
            Goal {
                ratio: false,
                ..Goal::at_most(2.5)
            },
        );
        goal_row(
            out,
            k,
            "memory per idle WebSocket ≤ 1.0× HAProxy",
            &idle.ratios(k, HAPROXY, "kib_per_tunnel", false),
            Goal::at_most(1.0),
        );
    }
    out.push('\n');
}

fn header(out: &mut String, run: &Run, before: &Machine, after: &Machine) {
    let a = run.args;
    let _ = writeln!(out, "# Charon benchmark, {}\n", run.when);
    let _ = writeln!(out, "Command: `{}`  ", a.command);
    let _ = writeln!(
        out,
        "Mode: {}: {} round(s), {} s per measurement after {} s of warm-up; {} worker(s) per proxy, {}; took {} min.\n",
        a.mode,
        a.rounds,
        a.duration,
        a.warmup,
        a.workers,
        if a.pin { "pinned" } else { "not pinned" },
        (run.took.as_secs() + 30) / 60
    );
    if a.rounds < 3 {
        let _ = writeln!(
            out,
            "Fewer than 3 rounds: the ranges below say little about this machine's noise.\n"
        );
    }
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    for (k, v) in &before.facts {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    let _ = writeln!(
        out,
        "| load average (1/5/15 min) | {} at the start, {} at the end |",
        before.loadavg, after.loadavg
    );
    let sharing = if a.pin {
        "In pinned mode each proxy runs on CPUs the load generators and the backend do not use \
         (unless the note below says the machine has too few)"
    } else {
        "The CPUs are shared by the load generators, the proxy, the backend and anything else \
         running on the machine"
    };
    let _ = writeln!(
        out,
        "\n{sharing}; other work on the machine still makes absolute figures drift. Every round \
         starts each target afresh and measures every target back to back, in an order rotated \
         from round to round; ratios are taken within a round and the tables show their median, \
         with the range over rounds in parentheses (figures too: median (min–max)). **Per core** \
         is the work done per second of the proxy's CPU time (user+system from `/proc/PID/stat` \
         over the measured window, summed over every process of the proxy, so nginx's master and \
         workers, HAProxy's and Charon's threads all count): what one core running that proxy \
         would serve, and steadier than totals. \"Proxy cores busy\" is that CPU time divided by \
         the window: near the number of workers, the proxy was the bottleneck.\n"
    );
    let w = a.workers;
    let _ = writeln!(
        out,
        "Setup: {w} worker(s) each (Charon `TOKIO_WORKER_THREADS={w}`, nginx `worker_processes {w}`, \
         HAProxy `nbthread {w}`, Caddy `GOMAXPROCS={w}`); keep-alive to the upstream; WebSocket upgrades \
         passed through; X-Forwarded-* headers added; no access log; nginx with 64 KiB proxy buffers. \
         Backend: `charon-bench backend` (hyper, {} thread(s)). Load: wrk ({} thread(s), {} connections); \
         WebSocket: `charon-bench ws-load` (tokio-tungstenite, {} thread(s), {} connections, one {}-byte \
         binary message in flight per connection; over HTTP/2: {} per h2c connection); idle tunnels: \
         `charon-bench ws-idle` ({} tunnels, each proven with one echo); TLS: `charon-bench tls-load` \
         (rustls, {} concurrent loops of connect + full TLS 1.3 handshake without resumption + close, \
         ECDSA P-256 certificate shared by all).\n",
        a.backend_threads,
        a.load_threads,
        a.http_conns,
        a.load_threads,
        a.ws_conns,
        a.ws_size,
        a.h2_streams,
        a.idle_conns,
        a.tls_conns
    );
    for spec in run.charon_targets() {
        if let Some(v) = &spec.variant {
            let flags = v.host_flags.join(" ");
            let shown = if flags.len() > 200 {
                format!(
                    "{}… ({} arguments)",
                    &flags[..flags.floor_char_boundary(200)],
                    v.host_flags.len()
                )
            } else {
                flags
            };
            let _ = writeln!(out, "{}: `charonctl host add` with `{shown}`.  ", spec.name);
        }
    }
    for n in run.notes {
        let _ = writeln!(out, "{n}  ");
    }
    out.push('\n');
}

fn section_title(a: &RunArgs, test: Test) -> String {
    match test {
        Test::HttpSmall => format!("## HTTP, 100-byte responses, {} connections (wrk)", a.http_conns),
        Test::HttpLarge => format!("## HTTP, 64 KiB responses, {} connections (wrk)", a.http_conns),
        Test::Ws => format!(
            "## WebSocket echo round trips, {} connections",
            num(a.ws_conns as f64, 0)
        ),
        Test::WsH2 => format!(
            "## WebSocket echo round trips over HTTP/2 (RFC 8441), {} WebSockets, {} per h2c connection",
            num(a.ws_conns as f64, 0),
            a.h2_streams
        ),
        Test::Idle => format!(
            "## Memory per idle proxied WebSocket ({} tunnels, RSS delta)",
            num(a.idle_conns as f64, 0)
        ),
        Test::IdleH2 => format!(
            "## Memory per idle WebSocket over HTTP/2 ({} tunnels, {} per h2c connection, RSS delta)",
            num(a.idle_conns as f64, 0),
            a.h2_streams
        ),
        Test::Tls => format!("## New TLS handshakes ({} concurrent clients)", a.tls_conns),
        Test::IdleTls => format!(
            "## Memory per idle `wss://` WebSocket ({} tunnels, each on its own TLS connection, RSS delta)",
            num(a.idle_conns as f64, 0)
        ),
        Test::WsTls => format!(
            "## `wss://` WebSocket echo round trips, {} connections, each on its own TLS connection",
            num(a.ws_conns as f64, 0)
        ),
    }
}

fn failures(out: &mut String, run: &Run) {
    let failed: Vec<&Sample> = run.samples.iter().filter(|s| s.error.is_some()).collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Failed measurements (left out of the tables)\n");
    for s in failed {
        let _ = writeln!(
            out,
            "- round {}, {} {}: {}",
            s.round + 1,
            test_name(s.test),
            s.target,
            s.error.as_deref().unwrap_or("")
        );
    }
    out.push('\n');
}

pub fn markdown(run: &Run, before: &Machine, after: &Machine) -> String {
    let a = run.args;
    let mut out = String::new();
    header(&mut out, run, before, after);
    let _ = writeln!(out, "## Against the goals\n");
    goals(&mut out, run);
    builds_section(&mut out, run);
    // The fixed order of the sections, whatever the order of --tests.
    for test in [
        Test::HttpSmall,
        Test::HttpLarge,
        Test::Ws,
        Test::WsTls,
        Test::WsH2,
        Test::Idle,
        Test::IdleH2,
        Test::IdleTls,
        Test::Tls,
    ] {
        if !a.tests.contains(&test) {
            continue;
        }
        let _ = writeln!(out, "{}\n", section_title(a, test));
        match unit(test) {
            Some(u) => throughput_section(&mut out, run, test, &u),
            None => idle_section(&mut out, run, test),
        }
        if matches!(test, Test::Ws | Test::WsH2 | Test::WsTls) {
            fairness_section(&mut out, run, test);
        }
    }
    h2_section(&mut out, run);
    let _ = writeln!(
        out,
        "Config propagation in a cluster is measured separately: `bench/propagation.sh` (see \
         docs/benchmarks.md, \"Config propagation\").\n"
    );
    failures(&mut out, run);
    let _ = writeln!(
        out,
        "Raw measurements: `{}`.",
        a.out
            .with_extension("json")
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::super::targets::{CharonBuild, Variant};
    use super::*;

    fn args(targets: Vec<TargetSpec>, tests: Vec<Test>, workers: usize) -> RunArgs {
        RunArgs {
            workdir: PathBuf::from("/tmp"),
            out: PathBuf::from("/tmp/r.md"),
            rounds: 3,
            duration: 10,
            warmup: 2,
            http_conns: 64,
            ws_conns: 1000,
            ws_size: 128,
            idle_conns: 9000,
            tls_conns: 16,
            sources: 1,
            workers,
            pin: true,
            load_threads: workers,
            backend_threads: workers,
            h2_streams: 100,
            builds: Vec::new(),
            targets,
            tests,
            command: "test".into(),
            mode: "test".into(),
        }
    }

    fn sample(test: Test, target: &str, round: usize, values: &[(&'static str, f64)]) -> Sample {
        Sample {
            test,
            target: target.into(),
            kind: if target.starts_with("charon") {
                Kind::Charon
            } else {
                target.parse().unwrap()
            },
            round,
            values: values.iter().copied().collect::<BTreeMap<_, _>>(),
            error: None,
            skipped: None,
        }
    }

    fn specs() -> Vec<TargetSpec> {
        let builds = [
            CharonBuild {
                label: "base".into(),
                bin_dir: PathBuf::from("/a"),
            },
            CharonBuild {
                label: "new".into(),
                bin_dir: PathBuf::from("/b"),
            },
        ];
        let acl = Variant::parse("acl=--allow 10.0.0.0/8").unwrap();
        TargetSpec::expand(&[Kind::Charon, Kind::Nginx, Kind::Haproxy], &builds, &[acl])
    }

    /// Three rounds where charon@new costs 20 µs per message, base 25,
    /// nginx 30, HAProxy 40 (round 2 twice as slow for everyone).
    fn ws_samples() -> Vec<Sample> {
        let mut s = Vec::new();
        for round in 0..3 {
            let slow = if round == 1 { 2.0 } else { 1.0 };
            for (t, us) in [
                ("charon@base", 25.0),
                ("charon@new", 20.0),
                ("charon@base+acl", 26.0),
                ("charon@new+acl", 21.0),
                ("nginx", 30.0),
                ("haproxy", 40.0),
            ] {
                s.push(sample(
                    Test::Ws,
                    t,
                    round,
                    &[
                        ("cpu_us", us * slow),
                        // Nine tenths of every proxy's time in the kernel.
                        ("sys_us", 0.9 * us * slow),
                        ("mps", 5e5 / us / slow),
                        ("p99_ms", us / 10.0),
                        ("proxy_cores", 1.0),
                    ],
                ));
            }
        }
        s
    }

    fn report(
        targets: Vec<TargetSpec>,
        tests: Vec<Test>,
        samples: &[Sample],
        workers: usize,
    ) -> String {
        let a = args(targets, tests, workers);
        let run = Run {
            when: "now",
            args: &a,
            samples,
            notes: &[],
            took: Duration::from_secs(60),
        };
        markdown(&run, &Machine::default(), &Machine::default())
    }

    fn line<'a>(md: &'a str, starts: &str) -> Vec<&'a str> {
        md.lines().filter(|l| l.starts_with(starts)).collect()
    }

    #[test]
    fn per_core_and_total_rows_carry_ratios_to_nginx_and_haproxy() {
        let md = report(specs(), vec![Test::Ws], &ws_samples(), 1);
        // Per core: 1e6 / 20 µs = 50,000 msg per CPU-second, 1.5× nginx
        // (30 µs), 2× HAProxy (40 µs), in every round.
        let rows = line(&md, "| charon@new | 50,000");
        assert_eq!(rows.len(), 1, "{md}");
        assert!(
            rows[0].contains("| 1.50× (1.50–1.50) | 2.00× (2.00–2.00) | 20.0 |"),
            "{}",
            rows[0]
        );
        // Total: the median msg/s and its range over rounds.
        let total = line(
            &md,
            "| charon@new | 25,000 (12,500–25,000) | 1.50× (1.50–1.50) | 2.00×",
        );
        assert_eq!(total.len(), 1, "{md}");
    }

    #[test]
    fn builds_and_variants_are_compared_with_the_first_once_per_test() {
        let md = report(specs(), vec![Test::Ws], &ws_samples(), 1);
        assert!(md.contains("## Charon builds and variants against charon@base"));
        let rows = line(&md, "| charon@new | ws |");
        assert_eq!(rows.len(), 1, "{md}");
        // 25 / 20 µs: 1.25× per core; msg/s likewise; p99 0.8×.
        assert!(
            rows[0].contains("| 1.25× (1.25–1.25) | 1.25× (1.25–1.25) | 0.80× (0.80–0.80) |"),
            "{}",
            rows[0]
        );
        assert_eq!(line(&md, "| charon@new+acl | ws |").len(), 1);
        assert!(line(&md, "| charon@base | ws |").is_empty());
    }

    #[test]
    fn the_websocket_goal_depends_on_the_workers() {
        let one = report(specs(), vec![Test::Ws], &ws_samples(), 1);
        let row = line(
            &one,
            "| charon@new | WebSocket messages per proxy CPU-second ≥ 1.2× nginx",
        );
        assert_eq!(row.len(), 1, "{one}");
        assert!(
            row[0].ends_with("| 1.50× (1.50–1.50) | met |"),
            "{}",
            row[0]
        );
        let base = line(
            &one,
            "| charon@base | WebSocket messages per proxy CPU-second ≥ 1.2× nginx",
        );
        // 30 / 25 = 1.2: met, exactly.
        assert!(base[0].ends_with("| met |"), "{}", base[0]);
        let two = report(specs(), vec![Test::Ws], &ws_samples(), 2);
        assert_eq!(
            line(
                &two,
                "| charon@new | WebSocket messages per proxy CPU-second ≥ 1.1× nginx"
            )
            .len(),
            1
        );
        // Variants are compared with their build, not held to the goals.
        assert!(line(&one, "| charon@new+acl | WebSocket").is_empty());
    }

    #[test]
    fn the_kernel_share_bounds_what_user_space_work_can_reach() {
        let md = report(specs(), vec![Test::Ws], &ws_samples(), 1);
        // charon@new: 18 of its 20 µs in the kernel; nginx 30 µs in all:
        // 30 / 18 = 1.67× at best, above the 1.2× goal.
        let per_core = line(&md, "| charon@new | 50,000");
        assert!(
            per_core[0].contains("| 20.0 | 18.0 (90%) |"),
            "{}",
            per_core[0]
        );
        let ceiling = line(&md, "| charon@new | ceiling of that ratio");
        assert_eq!(ceiling.len(), 1, "{md}");
        assert!(
            ceiling[0].ends_with("| 1.67× (1.67–1.67) | met |"),
            "{}",
            ceiling[0]
        );
        // Without system times there is no ceiling to show.
        let mut bare = ws_samples();
        for s in &mut bare {
            s.values.remove("sys_us");
        }
        let md = report(specs(), vec![Test::Ws], &bare, 1);
        let ceiling = line(&md, "| charon@new | ceiling of that ratio");
        assert!(ceiling[0].ends_with("| not measured |"), "{}", ceiling[0]);
        assert!(line(&md, "| charon@new | 50,000")[0].contains("| 20.0 | — |"));
    }

    #[test]
    fn websockets_over_h2_are_compared_with_h1_per_round() {
        let mut s = ws_samples();
        for round in 0..3 {
            let slow = if round == 1 { 2.0 } else { 1.0 };
            s.push(sample(
                Test::WsH2,
                "charon@new",
                round,
                &[
                    ("cpu_us", 16.0 * slow),
                    ("mps", 30_000.0 / slow),
                    ("p99_ms", 3.0),
                ],
            ));
            let mut skipped = sample(Test::WsH2, "charon@base", round, &[]);
            skipped.skipped = Some("no WebSockets over HTTP/2 in this build".into());
            s.push(skipped);
        }
        let md = report(specs(), vec![Test::Ws, Test::WsH2], &s, 1);
        let row = line(&md, "| charon@new | 20.0 → 16.0 |");
        assert_eq!(row.len(), 1, "{md}");
        // 20 / 16 µs = 1.25× per core with h2.
        assert!(row[0].contains("| 1.25× (1.25–1.25) |"), "{}", row[0]);
        assert_eq!(
            line(
                &md,
                "| charon@base | n/a: no WebSockets over HTTP/2 in this build"
            )
            .len(),
            3,
            "total, per-core and h2-vs-h1 rows: {md}"
        );
        // nginx and HAProxy have no RFC 8441 row at all.
        let h2 = md.split("over HTTP/2 (RFC 8441), 1,000").nth(1).unwrap();
        let h2 = h2.split("\n## ").next().unwrap();
        assert!(!h2.contains("| nginx |"), "{h2}");
    }
}
