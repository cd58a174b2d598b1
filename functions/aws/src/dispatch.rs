//! Work dispatch on AWS: one Step Functions execution per job, named after the job.

use async_trait::async_trait;
use aws_sdk_sfn::Client;
use export_core::error::{StoreError, StoreResult};
use export_core::ports::Dispatcher;

/// Starts the export state machine for a job.
pub struct SfnDispatcher {
    client: Client,
    state_machine_arn: String,
}

impl SfnDispatcher {
    pub fn new(client: Client, state_machine_arn: impl Into<String>) -> Self {
        SfnDispatcher {
            client,
            state_machine_arn: state_machine_arn.into(),
        }
    }

    fn execution_arn(&self, job_id: &str) -> String {
        execution_arn(&self.state_machine_arn, job_id)
    }
}

/// The execution of a job (executions are named after their job):
/// `arn:…:stateMachine:NAME` → `arn:…:execution:NAME:JOB`.
pub fn execution_arn(state_machine_arn: &str, job_id: &str) -> String {
    format!(
        "{}:{job_id}",
        state_machine_arn.replacen(":stateMachine:", ":execution:", 1)
    )
}

#[async_trait]
impl Dispatcher for SfnDispatcher {
    async fn start(&self, job_id: &str) -> StoreResult<()> {
        self.client
            .start_execution()
            .state_machine_arn(&self.state_machine_arn)
            .name(job_id)
            .input(serde_json::json!({ "jobId": job_id }).to_string())
            .send()
            .await
            .map_err(|e| StoreError::new(format!("stepfunctions: {e:?}")))?;
        Ok(())
    }

    /// Best effort: the job is already marked cancelled, and workers stop on their own when they
    /// see it (a pending task token can keep an execution from stopping).
    async fn cancel(&self, job_id: &str) -> StoreResult<()> {
        let stopped = self
            .client
            .stop_execution()
            .execution_arn(self.execution_arn(job_id))
            .cause("export cancelled")
            .send()
            .await;
        if let Err(e) = stopped {
            tracing::warn!(export_id = %job_id, error = ?e, "could not stop the execution; workers will stop on the cancelled status");
        }
        Ok(())
    }
}
