//! Which resources of a batch are new versions. The store numbers versions as the loader always
//! has (`meta.versionId` = the current version + 1, whatever the input says) and itself leaves out
//! a version whose content hash equals the current one's (`resources/write.rs`), so a repeated
//! batch adds nothing even when two invocations race. The importer reads the current versions
//! first for two more things: to count what it leaves out (the job's figures), and to treat a
//! resource that had no `meta.lastUpdated` as unchanged when only the time filled in differs (the
//! same data put again in another object, whose put time is later).
//!
//! Content is compared without `meta.versionId` (the store's), and without `meta.lastUpdated`
//! when the input had none.

use export_core::StoreResult;
use export_core::fhir::time::Instant;
use export_core::ports::{NewResource, ResourceStore};
use serde_json::Value;
use std::collections::HashMap;

/// A resource's content for comparison.
fn content(json: &Value, filled_last_updated: bool) -> Value {
    let mut json = json.clone();
    if let Some(meta) = json.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        if filled_last_updated {
            meta.remove("lastUpdated");
        }
        if meta.is_empty() {
            json.as_object_mut().expect("object").remove("meta");
        }
    }
    json
}

/// Splits `batch` into the resources to write (in order) and the number left out as unchanged.
/// `filled_at` is the `meta.lastUpdated` given to resources that had none.
pub async fn new_versions(
    store: &dyn ResourceStore,
    batch: Vec<NewResource>,
    filled_at: Instant,
) -> StoreResult<(Vec<NewResource>, u64)> {
    let targets: Vec<(String, String)> = batch
        .iter()
        .map(|r| (r.resource_type.clone(), r.id.clone()))
        .collect();
    // Far in the future: the current version, whatever lastUpdated the data carries.
    let as_of = export_core::fhir::time::from_micros(253_402_300_799_000_000); // 9999-12-31
    let current = store.resources_at(&targets, as_of).await?;
    // The latest version of each resource, as the batch goes on: the stored one, then the batch's.
    let mut latest: HashMap<(String, String), Option<Value>> = HashMap::new();
    for (target, version) in targets.into_iter().zip(current) {
        let stored = version.and_then(|v| serde_json::from_slice::<Value>(&v.json).ok());
        latest.entry(target).or_insert(stored);
    }
    let mut keep = Vec::with_capacity(batch.len());
    let mut unchanged = 0;
    for resource in batch {
        let key = (resource.resource_type.clone(), resource.id.clone());
        let previous = latest.get(&key).cloned().flatten();
        if resource.deleted {
            // The store leaves out deletions of what does not exist or is deleted already.
            latest.insert(key, None);
            keep.push(resource);
            continue;
        }
        let filled = resource.last_updated == filled_at;
        let same = previous
            .as_ref()
            .is_some_and(|p| content(p, filled) == content(&resource.json, filled));
        if same {
            unchanged += 1;
        } else {
            latest.insert(key, Some(resource.json.clone()));
            keep.push(resource);
        }
    }
    Ok((keep, unchanged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_ignores_the_store_version_and_a_filled_in_time() {
        let stored = json!({"resourceType":"Patient","id":"p","meta":{"versionId":"3","lastUpdated":"2026-01-01T00:00:00.000Z"}});
        let input = json!({"resourceType":"Patient","id":"p","meta":{"lastUpdated":"2026-02-01T00:00:00.000Z"}});
        assert_eq!(content(&stored, true), content(&input, true));
        assert_ne!(content(&stored, false), content(&input, false));
        let other = json!({"resourceType":"Patient","id":"p","active":true});
        assert_ne!(content(&stored, true), content(&other, true));
    }
}
