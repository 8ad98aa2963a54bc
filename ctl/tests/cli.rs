//! Runs the real `charonctl` binary. No Charon node is needed: the tests
//! either point it at a port where nothing listens, stop it at argument
//! parsing, or serve the `Hosts`, `Certificates`, `Cluster`, `Tokens`,
//! `Nodes`, `Logs` and `Tunnels` APIs from a small in-process fake that
//! records what the CLI sent. Several fakes listing each other as members
//! make a cluster for `--all-nodes`.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use charon_proto::v1::certificates_server::{Certificates, CertificatesServer};
use charon_proto::v1::cluster_server::{Cluster, ClusterServer};
use charon_proto::v1::hosts_server::{Hosts, HostsServer};
use charon_proto::v1::logs_server::{Logs, LogsServer};
use charon_proto::v1::nodes_server::{Nodes, NodesServer};
use charon_proto::v1::tokens_server::{Tokens, TokensServer};
use charon_proto::v1::tunnels_server::{Tunnels, TunnelsServer};
use charon_proto::v1::{
    AddCertificateRequest, ApiToken, Certificate, CertificateReply, ClusterStatusRequest,
    ClusterStatusResponse, CreateHostRequest, CreateTokenRequest, CreateTokenResponse,
    DeleteCertificateRequest, DeleteCertificateResponse, DeleteHostRequest, DeleteHostResponse,
    DrainRequest, DrainResponse, DrainStatusRequest, DrainStatusResponse, FollowLogsRequest,
    GetCertificateRequest, GetHostRequest, ListCertificatesRequest, ListCertificatesResponse,
    ListHostsRequest, ListHostsResponse, ListMembersRequest, ListMembersResponse,
    ListTokensRequest, ListTokensResponse, ListTunnelsRequest, ListTunnelsResponse, LogEvent,
    LogFilter, Member, ProxyHost, RecentLogsRequest, RecentLogsResponse, ReplaceCertificateRequest,
    RevokeTokenRequest, RevokeTokenResponse, Tunnel, UndrainRequest, UndrainResponse,
    UpdateHostRequest, WaitForWriteRequest, WaitForWriteResponse,
};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_charonctl");

/// The binary with a clean environment, so a developer's exported
/// `CHARON_*` variables cannot change what a test sees.
fn charonctl(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("CHARON_ENDPOINT")
        .env_remove("CHARON_TOKEN")
        .env_remove("CHARON_TOKEN_FILE")
        .kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut tokio::process::Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().await.expect("charonctl runs");
    (
        status.code(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// A loopback port that was free a moment ago and has nothing listening.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A fresh empty directory to run in, so no `charon-data/admin.token` is found
/// by accident.
fn empty_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn help_lists_the_host_commands() {
    let (code, stdout, _) = run(&mut charonctl(&["--help"])).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("host"), "{stdout}");
    assert!(stdout.contains("--endpoint"), "{stdout}");

    let (code, stdout, _) = run(&mut charonctl(&["host", "--help"])).await;
    assert_eq!(code, Some(0));
    for sub in ["add", "list", "show", "update", "rm"] {
        assert!(stdout.contains(sub), "`host --help` lacks {sub}: {stdout}");
    }

    let (code, stdout, _) = run(&mut charonctl(&["cert", "--help"])).await;
    assert_eq!(code, Some(0));
    for sub in ["add", "list", "show", "replace", "rm"] {
        assert!(stdout.contains(sub), "`cert --help` lacks {sub}: {stdout}");
    }
}

#[tokio::test]
async fn an_unreachable_node_is_named_in_one_line() {
    let endpoint = dead_endpoint();
    let (code, stdout, stderr) = run(&mut charonctl(&[
        "host",
        "list",
        "--endpoint",
        &endpoint,
        "--token",
        "t",
    ]))
    .await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!("error: cannot reach the node at {endpoint} — is it running?\n")
    );
}

#[tokio::test]
async fn a_malformed_location_is_a_usage_error_naming_the_flag() {
    let endpoint = dead_endpoint();
    let (code, _, stderr) = run(&mut charonctl(&[
        "host",
        "add",
        "a.example",
        "--upstream",
        "http://10.0.0.1:80",
        "--location",
        "/api",
        "--endpoint",
        &endpoint,
        "--token",
        "t",
    ]))
    .await;
    // 2, not 1: the argument was refused before any connection was tried.
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--location"), "{stderr}");
    assert!(!stderr.contains("cannot reach"), "{stderr}");
}

#[tokio::test]
async fn a_bad_endpoint_is_a_usage_error_naming_the_flag() {
    let (code, _, stderr) = run(&mut charonctl(&[
        "host",
        "list",
        "--endpoint",
        "http://bad host",
        "--token",
        "t",
    ]))
    .await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--endpoint"), "{stderr}");
}

#[tokio::test]
async fn without_a_token_the_default_file_is_mentioned() {
    let dir = empty_dir("no-token");
    let endpoint = dead_endpoint();
    let (code, _, stderr) =
        run(charonctl(&["host", "list", "--endpoint", &endpoint]).current_dir(&dir)).await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("charon-data/admin.token"), "{stderr}");
    assert!(stderr.contains("--token"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// What the fake node saw, and how its `WaitForWrite` answers.
#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    /// The client address of each call: one connection, one address.
    peers: Vec<Option<SocketAddr>>,
    created: Vec<CreateHostRequest>,
    updated: Vec<UpdateHostRequest>,
    certs_added: Vec<AddCertificateRequest>,
    certs_replaced: Vec<ReplaceCertificateRequest>,
    certs_deleted: Vec<String>,
    waits: Vec<WaitForWriteRequest>,
    /// Set by a test: the live members that will not apply the write.
    lagging: Vec<String>,
    /// Set by a test: `WaitForWrite` fails with this.
    wait_error: Option<(Code, String)>,
    tokens_created: Vec<String>,
    tokens_revoked: Vec<String>,
    drains: Vec<DrainRequest>,
    undrains: Vec<String>,
    /// The node of each `DrainStatus` call.
    drain_status_asked: Vec<String>,
    /// Set by a test: the answers of `DrainStatus`, in order; the last one
    /// repeats. Empty: n2 serving, not asked to drain.
    drain_script: VecDeque<DrainStatusResponse>,
    /// Set by a test: `DrainStatus` fails with this.
    drain_status_error: Option<(Code, String)>,
    /// Set by a test: `ListMembers` answers these rather than [`members`].
    members: Option<Vec<Member>>,
    /// Set by a test: the events the node keeps, in its order; answered
    /// by `Logs.Recent`, and first by `Logs.Follow` when asked for a
    /// backlog.
    events: Vec<LogEvent>,
    /// Set by a test: what `Logs.Follow` streams after the backlog, one
    /// every [`FOLLOW_PACE`], before it ends.
    live: Vec<LogEvent>,
    /// Set by a test: `Logs.Follow`'s stream fails with this after `live`.
    follow_error: Option<(Code, String)>,
    recent_asked: Vec<RecentLogsRequest>,
    follow_asked: Vec<FollowLogsRequest>,
    /// Set by a test: the open tunnels.
    tunnels: Vec<Tunnel>,
    /// The `host` of each `ListTunnels` call.
    tunnels_asked: Vec<String>,
}

/// Accepts only the token "good"; knows one host, `h1` / `a.example`, and two
/// certificates, `c1` (pinned by `h1`) and the expired `c-old`, and two API
/// tokens, `admin-n1` and `ci`. Its cluster is `n1` (itself), `n2` and `n3`
/// live, and `n4` dead; every write but a rename of `h1` to its own name
/// answers with the metadata of a write originating on `n1` (see
/// [`WRITE_SEQ`]). Only `n2` can be drained.
#[derive(Clone, Default)]
struct FakeNode(Arc<Mutex<Seen>>);

impl FakeNode {
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut seen = self.0.lock().unwrap();
        seen.authorization.push(auth.clone());
        seen.peers.push(request.remote_addr());
        drop(seen);
        if auth == "Bearer good" {
            Ok(())
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
}

/// The full node id of `n1`, the fake's own.
const N1_ID: &str = "0f3a9c2e-1111-4000-8000-000000000001";

/// The sequence number the fake gives each kind of write.
const WRITE_SEQ: [(&str, u64); 9] = [
    ("host add", 7),
    ("host update", 8),
    ("host rm", 9),
    ("cert add", 10),
    ("cert replace", 11),
    ("cert rm", 12),
    ("token create", 13),
    ("token revoke", 14),
    ("node drain", 15),
];

fn seq_of(write: &str) -> u64 {
    WRITE_SEQ.iter().find(|(w, _)| *w == write).unwrap().1
}

/// The answer of a write, with the metadata naming it, as the node sends.
fn stamped<T>(message: T, write: &str) -> Response<T> {
    let mut response = Response::new(message);
    let md = response.metadata_mut();
    md.insert("charon-write-origin", N1_ID.parse().unwrap());
    md.insert(
        "charon-write-seq",
        seq_of(write).to_string().parse().unwrap(),
    );
    response
}

fn h1() -> ProxyHost {
    ProxyHost {
        id: "h1".into(),
        name: "a".into(),
        domains: vec!["a.example".into()],
        upstreams: vec!["http://10.0.0.1:80".into()],
        enabled: true,
        websocket: true,
        preserve_host: true,
        forwarded_headers: true,
        version: 1,
        ..ProxyHost::default()
    }
}

#[tonic::async_trait]
impl Hosts for FakeNode {
    async fn create_host(
        &self,
        request: Request<CreateHostRequest>,
    ) -> Result<Response<ProxyHost>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        let host = request.host.clone().unwrap_or_default();
        self.0.lock().unwrap().created.push(request);
        Ok(stamped(
            ProxyHost {
                id: "h2".into(),
                version: 1,
                ..host
            },
            "host add",
        ))
    }

    async fn get_host(
        &self,
        request: Request<GetHostRequest>,
    ) -> Result<Response<ProxyHost>, Status> {
        self.check(&request)?;
        match request.into_inner().id_or_domain.as_str() {
            "h1" | "a.example" => Ok(Response::new(h1())),
            other => Err(Status::not_found(format!(
                "no host with id or domain {other}"
            ))),
        }
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(ListHostsResponse { hosts: vec![h1()] }))
    }

    async fn update_host(
        &self,
        request: Request<UpdateHostRequest>,
    ) -> Result<Response<ProxyHost>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        self.0.lock().unwrap().updated.push(request.clone());
        if request.expected_version.is_some_and(|v| v != 1) {
            return Err(Status::failed_precondition(
                "host h1 is at version 1, not 9",
            ));
        }
        if request.name.as_deref() == Some(&h1().name) {
            // Renamed to its own name: nothing changed, no write metadata.
            return Ok(Response::new(h1()));
        }
        Ok(stamped(
            ProxyHost {
                enabled: request.enabled.unwrap_or(true),
                version: 2,
                ..h1()
            },
            "host update",
        ))
    }

    async fn delete_host(
        &self,
        request: Request<DeleteHostRequest>,
    ) -> Result<Response<DeleteHostResponse>, Status> {
        self.check(&request)?;
        Ok(stamped(DeleteHostResponse { id: "h1".into() }, "host rm"))
    }
}

/// Valid until the end of 2099, so its days left stay positive.
fn c1() -> Certificate {
    Certificate {
        id: "c1".into(),
        name: "a".into(),
        domains: vec!["a.example".into(), "*.a.example".into()],
        not_before_ms: 1_704_067_200_000, // 2024-01-01
        not_after_ms: 4_102_444_799_000,  // 2099-12-31
        issuer: "CN=Test CA, O=Charon".into(),
        subject: "CN=a.example".into(),
        serial: "7F:01".into(),
        fingerprint_sha256: "AA:BB:CC".into(),
        key_type: "ECDSA P-256".into(),
        chain_length: 2,
        created_at_ms: 1_714_564_800_000,
        updated_at_ms: 1_714_564_800_000,
        version: 1,
        used_by_hosts: vec!["h1".into()],
        cert_pem: "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n".into(),
    }
}

fn c_old() -> Certificate {
    Certificate {
        id: "c-old".into(),
        name: "old".into(),
        domains: vec!["old.example".into()],
        not_after_ms: 1_577_836_800_000, // 2020-01-01
        used_by_hosts: vec![],
        ..c1()
    }
}

/// The fake's answer to add and replace: the chain is echoed back as the
/// stored one, the key (like the real node's) never is.
fn cert_reply(
    id: &str,
    name: &str,
    cert_pem: String,
    key_pem: &str,
    write: &str,
) -> Result<Response<CertificateReply>, Status> {
    if !key_pem.contains("PRIVATE KEY") {
        return Err(Status::invalid_argument("key_pem: not a PEM private key"));
    }
    Ok(stamped(
        CertificateReply {
            certificate: Some(Certificate {
                id: id.into(),
                name: if name.is_empty() {
                    "a".into()
                } else {
                    name.into()
                },
                cert_pem,
                version: 2,
                ..c1()
            }),
            warnings: vec!["expires in 12 days".into(), "chain is incomplete".into()],
        },
        write,
    ))
}

#[tonic::async_trait]
impl Certificates for FakeNode {
    async fn add_certificate(
        &self,
        request: Request<AddCertificateRequest>,
    ) -> Result<Response<CertificateReply>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        self.0.lock().unwrap().certs_added.push(request.clone());
        cert_reply(
            "c9",
            &request.name,
            request.cert_pem,
            &request.key_pem,
            "cert add",
        )
    }

    async fn replace_certificate(
        &self,
        request: Request<ReplaceCertificateRequest>,
    ) -> Result<Response<CertificateReply>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        self.0.lock().unwrap().certs_replaced.push(request.clone());
        if request.id != "c1" {
            return Err(Status::not_found(format!("no certificate {}", request.id)));
        }
        let name = request.name.clone().unwrap_or_default();
        cert_reply(
            "c1",
            &name,
            request.cert_pem,
            &request.key_pem,
            "cert replace",
        )
    }

    async fn get_certificate(
        &self,
        request: Request<GetCertificateRequest>,
    ) -> Result<Response<Certificate>, Status> {
        self.check(&request)?;
        match request.into_inner().id.as_str() {
            "c1" => Ok(Response::new(c1())),
            other => Err(Status::not_found(format!("no certificate {other}"))),
        }
    }

    async fn list_certificates(
        &self,
        request: Request<ListCertificatesRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(ListCertificatesResponse {
            certificates: vec![c1(), c_old()],
        }))
    }

    async fn delete_certificate(
        &self,
        request: Request<DeleteCertificateRequest>,
    ) -> Result<Response<DeleteCertificateResponse>, Status> {
        self.check(&request)?;
        let id = request.into_inner().id;
        self.0.lock().unwrap().certs_deleted.push(id.clone());
        if id == "c1" {
            return Err(Status::failed_precondition(
                "certificate c1 is pinned by host h1",
            ));
        }
        Ok(stamped(DeleteCertificateResponse { id }, "cert rm"))
    }
}

fn member(name: &str, node_id: &str, live: bool) -> Member {
    Member {
        node_id: node_id.into(),
        name: name.into(),
        region: "eu-west".into(),
        zone: "a".into(),
        api_address: format!("http://{name}:7070"),
        gossip_address: "10.0.0.1:7946".into(),
        status: "serving".into(),
        live,
        self_: name == "n1",
        generation: 1,
        build_version: "0.1.0".into(),
        applied: [(N1_ID.to_string(), 12)].into(),
        state_hash: "9f86d081884c7d65".into(),
        lag: 0,
        http_connections: 0,
        tunnels: 0,
    }
}

/// Listed in this order, not sorted: the CLI must keep it.
fn members() -> Vec<Member> {
    vec![
        member("n1", N1_ID, true),
        Member {
            status: "draining".into(),
            applied: [(N1_ID.to_string(), 9)].into(),
            state_hash: "2c26b46b68ffc68f".into(),
            lag: 3,
            ..member("n3", "c0ffee00-3333-4000-8000-000000000003", true)
        },
        member("n2", "7b2d4e6f-2222-4000-8000-000000000002", true),
        Member {
            applied: Default::default(),
            state_hash: String::new(),
            lag: 12,
            ..member("n4", "deadbeef-4444-4000-8000-000000000004", false)
        },
    ]
}

#[tonic::async_trait]
impl Cluster for FakeNode {
    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        self.check(&request)?;
        let listed = self.0.lock().unwrap().members.clone();
        Ok(Response::new(ListMembersResponse {
            members: listed.unwrap_or_else(members),
            cluster_id: "prod".into(),
        }))
    }

    async fn status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(ClusterStatusResponse {
            converged: false,
            members: members(),
            cluster_id: "prod".into(),
            ..Default::default()
        }))
    }

    /// Every live member but the `lagging` ones applied the write.
    async fn wait_for_write(
        &self,
        request: Request<WaitForWriteRequest>,
    ) -> Result<Response<WaitForWriteResponse>, Status> {
        self.check(&request)?;
        let mut seen = self.0.lock().unwrap();
        seen.waits.push(request.into_inner());
        if let Some((code, message)) = &seen.wait_error {
            return Err(Status::new(*code, message.clone()));
        }
        let (pending, applied): (Vec<String>, Vec<String>) = ["n1", "n3", "n2"]
            .into_iter()
            .map(String::from)
            .partition(|name| seen.lagging.contains(name));
        Ok(Response::new(WaitForWriteResponse {
            complete: pending.is_empty(),
            applied,
            pending,
            waited_ms: 25,
        }))
    }
}

/// The id the fake gives the token it creates, `ci`.
const CI_TOKEN_ID: &str = "t-0a1b2c3d4e";

/// Created at 2024-05-01T12:00:00Z on `n1`.
fn admin_token() -> ApiToken {
    ApiToken {
        id: "admin-0f3a9c2e".into(),
        name: "admin-n1".into(),
        created_at_ms: 1_714_564_800_000,
        created_on: "n1".into(),
    }
}

/// Created a minute later on `n2`.
fn ci_token() -> ApiToken {
    ApiToken {
        id: CI_TOKEN_ID.into(),
        name: "ci".into(),
        created_at_ms: 1_714_564_861_000,
        created_on: "n2".into(),
    }
}

#[tonic::async_trait]
impl Tokens for FakeNode {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.check(&request)?;
        let name = request.into_inner().name;
        self.0.lock().unwrap().tokens_created.push(name.clone());
        if name == admin_token().name {
            return Err(Status::already_exists(format!(
                "a token named {name:?} exists; revoke it first"
            )));
        }
        Ok(stamped(
            CreateTokenResponse {
                token: Some(ApiToken {
                    name,
                    created_on: "n1".into(),
                    ..ci_token()
                }),
                secret: "charon_5ecret0123".into(),
            },
            "token create",
        ))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(ListTokensResponse {
            tokens: vec![admin_token(), ci_token()],
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.check(&request)?;
        let key = request.into_inner().id_or_name;
        self.0.lock().unwrap().tokens_revoked.push(key.clone());
        match key.as_str() {
            "ci" | CI_TOKEN_ID => Ok(stamped(
                RevokeTokenResponse {
                    id: CI_TOKEN_ID.into(),
                },
                "token revoke",
            )),
            _ => Err(Status::not_found(format!(
                "no token with id or name {key:?}"
            ))),
        }
    }
}

const N2_ID: &str = "7b2d4e6f-2222-4000-8000-000000000002";

/// The deadline the fake's drains end at: 2024-05-01T12:05:00Z, long past,
/// so that the progress lines do not depend on the clock.
const DRAIN_DEADLINE_MS: u64 = 1_714_565_100_000;

fn is_n2(node: &str) -> Result<(), Status> {
    if node == "n2" || node == N2_ID {
        Ok(())
    } else {
        Err(Status::not_found(format!("no node named {node}")))
    }
}

/// n2 draining with this many HTTP connections and tunnels left.
fn draining(http_connections: u64, tunnels: u64) -> DrainStatusResponse {
    DrainStatusResponse {
        node_id: N2_ID.into(),
        name: "n2".into(),
        status: "draining".into(),
        live: true,
        http_connections,
        tunnels,
        deadline_ms: DRAIN_DEADLINE_MS,
        listeners_closed: true,
        cut: 0,
        requested: true,
    }
}

/// n2 with nothing left; `cut` connections were closed by force.
fn drained(cut: u64) -> DrainStatusResponse {
    DrainStatusResponse {
        status: "drained".into(),
        cut,
        ..draining(0, 0)
    }
}

#[tonic::async_trait]
impl Nodes for FakeNode {
    /// The deadline is fixed; the spread defaults to 30 s.
    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        self.0.lock().unwrap().drains.push(request.clone());
        is_n2(&request.node)?;
        Ok(stamped(
            DrainResponse {
                node_id: N2_ID.into(),
                name: "n2".into(),
                deadline_ms: DRAIN_DEADLINE_MS,
                spread_secs: match request.spread_secs {
                    0 => 30,
                    secs => secs,
                },
            },
            "node drain",
        ))
    }

    async fn undrain(
        &self,
        request: Request<UndrainRequest>,
    ) -> Result<Response<UndrainResponse>, Status> {
        self.check(&request)?;
        let node = request.into_inner().node;
        self.0.lock().unwrap().undrains.push(node.clone());
        is_n2(&node)?;
        Ok(Response::new(UndrainResponse {
            node_id: N2_ID.into(),
            name: "n2".into(),
        }))
    }

    async fn drain_status(
        &self,
        request: Request<DrainStatusRequest>,
    ) -> Result<Response<DrainStatusResponse>, Status> {
        self.check(&request)?;
        let node = request.into_inner().node;
        let mut seen = self.0.lock().unwrap();
        seen.drain_status_asked.push(node.clone());
        if let Some((code, message)) = &seen.drain_status_error {
            return Err(Status::new(*code, message.clone()));
        }
        is_n2(&node)?;
        let script = &mut seen.drain_script;
        let answer = if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        };
        Ok(Response::new(answer.unwrap_or_else(|| {
            DrainStatusResponse {
                status: "serving".into(),
                deadline_ms: 0,
                listeners_closed: false,
                requested: false,
                ..draining(3, 0)
            }
        })))
    }
}

/// How far apart `Logs.Follow` streams its events.
const FOLLOW_PACE: Duration = Duration::from_millis(20);

/// Whether `e` passes `filter`, as the node decides it.
fn passes(e: &LogEvent, filter: &LogFilter) -> bool {
    let host = filter.host.is_empty() || e.host == filter.host;
    let status = match filter.status.as_str() {
        "" => true,
        class if class.ends_with("xx") => class[..1] == (e.status / 100).to_string(),
        code => code == e.status.to_string(),
    };
    host && status
}

#[tonic::async_trait]
impl Logs for FakeNode {
    type FollowStream = BoxStream<LogEvent>;

    /// The kept events that pass the filter, the newest `limit` of them;
    /// `since_ms` is only recorded: the tests' events are not of today.
    async fn recent(
        &self,
        request: Request<RecentLogsRequest>,
    ) -> Result<Response<RecentLogsResponse>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        let mut seen = self.0.lock().unwrap();
        seen.recent_asked.push(request.clone());
        let filter = request.filter.unwrap_or_default();
        let mut events: Vec<LogEvent> = seen
            .events
            .iter()
            .filter(|e| passes(e, &filter))
            .cloned()
            .collect();
        let limit = request.limit as usize;
        if limit > 0 && events.len() > limit {
            events.drain(..events.len() - limit);
        }
        Ok(Response::new(RecentLogsResponse { events }))
    }

    /// The kept events first when `since_ms` asks for them, then `live`,
    /// then `follow_error` if set; then the stream ends.
    async fn follow(
        &self,
        request: Request<FollowLogsRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        self.check(&request)?;
        let request = request.into_inner();
        let mut seen = self.0.lock().unwrap();
        seen.follow_asked.push(request.clone());
        let filter = request.filter.unwrap_or_default();
        let backlog = if request.since_ms > 0 {
            seen.events.clone()
        } else {
            Vec::new()
        };
        let items: Vec<Result<LogEvent, Status>> = backlog
            .into_iter()
            .chain(seen.live.clone())
            .filter(|e| passes(e, &filter))
            .map(Ok)
            .chain(
                seen.follow_error
                    .clone()
                    .map(|(code, message)| Err(Status::new(code, message))),
            )
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for item in items {
                tokio::time::sleep(FOLLOW_PACE).await;
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Tunnels for FakeNode {
    async fn list_tunnels(
        &self,
        request: Request<ListTunnelsRequest>,
    ) -> Result<Response<ListTunnelsResponse>, Status> {
        self.check(&request)?;
        let host = request.into_inner().host;
        let mut seen = self.0.lock().unwrap();
        seen.tunnels_asked.push(host.clone());
        let tunnels = seen
            .tunnels
            .iter()
            .filter(|t| host.is_empty() || t.host == host || t.host_id == host)
            .cloned()
            .collect();
        Ok(Response::new(ListTunnelsResponse { tunnels }))
    }
}

/// Serves the fake on a loopback port; the server task ends with the test's
/// runtime.
async fn fake_node() -> (String, FakeNode) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let node = FakeNode::default();
    let hosts = HostsServer::new(node.clone());
    let certificates = CertificatesServer::new(node.clone());
    let cluster = ClusterServer::new(node.clone());
    let tokens = TokensServer::new(node.clone());
    let nodes = NodesServer::new(node.clone());
    let logs = LogsServer::new(node.clone());
    let tunnels = TunnelsServer::new(node.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(hosts)
            .add_service(certificates)
            .add_service(cluster)
            .add_service(tokens)
            .add_service(nodes)
            .add_service(logs)
            .add_service(tunnels)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), node)
}

#[tokio::test]
async fn add_sends_the_default_token_file_and_leaves_defaults_to_the_node() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("default-token");
    std::fs::create_dir(dir.join("charon-data")).unwrap();
    std::fs::write(dir.join("charon-data/admin.token"), "good\n").unwrap();

    let (code, stdout, stderr) = run(charonctl(&[
        "host",
        "add",
        "b.example",
        "--upstream",
        "http://10.0.0.2:80",
        "--location",
        "/ws=http://10.0.0.3:80,http://10.0.0.4:80",
        "--no-websocket",
        "--endpoint",
        &endpoint,
    ])
    .current_dir(&dir))
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.starts_with("created host h2 (version 1)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/ws -> http://10.0.0.3:80, http://10.0.0.4:80"),
        "{stdout}"
    );

    let seen = node.0.lock().unwrap();
    assert_eq!(seen.authorization, ["Bearer good"]);
    let created = &seen.created[0];
    assert_eq!(created.websocket, Some(false));
    assert_eq!(created.enabled, None);
    assert_eq!(created.preserve_host, None);
    assert_eq!(created.forwarded_headers, None);
    let host = created.host.as_ref().unwrap();
    assert_eq!(host.domains, ["b.example"]);
    assert_eq!(host.locations[0].upstreams.len(), 2);
}

#[tokio::test]
async fn list_as_json_uses_proto_field_names() {
    let (endpoint, _node) = fake_node().await;
    let (code, stdout, stderr) = run(&mut charonctl(&[
        "-o",
        "json",
        "host",
        "list",
        "--endpoint",
        &endpoint,
        "--token",
        "good",
    ]))
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let host = &value.as_array().expect("an array")[0];
    assert_eq!(host["id"], "h1");
    assert_eq!(host["domains"][0], "a.example");
    assert_eq!(host["preserve_host"], true);
    assert_eq!(host["version"], 1);
}

#[tokio::test]
async fn list_as_table_has_the_columns() {
    let (endpoint, _node) = fake_node().await;
    let (code, stdout, stderr) = run(&mut charonctl(&[
        "host",
        "list",
        "--endpoint",
        &endpoint,
        "--token",
        "good",
    ]))
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "NAME",
            "DOMAINS",
            "UPSTREAMS",
            "ENABLED",
            "WS",
            "VERSION"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            "h1",
            "a",
            "a.example",
            "http://10.0.0.1:80",
            "yes",
            "yes",
            "1"
        ]
    );
}

#[tokio::test]
async fn update_sends_only_the_named_fields() {
    let (endpoint, node) = fake_node().await;
    let (code, stdout, stderr) = run(&mut charonctl(&[
        "host",
        "update",
        "a.example",
        "--disable",
        "--upstream",
        "http://10.0.0.9:80",
        "--endpoint",
        &endpoint,
        "--token",
        "good",
    ]))
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.starts_with("updated host h1 (version 2)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("enabled:"), "{stdout}");

    let seen = node.0.lock().unwrap();
    let update = &seen.updated[0];
    assert_eq!(update.id_or_domain, "a.example");
    assert_eq!(update.enabled, Some(false));
    assert_eq!(
        update.upstreams.as_ref().unwrap().values,
        ["http://10.0.0.9:80"]
    );
    assert!(update.domains.is_none());
    assert!(update.locations.is_none());
    assert!(update.name.is_none());
    assert!(update.websocket.is_none());
}

#[tokio::test]
async fn rm_and_show() {
    let (endpoint, _node) = fake_node().await;
    let (code, stdout, _) = run(&mut charonctl(&[
        "host",
        "rm",
        "h1",
        "--endpoint",
        &endpoint,
        "--token",
        "good",
    ]))
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(stdout, "deleted host h1\n");

    let (code, stdout, _) = run(&mut charonctl(&[
        "host",
        "show",
        "a.example",
        "--endpoint",
        &endpoint,
        "--token",
        "good",
    ]))
    .await;
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("id:"), "{stdout}");
    assert!(stdout.contains("a.example"), "{stdout}");
}

#[tokio::test]
async fn node_errors_become_one_operator_line() {
    let (endpoint, _node) = fake_node().await;
    let cases: [(&[&str], &str); 3] = [
        (
            &["host", "list", "--token", "bad"],
            "error: the node refused the token (unknown token) — pass --token or --token-file\n",
        ),
        (
            &["host", "show", "nope", "--token", "good"],
            "error: no host with id or domain nope\n",
        ),
        (
            &[
                "host",
                "update",
                "h1",
                "--disable",
                "--expected-version",
                "9",
                "--token",
                "good",
            ],
            "error: host h1 is at version 1, not 9\n",
        ),
    ];
    for (args, want) in cases {
        let mut cmd = charonctl(args);
        cmd.args(["--endpoint", &endpoint]);
        let (code, stdout, stderr) = run(&mut cmd).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr, want, "{args:?}");
    }
}

const LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n";

/// A directory holding `full.pem`, `key.pem` and `ca.pem`.
fn pem_dir(name: &str) -> PathBuf {
    let dir = empty_dir(name);
    std::fs::write(dir.join("full.pem"), LEAF_PEM).unwrap();
    std::fs::write(dir.join("key.pem"), KEY_PEM).unwrap();
    std::fs::write(dir.join("ca.pem"), LEAF_PEM.repeat(2)).unwrap();
    dir
}

/// `charonctl ARGS --endpoint ENDPOINT --token good`, run in `dir`.
async fn call(endpoint: &str, dir: &PathBuf, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = charonctl(args);
    cmd.args(["--endpoint", endpoint, "--token", "good"])
        .current_dir(dir);
    run(&mut cmd).await
}

#[tokio::test]
async fn cert_add_sends_the_files_and_prints_warnings_on_stderr() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("cert-add");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "cert", "add", "--cert", "full.pem", "--key", "key.pem", "--name", "web",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.starts_with("added certificate c9\n"), "{stdout}");
    for line in [
        "name:                web\n",
        "issuer:              CN=Test CA, O=Charon\n",
        "subject:             CN=a.example\n",
        "serial:              7F:01\n",
        "sha256 fingerprint:  AA:BB:CC\n",
        "key type:            ECDSA P-256\n",
        "chain length:        2\n",
        "not before:          2024-01-01T00:00:00Z\n",
        "used by:             h1\n",
    ] {
        assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
    }
    assert!(
        stdout.contains("not after:           2099-12-31T23:59:59Z ("),
        "{stdout}"
    );
    // Neither the key nor the chain is printed in table mode.
    assert!(!stdout.contains("SECRETKEYMATERIAL"), "{stdout}");
    assert!(!stdout.contains("BEGIN"), "{stdout}");
    assert_eq!(
        stderr,
        "warning: expires in 12 days\nwarning: chain is incomplete\n"
    );

    let seen = node.0.lock().unwrap();
    assert_eq!(seen.authorization, ["Bearer good"]);
    let added = &seen.certs_added[0];
    assert_eq!(added.cert_pem, LEAF_PEM);
    assert_eq!(added.key_pem, KEY_PEM);
    assert_eq!(added.name, "web");
}

#[tokio::test]
async fn cert_add_as_json_keeps_stdout_json_and_warnings_on_stderr() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("cert-add-json");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "-o", "json", "cert", "add", "--cert", "full.pem", "--key", "key.pem",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value["id"], "c9");
    assert_eq!(value["cert_pem"], LEAF_PEM);
    assert_eq!(value["fingerprint_sha256"], "AA:BB:CC");
    assert!(!stdout.contains("SECRETKEYMATERIAL"), "{stdout}");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(
        stderr.starts_with("warning: expires in 12 days\n"),
        "{stderr}"
    );
    // Without --name the name is left to the node.
    assert_eq!(node.0.lock().unwrap().certs_added[0].name, "");
}

#[tokio::test]
async fn a_missing_cert_file_is_one_line_naming_the_path_before_any_connection() {
    let dir = pem_dir("cert-missing");
    let endpoint = dead_endpoint();
    for (args, flag, path) in [
        (
            &["cert", "add", "--cert", "nope.pem", "--key", "key.pem"][..],
            "--cert",
            "nope.pem",
        ),
        (
            &[
                "cert",
                "replace",
                "c1",
                "--cert",
                "full.pem",
                "--key",
                "/no/such/key.pem",
            ],
            "--key",
            "/no/such/key.pem",
        ),
        (
            &[
                "host",
                "add",
                "a.example",
                "--upstream",
                "https://b:1",
                "--upstream-ca",
                "ca-nope.pem",
            ],
            "--upstream-ca",
            "ca-nope.pem",
        ),
        (
            &["host", "update", "h1", "--upstream-ca", "ca-nope.pem"],
            "--upstream-ca",
            "ca-nope.pem",
        ),
    ] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(
            stderr.starts_with(&format!("error: cannot read the {flag} file {path}: ")),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn cert_replace_keeps_the_id() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("cert-replace");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "cert", "replace", "c1", "--cert", "full.pem", "--key", "key.pem",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.starts_with("replaced certificate c1\n"), "{stdout}");
    assert!(stderr.contains("warning: expires in 12 days\n"), "{stderr}");
    let seen = node.0.lock().unwrap();
    let replaced = &seen.certs_replaced[0];
    assert_eq!(replaced.id, "c1");
    assert_eq!(replaced.name, None);
    assert_eq!(replaced.cert_pem, LEAF_PEM);
    assert_eq!(replaced.key_pem, KEY_PEM);
}

#[tokio::test]
async fn cert_list_as_table_and_json() {
    let (endpoint, _node) = fake_node().await;
    let dir = empty_dir("cert-list");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["cert", "list"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let mut lines = stdout.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID "), "{header}");
    for column in ["NAME", "DOMAINS", "EXPIRES", "DAYS LEFT", "HOSTS"] {
        assert!(
            header.contains(&format!("  {column}")),
            "{column} in {header}"
        );
    }
    assert!(header.ends_with("DAYS LEFT  HOSTS"), "{header}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["c1", "a", "a.example,*.a.example", "2099-12-31"]);
    assert!(row[4].parse::<u32>().unwrap() > 365, "{row:?}");
    assert_eq!(row[5], "h1");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        ["c-old", "old", "old.example", "2020-01-01", "expired", "-"]
    );
    assert_eq!(lines.next(), None);

    let (code, stdout, _) = call(&endpoint, &dir, &["cert", "ls", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let certs = value.as_array().expect("an array");
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0]["id"], "c1");
    assert_eq!(certs[0]["used_by_hosts"][0], "h1");
    assert_eq!(certs[1]["not_after_ms"], 1_577_836_800_000u64);
}

#[tokio::test]
async fn cert_show_and_rm() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("cert-show");
    let (code, stdout, _) = call(&endpoint, &dir, &["cert", "show", "c1"]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("id:                  c1\n"), "{stdout}");
    assert!(
        stdout.contains("domains:             a.example, *.a.example\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("BEGIN"), "{stdout}");

    let (code, stdout, _) = call(&endpoint, &dir, &["-o", "json", "cert", "show", "c1"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value["cert_pem"], LEAF_PEM);
    assert_eq!(value["key_type"], "ECDSA P-256");

    let (code, stdout, stderr) = call(&endpoint, &dir, &["cert", "rm", "c-old"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "deleted certificate c-old\n");

    let (code, stdout, _) = call(&endpoint, &dir, &["cert", "rm", "c-old", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value, serde_json::json!({ "id": "c-old" }));
    assert_eq!(node.0.lock().unwrap().certs_deleted, ["c-old", "c-old"]);
}

#[tokio::test]
async fn cert_errors_become_one_operator_line() {
    let (endpoint, _node) = fake_node().await;
    let dir = pem_dir("cert-errors");
    let cases: [(&[&str], &str); 4] = [
        (&["cert", "show", "c7"], "error: no certificate c7\n"),
        (
            &["cert", "rm", "c1"],
            "error: certificate c1 is pinned by host h1\n",
        ),
        (
            // The key and the chain swapped: the node refuses the "key".
            &["cert", "add", "--cert", "key.pem", "--key", "full.pem"],
            "error: key_pem: not a PEM private key\n",
        ),
        (
            &[
                "cert", "replace", "c7", "--cert", "full.pem", "--key", "key.pem",
            ],
            "error: no certificate c7\n",
        ),
    ];
    for (args, want) in cases {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr, want, "{args:?}");
    }
}

#[tokio::test]
async fn host_add_sends_the_tls_fields_and_the_ca_file() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("host-add-tls");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "host",
            "add",
            "s.example",
            "--upstream",
            "https://10.0.0.2:443",
            "--cert",
            "c1",
            "--force-https",
            "--hsts",
            "31536000",
            "--hsts-include-subdomains",
            "--upstream-ca",
            "ca.pem",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    for line in [
        "upstream tls:       custom CA (2 certs)\n",
        "cert:               c1\n",
        "force https:        yes\n",
        "hsts:               max-age=31536000; includeSubDomains\n",
    ] {
        assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
    }
    let seen = node.0.lock().unwrap();
    let host = seen.created[0].host.as_ref().unwrap();
    assert_eq!(host.cert_id, "c1");
    assert!(host.force_https);
    assert_eq!(host.hsts_max_age_secs, 31_536_000);
    assert!(host.hsts_include_subdomains);
    assert_eq!(host.upstream_ca_pem, LEAF_PEM.repeat(2));
    assert!(!host.upstream_insecure_skip_verify);
}

#[tokio::test]
async fn host_update_tls_fields() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("host-update-tls");
    let runs: [&[&str]; 3] = [
        &["host", "update", "h1", "--no-cert", "--system-roots"],
        &[
            "host",
            "update",
            "h1",
            "--cert",
            "c1",
            "--force-https",
            "false",
            "--hsts",
            "0",
            "--upstream-insecure-skip-verify",
            "true",
        ],
        &[
            "host",
            "update",
            "h1",
            "--upstream-ca",
            "ca.pem",
            "--hsts-include-subdomains",
            "true",
        ],
    ];
    for args in runs {
        let (code, _, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    let seen = node.0.lock().unwrap();
    let [unpin, set, ca] = &seen.updated[..] else {
        panic!("{} updates", seen.updated.len())
    };
    assert_eq!(unpin.cert_id.as_deref(), Some(""));
    assert_eq!(unpin.upstream_ca_pem.as_deref(), Some(""));
    assert_eq!(unpin.force_https, None);
    assert_eq!(unpin.upstream_insecure_skip_verify, None);

    assert_eq!(set.cert_id.as_deref(), Some("c1"));
    assert_eq!(set.force_https, Some(false));
    assert_eq!(set.hsts_max_age_secs, Some(0));
    assert_eq!(set.upstream_insecure_skip_verify, Some(true));
    assert_eq!(set.upstream_ca_pem, None);
    assert_eq!(set.hsts_include_subdomains, None);

    assert_eq!(
        ca.upstream_ca_pem.as_deref(),
        Some(LEAF_PEM.repeat(2).as_str())
    );
    assert_eq!(ca.hsts_include_subdomains, Some(true));
    assert_eq!(ca.cert_id, None);
}

#[tokio::test]
async fn host_show_and_json_include_the_tls_fields() {
    let (endpoint, _node) = fake_node().await;
    let dir = empty_dir("host-show-tls");
    let (code, stdout, _) = call(&endpoint, &dir, &["host", "show", "h1"]).await;
    assert_eq!(code, Some(0));
    for line in [
        "upstream tls:       system roots\n",
        "cert:               auto (best match)\n",
        "force https:        no\n",
        "hsts:               off\n",
    ] {
        assert!(stdout.contains(line), "{line:?} not in\n{stdout}");
    }
    let (code, stdout, _) = call(&endpoint, &dir, &["-o", "json", "host", "show", "h1"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    for key in [
        "cert_id",
        "force_https",
        "hsts_max_age_secs",
        "hsts_include_subdomains",
        "upstream_ca_pem",
        "upstream_insecure_skip_verify",
    ] {
        assert!(value.get(key).is_some(), "{key} missing: {stdout}");
    }
}

#[tokio::test]
async fn cluster_members_as_table_and_json() {
    let (endpoint, _node) = fake_node().await;
    let dir = empty_dir("cluster-members");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["cluster", "members"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
NAME  NODE ID   REGION   ZONE  API             STATUS                         STATE  LAG
n1*   0f3a9c2e  eu-west  a     http://n1:7070  serving                        live   0
n3    c0ffee00  eu-west  a     http://n3:7070  draining (0 conns, 0 tunnels)  live   3
n2    7b2d4e6f  eu-west  a     http://n2:7070  serving                        live   0
n4    deadbeef  eu-west  a     http://n4:7070  serving                        dead   12
";
    assert_eq!(stdout, want);
    assert_eq!(stderr, "");

    let (code, stdout, _) = call(&endpoint, &dir, &["-o", "json", "cluster", "members"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let members = value.as_array().expect("an array");
    let names: Vec<&str> = members
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n3", "n2", "n4"]);
    assert_eq!(members[0]["node_id"], N1_ID);
    assert_eq!(members[0]["self"], true);
    assert_eq!(members[1]["applied"][N1_ID], 9);
    assert_eq!(members[1]["status"], "draining");
    assert_eq!(members[3]["live"], false);
    assert_eq!(members[3]["gossip_address"], "10.0.0.1:7946");
}

#[tokio::test]
async fn cluster_status_reports_not_converged_and_exits_0() {
    let (endpoint, _node) = fake_node().await;
    let dir = empty_dir("cluster-status");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["cluster", "status"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
not converged: cluster prod, 3 of 4 members live
NAME  STATE  HASH              LAG  APPLIED
n1*   live   9f86d081884c7d65  0    0f3a9c2e:12
n3    live   2c26b46b68ffc68f  3    0f3a9c2e:9
n2    live   9f86d081884c7d65  0    0f3a9c2e:12
n4    dead   -                 12   -
";
    assert_eq!(stdout, want);

    let (code, stdout, _) = call(&endpoint, &dir, &["cluster", "status", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value["converged"], false);
    assert_eq!(value["cluster_id"], "prod");
    assert_eq!(
        value["members"][2]["node_id"],
        "7b2d4e6f-2222-4000-8000-000000000002"
    );
    assert_eq!(value["members"][0]["applied"][N1_ID], 12);
}

#[tokio::test]
async fn cluster_commands_report_a_refused_token() {
    let (endpoint, _node) = fake_node().await;
    let (code, stdout, stderr) = run(&mut charonctl(&[
        "cluster",
        "status",
        "--endpoint",
        &endpoint,
        "--token",
        "bad",
    ]))
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: the node refused the token (unknown token) — pass --token or --token-file\n"
    );
}

/// Each write with `--wait`, and the prefix of what it prints on stdout.
const WRITES: [(&str, &[&str], &str); 8] = [
    (
        "host add",
        &[
            "host",
            "add",
            "b.example",
            "--upstream",
            "http://10.0.0.2:80",
        ],
        "created host h2",
    ),
    (
        "host update",
        &["host", "update", "h1", "--disable"],
        "updated host h1",
    ),
    ("host rm", &["host", "rm", "h1"], "deleted host h1"),
    (
        "cert add",
        &["cert", "add", "--cert", "full.pem", "--key", "key.pem"],
        "added certificate c9",
    ),
    (
        "cert replace",
        &[
            "cert", "replace", "c1", "--cert", "full.pem", "--key", "key.pem",
        ],
        "replaced certificate c1",
    ),
    (
        "cert rm",
        &["cert", "rm", "c-old"],
        "deleted certificate c-old",
    ),
    (
        "token create",
        &["token", "create", "deploy"],
        "created token t-0a1b2c3d4e",
    ),
    (
        "token revoke",
        &["token", "revoke", "ci"],
        "revoked token t-0a1b2c3d4e",
    ),
];

#[tokio::test]
async fn wait_after_each_write_waits_for_the_write_it_names() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("wait-each");
    for (write, args, printed) in WRITES {
        let args = [args, &["--wait"]].concat();
        let (code, stdout, stderr) = call(&endpoint, &dir, &args).await;
        assert_eq!(code, Some(0), "{write}: {stderr}");
        assert!(stdout.starts_with(printed), "{write}: {stdout}");
        // After the node's warnings, if any.
        assert!(
            stderr.ends_with("replicated to 3 live nodes in 25 ms\n"),
            "{write}: {stderr}"
        );
        let seen = node.0.lock().unwrap();
        let wait = seen.waits.last().expect("WaitForWrite was called");
        assert_eq!(wait.origin, N1_ID, "{write}");
        assert_eq!(wait.seq, seq_of(write), "{write}");
        assert_eq!(wait.timeout_ms, 10_000, "{write}");
    }
    assert_eq!(node.0.lock().unwrap().waits.len(), WRITES.len());
}

#[tokio::test]
async fn without_wait_nothing_waits() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("wait-none");
    for (write, args, _) in WRITES {
        let (code, _, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(0), "{write}: {stderr}");
        assert!(!stderr.contains("replicated"), "{write}: {stderr}");
    }
    assert!(node.0.lock().unwrap().waits.is_empty());
}

#[tokio::test]
async fn a_wait_that_runs_out_exits_4_naming_the_lagging_nodes() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().lagging = vec!["n3".into(), "n2".into()];
    let dir = pem_dir("wait-incomplete");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "host",
            "add",
            "b.example",
            "--upstream",
            "http://10.0.0.2:80",
            "--wait",
            "--wait-timeout",
            "1500ms",
        ],
    )
    .await;
    assert_eq!(code, Some(4), "stderr: {stderr}");
    // The write stands, and says so.
    assert!(
        stdout.starts_with("created host h2 (version 1)\n"),
        "{stdout}"
    );
    assert_eq!(
        stderr,
        "not applied within 1s500ms on: n3, n2 (applied on: n1)\n"
    );
    let seen = node.0.lock().unwrap();
    assert_eq!(seen.waits.len(), 1);
    assert_eq!(seen.waits[0].timeout_ms, 1500);
    assert_eq!(seen.waits[0].seq, seq_of("host add"));
}

#[tokio::test]
async fn wait_in_json_mode_leaves_stdout_to_the_write() {
    let (endpoint, node) = fake_node().await;
    let dir = pem_dir("wait-json");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "-o", "json", "cert", "add", "--cert", "full.pem", "--key", "key.pem", "--wait",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(value["id"], "c9");
    assert_eq!(
        stderr,
        "warning: expires in 12 days\nwarning: chain is incomplete\n\
         replicated to 3 live nodes in 25 ms\n"
    );

    node.0.lock().unwrap().lagging = vec!["n2".into()];
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "host",
            "rm",
            "h1",
            "-o",
            "json",
            "--wait",
            "--wait-timeout",
            "2m",
        ],
    )
    .await;
    assert_eq!(code, Some(4), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(value, serde_json::json!({ "id": "h1" }));
    assert_eq!(
        stderr,
        "not applied within 2m on: n2 (applied on: n1, n3)\n"
    );
    assert_eq!(node.0.lock().unwrap().waits[1].timeout_ms, 120_000);
}

#[tokio::test]
async fn a_write_that_changed_nothing_has_nothing_to_wait_for() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("wait-nothing");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &["host", "update", "h1", "--name", "a", "--wait"],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stdout.starts_with("updated host h1 (version 1)\n"),
        "{stdout}"
    );
    assert_eq!(stderr, "nothing changed; nothing to wait for\n");
    assert!(node.0.lock().unwrap().waits.is_empty());
}

#[tokio::test]
async fn a_failed_wait_is_one_line_saying_the_write_succeeded() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("wait-failed");
    let cases = [
        (Code::Internal, "the node failed: boom (Internal)"),
        (
            Code::Unimplemented,
            "the node has no Cluster.WaitForWrite; is it older than charonctl?",
        ),
    ];
    for (code, want) in cases {
        node.0.lock().unwrap().wait_error = Some((code, "boom".into()));
        let (exit, stdout, stderr) = call(&endpoint, &dir, &["host", "rm", "h1", "--wait"]).await;
        assert_eq!(exit, Some(1), "{code:?}: {stderr}");
        assert_eq!(stdout, "deleted host h1\n", "{code:?}");
        assert_eq!(
            stderr,
            format!("error: the write succeeded, but waiting for it to replicate failed: {want}\n"),
            "{code:?}"
        );
    }
}

#[tokio::test]
async fn wait_usage_errors_are_refused_before_any_connection() {
    let endpoint = dead_endpoint();
    let dir = empty_dir("wait-usage");
    for (args, names) in [
        (&["host", "rm", "h1", "--wait-timeout", "5s"][..], "--wait"),
        (
            &["host", "rm", "h1", "--wait", "--wait-timeout", "5"],
            "--wait-timeout",
        ),
        (
            &["host", "rm", "h1", "--wait", "--wait-timeout", "0s"],
            "--wait-timeout",
        ),
        (
            &["cert", "rm", "c1", "--wait", "--wait-timeout", "11m"],
            "--wait-timeout",
        ),
        (&["host", "list", "--wait"], "--wait"),
        (&["cluster", "status", "--wait"], "--wait"),
        (&["token", "list", "--wait"], "--wait"),
        (&["node", "drain", "n2", "--wait-timeout", "5s"], "--wait"),
        (
            &["node", "drain", "n2", "--wait", "--wait-timeout", "5"],
            "--wait-timeout",
        ),
        (&["node", "drain", "n2", "--deadline", "0s"], "--deadline"),
        (&["node", "drain", "n2", "--spread", "ten"], "--spread"),
        (&["node", "undrain", "n2", "--wait"], "--wait"),
    ] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn help_documents_wait_and_the_exit_codes() {
    let (code, stdout, _) = run(&mut charonctl(&["--help"])).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("cluster"), "{stdout}");
    assert!(stdout.contains("Exit codes:"), "{stdout}");
    assert!(stdout.contains("  4  --wait"), "{stdout}");

    let (code, stdout, _) = run(&mut charonctl(&["cluster", "--help"])).await;
    assert_eq!(code, Some(0));
    for sub in ["members", "status"] {
        assert!(
            stdout.contains(sub),
            "`cluster --help` lacks {sub}: {stdout}"
        );
    }

    for (write, args, _) in WRITES {
        let words: Vec<&str> = args.iter().take(2).copied().collect();
        let (code, stdout, _) = run(&mut charonctl(&[&words[..], &["--help"]].concat())).await;
        assert_eq!(code, Some(0), "{write}");
        assert!(stdout.contains("--wait "), "{write}: {stdout}");
        assert!(
            stdout.contains("--wait-timeout <DURATION>"),
            "{write}: {stdout}"
        );
        assert!(stdout.contains("Exits 4"), "{write}: {stdout}");
        assert!(stdout.contains("[default: 10s]"), "{write}: {stdout}");
    }
}

#[tokio::test]
async fn help_documents_the_token_and_node_commands() {
    let (code, stdout, _) = run(&mut charonctl(&["--help"])).await;
    assert_eq!(code, Some(0));
    for command in ["token", "node"] {
        assert!(stdout.contains(command), "--help lacks {command}: {stdout}");
    }
    assert!(stdout.contains("for `node drain`"), "{stdout}");

    for (group, subs) in [
        ("token", &["create", "list", "revoke"][..]),
        ("node", &["drain", "undrain", "status"]),
    ] {
        let (code, stdout, _) = run(&mut charonctl(&[group, "--help"])).await;
        assert_eq!(code, Some(0), "{group}");
        for sub in subs {
            assert!(
                stdout.contains(sub),
                "`{group} --help` lacks {sub}: {stdout}"
            );
        }
    }

    let (code, stdout, _) = run(&mut charonctl(&["node", "drain", "--help"])).await;
    assert_eq!(code, Some(0));
    for text in [
        "--deadline <DURATION>",
        "--spread <DURATION>",
        "--wait ",
        "--wait-timeout <DURATION>",
        "[default: no limit]",
        "rounded up to whole",
        "Exits 0 once drained",
    ] {
        assert!(
            stdout.contains(text),
            "`node drain --help` lacks {text}: {stdout}"
        );
    }
    let (code, stdout, _) = run(&mut charonctl(&["token", "create", "--help"])).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("printed once"), "{stdout}");
}

#[tokio::test]
async fn token_create_prints_the_secret_once_on_its_own_line() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("token-create");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["token", "create", "deploy"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
created token t-0a1b2c3d4e
id:          t-0a1b2c3d4e
name:        deploy
created:     2024-05-01T12:01:01Z
created on:  n1
secret (shown once; store it now):
charon_5ecret0123
";
    assert_eq!(stdout, want);
    assert_eq!(stderr, "");

    let (code, stdout, stderr) =
        call(&endpoint, &dir, &["-o", "json", "token", "create", "ci2"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(
        value,
        serde_json::json!({
            "token": {
                "id": "t-0a1b2c3d4e",
                "name": "ci2",
                "created_at_ms": 1_714_564_861_000u64,
                "created_on": "n1",
            },
            "secret": "charon_5ecret0123",
        })
    );
    assert_eq!(node.0.lock().unwrap().tokens_created, ["deploy", "ci2"]);
}

#[tokio::test]
async fn token_list_as_table_and_json() {
    let (endpoint, _node) = fake_node().await;
    let dir = empty_dir("token-list");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["token", "list"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
ID              NAME      CREATED               CREATED ON
admin-0f3a9c2e  admin-n1  2024-05-01T12:00:00Z  n1
t-0a1b2c3d4e    ci        2024-05-01T12:01:01Z  n2
";
    assert_eq!(stdout, want);

    let (code, stdout, _) = call(&endpoint, &dir, &["token", "ls", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let tokens = value.as_array().expect("an array");
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0]["name"], "admin-n1");
    assert_eq!(tokens[1]["id"], CI_TOKEN_ID);
    assert_eq!(tokens[1]["created_at_ms"], 1_714_564_861_000u64);
    assert_eq!(tokens[1]["created_on"], "n2");
}

#[tokio::test]
async fn token_revoke_by_id_or_name_and_its_errors() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("token-revoke");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["token", "revoke", "ci"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "revoked token t-0a1b2c3d4e\n");

    let (code, stdout, _) =
        call(&endpoint, &dir, &["token", "rm", CI_TOKEN_ID, "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value, serde_json::json!({ "id": CI_TOKEN_ID }));
    assert_eq!(node.0.lock().unwrap().tokens_revoked, ["ci", CI_TOKEN_ID]);

    let cases: [(&[&str], &str); 2] = [
        (
            &["token", "revoke", "nope"],
            "error: no token with id or name \"nope\"\n",
        ),
        (
            &["token", "create", "admin-n1"],
            "error: a token named \"admin-n1\" exists; revoke it first\n",
        ),
    ];
    for (args, want) in cases {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr, want, "{args:?}");
    }
}

#[tokio::test]
async fn drain_sends_the_deadline_and_spread_in_whole_seconds() {
    let (endpoint, node) = fake_node().await;
    let dir = empty_dir("drain");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "node",
            "drain",
            "n2",
            "--deadline",
            "1m30s500ms",
            "--spread",
            "1500ms",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(
        stdout,
        "draining n2 (7b2d4e6f): WebSocket tunnels close at 2024-05-01T12:05:00Z (+ spread 2s)\n"
    );
    assert_eq!(stderr, "");

    // Without the flags, 0: the drained node's defaults.
    let (code, stdout, _) = call(&endpoint, &dir, &["node", "drain", N2_ID]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.ends_with("(+ spread 30s)\n"), "{stdout}");

    let (code, stdout, _) = call(
        &endpoint,
        &dir,
        &["-o", "json", "node", "drain", "n2", "--deadline", "10m"],
    )
    .await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(
        value,
        serde_json::json!({
            "node_id": N2_ID,
            "name": "n2",
            "deadline_ms": DRAIN_DEADLINE_MS,
            "spread_secs": 30,
        })
    );

    let seen = node.0.lock().unwrap();
    let sent: Vec<(&str, u32, u32)> = seen
        .drains
        .iter()
        .map(|d| (d.node.as_str(), d.deadline_secs, d.spread_secs))
        .collect();
    assert_eq!(sent, [("n2", 91, 2), (N2_ID, 0, 0), ("n2", 600, 0)]);
    // Without --wait, nothing follows the drain.
    assert!(seen.drain_status_asked.is_empty());
}

/// The answers of a drain that ends after four polls.
fn four_polls() -> VecDeque<DrainStatusResponse> {
    [
        draining(12, 340),
        draining(6, 170),
        draining(0, 3),
        drained(2),
    ]
    .into()
}

#[tokio::test]
async fn drain_wait_follows_the_drain_until_it_is_drained() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().drain_script = four_polls();
    let dir = empty_dir("drain-wait");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["node", "drain", "n2", "--wait"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(
        stdout,
        "draining n2 (7b2d4e6f): WebSocket tunnels close at 2024-05-01T12:05:00Z (+ spread 30s)\n"
    );
    // stderr is not a terminal here: one line per change, at most once a
    // second, so the first answer and then the summary (or, on a slow
    // machine, a line more in between).
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0], "[----------] n2 draining: 12 HTTP connections, 340 tunnels, deadline passed",
        "{stderr}"
    );
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let summary = lines.last().unwrap();
    let took = summary
        .strip_prefix("n2 drained in ")
        .and_then(|rest| rest.strip_suffix("s (cut: 2)"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!(took.parse::<u64>().is_ok(), "{summary}");
    for line in &lines[1..lines.len() - 1] {
        assert!(line.starts_with("[#"), "{stderr}");
    }
    let seen = node.0.lock().unwrap();
    // Polled by the id the drain answered with, until drained.
    assert_eq!(seen.drain_status_asked, [N2_ID; 4]);
    assert_eq!(seen.drains.len(), 1);
}

#[tokio::test]
async fn drain_wait_in_json_mode_prints_the_final_status_on_stdout() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().drain_script = four_polls();
    let dir = empty_dir("drain-wait-json");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &["-o", "json", "node", "drain", "n2", "--wait"],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(value["status"], "drained");
    assert_eq!(value["node_id"], N2_ID);
    assert_eq!(value["cut"], 2);
    assert_eq!(value["tunnels"], 0);
    assert_eq!(value["listeners_closed"], true);
    assert!(
        stderr.starts_with("draining n2 (7b2d4e6f): WebSocket tunnels close at "),
        "{stderr}"
    );
    assert!(stderr.ends_with("s (cut: 2)\n"), "{stderr}");
}

#[tokio::test]
async fn drain_wait_that_runs_out_exits_4_with_what_is_left() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().drain_script = [draining(12, 340)].into();
    let dir = empty_dir("drain-wait-timeout");
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &["node", "drain", "n2", "--wait", "--wait-timeout", "1s"],
    )
    .await;
    assert_eq!(code, Some(4), "stderr: {stderr}");
    assert!(stdout.starts_with("draining n2 (7b2d4e6f): "), "{stdout}");
    assert!(
        stderr.starts_with("[----------] n2 draining: 12 HTTP connections, 340 tunnels"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(
            "\nn2 not drained within 1s: 12 HTTP connections, 340 tunnels left (the drain goes on)\n"
        ),
        "{stderr}"
    );
    let polls = node.0.lock().unwrap().drain_status_asked.len();
    assert!((2..=6).contains(&polls), "{polls} polls in 1s");

    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "node",
            "drain",
            "n2",
            "--wait",
            "--wait-timeout",
            "500ms",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, Some(4), "stderr: {stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is only JSON");
    assert_eq!(value["status"], "draining");
    assert_eq!(value["tunnels"], 340);
    assert!(stderr.contains("not drained within 500ms"), "{stderr}");
}

#[tokio::test]
async fn drain_wait_stops_when_the_drain_is_withdrawn_or_cannot_be_followed() {
    let (endpoint, node) = fake_node().await;
    let undrained = DrainStatusResponse {
        status: "serving".into(),
        requested: false,
        ..draining(5, 5)
    };
    node.0.lock().unwrap().drain_script = [draining(5, 5), undrained].into();
    let dir = empty_dir("drain-wait-undrained");
    let (code, _, stderr) = call(&endpoint, &dir, &["node", "drain", "n2", "--wait"]).await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(
        stderr.ends_with("\nerror: n2 was undrained meanwhile; stopped following its drain\n"),
        "{stderr}"
    );

    node.0.lock().unwrap().drain_status_error = Some((Code::Unimplemented, String::new()));
    let (code, stdout, stderr) = call(&endpoint, &dir, &["node", "drain", "n2", "--wait"]).await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stdout.starts_with("draining n2 "), "{stdout}");
    assert_eq!(
        stderr,
        "error: the drain was requested, but following it failed: \
         the node has no Nodes.DrainStatus; is it older than charonctl?\n"
    );
}

#[tokio::test]
async fn node_status_and_undrain() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().drain_script = [draining(12, 340)].into();
    let dir = empty_dir("node-status");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["node", "status", "n2"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
node:              n2 (7b2d4e6f-2222-4000-8000-000000000002)
status:            draining
state:             live
drain requested:   yes
http connections:  12
tunnels:           340
listeners:         closed
deadline:          2024-05-01T12:05:00Z (passed)
cut:               0
";
    assert_eq!(stdout, want);

    let (code, stdout, _) = call(&endpoint, &dir, &["node", "status", "n2", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value["http_connections"], 12);
    assert_eq!(value["requested"], true);
    assert_eq!(value["deadline_ms"], DRAIN_DEADLINE_MS);
    assert_eq!(node.0.lock().unwrap().drain_status_asked, ["n2", "n2"]);

    let (code, stdout, stderr) = call(&endpoint, &dir, &["node", "undrain", "n2"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "undrained n2 (7b2d4e6f): it serves again\n");
    let (code, stdout, _) = call(&endpoint, &dir, &["-o", "json", "node", "undrain", "n2"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value, serde_json::json!({ "node_id": N2_ID, "name": "n2" }));
    assert_eq!(node.0.lock().unwrap().undrains, ["n2", "n2"]);

    for args in [
        &["node", "drain", "n9"][..],
        &["node", "undrain", "n9"],
        &["node", "status", "n9"],
        &["node", "drain", "n9", "--wait"],
    ] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr, "error: no node named n9\n", "{args:?}");
    }
}

/// 2026-11-24T10:00:00Z: the day of the tests' events.
const T0: u64 = 1_795_514_400_000;

/// A request `node` proxied at `T0 + after_ms`, as the node streams it.
fn request_event(node: &str, after_ms: u64, path: &str, status: u32) -> LogEvent {
    let ts_ms = T0 + after_ms;
    let json = serde_json::json!({
        "ts_ms": ts_ms,
        "node": node,
        "kind": "http",
        "client": "127.0.0.1:5555",
        "host": "app.test",
        "host_id": "h1",
        "method": "GET",
        "authority": "app.test",
        "path": path,
        "proto": "HTTP/1.1",
        "tls": false,
        "status": status,
        "upstream": "http://127.0.0.1:3000",
        "duration_ms": 3.08,
    });
    LogEvent {
        json: json.to_string(),
        ts_ms,
        node: node.into(),
        kind: "http".into(),
        host: "app.test".into(),
        status,
    }
}

/// A tunnel `node` closed at `T0 + after_ms`.
fn tunnel_event(node: &str, after_ms: u64) -> LogEvent {
    let ts_ms = T0 + after_ms;
    let json = serde_json::json!({
        "ts_ms": ts_ms,
        "node": node,
        "kind": "tunnel",
        "client": "127.0.0.1:5556",
        "host": "app.test",
        "host_id": "h1",
        "tls": true,
        "status": 101,
        "upstream": "http://127.0.0.1:3000",
        "duration_ms": 12_345.6,
        "bytes_to_upstream": 1229,
        "bytes_to_client": 3482,
        "frames_to_upstream": 4,
        "frames_to_client": 9,
        "close_code": 1000,
        "closed_by": "client",
    });
    LogEvent {
        json: json.to_string(),
        ts_ms,
        node: node.into(),
        kind: "tunnel".into(),
        host: "app.test".into(),
        status: 101,
    }
}

/// The table line of `request_event(node, after_ms, path, status)`, for
/// `after_ms` under a second.
fn request_line(node: &str, after_ms: u64, path: &str, status: u32) -> String {
    format!(
        "2026-11-24T10:00:00.{after_ms:03}Z {node} GET app.test {path} {status} 3.1ms \
         -> http://127.0.0.1:3000 (client 127.0.0.1:5555)"
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Asserts that `since_ms` was `ago` before a moment between `before` and
/// now (Unix milliseconds).
fn assert_since(since_ms: u64, ago: Duration, before: u64) {
    let ago = ago.as_millis() as u64;
    assert!(
        (before - ago..=now_ms() - ago).contains(&since_ms),
        "since_ms {since_ms} is not {ago} ms before the run"
    );
}

#[tokio::test]
async fn logs_prints_the_kept_events_oldest_first() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().events = vec![
        request_event("n1", 200, "/b", 200),
        request_event("n1", 100, "/a", 503),
        tunnel_event("n1", 300),
    ];
    let dir = empty_dir("logs-recent");
    let before = now_ms();
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    let want = [
        request_line("n1", 100, "/a", 503),
        request_line("n1", 200, "/b", 200),
        "2026-11-24T10:00:00.300Z n1 TUNNEL app.test 101 closed by client code 1000, 12.3s, \
         1.2 KiB up / 3.4 KiB down -> http://127.0.0.1:3000 (client 127.0.0.1:5556)"
            .to_string(),
    ];
    assert_eq!(stdout, want.map(|l| l + "\n").concat());
    {
        let seen = node.0.lock().unwrap();
        let asked = &seen.recent_asked[0];
        assert_since(asked.since_ms, Duration::from_secs(600), before);
        assert_eq!(asked.limit, 0);
        assert_eq!(asked.filter, Some(LogFilter::default()));
        assert_eq!(seen.authorization, ["Bearer good"]);
    }

    let before = now_ms();
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "logs", "--host", "app.test", "--status", "5XX", "--since", "1h", "--limit", "50",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, request_line("n1", 100, "/a", 503) + "\n");
    let seen = node.0.lock().unwrap();
    let asked = &seen.recent_asked[1];
    assert_since(asked.since_ms, Duration::from_secs(3600), before);
    assert_eq!(asked.limit, 50);
    assert_eq!(
        asked.filter,
        Some(LogFilter {
            host: "app.test".into(),
            status: "5xx".into(),
        })
    );
}

#[tokio::test]
async fn logs_as_json_prints_each_line_as_the_node_wrote_it() {
    let (endpoint, node) = fake_node().await;
    let events = vec![request_event("n1", 200, "/b", 200), tunnel_event("n1", 100)];
    node.0.lock().unwrap().events = events.clone();
    let dir = empty_dir("logs-json");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["-o", "json", "logs"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, format!("{}\n{}\n", events[1].json, events[0].json));
    for line in stdout.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert!(value["ts_ms"].as_u64().unwrap() > T0);
    }

    // Nothing kept: nothing on stdout; table mode says so on stderr.
    node.0.lock().unwrap().events.clear();
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "-o", "json"]).await;
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (Some(0), "", ""));
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs"]).await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (Some(0), "", "no events\n")
    );
}

#[tokio::test]
async fn logs_and_tunnels_usage_errors_are_refused_before_any_connection() {
    let endpoint = dead_endpoint();
    let dir = empty_dir("logs-usage");
    for (args, names) in [
        (&["logs", "--status", "600"][..], "--status"),
        (&["logs", "--status", "5x"], "--status"),
        (&["logs", "--status", "abc"], "--status"),
        (&["logs", "--since", "10"], "--since"),
        (&["logs", "--since", "0s"], "--since"),
        (&["logs", "--limit", "0"], "--limit"),
        (&["logs", "-f", "--limit", "5"], "--limit"),
        (&["logs", "--node", "n2", "--all-nodes"], "--node"),
        (&["tunnels", "--all-nodes", "--node", "n2"], "--node"),
        (&["tunnels", "--since", "1m"], "--since"),
    ] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
    let (_, _, stderr) = call(&endpoint, &dir, &["logs", "--status", "600"]).await;
    assert!(
        stderr.contains("a class such as 5xx or a code from 100 to 599"),
        "{stderr}"
    );
}

/// A cluster of fakes: `n1` (the one `--endpoint` reaches), `n2` and `n3`
/// live, `n4` dead and `n5` live but unreachable. `n1` advertises an
/// address where nothing listens: it must be asked through `--endpoint`.
async fn fake_cluster() -> (String, [FakeNode; 3], String) {
    let (e1, n1) = fake_node().await;
    let (e2, n2) = fake_node().await;
    let (e3, n3) = fake_node().await;
    let unreachable = dead_endpoint();
    let at = |m: Member, api_address: &str| Member {
        api_address: api_address.into(),
        ..m
    };
    let e2_addr = e2.trim_start_matches("http://").to_string();
    n1.0.lock().unwrap().members = Some(vec![
        at(member("n1", N1_ID, true), &dead_endpoint()),
        // A bare host:port, as nodes advertise it.
        at(member("n2", N2_ID, true), &e2_addr),
        at(
            member("n3", "c0ffee00-3333-4000-8000-000000000003", true),
            &e3,
        ),
        at(
            member("n4", "deadbeef-4444-4000-8000-000000000004", false),
            &e3,
        ),
        at(
            member("n5", "5555aaaa-5555-4000-8000-000000000005", true),
            &unreachable,
        ),
    ]);
    (e1, [n1, n2, n3], unreachable)
}

#[tokio::test]
async fn logs_all_nodes_merges_the_members_by_time_and_warns_about_the_others() {
    let (endpoint, [n1, n2, n3], unreachable) = fake_cluster().await;
    n1.0.lock().unwrap().events = vec![
        request_event("n1", 100, "/a", 200),
        request_event("n1", 400, "/d", 200),
    ];
    n2.0.lock().unwrap().events = vec![request_event("n2", 300, "/c", 502)];
    n3.0.lock().unwrap().events = vec![
        request_event("n3", 200, "/b", 200),
        request_event("n3", 500, "/e", 404),
    ];
    let dir = empty_dir("logs-all-nodes");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "--all-nodes"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = [
        request_line("n1", 100, "/a", 200),
        request_line("n3", 200, "/b", 200),
        request_line("n2", 300, "/c", 502),
        request_line("n1", 400, "/d", 200),
        request_line("n3", 500, "/e", 404),
    ];
    assert_eq!(stdout, want.clone().map(|l| l + "\n").concat());
    assert_eq!(
        stderr,
        format!(
            "warning: n4 is not live; not asked\n\
             warning: n5: cannot reach the node at {unreachable} — is it running?\n"
        )
    );
    for node in [&n1, &n2, &n3] {
        let seen = node.0.lock().unwrap();
        assert_eq!(seen.recent_asked.len(), 1);
        assert!(seen.authorization.iter().all(|a| a == "Bearer good"));
    }
    // n1 was asked for the members, then for its events on the same
    // connection: behind a load balancer, a new one might reach another node.
    let peers = n1.0.lock().unwrap().peers.clone();
    assert_eq!(peers.len(), 2);
    assert!(peers[0].is_some() && peers[0] == peers[1], "{peers:?}");

    // The limit keeps the newest across the nodes.
    let (code, stdout, _) = call(
        &endpoint,
        &dir,
        &["logs", "--all-nodes", "--limit", "2", "-o", "json"],
    )
    .await;
    assert_eq!(code, Some(0));
    let nodes: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    assert_eq!(nodes, ["\"/d\"", "\"/e\""]);
    assert_eq!(n2.0.lock().unwrap().recent_asked[1].limit, 2);
}

#[tokio::test]
async fn logs_node_asks_only_that_member() {
    let (endpoint, [n1, n2, n3], unreachable) = fake_cluster().await;
    n1.0.lock().unwrap().events = vec![request_event("n1", 100, "/a", 200)];
    n2.0.lock().unwrap().events = vec![request_event("n2", 300, "/c", 502)];
    let dir = empty_dir("logs-node");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "--node", "n2"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, request_line("n2", 300, "/c", 502) + "\n");
    assert_eq!(stderr, "");
    assert!(n1.0.lock().unwrap().recent_asked.is_empty());
    assert!(n3.0.lock().unwrap().recent_asked.is_empty());

    // By id; the answering node through --endpoint.
    let (code, stdout, _) = call(&endpoint, &dir, &["logs", "--node", N2_ID]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains(" n2 GET "), "{stdout}");
    let (code, stdout, _) = call(&endpoint, &dir, &["logs", "--node", "n1"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(stdout, request_line("n1", 100, "/a", 200) + "\n");

    for (args, want) in [
        (
            &["logs", "--node", "n9"][..],
            "error: the cluster has no member named n9 (see `charonctl cluster members`)\n"
                .to_string(),
        ),
        (
            &["tunnels", "--node", "n5"],
            format!("error: n5: cannot reach the node at {unreachable} — is it running?\n"),
        ),
    ] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr, want, "{args:?}");
    }
}

#[tokio::test]
async fn logs_all_nodes_fails_only_when_no_node_answers() {
    let (endpoint, node) = fake_node().await;
    let (a, b) = (dead_endpoint(), dead_endpoint());
    node.0.lock().unwrap().members = Some(vec![
        Member {
            api_address: a.clone(),
            ..member("n5", "5555aaaa", true)
        },
        Member {
            api_address: b.clone(),
            ..member("n6", "6666aaaa", true)
        },
    ]);
    let dir = empty_dir("logs-none-answered");
    for args in [&["logs", "--all-nodes"][..], &["logs", "--all-nodes", "-f"]] {
        let (code, stdout, stderr) = call(&endpoint, &dir, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 3, "{args:?}: {stderr}");
        for (node, at) in [("n5", &a), ("n6", &b)] {
            let warning =
                format!("warning: {node}: cannot reach the node at {at} — is it running?");
            assert!(
                lines.iter().any(|l| l.starts_with(&warning)),
                "{args:?}: {stderr}"
            );
        }
        assert_eq!(
            lines[2], "error: no node answered (asked: n5, n6)",
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn logs_follow_prints_events_as_they_come_until_the_stream_ends() {
    let (endpoint, node) = fake_node().await;
    {
        let mut seen = node.0.lock().unwrap();
        seen.events = vec![
            request_event("n1", 100, "/kept", 200),
            request_event("n1", 150, "/kept-404", 404),
        ];
        seen.live = vec![
            request_event("n1", 200, "/new", 200),
            request_event("n1", 250, "/new-404", 404),
        ];
    }
    let dir = empty_dir("logs-follow");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "-f"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(
        stdout,
        [
            request_line("n1", 200, "/new", 200),
            request_line("n1", 250, "/new-404", 404),
        ]
        .map(|l| l + "\n")
        .concat()
    );
    assert_eq!(node.0.lock().unwrap().follow_asked[0].since_ms, 0);

    // --since asks for the kept events first.
    let before = now_ms();
    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &[
            "-o", "json", "logs", "--follow", "--since", "5m", "--status", "404",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let paths: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    assert_eq!(paths, ["\"/kept-404\"", "\"/new-404\""]);
    let seen = node.0.lock().unwrap();
    let asked = &seen.follow_asked[1];
    assert_since(asked.since_ms, Duration::from_secs(300), before);
    assert_eq!(asked.filter.as_ref().unwrap().status, "404");
}

#[tokio::test]
async fn logs_follow_of_one_node_fails_with_its_stream() {
    let (endpoint, node) = fake_node().await;
    {
        let mut seen = node.0.lock().unwrap();
        seen.live = vec![request_event("n1", 200, "/new", 200)];
        seen.follow_error = Some((Code::Internal, "boom".into()));
    }
    let dir = empty_dir("logs-follow-fails");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "-f"]).await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, request_line("n1", 200, "/new", 200) + "\n");
    assert_eq!(stderr, "error: the node failed: boom (Internal)\n");

    let (code, _, stderr) = run(&mut charonctl(&[
        "logs",
        "-f",
        "--endpoint",
        &endpoint,
        "--token",
        "bad",
    ]))
    .await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("refused the token"), "{stderr}");
}

#[tokio::test]
async fn logs_follow_all_nodes_interleaves_and_goes_on_when_one_fails() {
    let (endpoint, [n1, n2, n3], unreachable) = fake_cluster().await;
    n1.0.lock().unwrap().live = vec![
        request_event("n1", 100, "/a", 200),
        request_event("n1", 400, "/d", 200),
    ];
    {
        let mut seen = n2.0.lock().unwrap();
        seen.live = vec![request_event("n2", 300, "/c", 502)];
        seen.follow_error = Some((Code::Internal, "boom".into()));
    }
    n3.0.lock().unwrap().live = vec![
        request_event("n3", 200, "/b", 200),
        request_event("n3", 500, "/e", 404),
        request_event("n3", 600, "/f", 404),
    ];
    let dir = empty_dir("logs-follow-all");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["logs", "-f", "--all-nodes"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            request_line("n1", 100, "/a", 200),
            request_line("n3", 200, "/b", 200),
            request_line("n2", 300, "/c", 502),
            request_line("n1", 400, "/d", 200),
            request_line("n3", 500, "/e", 404),
            request_line("n3", 600, "/f", 404),
        ]
    );
    // Each node's own order holds.
    let at = |path: &str| stdout.find(path).unwrap();
    assert!(at(" /a ") < at(" /d "), "{stdout}");
    assert!(
        at(" /b ") < at(" /e ") && at(" /e ") < at(" /f "),
        "{stdout}"
    );

    let warnings: Vec<&str> = stderr.lines().collect();
    for want in [
        "warning: n4 is not live; not asked".to_string(),
        format!("warning: n5: cannot reach the node at {unreachable} — is it running?"),
        "warning: n2: the node failed: boom (Internal)".to_string(),
        "warning: n1 ended the stream".to_string(),
        "warning: n3 ended the stream".to_string(),
    ] {
        assert!(
            warnings.iter().any(|w| w.starts_with(&want)),
            "{want:?} not in\n{stderr}"
        );
    }
    assert_eq!(warnings.len(), 5, "{stderr}");
    assert_eq!(warnings[0], "warning: n4 is not live; not asked");
    for node in [&n1, &n2, &n3] {
        assert_eq!(node.0.lock().unwrap().follow_asked.len(), 1);
    }
}

#[tokio::test]
async fn logs_follow_ends_quietly_when_stdout_is_closed() {
    let (endpoint, node) = fake_node().await;
    node.0.lock().unwrap().live = (0..100)
        .map(|i| request_event("n1", i, "/x", 200))
        .collect();
    let dir = empty_dir("logs-follow-pipe");
    let mut cmd = charonctl(&["logs", "-f", "--endpoint", &endpoint, "--token", "good"]);
    cmd.current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut first)
        .await
        .unwrap();
    assert!(first.contains(" GET app.test /x 200 "), "{first}");
    // Like `| head -1`: the reader goes away.
    drop(reader);
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("charonctl ends once stdout is closed")
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
}

fn open_tunnel(node: &str, id: u64, started_ms: u64) -> Tunnel {
    Tunnel {
        id,
        host: "app.test".into(),
        host_id: "h1".into(),
        client: "127.0.0.1:5556".into(),
        upstream: "http://127.0.0.1:3000".into(),
        started_ms,
        bytes_to_upstream: 1229,
        bytes_to_client: 3 * 1024 * 1024 + 400 * 1024,
        frames_to_upstream: 4,
        frames_to_client: 9,
        node: node.into(),
    }
}

#[tokio::test]
async fn tunnels_as_table_and_json_from_one_node_or_all() {
    let (endpoint, [n1, n2, _n3], unreachable) = fake_cluster().await;
    // 3m12s and a half ago, so the age reads 3m12s unless the run takes
    // half a second.
    let started = now_ms() - 192_500;
    n1.0.lock().unwrap().tunnels = vec![open_tunnel("n1", 7, started)];
    n2.0.lock().unwrap().tunnels = vec![
        open_tunnel("n2", 12, started),
        Tunnel {
            host: "other.test".into(),
            host_id: "h2".into(),
            ..open_tunnel("n2", 13, started)
        },
    ];
    let dir = empty_dir("tunnels");
    let (code, stdout, stderr) = call(&endpoint, &dir, &["tunnels"]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let want = "\
NODE  ID  HOST      CLIENT          UPSTREAM               AGE    UP       DOWN
n1    7   app.test  127.0.0.1:5556  http://127.0.0.1:3000  3m12s  1.2 KiB  3.4 MiB
";
    assert_eq!(stdout, want);
    assert_eq!(stderr, "");

    let (code, stdout, stderr) = call(
        &endpoint,
        &dir,
        &["tunnels", "--all-nodes", "--host", "app.test"],
    )
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["NODE", "ID", "HOST"],
            ["n1", "7", "app.test"],
            ["n2", "12", "app.test"],
        ]
    );
    assert!(
        stderr.ends_with(&format!(
            "warning: n5: cannot reach the node at {unreachable} — is it running?\n"
        )),
        "{stderr}"
    );
    assert_eq!(n2.0.lock().unwrap().tunnels_asked, ["app.test"]);

    let (code, stdout, _) = call(&endpoint, &dir, &["-o", "json", "tunnels", "--node", "n2"]).await;
    assert_eq!(code, Some(0));
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let tunnels = value.as_array().expect("an array");
    assert_eq!(tunnels.len(), 2);
    assert_eq!(tunnels[1]["id"], 13);
    assert_eq!(tunnels[1]["node"], "n2");
    assert_eq!(tunnels[1]["host_id"], "h2");
    assert_eq!(tunnels[1]["started_ms"], started);
    assert_eq!(tunnels[1]["bytes_to_upstream"], 1229);
    assert_eq!(tunnels[1]["frames_to_client"], 9);

    n1.0.lock().unwrap().tunnels.clear();
    let (code, stdout, _) = call(&endpoint, &dir, &["tunnels"]).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "no tunnels\n"));
    let (code, stdout, _) = call(&endpoint, &dir, &["tunnels", "-o", "json"]).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "[]\n"));
}

#[tokio::test]
async fn help_documents_logs_and_tunnels() {
    let (code, stdout, _) = run(&mut charonctl(&["--help"])).await;
    assert_eq!(code, Some(0));
    for command in ["logs", "tunnels"] {
        assert!(stdout.contains(command), "--help lacks {command}: {stdout}");
    }
    let (code, stdout, _) = run(&mut charonctl(&["logs", "--help"])).await;
    assert_eq!(code, Some(0));
    for text in [
        "-f, --follow",
        "--host <HOST>",
        "--status <CLASS|CODE>",
        "--since <DURATION>",
        "[default: 10m; with --follow: only new",
        "--limit <N>",
        "--node <NAME>",
        "--all-nodes",
        "JSONL",
        "closed by WHO code N",
        "charonctl logs -f --all-nodes",
    ] {
        assert!(
            stdout.contains(text),
            "`logs --help` lacks {text}: {stdout}"
        );
    }
    let (code, stdout, _) = run(&mut charonctl(&["tunnels", "--help"])).await;
    assert_eq!(code, Some(0));
    for text in ["--host <HOST>", "--node <NAME>", "--all-nodes", "AGE", "UP"] {
        assert!(
            stdout.contains(text),
            "`tunnels --help` lacks {text}: {stdout}"
        );
    }
}
