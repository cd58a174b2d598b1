//! Finishing an import job: once every registered chunk is done, the error parts become one
//! error file with each line numbered in its object (a chunk only knows its own lines; the
//! lines of the chunks before it are known once they are done), and the job gets its status and
//! final counts.
//!
//! Whichever chunk finishes last does this; two finishing at once write the same file.

use super::records::{COMPLETED, FAILED, Summary, number};
use super::{ERRORS_PREFIX, Importer};
use crate::dynamo::get_s;
use export_core::load::FileKind;
use serde_json::Value;
use std::collections::BTreeMap;

/// The key of a job's error file.
pub fn error_file_key(id: &str) -> String {
    format!("{ERRORS_PREFIX}{id}/errors.ndjson")
}

/// Finishes the job if all its chunks are done.
pub async fn maybe_finish(importer: &Importer, id: &str) -> Result<(), String> {
    let records = &importer.records;
    let Some(job) = records.job(id).await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let total = number(&job, "chunks");
    let status = get_s(&job, "status").unwrap_or_default();
    if (status == COMPLETED || status == FAILED) && number(&job, "finished_chunks") == total {
        return Ok(());
    }
    let chunks = records.chunks(id).await.map_err(|e| e.to_string())?;
    if (chunks.iter().filter(|c| c.state.done).count() as u64) < total {
        return Ok(());
    }
    // Files by key (then version), their chunks in order.
    let mut files: BTreeMap<(String, String), Vec<_>> = BTreeMap::new();
    for chunk in &chunks {
        files
            .entry((chunk.key.clone(), chunk.file_id.clone()))
            .or_default()
            .push(chunk);
    }
    let mut errors = Vec::new();
    for ((key, _), mut file_chunks) in files {
        file_chunks.sort_by_key(|c| c.index);
        let numbered = FileKind::of(&key) == Some(FileKind::Ndjson);
        let mut lines_before = 0;
        for chunk in file_chunks {
            if chunk.state.errors > 0 {
                let prefix = format!(
                    "{ERRORS_PREFIX}{id}/parts/{}/{:06}/",
                    chunk.file_id, chunk.index
                );
                for part in list(importer, &prefix).await? {
                    for mut record in read_lines(importer, &part).await? {
                        if numbered && let Some(line) = record["line"].as_u64() {
                            record["line"] = (line + lines_before).into();
                        }
                        errors.push(record);
                    }
                }
            }
            lines_before += chunk.state.lines;
        }
    }
    let key = error_file_key(id);
    super::process::put_lines(importer, &key, &errors).await?;
    let summary = Summary::of(&chunks);
    let finished = records
        .finish(
            id,
            total,
            &summary,
            &format!("s3://{}/{key}", importer.settings.bucket),
            chrono::Utc::now().timestamp_millis(),
        )
        .await
        .map_err(|e| e.to_string())?;
    if finished {
        tracing::info!(import_id = %id, lines = summary.lines, written = summary.written,
            unchanged = summary.unchanged, errors = summary.errors, failed = summary.failed,
            "import finished");
    }
    Ok(())
}

/// The keys under `prefix`, in key order (error parts are named by their first line).
async fn list(importer: &Importer, prefix: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = importer
            .s3
            .list_objects_v2()
            .bucket(&importer.settings.bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| format!("s3: {e:?}"))?;
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match out.next_continuation_token() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    keys.sort();
    Ok(keys)
}

async fn read_lines(importer: &Importer, key: &str) -> Result<Vec<Value>, String> {
    let body = importer
        .s3
        .get_object()
        .bucket(&importer.settings.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| format!("s3: {e:?}"))?
        .body
        .collect()
        .await
        .map_err(|e| format!("s3 body: {e}"))?
        .into_bytes();
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| format!("error part {key}: {e}")))
        .collect()
}
