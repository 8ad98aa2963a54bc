//! One measurement of one target: the load tool it needs (wrk, or this
//! program's `ws-load`, `ws-idle`, `tls-load` as child processes, pinned to
//! the load CPUs in pinned mode) and the proxy's CPU time and memory read
//! from `/proc` around the measured window.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::procfs::{self, CpuTimes};
use super::targets::Target;
use super::{cpus, output_within, terminate, wrk, RunArgs, Sample, Test};

/// What every measurement needs besides the target.
pub struct Ctx<'a> {
    pub a: &'a RunArgs,
    /// CPUs of the load generators in pinned mode.
    pub load_cpus: Option<&'a [usize]>,
}

/// The target does not offer what the test needs (a load tool said
/// `unsupported …`): the figure is n/a, not a failure.
#[derive(Debug)]
struct Unsupported(String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

type Values = BTreeMap<&'static str, f64>;

pub fn measure(c: &Ctx, test: Test, t: &Target, round: usize) -> Sample {
    let mut s = Sample {
        test,
        target: t.name().to_string(),
        kind: t.kind,
        round,
        values: BTreeMap::new(),
        error: None,
        skipped: None,
    };
    let log =
        c.a.workdir
            .join("logs")
            .join(format!("r{round}-{test:?}-{}.log", t.name()).to_lowercase());
    let r = match test {
        Test::HttpSmall => measure_http(c, t, "/small", &mut s.values),
        Test::HttpLarge => measure_http(c, t, "/large", &mut s.values),
        Test::Ws => measure_ws(c, t, &log, Over::H1, &mut s.values),
        Test::WsH2 => measure_ws(c, t, &log, Over::H2, &mut s.values),
        Test::WsTls => measure_ws(c, t, &log, Over::Tls, &mut s.values),
        Test::Tls => measure_tls(c, t, &log, &mut s.values),
        Test::Idle => measure_idle(c, t, &log, Over::H1, &mut s.values),
        Test::IdleH2 => measure_idle(c, t, &log, Over::H2, &mut s.values),
        Test::IdleTls => measure_idle(c, t, &log, Over::Tls, &mut s.values),
    };
    match r {
        Ok(()) => {}
        Err(e) => match e.downcast_ref::<Unsupported>() {
            Some(u) => s.skipped = Some(u.0.clone()),
            None => s.error = Some(format!("{e:#}")),
        },
    }
    s
}

fn cpu(t: &Target) -> Option<CpuTimes> {
    t.pid().map(procfs::cpu_times)
}

/// Records the proxy's CPU time over a window of `secs`: µs per unit of
/// work (in all, and its system-time part), and how many cores it kept
/// busy (1.0 = one core all the time).
fn record_cpu(v: &mut Values, used: CpuTimes, secs: f64, work: f64) {
    let per_unit = 1e6 / work.max(1.0);
    v.insert("cpu_us", used.total() * per_unit);
    v.insert("sys_us", used.system * per_unit);
    if secs > 0.0 {
        v.insert("proxy_cores", used.total() / secs);
    }
}

/// The window's CPU time that [`windowed_tool`] left in `v`.
fn take_window_cpu(v: &mut Values) -> Option<CpuTimes> {
    let user = v.remove("cpu_user_secs")?;
    let system = v.remove("cpu_sys_secs")?;
    Some(CpuTimes { user, system })
}

fn wrk(c: &Ctx, conns: usize, secs: u64, url: &str) -> anyhow::Result<wrk::WrkResult> {
    let threads = c.a.load_threads.min(conns).max(1);
    let mut cmd = cpus::command("wrk", c.load_cpus);
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        url,
    ]);
    let out = output_within(cmd, Duration::from_secs(secs + 30))?;
    wrk::parse(&out)
}

fn measure_http(c: &Ctx, t: &Target, path: &str, v: &mut Values) -> anyhow::Result<()> {
    let a = c.a;
    let url = format!("http://{}{path}", t.http);
    if a.warmup > 0 {
        wrk(c, a.http_conns, a.warmup, &url).context("warm-up")?;
    }
    let c0 = cpu(t);
    let r = wrk(c, a.http_conns, a.duration, &url)?;
    let c1 = cpu(t);
    v.insert("rps", r.rps);
    v.insert("p50_ms", r.p50_ms);
    v.insert("p99_ms", r.p99_ms);
    v.insert("requests", r.requests as f64);
    v.insert("errors", r.errors as f64);
    if let (Some(c0), Some(c1)) = (c0, c1) {
        let secs = if r.rps > 0.0 {
            r.requests as f64 / r.rps
        } else {
            a.duration as f64
        };
        record_cpu(v, c1.since(c0), secs, r.requests as f64);
    }
    if r.errors > 0 {
        bail!("{} errors (socket errors or non-2xx answers)", r.errors);
    }
    Ok(())
}

fn measure_ws(c: &Ctx, t: &Target, log: &Path, over: Over, v: &mut Values) -> anyhow::Result<()> {
    let a = c.a;
    let addr = over.addr(t)?;
    let mut args = vec![
        "ws-load".to_string(),
        format!("--addr={addr}"),
        "--path=/ws".into(),
        format!("--conns={}", a.ws_conns),
        format!("--size={}", a.ws_size),
        format!("--warmup={}", a.warmup),
        format!("--duration={}", a.duration),
        format!("--sources={}", a.sources),
        format!("--threads={}", a.load_threads),
    ];
    args.extend(over.load_args(a));
    let json = windowed_tool(c, t, &args, log, a.warmup + a.duration + 120, v)?;
    let msgs = json["messages"].as_f64().unwrap_or(0.0);
    v.insert("mps", json["msgs_per_sec"].as_f64().unwrap_or(0.0));
    v.insert("p50_ms", json["p50_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("p99_ms", json["p99_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("messages", msgs);
    for (key, name) in [
        ("conn_msgs_min", "conn_min"),
        ("conn_msgs_p50", "conn_p50"),
        ("conn_msgs_max", "conn_max"),
    ] {
        v.insert(name, json[key].as_f64().unwrap_or(0.0));
    }
    if let Some(cpu) = take_window_cpu(v) {
        record_cpu(v, cpu, json["secs"].as_f64().unwrap_or(0.0), msgs);
    }
    let failed =
        json["failed_connects"].as_u64().unwrap_or(0) + json["errors"].as_u64().unwrap_or(0);
    if failed > 0 || msgs == 0.0 {
        bail!("{failed} connection(s) failed; {msgs} messages");
    }
    Ok(())
}

fn measure_tls(c: &Ctx, t: &Target, log: &Path, v: &mut Values) -> anyhow::Result<()> {
    let a = c.a;
    let addr = t.tls.context("no TLS listener")?;
    let args = vec![
        "tls-load".to_string(),
        format!("--addr={addr}"),
        format!("--conns={}", a.tls_conns),
        format!("--warmup={}", a.warmup),
        format!("--duration={}", a.duration),
        format!("--sources={}", a.sources),
        format!("--threads={}", a.load_threads),
    ];
    let json = windowed_tool(c, t, &args, log, a.warmup + a.duration + 60, v)?;
    let n = json["handshakes"].as_f64().unwrap_or(0.0);
    v.insert("hps", json["handshakes_per_sec"].as_f64().unwrap_or(0.0));
    v.insert("p50_ms", json["p50_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("p99_ms", json["p99_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("handshakes", n);
    if let Some(cpu) = take_window_cpu(v) {
        record_cpu(v, cpu, json["secs"].as_f64().unwrap_or(0.0), n);
    }
    let errors = json["errors"].as_u64().unwrap_or(0);
    if n == 0.0 {
        bail!("no handshake completed ({errors} errors)");
    }
    if errors > 0 {
        bail!("{errors} handshakes failed");
    }
    Ok(())
}

/// Runs a load tool that says `measure-start` / `measure-end` and samples
/// the target's CPU time exactly then (as `cpu_user_secs` and
/// `cpu_sys_secs`, see [`take_window_cpu`]); returns its result.
fn windowed_tool(
    c: &Ctx,
    t: &Target,
    args: &[String],
    log: &Path,
    limit_secs: u64,
    v: &mut Values,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(limit_secs);
    let mut tool = Tool::spawn(c, args, log, false)?;
    let mut c0 = None;
    loop {
        let line = tool.next_line(deadline)?;
        if line == "measure-start" {
            c0 = cpu(t);
        } else if line == "measure-end" {
            if let (Some(c0), Some(c1)) = (c0, cpu(t)) {
                let used = c1.since(c0);
                v.insert("cpu_user_secs", used.user);
                v.insert("cpu_sys_secs", used.system);
            }
        } else if let Some(json) = line.strip_prefix("result ") {
            tool.finish(Duration::from_secs(10));
            return Ok(serde_json::from_str(json)?);
        } else if let Some(why) = line.strip_prefix("unsupported ") {
            tool.finish(Duration::from_secs(10));
            return Err(Unsupported(why.to_string()).into());
        }
    }
}

fn measure_idle(c: &Ctx, t: &Target, log: &Path, over: Over, v: &mut Values) -> anyhow::Result<()> {
    let a = c.a;
    let pid = t.pid().context("no process")?;
    // Warm-up, so one-time allocations (pools, buffers, the route to the
    // upstream) are in the baseline: some requests and a few tunnels.
    wrk(
        c,
        a.http_conns.min(16),
        1,
        &format!("http://{}/small", t.http),
    )
    .context("warm-up")?;
    idle_tunnels(c, t, log, 20.min(a.idle_conns), over, |_| Ok(()))?;
    std::thread::sleep(Duration::from_secs(1));
    let before = procfs::rss_kib(pid);
    let mut after = 0;
    let open = idle_tunnels(c, t, log, a.idle_conns, over, |open| {
        // Let the proxy settle, then read twice: the larger is taken.
        std::thread::sleep(Duration::from_secs(2));
        let r1 = procfs::rss_kib(pid);
        std::thread::sleep(Duration::from_secs(1));
        after = r1.max(procfs::rss_kib(pid));
        eprintln!("      {open} idle tunnels: RSS {before} KiB -> {after} KiB");
        Ok(())
    })?;
    v.insert("tunnels", open as f64);
    v.insert("rss_before_kib", before as f64);
    v.insert("rss_after_kib", after as f64);
    v.insert(
        "kib_per_tunnel",
        (after as f64 - before as f64) / (open.max(1)) as f64,
    );
    // Give the proxy time to tear the tunnels down before the next test.
    std::thread::sleep(Duration::from_secs(2));
    if open < a.idle_conns {
        bail!("only {open} of {} tunnels opened", a.idle_conns);
    }
    Ok(())
}

/// What idle tunnels go over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Over {
    /// An HTTP/1.1 upgrade on a connection of its own.
    H1,
    /// A stream of a shared h2c connection (RFC 8441).
    H2,
    /// An HTTP/1.1 upgrade on a TLS connection of its own (`wss://`).
    Tls,
}

impl Over {
    /// The target's listener for this way in.
    fn addr(self, t: &Target) -> anyhow::Result<std::net::SocketAddr> {
        Ok(match self {
            Over::H1 => t.http,
            Over::H2 => t.h2c.context("no h2c listener")?,
            Over::Tls => t.tls.context("no TLS listener")?,
        })
    }

    /// What `ws-load` and `ws-idle` are told to go this way.
    fn load_args(self, a: &RunArgs) -> Vec<String> {
        match self {
            Over::H1 => vec![],
            Over::H2 => vec!["--h2".into(), format!("--h2-streams={}", a.h2_streams)],
            Over::Tls => vec!["--tls".into()],
        }
    }
}

/// Opens `n` idle tunnels through `t` (`over` h2 streams or TLS), calls
/// `hold` while they are open, then closes them. Returns how many opened.
fn idle_tunnels(
    c: &Ctx,
    t: &Target,
    log: &Path,
    n: usize,
    over: Over,
    hold: impl FnOnce(usize) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let a = c.a;
    let addr = over.addr(t)?;
    let mut args = vec![
        "ws-idle".to_string(),
        format!("--addr={addr}"),
        "--path=/ws".into(),
        format!("--conns={n}"),
        format!("--sources={}", a.sources),
    ];
    args.extend(over.load_args(a));
    let mut tool = Tool::spawn(c, &args, log, true)?;
    let line = tool.next_line(Instant::now() + Duration::from_secs(180))?;
    if let Some(why) = line.strip_prefix("unsupported ") {
        tool.finish(Duration::from_secs(10));
        return Err(Unsupported(why.to_string()).into());
    }
    let open: usize = line
        .strip_prefix("ready ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected line from ws-idle: {line:?}"))?;
    let held = hold(open);
    tool.finish(Duration::from_secs(30));
    held?;
    Ok(open)
}

/// A load tool (this program, another subcommand) as a child process,
/// its stdout read line by line on a thread.
struct Tool {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Tool {
    fn spawn(c: &Ctx, args: &[String], log: &Path, stdin: bool) -> anyhow::Result<Tool> {
        let err = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = cpus::command(std::env::current_exe()?, c.load_cpus)
            .args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Tool {
            stdin: child.stdin.take(),
            child,
            lines: rx,
        })
    }

    fn next_line(&mut self, deadline: Instant) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(l),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("load tool timed out"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                bail!("load tool ended early ({status})")
            }
        }
    }

    /// Closes stdin (the tool's signal to stop) and waits for it to exit.
    fn finish(&mut self, grace: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        terminate(&mut self.child, Duration::from_secs(2));
    }
}
