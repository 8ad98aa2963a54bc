//! `charonctl acl`: the flags and the requests they make. `--allow` and
//! `--deny` keep the order they were given in across both flags (first
//! match wins), which clap's derive cannot say: the order is read from the
//! parse's indices ([`order_rules`]).

use charon_proto::v1::{
    AccessRule, AccessRuleList, AccessUserInput, AccessUserList, CreateAccessListRequest,
    DeleteAccessListRequest, GetAccessListRequest, UpdateAccessListRequest,
};
use clap::{ArgMatches, Args, Subcommand};

use super::WaitArgs;

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Create an access list.
    ///
    /// Rules are checked in the order given (--allow and --deny mixed);
    /// the first whose range holds the client's address decides, else
    /// --default. The client's address is the peer's, or, behind a
    /// --trusted-proxy, the one its X-Forwarded-For gives.
    ///
    /// Example:
    ///   charonctl acl add office --allow 10.0.0.0/8 --deny 0.0.0.0/0 --deny ::/0
    ///   charonctl acl add staff --user alice:s3cret --realm "staff only"
    #[command(verbatim_doc_comment)]
    Add(AclArgs),
    /// List the access lists.
    #[command(alias = "ls")]
    List,
    /// Show one access list (user names only, never their passwords).
    #[command(alias = "get")]
    Show {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Change an access list: --allow/--deny replace every rule, --user
    /// and --user-hash every user; what is not given is kept.
    Update(AclArgs),
    /// Remove an access list (refused while a host uses it).
    #[command(alias = "delete")]
    Rm {
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct AclArgs {
    /// The list's name: 1-64 letters, digits, '-', '_' or '.'.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Allow this address or CIDR range; repeat, in order with --deny.
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<String>,

    /// Deny this address or CIDR range; repeat, in order with --allow.
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<String>,

    /// Update: remove every rule.
    #[arg(long, conflicts_with_all = ["allow", "deny"])]
    pub clear_rules: bool,

    /// What an address no rule holds gets (add: allow).
    #[arg(long, value_name = "allow|deny")]
    pub default: Option<String>,

    /// Require basic auth from this user (NAME:PASSWORD; the node stores
    /// an argon2 hash of the password); repeat for several.
    #[arg(long, value_name = "NAME:PASSWORD")]
    pub user: Vec<String>,

    /// Like --user with an argon2 hash instead of the password
    /// (NAME:$argon2id$...).
    #[arg(long, value_name = "NAME:HASH")]
    pub user_hash: Vec<String>,

    /// Update: remove every user (no more basic auth).
    #[arg(long, conflicts_with_all = ["user", "user_hash"])]
    pub clear_users: bool,

    /// The realm browsers show when asking for a password (default: NAME).
    #[arg(long)]
    pub realm: Option<String>,

    /// Update: apply only if the list is still at this version.
    #[arg(long, value_name = "V")]
    pub expected_version: Option<u64>,

    /// The rules in the order given; filled by [`order_rules`].
    #[arg(skip)]
    pub rules: Vec<AccessRule>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

impl AclCommand {
    pub fn wait(&self) -> Option<&WaitArgs> {
        match self {
            AclCommand::Add(a) | AclCommand::Update(a) => Some(&a.wait),
            AclCommand::Rm { wait, .. } => Some(wait),
            _ => None,
        }
    }

    /// Whether `update` names anything to change.
    pub fn changes_something(&self) -> bool {
        let AclCommand::Update(a) = self else {
            return true;
        };
        !a.allow.is_empty()
            || !a.deny.is_empty()
            || a.clear_rules
            || a.default.is_some()
            || !a.user.is_empty()
            || !a.user_hash.is_empty()
            || a.clear_users
            || a.realm.is_some()
    }
}

/// Puts `--allow` and `--deny` values into `rules` in command-line order.
/// `matches` is the whole command line's.
pub fn order_rules(cmd: &mut AclCommand, matches: &ArgMatches) {
    let (AclCommand::Add(args) | AclCommand::Update(args)) = cmd else {
        return;
    };
    let Some(("acl", acl)) = matches.subcommand() else {
        return;
    };
    let Some((_, m)) = acl.subcommand() else {
        return;
    };
    let indexed = |id: &str, values: &[String]| -> Vec<(usize, AccessRule)> {
        let idx: Vec<usize> = m.indices_of(id).map(|i| i.collect()).unwrap_or_default();
        idx.into_iter()
            .zip(values)
            .map(|(i, v)| {
                (
                    i,
                    AccessRule {
                        action: id.to_string(),
                        cidr: v.clone(),
                    },
                )
            })
            .collect()
    };
    let mut all = indexed("allow", &args.allow);
    all.extend(indexed("deny", &args.deny));
    all.sort_by_key(|(i, _)| *i);
    args.rules = all.into_iter().map(|(_, r)| r).collect();
}

/// `NAME:SECRET` → the user, the secret as a password or a hash.
fn users(args: &AclArgs) -> Result<Vec<AccessUserInput>, String> {
    let split = |flag: &str, v: &String| -> Result<(String, String), String> {
        v.split_once(':')
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .ok_or_else(|| format!("{flag} {v:?}: expected NAME:{}", &flag[2..].to_uppercase()))
    };
    let mut out = Vec::new();
    for v in &args.user {
        let (name, password) = split("--user", v)?;
        out.push(AccessUserInput {
            name,
            password,
            password_hash: String::new(),
        });
    }
    for v in &args.user_hash {
        let (name, password_hash) = split("--user-hash", v)?;
        out.push(AccessUserInput {
            name,
            password: String::new(),
            password_hash,
        });
    }
    Ok(out)
}

/// One call of `acl`, ready to send.
#[derive(Clone)]
pub enum AclCall {
    List,
    Get(GetAccessListRequest),
    Create(CreateAccessListRequest),
    Update(UpdateAccessListRequest),
    Delete(DeleteAccessListRequest),
}

impl AclCall {
    pub fn prepare(cmd: AclCommand) -> Result<AclCall, String> {
        Ok(match cmd {
            AclCommand::List => AclCall::List,
            AclCommand::Show { name } => AclCall::Get(GetAccessListRequest { name }),
            AclCommand::Rm { name, .. } => AclCall::Delete(DeleteAccessListRequest { name }),
            AclCommand::Add(a) => AclCall::Create(CreateAccessListRequest {
                users: users(&a)?,
                name: a.name,
                rules: a.rules,
                default_action: a.default.unwrap_or_default(),
                realm: a.realm.unwrap_or_default(),
            }),
            AclCommand::Update(a) => {
                let users = users(&a)?;
                AclCall::Update(UpdateAccessListRequest {
                    rules: (a.clear_rules || !a.rules.is_empty())
                        .then_some(AccessRuleList { values: a.rules }),
                    users: (a.clear_users || !users.is_empty())
                        .then_some(AccessUserList { values: users }),
                    name: a.name,
                    default_action: a.default,
                    realm: a.realm,
                    expected_version: a.expected_version,
                })
            }
        })
    }

    pub fn method(&self) -> &'static str {
        match self {
            AclCall::List => "AccessLists.ListAccessLists",
            AclCall::Get(_) => "AccessLists.GetAccessList",
            AclCall::Create(_) => "AccessLists.CreateAccessList",
            AclCall::Update(_) => "AccessLists.UpdateAccessList",
            AclCall::Delete(_) => "AccessLists.DeleteAccessList",
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::access::rule_text;
    use crate::cli::{Cli, Command};

    use super::*;

    fn acl(args: &[&str]) -> AclCommand {
        let mut all = vec!["charonctl", "acl"];
        all.extend_from_slice(args);
        match Cli::try_parse_args(all).unwrap().command {
            Command::Acl(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rules_keep_the_command_line_order_across_allow_and_deny() {
        let cmd = acl(&[
            "add",
            "office",
            "--deny",
            "10.1.0.0/16",
            "--allow",
            "10.0.0.0/8",
            "--deny",
            "0.0.0.0/0",
            "--default",
            "deny",
        ]);
        let AclCall::Create(req) = AclCall::prepare(cmd).unwrap() else {
            panic!("not a create");
        };
        let rules: Vec<String> = req.rules.iter().map(rule_text).collect();
        assert_eq!(
            rules,
            ["deny 10.1.0.0/16", "allow 10.0.0.0/8", "deny 0.0.0.0/0"]
        );
        assert_eq!(req.default_action, "deny");
    }

    #[test]
    fn users_with_passwords_or_hashes() {
        let cmd = acl(&[
            "add",
            "s",
            "--user",
            "alice:pa:ss",
            "--user-hash",
            "bob:$argon2id$x",
        ]);
        let AclCall::Create(req) = AclCall::prepare(cmd).unwrap() else {
            panic!("not a create");
        };
        assert_eq!(
            (req.users[0].name.as_str(), req.users[0].password.as_str()),
            ("alice", "pa:ss")
        );
        assert_eq!(req.users[1].password_hash, "$argon2id$x");
        assert!(AclCall::prepare(acl(&["add", "s", "--user", "nocolon"])).is_err());
    }

    #[test]
    fn update_sends_only_what_was_named() {
        let AclCall::Update(req) =
            AclCall::prepare(acl(&["update", "s", "--default", "allow"])).unwrap()
        else {
            panic!("not an update");
        };
        assert!(req.rules.is_none() && req.users.is_none());
        let AclCall::Update(req) =
            AclCall::prepare(acl(&["update", "s", "--clear-users", "--clear-rules"])).unwrap()
        else {
            panic!("not an update");
        };
        assert_eq!(req.rules.unwrap().values.len(), 0);
        assert_eq!(req.users.unwrap().values.len(), 0);
        let bare = Cli::try_parse_args(["charonctl", "acl", "update", "s"]);
        assert!(
            bare.is_err(),
            "an update that changes nothing is a usage error"
        );
    }
}
