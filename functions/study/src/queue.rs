//! Running study jobs in this process: a queue with bounded concurrency (study exports do not
//! take the FHIR single-export lock), plus the duties of a long-running process: resume pending
//! jobs at start, expire jobs past their study's retention, deliver webhooks.

use crate::service::{StudyDispatcher, StudyService};
use crate::webhooks::WebhookSender;
use async_trait::async_trait;
use export_core::StoreResult;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// Queues job ids for [`run_queue`].
pub struct InProcessQueue {
    sender: mpsc::UnboundedSender<String>,
}

impl InProcessQueue {
    /// The queue and the receiving end [`run_queue`] takes.
    pub fn new() -> (InProcessQueue, mpsc::UnboundedReceiver<String>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (InProcessQueue { sender }, receiver)
    }
}

#[async_trait]
impl StudyDispatcher for InProcessQueue {
    async fn submit(&self, job_id: &str) -> StoreResult<()> {
        self.sender
            .send(job_id.to_string())
            .map_err(|_| export_core::StoreError::new("the study job queue has stopped"))
    }
}

/// Runs queued jobs, `concurrency` at a time, until the queue closes. Pending jobs left by an
/// earlier process are queued first.
pub async fn run_queue(
    service: Arc<StudyService>,
    mut receiver: mpsc::UnboundedReceiver<String>,
    concurrency: usize,
) {
    match service.ports.jobs.pending_jobs().await {
        Ok(pending) => {
            for job in pending {
                tracing::info!(job = %job.id, "resuming a study export interrupted by a restart");
                service.dispatcher.submit(&job.id).await.ok();
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list pending study exports"),
    }
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    while let Some(job_id) = receiver.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = service.run(&job_id).await {
                tracing::error!(job = %job_id, error = %e, "study export could not be run");
            }
        });
    }
}

/// Every `every`: expires jobs past retention and delivers due webhooks.
pub async fn run_duties(
    service: Arc<StudyService>,
    sender: Arc<dyn WebhookSender>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = crate::service::now_ms();
        if let Err(e) = service.expire_due(now).await {
            tracing::warn!(error = %e, "study export expiry failed");
        }
        if let Err(e) = service.deliver_webhooks(sender.as_ref(), now).await {
            tracing::warn!(error = %e, "webhook delivery failed");
        }
    }
}
