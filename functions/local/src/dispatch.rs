//! In-process dispatch: each job runs as a tokio task on this server.

use async_trait::async_trait;
use export_core::error::StoreResult;
use export_core::ports::Dispatcher;
use export_core::{Exporter, runner};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long a cancelled job's items may take to stop before the wait is logged.
const CANCEL_SLOW: Duration = Duration::from_secs(10);

/// Runs jobs as tasks of this process and, on cancel, waits for them to stop.
pub struct LocalDispatcher {
    exporter: Arc<Exporter>,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl LocalDispatcher {
    pub fn new(exporter: Arc<Exporter>) -> Self {
        LocalDispatcher {
            exporter,
            tasks: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Dispatcher for LocalDispatcher {
    async fn start(&self, job_id: &str) -> StoreResult<()> {
        let task = tokio::spawn(runner::run_job(self.exporter.clone(), job_id.to_string()));
        let mut tasks = self.tasks.lock().expect("tasks");
        tasks.retain(|_, t| !t.is_finished());
        tasks.insert(job_id.to_string(), task);
        Ok(())
    }

    /// The job is already marked cancelled; its items notice within a page and stop. Waits for
    /// that, however long it takes, so no file is written after the caller deletes them: an item
    /// runs on a thread of its own, which aborting the job's task would not stop.
    async fn cancel(&self, job_id: &str) -> StoreResult<()> {
        let task = self.tasks.lock().expect("tasks").remove(job_id);
        if let Some(mut task) = task
            && tokio::time::timeout(CANCEL_SLOW, &mut task).await.is_err()
        {
            tracing::warn!(export_id = %job_id, "a cancelled export is slow to stop; waiting for it");
            let _ = task.await;
        }
        Ok(())
    }
}
