//! Runs one parsed command: one API call, then its rendering on stdout.

use std::io::Write;

use charon_proto::v1::{DeleteHostRequest, GetHostRequest, ListHostsRequest, ProxyHost};

use crate::cli::{Cli, Command, HostCommand, OutputFormat};
use crate::client::{self, Hosts};
use crate::error::CtlError;
use crate::output;

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let source = client::token_source(cli.token, cli.token_file, |name| std::env::var(name).ok());
    let token = client::resolve_token(source)?;
    let mut hosts = client::connect(&cli.endpoint, &token).await?;
    let text = match cli.command {
        Command::Host(cmd) => host(&mut hosts, cmd, cli.output)
            .await
            .map_err(|status| CtlError::from_status(status, &cli.endpoint))?,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Makes the call and returns what to print.
async fn host(
    hosts: &mut Hosts,
    cmd: HostCommand,
    format: OutputFormat,
) -> Result<String, tonic::Status> {
    let json = format == OutputFormat::Json;
    Ok(match cmd {
        HostCommand::List => {
            let list = hosts.list_hosts(ListHostsRequest {}).await?.into_inner();
            if json {
                to_json(&output::hosts_json(&list.hosts))
            } else {
                output::hosts_table(&list.hosts)
            }
        }
        HostCommand::Show { host } => {
            let request = GetHostRequest { id_or_domain: host };
            let host = hosts.get_host(request).await?.into_inner();
            show(&host, None, json)
        }
        HostCommand::Add(args) => {
            let host = hosts.create_host(args.to_request()).await?.into_inner();
            show(&host, Some("created"), json)
        }
        HostCommand::Update(args) => {
            let host = hosts.update_host(args.to_request()).await?.into_inner();
            show(&host, Some("updated"), json)
        }
        HostCommand::Rm { host } => {
            let request = DeleteHostRequest { id_or_domain: host };
            let id = hosts.delete_host(request).await?.into_inner().id;
            if json {
                to_json(&serde_json::json!({ "id": id }))
            } else {
                format!("deleted host {id}\n")
            }
        }
    })
}

/// One host; after a change, table mode first says what happened.
fn show(host: &ProxyHost, action: Option<&str>, json: bool) -> String {
    if json {
        return to_json(&output::host_json(host));
    }
    let details = output::host_details(host);
    match action {
        Some(action) => format!(
            "{action} host {} (version {})\n{details}",
            host.id, host.version
        ),
        None => details,
    }
}

fn to_json(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a json Value always serializes");
    text.push('\n');
    text
}
