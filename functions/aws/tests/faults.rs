//! Faults the AWS deployment must survive, injected against moto: throttled reads, a worker killed
//! mid-part, an item that keeps failing, and executions that died without failing their job.
//! Output stays byte-identical to the local mode; only a persistent failure fails the job. Run by
//! tests/run.sh with moto.

mod support;

use async_trait::async_trait;
use export_core::StoreResult;
use export_core::engine::Ports;
use export_core::error::StoreError;
use export_core::fhir::time::{Instant, now_millis};
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::{
    ByteStream, NewResource, OutputStore, Page, PartWriter, ReadScope, ResourceStore,
    ResourceVersion, WorkItem,
};
use export_core::{Exporter, Settings};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// A resource store whose page reads fail as DynamoDB's throttling does: the first `transient`
/// reads, and every read of `broken_type`.
struct Flaky {
    inner: Arc<dyn ResourceStore>,
    transient: AtomicUsize,
    broken_type: Option<String>,
    failed: AtomicUsize,
}

impl Flaky {
    fn throttled() -> StoreError {
        StoreError::new(
            "dynamodb: ThrottlingException: Rate of requests exceeds the allowed throughput",
        )
    }
}

#[async_trait]
impl ResourceStore for Flaky {
    async fn resource_types(&self) -> StoreResult<Vec<String>> {
        self.inner.resource_types().await
    }
    async fn partitions(&self, resource_type: &str, listed: Option<usize>) -> StoreResult<u32> {
        self.inner.partitions(resource_type, listed).await
    }
    async fn patient_exists(&self, id: &str, as_of: Instant) -> StoreResult<bool> {
        self.inner.patient_exists(id, as_of).await
    }
    async fn group_members(&self, id: &str, as_of: Instant) -> StoreResult<Option<Vec<String>>> {
        self.inner.group_members(id, as_of).await
    }
    async fn resource_at(
        &self,
        resource_type: &str,
        id: &str,
        as_of: Instant,
    ) -> StoreResult<Option<ResourceVersion>> {
        self.inner.resource_at(resource_type, id, as_of).await
    }
    async fn resources_at(
        &self,
        targets: &[(String, String)],
        as_of: Instant,
    ) -> StoreResult<Vec<Option<ResourceVersion>>> {
        self.inner.resources_at(targets, as_of).await
    }
    async fn provenance_targeting(&self, targets: &[String]) -> StoreResult<Vec<String>> {
        self.inner.provenance_targeting(targets).await
    }
    async fn read_page(
        &self,
        scope: &ReadScope,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page> {
        let transient = self
            .transient
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if transient || self.broken_type.as_deref() == Some(scope.resource_type.as_str()) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Self::throttled());
        }
        self.inner.read_page(scope, cursor, limit).await
    }
    async fn put_resources(&self, resources: Vec<NewResource>) -> StoreResult<()> {
        self.inner.put_resources(resources).await
    }
}

/// An output store that counts how often each part key is opened for writing.
struct Counting {
    inner: Arc<dyn OutputStore>,
    created: Mutex<HashMap<String, usize>>,
}

#[async_trait]
impl OutputStore for Counting {
    async fn create_part(&self, key: &str) -> StoreResult<Box<dyn PartWriter>> {
        *self
            .created
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        self.inner.create_part(key).await
    }
    async fn download_url(&self, key: &str, base_url: &str) -> StoreResult<String> {
        self.inner.download_url(key, base_url).await
    }
    async fn open(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        self.inner.open(key).await
    }
    async fn read(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        self.inner.read(key).await
    }
    async fn redirect_url(&self, key: &str) -> StoreResult<Option<String>> {
        self.inner.redirect_url(key).await
    }
    async fn delete_job(&self, job_id: &str) -> StoreResult<()> {
        self.inner.delete_job(job_id).await
    }
}

/// A worker service like the deployment's, whose engine works through `ports` adjusted by `wrap`.
async fn worker_with(
    aws: &Deployment,
    wrap: impl FnOnce(Ports) -> Ports,
) -> Arc<export_aws::AwsService> {
    let mut worker = export_aws::AwsService::new(&aws.sdk, aws.settings.clone())
        .await
        .expect("service");
    let ports = wrap(worker.exporter.ports.clone());
    let settings: Settings = worker.exporter.settings.clone();
    worker.exporter = Arc::new(Exporter::new(ports, settings));
    Arc::new(worker)
}

fn job_of(status_path: &str) -> String {
    status_path.rsplit('/').next().unwrap().to_string()
}

/// Page reads that fail with a throttling error before reads succeed again.
const THROTTLED_READS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttled_reads_are_retried_and_the_export_is_byte_identical() {
    let resources = generated(1);
    let mut aws = Deployment::create(|s| s.export.max_file_resources = 60).await;
    aws.load(resources.clone()).await;
    let flaky = Arc::new(Flaky {
        inner: aws.service.resources.clone(),
        transient: AtomicUsize::new(THROTTLED_READS),
        broken_type: None,
        failed: AtomicUsize::new(0),
    });
    let store = flaky.clone();
    let worker = worker_with(&aws, move |ports| Ports {
        resources: store,
        ..ports
    })
    .await;
    aws.start_lambdas(Delivery::Once, Some(worker));
    let kick = aws.kickoff("/fhir/Patient/$export").await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = aws.wait_for_manifest(&kick.status_path()).await;
    assert_eq!(
        flaky.failed.load(Ordering::SeqCst),
        THROTTLED_READS,
        "every fault was hit"
    );
    assert!(
        aws.retried.load(Ordering::SeqCst) >= 1,
        "items were retried"
    );
    let exported = download(&manifest);
    let local = local_mode_export(
        &resources,
        ExportLevel::Patient,
        ExportParams::default(),
        &aws.settings.export,
    )
    .await;
    assert_same_lines_as(
        &exported,
        &local,
        "identical to the local mode after retries",
    );
    assert_eq!(
        aws.wait_for_execution(&job_of(&kick.status_path())).await,
        "SUCCEEDED"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_part_resumes_from_its_last_part_without_a_lost_or_repeated_line() {
    let resources = generated(1);
    // Slow pages and small files: each item writes several parts, and the first run of every
    // item is killed after a few of them, in the middle of the next.
    let mut aws = Deployment::create(|s| {
        s.export.page_size = 10;
        s.export.max_file_resources = 20;
        s.export.page_delay = Duration::from_millis(60);
    })
    .await;
    aws.load(resources.clone()).await;
    let output = Arc::new(Counting {
        inner: aws.service.exporter.ports.output.clone(),
        created: Mutex::new(HashMap::new()),
    });
    let counted = output.clone();
    let worker = worker_with(&aws, move |ports| Ports {
        output: counted,
        ..ports
    })
    .await;
    aws.start_lambdas(
        Delivery::KillFirst(Duration::from_millis(400)),
        Some(worker),
    );
    let kick = aws
        .kickoff("/fhir/Patient/$export?_type=Observation,Patient")
        .await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = aws.wait_for_manifest(&kick.status_path()).await;
    let job = job_of(&kick.status_path());
    aws.wait_until_quiet(&job).await;
    let killed = aws.killed.load(Ordering::SeqCst);
    assert!(killed >= 1, "no worker was killed");

    // No line lost or repeated (download() also refuses a line exported twice).
    let exported = download(&manifest);
    let params = ExportParams {
        types: Some(vec!["Observation".into(), "Patient".into()]),
        ..ExportParams::default()
    };
    let local = local_mode_export(
        &resources,
        ExportLevel::Patient,
        params,
        &aws.settings.export,
    )
    .await;
    assert_same_lines_as(&exported, &local, "identical to the local mode after kills");

    // The redelivered items resumed after their last finished part: only the part open when a
    // worker died is written again (once per kill), never the finished ones before it.
    let created = output.created.lock().unwrap().clone();
    let rewritten: usize = created.values().map(|n| n - 1).sum();
    println!(
        "{killed} workers killed, {} parts, {rewritten} part writes repeated",
        created.len()
    );
    assert!(
        rewritten <= killed,
        "{rewritten} parts written again after {killed} kills: {created:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_persistently_failing_item_fails_the_job_after_its_attempts_and_frees_the_lock() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let flaky = Arc::new(Flaky {
        inner: aws.service.resources.clone(),
        transient: AtomicUsize::new(0),
        broken_type: Some("Observation".into()),
        failed: AtomicUsize::new(0),
    });
    let store = flaky.clone();
    let worker = worker_with(&aws, move |ports| Ports {
        resources: store,
        ..ports
    })
    .await;
    aws.start_lambdas(Delivery::Once, Some(worker));
    let kick = aws.kickoff("/fhir/$export").await;
    let job = job_of(&kick.status_path());
    let failed = aws.wait_for_failure(&kick.status_path()).await;
    failed.assert_outcome(500);
    let diagnostics = failed.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        diagnostics.contains("of type Observation failed after 3 attempts"),
        "{diagnostics}"
    );
    assert!(
        !diagnostics.contains("Throttling") && !diagnostics.contains("arn:"),
        "no adapter text reaches the client: {diagnostics}"
    );
    // The Observation items (2 shards) were tried at most their three times each: the first to
    // give up fails the job, and the other's later deliveries are dropped.
    let tries = flaky.failed.load(Ordering::SeqCst);
    assert!((3..=3 * 2).contains(&tries), "{tries} tries");
    assert_eq!(aws.wait_for_execution(&job).await, "FAILED");
    aws.wait_until_quiet(&job).await;
    assert!(
        aws.objects(&job).await.is_empty(),
        "a failed job's files are deleted"
    );
    assert_eq!(
        aws.kickoff("/fhir/$export?_type=Patient").await.status,
        202,
        "the lock is free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_whose_execution_ended_or_never_started_are_failed_by_the_sweeper() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let exporter = aws.service.exporter.clone();

    // An export whose execution never started (the API stored it, then its process died),
    // older than the start grace.
    let (orphan, _) = exporter
        .kickoff_for(
            ExportLevel::System,
            ExportParams::default(),
            "u".into(),
            "c",
        )
        .await
        .unwrap();
    let mut old = orphan.clone();
    old.created_at = now_millis() - chrono::Duration::minutes(10);
    assert!(
        exporter
            .ports
            .jobs
            .update(&old, export_core::job::JobStatus::Accepted)
            .await
            .unwrap()
    );
    aws.run_duties().await;
    let status = |id: &str| {
        let exporter = exporter.clone();
        let id = id.to_string();
        async move { exporter.ports.jobs.get(&id).await.unwrap().unwrap() }
    };
    assert_eq!(status(&orphan.id).await.status.as_str(), "failed");
    let lock = exporter.ports.lock.clone();
    assert_eq!(lock.holder(now_millis()).await.unwrap(), None, "lock freed");

    // An export whose execution ended without MarkFailed (an operator's StopExecution, the
    // execution's timeout): here an execution of a one-state machine that succeeded at once.
    let (stranded, _) = exporter
        .kickoff_for(
            ExportLevel::System,
            ExportParams::default(),
            "u".into(),
            "c",
        )
        .await
        .unwrap();
    // Younger than the start grace and without an execution yet: left alone.
    assert_eq!(export_aws::sweeper::sweep(&aws.service).await.unwrap(), 0);
    assert_eq!(status(&stranded.id).await.status.as_str(), "accepted");
    let sfn = aws_sdk_sfn::Client::new(&aws.sdk);
    let quick = sfn
        .create_state_machine()
        .name(format!("{}-quick", aws.settings.jobs_table))
        .definition(r#"{"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}"#)
        .role_arn("arn:aws:iam::123456789012:role/export-state-machine")
        .send()
        .await
        .unwrap()
        .state_machine_arn;
    sfn.start_execution()
        .state_machine_arn(&quick)
        .name(&stranded.id)
        .send()
        .await
        .unwrap();
    let mut settings = aws.settings.clone();
    settings.state_machine_arn = quick.clone();
    let sweeper = export_aws::AwsService::new(&aws.sdk, settings)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while sfn
        .describe_execution()
        .execution_arn(format!(
            "{}:{}",
            quick.replacen(":stateMachine:", ":execution:", 1),
            stranded.id
        ))
        .send()
        .await
        .unwrap()
        .status
        .as_str()
        == "RUNNING"
    {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let swept = export_aws::sweeper::sweep(&sweeper).await.unwrap();
    assert_eq!(swept, 1);
    let job = status(&stranded.id).await;
    assert_eq!(job.status.as_str(), "failed");
    assert!(
        job.error
            .as_deref()
            .unwrap_or("")
            .contains("stopped before it finished"),
        "{:?}",
        job.error
    );
    assert_eq!(lock.holder(now_millis()).await.unwrap(), None, "lock freed");
    // Its status is an OperationOutcome, and the next export may start.
    aws.call(
        "GET",
        &format!("/fhir/$export-status/{}", stranded.id),
        None,
    )
    .await
    .assert_outcome(500);
    aws.start_lambdas(Delivery::Once, None);
    let next = aws.kickoff("/fhir/$export?_type=Patient").await;
    assert_eq!(next.status, 202, "{}", next.body);
    // A running export's lease is renewed by the sweep, not failed.
    aws.run_duties().await;
    aws.wait_for_manifest(&next.status_path()).await;
}

/// A plan delivered twice at once (its message came back while the first run still planned)
/// writes the work items again after workers finished some: what they finished stays finished.
/// Before, finishing was a flag on the work item, and the second write cleared it: the tally
/// counted all items, the job's items did not, and finalizing failed the export.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_written_twice_keeps_the_items_workers_finished() {
    let aws = Deployment::create(|_| {}).await;
    let jobs = &aws.service.exporter.ports.jobs;
    let items: Vec<WorkItem> = (0..3)
        .map(|n| WorkItem {
            job_id: "twice".into(),
            item: n,
            resource_type: "Patient".into(),
            partition: n,
            partitions: 3,
            deleted: false,
        })
        .collect();
    jobs.put_items(&items).await.unwrap();
    jobs.complete_item("twice", 1).await.unwrap();
    jobs.put_items(&items).await.unwrap();
    assert!(jobs.is_item_complete("twice", 1).await.unwrap());
    assert!(!jobs.is_item_complete("twice", 0).await.unwrap());
    assert_eq!(jobs.completed_items("twice").await.unwrap(), vec![1]);
    assert_eq!(jobs.items("twice").await.unwrap(), items);
}
