//! Who is calling: a [`Principal`], made once per request by [`crate::Authenticator`] and handed to
//! every router, which decides from it alone.

use crate::scopes::Scopes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A SMART Backend Services client, with the scopes its access token carries.
    BulkClient { client_id: String, scopes: Scopes },
    /// A person signed in with an OpenID Connect token; rights come from study memberships.
    User {
        issuer: String,
        subject: String,
        email: Option<String>,
        name: Option<String>,
        memberships: Vec<Membership>,
    },
    /// An integration's API key, which carries one study membership.
    ApiKey {
        key_id: String,
        name: String,
        membership: Membership,
    },
    /// Anyone on a server whose enforcement is off (loopback only): administrator of every study,
    /// every FHIR scope, so the quick start needs no set-up.
    LocalAdmin,
}

impl Principal {
    /// A stable id for ownership and logs: `client:<id>`, `user:<issuer>#<subject>`,
    /// `api-key:<id>`, or `local-admin`. Never a secret.
    pub fn id(&self) -> String {
        match self {
            Principal::BulkClient { client_id, .. } => format!("client:{client_id}"),
            Principal::User {
                issuer, subject, ..
            } => format!("user:{issuer}#{subject}"),
            Principal::ApiKey { key_id, .. } => format!("api-key:{key_id}"),
            Principal::LocalAdmin => "local-admin".into(),
        }
    }

    /// What the caller may read through the FHIR API, or `None` if it may not use it at all
    /// (people and API keys use the study API).
    pub fn fhir_scopes(&self) -> Option<Scopes> {
        match self {
            Principal::BulkClient { scopes, .. } => Some(scopes.clone()),
            Principal::LocalAdmin => Some(Scopes::all()),
            _ => None,
        }
    }

    /// A short human label: the e-mail or name of a person, the name of a key, the client id.
    pub fn label(&self) -> String {
        match self {
            Principal::BulkClient { client_id, .. } => client_id.clone(),
            Principal::User {
                email,
                name,
                subject,
                ..
            } => email
                .clone()
                .or_else(|| name.clone())
                .unwrap_or_else(|| subject.clone()),
            Principal::ApiKey { name, .. } => format!("API key {name}"),
            Principal::LocalAdmin => "local administrator".into(),
        }
    }

    /// The caller's membership in `study`, if any (the local administrator administers all).
    pub fn membership(&self, study: &str) -> Option<Membership> {
        match self {
            Principal::User { memberships, .. } => {
                memberships.iter().find(|m| m.study == study).cloned()
            }
            Principal::ApiKey { membership, .. } if membership.study == study => {
                Some(membership.clone())
            }
            Principal::LocalAdmin => Some(Membership {
                study: study.to_string(),
                role: Role::StudyAdmin,
                sites: SiteScope::All,
            }),
            _ => None,
        }
    }
}

/// A role in a study (the study API defines what each may do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Study Administrator.
    StudyAdmin,
    /// Coordinating or deputy coordinating investigator (CI / D-CI).
    Investigator,
    DataReviewer,
    /// Staff of one or more sites.
    SiteStaff,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::StudyAdmin,
        Role::Investigator,
        Role::DataReviewer,
        Role::SiteStaff,
    ];

    /// The id used in the API, tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::StudyAdmin => "study-admin",
            Role::Investigator => "investigator",
            Role::DataReviewer => "data-reviewer",
            Role::SiteStaff => "site-staff",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// The sites a membership covers: every site of the study, or a non-empty set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SiteScope {
    All,
    Sites(BTreeSet<String>),
}

impl SiteScope {
    /// `All` for no sites; a set otherwise (so an empty set cannot be built).
    pub fn from_sites(sites: impl IntoIterator<Item = String>) -> SiteScope {
        let set: BTreeSet<String> = sites.into_iter().collect();
        if set.is_empty() {
            SiteScope::All
        } else {
            SiteScope::Sites(set)
        }
    }

    pub fn covers(&self, site: &str) -> bool {
        match self {
            SiteScope::All => true,
            SiteScope::Sites(set) => set.contains(site),
        }
    }

    /// The sites, or an empty list for all.
    pub fn list(&self) -> Vec<String> {
        match self {
            SiteScope::All => Vec::new(),
            SiteScope::Sites(set) => set.iter().cloned().collect(),
        }
    }
}

/// A user's (or API key's) role in one study.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub study: String,
    pub role: Role,
    /// Site staff: their sites; other roles: all sites.
    pub sites: SiteScope,
}

impl Membership {
    /// A membership, checking that site staff have sites and the other roles none.
    pub fn new(study: &str, role: Role, sites: Vec<String>) -> Result<Membership, String> {
        match (role, sites.is_empty()) {
            (Role::SiteStaff, true) => Err("the site-staff role needs at least one --site".into()),
            (Role::SiteStaff, false) | (_, true) => Ok(Membership {
                study: study.to_string(),
                role,
                sites: SiteScope::from_sites(sites),
            }),
            (_, false) => Err(format!(
                "the {} role covers every site of the study; --site is only for site-staff",
                role.as_str()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_memberships_are_checked() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("admin"), None);
        assert!(Membership::new("s", Role::SiteStaff, vec![]).is_err());
        assert!(Membership::new("s", Role::StudyAdmin, vec!["a".into()]).is_err());
        let staff = Membership::new("s", Role::SiteStaff, vec!["a".into()]).unwrap();
        assert!(staff.sites.covers("a") && !staff.sites.covers("b"));
        let admin = Membership::new("s", Role::StudyAdmin, vec![]).unwrap();
        assert!(admin.sites.covers("anything"));
    }

    #[test]
    fn ids_name_the_kind_of_caller() {
        let client = Principal::BulkClient {
            client_id: "c1".into(),
            scopes: Scopes::all(),
        };
        assert_eq!(client.id(), "client:c1");
        assert_eq!(Principal::LocalAdmin.id(), "local-admin");
        assert!(client.fhir_scopes().is_some());
        assert_eq!(
            Principal::LocalAdmin.membership("x").unwrap().role,
            Role::StudyAdmin
        );
    }
}
