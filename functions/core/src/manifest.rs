//! The completion manifest and the status progress line.

use crate::fhir::time::format_instant;
use crate::job::Job;
use crate::ports::PartRecord;
use serde_json::{Value, json};

/// Files listed on one manifest page. A manifest past it is paged (a `link` to the next page),
/// whether or not the client asked for `allowPartialManifests`: on AWS the status answer passes
/// through Lambda, whose responses stop at 6 MB, and an entry with a presigned URL (a session
/// token included) takes up to ~2 KB, so 1,000 entries stay near 2 MB.
pub const FILES_PER_MANIFEST_PAGE: usize = 1000;

/// Storage key of a part: `<job>/<type>/<partition>-<seq>.ndjson`. Deterministic, so a redone
/// work item overwrites its own files instead of adding copies.
pub fn part_key(job_id: &str, resource_type: &str, partition: u32, seq: u32) -> String {
    format!("{job_id}/{resource_type}/{partition:03}-{seq:04}.ndjson")
}

/// Storage key of a deleted-resources part of one type: `<job>/deleted-<type>/...`.
pub fn deleted_part_key(job_id: &str, resource_type: &str, partition: u32, seq: u32) -> String {
    part_key(job_id, &format!("deleted-{resource_type}"), partition, seq)
}

/// One line of a deleted-resources file: a transaction Bundle deleting `Type/id`.
pub fn deletion_bundle(resource_type: &str, id: &str) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": format!("{resource_type}/{id}")}}
    ]})
}

/// Orders parts as the manifest lists them: by type, then partition, then sequence.
pub fn sort_parts(parts: &mut [PartRecord]) {
    parts.sort_by(|a, b| {
        (&a.resource_type, key_order(&a.key)).cmp(&(&b.resource_type, key_order(&b.key)))
    });
}

/// A part key's folder, then its partition and sequence as numbers: the names pad them to 3 and
/// 4 digits, which a large export outgrows (`1000-0000` would sort between `100-…` and `101-…`).
/// Keys of another form (the error file) sort by name after those.
fn key_order(key: &str) -> (&str, Option<(u32, u32)>, &str) {
    let (folder, name) = key.rsplit_once('/').unwrap_or(("", key));
    let numbers = name
        .strip_suffix(".ndjson")
        .and_then(|n| n.split_once('-'))
        .and_then(|(partition, seq)| Some((partition.parse().ok()?, seq.parse().ok()?)));
    (folder, numbers, name)
}

/// The manifest of a job's parts; `urls[i]` is the download URL of `parts[i]`, `next` the URL of
/// the following manifest page (`allowPartialManifests`), and `requires_access_token` whether the
/// URLs need the client's token.
pub fn manifest(
    job: &Job,
    parts: &[PartRecord],
    urls: &[String],
    next: Option<&str>,
    requires_access_token: bool,
) -> Value {
    let entry = |(p, url): (&PartRecord, &String)| json!({"type": p.resource_type, "url": url, "count": p.count});
    let organized = job.params.organize_by.is_some();
    let output: Vec<Value> = parts
        .iter()
        .zip(urls)
        .filter(|(p, _)| !p.is_error && !p.is_deleted)
        .map(|(p, url)| {
            if !organized {
                return entry((p, url));
            }
            // Blocks mix types: no `type`; a block cut at the end of a file names the next file.
            let mut e = json!({"url": url, "count": p.count});
            if p.continues {
                let next = parts.iter().position(|n| {
                    n.item == p.item && n.seq == p.seq + 1 && !n.is_deleted && !n.is_error
                });
                if let Some(i) = next {
                    e["continuesInFile"] = json!(urls[i]);
                }
            }
            e
        })
        .collect();
    let deleted: Vec<Value> = parts
        .iter()
        .zip(urls)
        .filter(|(p, _)| p.is_deleted)
        .map(entry)
        .collect();
    let error: Vec<Value> = parts
        .iter()
        .zip(urls)
        .filter(|(p, _)| p.is_error)
        .map(entry)
        .collect();
    let mut manifest = json!({
        "transactionTime": format_instant(job.transaction_time),
        "request": job.request_url,
        "requiresAccessToken": requires_access_token,
        "output": output,
        "deleted": deleted,
        "error": error,
    });
    if let Some(by) = &job.params.organize_by {
        manifest["outputOrganizedBy"] = json!(by);
    }
    if let Some(next) = next {
        manifest["link"] = json!([{"relation": "next", "url": next}]);
    }
    manifest
}

/// The `X-Progress` value: short (under 100 characters) and human readable.
pub fn progress_line(job: &Job, items_done: usize, resources: u64) -> String {
    if job.items_total == 0 {
        return "planning export".to_string();
    }
    format!(
        "{items_done}/{} work items done, {resources} resources written",
        job.items_total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(resource_type: &str, key: String) -> PartRecord {
        PartRecord {
            job_id: "j".into(),
            key,
            resource_type: resource_type.into(),
            item: 0,
            seq: 0,
            count: 1,
            bytes: 1,
            is_error: false,
            is_deleted: false,
            continues: false,
        }
    }

    /// By type, then partition, then sequence, as numbers: past the padding of the names too.
    #[test]
    fn parts_sort_by_type_partition_and_sequence() {
        let want = [
            part("Bundle", deleted_part_key("j", "Condition", 0, 0)),
            part("Bundle", deleted_part_key("j", "Observation", 0, 0)),
            part("Condition", part_key("j", "Condition", 0, 0)),
            part("Condition", part_key("j", "Condition", 0, 1)),
            part("Condition", part_key("j", "Condition", 0, 9999)),
            part("Condition", part_key("j", "Condition", 0, 10000)),
            part("Condition", part_key("j", "Condition", 0, 10001)),
            part("Condition", part_key("j", "Condition", 1, 0)),
            part(
                "OperationOutcome",
                "j/OperationOutcome/error-0000.ndjson".into(),
            ),
            part("Patient", part_key("j", "by-Patient", 99, 3)),
            part("Patient", part_key("j", "by-Patient", 100, 0)),
            part("Patient", part_key("j", "by-Patient", 999, 0)),
            part("Patient", part_key("j", "by-Patient", 1000, 0)),
            part("Patient", part_key("j", "by-Patient", 1001, 0)),
        ];
        let mut parts = want.to_vec();
        parts.reverse();
        parts.swap(2, 9);
        sort_parts(&mut parts);
        let keys = |p: &[PartRecord]| p.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&parts), keys(&want));
    }
}
