//! The AWS deployment against moto's server, over the real AWS SDK and the real state machine.
//! Run by tests/run.sh, which starts moto and sets `MOTO_ENDPOINT`.

mod support;

use bulk_export_local::files::FileOutput;
use bulk_export_local::sqlite::SqliteStore;
use export_core::engine::Ports;
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::{JobStore, NewResource};
use export_core::{Exporter, Settings, runner};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// The same export run by the local deployment (SQLite + files) on the same resources.
async fn local_export(
    resources: &[NewResource],
    level: ExportLevel,
    params: ExportParams,
) -> BTreeMap<String, Vec<String>> {
    let dir = std::env::temp_dir().join(format!(
        "aws-vs-local-{}-{}",
        std::process::id(),
        export_core::ids::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    store.put_resources_blocking(resources.to_vec()).unwrap();
    let output = Arc::new(FileOutput::new(&dir.join("out")).unwrap());
    let ports = Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let exporter = Arc::new(Exporter::new(ports, Settings::default()));
    let job = exporter
        .kickoff(level, params, "local".into())
        .await
        .unwrap();
    runner::run_job(exporter.clone(), job.id.clone()).await;
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

fn job_id_of(status_path: &str) -> String {
    status_path.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_at_all_three_levels_match_the_local_mode() {
    let resources = generated(6);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);

    let metadata = aws.call("GET", "/fhir/metadata", None).await;
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");

    let cases = [
        ("/fhir/$export", ExportLevel::System),
        ("/fhir/Patient/$export", ExportLevel::Patient),
        (
            "/fhir/Group/group-0/$export",
            ExportLevel::Group("group-0".into()),
        ),
    ];
    for (path, level) in cases {
        let kick = aws.kickoff(path).await;
        assert_eq!(kick.status, 202, "{path}: {}", kick.body);
        let manifest = aws.wait_for_manifest(&kick.status_path()).await;
        assert_eq!(manifest["requiresAccessToken"], false);
        assert!(manifest["request"].as_str().unwrap().ends_with(path));
        let exported = download(&manifest);
        let expected = local_export(&resources, level, ExportParams::default()).await;
        assert_eq!(
            exported.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{path}: types"
        );
        assert_eq!(
            exported, expected,
            "{path}: content identical to the local mode"
        );
        assert_eq!(
            aws.wait_for_execution(&job_id_of(&kick.status_path()))
                .await,
            "SUCCEEDED"
        );
    }

    // A POST kick-off with patient and _type parameters.
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/pat-000002"}},
        {"name": "_type", "valueString": "Patient,Observation"}]});
    let kick = aws.call("POST", "/fhir/Patient/$export", Some(&body)).await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
    assert_eq!(exported["Patient"].len(), 1);
    assert_eq!(exported["Observation"].len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_kickoff_gets_429_until_the_first_finishes() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(2)).await;
    let first = aws.kickoff("/fhir/$export").await;
    assert_eq!(first.status, 202);
    let second = aws.kickoff("/fhir/Patient/$export").await;
    second.assert_outcome(429);
    assert!(second.header("retry-after").is_some());
    // The same (anonymous) client repeating its kick-off is sent to the running export.
    let repeat = aws.kickoff("/fhir/$export").await;
    assert_eq!(repeat.status, 202);
    assert_eq!(repeat.status_path(), first.status_path());

    aws.start_lambdas(Delivery::Once, None);
    aws.wait_for_manifest(&first.status_path()).await;
    assert_eq!(
        aws.kickoff("/fhir/Patient/$export").await.status,
        202,
        "the lock is released on completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_deletes_objects_and_frees_the_lock() {
    let mut aws = Deployment::create(|s| s.export.max_file_resources = 40).await;
    aws.load(generated(4)).await;
    let kick = aws.kickoff("/fhir/$export").await;
    let status = kick.status_path();
    let job = job_id_of(&status);
    aws.start_lambdas(Delivery::Once, None);
    // Let some work happen, then cancel mid-export.
    for _ in 0..200 {
        if aws.work_handled.load(std::sync::atomic::Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = aws.call("DELETE", &status, None).await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    aws.call("GET", &status, None).await.assert_outcome(404);
    assert_eq!(
        aws.kickoff("/fhir/Patient/$export?_type=Patient")
            .await
            .status,
        202,
        "lock free after cancel"
    );
    aws.wait_for_execution(&job).await;
    assert!(
        aws.objects(&job).await.is_empty(),
        "a cancelled job's objects are deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_worker_fails_the_job_and_frees_the_lock() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let mut broken = aws.settings.clone();
    broken.bucket = "no-such-bucket".into();
    let broken_worker = Arc::new(export_aws::AwsService::new(&aws.sdk, broken));
    aws.start_lambdas(Delivery::Once, Some(broken_worker));

    let kick = aws.kickoff("/fhir/$export").await;
    let failed = aws.wait_for_failure(&kick.status_path()).await;
    failed.assert_outcome(500);
    let diagnostics = failed.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(diagnostics.contains("failed"), "{diagnostics}");
    assert_eq!(
        aws.wait_for_execution(&job_id_of(&kick.status_path()))
            .await,
        "FAILED"
    );
    assert_eq!(
        aws.kickoff("/fhir/$export").await.status,
        202,
        "the lock is released on failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicated_and_continued_work_messages_never_duplicate_a_line() {
    let resources = generated(3);
    // A tiny time budget: every item stops at each part boundary and continues in a new message;
    // and every work message is delivered twice.
    let mut aws = Deployment::create(|s| {
        s.worker_reserve = Duration::from_secs(3600);
        s.export.max_file_resources = 25;
    })
    .await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Twice, None);
    let kick = aws.kickoff("/fhir/Patient/$export").await;
    let manifest = aws.wait_for_manifest(&kick.status_path()).await;
    for entry in manifest["output"].as_array().unwrap() {
        assert!(entry["count"].as_u64().unwrap() <= 25);
    }
    let exported = download(&manifest);
    let expected = local_export(&resources, ExportLevel::Patient, ExportParams::default()).await;
    assert_eq!(
        exported, expected,
        "exact lines after continuations and duplicate deliveries"
    );
    assert!(
        aws.work_handled.load(std::sync::atomic::Ordering::Relaxed) > 40,
        "continuations happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_is_taken_over() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let lock = aws.service.exporter.ports.lock.clone();
    let now = now_millis();
    let lease = Duration::from_secs(60);
    assert!(
        lock.acquire("dead-job", lease, now - chrono::Duration::seconds(120))
            .await
            .unwrap()
    );
    assert!(
        !lock
            .acquire("other", lease, now - chrono::Duration::seconds(100))
            .await
            .unwrap(),
        "a live lease holds"
    );
    // The dead job's lease ran out a minute ago: a kick-off takes the lock over.
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export?_type=Patient").await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    aws.wait_for_manifest(&kick.status_path()).await;
    assert!(
        !lock.renew("dead-job", lease, now_millis()).await.unwrap(),
        "the dead holder lost the lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_and_unknown_ids_are_operation_outcomes() {
    let aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    aws.call("GET", "/fhir/$export-status/0123456789abcdef", None)
        .await
        .assert_outcome(404);
    aws.call("DELETE", "/fhir/$export-status/0123456789abcdef", None)
        .await
        .assert_outcome(404);
    aws.kickoff("/fhir/$export?_type=Nope")
        .await
        .assert_outcome(400);
    aws.kickoff("/fhir/Group/nope/$export")
        .await
        .assert_outcome(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_imports_files_into_dynamodb_and_reports_bad_lines() {
    let mut aws = Deployment::create(|_| {}).await;
    let dir = std::env::temp_dir().join(format!("aws-load-{}", export_core::ids::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lines = [
        json!({"resourceType": "Patient", "id": "p1"}).to_string(),
        "{broken".to_string(),
        json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}})
            .to_string(),
    ];
    std::fs::write(dir.join("data.ndjson"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.join("bundle.json"),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:c1", "resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}}, "request": {"method": "POST", "url": "Condition"}}
        ]})
        .to_string(),
    )
    .unwrap();
    let report = export_aws::load::load_files(&aws.service.resources, vec![dir.clone()])
        .await
        .unwrap();
    assert_eq!(report.counts.values().sum::<u64>(), 3);
    assert_eq!(report.issues.len(), 1);
    assert!(
        report.issues[0].location.ends_with("data.ndjson:2"),
        "{:?}",
        report.issues
    );

    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/Patient/$export").await;
    let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        vec!["Condition", "Observation", "Patient"]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn type_filter_elements_and_deletions_match_the_local_mode() {
    let mut resources = generated(3);
    let before_deletes = now_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let now = now_millis();
    for (t, id) in [
        ("Observation", "obs-pat-000000-3"),
        ("Condition", "cond-pat-000001-0"),
        ("Patient", "pat-000002"),
    ] {
        resources.push(export_core::load::deletion(t, id, now));
    }
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);

    let since = export_core::fhir::time::format_instant(before_deletes);
    let cases = [
        (
            "/fhir/$export?_type=Observation,Condition&_typeFilter=Observation%3Fcode%3D8867-4,2339-0&_elements=Condition.code",
            ExportLevel::System,
            ExportParams {
                types: Some(vec!["Observation".into(), "Condition".into()]),
                type_filters: vec!["Observation?code=8867-4,2339-0".into()],
                elements: vec!["Condition.code".into()],
                ..ExportParams::default()
            },
        ),
        (
            &*format!("/fhir/$export?_since={since}"),
            ExportLevel::System,
            ExportParams {
                since: Some(before_deletes),
                ..ExportParams::default()
            },
        ),
        (
            &*format!("/fhir/Patient/$export?_since={since}"),
            ExportLevel::Patient,
            ExportParams {
                since: Some(before_deletes),
                ..ExportParams::default()
            },
        ),
        (
            "/fhir/Patient/$export",
            ExportLevel::Patient,
            ExportParams::default(),
        ),
    ];
    for (path, level, params) in cases {
        let kick = aws.kickoff(path).await;
        assert_eq!(kick.status, 202, "{path}: {}", kick.body);
        let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
        let expected = local_export(&resources, level, params).await;
        assert_eq!(exported, expected, "{path}: identical to the local mode");
    }
    // The cases really exercised something: filtered, trimmed and deleted lines exist.
    let kick = aws.kickoff(&format!("/fhir/$export?_since={since}")).await;
    let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
    assert_eq!(exported["Bundle"].len(), 3, "{exported:?}");
    assert!(!exported.contains_key("Observation"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn organized_partial_manifests_with_separate_status_match_the_local_mode() {
    let resources = generated(3);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);
    let prefer = [("Prefer", "respond-async, separate-export-status")];
    let kick = aws
        .call_with_headers(
            "GET",
            "/fhir/Patient/$export?organizeOutputBy=Patient&allowPartialManifests=true",
            None,
            &prefer,
        )
        .await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    assert!(
        kick.header("preference-applied")
            .unwrap()
            .contains("separate-export-status")
    );
    let status_path = kick.status_path();
    let started = std::time::Instant::now();
    let mut manifest = loop {
        let r = aws.call("GET", &status_path, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        match r.header("x-export-status").as_deref() {
            Some("200 OK") => break r.json(),
            Some("202 Accepted") => {}
            other => panic!("X-Export-Status {other:?}: {}", r.body),
        }
        assert!(started.elapsed() < Duration::from_secs(240));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    // Gather every page's files.
    let mut outputs = Vec::new();
    loop {
        outputs.extend(manifest["output"].as_array().unwrap().iter().cloned());
        let Some(next) = manifest["link"][0]["url"].as_str().map(String::from) else {
            break;
        };
        let path = next
            .strip_prefix("https://abc123.execute-api.us-east-1.amazonaws.com")
            .unwrap()
            .to_string();
        manifest = aws.call("GET", &path, None).await.json();
    }
    let all = json!({"output": outputs, "deleted": [], "outputOrganizedBy": "Patient"});
    let exported = download(&all);
    let params = ExportParams {
        organize_by: Some("Patient".into()),
        ..ExportParams::default()
    };
    let expected = local_export(&resources, ExportLevel::Patient, params).await;
    assert_eq!(exported, expected, "identical to the local mode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_lambda_follows_the_interop_rules_of_the_local_server() {
    let resources = generated(3);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);

    // Kick-off Accept: only application/fhir+json, unless lenient.
    for accept in ["*/*", "application/json"] {
        let r = aws
            .call_with_headers("GET", "/fhir/$export", None, &[("accept", accept)])
            .await;
        assert_eq!(r.status, 400, "Accept {accept}: {}", r.body);
        assert!(r.header("x-request-id").is_some());
    }
    let plain_json = aws
        .call_with_headers(
            "GET",
            "/fhir/$export",
            None,
            &[("accept", "application/json")],
        )
        .await;
    assert_eq!(
        plain_json.header("content-type").as_deref(),
        Some("application/json")
    );

    // smart-fetch's default Observation filter, encoded as it sends it, with lenient handling.
    let categories = [
        "social-history",
        "vital-signs",
        "imaging",
        "laboratory",
        "survey",
        "exam",
        "procedure",
        "therapy",
        "activity",
    ];
    let query = format!(
        "/fhir/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3D{}",
        categories.join("%252C")
    );
    let kick = aws
        .call_with_headers(
            "GET",
            &query,
            None,
            &[
                ("accept", "*/*"),
                ("prefer", "respond-async, handling=lenient"),
            ],
        )
        .await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
    let want = resources
        .iter()
        .filter(|r| r.resource_type == "Observation")
        .filter(|r| {
            r.json["category"][0]["coding"][0]["code"]
                .as_str()
                .is_some_and(|c| categories.contains(&c))
        })
        .count();
    assert!(want > 0);
    assert_eq!(exported["Observation"].len(), want);
}
