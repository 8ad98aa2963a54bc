//! The gRPC API: bearer-token authentication, input validation that names
//! the field and writes nothing, unique domains, and the host life cycle.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_proto::v1::{
    CreateHostRequest, DeleteHostRequest, GetHostRequest, ListHostsRequest, Location, ProxyHost,
    StringList, UpdateHostRequest,
};
use charon_tests::{client, eventually, host_request, EchoBackend, TestNode};
use tonic::Code;

fn upstream(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

async fn host_count(node: &TestNode) -> Result<usize> {
    let mut api = node.grpc_client().await?;
    Ok(api
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts
        .len())
}

async fn assert_refused(node: &TestNode, token: Option<&str>) -> Result<()> {
    let mut api = node.grpc_client_with(token).await?;
    let err = api
        .list_hosts(ListHostsRequest {})
        .await
        .expect_err("ListHosts was allowed");
    assert_eq!(err.code(), Code::Unauthenticated, "ListHosts: {err}");
    let err = api
        .create_host(host_request(&["sneaky.test"], &[upstream(1)]))
        .await
        .expect_err("CreateHost was allowed");
    assert_eq!(err.code(), Code::Unauthenticated, "CreateHost: {err}");
    let err = api
        .get_host(GetHostRequest {
            id_or_domain: "sneaky.test".into(),
        })
        .await
        .expect_err("GetHost was allowed");
    assert_eq!(err.code(), Code::Unauthenticated, "GetHost: {err}");
    assert_eq!(host_count(node).await?, 0, "a refused call wrote something");
    Ok(())
}

#[tokio::test]
async fn calls_without_a_token_are_unauthenticated() -> Result<()> {
    let node = TestNode::start().await?;
    assert_refused(&node, None).await
}

#[tokio::test]
async fn calls_with_a_wrong_token_are_unauthenticated() -> Result<()> {
    let node = TestNode::start().await?;
    assert_refused(&node, Some("not-the-token")).await?;
    // A prefix of the real token, and the token with a character added.
    let prefix = node.token[..node.token.len() - 1].to_owned();
    assert_refused(&node, Some(&prefix)).await?;
    assert_refused(&node, Some(&format!("{}x", node.token))).await?;
    assert_refused(&node, Some("")).await
}

#[tokio::test]
async fn admin_token_file_is_private_and_works() -> Result<()> {
    let node = TestNode::start().await?;
    let path = node.data_dir.join("admin.token");
    let meta = std::fs::metadata(&path).context("admin.token")?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "admin.token mode");
    assert!(
        node.token.len() >= 16,
        "the generated token is short: {} chars",
        node.token.len()
    );
    assert_eq!(host_count(&node).await?, 0);
    Ok(())
}

#[tokio::test]
async fn admin_token_from_the_environment() -> Result<()> {
    let node = TestNode::builder()
        .env("CHARON_ADMIN_TOKEN", "env-token-0123456789abcdef")
        .start()
        .await?;
    assert_eq!(node.token, "env-token-0123456789abcdef");
    assert_eq!(host_count(&node).await?, 0);
    assert_refused(&node, Some("env-token-0123456789abcde")).await
}

/// Each case: a request, and the words one of which the message must contain.
fn invalid_creates() -> Vec<(&'static str, CreateHostRequest, &'static [&'static str])> {
    let with = |f: &dyn Fn(&mut ProxyHost)| {
        let mut req = host_request(&["ok.test"], &[upstream(9)]);
        f(req.host.as_mut().unwrap());
        req
    };
    vec![
        ("no domains", with(&|h| h.domains.clear()), &["domain"]),
        (
            "bad domain",
            with(&|h| h.domains = vec!["bad domain!".into()]),
            &["domain"],
        ),
        (
            "empty domain",
            with(&|h| h.domains = vec!["".into()]),
            &["domain"],
        ),
        (
            "inner wildcard",
            with(&|h| h.domains = vec!["a.*.test".into()]),
            &["domain"],
        ),
        (
            "no upstreams",
            with(&|h| h.upstreams.clear()),
            &["upstream"],
        ),
        (
            "ftp upstream",
            with(&|h| h.upstreams = vec!["ftp://10.0.0.1:21".into()]),
            &["upstream"],
        ),
        (
            "not a url",
            with(&|h| h.upstreams = vec!["not a url".into()]),
            &["upstream"],
        ),
        (
            "location without slash",
            with(&|h| {
                h.locations = vec![Location {
                    path_prefix: "api".into(),
                    upstreams: vec![upstream(9)],
                    balancing: None,
                    ..Default::default()
                }]
            }),
            &["location", "path_prefix"],
        ),
        (
            "location bad upstream",
            with(&|h| {
                h.locations = vec![Location {
                    path_prefix: "/api".into(),
                    upstreams: vec!["nope".into()],
                    balancing: None,
                    ..Default::default()
                }]
            }),
            &["location", "upstream"],
        ),
        (
            "no host at all",
            CreateHostRequest::default(),
            &["host", "domain"],
        ),
    ]
}

#[tokio::test]
async fn invalid_input_is_refused_naming_the_field_and_nothing_is_written() -> Result<()> {
    let node = TestNode::start().await?;
    let mut api = node.grpc_client().await?;
    for (case, req, words) in invalid_creates() {
        let err = api
            .create_host(req)
            .await
            .err()
            .with_context(|| format!("{case}: CreateHost was accepted"))?;
        assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err}");
        let msg = err.message().to_ascii_lowercase();
        assert!(
            words.iter().any(|w| msg.contains(w)),
            "{case}: the message {:?} names none of {words:?}",
            err.message()
        );
    }
    assert_eq!(
        host_count(&node).await?,
        0,
        "an invalid create wrote a host"
    );

    // An invalid update leaves the host as it was.
    let host = api
        .create_host(host_request(&["valid.test"], &[upstream(9)]))
        .await?
        .into_inner();
    let err = api
        .update_host(UpdateHostRequest {
            id_or_domain: host.id.clone(),
            upstreams: Some(StringList {
                values: vec!["ftp://nope:1".into()],
            }),
            name: Some("renamed".into()),
            ..Default::default()
        })
        .await
        .expect_err("an invalid update was accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().to_ascii_lowercase().contains("upstream"),
        "{err}"
    );
    let after = api
        .get_host(GetHostRequest {
            id_or_domain: host.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.upstreams, host.upstreams);
    assert_eq!(after.name, host.name);
    assert_eq!(after.version, host.version);
    Ok(())
}

#[tokio::test]
async fn duplicate_domains_are_already_exists() -> Result<()> {
    let node = TestNode::start().await?;
    let mut api = node.grpc_client().await?;
    api.create_host(host_request(&["taken.test"], &[upstream(9)]))
        .await?;

    for domains in [
        &["taken.test"][..],
        &["TAKEN.test"],
        &["free.test", "taken.test"],
    ] {
        let err = api
            .create_host(host_request(domains, &[upstream(9)]))
            .await
            .expect_err("duplicate domain accepted");
        assert_eq!(err.code(), Code::AlreadyExists, "{domains:?}: {err}");
        assert!(err.message().contains("taken.test"), "{domains:?}: {err}");
    }
    api.create_host(host_request(&["*.wild.test"], &[upstream(9)]))
        .await?;
    let err = api
        .create_host(host_request(&["*.WILD.test"], &[upstream(9)]))
        .await
        .expect_err("duplicate wildcard accepted");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert_eq!(host_count(&node).await?, 2);
    let err = api
        .get_host(GetHostRequest {
            id_or_domain: "free.test".into(),
        })
        .await
        .expect_err("free.test was written by a refused create");
    assert_eq!(err.code(), Code::NotFound);

    // Taking a domain by update is refused too.
    let other = api
        .create_host(host_request(&["other.test"], &[upstream(9)]))
        .await?
        .into_inner();
    let err = api
        .update_host(UpdateHostRequest {
            id_or_domain: other.id.clone(),
            domains: Some(StringList {
                values: vec!["other.test".into(), "taken.test".into()],
            }),
            ..Default::default()
        })
        .await
        .expect_err("update took a domain of another host");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    Ok(())
}

#[tokio::test]
async fn host_life_cycle_through_the_api() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;
    let mut api = node.grpc_client().await?;

    let created = api
        .create_host(host_request(&["Life.Test", "*.life.test"], &[a.url()]))
        .await?
        .into_inner();
    assert!(!created.id.is_empty(), "no id");
    assert_eq!(
        created.domains,
        ["life.test", "*.life.test"],
        "domains not lower-cased"
    );
    assert_eq!(
        created.name, "life.test",
        "name does not default to the first domain"
    );
    assert!(
        created.enabled && created.websocket && created.preserve_host && created.forwarded_headers,
        "documented defaults are true: {created:?}"
    );
    assert!(created.created_at_ms > 0 && created.updated_at_ms >= created.created_at_ms);

    for key in [created.id.as_str(), "life.test", "*.life.test"] {
        let got = api
            .get_host(GetHostRequest {
                id_or_domain: key.into(),
            })
            .await
            .with_context(|| format!("GetHost {key}"))?
            .into_inner();
        assert_eq!(got.id, created.id, "GetHost {key}");
    }
    let list = api
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    assert_eq!(list.len(), 1);
    node.wait_routed("life.test").await?;

    let updated = api
        .update_host(UpdateHostRequest {
            id_or_domain: "life.test".into(),
            upstreams: Some(StringList {
                values: vec![b.url()],
            }),
            expected_version: Some(created.version),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        updated.version > created.version,
        "version did not increase"
    );
    assert_eq!(updated.domains, created.domains, "unset fields changed");
    assert_eq!(updated.upstreams, [b.url()]);
    eventually(Duration::from_secs(10), || async {
        let resp = client::get(node.http, "x.life.test", "/").await?;
        ensure!(
            resp.backend_name().as_deref() == Some("b"),
            "still {:?}",
            resp.backend_name()
        );
        Ok(())
    })
    .await?;

    // A stale expected_version is refused.
    let err = api
        .update_host(UpdateHostRequest {
            id_or_domain: created.id.clone(),
            name: Some("stale".into()),
            expected_version: Some(created.version),
            ..Default::default()
        })
        .await
        .expect_err("stale update accepted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    let err = api
        .delete_host(DeleteHostRequest {
            id_or_domain: "life.test".into(),
            expected_version: Some(1),
        })
        .await
        .expect_err("delete guarded by a stale version accepted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let current = api
        .get_host(GetHostRequest {
            id_or_domain: "life.test".into(),
        })
        .await?
        .into_inner();
    let deleted = api
        .delete_host(DeleteHostRequest {
            id_or_domain: "life.test".into(),
            expected_version: Some(current.version),
        })
        .await?
        .into_inner();
    assert_eq!(deleted.id, created.id);
    let err = api
        .get_host(GetHostRequest {
            id_or_domain: created.id.clone(),
        })
        .await
        .expect_err("deleted host still there");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains(&created.id),
        "NotFound does not name the id: {err}"
    );
    let err = api
        .update_host(UpdateHostRequest {
            id_or_domain: "life.test".into(),
            name: Some("ghost".into()),
            ..Default::default()
        })
        .await
        .expect_err("update of a deleted host succeeded");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = api
        .delete_host(DeleteHostRequest {
            id_or_domain: created.id.clone(),
            expected_version: None,
        })
        .await
        .expect_err("second delete succeeded");
    assert_eq!(err.code(), Code::NotFound);
    eventually(Duration::from_secs(10), || async {
        let resp = client::get(node.http, "life.test", "/").await?;
        ensure!(
            resp.status == 404,
            "deleted host still routed: {}",
            resp.status
        );
        Ok(())
    })
    .await
}
