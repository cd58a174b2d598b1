//! The importer Lambda's handler: S3 events register objects and queue their chunks; chunk
//! messages import. Its own queue (S3 notifications and chunk messages), so it shares nothing
//! with the export's work and coordinator queues.

use super::Importer;
use super::chunks::plan;
use super::event::{self, ChunkMessage, ImportMessage, PutObject, chunk_body, file_id, import_id};
use super::process::{ChunkOutcome, give_up, run_chunk};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use export_core::load::FileKind;
use std::time::Instant;

/// SQS → imports. Returns the messages to retry.
pub async fn importer(importer: &Importer, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    for record in event.records {
        if let Err(e) = handle(importer, &record, deadline).await {
            tracing::error!(error = %e, message = ?record.message_id, "import message will be retried");
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = record.message_id.clone().unwrap_or_default();
            response.batch_item_failures.push(failure);
        }
    }
    response
}

async fn handle(importer: &Importer, record: &SqsMessage, deadline: Instant) -> Result<(), String> {
    let body = record.body.as_deref().unwrap_or("");
    let message = match event::parse(body) {
        Ok(message) => message,
        Err(e) => {
            // Retrying cannot fix it.
            tracing::error!(error = %e, "discarding a malformed import message");
            return Ok(());
        }
    };
    match message {
        ImportMessage::Test => Ok(()),
        ImportMessage::Objects(objects) => {
            for object in objects {
                register(importer, &object).await?;
            }
            Ok(())
        }
        ImportMessage::Chunk(chunk) => {
            let started = Instant::now();
            let outcome = match run_chunk(importer, &chunk, deadline).await {
                Ok(outcome) => outcome,
                Err(e) if attempts(record) >= importer.settings.max_attempts => {
                    tracing::error!(import_id = %chunk.import_id, chunk = chunk.index, error = %e, "import chunk keeps failing");
                    give_up(
                        importer,
                        &chunk,
                        "the chunk kept failing; see the importer's log",
                    )
                    .await?
                }
                Err(e) => return Err(e),
            };
            tracing::info!(import_id = %chunk.import_id, chunk = chunk.index,
                outcome = ?outcome, duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "import chunk");
            let _: ChunkOutcome = outcome;
            Ok(())
        }
    }
}

/// How often SQS has delivered this message.
fn attempts(record: &SqsMessage) -> u32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// Registers an object with its import job and queues its chunks. A repeated event registers
/// nothing twice and queues the chunks again, which resume or find themselves done.
pub async fn register(importer: &Importer, object: &PutObject) -> Result<(), String> {
    if object.bucket != importer.settings.bucket {
        tracing::warn!("ignoring an object of a bucket that is not the import bucket");
        return Ok(());
    }
    let (Some(id), Some(kind)) = (import_id(&object.key), FileKind::of(&object.key)) else {
        tracing::warn!(
            "ignoring an object that is not import/<name>/<file>.(ndjson|ndjson.gz|json|json.gz)"
        );
        return Ok(());
    };
    let chunks: Vec<ChunkMessage> = plan(object.size, kind, importer.settings.chunk_bytes)
        .into_iter()
        .map(|c| ChunkMessage {
            import_id: id.to_string(),
            bucket: object.bucket.clone(),
            key: object.key.clone(),
            etag: object.etag.clone(),
            file_id: file_id(&object.key, &object.etag),
            size: object.size,
            index: c.index,
            start: c.start,
            end: c.end,
            time_ms: object.time_ms,
        })
        .collect();
    let new = importer
        .records
        .register_file(id, &chunks[0], chunks.len() as u32, object.time_ms)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(import_id = %id, chunks = chunks.len(), new, "import object registered");
    for batch in chunks.chunks(10) {
        let entries = batch
            .iter()
            .map(|c| {
                SendMessageBatchRequestEntry::builder()
                    .id(c.index.to_string())
                    .message_body(chunk_body(c))
                    .build()
                    .map_err(|e| format!("sqs entry: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = importer
            .sqs
            .send_message_batch()
            .queue_url(&importer.settings.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| format!("sqs: {e:?}"))?;
        if !out.failed().is_empty() {
            return Err(format!(
                "sqs: {} chunk messages not sent",
                out.failed().len()
            ));
        }
    }
    Ok(())
}
