//! What an export does to each resource between the store and the NDJSON file: `_typeFilter`
//! decides whether it is exported, `_elements` what is left of it. Types that neither touches are
//! copied byte for byte, without parsing.

use crate::elements::ElementSelection;
use crate::error::StoreResult;
use crate::fhir::fhirpath::names_member;
use crate::fhir::members::members;
use crate::params::ExportParams;
use crate::type_filter::TypeFilters;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The per-resource rules of one export.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    filters: TypeFilters,
    elements: ElementSelection,
    /// Per filtered type, the top-level elements its filters read (`None`: the whole resource).
    read: BTreeMap<String, Option<Vec<String>>>,
}

impl Shaping {
    pub fn new(params: &ExportParams) -> Shaping {
        let filters = params.compiled_type_filters();
        let read = filters
            .types()
            .map(|t| {
                let names = filters
                    .elements_read(t)
                    .map(|names| names.into_iter().map(String::from).collect());
                (t.to_string(), names)
            })
            .collect();
        Shaping {
            filters,
            elements: params.element_selection(),
            read,
        }
    }

    /// Whether resources of `resource_type` need to be parsed at all.
    pub fn touches(&self, resource_type: &str) -> bool {
        self.filters.filters(resource_type) || self.elements.trims(resource_type)
    }

    /// The line to export for one stored resource, or `None` when the filter leaves it out.
    /// Only the members the filter reads are parsed, and `_elements` copies the kept members'
    /// bytes (see [`crate::fhir::members`]); a resource the scanner cannot read exactly is parsed
    /// whole.
    pub fn shape(&self, resource_type: &str, json: Bytes) -> StoreResult<Option<Bytes>> {
        if !self.touches(resource_type) {
            return Ok(Some(json));
        }
        if !self.filters.may_match_text(resource_type, &json) {
            return Ok(None);
        }
        let Some(found) = members(&json) else {
            return self.shape_parsed(resource_type, json);
        };
        if let Some(read) = self.read.get(resource_type) {
            let Some(names) = read else {
                return self.shape_parsed(resource_type, json);
            };
            if !self.filters.may_match(resource_type, &found) {
                return Ok(None);
            }
            let mut partial = Map::new();
            for (key, value) in &found {
                if names.iter().any(|name| names_member(name, key)) {
                    partial.insert(key.to_string(), serde_json::from_slice(value)?);
                }
            }
            if !self.filters.matches(resource_type, &Value::Object(partial)) {
                return Ok(None);
            }
        }
        if !self.elements.trims(resource_type) {
            return Ok(Some(json));
        }
        let trimmed = self.elements.trim_members(resource_type, &found)?;
        Ok(Some(Bytes::from(trimmed)))
    }

    /// [`Shaping::shape`] by parsing the whole resource.
    fn shape_parsed(&self, resource_type: &str, json: Bytes) -> StoreResult<Option<Bytes>> {
        let mut resource: Value = serde_json::from_slice(&json)?;
        if !self.filters.matches(resource_type, &resource) {
            return Ok(None);
        }
        if !self.elements.trims(resource_type) {
            return Ok(Some(json));
        }
        self.elements.apply(resource_type, &mut resource);
        Ok(Some(Bytes::from(serde_json::to_vec(&resource)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes `resource` both ways: by members and by parsing it whole (the rule as written first).
    fn both(params: &ExportParams, resource: &str) -> (Option<Bytes>, Option<Bytes>) {
        let shaping = Shaping::new(params);
        let json = Bytes::from(resource.to_string());
        let fast = shaping.shape("Observation", json.clone()).unwrap();
        let whole = shaping.shape_parsed("Observation", json).unwrap();
        (fast, whole)
    }

    #[test]
    fn shaping_by_members_gives_the_bytes_of_a_whole_parse() {
        let observations = [
            r#"{"resourceType":"Observation","id":"a","meta":{"lastUpdated":"2024-01-01T00:00:00Z"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/p"},"effectiveDateTime":"2023-05-01","valueQuantity":{"value":72.5,"unit":"/min"}}"#,
            r#"{"resourceType":"Observation","id":"b","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}],"text":"glucose \"fasting\""},"effectivePeriod":{"start":"2021-01-01"},"_status":{"extension":[]}}"#,
            r#"{"resourceType":"Observation","id":"c","meta":{"tag":[{"system":"x","code":"y"}]},"status":"preliminary","code":{"text":"none"},"issued":"2022-03-01T10:00:00Z"}"#,
            // A code stored with escapes: its bytes do not hold the text `say "hi"`.
            r#"{"resourceType":"Observation","id":"d","status":"final","code":{"coding":[{"code":"say \"hi\""}]},"effectiveDateTime":"2023-01-01"}"#,
        ];
        let cases = [
            ExportParams {
                type_filters: vec![
                    "Observation?code=http://loinc.org|8867-4,2339-0&date=ge2022".into(),
                ],
                ..ExportParams::default()
            },
            ExportParams {
                type_filters: vec![r#"Observation?code=say "hi""#.into()],
                ..ExportParams::default()
            },
            ExportParams {
                type_filters: vec!["Observation?status:not=final".into()],
                ..ExportParams::default()
            },
            ExportParams {
                elements: vec!["Observation.value,subject".into()],
                ..ExportParams::default()
            },
            ExportParams {
                type_filters: vec!["Observation?value-quantity=gt70".into()],
                elements: vec!["status".into()],
                ..ExportParams::default()
            },
        ];
        let mut kept = 0;
        let mut kept_by_filter = Vec::new();
        for params in &cases {
            for observation in observations {
                let (fast, whole) = both(params, observation);
                assert_eq!(fast, whole, "{params:?} {observation}");
                kept += fast.is_some() as usize;
                kept_by_filter.push(fast.is_some());
            }
        }
        // The code stored with escapes is kept by its filter.
        assert!(kept_by_filter[observations.len() + 3], "escaped code");
        // The cases keep some and leave some out, so both outcomes are compared.
        assert!(
            kept > 0 && kept < cases.len() * observations.len(),
            "{kept}"
        );
    }

    /// Where the stored text of a value is not the code it matches (escapes), the test on the
    /// bytes must let the resource through to be parsed.
    #[test]
    fn the_byte_test_keeps_what_only_parsing_can_match() {
        for (filter, observation) in [
            (
                "Observation?code=8867-4",
                r#"{"resourceType":"Observation","id":"f","code":{"coding":[{"code":"8867\u002d4"}]}}"#,
            ),
            (
                "Observation?code=http://loinc.org|8867-4",
                r#"{"resourceType":"Observation","id":"g","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]}}"#,
            ),
        ] {
            let params = ExportParams {
                type_filters: vec![filter.into()],
                ..ExportParams::default()
            };
            let (fast, whole) = both(&params, observation);
            assert!(whole.is_some(), "{filter} matches {observation}");
            assert_eq!(fast, whole, "{filter} {observation}");
        }
    }
}
