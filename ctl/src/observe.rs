//! `logs` and `tunnels`: what the nodes see of connections, from one node
//! or from every live member of the cluster.
//!
//! Without `--node` or `--all-nodes`, the `--endpoint` node is asked. With
//! either, it is first asked for the members (`Cluster.ListMembers`), then
//! each member is reached at its advertised API address with the same token
//! (tokens are replicated). The member that answered is asked on the very
//! connection that listed the members: `--endpoint` may be a port forward,
//! from where its advertised address cannot be reached, or a load balancer,
//! where a new connection may reach another node.
//!
//! Several nodes are asked at once. One that cannot be asked, or fails, is
//! named in a warning on stderr and the others go on; the command fails
//! only when none answered. `logs --follow` follows each node in a task of
//! its own, sending what it gets over a channel to the printer, so lines
//! come out as they arrive. Choosing the nodes ([`pick_targets`]) and
//! merging answers ([`merge_events`], [`gather`]) are free of I/O, so tests
//! can drive them.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;

use charon_proto::v1::{FollowLogsRequest, ListMembersRequest, LogEvent, Member, Tunnel};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::Status;

use crate::cli::{self, LogsArgs, Scope, TunnelsArgs};
use crate::client::{self, Api, CALL_TIMEOUT, MEMBER_CONNECT_TIMEOUT};
use crate::error::CtlError;
use crate::output::{self, now_ms, to_json};

/// Events in flight between the followers and the printer.
const FOLLOW_BUFFER: usize = 1024;

/// A node to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The member's name (or id) for warnings and errors; `None` for the
    /// `--endpoint` node asked without `--node` or `--all-nodes`, whose
    /// errors read as those of every other command.
    pub name: Option<String>,
    /// Its gRPC API, as `--endpoint` takes it.
    pub endpoint: String,
    /// Whether it is the node `--endpoint` reaches: asked on the connection
    /// that listed the members, if any, else connected to with the usual
    /// timeout rather than the short one for other members.
    pub is_endpoint: bool,
}

impl Target {
    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.endpoint.clone())
    }

    /// Names the target in `error`, when it is a member.
    fn wrap(&self, error: CtlError) -> CtlError {
        match &self.name {
            Some(node) => CtlError::Member {
                node: node.clone(),
                source: Box::new(error),
            },
            None => error,
        }
    }

    /// A connection to the target: `answering` for the `--endpoint` node
    /// when there is one, else a new one. The channel sets no timeout, for
    /// a stream followed until Ctrl-C; [`within`] bounds each call.
    async fn connect(&self, token: &str, answering: Option<&Api>) -> Result<Api, CtlError> {
        if let (true, Some(api)) = (self.is_endpoint, answering) {
            return Ok(api.clone());
        }
        let connect_timeout = if self.is_endpoint {
            client::CONNECT_TIMEOUT
        } else {
            MEMBER_CONNECT_TIMEOUT
        };
        client::connect_with(&self.endpoint, token, connect_timeout, None).await
    }
}

/// The targets, and the connection to the `--endpoint` node that listed
/// the members (for `--node` and `--all-nodes`).
struct Plan {
    targets: Vec<Target>,
    answering: Option<Api>,
}

/// Waits at most [`CALL_TIMEOUT`] for the answer of a call to `method`
/// (for a stream: for its start).
async fn within<T>(
    endpoint: &str,
    method: &str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CtlError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(CtlError::from_call(status, method, endpoint)),
        Err(_) => Err(CtlError::Timeout {
            endpoint: endpoint.to_string(),
        }),
    }
}

/// The targets `scope` names among the `members` that the `--endpoint`
/// node listed, with a warning (without `warning: `) for each live member
/// of `--all-nodes` that cannot be asked. `--node` matches a member's name
/// or full id.
pub fn pick_targets(
    scope: &Scope,
    members: &[Member],
    endpoint: &str,
) -> Result<(Vec<Target>, Vec<String>), CtlError> {
    let target = |m: &Member| -> Result<Target, CtlError> {
        let name = if m.name.is_empty() {
            m.node_id.clone()
        } else {
            m.name.clone()
        };
        if m.self_ {
            return Ok(Target {
                name: Some(name),
                endpoint: endpoint.to_string(),
                is_endpoint: true,
            });
        }
        if m.api_address.trim().is_empty() {
            return Err(CtlError::Unaskable {
                node: name,
                why: "it advertises no API address".into(),
            });
        }
        let endpoint = cli::parse_endpoint(&m.api_address).map_err(|why| CtlError::Unaskable {
            node: name.clone(),
            why: format!("its API address {:?}: {why}", m.api_address),
        })?;
        Ok(Target {
            name: Some(name),
            endpoint,
            is_endpoint: false,
        })
    };
    match scope {
        Scope::Endpoint => Ok((
            vec![Target {
                name: None,
                endpoint: endpoint.to_string(),
                is_endpoint: true,
            }],
            Vec::new(),
        )),
        Scope::Node(wanted) => {
            let member = members
                .iter()
                .find(|m| m.name == *wanted || m.node_id == *wanted)
                .ok_or_else(|| CtlError::NoMember(wanted.clone()))?;
            Ok((vec![target(member)?], Vec::new()))
        }
        Scope::AllNodes => {
            let mut targets = Vec::new();
            let mut warnings = Vec::new();
            for m in members {
                if !m.live {
                    let name = if m.name.is_empty() {
                        &m.node_id
                    } else {
                        &m.name
                    };
                    warnings.push(format!("{name} is not live; not asked"));
                    continue;
                }
                match target(m) {
                    Ok(t) => targets.push(t),
                    Err(e) => warnings.push(format!("{e}; not asked")),
                }
            }
            if targets.is_empty() {
                return Err(CtlError::NoLiveMember);
            }
            Ok((targets, warnings))
        }
    }
}

/// Finds the nodes to ask: for `--node` and `--all-nodes`, through the
/// members the `--endpoint` node lists. Warnings go to stderr at once.
async fn plan(scope: &Scope, endpoint: &str, token: &str) -> Result<Plan, CtlError> {
    let (members, answering) = if *scope == Scope::Endpoint {
        (Vec::new(), None)
    } else {
        let mut api = client::connect_with(endpoint, token, client::CONNECT_TIMEOUT, None).await?;
        let list = within(
            endpoint,
            "Cluster.ListMembers",
            api.cluster.list_members(ListMembersRequest {}),
        )
        .await?;
        (list.members, Some(api))
    };
    let (targets, warnings) = pick_targets(scope, &members, endpoint)?;
    for warning in warnings {
        write_stderr(&format!("warning: {warning}\n"))?;
    }
    Ok(Plan { targets, answering })
}

/// Asks every target at once with `ask`; the answers come back in the
/// order of the targets.
async fn ask_all<T, F, Fut>(targets: &[Target], ask: F) -> Vec<Result<T, CtlError>>
where
    T: Send + 'static,
    F: Fn(Target) -> Fut,
    Fut: Future<Output = Result<T, CtlError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for (i, target) in targets.iter().enumerate() {
        let answer = ask(target.clone());
        tasks.spawn(async move { (i, answer.await) });
    }
    let mut answers: Vec<Option<Result<T, CtlError>>> = targets.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        // The tasks do not panic, and nothing aborts them.
        let (i, answer) = joined.expect("an asking task ends normally");
        answers[i] = Some(answer);
    }
    answers
        .into_iter()
        .map(|a| a.expect("every task answered"))
        .collect()
}

/// A warning (without `warning: `) for each target that failed, and the
/// answers of those that answered. A single target's failure is the error
/// itself, with no warning; with several, only all of them failing is an
/// error, after a warning for each.
pub fn gather<T>(
    targets: &[Target],
    answers: Vec<Result<T, CtlError>>,
) -> (Vec<String>, Result<Vec<T>, CtlError>) {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (target, answer) in targets.iter().zip(answers) {
        match answer {
            Ok(answer) => ok.push(answer),
            Err(e) => errors.push(target.wrap(e)),
        }
    }
    if !ok.is_empty() || errors.is_empty() {
        return (errors.iter().map(ToString::to_string).collect(), Ok(ok));
    }
    if targets.len() == 1 && errors.len() == 1 {
        return (Vec::new(), Err(errors.remove(0)));
    }
    let names = targets.iter().map(Target::label).collect();
    (
        errors.iter().map(ToString::to_string).collect(),
        Err(CtlError::NoNodeAnswered(names)),
    )
}

/// Writes the warnings of [`gather`] on stderr, then returns its answers.
fn report<T>(gathered: (Vec<String>, Result<Vec<T>, CtlError>)) -> Result<Vec<T>, CtlError> {
    let (warnings, answers) = gathered;
    for warning in warnings {
        write_stderr(&format!("warning: {warning}\n"))?;
    }
    answers
}

/// The events of several nodes as one list, oldest first (by `ts_ms`; a
/// node's own order breaks ties), and only the `limit` newest when given.
pub fn merge_events(per_node: Vec<Vec<LogEvent>>, limit: Option<u32>) -> Vec<LogEvent> {
    let mut events: Vec<LogEvent> = per_node.into_iter().flatten().collect();
    events.sort_by_key(|e| e.ts_ms);
    if let Some(limit) = limit {
        let keep = usize::try_from(limit).unwrap_or(usize::MAX);
        events.drain(..events.len().saturating_sub(keep));
    }
    events
}

/// One event as printed: its line for people, or its access-log JSON line.
pub fn event_line(e: &LogEvent, json: bool) -> String {
    let mut line = if json {
        e.json.trim_end().to_string()
    } else {
        output::log_line(e)
    };
    line.push('\n');
    line
}

/// `logs`: the kept events (`Logs.Recent`), or with `--follow` the live
/// stream (`Logs.Follow`).
pub async fn logs(
    args: LogsArgs,
    endpoint: &str,
    token: &str,
    json: bool,
) -> Result<ExitCode, CtlError> {
    let plan = plan(&args.nodes.scope(), endpoint, token).await?;
    if args.follow {
        return follow(&args, plan, token, json).await;
    }
    let request = args.recent_request(now_ms());
    let token = token.to_string();
    let answers = ask_all(&plan.targets, |target| {
        let request = request.clone();
        let token = token.clone();
        let answering = plan.answering.clone();
        async move {
            let mut api = target.connect(&token, answering.as_ref()).await?;
            let reply = within(&target.endpoint, "Logs.Recent", api.logs.recent(request)).await?;
            Ok(reply.events)
        }
    })
    .await;
    let per_node = report(gather(&plan.targets, answers))?;
    let events = merge_events(per_node, args.limit);
    if events.is_empty() {
        if !json {
            write_stderr("no events\n")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let text: String = events.iter().map(|e| event_line(e, json)).collect();
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// What a follower tells the printer.
enum Update {
    Event(LogEvent),
    /// The target (by index) ended its stream.
    Ended(usize),
    /// A target could not be followed, or its stream failed.
    Failed(CtlError),
}

/// `logs --follow`: one task per target, printing as events arrive, until
/// every stream has ended (or Ctrl-C, or stdout is closed).
async fn follow(
    args: &LogsArgs,
    plan: Plan,
    token: &str,
    json: bool,
) -> Result<ExitCode, CtlError> {
    let request = args.follow_request(now_ms());
    let (tx, mut rx) = mpsc::channel(FOLLOW_BUFFER);
    let Plan { targets, answering } = plan;
    for (i, target) in targets.iter().enumerate() {
        let target = target.clone();
        let token = token.to_string();
        let request = request.clone();
        let answering = answering.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let api = target.connect(&token, answering.as_ref()).await;
            let followed = match api {
                Ok(api) => follow_one(api, &target, request, &tx).await,
                Err(e) => Err(e),
            };
            let update = match followed {
                Ok(()) => Update::Ended(i),
                Err(e) => Update::Failed(target.wrap(e)),
            };
            let _ = tx.send(update).await;
        });
    }
    drop(tx);
    let several = targets.len() > 1;
    let mut going = targets.len();
    let mut failed = 0;
    while let Some(update) = rx.recv().await {
        match update {
            Update::Event(e) => {
                if !write_stdout_open(&event_line(&e, json))? {
                    // A closed pipe (`| head`): nobody reads any more.
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Update::Ended(i) => {
                going -= 1;
                if several {
                    let others = if going > 0 {
                        "; following the others"
                    } else {
                        ""
                    };
                    write_stderr(&format!(
                        "warning: {} ended the stream{others}\n",
                        targets[i].label()
                    ))?;
                }
            }
            Update::Failed(e) if !several => return Err(e),
            Update::Failed(e) => {
                going -= 1;
                failed += 1;
                let others = if going > 0 {
                    "; following the others"
                } else {
                    ""
                };
                write_stderr(&format!("warning: {e}{others}\n"))?;
            }
        }
    }
    if failed == targets.len() {
        return Err(CtlError::NoNodeAnswered(
            targets.iter().map(Target::label).collect(),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows one target, sending its events to the printer, until its
/// stream ends (`Ok`) or fails; the printer having gone counts as an end.
async fn follow_one(
    mut api: Api,
    target: &Target,
    request: FollowLogsRequest,
    tx: &mpsc::Sender<Update>,
) -> Result<(), CtlError> {
    let mut stream = within(&target.endpoint, "Logs.Follow", api.logs.follow(request)).await?;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if tx.send(Update::Event(event)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(status) => {
                return Err(CtlError::from_call(status, "Logs.Follow", &target.endpoint))
            }
        }
    }
}

/// `tunnels`: the open tunnels of every target, grouped by node in the
/// order of the targets, each node's oldest first.
pub async fn tunnels(
    args: TunnelsArgs,
    endpoint: &str,
    token: &str,
    json: bool,
) -> Result<ExitCode, CtlError> {
    let plan = plan(&args.nodes.scope(), endpoint, token).await?;
    let request = args.to_request();
    let token = token.to_string();
    let answers = ask_all(&plan.targets, |target| {
        let request = request.clone();
        let token = token.clone();
        let answering = plan.answering.clone();
        async move {
            let mut api = target.connect(&token, answering.as_ref()).await?;
            let method = "Tunnels.ListTunnels";
            let reply = within(&target.endpoint, method, api.tunnels.list_tunnels(request)).await?;
            let mut tunnels = reply.tunnels;
            // The node names itself; an older one may not.
            for t in tunnels.iter_mut().filter(|t| t.node.is_empty()) {
                t.node = target.label();
            }
            Ok(tunnels)
        }
    })
    .await;
    let per_node = report(gather(&plan.targets, answers))?;
    let tunnels: Vec<Tunnel> = per_node.into_iter().flatten().collect();
    let text = if json {
        to_json(&tunnels)
    } else {
        output::tunnels_table(&tunnels, now_ms())
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// `host upstream drain --wait`: a host's upstreams as every live member
/// sees them (warnings for members that did not answer go to stderr).
pub async fn upstream_status_everywhere(
    endpoint: &str,
    token: &str,
    host: &str,
) -> Result<Vec<charon_proto::v1::UpstreamStatus>, CtlError> {
    let plan = plan(&Scope::AllNodes, endpoint, token).await?;
    let token = token.to_string();
    let answers = ask_all(&plan.targets, |target| {
        let token = token.clone();
        let answering = plan.answering.clone();
        let request = charon_proto::v1::UpstreamStatusRequest {
            id_or_domain: host.to_string(),
        };
        async move {
            let mut api = target.connect(&token, answering.as_ref()).await?;
            let call = api.balance.upstream_status(request);
            let reply = within(&target.endpoint, "Balance.UpstreamStatus", call).await?;
            Ok(reply.upstreams)
        }
    })
    .await;
    Ok(report(gather(&plan.targets, answers))?
        .into_iter()
        .flatten()
        .collect())
}

fn write_stderr(text: &str) -> Result<(), CtlError> {
    let mut err = std::io::stderr().lock();
    err.write_all(text.as_bytes())?;
    err.flush()?;
    Ok(())
}

/// Writes to stdout; `false` when the reader has gone (a closed pipe),
/// which ends `logs` quietly rather than as an error.
fn write_stdout_open(text: &str) -> Result<bool, CtlError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn write_stdout(text: &str) -> Result<(), CtlError> {
    write_stdout_open(text).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "http://127.0.0.1:7070";

    fn member(name: &str, api_address: &str, live: bool) -> Member {
        Member {
            node_id: format!("{name}-id"),
            name: name.into(),
            api_address: api_address.into(),
            live,
            self_: name == "n1",
            ..Member::default()
        }
    }

    fn members() -> Vec<Member> {
        vec![
            member("n1", "10.0.0.1:7070", true),
            member("n2", "10.0.0.2:7070", true),
            member("n3", "http://10.0.0.3:7070", true),
            member("n4", "10.0.0.4:7070", false),
            member("n5", "", true),
            member("n6", "http://bad host:1", true),
        ]
    }

    fn target(name: &str, endpoint: &str, is_endpoint: bool) -> Target {
        Target {
            name: Some(name.into()),
            endpoint: endpoint.into(),
            is_endpoint,
        }
    }

    #[test]
    fn all_nodes_asks_the_live_members_and_the_answering_one_through_the_endpoint() {
        let (targets, warnings) = pick_targets(&Scope::AllNodes, &members(), EP).unwrap();
        assert_eq!(
            targets,
            [
                target("n1", EP, true),
                target("n2", "http://10.0.0.2:7070", false),
                target("n3", "http://10.0.0.3:7070", false),
            ]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert_eq!(warnings[0], "n4 is not live; not asked");
        assert_eq!(
            warnings[1],
            "cannot ask n5: it advertises no API address; not asked"
        );
        assert!(
            warnings[2].starts_with("cannot ask n6: its API address \"http://bad host:1\": "),
            "{}",
            warnings[2]
        );
        assert!(matches!(
            pick_targets(&Scope::AllNodes, &members()[3..5], EP),
            Err(CtlError::NoLiveMember)
        ));
    }

    #[test]
    fn node_picks_one_member_by_name_or_id() {
        let pick = |name: &str| pick_targets(&Scope::Node(name.into()), &members(), EP);
        assert_eq!(
            pick("n2").unwrap(),
            (vec![target("n2", "http://10.0.0.2:7070", false)], vec![])
        );
        assert_eq!(pick("n3-id").unwrap().0[0].endpoint, "http://10.0.0.3:7070");
        assert_eq!(pick("n1").unwrap().0, [target("n1", EP, true)]);
        // Not live is no reason not to try when asked by name.
        assert_eq!(pick("n4").unwrap().0[0].endpoint, "http://10.0.0.4:7070");
        assert!(matches!(pick("n9"), Err(CtlError::NoMember(n)) if n == "n9"));
        assert!(matches!(pick("n5"), Err(CtlError::Unaskable { .. })));
        // Without --node or --all-nodes the members are not needed.
        let (targets, _) = pick_targets(&Scope::Endpoint, &[], EP).unwrap();
        assert_eq!(
            targets,
            [Target {
                name: None,
                endpoint: EP.into(),
                is_endpoint: true
            }]
        );
    }

    fn unreachable() -> CtlError {
        CtlError::Unreachable {
            endpoint: "http://10.0.0.2:7070".into(),
        }
    }

    #[test]
    fn gather_warns_about_failures_and_fails_only_when_none_answered() {
        let targets = [
            target("n1", EP, true),
            target("n2", "http://10.0.0.2:7070", false),
        ];
        let warning = "n2: cannot reach the node at http://10.0.0.2:7070 — is it running?";
        let (warnings, ok) = gather(&targets, vec![Ok(1), Err(unreachable())]);
        assert_eq!(ok.unwrap(), [1]);
        assert_eq!(warnings, [warning]);
        let (warnings, err) = gather::<u8>(&targets, vec![Err(unreachable()), Err(unreachable())]);
        assert_eq!(
            err.unwrap_err().to_string(),
            "no node answered (asked: n1, n2)"
        );
        assert_eq!(warnings.len(), 2);
        assert_eq!(warnings[1], warning);
        // One node: its error, named when it is a member, and no warning.
        let (warnings, err) = gather::<u8>(&targets[1..], vec![Err(unreachable())]);
        assert!(warnings.is_empty());
        assert_eq!(err.unwrap_err().to_string(), warning);
        let endpoint = Target {
            name: None,
            endpoint: EP.into(),
            is_endpoint: true,
        };
        let (_, err) = gather::<u8>(&[endpoint], vec![Err(unreachable())]);
        assert!(matches!(err, Err(CtlError::Unreachable { .. })), "{err:?}");
        let (warnings, none) = gather::<u8>(&targets[..0], vec![]);
        assert!(warnings.is_empty() && none.unwrap().is_empty());
    }

    fn event(node: &str, ts_ms: u64) -> LogEvent {
        LogEvent {
            json: format!("{{\"node\":\"{node}\",\"ts_ms\":{ts_ms}}}"),
            ts_ms,
            node: node.into(),
            kind: "http".into(),
            host: "app.test".into(),
            status: 200,
        }
    }

    #[test]
    fn events_are_merged_oldest_first_and_the_limit_keeps_the_newest() {
        let per_node = || {
            vec![
                vec![event("n1", 30), event("n1", 10), event("n1", 50)],
                vec![event("n2", 20), event("n2", 30), event("n2", 40)],
            ]
        };
        let order = |events: Vec<LogEvent>| {
            events
                .iter()
                .map(|e| format!("{}@{}", e.node, e.ts_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(merge_events(per_node(), None)),
            ["n1@10", "n2@20", "n1@30", "n2@30", "n2@40", "n1@50"]
        );
        assert_eq!(order(merge_events(per_node(), Some(2))), ["n2@40", "n1@50"]);
        assert_eq!(merge_events(per_node(), Some(100)).len(), 6);
        assert!(merge_events(vec![], Some(3)).is_empty());
    }

    #[test]
    fn json_mode_prints_the_line_as_the_node_wrote_it() {
        let e = LogEvent {
            json: "{\"a\":1}\n".into(),
            ..event("n1", 1)
        };
        assert_eq!(event_line(&e, true), "{\"a\":1}\n");
        assert!(event_line(&e, false).ends_with(" n1 - app.test - 200\n"));
    }
}
