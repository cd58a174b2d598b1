//! `_elements`: export only some top-level elements. Plain names (`id,status`) apply to every type,
//! `Type.element` to one type; a type named by neither is exported whole. `resourceType`, `id`,
//! `meta` and the type's mandatory elements are always kept, and trimmed resources carry the
//! `SUBSETTED` tag so nobody mistakes them for complete ones.

use crate::fhir::fhirpath::names_member;
use crate::fhir::is_resource_type;
use crate::fhir::mandatory_elements;
use crate::fhir::members::{Member, members};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The `SUBSETTED` code of the v3 ObservationValue code system.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Elements every trimmed resource keeps.
const ALWAYS_KEPT: &[&str] = &["resourceType", "id", "meta"];

/// The parsed `_elements` of an export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ElementSelection {
    every_type: Vec<String>,
    by_type: BTreeMap<String, Vec<String>>,
}

impl ElementSelection {
    /// Parses `_elements` values (each comma-separated). Only top-level elements are allowed.
    pub fn parse(values: &[String]) -> Result<ElementSelection, String> {
        let mut selection = ElementSelection::default();
        for item in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
            let (resource_type, element) = match item.split_once('.') {
                Some((t, e)) => (Some(t), e),
                None => (None, item),
            };
            if !is_element_name(element) {
                return Err(format!(
                    "_elements '{item}' is not a top-level element (use element or Type.element)"
                ));
            }
            match resource_type {
                Some(t) if !is_resource_type(t) => {
                    return Err(format!(
                        "_elements '{item}': {t} is not an R4 resource type"
                    ));
                }
                Some(t) => selection
                    .by_type
                    .entry(t.to_string())
                    .or_default()
                    .push(element.to_string()),
                None => selection.every_type.push(element.to_string()),
            }
        }
        Ok(selection)
    }

    /// Whether resources of `resource_type` are trimmed.
    pub fn trims(&self, resource_type: &str) -> bool {
        !self.every_type.is_empty() || self.by_type.contains_key(resource_type)
    }

    /// Removes unselected, non-mandatory elements and tags the resource `SUBSETTED`.
    pub fn apply(&self, resource_type: &str, resource: &mut Value) {
        if !self.trims(resource_type) {
            return;
        }
        let Value::Object(map) = resource else {
            return;
        };
        let wanted = self.wanted(resource_type);
        map.retain(|key, _| keeps(&wanted, key));
        let meta = map.entry("meta").or_insert_with(|| json!({}));
        tag_subsetted(meta);
    }

    /// [`ElementSelection::apply`] on a resource given as its members (see
    /// [`crate::fhir::members`]): the kept members are copied as stored, only `meta` is parsed
    /// (to add the tag). The bytes are those `apply` and `serde_json` would write for a stored
    /// (already minified) resource.
    pub fn trim_members(
        &self,
        resource_type: &str,
        members: &[Member<'_>],
    ) -> Result<Vec<u8>, serde_json::Error> {
        let wanted = self.wanted(resource_type);
        let mut out = Vec::with_capacity(
            members
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
                + 96,
        );
        out.push(b'{');
        let mut meta_written = false;
        for (key, value) in members.iter().filter(|(key, _)| keeps(&wanted, key)) {
            if out.len() > 1 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            if *key == "meta" && !meta_written {
                write_subsetted_meta(&mut out, value)?;
                meta_written = true;
            } else {
                out.extend_from_slice(value);
            }
        }
        if !meta_written {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(b"\"meta\":");
            let mut meta = json!({});
            tag_subsetted(&mut meta);
            serde_json::to_writer(&mut out, &meta)?;
        }
        out.push(b'}');
        Ok(out)
    }

    /// The elements a trimmed resource of `resource_type` keeps.
    fn wanted(&self, resource_type: &str) -> Vec<&str> {
        self.every_type
            .iter()
            .chain(self.by_type.get(resource_type).into_iter().flatten())
            .map(String::as_str)
            .chain(ALWAYS_KEPT.iter().copied())
            .chain(mandatory_elements(resource_type).iter().copied())
            .collect()
    }
}

/// Whether the JSON member `key` (`_name` carries `name`'s extensions) is kept.
fn keeps(wanted: &[&str], key: &str) -> bool {
    let name = key.strip_prefix('_').unwrap_or(key);
    wanted.iter().any(|w| selects(w, name))
}

/// Whether the selected element `wanted` (`value`, `value[x]`) covers the JSON property `name`.
fn selects(wanted: &str, name: &str) -> bool {
    names_member(wanted.strip_suffix("[x]").unwrap_or(wanted), name)
}

/// Writes stored `meta` bytes with the `SUBSETTED` tag added. Without tags yet (the usual case)
/// the tag is appended to the stored bytes, as `serde_json` would write it after the members it
/// keeps in order; tags present are parsed, to add it only once.
fn write_subsetted_meta(out: &mut Vec<u8>, meta: &[u8]) -> Result<(), serde_json::Error> {
    let untagged = match members(meta) {
        Some(found) if !found.iter().any(|(key, _)| *key == "tag") => Some(found.is_empty()),
        _ => None,
    };
    match untagged {
        Some(empty) => {
            let inside = meta.trim_ascii_end();
            out.extend_from_slice(&inside[..inside.len() - 1]);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(SUBSETTED_TAGS.as_bytes());
            out.push(b'}');
        }
        None => {
            let mut meta: Value = serde_json::from_slice(meta)?;
            tag_subsetted(&mut meta);
            serde_json::to_writer(out, &meta)?;
        }
    }
    Ok(())
}

/// The `tag` member [`tag_subsetted`] adds to a `meta` without tags, as `serde_json` writes it.
const SUBSETTED_TAGS: &str = concat!(
    r#""tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","#,
    r#""code":"SUBSETTED"}]"#
);

fn tag_subsetted(meta: &mut Value) {
    let Value::Object(meta) = meta else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    if let Value::Array(tags) = tags {
        let present = tags.iter().any(|t| {
            t.get("code").and_then(Value::as_str) == Some("SUBSETTED")
                && t.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
        });
        if !present {
            tags.push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
        }
    }
}

fn is_element_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(v: &str) -> ElementSelection {
        ElementSelection::parse(&[v.to_string()]).unwrap()
    }

    #[test]
    fn a_tag_added_to_stored_meta_bytes_is_what_a_parse_writes() {
        for meta in [
            json!({}),
            json!({"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"}),
            json!({"profile": ["http://x/y"], "tag": [{"system": "s", "code": "c"}]}),
            json!({"tag": [{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]}),
        ] {
            let mut out = Vec::new();
            write_subsetted_meta(&mut out, &serde_json::to_vec(&meta).unwrap()).unwrap();
            let mut parsed = meta.clone();
            tag_subsetted(&mut parsed);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&parsed).unwrap(),
                "{meta}"
            );
        }
    }

    #[test]
    fn keeps_selected_and_mandatory_elements() {
        let mut obs = json!({"resourceType": "Observation", "id": "1", "meta": {"versionId": "1"},
            "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/1"},
            "valueQuantity": {"value": 1}, "_status": {"extension": []}, "note": [{"text": "n"}]});
        select("Observation.value,subject").apply("Observation", &mut obs);
        let keys: Vec<&String> = obs.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            vec![
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "valueQuantity",
                "_status"
            ]
        );
        assert_eq!(obs["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(obs["meta"]["versionId"], "1");
    }

    #[test]
    fn other_types_are_left_whole() {
        let s = select("Patient.name");
        assert!(s.trims("Patient") && !s.trims("Observation"));
        let mut obs = json!({"resourceType": "Observation", "note": []});
        let before = obs.clone();
        s.apply("Observation", &mut obs);
        assert_eq!(obs, before);
        let mut med =
            json!({"resourceType": "MedicationRequest", "medicationReference": {}, "note": []});
        select("id").apply("MedicationRequest", &mut med);
        assert!(med.get("medicationReference").is_some() && med.get("note").is_none());
    }

    #[test]
    fn rejects_nested_or_unknown() {
        for bad in ["Patient.name.given", "Foo.id", "", "na-me", "Patient."] {
            assert!(
                ElementSelection::parse(&[bad.to_string()]).is_err(),
                "{bad}"
            );
        }
    }

    fn subsetted() -> Value {
        json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"})
    }

    /// The `SUBSETTED` tag is added once: a resource that already carries it (same system and
    /// code) keeps exactly one, while a tag matching only in code or only in system is another
    /// tag, kept beside the added one. Other tags and meta elements are left as they were.
    #[test]
    fn subsetted_tag_added_once() {
        let trim = |meta: Value| {
            let mut p = json!({"resourceType": "Patient", "id": "p", "meta": meta,
                "gender": "female", "birthDate": "1980-05-02"});
            select("gender").apply("Patient", &mut p);
            assert!(p.get("birthDate").is_none());
            p["meta"].clone()
        };
        let other = json!({"system": "urn:t", "code": "x"});
        let meta = trim(json!({"versionId": "3", "tag": [other.clone(), subsetted()]}));
        assert_eq!(meta["tag"], json!([other.clone(), subsetted()]));
        assert_eq!(meta["versionId"], "3");

        let meta = trim(json!({"tag": [other.clone()]}));
        assert_eq!(meta["tag"], json!([other.clone(), subsetted()]));

        let redacted = json!({"system": SUBSETTED_SYSTEM, "code": "REDACTED"});
        let meta = trim(json!({"tag": [redacted.clone()]}));
        assert_eq!(meta["tag"], json!([redacted, subsetted()]));

        let elsewhere = json!({"system": "urn:other", "code": "SUBSETTED"});
        let meta = trim(json!({"tag": [elsewhere.clone()]}));
        assert_eq!(meta["tag"], json!([elsewhere, subsetted()]));

        // Without meta, one is created for the tag.
        let mut p = json!({"resourceType": "Patient", "gender": "female", "active": true});
        select("gender").apply("Patient", &mut p);
        assert_eq!(
            p,
            json!({"resourceType": "Patient", "gender": "female", "meta": {"tag": [subsetted()]}})
        );
        // Trimming twice changes nothing more.
        let again = p.clone();
        select("gender").apply("Patient", &mut p);
        assert_eq!(p, again);
    }

    /// A choice element is selected by its name without `[x]`, covering its typed form (and the
    /// form's primitive extension) but not another element that merely starts with the same
    /// letters.
    #[test]
    fn choice_elements() {
        let obs = || {
            json!({"resourceType": "Observation", "status": "final", "code": {},
                "valueString": "x", "_valueString": {"id": "e"}, "valuesomething": 3,
                "effectiveDateTime": "2020"})
        };
        for wanted in ["value", "Observation.value"] {
            let mut o = obs();
            select(wanted).apply("Observation", &mut o);
            let mut keys: Vec<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                vec![
                    "_valueString",
                    "code",
                    "meta",
                    "resourceType",
                    "status",
                    "valueString"
                ],
                "{wanted}"
            );
        }
    }
}
