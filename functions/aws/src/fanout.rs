//! The fan-out of a job's work items without a size ceiling.
//!
//! The state machine carries no item list: the coordinator's plan stores the items in DynamoDB
//! and puts one message per item on the work queue itself; the execution then waits on a single
//! task token (`AwaitItems`) that is answered once the job's tally says every item is done. An
//! execution's history is a handful of events whatever the job's size, and how many items run at
//! once is the worker event source's `MaximumConcurrency`, not a Map's.
//!
//! A failed item is not fatal: its message comes back after an exponential backoff
//! ([`retry_delay`]) and resumes from the item's last recorded part; only after the queue's
//! `maxReceiveCount` attempts does it reach the dead-letter queue, whose consumer fails the job
//! ([`work_item_gave_up`]).

use crate::service::AwsService;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use export_core::StoreResult;
use export_core::engine::ItemCursor;
use export_core::error::StoreError;
use export_core::ports::WorkItem;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A work message: one item, and where to resume it when a previous invocation ran out of time.
/// It carries no task token: a worker reports to the job's tally, never to the state machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkMessage {
    pub item: WorkItem,
    #[serde(default)]
    pub resume: Option<ItemCursor>,
}

/// SQS takes at most ten messages per batch.
const BATCH: usize = 10;

/// Sends one work message per item, ten per request; entries SQS refuses are sent again.
pub async fn enqueue(service: &AwsService, messages: &[WorkMessage]) -> StoreResult<()> {
    for chunk in messages.chunks(BATCH) {
        let mut pending: Vec<SendMessageBatchRequestEntry> = chunk
            .iter()
            .enumerate()
            .map(|(n, message)| {
                SendMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .message_body(serde_json::to_string(message)?)
                    .build()
                    .map_err(|e| StoreError::new(format!("sqs: {e:?}")))
            })
            .collect::<StoreResult<_>>()?;
        for attempt in 0..8u32 {
            let out = service
                .sqs
                .send_message_batch()
                .queue_url(&service.settings.work_queue_url)
                .set_entries(Some(pending.clone()))
                .send()
                .await
                .map_err(|e| StoreError::new(format!("sqs: {e:?}")))?;
            let failed: Vec<&str> = out.failed().iter().map(|f| f.id()).collect();
            pending.retain(|entry| failed.contains(&entry.id()));
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
        }
        if !pending.is_empty() {
            return Err(StoreError::new(
                "sqs: a batch of work messages kept failing",
            ));
        }
    }
    Ok(())
}

/// How long a failed work message stays invisible before its next attempt: `base` doubled per
/// earlier attempt, at most `max` (kept below the lock's lease, so a job waiting for a retry
/// keeps its lock: the sweeper renews it while the execution runs).
pub fn retry_delay(receive_count: u32, base: Duration, max: Duration) -> Duration {
    let doublings = receive_count.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(max)
}

/// What a job's status says when one of its items gave up.
pub fn work_item_gave_up(item: &WorkItem, attempts: u32) -> String {
    format!(
        "work item {} of type {} failed after {attempts} attempts; the export was stopped. Retry \
         the export; if it fails again, ask the operator (the export id is in the worker's log)",
        item.item, item.resource_type
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_up_to_its_cap() {
        let (base, max) = (Duration::from_secs(10), Duration::from_secs(300));
        let delays: Vec<u64> = (1..=7)
            .map(|n| retry_delay(n, base, max).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry_delay(0, base, max).as_secs(), 10);
        assert_eq!(retry_delay(u32::MAX, base, max).as_secs(), 300);
    }
}
