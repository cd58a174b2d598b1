//! The FHIR data in DynamoDB, laid out for export.
//!
//! One table, `pk`/`sk` strings:
//!
//! | item | pk | sk | holds |
//! |---|---|---|---|
//! | version | `r#<type>#<shard>` | `<lastUpdated µs, 20 digits>#<id>#<version>` | body, `lu`, `sup`, `pats`, `del` |
//! | compartment entry | `p#<patient>` | `<type>#<id>#<version>` | body, `lu`, `sup`, `pats`, `del` |
//! | history | `h#<type>#<id>` | `v<version>` | `lu`, `sup`, `shard`, `vsk`, `del` |
//! | current pointer | `h#<type>#<id>` | `current` | `v`, `lu`, `shard`, `vsk`, `pats`, `del` |
//! | type registry | `types` | `<type>` | |
//! | Provenance by target | `t#<type>/<id>` | `prov` | `ids` (string set of Provenance ids) |
//!
//! Each type's versions are spread over `shards` partitions, so workers read one type in
//! parallel, and sorted by lastUpdated, so `_since`/`_until` read only their window. A version's
//! `sup` is the lastUpdated of the version that replaced it: an export reads the version current
//! at its transaction time. The compartment entries are written at load time, so a Patient or Group
//! export reads its members' entries and never scans the store. A deletion is a version with
//! `del = 1` that keeps the compartments of the version it deletes.

use crate::dynamo::{
    DynamoTable, SortKeys, attr_n, attr_s, attr_string_list, get_n, get_s, get_string_list,
};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::fhir::reference;
use export_core::fhir::time::{Instant, from_micros, to_micros};
use export_core::ports::{
    NewResource, Page, PatientScope, ReadScope, ResourceStore, ResourceVersion, StoredResource,
};
use export_core::provenance;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// Patients per work item when an export is limited to a patient set.
const PATIENTS_PER_PARTITION: usize = 50;
/// Known Patient creation times kept in memory before the cache is cleared.
const PATIENT_CACHE_LIMIT: usize = 100_000;

/// The resource table.
pub struct DynamoResourceStore {
    table: DynamoTable,
    shards: u32,
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
    pub fn new(table: DynamoTable, shards: u32) -> Self {
        DynamoResourceStore {
            table,
            shards: shards.max(1),
            patient_exists_at: Mutex::new((i64::MIN, HashMap::new())),
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
        let existing = if any_patient {
            let wanted: BTreeSet<String> = candidates.iter().flat_map(patients_attr).collect();
            Some(self.patients_existing(&wanted, as_of).await?)
        } else {
            None
        };
        for item in candidates {
            if let Some(existing) = &existing {
                let in_compartment = patients_attr(&item)
                    .iter()
                    .any(|p| existing.get(p).copied().unwrap_or(false));
                if !in_compartment {
                    continue;
                }
            }
            page.cursors.push(get_s(&item, "sk").unwrap_or_default());
            page.resources.push(stored(&item)?);
        }
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
        while index < end && page.resources.len() < limit {
            let patient = &patients[index];
            let (items, last) = self
                .table
                .query_page(
                    &format!("p#{patient}"),
                    SortKeys::Prefix(&prefix),
                    after.as_deref(),
                    limit - page.resources.len(),
                )
                .await?;
            for item in items {
                let sk = get_s(&item, "sk").unwrap_or_default();
                let lu = get_n(&item, "lu").unwrap_or(i64::MAX);
                let visible = lu > since
                    && lu <= until
                    && get_n(&item, "sup").is_none_or(|sup| sup > as_of)
                    && is_deletion(&item) == scope.deleted;
                let owned_earlier = patients_attr(&item)
                    .iter()
                    .any(|other| other < patient && patients.binary_search(other).is_ok());
                if visible && !owned_earlier {
                    page.resources.push(stored(&item)?);
                    page.cursors.push(format!("{index}|{sk}"));
                }
                after = Some(sk);
            }
            if last.is_none() {
                index += 1;
                after = None;
            }
        }
        page.more = index < end;
        page.next = Some(format!("{index}|{}", after.unwrap_or_default()));
        Ok(page)
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

fn patients_attr(item: &HashMap<String, AttributeValue>) -> Vec<String> {
    get_string_list(item, "pats")
}

fn stored(item: &HashMap<String, AttributeValue>) -> StoreResult<StoredResource> {
    let body = get_s(item, "body").ok_or_else(|| StoreError::new("resource item without body"))?;
    Ok(StoredResource {
        id: get_s(item, "id").unwrap_or_default(),
        json: Bytes::from(body),
    })
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
            None => self.shards,
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
        plan.into_iter()
            .map(|key| {
                let Some(item) = key.and_then(|k| items.get(&k)) else {
                    return Ok(None);
                };
                Ok(Some(ResourceVersion {
                    json: stored(item)?.json,
                    last_updated: from_micros(get_n(item, "lu").unwrap_or(0)),
                    patients: patients_attr(item),
                }))
            })
            .collect()
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

    /// Writes a batch: new items with batched writes (unprocessed items retried), then marks the
    /// versions they replace as superseded.
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

    async fn put_batch(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        let targets: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.resource_type.clone(), r.id.clone()))
            .collect();
        let current = self.current_pointers(&targets).await?;
        let mut puts = Vec::new();
        let mut supersede = Vec::new();
        let mut types = BTreeSet::new();
        let mut provenance_by_target: std::collections::BTreeMap<String, Vec<String>> =
            Default::default();
        for mut r in resources {
            let hpk = history_pk(&r.resource_type, &r.id);
            let previous = current.get(&hpk);
            if r.deleted {
                // Deleting what does not exist (or is already deleted) changes nothing; a
                // deletion stays in the compartments of the version it deletes.
                match previous {
                    Some(p) if !is_deletion(p) => r.patients = patients_attr(p),
                    _ => continue,
                }
            }
            let version = previous.and_then(|p| get_n(p, "v")).unwrap_or(0) + 1;
            if let Some(meta) = r.json.get_mut("meta").and_then(Value::as_object_mut) {
                meta.insert("versionId".into(), Value::String(version.to_string()));
            }
            if r.resource_type == "Provenance" && !r.deleted {
                for target in provenance::targets(&r.json) {
                    provenance_by_target
                        .entry(target)
                        .or_default()
                        .push(r.id.clone());
                }
            }
            let body = serde_json::to_string(&r.json)?;
            let lu = to_micros(r.last_updated);
            let shard = shard_of(&r.id, self.shards);
            let vsk = format!("{}#{}#{version:010}", lu_key(lu), r.id);
            let pats = attr_string_list(&r.patients);
            let mut version_item = HashMap::from([
                (
                    "pk".to_string(),
                    attr_s(&version_pk(&r.resource_type, shard)),
                ),
                ("sk".to_string(), attr_s(&vsk)),
                ("id".to_string(), attr_s(&r.id)),
                ("lu".to_string(), attr_n(lu)),
                ("body".to_string(), attr_s(&body)),
            ]);
            if !r.patients.is_empty() {
                version_item.insert("pats".into(), pats.clone());
            }
            let deletion_mark = r.deleted.then(|| ("del".to_string(), attr_n(1)));
            version_item.extend(deletion_mark.clone());
            puts.push(version_item);
            for patient in &r.patients {
                let mut entry = HashMap::from([
                    ("pk".to_string(), attr_s(&format!("p#{patient}"))),
                    (
                        "sk".to_string(),
                        attr_s(&format!("{}#{}#{version:010}", r.resource_type, r.id)),
                    ),
                    ("id".to_string(), attr_s(&r.id)),
                    ("lu".to_string(), attr_n(lu)),
                    ("body".to_string(), attr_s(&body)),
                    ("pats".to_string(), pats.clone()),
                ]);
                entry.extend(deletion_mark.clone());
                puts.push(entry);
            }
            let history = |sk: String| {
                let mut item = HashMap::from([
                    ("pk".to_string(), attr_s(&hpk)),
                    ("sk".to_string(), attr_s(&sk)),
                    ("v".to_string(), attr_n(version)),
                    ("lu".to_string(), attr_n(lu)),
                    ("shard".to_string(), attr_n(shard as i64)),
                    ("vsk".to_string(), attr_s(&vsk)),
                    ("pats".to_string(), pats.clone()),
                ]);
                item.extend(deletion_mark.clone());
                item
            };
            puts.push(history(format!("v{version:010}")));
            puts.push(history("current".to_string()));
            types.insert(r.resource_type.clone());
            if let Some(previous) = previous {
                supersede.push((r.resource_type.clone(), r.id.clone(), previous.clone(), lu));
            }
        }
        for t in types {
            puts.push(HashMap::from([
                ("pk".to_string(), attr_s("types")),
                ("sk".to_string(), attr_s(&t)),
            ]));
        }
        self.table.batch_put(puts).await?;
        for (target, ids) in provenance_by_target {
            self.table
                .add_to_set(&format!("t#{target}"), "prov", "ids", &ids)
                .await?;
        }
        for (resource_type, id, previous, lu) in supersede {
            let version = get_n(&previous, "v").unwrap_or(1);
            let shard = get_n(&previous, "shard").unwrap_or(0) as u32;
            let mut keys = vec![
                (history_pk(&resource_type, &id), format!("v{version:010}")),
                (
                    version_pk(&resource_type, shard),
                    get_s(&previous, "vsk").unwrap_or_default(),
                ),
            ];
            for patient in patients_attr(&previous) {
                keys.push((
                    format!("p#{patient}"),
                    format!("{resource_type}#{id}#{version:010}"),
                ));
            }
            for (pk, sk) in keys {
                self.table.set_number(&pk, &sk, "sup", lu).await?;
            }
        }
        Ok(())
    }
}
