//! Bearer-token authentication for the management API.
//!
//! The admin token comes from `CHARON_ADMIN_TOKEN`, or is generated on first
//! start and written to `<data-dir>/admin.token` (mode 0600). Only its
//! SHA-256 is kept in memory for comparison. Tokens created through the API
//! are replicated store records holding only their SHA-256; the store
//! applies their changes here ([`Auth::apply_tokens`]), so a token made on
//! one node works on all of them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::store::{ApiToken, Changed};

pub const TOKEN_FILE: &str = "admin.token";

#[derive(Clone)]
pub struct Auth {
    admin_hash: [u8; 32],
    /// Digest → how many live replicated tokens have it. Persistent, so a
    /// token change costs O(1) whatever the number of tokens.
    tokens: Arc<ArcSwap<imbl::HashMap<[u8; 32], u32>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create the admin token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin token file {0} is empty; delete it to have a new token generated")]
    Empty(PathBuf),
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    fn with_hash(admin_hash: [u8; 32]) -> Auth {
        Auth {
            admin_hash,
            tokens: Arc::default(),
        }
    }

    /// The SHA-256 of this node's admin token (registered as a replicated
    /// token at start).
    pub fn admin_hash(&self) -> [u8; 32] {
        self.admin_hash
    }

    /// Applies the replicated tokens a commit changed (accepted besides the
    /// admin token).
    pub fn apply_tokens(&self, changes: &[Changed<ApiToken>]) {
        if changes.is_empty() {
            return;
        }
        let digest =
            |t: &ApiToken| -> Option<[u8; 32]> { hex::decode(&t.sha256_hex).ok()?.try_into().ok() };
        let mut set = imbl::HashMap::clone(&self.tokens.load());
        for c in changes {
            if let Some(h) = c.old.as_deref().and_then(digest) {
                match set.get(&h).copied() {
                    Some(n) if n > 1 => set.insert(h, n - 1),
                    _ => set.remove(&h),
                };
            }
            if let Some(h) = c.new.as_deref().and_then(digest) {
                let n = set.get(&h).copied().unwrap_or(0);
                set.insert(h, n + 1);
            }
        }
        self.tokens.store(Arc::new(set));
    }

    /// Uses `env_token` if given, else the token file, else creates one.
    pub fn load_or_create(data_dir: &Path, env_token: Option<&str>) -> Result<Auth, AuthError> {
        if let Some(t) = env_token {
            return Ok(Auth::with_hash(hash(t)));
        }
        let path = data_dir.join(TOKEN_FILE);
        let io = |source| AuthError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(t) if t.trim().is_empty() => Err(AuthError::Empty(path)),
            Ok(t) => Ok(Auth::with_hash(hash(t.trim()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = format!("charon_{}", hex::encode(rand::random::<[u8; 24]>()));
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                tracing::info!(path = %path.display(), "generated the admin API token");
                Ok(Auth::with_hash(hash(&token)))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The tonic interceptor: every call must carry
    /// `authorization: Bearer <token>`.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing authorization metadata: send \"authorization: Bearer <token>\"",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?;
        if !self.accepts(token) {
            return Err(Status::unauthenticated("invalid token"));
        }
        Ok(req)
    }

    /// Whether `token` is the admin token or a replicated API token (also
    /// what the admin listener's `POST /drain` checks).
    pub fn accepts(&self, token: &str) -> bool {
        // Comparing digests: equal-length inputs, and a timing difference
        // reveals nothing about the token itself.
        let h = hash(token);
        h == self.admin_hash || self.tokens.load().contains_key(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn generates_a_private_token_once_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load_or_create(dir.path(), None).unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(auth.check(req(Some(&format!("Bearer {token}")))).is_ok());
        let again = Auth::load_or_create(dir.path(), None).unwrap();
        assert!(
            again.check(req(Some(&format!("Bearer {token}")))).is_ok(),
            "same token after restart"
        );
        for bad in [None, Some("Bearer nope"), Some(token.as_str())] {
            assert_eq!(
                auth.check(req(bad)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
    }

    #[test]
    fn env_token_wins_and_writes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load_or_create(dir.path(), Some("from-env-0123456789")).unwrap();
        assert!(auth.check(req(Some("Bearer from-env-0123456789"))).is_ok());
        assert!(!dir.path().join(TOKEN_FILE).exists());
    }

    /// Tokens kept by change accept exactly what the stored tokens say,
    /// step by step: two records with one secret (one removed keeps the
    /// other working), a rotated secret, deletes.
    #[test]
    fn tokens_by_change_match_the_stored_tokens() {
        let auth = Auth::with_hash(hash("admin-token-0123456789"));
        let token = |id: &str, secret: &str| {
            Arc::new(ApiToken {
                id: id.into(),
                name: id.into(),
                sha256_hex: hex::encode(hash(secret)),
                created_at_ms: 0,
                created_on: "n1".into(),
            })
        };
        let mut stored: std::collections::BTreeMap<String, Arc<ApiToken>> = Default::default();
        let steps: Vec<(&str, Option<&str>)> = vec![
            ("t1", Some("s1")),
            ("t2", Some("s1")),
            ("t3", Some("s3")),
            ("t1", None),
            ("t3", Some("s3b")),
            ("t2", Some("s2")),
            ("t2", None),
            ("t1", Some("s1")),
        ];
        for (id, secret) in steps {
            let new = secret.map(|s| token(id, s));
            let old = match &new {
                Some(t) => stored.insert(id.into(), t.clone()),
                None => stored.remove(id),
            };
            auth.apply_tokens(&[Changed {
                id: id.into(),
                old,
                new,
            }]);
            for secret in ["s1", "s2", "s3", "s3b", "none"] {
                let expected = stored
                    .values()
                    .any(|t| t.sha256_hex == hex::encode(hash(secret)));
                assert_eq!(
                    auth.accepts(secret),
                    expected,
                    "{secret} after a change to {id}"
                );
            }
            assert!(auth.accepts("admin-token-0123456789"));
        }
    }
}
