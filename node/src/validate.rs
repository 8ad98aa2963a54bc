//! What every validation in the node returns: the field that is wrong and
//! why, worded for the operator who sent it.
//!
//! It lives on its own because hosts, certificates and tokens are all
//! validated with it, and none of them should depend on another to name a
//! field (`host` → `tls::upstream` → `tls::cert` → `host` was a cycle).

/// A validation failure, naming the field so the operator knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FieldError;

    #[test]
    fn names_the_field_first() {
        let e = FieldError::new("domains[0]", "must not be empty");
        assert_eq!(e.to_string(), "domains[0]: must not be empty");
    }
}
