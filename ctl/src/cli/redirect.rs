//! `charonctl redirect`: the flags and the requests they make. A
//! redirect host is a host whose every request is answered with a
//! redirect, so the requests are the Hosts API's.

use charon_proto::v1::{
    CreateHostRequest, DeleteHostRequest, GetHostRequest, ProxyHost, UpdateHostRequest,
};
use clap::{Args, Subcommand};

use super::WaitArgs;

#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Redirect every request for DOMAIN to --to.
    ///
    /// Example:
    ///   charonctl redirect add old.example --to https://new.example --code 308 --keep-path
    #[command(verbatim_doc_comment)]
    Add(RedirectAddArgs),
    /// List the redirect hosts.
    #[command(alias = "ls")]
    List,
    /// Show one redirect host.
    #[command(alias = "get")]
    Show {
        #[arg(value_name = "ID|DOMAIN")]
        host: String,
    },
    /// Change a redirect host; flags not given keep their value.
    Update(RedirectUpdateArgs),
    /// Remove a redirect host.
    #[command(alias = "delete")]
    Rm {
        #[arg(value_name = "ID|DOMAIN")]
        host: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct RedirectAddArgs {
    /// The domains to redirect (unique among all hosts).
    #[arg(value_name = "DOMAIN", required = true)]
    pub domains: Vec<String>,
    /// Where to: an absolute http:// or https:// URL on another name.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// 301 (default), 302, 307 or 308.
    #[arg(long, value_name = "CODE", value_parser = parse_code)]
    pub code: Option<u32>,
    /// Append the request's path and query to --to.
    #[arg(long)]
    pub keep_path: bool,
    /// A label for operators (default: the first domain).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RedirectUpdateArgs {
    #[arg(value_name = "ID|DOMAIN")]
    pub host: String,
    /// Replace the domains; repeat for several.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Vec<String>,
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    #[arg(long, value_name = "CODE", value_parser = parse_code)]
    pub code: Option<u32>,
    #[arg(long, value_name = "true|false")]
    pub keep_path: Option<bool>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// The four redirect codes; anything else is a usage error.
fn parse_code(v: &str) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(c @ (301 | 302 | 307 | 308)) => Ok(c),
        _ => Err(format!("{v:?} must be 301, 302, 307 or 308")),
    }
}

impl RedirectCommand {
    pub fn wait(&self) -> Option<&WaitArgs> {
        match self {
            RedirectCommand::Add(a) => Some(&a.wait),
            RedirectCommand::Update(a) => Some(&a.wait),
            RedirectCommand::Rm { wait, .. } => Some(wait),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub enum RedirectCall {
    List,
    Get(GetHostRequest),
    Create(CreateHostRequest),
    Update(UpdateHostRequest),
    Delete(DeleteHostRequest),
}

impl RedirectCall {
    pub fn prepare(cmd: RedirectCommand) -> RedirectCall {
        match cmd {
            RedirectCommand::List => RedirectCall::List,
            RedirectCommand::Show { host } => {
                RedirectCall::Get(GetHostRequest { id_or_domain: host })
            }
            RedirectCommand::Rm { host, .. } => RedirectCall::Delete(DeleteHostRequest {
                id_or_domain: host,
                expected_version: None,
            }),
            RedirectCommand::Add(a) => RedirectCall::Create(CreateHostRequest {
                host: Some(ProxyHost {
                    name: a.name.unwrap_or_default(),
                    domains: a.domains,
                    redirect_to: a.to,
                    redirect_code: a.code.unwrap_or(0),
                    redirect_keep_path: a.keep_path,
                    ..ProxyHost::default()
                }),
                ..CreateHostRequest::default()
            }),
            RedirectCommand::Update(a) => RedirectCall::Update(UpdateHostRequest {
                id_or_domain: a.host,
                domains: (!a.domain.is_empty())
                    .then_some(charon_proto::v1::StringList { values: a.domain }),
                redirect_to: a.to,
                redirect_code: a.code,
                redirect_keep_path: a.keep_path,
                ..UpdateHostRequest::default()
            }),
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            RedirectCall::List => "Hosts.ListHosts",
            RedirectCall::Get(_) => "Hosts.GetHost",
            RedirectCall::Create(_) => "Hosts.CreateHost",
            RedirectCall::Update(_) => "Hosts.UpdateHost",
            RedirectCall::Delete(_) => "Hosts.DeleteHost",
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};

    use super::*;

    fn redirect(args: &[&str]) -> Result<RedirectCommand, clap::Error> {
        let mut all = vec!["charonctl", "redirect"];
        all.extend_from_slice(args);
        match Cli::try_parse_args(all)?.command {
            Command::Redirect(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_fills_the_redirect_fields() {
        let cmd = redirect(&[
            "add",
            "old.example",
            "www.old.example",
            "--to",
            "https://new.example",
            "--code",
            "308",
            "--keep-path",
        ])
        .unwrap();
        let RedirectCall::Create(req) = RedirectCall::prepare(cmd) else {
            panic!("not a create");
        };
        let h = req.host.unwrap();
        assert_eq!(h.domains, ["old.example", "www.old.example"]);
        assert_eq!(
            (
                h.redirect_to.as_str(),
                h.redirect_code,
                h.redirect_keep_path
            ),
            ("https://new.example", 308, true)
        );
        assert!(h.upstreams.is_empty());
    }

    #[test]
    fn codes_other_than_the_four_are_usage_errors() {
        assert!(redirect(&[
            "add",
            "a.example",
            "--to",
            "https://b.example",
            "--code",
            "303"
        ])
        .is_err());
        assert!(redirect(&["add", "a.example"]).is_err(), "--to is required");
        let RedirectCall::Update(req) =
            RedirectCall::prepare(redirect(&["update", "a.example", "--code", "302"]).unwrap())
        else {
            panic!("not an update");
        };
        assert_eq!((req.redirect_code, req.redirect_to), (Some(302), None));
    }
}
