//! `charonctl acl`: access lists (address rules and basic-auth users),
//! attached to hosts with `host add|update --acl NAME`. The flags and the
//! requests are [`crate::cli::acl`]'s; here the calls are made and shown.

use charon_proto::v1::{AccessList, AccessRule, ListAccessListsRequest};
use tonic::metadata::MetadataMap;

use crate::cli::acl::AclCall;
use crate::client::AccessLists;
use crate::output::{self, to_json};

/// Makes the call: what to print and the write's metadata.
pub async fn execute(
    call: AclCall,
    api: &mut AccessLists,
    json: bool,
) -> Result<(String, MetadataMap), tonic::Status> {
    Ok(match call {
        AclCall::List => {
            let list = api.list_access_lists(ListAccessListsRequest {}).await?;
            let lists = list.into_inner().lists;
            let text = if json { to_json(&lists) } else { table(&lists) };
            (text, MetadataMap::new())
        }
        AclCall::Get(r) => {
            let a = api.get_access_list(r).await?.into_inner();
            (show(&a, None, json), MetadataMap::new())
        }
        AclCall::Create(r) => {
            let (md, a, _) = api.create_access_list(r).await?.into_parts();
            (show(&a, Some("created"), json), md)
        }
        AclCall::Update(r) => {
            let (md, a, _) = api.update_access_list(r).await?.into_parts();
            (show(&a, Some("updated"), json), md)
        }
        AclCall::Delete(r) => {
            let (md, reply, _) = api.delete_access_list(r).await?.into_parts();
            let text = if json {
                to_json(&reply)
            } else {
                format!("deleted access list {}\n", reply.name)
            };
            (text, md)
        }
    })
}

fn show(a: &AccessList, action: Option<&str>, json: bool) -> String {
    if json {
        return to_json(a);
    }
    let details = details(a);
    match action {
        Some(action) => format!(
            "{action} access list {} (version {})\n{details}",
            a.name, a.version
        ),
        None => details,
    }
}

pub fn rule_text(r: &AccessRule) -> String {
    format!("{} {}", r.action, r.cidr)
}

fn or_none(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

/// `acl show`: one line per rule, in order.
pub fn details(a: &AccessList) -> String {
    let mut rows: Vec<(&str, String)> = vec![("name", a.name.clone())];
    if a.rules.is_empty() {
        rows.push(("rules", "none".to_string()));
    }
    for (i, r) in a.rules.iter().enumerate() {
        rows.push((
            if i == 0 { "rules" } else { "" },
            format!("#{} {}", i + 1, rule_text(r)),
        ));
    }
    rows.push(("default", a.default_action.clone()));
    rows.push(("basic auth users", or_none(&a.users)));
    if !a.users.is_empty() {
        let realm = if a.realm.is_empty() {
            &a.name
        } else {
            &a.realm
        };
        rows.push(("realm", realm.clone()));
    }
    rows.push(("used by hosts", or_none(&a.used_by)));
    rows.push(("version", a.version.to_string()));
    output::key_values(&rows)
}

/// `acl list`: one row per list.
pub fn table(lists: &[AccessList]) -> String {
    if lists.is_empty() {
        return "no access lists\n".to_string();
    }
    let mut rows = vec![["NAME", "RULES", "DEFAULT", "USERS", "USED BY", "VERSION"]
        .map(String::from)
        .to_vec()];
    rows.extend(lists.iter().map(|a| {
        let first: Vec<String> = a.rules.iter().take(3).map(rule_text).collect();
        let more = a.rules.len().saturating_sub(3);
        let rules = match (first.is_empty(), more) {
            (true, _) => "-".to_string(),
            (false, 0) => first.join(", "),
            (false, n) => format!("{}, +{n} more", first.join(", ")),
        };
        vec![
            a.name.clone(),
            rules,
            a.default_action.clone(),
            a.users.len().to_string(),
            a.used_by.len().to_string(),
            a.version.to_string(),
        ]
    }));
    output::align(&rows)
}
