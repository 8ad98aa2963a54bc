//! The admin listener: `/healthz` (the process is alive), `/readyz` (it
//! should receive traffic: the route table has been built from the store,
//! the listeners are up and the node is not draining) and `/metrics`
//! (Prometheus text format); `/drain` starts a local drain (preStop hooks).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
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

/// Renders the metrics exposition (async: it reads cluster state).
pub type MetricsFn =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

async fn respond(
    health: &Health,
    metrics: &Option<MetricsFn>,
    drain: &Option<DrainFn>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    // A drain of this node only, for a preStop hook (Kubernetes' httpGet
    // can only GET): not replicated, it ends with the process.
    if let ("/drain", Some(d)) = (req.uri().path(), drain) {
        d();
        let mut resp = Response::new(Full::new(Bytes::from_static(
            b"draining: /readyz now says 503; tunnels close at the drain deadline\n",
        )));
        *resp.status_mut() = StatusCode::ACCEPTED;
        return resp;
    }
    if let ("/metrics", Some(m)) = (req.uri().path(), metrics) {
        let mut resp = Response::new(Full::new(Bytes::from(m().await)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
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
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Option<MetricsFn>,
    drain: Option<DrainFn>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
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
                async move { Ok::<_, Infallible>(respond(&health, &metrics, &drain, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
