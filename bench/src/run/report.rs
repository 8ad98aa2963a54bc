//! The Markdown report: per test, each target's figures (median over the
//! rounds), their ratios to nginx and to the direct connection (taken within
//! a round, then the median), and the spread between rounds.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::targets::Kind;
use super::{RunArgs, Sample, Test};

/// What the machine was, and how busy, when the run started or ended.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub facts: Vec<(String, String)>,
    pub loadavg: String,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => "not installed".into(),
    }
}

impl Machine {
    pub fn describe(bin_dir: &Path) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let os = fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|s| s.trim_matches('"').to_string())
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = Command::new("git")
            // What charon-node is built from (bench/ and docs/ do not count).
            .args([
                "status",
                "--porcelain",
                "--",
                "node",
                "proto",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let profile = bin_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let facts = vec![
            ("CPU".into(), format!("{cpus} × {model}")),
            ("memory".into(), mem),
            ("OS / kernel".into(), format!("{os} / Linux {kernel}")),
            (
                "charon".into(),
                format!(
                    "{} ({profile} build), commit {commit}{}",
                    first_line(
                        &bin_dir.join("charon-node").to_string_lossy(),
                        &["--version"]
                    ),
                    if dirty { " + uncommitted changes" } else { "" }
                ),
            ),
            ("nginx".into(), first_line("nginx", &["-v"])),
            ("HAProxy".into(), first_line("haproxy", &["-v"])),
            ("Caddy".into(), first_line("caddy", &["version"])),
            ("wrk".into(), first_line("wrk", &["-v"])),
            ("rustc".into(), first_line("rustc", &["--version"])),
        ];
        Machine {
            facts,
            loadavg: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
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
        Test::Ws => format!(
            "{:.0} msg/s  p50 {:.2} ms  p99 {:.2} ms  cpu {:.1} µs/msg",
            v("mps"),
            v("p50_ms"),
            v("p99_ms"),
            v("cpu_us")
        ),
        Test::Idle => format!(
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
    let err = s
        .error
        .as_ref()
        .map(|e| format!("  FAILED: {e}"))
        .unwrap_or_default();
    format!("{:<10} {:<8} {body}{err}", test_name(s.test), s.target)
}

fn test_name(t: Test) -> &'static str {
    match t {
        Test::Idle => "idle-ws",
        Test::HttpSmall => "http-100B",
        Test::HttpLarge => "http-64K",
        Test::Ws => "ws",
        Test::Tls => "tls",
    }
}

/// The measurements of one (test, metric), by target and round.
struct Table<'a> {
    samples: &'a [Sample],
    test: Test,
}

impl Table<'_> {
    fn value(&self, k: Kind, round: usize, metric: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.test == self.test && s.target == k && s.round == round && s.error.is_none())
            .and_then(|s| s.values.get(metric).copied())
            .filter(|v| v.is_finite())
    }

    fn rounds(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.samples.iter().map(|s| s.round).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    fn values(&self, k: Kind, metric: &str) -> Vec<f64> {
        self.rounds()
            .into_iter()
            .filter_map(|r| self.value(k, r, metric))
            .collect()
    }

    /// Per-round ratio `k / reference` (or `reference / k` when `invert`,
    /// for costs where lower is better and we want "× as efficient").
    fn ratios(&self, k: Kind, reference: Kind, metric: &str, invert: bool) -> Vec<f64> {
        self.rounds()
            .into_iter()
            .filter_map(|r| {
                let (a, b) = (self.value(k, r, metric)?, self.value(reference, r, metric)?);
                let (num, den) = if invert { (b, a) } else { (a, b) };
                (den > 0.0).then(|| num / den)
            })
            .collect()
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `(max − min) / median`, in percent.
fn spread_pct(v: &[f64]) -> Option<f64> {
    let m = median(v)?;
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    (m > 0.0).then(|| (max - min) / m * 100.0)
}

/// 12345.6 → "12,346" (with `decimals` after the point).
fn num(v: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if v < 0.0 {
        format!("−{out}")
    } else {
        out
    }
}

fn cell(v: &[f64], decimals: usize) -> String {
    median(v).map_or("—".into(), |m| num(m, decimals))
}

/// "1.23×" or "1.23× (1.10–1.31)" with the range over rounds.
fn ratio_cell(r: &[f64]) -> String {
    let Some(m) = median(r) else {
        return "—".into();
    };
    if r.len() < 2 {
        return format!("{m:.2}×");
    }
    let min = r.iter().copied().fold(f64::MAX, f64::min);
    let max = r.iter().copied().fold(f64::MIN, f64::max);
    format!("{m:.2}× ({min:.2}–{max:.2})")
}

fn runs_cell(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let list: Vec<String> = v.iter().map(|x| num(*x, decimals)).collect();
    match spread_pct(v) {
        Some(p) if v.len() > 1 => format!("{} (±{:.0}%)", list.join(" / "), p / 2.0),
        _ => list.join(" / "),
    }
}

struct Cols {
    rate: &'static str,
    rate_name: &'static str,
    cost_name: &'static str,
    per_cpu_name: &'static str,
}

fn throughput_section(
    out: &mut String,
    samples: &[Sample],
    targets: &[Kind],
    test: Test,
    c: &Cols,
) {
    let t = Table { samples, test };
    let _ = writeln!(
        out,
        "| target | {rn} | × nginx | × direct | p50 ms | p99 ms | p99 × nginx | proxy CPU µs/{cn} | {pc} per proxy CPU-second | per-core × nginx | {rn}, each round |",
        rn = c.rate_name,
        cn = c.cost_name,
        pc = c.per_cpu_name,
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for &k in targets {
        let measured = samples.iter().any(|s| s.test == test && s.target == k);
        if !measured {
            let why = match k {
                Kind::Charon if test == Test::Tls => "n/a (no TLS listener in this build)",
                Kind::Direct if test == Test::Tls => "— (the backend has no TLS)",
                _ => "not measured",
            };
            let _ = writeln!(out, "| {k} | {why} | | | | | | | | | |");
            continue;
        }
        let rate = t.values(k, c.rate);
        let cpu = t.values(k, "cpu_us");
        let per_cpu: Vec<f64> = cpu.iter().filter(|v| **v > 0.0).map(|v| 1e6 / v).collect();
        let nginx_ratio = |m: &str, inv: bool| {
            if k == Kind::Nginx {
                "1.00×".to_string()
            } else {
                ratio_cell(&t.ratios(k, Kind::Nginx, m, inv))
            }
        };
        let direct = if k == Kind::Direct {
            "1.00×".to_string()
        } else {
            ratio_cell(&t.ratios(k, Kind::Direct, c.rate, false))
        };
        let (cpu_cell, per_cpu_cell, per_core) = if k.is_proxy() {
            (
                cell(&cpu, 1),
                cell(&per_cpu, 0),
                nginx_ratio("cpu_us", true),
            )
        } else {
            ("—".into(), "—".into(), "—".into())
        };
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {direct} | {} | {} | {} | {cpu_cell} | {per_cpu_cell} | {per_core} | {} |",
            cell(&rate, 0),
            nginx_ratio(c.rate, false),
            cell(&t.values(k, "p50_ms"), 2),
            cell(&t.values(k, "p99_ms"), 2),
            nginx_ratio("p99_ms", false),
            runs_cell(&rate, 0),
        );
    }
    out.push('\n');
}

/// How evenly a proxy shares itself among the WebSocket connections: the
/// round trips done by the least served, the median and the most served
/// connection (median over rounds). Even sharing keeps p99 near p50.
fn fairness_section(out: &mut String, samples: &[Sample], targets: &[Kind]) {
    let t = Table {
        samples,
        test: Test::Ws,
    };
    let _ = writeln!(
        out,
        "Round trips per connection in the measured window (fairness between tunnels):\n"
    );
    let _ = writeln!(
        out,
        "| target | least served | median | most served | least ÷ median |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for &k in targets {
        let (min, p50, max) = (
            t.values(k, "conn_min"),
            t.values(k, "conn_p50"),
            t.values(k, "conn_max"),
        );
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

fn idle_section(out: &mut String, samples: &[Sample], targets: &[Kind]) {
    let t = Table {
        samples,
        test: Test::Idle,
    };
    let _ = writeln!(
        out,
        "| target | KiB per idle tunnel | × nginx | × HAProxy | tunnels open | RSS before → after (MiB, median) | KiB per tunnel, each round |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for &k in targets.iter().filter(|k| k.is_proxy()) {
        let v = t.values(k, "kib_per_tunnel");
        let r = |reference: Kind| {
            if k == reference {
                "1.00×".into()
            } else {
                ratio_cell(&t.ratios(k, reference, "kib_per_tunnel", false))
            }
        };
        let mib = |m: &str| {
            median(&t.values(k, m)).map_or("—".into(), |x| format!("{:.1}", x / 1024.0))
        };
        let _ = writeln!(
            out,
            "| {k} | {} | {} | {} | {} | {} → {} | {} |",
            cell(&v, 2),
            r(Kind::Nginx),
            r(Kind::Haproxy),
            cell(&t.values(k, "tunnels"), 0),
            mib("rss_before_kib"),
            mib("rss_after_kib"),
            runs_cell(&v, 2),
        );
    }
    out.push('\n');
}

/// One line of the goals table: the median ratio, and whether the goal was
/// met in every round, in none, or in some (then the difference is within
/// this machine's noise and the verdict says so).
fn goal_row(out: &mut String, what: &str, ratios: &[f64], at_least: bool) {
    let met = ratios
        .iter()
        .filter(|&&r| if at_least { r >= 1.0 } else { r <= 1.0 })
        .count();
    let verdict = match (ratios.len(), met) {
        (0, _) => "not measured".to_string(),
        (n, m) if m == n => "met".into(),
        (_, 0) => "**not met**".into(),
        (n, m) => format!("met in {m} of {n} rounds (within noise)"),
    };
    let _ = writeln!(out, "| {what} | {} | {verdict} |", ratio_cell(ratios));
}

fn goals(out: &mut String, samples: &[Sample]) {
    let _ = writeln!(
        out,
        "| goal (Issue 3) | Charon, median ratio (range over rounds) | verdict |"
    );
    let _ = writeln!(out, "|---|---:|---|");
    for (test, label) in [
        (Test::HttpSmall, "HTTP 100 B"),
        (Test::HttpLarge, "HTTP 64 KiB"),
    ] {
        let t = Table { samples, test };
        for (peer, name) in [(Kind::Nginx, "nginx"), (Kind::Haproxy, "HAProxy")] {
            goal_row(
                out,
                &format!("{label}: requests per proxy CPU-second ≥ 1.0× {name}"),
                &t.ratios(Kind::Charon, peer, "cpu_us", true),
                true,
            );
            goal_row(
                out,
                &format!("{label}: requests/s (shared 2 cores) ≥ 1.0× {name}"),
                &t.ratios(Kind::Charon, peer, "rps", false),
                true,
            );
            goal_row(
                out,
                &format!("{label}: p99 ≤ 1.0× {name}"),
                &t.ratios(Kind::Charon, peer, "p99_ms", false),
                false,
            );
        }
    }
    let ws = Table {
        samples,
        test: Test::Ws,
    };
    goal_row(
        out,
        "WebSocket messages/s ≥ 1.0× nginx",
        &ws.ratios(Kind::Charon, Kind::Nginx, "mps", false),
        true,
    );
    goal_row(
        out,
        "WebSocket messages per proxy CPU-second ≥ 1.0× nginx",
        &ws.ratios(Kind::Charon, Kind::Nginx, "cpu_us", true),
        true,
    );
    let idle = Table {
        samples,
        test: Test::Idle,
    };
    goal_row(
        out,
        "memory per idle WebSocket ≤ 1.0× HAProxy",
        &idle.ratios(Kind::Charon, Kind::Haproxy, "kib_per_tunnel", false),
        false,
    );
    out.push('\n');
}

pub fn markdown(
    when: &str,
    a: &RunArgs,
    samples: &[Sample],
    notes: &[String],
    before: &Machine,
    after: &Machine,
    took: Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Charon benchmark, {when}\n");
    let _ = writeln!(out, "Command: `{}`  ", a.command);
    let _ = writeln!(
        out,
        "Mode: {}: {} round(s), {} s per measurement after {} s of warm-up; took {} min.\n",
        a.mode,
        a.rounds,
        a.duration,
        a.warmup,
        (took.as_secs() + 30) / 60
    );
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
    let _ = writeln!(
        out,
        "\nThe two cores are shared by the load generator, the proxy, the backend and anything \
         else running on the machine, so absolute figures drift. Every round starts each proxy \
         afresh and measures every target back to back, in an order rotated from round to round; \
         ratios are taken within a round and the table shows their median, with the range over \
         rounds in parentheses. \"Proxy CPU\" is the proxy's user+system time during the measured \
         window (`/proc/PID/stat`, nginx master and worker together) divided by the work done: \
         steadier than requests/s here, and its inverse is the throughput one core of that proxy \
         would give.\n"
    );
    let _ = writeln!(
        out,
        "Setup: one worker each (Charon `TOKIO_WORKER_THREADS=1`, nginx `worker_processes 1`, \
         HAProxy `nbthread 1`, Caddy `GOMAXPROCS=1`); keep-alive to the upstream; WebSocket upgrades \
         passed through; X-Forwarded-* headers added; no access log; nginx with 64 KiB proxy buffers. \
         Backend: `charon-bench backend` (hyper, one thread). Load: wrk (1 thread, {} connections); \
         WebSocket: `charon-bench ws-load` (tokio-tungstenite, one thread, {} connections, one {}-byte \
         binary message in flight per connection); idle tunnels: `charon-bench ws-idle` ({} tunnels, each \
         proven with one echo); TLS: `charon-bench tls-load` (rustls, {} concurrent loops of connect + \
         full TLS 1.3 handshake without resumption + close, ECDSA P-256 certificate shared by all).\n",
        a.http_conns, a.ws_conns, a.ws_size, a.idle_conns, a.tls_conns
    );
    for n in notes {
        let _ = writeln!(out, "{n}  ");
    }
    out.push('\n');

    let _ = writeln!(out, "## Against the goals\n");
    goals(&mut out, samples);

    let sections = [
        (
            Test::HttpSmall,
            "## HTTP, 100-byte responses, {c} connections (wrk)",
        ),
        (
            Test::HttpLarge,
            "## HTTP, 64 KiB responses, {c} connections (wrk)",
        ),
        (Test::Ws, "## WebSocket echo round trips, {w} connections"),
        (
            Test::Idle,
            "## Memory per idle proxied WebSocket ({i} tunnels, RSS delta)",
        ),
        (Test::Tls, "## New TLS handshakes ({t} concurrent clients)"),
    ];
    for (test, title) in sections {
        if !a.tests.contains(&test) {
            continue;
        }
        let title = title
            .replace("{c}", &a.http_conns.to_string())
            .replace("{w}", &num(a.ws_conns as f64, 0))
            .replace("{i}", &num(a.idle_conns as f64, 0))
            .replace("{t}", &a.tls_conns.to_string());
        let _ = writeln!(out, "{title}\n");
        match test {
            Test::HttpSmall | Test::HttpLarge => throughput_section(
                &mut out,
                samples,
                &a.targets,
                test,
                &Cols {
                    rate: "rps",
                    rate_name: "req/s",
                    cost_name: "req",
                    per_cpu_name: "req",
                },
            ),
            Test::Ws => {
                throughput_section(
                    &mut out,
                    samples,
                    &a.targets,
                    test,
                    &Cols {
                        rate: "mps",
                        rate_name: "msg/s",
                        cost_name: "msg",
                        per_cpu_name: "msg",
                    },
                );
                fairness_section(&mut out, samples, &a.targets);
            }
            Test::Tls => throughput_section(
                &mut out,
                samples,
                &a.targets,
                test,
                &Cols {
                    rate: "hps",
                    rate_name: "handshakes/s",
                    cost_name: "handshake",
                    per_cpu_name: "handshakes",
                },
            ),
            Test::Idle => idle_section(&mut out, samples, &a.targets),
        }
    }
    let _ = writeln!(out, "## Not measured in this run\n");
    let _ = writeln!(out, "| figure | charon |\n|---|---|");
    let charon_tls = samples
        .iter()
        .any(|s| s.test == Test::Tls && s.target == Kind::Charon);
    if a.tests.contains(&Test::Tls) && !charon_tls {
        let _ = writeln!(
            out,
            "| TLS handshakes/s | n/a (no TLS listener in this build) |"
        );
    }
    let _ = writeln!(
        out,
        "| config propagation latency, 3- and 10-node cluster | measured separately: `bench/propagation.sh` (see docs/benchmarks.md, \"Config propagation\") |\n"
    );
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
    if !failed.is_empty() {
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
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(1234567.0, 0), "1,234,567");
        assert_eq!(num(999.0, 0), "999");
        assert_eq!(num(1234.5678, 2), "1,234.57");
        assert_eq!(num(0.5, 2), "0.50");
    }

    #[test]
    fn medians_and_ratio_cells() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(ratio_cell(&[1.0, 1.2, 1.1]), "1.10× (1.00–1.20)");
        assert_eq!(ratio_cell(&[0.5]), "0.50×");
    }
}
