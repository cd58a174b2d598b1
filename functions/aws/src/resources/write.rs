//! Writing versions so that a crash at any point never leaves two versions of a resource visible,
//! and a retried write adds no version.
//!
//! What a version needs outside a transaction is written first, and is invisible on its own: its
//! body and patient list in S3 (named by their content), the type registry, the Provenance target
//! index (a candidate that is no current Provenance is dropped when read), and the compartment
//! entries of a wide version (visible only once a history item with their hash exists). Then one
//! TransactWriteItems puts the version item, its other compartment entries, its history item and
//! the current pointer — on condition that the pointer still names the version it replaces — and
//! sets `sup` on that version's items. Several versions share a transaction up to its limits; a
//! cancelled one (the pointer moved, or a conflict) is planned again from fresh pointers.
//!
//! A version whose content hash `h` ([`NewResource::content_digest`]) is the current one's is
//! skipped, so loading the same line again is a no-op.

use super::blobs::{self, BlobRef, Blobs};
use super::table_config::TableConfig;
use super::{DynamoResourceStore, history_pk, is_deletion, lu_key, shard_of, version_pk};
use crate::dynamo::{
    Item, TransactError, TxAction, attr_n, attr_s, attr_string_list, backoff, get_n, get_s,
};
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::fhir::time::to_micros;
use export_core::ports::NewResource;
use export_core::provenance;
use futures_util::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// DynamoDB's limit on the actions of one transaction.
const TX_ACTIONS: usize = 100;
/// Bytes planned into one transaction (DynamoDB's limit is 4 MB).
const TX_BYTES: usize = 3 * 1024 * 1024;
/// Rounds of planning and writing before conflicting writers are reported.
const ATTEMPTS: u32 = 8;
/// Objects put into S3 at once.
const BLOB_PUTS: usize = 8;

/// One version, ready to write.
struct Planned {
    /// Its place in the batch being written (to plan it again after a cancelled transaction).
    index: usize,
    /// The transaction's part: version item, inline compartment entries, history item, current
    /// pointer (conditional), superseded marks.
    actions: Vec<TxAction>,
    bytes: usize,
    /// S3 objects to put first.
    blobs: Vec<(BlobRef, Bytes)>,
    /// Compartment entries of a wide version, written before the transaction.
    wide_entries: Vec<Item>,
    /// Superseded marks that did not fit the transaction (an old wide version written before
    /// wide versions existed), set before it: the old version leaves those compartments first,
    /// so a crash can hide it there but never show two versions.
    early_marks: Vec<TxAction>,
    resource_type: String,
    id: String,
    /// For a Provenance: the `Type/id`s it names (the target index gets its id under each).
    provenance_targets: Vec<String>,
}

fn set_mark(pk: String, sk: String, lu: i64) -> TxAction {
    TxAction::SetNumber {
        pk,
        sk,
        name: "sup".into(),
        value: lu,
    }
}

impl DynamoResourceStore {
    /// Writes resources of distinct type/id.
    pub(super) async fn put_batch(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        let config = self.table_config_for_write().await?;
        let mut pending: Vec<usize> = (0..resources.len()).collect();
        for attempt in 0..ATTEMPTS {
            let targets: Vec<(String, String)> = pending
                .iter()
                .map(|&i| (resources[i].resource_type.clone(), resources[i].id.clone()))
                .collect();
            let current = self.current_pointers(&targets).await?;
            let mut planned = Vec::new();
            for &i in &pending {
                let r = &resources[i];
                let previous = current.get(&history_pk(&r.resource_type, &r.id));
                if let Some(p) = self.plan(i, r.clone(), previous, &config).await? {
                    planned.push(p);
                }
            }
            self.write_outside(&mut planned).await?;
            pending.clear();
            for group in transactions(planned) {
                let indexes: Vec<usize> = group.iter().map(|p| p.index).collect();
                let actions = group.into_iter().flat_map(|p| p.actions).collect();
                match self.table.transact(actions).await {
                    Ok(()) => {}
                    Err(TransactError::Cancelled) => pending.extend(indexes),
                    Err(TransactError::Failed(e)) => return Err(e),
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(StoreError::new(
            "dynamodb: versions kept conflicting with other writers",
        ))
    }

    /// The items of `r` as the version after `previous` (its current pointer), or `None` when
    /// there is nothing to write (a deletion of nothing, or this version is already current).
    async fn plan(
        &self,
        index: usize,
        mut r: NewResource,
        previous: Option<&Item>,
        config: &TableConfig,
    ) -> StoreResult<Option<Planned>> {
        if r.deleted {
            // Deleting what does not exist (or is already deleted) changes nothing; a deletion
            // stays in the compartments of the version it deletes.
            match previous {
                Some(p) if !is_deletion(p) => r.patients = self.patients_of(p).await?.to_vec(),
                _ => return Ok(None),
            }
        }
        r.patients.sort();
        r.patients.dedup();
        let hash = r.content_digest()?;
        if previous.and_then(|p| get_s(p, "h")).as_ref() == Some(&hash) {
            return Ok(None);
        }
        let previous_version = previous.and_then(|p| get_n(p, "v"));
        let version = previous_version.unwrap_or(0) + 1;
        if let Some(meta) = r.json.get_mut("meta").and_then(Value::as_object_mut) {
            meta.insert("versionId".into(), Value::String(version.to_string()));
        }
        let body = serde_json::to_string(&r.json)?;
        let lu = to_micros(r.last_updated);
        let shard = shard_of(&r.id, config.shards);
        let vsk = format!("{}#{}#{version:010}", lu_key(lu), r.id);
        let wide = r.patients.len() > blobs::PATIENTS_INLINE_MAX;
        let mut planned = Planned {
            index,
            actions: Vec::new(),
            bytes: 0,
            blobs: Vec::new(),
            wide_entries: Vec::new(),
            early_marks: Vec::new(),
            resource_type: r.resource_type.clone(),
            id: r.id.clone(),
            provenance_targets: Vec::new(),
        };
        let inline = blobs::body_inline(body.len(), 1 + r.patients.len());
        let body_attr = if inline {
            planned.bytes += body.len() * (1 + if wide { 0 } else { r.patients.len() });
            ("body".to_string(), attr_s(&body))
        } else {
            let key = Blobs::key(&r.resource_type, &r.id, "body", body.as_bytes());
            let blob = self.blob_ref(config, &r, key.clone(), body.len())?;
            planned.blobs.push((blob, Bytes::from(body)));
            ("bref".to_string(), attr_s(&key))
        };
        let patients_attr = if wide {
            let list = serde_json::to_vec(&r.patients)?;
            let key = Blobs::key(&r.resource_type, &r.id, "patients", &list);
            let blob = self.blob_ref(config, &r, key.clone(), list.len())?;
            planned.blobs.push((blob, Bytes::from(list)));
            ("pref".to_string(), attr_s(&key))
        } else {
            ("pats".to_string(), attr_string_list(&r.patients))
        };
        let deletion_mark = r.deleted.then(|| ("del".to_string(), attr_n(1)));

        let mut version_item = HashMap::from([
            (
                "pk".to_string(),
                attr_s(&version_pk(&r.resource_type, shard)),
            ),
            ("sk".to_string(), attr_s(&vsk)),
            ("id".to_string(), attr_s(&r.id)),
            ("lu".to_string(), attr_n(lu)),
            body_attr.clone(),
        ]);
        if !r.patients.is_empty() {
            version_item.insert(patients_attr.0.clone(), patients_attr.1.clone());
        }
        version_item.extend(deletion_mark.clone());
        planned.actions.push(TxAction::Put {
            item: version_item,
            expect: None,
        });
        for patient in &r.patients {
            let mut entry = HashMap::from([
                ("pk".to_string(), attr_s(&format!("p#{patient}"))),
                (
                    "sk".to_string(),
                    attr_s(&format!("{}#{}#{version:010}", r.resource_type, r.id)),
                ),
                ("id".to_string(), attr_s(&r.id)),
                ("lu".to_string(), attr_n(lu)),
                ("h".to_string(), attr_s(&hash)),
                body_attr.clone(),
                patients_attr.clone(),
            ]);
            entry.extend(deletion_mark.clone());
            match wide {
                true => planned.wide_entries.push(entry),
                false => planned.actions.push(TxAction::Put {
                    item: entry,
                    expect: None,
                }),
            }
        }
        let history_pk = history_pk(&r.resource_type, &r.id);
        let history = |sk: String| {
            let mut item = HashMap::from([
                ("pk".to_string(), attr_s(&history_pk)),
                ("sk".to_string(), attr_s(&sk)),
                ("v".to_string(), attr_n(version)),
                ("lu".to_string(), attr_n(lu)),
                ("shard".to_string(), attr_n(shard as i64)),
                ("vsk".to_string(), attr_s(&vsk)),
                ("h".to_string(), attr_s(&hash)),
                patients_attr.clone(),
            ]);
            item.extend(deletion_mark.clone());
            item
        };
        planned.actions.push(TxAction::Put {
            item: history(format!("v{version:010}")),
            expect: None,
        });
        planned.actions.push(TxAction::Put {
            item: history("current".to_string()),
            // The pointer must still name the version this one replaces.
            expect: Some(previous_version.map(|v| ("v".to_string(), v))),
        });
        if let Some(previous) = previous {
            let old = get_n(previous, "v").unwrap_or(1);
            let old_shard = get_n(previous, "shard").unwrap_or(0) as u32;
            planned.actions.push(set_mark(
                version_pk(&r.resource_type, old_shard),
                get_s(previous, "vsk").unwrap_or_default(),
                lu,
            ));
            planned
                .actions
                .push(set_mark(history_pk.clone(), format!("v{old:010}"), lu));
            // A wide version's entries follow its history item; the others carry their own mark.
            if !previous.contains_key("pref") {
                for patient in self.patients_of(previous).await?.iter() {
                    let mark = set_mark(
                        format!("p#{patient}"),
                        format!("{}#{}#{old:010}", r.resource_type, r.id),
                        lu,
                    );
                    match planned.actions.len() < TX_ACTIONS {
                        true => planned.actions.push(mark),
                        false => planned.early_marks.push(mark),
                    }
                }
            }
        }
        planned.bytes += 1024 * planned.actions.len();
        if r.resource_type == "Provenance" && !r.deleted {
            planned.provenance_targets = provenance::targets(&r.json);
        }
        Ok(Some(planned))
    }

    /// Where a body or patient list too big for an item goes.
    fn blob_ref(
        &self,
        config: &TableConfig,
        r: &NewResource,
        key: String,
        len: usize,
    ) -> StoreResult<BlobRef> {
        match (&self.blobs, &config.bucket) {
            (Some(_), Some(bucket)) => Ok(BlobRef {
                bucket: bucket.clone(),
                key,
            }),
            _ => Err(StoreError::new(format!(
                "{}/{} needs {len} bytes in S3 (too big for a DynamoDB item), and no resource \
                 bucket is configured (load --resource-bucket, or RESOURCE_BUCKET)",
                r.resource_type, r.id
            ))),
        }
    }

    /// Everything the transactions rely on, written first: S3 objects, the type registry, the
    /// Provenance target index, wide compartment entries and early superseded marks.
    async fn write_outside(&self, planned: &mut [Planned]) -> StoreResult<()> {
        if let Some(store) = &self.blobs {
            let puts: Vec<(BlobRef, Bytes)> = planned
                .iter_mut()
                .flat_map(|p| std::mem::take(&mut p.blobs))
                .collect();
            let results: Vec<StoreResult<()>> = futures_util::stream::iter(puts)
                .map(|(blob, content)| async move { store.put(&blob, content).await })
                .buffer_unordered(BLOB_PUTS)
                .collect()
                .await;
            results.into_iter().collect::<StoreResult<Vec<()>>>()?;
        }
        let types: BTreeSet<&str> = planned.iter().map(|p| p.resource_type.as_str()).collect();
        let mut puts: Vec<Item> = types
            .into_iter()
            .map(|t| {
                HashMap::from([
                    ("pk".to_string(), attr_s("types")),
                    ("sk".to_string(), attr_s(t)),
                ])
            })
            .collect();
        for p in planned.iter_mut() {
            puts.append(&mut p.wide_entries);
        }
        self.table.batch_put(puts).await?;
        // A Provenance may name one target twice: each id goes into each target's set once.
        let mut by_target: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in planned.iter() {
            for target in &p.provenance_targets {
                by_target
                    .entry(target.clone())
                    .or_default()
                    .insert(p.id.clone());
            }
        }
        for (target, ids) in by_target {
            let ids: Vec<String> = ids.into_iter().collect();
            self.table
                .add_to_set(&format!("t#{target}"), "prov", "ids", &ids)
                .await?;
        }
        for p in planned.iter_mut() {
            for mark in std::mem::take(&mut p.early_marks) {
                if let TxAction::SetNumber {
                    pk,
                    sk,
                    name,
                    value,
                } = mark
                {
                    self.table.set_number(&pk, &sk, &name, value).await?;
                }
            }
        }
        Ok(())
    }
}

/// Versions grouped into transactions within DynamoDB's limits, in order.
fn transactions(planned: Vec<Planned>) -> Vec<Vec<Planned>> {
    let mut groups: Vec<Vec<Planned>> = Vec::new();
    let (mut actions, mut bytes) = (0, 0);
    for p in planned {
        let fits = actions + p.actions.len() <= TX_ACTIONS && bytes + p.bytes <= TX_BYTES;
        if groups.is_empty() || !fits {
            groups.push(Vec::new());
            (actions, bytes) = (0, 0);
        }
        actions += p.actions.len();
        bytes += p.bytes;
        groups.last_mut().expect("group").push(p);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(actions: usize, bytes: usize) -> Planned {
        Planned {
            index: 0,
            actions: (0..actions)
                .map(|i| set_mark(format!("p{i}"), "s".into(), 1))
                .collect(),
            bytes,
            blobs: Vec::new(),
            wide_entries: Vec::new(),
            early_marks: Vec::new(),
            resource_type: "Observation".into(),
            id: "o1".into(),
            provenance_targets: Vec::new(),
        }
    }

    #[test]
    fn transactions_stay_within_dynamodb_limits() {
        let sizes = |groups: &[Vec<Planned>]| -> Vec<usize> {
            groups
                .iter()
                .map(|g| g.iter().map(|p| p.actions.len()).sum())
                .collect()
        };
        let groups = transactions((0..30).map(|_| planned(4, 5_000)).collect());
        assert_eq!(sizes(&groups), [100, 20]);
        let groups = transactions(vec![planned(85, 0), planned(85, 0), planned(10, 0)]);
        assert_eq!(sizes(&groups), [85, 95]);
        let groups = transactions((0..3).map(|_| planned(4, 1_500_000)).collect());
        assert_eq!(sizes(&groups), [8, 4]);
    }
}
