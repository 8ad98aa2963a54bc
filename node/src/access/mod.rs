//! Access lists: ordered allow/deny rules on the client's address, a
//! default, and optional HTTP basic-auth users. Replicated records (key
//! `acl/<name>`), attached to hosts and locations by name.
//!
//! - this file: the record type and every rule about what a valid list is
//!   (the API validates here before anything is written);
//! - [`compiled`]: a list made ready for the request path when it changes
//!   (sorted address ranges, parsed password hashes), never per request.

pub mod compiled;
pub mod rate;

use std::collections::HashSet;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use charon_proto::store as pb;

use crate::cidr::Cidr;
use crate::validate::FieldError;

/// The store key prefix of access lists.
pub const ACL_PREFIX: &str = "acl/";

pub fn acl_key(name: &str) -> String {
    format!("{ACL_PREFIX}{name}")
}

/// Enough for a country's published ranges; compiling stays in
/// milliseconds (see [`compiled`]).
pub const MAX_RULES: usize = 5000;
pub const MAX_USERS: usize = 1000;

/// One rule: `allow` or deny the addresses in `cidr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub allow: bool,
    /// Canonical `network/prefix` text (host bits cleared).
    pub cidr: String,
}

/// A basic-auth user: the name and an argon2 PHC hash of the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUser {
    pub name: String,
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessList {
    pub name: String,
    /// In order: the first rule whose range holds the address decides.
    pub rules: Vec<AccessRule>,
    /// What an address no rule holds gets.
    pub default_allow: bool,
    pub users: Vec<AccessUser>,
    /// For `WWW-Authenticate`; empty means the list's name.
    pub realm: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub version: u64,
}

/// `allow` → true, `deny` → false.
pub fn parse_action(field: &str, s: &str) -> Result<bool, FieldError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "allow" => Ok(true),
        "deny" => Ok(false),
        other => Err(FieldError::new(
            field,
            format!("{other:?} must be \"allow\" or \"deny\""),
        )),
    }
}

pub fn action_name(allow: bool) -> &'static str {
    if allow {
        "allow"
    } else {
        "deny"
    }
}

/// Names hosts refer to: short, and safe in a store key and a metric label.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(FieldError::new(
            field,
            format!("{name:?} must be 1-64 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// A user as the API takes it: a password to hash here, or a hash.
pub struct UserInput {
    pub name: String,
    pub password: String,
    pub password_hash: String,
}

/// Hashes `password` with argon2id (the crate's defaults: 19 MiB, two
/// passes), so a stolen store file does not give the passwords away.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes encode");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// Turns API users into stored ones (hashing plain passwords), checking
/// each; `field` is where they came from (`users`).
pub fn users_from_input(field: &str, input: Vec<UserInput>) -> Result<Vec<AccessUser>, FieldError> {
    if input.len() > MAX_USERS {
        return Err(FieldError::new(field, format!("at most {MAX_USERS} users")));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(input.len());
    for (i, u) in input.into_iter().enumerate() {
        let f = |s: &str| format!("{field}[{i}].{s}");
        let name = u.name.trim().to_string();
        if name.is_empty()
            || name.len() > 128
            || name.contains(':')
            || name.chars().any(char::is_control)
        {
            return Err(FieldError::new(
                f("name"),
                "must be 1-128 characters without ':' or control characters (basic auth puts ':' after the name)",
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(FieldError::new(
                f("name"),
                format!("{name:?} is listed twice"),
            ));
        }
        let password_hash = match (u.password.is_empty(), u.password_hash.trim()) {
            (false, "") => hash_password(&u.password),
            (true, h) if !h.is_empty() => {
                check_hash(h).map_err(|e| FieldError::new(f("password_hash"), e))?;
                h.to_string()
            }
            (true, _) => {
                return Err(FieldError::new(
                    f("password"),
                    "a password or a password hash is required",
                ))
            }
            (false, _) => {
                return Err(FieldError::new(
                    f("password_hash"),
                    "give a password or a password hash, not both",
                ))
            }
        };
        out.push(AccessUser {
            name,
            password_hash,
        });
    }
    Ok(out)
}

/// An argon2 PHC string (`$argon2id$v=19$m=...`).
fn check_hash(h: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(h).map_err(|e| format!("not a PHC password hash: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "{} hashes are not supported: use argon2 (argon2id, argon2i or argon2d)",
            parsed.algorithm
        ));
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("unusable argon2 parameters: {e}"))?;
    Ok(())
}

impl AccessList {
    /// Normalises (CIDRs canonical) and validates everything that can be
    /// checked without other records.
    pub fn normalize_and_validate(&mut self) -> Result<(), FieldError> {
        check_name("name", &self.name)?;
        if self.rules.len() > MAX_RULES {
            return Err(FieldError::new(
                "rules",
                format!("at most {MAX_RULES} rules"),
            ));
        }
        for (i, r) in self.rules.iter_mut().enumerate() {
            let c: Cidr = r
                .cidr
                .parse()
                .map_err(|e: String| FieldError::new(format!("rules[{i}].cidr"), e))?;
            r.cidr = c.network().to_string();
        }
        self.realm = self.realm.trim().to_string();
        if self.realm.len() > 128
            || self
                .realm
                .chars()
                .any(|c| c == '"' || c == '\\' || !(' '..='~').contains(&c))
        {
            return Err(FieldError::new(
                "realm",
                "must be at most 128 printable ASCII characters without '\"' or '\\'",
            ));
        }
        Ok(())
    }

    /// The realm `WWW-Authenticate` names.
    pub fn realm(&self) -> &str {
        if self.realm.is_empty() {
            &self.name
        } else {
            &self.realm
        }
    }
}

pub fn to_pb(a: &AccessList) -> pb::AccessListRecord {
    pb::AccessListRecord {
        name: a.name.clone(),
        rules: a
            .rules
            .iter()
            .map(|r| pb::AccessRuleRecord {
                allow: r.allow,
                cidr: r.cidr.clone(),
            })
            .collect(),
        default_allow: a.default_allow,
        users: a
            .users
            .iter()
            .map(|u| pb::AccessUserRecord {
                name: u.name.clone(),
                password_hash: u.password_hash.clone(),
            })
            .collect(),
        realm: a.realm.clone(),
        created_at_ms: a.created_at_ms,
        updated_at_ms: a.updated_at_ms,
        version: a.version,
    }
}

pub fn from_pb(a: pb::AccessListRecord) -> AccessList {
    AccessList {
        name: a.name,
        rules: a
            .rules
            .into_iter()
            .map(|r| AccessRule {
                allow: r.allow,
                cidr: r.cidr,
            })
            .collect(),
        default_allow: a.default_allow,
        users: a
            .users
            .into_iter()
            .map(|u| AccessUser {
                name: u.name,
                password_hash: u.password_hash,
            })
            .collect(),
        realm: a.realm,
        created_at_ms: a.created_at_ms,
        updated_at_ms: a.updated_at_ms,
        version: a.version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> AccessList {
        AccessList {
            name: "office".into(),
            rules: vec![
                AccessRule {
                    allow: true,
                    cidr: "10.1.2.3/8".into(),
                },
                AccessRule {
                    allow: false,
                    cidr: "::/0".into(),
                },
            ],
            default_allow: false,
            ..Default::default()
        }
    }

    #[test]
    fn cidrs_are_made_canonical() {
        let mut l = list();
        l.normalize_and_validate().unwrap();
        assert_eq!(l.rules[0].cidr, "10.0.0.0/8");
        assert_eq!(l.rules[1].cidr, "::/0");
        assert_eq!(l.realm(), "office");
    }

    #[test]
    fn refusals_name_the_field() {
        type Case = (fn(&mut AccessList), &'static str);
        let cases: Vec<Case> = vec![
            (|l| l.name = "a/b".into(), "name"),
            (|l| l.name.clear(), "name"),
            (|l| l.rules[1].cidr = "10.0.0.0/33".into(), "rules[1].cidr"),
            (|l| l.rules[0].cidr = "example.com".into(), "rules[0].cidr"),
            (|l| l.realm = "a\"b".into(), "realm"),
        ];
        for (mutate, field) in cases {
            let mut l = list();
            mutate(&mut l);
            assert_eq!(l.normalize_and_validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn users_need_exactly_one_secret_and_unique_names() {
        let u = |name: &str, pw: &str, hash: &str| UserInput {
            name: name.into(),
            password: pw.into(),
            password_hash: hash.into(),
        };
        let cases: Vec<(Vec<UserInput>, &str)> = vec![
            (vec![u("a:b", "x", "")], "users[0].name"),
            (vec![u("a", "", "")], "users[0].password"),
            (vec![u("a", "x", "$argon2id$x")], "users[0].password_hash"),
            (
                vec![u("a", "", "$2b$10$abcdefghijklmnopqrstuv")],
                "users[0].password_hash",
            ),
            (vec![u("a", "x", ""), u("a", "y", "")], "users[1].name"),
        ];
        for (input, field) in cases {
            assert_eq!(users_from_input("users", input).unwrap_err().field, field);
        }
        let hashed = users_from_input("users", vec![u("alice", "s3cret", "")]).unwrap();
        assert!(hashed[0].password_hash.starts_with("$argon2id$"));
        let again =
            users_from_input("users", vec![u("bob", "", &hashed[0].password_hash)]).unwrap();
        assert_eq!(again[0].password_hash, hashed[0].password_hash);
    }
}
