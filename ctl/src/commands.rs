//! Runs one parsed command: the files it names are read and its request is
//! built first (so a missing file is reported without a node), then one API
//! call, then its rendering: the answer on stdout, warnings on stderr. With
//! `--wait`, a write is followed by `Cluster.WaitForWrite`, reported on
//! stderr so that stdout stays the write's answer; `node drain --wait` is
//! followed by polls of `Nodes.DrainStatus` instead (see [`crate::drain`]).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use charon_proto::v1::{
    AddCertificateRequest, Certificate, ClusterStatusRequest, CreateHostRequest,
    CreateTokenRequest, DeleteCertificateRequest, DeleteHostRequest, DrainRequest,
    DrainStatusRequest, GetCertificateRequest, GetHostRequest, ListCertificatesRequest,
    ListHostsRequest, ListMembersRequest, ListTokensRequest, ProxyHost, ReplaceCertificateRequest,
    RevokeTokenRequest, UndrainRequest, UpdateHostRequest, WaitForWriteRequest,
};
use serde::Serialize;
use tonic::metadata::MetadataMap;

use crate::cli::{
    self, CertCommand, Cli, ClusterCommand, Command, HostCommand, NodeCommand, OutputFormat,
    ReadFile, TokenCommand,
};
use crate::client::{self, Api, WriteStamp};
use crate::error::{CtlError, EXIT_NOT_REPLICATED};
use crate::output::{now_ms, to_json};
use crate::{drain, observe, output};

/// Runs the command. The exit code is [`EXIT_NOT_REPLICATED`] when `--wait`
/// ran out of time, 0 otherwise; a failure is an `Err`. `logs` and
/// `tunnels`, which may ask several nodes, are run by [`crate::observe`].
pub async fn run(cli: Cli) -> Result<ExitCode, CtlError> {
    let json = cli.output == OutputFormat::Json;
    let source = client::token_source(cli.token, cli.token_file, |name| std::env::var(name).ok());
    let command = match cli.command {
        Command::Logs(args) => {
            let token = client::resolve_token(source)?;
            return observe::logs(args, &cli.endpoint, &token, json).await;
        }
        Command::Tunnels(args) => {
            let token = client::resolve_token(source)?;
            return observe::tunnels(args, &cli.endpoint, &token, json).await;
        }
        Command::Host(HostCommand::Upstream(cmd)) => {
            let token = client::resolve_token(source)?;
            return crate::balance_cmd::upstream(cmd, &cli.endpoint, &token, json).await;
        }
        command => command,
    };
    let wait = command.wait();
    let drain_wait = command.drain_wait();
    let call = Call::prepare(command, &cli::read_file)?;
    let method = call.method();
    let token = client::resolve_token(source)?;
    let mut api = client::connect(&cli.endpoint, &token, client::call_timeout(wait)).await?;
    let printed = execute_retrying(call, &mut api, json, &cli.endpoint)
        .await
        .map_err(|status| CtlError::from_call(status, method, &cli.endpoint))?;
    // The write's answer goes out before the wait, which may take a while.
    print(&printed.stdout, &printed.stderr)?;
    if let (Some(drain_wait), Some(node)) = (drain_wait, &printed.drained_node) {
        return drain::follow(&mut api.nodes, node, drain_wait, json, &cli.endpoint).await;
    }
    let Some(timeout) = wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let (report, complete) =
        wait_for_write(&mut api.cluster, &printed.metadata, timeout, &cli.endpoint).await?;
    print("", &report)?;
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_REPLICATED)
    })
}

/// How long a call refused by a node that is still catching up with the
/// cluster after a restart is retried: catching up takes well under this.
const CATCH_UP_RETRY: Duration = Duration::from_secs(15);

/// Makes the call; while the node answers that it is catching up, says so
/// once on stderr and sends the same call again (with the same idempotency
/// key, see [`client::BearerAuth`], so a create is never made twice).
async fn execute_retrying(
    call: Call,
    api: &mut Api,
    json: bool,
    endpoint: &str,
) -> Result<Printed, tonic::Status> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match call.clone().execute(api, json, now_ms()).await {
            Err(s) if catching_up(&s) && started.elapsed() < CATCH_UP_RETRY => {
                if !said {
                    eprintln!(
                        "charonctl: {endpoint} is catching up with the cluster after a start; \
                         retrying for up to {}s",
                        CATCH_UP_RETRY.as_secs()
                    );
                    said = true;
                }
                // Retry interval while the node catches up.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            other => return other,
        }
    }
}

/// The node's answer to a write before it has caught up (see the node's
/// `api::writes`).
fn catching_up(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().contains("not caught up")
}

fn print(stdout: &str, stderr: &str) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    out.write_all(stdout.as_bytes())?;
    out.flush()?;
    let mut err = std::io::stderr().lock();
    err.write_all(stderr.as_bytes())?;
    err.flush()?;
    Ok(())
}

/// `--wait` after a write: waits for the write named by the answer's
/// metadata to reach every live node. Returns the stderr report and whether
/// every live node applied it; a write that changed nothing has nothing to
/// wait for.
async fn wait_for_write(
    cluster: &mut client::Cluster,
    metadata: &MetadataMap,
    timeout: Duration,
    endpoint: &str,
) -> Result<(String, bool), CtlError> {
    let Some(stamp) = WriteStamp::from_metadata(metadata)? else {
        return Ok(("nothing changed; nothing to wait for\n".to_string(), true));
    };
    let request = WaitForWriteRequest {
        origin: stamp.origin,
        seq: stamp.seq,
        // At most MAX_WAIT (10 minutes), so it fits.
        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
    };
    let reply = cluster
        .wait_for_write(request)
        .await
        .map_err(|status| {
            CtlError::Wait(Box::new(CtlError::from_call(
                status,
                "Cluster.WaitForWrite",
                endpoint,
            )))
        })?
        .into_inner();
    Ok((output::wait_report(&reply, timeout), reply.complete))
}

/// What a successful call prints.
struct Printed {
    stdout: String,
    /// Warnings of the node, one `warning: …` line each.
    stderr: String,
    /// The answer's metadata: for a write, the version `--wait` waits for.
    metadata: MetadataMap,
    /// After `node drain`: the id (or, failing that, the name) of the node
    /// that `--wait` follows.
    drained_node: Option<String>,
}

impl Printed {
    /// A write's answer, with the metadata that names the write.
    fn with_metadata(stdout: String, metadata: MetadataMap) -> Self {
        Printed {
            stdout,
            stderr: String::new(),
            metadata,
            drained_node: None,
        }
    }
}

impl From<String> for Printed {
    fn from(stdout: String) -> Self {
        Printed::with_metadata(stdout, MetadataMap::new())
    }
}

/// One API call, its request ready to send. No `Debug`: a request may hold
/// a private key. `Clone`: a call refused by a node that is catching up is
/// sent again.
#[derive(Clone)]
enum Call {
    ListHosts,
    GetHost(GetHostRequest),
    CreateHost(CreateHostRequest),
    UpdateHost(UpdateHostRequest),
    DeleteHost(DeleteHostRequest),
    ListCertificates,
    GetCertificate(GetCertificateRequest),
    AddCertificate(AddCertificateRequest),
    ReplaceCertificate(ReplaceCertificateRequest),
    DeleteCertificate(DeleteCertificateRequest),
    ListMembers,
    ClusterStatus,
    CreateToken(CreateTokenRequest),
    ListTokens,
    RevokeToken(RevokeTokenRequest),
    /// `follow`: `--wait` follows the drain, and stdout is left to its end
    /// in JSON mode.
    Drain {
        request: DrainRequest,
        follow: bool,
    },
    Undrain(UndrainRequest),
    DrainStatus(DrainStatusRequest),
    Acl(cli::acl::AclCall),
    Redirect(cli::redirect::RedirectCall),
}

impl Call {
    /// Reads the files the command names and builds its request.
    fn prepare(command: Command, read: &ReadFile) -> Result<Self, CtlError> {
        let follow = command.drain_wait().is_some();
        Ok(match command {
            Command::Host(cmd) => match cmd {
                HostCommand::List => Call::ListHosts,
                // Run before any call is prepared (see `run`).
                HostCommand::Upstream(_) => {
                    unreachable!("host upstream is run by balance::upstream")
                }
                HostCommand::Show { host } => Call::GetHost(GetHostRequest { id_or_domain: host }),
                HostCommand::Add(args) => Call::CreateHost(args.to_request(read)?),
                HostCommand::Update(args) => Call::UpdateHost(args.to_request(read)?),
                HostCommand::Rm {
                    host,
                    expected_version,
                    ..
                } => Call::DeleteHost(DeleteHostRequest {
                    id_or_domain: host,
                    expected_version,
                }),
            },
            Command::Cert(cmd) => match cmd {
                CertCommand::List => Call::ListCertificates,
                CertCommand::Show { id } => Call::GetCertificate(GetCertificateRequest { id }),
                CertCommand::Add(args) => Call::AddCertificate(args.to_request(read)?),
                CertCommand::Replace(args) => Call::ReplaceCertificate(args.to_request(read)?),
                CertCommand::Rm {
                    id,
                    expected_version,
                    ..
                } => Call::DeleteCertificate(DeleteCertificateRequest {
                    id,
                    expected_version,
                }),
            },
            Command::Cluster(cmd) => match cmd {
                ClusterCommand::Members => Call::ListMembers,
                ClusterCommand::Status => Call::ClusterStatus,
            },
            Command::Token(cmd) => match cmd {
                TokenCommand::Create { name, .. } => Call::CreateToken(CreateTokenRequest { name }),
                TokenCommand::List => Call::ListTokens,
                TokenCommand::Revoke { id_or_name, .. } => {
                    Call::RevokeToken(RevokeTokenRequest { id_or_name })
                }
            },
            Command::Node(cmd) => match cmd {
                NodeCommand::Drain(args) => Call::Drain {
                    request: args.to_request(),
                    follow,
                },
                NodeCommand::Undrain { node } => Call::Undrain(UndrainRequest { node }),
                NodeCommand::Status { node } => Call::DrainStatus(DrainStatusRequest { node }),
            },
            Command::Acl(cmd) => {
                Call::Acl(cli::acl::AclCall::prepare(cmd).map_err(CtlError::Refused)?)
            }
            Command::Redirect(cmd) => Call::Redirect(cli::redirect::RedirectCall::prepare(cmd)),
            Command::Logs(_) | Command::Tunnels(_) => {
                unreachable!("run() hands logs and tunnels to crate::observe")
            }
        })
    }

    /// The API method the call makes, as `Service.Method`.
    fn method(&self) -> &'static str {
        match self {
            Call::ListHosts => "Hosts.ListHosts",
            Call::GetHost(_) => "Hosts.GetHost",
            Call::CreateHost(_) => "Hosts.CreateHost",
            Call::UpdateHost(_) => "Hosts.UpdateHost",
            Call::DeleteHost(_) => "Hosts.DeleteHost",
            Call::ListCertificates => "Certificates.ListCertificates",
            Call::GetCertificate(_) => "Certificates.GetCertificate",
            Call::AddCertificate(_) => "Certificates.AddCertificate",
            Call::ReplaceCertificate(_) => "Certificates.ReplaceCertificate",
            Call::DeleteCertificate(_) => "Certificates.DeleteCertificate",
            Call::ListMembers => "Cluster.ListMembers",
            Call::ClusterStatus => "Cluster.Status",
            Call::CreateToken(_) => "Tokens.CreateToken",
            Call::ListTokens => "Tokens.ListTokens",
            Call::RevokeToken(_) => "Tokens.RevokeToken",
            Call::Drain { .. } => "Nodes.Drain",
            Call::Undrain(_) => "Nodes.Undrain",
            Call::DrainStatus(_) => "Nodes.DrainStatus",
            Call::Acl(c) => c.method(),
            Call::Redirect(c) => c.method(),
        }
    }

    /// Makes the call and returns what to print; `now_ms` dates the days
    /// left of certificates.
    async fn execute(
        self,
        api: &mut Api,
        json: bool,
        now_ms: u64,
    ) -> Result<Printed, tonic::Status> {
        let hosts = &mut api.hosts;
        let certs = &mut api.certificates;
        let cluster = &mut api.cluster;
        let tokens = &mut api.tokens;
        let nodes = &mut api.nodes;
        Ok(match self {
            Call::ListHosts => {
                let list = hosts.list_hosts(ListHostsRequest {}).await?.into_inner();
                if json {
                    to_json(&list.hosts)
                } else {
                    output::hosts_table(&list.hosts)
                }
                .into()
            }
            Call::GetHost(request) => {
                let host = hosts.get_host(request).await?.into_inner();
                let mut out = show_host(&host, None, json);
                if !json {
                    // This node's view of each upstream; a node without the
                    // Balance service (older) is simply not asked.
                    let req = charon_proto::v1::UpstreamStatusRequest {
                        id_or_domain: host.id.clone(),
                    };
                    if let Ok(r) = api.balance.upstream_status(req).await {
                        out.push_str(&crate::balance_cmd::status_table(&r.into_inner().upstreams));
                    }
                }
                out.into()
            }
            Call::CreateHost(request) => {
                let (metadata, host, _) = hosts.create_host(request).await?.into_parts();
                Printed::with_metadata(show_host(&host, Some("created"), json), metadata)
            }
            Call::UpdateHost(request) => {
                let (metadata, host, _) = hosts.update_host(request).await?.into_parts();
                Printed::with_metadata(show_host(&host, Some("updated"), json), metadata)
            }
            Call::DeleteHost(request) => {
                let (metadata, reply, _) = hosts.delete_host(request).await?.into_parts();
                Printed::with_metadata(deleted("host", &reply.id, &reply, json), metadata)
            }
            Call::ListCertificates => {
                let list = certs
                    .list_certificates(ListCertificatesRequest {})
                    .await?
                    .into_inner();
                if json {
                    to_json(&list.certificates)
                } else {
                    output::certs_table(&list.certificates, now_ms)
                }
                .into()
            }
            Call::GetCertificate(request) => {
                let cert = certs.get_certificate(request).await?.into_inner();
                show_cert(&cert, None, json, now_ms).into()
            }
            Call::AddCertificate(request) => {
                let (metadata, reply, _) = certs.add_certificate(request).await?.into_parts();
                let cert = reply.certificate.unwrap_or_default();
                Printed {
                    stdout: show_cert(&cert, Some("added"), json, now_ms),
                    stderr: output::warnings(&reply.warnings),
                    metadata,
                    drained_node: None,
                }
            }
            Call::ReplaceCertificate(request) => {
                let (metadata, reply, _) = certs.replace_certificate(request).await?.into_parts();
                let cert = reply.certificate.unwrap_or_default();
                Printed {
                    stdout: show_cert(&cert, Some("replaced"), json, now_ms),
                    stderr: output::warnings(&reply.warnings),
                    metadata,
                    drained_node: None,
                }
            }
            Call::DeleteCertificate(request) => {
                let (metadata, reply, _) = certs.delete_certificate(request).await?.into_parts();
                Printed::with_metadata(deleted("certificate", &reply.id, &reply, json), metadata)
            }
            Call::ListMembers => {
                let list = cluster
                    .list_members(ListMembersRequest {})
                    .await?
                    .into_inner();
                if json {
                    to_json(&list.members)
                } else {
                    output::members_table(&list.members)
                }
                .into()
            }
            Call::ClusterStatus => {
                let status = cluster.status(ClusterStatusRequest {}).await?.into_inner();
                if json {
                    to_json(&status)
                } else {
                    output::status_table(&status)
                }
                .into()
            }
            Call::CreateToken(request) => {
                let (metadata, reply, _) = tokens.create_token(request).await?.into_parts();
                let stdout = if json {
                    to_json(&reply)
                } else {
                    output::token_created(&reply)
                };
                Printed::with_metadata(stdout, metadata)
            }
            Call::ListTokens => {
                let list = tokens.list_tokens(ListTokensRequest {}).await?.into_inner();
                if json {
                    to_json(&list.tokens)
                } else {
                    output::tokens_table(&list.tokens)
                }
                .into()
            }
            Call::RevokeToken(request) => {
                let (metadata, reply, _) = tokens.revoke_token(request).await?.into_parts();
                let stdout = if json {
                    to_json(&reply)
                } else {
                    format!("revoked token {}\n", reply.id)
                };
                Printed::with_metadata(stdout, metadata)
            }
            Call::Drain { request, follow } => {
                let node = request.node.clone();
                let (metadata, reply, _) = nodes.drain(request).await?.into_parts();
                let line = output::drain_started(&reply);
                // With --wait in JSON mode, stdout is the drain's last status.
                let (stdout, stderr) = match (json, follow) {
                    (false, _) => (line, String::new()),
                    (true, false) => (to_json(&reply), String::new()),
                    (true, true) => (String::new(), line),
                };
                let drained_node = if reply.node_id.is_empty() {
                    node
                } else {
                    reply.node_id
                };
                Printed {
                    stdout,
                    stderr,
                    metadata,
                    drained_node: Some(drained_node),
                }
            }
            Call::Undrain(request) => {
                let (metadata, reply, _) = nodes.undrain(request).await?.into_parts();
                let stdout = if json {
                    to_json(&reply)
                } else {
                    output::undrained(&reply)
                };
                Printed::with_metadata(stdout, metadata)
            }
            Call::Redirect(call) => {
                let (stdout, metadata) =
                    crate::redirect::execute(call, &mut api.hosts, json).await?;
                Printed::with_metadata(stdout, metadata)
            }
            Call::Acl(call) => {
                let (stdout, metadata) =
                    crate::access::execute(call, &mut api.access, json).await?;
                Printed::with_metadata(stdout, metadata)
            }
            Call::DrainStatus(request) => {
                let status = nodes.drain_status(request).await?.into_inner();
                if json {
                    to_json(&status)
                } else {
                    output::drain_status_details(&status, now_ms)
                }
                .into()
            }
        })
    }
}

/// One host; after a change, table mode first says what happened.
fn show_host(host: &ProxyHost, action: Option<&str>, json: bool) -> String {
    if json {
        return to_json(host);
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

/// One certificate; after a change, table mode first says what happened.
fn show_cert(cert: &Certificate, action: Option<&str>, json: bool, now_ms: u64) -> String {
    if json {
        return to_json(cert);
    }
    let details = output::cert_details(cert, now_ms);
    match action {
        Some(action) => format!("{action} certificate {}\n{details}", cert.id),
        None => details,
    }
}

/// A deletion: the reply (`{"id": ...}`) in JSON, a sentence otherwise.
fn deleted(kind: &str, id: &str, reply: &impl Serialize, json: bool) -> String {
    if json {
        to_json(reply)
    } else {
        format!("deleted {kind} {id}\n")
    }
}
