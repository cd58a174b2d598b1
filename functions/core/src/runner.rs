//! Runs a whole job in this process: plan, export the items a few at a time, finalize. Used by
//! the local server; on AWS, Step Functions plays this part.

use crate::engine::{Exporter, ItemOutcome};
use crate::error::{StoreError, StoreResult};
use crate::item_thread;
use crate::job::JobStatus;
use crate::ports::WorkItem;
use std::sync::Arc;
use tokio::task::JoinSet;

/// What a failed export's status says: the cause (a storage or file-system error) is in the log,
/// under the export's id; its text may name paths or services, so clients never see it.
pub const FAILED: &str = "the export failed because of an internal error; retry it, and if it fails again ask the operator (the export id is in the server's log)";

/// Runs `job_id` to its end. Any error fails the job (files deleted, lock freed); a job cancelled
/// meanwhile just stops. Safe to call again for a job that was interrupted: finished items are
/// kept and unfinished ones are redone from their start.
pub async fn run_job(exporter: Arc<Exporter>, job_id: String) {
    let lease_keeper = AbortOnDrop(tokio::spawn(keep_lease(exporter.clone(), job_id.clone())));
    let result = run_items(&exporter, &job_id).await;
    drop(lease_keeper);
    let outcome = match result {
        Ok(true) => exporter.finalize(&job_id).await,
        Ok(false) => Ok(()),
        Err(e) => {
            // A job cancelled or deleted meanwhile is not a failure: its work just stopped.
            let active = exporter
                .ports
                .jobs
                .get(&job_id)
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.status.is_active());
            if active {
                tracing::error!(export_id = %job_id, error = %e, "export failed");
                exporter.fail(&job_id, FAILED).await
            } else {
                tracing::info!(export_id = %job_id, error = %e, "work of a stopped export ended");
                Ok(())
            }
        }
    };
    if let Err(e) = outcome {
        tracing::error!(export_id = %job_id, error = %e, "could not close the export");
        exporter.fail(&job_id, FAILED).await.ok();
    }
}

/// Runs a job created with [`Exporter::create_unlocked`] to its end, here: plan, items,
/// finalize. `Ok(false)` when it stopped being active (cancelled); an error leaves it to the
/// caller to fail.
pub async fn run_unlocked(exporter: &Arc<Exporter>, job_id: &str) -> StoreResult<bool> {
    if !run_items(exporter, job_id).await? {
        return Ok(false);
    }
    exporter.finalize(job_id).await?;
    Ok(true)
}

/// Exports every unfinished item; `Ok(false)` when the job stopped being active.
///
/// When one item stops (the job was cancelled) or fails, the others are told to stop at their
/// next page and waited for: each runs on a thread of its own that nothing can abort, and the
/// caller deletes the job's files next, which must not be written to after that.
async fn run_items(exporter: &Arc<Exporter>, job_id: &str) -> StoreResult<bool> {
    let items = exporter.plan(job_id).await?;
    let done = exporter.ports.jobs.completed_items(job_id).await?;
    let mut pending = items.into_iter().filter(|i| !done.contains(&i.item));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut running = JoinSet::new();
    let mut result = Ok(true);
    loop {
        while matches!(result, Ok(true)) && running.len() < exporter.settings.concurrency.max(1) {
            let Some(item) = pending.next() else { break };
            running.spawn(run_item(exporter.clone(), item, stopped.clone()));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let outcome = joined
            .map_err(|e| StoreError::new(format!("worker task ended abnormally: {e}")))
            .and_then(|outcome| outcome);
        match outcome {
            Ok(ItemOutcome::Done) => continue,
            Ok(ItemOutcome::Stopped | ItemOutcome::Continue(_)) => {
                if result.is_ok() {
                    result = Ok(false);
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        let _ = stop.send(true);
    }
    if !result? {
        return Ok(false);
    }
    let job = exporter.ports.jobs.get(job_id).await?;
    Ok(job.is_some_and(|j| j.status == JobStatus::InProgress))
}

/// Exports `item` on a thread of its own (see [`crate::item_thread`]). It stops where it next
/// yields (after each page; with network stores also at any wait) once `stopped` says so or its
/// sender is gone (the runner itself was dropped).
async fn run_item(
    exporter: Arc<Exporter>,
    item: WorkItem,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> StoreResult<ItemOutcome> {
    item_thread::spawn(async move {
        tokio::select! {
            outcome = exporter.export_item(&item, None, None) => outcome,
            _ = stopped.wait_for(|stop| *stop) => Ok(ItemOutcome::Stopped),
        }
    })
    .await
    .map_err(|e| StoreError::new(format!("a work item ended abnormally: {e}")))?
}

/// Renews the export lock while the job runs (see [`Exporter::renew_lease`]).
async fn keep_lease(exporter: Arc<Exporter>, job_id: String) {
    let mut tick = tokio::time::interval(exporter.settings.lock_lease / 4);
    loop {
        tick.tick().await;
        match exporter.renew_lease(&job_id).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(export_id = %job_id, error = %e, "could not renew the export lock")
            }
        }
    }
}

/// Stops a background task when the owner goes away, even if the owner is itself aborted.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
