//! Running the balancing commands that are more than one call (issue 19):
//! `host upstream drain|undrain` (with `--wait`, following every member),
//! and the per-upstream table `host show` prints.

use std::process::ExitCode;
use std::time::Duration;

use charon_proto::v1::{
    DrainUpstreamRequest, UndrainUpstreamRequest, UpstreamDrainResponse, UpstreamStatus,
};

use crate::balance::UpstreamCommand;
use crate::error::{CtlError, EXIT_NOT_DRAINED};

/// The per-upstream table of `host show`: one row per upstream, as the
/// node that answered sees it.
pub fn status_table(rows: &[UpstreamStatus]) -> String {
    let mut table = vec![[
        "NODE",
        "LOCATION",
        "UPSTREAM",
        "STATE",
        "WEIGHT",
        "TUNNELS",
        "IN-FLIGHT",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let node = if r.node_name.is_empty() {
            &r.node_id
        } else {
            &r.node_name
        };
        table.push(vec![
            node.clone(),
            if r.location.is_empty() {
                "-".into()
            } else {
                r.location.clone()
            },
            r.url.clone(),
            r.state.clone(),
            r.weight.to_string(),
            r.open_tunnels.to_string(),
            r.in_flight.to_string(),
        ]);
    }
    format!("\n{}", crate::output::align(&table))
}

/// Runs `host upstream drain|undrain`.
pub async fn upstream(
    cmd: UpstreamCommand,
    endpoint: &str,
    token: &str,
    json: bool,
) -> Result<ExitCode, CtlError> {
    let mut api = crate::client::connect(endpoint, token, crate::client::CALL_TIMEOUT).await?;
    let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
    let (reply, wait) = match cmd {
        UpstreamCommand::Drain(a) => {
            let req = DrainUpstreamRequest {
                id_or_domain: a.host.clone(),
                url: a.url.clone(),
                deadline_secs: secs(a.deadline),
                spread_secs: secs(a.spread),
            };
            let method = "Balance.DrainUpstream";
            let reply = api.balance.drain_upstream(req).await;
            let reply = reply.map_err(|s| CtlError::from_call(s, method, endpoint))?;
            let limit = a
                .wait_timeout
                .unwrap_or(a.deadline + a.spread + Duration::from_secs(60));
            (reply.into_inner(), a.wait.then_some((a.host, limit)))
        }
        UpstreamCommand::Undrain { host, url } => {
            let req = UndrainUpstreamRequest {
                id_or_domain: host,
                url,
            };
            let method = "Balance.UndrainUpstream";
            let reply = api.balance.undrain_upstream(req).await;
            let reply = reply.map_err(|s| CtlError::from_call(s, method, endpoint))?;
            (reply.into_inner(), None)
        }
    };
    println!("{}", drain_reply(&reply, json));
    match wait {
        Some((host, limit)) => follow(endpoint, token, &host, &reply.url, limit).await,
        None => Ok(ExitCode::SUCCESS),
    }
}

fn drain_reply(r: &UpstreamDrainResponse, json: bool) -> String {
    if json {
        return crate::output::to_json(r).trim_end().to_string();
    }
    if r.deadline_ms == 0 {
        return format!(
            "undrained {} of host {} (version {})",
            r.url, r.host_id, r.version
        );
    }
    let left = r.deadline_ms.saturating_sub(crate::output::now_ms()) / 1000;
    format!(
        "draining {} of host {} (version {}): no new work from any node; open tunnels get \
         Close 1001 in {left}s, spread over {}s",
        r.url, r.host_id, r.version, r.spread_secs
    )
}

/// Polls every member until none has a tunnel or request on `url`.
async fn follow(
    endpoint: &str,
    token: &str,
    host: &str,
    url: &str,
    limit: Duration,
) -> Result<ExitCode, CtlError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    loop {
        let rows = crate::observe::upstream_status_everywhere(endpoint, token, host).await?;
        let mine: Vec<&UpstreamStatus> = rows.iter().filter(|r| r.url == url).collect();
        let left: u64 = mine.iter().map(|r| r.open_tunnels + r.in_flight).sum();
        let nodes = mine
            .iter()
            .filter(|r| r.open_tunnels + r.in_flight > 0)
            .count();
        if left == 0 {
            eprintln!(
                "{url}: no tunnels or requests left on any of {} node(s)",
                mine.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        let line = format!("{url}: {left} tunnel(s)/request(s) left on {nodes} node(s)");
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("--wait-timeout passed with {left} left; the drain goes on");
            return Ok(ExitCode::from(EXIT_NOT_DRAINED));
        }
        // Poll interval of a bounded wait (the nodes report, they do not push).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
