//! The importer's settings, read from the Lambda environment (see `template.yaml`).

use crate::config::{number, var};
use std::time::Duration;

/// Names and tunables of the importer.
#[derive(Debug, Clone)]
pub struct ImportSettings {
    pub resources_table: String,
    /// Import jobs live in the jobs table, under `imp#<name>` partitions.
    pub jobs_table: String,
    /// Partitions per resource type in the resource table (the table refuses another count).
    pub shards: u32,
    /// Where bodies too big for a DynamoDB item go (`RESOURCE_BUCKET`), as for every writer.
    pub resource_bucket: Option<String>,
    /// The only bucket whose objects are imported; error files are written there too.
    pub bucket: String,
    /// The queue S3 announces objects on, which also carries the chunk messages.
    pub queue_url: String,
    /// Bytes of NDJSON per chunk: each chunk is one invocation's work, so it must finish well
    /// inside the function's 15 minutes (16 MiB is about 15,000 resources).
    pub chunk_bytes: u64,
    /// Lines per batch: the unit of writing and of recorded progress, so a crash repeats at
    /// most one batch.
    pub batch: usize,
    /// Time kept back before the Lambda deadline to record progress and hand the chunk over.
    pub reserve: Duration,
    /// Deliveries of a chunk message before a chunk that keeps failing is given up (below the
    /// queue's `maxReceiveCount`, so the job records the failure before the message would go
    /// to the dead-letter queue).
    pub max_attempts: u32,
}

impl ImportSettings {
    /// Reads `RESOURCES_TABLE`, `JOBS_TABLE`, `IMPORT_BUCKET`, `IMPORT_QUEUE_URL`, and optional
    /// `SHARDS`, `RESOURCE_BUCKET`, `IMPORT_CHUNK_BYTES`, `IMPORT_BATCH`, `IMPORTER_RESERVE_MS`, `IMPORT_MAX_ATTEMPTS`.
    pub fn from_env() -> Result<Self, String> {
        Ok(ImportSettings {
            resources_table: var("RESOURCES_TABLE")?,
            jobs_table: var("JOBS_TABLE")?,
            shards: number("SHARDS", 16)?,
            resource_bucket: std::env::var("RESOURCE_BUCKET")
                .ok()
                .filter(|b| !b.is_empty()),
            bucket: var("IMPORT_BUCKET")?,
            queue_url: var("IMPORT_QUEUE_URL")?,
            chunk_bytes: number("IMPORT_CHUNK_BYTES", 16 << 20)?,
            batch: number("IMPORT_BATCH", 250)?,
            reserve: Duration::from_millis(number("IMPORTER_RESERVE_MS", 60_000)?),
            max_attempts: number("IMPORT_MAX_ATTEMPTS", 4)?,
        })
    }
}
