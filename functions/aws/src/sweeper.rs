//! The sweep of exports whose execution died without failing them.
//!
//! An execution can end without reaching `MarkFailed` (an operator's StopExecution, the state
//! machine's timeout, a bug); its job would then answer 202 for ever and hold the export lock.
//! The scheduled duties fail every such job (files deleted, lock freed), and renew the lease of
//! jobs whose execution still runs, so a job whose items are all waiting out a retry backoff
//! keeps its lock.

use crate::dispatch::execution_arn;
use crate::service::AwsService;
use aws_sdk_sfn::error::ProvideErrorMetadata;
use aws_sdk_sfn::types::ExecutionStatus;
use export_core::StoreResult;
use export_core::error::StoreError;
use export_core::fhir::time::now_millis;
use std::time::Duration;

/// A job younger than this may not have its execution yet (the API stores the job, then starts
/// the execution): a missing execution counts only after it.
pub const START_GRACE: Duration = Duration::from_secs(300);

/// What the status of a job whose execution died says.
pub const EXECUTION_ENDED: &str = "the export stopped before it finished (its run ended \
    unexpectedly); retry the export, and if it fails again ask the operator (the export id is in \
    the service's log)";

/// Fails the active exports whose execution is not running; returns how many.
pub async fn sweep(service: &AwsService) -> StoreResult<usize> {
    let exporter = &service.exporter;
    let mut failed = 0;
    for job in exporter.ports.jobs.active_jobs().await? {
        // Only kick-offs of the FHIR API have executions (and a fingerprint); a study export's
        // engine job runs inside the worker that runs the study job.
        if job.fingerprint.is_none() {
            continue;
        }
        let arn = execution_arn(&service.settings.state_machine_arn, &job.id);
        let described = service
            .sfn
            .describe_execution()
            .execution_arn(&arn)
            .send()
            .await;
        let dead = match described {
            Ok(execution) => execution.status != ExecutionStatus::Running,
            Err(e)
                if e.as_service_error().and_then(ProvideErrorMetadata::code)
                    == Some("ExecutionDoesNotExist") =>
            {
                let age = now_millis() - job.created_at;
                age.to_std().unwrap_or_default() > START_GRACE
            }
            Err(e) => return Err(StoreError::new(format!("stepfunctions: {e:?}"))),
        };
        if dead {
            tracing::error!(export_id = %job.id, "the export's execution is not running; failing it");
            crate::metrics::fail(exporter, &job.id, EXECUTION_ENDED).await?;
            failed += 1;
        } else if !exporter.renew_lease(&job.id).await? {
            tracing::warn!(export_id = %job.id, "the export lost its lock lease");
        }
    }
    Ok(failed)
}
