//! The backend every target proxies to: as cheap as a hyper server gets, so
//! that what differs between targets is the proxy.
//!
//! - `GET /small`: 100 bytes; `GET /large`: 64 KiB (any other path: `/small`);
//! - a WebSocket upgrade on any path: an echo (text and binary messages come
//!   back as they were sent);
//! - on a second, h2c-only listener: the same, and WebSockets over HTTP/2
//!   (RFC 8441 extended CONNECT with `:protocol = websocket`), so that the
//!   `direct` target of the WebSocket-over-h2 tests has something to reach.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const SMALL_LEN: usize = 100;
pub const LARGE_LEN: usize = 64 * 1024;

#[derive(Clone)]
struct Bodies {
    small: Bytes,
    large: Bytes,
}

/// Serves HTTP/1.1 on `listen` and h2c on `h2_listen` until the process is
/// killed; prints `listening ADDR` and `listening-h2 ADDR` on stdout once
/// both are bound.
pub async fn serve(listen: SocketAddr, h2_listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let h2 = TcpListener::bind(h2_listen).await?;
    println!("listening {}", listener.local_addr()?);
    println!("listening-h2 {}", h2.local_addr()?);
    serve_both(listener, h2).await
}

/// HTTP/1.1 on `h1`, h2c on `h2`, both already bound.
pub async fn serve_both(h1: TcpListener, h2: TcpListener) -> anyhow::Result<()> {
    tokio::spawn(serve_h2(h2));
    serve_on(h1).await
}

/// h2c with prior knowledge, extended CONNECT enabled: WebSockets over
/// HTTP/2 get an echo, anything else the HTTP/1.1 answers.
async fn serve_h2(listener: TcpListener) {
    let bodies = bodies();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let bodies = bodies.clone();
                async move { Ok::<_, Infallible>(handle_h2(req, &bodies)) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .enable_connect_protocol()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// RFC 8441 §5: a CONNECT with `:protocol = websocket` is answered 200 and
/// the stream then carries the WebSocket's frames.
fn handle_h2(mut req: Request<Incoming>, bodies: &Bodies) -> Response<Full<Bytes>> {
    let websocket = req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return handle(req, bodies);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            echo(TokioIo::new(upgraded)).await;
        }
    });
    Response::new(Full::new(Bytes::new()))
}

fn bodies() -> Bodies {
    Bodies {
        small: Bytes::from(vec![b's'; SMALL_LEN]),
        large: Bytes::from(vec![b'L'; LARGE_LEN]),
    }
}

/// Serves on an already bound listener until the process ends.
pub async fn serve_on(listener: TcpListener) -> anyhow::Result<()> {
    let bodies = bodies();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE under the idle-tunnel test: wait instead of spinning.
                eprintln!("backend: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let bodies = bodies.clone();
                async move { Ok::<_, Infallible>(handle(req, &bodies)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn handle(mut req: Request<Incoming>, bodies: &Bodies) -> Response<Full<Bytes>> {
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade {
        if let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) {
            let accept = derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    echo(TokioIo::new(upgraded)).await;
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(
                SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
            );
            return resp;
        }
    }
    let body = if req.uri().path() == "/large" {
        bodies.large.clone()
    } else {
        bodies.small.clone()
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Small buffers: the idle test keeps ~9,000 of these open.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn echo<S>(io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    while let Some(Ok(msg)) = ws.next().await {
        // tungstenite answers pings and closes by itself.
        let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
        if echo && ws.send(msg).await.is_err() {
            return;
        }
    }
}
