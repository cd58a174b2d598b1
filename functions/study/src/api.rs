//! The JSON the study API reads and writes (and the OpenAPI schemas made from these types).

use crate::audit::AuditRecord;
use crate::jobs::{JobError, JobFile, StudyJob, StudyJobStatus};
use crate::options::{ExportOptions, ExportType, Filters};
use crate::webhooks::Delivery;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /data`: a data export.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataExportRequest {
    #[schema(example = "study-0")]
    pub study_id: String,
    /// `fhir`, `sites_csv` or `participants_csv`.
    #[serde(rename = "type")]
    #[schema(value_type = DataExportType)]
    pub export_type: ExportType,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub options: ExportOptions,
}

/// The types `POST /data` creates (for the OpenAPI document; the others have endpoints of
/// their own).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum DataExportType {
    Fhir,
    SitesCsv,
    ParticipantsCsv,
}

/// `POST /dashboard` and `POST /report`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StudyExportRequest {
    #[schema(example = "study-0")]
    pub study_id: String,
    #[serde(default)]
    pub filters: Filters,
    /// CSV options of the dashboard's CSV files (ignored by the report).
    #[serde(default)]
    pub options: ExportOptions,
}

/// One export of a bulk request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkItem {
    #[serde(rename = "type")]
    pub export_type: ExportType,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub options: ExportOptions,
}

/// `POST /bulk`: several exports of one study; each becomes its own job.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    #[schema(example = "study-0")]
    pub study_id: String,
    /// 1 to 10 exports.
    #[schema(min_items = 1, max_items = 10)]
    pub exports: Vec<BulkItem>,
}

/// Links of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobLinks {
    #[serde(rename = "self")]
    pub self_: String,
    pub download: String,
    pub files: String,
}

/// A job, the same wherever it appears.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub study_id: String,
    #[serde(rename = "type")]
    pub export_type: ExportType,
    pub status: StudyJobStatus,
    /// What a pending job is doing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// RFC 3339.
    pub requested_at: String,
    /// Who asked (an e-mail, an API key's name).
    pub requestor: String,
    pub filters: Filters,
    pub options: ExportOptions,
    /// Bytes of the download, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// How many files the export has (the download and its parts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u64>,
    /// The download's SHA-256 (hex), once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// When the files are deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    pub links: JobLinks,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl JobView {
    /// The view of `job`; `base` is the API's base URL (`https://host/api/v1/exports`).
    pub fn of(job: &StudyJob, base: &str) -> JobView {
        let finished = job.status == StudyJobStatus::Completed;
        JobView {
            id: job.id.clone(),
            study_id: job.study_id.clone(),
            export_type: job.export_type,
            status: job.status,
            progress: job.progress.clone(),
            requested_at: rfc3339(job.requested_at),
            requestor: job.requestor_label.clone(),
            filters: job.filters.clone(),
            options: job.options.clone(),
            size: finished.then(|| job.download.as_ref().map_or(0, |d| d.size)),
            file_count: finished
                .then(|| (job.files.len() + usize::from(job.download.is_some())) as u64),
            sha256: finished
                .then(|| job.download.as_ref().map(|d| d.sha256.clone()))
                .flatten(),
            completed_at: job.completed_at.map(rfc3339),
            expires_at: job.expires_at.map(rfc3339),
            error: job.error.clone(),
            links: JobLinks {
                self_: format!("{base}/jobs/{}", job.id),
                download: format!("{base}/jobs/{}/download", job.id),
                files: format!("{base}/jobs/{}/files", job.id),
            },
        }
    }
}

/// Pagination links.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PageLinks {
    #[serde(rename = "self")]
    pub self_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

/// `GET /jobs`: the export history, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
    pub page: u64,
    pub page_size: u64,
    /// Jobs matching the filters, on every page.
    pub total: u64,
    pub links: PageLinks,
}

/// `POST /bulk`: the jobs created.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BulkResponse {
    pub jobs: Vec<JobView>,
}

/// One file of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileView {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
    pub download: String,
}

/// `GET /jobs/{id}/files`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileList {
    pub job_id: String,
    pub files: Vec<FileView>,
}

impl FileView {
    pub fn of(file: &JobFile, job: &str, base: &str) -> FileView {
        FileView {
            name: file.name.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            content_type: file.content_type.clone(),
            download: format!("{base}/jobs/{job}/files/{}", file.name),
        }
    }
}

/// One option of a format.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FormatOption {
    pub name: String,
    pub allowed: Vec<String>,
    pub default: String,
}

/// One export type.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Format {
    #[serde(rename = "type")]
    pub export_type: ExportType,
    pub label: String,
    pub description: String,
    /// The endpoint that creates it.
    pub endpoint: String,
    /// What the download is.
    pub content_type: String,
    pub options: Vec<FormatOption>,
    pub filters: Vec<String>,
    /// With `study_id`: whether the caller may create it in that study.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
}

/// `GET /formats`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FormatList {
    pub formats: Vec<Format>,
    /// The R4 ResearchSubject statuses the statuses filter takes.
    pub statuses: Vec<String>,
}

/// `GET /audit`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditRecord>,
    pub page: u64,
    pub page_size: u64,
    pub total: u64,
    pub links: PageLinks,
}

/// `GET /webhooks/deliveries`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryList {
    pub items: Vec<Delivery>,
}

/// A site as a study list shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SiteSummary {
    pub id: String,
    pub name: String,
    pub city: String,
    pub country: String,
    /// `Location.status`.
    pub status: String,
}

/// A study the caller has a role in.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StudySummary {
    pub id: String,
    pub title: String,
    /// `ResearchStudy.status`.
    pub status: String,
    /// The caller's role: `study-admin`, `investigator`, `data-reviewer` or `site-staff`.
    pub role: String,
    /// The sites the caller may export: all of the study's, or a site role's own.
    pub sites: Vec<SiteSummary>,
    /// Whether the caller may read the audit trail and webhook deliveries.
    pub may_audit: bool,
}

/// `GET /studies`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StudyList {
    pub studies: Vec<StudySummary>,
}
