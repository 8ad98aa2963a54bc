//! Runs the real `charonctl` binary. No Charon node is needed: the tests
//! either point it at a port where nothing listens, stop it at argument
//! parsing, or serve the `Hosts` and `Certificates` APIs from a small
//! in-process fake that records what the CLI sent.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};

use charon_proto::v1::certificates_server::{Certificates, CertificatesServer};
use charon_proto::v1::hosts_server::{Hosts, HostsServer};
use charon_proto::v1::{
    AddCertificateRequest, Certificate, CertificateReply, CreateHostRequest,
    DeleteCertificateRequest, DeleteCertificateResponse, DeleteHostRequest, DeleteHostResponse,
    GetCertificateRequest, GetHostRequest, ListCertificatesRequest, ListCertificatesResponse,
    ListHostsRequest, ListHostsResponse, ProxyHost, ReplaceCertificateRequest, UpdateHostRequest,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

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

/// What the fake node saw.
#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    created: Vec<CreateHostRequest>,
    updated: Vec<UpdateHostRequest>,
    certs_added: Vec<AddCertificateRequest>,
    certs_replaced: Vec<ReplaceCertificateRequest>,
    certs_deleted: Vec<String>,
}

/// Accepts only the token "good"; knows one host, `h1` / `a.example`, and two
/// certificates, `c1` (pinned by `h1`) and the expired `c-old`.
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
        self.0.lock().unwrap().authorization.push(auth.clone());
        if auth == "Bearer good" {
            Ok(())
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
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
        Ok(Response::new(ProxyHost {
            id: "h2".into(),
            version: 1,
            ..host
        }))
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
        Ok(Response::new(ProxyHost {
            enabled: request.enabled.unwrap_or(true),
            version: 2,
            ..h1()
        }))
    }

    async fn delete_host(
        &self,
        request: Request<DeleteHostRequest>,
    ) -> Result<Response<DeleteHostResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(DeleteHostResponse { id: "h1".into() }))
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
) -> Result<Response<CertificateReply>, Status> {
    if !key_pem.contains("PRIVATE KEY") {
        return Err(Status::invalid_argument("key_pem: not a PEM private key"));
    }
    Ok(Response::new(CertificateReply {
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
    }))
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
        cert_reply("c9", &request.name, request.cert_pem, &request.key_pem)
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
        cert_reply("c1", &name, request.cert_pem, &request.key_pem)
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
        Ok(Response::new(DeleteCertificateResponse { id }))
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
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(hosts)
            .add_service(certificates)
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
