//! `charonctl redirect`: redirect hosts. A redirect host is a host whose
//! every request is answered with a redirect (301, 302, 307 or 308) to
//! another URL instead of being proxied; its domains are unique together
//! with every proxy host's, so it is made and kept through the Hosts API.
//! The flags and requests are [`crate::cli::redirect`]'s.

use charon_proto::v1::{ListHostsRequest, ProxyHost};
use tonic::metadata::MetadataMap;

use crate::cli::redirect::RedirectCall;
use crate::client::Hosts;
use crate::output::{self, to_json};

/// Makes the call: what to print and the write's metadata.
pub async fn execute(
    call: RedirectCall,
    api: &mut Hosts,
    json: bool,
) -> Result<(String, MetadataMap), tonic::Status> {
    let show = |h: &ProxyHost, action: &str| {
        if json {
            to_json(h)
        } else {
            format!("{action}{}", output::host_details(h))
        }
    };
    Ok(match call {
        RedirectCall::List => {
            let all = api
                .list_hosts(ListHostsRequest {})
                .await?
                .into_inner()
                .hosts;
            let list: Vec<ProxyHost> = all
                .into_iter()
                .filter(|h| !h.redirect_to.is_empty())
                .collect();
            let text = if json { to_json(&list) } else { table(&list) };
            (text, MetadataMap::new())
        }
        RedirectCall::Get(r) => {
            let h = api.get_host(r).await?.into_inner();
            (show(&h, ""), MetadataMap::new())
        }
        RedirectCall::Create(r) => {
            let (md, h, _) = api.create_host(r).await?.into_parts();
            (show(&h, &format!("created redirect host {}\n", h.id)), md)
        }
        RedirectCall::Update(r) => {
            let (md, h, _) = api.update_host(r).await?.into_parts();
            (show(&h, &format!("updated redirect host {}\n", h.id)), md)
        }
        RedirectCall::Delete(r) => {
            let (md, reply, _) = api.delete_host(r).await?.into_parts();
            let text = if json {
                to_json(&reply)
            } else {
                format!("deleted redirect host {}\n", reply.id)
            };
            (text, md)
        }
    })
}

/// `redirect list`: one row per redirect host.
fn table(hosts: &[ProxyHost]) -> String {
    if hosts.is_empty() {
        return "no redirect hosts\n".to_string();
    }
    let mut rows = vec![["ID", "DOMAINS", "CODE", "TO", "KEEP PATH"]
        .map(String::from)
        .to_vec()];
    rows.extend(hosts.iter().map(|h| {
        vec![
            h.id.clone(),
            h.domains.join(", "),
            h.redirect_code.to_string(),
            h.redirect_to.clone(),
            if h.redirect_keep_path { "yes" } else { "no" }.to_string(),
        ]
    }));
    output::align(&rows)
}
