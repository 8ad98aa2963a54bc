//! `charon.v1.AccessLists`: access lists as replicated records (key
//! `acl/<name>`). Password hashes are stored, never returned.

use std::sync::Arc;

use charon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::hosts::HostsError;
use crate::access::{self, acl_key, AccessList, AccessRule, UserInput};
use crate::store::{Body, Snapshot, Store, Write};
use crate::util::wall_ms;
use crate::validate::FieldError;

pub struct AccessApi {
    store: Arc<Store>,
    gate: Arc<super::WriteGate>,
}

impl AccessApi {
    pub fn new(store: Arc<Store>, gate: Arc<super::WriteGate>) -> Self {
        AccessApi { store, gate }
    }
}

/// `a` for the API: user names only, and the hosts that use it.
pub fn to_pb(a: &AccessList, snap: Option<&Snapshot>) -> pb::AccessList {
    pb::AccessList {
        name: a.name.clone(),
        rules: a
            .rules
            .iter()
            .map(|r| pb::AccessRule {
                action: access::action_name(r.allow).into(),
                cidr: r.cidr.clone(),
            })
            .collect(),
        default_action: access::action_name(a.default_allow).into(),
        users: a.users.iter().map(|u| u.name.clone()).collect(),
        realm: a.realm.clone(),
        created_at_ms: a.created_at_ms,
        updated_at_ms: a.updated_at_ms,
        version: a.version,
        used_by: snap
            .and_then(|s| s.by_acl.get(&a.name).cloned())
            .unwrap_or_default(),
    }
}

fn rules_from_pb(list: Vec<pb::AccessRule>) -> Result<Vec<AccessRule>, FieldError> {
    list.into_iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(AccessRule {
                allow: access::parse_action(&format!("rules[{i}].action"), &r.action)?,
                cidr: r.cidr,
            })
        })
        .collect()
}

fn users_from_pb(list: Vec<pb::AccessUserInput>) -> Vec<UserInput> {
    list.into_iter()
        .map(|u| UserInput {
            name: u.name,
            password: u.password,
            password_hash: u.password_hash,
        })
        .collect()
}

/// `""` is the documented default, allow.
fn default_action(s: &str) -> Result<bool, FieldError> {
    if s.trim().is_empty() {
        return Ok(true);
    }
    access::parse_action("default_action", s)
}

fn put(a: AccessList) -> Write {
    Write {
        key: acl_key(&a.name),
        body: Some(Body::Acl(a)),
    }
}

/// Hashing with argon2 takes tens of milliseconds: off the runtime.
async fn hash_users(list: Vec<pb::AccessUserInput>) -> Result<Vec<access::AccessUser>, Status> {
    let input = users_from_pb(list);
    tokio::task::spawn_blocking(move || access::users_from_input("users", input))
        .await
        .map_err(|e| Status::internal(format!("hashing task failed: {e}")))?
        .map_err(|e| HostsError::from(e).into())
}

#[tonic::async_trait]
impl pb::access_lists_server::AccessLists for AccessApi {
    async fn create_access_list(
        &self,
        req: Request<pb::CreateAccessListRequest>,
    ) -> Result<Response<pb::AccessList>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let now = wall_ms();
        let mut list = AccessList {
            name: r.name.trim().to_string(),
            rules: rules_from_pb(r.rules).map_err(HostsError::from)?,
            default_allow: default_action(&r.default_action).map_err(HostsError::from)?,
            users: Vec::new(),
            realm: r.realm,
            created_at_ms: now,
            updated_at_ms: now,
            version: 1,
        };
        list.normalize_and_validate().map_err(HostsError::from)?;
        list.users = hash_users(r.users).await?;
        let (list, stamp) = super::transact(&self.store, ctx, move |view| {
            if view.snapshot().acls.get(&list.name).is_some() {
                return Err(HostsError::Exists(format!(
                    "an access list named {:?} exists; update it or remove it first",
                    list.name
                )));
            }
            Ok((vec![put(list.clone())], list))
        })
        .await?;
        tracing::info!(acl = %list.name, rules = list.rules.len(), users = list.users.len(), "access list created");
        Ok(super::stamped(to_pb(&list, None), stamp))
    }

    async fn get_access_list(
        &self,
        req: Request<pb::GetAccessListRequest>,
    ) -> Result<Response<pb::AccessList>, Status> {
        let name = req.into_inner().name;
        let snap = self.store.snapshot();
        let a = snap
            .acls
            .get(name.trim())
            .ok_or_else(|| HostsError::Missing(format!("no access list named {name:?}")))?;
        Ok(Response::new(to_pb(a, Some(&snap))))
    }

    async fn list_access_lists(
        &self,
        _req: Request<pb::ListAccessListsRequest>,
    ) -> Result<Response<pb::ListAccessListsResponse>, Status> {
        let snap = self.store.snapshot();
        let lists = snap.acls.iter().map(|a| to_pb(a, Some(&snap))).collect();
        Ok(Response::new(pb::ListAccessListsResponse { lists }))
    }

    async fn update_access_list(
        &self,
        req: Request<pb::UpdateAccessListRequest>,
    ) -> Result<Response<pb::AccessList>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let r = req.into_inner();
        let name = r.name.trim().to_string();
        let rules = match r.rules {
            Some(l) => Some(rules_from_pb(l.values).map_err(HostsError::from)?),
            None => None,
        };
        let default_allow = match r.default_action.as_deref() {
            Some(s) => Some(default_action(s).map_err(HostsError::from)?),
            None => None,
        };
        let users = match r.users {
            Some(l) => Some(hash_users(l.values).await?),
            None => None,
        };
        let (realm, expected) = (r.realm, r.expected_version);
        let (list, stamp) = super::transact(&self.store, ctx, move |view| {
            let current = view
                .snapshot()
                .acls
                .get(&name)
                .ok_or_else(|| HostsError::Missing(format!("no access list named {name:?}")))?;
            if let Some(expected) = expected.filter(|e| *e != current.version) {
                return Err(HostsError::VersionMismatch {
                    what: "access list",
                    id: name.clone(),
                    expected,
                    actual: current.version,
                });
            }
            let mut a = (**current).clone();
            a.rules = rules.unwrap_or(a.rules);
            a.default_allow = default_allow.unwrap_or(a.default_allow);
            a.users = users.unwrap_or(a.users);
            a.realm = realm.unwrap_or(a.realm);
            a.normalize_and_validate()?;
            if a == **current {
                return Ok((vec![], a));
            }
            a.version += 1;
            a.updated_at_ms = wall_ms().max(a.updated_at_ms);
            Ok((vec![put(a.clone())], a))
        })
        .await?;
        tracing::info!(acl = %list.name, version = list.version, "access list updated");
        Ok(super::stamped(to_pb(&list, None), stamp))
    }

    async fn delete_access_list(
        &self,
        req: Request<pb::DeleteAccessListRequest>,
    ) -> Result<Response<pb::DeleteAccessListResponse>, Status> {
        let ctx = super::write_ctx(&req, &self.gate)?;
        let name = req.into_inner().name.trim().to_string();
        if name.is_empty() {
            return Err(HostsError::from(FieldError::new("name", "is required")).into());
        }
        let (name, stamp) = super::transact(&self.store, ctx, move |view| {
            let snap = view.snapshot();
            if snap.acls.get(&name).is_none() {
                return Err(HostsError::Missing(format!("no access list named {name:?}")));
            }
            if let Some(users) = snap.by_acl.get(&name).filter(|u| !u.is_empty()) {
                return Err(HostsError::InUse(format!(
                    "access list {name:?} is used by host(s) {}; detach it first (charonctl host update <id> --acl \"\")",
                    users.join(", ")
                )));
            }
            Ok((
                vec![Write {
                    key: acl_key(&name),
                    body: None,
                }],
                name,
            ))
        })
        .await?;
        tracing::info!(acl = %name, "access list removed");
        Ok(super::stamped(pb::DeleteAccessListResponse { name }, stamp))
    }
}
