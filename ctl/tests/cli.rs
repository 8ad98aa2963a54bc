//! Runs the real `charonctl` binary. No Charon node is needed: the tests
//! either point it at a port where nothing listens, stop it at argument
//! parsing, or serve the `Hosts` API from a small in-process fake that
//! records what the CLI sent.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};

use charon_proto::v1::hosts_server::{Hosts, HostsServer};
use charon_proto::v1::{
    CreateHostRequest, DeleteHostRequest, DeleteHostResponse, GetHostRequest, ListHostsRequest,
    ListHostsResponse, ProxyHost, UpdateHostRequest,
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
}

/// Accepts only the token "good" and knows one host, `h1` / `a.example`.
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

/// Serves the fake on a loopback port; the server task ends with the test's
/// runtime.
async fn fake_node() -> (String, FakeNode) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let node = FakeNode::default();
    let service = HostsServer::new(node.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
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
