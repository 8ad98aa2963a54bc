//! Runs one parsed command: the files it names are read and its request is
//! built first (so a missing file is reported without a node), then one API
//! call, then its rendering: the answer on stdout, warnings on stderr.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use charon_proto::v1::{
    AddCertificateRequest, Certificate, CreateHostRequest, DeleteCertificateRequest,
    DeleteHostRequest, GetCertificateRequest, GetHostRequest, ListCertificatesRequest,
    ListHostsRequest, ProxyHost, ReplaceCertificateRequest, UpdateHostRequest,
};

use crate::cli::{self, CertCommand, Cli, Command, HostCommand, OutputFormat, ReadFile};
use crate::client::{self, Api};
use crate::error::CtlError;
use crate::output;

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let call = Call::prepare(cli.command, &cli::read_file)?;
    let source = client::token_source(cli.token, cli.token_file, |name| std::env::var(name).ok());
    let token = client::resolve_token(source)?;
    let mut api = client::connect(&cli.endpoint, &token).await?;
    let printed = call
        .execute(&mut api, cli.output == OutputFormat::Json, now_ms())
        .await
        .map_err(|status| CtlError::from_status(status, &cli.endpoint))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(printed.stdout.as_bytes())?;
    stdout.flush()?;
    let mut stderr = std::io::stderr().lock();
    stderr.write_all(printed.stderr.as_bytes())?;
    stderr.flush()?;
    Ok(())
}

/// What a successful call prints.
struct Printed {
    stdout: String,
    /// Warnings of the node, one `warning: …` line each.
    stderr: String,
}

impl From<String> for Printed {
    fn from(stdout: String) -> Self {
        Printed {
            stdout,
            stderr: String::new(),
        }
    }
}

/// One API call, its request ready to send. No `Debug`: a request may hold
/// a private key.
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
}

impl Call {
    /// Reads the files the command names and builds its request.
    fn prepare(command: Command, read: &ReadFile) -> Result<Self, CtlError> {
        Ok(match command {
            Command::Host(cmd) => match cmd {
                HostCommand::List => Call::ListHosts,
                HostCommand::Show { host } => Call::GetHost(GetHostRequest { id_or_domain: host }),
                HostCommand::Add(args) => Call::CreateHost(args.to_request(read)?),
                HostCommand::Update(args) => Call::UpdateHost(args.to_request(read)?),
                HostCommand::Rm { host } => {
                    Call::DeleteHost(DeleteHostRequest { id_or_domain: host })
                }
            },
            Command::Cert(cmd) => match cmd {
                CertCommand::List => Call::ListCertificates,
                CertCommand::Show { id } => Call::GetCertificate(GetCertificateRequest { id }),
                CertCommand::Add(args) => Call::AddCertificate(args.to_request(read)?),
                CertCommand::Replace(args) => Call::ReplaceCertificate(args.to_request(read)?),
                CertCommand::Rm { id } => Call::DeleteCertificate(DeleteCertificateRequest { id }),
            },
        })
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
        Ok(match self {
            Call::ListHosts => {
                let list = hosts.list_hosts(ListHostsRequest {}).await?.into_inner();
                if json {
                    to_json(&output::hosts_json(&list.hosts))
                } else {
                    output::hosts_table(&list.hosts)
                }
                .into()
            }
            Call::GetHost(request) => {
                let host = hosts.get_host(request).await?.into_inner();
                show_host(&host, None, json).into()
            }
            Call::CreateHost(request) => {
                let host = hosts.create_host(request).await?.into_inner();
                show_host(&host, Some("created"), json).into()
            }
            Call::UpdateHost(request) => {
                let host = hosts.update_host(request).await?.into_inner();
                show_host(&host, Some("updated"), json).into()
            }
            Call::DeleteHost(request) => {
                let id = hosts.delete_host(request).await?.into_inner().id;
                deleted("host", &id, json).into()
            }
            Call::ListCertificates => {
                let list = certs
                    .list_certificates(ListCertificatesRequest {})
                    .await?
                    .into_inner();
                if json {
                    to_json(&output::certs_json(&list.certificates))
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
                let reply = certs.add_certificate(request).await?.into_inner();
                let cert = reply.certificate.unwrap_or_default();
                Printed {
                    stdout: show_cert(&cert, Some("added"), json, now_ms),
                    stderr: output::warnings(&reply.warnings),
                }
            }
            Call::ReplaceCertificate(request) => {
                let reply = certs.replace_certificate(request).await?.into_inner();
                let cert = reply.certificate.unwrap_or_default();
                Printed {
                    stdout: show_cert(&cert, Some("replaced"), json, now_ms),
                    stderr: output::warnings(&reply.warnings),
                }
            }
            Call::DeleteCertificate(request) => {
                let id = certs.delete_certificate(request).await?.into_inner().id;
                deleted("certificate", &id, json).into()
            }
        })
    }
}

/// One host; after a change, table mode first says what happened.
fn show_host(host: &ProxyHost, action: Option<&str>, json: bool) -> String {
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

/// One certificate; after a change, table mode first says what happened.
fn show_cert(cert: &Certificate, action: Option<&str>, json: bool, now_ms: u64) -> String {
    if json {
        return to_json(&output::cert_json(cert));
    }
    let details = output::cert_details(cert, now_ms);
    match action {
        Some(action) => format!("{action} certificate {}\n{details}", cert.id),
        None => details,
    }
}

fn deleted(kind: &str, id: &str, json: bool) -> String {
    if json {
        to_json(&serde_json::json!({ "id": id }))
    } else {
        format!("deleted {kind} {id}\n")
    }
}

fn to_json(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a json Value always serializes");
    text.push('\n');
    text
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
