//! Provenance that accompanies an export. At Patient and Group level (and whenever
//! `includeAssociatedData` asks for it) a Provenance is exported when one of its targets is a
//! resource the export contains; `LatestProvenanceResources` keeps only the most recent
//! Provenance (by `recorded`) of each such resource. Targets are checked against the store at the
//! export's transaction time, with the same type, window, compartment and `_typeFilter` rules the
//! export applies, so both deployments decide alike.

use crate::error::StoreResult;
use crate::fhir::compartment::in_patient_compartment;
use crate::fhir::reference;
use crate::job::Job;
use crate::params::{AssociatedProvenance, ExportLevel};
use crate::ports::{
    PatientScope, ReadScope, ResourceStore, ResourceVersion, StoredResource, read_all,
};
use crate::type_filter::TypeFilters;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

const PROVENANCE: &str = "Provenance";
/// Target decisions remembered per work item before the memory is cleared.
const CACHE_LIMIT: usize = 100_000;

/// Whether the job's Provenance items select by target rather than reading Provenance as an
/// ordinary type.
pub fn by_association(job: &Job) -> bool {
    job.level != ExportLevel::System || job.params.associated.is_some()
}

/// Whether Provenance is exported at all by a job over these present types.
pub fn wanted(job: &Job) -> bool {
    job.params.associated.is_some() || job.params.wants_type(PROVENANCE)
}

/// Decides, Provenance by Provenance, what an associated-Provenance item exports.
pub struct ProvenanceSelector<'a> {
    store: &'a dyn ResourceStore,
    job: &'a Job,
    patients: PatientScope,
    filters: TypeFilters,
    /// `Type/id` → whether that resource is in the export.
    in_export: HashMap<String, bool>,
    /// Patient id → exists at the transaction time (for the all-patients scope).
    patient_exists: HashMap<String, bool>,
    /// For `Latest`: `Type/id` of an exported resource → id of its most recent Provenance.
    latest: Option<HashMap<String, (String, String)>>,
}

impl<'a> ProvenanceSelector<'a> {
    /// `patients` is the job's patient scope; `partitions` is how many partitions the Provenance
    /// type has (the `Latest` rule reads all of them once to find each target's latest).
    /// `candidates`, when given, are all the Provenance that can be exported (see
    /// [`candidates_for`]); `Latest` then compares those instead of reading the whole type.
    pub async fn new(
        store: &'a dyn ResourceStore,
        job: &'a Job,
        patients: PatientScope,
        scope: &ReadScope,
        candidates: Option<&[String]>,
        page_size: usize,
    ) -> StoreResult<ProvenanceSelector<'a>> {
        let mut selector = ProvenanceSelector {
            store,
            job,
            patients,
            filters: job.params.compiled_type_filters(),
            in_export: HashMap::new(),
            patient_exists: HashMap::new(),
            latest: None,
        };
        if job.params.associated == Some(AssociatedProvenance::Latest) {
            let mut latest = HashMap::new();
            match candidates {
                Some(ids) => {
                    for chunk in ids.chunks(page_size.max(1)) {
                        latest_of(&load_candidates(store, job, chunk).await?, &mut latest)?;
                    }
                }
                None => {
                    selector
                        .latest_by_target(scope, page_size, &mut latest)
                        .await?
                }
            }
            selector.latest = Some(latest);
        }
        Ok(selector)
    }

    /// Whether `provenance` is exported.
    pub async fn includes(&mut self, provenance: &Value) -> StoreResult<bool> {
        let id = provenance.get("id").and_then(Value::as_str).unwrap_or("");
        for target in targets(provenance) {
            // By compartment: Provenance asked for as a type, about a patient in scope.
            if self.job.level != ExportLevel::System
                && self.job.params.associated.is_none()
                && target.starts_with("Patient/")
                && self.patient_in_scope(&target["Patient/".len()..]).await?
            {
                return Ok(true);
            }
            if !self.target_in_export(&target).await? {
                continue;
            }
            match &self.latest {
                Some(latest) if latest.get(&target).map(|(_, p)| p.as_str()) != Some(id) => {}
                _ => return Ok(true),
            }
        }
        Ok(false)
    }

    /// One pass over every Provenance: the latest (by `recorded`, then id) of each target.
    async fn latest_by_target(
        &self,
        scope: &ReadScope,
        page_size: usize,
        latest: &mut HashMap<String, (String, String)>,
    ) -> StoreResult<()> {
        for partition in 0..scope.partitions.max(1) {
            let scope = ReadScope {
                partition,
                ..scope.clone()
            };
            read_all(self.store, &scope, page_size, |page| {
                latest_of(page, latest)
            })
            .await?;
        }
        Ok(())
    }

    /// Whether `Type/id` is one of the resources this export writes.
    async fn target_in_export(&mut self, target: &str) -> StoreResult<bool> {
        if let Some(known) = self.in_export.get(target) {
            return Ok(*known);
        }
        let Some((resource_type, id)) = target.split_once('/') else {
            return Ok(false);
        };
        let version = match self.type_exported(resource_type) {
            true => {
                self.store
                    .resource_at(resource_type, id, self.job.transaction_time)
                    .await?
            }
            false => None,
        };
        let decision = self.decide(resource_type, version).await?;
        if self.in_export.len() >= CACHE_LIMIT {
            self.in_export.clear();
        }
        self.in_export.insert(target.to_string(), decision);
        Ok(decision)
    }

    /// Looks up, in batches, what [`ProvenanceSelector::includes`] will need for a page of
    /// Provenance: every target not decided yet and, for the all-patients scope, whether the
    /// patients involved exist. Without it every target costs its own store reads.
    pub async fn prefetch(&mut self, provenance: &[Value]) -> StoreResult<()> {
        let mut wanted: Vec<(String, String)> = Vec::new();
        let mut patients: Vec<String> = Vec::new();
        for target in provenance.iter().flat_map(targets) {
            if self.in_export.contains_key(&target) {
                continue;
            }
            let Some((resource_type, id)) = target.split_once('/') else {
                continue;
            };
            if resource_type == "Patient" {
                patients.push(id.to_string());
            }
            if self.type_exported(resource_type) {
                wanted.push((resource_type.to_string(), id.to_string()));
            } else {
                self.in_export.insert(target, false);
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let versions = self
            .store
            .resources_at(&wanted, self.job.transaction_time)
            .await?;
        if matches!(self.patients, PatientScope::AllPatients) {
            patients.extend(versions.iter().flatten().flat_map(|v| v.patients.clone()));
            patients.retain(|p| !self.patient_exists.contains_key(p));
            patients.sort_unstable();
            patients.dedup();
            let keys: Vec<(String, String)> = patients
                .iter()
                .map(|p| ("Patient".to_string(), p.clone()))
                .collect();
            let found = self
                .store
                .resources_at(&keys, self.job.transaction_time)
                .await?;
            if self.patient_exists.len() >= CACHE_LIMIT {
                self.patient_exists.clear();
            }
            for (patient, version) in patients.into_iter().zip(found) {
                self.patient_exists.insert(patient, version.is_some());
            }
        }
        if self.in_export.len() >= CACHE_LIMIT {
            self.in_export.clear();
        }
        for ((resource_type, id), version) in wanted.into_iter().zip(versions) {
            let decision = self.decide(&resource_type, version).await?;
            self.in_export
                .insert(format!("{resource_type}/{id}"), decision);
        }
        Ok(())
    }

    fn type_exported(&self, resource_type: &str) -> bool {
        let job = self.job;
        resource_type != PROVENANCE
            && job.params.wants_type(resource_type)
            && (job.level == ExportLevel::System || in_patient_compartment(resource_type))
    }

    /// Whether the version current at the transaction time of a target is in the export.
    async fn decide(
        &mut self,
        resource_type: &str,
        version: Option<ResourceVersion>,
    ) -> StoreResult<bool> {
        let job = self.job;
        if !self.type_exported(resource_type) {
            return Ok(false);
        }
        let Some(version) = version else {
            return Ok(false);
        };
        let in_window = job.params.since.is_none_or(|s| version.last_updated > s)
            && version.last_updated <= job.window_end();
        if !in_window {
            return Ok(false);
        }
        let mut in_scope = matches!(self.patients, PatientScope::Everything);
        for patient in &version.patients {
            if in_scope {
                break;
            }
            in_scope = self.patient_in_scope(patient).await?;
        }
        if !in_scope {
            return Ok(false);
        }
        if self.filters.filters(resource_type) {
            let json: Value = serde_json::from_slice(&version.json)?;
            return Ok(self.filters.matches(resource_type, &json));
        }
        Ok(true)
    }

    async fn patient_in_scope(&mut self, patient: &str) -> StoreResult<bool> {
        match &self.patients {
            PatientScope::Everything => Ok(true),
            PatientScope::Listed(list) => {
                Ok(list.binary_search_by(|p| p.as_str().cmp(patient)).is_ok())
            }
            PatientScope::AllPatients => {
                if let Some(known) = self.patient_exists.get(patient) {
                    return Ok(*known);
                }
                let exists = self
                    .store
                    .patient_exists(patient, self.job.transaction_time)
                    .await?;
                if self.patient_exists.len() >= CACHE_LIMIT {
                    self.patient_exists.clear();
                }
                self.patient_exists.insert(patient.to_string(), exists);
                Ok(exists)
            }
        }
    }
}

/// For a listed patient set: the ids, sorted, of the Provenance that name one of these patients
/// or a resource of theirs the export contains. Found through the store's target index, so a
/// small Group never reads every Provenance; the targets are looked up as they are read, a
/// thousand at a time, so memory holds the candidate ids, not the export's references.
/// [`load_candidates`] then reads them a page at a time and [`ProvenanceSelector::includes`]
/// applies the exact rules.
pub async fn candidates_for(
    store: &dyn ResourceStore,
    job: &Job,
    patients: &Arc<Vec<String>>,
    page_size: usize,
) -> StoreResult<Vec<String>> {
    let mut found = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    for chunk in patients.chunks(TARGET_BATCH) {
        let chunk: Vec<String> = chunk.iter().map(|p| format!("Patient/{p}")).collect();
        found.extend(store.provenance_targeting(&chunk).await?);
    }
    for resource_type in store.resource_types().await? {
        let exported = resource_type != PROVENANCE
            && job.params.wants_type(&resource_type)
            && in_patient_compartment(&resource_type);
        if !exported {
            continue;
        }
        let scope = ReadScope::of_patients(job, &resource_type, patients.clone());
        let mut cursor: Option<String> = None;
        loop {
            let page = store
                .read_page(&scope, cursor.as_deref(), page_size)
                .await?;
            targets.extend(
                page.resources
                    .iter()
                    .map(|r| format!("{resource_type}/{}", r.id)),
            );
            if targets.len() >= TARGET_BATCH || !page.more {
                for chunk in targets.chunks(TARGET_BATCH) {
                    found.extend(store.provenance_targeting(chunk).await?);
                }
                targets.clear();
            }
            if !page.more {
                break;
            }
            cursor = page.resume_after();
        }
    }
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// Target references looked up in the index at once.
const TARGET_BATCH: usize = 1000;

/// The candidates among `ids` that are current at the transaction time and in the export's
/// window, in the order of `ids`.
pub async fn load_candidates(
    store: &dyn ResourceStore,
    job: &Job,
    ids: &[String],
) -> StoreResult<Vec<StoredResource>> {
    let targets: Vec<(String, String)> = ids
        .iter()
        .map(|id| (PROVENANCE.to_string(), id.clone()))
        .collect();
    let versions = store.resources_at(&targets, job.transaction_time).await?;
    Ok(ids
        .iter()
        .zip(versions)
        .filter_map(|(id, version)| {
            let version = version?;
            let in_window = job.params.since.is_none_or(|s| version.last_updated > s)
                && version.last_updated <= job.window_end();
            in_window.then(|| StoredResource {
                id: id.as_str().into(),
                json: version.json,
            })
        })
        .collect())
}

/// Folds Provenance into `latest`: target → (recorded, id) of its most recent Provenance.
fn latest_of(
    provenance: &[StoredResource],
    latest: &mut HashMap<String, (String, String)>,
) -> StoreResult<()> {
    for resource in provenance {
        let json: Value = serde_json::from_slice(&resource.json)?;
        let recorded = json
            .get("recorded")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for target in targets(&json) {
            let candidate = (recorded.clone(), resource.id.to_string());
            let best = latest.entry(target).or_insert_with(|| candidate.clone());
            if candidate > *best {
                *best = candidate;
            }
        }
    }
    Ok(())
}

/// The `Type/id` of each `Provenance.target` that is a literal reference.
pub fn targets(provenance: &Value) -> Vec<String> {
    let targets = match provenance.get("target") {
        Some(Value::Array(targets)) => targets.iter().collect(),
        Some(one) => vec![one],
        None => Vec::new(),
    };
    targets
        .into_iter()
        .filter_map(|t| t.get("reference").and_then(Value::as_str))
        .filter_map(reference::target_of)
        .map(|(t, id)| format!("{t}/{id}"))
        .collect()
}
