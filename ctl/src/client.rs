//! Connecting to a node: finding the token, opening the channel, and
//! attaching `authorization: Bearer <token>` to every call; reading the
//! version of a write from its response metadata.

use std::path::{Path, PathBuf};
use std::time::Duration;

use charon_proto::v1::access_lists_client::AccessListsClient;
use charon_proto::v1::certificates_client::CertificatesClient;
use charon_proto::v1::cluster_client::ClusterClient;
use charon_proto::v1::hosts_client::HostsClient;
use charon_proto::v1::logs_client::LogsClient;
use charon_proto::v1::nodes_client::NodesClient;
use charon_proto::v1::tokens_client::TokensClient;
use charon_proto::v1::tunnels_client::TunnelsClient;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::error::CtlError;

/// Where a node started with its default data dir writes the admin token, so
/// that `charonctl` works without flags next to a freshly started node.
pub const DEFAULT_TOKEN_FILE: &str = "charon-data/admin.token";

/// A connection refused answers at once; this bounds the wait for a host
/// that drops packets instead.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connect timeout for the other members that `logs` and `tunnels`
/// ask: a member that does not answer quickly is warned about and left
/// out, rather than holding up the answers of the others.
pub const MEMBER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// API calls are small; a node that takes longer than this is stuck.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `Cluster.WaitForWrite` answers once its own timeout has passed; this is
/// the slack on top of it for the answer to arrive.
const WAIT_SLACK: Duration = Duration::from_secs(10);

/// The response metadata of a write that changed something: the node id of
/// its origin and its sequence number there.
pub const WRITE_ORIGIN: &str = "charon-write-origin";
pub const WRITE_SEQ: &str = "charon-write-seq";

pub type Authed = InterceptedService<Channel, BearerAuth>;
pub type Hosts = HostsClient<Authed>;
pub type Certificates = CertificatesClient<Authed>;
pub type Cluster = ClusterClient<Authed>;
pub type Tokens = TokensClient<Authed>;
pub type Nodes = NodesClient<Authed>;
pub type Logs = LogsClient<Authed>;
pub type Tunnels = TunnelsClient<Authed>;
pub type Balance = charon_proto::v1::balance_client::BalanceClient<Authed>;
pub type AccessLists = AccessListsClient<Authed>;

/// The API's services, sharing one connection; a clone shares it too.
#[derive(Clone)]
pub struct Api {
    pub hosts: Hosts,
    pub certificates: Certificates,
    pub cluster: Cluster,
    pub tokens: Tokens,
    pub nodes: Nodes,
    pub logs: Logs,
    pub tunnels: Tunnels,
    pub balance: Balance,
    pub access: AccessLists,
}

/// The version of a write, as `Cluster.WaitForWrite` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteStamp {
    pub origin: String,
    pub seq: u64,
}

impl WriteStamp {
    /// Reads the write's metadata: `None` when there is none (the call
    /// changed nothing), an error when it is half there or unreadable.
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Option<Self>, CtlError> {
        let text = |key: &str| {
            metadata
                .get(key)
                .map(|v| {
                    v.to_str()
                        .map(str::trim)
                        .map_err(|_| CtlError::WriteMetadata(format!("{key} is not text")))
                })
                .transpose()
        };
        match (text(WRITE_ORIGIN)?, text(WRITE_SEQ)?) {
            (None, None) => Ok(None),
            (Some(origin), Some(seq)) => {
                let seq = seq
                    .parse::<u64>()
                    .ok()
                    .filter(|&seq| seq > 0)
                    .ok_or_else(|| {
                        CtlError::WriteMetadata(format!(
                            "{WRITE_SEQ} {seq:?} is not a sequence number"
                        ))
                    })?;
                if origin.is_empty() {
                    return Err(CtlError::WriteMetadata(format!("{WRITE_ORIGIN} is empty")));
                }
                Ok(Some(WriteStamp {
                    origin: origin.to_string(),
                    seq,
                }))
            }
            (Some(_), None) => Err(CtlError::WriteMetadata(format!("no {WRITE_SEQ}"))),
            (None, Some(_)) => Err(CtlError::WriteMetadata(format!("no {WRITE_ORIGIN}"))),
        }
    }
}

/// How long one call may take: [`CALL_TIMEOUT`], or longer when `--wait`
/// waits longer than that. The channel's timeout also caps the deadline a
/// single request asks for, so it has to cover the wait.
pub fn call_timeout(wait: Option<Duration>) -> Duration {
    wait.map_or(CALL_TIMEOUT, |wait| CALL_TIMEOUT.max(wait + WAIT_SLACK))
}

/// Request metadata the node reads on writes (see the node's
/// `api::writes`): one idempotency key per charonctl invocation, so that a
/// retried create never makes a second host, and the call's deadline as
/// Unix milliseconds, so that a node that read the request late (paused,
/// overloaded) does not apply it after charonctl has given up.
pub const KEY_HEADER: &str = "charon-idempotency-key";
pub const DEADLINE_HEADER: &str = "charon-deadline-ms";

/// Adds the bearer token, the invocation's idempotency key and the call's
/// deadline to every request's metadata.
#[derive(Clone)]
pub struct BearerAuth {
    token: MetadataValue<Ascii>,
    key: MetadataValue<Ascii>,
    call_timeout: Option<Duration>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Result<Self, CtlError> {
        let token = format!("Bearer {token}")
            .parse()
            .map_err(|_| CtlError::BadToken)?;
        let key = invocation_key()
            .parse()
            .expect("a hex key is a valid header value");
        Ok(BearerAuth {
            token,
            key,
            call_timeout: None,
        })
    }

    fn with_deadline(mut self, call_timeout: Option<Duration>) -> Self {
        self.call_timeout = call_timeout;
        self
    }
}

/// A key unique to this invocation: process id, time and the randomly
/// seeded std hasher (no extra dependency for 128 random-enough bits).
fn invocation_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    let random = h.finish();
    format!("ctl-{:x}-{nanos:x}-{random:016x}", std::process::id())
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let md = request.metadata_mut();
        md.insert("authorization", self.token.clone());
        md.insert(KEY_HEADER, self.key.clone());
        if let Some(timeout) = self.call_timeout {
            let deadline = std::time::SystemTime::now() + timeout;
            let ms = deadline
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            if let Ok(v) = ms.to_string().parse() {
                md.insert(DEADLINE_HEADER, v);
            }
        }
        Ok(request)
    }
}

/// Where the token comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenSource {
    Value(String),
    File(PathBuf),
}

/// Picks the token source: the flags first, then `CHARON_TOKEN`, then
/// `CHARON_TOKEN_FILE`. The environment is read here rather than by clap so
/// that an explicit `--token-file` beats an exported `CHARON_TOKEN` instead
/// of conflicting with it. Empty variables count as unset.
pub fn token_source(
    flag_token: Option<String>,
    flag_file: Option<PathBuf>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<TokenSource> {
    let env = |name| env(name).filter(|v: &String| !v.is_empty());
    flag_token
        .map(TokenSource::Value)
        .or(flag_file.map(TokenSource::File))
        .or_else(|| env("CHARON_TOKEN").map(TokenSource::Value))
        .or_else(|| env("CHARON_TOKEN_FILE").map(|f| TokenSource::File(f.into())))
}

/// Reads the token from its source, or from the default file in the current
/// directory when there is none. Surrounding whitespace (a trailing newline
/// from `echo > file`) is not part of a token.
pub fn resolve_token(source: Option<TokenSource>) -> Result<String, CtlError> {
    let token = match source {
        Some(TokenSource::Value(token)) => token,
        Some(TokenSource::File(path)) => read_token_file(&path)?,
        None => {
            let path = PathBuf::from(DEFAULT_TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(token) => token,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CtlError::NoToken(path))
                }
                Err(source) => return Err(CtlError::TokenFile { path, source }),
            }
        }
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(CtlError::EmptyToken);
    }
    Ok(token.to_string())
}

fn read_token_file(path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|source| CtlError::TokenFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens the channel now rather than lazily, so that an unreachable node is
/// reported as such before any request is built. `call_timeout` bounds each
/// call (see [`call_timeout`]).
pub async fn connect(endpoint: &str, token: &str, call_timeout: Duration) -> Result<Api, CtlError> {
    connect_with(endpoint, token, CONNECT_TIMEOUT, Some(call_timeout)).await
}

/// [`connect`] with its timeouts chosen. `call_timeout` `None` sets no
/// limit on the channel, for `logs --follow`, whose stream lasts until
/// Ctrl-C; the caller then bounds each call itself.
pub async fn connect_with(
    endpoint: &str,
    token: &str,
    connect_timeout: Duration,
    call_timeout: Option<Duration>,
) -> Result<Api, CtlError> {
    let auth = BearerAuth::new(token)?.with_deadline(call_timeout);
    let unreachable = || CtlError::Unreachable {
        endpoint: endpoint.to_string(),
    };
    let mut channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|_| unreachable())?
        .connect_timeout(connect_timeout);
    if let Some(call_timeout) = call_timeout {
        channel = channel.timeout(call_timeout);
    }
    let channel = channel.connect().await.map_err(|_| unreachable())?;
    Ok(Api {
        hosts: HostsClient::with_interceptor(channel.clone(), auth.clone()),
        certificates: CertificatesClient::with_interceptor(channel.clone(), auth.clone()),
        cluster: ClusterClient::with_interceptor(channel.clone(), auth.clone()),
        tokens: TokensClient::with_interceptor(channel.clone(), auth.clone()),
        nodes: NodesClient::with_interceptor(channel.clone(), auth.clone()),
        logs: LogsClient::with_interceptor(channel.clone(), auth.clone()),
        tunnels: TunnelsClient::with_interceptor(channel.clone(), auth.clone()),
        access: AccessListsClient::with_interceptor(channel.clone(), auth.clone()),
        balance: charon_proto::v1::balance_client::BalanceClient::with_interceptor(channel, auth),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_environment() {
        let env = |name: &str| match name {
            "CHARON_TOKEN" => Some("from-env".to_string()),
            "CHARON_TOKEN_FILE" => Some("/env/file".to_string()),
            _ => None,
        };
        let file = || Some(PathBuf::from("/flag/file"));
        assert_eq!(
            token_source(Some("t".into()), None, env),
            Some(TokenSource::Value("t".into()))
        );
        assert_eq!(
            token_source(None, file(), env),
            Some(TokenSource::File("/flag/file".into()))
        );
        assert_eq!(
            token_source(None, None, env),
            Some(TokenSource::Value("from-env".into()))
        );
        let only_file = |name: &str| (name == "CHARON_TOKEN_FILE").then(|| "/env/file".into());
        assert_eq!(
            token_source(None, None, only_file),
            Some(TokenSource::File("/env/file".into()))
        );
        let empty = |_: &str| Some(String::new());
        assert_eq!(token_source(None, None, empty), None);
    }

    #[test]
    fn a_token_value_is_trimmed() {
        let token = resolve_token(Some(TokenSource::Value(" abc\n".into()))).unwrap();
        assert_eq!(token, "abc");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let path = std::env::temp_dir().join(format!("charonctl-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let token = resolve_token(Some(TokenSource::File(path.clone())));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(token.unwrap(), "s3cret");
    }

    #[test]
    fn a_missing_token_file_names_the_file() {
        let source = TokenSource::File("/nonexistent/tok".into());
        let err = resolve_token(Some(source)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tok"), "{err}");
    }

    #[test]
    fn an_empty_token_is_refused() {
        assert!(matches!(
            resolve_token(Some(TokenSource::Value("  ".into()))),
            Err(CtlError::EmptyToken)
        ));
    }

    #[test]
    fn the_interceptor_sends_a_bearer_header() {
        let mut auth = BearerAuth::new("abc").unwrap();
        let request = auth.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(matches!(BearerAuth::new("a\nb"), Err(CtlError::BadToken)));
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut md = MetadataMap::new();
        for (key, value) in pairs {
            md.insert(*key, value.parse().unwrap());
        }
        md
    }

    #[test]
    fn a_write_stamp_is_read_from_the_metadata() {
        let md = metadata(&[(WRITE_ORIGIN, "0f3a9c2e-node"), (WRITE_SEQ, "42")]);
        assert_eq!(
            WriteStamp::from_metadata(&md).unwrap(),
            Some(WriteStamp {
                origin: "0f3a9c2e-node".into(),
                seq: 42
            })
        );
        // A write that changed nothing has no stamp.
        assert_eq!(
            WriteStamp::from_metadata(&MetadataMap::new()).unwrap(),
            None
        );
    }

    #[test]
    fn a_half_or_malformed_write_stamp_is_an_error() {
        for pairs in [
            &[(WRITE_ORIGIN, "n1")][..],
            &[(WRITE_SEQ, "3")],
            &[(WRITE_ORIGIN, "n1"), (WRITE_SEQ, "three")],
            &[(WRITE_ORIGIN, "n1"), (WRITE_SEQ, "0")],
            &[(WRITE_ORIGIN, " "), (WRITE_SEQ, "3")],
        ] {
            let err = WriteStamp::from_metadata(&metadata(pairs));
            assert!(
                matches!(err, Err(CtlError::WriteMetadata(_))),
                "{pairs:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_long_wait_stretches_the_call_timeout() {
        assert_eq!(call_timeout(None), CALL_TIMEOUT);
        assert_eq!(call_timeout(Some(Duration::from_secs(10))), CALL_TIMEOUT);
        assert_eq!(
            call_timeout(Some(Duration::from_secs(120))),
            Duration::from_secs(130)
        );
    }
}
