//! A rolling restart under load, the way it is done in production: three
//! nodes, each under a supervisor that starts it again when it exits 0,
//! behind HAProxy (health check: `/readyz` on the admin port), restarted one
//! at a time by `deploy/rolling-restart.sh` while HTTP clients and 200
//! WebSocket clients go through HAProxy and hosts are written through the
//! API of the nodes that stay up.
//!
//! What must hold: no HTTP request fails; every WebSocket tunnel that ends
//! ends with Close 1001 (going away) and its client reconnects and works;
//! no tunnel ends any other way (another code, or no Close at all: 1006);
//! every host written before and during the restarts is on every node.
//! How long charon-node takes to close TCP after each 1001 handshake is
//! measured too: it must close at once (RFC 6455 §7.1.1), not at its 5 s
//! linger; `relay_close_race` checks that on its own, with 200 clients
//! answering a drain's 1001 with their own 1000.
//!
//! Needs `haproxy` (`scripts/setup-test-env.sh` installs it with apt-get);
//! without it the test says SKIPPED and passes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use charon_tests::client::{self, HttpResponse, WsClient};
use charon_tests::haproxy::{find_haproxy, Haproxy, HaproxyServer};
use charon_tests::node::binary;
use charon_tests::supervisor::{NodeAddrs, SupervisedNode};
use charon_tests::{eventually, host_request, repo_root, EchoBackend, WsEchoBackend};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "rolling-test-cluster-secret-0123456789";
const TOKEN: &str = "rolling-test-token-0123456789";
const APP: &str = "app.rolling.test";
const WS: &str = "ws.rolling.test";
const HTTP_TASKS: usize = 4;
const WS_CLIENTS: usize = 200;
/// Each WebSocket client sends a message this often.
const WS_EVERY: Duration = Duration::from_millis(200);
/// Everything after the nodes and HAProxy are up (under 3 minutes in all
/// with the start-up; a run takes ~25 s of it).
const TEST_LIMIT: Duration = Duration::from_secs(170);
/// One run of the script (one node): drain (~2 s delay + 3 s deadline + 2 s
/// spread), restart, catch-up, undrain.
const SCRIPT_LIMIT: Duration = Duration::from_secs(60);

/// Counters and notable events, shared by the load tasks.
#[derive(Default)]
struct Load {
    http_sent: AtomicU64,
    http_ok: AtomicU64,
    http_failed: AtomicU64,
    /// Client connections to HAProxy found closed between two requests.
    http_reconnects: AtomicU64,
    ws_sent: AtomicU64,
    ws_echoed: AtomicU64,
    ws_close_1001: AtomicU64,
    ws_reconnects: AtomicU64,
    /// Messages sent but not echoed before a Close 1001 (the tunnel closed
    /// at a frame boundary with them in flight): allowed, and counted.
    ws_unanswered_at_close: AtomicU64,
    /// Any other end of a tunnel, a failed reconnect, a wrong echo.
    ws_abnormal: AtomicU64,
    /// Close 1001 exchanged, but the proxy closed the TCP connection more
    /// than [`CLOSE_END_SLOW`] later (see [`relay_close_race`]).
    ws_lingering_close: AtomicU64,
    other_closes: Mutex<Vec<u16>>,
    events: Mutex<Vec<String>>,
    /// What the test is doing now, to date the events.
    phase: Mutex<String>,
    started: Mutex<Option<Instant>>,
}

impl Load {
    fn event(&self, what: String) {
        let at = self
            .started
            .lock()
            .unwrap()
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or_default();
        let phase = self.phase.lock().unwrap().clone();
        let mut events = self.events.lock().unwrap();
        if events.len() < 50 {
            events.push(format!("t={at:.2}s [{phase}] {what}"));
        }
    }

    fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_owned();
    }
}

/// Back-to-back GETs on one keep-alive connection to HAProxy (a new one
/// when HAProxy closed it between two requests), until `stop`.
async fn http_loop(id: usize, lb: SocketAddr, load: Arc<Load>, stop: watch::Receiver<bool>) {
    let mut sender = None;
    let mut n = 0u64;
    while !*stop.borrow() {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match client::http1_connect::<Empty<Bytes>>(lb).await {
                Ok(s) => s,
                Err(e) => {
                    load.http_sent.fetch_add(1, Ordering::Relaxed);
                    load.http_failed.fetch_add(1, Ordering::Relaxed);
                    load.event(format!("http task {id}: connecting to HAProxy: {e:#}"));
                    // Pace the retries of a failing connect.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            // HAProxy closed the idle connection: not a request lost.
            load.http_reconnects.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        n += 1;
        let req = http::Request::builder()
            .uri(format!("/get/{id}/{n}"))
            .header("host", APP)
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        load.http_sent.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = s.send_request(req).await.context("sending")?;
            HttpResponse::read(resp).await
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no response within 10 s")));
        match outcome {
            Ok(resp) if resp.status == 200 && resp.backend_name().as_deref() == Some("app") => {
                load.http_ok.fetch_add(1, Ordering::Relaxed);
                sender = Some(s);
            }
            Ok(resp) => {
                load.http_failed.fetch_add(1, Ordering::Relaxed);
                load.event(format!(
                    "http task {id}: GET #{n} answered {} {:.200}",
                    resp.status,
                    resp.text()
                ));
                sender = Some(s);
            }
            Err(e) => {
                load.http_failed.fetch_add(1, Ordering::Relaxed);
                load.event(format!("http task {id}: GET #{n} failed: {e:#}"));
            }
        }
    }
}

/// What one WebSocket client saw.
#[derive(Debug, Default)]
struct WsReport {
    closes_1001: u64,
    reconnects: u64,
    /// The final echo (after the load stopped) came back.
    working_at_end: bool,
}

/// How a connection ended.
enum End {
    /// The load is over; the connection is still open and was checked.
    Stopped(bool),
    /// Close 1001 from the proxy: reconnect.
    GoingAway,
    /// Anything else: reconnect too, but it is counted as abnormal.
    Abnormal,
}

async fn ws_connect(lb: SocketAddr) -> Result<WsClient> {
    Ok(client::ws_connect(lb, WS, "/", &[]).await?.0)
}

/// Longer than the relay's 5 s close linger, so that a proxy that holds
/// the connection until the linger is told from one that never closes it.
const CLOSE_END_LIMIT: Duration = Duration::from_secs(10);
/// After the closing handshake the server must close TCP at once (RFC 6455
/// §7.1.1); more than this is counted as a lingering close.
const CLOSE_END_SLOW: Duration = Duration::from_secs(1);
/// Whether a lingering close fails the rolling test. Not yet: charon-node
/// has a known race that leaves ~1–2% of tunnels open until its 5 s close
/// linger (reproduced by [`relay_close_race`], ignored until it is fixed).
/// Such a tunnel still ends with a complete 1001 handshake, so the test
/// counts and prints it; set this to true (and un-ignore
/// `relay_close_race`) once the relay is fixed.
const LINGERING_CLOSES_FAIL: bool = true;

/// Reads what is left after the server's Close: tungstenite answers it;
/// the proxy must then close the connection. Returns how long that took.
async fn finish_close(ws: &mut WsClient) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match tokio::time::timeout_at(start + CLOSE_END_LIMIT, ws.next()).await {
            Err(_) => {
                bail!("the connection did not end within {CLOSE_END_LIMIT:?} after the Close")
            }
            Ok(None) | Ok(Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))) => {
                return Ok(start.elapsed())
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("after the Close: {e}"),
        }
    }
}

/// One connection's life: a message every [`WS_EVERY`], each echo checked
/// in order, until the proxy closes it or the load stops.
async fn ws_session(
    id: usize,
    ws: &mut WsClient,
    load: &Load,
    stop: &mut watch::Receiver<bool>,
    seq: &mut u64,
) -> End {
    let mut pending = std::collections::VecDeque::new();
    let first = Instant::now() + WS_EVERY.mul_f64((id % 40) as f64 / 40.0);
    let mut tick = tokio::time::interval_at(first, WS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // The load is over: one last echo on this connection.
                let text = format!("final {id}");
                let ok = async {
                    ws.send(Message::text(text.clone())).await?;
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
                            Some(Ok(Message::Text(t))) if t.as_str() == text => return anyhow::Ok(()),
                            Some(Ok(Message::Text(_))) => continue, // echoes still in flight
                            other => bail!("instead of the final echo: {other:?}"),
                        }
                    }
                }
                .await;
                if let Err(e) = &ok {
                    load.event(format!("ws client {id}: final echo: {e:#}"));
                }
                let _ = ws
                    .close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() }))
                    .await;
                return End::Stopped(ok.is_ok());
            }
            _ = tick.tick() => {
                *seq += 1;
                let text = format!("c{id} m{seq}");
                if let Err(e) = ws.send(Message::text(text.clone())).await {
                    // The server may have closed: what it sent says how.
                    load.event(format!("ws client {id}: send failed: {e}"));
                    load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                    return End::Abnormal;
                }
                load.ws_sent.fetch_add(1, Ordering::Relaxed);
                pending.push_back(text);
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if pending.front().map(String::as_str) == Some(t.as_str()) {
                        pending.pop_front();
                        load.ws_echoed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        load.event(format!(
                            "ws client {id}: echo {:?}, expected {:?}", t.as_str(), pending.front()
                        ));
                        load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                        return End::Abnormal;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                    let ended = finish_close(ws).await;
                    if code == 1001 {
                        load.ws_close_1001.fetch_add(1, Ordering::Relaxed);
                        load.ws_unanswered_at_close
                            .fetch_add(pending.len() as u64, Ordering::Relaxed);
                        match ended {
                            Ok(took) if took > CLOSE_END_SLOW => {
                                load.ws_lingering_close.fetch_add(1, Ordering::Relaxed);
                                load.event(format!(
                                    "ws client {id}: Close 1001 answered, but the proxy closed \
                                     the connection only {took:.2?} later"
                                ));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                load.event(format!("ws client {id}: Close 1001, then: {e:#}"));
                                load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        return End::GoingAway;
                    }
                    load.other_closes.lock().unwrap().push(code);
                    load.event(format!("ws client {id}: Close {code} ({frame:?})"));
                    load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                    return End::Abnormal;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    load.other_closes.lock().unwrap().push(1006);
                    load.event(format!("ws client {id}: tunnel failed without a Close (1006): {e}"));
                    load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                    return End::Abnormal;
                }
                None => {
                    load.other_closes.lock().unwrap().push(1006);
                    load.event(format!("ws client {id}: tunnel ended without a Close (1006)"));
                    load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                    return End::Abnormal;
                }
            }
        }
    }
}

/// A WebSocket client through HAProxy: reconnects after each close until
/// the load stops. `ready` is told once the first connection is up.
async fn ws_client(
    id: usize,
    lb: SocketAddr,
    load: Arc<Load>,
    mut stop: watch::Receiver<bool>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> WsReport {
    let mut report = WsReport::default();
    let mut seq = 0u64;
    let mut first = true;
    loop {
        let mut ws = match ws_connect(lb).await {
            Ok(ws) => ws,
            Err(e) => {
                load.event(format!("ws client {id}: connecting through HAProxy: {e:#}"));
                load.ws_abnormal.fetch_add(1, Ordering::Relaxed);
                if *stop.borrow() {
                    return report;
                }
                // Pace the retries of a failing connect.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if first {
            first = false;
            let _ = ready.send(()).await;
        } else {
            report.reconnects += 1;
            load.ws_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        match ws_session(id, &mut ws, &load, &mut stop, &mut seq).await {
            End::Stopped(ok) => {
                report.working_at_end = ok;
                return report;
            }
            End::GoingAway => report.closes_1001 += 1,
            End::Abnormal => {}
        }
        if *stop.borrow() {
            return report;
        }
    }
}

fn node_args(me: &str, all: &[(&str, NodeAddrs)]) -> Vec<String> {
    let seeds: Vec<String> = all
        .iter()
        .filter(|(name, _)| *name != me)
        .map(|(_, a)| a.gossip.to_string())
        .collect();
    [
        "--seeds",
        &seeds.join(","),
        "--anti-entropy-secs",
        "1",
        // HAProxy must see /readyz 503 (2 checks, 200 ms apart) before the
        // listeners close.
        "--drain-delay-secs",
        "2",
        "--drain-deadline-secs",
        "3",
        "--drain-spread-secs",
        "2",
        "--shutdown-grace-secs",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `deploy/rolling-restart.sh` for one node through another node's API.
async fn rolling_restart(
    node: &str,
    endpoint: &str,
    token_file: &Path,
    run_dir: &Path,
) -> Result<String> {
    let script = repo_root().join("deploy/rolling-restart.sh");
    let restart = format!("kill -TERM \"$(cat '{}/{{node}}.pid')\"", run_dir.display());
    let mut cmd = Command::new("bash");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CHARON_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg(&script)
        .args(["--endpoint", endpoint])
        .arg("--token-file")
        .arg(token_file)
        .args(["--deadline", "3s", "--spread", "2s", "--timeout", "50s"])
        .args(["--restart-cmd", &restart, node])
        .env("CHARONCTL", binary("charonctl")?)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SCRIPT_LIMIT, cmd.output())
        .await
        .with_context(|| format!("rolling-restart.sh {node} still running after {SCRIPT_LIMIT:?}"))?
        .context("running rolling-restart.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!(
        "--- rolling-restart.sh {node} (via {endpoint}): {}",
        out.status
    );
    print!("{stderr}{stdout}");
    ensure!(
        out.status.success(),
        "rolling-restart.sh {node} failed with {}:\n{stderr}{stdout}",
        out.status
    );
    ensure!(
        stdout.contains(&format!("{node}: restarted in")),
        "no summary line for {node}: {stdout}"
    );
    Ok(stdout)
}

/// Waits until `node`'s own HTTP listener routes both hosts.
async fn wait_serves(node: &SupervisedNode) -> Result<()> {
    eventually(Duration::from_secs(20), || async {
        let resp = client::get(node.addrs.http, APP, "/probe").await?;
        ensure!(
            resp.status == 200 && resp.backend_name().as_deref() == Some("app"),
            "{} answered {} for {APP}",
            node.name,
            resp.status
        );
        let mut ws = ws_connect(node.addrs.http).await?;
        ws.send(Message::text("whoami?")).await?;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.as_str() == "ws" => Ok(()),
            other => bail!("{}: {WS} answered {other:?}", node.name),
        }
    })
    .await
    .with_context(|| format!("{} never served both hosts", node.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_request_and_every_tunnel_gets_1001() -> Result<()> {
    let Some(haproxy) = find_haproxy() else {
        eprintln!(
            "SKIPPED: haproxy not installed (scripts/setup-test-env.sh installs it with \
             apt-get where apt is available; or set HAPROXY_BIN): \
             rolling_restart_under_load was not run"
        );
        return Ok(());
    };
    // Refuse stale binaries before starting anything.
    binary("charon-node")?;
    binary("charonctl")?;
    let run_dir = tempfile::Builder::new()
        .prefix("charon-rolling-")
        .tempdir()?;
    let token_file = run_dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;

    let names = ["n1", "n2", "n3"];
    let mut plan = Vec::new();
    for name in names {
        plan.push((name, NodeAddrs::pick()?));
    }
    let mut nodes = Vec::new();
    for (name, addrs) in &plan {
        let args = node_args(name, &plan);
        nodes.push(
            SupervisedNode::start(
                name,
                *addrs,
                run_dir.path(),
                TOKEN,
                &args,
                &[("CHARON_CLUSTER_SECRET", SECRET)],
            )
            .await?,
        );
    }
    let servers: Vec<HaproxyServer> = nodes
        .iter()
        .map(|n| HaproxyServer {
            name: n.name.clone(),
            addr: n.addrs.http,
            check_port: n.addrs.admin.port(),
        })
        .collect();
    let lb = Haproxy::start(&haproxy, &servers).await?;

    let outcome = tokio::time::timeout(TEST_LIMIT, run(&nodes, &lb, &token_file, run_dir.path()))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the test took more than {TEST_LIMIT:?}")));
    // What each node says about its drains (how long, what was cut).
    for n in &nodes {
        for line in n.log().lines().filter(|l| l.contains("drained took_ms")) {
            let at = line.find("drained").unwrap_or(0);
            println!("{}: {}", n.name, &line[at..]);
        }
    }
    let keep_logs = std::env::var_os("ROLLING_KEEP_LOGS").is_some_and(|v| v == "1");
    if outcome.is_err() {
        for n in &nodes {
            eprintln!(
                "===== log of {} (last 6000 bytes)\n{}",
                n.name,
                n.log_tail(6000)
            );
        }
        eprintln!("===== HAProxy log\n{}", lb.log());
    }
    if outcome.is_err() || keep_logs {
        // Everything, kept for a closer look (ROLLING_KEEP_LOGS=1: always).
        let keep = std::env::temp_dir().join(format!("charon-rolling-{}", std::process::id()));
        std::fs::create_dir_all(&keep)?;
        for n in &nodes {
            std::fs::write(keep.join(format!("{}.log", n.name)), n.log())?;
        }
        std::fs::write(keep.join("haproxy.log"), lb.log())?;
        std::fs::write(keep.join("haproxy.cfg"), &lb.config)?;
        eprintln!("===== all logs kept in {}", keep.display());
    }
    outcome
}

async fn run(
    nodes: &[SupervisedNode],
    lb: &Haproxy,
    token_file: &Path,
    run_dir: &Path,
) -> Result<()> {
    let test_start = Instant::now();
    // The cluster, the backends and the two hosts, added on node 1.
    eventually(Duration::from_secs(20), || async {
        for n in nodes {
            let out = Command::new(binary("charonctl")?)
                .args(["--endpoint", &n.endpoint(), "--token", TOKEN])
                .args(["cluster", "status"])
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                text.starts_with("converged") && text.contains("3 of 3 members live"),
                "{}: {}",
                n.name,
                text.lines().next().unwrap_or("")
            );
        }
        Ok(())
    })
    .await
    .context("the cluster did not form")?;
    let app = EchoBackend::start("app").await?;
    let ws_backend = WsEchoBackend::start("ws").await?;
    let mut hosts = BTreeSet::new();
    for (domain, upstream) in [(APP, app.url()), (WS, ws_backend.url())] {
        let h = nodes[0]
            .create_host(host_request(&[domain], &[upstream]))
            .await?;
        hosts.insert(h.id);
    }
    for n in nodes {
        wait_serves(n).await?;
    }
    lb.wait_all_up(Duration::from_secs(20))
        .await
        .context("HAProxy never saw all three nodes up")?;

    // The load.
    let load = Arc::new(Load::default());
    *load.started.lock().unwrap() = Some(Instant::now());
    load.set_phase("load starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http_tasks = Vec::new();
    for id in 0..HTTP_TASKS {
        http_tasks.push(tokio::spawn(http_loop(
            id,
            lb.addr,
            load.clone(),
            stop_rx.clone(),
        )));
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(WS_CLIENTS);
    let mut ws_tasks = Vec::new();
    for id in 0..WS_CLIENTS {
        ws_tasks.push(tokio::spawn(ws_client(
            id,
            lb.addr,
            load.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut connected = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while connected < WS_CLIENTS && ready_rx.recv().await.is_some() {
            connected += 1;
        }
    })
    .await
    .with_context(|| format!("only {connected} of {WS_CLIENTS} WebSocket clients connected"))?;
    ensure!(
        connected == WS_CLIENTS,
        "only {connected} WebSocket clients connected"
    );
    // Every tunnel carries messages before the restarts begin.
    let warm = load.ws_echoed.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), || async {
        let echoed = load.ws_echoed.load(Ordering::Relaxed);
        ensure!(echoed >= warm + 2 * WS_CLIENTS as u64, "{echoed} echoes");
        Ok(())
    })
    .await?;

    // The rolling restart: each node through another node's API, while
    // hosts are written through that other node.
    let restarts_start = Instant::now();
    let rounds = [(0usize, 1usize), (1, 2), (2, 0)];
    let mut summaries = Vec::new();
    for (round, (target, via)) in rounds.into_iter().enumerate() {
        let (target, via) = (&nodes[target], &nodes[via]);
        load.set_phase(&format!("restarting {}", target.name));
        let starts_before = target.starts();
        let pid_before = target.pid();
        let (done_tx, mut done_rx) = watch::channel(false);
        let writer = {
            let upstream = app.url();
            async move {
                let mut ids = Vec::new();
                for i in 0.. {
                    let domain = format!("w{round}-{i}.rolling.test");
                    let h = tokio::time::timeout(
                        Duration::from_secs(10),
                        via.create_host(host_request(&[&domain], std::slice::from_ref(&upstream))),
                    )
                    .await
                    .with_context(|| format!("CreateHost {domain} on {} hung", via.name))??;
                    ids.push(h.id);
                    // Space the writes over the restart (not a wait for a
                    // condition: the writes are what is being spread).
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(700)) => {}
                        _ = done_rx.changed() => break,
                    }
                }
                anyhow::Ok(ids)
            }
        };
        let script = async {
            let out = rolling_restart(&target.name, &via.endpoint(), token_file, run_dir).await;
            let _ = done_tx.send(true);
            out
        };
        let (out, written) = tokio::join!(script, writer);
        let out = out?;
        let written = written?;
        ensure!(!written.is_empty(), "no host written during round {round}");
        hosts.extend(written);
        summaries.push(out.lines().next().unwrap_or_default().to_owned());
        ensure!(
            target.starts() == starts_before + 1 && target.pid() != pid_before,
            "{} was not restarted exactly once by its supervisor (starts {} -> {}, pid {:?} -> {:?})",
            target.name,
            starts_before,
            target.starts(),
            pid_before,
            target.pid()
        );
    }
    let restarts_took = restarts_start.elapsed();
    load.set_phase("after the restarts");
    lb.wait_all_up(Duration::from_secs(10))
        .await
        .context("HAProxy does not see all three nodes up after the restarts")?;
    // A little load on the restarted cluster before stopping.
    let echoed = load.ws_echoed.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), || async {
        let now = load.ws_echoed.load(Ordering::Relaxed);
        ensure!(now >= echoed + WS_CLIENTS as u64, "{now} echoes");
        Ok(())
    })
    .await?;

    // Stop the load and collect.
    load.set_phase("stopping");
    stop_tx.send(true)?;
    for t in http_tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .context("an HTTP task did not stop")??;
    }
    let mut reports = Vec::new();
    for t in ws_tasks {
        reports.push(
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .context("a WebSocket client did not stop")??,
        );
    }

    // Every host on every node.
    for n in nodes {
        eventually(Duration::from_secs(20), || async {
            let have: BTreeSet<String> = n.host_ids().await?.into_iter().collect();
            ensure!(
                have == hosts,
                "{} lists {} hosts, want {} (missing {:?}, unexpected {:?})",
                n.name,
                have.len(),
                hosts.len(),
                hosts.difference(&have).collect::<Vec<_>>(),
                have.difference(&hosts).collect::<Vec<_>>()
            );
            Ok(())
        })
        .await?;
    }

    // The numbers.
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let closed_clients = reports.iter().filter(|r| r.closes_1001 > 0).count();
    let working = reports.iter().filter(|r| r.working_at_end).count();
    let other_closes = load.other_closes.lock().unwrap().clone();
    let events = load.events.lock().unwrap().clone();
    println!("===== rolling restart under load");
    for s in &summaries {
        println!("script: {s}");
    }
    println!(
        "HTTP: {} requests sent, {} ok, {} failed ({} client reconnects to HAProxy)",
        n(&load.http_sent),
        n(&load.http_ok),
        n(&load.http_failed),
        n(&load.http_reconnects)
    );
    println!(
        "WebSocket: {WS_CLIENTS} clients, {} messages sent, {} echoed, {} unanswered when a Close 1001 came",
        n(&load.ws_sent),
        n(&load.ws_echoed),
        n(&load.ws_unanswered_at_close)
    );
    println!(
        "WebSocket closes: 1001 x {}, other codes {:?}; {} reconnects; {} clients closed at least once; \
         {} abnormal; {} closed by the proxy > {CLOSE_END_SLOW:?} after the handshake; \
         {working}/{WS_CLIENTS} working at the end",
        n(&load.ws_close_1001),
        other_closes,
        n(&load.ws_reconnects),
        closed_clients,
        n(&load.ws_abnormal),
        n(&load.ws_lingering_close)
    );
    let mut counters = Vec::new();
    for name in ["wretr", "wredis", "econ", "eresp", "hrsp_5xx"] {
        counters.push(format!("{name} {}", lb.backend_counter(name).await?));
    }
    println!("HAProxy backend counters: {}", counters.join(", "));
    println!(
        "time: restarts {:.1}s, whole test {:.1}s",
        restarts_took.as_secs_f64(),
        test_start.elapsed().as_secs_f64()
    );
    for e in &events {
        println!("event: {e}");
    }

    ensure!(
        n(&load.http_failed) == 0,
        "{} of {} HTTP requests failed during the rolling restart; first events:\n{}",
        n(&load.http_failed),
        n(&load.http_sent),
        events.join("\n")
    );
    ensure!(n(&load.http_ok) > 0, "no HTTP request went through");
    ensure!(
        other_closes.is_empty() && n(&load.ws_abnormal) == 0,
        "WebSocket tunnels ended other than with Close 1001: codes {other_closes:?}, \
         {} abnormal; first events:\n{}",
        n(&load.ws_abnormal),
        events.join("\n")
    );
    if n(&load.ws_lingering_close) > 0 && !LINGERING_CLOSES_FAIL {
        println!(
            "KNOWN NODE BUG (relay close race, see `relay_close_race`): {} tunnels were closed by \
             charon-node only at its 5 s close linger after the 1001 handshake; not failing the \
             test for it (LINGERING_CLOSES_FAIL = false)",
            n(&load.ws_lingering_close)
        );
    }
    ensure!(
        n(&load.ws_lingering_close) == 0 || !LINGERING_CLOSES_FAIL,
        "NODE BUG (relay close race, see `relay_close_race` in this file): {} tunnels got \
         Close 1001, the client answered with its Close, and charon-node kept the TCP connection \
         open until its 5 s close linger instead of closing it at once (RFC 6455 §7.1.1); \
         the drains took 5 s longer. First events:\n{}",
        n(&load.ws_lingering_close),
        events.join("\n")
    );
    ensure!(
        working == WS_CLIENTS,
        "{} WebSocket clients were not working at the end",
        WS_CLIENTS - working
    );
    for (id, r) in reports.iter().enumerate() {
        ensure!(
            r.closes_1001 >= 1,
            "client {id} was never closed, though every node was restarted"
        );
        ensure!(
            r.reconnects == r.closes_1001,
            "client {id}: {} closes with 1001 but {} reconnects",
            r.closes_1001,
            r.reconnects
        );
    }
    ensure!(
        n(&load.ws_close_1001) == n(&load.ws_reconnects),
        "1001 closes and reconnects differ"
    );
    Ok(())
}

/// The close race behind the lingering closes, on one node without HAProxy:
/// 200 raw WebSocket clients answer the drain's Close 1001 with Close 1000,
/// and measure how long the proxy then takes to close TCP.
///
/// What charon-node does (relay.rs, `pump`): the client→upstream and
/// upstream→client pumps each act on the close request on their own. When
/// the client's Close (its answer to the proxy's Close, sent the other way)
/// is read before the client→upstream pump has acted on the request, that
/// pump takes it for a close started by the client: it forwards it to the
/// upstream as is (so the upstream sees 1000, not the proxy's 1001) and
/// waits for the client to close TCP, while the client — having sent and
/// received a Close — rightly waits for the server to close first (RFC 6455
/// §7.1.1). The other pump has already ended without shutting its side, so
/// nothing moves until the relay's 5 s `CLOSE_LINGER`. Observed: 3–5 of 200
/// tunnels per drain, each closed 5.00 s after the handshake, exactly as
/// many as the 1000s the backend received; the drain took ~8 s instead of
/// ~3 s (deadline 2 s + spread 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_close_race() -> Result<()> {
    use charon_proto::v1::DrainRequest;
    use charon_tests::client::{opcode, RawWs};
    use charon_tests::TestNode;

    let node = TestNode::builder().name("me").start().await?;
    let backend = WsEchoBackend::start("ws").await?;
    node.add_host(&["race.rolling.test"], &[backend.url()])
        .await?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(WS_CLIENTS);
    let mut clients = Vec::new();
    for id in 0..WS_CLIENTS {
        let http = node.http;
        let ready = ready_tx.clone();
        clients.push(tokio::spawn(async move {
            let (head, _) = client::ws_upgrade_head("race.rolling.test", "/", &[]);
            let mut ws = RawWs::handshake(http, &head).await?;
            ensure!(ws.status() == Some(101), "handshake: {}", ws.head);
            let _ = ready.send(()).await;
            let mut next = Instant::now() + WS_EVERY.mul_f64((id % 40) as f64 / 40.0);
            // Messages every WS_EVERY until the proxy's Close.
            let code = loop {
                match tokio::time::timeout_at(next, ws.read_frame()).await {
                    Err(_) => {
                        ws.send_frame(true, opcode::TEXT, format!("c{id}").as_bytes())
                            .await?;
                        next += WS_EVERY;
                    }
                    Ok(frame) => {
                        let frame = frame?;
                        if frame.opcode == opcode::CLOSE {
                            break frame.close_code();
                        }
                    }
                }
            };
            let answered = Instant::now();
            ws.send_frame(true, opcode::CLOSE, &1000u16.to_be_bytes())
                .await?;
            // Until the proxy closes the connection (read fails at EOF).
            loop {
                match tokio::time::timeout_at(answered + CLOSE_END_LIMIT, ws.read_frame()).await {
                    Err(_) => return Ok((code, None)),
                    Ok(Err(_)) => return Ok((code, Some(answered.elapsed()))),
                    Ok(Ok(_)) => continue,
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..WS_CLIENTS {
        ready_rx.recv().await.context("a client did not connect")?;
    }
    // Charon answers 101 only once the upstream answered 101; the backend
    // counts a tunnel a moment after it answered (seen: 199 of 200 at the
    // instant the last client got its 101), so wait for the count.
    eventually(Duration::from_secs(5), || async {
        ensure!(
            backend.accepted() == WS_CLIENTS,
            "{} tunnels reached the backend",
            backend.accepted()
        );
        Ok(())
    })
    .await?;
    node.nodes_client()
        .await?
        .drain(DrainRequest {
            node: "me".into(),
            deadline_secs: 2,
            spread_secs: 1,
        })
        .await?;
    let mut lingering = Vec::new();
    for (id, c) in clients.into_iter().enumerate() {
        let (code, took) = c.await??;
        ensure!(code == Some(1001), "client {id}: Close {code:?}");
        match took {
            Some(took) if took <= CLOSE_END_SLOW => {}
            other => lingering.push((id, other)),
        }
    }
    let codes = eventually(Duration::from_secs(10), || async {
        let codes = backend.close_codes();
        ensure!(codes.len() == WS_CLIENTS, "{} closes so far", codes.len());
        Ok(codes)
    })
    .await?;
    let passed_through = codes.iter().filter(|c| **c != 1001).count();
    println!(
        "relay close race: {} of {WS_CLIENTS} tunnels closed late after the handshake {lingering:?}; \
         the upstream got a client's Close instead of the proxy's 1001 on {passed_through}",
        lingering.len()
    );
    ensure!(
        lingering.is_empty() && passed_through == 0,
        "NODE BUG: on {} tunnels the proxy did not close the connection within {CLOSE_END_SLOW:?} \
         after the closing handshake (times: {lingering:?}), and {passed_through} upstreams got \
         the client's Close 1000 instead of the proxy's Close 1001",
        lingering.len()
    );
    Ok(())
}
