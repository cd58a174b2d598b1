//! The `Accept` header: which media types a request names, and which JSON flavour its FHIR
//! resources (OperationOutcome, CapabilityStatement) are answered with.
//!
//! Some clients parse only bodies of the type they asked for, so a request that asks for plain
//! `application/json` gets its OperationOutcome labelled that way; every other request gets
//! `application/fhir+json`.

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";
/// Plain JSON, which FHIR servers also serve resources as.
pub const JSON: &str = "application/json";

/// Whether `accept` names `media` with a non-zero quality (`application/fhir+json;q=0.5` names
/// it, `application/fhir+json;q=0` refuses it, and wildcards name nothing in particular).
pub fn names(accept: &str, media: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        kind.eq_ignore_ascii_case(media) && !refused
    })
}

/// The content type for a FHIR resource answering a request with this `Accept` header.
pub fn resource_content_type(accept: Option<&str>) -> &'static str {
    match accept {
        Some(accept) if names(accept, JSON) && !names(accept, FHIR_JSON) => JSON,
        _ => FHIR_JSON,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_only_listed_types_with_positive_quality() {
        assert!(names("application/fhir+json", FHIR_JSON));
        assert!(names("text/html, Application/FHIR+JSON ; q=0.8", FHIR_JSON));
        assert!(!names("application/fhir+json;q=0", FHIR_JSON));
        assert!(!names("*/*", FHIR_JSON));
        assert!(!names("application/*", FHIR_JSON));
        assert!(!names("application/json", FHIR_JSON));
        assert!(!names("application/json+fhir", FHIR_JSON));
        assert!(!names("", FHIR_JSON));
    }

    #[test]
    fn plain_json_only_when_asked_for_and_fhir_json_is_not() {
        assert_eq!(resource_content_type(Some("application/json")), JSON);
        assert_eq!(
            resource_content_type(Some("application/json, text/plain")),
            JSON
        );
        assert_eq!(
            resource_content_type(Some("application/json, application/fhir+json")),
            FHIR_JSON
        );
        assert_eq!(resource_content_type(Some("*/*")), FHIR_JSON);
        assert_eq!(resource_content_type(Some("application/xml")), FHIR_JSON);
        assert_eq!(resource_content_type(None), FHIR_JSON);
    }
}
