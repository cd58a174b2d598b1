//! Settings of the AWS deployment, read from the Lambda environment (see `template.yaml`).

use export_core::Settings;
use std::time::Duration;

/// Names of the AWS resources and the tunables of the functions.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub resources_table: String,
    pub jobs_table: String,
    pub bucket: String,
    pub state_machine_arn: String,
    pub work_queue_url: String,
    /// Partitions per resource type in the resource table.
    pub shards: u32,
    /// Lifetime of presigned download URLs (at most 300 s).
    pub url_expiry: Duration,
    /// Store NDJSON objects gzipped (`Content-Encoding: gzip`).
    pub gzip_output: bool,
    /// Time a worker keeps back before its Lambda deadline to hand over to a fresh invocation.
    pub worker_reserve: Duration,
    /// How often a worker sends Step Functions heartbeats and renews the export lock.
    pub heartbeat_every: Duration,
    pub export: Settings,
}

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}='{v}' is not a number")),
        Err(_) => Ok(default),
    }
}

impl AwsSettings {
    /// Reads `RESOURCES_TABLE`, `JOBS_TABLE`, `EXPORT_BUCKET`, `STATE_MACHINE_ARN`,
    /// `WORK_QUEUE_URL`, and optional `SHARDS`, `URL_EXPIRY_SECONDS`, `GZIP_OUTPUT`,
    /// `MAX_FILE_BYTES`, `MAX_FILE_RESOURCES`, `RETENTION_DAYS` (or `RETENTION_SECONDS`),
    /// `LOCK_LEASE_SECONDS`, `WORKER_RESERVE_MS`.
    pub fn from_env() -> Result<Self, String> {
        let defaults = Settings::default();
        Ok(AwsSettings {
            resources_table: var("RESOURCES_TABLE")?,
            jobs_table: var("JOBS_TABLE")?,
            bucket: var("EXPORT_BUCKET")?,
            state_machine_arn: std::env::var("STATE_MACHINE_ARN").unwrap_or_default(),
            work_queue_url: std::env::var("WORK_QUEUE_URL").unwrap_or_default(),
            shards: number("SHARDS", 16)?,
            url_expiry: Duration::from_secs(number("URL_EXPIRY_SECONDS", 300u64)?.min(300)),
            gzip_output: std::env::var("GZIP_OUTPUT").map_or(true, |v| v != "false"),
            worker_reserve: Duration::from_millis(number("WORKER_RESERVE_MS", 60_000)?),
            heartbeat_every: Duration::from_secs(60),
            export: Settings {
                max_file_bytes: number("MAX_FILE_BYTES", defaults.max_file_bytes)?,
                max_file_resources: number("MAX_FILE_RESOURCES", defaults.max_file_resources)?,
                retention: match std::env::var("RETENTION_SECONDS") {
                    Ok(_) => Duration::from_secs(number("RETENTION_SECONDS", 0)?),
                    Err(_) => Duration::from_secs(number("RETENTION_DAYS", 1u64)? * 24 * 3600),
                },
                lock_lease: Duration::from_secs(number("LOCK_LEASE_SECONDS", 900)?),
                ..defaults
            },
        })
    }
}
