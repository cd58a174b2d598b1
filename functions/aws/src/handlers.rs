//! The three Lambda handlers. Each binary under `functions/` is a thin `main` around one of these;
//! the tests call them directly with real event payloads.
//!
//! Every Step Functions task is `sqs:sendMessage.waitForTaskToken`: the state machine sends a
//! message carrying a task token, and the SQS-triggered function answers with
//! `SendTaskSuccess`/`SendTaskFailure`. Work items go to the worker queue; plan, finalize and
//! fail go to the coordinator queue.

use crate::service::AwsService;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sfn::error::{ProvideErrorMetadata, SdkError};
use bytes::Bytes;
use export_core::engine::{ItemCursor, ItemOutcome};
use export_core::ports::WorkItem;
use export_core::{Body, StoreResult};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Instant;

/// A work message: one item, and where to resume it when a previous invocation ran out of time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkMessage {
    pub task_token: String,
    pub item: WorkItem,
    #[serde(default)]
    pub resume: Option<ItemCursor>,
}

/// What the coordinator is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinatorAction {
    Plan,
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
    if let Some(address) = source {
        parts
            .extensions
            .insert(export_gateway::ClientAddress(address));
    }
    let request = http::Request::from_parts(parts, Bytes::copy_from_slice(body.as_ref()));
    let (parts, body) = service.gateway.handle(request).await.into_parts();
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

/// SQS → export work items. Returns the messages to retry.
pub async fn worker(service: &AwsService, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
    let mut failures = Vec::new();
    for record in event.records {
        if let Err(e) = work(service, &record, deadline).await {
            tracing::error!(error = %e, message = ?record.message_id, "work message will be retried");
            failures.push(failure(&record));
        }
    }
    batch_response(failures)
}

/// SQS → plan, finalize or fail a job. Returns the messages to retry.
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
            // Retrying cannot fix it; the state machine's heartbeat timeout fails the item.
            tracing::error!(error = %e, "discarding a malformed work message");
            return Ok(());
        }
    };
    let exporter = &service.exporter;
    let job_id = message.item.job_id.clone();
    let beats = heartbeat(service, &message.task_token, &job_id).await?;
    let budget = deadline
        .checked_sub(service.settings.worker_reserve)
        .unwrap_or_else(Instant::now);
    let started = Instant::now();
    let outcome = exporter
        .export_item(&message.item, message.resume.clone(), Some(budget))
        .await;
    drop(beats);
    log_item(&message, &outcome, started);
    match outcome {
        Ok(ItemOutcome::Continue(cursor)) => {
            let next = WorkMessage {
                resume: Some(cursor),
                ..message
            };
            service
                .sqs
                .send_message()
                .queue_url(&service.settings.work_queue_url)
                .message_body(serde_json::to_string(&next).map_err(|e| e.to_string())?)
                .send()
                .await
                .map_err(|e| format!("sqs: {e:?}"))?;
            Ok(())
        }
        Ok(done) => {
            let output =
                json!({"item": message.item.item, "stopped": done == ItemOutcome::Stopped});
            task_success(service, &message.task_token, output).await
        }
        Err(e) => {
            // Record why on the job first (Step Functions may drop a failure's cause), then tell
            // the state machine, whose fail handler releases the lock if this could not. The
            // adapter's text (SDK errors, ARNs) is logged, never shown to the client.
            tracing::error!(export_id = %job_id, item = message.item.item, error = %e, "work item failed");
            let diagnostics = format!(
                "work item {} ({}) failed because of an internal error; the export id is in the worker's log",
                message.item.item, message.item.resource_type
            );
            if let Err(e) = exporter.fail(&job_id, &diagnostics).await {
                tracing::error!(export_id = %job_id, error = %e, "could not mark the job failed");
            }
            task_failure(service, &message.task_token, "WorkItemFailed", &diagnostics).await
        }
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
    if serde_json::from_str::<DutiesMessage>(record.body.as_deref().unwrap_or("")).is_ok() {
        let now = export_study::service::now_ms();
        let expired = service
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
        tracing::info!(expired, webhooks = sent, "duties");
        return Ok(());
    }
    let message: CoordinatorMessage =
        match serde_json::from_str(record.body.as_deref().unwrap_or("")) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "discarding a malformed coordinator message");
                return Ok(());
            }
        };
    let exporter = &service.exporter;
    let job_id = &message.job_id;
    let result = match message.action {
        CoordinatorAction::Plan => exporter
            .plan(job_id)
            .await
            .map(|items| json!({"jobId": job_id, "items": items})),
        CoordinatorAction::Finalize => exporter
            .finalize(job_id)
            .await
            .map(|_| json!({"jobId": job_id})),
        CoordinatorAction::Fail => {
            // The caught error's name (e.g. States.Timeout) is safe to show; its cause may hold
            // SDK texts and ARNs, so it is logged only. A failure a worker explained was
            // recorded on the job already, and `fail` keeps that first explanation.
            let error = message.error.unwrap_or(Value::Null);
            let name = error["Error"].as_str().unwrap_or("unknown error");
            tracing::error!(export_id = %job_id, error = %error, "the state machine failed the export");
            exporter
                .fail(job_id, &format!("the export failed ({name})"))
                .await
                .map(|_| json!({"jobId": job_id}))
        }
    };
    match result {
        Ok(output) => task_success(service, &message.task_token, output).await,
        Err(e) => {
            task_failure(
                service,
                &message.task_token,
                "CoordinatorFailed",
                &e.to_string(),
            )
            .await
        }
    }
}

/// Sends a heartbeat and renews the export lock now and then every `heartbeat_every` until the
/// returned guard is dropped.
async fn heartbeat(
    service: &AwsService,
    token: &str,
    job_id: &str,
) -> Result<HeartbeatGuard, String> {
    let beat = {
        let (sfn, exporter, token, job_id) = (
            service.sfn.clone(),
            service.exporter.clone(),
            token.to_string(),
            job_id.to_string(),
        );
        move || {
            let (sfn, exporter, token, job_id) =
                (sfn.clone(), exporter.clone(), token.clone(), job_id.clone());
            async move {
                if let Err(e) = sfn.send_task_heartbeat().task_token(&token).send().await {
                    tracing::warn!(error = ?e, "heartbeat not accepted");
                }
                if let Err(e) = exporter.renew_lease(&job_id).await {
                    tracing::warn!(export_id = %job_id, error = %e, "could not renew the export lock");
                }
            }
        }
    };
    beat().await;
    let every = service.settings.heartbeat_every;
    Ok(HeartbeatGuard(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            beat().await;
        }
    })))
}

struct HeartbeatGuard(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatGuard {
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
