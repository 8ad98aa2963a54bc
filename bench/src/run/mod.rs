//! `charon-bench run`: starts the backend and every target, measures them
//! interleaved — each round runs every test against every target, in an
//! order rotated from round to round, on processes started fresh for the
//! round — and writes the report.
//!
//! Options shape the setup without touching the tests: `--workers N` for
//! every proxy, `--pin` to give the proxy CPUs of its own ([`cpus`]),
//! several Charon builds or host-configuration variants as extra targets
//! ([`targets::TargetSpec`]). A new scenario is a [`Test`] variant, an arm
//! in [`measure::measure`] and a section in [`report`].

pub mod cpus;
pub mod machine;
pub mod measure;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod targets;
pub mod wrk;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use cpus::CpuPlan;
use targets::{CharonBuild, Env, Kind, Target, TargetSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    /// Memory per idle proxied WebSocket.
    Idle,
    HttpSmall,
    HttpLarge,
    Ws,
    Tls,
    /// WebSocket round trips over HTTP/2 extended CONNECT (RFC 8441),
    /// many WebSockets per h2c connection: Charon (and the backend
    /// directly) only.
    WsH2,
    /// Memory per idle WebSocket over HTTP/2: Charon only.
    IdleH2,
    /// Memory per idle `wss://` WebSocket (HTTP/1.1 over TLS): every
    /// proxy with a TLS listener.
    IdleTls,
    /// WebSocket round trips over `wss://` (each on its own TLS
    /// connection): what production WebSockets cost, TLS record layer
    /// included; every proxy with a TLS listener.
    WsTls,
}

impl Test {
    pub fn applies_to(self, t: &Target) -> bool {
        match self {
            Test::Idle => t.kind.is_proxy(),
            Test::Tls => t.tls.is_some(),
            Test::WsH2 => t.h2c.is_some(),
            Test::IdleH2 => t.kind == Kind::Charon,
            Test::IdleTls | Test::WsTls => t.tls.is_some(),
            _ => true,
        }
    }
}

/// One measurement of one target in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub test: Test,
    /// The target's name (`charon`, `charon@new`, `nginx`...).
    pub target: String,
    pub kind: Kind,
    pub round: usize,
    pub values: BTreeMap<&'static str, f64>,
    /// Set when the measurement failed or is not trustworthy.
    pub error: Option<String>,
    /// Set when the target does not offer what the test needs (n/a).
    pub skipped: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.skipped.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct RunArgs {
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
    /// Workers of every proxy.
    pub workers: usize,
    /// Pinned mode.
    pub pin: bool,
    pub load_threads: usize,
    pub backend_threads: usize,
    /// WebSockets per h2 connection in the h2 tests.
    pub h2_streams: usize,
    /// The Charon builds measured (one unlabelled unless compared).
    pub builds: Vec<CharonBuild>,
    pub targets: Vec<TargetSpec>,
    pub tests: Vec<Test>,
    pub command: String,
    pub mode: String,
}

/// Runs everything and writes the report; `Ok(false)` when some
/// measurement failed (the report says which).
pub fn run(a: RunArgs) -> anyhow::Result<bool> {
    fs::create_dir_all(&a.workdir)?;
    fs::create_dir_all(a.workdir.join("logs"))?;
    let plan = if a.pin {
        Some(CpuPlan::new(&cpus::available()?, a.workers)?)
    } else {
        None
    };
    let (cert, key) = make_certificate(&a.workdir)?;
    let machine_before = report::Machine::describe(&a.builds);
    let started = Instant::now();
    let started_at = crate::utc_timestamp();
    let load_cpus = plan.as_ref().map(|p| p.load.as_slice());
    let mut backend = Backend::start(&a.workdir, a.backend_threads, load_cpus)?;
    eprintln!("backend on {} (h2c {})", backend.addr, backend.h2);
    let env = Env {
        workdir: a.workdir.clone(),
        backend: backend.addr,
        backend_h2: backend.h2,
        cert,
        key,
        workers: a.workers,
        proxy_cpus: plan.as_ref().map(|p| p.proxy.clone()),
    };
    let mut notes = Vec::new();
    if let Some(p) = &plan {
        notes.push(p.describe(a.workers));
        let cpus = cpus::allowed(backend.child.id())?;
        if cpus != p.load {
            bail!(
                "the backend may run on CPUs {} instead of {}",
                cpus::list(&cpus),
                cpus::list(&p.load)
            );
        }
        notes.push(format!(
            "Placement, read back from /proc: backend: pid {}, CPUs {}.",
            backend.child.id(),
            cpus::list(&cpus)
        ));
    }
    let ctx = measure::Ctx { a: &a, load_cpus };
    let mut samples = Vec::new();
    for round in 0..a.rounds {
        samples.extend(run_round(&ctx, &env, round, &mut notes)?);
    }
    backend.stop();
    let machine_after = report::Machine::describe(&a.builds);
    let ok = samples.iter().all(|s| s.error.is_none());
    let md = report::markdown(
        &report::Run {
            when: &started_at,
            args: &a,
            samples: &samples,
            notes: &notes,
            took: started.elapsed(),
        },
        &machine_before,
        &machine_after,
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

/// One round: every target started afresh, every test against each in
/// turn, in an order rotated from the previous round.
fn run_round(
    c: &measure::Ctx,
    env: &Env,
    round: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Sample>> {
    let a = c.a;
    let mut order = a.targets.clone();
    let n = order.len().max(1);
    order.rotate_left(round % n);
    eprintln!(
        "== round {}/{} (order: {})",
        round + 1,
        a.rounds,
        order
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut running = Vec::new();
    for spec in &order {
        let t = Target::start(spec, env)?;
        if round == 0 && a.pin && t.kind.is_proxy() {
            notes.push(format!(
                "Placement, read back from /proc: {}.",
                t.placement()
            ));
        }
        running.push(t);
    }
    let mut samples = Vec::new();
    // Whether a target has served a test since it started: the idle tests
    // measure memory per tunnel as an RSS delta, which is only memory per
    // tunnel in a fresh process (one that already held and freed the
    // tunnels of another test reuses that memory, and shows a delta that
    // depends on the test order), so they restart a used target first.
    let mut used = vec![false; running.len()];
    let mut noted = vec![false; running.len()];
    for &test in &a.tests {
        for (i, spec) in order.iter().enumerate() {
            if !test.applies_to(&running[i]) {
                continue;
            }
            if used[i] && matches!(test, Test::Idle | Test::IdleH2 | Test::IdleTls) {
                if !noted[i] {
                    note_busy_threads(a, round, &running[i], notes);
                    noted[i] = true;
                }
                running[i].stop();
                running[i] = Target::start(spec, env)?;
            }
            used[i] = true;
            let t = &running[i];
            let s = measure::measure(c, test, t, round);
            eprintln!("   {}", report::one_line(&s));
            samples.push(s);
        }
    }
    for (i, mut t) in running.into_iter().enumerate() {
        if !noted[i] {
            note_busy_threads(a, round, &t, notes);
        }
        t.stop();
    }
    Ok(samples)
}

/// In round 1, which of a Charon target's threads did the work (read
/// before the process stops, at the end of the round or before an idle
/// test restarts it).
fn note_busy_threads(a: &RunArgs, round: usize, t: &Target, notes: &mut Vec<String>) {
    if t.kind != Kind::Charon || round != 0 {
        return;
    }
    // A tenth of a measurement's length: busy in the tests, not idle
    // housekeeping (1 s in a full run, 0.1 s in a smoke run).
    let min_secs = (a.duration as f64 / 10.0).max(0.1);
    let busy = t.busy_threads(min_secs);
    notes.push(format!(
        "{} ran with TOKIO_WORKER_THREADS={}; threads that used ≥ {min_secs:.1} s of CPU in round 1: {} ({}).",
        t.name(),
        a.workers,
        busy.len(),
        busy.join(", ")
    ));
}

/// `charon-bench serve`: the backend and the given targets, configured as
/// in a run, until stdin closes — for profiling one by hand (perf, strace).
/// Prints one line per target: `NAME http=ADDR tls=ADDR pid=PID`.
pub fn serve(
    bin_dir: PathBuf,
    workdir: PathBuf,
    kinds: &[Kind],
    workers: usize,
) -> anyhow::Result<()> {
    fs::create_dir_all(workdir.join("logs"))?;
    let (cert, key) = make_certificate(&workdir)?;
    let backend = Backend::start(&workdir, 1, None)?;
    println!(
        "backend http={} h2c={} pid={}",
        backend.addr,
        backend.h2,
        backend.child.id()
    );
    let env = Env {
        workdir,
        backend: backend.addr,
        backend_h2: backend.h2,
        cert,
        key,
        workers: workers.max(1),
        proxy_cpus: None,
    };
    let build = CharonBuild {
        label: String::new(),
        bin_dir,
    };
    let proxies: Vec<Kind> = kinds.iter().copied().filter(|k| k.is_proxy()).collect();
    let mut running = Vec::new();
    for spec in TargetSpec::expand(&proxies, &[build], &[]) {
        let t = Target::start(&spec, &env)?;
        println!(
            "{} http={} tls={} pid={}",
            spec.name,
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

/// The backend, this program's `backend` subcommand (on the load CPUs in
/// pinned mode).
struct Backend {
    child: Child,
    addr: SocketAddr,
    /// Its h2c listener (RFC 8441 WebSockets).
    h2: SocketAddr,
}

impl Backend {
    fn start(workdir: &Path, threads: usize, cpus: Option<&[usize]>) -> anyhow::Result<Backend> {
        let log = fs::File::create(workdir.join("logs/backend.log"))?;
        let mut child = cpus::command(std::env::current_exe()?, cpus)
            .args([
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--h2-listen",
                "127.0.0.1:0",
            ])
            .arg(format!("--threads={threads}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut addr = |prefix: &str| -> anyhow::Result<SocketAddr> {
            let mut line = String::new();
            out.read_line(&mut line)?;
            line.trim()
                .strip_prefix(prefix)
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("backend said {line:?}"))
        };
        let (addr, h2) = (addr("listening ")?, addr("listening-h2 ")?);
        Ok(Backend { child, addr, h2 })
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
