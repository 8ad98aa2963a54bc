//! The command line: clap types, the parsers of flag values, and the
//! translation of parsed arguments into API requests.
//!
//! Everything here is pure, so a bad flag is reported by clap (exit 2, naming
//! the flag) before any connection is made.

use std::path::PathBuf;

use charon_proto::v1::{
    CreateHostRequest, Location, LocationList, ProxyHost, StringList, UpdateHostRequest,
};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

const GLOBAL: &str = "Global options";

/// Manage a Charon cluster through the gRPC API of any of its nodes.
#[derive(Debug, Parser)]
#[command(name = "charonctl", version, propagate_version = true)]
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
        let cli = Self::try_parse_from(args)?;
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
                     --ws-ping-interval, --upstream-timeout",
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
    /// Delete a proxy host.
    #[command(alias = "delete")]
    Rm {
        /// The host's id or one of its domains.
        #[arg(value_name = "ID|DOMAIN")]
        host: String,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Domains served by this host: exact names, `*.wildcard` names or IP literals.
    #[arg(required = true, value_name = "DOMAIN")]
    pub domains: Vec<String>,

    /// Upstream URL (`http://host:port` or `https://host:port`); repeat for several.
    #[arg(long, required = true, value_name = "URL")]
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
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The host's id or one of its domains.
    #[arg(value_name = "ID|DOMAIN")]
    pub host: String,

    /// Replace the domains; repeat for several.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Vec<String>,

    /// Replace the upstreams; repeat for several.
    #[arg(long, value_name = "URL")]
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

    /// Apply the change only if the host is still at this version.
    #[arg(long, value_name = "V")]
    pub expected_version: Option<u64>,
}

impl AddArgs {
    /// The booleans are sent only when a flag asked for a change, so that a
    /// plain `host add` gets whatever defaults the node documents.
    pub fn to_request(&self) -> CreateHostRequest {
        CreateHostRequest {
            host: Some(ProxyHost {
                name: self.name.clone().unwrap_or_default(),
                domains: self.domains.clone(),
                upstreams: self.upstream.clone(),
                locations: self.location.clone(),
                ws_idle_timeout_secs: self.ws_idle_timeout.unwrap_or(0),
                ws_ping_interval_secs: self.ws_ping_interval.unwrap_or(0),
                upstream_timeout_ms: self.upstream_timeout.unwrap_or(0),
                ..ProxyHost::default()
            }),
            enabled: self.disabled.then_some(false),
            websocket: self.no_websocket.then_some(false),
            preserve_host: self.no_preserve_host.then_some(false),
            forwarded_headers: self.no_forwarded_headers.then_some(false),
        }
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
    }

    /// Only what the user named is set: an unset field or list keeps the
    /// host's current value, a set list replaces the whole list.
    pub fn to_request(&self) -> UpdateHostRequest {
        let list = |values: &[String]| {
            (!values.is_empty()).then(|| StringList {
                values: values.to_vec(),
            })
        };
        let locations = (self.clear_locations || !self.location.is_empty()).then(|| LocationList {
            values: self.location.clone(),
        });
        let enabled = match (self.enable, self.disable) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        UpdateHostRequest {
            id_or_domain: self.host.clone(),
            name: self.name.clone(),
            domains: list(&self.domain),
            upstreams: list(&self.upstream),
            locations,
            enabled,
            websocket: self.websocket,
            preserve_host: self.preserve_host,
            forwarded_headers: self.forwarded_headers,
            ws_idle_timeout_secs: self.ws_idle_timeout,
            ws_ping_interval_secs: self.ws_ping_interval,
            upstream_timeout_ms: self.upstream_timeout,
            expected_version: self.expected_version,
        }
    }
}

/// Parses `--location PATH=URL[,URL...]`. The node validates the path and the
/// URLs themselves; here we only catch what cannot be a location at all.
pub fn parse_location(value: &str) -> Result<Location, String> {
    const SHAPE: &str = "expected PATH=URL[,URL...], e.g. /api=http://10.0.0.5:8080";
    let (path, urls) = value.split_once('=').ok_or(SHAPE)?;
    let path = path.trim();
    if path.is_empty() {
        return Err(format!("the path is empty; {SHAPE}"));
    }
    let upstreams: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
    if upstreams.iter().any(String::is_empty) {
        return Err(format!("an upstream URL is empty; {SHAPE}"));
    }
    Ok(Location {
        path_prefix: path.to_string(),
        upstreams,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_args(std::iter::once("charonctl").chain(args.iter().copied()))
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
        let req = args.to_request();
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
        let req = args.to_request();
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
        let req = args.to_request();
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
        let req = args.to_request();
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
}
