//! `charon.v1.Tokens`: API tokens as replicated records (hash only).

use std::sync::Arc;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::hosts::HostsError;
use crate::store::{token_key, ApiToken, Body, Store, Write};
use crate::util::wall_ms;
use crate::validate::FieldError;

pub struct TokensApi {
    store: Arc<Store>,
    node_name: String,
    gate: Arc<super::WriteGate>,
}

impl TokensApi {
    pub fn new(store: Arc<Store>, node_name: String, gate: Arc<super::WriteGate>) -> Self {
        TokensApi {
            store,
            node_name,
            gate,
        }
    }
}

fn to_pb(t: &ApiToken) -> pb::ApiToken {
    pb::ApiToken {
        id: t.id.clone(),
        name: t.name.clone(),
        created_at_ms: t.created_at_ms,
        created_on: t.created_on.clone(),
    }
}

fn check_name(name: &str) -> Result<(), HostsError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(
            FieldError::new("name", "must be 1-64 letters, digits, '-', '_', '.' or '@'").into(),
        );
    }
    Ok(())
}

/// Registers this node's bootstrap admin token as the replicated token
/// `admin-<node name>` (hash only), so that it works on every node. Writes
/// only when the record is missing or holds another hash.
pub fn register_admin_token(
    store: &Store,
    node_name: &str,
    hash: [u8; 32],
) -> Result<(), crate::store::StoreError> {
    let id = format!("admin-{}", &store.node_id()[..8]);
    let hex_hash = hex::encode(hash);
    store.transact(|view| {
        if view
            .tokens()
            .iter()
            .any(|t| t.id == id && t.sha256_hex == hex_hash)
        {
            return Ok((vec![], ()));
        }
        let t = ApiToken {
            id: id.clone(),
            name: format!("admin-{node_name}"),
            sha256_hex: hex_hash.clone(),
            created_at_ms: wall_ms(),
            created_on: node_name.to_string(),
        };
        Ok((
            vec![Write {
                key: token_key(&id),
                body: Some(Body::Token(t)),
            }],
            (),
        ))
    })
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let name = req.into_inner().name.trim().to_string();
        check_name(&name)?;
        let secret = format!("charon_{}", hex::encode(rand::random::<[u8; 24]>()));
        let t = ApiToken {
            id: format!("t-{}", hex::encode(rand::random::<[u8; 5]>())),
            name,
            sha256_hex: hex::encode(super::auth::hash(&secret)),
            created_at_ms: wall_ms(),
            created_on: self.node_name.clone(),
        };
        let (t, stamp) = super::transact(&self.store, ctx, move |view| {
            if view.tokens().iter().any(|x| x.name == t.name) {
                return Err(HostsError::Exists(format!(
                    "a token named {:?} exists; revoke it first",
                    t.name
                )));
            }
            Ok((
                vec![Write {
                    key: token_key(&t.id),
                    body: Some(Body::Token(t.clone())),
                }],
                t,
            ))
        })
        .await?;
        tracing::info!(token = %t.id, name = %t.name, "API token created");
        Ok(super::stamped(
            pb::CreateTokenResponse {
                token: Some(to_pb(&t)),
                secret,
            },
            stamp,
        ))
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let snap = self.store.snapshot();
        let mut tokens: Vec<pb::ApiToken> = snap.tokens.iter().map(|t| to_pb(t)).collect();
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let key = req.into_inner().id_or_name;
        if key.trim().is_empty() {
            return Err(HostsError::from(FieldError::new("id_or_name", "is required")).into());
        }
        let (id, stamp) = super::transact(&self.store, ctx, move |view| {
            let t = view
                .tokens()
                .iter()
                .find(|t| t.id == key || t.name == key)
                .ok_or_else(|| HostsError::Missing(format!("no token with id or name {key:?}")))?;
            let id = t.id.clone();
            Ok((
                vec![Write {
                    key: token_key(&id),
                    body: None,
                }],
                id,
            ))
        })
        .await?;
        tracing::info!(token = %id, "API token revoked");
        Ok(super::stamped(pb::RevokeTokenResponse { id }, stamp))
    }
}
