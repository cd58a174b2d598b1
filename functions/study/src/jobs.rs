//! Study jobs: one export of one study, its status from request to expiry, and the files it
//! produced (each with its size and SHA-256). The store is a port; SQLite and DynamoDB
//! implement it.

use crate::options::{ExportOptions, ExportType, Filters};
use async_trait::async_trait;
use export_core::StoreResult;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StudyJobStatus {
    /// Queued or being generated.
    Pending,
    /// Its files are ready to download.
    Completed,
    /// It failed; `error` says why and what to do.
    Error,
    /// Cancelled before it finished.
    Cancelled,
    /// Past its study's retention: the files are deleted, the history row stays.
    Expired,
}

impl StudyJobStatus {
    pub const ALL: [StudyJobStatus; 5] = [
        StudyJobStatus::Pending,
        StudyJobStatus::Completed,
        StudyJobStatus::Error,
        StudyJobStatus::Cancelled,
        StudyJobStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StudyJobStatus::Pending => "pending",
            StudyJobStatus::Completed => "completed",
            StudyJobStatus::Error => "error",
            StudyJobStatus::Cancelled => "cancelled",
            StudyJobStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<StudyJobStatus> {
        StudyJobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Why a job failed, in the API's error shape, and what the user can do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// EXP002 for data the export cannot represent (e.g. a character outside Latin-1), EXP005
    /// for an internal failure.
    pub code: String,
    pub message: String,
    /// The request field to change, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What to do next.
    pub action: String,
}

/// One finished file of a job (as stored; the API shows [`crate::api::FileView`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    /// The file name offered to the user.
    pub name: String,
    /// Where the output store keeps it.
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    pub content_type: String,
}

/// A study export job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyJob {
    pub id: String,
    pub study_id: String,
    pub export_type: ExportType,
    pub filters: Filters,
    pub options: ExportOptions,
    /// The principal that asked (`user:…`, `api-key:…`, `local-admin`).
    pub requestor: String,
    /// Its human label (an e-mail, a key's name).
    pub requestor_label: String,
    pub status: StudyJobStatus,
    /// For pending jobs: what is happening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Milliseconds since the epoch.
    pub requested_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
    /// When the files are deleted (set at completion from the study's retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The download: one file (CSV, HTML, or a ZIP of the parts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<JobFile>,
    /// The individual files (the ZIP's members, or the one file).
    #[serde(default)]
    pub files: Vec<JobFile>,
    /// The engine job of a `fhir` export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_job: Option<String>,
    /// The request that created it (for the audit trail).
    #[serde(default)]
    pub request_id: String,
}

impl StudyJob {
    /// Total bytes of the files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Which jobs a history page shows.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub study_id: String,
    pub status: Option<StudyJobStatus>,
    pub export_type: Option<ExportType>,
    /// Jobs of this requestor label or principal id.
    pub requestor: Option<String>,
    /// Requested at or after (ms).
    pub from: Option<i64>,
    /// Requested at or before (ms).
    pub to: Option<i64>,
    /// Only the jobs of this principal (site staff see their own).
    pub owner: Option<String>,
    /// 1-based.
    pub page: u64,
    pub page_size: u64,
}

impl JobQuery {
    /// Whether `job` belongs on the page (before paging).
    pub fn selects(&self, job: &StudyJob) -> bool {
        job.study_id == self.study_id
            && self.status.is_none_or(|s| job.status == s)
            && self.export_type.is_none_or(|t| job.export_type == t)
            && self
                .requestor
                .as_ref()
                .is_none_or(|r| job.requestor_label == *r || job.requestor == *r)
            && self.from.is_none_or(|f| job.requested_at >= f)
            && self.to.is_none_or(|t| job.requested_at <= t)
            && self.owner.as_ref().is_none_or(|o| job.requestor == *o)
    }
}

/// A study's settings: how long its files are kept, and its webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudySettings {
    pub study_id: String,
    pub retention_days: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The webhook's signing secret (`whsec_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

/// Files are kept this long unless the study says otherwise.
pub const DEFAULT_RETENTION_DAYS: u32 = 7;

/// An `Idempotency-Key` seen: the same key and body within a day return the same jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The principal and the key.
    pub key: String,
    /// SHA-256 of the request (method, path and body).
    pub fingerprint: String,
    pub job_ids: Vec<String>,
    /// Milliseconds since the epoch.
    pub created: i64,
}

/// Study jobs, settings and idempotency keys.
#[async_trait]
pub trait StudyJobStore: Send + Sync {
    async fn create_job(&self, job: &StudyJob) -> StoreResult<()>;
    async fn job(&self, id: &str) -> StoreResult<Option<StudyJob>>;
    /// Writes `job` only if the stored status is still `expected`; returns whether it did.
    async fn update_job(&self, job: &StudyJob, expected: StudyJobStatus) -> StoreResult<bool>;
    /// The jobs `query` selects, newest first, one page, and how many it selects in all.
    async fn jobs(&self, query: &JobQuery) -> StoreResult<(Vec<StudyJob>, u64)>;
    /// Pending jobs (to resume after a restart).
    async fn pending_jobs(&self) -> StoreResult<Vec<StudyJob>>;
    /// Completed or failed jobs whose files expire by `now` (ms).
    async fn expiring_jobs(&self, now: i64) -> StoreResult<Vec<StudyJob>>;

    async fn settings(&self, study_id: &str) -> StoreResult<Option<StudySettings>>;
    async fn put_settings(&self, settings: &StudySettings) -> StoreResult<()>;
    /// Every study's settings (for the page's webhook view and the CLI).
    async fn all_settings(&self) -> StoreResult<Vec<StudySettings>>;

    /// Records `record` unless its key is already recorded (and younger than a day); returns
    /// the record that holds the key afterwards (the caller's own when it was first).
    async fn remember_idempotency(
        &self,
        record: &IdempotencyRecord,
        now: i64,
    ) -> StoreResult<IdempotencyRecord>;
    /// Fills in the jobs of a key recorded by `remember_idempotency`.
    async fn complete_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<()>;
}
