//! Jobs, their work items and parts, and the single-active-export lock in one DynamoDB table.
//!
//! | item | pk | sk |
//! |---|---|---|
//! | job | `job#<id>` | `job` (`status`, `doc`, `ttl`) |
//! | patient set chunk | `job#<id>` | `patients#<n>` |
//! | work item | `job#<id>` | `item#<n>` (`doc`) |
//! | finished item | `job#<id>` | `done#<n>` |
//! | item progress | `job#<id>` | `progress#<n>` (`cursor`, `next_seq`) |
//! | tally | `job#<id>` | `counted#<n / 100>` (`done`: a number set of finished items), `count` (`n_done`) |
//! | waiting task | `job#<id>` | `await` (`token`) |
//! | part | `job#<id>` | `part#<key>` (`doc`, `item`) |
//! | manifest page | `job#<id>` | `page#<n>` (`keys`: the part keys it lists, ≤ 1,000) |
//! | lock | `lock#export` | `lock` (`owner`, `expires`) |
//!
//! Every change of state is a conditional write; nothing is read and then written. The tally
//! holds the numbers of finished items in number sets and their count, both changed in one
//! transaction only if no set holds the item yet, so a duplicate or redelivered item counts once
//! and "all items done" reads one number however many items a job has
//! (see [`DynamoJobStore::count_done`]).
//!
//! Retention: the job item's `ttl` is its expiry plus a day; every other item of a job carries a
//! `ttl` of its creation plus [`DynamoJobStore::item_ttl`] (a bound past any run and retention),
//! and an expired or cancelled job's items are deleted when that status is written, so nothing
//! of a job outlives it by more than DynamoDB's TTL sweep.

use crate::dynamo::{
    DynamoTable, attr_n, attr_s, attr_string_list, dynamo_err, get_n, get_s, get_string_list,
    is_condition_failure,
};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, DeleteRequest, TransactWriteItem, Update, WriteRequest,
};
use export_core::error::StoreError;
use export_core::error::StoreResult;
use export_core::fhir::time::{Instant, to_micros};
use export_core::job::{Job, JobStatus};
use export_core::ports::{ExportLock, JobStore, PartRecord, WorkItem};
use std::collections::HashMap;
use std::time::Duration;

/// Patient ids per patient-set item (keeps items far below DynamoDB's 400 KB).
const PATIENTS_PER_ITEM: usize = 2000;

/// Finished item numbers per `counted#` item: small sets, since an update pays write units for
/// the whole item.
const ITEMS_PER_SET: u32 = 100;
/// Finished item numbers per `tally#` item, as counted before the count existed.
const OLD_ITEMS_PER_TALLY: u32 = 5000;
/// Tries of a tally transaction that meets others on the count item.
const COUNT_ATTEMPTS: usize = 8;

/// How long a job's items (patient set, work items, progress, parts) are kept at most: a bound
/// past the longest run (the state machine's timeout, a day) plus the longest retention (a
/// study's, in days). Expiry deletes them sooner; this is the backstop for a job that never
/// reaches it.
pub const DEFAULT_ITEM_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// The jobs table.
pub struct DynamoJobStore {
    table: DynamoTable,
    item_ttl: Duration,
}

impl DynamoJobStore {
    pub fn new(table: DynamoTable) -> Self {
        DynamoJobStore {
            table,
            item_ttl: DEFAULT_ITEM_TTL,
        }
    }

    /// The `ttl` attribute (epoch seconds) for a job's item written now.
    fn item_ttl(&self) -> AttributeValue {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        attr_n((now + self.item_ttl).as_secs() as i64)
    }

    /// Counts a finished item in the job's tally, once: one transaction adds the item to its
    /// `counted#` set, only if no set holds it yet, and adds one to the job's `count`. A
    /// duplicate or redelivered item finds itself counted and changes nothing. Called after the
    /// item is marked done, and again by any redelivery that finds it done, so a crash between
    /// the two writes never loses the count. (`tally#` sets are a job's tally as written before
    /// the count existed; the transaction checks them too, so an item is never counted twice.)
    pub async fn count_done(&self, job_id: &str, item: u32) -> StoreResult<()> {
        let pk = job_pk(job_id);
        let key = |sk: String| {
            Some(HashMap::from([
                ("pk".to_string(), attr_s(&pk)),
                ("sk".to_string(), attr_s(&sk)),
            ]))
        };
        let not_counted = "NOT contains(#done, :item)";
        let failed = |e| dynamo_err(e);
        let earlier = ConditionCheck::builder()
            .table_name(&self.table.name)
            .set_key(key(format!("tally#{:05}", item / OLD_ITEMS_PER_TALLY)))
            .condition_expression(not_counted)
            .expression_attribute_names("#done", "done")
            .expression_attribute_values(":item", attr_n(item as i64))
            .build()
            .map_err(failed)?;
        let set = Update::builder()
            .table_name(&self.table.name)
            .set_key(key(format!("counted#{:06}", item / ITEMS_PER_SET)))
            .update_expression("ADD #done :items SET #ttl = if_not_exists(#ttl, :ttl)")
            .condition_expression(not_counted)
            .expression_attribute_names("#done", "done")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":items", AttributeValue::Ns(vec![item.to_string()]))
            .expression_attribute_values(":item", attr_n(item as i64))
            .expression_attribute_values(":ttl", self.item_ttl())
            .build()
            .map_err(failed)?;
        let count = Update::builder()
            .table_name(&self.table.name)
            .set_key(key("count".to_string()))
            .update_expression("ADD #n :one SET #ttl = if_not_exists(#ttl, :ttl)")
            .expression_attribute_names("#n", "n_done")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":one", attr_n(1))
            .expression_attribute_values(":ttl", self.item_ttl())
            .build()
            .map_err(failed)?;
        let actions = vec![
            TransactWriteItem::builder()
                .condition_check(earlier)
                .build(),
            TransactWriteItem::builder().update(set).build(),
            TransactWriteItem::builder().update(count).build(),
        ];
        // Workers finishing together touch the one count item: a transaction that met another
        // is cancelled with a conflict and is tried again.
        let mut pause = Duration::from_millis(20);
        for _ in 0..COUNT_ATTEMPTS {
            let sent = self
                .table
                .client
                .transact_write_items()
                .set_transact_items(Some(actions.clone()))
                .send()
                .await;
            let e = match sent {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let reasons: Vec<String> = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().unwrap_or_default().to_string())
                    .collect(),
                Some(TransactWriteItemsError::TransactionInProgressException(_)) => Vec::new(),
                _ => return Err(dynamo_err(e)),
            };
            if reasons.iter().any(|r| r == "ConditionalCheckFailed") {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        Err(StoreError::new(format!(
            "the tally of job {job_id} stayed contended; the item is counted when its message comes back"
        )))
    }

    /// How many of a job's items are counted done, and the task token of the execution waiting
    /// for all of them (once it has been stored). Read after writing one's own half (an item
    /// counted, or the token), so whichever of a last worker and the waiting task writes second
    /// sees both. Every finished item asks, so it reads one number, not the sets (reading sets
    /// made a job of n items read O(n²) numbers); `tally#` sets only exist for a job counted
    /// before the count did.
    pub async fn tally(&self, job_id: &str) -> StoreResult<(u64, Option<String>)> {
        let pk = job_pk(job_id);
        let counted = self
            .table
            .get(&pk, "count")
            .await?
            .and_then(|i| get_n(&i, "n_done"))
            .unwrap_or(0)
            .max(0) as u64;
        let numbers = |items: &[crate::dynamo::Item]| -> std::collections::BTreeSet<String> {
            items
                .iter()
                .flat_map(|i| match i.get("done") {
                    Some(AttributeValue::Ns(items)) => items.clone(),
                    _ => Vec::new(),
                })
                .collect()
        };
        let earlier = self.table.query_all(&pk, Some("tally#"), None).await?;
        // A job counted by an older version too: its workers added to `tally#` without looking
        // at `counted#`, so an item may be in both; count the union of the sets.
        let counted = match earlier.is_empty() {
            true => counted,
            false => {
                let mut all = numbers(&earlier);
                all.extend(numbers(
                    &self.table.query_all(&pk, Some("counted#"), None).await?,
                ));
                all.len() as u64
            }
        };
        let token = self
            .table
            .get(&pk, "await")
            .await?
            .and_then(|i| get_s(&i, "token"));
        Ok((counted, token))
    }

    /// Stores the task token of the execution waiting for a job's items.
    pub async fn set_waiting_token(&self, job_id: &str, token: &str) -> StoreResult<()> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(&job_pk(job_id)))
            .item("sk", attr_s("await"))
            .item("token", attr_s(token))
            .item("ttl", self.item_ttl())
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    /// Deletes every item of a job but the job itself (an expired or cancelled job keeps only
    /// its row).
    async fn delete_children(&self, job_id: &str) -> StoreResult<()> {
        let keys: Vec<(String, String)> = self
            .table
            .query_all(&job_pk(job_id), None, Some("pk, sk"))
            .await?
            .iter()
            .filter_map(|i| Some((get_s(i, "pk")?, get_s(i, "sk")?)))
            .filter(|(_, sk)| sk != "job")
            .collect();
        for chunk in keys.chunks(25) {
            let mut pending: Vec<WriteRequest> = chunk
                .iter()
                .map(|(pk, sk)| {
                    let delete = DeleteRequest::builder()
                        .key("pk", attr_s(pk))
                        .key("sk", attr_s(sk))
                        .build()
                        .map_err(dynamo_err)?;
                    Ok(WriteRequest::builder().delete_request(delete).build())
                })
                .collect::<StoreResult<_>>()?;
            for attempt in 0..8u32 {
                let out = self
                    .table
                    .client
                    .batch_write_item()
                    .request_items(&self.table.name, pending)
                    .send()
                    .await
                    .map_err(dynamo_err)?;
                pending = out
                    .unprocessed_items
                    .unwrap_or_default()
                    .remove(&self.table.name)
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
        }
        Ok(())
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

/// Whether a transaction was cancelled because its first write's condition failed.
fn first_condition_failed<R>(
    e: &SdkError<aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError, R>,
) -> bool {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
            cancelled
                .cancellation_reasons()
                .first()
                .and_then(|r| r.code())
                == Some("ConditionalCheckFailed")
        }
        _ => false,
    }
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
            Ok(_) => {
                if matches!(job.status, JobStatus::Expired | JobStatus::Cancelled) {
                    self.delete_children(&job.id).await?;
                }
                Ok(true)
            }
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
                    ("ttl".to_string(), self.item_ttl()),
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
                    ("ttl".to_string(), self.item_ttl()),
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

    /// A `done#<n>` item of its own, not a flag on the work item: a plan delivered twice at once
    /// (its message came back while the first run still planned) puts the work items again, and
    /// must not clear what workers finished meanwhile. (Work items with `done = 1` are jobs
    /// finished before; they still count.)
    async fn complete_item(&self, job_id: &str, item: u32) -> StoreResult<()> {
        let record = HashMap::from([
            ("pk".to_string(), attr_s(&job_pk(job_id))),
            ("sk".to_string(), attr_s(&format!("done#{item:06}"))),
            ("ttl".to_string(), self.item_ttl()),
        ]);
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(record))
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    async fn completed_items(&self, job_id: &str) -> StoreResult<Vec<u32>> {
        let pk = job_pk(job_id);
        let number = |i: &crate::dynamo::Item, prefix: &str| -> Option<u32> {
            get_s(i, "sk")?.strip_prefix(prefix)?.parse().ok()
        };
        let mut done: Vec<u32> = self
            .table
            .query_all(&pk, Some("done#"), Some("sk"))
            .await?
            .iter()
            .filter_map(|i| number(i, "done#"))
            .collect();
        let flagged = self
            .table
            .query_all(&pk, Some("item#"), Some("sk, done"))
            .await?;
        done.extend(
            flagged
                .iter()
                .filter(|i| get_n(i, "done") == Some(1))
                .filter_map(|i| number(i, "item#")),
        );
        done.sort_unstable();
        done.dedup();
        Ok(done)
    }

    /// From the tally: a few reads however many items the job has.
    async fn completed_count(&self, job_id: &str) -> StoreResult<usize> {
        Ok(self.tally(job_id).await?.0 as usize)
    }

    async fn is_item_complete(&self, job_id: &str, item: u32) -> StoreResult<bool> {
        let pk = job_pk(job_id);
        if self
            .table
            .get(&pk, &format!("done#{item:06}"))
            .await?
            .is_some()
        {
            return Ok(true);
        }
        let flagged = self.table.get(&pk, &format!("item#{item:06}")).await?;
        Ok(flagged.is_some_and(|i| get_n(&i, "done") == Some(1)))
    }

    /// Keeps only the furthest position: a slower duplicate never moves an item back.
    async fn record_progress(
        &self,
        job_id: &str,
        item: u32,
        cursor: &str,
        next_seq: u32,
    ) -> StoreResult<()> {
        let result = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(&job_pk(job_id)))
            .item("sk", attr_s(&format!("progress#{item:06}")))
            .item("cursor", attr_s(cursor))
            .item("next_seq", attr_n(i64::from(next_seq)))
            .item("ttl", self.item_ttl())
            .condition_expression("attribute_not_exists(next_seq) OR next_seq < :n")
            .expression_attribute_values(":n", attr_n(i64::from(next_seq)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(dynamo_err(e)),
        }
    }

    async fn progress(&self, job_id: &str, item: u32) -> StoreResult<Option<(String, u32)>> {
        let found = self
            .table
            .get(&job_pk(job_id), &format!("progress#{item:06}"))
            .await?;
        Ok(found.and_then(|i| {
            Some((
                get_s(&i, "cursor")?,
                u32::try_from(get_n(&i, "next_seq")?).ok()?,
            ))
        }))
    }

    async fn record_part(&self, part: &PartRecord) -> StoreResult<()> {
        let item = HashMap::from([
            ("pk".to_string(), attr_s(&job_pk(&part.job_id))),
            ("sk".to_string(), attr_s(&format!("part#{}", part.key))),
            ("item".to_string(), attr_n(part.item as i64)),
            ("doc".to_string(), attr_s(&serde_json::to_string(part)?)),
            ("ttl".to_string(), self.item_ttl()),
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

    async fn part(&self, job_id: &str, key: &str) -> StoreResult<Option<PartRecord>> {
        let item = self
            .table
            .get(&job_pk(job_id), &format!("part#{key}"))
            .await?;
        item.as_ref().map(doc).transpose()
    }

    async fn put_manifest_page(
        &self,
        job_id: &str,
        page: u32,
        keys: &[String],
    ) -> StoreResult<bool> {
        let item = HashMap::from([
            ("pk".to_string(), attr_s(&job_pk(job_id))),
            ("sk".to_string(), attr_s(&format!("page#{page:06}"))),
            ("keys".to_string(), attr_string_list(keys)),
            ("ttl".to_string(), self.item_ttl()),
        ]);
        self.table.put_if_absent(item).await
    }

    async fn manifest_pages(&self, job_id: &str) -> StoreResult<Vec<Vec<String>>> {
        let items = self
            .table
            .query_all(&job_pk(job_id), Some("page#"), None)
            .await?;
        Ok(items
            .iter()
            .map(|item| get_string_list(item, "keys"))
            .collect())
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

    /// One transaction: the lock's conditional put (as in `acquire`) and the job's put.
    async fn acquire_for_job(&self, job: &Job, lease: Duration, now: Instant) -> StoreResult<bool> {
        use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
        let now = to_micros(now);
        let lock = Put::builder()
            .table_name(&self.table.name)
            .item("pk", attr_s(LOCK_PK))
            .item("sk", attr_s("lock"))
            .item("owner", attr_s(&job.id))
            .item("expires", attr_n(now + lease.as_micros() as i64))
            .condition_expression("attribute_not_exists(pk) OR expires <= :now OR #o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":now", attr_n(now))
            .expression_attribute_values(":owner", attr_s(&job.id))
            .build()
            .map_err(dynamo_err)?;
        let stored = Put::builder()
            .table_name(&self.table.name)
            .set_item(Some(job_item(job)?))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(dynamo_err)?;
        let result = self
            .table
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(lock).build())
            .transact_items(TransactWriteItem::builder().put(stored).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if first_condition_failed(&e) => Ok(false),
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
