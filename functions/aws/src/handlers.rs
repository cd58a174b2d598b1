//! The three Lambda handlers. Each binary under `functions/` is a thin `main` around one of these;
//! the tests call them directly with real event payloads.
//!
//! The state machine's tasks (plan, await the items, finalize, fail) are
//! `sqs:sendMessage.waitForTaskToken` messages to the coordinator, answered with
//! `SendTaskSuccess`/`SendTaskFailure`. Work items travel on the work queue without task tokens
//! (see [`crate::fanout`]): a worker that finishes a job's last item answers the waiting task.
//! The coordinator also consumes the work dead-letter queue (an item that gave up fails its job)
//! and the scheduled duties message (expiry, webhooks, the sweep of dead executions).

use crate::fanout::{self, WorkMessage};
use crate::service::AwsService;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sfn::error::{ProvideErrorMetadata, SdkError};
use bytes::Bytes;
use export_core::engine::ItemOutcome;
use export_core::job::JobStatus;
use export_core::{Body, StoreResult};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Instant;

/// What the coordinator is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinatorAction {
    Plan,
    /// Answer once every work item is done (or the job failed).
    Await,
    Finalize,
    Fail,
}

/// A coordinator message from the state machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorMessage {
    pub task_token: String,
    pub action: CoordinatorAction,
    pub job_id: String,
    /// The caught error (`{"Error": …, "Cause": …}`) for `fail`.
    #[serde(default)]
    pub error: Option<Value>,
}

/// API Gateway (HTTP API) → the shared FHIR router.
pub async fn api(
    service: &AwsService,
    request: lambda_http::Request,
) -> lambda_http::Response<lambda_http::Body> {
    use lambda_http::RequestExt;
    let source = match request.request_context_ref() {
        Some(lambda_http::request::RequestContext::ApiGatewayV2(context)) => {
            context.http.source_ip.clone()
        }
        _ => None,
    };
    let (mut parts, body) = request.into_parts();
    let kickoff = crate::metrics::Kickoff::of(&parts);
    if let Some(address) = source {
        parts
            .extensions
            .insert(export_gateway::ClientAddress(address));
    }
    let request = http::Request::from_parts(parts, Bytes::copy_from_slice(body.as_ref()));
    let (parts, body) = service.gateway.handle(request).await.into_parts();
    kickoff.answered(parts.status);
    let body = match body {
        Body::Full(bytes) => match String::from_utf8(bytes.to_vec()) {
            Ok(text) => lambda_http::Body::Text(text),
            Err(e) => lambda_http::Body::Binary(e.into_bytes()),
        },
        // Files are downloaded from S3 through presigned URLs, never through the API.
        Body::Stream(_) => lambda_http::Body::Empty,
    };
    lambda_http::Response::from_parts(parts, body)
}

/// SQS → export work items. Returns the messages to retry; each of them is first given its
/// backoff (see [`fanout::retry_delay`]).
pub async fn worker(service: &AwsService, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
    let mut failures = Vec::new();
    for record in event.records {
        if let Err(e) = work(service, &record, deadline).await {
            let attempt = receive_count(&record);
            tracing::error!(error = %e, message = ?record.message_id, attempt, "work message will be retried");
            back_off(service, &record, attempt).await;
            failures.push(failure(&record));
        }
    }
    batch_response(failures)
}

/// SQS → plan, await, finalize or fail a job; the work dead-letter queue; the duties schedule.
/// Returns the messages to retry.
pub async fn coordinator(service: &AwsService, event: SqsEvent) -> SqsBatchResponse {
    let mut failures = Vec::new();
    for record in event.records {
        if let Err(e) = coordinate(service, &record).await {
            tracing::error!(error = %e, message = ?record.message_id, "coordinator message will be retried");
            failures.push(failure(&record));
        }
    }
    batch_response(failures)
}

fn failure(record: &SqsMessage) -> BatchItemFailure {
    let mut failure = BatchItemFailure::default();
    failure.item_identifier = record.message_id.clone().unwrap_or_default();
    failure
}

fn batch_response(failures: Vec<BatchItemFailure>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = failures;
    response
}

/// Which delivery of its message this is (1 for the first).
fn receive_count(record: &SqsMessage) -> u32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// Keeps a failed message invisible for its backoff. Best effort: without it, the message comes
/// back after the queue's visibility timeout.
async fn back_off(service: &AwsService, record: &SqsMessage, attempt: u32) {
    let Some(receipt) = record.receipt_handle.as_deref() else {
        return;
    };
    let settings = &service.settings;
    let delay = fanout::retry_delay(attempt, settings.retry_base, settings.retry_max);
    let changed = service
        .sqs
        .change_message_visibility()
        .queue_url(&settings.work_queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(delay.as_secs().min(43_200) as i32)
        .send()
        .await;
    if let Err(e) = changed {
        tracing::warn!(error = ?e, "could not delay the retry of a work message");
    }
}

type HandlerResult = Result<(), String>;

async fn work(service: &AwsService, record: &SqsMessage, deadline: Instant) -> HandlerResult {
    let body = record.body.as_deref().unwrap_or("");
    if let Ok(study) = serde_json::from_str::<crate::service::StudyJobMessage>(body) {
        // A study export; a failure is retried by SQS (the job stays pending meanwhile).
        let started = Instant::now();
        let outcome = service.study.run(&study.study_job).await;
        tracing::info!(study_job = %study.study_job, ok = outcome.is_ok(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0, "study job");
        return outcome.map_err(|e| e.to_string());
    }
    let message: WorkMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(e) => {
            // Retrying cannot fix it, and no job can be named: it is dropped.
            tracing::error!(error = %e, "discarding a malformed work message");
            return Ok(());
        }
    };
    let exporter = &service.exporter;
    let job_id = message.item.job_id.clone();
    // A job that is gone, cancelled, failed or expired needs no more work: the message is
    // dropped (acknowledged) rather than retried.
    let active = exporter
        .ports
        .jobs
        .get(&job_id)
        .await
        .map_err(|e| e.to_string())?
        .is_some_and(|j| j.status.is_active());
    if !active {
        tracing::info!(export_id = %job_id, item = message.item.item, "work for a stopped export dropped");
        return Ok(());
    }
    let lease = keep_lease(service, &job_id).await;
    let budget = deadline
        .checked_sub(service.settings.worker_reserve)
        .unwrap_or_else(Instant::now);
    let started = Instant::now();
    let outcome = exporter
        .export_item(&message.item, message.resume.clone(), Some(budget))
        .await;
    drop(lease);
    log_item(&message, &outcome, started);
    crate::metrics::work_item(record, started);
    match outcome {
        Ok(ItemOutcome::Continue(cursor)) => {
            let next = WorkMessage {
                resume: Some(cursor),
                ..message
            };
            fanout::enqueue(service, &[next])
                .await
                .map_err(|e| e.to_string())
        }
        Ok(ItemOutcome::Done) => {
            service
                .jobs
                .count_done(&job_id, message.item.item)
                .await
                .map_err(|e| e.to_string())?;
            answer_if_all_done(service, &job_id).await
        }
        Ok(ItemOutcome::Stopped) => Ok(()),
        // The message comes back after its backoff and resumes from the last recorded part.
        // The adapter's text (SDK errors, ARNs) is logged, never shown to the client.
        Err(e) => Err(e.to_string()),
    }
}

/// Answers the task waiting for a job's items once the tally says all are done. Called after
/// every finished item and after the token is stored: whichever writes second sees both. A
/// duplicate answer finds the token used and changes nothing.
async fn answer_if_all_done(service: &AwsService, job_id: &str) -> HandlerResult {
    let (done, token) = service
        .jobs
        .tally(job_id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(token) = token else {
        return Ok(());
    };
    let Some(job) = service
        .exporter
        .ports
        .jobs
        .get(job_id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    match job.status {
        JobStatus::InProgress if done >= u64::from(job.items_total) => {
            task_success(service, &token, json!({"jobId": job_id, "items": done})).await
        }
        JobStatus::Accepted | JobStatus::InProgress => Ok(()),
        JobStatus::Failed => {
            let diagnostics = job.error.unwrap_or_default();
            task_failure(service, &token, "WorkItemFailed", &diagnostics).await
        }
        other => task_failure(service, &token, "ExportStopped", other.as_str()).await,
    }
}

/// The work item's line in the log (the worker's counterpart of the API's request line).
fn log_item(message: &WorkMessage, outcome: &StoreResult<ItemOutcome>, started: Instant) {
    let outcome = match outcome {
        Ok(ItemOutcome::Continue(_)) => "continues",
        Ok(ItemOutcome::Stopped) => "stopped",
        Ok(ItemOutcome::Done) => "done",
        Err(_) => "failed",
    };
    tracing::info!(
        export_id = %message.item.job_id,
        item = message.item.item,
        resource_type = %message.item.resource_type,
        resumed = message.resume.is_some(),
        outcome,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "work item"
    );
}

/// The periodic duties message (a scheduled rule sends it to the coordinator queue).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DutiesMessage {
    pub duties: bool,
}

async fn coordinate(service: &AwsService, record: &SqsMessage) -> HandlerResult {
    let body = record.body.as_deref().unwrap_or("");
    if serde_json::from_str::<DutiesMessage>(body).is_ok() {
        return duties(service).await;
    }
    if let Ok(dead) = serde_json::from_str::<WorkMessage>(body) {
        // From the work dead-letter queue: the item used up its attempts.
        return gave_up(service, &dead).await;
    }
    let message: CoordinatorMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "discarding a malformed coordinator message");
            return Ok(());
        }
    };
    let exporter = &service.exporter;
    let job_id = &message.job_id;
    let result = match message.action {
        CoordinatorAction::Plan => plan(service, job_id).await.map(Some),
        CoordinatorAction::Await => {
            // Stored first, then the tally read (see answer_if_all_done); answered later by the
            // worker that finishes the last item when not all are done yet.
            return match service
                .jobs
                .set_waiting_token(job_id, &message.task_token)
                .await
            {
                Ok(()) => answer_if_all_done(service, job_id).await,
                Err(e) => Err(e.to_string()),
            };
        }
        CoordinatorAction::Finalize => crate::metrics::finalize(exporter, job_id)
            .await
            .map(|_| Some(json!({"jobId": job_id}))),
        CoordinatorAction::Fail => {
            // The caught error's name (e.g. States.Timeout) is safe to show; its cause may hold
            // SDK texts and ARNs, so it is logged only. A failure a worker explained was
            // recorded on the job already, and `fail` keeps that first explanation.
            let error = message.error.unwrap_or(Value::Null);
            let name = error["Error"].as_str().unwrap_or("unknown error");
            tracing::error!(export_id = %job_id, error = %error, "the state machine failed the export");
            crate::metrics::fail(exporter, job_id, &format!("the export failed ({name})"))
                .await
                .map(|_| Some(json!({"jobId": job_id})))
        }
    };
    match result {
        Ok(Some(output)) => task_success(service, &message.task_token, output).await,
        Ok(None) => Ok(()),
        Err(e) => {
            tracing::error!(export_id = %job_id, error = %e, "coordinator task failed");
            task_failure(
                service,
                &message.task_token,
                "CoordinatorFailed",
                "the coordinator could not complete the task; the export id is in its log",
            )
            .await
        }
    }
}

/// Plans a job and puts one message per unfinished item on the work queue. A redelivered plan
/// sends them again: items are idempotent and counted once, so a duplicate costs work, never a
/// line.
async fn plan(service: &AwsService, job_id: &str) -> StoreResult<Value> {
    let exporter = &service.exporter;
    let items = exporter.plan(job_id).await?;
    let running = exporter
        .ports
        .jobs
        .get(job_id)
        .await?
        .is_some_and(|j| j.status == JobStatus::InProgress);
    if running {
        let done = exporter.ports.jobs.completed_items(job_id).await?;
        let messages: Vec<WorkMessage> = items
            .iter()
            .filter(|i| !done.contains(&i.item))
            .map(|item| WorkMessage {
                item: item.clone(),
                resume: None,
            })
            .collect();
        fanout::enqueue(service, &messages).await?;
    }
    Ok(json!({"jobId": job_id, "items": items.len()}))
}

/// A work item that used up its attempts (from the dead-letter queue): the job fails with a
/// clear OperationOutcome, its files are deleted and the lock freed; the waiting task is told.
async fn gave_up(service: &AwsService, message: &WorkMessage) -> HandlerResult {
    let job_id = &message.item.job_id;
    // An item that finished but could not be counted (its tally stayed contended through every
    // attempt) is counted now, not failed.
    let finished = service
        .exporter
        .ports
        .jobs
        .is_item_complete(job_id, message.item.item)
        .await
        .map_err(|e| e.to_string())?;
    if finished {
        service
            .jobs
            .count_done(job_id, message.item.item)
            .await
            .map_err(|e| e.to_string())?;
        return answer_if_all_done(service, job_id).await;
    }
    let diagnostics = fanout::work_item_gave_up(&message.item, service.settings.work_attempts);
    tracing::error!(export_id = %job_id, item = message.item.item, "work item gave up");
    crate::metrics::fail(&service.exporter, job_id, &diagnostics)
        .await
        .map_err(|e| e.to_string())?;
    answer_if_all_done(service, job_id).await
}

/// The scheduled duties: expire finished exports (FHIR and study), deliver webhooks, and fail
/// exports whose execution is no longer running.
async fn duties(service: &AwsService) -> HandlerResult {
    let now = export_study::service::now_ms();
    let expired = service
        .exporter
        .expire_due(export_core::fhir::time::now_millis())
        .await
        .map_err(|e| e.to_string())?;
    let study_expired = service
        .study
        .expire_due(now)
        .await
        .map_err(|e| e.to_string())?;
    let sender = export_study::webhooks::HttpWebhookSender;
    let sent = service
        .study
        .deliver_webhooks(&sender, now)
        .await
        .map_err(|e| e.to_string())?;
    let swept = crate::sweeper::sweep(service)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(expired, study_expired, webhooks = sent, swept, "duties");
    Ok(())
}

/// Renews the export lock every `heartbeat_every` until the returned guard is dropped. A lease
/// found lost fails the job (see `Exporter::renew_lease`), and the item then stops.
async fn keep_lease(service: &AwsService, job_id: &str) -> LeaseGuard {
    let (exporter, job_id) = (service.exporter.clone(), job_id.to_string());
    let renew = move || {
        let (exporter, job_id) = (exporter.clone(), job_id.clone());
        async move {
            if let Err(e) = exporter.renew_lease(&job_id).await {
                tracing::warn!(export_id = %job_id, error = %e, "could not renew the export lock");
            }
        }
    };
    renew().await;
    let every = service.settings.heartbeat_every;
    LeaseGuard(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            renew().await;
        }
    }))
}

struct LeaseGuard(tokio::task::JoinHandle<()>);

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn task_success(service: &AwsService, token: &str, output: Value) -> HandlerResult {
    let sent = service
        .sfn
        .send_task_success()
        .task_token(token)
        .output(output.to_string())
        .send()
        .await;
    settled(sent)
}

async fn task_failure(
    service: &AwsService,
    token: &str,
    error: &str,
    cause: &str,
) -> HandlerResult {
    let cause: String = cause.chars().take(32_000).collect();
    let sent = service
        .sfn
        .send_task_failure()
        .task_token(token)
        .error(error)
        .cause(cause)
        .send()
        .await;
    settled(sent)
}

/// The outcome of answering a task token. A duplicate delivery answering an already answered (or
/// timed-out) task has nothing left to do.
fn settled<T, E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    sent: Result<T, SdkError<E, R>>,
) -> HandlerResult {
    match sent {
        Ok(_) => Ok(()),
        Err(e) if is_stale_token(&e) => Ok(()),
        Err(e) => Err(format!("stepfunctions: {e:?}")),
    }
}

fn is_stale_token<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(
        e.as_service_error().and_then(ProvideErrorMetadata::code),
        Some("TaskTimedOut" | "InvalidToken" | "TaskDoesNotExist")
    )
}

/// Converts the Lambda context's deadline (milliseconds since the epoch) to an `Instant`.
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Instant::now() + std::time::Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}
