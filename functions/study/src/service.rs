//! The study export service: requests become jobs (validated, authorized, audited, queued), and
//! jobs are looked up, listed, cancelled and downloaded, always within the caller's rights.

use crate::api::{SiteSummary, StudySummary};
use crate::audit::{AuditAction, AuditEntry, AuditLog, FileDigest, append};
use crate::error::StudyError;
use crate::jobs::{JobFile, JobQuery, StudyJob, StudyJobStatus, StudyJobStore};
use crate::model::{StudyData, known_statuses, load_study, study_and_sites, study_ids};
use crate::options::{ExportOptions, ExportType, Filters};
use crate::roles;
use crate::webhooks::WebhookOutbox;
use async_trait::async_trait;
use export_auth::{Membership, Principal, SiteScope};
use export_core::ports::{OutputStore, ResourceStore};
use export_core::{Exporter, StoreResult};
use std::sync::Arc;

/// Runs study jobs: in-process locally, through a queue on AWS.
#[async_trait]
pub trait StudyDispatcher: Send + Sync {
    /// Queues a pending job.
    async fn submit(&self, job_id: &str) -> StoreResult<()>;
}

/// The ports a study service works over.
#[derive(Clone)]
pub struct StudyPorts {
    pub resources: Arc<dyn ResourceStore>,
    pub jobs: Arc<dyn StudyJobStore>,
    pub audit: Arc<dyn AuditLog>,
    pub outbox: Arc<dyn WebhookOutbox>,
    pub output: Arc<dyn OutputStore>,
}

/// Who asks, and where the request came from (for the audit trail).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
    pub client_address: Option<String>,
}

impl Caller {
    /// An audit entry of this caller.
    pub fn entry(&self, action: AuditAction) -> AuditEntry {
        let mut entry = AuditEntry::new(&self.principal.id(), &self.principal.label(), action);
        entry.request_id = Some(self.request_id.clone());
        entry.client_address = self.client_address.clone();
        entry
    }
}

/// What a new export asks for.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub study_id: String,
    pub export_type: ExportType,
    pub filters: Filters,
    pub options: ExportOptions,
}

/// The study export service.
pub struct StudyService {
    pub ports: StudyPorts,
    /// Runs the FHIR part of `fhir` exports.
    pub exporter: Arc<Exporter>,
    pub dispatcher: Arc<dyn StudyDispatcher>,
    /// Resources read per page when a study is loaded.
    pub page_size: usize,
}

impl StudyService {
    /// The caller's membership in a study that exists (EXP003 without one, EXP001 without the
    /// study).
    pub async fn member(
        &self,
        caller: &Caller,
        study_id: &str,
    ) -> Result<(Membership, StudyData), StudyError> {
        let membership = roles::membership(&caller.principal, study_id)?;
        let data = load_study(self.ports.resources.as_ref(), study_id, self.page_size)
            .await?
            .ok_or_else(|| StudyError::not_found(format!("there is no study {study_id}")))?;
        Ok((membership, data))
    }

    /// The studies the caller has a role in (every study of the store for the local
    /// administrator), each with the sites the caller may export; studies that no longer exist
    /// are left out.
    pub async fn studies(&self, caller: &Caller) -> Result<Vec<StudySummary>, StudyError> {
        let memberships: Vec<Membership> = match &caller.principal {
            Principal::User { memberships, .. } => memberships.clone(),
            Principal::ApiKey { membership, .. } => vec![membership.clone()],
            Principal::LocalAdmin => {
                let ids = study_ids(self.ports.resources.as_ref(), self.page_size).await?;
                ids.iter()
                    .filter_map(|id| caller.principal.membership(id))
                    .collect()
            }
            Principal::BulkClient { .. } => Vec::new(),
        };
        let mut studies = Vec::new();
        for membership in memberships {
            let Some((study, sites)) =
                study_and_sites(self.ports.resources.as_ref(), &membership.study).await?
            else {
                continue;
            };
            let sites = sites
                .into_iter()
                .filter(|s| match &membership.sites {
                    SiteScope::All => true,
                    SiteScope::Sites(own) => own.contains(&s.id),
                })
                .map(|s| SiteSummary {
                    id: s.id,
                    name: s.name,
                    city: s.city,
                    country: s.country,
                    status: s.status,
                })
                .collect();
            studies.push(StudySummary {
                id: study.id,
                title: study.title,
                status: study.status,
                role: membership.role.as_str().into(),
                sites,
                may_audit: roles::may_audit(&membership),
            });
        }
        studies.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(studies)
    }

    /// Validates and authorizes a request, stores the job, audits it and queues it.
    pub async fn create(
        &self,
        caller: &Caller,
        request: ExportRequest,
    ) -> Result<StudyJob, StudyError> {
        let (membership, data) = self.member(caller, &request.study_id).await?;
        validate_filters(&data, &request.filters)?;
        let filters = roles::authorize_create(&membership, request.export_type, &request.filters)?;
        let options = if request.export_type.is_csv() {
            request.options
        } else {
            ExportOptions::default()
        };
        let job = StudyJob {
            id: export_auth::random::hex_id(),
            study_id: request.study_id.clone(),
            export_type: request.export_type,
            filters,
            options,
            requestor: caller.principal.id(),
            requestor_label: caller.principal.label(),
            status: StudyJobStatus::Pending,
            progress: Some("queued".into()),
            requested_at: now_ms(),
            completed_at: None,
            expires_at: None,
            error: None,
            download: None,
            files: Vec::new(),
            engine_job: None,
            request_id: caller.request_id.clone(),
        };
        self.ports.jobs.create_job(&job).await?;
        let mut entry = caller.entry(AuditAction::Create);
        describe(&mut entry, &job);
        append(self.ports.audit.as_ref(), entry).await?;
        self.dispatcher.submit(&job.id).await?;
        Ok(job)
    }

    /// A job the caller may see (others do not exist for it: EXP001).
    pub async fn visible_job(&self, caller: &Caller, id: &str) -> Result<StudyJob, StudyError> {
        let hidden = || StudyError::not_found(format!("there is no export job {id}"));
        let job = self.ports.jobs.job(id).await?.ok_or_else(hidden)?;
        let membership = caller
            .principal
            .membership(&job.study_id)
            .ok_or_else(hidden)?;
        match roles::visible_owner(&caller.principal, &membership) {
            Some(owner) if owner != job.requestor => Err(hidden()),
            _ => Ok(job),
        }
    }

    /// A page of the export history.
    pub async fn history(
        &self,
        caller: &Caller,
        mut query: JobQuery,
    ) -> Result<(Vec<StudyJob>, u64), StudyError> {
        let membership = roles::membership(&caller.principal, &query.study_id)?;
        query.owner = roles::visible_owner(&caller.principal, &membership);
        Ok(self.ports.jobs.jobs(&query).await?)
    }

    /// Cancels a pending job, or deletes a finished one's files (the history row stays).
    pub async fn cancel_or_delete(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<StudyJob, StudyError> {
        let mut job = self.visible_job(caller, id).await?;
        let before = job.status;
        let action = match before {
            StudyJobStatus::Pending => {
                job.status = StudyJobStatus::Cancelled;
                job.progress = None;
                job.completed_at = Some(now_ms());
                AuditAction::Cancel
            }
            StudyJobStatus::Completed | StudyJobStatus::Error => {
                job.status = StudyJobStatus::Expired;
                job.expires_at = Some(now_ms());
                AuditAction::Delete
            }
            StudyJobStatus::Cancelled | StudyJobStatus::Expired => {
                return Err(StudyError::conflict(format!(
                    "export job {id} is already {}; there is nothing to cancel or delete",
                    before.as_str()
                )));
            }
        };
        if !self.ports.jobs.update_job(&job, before).await? {
            return Err(StudyError::conflict(format!(
                "export job {id} changed meanwhile; look at it again"
            )));
        }
        if let Some(engine) = &job.engine_job
            && self.exporter.mark_cancelled(engine).await?
        {
            self.exporter.discard(engine).await?;
        }
        self.delete_files(&job).await;
        let mut entry = caller.entry(action);
        describe(&mut entry, &job);
        append(self.ports.audit.as_ref(), entry).await?;
        Ok(job)
    }

    /// Deletes a job's files; a failure is logged (the retention sweep tries again later).
    pub async fn delete_files(&self, job: &StudyJob) {
        let prefix = format!("study-{}", job.id);
        if let Err(e) = self.ports.output.delete_job(&prefix).await {
            tracing::warn!(job = %job.id, error = %e, "could not delete a study export's files");
        }
        if let Some(engine) = &job.engine_job
            && let Err(e) = self.ports.output.delete_job(engine).await
        {
            tracing::warn!(job = %job.id, error = %e, "could not delete a study export's FHIR files");
        }
    }

    /// The file a download serves: the job's download, or one of its files by name. Audits the
    /// download.
    pub async fn downloadable(
        &self,
        caller: &Caller,
        id: &str,
        file: Option<&str>,
    ) -> Result<JobFile, StudyError> {
        let job = self.visible_job(caller, id).await?;
        match job.status {
            StudyJobStatus::Completed => {}
            StudyJobStatus::Pending => {
                return Err(StudyError::conflict(format!(
                    "export job {id} is not finished yet; download it once its status is completed"
                )));
            }
            StudyJobStatus::Expired => {
                return Err(StudyError::not_found(format!(
                    "the files of export job {id} were deleted after the study's retention period; generate the export again"
                )));
            }
            other => {
                return Err(StudyError::conflict(format!(
                    "export job {id} is {}: it has no file to download",
                    other.as_str()
                )));
            }
        }
        let chosen = match file {
            None => job.download.clone(),
            // `/files` lists the download too, so it is found by its name as well.
            Some(name) => job
                .download
                .iter()
                .chain(&job.files)
                .find(|f| f.name == name)
                .cloned(),
        }
        .ok_or_else(|| StudyError::not_found(format!("export job {id} has no such file")))?;
        let mut entry = caller.entry(AuditAction::Download);
        describe(&mut entry, &job);
        entry.digests = vec![FileDigest {
            name: chosen.name.clone(),
            size: chosen.size,
            sha256: chosen.sha256.clone(),
        }];
        append(self.ports.audit.as_ref(), entry).await?;
        Ok(chosen)
    }
}

/// Unknown sites and statuses, and a backwards date range, are EXP002 naming the field.
pub fn validate_filters(data: &StudyData, filters: &Filters) -> Result<(), StudyError> {
    if let Some(sites) = &filters.sites {
        if sites.is_empty() {
            return Err(StudyError::validation(
                "filters.sites",
                "filters.sites is empty; leave it out to export every site",
            ));
        }
        if let Some(unknown) = sites.iter().find(|s| data.site(s).is_none()) {
            return Err(StudyError::unprocessable(
                "filters.sites",
                format!("site {unknown} is not a site of study {}", data.study.id),
            ));
        }
    }
    if let Some(statuses) = &filters.statuses {
        if statuses.is_empty() {
            return Err(StudyError::validation(
                "filters.statuses",
                "filters.statuses is empty; leave it out to export every status",
            ));
        }
        let known = known_statuses();
        if let Some(unknown) = statuses.iter().find(|s| !known.contains(s.as_str())) {
            return Err(StudyError::validation(
                "filters.statuses",
                format!(
                    "{unknown} is not a ResearchSubject status; use one of {}",
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    if let Some(range) = &filters.date_range
        && let (Some(from), Some(to)) = (range.from, range.to)
        && from > to
    {
        return Err(StudyError::unprocessable(
            "filters.date_range",
            format!("date_range.from ({from}) is after date_range.to ({to})"),
        ));
    }
    Ok(())
}

/// Adds what the job is to an audit entry.
pub fn describe(entry: &mut AuditEntry, job: &StudyJob) {
    entry.study_id = Some(job.study_id.clone());
    entry.job_id = Some(job.id.clone());
    entry.export_type = Some(job.export_type.as_str().to_string());
    entry.filters = serde_json::to_value(&job.filters).ok();
    entry.options = serde_json::to_value(&job.options).ok();
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
