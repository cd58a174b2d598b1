//! Who may do what in a study. One place answers "may this caller export this type for these
//! sites" and "which jobs does it see"; the router asks, and the formats endpoint shows each
//! caller what it may create.
//!
//! | role | may create | sees |
//! |---|---|---|
//! | study-admin | every type, all sites | every job of the study, the audit trail |
//! | investigator (CI / D-CI) | every type, all sites | every job of the study |
//! | data-reviewer | data exports (fhir, sites_csv, participants_csv) | every job of the study |
//! | site-staff | any type, only for their sites (the site filter is forced to them) | their own jobs |

use crate::error::StudyError;
use crate::options::{ExportType, Filters};
use export_auth::{Membership, Principal, Role, SiteScope};

/// The caller's membership in `study`, or EXP003.
pub fn membership(principal: &Principal, study: &str) -> Result<Membership, StudyError> {
    principal.membership(study).ok_or_else(|| {
        StudyError::forbidden(format!(
            "you have no role in study {study}; ask its administrator for a membership"
        ))
    })
}

/// Whether the role may create `export_type` at all.
pub fn may_create(role: Role, export_type: ExportType) -> bool {
    match role {
        Role::StudyAdmin | Role::Investigator | Role::SiteStaff => true,
        Role::DataReviewer => export_type.is_data(),
    }
}

/// Checks a request against the membership and returns the filters to run: site staff get the
/// site filter set to their sites (when they gave none), and naming another site is EXP003.
pub fn authorize_create(
    membership: &Membership,
    export_type: ExportType,
    filters: &Filters,
) -> Result<Filters, StudyError> {
    if !may_create(membership.role, export_type) {
        return Err(StudyError::forbidden(format!(
            "the {} role may not create {} exports (data reviewers create data exports: fhir, sites_csv, participants_csv)",
            membership.role.as_str(),
            export_type.as_str()
        )));
    }
    let mut filters = filters.clone();
    if let SiteScope::Sites(own) = &membership.sites {
        match &filters.sites {
            Some(asked) => {
                if let Some(other) = asked.iter().find(|s| !own.contains(*s)) {
                    return Err(StudyError::forbidden(format!(
                        "site {other} is not one of your sites ({})",
                        own.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            None => filters.sites = Some(own.iter().cloned().collect()),
        }
    }
    Ok(filters)
}

/// Whose jobs the caller sees: `None` for every job of the study, or only its own.
pub fn visible_owner(principal: &Principal, membership: &Membership) -> Option<String> {
    match membership.role {
        Role::SiteStaff => Some(principal.id()),
        _ => None,
    }
}

/// Whether the caller may read the study's audit trail and webhook deliveries.
pub fn may_audit(membership: &Membership) -> bool {
    membership.role == Role::StudyAdmin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: Role, sites: &[&str]) -> Membership {
        Membership::new("s1", role, sites.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    #[test]
    fn the_permission_matrix() {
        for t in ExportType::ALL {
            for role in [Role::StudyAdmin, Role::Investigator, Role::SiteStaff] {
                assert!(may_create(role, t), "{role:?} {t:?}");
            }
            assert_eq!(may_create(Role::DataReviewer, t), t.is_data(), "{t:?}");
        }
    }

    #[test]
    fn site_staff_are_held_to_their_sites() {
        let staff = member(Role::SiteStaff, &["a", "b"]);
        let forced = authorize_create(&staff, ExportType::SitesCsv, &Filters::default()).unwrap();
        assert_eq!(forced.sites, Some(vec!["a".to_string(), "b".to_string()]));
        let own = Filters {
            sites: Some(vec!["b".into()]),
            ..Filters::default()
        };
        assert_eq!(
            authorize_create(&staff, ExportType::Report, &own)
                .unwrap()
                .sites,
            Some(vec!["b".into()])
        );
        let other = Filters {
            sites: Some(vec!["b".into(), "c".into()]),
            ..Filters::default()
        };
        let e = authorize_create(&staff, ExportType::Fhir, &other).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code.as_str()), (403, "EXP003"));
        assert!(e.message.contains("site c"));
        // Other roles keep the filters they sent.
        let admin = member(Role::StudyAdmin, &[]);
        assert_eq!(
            authorize_create(&admin, ExportType::Fhir, &Filters::default())
                .unwrap()
                .sites,
            None
        );
        let reviewer = member(Role::DataReviewer, &[]);
        assert!(authorize_create(&reviewer, ExportType::Dashboard, &Filters::default()).is_err());
    }
}
