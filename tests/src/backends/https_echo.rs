//! An HTTPS echo server (tokio-rustls + hyper HTTP/1.1) for `https://`
//! upstreams: it presents a certificate made at test time and answers any
//! request with `200` JSON `{name, sni, method, path, host, version}`,
//! where `sni` is the server name the client (the node) asked for, or null.
//! It records the SNI of every completed handshake and counts handshakes
//! that failed (a client that refused its certificate).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::tls::{server_config, Leaf, TestCa};

#[derive(Default)]
struct State {
    name: String,
    handshakes: Mutex<Vec<Option<String>>>,
    failed_handshakes: AtomicUsize,
    requests: AtomicUsize,
}

pub struct HttpsEchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl HttpsEchoBackend {
    /// Listens on `127.0.0.1:0` presenting `leaf` followed by `chain`.
    pub async fn start(name: &str, leaf: &Leaf, chain: &[&TestCa]) -> anyhow::Result<Self> {
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(leaf, chain)?);
        let (listener, addr) = super::bind().await?;
        let state = Arc::new(State {
            name: name.to_owned(),
            ..Default::default()
        });
        let st = state.clone();
        let task = super::accept_loop(listener, move |tcp| {
            let state = st.clone();
            let acceptor = acceptor.clone();
            async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        state.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                state.handshakes.lock().unwrap().push(sni.clone());
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    let sni = sni.clone();
                    async move { handle(&state, sni, req) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
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

    /// `https://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `https://{host}:P` (the node resolves `host`; SNI is `host`).
    pub fn url_with_host(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    /// The SNI of each completed handshake (None: the client sent none).
    pub fn handshakes(&self) -> Vec<Option<String>> {
        self.state.handshakes.lock().unwrap().clone()
    }

    /// Handshakes that did not complete (the client refused us, ...).
    pub fn failed_handshakes(&self) -> usize {
        self.state.failed_handshakes.load(Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HttpsEchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn handle(
    state: &State,
    sni: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let body = json!({
        "name": state.name,
        "sni": sni,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
        "version": format!("{:?}", req.version()),
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response"))
}
