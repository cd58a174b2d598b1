//! SMART scopes for bulk clients (SMART App Launch v1 and v2). A Backend Services client may only
//! read, and only at system level: `system/*.read`, `system/Patient.read` (v1), `system/*.rs`,
//! `system/Observation.rs` (v2), in any mix. What is granted is always written in v2 form.

use std::collections::BTreeSet;

/// What a bulk client may read: every type, or some.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes {
    all: bool,
    types: BTreeSet<String>,
}

/// The outcome of reading one requested scope.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requested {
    /// Read access to a type (`*` for every type).
    Read(String),
    /// A well-formed scope this server does not grant, and why.
    Refused(String),
}

impl Scopes {
    /// Every type.
    pub fn all() -> Scopes {
        Scopes {
            all: true,
            types: BTreeSet::new(),
        }
    }

    /// Whether nothing may be read.
    pub fn is_empty(&self) -> bool {
        !self.all && self.types.is_empty()
    }

    /// Whether resources of `resource_type` may be read.
    pub fn allows(&self, resource_type: &str) -> bool {
        self.all || self.types.contains(resource_type)
    }

    /// The types granted, or `None` for every type.
    pub fn types(&self) -> Option<&BTreeSet<String>> {
        (!self.all).then_some(&self.types)
    }

    /// What both allow.
    pub fn intersect(&self, other: &Scopes) -> Scopes {
        match (self.all, other.all) {
            (true, _) => other.clone(),
            (_, true) => self.clone(),
            _ => Scopes {
                all: false,
                types: self.types.intersection(&other.types).cloned().collect(),
            },
        }
    }

    /// Reads a space-separated scope request. Each scope is read access (`read`, `*`, or v2
    /// permissions including `r`, trimmed to `rs`) or refused; a malformed scope fails the
    /// whole request. Returns what may be granted and why the rest was refused.
    pub fn parse_request(
        text: &str,
        is_resource_type: impl Fn(&str) -> bool,
    ) -> Result<(Scopes, Vec<String>), String> {
        let mut granted = Scopes::default();
        let mut refused = Vec::new();
        for scope in text.split(' ').filter(|s| !s.is_empty()) {
            match read_scope(scope, &is_resource_type)? {
                Requested::Read(t) if t == "*" => granted.all = true,
                Requested::Read(t) => {
                    granted.types.insert(t);
                }
                Requested::Refused(why) => refused.push(format!("{scope}: {why}")),
            }
        }
        if granted.all {
            granted.types.clear();
        }
        Ok((granted, refused))
    }

    /// Reads the `scope` claim of an access token this server issued (v2 form).
    pub fn from_granted(text: &str) -> Scopes {
        let mut scopes = Scopes::default();
        for scope in text.split(' ') {
            let Some(rest) = scope.strip_prefix("system/") else {
                continue;
            };
            let Some((t, permissions)) = rest.split_once('.') else {
                continue;
            };
            if !permissions.contains('r') {
                continue;
            }
            if t == "*" {
                return Scopes::all();
            }
            scopes.types.insert(t.to_string());
        }
        scopes
    }

    /// The v2 scope string: `system/*.rs`, or `system/Observation.rs system/Patient.rs`.
    pub fn to_scope_string(&self) -> String {
        if self.all {
            return "system/*.rs".into();
        }
        self.types
            .iter()
            .map(|t| format!("system/{t}.rs"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One scope: `context/Type.permissions`.
fn read_scope(scope: &str, is_resource_type: &impl Fn(&str) -> bool) -> Result<Requested, String> {
    let malformed = || {
        format!("'{scope}' is not a SMART scope (expected e.g. system/*.read or system/Patient.rs)")
    };
    if !scope.is_ascii()
        || scope
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(malformed());
    }
    let Some((context, rest)) = scope.split_once('/') else {
        // Scopes outside the resource grammar (openid, launch, offline_access...) mean nothing
        // to a backend service.
        return Ok(Requested::Refused(
            "only system/ resource scopes are granted to backend services".into(),
        ));
    };
    let Some((resource_type, permissions)) = rest.split_once('.') else {
        return Err(malformed());
    };
    if resource_type.is_empty() || permissions.is_empty() {
        return Err(malformed());
    }
    if permissions.contains('?') {
        return Ok(Requested::Refused(
            "granular scopes (with a query) are not supported".into(),
        ));
    }
    let read = match permissions {
        "read" | "*" => true,
        "write" => false,
        v2 if is_v2_permissions(v2) => v2.contains('r'),
        _ => {
            return Ok(Requested::Refused(format!(
                "unknown action '{permissions}' (use read, or v2 permissions such as rs)"
            )));
        }
    };
    if !matches!(context, "system" | "patient" | "user") {
        return Err(malformed());
    }
    if context != "system" {
        return Ok(Requested::Refused(format!(
            "{context}/ scopes are for apps acting for a patient or user; backend services use system/"
        )));
    }
    if resource_type != "*" && !is_resource_type(resource_type) {
        return Ok(Requested::Refused(format!(
            "'{resource_type}' is not an R4 resource type"
        )));
    }
    if !read {
        return Ok(Requested::Refused(
            "this server grants read access only (no write)".into(),
        ));
    }
    Ok(Requested::Read(resource_type.to_string()))
}

/// SMART v2 permissions: a non-empty subsequence of `cruds`, in that order.
fn is_v2_permissions(text: &str) -> bool {
    let mut rest = "cruds";
    for c in text.chars() {
        match rest.find(c) {
            Some(i) => rest = &rest[i + 1..],
            None => return false,
        }
    }
    !text.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_type(t: &str) -> bool {
        ["Patient", "Observation", "Condition"].contains(&t)
    }

    fn granted(text: &str) -> (String, usize) {
        let (scopes, refused) = Scopes::parse_request(text, is_type).unwrap();
        (scopes.to_scope_string(), refused.len())
    }

    #[test]
    fn every_read_form_is_granted_as_v2() {
        for (request, want) in [
            ("system/*.read", "system/*.rs"),
            ("system/*.rs", "system/*.rs"),
            ("system/*.*", "system/*.rs"),
            ("system/*.cruds", "system/*.rs"),
            ("system/Patient.read", "system/Patient.rs"),
            ("system/Observation.rs", "system/Observation.rs"),
            ("system/Observation.r", "system/Observation.rs"),
            (
                "system/Patient.read system/Observation.rs",
                "system/Observation.rs system/Patient.rs",
            ),
            ("system/Patient.read system/*.rs", "system/*.rs"),
        ] {
            assert_eq!(granted(request), (want.to_string(), 0), "{request}");
        }
    }

    #[test]
    fn writes_other_contexts_unknown_types_and_actions_are_refused() {
        for request in [
            "system/*.write",
            "system/Patient.cud",
            "system/Patient.c",
            "patient/*.read",
            "user/Observation.rs",
            "system/Foo.read",
            "system/Patient.delete",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Observation.rs?category=laboratory",
            "openid",
            "launch",
        ] {
            assert_eq!(granted(request), (String::new(), 1), "{request}");
        }
        // A mixed request keeps its read parts.
        assert_eq!(
            granted("system/Patient.read system/Observation.write patient/*.read"),
            ("system/Patient.rs".to_string(), 2)
        );
    }

    #[test]
    fn malformed_scopes_fail_the_request() {
        for request in [
            "system/Patient",
            "system/.read",
            "system/Patient.",
            "other/Patient.read",
            "system/Pat\"ient.read",
            "system/Patiént.read",
        ] {
            assert!(
                Scopes::parse_request(request, is_type).is_err(),
                "{request}"
            );
        }
    }

    #[test]
    fn granted_scopes_read_back_and_intersect() {
        let s = Scopes::from_granted("system/Observation.rs system/Patient.rs");
        assert!(s.allows("Patient") && s.allows("Observation") && !s.allows("Condition"));
        assert!(Scopes::from_granted("system/*.rs").allows("Condition"));
        assert!(Scopes::from_granted("system/Patient.c").is_empty());
        let both = s.intersect(&Scopes::from_granted(
            "system/Patient.rs system/Condition.rs",
        ));
        assert_eq!(both.to_scope_string(), "system/Patient.rs");
        assert_eq!(Scopes::all().intersect(&s), s);
    }
}
