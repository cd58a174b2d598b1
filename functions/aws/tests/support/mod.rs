//! A harness that runs the AWS deployment against moto's server: real tables, bucket, queues and
//! the real state machine (infra/statemachine.asl.json), with this process playing Lambda: HTTP API
//! events go to the API handler, and SQS pollers feed the worker and coordinator handlers (the
//! coordinator also consumes the work dead-letter queue, as the template wires it).

#![allow(dead_code)]

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;
use export_aws::aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use export_aws::dynamo::DynamoTable;
use export_aws::{AwsService, AwsSettings, handlers};
use export_core::Settings;
use export_core::fhir::time::now_millis;
use export_core::ports::{NewResource, ResourceStore};
use futures_util::FutureExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// moto's endpoint, from `MOTO_ENDPOINT` (tests/run.sh starts moto and sets it).
pub fn endpoint() -> String {
    std::env::var("MOTO_ENDPOINT").expect(
        "MOTO_ENDPOINT is not set: run the AWS tests through tests/run.sh, which starts moto",
    )
}

pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
        // moto answers one request at a time: under load a response can stall for seconds.
        .stalled_stream_protection(
            aws_config::stalled_stream_protection::StalledStreamProtectionConfig::disabled(),
        )
        .load()
        .await
}

/// Lets moto's Step Functions execute definitions (needed once per moto start; harmless again).
pub fn enable_state_machine_execution() {
    let body = serde_json::json!({"stepfunctions": {"execute_state_machine": true}});
    ureq::post(&format!("{}/moto-api/config", endpoint()))
        .send_json(body)
        .expect("configure moto");
}

/// What the harness does with work messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Each message once, as SQS normally does.
    Once,
    /// Every work message handed to the worker twice (a duplicate delivery).
    Twice,
    /// The worker panics: the harness must fail the test (it checks itself with this).
    Panic,
    /// The first delivery of every item's first message is killed after this long (the handler
    /// future dropped mid-item, as a crashed or timed-out Lambda), and the message becomes
    /// visible again at once, as when its visibility timeout ends.
    KillFirst(Duration),
}

/// One isolated deployment in moto (names carry a unique prefix).
pub struct Deployment {
    pub sdk: SdkConfig,
    pub service: Arc<AwsService>,
    pub settings: AwsSettings,
    pub coordinator_queue: String,
    /// The work queue's dead-letter queue (`maxReceiveCount` = `settings.work_attempts`).
    pub dead_letter_queue: String,
    pub state_machine_arn: String,
    running: Arc<AtomicBool>,
    /// Work messages whose handler has finished.
    pub work_handled: Arc<AtomicUsize>,
    /// Work messages that continued an item (carried a resume cursor), handled.
    pub continuations: Arc<AtomicUsize>,
    /// Worker invocations killed by [`Delivery::KillFirst`].
    pub killed: Arc<AtomicUsize>,
    /// Work messages whose handler asked for a retry (a batch item failure).
    pub retried: Arc<AtomicUsize>,
    /// Messages received and not yet finished, on both queues.
    pub in_flight: Arc<AtomicUsize>,
    /// Panics inside handlers (assertions of the harness included): they run in spawned tasks,
    /// so they are collected here and re-raised in the test by [`Deployment::check`].
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Deployment {
    /// Creates the resources; `tune` adjusts settings before the service is built.
    pub async fn create(tune: impl FnOnce(&mut AwsSettings)) -> Deployment {
        Self::create_with(tune, false).await
    }

    /// A deployment with authentication on, as the template deploys it: tokens signed by a KMS
    /// key (ECC_NIST_P256) created here.
    pub async fn create_secured(tune: impl FnOnce(&mut AwsSettings)) -> Deployment {
        Self::create_with(tune, true).await
    }

    async fn create_with(tune: impl FnOnce(&mut AwsSettings), secured: bool) -> Deployment {
        enable_state_machine_execution();
        let sdk = sdk_config().await;
        let prefix = format!(
            "t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ddb = aws_sdk_dynamodb::Client::new(&sdk);
        for table in ["resources", "jobs", "auth", "study"] {
            DynamoTable::create(&ddb, &format!("{prefix}-{table}"))
                .await
                .expect("create table");
        }
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        );
        for bucket in ["exports", "resources"] {
            s3.create_bucket()
                .bucket(format!("{prefix}-{bucket}"))
                .send()
                .await
                .expect("create bucket");
        }
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let queue = |name: String| {
            let sqs = sqs.clone();
            async move {
                sqs.create_queue()
                    .queue_name(name)
                    .send()
                    .await
                    .expect("create queue")
                    .queue_url
                    .unwrap()
            }
        };
        let work_queue = queue(format!("{prefix}-work")).await;
        let coordinator_queue = queue(format!("{prefix}-coordinator")).await;
        let dead_letter_queue = queue(format!("{prefix}-work-dlq")).await;
        let definition = std::fs::read_to_string(repo_root().join("infra/statemachine.asl.json"))
            .unwrap()
            .replace("${CoordinatorQueueUrl}", &coordinator_queue)
            .replace("${WorkQueueUrl}", &work_queue)
            .replace("${MapConcurrency}", "8")
            .replace("${HeartbeatSeconds}", "120");
        let sfn = aws_sdk_sfn::Client::new(&sdk);
        let state_machine_arn = sfn
            .create_state_machine()
            .name(format!("{prefix}-export"))
            .definition(definition)
            .role_arn("arn:aws:iam::123456789012:role/export-state-machine")
            .send()
            .await
            .expect("create state machine")
            .state_machine_arn;
        let mut settings = AwsSettings {
            state_machine_arn: state_machine_arn.clone(),
            work_queue_url: work_queue,
            shards: 2,
            worker_reserve: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(1),
            // Retries come back after 1 s, 2 s, 2 s…: the backoff's shape without its minutes.
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(2),
            work_attempts: 3,
            // Bodies and patient lists too big for an item go here, as RESOURCE_BUCKET deploys.
            resource_bucket: Some(format!("{prefix}-resources")),
            export: Settings {
                page_size: 200,
                ..Settings::default()
            },
            ..AwsSettings::named(&prefix)
        };
        if secured {
            let kms = aws_sdk_kms::Client::new(&sdk);
            let key = kms
                .create_key()
                .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
                .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
                .send()
                .await
                .expect("create KMS key");
            settings.signing_key_id = key.key_metadata.map(|m| m.key_id);
            settings.enforce_auth = true;
            settings.export.requires_access_token = true;
        }
        tune(&mut settings);
        redrive(
            &sqs,
            &settings.work_queue_url,
            &dead_letter_queue,
            settings.work_attempts,
        )
        .await;
        let service = Arc::new(
            AwsService::new(&sdk, settings.clone())
                .await
                .expect("service"),
        );
        Deployment {
            sdk,
            service,
            settings,
            coordinator_queue,
            dead_letter_queue,
            state_machine_arn,
            running: Arc::new(AtomicBool::new(true)),
            work_handled: Arc::new(AtomicUsize::new(0)),
            continuations: Arc::new(AtomicUsize::new(0)),
            killed: Arc::new(AtomicUsize::new(0)),
            retried: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(std::sync::Mutex::new(Vec::new())),
            pollers: Vec::new(),
        }
    }

    /// Loads resources through the DynamoDB resource store.
    pub async fn load(&self, resources: Vec<NewResource>) {
        for chunk in resources.chunks(500) {
            self.service
                .resources
                .put_resources(chunk.to_vec())
                .await
                .expect("load resources");
        }
    }

    /// Starts the SQS pollers that play the worker and coordinator Lambdas. `worker_service` lets a
    /// test give the worker a differently configured (e.g. broken) service.
    pub fn start_lambdas(&mut self, delivery: Delivery, worker_service: Option<Arc<AwsService>>) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let worker = worker_service.unwrap_or_else(|| self.service.clone());
        let (handled, continuations, killed, retried) = (
            self.work_handled.clone(),
            self.continuations.clone(),
            self.killed.clone(),
            self.retried.clone(),
        );
        let watch = Watch {
            running: self.running.clone(),
            in_flight: self.in_flight.clone(),
            failures: self.failures.clone(),
        };
        let work_queue = self.settings.work_queue_url.clone();
        let visibility = sqs.clone();
        self.pollers.push(tokio::spawn(poll(
            sqs.clone(),
            self.settings.work_queue_url.clone(),
            watch.clone(),
            move |event| {
                let (worker, handled, continuations, killed, retried) = (
                    worker.clone(),
                    handled.clone(),
                    continuations.clone(),
                    killed.clone(),
                    retried.clone(),
                );
                let (visibility, work_queue) = (visibility.clone(), work_queue.clone());
                async move {
                    assert!(
                        delivery != Delivery::Panic,
                        "the worker panicked on purpose"
                    );
                    let deadline = Instant::now() + Duration::from_secs(900);
                    let record = &event.records[0];
                    let body: Value = serde_json::from_str(record.body.as_deref().unwrap_or("{}"))
                        .unwrap_or_default();
                    let first_delivery = record
                        .attributes
                        .get("ApproximateReceiveCount")
                        .is_none_or(|n| n == "1");
                    // Duplicate an item's first message and first continuation (duplicating every hop
                    // of a continuation chain would grow the number of chains exponentially). The
                    // two copies run at the same time, as two Lambdas would.
                    let early =
                        body["resume"].is_null() || body["resume"]["next_seq"].as_u64() <= Some(1);
                    let response = match delivery {
                        Delivery::Twice if early => {
                            let (first, second) = tokio::join!(
                                handlers::worker(&worker, event.clone(), deadline),
                                handlers::worker(&worker, event, deadline)
                            );
                            assert!(
                                first.batch_item_failures.is_empty(),
                                "a duplicate delivery failed"
                            );
                            second
                        }
                        Delivery::KillFirst(after) if first_delivery && body["resume"].is_null() => {
                            let receipt = record.receipt_handle.clone().unwrap_or_default();
                            let id = record.message_id.clone().unwrap_or_default();
                            let run = handlers::worker(&worker, event.clone(), deadline);
                            match tokio::time::timeout(after, run).await {
                                Ok(response) => response,
                                Err(_) => {
                                    // The invocation died: nothing of it runs any more, and SQS
                                    // hands the message out again.
                                    killed.fetch_add(1, Ordering::SeqCst);
                                    visibility
                                        .change_message_visibility()
                                        .queue_url(&work_queue)
                                        .receipt_handle(receipt)
                                        .visibility_timeout(0)
                                        .send()
                                        .await
                                        .expect("make the message visible");
                                    let mut failure =
                                        export_aws::aws_lambda_events::event::sqs::BatchItemFailure::default();
                                    failure.item_identifier = id;
                                    let mut response = export_aws::aws_lambda_events::event::sqs::SqsBatchResponse::default();
                                    response.batch_item_failures = vec![failure];
                                    return response;
                                }
                            }
                        }
                        _ => handlers::worker(&worker, event, deadline).await,
                    };
                    handled.fetch_add(1, Ordering::SeqCst);
                    if !body["resume"].is_null() {
                        continuations.fetch_add(1, Ordering::SeqCst);
                    }
                    if !response.batch_item_failures.is_empty() {
                        retried.fetch_add(1, Ordering::SeqCst);
                    }
                    response
                }
            },
        )));
        let coordinator = self.service.clone();
        let handler = move |event| {
            let coordinator = coordinator.clone();
            async move { handlers::coordinator(&coordinator, event).await }
        };
        self.pollers.push(tokio::spawn(poll(
            sqs.clone(),
            self.coordinator_queue.clone(),
            watch.clone(),
            handler.clone(),
        )));
        self.pollers.push(tokio::spawn(poll(
            sqs,
            self.dead_letter_queue.clone(),
            watch,
            handler,
        )));
    }

    /// Runs the scheduled duties once (expiry, webhooks, the sweep of dead executions), as the
    /// schedule's message to the coordinator does.
    pub async fn run_duties(&self) {
        let mut record = SqsMessage::default();
        record.message_id = Some("duties".into());
        record.body = Some(r#"{"duties": true}"#.into());
        let mut event = SqsEvent::default();
        event.records = vec![record];
        let response = handlers::coordinator(&self.service, event).await;
        assert!(response.batch_item_failures.is_empty(), "the duties failed");
    }

    /// Fails the test if a handler panicked.
    pub fn check(&self) {
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "a Lambda handler failed:\n{}",
            failures.join("\n")
        );
    }

    /// Waits until nothing is left to do: no handler running, both queues empty (visible and in
    /// flight) and the job's execution ended, for a few polls in a row. Checks on S3 or DynamoDB
    /// made after this see everything the workers will ever write.
    pub async fn wait_until_quiet(&self, job_id: &str) {
        let sqs = aws_sdk_sqs::Client::new(&self.sdk);
        let started = Instant::now();
        let mut quiet_polls = 0;
        while quiet_polls < 5 {
            self.check();
            let mut queued = 0;
            for queue in [
                &self.settings.work_queue_url,
                &self.coordinator_queue,
                &self.dead_letter_queue,
            ] {
                let attributes = sqs
                    .get_queue_attributes()
                    .queue_url(queue)
                    .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                    .send()
                    .await
                    .expect("queue attributes");
                for name in [
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                ] {
                    queued += attributes
                        .attributes()
                        .and_then(|a| a.get(&name))
                        .and_then(|n| n.parse::<usize>().ok())
                        .unwrap_or(0);
                }
            }
            let busy = self.in_flight.load(Ordering::SeqCst);
            let running = self.execution_status(job_id).await == "RUNNING";
            if queued == 0 && busy == 0 && !running {
                quiet_polls += 1;
            } else {
                quiet_polls = 0;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "not quiet after 300 s: {queued} queued, {busy} running, execution running: {running}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends an HTTP API (payload v2) event, built from a file in `events/`, to the API handler.
    pub async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> ApiResponse {
        self.call_with_headers(method, path_and_query, body, &[])
            .await
    }

    /// Like [`Deployment::call`], with extra (or replaced) request headers.
    pub async fn call_with_headers(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> ApiResponse {
        let mut headers = headers.to_vec();
        let text = body.map(|b| b.to_string());
        if text.is_some() {
            headers.push(("content-type", "application/fhir+json"));
        }
        self.call_raw(method, path_and_query, text.as_deref(), &headers)
            .await
    }

    /// A registered SMART client (with a key generated for the test) and an access token for
    /// `scope` from the API's token endpoint.
    pub async fn client_token(&self, id: &str, scope: &str) -> String {
        use export_auth::ports::{ClientKeys, ClientStore, RegisteredClient};
        let client = e2e_tests::smart::TestClient::new(id);
        self.service
            .auth_store
            .put_client(&RegisteredClient {
                id: id.into(),
                keys: ClientKeys::Inline(client.jwks.clone()),
                allowed_scopes: "system/*.rs".into(),
                created: 0,
            })
            .await
            .unwrap();
        let token_url = "https://abc123.execute-api.us-east-1.amazonaws.com/auth/token";
        let body = format!(
            "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}&scope={}",
            client.assertion(token_url, |_| {}),
            scope
                .replace('/', "%2F")
                .replace(' ', "+")
                .replace('*', "%2A")
        );
        let response = self
            .call_raw(
                "POST",
                "/auth/token",
                Some(&body),
                &[("content-type", "application/x-www-form-urlencoded")],
            )
            .await;
        assert_eq!(response.status, 200, "token: {}", response.body);
        response.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Sends an HTTP API event with a raw body and the given headers.
    pub async fn call_raw(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> ApiResponse {
        let mut event: Value = serde_json::from_str(
            &std::fs::read_to_string(repo_root().join("events/api-kickoff-system.json")).unwrap(),
        )
        .unwrap();
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        event["rawPath"] = path.into();
        event["rawQueryString"] = query.into();
        event["requestContext"]["http"]["method"] = method.into();
        event["requestContext"]["http"]["path"] = path.into();
        for (name, value) in headers {
            event["headers"][name.to_ascii_lowercase()] = (*value).into();
        }
        if let Some(body) = body {
            event["body"] = body.into();
        }
        let request = export_aws::lambda_http::request::from_str(&event.to_string())
            .expect("valid HTTP API event");
        let response = handlers::api(&self.service, request).await;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = String::from_utf8_lossy(response.body().as_ref()).into_owned();
        ApiResponse {
            status,
            headers,
            body,
        }
    }

    pub async fn kickoff(&self, path: &str) -> ApiResponse {
        self.call("GET", path, None).await
    }

    /// Polls the status until 200 and returns the manifest.
    pub async fn wait_for_manifest(&self, status_path: &str) -> Value {
        self.wait_for_manifest_within(status_path, Duration::from_secs(600))
            .await
    }

    /// [`Deployment::wait_for_manifest`] for an export that may take up to `limit` on moto.
    pub async fn wait_for_manifest_within(&self, status_path: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            self.check();
            let r = self.call("GET", status_path, None).await;
            match r.status {
                200 => return serde_json::from_str(&r.body).unwrap(),
                202 => {
                    assert!(r.header("x-progress").is_some() && r.header("retry-after").is_some())
                }
                other => {
                    let job = status_path.rsplit('/').next().unwrap_or("");
                    let events = self.failure_events(job).await;
                    panic!(
                        "status {other} while polling {status_path}: {}\nexecution: {events}",
                        r.body
                    )
                }
            }
            assert!(started.elapsed() < limit, "export did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every page of a manifest, `first` included, following the `next` links through the API.
    pub async fn manifest_pages(&self, first: Value) -> Vec<Value> {
        let mut pages = vec![first];
        while let Some(next) = pages.last().unwrap()["link"][0]["url"].as_str() {
            assert_eq!(pages.last().unwrap()["link"][0]["relation"], "next");
            let path = next
                .strip_prefix("https://abc123.execute-api.us-east-1.amazonaws.com")
                .unwrap_or_else(|| panic!("a next page on the API: {next}"))
                .to_string();
            let r = self.call("GET", &path, None).await;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            pages.push(r.json());
        }
        pages
    }

    /// Polls the status until it is an error and returns it.
    pub async fn wait_for_failure(&self, status_path: &str) -> ApiResponse {
        let started = Instant::now();
        loop {
            self.check();
            let r = self.call("GET", status_path, None).await;
            if r.status >= 400 {
                return r;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "export did not fail: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The status of the job's Step Functions execution.
    pub async fn execution_status(&self, job_id: &str) -> String {
        let arn = format!(
            "{}:{job_id}",
            self.state_machine_arn
                .replacen(":stateMachine:", ":execution:", 1)
        );
        let sfn = aws_sdk_sfn::Client::new(&self.sdk);
        let out = sfn
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .expect("describe execution");
        out.status.as_str().to_string()
    }

    /// The failed and timed-out events of a job's execution, to explain a failed test.
    pub async fn failure_events(&self, job_id: &str) -> String {
        let arn = format!(
            "{}:{job_id}",
            self.state_machine_arn
                .replacen(":stateMachine:", ":execution:", 1)
        );
        let sfn = aws_sdk_sfn::Client::new(&self.sdk);
        match sfn.get_execution_history().execution_arn(arn).send().await {
            Ok(history) => history
                .events()
                .iter()
                .filter(|e| {
                    let kind = e.r#type().as_str();
                    kind.contains("Failed") || kind.contains("TimedOut") || kind.contains("Aborted")
                })
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("(no history: {e:?})"),
        }
    }

    pub async fn wait_for_execution(&self, job_id: &str) -> String {
        for _ in 0..3000 {
            self.check();
            let status = self.execution_status(job_id).await;
            if status != "RUNNING" {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("execution {job_id} still running");
    }

    /// How many events a job's execution history holds, and the largest input or output any
    /// of them carries (Step Functions refuses a payload over 256 KB and a history over 25,000
    /// events; moto enforces neither, so tests check them here).
    pub async fn history_size(&self, job_id: &str) -> (usize, usize) {
        let arn = format!(
            "{}:{job_id}",
            self.state_machine_arn
                .replacen(":stateMachine:", ":execution:", 1)
        );
        let sfn = aws_sdk_sfn::Client::new(&self.sdk);
        let (mut events, mut largest, mut token) = (0, 0, None);
        loop {
            let page = sfn
                .get_execution_history()
                .execution_arn(&arn)
                .set_next_token(token)
                .send()
                .await
                .expect("execution history");
            events += page.events().len();
            for event in page.events() {
                // The event's details, inputs and outputs included, as the API returns them.
                largest = largest.max(format!("{event:?}").len());
            }
            token = page.next_token().map(String::from);
            if token.is_none() {
                return (events, largest);
            }
        }
    }

    /// Keys of the objects under a job's prefix.
    pub async fn objects(&self, job_id: &str) -> Vec<String> {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.sdk)
                .force_path_style(true)
                .build(),
        );
        let out = s3
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(format!("{job_id}/"))
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(String::from))
            .collect()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        for poller in &self.pollers {
            poller.abort();
        }
        if !std::thread::panicking() {
            self.check();
        }
    }
}

/// What the pollers share with the test: whether to go on, what runs, what failed.
#[derive(Clone)]
struct Watch {
    running: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Receives messages and hands each to `handler` as a one-record SQS event, like an event source
/// mapping with batch size 1; a message reported in `batchItemFailures` stays for a retry. A
/// handler that panics is recorded in `watch.failures` (and its message left for a retry).
async fn poll<F, Fut>(sqs: aws_sdk_sqs::Client, queue: String, watch: Watch, handler: F)
where
    F: Fn(SqsEvent) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = export_aws::aws_lambda_events::event::sqs::SqsBatchResponse>
        + Send
        + 'static,
{
    let handler = Arc::new(handler);
    // Like Lambda, messages are handled as they arrive, up to a concurrency limit: a slow
    // invocation never holds back the messages behind it (their heartbeat clocks are running).
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    while watch.running.load(Ordering::Relaxed) {
        let free = slots.available_permits().min(10);
        if free == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Ok(out) = sqs
            .receive_message()
            .queue_url(&queue)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .max_number_of_messages(free as i32)
            .wait_time_seconds(1)
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for message in out.messages.unwrap_or_default() {
            let slot = slots.clone().acquire_owned().await.expect("semaphore open");
            watch.in_flight.fetch_add(1, Ordering::SeqCst);
            let mut record = SqsMessage::default();
            record.message_id = message.message_id.clone();
            record.receipt_handle = message.receipt_handle.clone();
            record.body = message.body.clone();
            record.event_source = Some("aws:sqs".into());
            record.attributes = message
                .attributes
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.as_str().to_string(), v))
                .collect();
            let mut event = SqsEvent::default();
            event.records = vec![record];
            let (handler, sqs, queue, watch) =
                (handler.clone(), sqs.clone(), queue.clone(), watch.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let outcome = std::panic::AssertUnwindSafe(handler(event))
                    .catch_unwind()
                    .await;
                match outcome {
                    Ok(response) if response.batch_item_failures.is_empty() => {
                        sqs.delete_message()
                            .queue_url(&queue)
                            .receipt_handle(message.receipt_handle.unwrap_or_default())
                            .send()
                            .await
                            .ok();
                    }
                    Ok(_) => {}
                    Err(panic) => {
                        let text = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a handler panicked".into());
                        watch.failures.lock().unwrap().push(text);
                    }
                }
                watch.in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
}

/// Sends a queue's messages to `dead_letter` after `attempts` deliveries (the template's
/// `RedrivePolicy`); the queue's visibility timeout is a minute (an invocation's length here).
async fn redrive(sqs: &aws_sdk_sqs::Client, queue: &str, dead_letter: &str, attempts: u32) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let arn = sqs
        .get_queue_attributes()
        .queue_url(dead_letter)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("dead-letter queue attributes")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("dead-letter queue ARN");
    let policy = serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": attempts});
    sqs.set_queue_attributes()
        .queue_url(queue)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .attributes(QueueAttributeName::VisibilityTimeout, "60")
        .send()
        .await
        .expect("redrive policy");
}

/// An API response.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl ApiResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The path of `Content-Location`, for calling the API handler again.
    pub fn status_path(&self) -> String {
        let location = self.header("content-location").expect("Content-Location");
        assert!(
            location.starts_with(
                "https://abc123.execute-api.us-east-1.amazonaws.com/fhir/$export-status/"
            ),
            "{location}"
        );
        location[location.find("/fhir/").unwrap()..].to_string()
    }

    pub fn assert_outcome(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/fhir+json")
        );
        assert_eq!(self.json()["resourceType"], "OperationOutcome");
    }
}

/// The same export run by the local deployment (SQLite + files) on the same resources:
/// type → sorted lines.
pub async fn local_mode_export(
    resources: &[NewResource],
    level: export_core::params::ExportLevel,
    params: export_core::params::ExportParams,
    settings: &Settings,
) -> BTreeMap<String, Vec<String>> {
    use bulk_export_local::files::FileOutput;
    use bulk_export_local::sqlite::SqliteStore;
    use export_core::ports::JobStore;
    let dir = std::env::temp_dir().join(format!(
        "aws-vs-local-{}-{}",
        std::process::id(),
        export_core::ids::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    store.put_resources_blocking(resources.to_vec()).unwrap();
    let output = Arc::new(FileOutput::new(&dir.join("out")).unwrap());
    let ports = export_core::engine::Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let settings = Settings {
        page_delay: Duration::ZERO,
        ..settings.clone()
    };
    let exporter = Arc::new(export_core::Exporter::new(ports, settings));
    let job = exporter
        .kickoff(level, params, "local".into())
        .await
        .unwrap();
    export_core::runner::run_job(exporter.clone(), job.id.clone()).await;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in store.parts(&job.id).await.unwrap() {
        let text = std::fs::read_to_string(dir.join("out").join(&part.key)).unwrap();
        out.entry(part.resource_type.clone())
            .or_default()
            .extend(text.lines().map(String::from));
    }
    out.values_mut().for_each(|lines| lines.sort());
    std::fs::remove_dir_all(&dir).ok();
    out
}

/// The generated resources as the oracle reads them (deletions left out, and what they delete).
pub fn live_values(resources: &[NewResource]) -> Vec<Value> {
    let deleted: BTreeSet<(String, String)> = resources
        .iter()
        .filter(|r| r.deleted)
        .map(|r| (r.resource_type.clone(), r.id.clone()))
        .collect();
    resources
        .iter()
        .filter(|r| !deleted.contains(&(r.resource_type.clone(), r.id.clone())))
        .map(|r| r.json.clone())
        .collect()
}

/// A manifest page's files: object path and count (presigned URLs differ on every poll).
pub fn manifest_files(page: &Value) -> Vec<(String, u64)> {
    page["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let url = e["url"].as_str().unwrap();
            (
                url.split('?').next().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `type → sorted ids` of downloaded lines (see [`download`]).
pub fn ids_of_lines(exported: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    exported
        .iter()
        .map(|(t, lines)| {
            let mut ids: Vec<String> = lines
                .iter()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    v["id"].as_str().unwrap().to_string()
                })
                .collect();
            ids.sort();
            (t.clone(), ids)
        })
        .collect()
}

/// Asserts two `type → lines` maps are equal, printing the counts and a first difference
/// rather than both maps.
pub fn assert_same_lines_as(
    got: &BTreeMap<String, Vec<String>>,
    want: &BTreeMap<String, Vec<String>>,
    label: &str,
) {
    if got == want {
        return;
    }
    let counts = |m: &BTreeMap<String, Vec<String>>| {
        m.iter()
            .map(|(t, l)| format!("{t}:{}", l.len()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let only_in = |a: &BTreeMap<String, Vec<String>>, b: &BTreeMap<String, Vec<String>>| {
        a.iter()
            .flat_map(|(t, lines)| lines.iter().map(move |l| (t, l)))
            .find(|(t, l)| !b.get(*t).is_some_and(|w| w.contains(l)))
            .map(|(t, l)| format!("{t}: {}", &l[..l.len().min(300)]))
    };
    panic!(
        "{label}\n got:  {}\n want: {}\n first line only in got: {:?}\n first line only in want: {:?}",
        counts(got),
        counts(want),
        only_in(got, want),
        only_in(want, got)
    );
}

/// Generated resources, prepared for loading.
pub fn generated(patients: usize) -> Vec<NewResource> {
    let now = now_millis();
    let mut out = Vec::new();
    export_core::generate::generate(patients, 5, &mut |_, r| {
        out.push(export_core::load::prepare(r, now).unwrap())
    });
    out
}

/// The lines of one file, downloaded through its presigned URL. Objects are stored gzipped, so
/// presigned downloads are compressed too; the last line must be complete.
pub fn fetch_lines(url: &str) -> Vec<String> {
    let response = ureq::get(url).call().expect("download");
    assert_eq!(response.header("content-encoding"), Some("gzip"), "{url}");
    let mut body = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::MultiGzDecoder::new(response.into_reader()),
        &mut body,
    )
    .expect("gzip body");
    assert!(body.ends_with('\n'), "{url}: last line complete");
    body.lines().map(String::from).collect()
}

/// Downloads every output and deleted file of a manifest through its presigned URL; returns
/// type → lines (sorted), checking counts and that every line is complete JSON of its type.
pub fn download(manifest: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let entries = manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .chain(manifest["deleted"].as_array().expect("deleted"));
    // Files organized by patient mix types and repeat block headers.
    let organized = manifest["outputOrganizedBy"].as_str();
    for entry in entries {
        let url = entry["url"].as_str().unwrap();
        assert!(
            url.contains("X-Amz-Signature=") && url.contains("X-Amz-Expires=300"),
            "presigned URL: {url}"
        );
        let lines = fetch_lines(url);
        assert_eq!(
            lines.len() as u64,
            entry["count"].as_u64().unwrap(),
            "{url}"
        );
        for line in &lines {
            let v: Value = serde_json::from_str(line).expect("complete JSON line");
            if organized.is_none() {
                assert_eq!(v["resourceType"], entry["type"]);
            }
        }
        let file_type = entry["type"].as_str().or(organized).unwrap();
        out.entry(file_type.to_string()).or_default().extend(lines);
    }
    for lines in out.values_mut() {
        lines.sort();
        let before = lines.len();
        if organized.is_none() {
            lines.dedup();
            assert_eq!(before, lines.len(), "a line was exported twice");
        }
    }
    out
}
