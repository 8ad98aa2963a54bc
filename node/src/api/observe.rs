//! `charon.v1.Logs` (the access log, kept and live) and `charon.v1.Tunnels`
//! (open WebSocket tunnels).

use std::pin::Pin;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use charon_proto::v1 as pb;
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::proxy::Proxy;
use crate::telemetry::accesslog::{matches, AccessLog, Event};

pub struct LogsApi {
    log: Arc<AccessLog>,
}

impl LogsApi {
    pub fn new(log: Arc<AccessLog>) -> Self {
        LogsApi { log }
    }
}

fn to_pb(node: &str, e: &Event) -> pb::LogEvent {
    let entry = e.entry();
    pb::LogEvent {
        json: e.json().to_string(),
        ts_ms: entry.ts_ms,
        node: node.to_string(),
        kind: entry.kind.to_string(),
        host: entry.host.to_string(),
        status: u32::from(entry.status),
    }
}

fn check_status(s: &str) -> Result<(), Status> {
    let ok = s.is_empty()
        || (s.len() == 3 && s.ends_with("xx") && s.as_bytes()[0].is_ascii_digit())
        || s.parse::<u16>().is_ok_and(|c| (100..600).contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "filter.status: {s:?} must be a class like 5xx or a code like 404"
        )))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::LogEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::logs_server::Logs for LogsApi {
    type FollowStream = EventStream;

    async fn follow(
        &self,
        req: Request<pb::FollowLogsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        let f = r.filter.unwrap_or_default();
        check_status(&f.status)?;
        // Subscribe before reading the ring, so nothing falls in between.
        let mut live = self.log.follow();
        let node = self.log.node().to_string();
        let backlog: Vec<pb::LogEvent> = if r.since_ms > 0 {
            self.log
                .recent(r.since_ms)
                .iter()
                .filter(|e| matches(e, &f.host, &f.status))
                .map(|e| to_pb(&node, e))
                .collect()
        } else {
            Vec::new()
        };
        let last_backlog = backlog.last().map(|e| e.ts_ms).unwrap_or(0);
        let stream = async_stream(backlog, move |tx| async move {
            loop {
                match live.recv().await {
                    Ok(e) => {
                        if e.entry().ts_ms < last_backlog || !matches(&e, &f.host, &f.status) {
                            continue;
                        }
                        if tx.send(Ok(to_pb(&node, &e))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "a log follower fell behind; events skipped");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn recent(
        &self,
        req: Request<pb::RecentLogsRequest>,
    ) -> Result<Response<pb::RecentLogsResponse>, Status> {
        let r = req.into_inner();
        let f = r.filter.unwrap_or_default();
        check_status(&f.status)?;
        let node = self.log.node();
        let mut events: Vec<pb::LogEvent> = self
            .log
            .recent(r.since_ms)
            .iter()
            .filter(|e| matches(e, &f.host, &f.status))
            .map(|e| to_pb(node, e))
            .collect();
        if r.limit > 0 && events.len() > r.limit as usize {
            events.drain(..events.len() - r.limit as usize);
        }
        Ok(Response::new(pb::RecentLogsResponse { events }))
    }
}

/// A stream that first yields `first`, then whatever `producer` sends.
fn async_stream<F, Fut>(first: Vec<pb::LogEvent>, producer: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::LogEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(producer(tx));
    let head = futures_util::stream::iter(first.into_iter().map(Ok));
    let tail = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Box::pin(futures_util::StreamExt::chain(head, tail))
}

pub struct TunnelsApi {
    proxy: Arc<Proxy>,
    node: String,
}

impl TunnelsApi {
    pub fn new(proxy: Arc<Proxy>, node: String) -> Self {
        TunnelsApi { proxy, node }
    }
}

#[tonic::async_trait]
impl pb::tunnels_server::Tunnels for TunnelsApi {
    async fn list_tunnels(
        &self,
        req: Request<pb::ListTunnelsRequest>,
    ) -> Result<Response<pb::ListTunnelsResponse>, Status> {
        let host = req.into_inner().host;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let mut tunnels: Vec<pb::Tunnel> = self
            .proxy
            .tunnels
            .list()
            .iter()
            .filter(|t| host.is_empty() || *t.host_name == *host || *t.host_id == *host)
            .map(|t| pb::Tunnel {
                id: t.id,
                host: t.host_name.to_string(),
                host_id: t.host_id.to_string(),
                client: t.client.to_string(),
                upstream: t.upstream.to_string(),
                started_ms: t
                    .started()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                bytes_to_upstream: t.to_upstream.bytes.load(relaxed),
                bytes_to_client: t.to_client.bytes.load(relaxed),
                frames_to_upstream: t.to_upstream.frames.load(relaxed),
                frames_to_client: t.to_client.frames.load(relaxed),
                node: self.node.clone(),
            })
            .collect();
        tunnels.sort_by_key(|t| (t.started_ms, t.id));
        Ok(Response::new(pb::ListTunnelsResponse { tunnels }))
    }
}
