//! Running a study job: load the study, select its participants, write the export's files (and
//! for `fhir`, run the engine over the participants' compartments), then record the files with
//! their digests, audit the outcome and queue the webhook.

use crate::audit::{AuditAction, AuditEntry, FileDigest, append};
use crate::csv::{self, CsvError, CsvWriter};
use crate::dashboard;
use crate::jobs::{DEFAULT_RETENTION_DAYS, JobError, JobFile, StudyJob, StudyJobStatus};
use crate::model::{Participant, StudyData, load_study};
use crate::options::{ExportType, Filters};
use crate::package::{FileWriter, Member, write_file, zip};
use crate::report;
use crate::service::{StudyService, describe, now_ms};
use crate::webhooks::{Delivery, DeliveryStatus};
use export_core::fhir::time::{format_instant, from_micros, now_millis};
use export_core::params::{ExportLevel, ExportParams};
use export_core::{StoreError, StoreResult, runner};
use serde_json::json;

/// Why generating a job's files stopped.
enum Failure {
    /// The data cannot be exported as asked (a character the encoding lacks): the user can fix
    /// it by choosing other options.
    Data(JobError),
    /// The job was cancelled meanwhile.
    Cancelled,
    /// Anything else: logged, shown as an internal error.
    Internal(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Internal(e)
    }
}

impl From<CsvError> for Failure {
    fn from(e: CsvError) -> Self {
        // Only an encoding can fail on the data; any other CSV error is this service's own.
        if !e.message.contains("U+") {
            return Failure::Internal(StoreError::new(format!("csv: {e}")));
        }
        Failure::Data(JobError {
            code: "EXP002".into(),
            message: format!(
                "row {}, column {} ({}): {}",
                e.row, e.column, e.column_name, e.message
            ),
            field: Some("options.encoding".into()),
            action: "choose an encoding that can represent the data (utf-8, utf-8-bom or utf-16le) and generate the export again".into(),
        })
    }
}

impl StudyService {
    /// Runs a pending job to its end. Safe to call again: a job that is no longer pending is
    /// left alone.
    pub async fn run(&self, job_id: &str) -> StoreResult<()> {
        let Some(mut job) = self.ports.jobs.job(job_id).await? else {
            return Ok(());
        };
        if job.status != StudyJobStatus::Pending {
            return Ok(());
        }
        job.progress = Some("generating".into());
        self.ports
            .jobs
            .update_job(&job, StudyJobStatus::Pending)
            .await?;
        let outcome = self.generate(&mut job).await;
        // The job may have been cancelled while it ran: then nothing is recorded.
        let Some(current) = self.ports.jobs.job(job_id).await? else {
            return Ok(());
        };
        if current.status != StudyJobStatus::Pending {
            self.delete_files(&job).await;
            return Ok(());
        }
        let now = now_ms();
        match outcome {
            Ok(files) => {
                let retention = self
                    .ports
                    .jobs
                    .settings(&job.study_id)
                    .await?
                    .map_or(DEFAULT_RETENTION_DAYS, |s| s.retention_days);
                job.status = StudyJobStatus::Completed;
                job.progress = None;
                job.completed_at = Some(now);
                job.expires_at = Some(now + i64::from(retention) * 86_400_000);
                job.download = files.first().cloned();
                job.files = files.into_iter().skip(1).collect();
                if let (Some(engine), Some(expires)) = (&job.engine_job, job.expires_at) {
                    self.exporter
                        .set_expiry(engine, from_micros(expires * 1000))
                        .await?;
                }
            }
            Err(Failure::Cancelled) => {
                // Every item has ended by now (the runner waits for them): what they wrote goes.
                self.delete_files(&job).await;
                return Ok(());
            }
            Err(Failure::Data(error)) => {
                job.status = StudyJobStatus::Error;
                job.progress = None;
                job.completed_at = Some(now);
                job.expires_at = Some(now + i64::from(DEFAULT_RETENTION_DAYS) * 86_400_000);
                job.error = Some(error);
                self.delete_files(&job).await;
            }
            Err(Failure::Internal(e)) => {
                tracing::error!(job = %job.id, error = %e, "study export failed");
                job.status = StudyJobStatus::Error;
                job.progress = None;
                job.completed_at = Some(now);
                job.expires_at = Some(now + i64::from(DEFAULT_RETENTION_DAYS) * 86_400_000);
                job.error = Some(JobError {
                    code: "EXP005".into(),
                    message: "the export failed because of an internal error".into(),
                    field: None,
                    action: "retry the export; if it fails again, contact support with the job id"
                        .into(),
                });
                self.delete_files(&job).await;
            }
        }
        if !self
            .ports
            .jobs
            .update_job(&job, StudyJobStatus::Pending)
            .await?
        {
            // Cancelled at the last moment.
            self.delete_files(&job).await;
            return Ok(());
        }
        self.record_outcome(&job).await
    }

    /// Audits a finished job's status and queues its webhook.
    async fn record_outcome(&self, job: &StudyJob) -> StoreResult<()> {
        let mut entry = AuditEntry::new("system", "export service", AuditAction::StatusChange);
        describe(&mut entry, job);
        entry.request_id = Some(job.request_id.clone());
        entry.digests = job
            .download
            .iter()
            .chain(&job.files)
            .map(|f| FileDigest {
                name: f.name.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect();
        entry.details = Some(json!({"status": job.status.as_str(), "error": job.error}));
        append(self.ports.audit.as_ref(), entry).await?;
        let settings = self.ports.jobs.settings(&job.study_id).await?;
        if let Some(url) = settings.and_then(|s| s.webhook_url) {
            let event = match job.status {
                StudyJobStatus::Completed => "export.completed",
                _ => "export.failed",
            };
            let delivery = Delivery {
                id: format!("msg_{}", export_auth::random::hex_id()),
                study_id: job.study_id.clone(),
                job_id: job.id.clone(),
                url,
                event: event.into(),
                payload: json!({
                    "type": event,
                    "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "data": {
                        "job_id": job.id, "study_id": job.study_id, "export_type": job.export_type.as_str(),
                        "status": job.status.as_str(), "size": job.size() + job.download.as_ref().map_or(0, |d| d.size),
                        "files": job.files.len() + usize::from(job.download.is_some()),
                        "error": job.error, "requested_by": job.requestor_label,
                    }
                }),
                status: DeliveryStatus::Pending,
                created: now_ms(),
                next_attempt: now_ms(),
                attempts: Vec::new(),
            };
            self.ports.outbox.enqueue(&delivery).await?;
        }
        Ok(())
    }

    /// Writes the job's files; the first is the download.
    async fn generate(&self, job: &mut StudyJob) -> Result<Vec<JobFile>, Failure> {
        let data = load_study(self.ports.resources.as_ref(), &job.study_id, self.page_size)
            .await?
            .ok_or_else(|| Failure::Internal(StoreError::new("the study no longer exists")))?
            .with_sites(job.filters.sites.as_deref());
        // For `fhir` the date range selects resources by `meta.lastUpdated` (in the engine), not
        // participants by enrolment date.
        let selection = match job.export_type {
            ExportType::Fhir => Filters {
                date_range: None,
                ..job.filters.clone()
            },
            _ => job.filters.clone(),
        };
        let selected = csv::select(&data, &selection);
        let key = |name: &str| format!("study-{}/{name}", job.id);
        let generated_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let output = self.ports.output.as_ref();
        match job.export_type {
            ExportType::SitesCsv => {
                let rows = csv::site_rows(&data, &selected);
                let file = self
                    .csv_file(
                        job,
                        &key("sites.csv"),
                        "sites.csv",
                        csv::SITES_COLUMNS,
                        rows.into_iter(),
                    )
                    .await?;
                Ok(vec![file])
            }
            ExportType::ParticipantsCsv => {
                let rows = csv::participant_rows(&data, &selected);
                let file = self
                    .csv_file(
                        job,
                        &key("participants.csv"),
                        "participants.csv",
                        csv::PARTICIPANTS_COLUMNS,
                        rows,
                    )
                    .await?;
                Ok(vec![file])
            }
            ExportType::Report => {
                let metrics = dashboard::dashboard(&data, &selected, &generated_at)
                    .with_filters(&job.filters);
                let html = report::report_html(&data, &selected, &metrics, &generated_at);
                let file = write_file(
                    output,
                    &key("report.html"),
                    "report.html",
                    "text/html; charset=utf-8",
                    html.into_bytes(),
                )
                .await?;
                Ok(vec![file])
            }
            ExportType::Dashboard => {
                let metrics = dashboard::dashboard(&data, &selected, &generated_at)
                    .with_filters(&job.filters);
                let mut files = Vec::new();
                for (name, bytes) in dashboard::dashboard_files(&metrics, &job.options)? {
                    let content_type = if name.ends_with(".json") {
                        "application/json"
                    } else {
                        csv_content_type(job)
                    };
                    files.push(write_file(output, &key(&name), &name, content_type, bytes).await?);
                }
                let archive = self.package(job, &files, "dashboard.zip", None).await?;
                Ok(std::iter::once(archive).chain(files).collect())
            }
            ExportType::Fhir => self.fhir(job, &data, &selected).await,
        }
    }

    /// Streams rows through the CSV writer into one file.
    async fn csv_file(
        &self,
        job: &StudyJob,
        key: &str,
        name: &str,
        columns: &[&str],
        rows: impl Iterator<Item = Vec<String>>,
    ) -> Result<JobFile, Failure> {
        let mut writer = CsvWriter::new(job.options.delimiter, job.options.encoding);
        let mut file =
            FileWriter::create(self.ports.output.as_ref(), key, name, csv_content_type(job))
                .await?;
        let mut buffer = writer.header(columns)?;
        for row in rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            match writer.row(&cells) {
                Ok(bytes) => buffer.extend(bytes),
                Err(e) => {
                    file.abort().await?;
                    return Err(e.into());
                }
            }
            if buffer.len() >= 256 * 1024 {
                file.write(std::mem::take(&mut buffer)).await?;
            }
        }
        file.write(buffer).await?;
        Ok(file.finish().await?)
    }

    /// The FHIR export: the engine exports the selected participants' compartments (their
    /// ResearchSubjects included), and the study and its sites are added; all in one ZIP with a
    /// `manifest.json`.
    async fn fhir(
        &self,
        job: &mut StudyJob,
        data: &StudyData,
        selected: &[&Participant],
    ) -> Result<Vec<JobFile>, Failure> {
        let output = self.ports.output.as_ref();
        let key = |name: &str| format!("study-{}/{name}", job.id);
        let mut files = Vec::new();
        let study_line = format!("{}\n", data.study.resource);
        files.push(
            write_file(
                output,
                &key("ResearchStudy.ndjson"),
                "ResearchStudy.ndjson",
                "application/fhir+ndjson",
                study_line.into_bytes(),
            )
            .await?,
        );
        let sites: String = data
            .sites
            .iter()
            .map(|s| format!("{}\n", s.resource))
            .collect();
        files.push(
            write_file(
                output,
                &key("Location.ndjson"),
                "Location.ndjson",
                "application/fhir+ndjson",
                sites.into_bytes(),
            )
            .await?,
        );

        let mut patients: Vec<String> = selected
            .iter()
            .map(|p| p.patient_id.clone())
            .filter(|p| !p.is_empty())
            .collect();
        patients.sort();
        patients.dedup();
        let mut counts = vec![
            ("ResearchStudy".to_string(), 1u64),
            ("Location".to_string(), data.sites.len() as u64),
        ];
        if !patients.is_empty() {
            let now = now_millis();
            let range = job.filters.date_range.clone().unwrap_or_default();
            let since = range.from.map(|d| {
                from_micros(
                    d.and_hms_opt(0, 0, 0)
                        .expect("midnight")
                        .and_utc()
                        .timestamp_micros()
                        - 1,
                )
            });
            let until = range.to.map(|d| {
                let end = d.and_hms_milli_opt(23, 59, 59, 999).expect("end of day");
                from_micros(end.and_utc().timestamp_micros()).min(now)
            });
            let params = ExportParams {
                output_format: "application/fhir+ndjson".into(),
                since,
                until,
                patients: Some(patients),
                ..ExportParams::default()
            };
            let request = format!("study export {} of study {}", job.id, job.study_id);
            let engine = self
                .exporter
                .create_unlocked(ExportLevel::Patient, params, request, &job.requestor)
                .await?;
            job.engine_job = Some(engine.id.clone());
            job.progress = Some("exporting the participants' FHIR data".into());
            self.ports
                .jobs
                .update_job(job, StudyJobStatus::Pending)
                .await?;
            if !runner::run_unlocked(&self.exporter, &engine.id).await? {
                return Err(Failure::Cancelled);
            }
            for part in self.exporter.ports.jobs.parts(&engine.id).await? {
                if part.is_error || part.is_deleted {
                    continue;
                }
                let name = format!(
                    "{}.{:03}.{:04}.ndjson",
                    part.resource_type, part.item, part.seq
                );
                counts.push((part.resource_type.clone(), part.count));
                files.push(JobFile {
                    name,
                    key: part.key.clone(),
                    size: part.bytes,
                    sha256: self.digest(&part.key).await?,
                    content_type: "application/fhir+ndjson".into(),
                });
            }
        }
        let manifest = json!({
            "study_id": job.study_id,
            "transactionTime": format_instant(now_millis()),
            "filters": job.filters,
            "output": files.iter().zip(&counts).map(|(f, (t, n))| json!({
                "type": t, "file": f.name, "count": n, "size": f.size, "sha256": f.sha256
            })).collect::<Vec<_>>(),
        });
        let archive = self
            .package(job, &files, "fhir-export.zip", Some(manifest))
            .await?;
        Ok(std::iter::once(archive).chain(files).collect())
    }

    /// The SHA-256 of a stored file, read back.
    async fn digest(&self, key: &str) -> StoreResult<String> {
        use futures_util::StreamExt;
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut stream = self
            .ports
            .output
            .read(key)
            .await?
            .ok_or_else(|| StoreError::new(format!("{key} is missing")))?;
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk?);
        }
        Ok(crate::package::hex(&hasher.finalize()))
    }

    /// A ZIP of `files` (and a `manifest.json` listing them), under the job's keys.
    async fn package(
        &self,
        job: &StudyJob,
        files: &[JobFile],
        name: &str,
        manifest: Option<serde_json::Value>,
    ) -> StoreResult<JobFile> {
        let manifest = manifest.unwrap_or_else(|| {
            json!({"study_id": job.study_id, "export_type": job.export_type.as_str(),
                "filters": job.filters, "options": job.options,
                "files": files.iter().map(|f| json!({"file": f.name, "size": f.size, "sha256": f.sha256})).collect::<Vec<_>>()})
        });
        let mut members = vec![Member::Bytes {
            name: "manifest.json".into(),
            data: serde_json::to_vec_pretty(&manifest).map_err(StoreError::from)?,
        }];
        members.extend(files.iter().map(|f| Member::Stored {
            name: f.name.clone(),
            key: f.key.clone(),
        }));
        zip(
            self.ports.output.as_ref(),
            &format!("study-{}/{name}", job.id),
            name,
            members,
        )
        .await
    }
}

fn csv_content_type(job: &StudyJob) -> &'static str {
    match job.options.encoding {
        crate::options::CsvEncoding::Utf16Le => "text/csv; charset=utf-16le",
        crate::options::CsvEncoding::Iso88591 => "text/csv; charset=iso-8859-1",
        _ => "text/csv; charset=utf-8",
    }
}
