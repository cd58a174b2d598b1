//! The export engine: every step of a job's life, written once over the ports.
//!
//! The local server runs these steps in-process (see [`crate::runner`]); on AWS, Step Functions
//! calls `plan`, workers call `export_item`, and the coordinator calls `finalize` or `fail`.

use crate::error::{ApiError, StoreError, StoreResult};
use crate::fhir::compartment::in_patient_compartment;
use crate::fhir::outcome::{IssueCode, operation_outcome};
use crate::fhir::time::{Instant, now_millis};
use crate::ids::{new_id, stable_digest};
use crate::job::{Job, JobStatus};
use crate::manifest::{
    FILES_PER_MANIFEST_PAGE, deleted_part_key, deletion_bundle, manifest, part_key, progress_line,
    sort_parts,
};
use crate::params::{ExportLevel, ExportParams};
use crate::ports::{
    Cursor, ExportLock, JobStore, OutputStore, Page, PartRecord, PartWriter, PatientScope,
    ReadScope, ResourceStore, WorkItem,
};
use crate::provenance::{self, ProvenanceSelector};
use crate::read_ahead::{ReadAhead, cursor_after};
use crate::settings::Settings;
use crate::shaping::Shaping;
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use serde_json::Value;
use std::sync::Arc;

/// Bytes gathered before they are handed to a part writer.
const WRITE_CHUNK: usize = 256 * 1024;
/// Room past a chunk for the line that fills it, so it seldom has to grow.
const WRITE_SLACK: usize = 64 * 1024;

/// The adapters an engine works through.
#[derive(Clone)]
pub struct Ports {
    pub resources: Arc<dyn ResourceStore>,
    pub jobs: Arc<dyn JobStore>,
    pub lock: Arc<dyn ExportLock>,
    pub output: Arc<dyn OutputStore>,
}

/// Where an item stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Every resource of the item is in finished, recorded parts.
    Done,
    /// Stopped at a part boundary before the deadline; continue from here.
    Continue(ItemCursor),
    /// The job is no longer active; nothing more was written.
    Stopped,
}

/// A position inside a work item, always at a part boundary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemCursor {
    pub cursor: String,
    pub next_seq: u32,
}

/// What a status poll answers.
#[derive(Debug)]
pub enum JobView {
    /// `partial` is the first manifest page when `allowPartialManifests` is on and files are ready.
    Running {
        progress: String,
        partial: Option<Value>,
    },
    Completed {
        manifest: Value,
        expires: Instant,
    },
    Failed {
        diagnostics: String,
    },
}

/// A status poll's answer and how the client asked to receive it.
#[derive(Debug)]
pub struct StatusView {
    pub state: JobView,
    /// `Prefer: separate-export-status` was sent at kick-off.
    pub separate_status: bool,
}

/// The export engine.
pub struct Exporter {
    pub ports: Ports,
    pub settings: Settings,
    /// The patient set of the job whose items this process ran last. A set never changes once
    /// planned, and every work item of a Group or patient-list export reads all of it: without
    /// this, a 20,000-member Group's 768 items read 768 copies of the list. An async lock, held
    /// while the set is read, so the items that start together read it once between them.
    last_patient_set: tokio::sync::Mutex<Option<(String, Arc<Vec<String>>)>>,
}

impl Exporter {
    pub fn new(ports: Ports, settings: Settings) -> Self {
        Exporter {
            ports,
            settings,
            last_patient_set: tokio::sync::Mutex::new(None),
        }
    }

    /// Accepts a kick-off from an anonymous client (see [`Exporter::kickoff_for`]).
    pub async fn kickoff(
        &self,
        level: ExportLevel,
        params: ExportParams,
        request_url: String,
    ) -> Result<Job, ApiError> {
        Ok(self.kickoff_for(level, params, request_url, "").await?.0)
    }

    /// Accepts a kick-off: checks the Group and patients, takes the export lock, stores the job
    /// as `client`'s (the authenticated principal's id). When the lock is held by an identical
    /// kick-off of the same client, that running job is returned instead of `429`; the flag says
    /// whether the job is new.
    pub async fn kickoff_for(
        &self,
        level: ExportLevel,
        params: ExportParams,
        request_url: String,
        client: &str,
    ) -> Result<(Job, bool), ApiError> {
        let now = now_millis();
        let fingerprint = stable_digest(&[
            client,
            &serde_json::to_string(&level).map_err(StoreError::from)?,
            &serde_json::to_string(&params).map_err(StoreError::from)?,
        ]);
        let resources = &self.ports.resources;
        let members = match &level {
            ExportLevel::Group(group_id) => Some(
                resources
                    .group_members(group_id, now)
                    .await?
                    .ok_or_else(|| {
                        ApiError::not_found(format!("Group/{group_id} is not known to this server"))
                    })?,
            ),
            _ => None,
        };
        let mut params = params;
        if let Some(patients) = params.patients.take() {
            // Strict handling refuses the first unusable id; lenient handling leaves each one out
            // and says so in the error file (an empty list then exports nothing, never everything).
            let mut kept = Vec::with_capacity(patients.len());
            for patient in patients {
                let problem = if !resources.patient_exists(&patient, now).await? {
                    Some(format!(
                        "patient Patient/{patient} is not known to this server"
                    ))
                } else {
                    match (&members, &level) {
                        (Some(members), ExportLevel::Group(group_id))
                            if !members.contains(&patient) =>
                        {
                            Some(format!(
                                "Patient/{patient} is not a member of Group/{group_id}"
                            ))
                        }
                        _ => None,
                    }
                };
                match problem {
                    None => kept.push(patient),
                    Some(problem) if params.lenient => params.warnings.push(format!(
                        "{problem}; it was left out of the export (Prefer: handling=lenient)"
                    )),
                    Some(problem) => return Err(ApiError::invalid(problem)),
                }
            }
            params.patients = Some(kept);
        }

        let mut job = Job::new(new_id(), level, request_url, params, now);
        job.fingerprint = Some(fingerprint);
        job.owner = Some(client.to_string());
        if !self
            .ports
            .lock
            .acquire_for_job(&job, self.settings.lock_lease, now)
            .await?
        {
            if let Some(running) = self.identical_running(&job, now).await? {
                return Ok((running, false));
            }
            let mut busy = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                IssueCode::Throttled,
                "another export is in progress; only one export runs at a time, retry later",
            );
            busy.retry_after = Some(self.settings.busy_retry_after);
            return Err(busy);
        }
        tracing::info!(export_id = %job.id, export_level = ?job.level, "export accepted");
        Ok((job, true))
    }

    /// Renews a running job's lease on the export lock. `Ok(false)` means the lease was lost
    /// (it ran out and another export took the lock): the job is then failed rather than run
    /// beside the other export. The local runner and the AWS workers' heartbeats both call this.
    pub async fn renew_lease(&self, job_id: &str) -> StoreResult<bool> {
        let lease = self.settings.lock_lease;
        if self.ports.lock.renew(job_id, lease, now_millis()).await? {
            return Ok(true);
        }
        let still_active = self
            .ports
            .jobs
            .get(job_id)
            .await?
            .is_some_and(|j| j.status.is_active());
        if still_active {
            self.fail(job_id, "the export lost its lock lease to another export")
                .await?;
        }
        Ok(false)
    }

    /// Stores a job that runs without the single-export lock (a study export's FHIR part: study
    /// exports queue with bounded concurrency of their own). `params` are trusted: they come
    /// from the service, not from a kick-off.
    pub async fn create_unlocked(
        &self,
        level: ExportLevel,
        params: ExportParams,
        request_url: String,
        owner: &str,
    ) -> StoreResult<Job> {
        let mut job = Job::new(new_id(), level, request_url, params, now_millis());
        job.owner = Some(owner.to_string());
        self.ports.jobs.create(&job).await?;
        Ok(job)
    }

    /// Sets when a finished job's files are deleted (a study keeps its exports longer).
    pub async fn set_expiry(&self, job_id: &str, expires_at: Instant) -> StoreResult<()> {
        let mut job = self.job(job_id).await?;
        let status = job.status;
        job.expires_at = Some(expires_at);
        self.ports.jobs.update(&job, status).await?;
        Ok(())
    }

    /// The active job holding the lock, if it has the same fingerprint as `job`.
    async fn identical_running(&self, job: &Job, now: Instant) -> StoreResult<Option<Job>> {
        let Some(holder) = self.ports.lock.holder(now).await? else {
            return Ok(None);
        };
        let running = self.ports.jobs.get(&holder).await?;
        Ok(running.filter(|r| r.status.is_active() && r.fingerprint == job.fingerprint))
    }

    /// Cuts an accepted job into work items and stores them with the job's patient set.
    /// A job already planned is left as it is, so planning twice is harmless.
    pub async fn plan(&self, job_id: &str) -> StoreResult<Vec<WorkItem>> {
        let mut job = self.job(job_id).await?;
        if job.status != JobStatus::Accepted {
            return self.ports.jobs.items(job_id).await;
        }
        let resources = &self.ports.resources;
        let as_of = job.transaction_time;
        let patient_set = match &job.level {
            ExportLevel::System => None,
            ExportLevel::Patient => job.params.patients.clone(),
            ExportLevel::Group(group_id) => {
                let members = resources
                    .group_members(group_id, as_of)
                    .await?
                    .unwrap_or_default();
                let members: Vec<String> = match &job.params.patients {
                    Some(wanted) => members.into_iter().filter(|m| wanted.contains(m)).collect(),
                    None => members,
                };
                // A member whose Patient is deleted (or absent) at the transaction time has no
                // compartment to export, as at Patient level.
                let targets: Vec<(String, String)> = members
                    .iter()
                    .map(|m| ("Patient".to_string(), m.clone()))
                    .collect();
                let current = resources.resources_at(&targets, as_of).await?;
                Some(
                    members
                        .into_iter()
                        .zip(current)
                        .filter_map(|(member, version)| version.map(|_| member))
                        .collect(),
                )
            }
        };
        let listed = match patient_set {
            Some(mut set) => {
                set.sort_unstable();
                set.dedup();
                self.ports.jobs.put_patient_set(job_id, &set).await?;
                Some(set.len())
            }
            None => None,
        };

        let present = resources.resource_types().await?;
        let mut types: Vec<String> = match &job.params.types {
            Some(wanted) => wanted
                .iter()
                .filter(|t| present.contains(t))
                .cloned()
                .collect(),
            None => present.clone(),
        };
        if job.level != ExportLevel::System {
            types.retain(|t| in_patient_compartment(t));
        }
        // Provenance rides along with what it is about (includeAssociatedData may add it).
        types.retain(|t| t != "Provenance");
        if provenance::wanted(&job) && present.iter().any(|t| t == "Provenance") {
            types.push("Provenance".to_string());
        }
        types.sort_unstable();

        // With `_since`, each type also gets items listing what was deleted in the window.
        let kinds: &[bool] = if job.params.since.is_some() {
            &[false, true]
        } else {
            &[false]
        };
        let mut items = Vec::new();
        if job.params.organize_by.is_some() {
            items = self.block_items(&job, listed.is_some()).await?;
        }
        for &deleted in kinds {
            if job.params.organize_by.is_some() && !deleted {
                continue;
            }
            for resource_type in &types {
                // Provenance chosen by its targets: for a listed patient set one item looks them
                // up by target; otherwise the whole type is read in the store's partitions.
                let by_targets =
                    resource_type == "Provenance" && !deleted && provenance::by_association(&job);
                let partitions = match (by_targets, listed) {
                    (true, Some(_)) => 1,
                    (true, None) => resources.partitions(resource_type, None).await?,
                    (false, _) => resources.partitions(resource_type, listed).await?,
                }
                .max(1);
                for partition in 0..partitions {
                    let item = items.len() as u32;
                    items.push(WorkItem {
                        job_id: job_id.to_string(),
                        item,
                        resource_type: resource_type.clone(),
                        partition,
                        partitions,
                        deleted,
                    });
                }
            }
        }
        // Lenient-handling notes are known now: every manifest page can list them.
        self.write_error_file(&job).await?;
        self.ports.jobs.put_items(&items).await?;
        job.items_total = items.len() as u32;
        job.status = JobStatus::InProgress;
        if !self.ports.jobs.update(&job, JobStatus::Accepted).await? {
            return Err(StoreError::new(format!(
                "job {job_id} changed while it was being planned"
            )));
        }
        Ok(items)
    }

    /// Exports one work item into NDJSON parts, from its start or from `resume`.
    ///
    /// The data (fixed by the transaction time) and the size limits alone decide where parts
    /// begin and end, so a repeated or concurrent run writes identical parts under the same keys and
    /// re-records identical records: nothing is ever cleared, so a duplicate can never remove what
    /// another run wrote. With a `deadline`, the item stops at the first part boundary past it (a
    /// page read with no part open is one too; [`Settings::part_scan_limit`] bounds how much is
    /// read before a part ends) and returns where to continue. It starts from the furthest of
    /// `resume` and the progress recorded by any earlier run.
    pub async fn export_item(
        &self,
        item: &WorkItem,
        resume: Option<ItemCursor>,
        deadline: Option<std::time::Instant>,
    ) -> StoreResult<ItemOutcome> {
        let job = self.job(&item.job_id).await?;
        if !job.status.is_active() {
            return Ok(ItemOutcome::Stopped);
        }
        // A repeated delivery of a finished item changes nothing.
        if self
            .ports
            .jobs
            .is_item_complete(&item.job_id, item.item)
            .await?
        {
            return Ok(ItemOutcome::Done);
        }
        let resume = self.furthest(item, resume).await?;
        if job.params.organize_by.is_some() && !item.deleted {
            return self.export_blocks(&job, item, resume, deadline).await;
        }
        // Just after the last resource passed (written out only where recorded or read from).
        let (mut cursor, mut seq): (Option<Cursor>, u32) = match resume {
            Some(r) => (Some(Cursor::Text(r.cursor)), r.next_seq),
            None => (None, 0),
        };
        let mut scope = self.read_scope(&job, item).await?;
        let mut selector = None;
        // Ids of resources found another way than reading the store in order (sorted).
        let mut found: Option<Vec<String>> = None;
        if item.resource_type == "Provenance" && !item.deleted && provenance::by_association(&job) {
            let patients = std::mem::replace(&mut scope.patients, PatientScope::Everything);
            if let PatientScope::Listed(listed) = &patients {
                found = Some(
                    provenance::candidates_for(
                        self.ports.resources.as_ref(),
                        &job,
                        listed,
                        self.settings.page_size,
                    )
                    .await?,
                );
            }
            selector = Some(
                ProvenanceSelector::new(
                    self.ports.resources.as_ref(),
                    &job,
                    patients,
                    &scope,
                    found.as_deref(),
                    self.settings.page_size,
                )
                .await?,
            );
        }
        let skip_group = match &job.level {
            ExportLevel::Group(id) if item.resource_type == "Group" && !item.deleted => {
                Some(id.clone())
            }
            _ => None,
        };
        let shaping = Shaping::new(&job.params);
        let mut part: Option<OpenPart> = None;
        let mut last_job_check = std::time::Instant::now();
        let mut ahead: Option<ReadAhead> = None;

        loop {
            let from = cursor.as_ref().map(Cursor::to_string);
            let page = match &found {
                None if ahead.is_some() => ahead.take().expect("a read ahead").page().await?,
                Some(ids) => {
                    candidate_page(
                        self.ports.resources.as_ref(),
                        &job,
                        ids,
                        from.as_deref(),
                        self.settings.page_size,
                    )
                    .await?
                }
                None => {
                    self.ports
                        .resources
                        .read_page(&scope, from.as_deref(), self.settings.page_size)
                        .await?
                }
            };
            if found.is_none() && page.more && !self.ports.resources.reads_on_calling_thread() {
                ahead = Some(ReadAhead::start(
                    self.ports.resources.clone(),
                    scope.clone(),
                    cursor_after(&page, from.as_deref()),
                    self.settings.page_size,
                ));
            }
            // Provenance chosen by target: parse the page once and look its targets up in batches.
            let mut parsed: std::collections::VecDeque<Value> = Default::default();
            if let Some(selector) = &mut selector {
                for resource in &page.resources {
                    parsed.push_back(serde_json::from_slice(&resource.json)?);
                }
                selector.prefetch(parsed.make_contiguous()).await?;
            }
            for (resource, position) in page.resources.into_iter().zip(page.cursors) {
                let provenance = parsed.pop_front();
                // A file that read its share of the store ends before this resource.
                if part
                    .as_ref()
                    .is_some_and(|open| open.scanned >= self.settings.part_scan_limit)
                {
                    let open = part.take().expect("open part");
                    let at = cursor.as_ref().map(Cursor::to_string).unwrap_or_default();
                    seq += 1;
                    if let Some(stop) = self.cut(open, item, false, &at, seq, deadline).await? {
                        return Ok(stop);
                    }
                }
                if let Some(open) = &mut part {
                    open.scanned += 1;
                }
                if skip_group.as_deref() == Some(resource.id.as_str()) {
                    cursor = Some(position);
                    continue;
                }
                if let (Some(selector), Some(provenance)) = (&mut selector, &provenance)
                    && !selector.includes(provenance).await?
                {
                    cursor = Some(position);
                    continue;
                }
                let line = if item.deleted {
                    Some(Bytes::from(serde_json::to_vec(&deletion_bundle(
                        &item.resource_type,
                        &resource.id,
                    ))?))
                } else {
                    shaping.shape(&item.resource_type, resource.json)?
                };
                let Some(line) = line else {
                    cursor = Some(position);
                    continue;
                };
                let line_len = line.len() as u64 + 1;
                if let Some(open) = &part
                    && (open.bytes + line_len > self.settings.max_file_bytes
                        || open.count + 1 > self.settings.max_file_resources)
                {
                    let open = part.take().expect("open part");
                    let at = cursor.as_ref().map(Cursor::to_string).unwrap_or_default();
                    seq += 1;
                    if let Some(stop) = self.cut(open, item, false, &at, seq, deadline).await? {
                        return Ok(stop);
                    }
                }
                let open = match &mut part {
                    Some(open) => open,
                    None => {
                        let key = if item.deleted {
                            deleted_part_key(&item.job_id, &item.resource_type, item.partition, seq)
                        } else {
                            part_key(&item.job_id, &item.resource_type, item.partition, seq)
                        };
                        let writer = self.ports.output.create_part(&key).await?;
                        part.insert(OpenPart::new(key, seq, writer))
                    }
                };
                open.push(&line).await?;
                cursor = Some(position);
            }
            if !page.more {
                break;
            }
            if let Some(next) = page.next {
                cursor = Some(Cursor::Text(next));
            }
            // Between files, a worker past its deadline stops after any page: nothing is open.
            if part.is_none()
                && let Some(at) = &cursor
                && deadline.is_some_and(|d| std::time::Instant::now() >= d)
            {
                let at = at.to_string();
                self.ports
                    .jobs
                    .record_progress(&item.job_id, item.item, &at, seq)
                    .await?;
                return Ok(ItemOutcome::Continue(ItemCursor {
                    cursor: at,
                    next_seq: seq,
                }));
            }
            self.pause_after_page().await;
            if last_job_check.elapsed() >= std::time::Duration::from_millis(500) {
                last_job_check = std::time::Instant::now();
                if !self.still_active(&item.job_id).await? {
                    if let Some(open) = part {
                        open.writer.abort().await?;
                    }
                    return Ok(ItemOutcome::Stopped);
                }
            }
        }
        self.close_item(part, item).await
    }

    /// Closes a full part (its successor is `next_seq`) and records that the item goes on after
    /// `cursor`. Returns where the item stops instead of going on: the job is no longer active,
    /// or the deadline passed (continue from here).
    pub(crate) async fn cut(
        &self,
        part: OpenPart,
        item: &WorkItem,
        continues: bool,
        cursor: &str,
        next_seq: u32,
        deadline: Option<std::time::Instant>,
    ) -> StoreResult<Option<ItemOutcome>> {
        self.finish_part(part, item, continues).await?;
        if !self.still_active(&item.job_id).await? {
            return Ok(Some(ItemOutcome::Stopped));
        }
        self.ports
            .jobs
            .record_progress(&item.job_id, item.item, cursor, next_seq)
            .await?;
        Ok(deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
            .then(|| {
                ItemOutcome::Continue(ItemCursor {
                    cursor: cursor.to_string(),
                    next_seq,
                })
            }))
    }

    /// The later of the position a message carries and the one recorded for the item: a
    /// redelivered or retried message resumes after the last part any run finished.
    async fn furthest(
        &self,
        item: &WorkItem,
        resume: Option<ItemCursor>,
    ) -> StoreResult<Option<ItemCursor>> {
        let recorded = self.ports.jobs.progress(&item.job_id, item.item).await?;
        Ok(match (resume, recorded) {
            (Some(r), Some((cursor, next_seq))) if next_seq > r.next_seq => {
                Some(ItemCursor { cursor, next_seq })
            }
            (None, Some((cursor, next_seq))) => Some(ItemCursor { cursor, next_seq }),
            (resume, _) => resume,
        })
    }

    /// Finishes an item's last part, if any, and marks the item done. Like every finished part,
    /// the last one is followed by a look at the job, so a part completed after a cancel is
    /// deleted by the worker that wrote it.
    pub(crate) async fn close_item(
        &self,
        part: Option<OpenPart>,
        item: &WorkItem,
    ) -> StoreResult<ItemOutcome> {
        if let Some(open) = part {
            self.finish_part(open, item, false).await?;
            if !self.still_active(&item.job_id).await? {
                return Ok(ItemOutcome::Stopped);
            }
        }
        self.ports
            .jobs
            .complete_item(&item.job_id, item.item)
            .await?;
        Ok(ItemOutcome::Done)
    }

    /// Completes a job whose items are all done: writes its error file, marks it completed with
    /// its expiry, and frees the lock.
    pub async fn finalize(&self, job_id: &str) -> StoreResult<()> {
        let mut job = self.job(job_id).await?;
        if job.status != JobStatus::InProgress {
            return Ok(());
        }
        let done = self.ports.jobs.completed_items(job_id).await?.len();
        if done < job.items_total as usize {
            return Err(StoreError::new(format!(
                "job {job_id}: only {done} of {} items are done",
                job.items_total
            )));
        }
        let now = now_millis();
        job.status = JobStatus::Completed;
        job.completed_at = Some(now);
        job.expires_at = Some(now + self.settings.retention);
        if self.ports.jobs.update(&job, JobStatus::InProgress).await? {
            tracing::info!(export_id = %job_id, "export completed");
        }
        self.ports.lock.release(job_id).await
    }

    /// Marks a job failed, deletes its files and frees the lock. The job is marked and the lock
    /// freed even when deleting files fails (the bucket's lifecycle rule removes them later).
    pub async fn fail(&self, job_id: &str, diagnostics: &str) -> StoreResult<()> {
        let Some(mut job) = self.ports.jobs.get(job_id).await? else {
            return Ok(());
        };
        if job.status.is_active() {
            let expected = job.status;
            let now = now_millis();
            job.status = JobStatus::Failed;
            job.error = Some(diagnostics.to_string());
            job.completed_at = Some(now);
            job.expires_at = Some(now + self.settings.retention);
            if self.ports.jobs.update(&job, expected).await? {
                tracing::warn!(export_id = %job_id, %diagnostics, "export failed");
            }
        }
        let deleted = self.ports.output.delete_job(job_id).await;
        self.ports.lock.release(job_id).await?;
        if let Err(e) = deleted {
            tracing::warn!(export_id = %job_id, error = %e, "could not delete the files of a failed export");
        }
        Ok(())
    }

    /// Marks a job cancelled (active or finished). Returns `false` if there is no such job to cancel.
    /// The caller then stops its work and calls [`Exporter::discard`].
    pub async fn mark_cancelled(&self, job_id: &str) -> StoreResult<bool> {
        loop {
            let Some(mut job) = self.ports.jobs.get(job_id).await? else {
                return Ok(false);
            };
            if !job.status.can_become(JobStatus::Cancelled) {
                return Ok(false);
            }
            let expected = job.status;
            job.status = JobStatus::Cancelled;
            if self.ports.jobs.update(&job, expected).await? {
                tracing::info!(export_id = %job_id, "export cancelled");
                return Ok(true);
            }
        }
    }

    /// Deletes a cancelled or expired job's files and frees the lock if the job held it.
    pub async fn discard(&self, job_id: &str) -> StoreResult<()> {
        self.ports.output.delete_job(job_id).await?;
        self.ports.lock.release(job_id).await
    }

    /// Expires finished jobs whose retention is over: files deleted, status gone.
    pub async fn expire_due(&self, now: Instant) -> StoreResult<usize> {
        let due = self.ports.jobs.expired_jobs(now).await?;
        for job in &due {
            self.expire(job.clone()).await?;
        }
        Ok(due.len())
    }

    async fn expire(&self, mut job: Job) -> StoreResult<()> {
        let expected = job.status;
        job.status = JobStatus::Expired;
        self.ports.jobs.update(&job, expected).await?;
        self.discard(&job.id).await
    }

    /// What a status poll shows, or `None` when the job is unknown, cancelled or expired.
    pub async fn view(&self, job_id: &str, base_url: &str) -> StoreResult<Option<StatusView>> {
        let Some(job) = self.ports.jobs.get(job_id).await? else {
            return Ok(None);
        };
        let separate_status = job.params.separate_status;
        if let Some(expires) = job.expires_at
            && expires <= now_millis()
            && matches!(job.status, JobStatus::Completed | JobStatus::Failed)
        {
            self.expire(job).await?;
            return Ok(None);
        }
        let view = match job.status {
            JobStatus::Accepted | JobStatus::InProgress => {
                let done = self.ports.jobs.completed_count(job_id).await?;
                let parts = self.sorted_parts(job_id).await?;
                let written: u64 = parts.iter().filter(|p| !p.is_error).map(|p| p.count).sum();
                let partial = if job.params.allow_partial_manifests {
                    let pages = self.assign_manifest_pages(&job, &parts).await?;
                    match pages.is_empty() {
                        true => None,
                        false => Some(
                            self.page_manifest(&job, &parts, &pages, 0, base_url)
                                .await?,
                        ),
                    }
                } else {
                    None
                };
                JobView::Running {
                    progress: progress_line(&job, done, written),
                    partial,
                }
            }
            JobStatus::Completed => {
                let parts = self.sorted_parts(job_id).await?;
                let pages = self.assign_manifest_pages(&job, &parts).await?;
                JobView::Completed {
                    manifest: self
                        .page_manifest(&job, &parts, &pages, 0, base_url)
                        .await?,
                    expires: job.expires_at.unwrap_or(job.transaction_time),
                }
            }
            JobStatus::Failed => JobView::Failed {
                diagnostics: job.error.unwrap_or_default(),
            },
            JobStatus::Cancelled | JobStatus::Expired => return Ok(None),
        };
        Ok(Some(StatusView {
            state: view,
            separate_status,
        }))
    }

    /// Page `page` of a job's manifest, once it has been shown.
    pub async fn manifest_page(
        &self,
        job_id: &str,
        page: usize,
        base_url: &str,
    ) -> StoreResult<Option<Value>> {
        let Some(job) = self.ports.jobs.get(job_id).await? else {
            return Ok(None);
        };
        let live = job.status.is_active()
            || (job.status == JobStatus::Completed
                && job.expires_at.is_none_or(|e| e > now_millis()));
        if !live {
            return Ok(None);
        }
        let pages = self.ports.jobs.manifest_pages(job_id).await?;
        if page >= pages.len() {
            return Ok(None);
        }
        Ok(Some(
            self.page_manifest(
                &job,
                &self.sorted_parts(job_id).await?,
                &pages,
                page,
                base_url,
            )
            .await?,
        ))
    }

    /// Puts the finished parts no page lists yet into new pages of at most
    /// [`FILES_PER_MANIFEST_PAGE`] files, and answers every stored page. A page, once stored,
    /// never changes: its files are finished, and later files go to later pages. Pages are
    /// taken by conditional writes, so two polls at once never list a file twice: the one that
    /// loses reads what the other stored and pages only what is left.
    async fn assign_manifest_pages(
        &self,
        job: &Job,
        parts: &[PartRecord],
    ) -> StoreResult<Vec<Vec<String>>> {
        loop {
            let pages = self.ports.jobs.manifest_pages(&job.id).await?;
            let listed: std::collections::HashSet<&String> = pages.iter().flatten().collect();
            let fresh: Vec<&PartRecord> = parts
                .iter()
                .filter(|p| !p.is_error && !listed.contains(&p.key))
                .collect();
            if fresh.is_empty() && !(pages.is_empty() && job.status == JobStatus::Completed) {
                return Ok(pages);
            }
            // A completed job without files still has one (empty) page: its manifest.
            let mut chunks: Vec<Vec<String>> = fresh
                .chunks(FILES_PER_MANIFEST_PAGE)
                .map(|c| c.iter().map(|p| p.key.clone()).collect())
                .collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            let mut raced = false;
            for (n, keys) in chunks.iter().enumerate() {
                let page = u32::try_from(pages.len() + n).unwrap_or(u32::MAX);
                if !self
                    .ports
                    .jobs
                    .put_manifest_page(&job.id, page, keys)
                    .await?
                {
                    raced = true;
                    break;
                }
            }
            if !raced {
                return self.ports.jobs.manifest_pages(&job.id).await;
            }
        }
    }

    /// One manifest page: its files, the job's error files, and a link to the next page.
    async fn page_manifest(
        &self,
        job: &Job,
        parts: &[PartRecord],
        pages: &[Vec<String>],
        page: usize,
        base_url: &str,
    ) -> StoreResult<Value> {
        let keys: std::collections::HashSet<&String> = pages[page].iter().collect();
        let parts: Vec<PartRecord> = parts
            .iter()
            .filter(|p| p.is_error || keys.contains(&p.key))
            .cloned()
            .collect();
        let urls = self.urls(&parts, base_url).await?;
        let next = (page + 1 < pages.len())
            .then(|| format!("{base_url}/$export-status/{}/page/{}", job.id, page + 1));
        Ok(manifest(
            job,
            &parts,
            &urls,
            next.as_deref(),
            self.settings.requires_access_token,
        ))
    }

    /// A job's recorded parts, in manifest order (read once per status answer).
    async fn sorted_parts(&self, job_id: &str) -> StoreResult<Vec<PartRecord>> {
        let mut parts = self.ports.jobs.parts(job_id).await?;
        sort_parts(&mut parts);
        Ok(parts)
    }

    async fn urls(&self, parts: &[PartRecord], base_url: &str) -> StoreResult<Vec<String>> {
        let mut urls = Vec::with_capacity(parts.len());
        for part in parts {
            urls.push(match self.settings.requires_access_token {
                true => format!("{base_url}/$export-output/{}", part.key),
                false => self.ports.output.download_url(&part.key, base_url).await?,
            });
        }
        Ok(urls)
    }

    /// The recorded part behind a download key, if its job is completed and not expired, or
    /// still running and the part is listed in a manifest page already shown.
    pub async fn downloadable_part(&self, key: &str) -> StoreResult<Option<PartRecord>> {
        let Some((job_id, _)) = key.split_once('/') else {
            return Ok(None);
        };
        let Some(job) = self.ports.jobs.get(job_id).await? else {
            return Ok(None);
        };
        let live = match job.status {
            JobStatus::Completed => job.expires_at.is_none_or(|e| e > now_millis()),
            // A running job's file is downloadable once a manifest page has shown it.
            status if status.is_active() => {
                let pages = self.ports.jobs.manifest_pages(job_id).await?;
                pages.iter().flatten().any(|k| k == key)
            }
            _ => false,
        };
        if !live {
            return Ok(None);
        }
        self.ports.jobs.part(job_id, key).await
    }

    async fn job(&self, job_id: &str) -> StoreResult<Job> {
        self.ports
            .jobs
            .get(job_id)
            .await?
            .ok_or_else(|| StoreError::new(format!("job {job_id} does not exist")))
    }

    /// Whether the job is still accepted or running. When it was cancelled meanwhile, the files
    /// this worker may have finished after the cancel's own cleanup are deleted here.
    pub(crate) async fn still_active(&self, job_id: &str) -> StoreResult<bool> {
        let status = self.ports.jobs.get(job_id).await?.map(|j| j.status);
        if status == Some(JobStatus::Cancelled) {
            self.ports.output.delete_job(job_id).await?;
        }
        Ok(status.is_some_and(JobStatus::is_active))
    }

    async fn read_scope(&self, job: &Job, item: &WorkItem) -> StoreResult<ReadScope> {
        let patients = match (&job.level, &job.params.patients) {
            (ExportLevel::System, _) => PatientScope::Everything,
            (ExportLevel::Patient, None) => PatientScope::AllPatients,
            _ => PatientScope::Listed(self.planned_patient_set(&job.id).await?),
        };
        Ok(ReadScope {
            resource_type: item.resource_type.clone(),
            partition: item.partition,
            partitions: item.partitions,
            since: job.params.since,
            until: job.window_end(),
            as_of: job.transaction_time,
            patients,
            deleted: item.deleted,
        })
    }

    /// The job's planned patient set, read once per process and job (see `last_patient_set`).
    async fn planned_patient_set(&self, job_id: &str) -> StoreResult<Arc<Vec<String>>> {
        let mut last = self.last_patient_set.lock().await;
        if let Some((id, set)) = &*last
            && id == job_id
        {
            return Ok(set.clone());
        }
        let set = Arc::new(self.ports.jobs.patient_set(job_id).await?);
        *last = Some((job_id.to_string(), set.clone()));
        Ok(set)
    }

    /// After each page: the pause tests ask for (`Settings::page_delay`), so they can act while
    /// an export runs, or else a yield, where a stopped item is dropped: an item on its own
    /// thread whose I/O never waits would otherwise run to its end in one poll (see
    /// [`crate::runner`]).
    pub(crate) async fn pause_after_page(&self) {
        if !self.settings.page_delay.is_zero() {
            tokio::time::sleep(self.settings.page_delay).await;
        } else {
            tokio::task::yield_now().await;
        }
    }

    /// Closes a part and records it; `continues` says its last resource block goes on in the next.
    pub(crate) async fn finish_part(
        &self,
        part: OpenPart,
        item: &WorkItem,
        continues: bool,
    ) -> StoreResult<()> {
        let OpenPart {
            key,
            seq,
            mut writer,
            buffer,
            count,
            bytes,
            ..
        } = part;
        if !buffer.is_empty() {
            writer.write(buffer.freeze()).await?;
        }
        writer.finish().await?;
        let record = PartRecord {
            job_id: item.job_id.clone(),
            key,
            resource_type: if item.deleted {
                "Bundle".to_string()
            } else {
                item.resource_type.clone()
            },
            item: item.item,
            seq,
            count,
            bytes,
            is_error: false,
            is_deleted: item.deleted,
            continues,
        };
        self.ports.jobs.record_part(&record).await
    }

    /// The manifest's `error` file: one OperationOutcome line per parameter ignored under lenient
    /// handling and per other warning (severity `warning`), and per note (`information`).
    async fn write_error_file(&self, job: &Job) -> StoreResult<()> {
        let warnings = job
            .params
            .ignored
            .iter()
            .map(|name| {
                format!(
                    "parameter {name} is not supported and was ignored (Prefer: handling=lenient)"
                )
            })
            .chain(job.params.warnings.iter().cloned())
            .map(|m| operation_outcome("warning", IssueCode::NotSupported, &m));
        let notes = job
            .params
            .notes
            .iter()
            .map(|m| operation_outcome("information", IssueCode::Informational, m));
        let messages: Vec<serde_json::Value> = warnings.chain(notes).collect();
        if messages.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        for outcome in &messages {
            serde_json::to_writer(&mut body, outcome)?;
            body.push(b'\n');
        }
        let key = format!("{}/OperationOutcome/error-0000.ndjson", job.id);
        let mut writer = self.ports.output.create_part(&key).await?;
        let bytes = body.len() as u64;
        writer.write(Bytes::from(body)).await?;
        writer.finish().await?;
        let record = PartRecord {
            job_id: job.id.clone(),
            key,
            resource_type: "OperationOutcome".into(),
            item: u32::MAX,
            seq: 0,
            count: messages.len() as u64,
            bytes,
            is_error: true,
            is_deleted: false,
            continues: false,
        };
        self.ports.jobs.record_part(&record).await
    }
}

/// A part being written: lines are gathered into `buffer` and handed over in large chunks.
pub(crate) struct OpenPart {
    pub(crate) key: String,
    pub(crate) seq: u32,
    pub(crate) writer: Box<dyn PartWriter>,
    pub(crate) buffer: BytesMut,
    pub(crate) count: u64,
    pub(crate) bytes: u64,
    /// Resources read from the store since the part was opened, kept or not.
    pub(crate) scanned: u64,
}

impl OpenPart {
    /// An empty part that will be written under `key`.
    pub(crate) fn new(key: String, seq: u32, writer: Box<dyn PartWriter>) -> OpenPart {
        OpenPart {
            key,
            seq,
            writer,
            buffer: BytesMut::with_capacity(WRITE_CHUNK + WRITE_SLACK),
            count: 0,
            bytes: 0,
            scanned: 0,
        }
    }

    pub(crate) async fn push(&mut self, line: &[u8]) -> StoreResult<()> {
        self.buffer.extend_from_slice(line);
        self.buffer.extend_from_slice(b"\n");
        self.count += 1;
        self.bytes += line.len() as u64 + 1;
        if self.buffer.len() >= WRITE_CHUNK {
            let chunk = self.buffer.split().freeze();
            // A fresh buffer of full size: growing an empty one by doubling copied each chunk
            // several times over.
            self.buffer = BytesMut::with_capacity(WRITE_CHUNK + WRITE_SLACK);
            self.writer.write(chunk).await?;
        }
        Ok(())
    }
}

/// A page of the candidate `ids` (sorted) after the id `cursor`, read from the store.
async fn candidate_page(
    store: &dyn ResourceStore,
    job: &Job,
    ids: &[String],
    cursor: Option<&str>,
    limit: usize,
) -> StoreResult<Page> {
    let start = cursor.map_or(0, |c| ids.partition_point(|id| id.as_str() <= c));
    let chunk = &ids[start..(start + limit.max(1)).min(ids.len())];
    let resources = provenance::load_candidates(store, job, chunk).await?;
    Ok(Page {
        cursors: resources.iter().map(|r| r.id.to_string().into()).collect(),
        more: start + chunk.len() < ids.len(),
        // Past the candidates left out (no longer current, or outside the window).
        next: chunk.last().cloned(),
        resources,
    })
}
