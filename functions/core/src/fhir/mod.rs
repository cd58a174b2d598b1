//! FHIR R4 facts the export needs: resource types, instants, references, the Patient compartment,
//! OperationOutcome and the CapabilityStatement.

pub mod capability;
pub mod compartment;
mod compartment_table;
pub mod fhirpath;
mod mandatory_table;
pub mod members;
pub mod outcome;
pub mod reference;
pub mod search_table;
pub mod study;
pub mod time;

pub use compartment_table::RESOURCE_TYPES;

/// The top-level elements `resource_type` requires (min >= 1); `name[x]` is a choice element.
pub fn mandatory_elements(resource_type: &str) -> &'static [&'static str] {
    mandatory_table::MANDATORY_ELEMENTS
        .binary_search_by(|(t, _)| (*t).cmp(resource_type))
        .map_or(&[], |i| mandatory_table::MANDATORY_ELEMENTS[i].1)
}

/// Whether `name` is an R4 resource type (case-sensitive, as FHIR is).
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_r4_types() {
        assert!(is_resource_type("Patient"));
        assert!(is_resource_type("ExplanationOfBenefit"));
        assert!(!is_resource_type("patient"));
        assert!(!is_resource_type("Patients"));
        assert_eq!(RESOURCE_TYPES.len(), 145);
    }
}
