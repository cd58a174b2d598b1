//! The SQLite and file adapters against the port contracts: the lease lock, idempotent part
//! records, and a failing output store that must fail the job and free the lock.

use async_trait::async_trait;
use bulk_export_local::dispatch::LocalDispatcher;
use bulk_export_local::files::FileOutput;
use bulk_export_local::sqlite::SqliteStore;
use export_core::engine::Ports;
use export_core::error::{StoreError, StoreResult};
use export_core::fhir::time::now_millis;
use export_core::job::JobStatus;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::{ByteStream, ExportLock, JobStore, OutputStore, PartRecord, PartWriter};
use export_core::router::{Api, Body};
use export_core::{Exporter, Settings, runner};
use std::sync::Arc;
use std::time::Duration;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bulk-export-ports-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lock_is_exclusive_and_a_dead_lease_can_be_taken_over() {
    let store = SqliteStore::open(&temp_dir("lock").join("db")).unwrap();
    let lease = Duration::from_secs(60);
    let now = now_millis();

    // Sixteen contenders at once: exactly one wins.
    let mut attempts = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        attempts.push(tokio::spawn(async move {
            (
                i,
                store
                    .acquire(&format!("job-{i}"), lease, now)
                    .await
                    .unwrap(),
            )
        }));
    }
    let mut winners = Vec::new();
    for a in attempts {
        let (i, won) = a.await.unwrap();
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1);
    let holder = format!("job-{}", winners[0]);
    assert_eq!(store.holder(now).await.unwrap(), Some(holder.clone()));
    let after_lease = now + lease + chrono::Duration::seconds(1);
    assert_eq!(
        store.holder(after_lease).await.unwrap(),
        None,
        "an ended lease holds nothing"
    );

    assert!(!store.acquire("second", lease, now).await.unwrap());
    store.release("second").await.unwrap(); // not the holder: no effect
    assert!(!store.acquire("second", lease, now).await.unwrap());
    assert!(store.renew(&holder, lease, now).await.unwrap());
    assert!(!store.renew("second", lease, now).await.unwrap());

    // The holder died: once its lease has run out, another owner takes over.
    let later = now + lease + chrono::Duration::seconds(1);
    assert!(store.acquire("second", lease, later).await.unwrap());
    assert!(
        !store.renew(&holder, lease, later).await.unwrap(),
        "the old holder lost the lock"
    );
    store.release(&holder).await.unwrap();
    assert!(
        !store.acquire("third", lease, later).await.unwrap(),
        "a stale release frees nothing"
    );
    store.release("second").await.unwrap();
    assert!(store.acquire("third", lease, later).await.unwrap());
}

#[tokio::test]
async fn recording_a_part_twice_keeps_one_record() {
    let store = SqliteStore::open(&temp_dir("parts").join("db")).unwrap();
    let part = PartRecord {
        job_id: "j".into(),
        key: "j/Patient/000-0000.ndjson".into(),
        resource_type: "Patient".into(),
        item: 0,
        seq: 0,
        count: 10,
        bytes: 100,
        is_error: false,
        is_deleted: false,
        continues: false,
    };
    store.record_part(&part).await.unwrap();
    store.record_part(&part).await.unwrap();
    assert_eq!(store.parts("j").await.unwrap(), vec![part]);
}

/// An output store whose writes always fail (a full disk, a lost bucket).
struct BrokenOutput(FileOutput);

#[async_trait]
impl OutputStore for BrokenOutput {
    async fn create_part(&self, _key: &str) -> StoreResult<Box<dyn PartWriter>> {
        Err(StoreError::new("disk full"))
    }
    async fn download_url(&self, key: &str, base_url: &str) -> StoreResult<String> {
        self.0.download_url(key, base_url).await
    }
    async fn open(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        self.0.open(key).await
    }
    async fn delete_job(&self, job_id: &str) -> StoreResult<()> {
        self.0.delete_job(job_id).await
    }
}

#[tokio::test]
async fn a_failing_export_is_marked_failed_and_frees_the_lock() {
    let dir = temp_dir("failure");
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    let resource = export_core::load::prepare(
        serde_json::json!({"resourceType": "Patient", "id": "p"}),
        now_millis(),
    )
    .unwrap();
    store.put_resources_blocking(vec![resource]).unwrap();
    let output = Arc::new(BrokenOutput(FileOutput::new(&dir.join("out")).unwrap()));
    let ports = Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let exporter = Arc::new(Exporter::new(ports, Settings::default()));

    // Kicked off with `Prefer: separate-export-status`.
    let params = ExportParams {
        separate_status: true,
        ..ExportParams::default()
    };
    let job = exporter
        .kickoff(ExportLevel::System, params, "http://x/fhir/$export".into())
        .await
        .unwrap();
    runner::run_job(exporter.clone(), job.id.clone()).await;

    let failed = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    // The cause is logged; the job says only that an internal error failed it.
    let diagnostics = failed.error.unwrap();
    assert!(!diagnostics.contains("disk full"), "{diagnostics}");
    assert!(diagnostics.contains("internal error"), "{diagnostics}");

    // The poll itself succeeds (200); the export's failure is in X-Export-Status and the body.
    let api = Api::new(
        exporter.clone(),
        Arc::new(LocalDispatcher::new(exporter.clone())),
        "/fhir",
        false,
    );
    let poll = http::Request::get(format!("http://x/fhir/$export-status/{}", job.id))
        .body(bytes::Bytes::new())
        .unwrap();
    let response = api
        .handle(&poll, Some(&export_auth::Principal::LocalAdmin))
        .await;
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["x-export-status"], "500 Internal Server Error");
    assert_eq!(headers["content-type"], "application/fhir+json");
    let Body::Full(body) = response.into_body() else {
        panic!("an OperationOutcome body");
    };
    let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(!outcome.to_string().contains("disk full"));
    assert!(outcome.to_string().contains("internal error"));
    assert!(
        store
            .acquire("next", Duration::from_secs(60), now_millis())
            .await
            .unwrap(),
        "lock released"
    );
}
