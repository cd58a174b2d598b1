//! The import jobs' items in the jobs table, one partition `imp#<name>` per job:
//!
//! | item | sk | holds |
//! |---|---|---|
//! | job | `job` | `started`, `status`, `chunks` (total), `files`; when finished: `finished`, `lines`, `written`, `unchanged`, `errors`, `error_file`, `finished_chunks` |
//! | file | `file#<file id>` | `key`, `etag`, `size`, `chunks` |
//! | chunk | `chunk#<file id>#<index>` | `key`, `lines`, `offset`, `written`, `unchanged`, `errors`, `done`, `failure` |
//!
//! A file is registered once (a transaction puts it only if absent and adds its chunks to the
//! job's total), so a duplicate S3 event counts nothing twice. A chunk's item holds absolute
//! progress, written only if the progress it replaces is still there: of two invocations of the
//! same chunk, the one that falls behind stops, and counts are never added twice.

use super::event::ChunkMessage;
use crate::dynamo::{DynamoTable, Item, attr_n, attr_s, dynamo_err, get_n, get_s};
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update};
use export_core::StoreResult;
use std::collections::HashMap;

/// Job statuses.
pub const IN_PROGRESS: &str = "in-progress";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";

/// Where a chunk stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkState {
    /// Units (lines or Bundle entries) done.
    pub lines: u64,
    /// For plain NDJSON: the offset of the next line to read.
    pub offset: u64,
    /// Resources written as new versions.
    pub written: u64,
    /// Resources left out because their current version has the same content.
    pub unchanged: u64,
    /// Lines or entries that could not be loaded (and a failure of the chunk itself).
    pub errors: u64,
    pub done: bool,
    /// Why the chunk could not be read, if it could not.
    pub failure: Option<String>,
}

/// A chunk's item as the job's finisher and status read it.
#[derive(Debug, Clone)]
pub struct ChunkView {
    pub file_id: String,
    pub key: String,
    pub index: u32,
    pub state: ChunkState,
}

/// The job's final figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub lines: u64,
    pub written: u64,
    pub unchanged: u64,
    pub errors: u64,
    pub failed: bool,
}

impl Summary {
    pub fn of(chunks: &[ChunkView]) -> Summary {
        chunks.iter().fold(Summary::default(), |mut s, c| {
            s.lines += c.state.lines;
            s.written += c.state.written;
            s.unchanged += c.state.unchanged;
            s.errors += c.state.errors;
            s.failed |= c.state.failure.is_some();
            s
        })
    }
}

pub fn job_pk(id: &str) -> String {
    format!("imp#{id}")
}

fn chunk_sk(file_id: &str, index: u32) -> String {
    format!("chunk#{file_id}#{index:06}")
}

fn n(value: u64) -> aws_sdk_dynamodb::types::AttributeValue {
    attr_n(value as i64)
}

fn get_u(item: &Item, name: &str) -> u64 {
    get_n(item, name).unwrap_or(0).max(0) as u64
}

/// The import items of the jobs table.
pub struct ImportRecords {
    table: DynamoTable,
}

impl ImportRecords {
    pub fn new(table: DynamoTable) -> Self {
        ImportRecords { table }
    }

    /// Registers one version of an object with its job (creating the job), unless it was
    /// registered before. Returns whether it is new.
    pub async fn register_file(
        &self,
        id: &str,
        message: &ChunkMessage,
        chunks: u32,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let pk = job_pk(id);
        let file = Put::builder()
            .table_name(&self.table.name)
            .set_item(Some(HashMap::from([
                ("pk".to_string(), attr_s(&pk)),
                (
                    "sk".to_string(),
                    attr_s(&format!("file#{}", message.file_id)),
                ),
                ("key".to_string(), attr_s(&message.key)),
                ("etag".to_string(), attr_s(&message.etag)),
                ("size".to_string(), n(message.size)),
                ("chunks".to_string(), n(chunks as u64)),
            ])))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(dynamo_err)?;
        // A job that had finished runs again with the new file.
        let job = Update::builder()
            .table_name(&self.table.name)
            .key("pk", attr_s(&pk))
            .key("sk", attr_s("job"))
            .update_expression("SET #t = if_not_exists(#t, :now), #s = :ip ADD #c :c, #f :one")
            .expression_attribute_names("#t", "started")
            .expression_attribute_names("#s", "status")
            .expression_attribute_names("#c", "chunks")
            .expression_attribute_names("#f", "files")
            .expression_attribute_values(":now", attr_n(now_ms))
            .expression_attribute_values(":ip", attr_s(IN_PROGRESS))
            .expression_attribute_values(":c", n(chunks as u64))
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(dynamo_err)?;
        let sent = self
            .table
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(file).build())
            .transact_items(TransactWriteItem::builder().update(job).build())
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e) => match e.as_service_error() {
                // Only the file's condition can fail: it was registered before. Any other
                // cancellation (a conflict with another file of the job) is retried.
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled))
                    if cancelled
                        .cancellation_reasons()
                        .iter()
                        .any(|r| r.code() == Some("ConditionalCheckFailed")) =>
                {
                    Ok(false)
                }
                _ => Err(dynamo_err(e)),
            },
        }
    }

    /// A chunk's recorded state, if it has started.
    pub async fn chunk(&self, message: &ChunkMessage) -> StoreResult<Option<ChunkState>> {
        let item = self
            .table
            .get(
                &job_pk(&message.import_id),
                &chunk_sk(&message.file_id, message.index),
            )
            .await?;
        Ok(item.as_ref().map(chunk_state))
    }

    /// Records a chunk's progress if `previous` is still what is recorded; returns whether it was.
    pub async fn save_chunk(
        &self,
        message: &ChunkMessage,
        previous: Option<&ChunkState>,
        state: &ChunkState,
    ) -> StoreResult<bool> {
        let mut item = HashMap::from([
            ("pk".to_string(), attr_s(&job_pk(&message.import_id))),
            (
                "sk".to_string(),
                attr_s(&chunk_sk(&message.file_id, message.index)),
            ),
            ("key".to_string(), attr_s(&message.key)),
            ("file".to_string(), attr_s(&message.file_id)),
            ("index".to_string(), n(message.index as u64)),
            ("lines".to_string(), n(state.lines)),
            ("offset".to_string(), n(state.offset)),
            ("written".to_string(), n(state.written)),
            ("unchanged".to_string(), n(state.unchanged)),
            ("errors".to_string(), n(state.errors)),
            ("done".to_string(), n(state.done as u64)),
        ]);
        if let Some(failure) = &state.failure {
            item.insert("failure".into(), attr_s(failure));
        }
        let put = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item));
        let put = match previous {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(p) => put
                .condition_expression("#l = :l AND #d = :zero")
                .expression_attribute_names("#l", "lines")
                .expression_attribute_names("#d", "done")
                .expression_attribute_values(":l", n(p.lines))
                .expression_attribute_values(":zero", n(0)),
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(dynamo_err(e)),
        }
    }

    /// The job item.
    pub async fn job(&self, id: &str) -> StoreResult<Option<Item>> {
        self.table.get(&job_pk(id), "job").await
    }

    /// The job's chunks that have started, by file and index.
    pub async fn chunks(&self, id: &str) -> StoreResult<Vec<ChunkView>> {
        let items = self
            .table
            .query_all(&job_pk(id), Some("chunk#"), None)
            .await?;
        Ok(items
            .iter()
            .map(|item| ChunkView {
                file_id: get_s(item, "file").unwrap_or_default(),
                key: get_s(item, "key").unwrap_or_default(),
                index: get_u(item, "index") as u32,
                state: chunk_state(item),
            })
            .collect())
    }

    /// The job's registered files.
    pub async fn files(&self, id: &str) -> StoreResult<Vec<Item>> {
        self.table.query_all(&job_pk(id), Some("file#"), None).await
    }

    /// Marks the job finished with `summary`, if its number of chunks is still `chunks` (a file
    /// registered meanwhile leaves the job to that file's last chunk). Returns whether it did.
    pub async fn finish(
        &self,
        id: &str,
        chunks: u64,
        summary: &Summary,
        error_file: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let status = if summary.failed { FAILED } else { COMPLETED };
        let sent = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(&job_pk(id)))
            .key("sk", attr_s("job"))
            .update_expression(
                "SET #s = :s, #fin = :now, #l = :l, #w = :w, #u = :u, #e = :e, #f = :f, \
                 #fc = :c",
            )
            .condition_expression("#c = :c")
            .expression_attribute_names("#s", "status")
            .expression_attribute_names("#fin", "finished")
            .expression_attribute_names("#l", "lines")
            .expression_attribute_names("#w", "written")
            .expression_attribute_names("#u", "unchanged")
            .expression_attribute_names("#e", "errors")
            .expression_attribute_names("#f", "error_file")
            .expression_attribute_names("#fc", "finished_chunks")
            .expression_attribute_names("#c", "chunks")
            .expression_attribute_values(":s", attr_s(status))
            .expression_attribute_values(":now", attr_n(now_ms))
            .expression_attribute_values(":l", n(summary.lines))
            .expression_attribute_values(":w", n(summary.written))
            .expression_attribute_values(":u", n(summary.unchanged))
            .expression_attribute_values(":e", n(summary.errors))
            .expression_attribute_values(":f", attr_s(error_file))
            .expression_attribute_values(":c", n(chunks))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(dynamo_err(e)),
        }
    }
}

fn chunk_state(item: &Item) -> ChunkState {
    ChunkState {
        lines: get_u(item, "lines"),
        offset: get_u(item, "offset"),
        written: get_u(item, "written"),
        unchanged: get_u(item, "unchanged"),
        errors: get_u(item, "errors"),
        done: get_u(item, "done") == 1,
        failure: get_s(item, "failure"),
    }
}

/// A number attribute of an item (0 when absent).
pub fn number(item: &Item, name: &str) -> u64 {
    get_u(item, name)
}
