//! `charonctl` against a real node: host add / list / show / update / rm,
//! and its refusals (wrong token, unreachable node, invalid input).

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use charon_tests::{client, eventually, EchoBackend, TestNode};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output, what: &str) -> Result<Output> {
    ensure!(
        out.status.success(),
        "charonctl {what} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    Ok(out)
}

fn json(out: &Output) -> Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("charonctl did not print JSON: {}", stdout(out)))
}

async fn routed_to(node: &TestNode, host: &str, want: &str) -> Result<()> {
    eventually(Duration::from_secs(10), || async {
        let resp = client::get(node.http, host, "/").await?;
        ensure!(
            resp.backend_name().as_deref() == Some(want),
            "{host} answered {} from {:?}, expected {want}",
            resp.status,
            resp.backend_name()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn host_add_list_show_update_rm() -> Result<()> {
    let node = TestNode::start().await?;
    let a = EchoBackend::start("a").await?;
    let b = EchoBackend::start("b").await?;

    let added = ok(
        node.ctl(&[
            "-o",
            "json",
            "host",
            "add",
            "cli.test",
            "www.cli.test",
            "--upstream",
            &a.url(),
        ])
        .await?,
        "host add",
    )?;
    let added = json(&added)?;
    let id = added["id"].as_str().context("no id")?.to_owned();
    assert_eq!(
        added["domains"],
        serde_json::json!(["cli.test", "www.cli.test"])
    );
    routed_to(&node, "www.cli.test", "a").await?;

    let list = json(&ok(
        node.ctl(&["-o", "json", "host", "list"]).await?,
        "host list",
    )?)?;
    let list = list
        .as_array()
        .context("host list -o json is not an array")?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    // The table form names the host too.
    let table = stdout(&ok(node.ctl(&["host", "list"]).await?, "host list")?);
    assert!(
        table.contains("cli.test") && table.contains(&id),
        "table:\n{table}"
    );

    let shown = json(&ok(
        node.ctl(&["-o", "json", "host", "show", "cli.test"])
            .await?,
        "host show",
    )?)?;
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["upstreams"], serde_json::json!([a.url()]));
    let version = shown["version"].as_u64().context("no version")?;

    let updated = json(&ok(
        node.ctl(&["-o", "json", "host", "update", &id, "--upstream", &b.url()])
            .await?,
        "host update",
    )?)?;
    assert_eq!(updated["upstreams"], serde_json::json!([b.url()]));
    assert!(
        updated["version"].as_u64() > Some(version),
        "version did not increase"
    );
    routed_to(&node, "cli.test", "b").await?;

    ok(node.ctl(&["host", "rm", "cli.test"]).await?, "host rm")?;
    let gone = node.ctl(&["host", "show", &id]).await?;
    assert!(
        !gone.status.success(),
        "show after rm succeeded: {}",
        stdout(&gone)
    );
    eventually(Duration::from_secs(10), || async {
        let resp = client::get(node.http, "cli.test", "/").await?;
        ensure!(
            resp.status == 404,
            "removed host still answers {}",
            resp.status
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn refusals_are_one_line_and_non_zero() -> Result<()> {
    let mut node = TestNode::start().await?;

    let out = node
        .ctl_with_token(Some("wrong-token"), &["host", "list"])
        .await?;
    assert!(!out.status.success(), "a wrong token was accepted");
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");

    let out = node
        .ctl(&["host", "add", "bad.test", "--upstream", "ftp://x:1"])
        .await?;
    assert!(!out.status.success(), "an ftp upstream was accepted");
    assert!(
        stderr(&out).to_lowercase().contains("upstream"),
        "{}",
        stderr(&out)
    );

    let list = node.ctl(&["-o", "json", "host", "list"]).await?;
    assert_eq!(json(&ok(list, "host list")?)?, serde_json::json!([]));

    node.stop().await?;
    let out = node.ctl(&["host", "list"]).await?;
    assert!(
        !out.status.success(),
        "charonctl succeeded against a stopped node"
    );
    let err = stderr(&out);
    assert!(!err.trim().is_empty(), "no reason given");
    assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
    Ok(())
}
