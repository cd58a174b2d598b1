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
async fn run_items(exporter: &Arc<Exporter>, job_id: &str) -> StoreResult<bool> {
    let items = exporter.plan(job_id).await?;
    let done = exporter.ports.jobs.completed_items(job_id).await?;
    let mut pending = items.into_iter().filter(|i| !done.contains(&i.item));
    let mut running = JoinSet::new();
    let mut all_done = true;
    loop {
        while running.len() < exporter.settings.concurrency.max(1) {
            let Some(item) = pending.next() else { break };
            running.spawn(run_item(exporter.clone(), item));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        match joined
            .map_err(|e| StoreError::new(format!("worker task ended abnormally: {e}")))??
        {
            ItemOutcome::Done => {}
            ItemOutcome::Stopped | ItemOutcome::Continue(_) => all_done = false,
        }
        if !all_done {
            running.shutdown().await;
            return Ok(false);
        }
    }
    let job = exporter.ports.jobs.get(job_id).await?;
    Ok(job.is_some_and(|j| j.status == JobStatus::InProgress))
}

/// Exports `item` on a blocking-pool thread of its own (see [`crate::item_thread`]). When this
/// task is aborted (the job's runner was stopped), the item stops at its next page: a thread
/// cannot be aborted, but the item's future is dropped when it next yields.
async fn run_item(exporter: Arc<Exporter>, item: WorkItem) -> StoreResult<ItemOutcome> {
    let (_running, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        item_thread::run(&runtime, async move {
            tokio::select! {
                outcome = exporter.export_item(&item, None, None) => outcome,
                _ = stopped => Ok(ItemOutcome::Stopped),
            }
        })
    })
    .await
    .map_err(|e| StoreError::new(format!("worker task ended abnormally: {e}")))?
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
