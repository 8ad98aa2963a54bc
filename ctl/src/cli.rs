//! The command line: clap types, the parsers of flag values, and the
//! translation of parsed arguments into API requests.
//!
//! Everything here is pure, so a bad flag is reported by clap (exit 2, naming
//! the flag) before any connection is made. Files named by flags (`--cert`,
//! `--key`, `--upstream-ca`) are read through a reader passed in by the
//! caller, so request building stays testable without touching the disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use charon_proto::v1::{
    AddCertificateRequest, CreateHostRequest, DrainRequest, FollowLogsRequest, ListTunnelsRequest,
    Location, LocationList, LogFilter, ProxyHost, RecentLogsRequest, ReplaceCertificateRequest,
    StringList, UpdateHostRequest,
};
use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

pub use crate::duration::parse_duration;
use crate::error::CtlError;

pub mod acl;
pub mod redirect;

const GLOBAL: &str = "Global options";
const WAIT: &str = "Waiting for replication";
const DRAIN_WAIT: &str = "Following the drain";
const NODES: &str = "Which nodes to ask";

/// The exit codes, listed under the top-level `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  success (a `cluster status` that is not converged is a success too)
  1  the call failed: the node is unreachable, refused it, or failed;
     `node drain --wait`: the drained node was not live for over 10s;
     `logs` and `tunnels` with --all-nodes: no node answered
  2  usage error: a bad flag or argument, nothing was sent
  4  --wait: the write succeeded, but not every live node applied it
     within --wait-timeout; for `node drain`, the node still had
     connections when --wait-timeout passed (the drain goes on)";

/// The longest `--wait-timeout`: the node stops waiting after 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Manage a Charon cluster through the gRPC API of any of its nodes.
#[derive(Debug, Parser)]
#[command(
    name = "charonctl",
    version,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// The node's gRPC API (any node of the cluster will do).
    #[arg(
        long,
        env = "CHARON_ENDPOINT",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL",
        value_parser = parse_endpoint,
        global = true,
        help_heading = GLOBAL
    )]
    pub endpoint: String,

    /// Bearer token [env: CHARON_TOKEN]. Without a token from a flag or the
    /// environment, ./charon-data/admin.token (written by a node started with
    /// the default data dir) is used.
    #[arg(long, conflicts_with = "token_file", global = true, help_heading = GLOBAL)]
    pub token: Option<String>,

    /// File holding the bearer token [env: CHARON_TOKEN_FILE].
    #[arg(long, value_name = "FILE", global = true, help_heading = GLOBAL)]
    pub token_file: Option<PathBuf>,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, global = true, help_heading = GLOBAL)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process arguments; exits with a usage error (code 2) on bad input.
    pub fn parse_args() -> Self {
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Like clap's `try_parse_from`, plus the checks clap cannot express
    /// without making the usage line unreadable.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = <Self as clap::FromArgMatches>::from_arg_matches(&matches)?;
        let location_acls = match &cli.command {
            Command::Host(HostCommand::Add(a)) => Some((&a.location, &a.location_acl, "add")),
            Command::Host(HostCommand::Update(a)) => Some((&a.location, &a.location_acl, "update")),
            _ => None,
        };
        if let Some((locations, acls, sub)) = location_acls {
            if let Some((path, _)) = acls
                .iter()
                .find(|(p, _)| !locations.iter().any(|l| l.path_prefix == *p))
            {
                let mut cmd = Self::command();
                cmd.build();
                let sub_cmd = cmd
                    .find_subcommand_mut("host")
                    .and_then(|c| c.find_subcommand_mut(sub))
                    .expect("host subcommands are defined");
                return Err(sub_cmd.error(
                    ErrorKind::ValueValidation,
                    format!("--location-acl {path}=...: no --location {path}=... is given"),
                ));
            }
        }
        if let Command::Acl(acl) = &mut cli.command {
            acl::order_rules(acl, &matches);
            if !acl.changes_something() {
                let mut cmd = Self::command();
                cmd.build();
                let update_cmd = cmd
                    .find_subcommand_mut("acl")
                    .and_then(|c| c.find_subcommand_mut("update"))
                    .expect("acl update is defined");
                return Err(update_cmd.error(
                    ErrorKind::MissingRequiredArgument,
                    "nothing to change: give at least one of --allow, --deny, --clear-rules, \
                     --default, --user, --user-hash, --clear-users, --realm",
                ));
            }
        }
        if let Command::Host(HostCommand::Update(update)) = &cli.command {
            if !update.changes_something() {
                let mut cmd = Self::command();
                cmd.build();
                let update_cmd = cmd
                    .find_subcommand_mut("host")
                    .and_then(|host| host.find_subcommand_mut("update"))
                    .expect("host update is defined");
                return Err(update_cmd.error(
                    ErrorKind::MissingRequiredArgument,
                    "nothing to change: give at least one of --domain, --upstream, --location, \
                     --clear-locations, --name, --enable, --disable, --websocket, \
                     --preserve-host, --forwarded-headers, --ws-idle-timeout, \
                     --ws-ping-interval, --upstream-timeout, --cert, --no-cert, \
                     --force-https, --hsts, --hsts-include-subdomains, --upstream-ca, \
                     --system-roots, --upstream-insecure-skip-verify, --acl, --rate-limit, \
                     --rate-key, --rate-limit-scope, or a balancing flag \
                     (--lb, --upstream-max-conns, --health-path, ...)",
                ));
            }
        }
        Ok(cli)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// JSON with the API's field names, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Proxy hosts: which domains go to which upstreams.
    #[command(subcommand)]
    Host(HostCommand),
    /// TLS certificates served on the HTTPS listener.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The cluster's members and whether they have applied the same writes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Access lists: allow/deny rules on client addresses and basic-auth
    /// users, attached to hosts with `host add|update --acl NAME`.
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Redirect hosts: domains answered with a redirect to another URL.
    #[command(subcommand)]
    Redirect(redirect::RedirectCommand),
    /// API tokens: bearer tokens that work on every node of the cluster.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Drain a node before taking it down, and follow the drain.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show the access log: proxied requests and closed WebSocket tunnels.
    ///
    /// Without --follow, prints the events a node kept (its last 10,000)
    /// from --since ago on (default: 10m), oldest first; with --follow,
    /// prints events as they happen until Ctrl-C. Table mode prints one
    /// line per event:
    ///
    ///   TIME NODE METHOD HOST PATH STATUS DURATION -> UPSTREAM (client ADDR)
    ///   TIME NODE TUNNEL HOST 101 closed by WHO code N, DURATION,
    ///     BYTES up / BYTES down -> UPSTREAM (client ADDR)
    ///
    /// -o json prints each event's access-log line exactly as the node
    /// wrote it, one JSON object per line (JSONL), ready for jq.
    ///
    /// By default the --endpoint node is asked. --node asks another member,
    /// --all-nodes every live member (at once, at the API addresses that
    /// `cluster members` lists, with the same token): their events are
    /// merged by time, or with --follow printed as they arrive from each.
    /// A node that cannot be asked is named in a warning on stderr and the
    /// others go on; the command fails only when none answered.
    ///
    /// Examples:
    ///   charonctl logs --status 5xx --since 1h
    ///   charonctl logs -f --all-nodes --host app.example
    ///   charonctl logs -o json --since 30m | jq 'select(.duration_ms > 500)'
    #[command(
        verbatim_doc_comment,
        about = "Show the access log: proxied requests and closed WebSocket tunnels"
    )]
    Logs(LogsArgs),
    /// List the open WebSocket tunnels.
    ///
    /// One row per tunnel: NODE holding it, its ID there, proxy HOST,
    /// CLIENT and UPSTREAM addresses, AGE (how long it has been open), and
    /// the bytes it carried so far each way: UP (client to upstream) and
    /// DOWN (upstream to client). -o json prints an array with every field
    /// of the API (started_ms in Unix milliseconds, frame counts too).
    ///
    /// By default the --endpoint node is asked; --node asks another member,
    /// --all-nodes every live member, as for `logs`: the rows are grouped
    /// by node, each node's oldest tunnel first.
    #[command(alias = "tunnel")]
    Tunnels(TunnelsArgs),
}

impl Command {
    /// How long to wait for the write to reach every live node, when
    /// `--wait` was given (only commands that write have the flag).
    pub fn wait(&self) -> Option<Duration> {
        let wait = match self {
            Command::Host(HostCommand::Add(args)) => &args.wait,
            Command::Host(HostCommand::Update(args)) => &args.wait,
            Command::Host(HostCommand::Rm { wait, .. }) => wait,
            Command::Cert(CertCommand::Add(args)) => &args.wait,
            Command::Cert(CertCommand::Replace(args)) => &args.wait,
            Command::Cert(CertCommand::Rm { wait, .. }) => wait,
            Command::Token(TokenCommand::Create { wait, .. }) => wait,
            Command::Token(TokenCommand::Revoke { wait, .. }) => wait,
            Command::Acl(acl) => acl.wait()?,
            Command::Redirect(r) => r.wait()?,
            _ => return None,
        };
        wait.timeout()
    }

    /// `node drain --wait`: follow the drain until the node is drained.
    /// Not a wait for replication: [`Command::wait`] is `None` for it.
    pub fn drain_wait(&self) -> Option<DrainWait> {
        match self {
            Command::Node(NodeCommand::Drain(args)) => args.wait.wait.then_some(DrainWait {
                timeout: args.wait.wait_timeout,
            }),
            _ => None,
        }
    }
}

/// How `node drain --wait` follows the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainWait {
    /// `--wait-timeout`; `None`: no limit.
    pub timeout: Option<Duration>,
}

/// What `logs` shows when --since is not given (without --follow).
pub const DEFAULT_SINCE: Duration = Duration::from_secs(600);

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing events as they happen, until Ctrl-C or until the node
    /// ends the stream. Without --since, only new events are printed; with
    /// it, the kept events from then on come first.
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// Only the events of this proxy host: its name (by default its first
    /// domain) or its id, as `host list` shows them.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,

    /// Only the events with this status: a class such as 5xx or 4xx, or a
    /// code from 100 to 599 such as 404 (closed tunnels are logged as 101).
    #[arg(long, value_name = "CLASS|CODE", value_parser = parse_status_filter)]
    pub status: Option<String>,

    /// Only the events of the last DURATION: a number and a unit (ms, s, m,
    /// h), e.g. 30s, 10m or 1h30m [default: 10m; with --follow: only new
    /// events].
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    pub since: Option<Duration>,

    /// Print at most the N newest events (across all nodes with
    /// --all-nodes) [default: all that are kept]. Not with --follow.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        conflicts_with = "follow"
    )]
    pub limit: Option<u32>,

    #[command(flatten)]
    pub nodes: NodeScopeArgs,
}

impl LogsArgs {
    pub fn filter(&self) -> LogFilter {
        LogFilter {
            host: self.host.clone().unwrap_or_default(),
            status: self.status.clone().unwrap_or_default(),
        }
    }

    /// `Logs.Recent`: the kept events since --since ago (default
    /// [`DEFAULT_SINCE`]); `now_ms` is the wall clock in Unix milliseconds.
    pub fn recent_request(&self, now_ms: u64) -> RecentLogsRequest {
        RecentLogsRequest {
            filter: Some(self.filter()),
            since_ms: since_ms(now_ms, self.since.unwrap_or(DEFAULT_SINCE)),
            limit: self.limit.unwrap_or(0),
        }
    }

    /// `Logs.Follow`: the kept events since --since ago first, when given;
    /// since_ms 0 asks for new events only.
    pub fn follow_request(&self, now_ms: u64) -> FollowLogsRequest {
        FollowLogsRequest {
            filter: Some(self.filter()),
            since_ms: self.since.map_or(0, |since| since_ms(now_ms, since)),
        }
    }
}

/// `now - since` in Unix milliseconds; at least 1, because 0 means "no
/// backlog" to `Logs.Follow` (and "everything" to `Logs.Recent`, the same
/// as 1 there).
fn since_ms(now_ms: u64, since: Duration) -> u64 {
    let since = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_sub(since).max(1)
}

#[derive(Debug, Args)]
pub struct TunnelsArgs {
    /// Only the tunnels of this proxy host: its name (by default its first
    /// domain) or its id, as `host list` shows them.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,

    #[command(flatten)]
    pub nodes: NodeScopeArgs,
}

impl TunnelsArgs {
    pub fn to_request(&self) -> ListTunnelsRequest {
        ListTunnelsRequest {
            host: self.host.clone().unwrap_or_default(),
        }
    }
}

/// `--node` and `--all-nodes` of `logs` and `tunnels`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = NODES)]
pub struct NodeScopeArgs {
    /// Ask this member instead of the --endpoint node: its name or id, as
    /// `cluster members` lists them. Its API address is looked up through
    /// --endpoint; the same token is used.
    #[arg(long, value_name = "NAME", conflicts_with = "all_nodes")]
    pub node: Option<String>,

    /// Ask every live member of the cluster (looked up through --endpoint)
    /// with the same token; a member that cannot be asked is named in a
    /// warning on stderr, and the others go on.
    #[arg(long)]
    pub all_nodes: bool,
}

impl NodeScopeArgs {
    pub fn scope(&self) -> Scope {
        match (&self.node, self.all_nodes) {
            (Some(node), _) => Scope::Node(node.clone()),
            (None, true) => Scope::AllNodes,
            (None, false) => Scope::Endpoint,
        }
    }
}

/// Which nodes `logs` and `tunnels` ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The --endpoint node.
    Endpoint,
    /// The member with this name or id.
    Node(String),
    /// Every live member.
    AllNodes,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// List the members as the answering node sees them.
    ///
    /// `*` after a name marks the answering node. STATE is live or dead in
    /// the answering node's failure detector; LAG counts the writes some
    /// live member has applied and this one has not yet.
    #[command(alias = "ls")]
    Members,
    /// Say whether every live member has applied the same writes.
    ///
    /// The first line says `converged` or `not converged`, the cluster id
    /// and how many members are live; then each member's state hash, lag
    /// and applied writes (per origin node, the highest sequence applied).
    /// Exits 0 whether converged or not: it is a report.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once and cannot be shown again.
    ///
    /// The node keeps only the secret's SHA-256, replicated to every node,
    /// so the token works on all of them. Table mode prints the secret on a
    /// line of its own; `-o json` prints {"token": {...}, "secret": "..."}.
    Create {
        /// A label for the token, unique in the cluster: 1-64 letters,
        /// digits, '-', '_', '.' or '@'.
        #[arg(value_name = "NAME")]
        name: String,

        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List the tokens (never their secrets).
    ///
    /// CREATED is UTC; CREATED ON is the node that created the token. Each
    /// node's bootstrap admin token is listed as admin-<node name>.
    #[command(alias = "ls")]
    List,
    /// Revoke a token: it stops working on every node.
    #[command(alias = "rm")]
    Revoke {
        /// The token's id or name. (Not `token`: that is the global
        /// `--token`'s id, which clap would let this argument shadow.)
        #[arg(value_name = "ID|NAME")]
        id_or_name: String,

        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Drain a node before taking it down for a rollout.
    ///
    /// The node says `draining` in gossip, answers /readyz with 503, closes
    /// its listeners, ends keep-alive and HTTP/2 connections gracefully, and
    /// closes WebSocket tunnels (1001) at the deadline, spread over a window.
    /// Any node accepts the drain, and it holds across the drained node's
    /// restart until `node undrain`.
    Drain(DrainArgs),
    /// Withdraw a drain: the node serves again.
    Undrain {
        /// The node's name or id (as `cluster members` lists them).
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Show how far a node's drain has come.
    ///
    /// Its open HTTP connections and WebSocket tunnels, whether its
    /// listeners are closed and its deadline, as the node last published
    /// them in gossip; any node answers.
    Status {
        /// The node's name or id (as `cluster members` lists them).
        #[arg(value_name = "NODE")]
        node: String,
    },
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node's name or id (as `cluster members` lists them).
    #[arg(value_name = "NODE")]
    pub node: String,

    /// Close the node's WebSocket tunnels this long from now: a number and
    /// a unit (ms, s, m, h), e.g. 90s, 5m or 1m30s, rounded up to whole
    /// seconds [default: the drained node's configured deadline].
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_secs)]
    pub deadline: Option<u32>,

    /// Spread the tunnel closes over this long after the deadline, so that
    /// clients do not all reconnect at once; rounded up to whole seconds
    /// [default: the drained node's configured spread].
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_secs)]
    pub spread: Option<u32>,

    #[command(flatten)]
    pub wait: DrainWaitArgs,
}

impl DrainArgs {
    /// An absent flag sends 0: the drained node's default.
    pub fn to_request(&self) -> DrainRequest {
        DrainRequest {
            node: self.node.clone(),
            deadline_secs: self.deadline.unwrap_or(0),
            spread_secs: self.spread.unwrap_or(0),
        }
    }
}

/// `--wait` and `--wait-timeout` of `node drain`: they follow the drain,
/// not the replication of the write.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = DRAIN_WAIT)]
pub struct DrainWaitArgs {
    /// After the drain is requested, follow it until the node has no HTTP
    /// connections and no WebSocket tunnels left, with progress on stderr,
    /// then say how long it took. Exits 0 once drained, 1 if the node is not
    /// live for more than 10s, 4 if --wait-timeout passes first (the drain
    /// goes on). With -o json, stdout gets the final drain status.
    #[arg(long)]
    pub wait: bool,

    /// How long --wait follows the drain: a number and a unit (ms, s, m,
    /// h), e.g. 90s, 10m or 1h [default: no limit].
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_positive_duration,
        requires = "wait"
    )]
    pub wait_timeout: Option<Duration>,
}

/// `--wait` and `--wait-timeout`, on every command that writes.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = WAIT)]
pub struct WaitArgs {
    /// After the write, wait until every live node has applied it and say
    /// how long that took (on stderr). Exits 4 if some live node had not
    /// applied it within --wait-timeout; the write itself stands.
    #[arg(long)]
    pub wait: bool,

    /// How long --wait waits: a number and a unit (ms, s, m, h), e.g. 500ms,
    /// 10s, 2m or 1m30s; at most 10m.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_wait_timeout,
        requires = "wait"
    )]
    pub wait_timeout: Duration,
}

impl WaitArgs {
    pub fn timeout(&self) -> Option<Duration> {
        self.wait.then_some(self.wait_timeout)
    }
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Create a proxy host.
    Add(AddArgs),
    /// List all proxy hosts.
    #[command(alias = "ls")]
    List,
    /// Show one proxy host.
    #[command(alias = "get")]
    Show {
        /// The host's id or one of its domains.
        #[arg(value_name = "ID|DOMAIN")]
        host: String,
    },
    /// Change a proxy host; flags that are not given keep their value.
    Update(UpdateArgs),
    /// Drain one upstream of a host for a backend rollout (every node
    /// stops sending it new work; its tunnels get 1001 by the deadline),
    /// or undrain it.
    #[command(subcommand)]
    Upstream(crate::balance::UpstreamCommand),
    /// Delete a proxy host.
    #[command(alias = "delete")]
    Rm {
        /// The host's id or one of its domains.
        #[arg(value_name = "ID|DOMAIN")]
        host: String,

        /// Delete only if the host is still at this version.
        #[arg(long, value_name = "V")]
        expected_version: Option<u64>,

        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Domains served by this host: exact names, `*.wildcard` names or IP literals.
    #[arg(required = true, value_name = "DOMAIN")]
    pub domains: Vec<String>,

    /// Upstream URL (`http://host:port` or `https://host:port`), optionally
    /// with a weight (`URL@weight=3`); repeat for several.
    #[arg(long, required = true, value_name = "URL[@weight=N]", value_parser = crate::balance::parse_upstream)]
    pub upstream: Vec<String>,

    /// Send paths starting with PATH to their own upstreams; repeat for several.
    #[arg(long, value_name = "PATH=URL[,URL...]", value_parser = parse_location)]
    pub location: Vec<Location>,

    /// Label for operators (the node defaults it to the first domain).
    #[arg(long)]
    pub name: Option<String>,

    /// Create the host switched off.
    #[arg(long)]
    pub disabled: bool,

    /// Refuse WebSocket upgrades for this host.
    #[arg(long)]
    pub no_websocket: bool,

    /// Send the upstream's authority as Host instead of the client's Host.
    #[arg(long)]
    pub no_preserve_host: bool,

    /// Do not add X-Forwarded-* and X-Real-IP.
    #[arg(long)]
    pub no_forwarded_headers: bool,

    /// Close a WebSocket tunnel after this many seconds of silence (0 = never).
    #[arg(long, value_name = "SECS")]
    pub ws_idle_timeout: Option<u32>,

    /// Ping idle WebSocket tunnels every this many seconds (0 = off).
    #[arg(long, value_name = "SECS")]
    pub ws_ping_interval: Option<u32>,

    /// Wait this long for an upstream's response headers (0 = node default).
    #[arg(long, value_name = "MS")]
    pub upstream_timeout: Option<u32>,

    /// Serve this certificate for the host's domains (default: the best
    /// match among stored certificates).
    #[arg(long = "cert", value_name = "CERT_ID")]
    pub cert_id: Option<String>,

    /// Answer plain-HTTP requests with a 308 redirect to https://.
    #[arg(long)]
    pub force_https: bool,

    /// Send Strict-Transport-Security with this max-age on HTTPS responses
    /// (0 = no header).
    #[arg(long, value_name = "MAX_AGE_SECS")]
    pub hsts: Option<u32>,

    /// Add includeSubDomains to the Strict-Transport-Security header.
    #[arg(long, requires = "hsts")]
    pub hsts_include_subdomains: bool,

    /// Verify https:// upstreams with the CA certificates of this PEM file
    /// instead of the system roots.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// Do not verify the certificates of https:// upstreams (insecure).
    #[arg(long, conflicts_with = "upstream_ca")]
    pub upstream_insecure_skip_verify: bool,

    /// Never order a certificate for this host automatically (ACME), even
    /// when the nodes have an ACME directory.
    #[arg(long)]
    pub no_acme: bool,

    /// Every request must pass this access list (`charonctl acl`).
    #[arg(long, value_name = "NAME")]
    pub acl: Option<String>,

    /// Give a location given with --location its own access list; repeat.
    #[arg(long, value_name = "PATH=NAME", value_parser = parse_location_acl, requires = "location")]
    pub location_acl: Vec<(String, String)>,

    /// Requests per client: N/s or N/m, optionally ,burst=N (default: a
    /// second's worth); over it 429 with Retry-After. "" removes it.
    #[arg(long, value_name = "N/s[,burst=B]")]
    pub rate_limit: Option<String>,

    /// What a client is for --rate-limit: ip (default) or header:NAME.
    #[arg(long, value_name = "ip|header:NAME")]
    pub rate_key: Option<String>,

    /// cluster (default: the nodes together admit the rate) or node.
    #[arg(long, value_name = "cluster|node")]
    pub rate_limit_scope: Option<String>,

    /// In-flight requests plus open WebSockets to this host per client
    /// (an IPv4 address or IPv6 /64); over it 429 (0 = no cap).
    #[arg(long, value_name = "N")]
    pub max_conns_per_ip: Option<u32>,

    #[command(flatten)]
    pub balance: Box<crate::balance::BalanceArgs>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The host's id or one of its domains.
    #[arg(value_name = "ID|DOMAIN")]
    pub host: String,

    /// Replace the domains; repeat for several.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Vec<String>,

    /// Replace the upstreams (and their weights: `URL@weight=3`); repeat
    /// for several.
    #[arg(long, value_name = "URL[@weight=N]", value_parser = crate::balance::parse_upstream)]
    pub upstream: Vec<String>,

    /// Replace the locations; repeat for several.
    #[arg(long, value_name = "PATH=URL[,URL...]", value_parser = parse_location)]
    pub location: Vec<Location>,

    /// Remove all locations.
    #[arg(long, conflicts_with = "location")]
    pub clear_locations: bool,

    /// New label for operators.
    #[arg(long)]
    pub name: Option<String>,

    /// Switch the host on.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,

    /// Switch the host off.
    #[arg(long)]
    pub disable: bool,

    /// Pass WebSocket upgrades through.
    #[arg(long, value_name = "true|false")]
    pub websocket: Option<bool>,

    /// Send the client's Host header to the upstream.
    #[arg(long, value_name = "true|false")]
    pub preserve_host: Option<bool>,

    /// Add X-Forwarded-* and X-Real-IP.
    #[arg(long, value_name = "true|false")]
    pub forwarded_headers: Option<bool>,

    /// Close a WebSocket tunnel after this many seconds of silence (0 = never).
    #[arg(long, value_name = "SECS")]
    pub ws_idle_timeout: Option<u32>,

    /// Ping idle WebSocket tunnels every this many seconds (0 = off).
    #[arg(long, value_name = "SECS")]
    pub ws_ping_interval: Option<u32>,

    /// Wait this long for an upstream's response headers (0 = node default).
    #[arg(long, value_name = "MS")]
    pub upstream_timeout: Option<u32>,

    /// Pin this certificate; "" unpins (back to the best match).
    #[arg(long = "cert", value_name = "CERT_ID", conflicts_with = "no_cert")]
    pub cert_id: Option<String>,

    /// Unpin the certificate: serve the best match among stored certificates.
    #[arg(long)]
    pub no_cert: bool,

    /// Answer plain-HTTP requests with a 308 redirect to https://.
    #[arg(long, value_name = "true|false")]
    pub force_https: Option<bool>,

    /// Strict-Transport-Security max-age on HTTPS responses (0 = no header).
    #[arg(long, value_name = "MAX_AGE_SECS")]
    pub hsts: Option<u32>,

    /// Add includeSubDomains to the Strict-Transport-Security header.
    #[arg(long, value_name = "true|false")]
    pub hsts_include_subdomains: Option<bool>,

    /// Verify https:// upstreams with the CA certificates of this PEM file;
    /// "" goes back to the system roots.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "system_roots",
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub upstream_ca: Option<PathBuf>,

    /// Verify https:// upstreams with the system roots again (same as
    /// --upstream-ca ""; --upstream-insecure-skip-verify is left as it is).
    #[arg(long)]
    pub system_roots: bool,

    /// Do not verify the certificates of https:// upstreams (insecure).
    #[arg(long, value_name = "true|false")]
    pub upstream_insecure_skip_verify: Option<bool>,

    /// Opt the host out of automatic certificates (true) or back in (false).
    #[arg(long, value_name = "true|false")]
    pub no_acme: Option<bool>,

    /// Attach this access list (`charonctl acl`) to the host; "" detaches.
    #[arg(long, value_name = "NAME")]
    pub acl: Option<String>,

    /// Give a location given with --location its own access list; repeat.
    #[arg(long, value_name = "PATH=NAME", value_parser = parse_location_acl, requires = "location")]
    pub location_acl: Vec<(String, String)>,

    /// Requests per client: N/s or N/m, optionally ,burst=N (default: a
    /// second's worth); over it 429 with Retry-After. "" removes it.
    #[arg(long, value_name = "N/s[,burst=B]")]
    pub rate_limit: Option<String>,

    /// What a client is for --rate-limit: ip (default) or header:NAME.
    #[arg(long, value_name = "ip|header:NAME")]
    pub rate_key: Option<String>,

    /// cluster (default: the nodes together admit the rate) or node.
    #[arg(long, value_name = "cluster|node")]
    pub rate_limit_scope: Option<String>,

    /// In-flight requests plus open WebSockets to this host per client
    /// (an IPv4 address or IPv6 /64); over it 429 (0 = no cap).
    #[arg(long, value_name = "N")]
    pub max_conns_per_ip: Option<u32>,

    /// Apply the change only if the host is still at this version.
    #[arg(long, value_name = "V")]
    pub expected_version: Option<u64>,

    #[command(flatten)]
    pub balance: Box<crate::balance::BalanceUpdateArgs>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Store a certificate chain and its private key.
    Add(CertAddArgs),
    /// List all certificates.
    #[command(alias = "ls")]
    List,
    /// Show one certificate's metadata (never its private key).
    #[command(alias = "get")]
    Show {
        /// The certificate's id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Rotate a certificate: a new chain and key under the same id, so the
    /// hosts that pin it follow.
    Replace(CertReplaceArgs),
    /// Delete a certificate.
    #[command(alias = "delete")]
    Rm {
        /// The certificate's id.
        #[arg(value_name = "ID")]
        id: String,

        /// Delete only if the certificate is still at this version.
        #[arg(long, value_name = "V")]
        expected_version: Option<u64>,

        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// The files of a certificate: read by charonctl, sent to the node.
#[derive(Debug, Args)]
pub struct PemFiles {
    /// PEM chain: the leaf first, then the intermediates in order.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct CertAddArgs {
    #[command(flatten)]
    pub files: PemFiles,

    /// Label for operators (the node defaults it to the leaf's first domain).
    #[arg(long)]
    pub name: Option<String>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct CertReplaceArgs {
    /// The certificate's id.
    #[arg(value_name = "ID")]
    pub id: String,

    #[command(flatten)]
    pub files: PemFiles,

    /// New label for operators (default: keep the current one).
    #[arg(long)]
    pub name: Option<String>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Reads the file named by a flag: `read(flag, path)`.
pub type ReadFile = dyn Fn(&'static str, &Path) -> Result<String, CtlError>;

/// Reads a file from disk; the error names the flag and the path.
pub fn read_file(flag: &'static str, path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|source| CtlError::File {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

impl PemFiles {
    /// `(cert_pem, key_pem)`.
    fn read(&self, read: &ReadFile) -> Result<(String, String), CtlError> {
        Ok((read("--cert", &self.cert)?, read("--key", &self.key)?))
    }
}

impl CertAddArgs {
    pub fn to_request(&self, read: &ReadFile) -> Result<AddCertificateRequest, CtlError> {
        let (cert_pem, key_pem) = self.files.read(read)?;
        Ok(AddCertificateRequest {
            name: self.name.clone().unwrap_or_default(),
            cert_pem,
            key_pem,
        })
    }
}

impl CertReplaceArgs {
    pub fn to_request(&self, read: &ReadFile) -> Result<ReplaceCertificateRequest, CtlError> {
        let (cert_pem, key_pem) = self.files.read(read)?;
        Ok(ReplaceCertificateRequest {
            id: self.id.clone(),
            cert_pem,
            key_pem,
            name: self.name.clone(),
        })
    }
}

impl AddArgs {
    /// The booleans are sent only when a flag asked for a change, so that a
    /// plain `host add` gets whatever defaults the node documents.
    pub fn to_request(&self, read: &ReadFile) -> Result<CreateHostRequest, CtlError> {
        let upstream_ca_pem = match &self.upstream_ca {
            Some(path) => read("--upstream-ca", path)?,
            None => String::new(),
        };
        let (upstreams, weights) = crate::balance::split_weights(&self.upstream);
        Ok(CreateHostRequest {
            host: Some(ProxyHost {
                name: self.name.clone().unwrap_or_default(),
                domains: self.domains.clone(),
                upstreams,
                balancing: self.balance.to_pb(weights),
                locations: with_location_acls(&self.location, &self.location_acl),
                acl: self.acl.clone().unwrap_or_default(),
                rate_limit: self.rate_limit.clone().unwrap_or_default(),
                rate_key: self.rate_key.clone().unwrap_or_default(),
                rate_limit_scope: self.rate_limit_scope.clone().unwrap_or_default(),
                max_conns_per_ip: self.max_conns_per_ip.unwrap_or(0),
                ws_idle_timeout_secs: self.ws_idle_timeout.unwrap_or(0),
                ws_ping_interval_secs: self.ws_ping_interval.unwrap_or(0),
                upstream_timeout_ms: self.upstream_timeout.unwrap_or(0),
                cert_id: self.cert_id.clone().unwrap_or_default(),
                force_https: self.force_https,
                hsts_max_age_secs: self.hsts.unwrap_or(0),
                hsts_include_subdomains: self.hsts_include_subdomains,
                upstream_ca_pem,
                upstream_insecure_skip_verify: self.upstream_insecure_skip_verify,
                no_acme: self.no_acme,
                ..ProxyHost::default()
            }),
            enabled: self.disabled.then_some(false),
            websocket: self.no_websocket.then_some(false),
            preserve_host: self.no_preserve_host.then_some(false),
            forwarded_headers: self.no_forwarded_headers.then_some(false),
        })
    }
}

impl UpdateArgs {
    /// `--expected-version` alone changes nothing, so it does not count.
    pub fn changes_something(&self) -> bool {
        !self.domain.is_empty()
            || !self.upstream.is_empty()
            || !self.location.is_empty()
            || self.clear_locations
            || self.name.is_some()
            || self.enable
            || self.disable
            || self.websocket.is_some()
            || self.preserve_host.is_some()
            || self.forwarded_headers.is_some()
            || self.ws_idle_timeout.is_some()
            || self.ws_ping_interval.is_some()
            || self.upstream_timeout.is_some()
            || self.cert_id.is_some()
            || self.no_cert
            || self.force_https.is_some()
            || self.hsts.is_some()
            || self.hsts_include_subdomains.is_some()
            || self.upstream_ca.is_some()
            || self.system_roots
            || self.upstream_insecure_skip_verify.is_some()
            || self.no_acme.is_some()
            || self.balance.changes_something()
            || self.acl.is_some()
            || self.rate_limit.is_some()
            || self.rate_key.is_some()
            || self.rate_limit_scope.is_some()
            || self.max_conns_per_ip.is_some()
    }

    /// Only what the user named is set: an unset field or list keeps the
    /// host's current value, a set list replaces the whole list.
    /// `--no-cert` and `--system-roots` send "", as `--cert ""` and
    /// `--upstream-ca ""` do; an `--upstream-ca` file is read and sent.
    pub fn to_request(&self, read: &ReadFile) -> Result<UpdateHostRequest, CtlError> {
        let list = |values: &[String]| {
            (!values.is_empty()).then(|| StringList {
                values: values.to_vec(),
            })
        };
        let locations = (self.clear_locations || !self.location.is_empty()).then(|| LocationList {
            values: with_location_acls(&self.location, &self.location_acl),
        });
        let enabled = match (self.enable, self.disable) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let cert_id = if self.no_cert {
            Some(String::new())
        } else {
            self.cert_id.clone()
        };
        let upstream_ca_pem = match &self.upstream_ca {
            _ if self.system_roots => Some(String::new()),
            Some(path) if path.as_os_str().is_empty() => Some(String::new()),
            Some(path) => Some(read("--upstream-ca", path)?),
            None => None,
        };
        let (upstreams, weights) = crate::balance::split_weights(&self.upstream);
        Ok(UpdateHostRequest {
            id_or_domain: self.host.clone(),
            name: self.name.clone(),
            domains: list(&self.domain),
            upstreams: list(&upstreams),
            balancing: self.balance.to_pb(weights),
            locations,
            enabled,
            websocket: self.websocket,
            preserve_host: self.preserve_host,
            forwarded_headers: self.forwarded_headers,
            ws_idle_timeout_secs: self.ws_idle_timeout,
            ws_ping_interval_secs: self.ws_ping_interval,
            upstream_timeout_ms: self.upstream_timeout,
            expected_version: self.expected_version,
            cert_id,
            force_https: self.force_https,
            hsts_max_age_secs: self.hsts,
            hsts_include_subdomains: self.hsts_include_subdomains,
            upstream_ca_pem,
            upstream_insecure_skip_verify: self.upstream_insecure_skip_verify,
            no_acme: self.no_acme,
            acl: self.acl.clone(),
            rate_limit: self.rate_limit.clone(),
            rate_key: self.rate_key.clone(),
            rate_limit_scope: self.rate_limit_scope.clone(),
            max_conns_per_ip: self.max_conns_per_ip,
            ..UpdateHostRequest::default()
        })
    }
}

/// Parses `--location PATH=URL[@weight=N][,URL...][;key=value...]`: the
/// settings after `;` are the location's rate limit (`rate-limit=50/s,burst=100`,
/// `rate-key=ip|header:NAME`, `rate-scope=cluster|node`: the location's own
/// bucket, used instead of the host's) or its balancing (`crate::balance`).
/// The node validates the path, the URLs and the limit themselves; here
/// we only catch what cannot be a location at all.
pub fn parse_location(value: &str) -> Result<Location, String> {
    const SHAPE: &str = "expected PATH=URL[,URL...][;lb=POLICY...][;rate-limit=N/s,burst=B...], e.g. /api=http://10.0.0.5:8080";
    let (path, rest) = value.split_once('=').ok_or(SHAPE)?;
    let path = path.trim();
    if path.is_empty() {
        return Err(format!("the path is empty; {SHAPE}"));
    }
    // The rate settings are taken out here; the rest is balancing's.
    let mut loc = Location::default();
    let mut others = Vec::new();
    for (i, part) in rest.split(';').enumerate() {
        let (key, v) = part.split_once('=').unwrap_or((part, ""));
        let v = v.trim().to_string();
        match key.trim() {
            _ if i == 0 => others.push(part),
            "rate-limit" => loc.rate_limit = v,
            "rate-key" => loc.rate_key = v,
            "rate-scope" | "rate-limit-scope" => loc.rate_limit_scope = v,
            _ => others.push(part),
        }
    }
    if loc.rate_limit.is_empty() && !(loc.rate_key.is_empty() && loc.rate_limit_scope.is_empty()) {
        return Err(format!(
            "rate-key and rate-scope need rate-limit=N/s in the same --location; {SHAPE}"
        ));
    }
    let (upstreams, balancing) = crate::balance::parse_location_rest(&others.join(";"))
        .map_err(|e| format!("{e}; {SHAPE}"))?;
    loc.path_prefix = path.to_string();
    loc.upstreams = upstreams;
    loc.balancing = balancing;
    Ok(loc)
}

/// Parses `--location-acl PATH=NAME`.
pub fn parse_location_acl(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((p, n)) if !p.trim().is_empty() && !n.trim().is_empty() => {
            Ok((p.trim().to_string(), n.trim().to_string()))
        }
        _ => Err("expected PATH=NAME, e.g. /admin=office".to_string()),
    }
}

/// The locations with the access lists `--location-acl` gave them.
fn with_location_acls(locations: &[Location], acls: &[(String, String)]) -> Vec<Location> {
    locations
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if let Some((_, name)) = acls.iter().find(|(p, _)| *p == l.path_prefix) {
                l.acl = name.clone();
            }
            l
        })
        .collect()
}

/// Parses `--endpoint`. A bare `host:port` means `http://host:port`.
/// This build of charonctl speaks plain HTTP/2 only (tonic without TLS), so an
/// `https://` endpoint is refused here rather than failing obscurely later.
pub fn parse_endpoint(value: &str) -> Result<String, String> {
    let value = value.trim();
    let url = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. http://127.0.0.1:7070"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https endpoints are not supported yet; use http://HOST:PORT".into())
        }
        _ => return Err("expected an http:// URL, e.g. http://127.0.0.1:7070".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host; expected e.g. http://127.0.0.1:7070".into());
    }
    Ok(url)
}

/// Parses `logs --since`: a duration above zero.
pub fn parse_since(value: &str) -> Result<Duration, String> {
    let since = parse_duration(value)?;
    if since.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(since)
}

/// Parses `logs --status`: a class (`5xx`, `4XX`) or a code from 100 to 599,
/// as the node filters them; the class is sent in lower case.
pub fn parse_status_filter(value: &str) -> Result<String, String> {
    const SHAPE: &str = "expected a class such as 5xx or a code from 100 to 599 such as 404";
    let status = value.trim().to_ascii_lowercase();
    match status.as_bytes() {
        [b'1'..=b'5', b'x', b'x'] => Ok(status),
        [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => Ok(status),
        _ => Err(format!("{:?} is not a status; {SHAPE}", value.trim())),
    }
}

/// Parses `--wait-timeout`: a duration above zero and at most [`MAX_WAIT`].
pub fn parse_wait_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_positive_duration(value)?;
    if timeout > MAX_WAIT {
        return Err("at most 10m: the node stops waiting after 10 minutes".into());
    }
    Ok(timeout)
}

/// Parses a duration above zero (`node drain --wait-timeout`).
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration.is_zero() {
        return Err("the timeout must be more than 0".into());
    }
    Ok(duration)
}

/// Parses `--deadline` and `--spread` of `node drain`: a duration above
/// zero, rounded up to whole seconds. 0 is refused because the API reads
/// 0 as "the node's default", which is what leaving the flag out says.
pub fn parse_drain_secs(value: &str) -> Result<u32, String> {
    let duration = parse_duration(value)?;
    if duration.is_zero() {
        return Err("must be more than 0; leave the flag out for the node's default".into());
    }
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    u32::try_from(secs).map_err(|_| format!("{} is too long", value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args(std::iter::once("charonctl").chain(args.iter().copied()))
    }

    /// A file reader that answers from memory: `<flag> <path>` as the
    /// contents, and NotFound for paths under /missing.
    fn fake_read(flag: &'static str, path: &Path) -> Result<String, CtlError> {
        if path.starts_with("/missing") {
            return Err(CtlError::File {
                flag,
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(format!("{flag} {}", path.display()))
    }

    /// A reader for commands that must not read anything.
    fn no_read(flag: &'static str, path: &Path) -> Result<String, CtlError> {
        panic!("read {flag} {}", path.display())
    }

    fn host_add(args: &[&str]) -> CreateHostRequest {
        let cli = parse(&[&["host", "add"], args].concat()).unwrap();
        let Command::Host(HostCommand::Add(args)) = cli.command else {
            panic!("not host add")
        };
        args.to_request(&fake_read).unwrap()
    }

    fn host_update(args: &[&str]) -> UpdateHostRequest {
        let cli = parse(&[&["host", "update"], args].concat()).unwrap();
        let Command::Host(HostCommand::Update(args)) = cli.command else {
            panic!("not host update")
        };
        args.to_request(&fake_read).unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn location_with_several_upstreams() {
        let loc = parse_location("/api=http://a:1, http://b:2").unwrap();
        assert_eq!(loc.path_prefix, "/api");
        assert_eq!(loc.upstreams, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn location_keeps_equals_signs_in_urls() {
        let loc = parse_location("/q=http://a:1/?x=y").unwrap();
        assert_eq!(loc.path_prefix, "/q");
        assert_eq!(loc.upstreams, ["http://a:1/?x=y"]);
    }

    #[test]
    fn a_location_takes_its_own_rate_limit_beside_its_balancing() {
        let loc = parse_location(
            "/login=http://a:1,http://b:2;rate-limit=5/s,burst=10;lb=least-conn;rate-key=header:x-user",
        )
        .unwrap();
        assert_eq!(loc.upstreams, ["http://a:1", "http://b:2"]);
        assert_eq!(loc.rate_limit, "5/s,burst=10");
        assert_eq!(loc.rate_key, "header:x-user");
        assert_eq!(loc.balancing.map(|b| b.lb).as_deref(), Some("least-conn"));
        let loc = parse_location("/a=http://a:1;rate-limit=2/s;rate-scope=node").unwrap();
        assert_eq!(
            (loc.rate_limit.as_str(), loc.rate_limit_scope.as_str()),
            ("2/s", "node")
        );
        assert!(loc.balancing.is_none());
        let err = parse_location("/a=http://a:1;rate-key=ip").unwrap_err();
        assert!(err.contains("need rate-limit"), "{err}");
    }

    #[test]
    fn malformed_locations_are_refused() {
        for bad in ["/api", "=http://a:1", "/api=", "/api=http://a:1,"] {
            assert!(parse_location(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("10.0.0.1:7070").unwrap(),
            "http://10.0.0.1:7070"
        );
        assert_eq!(
            parse_endpoint("http://node-a:7070").unwrap(),
            "http://node-a:7070"
        );
        for bad in ["https://a:7070", "ftp://a", "http://", "http://a b"] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn add_leaves_booleans_unset_unless_asked() {
        let cli = parse(&["host", "add", "a.example", "--upstream", "http://b:1"]).unwrap();
        let Command::Host(HostCommand::Add(args)) = cli.command else {
            panic!("not host add")
        };
        let req = args.to_request(&no_read).unwrap();
        assert_eq!(req.enabled, None);
        assert_eq!(req.websocket, None);
        assert_eq!(req.preserve_host, None);
        assert_eq!(req.forwarded_headers, None);
        let host = req.host.unwrap();
        assert_eq!(host.domains, ["a.example"]);
        assert_eq!(host.upstreams, ["http://b:1"]);
    }

    #[test]
    fn add_negative_flags_send_false() {
        let cli = parse(&[
            "host",
            "add",
            "a.example",
            "b.example",
            "--upstream",
            "http://b:1",
            "--upstream",
            "http://c:1",
            "--location",
            "/ws=http://d:1",
            "--disabled",
            "--no-websocket",
            "--no-preserve-host",
            "--no-forwarded-headers",
            "--ws-idle-timeout",
            "60",
            "--upstream-timeout",
            "1500",
        ])
        .unwrap();
        let Command::Host(HostCommand::Add(args)) = cli.command else {
            panic!("not host add")
        };
        let req = args.to_request(&no_read).unwrap();
        assert_eq!(req.enabled, Some(false));
        assert_eq!(req.websocket, Some(false));
        assert_eq!(req.preserve_host, Some(false));
        assert_eq!(req.forwarded_headers, Some(false));
        let host = req.host.unwrap();
        assert_eq!(host.domains, ["a.example", "b.example"]);
        assert_eq!(host.upstreams.len(), 2);
        assert_eq!(host.locations[0].path_prefix, "/ws");
        assert_eq!(host.ws_idle_timeout_secs, 60);
        assert_eq!(host.upstream_timeout_ms, 1500);
    }

    #[test]
    fn update_sets_only_what_was_named() {
        let cli = parse(&["host", "update", "a.example", "--upstream", "http://x:1"]).unwrap();
        let Command::Host(HostCommand::Update(args)) = cli.command else {
            panic!("not host update")
        };
        let req = args.to_request(&no_read).unwrap();
        assert_eq!(req.id_or_domain, "a.example");
        assert_eq!(req.upstreams.unwrap().values, ["http://x:1"]);
        assert!(req.domains.is_none());
        assert!(req.locations.is_none());
        assert_eq!(req.enabled, None);
        assert_eq!(req.websocket, None);
        assert_eq!(req.expected_version, None);
    }

    #[test]
    fn update_clear_locations_sends_an_empty_list() {
        let cli = parse(&[
            "host",
            "update",
            "h1",
            "--clear-locations",
            "--disable",
            "--websocket",
            "false",
            "--expected-version",
            "7",
        ])
        .unwrap();
        let Command::Host(HostCommand::Update(args)) = cli.command else {
            panic!("not host update")
        };
        let req = args.to_request(&no_read).unwrap();
        assert_eq!(req.locations.unwrap().values, []);
        assert_eq!(req.enabled, Some(false));
        assert_eq!(req.websocket, Some(false));
        assert_eq!(req.expected_version, Some(7));
    }

    #[test]
    fn update_usage_errors() {
        // Nothing to change, contradictory flags, and a bad boolean.
        for args in [
            &["host", "update", "h1"][..],
            &["host", "update", "h1", "--expected-version", "3"],
            &["host", "update", "h1", "--enable", "--disable"],
            &[
                "host",
                "update",
                "h1",
                "--clear-locations",
                "--location",
                "/a=http://b:1",
            ],
            &["host", "update", "h1", "--websocket", "maybe"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn add_tls_fields_are_off_unless_asked() {
        let host = host_add(&["a.example", "--upstream", "http://b:1"])
            .host
            .unwrap();
        assert_eq!(host.cert_id, "");
        assert!(!host.force_https);
        assert_eq!(host.hsts_max_age_secs, 0);
        assert!(!host.hsts_include_subdomains);
        assert_eq!(host.upstream_ca_pem, "");
        assert!(!host.upstream_insecure_skip_verify);
    }

    #[test]
    fn add_tls_flags_fill_the_host() {
        let host = host_add(&[
            "a.example",
            "--upstream",
            "https://b:1",
            "--cert",
            "c7",
            "--force-https",
            "--hsts",
            "31536000",
            "--hsts-include-subdomains",
            "--upstream-ca",
            "/etc/ca.pem",
        ])
        .host
        .unwrap();
        assert_eq!(host.cert_id, "c7");
        assert!(host.force_https);
        assert_eq!(host.hsts_max_age_secs, 31_536_000);
        assert!(host.hsts_include_subdomains);
        assert_eq!(host.upstream_ca_pem, "--upstream-ca /etc/ca.pem");
        assert!(!host.upstream_insecure_skip_verify);

        let host = host_add(&[
            "a.example",
            "--upstream",
            "https://b:1",
            "--upstream-insecure-skip-verify",
        ])
        .host
        .unwrap();
        assert!(host.upstream_insecure_skip_verify);
        assert_eq!(host.upstream_ca_pem, "");
    }

    #[test]
    fn add_tls_usage_errors() {
        for args in [
            // includeSubDomains means nothing without a max-age.
            &[
                "host",
                "add",
                "a",
                "--upstream",
                "http://b:1",
                "--hsts-include-subdomains",
            ][..],
            // A CA to verify with, and no verification.
            &[
                "host",
                "add",
                "a",
                "--upstream",
                "http://b:1",
                "--upstream-ca",
                "/ca.pem",
                "--upstream-insecure-skip-verify",
            ],
            &[
                "host",
                "add",
                "a",
                "--upstream",
                "http://b:1",
                "--hsts",
                "-1",
            ],
            &[
                "host",
                "add",
                "a",
                "--upstream",
                "http://b:1",
                "--upstream-ca",
                "",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn add_a_missing_ca_file_is_an_error_naming_it() {
        let cli = parse(&[
            "host",
            "add",
            "a.example",
            "--upstream",
            "https://b:1",
            "--upstream-ca",
            "/missing/ca.pem",
        ])
        .unwrap();
        let Command::Host(HostCommand::Add(args)) = cli.command else {
            panic!("not host add")
        };
        let err = args.to_request(&fake_read).unwrap_err().to_string();
        assert!(err.contains("--upstream-ca"), "{err}");
        assert!(err.contains("/missing/ca.pem"), "{err}");
    }

    #[test]
    fn update_leaves_tls_fields_unset_unless_named() {
        let req = host_update(&["h1", "--name", "x"]);
        assert_eq!(req.cert_id, None);
        assert_eq!(req.force_https, None);
        assert_eq!(req.hsts_max_age_secs, None);
        assert_eq!(req.hsts_include_subdomains, None);
        assert_eq!(req.upstream_ca_pem, None);
        assert_eq!(req.upstream_insecure_skip_verify, None);
    }

    #[test]
    fn update_tls_flags() {
        let req = host_update(&[
            "h1",
            "--cert",
            "c2",
            "--force-https",
            "true",
            "--hsts",
            "0",
            "--hsts-include-subdomains",
            "false",
            "--upstream-ca",
            "/etc/ca.pem",
            "--upstream-insecure-skip-verify",
            "false",
        ]);
        assert_eq!(req.cert_id.as_deref(), Some("c2"));
        assert_eq!(req.force_https, Some(true));
        assert_eq!(req.hsts_max_age_secs, Some(0));
        assert_eq!(req.hsts_include_subdomains, Some(false));
        assert_eq!(
            req.upstream_ca_pem.as_deref(),
            Some("--upstream-ca /etc/ca.pem")
        );
        assert_eq!(req.upstream_insecure_skip_verify, Some(false));
    }

    #[test]
    fn update_unpin_and_system_roots_send_empty_strings() {
        for args in [
            &["h1", "--no-cert", "--system-roots"][..],
            &["h1", "--cert", "", "--upstream-ca", ""],
        ] {
            let req = host_update(args);
            assert_eq!(req.cert_id.as_deref(), Some(""), "{args:?}");
            assert_eq!(req.upstream_ca_pem.as_deref(), Some(""), "{args:?}");
        }
    }

    #[test]
    fn each_tls_flag_alone_is_a_change() {
        for args in [
            &["--cert", "c1"][..],
            &["--no-cert"],
            &["--force-https", "false"],
            &["--hsts", "60"],
            &["--hsts-include-subdomains", "true"],
            &["--upstream-ca", "/ca.pem"],
            &["--system-roots"],
            &["--upstream-insecure-skip-verify", "true"],
        ] {
            let all = [&["host", "update", "h1"][..], args].concat();
            assert!(parse(&all).is_ok(), "{args:?} was refused");
        }
    }

    #[test]
    fn update_tls_usage_errors() {
        for args in [
            &["host", "update", "h1", "--cert", "c1", "--no-cert"][..],
            &[
                "host",
                "update",
                "h1",
                "--upstream-ca",
                "/ca.pem",
                "--system-roots",
            ],
            &["host", "update", "h1", "--force-https"],
            &["host", "update", "h1", "--force-https", "yes"],
            &["host", "update", "h1", "--upstream-insecure-skip-verify"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn cert_add_reads_both_files() {
        let cli = parse(&[
            "cert",
            "add",
            "--cert",
            "/p/full.pem",
            "--key",
            "/p/key.pem",
        ])
        .unwrap();
        let Command::Cert(CertCommand::Add(args)) = cli.command else {
            panic!("not cert add")
        };
        let req = args.to_request(&fake_read).unwrap();
        assert_eq!(req.cert_pem, "--cert /p/full.pem");
        assert_eq!(req.key_pem, "--key /p/key.pem");
        assert_eq!(req.name, "");
    }

    #[test]
    fn cert_replace_keeps_the_id_and_the_name_is_optional() {
        let cli = parse(&[
            "cert", "replace", "c1", "--cert", "/p/c.pem", "--key", "/p/k.pem",
        ])
        .unwrap();
        let Command::Cert(CertCommand::Replace(args)) = cli.command else {
            panic!("not cert replace")
        };
        let req = args.to_request(&fake_read).unwrap();
        assert_eq!(req.id, "c1");
        assert_eq!(req.name, None);
        assert_eq!(req.key_pem, "--key /p/k.pem");

        let cli = parse(&[
            "cert", "replace", "c1", "--cert", "/p/c.pem", "--key", "/p/k.pem", "--name", "new",
        ])
        .unwrap();
        let Command::Cert(CertCommand::Replace(args)) = cli.command else {
            panic!("not cert replace")
        };
        assert_eq!(
            args.to_request(&fake_read).unwrap().name.as_deref(),
            Some("new")
        );
    }

    #[test]
    fn cert_a_missing_key_file_is_named() {
        let cli = parse(&[
            "cert",
            "add",
            "--cert",
            "/p/c.pem",
            "--key",
            "/missing/k.pem",
            "--name",
            "n",
        ])
        .unwrap();
        let Command::Cert(CertCommand::Add(args)) = cli.command else {
            panic!("not cert add")
        };
        let err = args.to_request(&fake_read).unwrap_err().to_string();
        assert!(err.contains("--key"), "{err}");
        assert!(err.contains("/missing/k.pem"), "{err}");
    }

    #[test]
    fn cert_usage_errors() {
        for args in [
            &["cert", "add", "--cert", "/c.pem"][..],
            &["cert", "add", "--key", "/k.pem"],
            &["cert", "replace", "--cert", "/c.pem", "--key", "/k.pem"],
            &["cert", "show"],
            &["cert", "rm"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("500ms", ms(500)),
            ("10s", ms(10_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1s500ms", ms(1500)),
            (" 10s ", ms(10_000)),
            ("0s", ms(0)),
            ("007s", ms(7000)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn malformed_durations_are_refused() {
        for bad in [
            "",
            "10",
            "s",
            "10 s",
            "1.5s",
            "-1s",
            "10sec",
            "5d",
            "10S",
            "1m30",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        let err = parse_duration("10").unwrap_err();
        assert!(err.contains("lacks a unit"), "{err}");
        let err = parse_duration("5d").unwrap_err();
        assert!(err.contains("unknown unit \"d\""), "{err}");
    }

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["500ms", "10s", "2m", "1h", "1m30s", "1s500ms", "1h1m1s1ms"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(crate::output::format_duration(d), text);
        }
        assert_eq!(crate::output::format_duration(Duration::ZERO), "0ms");
        assert_eq!(
            crate::output::format_duration(Duration::from_millis(90_000)),
            "1m30s"
        );
    }

    #[test]
    fn wait_timeouts_are_above_zero_and_at_most_ten_minutes() {
        assert_eq!(parse_wait_timeout("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_wait_timeout("10m"), Ok(MAX_WAIT));
        assert!(parse_wait_timeout("0s").is_err());
        assert!(parse_wait_timeout("10m1ms").is_err());
        assert!(parse_wait_timeout("1h").is_err());
    }

    #[test]
    fn every_write_takes_wait() {
        let writes: [&[&str]; 8] = [
            &["host", "add", "a.example", "--upstream", "http://b:1"],
            &["host", "update", "h1", "--name", "x"],
            &["host", "rm", "h1"],
            &["cert", "add", "--cert", "/c.pem", "--key", "/k.pem"],
            &[
                "cert", "replace", "c1", "--cert", "/c.pem", "--key", "/k.pem",
            ],
            &["cert", "rm", "c1"],
            &["token", "create", "ci"],
            &["token", "revoke", "ci"],
        ];
        for args in writes {
            assert_eq!(parse(args).unwrap().command.wait(), None, "{args:?}");
            let with = [args, &["--wait"]].concat();
            assert_eq!(
                parse(&with).unwrap().command.wait(),
                Some(Duration::from_secs(10)),
                "{args:?}"
            );
            let with = [args, &["--wait", "--wait-timeout", "1m30s"]].concat();
            assert_eq!(
                parse(&with).unwrap().command.wait(),
                Some(Duration::from_secs(90)),
                "{args:?}"
            );
            // A timeout without --wait is a mistake worth telling.
            let without = [args, &["--wait-timeout", "5s"]].concat();
            let err = parse(&without).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{args:?}");
            let bad = [args, &["--wait", "--wait-timeout", "5"]].concat();
            assert!(parse(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn reads_do_not_take_wait() {
        for args in [
            &["host", "list", "--wait"][..],
            &["host", "show", "h1", "--wait"],
            &["cert", "list", "--wait"],
            &["cluster", "members", "--wait"],
            &["cluster", "status", "--wait"],
            &["token", "list", "--wait"],
            &["node", "status", "n2", "--wait"],
            &["node", "undrain", "n2", "--wait"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn token_commands() {
        let cli = parse(&["token", "create", "ci"]).unwrap();
        let Command::Token(TokenCommand::Create { name, .. }) = &cli.command else {
            panic!("not token create")
        };
        assert_eq!(name, "ci");
        assert_eq!(cli.command.drain_wait(), None);
        for args in [&["token", "list"][..], &["token", "ls"]] {
            let cli = parse(args).unwrap();
            assert!(matches!(cli.command, Command::Token(TokenCommand::List)));
        }
        for args in [&["token", "revoke", "t-1"][..], &["token", "rm", "t-1"]] {
            // The global --token still works next to the positional.
            let with_token = [args, &["--token", "good"]].concat();
            assert_eq!(parse(&with_token).unwrap().token.as_deref(), Some("good"));
            let cli = parse(args).unwrap();
            let Command::Token(TokenCommand::Revoke { id_or_name, .. }) = cli.command else {
                panic!("not token revoke")
            };
            assert_eq!(id_or_name, "t-1");
            assert_eq!(cli.token, None);
        }
        for args in [
            &["token"][..],
            &["token", "create"],
            &["token", "create", "a", "b"],
            &["token", "revoke"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    fn drain(args: &[&str]) -> Cli {
        parse(&[&["node", "drain", "n2"], args].concat()).unwrap()
    }

    fn drain_request(args: &[&str]) -> DrainRequest {
        let Command::Node(NodeCommand::Drain(args)) = drain(args).command else {
            panic!("not node drain")
        };
        args.to_request()
    }

    #[test]
    fn drain_sends_whole_seconds_rounded_up_and_0_for_the_defaults() {
        let req = drain_request(&[]);
        assert_eq!(req.node, "n2");
        assert_eq!((req.deadline_secs, req.spread_secs), (0, 0));
        let req = drain_request(&["--deadline", "5m", "--spread", "30s"]);
        assert_eq!((req.deadline_secs, req.spread_secs), (300, 30));
        let req = drain_request(&["--deadline", "1m30s500ms", "--spread", "1ms"]);
        assert_eq!((req.deadline_secs, req.spread_secs), (91, 1));
    }

    #[test]
    fn drain_durations() {
        assert_eq!(parse_drain_secs("2s"), Ok(2));
        assert_eq!(parse_drain_secs("2001ms"), Ok(3));
        assert_eq!(parse_drain_secs("1h"), Ok(3600));
        let err = parse_drain_secs("0s").unwrap_err();
        assert!(err.contains("node's default"), "{err}");
        assert!(parse_drain_secs("5").is_err());
        assert!(parse_drain_secs("5000000000s").is_err());
    }

    #[test]
    fn drain_wait_follows_the_drain_without_a_limit_unless_given() {
        let cli = drain(&[]);
        assert_eq!(cli.command.drain_wait(), None);
        assert_eq!(cli.command.wait(), None);
        let cli = drain(&["--wait"]);
        assert_eq!(cli.command.drain_wait(), Some(DrainWait { timeout: None }));
        // Not a wait for replication.
        assert_eq!(cli.command.wait(), None);
        let cli = drain(&["--wait", "--wait-timeout", "10m"]);
        assert_eq!(
            cli.command.drain_wait(),
            Some(DrainWait {
                timeout: Some(Duration::from_secs(600))
            })
        );
        // Unlike a write's --wait, it may wait longer than 10 minutes.
        let cli = drain(&["--wait", "--wait-timeout", "1h"]);
        assert_eq!(
            cli.command.drain_wait(),
            Some(DrainWait {
                timeout: Some(Duration::from_secs(3600))
            })
        );
    }

    #[test]
    fn node_usage_errors() {
        for args in [
            &["node", "drain"][..],
            &["node", "drain", "n2", "--wait-timeout", "1m"],
            &["node", "drain", "n2", "--wait", "--wait-timeout", "0s"],
            &["node", "drain", "n2", "--deadline", "0s"],
            &["node", "drain", "n2", "--spread", "10"],
            &["node", "undrain"],
            &["node", "status"],
            &["node", "undrain", "n2", "--deadline", "1m"],
            &["node"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
        let cli = parse(&["node", "status", "n2", "-o", "json"]).unwrap();
        let Command::Node(NodeCommand::Status { node }) = cli.command else {
            panic!("not node status")
        };
        assert_eq!(node, "n2");
        assert_eq!(cli.output, OutputFormat::Json);
        let cli = parse(&["node", "undrain", "n2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Undrain { .. })
        ));
    }

    #[test]
    fn cluster_commands() {
        let cli = parse(&["cluster", "members"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::Members)
        ));
        assert_eq!(cli.command.wait(), None);
        let cli = parse(&["cluster", "ls", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::Members)
        ));
        assert_eq!(cli.output, OutputFormat::Json);
        let cli = parse(&["cluster", "status"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::Status)
        ));
        assert!(parse(&["cluster"]).is_err());
    }

    fn logs(args: &[&str]) -> LogsArgs {
        let Command::Logs(args) = parse(&[&["logs"], args].concat()).unwrap().command else {
            panic!("not logs")
        };
        args
    }

    /// 2026-11-24T10:00:00Z.
    const NOW_MS: u64 = 1_795_514_400_000;

    #[test]
    fn logs_recent_asks_for_the_last_ten_minutes_by_default() {
        let req = logs(&[]).recent_request(NOW_MS);
        assert_eq!(req.since_ms, NOW_MS - 600_000);
        assert_eq!(req.limit, 0);
        let filter = req.filter.unwrap();
        assert_eq!((filter.host.as_str(), filter.status.as_str()), ("", ""));

        let args = logs(&[
            "--host", "app.test", "--status", "5XX", "--since", "1h", "--limit", "50",
        ]);
        assert_eq!(args.nodes.scope(), Scope::Endpoint);
        let req = args.recent_request(NOW_MS);
        assert_eq!(req.since_ms, NOW_MS - 3_600_000);
        assert_eq!(req.limit, 50);
        let filter = req.filter.unwrap();
        assert_eq!(filter.host, "app.test");
        assert_eq!(filter.status, "5xx");
        // Longer ago than the epoch: everything, but never 0.
        assert_eq!(
            logs(&["--since", "500000000h"])
                .recent_request(NOW_MS)
                .since_ms,
            1
        );
    }

    #[test]
    fn logs_follow_asks_for_a_backlog_only_with_since() {
        let args = logs(&["-f", "--status", "404"]);
        assert!(args.follow);
        let req = args.follow_request(NOW_MS);
        assert_eq!(req.since_ms, 0);
        assert_eq!(req.filter.unwrap().status, "404");
        let req = logs(&["--follow", "--since", "5m"]).follow_request(NOW_MS);
        assert_eq!(req.since_ms, NOW_MS - 300_000);
    }

    #[test]
    fn logs_and_tunnels_pick_their_nodes() {
        assert_eq!(
            logs(&["--node", "n2"]).nodes.scope(),
            Scope::Node("n2".into())
        );
        assert_eq!(logs(&["--all-nodes", "-f"]).nodes.scope(), Scope::AllNodes);
        let cli = parse(&["tunnels", "--host", "h1", "--all-nodes", "-o", "json"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Tunnels(args) = cli.command else {
            panic!("not tunnels")
        };
        assert_eq!(args.to_request().host, "h1");
        assert_eq!(args.nodes.scope(), Scope::AllNodes);
        let Command::Tunnels(args) = parse(&["tunnel"]).unwrap().command else {
            panic!("not tunnels")
        };
        assert_eq!(args.to_request().host, "");
        assert_eq!(args.nodes.scope(), Scope::Endpoint);
    }

    #[test]
    fn logs_usage_errors() {
        for args in [
            &["logs", "--status", "600"][..],
            &["logs", "--status", "5x"],
            &["logs", "--node", "n1", "--all-nodes"],
            &["logs", "--since", "10"],
            &["logs", "--since", "0s"],
            &["logs", "--limit", "0"],
            &["logs", "--limit", "-1"],
            &["logs", "-f", "--limit", "5"],
            &["logs", "--wait"],
            &["logs", "n1"],
            &["tunnels", "--node", "n1", "--all-nodes"],
            &["tunnels", "--status", "5xx"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn status_filters() {
        for (text, want) in [
            ("5xx", "5xx"),
            ("4XX", "4xx"),
            (" 1xx ", "1xx"),
            ("404", "404"),
            ("100", "100"),
            ("599", "599"),
        ] {
            assert_eq!(parse_status_filter(text).as_deref(), Ok(want), "{text:?}");
        }
        for bad in [
            "", "6xx", "0xx", "x", "5x", "5xxx", "99", "600", "1000", "+404", "40x", "abc",
        ] {
            assert!(parse_status_filter(bad).is_err(), "{bad:?} was accepted");
        }
        let err = parse_status_filter("600").unwrap_err();
        assert!(err.contains("a class such as 5xx"), "{err}");
    }

    #[test]
    fn read_file_reads_and_names_a_missing_file() {
        let path = std::env::temp_dir().join(format!("charonctl-pem-{}", std::process::id()));
        std::fs::write(&path, "PEM").unwrap();
        let text = read_file("--cert", &path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text.unwrap(), "PEM");
        let err = read_file("--cert", &path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
