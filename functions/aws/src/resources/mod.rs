//! The FHIR data in DynamoDB, laid out for export.
//!
//! One table, `pk`/`sk` strings:
//!
//! | item | pk | sk | holds |
//! |---|---|---|---|
//! | version | `r#<type>#<shard>` | `<lastUpdated µs, 20 digits>#<id>#<version>` | body, `lu`, `sup`, patients, `del` |
//! | compartment entry | `p#<patient>` | `<type>#<id>#<version>` | body, `lu`, `sup`, patients, `del`, `h` |
//! | history | `h#<type>#<id>` | `v<version>` | `v`, `lu`, `sup`, `shard`, `vsk`, patients, `del`, `h` |
//! | current pointer | `h#<type>#<id>` | `current` | `v`, `lu`, `shard`, `vsk`, patients, `del`, `h` |
//! | type registry | `types` | `<type>` | |
//! | Provenance by target | `t#<type>/<id>` | `prov` | `ids` (string set of Provenance ids) |
//! | table settings | `config` | `table` | `shards`, `bucket` ([`table_config`]) |
//!
//! Each type's versions are spread over `shards` partitions, so workers read one type in
//! parallel, and sorted by lastUpdated, so `_since`/`_until` read only their window. A version's
//! `sup` is the lastUpdated of the version that replaced it: an export reads the version current
//! at its transaction time. The compartment entries are written at load time, so a Patient or Group
//! export reads its members' entries and never scans the store. A deletion is a version with
//! `del = 1` that keeps the compartments of the version it deletes.
//!
//! What does not fit an item goes to S3 ([`blobs`]): a body is the `body` string, or `bref`, the
//! key of an object in the table's bucket; the patients are the `pats` list, or for a version in
//! many compartments (a big Group) `pref`, the key of a sorted JSON list. The entries of such a
//! wide version carry no `sup` of their own: they are visible while the history item of their
//! version has the same content hash `h` and no `sup` at the export's time, so one transaction
//! still supersedes them all ([`write`]). The shard count and the bucket are stored with the data
//! ([`table_config`]).

pub mod blobs;
pub mod table_config;
mod write;

use crate::dynamo::{DynamoTable, Item, SortKeys, get_n, get_s, get_string_list};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use blobs::{BlobRef, Blobs};
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::fhir::reference;
use export_core::fhir::time::{Instant, from_micros, to_micros};
use export_core::ports::{
    NewResource, Page, PatientScope, ReadScope, ResourceStore, ResourceVersion, StoredResource,
};
use futures_util::StreamExt;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use table_config::{Requested, TableConfig};

/// Patients per work item when an export is limited to a patient set.
const PATIENTS_PER_PARTITION: usize = 50;
/// Known Patient creation times kept in memory before the cache is cleared.
const PATIENT_CACHE_LIMIT: usize = 100_000;
/// Bodies fetched from S3 at once for one page (they are put back in the page's order).
const BODY_FETCHES: usize = 8;

/// The resource table.
pub struct DynamoResourceStore {
    table: DynamoTable,
    requested: Requested,
    /// The table's stored settings, once read (or written).
    config: Mutex<Option<TableConfig>>,
    /// S3, for bodies and patient lists too big for an item.
    blobs: Option<Blobs>,
    /// For "does this patient exist at the export's transaction time": the transaction time the
    /// answers are for, and patient id → answer.
    patient_exists_at: Mutex<(i64, HashMap<String, bool>)>,
}

/// A sortable, fixed-width form of a lastUpdated in microseconds.
fn lu_key(micros: i64) -> String {
    format!("{:020}", micros.max(0))
}

/// The shard of a resource id (FNV-1a, stable across processes and versions).
pub fn shard_of(id: &str, shards: u32) -> u32 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % shards.max(1) as u64) as u32
}

fn version_pk(resource_type: &str, shard: u32) -> String {
    format!("r#{resource_type}#{shard:03}")
}

fn history_pk(resource_type: &str, id: &str) -> String {
    format!("h#{resource_type}#{id}")
}

impl DynamoResourceStore {
    /// A store that expects `shards` partitions per type: a new table gets that count, and
    /// writing into a table that holds another one is an error (reads use the stored count).
    pub fn new(table: DynamoTable, shards: u32) -> Self {
        DynamoResourceStore {
            table,
            requested: Requested {
                shards: shards.max(1),
                shards_fixed: true,
                bucket: None,
            },
            config: Mutex::new(None),
            blobs: None,
            patient_exists_at: Mutex::new((i64::MIN, HashMap::new())),
        }
    }

    /// Uses whatever shard count the table holds; the one given to [`Self::new`] is only for a new
    /// table.
    pub fn shards_from_table(mut self) -> Self {
        self.requested.shards_fixed = false;
        self
    }

    /// Reads bodies and patient lists kept in S3 with `s3`; `bucket` is where this process puts
    /// new ones (a table that names another bucket refuses its writes).
    pub fn with_bodies(mut self, s3: aws_sdk_s3::Client, bucket: Option<String>) -> Self {
        self.blobs = Some(Blobs::new(s3));
        self.requested.bucket = bucket.filter(|b| !b.is_empty());
        self
    }

    /// The table's settings: stored ones once they exist, else what this process was given.
    pub async fn table_config(&self) -> StoreResult<TableConfig> {
        if let Some(config) = self.config.lock().expect("config").clone() {
            return Ok(config);
        }
        match table_config::read(&self.table).await? {
            Some(stored) => {
                *self.config.lock().expect("config") = Some(stored.clone());
                Ok(stored)
            }
            // Nothing written yet: not remembered, so the first writer's settings are seen.
            None => Ok(TableConfig {
                shards: self.requested.shards,
                bucket: self.requested.bucket.clone(),
            }),
        }
    }

    /// The stored settings for a write: written first if the table has none; an error if they
    /// contradict what this process was given (a load checks this before it reads its files).
    pub async fn table_config_for_write(&self) -> StoreResult<TableConfig> {
        let cached = self.config.lock().expect("config").clone();
        if let Some(config) = cached
            && (config.bucket.is_some() || self.requested.bucket.is_none())
        {
            table_config::check(&config, &self.requested)?;
            return Ok(config);
        }
        let stored = table_config::read_for_write(&self.table, &self.requested).await?;
        *self.config.lock().expect("config") = Some(stored.clone());
        Ok(stored)
    }

    /// The S3 object an item's `attribute` names.
    async fn blob(&self, item: &Item, attribute: &str) -> StoreResult<Option<(&Blobs, BlobRef)>> {
        let Some(key) = get_s(item, attribute) else {
            return Ok(None);
        };
        let blobs = self.blobs.as_ref().ok_or_else(|| {
            StoreError::new("a resource is kept in S3, but this store has no S3 client")
        })?;
        let bucket = self.table_config().await?.bucket.ok_or_else(|| {
            StoreError::new("a resource is kept in S3, but the table names no bucket")
        })?;
        Ok(Some((blobs, BlobRef { bucket, key })))
    }

    /// The body of a version item or compartment entry.
    async fn body_of(&self, item: &Item) -> StoreResult<Bytes> {
        if let Some(body) = get_s(item, "body") {
            return Ok(Bytes::from(body));
        }
        match self.blob(item, "bref").await? {
            Some((blobs, blob)) => blobs.get(&blob).await,
            None => Err(StoreError::new("resource item without body")),
        }
    }

    /// The resources of some items, in their order; bodies kept in S3 are fetched a few at a
    /// time.
    async fn stored_all(&self, items: &[Item]) -> StoreResult<Vec<StoredResource>> {
        // By index: a closure over `&Item` trips the `Send` check of the async trait.
        let bodies: Vec<StoreResult<Bytes>> = futures_util::stream::iter(0..items.len())
            .map(|i| self.body_of(&items[i]))
            .buffered(BODY_FETCHES)
            .collect()
            .await;
        items
            .iter()
            .zip(bodies)
            .map(|(item, body)| {
                Ok(StoredResource {
                    id: get_s(item, "id").unwrap_or_default().into(),
                    json: body?,
                })
            })
            .collect()
    }

    /// The patients whose compartments hold an item's version (sorted when kept in S3).
    async fn patients_of(&self, item: &Item) -> StoreResult<Arc<Vec<String>>> {
        match self.blob(item, "pref").await? {
            Some((blobs, blob)) => blobs.patients(&blob).await,
            None => Ok(Arc::new(get_string_list(item, "pats"))),
        }
    }

    /// The history item of `type/id` current at `as_of`.
    async fn version_at(
        &self,
        resource_type: &str,
        id: &str,
        as_of: i64,
    ) -> StoreResult<Option<HashMap<String, AttributeValue>>> {
        let items = self
            .table
            .query_all(&history_pk(resource_type, id), Some("v"), None)
            .await?;
        Ok(items
            .into_iter()
            .rev()
            .find(|item| {
                let lu = get_n(item, "lu").unwrap_or(i64::MAX);
                lu <= as_of && get_n(item, "sup").is_none_or(|sup| sup > as_of)
            })
            .filter(|item| !is_deletion(item)))
    }

    /// Which of the given patients exist at `as_of`, from the cache or one batch read of their
    /// first version (creation) and current pointer (a deletion at or before `as_of`).
    async fn patients_existing(
        &self,
        ids: &BTreeSet<String>,
        as_of: i64,
    ) -> StoreResult<HashMap<String, bool>> {
        let mut known = HashMap::new();
        let mut missing = Vec::new();
        {
            let mut cache = self.patient_exists_at.lock().expect("cache");
            if cache.0 != as_of || cache.1.len() > PATIENT_CACHE_LIMIT {
                *cache = (as_of, HashMap::new());
            }
            for id in ids {
                match cache.1.get(id) {
                    Some(exists) => {
                        known.insert(id.clone(), *exists);
                    }
                    None => missing.push(id.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(known);
        }
        let keys: Vec<(String, String)> = missing
            .iter()
            .flat_map(|id| {
                let pk = history_pk("Patient", id);
                [
                    (pk.clone(), format!("v{:010}", 1)),
                    (pk, "current".to_string()),
                ]
            })
            .collect();
        let mut created: HashMap<String, i64> = HashMap::new();
        let mut deleted: HashMap<String, i64> = HashMap::new();
        for item in self.table.batch_get(&keys).await? {
            let (Some(pk), Some(sk), Some(lu)) =
                (get_s(&item, "pk"), get_s(&item, "sk"), get_n(&item, "lu"))
            else {
                continue;
            };
            let id = pk.trim_start_matches("h#Patient#").to_string();
            if sk == "current" {
                if is_deletion(&item) {
                    deleted.insert(id, lu);
                }
            } else {
                created.insert(id, lu);
            }
        }
        let mut cache = self.patient_exists_at.lock().expect("cache");
        for id in missing {
            let exists = created.get(&id).is_some_and(|c| *c <= as_of)
                && deleted.get(&id).is_none_or(|d| *d > as_of);
            if cache.0 == as_of {
                cache.1.insert(id.clone(), exists);
            }
            known.insert(id, exists);
        }
        Ok(known)
    }

    async fn page_by_time(
        &self,
        scope: &ReadScope,
        cursor: Option<&str>,
        limit: usize,
        any_patient: bool,
    ) -> StoreResult<Page> {
        let pk = version_pk(&scope.resource_type, scope.partition);
        let from = lu_key(scope.since.map_or(0, |t| to_micros(t) + 1));
        let to = format!("{}#~", lu_key(to_micros(scope.until)));
        let as_of = to_micros(scope.as_of);
        let (items, last) = self
            .table
            .query_page(&pk, SortKeys::Between(&from, &to), cursor, limit)
            .await?;
        let mut page = Page {
            more: last.is_some(),
            next: last.clone(),
            ..Page::default()
        };
        let mut candidates = Vec::new();
        for item in items {
            if get_n(&item, "sup").is_some_and(|sup| sup <= as_of)
                || is_deletion(&item) != scope.deleted
            {
                continue;
            }
            candidates.push(item);
        }
        let mut kept = Vec::with_capacity(candidates.len());
        if any_patient {
            let mut patients = Vec::with_capacity(candidates.len());
            for item in &candidates {
                patients.push(self.patients_of(item).await?);
            }
            let wanted: BTreeSet<String> =
                patients.iter().flat_map(|p| p.iter().cloned()).collect();
            let existing = self.patients_existing(&wanted, as_of).await?;
            for (item, patients) in candidates.into_iter().zip(patients) {
                if patients
                    .iter()
                    .any(|p| existing.get(p).copied().unwrap_or(false))
                {
                    kept.push(item);
                }
            }
        } else {
            kept = candidates;
        }
        page.cursors = kept
            .iter()
            .map(|item| get_s(item, "sk").unwrap_or_default().into())
            .collect();
        page.resources = self.stored_all(&kept).await?;
        if !page.more {
            page.next = None;
        }
        Ok(page)
    }

    /// Reads the compartment entries of this partition's slice of a listed patient set. A
    /// resource in several listed compartments is read only under the first of those patients.
    async fn page_by_patient(
        &self,
        scope: &ReadScope,
        patients: &[String],
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page> {
        let chunk = patients
            .len()
            .div_ceil(scope.partitions.max(1) as usize)
            .max(1);
        let start = (scope.partition as usize * chunk).min(patients.len());
        let end = (start + chunk).min(patients.len());
        let (mut index, mut after) = match cursor {
            Some(c) => {
                let (i, sk) = c
                    .split_once('|')
                    .ok_or_else(|| StoreError::new(format!("bad cursor '{c}'")))?;
                (
                    i.parse::<usize>()
                        .map_err(|_| StoreError::new(format!("bad cursor '{c}'")))?,
                    (!sk.is_empty()).then(|| sk.to_string()),
                )
            }
            None => (start, None),
        };
        let (since, until, as_of) = (
            scope.since.map_or(i64::MIN, to_micros),
            to_micros(scope.until),
            to_micros(scope.as_of),
        );
        let prefix = format!("{}#", scope.resource_type);
        let mut page = Page::default();
        let mut kept = Vec::new();
        while index < end && kept.len() < limit {
            let patient = &patients[index];
            let (items, last) = self
                .table
                .query_page(
                    &format!("p#{patient}"),
                    SortKeys::Prefix(&prefix),
                    after.as_deref(),
                    limit - kept.len(),
                )
                .await?;
            let superseded = self.wide_superseded(&scope.resource_type, &items).await?;
            for item in items {
                let sk = get_s(&item, "sk").unwrap_or_default();
                let lu = get_n(&item, "lu").unwrap_or(i64::MAX);
                let sup = match item.contains_key("pref") {
                    false => Some(get_n(&item, "sup")),
                    true => superseded.get(&sk).copied(),
                };
                let visible = lu > since
                    && lu <= until
                    && sup.is_some_and(|sup| sup.is_none_or(|sup| sup > as_of))
                    && is_deletion(&item) == scope.deleted;
                if visible && !self.owned_earlier(&item, patient, patients).await? {
                    kept.push(item);
                    page.cursors.push(format!("{index}|{sk}").into());
                }
                after = Some(sk);
            }
            if last.is_none() {
                index += 1;
                after = None;
            }
        }
        page.resources = self.stored_all(&kept).await?;
        page.more = index < end;
        page.next = Some(format!("{index}|{}", after.unwrap_or_default()));
        Ok(page)
    }
}

impl DynamoResourceStore {
    /// For the entries of wide versions (`pref`) among `items`: entry `sk` → the `sup` of its
    /// version's history item (`None`: current), for those whose history item exists with the
    /// same content hash. An entry left by a write that never completed has none: not visible.
    async fn wide_superseded(
        &self,
        resource_type: &str,
        items: &[Item],
    ) -> StoreResult<HashMap<String, Option<i64>>> {
        let mut wanted = Vec::new();
        let mut by_history = HashMap::new();
        for item in items.iter().filter(|i| i.contains_key("pref")) {
            let (Some(sk), Some(id)) = (get_s(item, "sk"), get_s(item, "id")) else {
                continue;
            };
            let Some((_, version)) = sk.rsplit_once('#') else {
                continue;
            };
            let key = (history_pk(resource_type, &id), format!("v{version}"));
            by_history.insert(key.clone(), (sk.clone(), get_s(item, "h")));
            wanted.push(key);
        }
        let mut superseded = HashMap::new();
        if wanted.is_empty() {
            return Ok(superseded);
        }
        for history in self.table.batch_get(&wanted).await? {
            let key = (
                get_s(&history, "pk").unwrap_or_default(),
                get_s(&history, "sk").unwrap_or_default(),
            );
            if let Some((sk, hash)) = by_history.get(&key)
                && hash.is_some()
                && get_s(&history, "h") == *hash
            {
                superseded.insert(sk.clone(), get_n(&history, "sup"));
            }
        }
        Ok(superseded)
    }

    /// Whether a resource read in `patient`'s compartment is also in the compartment of a listed
    /// patient that sorts before it (it is exported there, once). Lists kept in S3 are sorted, so
    /// the scan stops at `patient`.
    async fn owned_earlier(
        &self,
        item: &Item,
        patient: &str,
        listed: &[String],
    ) -> StoreResult<bool> {
        let patients = self.patients_of(item).await?;
        let earlier_listed =
            |other: &String| other.as_str() < patient && listed.binary_search(other).is_ok();
        Ok(match item.contains_key("pref") {
            true => patients
                .iter()
                .take_while(|other| other.as_str() < patient)
                .any(earlier_listed),
            false => patients.iter().any(earlier_listed),
        })
    }
}

/// Whether an item is (or points at) a version that deletes its resource.
fn is_deletion(item: &HashMap<String, AttributeValue>) -> bool {
    get_n(item, "del") == Some(1)
}

/// The key of the version item a history item or current pointer names.
fn version_key(resource_type: &str, history: &HashMap<String, AttributeValue>) -> (String, String) {
    (
        version_pk(resource_type, get_n(history, "shard").unwrap_or(0) as u32),
        get_s(history, "vsk").unwrap_or_default(),
    )
}

#[async_trait]
impl ResourceStore for DynamoResourceStore {
    async fn resource_types(&self) -> StoreResult<Vec<String>> {
        let items = self.table.query_all("types", None, None).await?;
        Ok(items.iter().filter_map(|i| get_s(i, "sk")).collect())
    }

    async fn partitions(
        &self,
        _resource_type: &str,
        listed_patients: Option<usize>,
    ) -> StoreResult<u32> {
        Ok(match listed_patients {
            Some(n) => n.div_ceil(PATIENTS_PER_PARTITION).clamp(1, 256) as u32,
            None => self.table_config().await?.shards,
        })
    }

    async fn patient_exists(&self, id: &str, as_of: Instant) -> StoreResult<bool> {
        Ok(self
            .version_at("Patient", id, to_micros(as_of))
            .await?
            .is_some())
    }

    async fn resource_at(
        &self,
        resource_type: &str,
        id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<ResourceVersion>> {
        let target = [(resource_type.to_string(), id.to_string())];
        Ok(self.resources_at(&target, as_of).await?.pop().flatten())
    }

    /// Batch reads: the current pointers, then the version items they name. A resource changed
    /// after `as_of` (its pointer is newer) falls back to the history query.
    async fn resources_at(
        &self,
        targets: &[(String, String)],
        as_of: Instant,
    ) -> StoreResult<Vec<Option<ResourceVersion>>> {
        let as_of_micros = to_micros(as_of);
        let pointers = self.current_pointers(targets).await?;
        // Where each answer comes from: a version item to fetch, or a history lookup.
        let mut wanted_items: Vec<(String, String)> = Vec::new();
        let mut plan: Vec<Option<(String, String)>> = Vec::with_capacity(targets.len());
        for (resource_type, id) in targets {
            let pointer = pointers.get(&history_pk(resource_type, id));
            let key = match pointer {
                None => None,
                Some(p) if get_n(p, "lu").unwrap_or(i64::MAX) > as_of_micros => self
                    .version_at(resource_type, id, as_of_micros)
                    .await?
                    .map(|h| version_key(resource_type, &h)),
                Some(p) if is_deletion(p) => None,
                Some(p) => Some(version_key(resource_type, p)),
            };
            if let Some(key) = &key {
                wanted_items.push(key.clone());
            }
            plan.push(key);
        }
        let items: HashMap<(String, String), HashMap<String, AttributeValue>> = self
            .table
            .batch_get(&wanted_items)
            .await?
            .into_iter()
            .filter_map(|item| Some(((get_s(&item, "pk")?, get_s(&item, "sk")?), item)))
            .collect();
        let found: Vec<Option<&Item>> = plan
            .into_iter()
            .map(|key| key.and_then(|k| items.get(&k)))
            .collect();
        let present: Vec<Item> = found.iter().flatten().map(|i| (*i).clone()).collect();
        let mut bodies = self.stored_all(&present).await?.into_iter();
        let mut versions = Vec::with_capacity(found.len());
        for item in found {
            let Some(item) = item else {
                versions.push(None);
                continue;
            };
            versions.push(Some(ResourceVersion {
                json: bodies.next().map(|b| b.json).unwrap_or_default(),
                last_updated: from_micros(get_n(item, "lu").unwrap_or(0)),
                patients: self.patients_of(item).await?.to_vec(),
            }));
        }
        Ok(versions)
    }

    async fn provenance_targeting(&self, targets: &[String]) -> StoreResult<Vec<String>> {
        let mut ids = BTreeSet::new();
        for chunk in targets.chunks(100) {
            let keys: Vec<(String, String)> = chunk
                .iter()
                .map(|t| (format!("t#{t}"), "prov".to_string()))
                .collect();
            for item in self.table.batch_get(&keys).await? {
                if let Some(AttributeValue::Ss(set)) = item.get("ids") {
                    ids.extend(set.iter().cloned());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    async fn group_members(
        &self,
        group_id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<Vec<String>>> {
        let Some(version) = self.resource_at("Group", group_id, as_of).await? else {
            return Ok(None);
        };
        let group: Value = serde_json::from_slice(&version.json)?;
        Ok(Some(reference::group_patient_members(&group)))
    }

    async fn read_page(
        &self,
        scope: &ReadScope,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page> {
        match &scope.patients {
            PatientScope::Everything => self.page_by_time(scope, cursor, limit, false).await,
            PatientScope::AllPatients => self.page_by_time(scope, cursor, limit, true).await,
            PatientScope::Listed(patients) => {
                self.page_by_patient(scope, patients, cursor, limit).await
            }
        }
    }

    /// Writes a batch, each version atomically with its current pointer and the superseded marks
    /// of the version it replaces (see [`write`]).
    async fn put_resources(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        let mut seen = std::collections::HashSet::new();
        let mut batches: Vec<Vec<NewResource>> = vec![Vec::new()];
        for r in resources {
            // The same type/id twice in one batch: its second version goes in a later batch.
            if !seen.insert((r.resource_type.clone(), r.id.clone())) {
                seen.clear();
                seen.insert((r.resource_type.clone(), r.id.clone()));
                batches.push(Vec::new());
            }
            batches.last_mut().expect("batch").push(r);
        }
        for batch in batches {
            self.put_batch(batch).await?;
        }
        Ok(())
    }
}

impl DynamoResourceStore {
    /// The current pointers of `(type, id)`s, by their history partition key.
    async fn current_pointers(
        &self,
        targets: &[(String, String)],
    ) -> StoreResult<HashMap<String, HashMap<String, AttributeValue>>> {
        let keys: Vec<(String, String)> = targets
            .iter()
            .map(|(t, id)| (history_pk(t, id), "current".to_string()))
            .collect();
        Ok(self
            .table
            .batch_get(&keys)
            .await?
            .into_iter()
            .filter_map(|item| get_s(&item, "pk").map(|pk| (pk, item)))
            .collect())
    }
}
