//! Why a request could not be proxied, the status each reason maps to,
//! and the one error-page format every front end answers with.

use std::time::Duration;

use http::StatusCode;

use super::upstream::ConnectError;

/// Why a request could not be proxied; each maps to the status a client
/// sees. Knowing whose fault it is (client, upstream) is what picks
/// 400/404 versus 502/504.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no proxy host for {0:?}")]
    UnknownHost(String),
    /// A request the proxy understood but does not serve (an RFC 8441
    /// extended CONNECT for a protocol other than WebSocket, or to a host
    /// that turned WebSockets off).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable {
        upstream: String,
        source: ConnectError,
    },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {source}")]
    Upstream {
        upstream: String,
        source: hyper::Error,
    },
    #[error("upstream {upstream} failed: {source}")]
    UpstreamIo {
        upstream: String,
        source: std::io::Error,
    },
    #[error("upstream {upstream} sent an invalid response: {why}")]
    UpstreamBad { upstream: String, why: &'static str },
    /// Every upstream had its cap of open tunnels + in-flight requests for
    /// the whole queue timeout (issue 19).
    #[error(
        "every upstream of this host already has {cap} open connections (its cap); \
         waited {waited:?} for one to free up. Try again shortly"
    )]
    AtCapacity { cap: u32, waited: Duration },
}

impl ProxyError {
    /// The metric label of an upstream failure (`None` for client errors).
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::Unreachable { .. } => Some("refused"),
            ProxyError::Timeout { .. } => Some("timeout"),
            ProxyError::Upstream { .. }
            | ProxyError::UpstreamIo { .. }
            | ProxyError::UpstreamBad { .. } => Some("error"),
            ProxyError::AtCapacity { .. } => Some("capacity"),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost(_) => StatusCode::NOT_FOUND,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::Unreachable {
                source: ConnectError::Timeout(_),
                ..
            }
            | ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamIo { .. }
            | ProxyError::UpstreamBad { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::AtCapacity { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every error page the proxy writes itself:
/// `"{code} {reason}: {what went wrong}\n"`, in plain text, so a person
/// reading it with curl and a script matching the first word both know.
pub fn page(status: StatusCode, detail: &dyn std::fmt::Display) -> String {
    format!(
        "{} {}: {detail}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}
