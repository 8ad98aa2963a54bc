//! The admin listener: `/healthz` (the process is alive), `/readyz` (it
//! should receive traffic: the route table has been built from the store,
//! the listeners are up and the node is not draining) and `/metrics`
//! (Prometheus text format), open to anyone who reaches the port; and
//! `POST /drain`, which starts a local drain and needs a token.
//!
//! Nothing here changes state without authentication: the port is reached
//! by every pod of a Kubernetes cluster and by load balancers, and a GET
//! with a side effect can be triggered by any web page (`<img src>`), so
//! `/drain` takes only POST with `Authorization: Bearer <token>` (a browser
//! cannot add that header across origins). SIGTERM runs the same drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Starts a local drain (`/drain`).
pub type DrainFn = Arc<dyn Fn() + Send + Sync>;

/// Whether a bearer token is one the API accepts.
pub type AuthorizeFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// `POST /drain`: what it starts and who may start it.
#[derive(Clone)]
pub struct LocalDrain {
    pub start: DrainFn,
    pub authorize: AuthorizeFn,
}

/// Renders the metrics exposition (async: it reads cluster state).
pub type MetricsFn =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

async fn respond(
    health: &Health,
    metrics: &Option<MetricsFn>,
    drain: &Option<LocalDrain>,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if let ("/drain", Some(d)) = (req.uri().path(), drain) {
        return drain_response(d, req.method(), req.headers(), peer);
    }
    if let ("/metrics", Some(m)) = (req.uri().path(), metrics) {
        let mut resp = Response::new(Full::new(Bytes::from(m().await)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return resp;
    }
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => (StatusCode::OK, "ready\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    };
    text(status, body)
}

/// A drain of this node only: not replicated, it ends with the process
/// (the replicated one is `charonctl node drain`). POST with a token the
/// API accepts; anything else is refused and changes nothing.
fn drain_response(
    d: &LocalDrain,
    method: &Method,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if method != Method::POST {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "/drain takes POST with \"Authorization: Bearer <token>\" (or send the node SIGTERM)\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return resp;
    }
    let refusal = match bearer_token(headers) {
        None => Some((
            "Bearer realm=\"charon-admin\"",
            "/drain needs \"Authorization: Bearer <token>\"\n",
        )),
        Some(token) if !(d.authorize)(token) => Some((
            "Bearer realm=\"charon-admin\", error=\"invalid_token\"",
            "invalid token\n",
        )),
        Some(_) => None,
    };
    if let Some((challenge, body)) = refusal {
        tracing::warn!(%peer, "refused a /drain without a valid token");
        let mut resp = text(StatusCode::UNAUTHORIZED, body);
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(challenge),
        );
        return resp;
    }
    (d.start)();
    text(
        StatusCode::ACCEPTED,
        "draining: /readyz now says 503; tunnels close at the drain deadline\n",
    )
}

/// The token of `Authorization: Bearer <token>` (the scheme is
/// case-insensitive, RFC 9110 §11.1).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Option<MetricsFn>,
    drain: Option<LocalDrain>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let health = health.clone();
        let (metrics, drain) = (metrics.clone(), drain.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (health, metrics, drain) = (health.clone(), metrics.clone(), drain.clone());
                async move { Ok::<_, Infallible>(respond(&health, &metrics, &drain, &req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
