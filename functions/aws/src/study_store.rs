//! The study exports' records in one DynamoDB table (`pk`, `sk`; TTL on `ttl`):
//!
//! | item | pk | sk |
//! |---|---|---|
//! | a job | `job#<id>` | `job` |
//! | its history row (a copy) | `study#<study>` | `<requested ms, 15 digits>#<id>` |
//! | its expiry | `expiry` | `<expires ms, 15 digits>#<id>` |
//! | study settings | `settings` | `<study>` |
//! | an idempotency key | `idem#<key>` | `idem` |
//! | an audit record | `audit` | `<seq, 20 digits>` |
//! | a webhook delivery | `delivery#<study>` | `<created ms>#<id>` |
//! | a delivery's next attempt | `due` | `<next attempt ms>#<id>` |
//!
//! Audit records take their place with a conditional write, so two writers cannot both have one
//! sequence number; the Lambda roles have no permission to update or delete them (template).

use crate::dynamo::{DynamoTable, Item, attr_n, attr_s, get_s, is_condition_failure};
use async_trait::async_trait;
use export_core::{StoreError, StoreResult};
use export_study::audit::{AuditLog, AuditQuery, AuditRecord};
use export_study::jobs::{
    IdempotencyRecord, JobQuery, StudyJob, StudyJobStatus, StudyJobStore, StudySettings,
};
use export_study::webhooks::{Delivery, DeliveryStatus, WebhookOutbox};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// The study table.
#[derive(Clone)]
pub struct DynamoStudyStore {
    table: DynamoTable,
}

fn sdk_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("dynamodb: {e:?}"))
}

fn item(pk: &str, sk: &str, value: &impl Serialize) -> StoreResult<Item> {
    Ok(HashMap::from([
        ("pk".to_string(), attr_s(pk)),
        ("sk".to_string(), attr_s(sk)),
        ("doc".to_string(), attr_s(&serde_json::to_string(value)?)),
    ]))
}

fn doc<T: DeserializeOwned>(item: &Item) -> StoreResult<T> {
    Ok(serde_json::from_str(
        &get_s(item, "doc").unwrap_or_default(),
    )?)
}

/// A number as a fixed-width sort key, so string order is numeric order.
fn padded(n: i64, width: usize) -> String {
    format!("{:0width$}", n.max(0), width = width)
}

impl DynamoStudyStore {
    pub fn new(table: DynamoTable) -> Self {
        DynamoStudyStore { table }
    }

    async fn put(&self, item: Item) -> StoreResult<()> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item))
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    async fn delete(&self, pk: &str, sk: &str) -> StoreResult<()> {
        self.table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(pk))
            .key("sk", attr_s(sk))
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    /// A partition's items, newest (highest sort key) first, up to `limit`.
    async fn newest(&self, pk: &str, limit: Option<i32>) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .table
                .client
                .query()
                .table_name(&self.table.name)
                .consistent_read(true)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", attr_s(pk))
                .scan_index_forward(false)
                .set_limit(limit)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_err)?;
            items.extend(out.items.unwrap_or_default());
            if limit.is_some_and(|l| items.len() >= l as usize) {
                return Ok(items);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    /// Items of `pk` whose sort key is at most `upto`.
    async fn up_to(&self, pk: &str, upto: &str) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .table
                .client
                .query()
                .table_name(&self.table.name)
                .consistent_read(true)
                .key_condition_expression("pk = :pk AND sk <= :upto")
                .expression_attribute_values(":pk", attr_s(pk))
                .expression_attribute_values(":upto", attr_s(upto))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_err)?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    fn history_key(job: &StudyJob) -> (String, String) {
        (
            format!("study#{}", job.study_id),
            format!("{}#{}", padded(job.requested_at, 15), job.id),
        )
    }

    /// The copies that follow a job's main item: its history row and its expiry entry.
    async fn write_copies(&self, job: &StudyJob, before: Option<&StudyJob>) -> StoreResult<()> {
        let (pk, sk) = Self::history_key(job);
        self.put(item(&pk, &sk, job)?).await?;
        if let Some(old) = before.and_then(|b| b.expires_at)
            && Some(old) != job.expires_at
        {
            self.delete("expiry", &format!("{}#{}", padded(old, 15), job.id))
                .await?;
        }
        if let Some(expires) = job.expires_at
            && matches!(
                job.status,
                StudyJobStatus::Completed | StudyJobStatus::Error
            )
        {
            let mut entry = item(
                "expiry",
                &format!("{}#{}", padded(expires, 15), job.id),
                &job.id,
            )?;
            entry.insert("job".into(), attr_s(&job.id));
            self.put(entry).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl StudyJobStore for DynamoStudyStore {
    async fn create_job(&self, job: &StudyJob) -> StoreResult<()> {
        let mut main = item(&format!("job#{}", job.id), "job", job)?;
        main.insert("status".into(), attr_s(job.status.as_str()));
        let created = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(main))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        if let Err(e) = created {
            return Err(sdk_err(e));
        }
        self.write_copies(job, None).await
    }

    async fn job(&self, id: &str) -> StoreResult<Option<StudyJob>> {
        match self
            .table
            .get(&format!("job#{id}"), "job")
            .await
            .map_err(|e| StoreError(e.0))?
        {
            Some(item) => Ok(Some(doc(&item)?)),
            None => Ok(None),
        }
    }

    async fn update_job(&self, job: &StudyJob, expected: StudyJobStatus) -> StoreResult<bool> {
        let before = self.job(&job.id).await?;
        let mut main = item(&format!("job#{}", job.id), "job", job)?;
        main.insert("status".into(), attr_s(job.status.as_str()));
        let written = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(main))
            .condition_expression("#s = :expected")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":expected", attr_s(expected.as_str()))
            .send()
            .await;
        match written {
            Ok(_) => {
                self.write_copies(job, before.as_ref()).await?;
                Ok(true)
            }
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err(e)),
        }
    }

    async fn jobs(&self, query: &JobQuery) -> StoreResult<(Vec<StudyJob>, u64)> {
        let rows = self
            .newest(&format!("study#{}", query.study_id), None)
            .await?;
        let selected: Vec<StudyJob> = rows
            .iter()
            .map(doc::<StudyJob>)
            .collect::<StoreResult<Vec<_>>>()?
            .into_iter()
            .filter(|j| query.selects(j))
            .collect();
        let total = selected.len() as u64;
        let skip = ((query.page.max(1) - 1) * query.page_size) as usize;
        Ok((
            selected
                .into_iter()
                .skip(skip)
                .take(query.page_size as usize)
                .collect(),
            total,
        ))
    }

    async fn pending_jobs(&self) -> StoreResult<Vec<StudyJob>> {
        // On AWS the queue redelivers unfinished jobs; nothing is resumed by listing.
        Ok(Vec::new())
    }

    async fn expiring_jobs(&self, now: i64) -> StoreResult<Vec<StudyJob>> {
        let mut jobs = Vec::new();
        for entry in self
            .up_to("expiry", &format!("{}#~", padded(now, 15)))
            .await?
        {
            let id = get_s(&entry, "job").unwrap_or_default();
            match self.job(&id).await? {
                Some(job)
                    if matches!(
                        job.status,
                        StudyJobStatus::Completed | StudyJobStatus::Error
                    ) =>
                {
                    jobs.push(job)
                }
                _ => {
                    let sk = get_s(&entry, "sk").unwrap_or_default();
                    self.delete("expiry", &sk).await?;
                }
            }
        }
        Ok(jobs)
    }

    async fn settings(&self, study_id: &str) -> StoreResult<Option<StudySettings>> {
        match self
            .table
            .get("settings", study_id)
            .await
            .map_err(|e| StoreError(e.0))?
        {
            Some(item) => Ok(Some(doc(&item)?)),
            None => Ok(None),
        }
    }

    async fn put_settings(&self, settings: &StudySettings) -> StoreResult<()> {
        self.put(item("settings", &settings.study_id, settings)?)
            .await
    }

    async fn all_settings(&self) -> StoreResult<Vec<StudySettings>> {
        self.newest("settings", None)
            .await?
            .iter()
            .map(doc)
            .collect()
    }

    async fn remember_idempotency(
        &self,
        record: &IdempotencyRecord,
        now: i64,
    ) -> StoreResult<IdempotencyRecord> {
        let pk = format!("idem#{}", record.key);
        let mut new = item(&pk, "idem", record)?;
        new.insert("created".into(), attr_n(record.created));
        new.insert("ttl".into(), attr_n(record.created / 1000 + 2 * 86_400));
        let put = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(new))
            .condition_expression("attribute_not_exists(pk) OR created < :day_ago")
            .expression_attribute_values(":day_ago", attr_n(now - 86_400_000))
            .send()
            .await;
        match put {
            Ok(_) => Ok(record.clone()),
            Err(e) if is_condition_failure(&e) => {
                let held = self
                    .table
                    .get(&pk, "idem")
                    .await
                    .map_err(|e| StoreError(e.0))?
                    .ok_or_else(|| StoreError::new("an idempotency key vanished"))?;
                doc(&held)
            }
            Err(e) => Err(sdk_err(e)),
        }
    }

    async fn complete_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<()> {
        let mut updated = item(&format!("idem#{}", record.key), "idem", record)?;
        updated.insert("created".into(), attr_n(record.created));
        updated.insert("ttl".into(), attr_n(record.created / 1000 + 2 * 86_400));
        self.put(updated).await
    }
}

#[async_trait]
impl AuditLog for DynamoStudyStore {
    async fn last_record(&self) -> StoreResult<Option<AuditRecord>> {
        match self.newest("audit", Some(1)).await?.first() {
            Some(item) => Ok(Some(doc(item)?)),
            None => Ok(None),
        }
    }

    async fn insert_record(&self, record: &AuditRecord) -> StoreResult<bool> {
        let mut new = item("audit", &padded(record.seq as i64, 20), record)?;
        if let Some(study) = &record.entry.study_id {
            new.insert("study".into(), attr_s(study));
        }
        self.table.put_if_absent(new).await
    }

    async fn records(&self, query: &AuditQuery) -> StoreResult<(Vec<AuditRecord>, u64)> {
        let all: Vec<AuditRecord> = self
            .newest("audit", None)
            .await?
            .iter()
            .map(doc)
            .collect::<StoreResult<_>>()?;
        let selected: Vec<AuditRecord> = all.into_iter().filter(|r| query.selects(r)).collect();
        let total = selected.len() as u64;
        let skip = ((query.page.max(1) - 1) * query.page_size) as usize;
        Ok((
            selected
                .into_iter()
                .skip(skip)
                .take(query.page_size as usize)
                .collect(),
            total,
        ))
    }

    async fn all_records(&self) -> StoreResult<Vec<AuditRecord>> {
        let mut all: Vec<AuditRecord> = self
            .newest("audit", None)
            .await?
            .iter()
            .map(doc)
            .collect::<StoreResult<_>>()?;
        all.reverse();
        Ok(all)
    }
}

#[async_trait]
impl WebhookOutbox for DynamoStudyStore {
    async fn enqueue(&self, delivery: &Delivery) -> StoreResult<()> {
        self.update_delivery(delivery).await
    }

    async fn due(&self, now: i64) -> StoreResult<Vec<Delivery>> {
        let mut out = Vec::new();
        for entry in self.up_to("due", &format!("{}#~", padded(now, 15))).await? {
            let (pk, sk) = (
                get_s(&entry, "delivery_pk").unwrap_or_default(),
                get_s(&entry, "delivery_sk").unwrap_or_default(),
            );
            match self
                .table
                .get(&pk, &sk)
                .await
                .map_err(|e| StoreError(e.0))?
            {
                Some(item) => out.push(doc(&item)?),
                None => {
                    let due_sk = get_s(&entry, "sk").unwrap_or_default();
                    self.delete("due", &due_sk).await?;
                }
            }
        }
        Ok(out)
    }

    async fn update_delivery(&self, delivery: &Delivery) -> StoreResult<()> {
        let pk = format!("delivery#{}", delivery.study_id);
        let sk = format!("{}#{}", padded(delivery.created, 15), delivery.id);
        // Where its due entry was, from the version stored before this one.
        let before: Option<Delivery> = match self
            .table
            .get(&pk, &sk)
            .await
            .map_err(|e| StoreError(e.0))?
        {
            Some(item) => Some(doc(&item)?),
            None => None,
        };
        let mut main = item(&pk, &sk, delivery)?;
        main.insert("ttl".into(), attr_n(delivery.created / 1000 + 30 * 86_400));
        self.put(main).await?;
        if let Some(b) = before
            && b.status == DeliveryStatus::Pending
        {
            self.delete("due", &format!("{}#{}", padded(b.next_attempt, 15), b.id))
                .await?;
        }
        if delivery.status == DeliveryStatus::Pending {
            let due_sk = format!("{}#{}", padded(delivery.next_attempt, 15), delivery.id);
            let mut due = HashMap::from([
                ("pk".to_string(), attr_s("due")),
                ("sk".to_string(), attr_s(&due_sk)),
            ]);
            due.insert("delivery_pk".into(), attr_s(&pk));
            due.insert("delivery_sk".into(), attr_s(&sk));
            self.put(due).await?;
        }
        Ok(())
    }

    async fn deliveries(&self, study_id: &str, limit: usize) -> StoreResult<Vec<Delivery>> {
        self.newest(&format!("delivery#{study_id}"), Some(limit as i32))
            .await?
            .iter()
            .take(limit)
            .map(doc)
            .collect()
    }
}
