//! Facts of the study data model the service reads (see the study export API): a study is a
//! `ResearchStudy`, its sites the `Location`s of `ResearchStudy.site`, a participant a
//! `ResearchSubject` assigned to one site by an extension this service defines.

/// The extension on `ResearchSubject` whose `valueReference` names the participant's site
/// (`Location/<id>`, one of the study's sites).
pub const SITE_EXTENSION: &str =
    "http://bulk-export.org/fhir/StructureDefinition/research-subject-site";

/// The R4 `ResearchSubject.status` codes (http://hl7.org/fhir/research-subject-status).
pub const SUBJECT_STATUSES: [&str; 13] = [
    "candidate",
    "eligible",
    "follow-up",
    "ineligible",
    "not-registered",
    "off-study",
    "on-study",
    "on-study-intervention",
    "on-study-observation",
    "pending-on-study",
    "potential-candidate",
    "screening",
    "withdrawn",
];
