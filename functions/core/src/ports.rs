//! The ports: what the export engine needs from the outside world. Each has a local adapter
//! (SQLite, files, tokio tasks) and an AWS adapter (DynamoDB, S3, Step Functions + SQS).

use crate::error::StoreResult;
use crate::fhir::time::Instant;
use crate::job::{Job, JobStatus};
use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Which patients' compartments a work item reads.
#[derive(Debug, Clone)]
pub enum PatientScope {
    /// No compartment restriction (system level).
    Everything,
    /// The compartment of any Patient that exists at the transaction time.
    AllPatients,
    /// The compartments of these patients (sorted, unique).
    Listed(Arc<Vec<String>>),
}

/// What one work item reads: a type, a partition of it, a time window and a patient scope.
#[derive(Debug, Clone)]
pub struct ReadScope {
    pub resource_type: String,
    pub partition: u32,
    /// How many partitions the type (or the patient set) was cut into.
    pub partitions: u32,
    /// Exclusive lower bound on lastUpdated (`_since`).
    pub since: Option<Instant>,
    /// Inclusive upper bound on lastUpdated: `min(_until, transactionTime)`.
    pub until: Instant,
    /// The version of each resource current at this instant is the one read.
    pub as_of: Instant,
    pub patients: PatientScope,
    /// Read the resources whose version current at `as_of` is a deletion (deleted in the
    /// window) instead of the live ones.
    pub deleted: bool,
}

impl ReadScope {
    /// One type of a job's window, over the compartments of `patients`, in one partition.
    pub fn of_patients(job: &Job, resource_type: &str, patients: Arc<Vec<String>>) -> ReadScope {
        ReadScope {
            resource_type: resource_type.to_string(),
            partition: 0,
            partitions: 1,
            since: job.params.since,
            until: job.window_end(),
            as_of: job.transaction_time,
            patients: PatientScope::Listed(patients),
            deleted: false,
        }
    }
}

/// Reads every page of `scope` in order, handing each page's resources to `each`.
pub async fn read_all(
    store: &dyn ResourceStore,
    scope: &ReadScope,
    page_size: usize,
    mut each: impl FnMut(&[StoredResource]) -> StoreResult<()>,
) -> StoreResult<()> {
    let mut cursor: Option<String> = None;
    loop {
        let page = store.read_page(scope, cursor.as_deref(), page_size).await?;
        each(&page.resources)?;
        if !page.more {
            return Ok(());
        }
        cursor = page.resume_after();
    }
}

/// Where a read resumes, just after one resource; as text, what `read_page` takes. A store
/// whose positions are row numbers gives numbers: the engine writes a position out only where
/// it records or resumes one (a part's end, the next page), not for each resource it passes
/// (a `String` per resource was ~3% of a system export's CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// Written out in decimal.
    Row(i64),
    Text(String),
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cursor::Row(row) => write!(f, "{row}"),
            Cursor::Text(text) => f.write_str(text),
        }
    }
}

impl From<String> for Cursor {
    fn from(text: String) -> Self {
        Cursor::Text(text)
    }
}

/// One stored resource as read for export.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub id: ResourceId,
    /// The resource as minified JSON, one line, no newline.
    pub json: Bytes,
}

impl Page {
    /// Where the read goes on after this page: past the rows the store skipped, else after its
    /// last resource (`None` for an empty page the store gave no position for).
    pub fn resume_after(&self) -> Option<String> {
        self.next
            .clone()
            .or_else(|| self.cursors.last().map(Cursor::to_string))
    }
}

/// A page of an item's resources, in a stable order.
#[derive(Debug, Default)]
pub struct Page {
    pub resources: Vec<StoredResource>,
    /// `cursors[i]` resumes the read just after `resources[i]`.
    pub cursors: Vec<Cursor>,
    /// More may follow.
    pub more: bool,
    /// Where the next page starts (past any rows the store skipped).
    pub next: Option<String>,
}

/// One resource's version current at some instant, read by type and id.
#[derive(Debug, Clone)]
pub struct ResourceVersion {
    pub json: Bytes,
    pub last_updated: Instant,
    /// Patients whose compartment holds this version.
    pub patients: Vec<String>,
}

/// A resource to write into the store.
#[derive(Debug, Clone)]
pub struct NewResource {
    pub resource_type: String,
    pub id: String,
    pub last_updated: Instant,
    /// Minified JSON of the resource; `meta.lastUpdated` and `meta.versionId` are set by the store.
    pub json: serde_json::Value,
    /// Patients whose compartment holds this resource (for a deletion: taken from the version
    /// it deletes).
    pub patients: Vec<String>,
    /// This version deletes the resource; a later version re-creates it.
    pub deleted: bool,
}

impl NewResource {
    /// What identifies a version's content: the hex SHA-256 of its type, id, lastUpdated,
    /// deletion, patients and body without `meta.versionId`. A store adds no version when this
    /// is the current version's, so loading the same line again changes nothing (and a retried
    /// write adds nothing), on every store alike.
    pub fn content_digest(&self) -> StoreResult<String> {
        let mut json = self.json.clone();
        if let Some(meta) = json
            .get_mut("meta")
            .and_then(serde_json::Value::as_object_mut)
        {
            meta.remove("versionId");
        }
        let mut patients = self.patients.clone();
        patients.sort();
        patients.dedup();
        let text = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.resource_type,
            self.id,
            crate::fhir::time::to_micros(self.last_updated),
            self.deleted,
            patients.join(","),
            serde_json::to_string(&json)?
        );
        Ok(crate::ids::sha256_hex(text.as_bytes()))
    }
}

/// The FHIR data being exported.
#[async_trait]
pub trait ResourceStore: Send + Sync {
    /// The resource types that have at least one resource.
    async fn resource_types(&self) -> StoreResult<Vec<String>>;
    /// How many partitions one type is cut into so several workers can read it in parallel;
    /// `listed_patients` is the size of the patient set when the export is limited to one.
    async fn partitions(
        &self,
        resource_type: &str,
        listed_patients: Option<usize>,
    ) -> StoreResult<u32>;
    /// Whether Patient `id` exists (and is not deleted) at `as_of`.
    async fn patient_exists(&self, id: &str, as_of: Instant) -> StoreResult<bool>;
    /// The Patient ids of `Group.member.entity` at `as_of`, or `None` if the Group does not exist.
    async fn group_members(
        &self,
        group_id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<Vec<String>>>;
    /// The version of `resource_type/id` current at `as_of`, or `None` if there is none or it is
    /// a deletion (used to decide whether a Provenance's target is in an export).
    async fn resource_at(
        &self,
        resource_type: &str,
        id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<ResourceVersion>>;
    /// [`ResourceStore::resource_at`] for many `(type, id)` at once, in order; stores with
    /// batch reads answer in a few round trips.
    async fn resources_at(
        &self,
        targets: &[(String, String)],
        as_of: Instant,
    ) -> StoreResult<Vec<Option<ResourceVersion>>> {
        let mut out = Vec::with_capacity(targets.len());
        for (resource_type, id) in targets {
            out.push(self.resource_at(resource_type, id, as_of).await?);
        }
        Ok(out)
    }
    /// Ids of the Provenance resources whose `target` has ever named one of `targets`
    /// (`Type/id`), sorted and unique. A reverse index written at load time, so Group exports
    /// find the Provenance of their resources without reading every Provenance.
    async fn provenance_targeting(&self, targets: &[String]) -> StoreResult<Vec<String>>;
    /// Up to `limit` resources of `scope` after `cursor`.
    async fn read_page(
        &self,
        scope: &ReadScope,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page>;
    /// Writes resources, each replacing the earlier version of the same type and id.
    async fn put_resources(&self, resources: Vec<NewResource>) -> StoreResult<()>;
    /// Whether [`ResourceStore::read_page`] does its work on the calling thread (a local store
    /// on an item thread, see [`crate::item_thread`]): then reading the next page ahead would
    /// only hand the same work to another thread. A store that waits on the network reads ahead.
    fn reads_on_calling_thread(&self) -> bool {
        false
    }
}

/// A finished NDJSON file of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub job_id: String,
    /// Storage key, `<job>/<type>/<partition>-<seq>.ndjson`.
    pub key: String,
    /// The resource type of every line (`OperationOutcome` for error files).
    pub resource_type: String,
    pub item: u32,
    pub seq: u32,
    pub count: u64,
    pub bytes: u64,
    /// Error file (OperationOutcome lines) rather than output.
    pub is_error: bool,
    /// Deleted-resources file (transaction Bundles of DELETE requests), the manifest's `deleted`.
    #[serde(default)]
    pub is_deleted: bool,
    /// With `organizeOutputBy`: the last resource block goes on in the next part (`seq + 1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continues: bool,
}

/// A unit of work: one partition of one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    pub job_id: String,
    pub item: u32,
    pub resource_type: String,
    pub partition: u32,
    pub partitions: u32,
    /// Lists the type's resources deleted in the `_since` window rather than exporting live ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Job state, work items and finished parts.
#[async_trait]
pub trait JobStore: Send + Sync {
    async fn create(&self, job: &Job) -> StoreResult<()>;
    async fn get(&self, id: &str) -> StoreResult<Option<Job>>;
    /// Writes `job` only if the stored status is still `expected`; returns whether it did.
    async fn update(&self, job: &Job, expected: JobStatus) -> StoreResult<bool>;
    /// Jobs that are accepted or in progress (to resume after a restart).
    async fn active_jobs(&self) -> StoreResult<Vec<Job>>;
    /// Completed or failed jobs whose retention ended by `now`.
    async fn expired_jobs(&self, now: Instant) -> StoreResult<Vec<Job>>;

    async fn put_patient_set(&self, job_id: &str, patients: &[String]) -> StoreResult<()>;
    async fn patient_set(&self, job_id: &str) -> StoreResult<Vec<String>>;

    async fn put_items(&self, items: &[WorkItem]) -> StoreResult<()>;
    async fn items(&self, job_id: &str) -> StoreResult<Vec<WorkItem>>;
    /// Marks an item done (idempotent).
    async fn complete_item(&self, job_id: &str, item: u32) -> StoreResult<()>;
    async fn completed_items(&self, job_id: &str) -> StoreResult<Vec<u32>>;
    /// How many items are done, for a status poll's progress: a store that counts without
    /// listing every item (a job may have thousands) answers it cheaper than `completed_items`.
    async fn completed_count(&self, job_id: &str) -> StoreResult<usize> {
        Ok(self.completed_items(job_id).await?.len())
    }
    /// Whether one item is done.
    async fn is_item_complete(&self, job_id: &str, item: u32) -> StoreResult<bool> {
        Ok(self.completed_items(job_id).await?.contains(&item))
    }

    /// Records how far an item got: every part before `next_seq` is finished and recorded, and
    /// the item goes on after the store position `cursor`. A retried delivery resumes there
    /// instead of redoing the item; a store may keep only the furthest position. Stores whose
    /// runner never retries an item keep nothing.
    async fn record_progress(
        &self,
        _job_id: &str,
        _item: u32,
        _cursor: &str,
        _next_seq: u32,
    ) -> StoreResult<()> {
        Ok(())
    }
    /// The furthest position recorded by [`JobStore::record_progress`]: `(cursor, next_seq)`.
    async fn progress(&self, _job_id: &str, _item: u32) -> StoreResult<Option<(String, u32)>> {
        Ok(None)
    }

    /// Records a finished part; recording the same key again replaces it (idempotent).
    async fn record_part(&self, part: &PartRecord) -> StoreResult<()>;
    async fn parts(&self, job_id: &str) -> StoreResult<Vec<PartRecord>>;
    /// One recorded part: a download asks for one file of a job that may have thousands.
    async fn part(&self, job_id: &str, key: &str) -> StoreResult<Option<PartRecord>> {
        Ok(self.parts(job_id).await?.into_iter().find(|p| p.key == key))
    }

    /// Stores page `page` of a job's manifest (the part keys it lists) unless that page is
    /// stored already; returns whether this call stored it. A page never changes once stored,
    /// and pages live beside the job, not in it, so the job never grows with their number.
    async fn put_manifest_page(
        &self,
        job_id: &str,
        page: u32,
        keys: &[String],
    ) -> StoreResult<bool>;
    /// A job's stored manifest pages, in page order.
    async fn manifest_pages(&self, job_id: &str) -> StoreResult<Vec<Vec<String>>>;
}

/// The single-active-export lock: a lease with an owner token.
#[async_trait]
pub trait ExportLock: Send + Sync {
    /// Takes the lock for `owner` if it is free or its lease ended; returns whether it was taken.
    async fn acquire(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool>;
    /// Takes the lock for `job` (its id is the owner) and stores the job, in one atomic step:
    /// a crash can never leave a lock without its job (blocking every export until the lease
    /// ends) nor a job without the lock. Returns whether the lock was taken (the job is stored
    /// only then).
    async fn acquire_for_job(&self, job: &Job, lease: Duration, now: Instant) -> StoreResult<bool>;
    /// Extends the lease if `owner` still holds it.
    async fn renew(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool>;
    /// Frees the lock if `owner` holds it.
    async fn release(&self, owner: &str) -> StoreResult<()>;
    /// Who holds the lock now (a lease that ended counts as free).
    async fn holder(&self, now: Instant) -> StoreResult<Option<String>>;
}

/// Bytes of a stored file, streamed.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Writes one part; nothing is visible under its key until `finish`.
#[async_trait]
pub trait PartWriter: Send {
    async fn write(&mut self, data: Bytes) -> StoreResult<()>;
    /// Makes the part visible, complete, under its key.
    async fn finish(self: Box<Self>) -> StoreResult<()>;
    /// Drops what was written.
    async fn abort(self: Box<Self>) -> StoreResult<()>;
}

/// Where NDJSON files go and how clients fetch them.
#[async_trait]
pub trait OutputStore: Send + Sync {
    async fn create_part(&self, key: &str) -> StoreResult<Box<dyn PartWriter>>;
    /// The URL a client downloads `key` from, given the server's FHIR base URL.
    async fn download_url(&self, key: &str, base_url: &str) -> StoreResult<String>;
    /// The file's bytes, when this server serves downloads itself.
    async fn open(&self, key: &str) -> StoreResult<Option<ByteStream>>;
    /// The file's bytes for the service itself (packaging a ZIP), wherever they are kept; the
    /// bytes as written, never re-encoded for transport.
    async fn read(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        self.open(key).await
    }
    /// Where to send a client whose download route is checked by this server but whose bytes
    /// come from storage (a fresh presigned URL); `None` when [`OutputStore::open`] serves them.
    async fn redirect_url(&self, _key: &str) -> StoreResult<Option<String>> {
        Ok(None)
    }
    /// Deletes every file of a job.
    async fn delete_job(&self, job_id: &str) -> StoreResult<()>;
}

/// Starts and stops the work of jobs.
#[async_trait]
pub trait Dispatcher: Send + Sync {
    async fn start(&self, job_id: &str) -> StoreResult<()>;
    async fn cancel(&self, job_id: &str) -> StoreResult<()>;
}

/// A resource's id as read for export. A store may hand out slices of one buffer per page, so
/// reading a page allocates nothing per resource (a `String` per id, allocated by the reader and
/// freed by the writer, was ~8% of a system export's CPU).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ResourceId(Bytes);

impl ResourceId {
    /// An id from bytes, which must be UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(ResourceId(bytes))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks or is given UTF-8 (`from_utf8`, `From<String>`,
        // `From<&str>`), and the bytes never change after.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl std::ops::Deref for ResourceId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for ResourceId {
    fn from(id: String) -> Self {
        ResourceId(Bytes::from(id))
    }
}

impl From<&str> for ResourceId {
    fn from(id: &str) -> Self {
        ResourceId(Bytes::copy_from_slice(id.as_bytes()))
    }
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod resource_id_tests {
    use super::*;

    #[test]
    fn an_id_is_its_text_whichever_way_it_was_made() {
        let from_bytes = ResourceId::from_utf8(Bytes::from_static(b"obs-\xc3\xa9")).unwrap();
        assert_eq!(from_bytes.as_str(), "obs-é");
        assert_eq!(from_bytes, ResourceId::from("obs-é"));
        assert_eq!(from_bytes, ResourceId::from("obs-é".to_string()));
        assert_eq!(format!("{from_bytes} {from_bytes:?}"), "obs-é \"obs-é\"");
        assert!(ResourceId::from_utf8(Bytes::from_static(b"\xff")).is_err());
    }
}

#[cfg(test)]
mod content_digest_tests {
    use super::*;
    use crate::fhir::time::from_micros;
    use serde_json::json;

    fn resource(json: serde_json::Value, patients: &[&str]) -> NewResource {
        NewResource {
            resource_type: "Observation".into(),
            id: "o1".into(),
            last_updated: from_micros(1_000_000),
            json,
            patients: patients.iter().map(|p| p.to_string()).collect(),
            deleted: false,
        }
    }

    #[test]
    fn the_content_digest_ignores_only_the_version_id_and_patient_order() {
        let a = resource(
            json!({"meta": {"versionId": "1"}, "status": "final"}),
            &["p1", "p2"],
        );
        let b = resource(
            json!({"meta": {"versionId": "7"}, "status": "final"}),
            &["p2", "p1", "p1"],
        );
        assert_eq!(a.content_digest().unwrap(), b.content_digest().unwrap());
        for changed in [
            resource(json!({"meta": {}, "status": "amended"}), &["p1", "p2"]),
            resource(
                json!({"meta": {"versionId": "1"}, "status": "final"}),
                &["p1"],
            ),
            NewResource {
                last_updated: from_micros(2_000_000),
                ..a.clone()
            },
            NewResource {
                deleted: true,
                ..a.clone()
            },
            NewResource {
                id: "o2".into(),
                ..a.clone()
            },
        ] {
            assert_ne!(
                a.content_digest().unwrap(),
                changed.content_digest().unwrap(),
                "{changed:?}"
            );
        }
    }
}
