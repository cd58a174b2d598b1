//! The R4 Patient compartment: which patients a resource belongs to.
//!
//! The table in `compartment_table.rs` is derived from the R4 CompartmentDefinition (every type and
//! every listed param). A resource is in patient P's compartment when any listed element holds a
//! reference to `Patient/P`; a Patient is also in its own compartment.

use super::compartment_table::PATIENT_COMPARTMENT;
use super::reference;
use serde_json::Value;

/// The element paths that place a resource of `resource_type` in a Patient compartment, or `None`
/// when the type is not in the Patient compartment at all.
pub fn compartment_paths(resource_type: &str) -> Option<&'static [&'static str]> {
    PATIENT_COMPARTMENT
        .binary_search_by(|(t, _)| t.cmp(&resource_type))
        .ok()
        .map(|i| PATIENT_COMPARTMENT[i].1)
}

/// Whether resources of this type can be in a Patient compartment.
pub fn in_patient_compartment(resource_type: &str) -> bool {
    compartment_paths(resource_type).is_some()
}

/// Every resource type of the Patient compartment, sorted.
pub fn compartment_types() -> impl Iterator<Item = &'static str> {
    PATIENT_COMPARTMENT.iter().map(|(t, _)| *t)
}

/// The ids of the patients whose compartment holds `resource`, sorted and without repeats.
pub fn patients_of(resource: &Value) -> Vec<String> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    let mut patients = Vec::new();
    if resource_type == "Patient"
        && let Some(id) = resource.get("id").and_then(Value::as_str)
    {
        patients.push(id.to_string());
    }
    for path in compartment_paths(resource_type).unwrap_or(&[]) {
        collect_patient_refs(resource, path, &mut patients);
    }
    patients.sort_unstable();
    patients.dedup();
    patients
}

/// Walks `path` (dot-separated element names, arrays flattened as FHIRPath does) and pushes the
/// Patient ids of the references found at its end.
fn collect_patient_refs(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            for item in items {
                collect_patient_refs(item, path, out);
            }
        }
        Value::Object(map) => {
            if path.is_empty() {
                if let Some(id) = map
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(reference::patient_id)
                {
                    out.push(id.to_string());
                }
                return;
            }
            let (head, rest) = path.split_once('.').unwrap_or((path, ""));
            if let Some(child) = map.get(head) {
                collect_patient_refs(child, rest, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_nested_and_repeated_references() {
        let claim = json!({
            "resourceType": "Claim", "id": "c1",
            "patient": {"reference": "Patient/a"},
            "payee": {"party": {"reference": "Patient/b"}},
            "provider": {"reference": "Patient/not-a-compartment-param"}
        });
        assert_eq!(patients_of(&claim), vec!["a", "b"]);

        let obs = json!({
            "resourceType": "Observation", "id": "o1",
            "subject": {"reference": "Patient/a"},
            "performer": [{"reference": "Practitioner/x"}, {"reference": "Patient/c"}, {"reference": "Patient/a"}]
        });
        assert_eq!(patients_of(&obs), vec!["a", "c"]);

        let patient = json!({
            "resourceType": "Patient", "id": "p",
            "link": [{"other": {"reference": "Patient/q"}, "type": "seealso"}]
        });
        assert_eq!(patients_of(&patient), vec!["p", "q"]);

        let plan = json!({
            "resourceType": "CarePlan", "id": "cp",
            "subject": {"reference": "Group/g"},
            "activity": [{"detail": {"performer": [{"reference": "Patient/z"}]}}]
        });
        assert_eq!(patients_of(&plan), vec!["z"]);
    }

    #[test]
    fn types_outside_the_compartment_have_no_patients() {
        let practitioner = json!({"resourceType": "Practitioner", "id": "x", "subject": {"reference": "Patient/a"}});
        assert!(patients_of(&practitioner).is_empty());
        assert!(!in_patient_compartment("Practitioner"));
        assert!(in_patient_compartment("Group"));
        assert_eq!(compartment_types().count(), 66);
    }
}
