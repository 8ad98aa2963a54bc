//! A WebSocket echo server (tokio-tungstenite).
//!
//! Echoes text and binary messages. Text commands:
//! - `whoami?` → its name (tells which upstream a tunnel reached);
//! - `headers?` → JSON object of the handshake request headers;
//! - `close:<code>` → it closes the connection with that code.
//!
//! It records the close code of every Close frame it receives (1005 when the
//! frame has none), and chooses the first offered subprotocol that it
//! supports ([`SUBPROTOCOLS`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The subprotocols this backend speaks, in no particular order.
pub const SUBPROTOCOLS: &[&str] = &["chat", "superchat"];

#[derive(Default)]
struct State {
    name: String,
    accepted: AtomicUsize,
    open: AtomicUsize,
    close_codes: Mutex<Vec<u16>>,
    handshakes: Mutex<Vec<Vec<(String, String)>>>,
}

pub struct WsEchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl WsEchoBackend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let (listener, addr) = super::bind().await?;
        let state = Arc::new(State {
            name: name.to_owned(),
            ..Default::default()
        });
        let st = state.clone();
        let task = super::accept_loop(listener, move |tcp| serve(st.clone(), tcp));
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

    /// WebSocket handshakes completed so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// WebSocket connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Close codes received from clients, in order.
    pub fn close_codes(&self) -> Vec<u16> {
        self.state.close_codes.lock().unwrap().clone()
    }

    /// Headers of every handshake request (names as the http crate keeps
    /// them: lower case).
    pub fn handshakes(&self) -> Vec<Vec<(String, String)>> {
        self.state.handshakes.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for WsEchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// The callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn serve(state: Arc<State>, tcp: tokio::net::TcpStream) {
    let st = state.clone();
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        st.handshakes.lock().unwrap().push(headers);
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .collect();
        if let Some(chosen) = offered.iter().find(|p| SUBPROTOCOLS.contains(&p.as_str())) {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                chosen.parse().expect("valid header value"),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(
        tcp,
        callback,
        Some(crate::client::ws_config()),
    )
    .await
    else {
        return;
    };
    state.accepted.fetch_add(1, Ordering::SeqCst);
    state.open.fetch_add(1, Ordering::SeqCst);
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(text) if text.as_str() == "whoami?" => {
                Some(Message::text(state.name.clone()))
            }
            Message::Text(text) if text.as_str() == "headers?" => {
                let last = state.handshakes.lock().unwrap().last().cloned();
                let map: serde_json::Map<String, serde_json::Value> = last
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into()))
                    .collect();
                Some(Message::text(serde_json::Value::Object(map).to_string()))
            }
            Message::Text(text) if text.as_str().starts_with("close:") => {
                let code: u16 = text.as_str()["close:".len()..].parse().unwrap_or(1000);
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "bye".into(),
                };
                let _ = ws.close(Some(frame)).await;
                None
            }
            Message::Text(_) | Message::Binary(_) => Some(msg),
            Message::Ping(_) => {
                // tungstenite queued the Pong; push it out now.
                let _ = ws.flush().await;
                None
            }
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                state.close_codes.lock().unwrap().push(code);
                None
            }
            Message::Pong(_) | Message::Frame(_) => None,
        };
        if let Some(reply) = reply {
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}
