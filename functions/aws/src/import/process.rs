//! Importing one chunk: read a batch of units, write the new versions among them, put the
//! batch's errors in an error part, then record the chunk's progress, batch after batch.
//!
//! Writes come before the progress that covers them, so a crash repeats at most the last batch,
//! whose resources are then unchanged versions ([`super::identity`]) and whose error part is
//! rewritten under the same key; nothing is lost and nothing is added twice. Near the Lambda
//! deadline the chunk hands over to a new invocation with the same message.

use super::event::{ChunkMessage, chunk_body};
use super::reader::{ChunkReader, Location, REPLACED, ReadError, Resume, Unit};
use super::records::ChunkState;
use super::{ERRORS_PREFIX, Importer, finish, identity};
use export_core::fhir::time::from_micros;
use export_core::ports::ResourceStore;
use serde_json::{Value, json};
use std::time::Instant;

/// How a chunk's invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The chunk is done (now or before).
    Done,
    /// Time ran short: the same message was queued to go on from the recorded progress.
    Continued,
    /// Another invocation of the same chunk recorded progress first; it goes on.
    Overtaken,
}

/// The key prefix of a chunk's error parts.
pub fn parts_prefix(message: &ChunkMessage) -> String {
    format!(
        "{ERRORS_PREFIX}{}/parts/{}/{:06}/",
        message.import_id, message.file_id, message.index
    )
}

/// An error record of the error file.
fn error_record(key: &str, location: &Location, message: &str) -> Value {
    match location {
        Location::Line(line) => json!({"file": key, "line": line, "message": message}),
        Location::Entry(entry) => json!({"file": key, "entry": entry, "message": message}),
        Location::File => json!({"file": key, "message": message}),
    }
}

/// Imports chunk `message` from its recorded progress, until it is done or `deadline` is near.
pub async fn run_chunk(
    importer: &Importer,
    message: &ChunkMessage,
    deadline: Instant,
) -> Result<ChunkOutcome, String> {
    let records = &importer.records;
    let mut previous = records.chunk(message).await.map_err(|e| e.to_string())?;
    if previous.as_ref().is_some_and(|s| s.done) {
        // A redelivery, or a crash before the job was finished: only the finishing is left.
        finish::maybe_finish(importer, &message.import_id).await?;
        return Ok(ChunkOutcome::Done);
    }
    let now = from_micros(message.time_ms * 1000);
    let mut state = previous.clone().unwrap_or(ChunkState {
        offset: message.start,
        ..ChunkState::default()
    });
    let resume = Resume {
        units: state.lines,
        offset: state.offset,
    };
    let mut reader = match ChunkReader::open(&importer.s3, message, resume, now).await {
        Ok(reader) => reader,
        Err(ReadError::Permanent(why)) => return give_up(importer, message, why).await,
        Err(ReadError::Transient(e)) => return Err(e),
    };
    loop {
        if Instant::now() + importer.settings.reserve >= deadline {
            continue_later(importer, message).await?;
            return Ok(ChunkOutcome::Continued);
        }
        let mut next = state.clone();
        let first_line = next.lines + 1;
        let mut resources = Vec::new();
        let mut issues = Vec::new();
        let mut end = false;
        for _ in 0..importer.settings.batch.max(1) {
            let unit = match reader.next().await {
                Ok(Some(unit)) => unit,
                Ok(None) => {
                    end = true;
                    break;
                }
                Err(ReadError::Permanent(why)) => return give_up(importer, message, why).await,
                Err(ReadError::Transient(e)) => return Err(e),
            };
            next.lines += 1;
            match unit {
                Unit::Resource(resource) => resources.push(resource),
                Unit::BadLine(why) => issues.push(error_record(
                    &message.key,
                    &Location::Line(next.lines),
                    &why,
                )),
                Unit::Issue {
                    location,
                    message: why,
                } => issues.push(error_record(&message.key, &location, &why)),
                Unit::Blank => {}
            }
        }
        next.offset = reader.offset();
        let (new, unchanged) = identity::new_versions(&importer.store, resources, now)
            .await
            .map_err(|e| e.to_string())?;
        next.written += new.len() as u64;
        next.unchanged += unchanged;
        if !new.is_empty() {
            importer
                .store
                .put_resources(new)
                .await
                .map_err(|e| e.to_string())?;
        }
        if !issues.is_empty() {
            next.errors += issues.len() as u64;
            let key = format!("{}{first_line:012}.ndjson", parts_prefix(message));
            put_lines(importer, &key, &issues).await?;
        }
        next.done = end;
        if !records
            .save_chunk(message, previous.as_ref(), &next)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(ChunkOutcome::Overtaken);
        }
        previous = Some(next.clone());
        state = next;
        if end {
            break;
        }
    }
    finish::maybe_finish(importer, &message.import_id).await?;
    Ok(ChunkOutcome::Done)
}

/// Ends a chunk that cannot be imported: the reason goes into the error file, and the job fails
/// (unless the object was replaced, whose newer version is imported by its own event).
pub async fn give_up(
    importer: &Importer,
    message: &ChunkMessage,
    why: &str,
) -> Result<ChunkOutcome, String> {
    let records = &importer.records;
    let previous = records.chunk(message).await.map_err(|e| e.to_string())?;
    if previous.as_ref().is_some_and(|s| s.done) {
        return Ok(ChunkOutcome::Done);
    }
    let mut state = previous.clone().unwrap_or_default();
    let key = format!("{}failure.ndjson", parts_prefix(message));
    put_lines(
        importer,
        &key,
        &[error_record(&message.key, &Location::File, why)],
    )
    .await?;
    state.errors += 1;
    state.done = true;
    if why != REPLACED {
        state.failure = Some(why.to_string());
    }
    tracing::warn!(import_id = %message.import_id, chunk = message.index, reason = why, "import chunk given up");
    if !records
        .save_chunk(message, previous.as_ref(), &state)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(ChunkOutcome::Overtaken);
    }
    finish::maybe_finish(importer, &message.import_id).await?;
    Ok(ChunkOutcome::Done)
}

/// Queues the same chunk message again (its progress is recorded).
pub async fn continue_later(importer: &Importer, message: &ChunkMessage) -> Result<(), String> {
    importer
        .sqs
        .send_message()
        .queue_url(&importer.settings.queue_url)
        .message_body(chunk_body(message))
        .send()
        .await
        .map_err(|e| format!("sqs: {e:?}"))?;
    Ok(())
}

/// Writes JSON values as an NDJSON object of the import bucket.
pub async fn put_lines(importer: &Importer, key: &str, lines: &[Value]) -> Result<(), String> {
    let mut body = Vec::new();
    for line in lines {
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    importer
        .s3
        .put_object()
        .bucket(&importer.settings.bucket)
        .key(key)
        .content_type("application/x-ndjson")
        .body(body.into())
        .send()
        .await
        .map_err(|e| format!("s3: {e:?}"))?;
    Ok(())
}
