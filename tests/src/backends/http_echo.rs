//! An HTTP echo server (hyper 1, HTTP/1.1 and h2).
//!
//! - any path: `200` with JSON `{name, method, path, version, headers, body_len}`;
//!   `headers` maps each (lower-cased) name to the list of its values;
//! - `/stream?bytes=N`: N bytes of [`crate::pattern_byte`] in 64 KiB chunks
//!   (chunked transfer encoding, produced lazily); [`EchoBackend::active_streams`]
//!   counts those whose body has not been dropped yet;
//! - `/upload`: reads the request body as it streams and answers JSON
//!   `{name, bytes, pattern_ok}` (whether it was the pattern);
//! - `/slow?ms=N`: the echo, after N ms;
//! - `/status?code=N`: an empty response with that status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::{pattern_byte, pattern_chunk};

type RespBody = BoxBody<Bytes, Infallible>;

struct State {
    name: String,
    hits: AtomicUsize,
    active_streams: AtomicUsize,
}

/// Counts a `/stream` body as active until hyper drops it (finished, or the
/// connection went away).
struct StreamGuard(Arc<State>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let (listener, addr) = super::bind().await?;
        let state = Arc::new(State {
            name: name.to_owned(),
            hits: AtomicUsize::new(0),
            active_streams: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = super::accept_loop(listener, move |tcp| {
            let state = st.clone();
            async move {
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            state,
            task,
        })
    }

    /// The upstream URL to configure (`http://127.0.0.1:P`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// `/stream` bodies still being produced.
    pub fn active_streams(&self) -> usize {
        self.state.active_streams.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection: the port now refuses.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("valid response")
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let q = query(&req);
    let number = |key: &str| q.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    match req.uri().path() {
        "/stream" => {
            let total = number("bytes");
            state.active_streams.fetch_add(1, Ordering::SeqCst);
            let guard = StreamGuard(state.clone());
            let stream =
                futures_util::stream::unfold((0u64, guard), move |(offset, guard)| async move {
                    if offset >= total {
                        return None;
                    }
                    let len = (total - offset).min(64 * 1024);
                    let frame = Frame::data(pattern_chunk(offset, len as usize));
                    Some((Ok::<_, Infallible>(frame), (offset + len, guard)))
                });
            Ok(Response::builder()
                .header("content-type", "application/octet-stream")
                .body(StreamBody::new(stream).boxed())
                .expect("valid response"))
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut bytes, mut pattern_ok) = (0u64, true);
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            for b in data.iter() {
                                pattern_ok &= *b == pattern_byte(bytes);
                                bytes += 1;
                            }
                        }
                    }
                    Err(e) => {
                        return Ok(json_response(
                            StatusCode::BAD_REQUEST,
                            json!({"name": state.name, "error": e.to_string(), "bytes": bytes}),
                        ))
                    }
                }
            }
            Ok(json_response(
                StatusCode::OK,
                json!({"name": state.name, "bytes": bytes, "pattern_ok": pattern_ok}),
            ))
        }
        "/status" => Ok(Response::builder()
            .status(StatusCode::from_u16(number("code") as u16).unwrap_or(StatusCode::OK))
            .body(Full::new(Bytes::new()).boxed())
            .expect("valid response")),
        path => {
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(number("ms"))).await;
            }
            let mut headers: HashMap<String, Vec<String>> = HashMap::new();
            for (name, value) in req.headers() {
                headers
                    .entry(name.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            let method = req.method().to_string();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let version = format!("{:?}", req.version());
            let body_len = match req.into_body().collect().await {
                Ok(body) => body.to_bytes().len(),
                Err(_) => 0,
            };
            Ok(json_response(
                StatusCode::OK,
                json!({
                    "name": state.name,
                    "method": method,
                    "path": path,
                    "version": version,
                    "headers": headers,
                    "body_len": body_len,
                }),
            ))
        }
    }
}
