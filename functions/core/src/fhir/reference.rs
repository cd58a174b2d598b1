//! Reading FHIR `Reference.reference` strings.

/// The Patient id a reference points at, if it points at a Patient.
///
/// Accepts relative (`Patient/1`), versioned (`Patient/1/_history/2`) and absolute
/// (`https://host/fhir/Patient/1`) references; contained (`#x`) and `urn:` references never
/// resolve to a stored Patient.
pub fn patient_id(reference: &str) -> Option<&str> {
    target_of(reference).and_then(|(t, id)| (t == "Patient").then_some(id))
}

/// The Patient ids of a Group's members (`Group.member.entity` references to a Patient).
pub fn group_patient_members(group: &serde_json::Value) -> Vec<String> {
    group["member"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| {
                    m.pointer("/entity/reference")
                        .and_then(serde_json::Value::as_str)
                })
                .filter_map(patient_id)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The `(type, id)` a literal reference points at.
pub fn target_of(reference: &str) -> Option<(&str, &str)> {
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return None;
    }
    let path = reference.split(['?', '#']).next().unwrap_or("");
    let path = match path.find("/_history/") {
        Some(i) => &path[..i],
        None => path,
    };
    let mut segments = path.rsplit('/');
    let id = segments.next()?;
    let resource_type = segments.next()?;
    let valid_id = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    let valid_type = resource_type.starts_with(|c: char| c.is_ascii_uppercase());
    (valid_id && valid_type).then_some((resource_type, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_patient_references() {
        assert_eq!(patient_id("Patient/123"), Some("123"));
        assert_eq!(patient_id("Patient/a-b.c/_history/2"), Some("a-b.c"));
        assert_eq!(patient_id("https://x.org/fhir/Patient/9"), Some("9"));
        assert_eq!(patient_id("Practitioner/1"), None);
        assert_eq!(patient_id("#p1"), None);
        assert_eq!(patient_id("urn:uuid:1234"), None);
        assert_eq!(patient_id("Patient/"), None);
        assert_eq!(patient_id("123"), None);
    }
}
