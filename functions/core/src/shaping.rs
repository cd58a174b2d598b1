//! What an export does to each resource between the store and the NDJSON file: `_typeFilter`
//! decides whether it is exported, `_elements` what is left of it. Types that neither touches are
//! copied byte for byte, without parsing.

use crate::elements::ElementSelection;
use crate::error::StoreResult;
use crate::params::ExportParams;
use crate::type_filter::TypeFilters;
use bytes::Bytes;
use serde_json::Value;

/// The per-resource rules of one export.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    filters: TypeFilters,
    elements: ElementSelection,
}

impl Shaping {
    pub fn new(params: &ExportParams) -> Shaping {
        Shaping {
            filters: params.compiled_type_filters(),
            elements: params.element_selection(),
        }
    }

    /// Whether resources of `resource_type` need to be parsed at all.
    pub fn touches(&self, resource_type: &str) -> bool {
        self.filters.filters(resource_type) || self.elements.trims(resource_type)
    }

    /// The line to export for one stored resource, or `None` when the filter leaves it out.
    pub fn shape(&self, resource_type: &str, json: Bytes) -> StoreResult<Option<Bytes>> {
        if !self.touches(resource_type) {
            return Ok(Some(json));
        }
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
