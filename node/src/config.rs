//! Node configuration: command-line flags, `CHARON_*` environment variables
//! and an optional TOML file, in that order of precedence.
//!
//! Everything is parsed and validated here, before any port is bound or any
//! file is opened, so a typo fails fast with a message naming the setting
//! (and `main` exits 64, EX_USAGE).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::acme::settings::{AcmeSettings, Raw as AcmeRaw};
use crate::proxy::forwarded::Cidr;
use crate::proxy::ProxyConfig;

#[derive(Debug, Parser, Default)]
#[command(
    name = "charon-node",
    version,
    about = "A Charon node: HTTP/WebSocket reverse proxy with a replicated config store"
)]
pub struct Args {
    /// TOML file with any of the settings below (snake_case keys). Flags and
    /// env variables override it.
    #[arg(long, env = "CHARON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the store (charon.redb) and admin.token live [default: ./charon-data]
    #[arg(long, env = "CHARON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Plain HTTP (and ws://) listener [default: 0.0.0.0:8080]
    #[arg(long, env = "CHARON_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// HTTPS (and wss://) listener; certificates come from the store [default: 0.0.0.0:8443]
    #[arg(long, env = "CHARON_HTTPS_LISTEN")]
    pub https_listen: Option<String>,
    /// gRPC management API [default: 127.0.0.1:7070]
    #[arg(long, env = "CHARON_API_LISTEN")]
    pub api_listen: Option<String>,
    /// /healthz and /readyz [default: 127.0.0.1:9090]
    #[arg(long, env = "CHARON_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Peer address or CIDR whose X-Forwarded-* headers are trusted; repeat
    /// the flag or separate with commas [default: none]
    #[arg(
        long = "trusted-proxy",
        env = "CHARON_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Time an upstream has to send response headers, in ms [default: 60000]
    #[arg(long, env = "CHARON_UPSTREAM_TIMEOUT_MS")]
    pub upstream_timeout_ms: Option<u64>,
    /// Time a client has for a whole request head, in ms, counted from
    /// the connection's start or its previous response (a total deadline,
    /// not per read: a slow drip is cut with 408) [default: 30000]
    #[arg(long, env = "CHARON_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// WebSockets over HTTP/2 (RFC 8441): advertise extended CONNECT to h2
    /// clients (TLS and h2c) and tunnel `:protocol = websocket` streams;
    /// `false` leaves browsers on one HTTP/1.1 connection per socket
    /// [default: true]
    #[arg(long, env = "CHARON_H2_WEBSOCKETS")]
    pub h2_websockets: Option<bool>,
    /// Open connections one client (IPv4 address, IPv6 /64) may hold,
    /// WebSocket tunnels included; over it, 429 and close. Trusted proxies
    /// are exempt [default: 0 = no cap]
    #[arg(long, env = "CHARON_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<u32>,
    /// Open client connections in all (tunnels included); at the cap the
    /// node stops accepting until some close [default: 0 = no cap]
    #[arg(long, env = "CHARON_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time to connect to an upstream, in ms [default: 5000]
    #[arg(long, env = "CHARON_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// How long an upstream that refused or timed out is skipped, in s [default: 10]
    #[arg(long, env = "CHARON_FAILURE_COOLDOWN_SECS")]
    pub failure_cooldown_secs: Option<u64>,
    /// On SIGTERM, how long open requests get to finish, in s [default: 30]
    #[arg(long, env = "CHARON_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Drain (and SIGTERM): seconds between /readyz turning 503 and the
    /// listeners closing, so load balancers notice first [default: 5]
    #[arg(long, env = "CHARON_DRAIN_DELAY_SECS")]
    pub drain_delay_secs: Option<u64>,
    /// Drain (and SIGTERM) default: seconds until open WebSocket tunnels get
    /// Close 1001 [default: 30]
    #[arg(long, env = "CHARON_DRAIN_DEADLINE_SECS")]
    pub drain_deadline_secs: Option<u64>,
    /// Drain default: tunnel closes are spread over this many seconds after
    /// the deadline, so clients do not all reconnect at once [default: 5]
    #[arg(long, env = "CHARON_DRAIN_SPREAD_SECS")]
    pub drain_spread_secs: Option<u64>,
    /// Access log (one JSON line per request and per closed tunnel): stdout,
    /// off, or a file path (rotated by size) [default: stdout]
    #[arg(long, env = "CHARON_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Rotate the access-log file at this size, in MiB (5 old files kept) [default: 100]
    #[arg(long, env = "CHARON_ACCESS_LOG_MAX_MB")]
    pub access_log_max_mb: Option<u64>,
    /// OTLP/gRPC collector for traces (e.g. http://127.0.0.1:4317); also
    /// read from OTEL_EXPORTER_OTLP_ENDPOINT [default: no tracing]
    #[arg(long, env = "CHARON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log filter (tracing env-filter syntax) [default: info]
    #[arg(long, env = "CHARON_LOG")]
    pub log: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "CHARON_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Gossip (UDP) listener; port 0 picks a free port [default: 127.0.0.1:7946]
    #[arg(long, env = "CHARON_GOSSIP_LISTEN")]
    pub gossip_listen: Option<String>,
    /// host:port peers send gossip to (resolved at start) [default: the gossip listener]
    #[arg(long, env = "CHARON_GOSSIP_ADVERTISE")]
    pub gossip_advertise: Option<String>,
    /// host:port peers and clients reach this node's gRPC API on [default: the API listener]
    #[arg(long, env = "CHARON_API_ADVERTISE")]
    pub api_advertise: Option<String>,
    /// Gossip addresses (host:port, DNS names re-resolved) of nodes to join;
    /// repeat or separate with commas [default: none: a cluster of one until others join]
    #[arg(long = "seeds", env = "CHARON_SEEDS", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Nodes of another cluster id are ignored [default: charon]
    #[arg(long, env = "CHARON_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Shared secret every member must hold (prefer the env variable or
    /// --cluster-secret-file: flags show in `ps`)
    #[arg(long, env = "CHARON_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret
    #[arg(long, env = "CHARON_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// This node's name in `charonctl cluster members` [default: the host name]
    #[arg(long, env = "CHARON_NODE_NAME")]
    pub node_name: Option<String>,
    /// Region of this node; sync prefers peers of the same region [default: default]
    #[arg(long, env = "CHARON_REGION")]
    pub region: Option<String>,
    /// Zone within the region [default: none]
    #[arg(long, env = "CHARON_ZONE")]
    pub zone: Option<String>,
    /// Gossip round interval, in ms [default: 200]
    #[arg(long, env = "CHARON_GOSSIP_INTERVAL_MS")]
    pub gossip_interval_ms: Option<u64>,
    /// Failure detector phi threshold; raise it (e.g. 12) for WAN links [default: 8]
    #[arg(long, env = "CHARON_PHI_THRESHOLD")]
    pub phi_threshold: Option<f64>,
    /// Heartbeat gaps longer than this are not sampled, in ms [default: 10000]
    #[arg(long, env = "CHARON_MAX_HEARTBEAT_INTERVAL_MS")]
    pub max_heartbeat_interval_ms: Option<u64>,
    /// How long a dead member is remembered, in s [default: 3600]
    #[arg(long, env = "CHARON_DEAD_NODE_GRACE_SECS")]
    pub dead_node_grace_secs: Option<u64>,
    /// State-hash comparison with a random peer every this many s [default: 10]
    #[arg(long, env = "CHARON_ANTI_ENTROPY_SECS")]
    pub anti_entropy_secs: Option<u64>,
    /// At start, how long to wait for the seeds (and remembered peers) and
    /// catch up before serving anyway; writes are refused meanwhile, in s [default: 10]
    #[arg(long, env = "CHARON_CATCH_UP_TIMEOUT_SECS")]
    pub catch_up_timeout_secs: Option<u64>,
    /// Deletions are remembered (as tombstones) at least this long, in s [default: 86400]
    #[arg(long, env = "CHARON_TOMBSTONE_GRACE_SECS")]
    pub tombstone_grace_secs: Option<u64>,
    /// ACME directory for automatic certificates: an https:// URL or
    /// letsencrypt, letsencrypt-staging, zerossl [default: off]
    #[arg(long, env = "CHARON_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// Contact e-mail for the ACME account [default: none]
    #[arg(long, env = "CHARON_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// PEM file with extra roots trusted when talking to the ACME directory
    /// (a test CA) [default: the system's]
    #[arg(long, env = "CHARON_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,
    /// External account binding key id (ZeroSSL, some commercial CAs)
    #[arg(long, env = "CHARON_ACME_EAB_KID")]
    pub acme_eab_kid: Option<String>,
    /// External account binding HMAC key, base64url as the CA gives it
    #[arg(long, env = "CHARON_ACME_EAB_HMAC", hide_env_values = true)]
    pub acme_eab_hmac: Option<String>,
    /// Challenge types to use, in order of preference [default: http-01,tls-alpn-01]
    #[arg(long, env = "CHARON_ACME_CHALLENGES", value_delimiter = ',')]
    pub acme_challenges: Vec<String>,
    /// Renew certificates this many seconds after issue instead of at two
    /// thirds of their lifetime [default: 2/3 of the lifetime, with jitter]
    #[arg(long, env = "CHARON_ACME_RENEW_AFTER_SECS")]
    pub acme_renew_after_secs: Option<u64>,
    /// A node's claim on an order expires this long after its last refresh:
    /// the takeover time when the node dies [default: 45]
    #[arg(long, env = "CHARON_ACME_LEASE_SECS")]
    pub acme_lease_secs: Option<u64>,
    /// First retry delay after a failed order, doubled per failure up to a
    /// day, never shorter than the CA's Retry-After [default: 60]
    #[arg(long, env = "CHARON_ACME_RETRY_MIN_SECS")]
    pub acme_retry_min_secs: Option<u64>,
    /// How often a node checks what to order or renew, in ms [default: 2000]
    #[arg(long, env = "CHARON_ACME_TICK_MS")]
    pub acme_tick_ms: Option<u64>,
}

/// The TOML file: the same settings as the flags.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    http_listen: Option<String>,
    https_listen: Option<String>,
    api_listen: Option<String>,
    admin_listen: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    upstream_timeout_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    h2_websockets: Option<bool>,
    max_conns_per_ip: Option<u32>,
    max_connections: Option<usize>,
    connect_timeout_ms: Option<u64>,
    failure_cooldown_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    drain_delay_secs: Option<u64>,
    drain_deadline_secs: Option<u64>,
    drain_spread_secs: Option<u64>,
    access_log: Option<String>,
    access_log_max_mb: Option<u64>,
    otlp_endpoint: Option<String>,
    log: Option<String>,
    log_format: Option<String>,
    gossip_listen: Option<String>,
    gossip_advertise: Option<String>,
    api_advertise: Option<String>,
    seeds: Option<Vec<String>>,
    cluster_id: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    node_name: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    gossip_interval_ms: Option<u64>,
    phi_threshold: Option<f64>,
    max_heartbeat_interval_ms: Option<u64>,
    dead_node_grace_secs: Option<u64>,
    anti_entropy_secs: Option<u64>,
    catch_up_timeout_secs: Option<u64>,
    tombstone_grace_secs: Option<u64>,
    acme_directory: Option<String>,
    acme_email: Option<String>,
    acme_ca_file: Option<PathBuf>,
    acme_eab_kid: Option<String>,
    acme_eab_hmac: Option<String>,
    acme_challenges: Option<Vec<String>>,
    acme_renew_after_secs: Option<u64>,
    acme_lease_secs: Option<u64>,
    acme_retry_min_secs: Option<u64>,
    acme_tick_ms: Option<u64>,
}

/// Defaults of a drain (SIGTERM uses them; `charonctl node drain` may
/// override deadline and spread).
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    pub delay: Duration,
    pub deadline: Duration,
    pub spread: Duration,
}

/// Cluster settings; addresses that may be host names are resolved when the
/// node starts.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster_id: String,
    pub node_name: String,
    pub region: String,
    pub zone: String,
    pub gossip_listen: SocketAddr,
    pub gossip_advertise: Option<String>,
    pub api_advertise: Option<String>,
    pub seeds: Vec<String>,
    pub secret: Option<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub max_heartbeat_interval: Duration,
    pub dead_node_grace: Duration,
    pub anti_entropy_interval: Duration,
    pub tombstone_grace: Duration,
    /// How long a starting node may wait for its seeds and pull what it
    /// missed before it says ready.
    pub catch_up_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub https_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub proxy: ProxyConfig,
    /// After a drain's deadline and spread, how long closing handshakes and
    /// in-flight requests get before the rest is cut.
    pub shutdown_grace: Duration,
    pub drain: DrainSettings,
    pub access_log: crate::telemetry::Sink,
    pub otlp_endpoint: Option<String>,
    pub log: String,
    pub log_format: LogFormat,
    /// From `CHARON_ADMIN_TOKEN` only (never a flag: flags show up in `ps`).
    pub admin_token: Option<String>,
    /// From `CHARON_ENCRYPTION_KEY` only (64 hex characters): the data key
    /// that seals private keys at rest; else `<data-dir>/encryption.key`.
    pub encryption_key: Option<String>,
    pub cluster: ClusterSettings,
    /// Automatic certificates; `None` = off.
    pub acme: Option<AcmeSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

fn parse_addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            setting,
            format!("{value:?} is not an IP:port address (e.g. 127.0.0.1:8080)"),
        )
    })
}

fn millis(setting: &'static str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(invalid(setting, "must be greater than 0"));
    }
    Ok(Duration::from_millis(v))
}

impl Config {
    pub fn from_args(mut args: Args) -> Result<Config, ConfigError> {
        let mut file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let cluster = cluster_settings(&mut args, &mut file)?;
        let acme = acme_settings(&mut args, &mut file)?;
        let http = args
            .http_listen
            .or(file.http_listen)
            .unwrap_or_else(|| "0.0.0.0:8080".into());
        let https = args
            .https_listen
            .or(file.https_listen)
            .unwrap_or_else(|| "0.0.0.0:8443".into());
        let api = args
            .api_listen
            .or(file.api_listen)
            .unwrap_or_else(|| "127.0.0.1:7070".into());
        let admin = args
            .admin_listen
            .or(file.admin_listen)
            .unwrap_or_else(|| "127.0.0.1:9090".into());
        let trusted = if args.trusted_proxies.is_empty() {
            file.trusted_proxies.unwrap_or_default()
        } else {
            args.trusted_proxies
        };
        let trusted_proxies = trusted
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<Cidr>()
                    .map_err(|e| invalid("trusted_proxies", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let defaults = ProxyConfig::default();
        let proxy = ProxyConfig {
            trusted_proxies,
            upstream_timeout: match args.upstream_timeout_ms.or(file.upstream_timeout_ms) {
                Some(v) => millis("upstream_timeout_ms", v)?,
                None => defaults.upstream_timeout,
            },
            connect_timeout: match args.connect_timeout_ms.or(file.connect_timeout_ms) {
                Some(v) => millis("connect_timeout_ms", v)?,
                None => defaults.connect_timeout,
            },
            failure_cooldown: args
                .failure_cooldown_secs
                .or(file.failure_cooldown_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.failure_cooldown),
            header_read_timeout: match args.header_read_timeout_ms.or(file.header_read_timeout_ms) {
                Some(v) => millis("header_read_timeout_ms", v)?,
                None => defaults.header_read_timeout,
            },
            https_port: defaults.https_port,
            h2_websockets: args
                .h2_websockets
                .or(file.h2_websockets)
                .unwrap_or(defaults.h2_websockets),
            limits: crate::proxy::limits::LimitConfig {
                max_conns_per_ip: args.max_conns_per_ip.or(file.max_conns_per_ip).unwrap_or(0),
                max_connections: args.max_connections.or(file.max_connections).unwrap_or(0),
            },
        };
        let log_format = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} must be text or json"),
                ))
            }
        };
        let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log).map_err(|e| invalid("log", e.to_string()))?;
        let admin_token = std::env::var("CHARON_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        if let Some(t) = &admin_token {
            if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "CHARON_ADMIN_TOKEN",
                    "must be at least 16 characters without spaces",
                ));
            }
        }
        let encryption_key = std::env::var("CHARON_ENCRYPTION_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if let Some(k) = &encryption_key {
            if hex::decode(k.trim()).map(|b| b.len()).ok() != Some(32) {
                return Err(invalid(
                    "CHARON_ENCRYPTION_KEY",
                    "must be 64 hex characters (32 bytes)",
                ));
            }
        }
        let config = Config {
            cluster,
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("charon-data")),
            http_listen: parse_addr("http_listen", &http)?,
            https_listen: parse_addr("https_listen", &https)?,
            api_listen: parse_addr("api_listen", &api)?,
            admin_listen: parse_addr("admin_listen", &admin)?,
            proxy,
            shutdown_grace: Duration::from_secs(
                args.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(30),
            ),
            drain: DrainSettings {
                delay: Duration::from_secs(
                    args.drain_delay_secs.or(file.drain_delay_secs).unwrap_or(5),
                ),
                deadline: Duration::from_secs(
                    args.drain_deadline_secs
                        .or(file.drain_deadline_secs)
                        .unwrap_or(30),
                ),
                spread: Duration::from_secs(
                    args.drain_spread_secs
                        .or(file.drain_spread_secs)
                        .unwrap_or(5),
                ),
            },
            access_log: crate::telemetry::Sink::parse(
                args.access_log
                    .or(file.access_log)
                    .as_deref()
                    .unwrap_or("stdout"),
                args.access_log_max_mb
                    .or(file.access_log_max_mb)
                    .unwrap_or(100),
            ),
            otlp_endpoint: args
                .otlp_endpoint
                .or(file.otlp_endpoint)
                .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
                .filter(|e| !e.trim().is_empty()),
            log,
            log_format,
            admin_token,
            encryption_key,
            acme,
        };
        config.check_distinct_ports()?;
        Ok(config)
    }

    /// Two listeners on one fixed port would fail at bind time, after the
    /// others were bound; say it up front.
    fn check_distinct_ports(&self) -> Result<(), ConfigError> {
        let named = [
            ("http_listen", self.http_listen),
            ("https_listen", self.https_listen),
            ("api_listen", self.api_listen),
            ("admin_listen", self.admin_listen),
        ];
        for (i, (a, x)) in named.iter().enumerate() {
            for (b, y) in &named[i + 1..] {
                if x.port() != 0
                    && x.port() == y.port()
                    && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
                {
                    return Err(invalid(a, format!("{x} collides with {b} ({y})")));
                }
            }
        }
        Ok(())
    }
}

/// The machine's host name, the default node name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "charon".into())
}

fn check_host_port(setting: &'static str, v: &str) -> Result<(), ConfigError> {
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(invalid(
            setting,
            format!("{v:?} is not host:port (e.g. node-1.example:7946 or 10.0.0.5:7946)"),
        )),
    }
}

fn cluster_settings(
    args: &mut Args,
    file: &mut FileConfig,
) -> Result<ClusterSettings, ConfigError> {
    let gossip_listen = parse_addr(
        "gossip_listen",
        &args
            .gossip_listen
            .take()
            .or(file.gossip_listen.take())
            .unwrap_or_else(|| "127.0.0.1:7946".into()),
    )?;
    let gossip_advertise = args
        .gossip_advertise
        .take()
        .or(file.gossip_advertise.take());
    if let Some(a) = &gossip_advertise {
        check_host_port("gossip_advertise", a)?;
    } else if gossip_listen.ip().is_unspecified() {
        return Err(invalid(
            "gossip_advertise",
            format!("required when gossip_listen is {gossip_listen}: peers need an address to reach this node"),
        ));
    }
    let api_advertise = args.api_advertise.take().or(file.api_advertise.take());
    if let Some(a) = &api_advertise {
        check_host_port("api_advertise", a)?;
    }
    let seeds: Vec<String> = if args.seeds.is_empty() {
        file.seeds.take().unwrap_or_default()
    } else {
        std::mem::take(&mut args.seeds)
    }
    .into_iter()
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
    .collect();
    for s in &seeds {
        check_host_port("seeds", s)?;
    }
    let secret_file = args
        .cluster_secret_file
        .take()
        .or(file.cluster_secret_file.take());
    let secret = match (
        args.cluster_secret.take().filter(|s| !s.is_empty()),
        secret_file,
    ) {
        (Some(s), _) => Some(s),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "cluster_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(text.trim().to_string())
        }
        (None, None) => None,
    };
    if let Some(s) = &secret {
        if s.len() < 16 {
            return Err(invalid("cluster_secret", "must be at least 16 characters"));
        }
    }
    let name_ok = |setting, v: &str| {
        if v.is_empty()
            || v.len() > 63
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            Err(invalid(
                setting,
                format!("{v:?} must be 1-63 letters, digits, '-', '_' or '.'"),
            ))
        } else {
            Ok(())
        }
    };
    let cluster_id = args
        .cluster_id
        .take()
        .or(file.cluster_id.take())
        .unwrap_or_else(|| "charon".into());
    name_ok("cluster_id", &cluster_id)?;
    let node_name = args
        .node_name
        .take()
        .or(file.node_name.take())
        .unwrap_or_else(host_name);
    name_ok("node_name", &node_name)?;
    let region = args
        .region
        .take()
        .or(file.region.take())
        .unwrap_or_else(|| "default".into());
    name_ok("region", &region)?;
    let zone = args.zone.take().or(file.zone.take()).unwrap_or_default();
    if !zone.is_empty() {
        name_ok("zone", &zone)?;
    }
    let phi_threshold = args.phi_threshold.or(file.phi_threshold).unwrap_or(8.0);
    if !(phi_threshold.is_finite() && phi_threshold > 0.0) {
        return Err(invalid("phi_threshold", "must be a positive number"));
    }
    let secs = |setting, v: Option<u64>, default: u64| match v {
        Some(0) => Err(invalid(setting, "must be greater than 0")),
        v => Ok(Duration::from_secs(v.unwrap_or(default))),
    };
    Ok(ClusterSettings {
        cluster_id,
        node_name,
        region,
        zone,
        gossip_listen,
        gossip_advertise,
        api_advertise,
        seeds,
        secret,
        gossip_interval: millis(
            "gossip_interval_ms",
            args.gossip_interval_ms
                .or(file.gossip_interval_ms)
                .unwrap_or(200),
        )?,
        phi_threshold,
        max_heartbeat_interval: millis(
            "max_heartbeat_interval_ms",
            args.max_heartbeat_interval_ms
                .or(file.max_heartbeat_interval_ms)
                .unwrap_or(10_000),
        )?,
        dead_node_grace: secs(
            "dead_node_grace_secs",
            args.dead_node_grace_secs.or(file.dead_node_grace_secs),
            3600,
        )?,
        anti_entropy_interval: secs(
            "anti_entropy_secs",
            args.anti_entropy_secs.or(file.anti_entropy_secs),
            10,
        )?,
        catch_up_timeout: secs(
            "catch_up_timeout_secs",
            args.catch_up_timeout_secs.or(file.catch_up_timeout_secs),
            10,
        )?,
        tombstone_grace: secs(
            "tombstone_grace_secs",
            args.tombstone_grace_secs.or(file.tombstone_grace_secs),
            86_400,
        )?,
    })
}

fn acme_settings(
    args: &mut Args,
    file: &mut FileConfig,
) -> Result<Option<AcmeSettings>, ConfigError> {
    AcmeSettings::from_raw(AcmeRaw {
        directory: args.acme_directory.take().or(file.acme_directory.take()),
        email: args.acme_email.take().or(file.acme_email.take()),
        ca_file: args.acme_ca_file.take().or(file.acme_ca_file.take()),
        eab_kid: args.acme_eab_kid.take().or(file.acme_eab_kid.take()),
        eab_hmac: args.acme_eab_hmac.take().or(file.acme_eab_hmac.take()),
        challenges: if args.acme_challenges.is_empty() {
            file.acme_challenges.take().unwrap_or_default()
        } else {
            std::mem::take(&mut args.acme_challenges)
        },
        renew_after_secs: args.acme_renew_after_secs.or(file.acme_renew_after_secs),
        lease_secs: args.acme_lease_secs.or(file.acme_lease_secs),
        retry_min_secs: args.acme_retry_min_secs.or(file.acme_retry_min_secs),
        tick_ms: args.acme_tick_ms.or(file.acme_tick_ms),
    })
    .map_err(|e| invalid(e.setting, e.message))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["charon-node"];
        full.extend_from_slice(argv);
        Config::from_args(Args::try_parse_from(full).unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.http_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.data_dir, PathBuf::from("charon-data"));
    }

    #[test]
    fn errors_name_the_setting() {
        let e = parse(&["--http-listen", "nope"]).unwrap_err().to_string();
        assert!(e.starts_with("http_listen:"), "{e}");
        let e = parse(&["--trusted-proxy", "10.0.0.0/40"])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("trusted_proxies:"), "{e}");
        let e = parse(&[
            "--api-listen",
            "127.0.0.1:9000",
            "--admin-listen",
            "0.0.0.0:9000",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("collides"), "{e}");
    }

    #[test]
    fn cluster_settings_are_checked_and_read_from_the_file() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.cluster.gossip_listen.to_string(), "127.0.0.1:7946");
        assert_eq!(c.cluster.cluster_id, "charon");
        assert_eq!(c.cluster.region, "default");
        for (argv, setting) in [
            (vec!["--gossip-listen", "0.0.0.0:7946"], "gossip_advertise:"),
            (vec!["--seeds", "10.0.0.1"], "seeds:"),
            (vec!["--cluster-secret", "short"], "cluster_secret:"),
            (vec!["--region", "eu west"], "region:"),
            (vec!["--gossip-interval-ms", "0"], "gossip_interval_ms:"),
            (vec!["--phi-threshold=-1"], "phi_threshold:"),
        ] {
            let e = parse(&argv).unwrap_err().to_string();
            assert!(e.starts_with(setting), "{argv:?}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "from-a-file-0123456789\n").unwrap();
        std::fs::write(
            &path,
            format!(
                "seeds = [\"n1:7946\", \"n2:7946\"]\nregion = \"eu\"\ncluster_secret_file = {:?}\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap(), "--region", "us"]).unwrap();
        assert_eq!(c.cluster.seeds, ["n1:7946", "n2:7946"]);
        assert_eq!(c.cluster.region, "us", "the flag wins");
        assert_eq!(c.cluster.secret.as_deref(), Some("from-a-file-0123456789"));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "http_listen = \"127.0.0.1:1111\"\ntrusted_proxies = [\"10.0.0.0/8\"]\nupstream_timeout_ms = 500\n").unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p, "--upstream-timeout-ms", "700"]).unwrap();
        assert_eq!(c.http_listen.port(), 1111);
        assert_eq!(c.proxy.trusted_proxies.len(), 1);
        assert_eq!(c.proxy.upstream_timeout, Duration::from_millis(700));
        std::fs::write(&path, "htp_listen = \"x\"\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err().to_string();
        assert!(e.contains("htp_listen"), "{e}");
    }

    #[test]
    fn h2_websockets_default_on_and_can_be_turned_off() {
        assert!(parse(&[]).unwrap().proxy.h2_websockets);
        assert!(
            !parse(&["--h2-websockets", "false"])
                .unwrap()
                .proxy
                .h2_websockets
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "h2_websockets = false\n").unwrap();
        let p = path.to_str().unwrap();
        assert!(!parse(&["--config", p]).unwrap().proxy.h2_websockets);
        // The flag wins over the file.
        let c = parse(&["--config", p, "--h2-websockets", "true"]).unwrap();
        assert!(c.proxy.h2_websockets);
    }
}
