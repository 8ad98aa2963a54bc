//! `charon-bench run`: starts the backend and every target, measures them
//! interleaved — each round runs every test against every target, in an
//! order rotated from round to round, on processes started fresh for the
//! round — and writes the report.

pub mod procfs;
pub mod report;
pub mod targets;
pub mod wrk;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use targets::{Env, Kind, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    /// Memory per idle proxied WebSocket.
    Idle,
    HttpSmall,
    HttpLarge,
    Ws,
    Tls,
}

impl Test {
    pub fn applies_to(self, t: &Target) -> bool {
        match self {
            Test::Idle => t.kind.is_proxy(),
            Test::Tls => t.tls.is_some(),
            _ => true,
        }
    }
}

/// One measurement of one target in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub test: Test,
    pub target: Kind,
    pub round: usize,
    pub values: BTreeMap<&'static str, f64>,
    /// Set when the measurement failed or is not trustworthy.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub bin_dir: PathBuf,
    pub workdir: PathBuf,
    pub out: PathBuf,
    pub rounds: usize,
    pub duration: u64,
    pub warmup: u64,
    pub http_conns: usize,
    pub ws_conns: usize,
    pub ws_size: usize,
    pub idle_conns: usize,
    pub tls_conns: usize,
    pub sources: usize,
    pub targets: Vec<Kind>,
    pub tests: Vec<Test>,
    pub command: String,
    pub mode: String,
}

/// Runs everything and writes the report; `Ok(false)` when some
/// measurement failed (the report says which).
pub fn run(a: RunArgs) -> anyhow::Result<bool> {
    fs::create_dir_all(&a.workdir)?;
    fs::create_dir_all(a.workdir.join("logs"))?;
    let (cert, key) = make_certificate(&a.workdir)?;
    let machine_before = report::Machine::describe(&a.bin_dir);
    let started = Instant::now();
    let started_at = crate::utc_timestamp();
    let mut backend = Backend::start(&a.workdir)?;
    eprintln!("backend on {}", backend.addr);
    let env = Env {
        workdir: a.workdir.clone(),
        bin_dir: a.bin_dir.clone(),
        backend: backend.addr,
        cert,
        key,
    };
    let mut samples = Vec::new();
    let mut notes = Vec::new();
    for round in 0..a.rounds {
        let mut order = a.targets.clone();
        let n = order.len().max(1);
        order.rotate_left(round % n);
        eprintln!(
            "== round {}/{} (order: {})",
            round + 1,
            a.rounds,
            order
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut running = Vec::new();
        for &k in &order {
            let t = if k == Kind::Direct {
                Target::direct(env.backend)
            } else {
                Target::start(k, &env)?
            };
            running.push(t);
        }
        for &test in &a.tests {
            for t in &running {
                if !test.applies_to(t) {
                    continue;
                }
                let s = measure(&a, test, t, round);
                eprintln!("   {}", report::one_line(&s));
                samples.push(s);
            }
        }
        for mut t in running {
            if t.kind == Kind::Charon && round == 0 {
                let busy = t.busy_threads(1.0);
                notes.push(format!(
                    "Charon ran with TOKIO_WORKER_THREADS=1; threads that used ≥ 1 s of CPU in round 1: {} ({}).",
                    busy.len(),
                    busy.join(", ")
                ));
            }
            t.stop();
        }
    }
    backend.stop();
    let machine_after = report::Machine::describe(&a.bin_dir);
    let ok = samples.iter().all(|s| s.error.is_none());
    let md = report::markdown(
        &started_at,
        &a,
        &samples,
        &notes,
        &machine_before,
        &machine_after,
        started.elapsed(),
    );
    if let Some(dir) = a.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&a.out, md)?;
    let json = serde_json::to_string_pretty(&samples)?;
    fs::write(a.out.with_extension("json"), json)?;
    eprintln!("report: {}", a.out.display());
    Ok(ok)
}

/// `charon-bench serve`: the backend and the given targets, configured as
/// in a run, until stdin closes — for profiling one by hand (perf, strace).
/// Prints one line per target: `NAME http=ADDR tls=ADDR pid=PID`.
pub fn serve(bin_dir: PathBuf, workdir: PathBuf, kinds: &[Kind]) -> anyhow::Result<()> {
    fs::create_dir_all(workdir.join("logs"))?;
    let (cert, key) = make_certificate(&workdir)?;
    let backend = Backend::start(&workdir)?;
    println!("backend http={} pid={}", backend.addr, backend.child.id());
    let env = Env {
        workdir,
        bin_dir,
        backend: backend.addr,
        cert,
        key,
    };
    let mut running = Vec::new();
    for &k in kinds.iter().filter(|k| k.is_proxy()) {
        let t = Target::start(k, &env)?;
        println!(
            "{k} http={} tls={} pid={}",
            t.http,
            t.tls.map_or("-".into(), |a| a.to_string()),
            t.pid().unwrap_or(0)
        );
        running.push(t);
    }
    eprintln!("serving; close stdin (Ctrl-D) to stop");
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {}
    drop(running);
    drop(backend);
    Ok(())
}

fn measure(a: &RunArgs, test: Test, t: &Target, round: usize) -> Sample {
    let mut s = Sample {
        test,
        target: t.kind,
        round,
        values: BTreeMap::new(),
        error: None,
    };
    let log = a
        .workdir
        .join("logs")
        .join(format!("r{round}-{test:?}-{}.log", t.kind).to_lowercase());
    let r = match test {
        Test::HttpSmall => measure_http(a, t, "/small", &mut s.values),
        Test::HttpLarge => measure_http(a, t, "/large", &mut s.values),
        Test::Ws => measure_ws(a, t, &log, &mut s.values),
        Test::Tls => measure_tls(a, t, &log, &mut s.values),
        Test::Idle => measure_idle(a, t, &log, &mut s.values),
    };
    if let Err(e) = r {
        s.error = Some(format!("{e:#}"));
    }
    s
}

fn cpu(t: &Target) -> Option<f64> {
    t.pid().map(procfs::cpu_secs)
}

fn wrk(conns: usize, secs: u64, url: &str) -> anyhow::Result<wrk::WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        url,
    ]);
    let out = output_within(cmd, Duration::from_secs(secs + 30))?;
    wrk::parse(&out)
}

fn measure_http(
    a: &RunArgs,
    t: &Target,
    path: &str,
    v: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let url = format!("http://{}{path}", t.http);
    if a.warmup > 0 {
        wrk(a.http_conns, a.warmup, &url).context("warm-up")?;
    }
    let c0 = cpu(t);
    let r = wrk(a.http_conns, a.duration, &url)?;
    let c1 = cpu(t);
    v.insert("rps", r.rps);
    v.insert("p50_ms", r.p50_ms);
    v.insert("p99_ms", r.p99_ms);
    v.insert("requests", r.requests as f64);
    v.insert("errors", r.errors as f64);
    if let (Some(c0), Some(c1)) = (c0, c1) {
        v.insert("cpu_us", (c1 - c0) * 1e6 / r.requests as f64);
    }
    if r.errors > 0 {
        bail!("{} errors (socket errors or non-2xx answers)", r.errors);
    }
    Ok(())
}

fn measure_ws(
    a: &RunArgs,
    t: &Target,
    log: &Path,
    v: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let args = vec![
        "ws-load".to_string(),
        format!("--addr={}", t.http),
        "--path=/ws".into(),
        format!("--conns={}", a.ws_conns),
        format!("--size={}", a.ws_size),
        format!("--warmup={}", a.warmup),
        format!("--duration={}", a.duration),
        format!("--sources={}", a.sources),
    ];
    let json = windowed_tool(t, &args, log, a.warmup + a.duration + 120, v)?;
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
    if let Some(cpu) = v.remove("cpu_secs") {
        v.insert("cpu_us", cpu * 1e6 / msgs.max(1.0));
    }
    let failed =
        json["failed_connects"].as_u64().unwrap_or(0) + json["errors"].as_u64().unwrap_or(0);
    if failed > 0 || msgs == 0.0 {
        bail!("{failed} connection(s) failed; {msgs} messages");
    }
    Ok(())
}

fn measure_tls(
    a: &RunArgs,
    t: &Target,
    log: &Path,
    v: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let addr = t.tls.context("no TLS listener")?;
    let args = vec![
        "tls-load".to_string(),
        format!("--addr={addr}"),
        format!("--conns={}", a.tls_conns),
        format!("--warmup={}", a.warmup),
        format!("--duration={}", a.duration),
        format!("--sources={}", a.sources),
    ];
    let json = windowed_tool(t, &args, log, a.warmup + a.duration + 60, v)?;
    let n = json["handshakes"].as_f64().unwrap_or(0.0);
    v.insert("hps", json["handshakes_per_sec"].as_f64().unwrap_or(0.0));
    v.insert("p50_ms", json["p50_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("p99_ms", json["p99_us"].as_f64().unwrap_or(0.0) / 1000.0);
    v.insert("handshakes", n);
    if let Some(cpu) = v.remove("cpu_secs") {
        v.insert("cpu_us", cpu * 1e6 / n.max(1.0));
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
/// the target's CPU time exactly then (as `cpu_secs`); returns its result.
fn windowed_tool(
    t: &Target,
    args: &[String],
    log: &Path,
    limit_secs: u64,
    v: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(limit_secs);
    let mut tool = Tool::spawn(args, log, false)?;
    let mut c0 = None;
    loop {
        let line = tool.next_line(deadline)?;
        if line == "measure-start" {
            c0 = cpu(t);
        } else if line == "measure-end" {
            if let (Some(c0), Some(c1)) = (c0, cpu(t)) {
                v.insert("cpu_secs", c1 - c0);
            }
        } else if let Some(json) = line.strip_prefix("result ") {
            tool.finish(Duration::from_secs(10));
            return Ok(serde_json::from_str(json)?);
        }
    }
}

fn measure_idle(
    a: &RunArgs,
    t: &Target,
    log: &Path,
    v: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let pid = t.pid().context("no process")?;
    // Warm-up, so one-time allocations (pools, buffers, the route to the
    // upstream) are in the baseline: some requests and a few tunnels.
    wrk(a.http_conns.min(16), 1, &format!("http://{}/small", t.http)).context("warm-up")?;
    idle_tunnels(a, t, log, 20.min(a.idle_conns), |_| Ok(()))?;
    std::thread::sleep(Duration::from_secs(1));
    let before = procfs::rss_kib(pid);
    let mut after = 0;
    let open = idle_tunnels(a, t, log, a.idle_conns, |open| {
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

/// Opens `n` idle tunnels through `t`, calls `hold` while they are open,
/// then closes them. Returns how many opened.
fn idle_tunnels(
    a: &RunArgs,
    t: &Target,
    log: &Path,
    n: usize,
    hold: impl FnOnce(usize) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let args = vec![
        "ws-idle".to_string(),
        format!("--addr={}", t.http),
        "--path=/ws".into(),
        format!("--conns={n}"),
        format!("--sources={}", a.sources),
    ];
    let mut tool = Tool::spawn(&args, log, true)?;
    let line = tool.next_line(Instant::now() + Duration::from_secs(180))?;
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
    fn spawn(args: &[String], log: &Path, stdin: bool) -> anyhow::Result<Tool> {
        let err = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = Command::new(std::env::current_exe()?)
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
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child, Duration::from_secs(2));
        }
    }
}

/// SIGTERM, then SIGKILL once `grace` is over.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` to completion within `limit`; its stdout (stderr appended)
/// as text.
fn output_within(mut cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "charon-bench-{}-{}.out",
        std::process::id(),
        rand_suffix()
    ));
    let f = fs::File::create(&path)?;
    let mut child = cmd
        .stdout(f.try_clone()?)
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            terminate(&mut child, Duration::from_secs(2));
            let _ = fs::remove_file(&path);
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fs::read_to_string(&path)?;
    let _ = fs::remove_file(&path);
    Ok(out)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One self-signed ECDSA P-256 certificate for every TLS listener.
fn make_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run openssl")?;
    if !status.success() {
        bail!("openssl could not make the test certificate");
    }
    Ok((cert, key))
}

/// The backend, this program's `backend` subcommand.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    fn start(workdir: &Path) -> anyhow::Result<Backend> {
        let log = fs::File::create(workdir.join("logs/backend.log"))?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["backend", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
        let addr = first
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("backend said {first:?}"))?;
        Ok(Backend { child, addr })
    }

    fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}
