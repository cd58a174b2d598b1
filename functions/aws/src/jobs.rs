//! Jobs, their work items and parts, and the single-active-export lock in one DynamoDB table.
//!
//! | item | pk | sk |
//! |---|---|---|
//! | job | `job#<id>` | `job` (`status`, `doc`, `ttl`) |
//! | patient set chunk | `job#<id>` | `patients#<n>` |
//! | work item | `job#<id>` | `item#<n>` (`doc`, `done`) |
//! | part | `job#<id>` | `part#<key>` (`doc`, `item`) |
//! | lock | `lock#export` | `lock` (`owner`, `expires`) |
//!
//! Every change of state is a conditional write; nothing is read and then written.

use crate::dynamo::{
    DynamoTable, attr_n, attr_s, attr_string_list, dynamo_err, get_n, get_s, get_string_list,
};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use export_core::error::StoreResult;
use export_core::fhir::time::{Instant, to_micros};
use export_core::job::{Job, JobStatus};
use export_core::ports::{ExportLock, JobStore, PartRecord, WorkItem};
use std::collections::HashMap;
use std::time::Duration;

/// Patient ids per patient-set item (keeps items far below DynamoDB's 400 KB).
const PATIENTS_PER_ITEM: usize = 2000;

/// The jobs table.
pub struct DynamoJobStore {
    table: DynamoTable,
}

impl DynamoJobStore {
    pub fn new(table: DynamoTable) -> Self {
        DynamoJobStore { table }
    }
}

fn job_pk(id: &str) -> String {
    format!("job#{id}")
}

/// The job item. `ttl` (epoch seconds) lets DynamoDB remove finished jobs after retention.
fn job_item(job: &Job) -> StoreResult<HashMap<String, AttributeValue>> {
    let mut item = HashMap::from([
        ("pk".to_string(), attr_s(&job_pk(&job.id))),
        ("sk".to_string(), attr_s("job")),
        ("status".to_string(), attr_s(job.status.as_str())),
        ("doc".to_string(), attr_s(&serde_json::to_string(job)?)),
    ]);
    if let Some(expires) = job.expires_at {
        item.insert("expires".into(), attr_n(to_micros(expires)));
        item.insert("ttl".into(), attr_n(expires.timestamp() + 24 * 3600));
    }
    Ok(item)
}

fn is_condition_failure<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(ProvideErrorMetadata::code)
        == Some("ConditionalCheckFailedException")
}

fn doc<T: serde::de::DeserializeOwned>(item: &HashMap<String, AttributeValue>) -> StoreResult<T> {
    Ok(serde_json::from_str(
        &get_s(item, "doc").unwrap_or_default(),
    )?)
}

impl DynamoJobStore {
    async fn jobs_matching(&self, keep: impl Fn(&Job) -> bool) -> StoreResult<Vec<Job>> {
        let mut jobs = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .table
                .client
                .scan()
                .table_name(&self.table.name)
                .filter_expression("sk = :job")
                .expression_attribute_values(":job", attr_s("job"))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(dynamo_err)?;
            for item in out.items.unwrap_or_default() {
                let job: Job = doc(&item)?;
                if keep(&job) {
                    jobs.push(job);
                }
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(jobs),
            }
        }
    }
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn create(&self, job: &Job) -> StoreResult<()> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(job_item(job)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Job>> {
        self.table
            .get(&job_pk(id), "job")
            .await?
            .map(|item| doc(&item))
            .transpose()
    }

    async fn update(&self, job: &Job, expected: JobStatus) -> StoreResult<bool> {
        let result = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(job_item(job)?))
            .condition_expression("#s = :expected")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":expected", attr_s(expected.as_str()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_err(e)),
        }
    }

    async fn active_jobs(&self) -> StoreResult<Vec<Job>> {
        self.jobs_matching(|j| j.status.is_active()).await
    }

    async fn expired_jobs(&self, now: Instant) -> StoreResult<Vec<Job>> {
        self.jobs_matching(|j| {
            matches!(j.status, JobStatus::Completed | JobStatus::Failed)
                && j.expires_at.is_some_and(|e| e <= now)
        })
        .await
    }

    async fn put_patient_set(&self, job_id: &str, patients: &[String]) -> StoreResult<()> {
        let items = patients
            .chunks(PATIENTS_PER_ITEM)
            .enumerate()
            .map(|(n, chunk)| {
                HashMap::from([
                    ("pk".to_string(), attr_s(&job_pk(job_id))),
                    ("sk".to_string(), attr_s(&format!("patients#{n:05}"))),
                    ("ids".to_string(), attr_string_list(chunk)),
                ])
            })
            .collect();
        self.table.batch_put(items).await
    }

    async fn patient_set(&self, job_id: &str) -> StoreResult<Vec<String>> {
        let items = self
            .table
            .query_all(&job_pk(job_id), Some("patients#"), None)
            .await?;
        let mut ids: Vec<String> = items
            .iter()
            .flat_map(|item| get_string_list(item, "ids"))
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn put_items(&self, items: &[WorkItem]) -> StoreResult<()> {
        let items = items
            .iter()
            .map(|i| {
                Ok(HashMap::from([
                    ("pk".to_string(), attr_s(&job_pk(&i.job_id))),
                    ("sk".to_string(), attr_s(&format!("item#{:06}", i.item))),
                    ("doc".to_string(), attr_s(&serde_json::to_string(i)?)),
                ]))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        self.table.batch_put(items).await
    }

    async fn items(&self, job_id: &str) -> StoreResult<Vec<WorkItem>> {
        let items = self
            .table
            .query_all(&job_pk(job_id), Some("item#"), None)
            .await?;
        items.iter().map(doc).collect()
    }

    async fn complete_item(&self, job_id: &str, item: u32) -> StoreResult<()> {
        self.table
            .set_number(&job_pk(job_id), &format!("item#{item:06}"), "done", 1)
            .await
    }

    async fn completed_items(&self, job_id: &str) -> StoreResult<Vec<u32>> {
        let items = self
            .table
            .query_all(&job_pk(job_id), Some("item#"), Some("sk, done"))
            .await?;
        Ok(items
            .iter()
            .filter(|i| get_n(i, "done") == Some(1))
            .filter_map(|i| get_s(i, "sk")?.trim_start_matches("item#").parse().ok())
            .collect())
    }

    async fn is_item_complete(&self, job_id: &str, item: u32) -> StoreResult<bool> {
        let found = self
            .table
            .get(&job_pk(job_id), &format!("item#{item:06}"))
            .await?;
        Ok(found.is_some_and(|i| get_n(&i, "done") == Some(1)))
    }

    async fn record_part(&self, part: &PartRecord) -> StoreResult<()> {
        let item = HashMap::from([
            ("pk".to_string(), attr_s(&job_pk(&part.job_id))),
            ("sk".to_string(), attr_s(&format!("part#{}", part.key))),
            ("item".to_string(), attr_n(part.item as i64)),
            ("doc".to_string(), attr_s(&serde_json::to_string(part)?)),
        ]);
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item))
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    async fn parts(&self, job_id: &str) -> StoreResult<Vec<PartRecord>> {
        let items = self
            .table
            .query_all(&job_pk(job_id), Some("part#"), None)
            .await?;
        items.iter().map(doc).collect()
    }
}

/// The lock lives in the jobs table under this key.
const LOCK_PK: &str = "lock#export";

#[async_trait]
impl ExportLock for DynamoJobStore {
    async fn acquire(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool> {
        let now = to_micros(now);
        let result = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(LOCK_PK))
            .item("sk", attr_s("lock"))
            .item("owner", attr_s(owner))
            .item("expires", attr_n(now + lease.as_micros() as i64))
            // Free, expired (a dead holder), or already ours: one conditional write, no read.
            .condition_expression("attribute_not_exists(pk) OR expires <= :now OR #o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":now", attr_n(now))
            .expression_attribute_values(":owner", attr_s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_err(e)),
        }
    }

    async fn renew(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool> {
        let result = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(LOCK_PK))
            .key("sk", attr_s("lock"))
            .update_expression("SET expires = :expires")
            .condition_expression("#o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":owner", attr_s(owner))
            .expression_attribute_values(
                ":expires",
                attr_n(to_micros(now) + lease.as_micros() as i64),
            )
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_err(e)),
        }
    }

    async fn holder(&self, now: Instant) -> StoreResult<Option<String>> {
        let item = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(LOCK_PK))
            .key("sk", attr_s("lock"))
            .consistent_read(true)
            .send()
            .await
            .map_err(dynamo_err)?
            .item;
        let Some(item) = item else {
            return Ok(None);
        };
        let expires = get_n(&item, "expires").unwrap_or(0);
        Ok((expires > to_micros(now))
            .then(|| get_s(&item, "owner"))
            .flatten())
    }

    async fn release(&self, owner: &str) -> StoreResult<()> {
        let result = self
            .table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(LOCK_PK))
            .key("sk", attr_s("lock"))
            .condition_expression("#o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":owner", attr_s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(dynamo_err(e)),
        }
    }
}
