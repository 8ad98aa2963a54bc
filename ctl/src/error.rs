//! What can go wrong, worded for the operator at the terminal: every variant
//! displays as one line that says what to do next, never a gRPC status dump.
//!
//! Exit codes: 0 on success, 1 when the call failed (any [`CtlError`]),
//! 2 on a usage error (clap), [`EXIT_NOT_REPLICATED`] when `--wait` ran out
//! of time ([`EXIT_NOT_DRAINED`] for `node drain --wait`, the same code).

use std::path::PathBuf;

use tonic::{Code, Status};

/// The exit code when `--wait` ran out of time: the write succeeded, but
/// some live node had not applied it. Not an error: the write stands.
pub const EXIT_NOT_REPLICATED: u8 = 4;

/// The exit code when `node drain --wait` ran out of time: the node still
/// had connections. Not an error either: the drain goes on.
pub const EXIT_NOT_DRAINED: u8 = EXIT_NOT_REPLICATED;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the node at {endpoint} — is it running?")]
    Unreachable { endpoint: String },

    #[error("the node at {endpoint} did not answer in time")]
    Timeout { endpoint: String },

    #[error("the node refused the token ({0}) — pass --token or --token-file")]
    Unauthenticated(String),

    /// The node understood the request and said no (bad input, a taken
    /// domain, an unknown host, a version conflict); its message says why.
    #[error("{0}")]
    Refused(String),

    #[error("the node failed: {message} ({code:?})")]
    Server { code: Code, message: String },

    #[error(
        "no token: pass --token or --token-file, or set CHARON_TOKEN \
         ({} was not found either)",
        .0.display()
    )]
    NoToken(PathBuf),

    #[error("cannot read the token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A file named by a flag (`--cert`, `--key`, `--upstream-ca`).
    #[error("cannot read the {flag} file {}: {source}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the token is empty")]
    EmptyToken,

    #[error("the token contains characters that cannot be sent in a header")]
    BadToken,

    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),

    /// The `charon-write-origin` / `charon-write-seq` metadata of a write
    /// could not be read, so `--wait` has nothing to wait for.
    #[error("the write succeeded, but its metadata is malformed ({0}); cannot wait for it")]
    WriteMetadata(String),

    /// The write succeeded, but `Cluster.WaitForWrite` failed.
    #[error("the write succeeded, but waiting for it to replicate failed: {0}")]
    Wait(Box<CtlError>),

    /// `node drain --wait`: the drain was requested, but a
    /// `Nodes.DrainStatus` call failed.
    #[error("the drain was requested, but following it failed: {0}")]
    DrainWait(Box<CtlError>),

    /// `node drain --wait`: the drained node dropped out of gossip.
    #[error(
        "{node} has not been live for more than {}s; stopped following its drain \
         (the drain stands: see `charonctl node status {node}`)",
        .limit.as_secs()
    )]
    NotLive {
        node: String,
        limit: std::time::Duration,
    },

    /// `node drain --wait`: someone withdrew the drain meanwhile.
    #[error("{0} was undrained meanwhile; stopped following its drain")]
    Undrained(String),

    /// `logs` and `tunnels` with `--node` or `--all-nodes`: a failure of
    /// one member, named.
    #[error("{node}: {source}")]
    Member { node: String, source: Box<CtlError> },

    /// `--node NAME`: the cluster has no such member.
    #[error("the cluster has no member named {0} (see `charonctl cluster members`)")]
    NoMember(String),

    /// A member whose advertised API address cannot be connected to.
    #[error("cannot ask {node}: {why}")]
    Unaskable { node: String, why: String },

    /// `--all-nodes`: no member is live with an address to ask.
    #[error("no live member of the cluster can be asked")]
    NoLiveMember,

    /// `--all-nodes`: every member asked failed (each was warned about).
    #[error("no node answered (asked: {})", .0.join(", "))]
    NoNodeAnswered(Vec<String>),
}

impl CtlError {
    /// The error of a failed call to `method` (`Service.Method`): a node
    /// that does not know the method is most likely older than charonctl.
    pub fn from_call(status: Status, method: &str, endpoint: &str) -> Self {
        if status.code() == Code::Unimplemented {
            CtlError::Refused(format!(
                "the node has no {method}; is it older than charonctl?"
            ))
        } else {
            CtlError::from_status(status, endpoint)
        }
    }

    /// Turns the status of a failed call into operator language.
    /// tonic reports a connection that could not be made as `Unavailable`.
    pub fn from_status(status: Status, endpoint: &str) -> Self {
        let message = if status.message().is_empty() {
            status.code().description().to_string()
        } else {
            status.message().to_string()
        };
        match status.code() {
            Code::Unavailable => CtlError::Unreachable {
                endpoint: endpoint.to_string(),
            },
            Code::DeadlineExceeded | Code::Cancelled => CtlError::Timeout {
                endpoint: endpoint.to_string(),
            },
            Code::Unauthenticated => CtlError::Unauthenticated(message),
            Code::InvalidArgument
            | Code::AlreadyExists
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied => CtlError::Refused(message),
            code => CtlError::Server { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "http://127.0.0.1:7070";

    #[test]
    fn statuses_read_as_one_operator_line() {
        let cases = [
            (
                Status::unavailable("tcp connect error"),
                "cannot reach the node at http://127.0.0.1:7070 — is it running?",
            ),
            (
                Status::unauthenticated("unknown token"),
                "the node refused the token (unknown token) — pass --token or --token-file",
            ),
            (
                Status::invalid_argument("upstreams[0]: not a URL"),
                "upstreams[0]: not a URL",
            ),
            (
                Status::already_exists("domain a.example is taken by host h1"),
                "domain a.example is taken by host h1",
            ),
            (Status::not_found("no host x"), "no host x"),
            (
                Status::internal("disk full"),
                "the node failed: disk full (Internal)",
            ),
        ];
        for (status, want) in cases {
            let line = CtlError::from_status(status, EP).to_string();
            assert_eq!(line, want);
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn a_file_error_names_the_flag_and_the_path() {
        let err = CtlError::File {
            flag: "--key",
            path: "/etc/x/key.pem".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let line = err.to_string();
        assert!(
            line.starts_with("cannot read the --key file /etc/x/key.pem: "),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_failed_wait_says_the_write_succeeded() {
        let inner = CtlError::from_status(Status::unimplemented(""), EP);
        let line = CtlError::Wait(Box::new(inner)).to_string();
        assert!(
            line.starts_with("the write succeeded, but waiting for it to replicate failed: "),
            "{line}"
        );
        assert!(line.contains("Unimplemented"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn drain_wait_errors_are_one_line() {
        let errors = [
            CtlError::DrainWait(Box::new(CtlError::from_status(
                Status::internal("boom"),
                EP,
            ))),
            CtlError::NotLive {
                node: "n2".into(),
                limit: std::time::Duration::from_secs(10),
            },
            CtlError::Undrained("n2".into()),
        ];
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "the drain was requested, but following it failed: \
                 the node failed: boom (Internal)",
                "n2 has not been live for more than 10s; stopped following its drain \
                 (the drain stands: see `charonctl node status n2`)",
                "n2 was undrained meanwhile; stopped following its drain",
            ]
        );
    }

    #[test]
    fn member_errors_are_one_line_naming_the_member() {
        let errors = [
            CtlError::Member {
                node: "n2".into(),
                source: Box::new(CtlError::from_status(Status::unavailable(""), EP)),
            },
            CtlError::NoMember("n9".into()),
            CtlError::Unaskable {
                node: "n3".into(),
                why: "it advertises no API address".into(),
            },
            CtlError::NoNodeAnswered(vec!["n1".into(), "n2".into()]),
        ];
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "n2: cannot reach the node at http://127.0.0.1:7070 — is it running?",
                "the cluster has no member named n9 (see `charonctl cluster members`)",
                "cannot ask n3: it advertises no API address",
                "no node answered (asked: n1, n2)",
            ]
        );
    }

    #[test]
    fn an_empty_message_falls_back_to_the_code() {
        let err = CtlError::from_status(Status::new(Code::NotFound, ""), EP);
        assert!(!err.to_string().is_empty());
    }
}
