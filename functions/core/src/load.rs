//! Reading FHIR data files for import: NDJSON (`.ndjson`, `.ndjson.gz`) and JSON (`.json`,
//! `.json.gz`: a Bundle of type collection, transaction or batch, or a single resource).
//!
//! Each resource is checked and prepared ([`prepare`]); a bad line or entry becomes a
//! [`LoadIssue`] with its file and line, and everything else still loads.

use crate::fhir::compartment::patients_of;
use crate::fhir::time::{Instant, format_instant, parse_instant};
use crate::fhir::{is_resource_type, reference};
use crate::ports::NewResource;
use flate2::read::MultiGzDecoder;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A line or entry that could not be loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadIssue {
    /// `file:line` for NDJSON, `file:entry[i]` for Bundles.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for LoadIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The data files below `paths` (a directory contributes its supported files, sorted).
pub fn data_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_data_file(p))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn is_data_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    FileKind::of(name).is_some()
}

/// The kinds of data file an import reads, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.ndjson`: one resource per line.
    Ndjson,
    /// `.ndjson.gz`.
    NdjsonGz,
    /// `.json`: a Bundle (collection, transaction, batch) or one resource.
    Json,
    /// `.json.gz`.
    JsonGz,
}

impl FileKind {
    /// The kind of a file name, or `None` if it is not a data file.
    pub fn of(name: &str) -> Option<FileKind> {
        [
            (".ndjson", FileKind::Ndjson),
            (".ndjson.gz", FileKind::NdjsonGz),
            (".json", FileKind::Json),
            (".json.gz", FileKind::JsonGz),
        ]
        .into_iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, kind)| kind)
    }

    pub fn is_gzip(self) -> bool {
        matches!(self, FileKind::NdjsonGz | FileKind::JsonGz)
    }

    /// One resource per line (so a file can be split at line boundaries).
    pub fn is_ndjson(self) -> bool {
        matches!(self, FileKind::Ndjson | FileKind::NdjsonGz)
    }
}

/// Reads one file, handing every good resource to `sink` and every bad one to `issues`.
pub fn read_file(
    path: &Path,
    now: Instant,
    sink: &mut dyn FnMut(NewResource),
    issues: &mut dyn FnMut(LoadIssue),
) -> std::io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let display = path.display().to_string();
    let kind = FileKind::of(&name).unwrap_or(FileKind::Json);
    let file = File::open(path)?;
    let reader: Box<dyn Read> = if kind.is_gzip() {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let reader = BufReader::with_capacity(1 << 20, reader);
    if kind.is_ndjson() {
        read_ndjson(reader, &display, now, sink, issues)
    } else {
        read_json(reader, &display, now, sink, issues)
    }
}

/// One NDJSON line (not blank): the resource it holds, or why it cannot be loaded.
pub fn parse_line(line: &str, now: Instant) -> Result<NewResource, String> {
    match serde_json::from_str::<Value>(line) {
        Ok(value) => prepare(value, now),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

fn read_ndjson(
    mut reader: impl BufRead,
    file: &str,
    now: Instant,
    sink: &mut dyn FnMut(NewResource),
    issues: &mut dyn FnMut(LoadIssue),
) -> std::io::Result<()> {
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, now) {
            Ok(resource) => sink(resource),
            Err(message) => issues(LoadIssue {
                location: format!("{file}:{number}"),
                message,
            }),
        }
    }
}

/// Reads a JSON file (a Bundle or one resource) named `file` in locations. Every entry gives
/// exactly one call of `sink` or `issues`, in order, so a reader can resume after `n` of them.
pub fn read_json(
    reader: impl Read,
    file: &str,
    now: Instant,
    sink: &mut dyn FnMut(NewResource),
    issues: &mut dyn FnMut(LoadIssue),
) -> std::io::Result<()> {
    let value: Value = match serde_json::from_reader(reader) {
        Ok(v) => v,
        Err(e) => {
            let location = format!("{file}:{}", e.line());
            issues(LoadIssue {
                location,
                message: format!("not valid JSON: {e}"),
            });
            return Ok(());
        }
    };
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        match prepare(value, now) {
            Ok(resource) => sink(resource),
            Err(message) => issues(LoadIssue {
                location: file.to_string(),
                message,
            }),
        }
        return Ok(());
    }
    let bundle_type = value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !matches!(
        bundle_type.as_str(),
        "collection"
            | "transaction"
            | "batch"
            | "searchset"
            | "transaction-response"
            | "batch-response"
    ) {
        let message = format!(
            "Bundle type '{bundle_type}' cannot be loaded (use collection, transaction or batch)"
        );
        issues(LoadIssue {
            location: file.to_string(),
            message,
        });
        return Ok(());
    }
    let mut entries = match value {
        Value::Object(mut map) => match map.remove("entry") {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let renames = assign_bundle_ids(&mut entries);
    for (i, entry) in entries.into_iter().enumerate() {
        let location = format!("{file}:entry[{i}]");
        let method = entry
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("PUT")
            .to_ascii_uppercase();
        if method == "DELETE" {
            let url = entry.pointer("/request/url").and_then(Value::as_str);
            match url.and_then(reference::target_of) {
                Some((t, id)) if is_resource_type(t) && is_valid_id(id) => {
                    sink(deletion(t, id, now));
                }
                _ => issues(LoadIssue {
                    location,
                    message: format!(
                        "DELETE request.url {} is not Type/id",
                        url.unwrap_or("(missing)")
                    ),
                }),
            }
            continue;
        }
        if !matches!(method.as_str(), "PUT" | "POST") {
            issues(LoadIssue {
                location,
                message: format!(
                    "request.method {method} is not loaded (only PUT, POST and DELETE)"
                ),
            });
            continue;
        }
        let Some(mut resource) = entry.get("resource").cloned() else {
            issues(LoadIssue {
                location,
                message: "entry has no resource".into(),
            });
            continue;
        };
        if !renames.is_empty() {
            rewrite_references(&mut resource, &renames);
        }
        match prepare(resource, now) {
            Ok(resource) => sink(resource),
            Err(message) => issues(LoadIssue { location, message }),
        }
    }
    Ok(())
}

/// Gives Bundle entries without an id one (from a `urn:uuid:` fullUrl or a `PUT Type/id` request)
/// and returns the map from each fullUrl to its new `Type/id`, so references can be rewritten.
fn assign_bundle_ids(entries: &mut [Value]) -> HashMap<String, String> {
    let mut renames = HashMap::new();
    for entry in entries.iter_mut() {
        let full_url = entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(String::from);
        let request_url = entry
            .pointer("/request/url")
            .and_then(Value::as_str)
            .map(String::from);
        let Some(resource) = entry.get_mut("resource").and_then(Value::as_object_mut) else {
            continue;
        };
        let Some(resource_type) = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .map(String::from)
        else {
            continue;
        };
        if resource.get("id").is_none() {
            let from_request = request_url
                .as_deref()
                .and_then(reference::target_of)
                .filter(|(t, _)| *t == resource_type)
                .map(|(_, id)| id.to_string());
            let from_uuid = full_url
                .as_deref()
                .and_then(|u| u.strip_prefix("urn:uuid:"))
                .map(String::from);
            if let Some(id) = from_request.or(from_uuid) {
                resource.insert("id".into(), Value::String(id));
            }
        }
        if let (Some(url), Some(id)) = (full_url, resource.get("id").and_then(Value::as_str)) {
            renames.insert(url, format!("{resource_type}/{id}"));
        }
    }
    renames
}

fn rewrite_references(value: &mut Value, renames: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "reference"
                    && let Value::String(r) = child
                    && let Some(new) = renames.get(r.as_str())
                {
                    *r = new.clone();
                } else {
                    rewrite_references(child, renames);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, renames)),
        _ => {}
    }
}

/// A deletion of `resource_type/id` at `now`: a version that marks the resource deleted. The
/// store gives it the compartments of the version it deletes.
pub fn deletion(resource_type: &str, id: &str, now: Instant) -> NewResource {
    NewResource {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        last_updated: now,
        json: serde_json::json!({"resourceType": resource_type, "id": id,
            "meta": {"lastUpdated": format_instant(now)}}),
        patients: Vec::new(),
        deleted: true,
    }
}

/// Checks a resource and fills in what the store needs: `meta.lastUpdated` (set to `now` when
/// missing) and its compartment patients.
pub fn prepare(value: Value, now: Instant) -> Result<NewResource, String> {
    let Value::Object(mut map) = value else {
        return Err("not a JSON object".into());
    };
    let resource_type = match map.get("resourceType") {
        Some(Value::String(t)) if is_resource_type(t) => t.clone(),
        Some(Value::String(t)) => return Err(format!("'{t}' is not an R4 resource type")),
        _ => return Err("missing resourceType".into()),
    };
    let id = match map.get("id") {
        Some(Value::String(id)) if is_valid_id(id) => id.clone(),
        Some(other) => return Err(format!("{resource_type}: invalid id {other}")),
        None => return Err(format!("{resource_type} has no id")),
    };
    let meta = map
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(meta) = meta else {
        return Err(format!("{resource_type}/{id}: meta is not an object"));
    };
    let last_updated = match meta.get("lastUpdated").and_then(Value::as_str) {
        Some(text) => parse_instant(text)
            .map_err(|e| format!("{resource_type}/{id}: meta.lastUpdated: {e}"))?,
        None => {
            meta.insert("lastUpdated".into(), Value::String(format_instant(now)));
            now
        }
    };
    let json = Value::Object(map);
    let patients = patients_of(&json);
    Ok(NewResource {
        resource_type,
        id,
        last_updated,
        json,
        patients,
        deleted: false,
    })
}

/// A FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::time::now_millis;
    use serde_json::json;

    #[test]
    fn prepare_sets_last_updated_and_compartments() {
        let r = prepare(
            json!({"resourceType":"Observation","id":"o","subject":{"reference":"Patient/p"}}),
            now_millis(),
        )
        .unwrap();
        assert!(r.json.pointer("/meta/lastUpdated").is_some());
        assert_eq!(r.patients, vec!["p"]);
        assert!(prepare(json!({"resourceType":"Nope","id":"o"}), now_millis()).is_err());
        assert!(prepare(json!({"resourceType":"Patient"}), now_millis()).is_err());
        assert!(
            prepare(
                json!({"resourceType":"Patient","id":"bad id"}),
                now_millis()
            )
            .is_err()
        );
        assert!(prepare(json!([1]), now_millis()).is_err());
    }

    #[test]
    fn transaction_bundles_get_ids_and_resolved_references() {
        let bundle = json!({"resourceType":"Bundle","type":"transaction","entry":[
            {"fullUrl":"urn:uuid:aaaa-1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
            {"fullUrl":"urn:uuid:bbbb-2","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:aaaa-1"}},"request":{"method":"POST","url":"Observation"}},
            {"resource":{"resourceType":"Condition","subject":{"reference":"Patient/aaaa-1"}},"request":{"method":"PUT","url":"Condition/c9"}},
            {"request":{"method":"DELETE","url":"Patient/x"}},
            {"request":{"method":"DELETE","url":"Patient?name=x"}},
            {"request":{"method":"PATCH","url":"Patient/x"}}
        ]});
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        read_json(
            bundle.to_string().as_bytes(),
            "b.json",
            now_millis(),
            &mut |r| loaded.push(r),
            &mut |i| problems.push(i),
        )
        .unwrap();
        assert_eq!(loaded.len(), 4);
        assert_eq!(loaded[1].patients, vec!["aaaa-1"]);
        assert_eq!(loaded[2].id, "c9");
        assert!(loaded[3].deleted && loaded[3].id == "x" && loaded[3].resource_type == "Patient");
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].location, "b.json:entry[4]");
        assert_eq!(problems[1].location, "b.json:entry[5]");
    }
}
