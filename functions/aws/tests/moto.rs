//! The AWS deployment against moto's server, over the real AWS SDK and the real state machine.
//! Run by tests/run.sh, which starts moto and sets `MOTO_ENDPOINT`.

mod support;

use e2e_tests::oracle::{all_patients, compartment_export, expected, group_members};
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// Asserts two `type → lines` maps are equal, printing where they differ rather than both maps.
fn assert_same_lines(
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
    let first_difference = got
        .iter()
        .flat_map(|(t, lines)| lines.iter().map(move |l| (t, l)))
        .find(|(t, l)| !want.get(*t).is_some_and(|w| w.contains(l)))
        .map(|(t, l)| format!("{t}: {}", &l[..l.len().min(300)]));
    panic!(
        "{label}\n got:  {}\n want: {}\n first line only in got: {first_difference:?}",
        counts(got),
        counts(want)
    );
}

fn job_id_of(status_path: &str) -> String {
    status_path.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_at_all_three_levels_match_the_oracle_and_the_local_mode() {
    let resources = generated(6);
    let data = live_values(&resources);
    let oracle = [
        expected(&data, |_| true),
        compartment_export(&data, &all_patients(&data), None),
        compartment_export(&data, &group_members(&data, "group-0"), Some("group-0")),
    ];
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
    for ((path, level), want) in cases.into_iter().zip(oracle) {
        let kick = aws.kickoff(path).await;
        assert_eq!(kick.status, 202, "{path}: {}", kick.body);
        let manifest = aws.wait_for_manifest(&kick.status_path()).await;
        assert_eq!(manifest["requiresAccessToken"], false);
        assert!(manifest["request"].as_str().unwrap().ends_with(path));
        let exported = download(&manifest);
        assert_eq!(ids_of_lines(&exported), want, "{path}: the oracle");
        let expected = local_mode_export(
            &resources,
            level,
            ExportParams::default(),
            &aws.settings.export,
        )
        .await;
        assert_eq!(
            exported.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{path}: types"
        );
        assert_same_lines(
            &exported,
            &expected,
            &format!("{path}: content identical to the local mode"),
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
    let mut want = compartment_export(&data, &BTreeSet::from(["pat-000002".into()]), None);
    want.retain(|t, _| t == "Patient" || t == "Observation");
    assert_eq!(ids_of_lines(&exported), want);
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
    // Cancel mid-export: once parts are in S3 and while the execution still runs.
    let started = std::time::Instant::now();
    let before = loop {
        let objects = aws.objects(&job).await;
        if objects.len() >= 2 {
            break objects;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no parts were written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(aws.execution_status(&job).await, "RUNNING");
    let cancel = aws.call("DELETE", &status, None).await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    aws.call("GET", &status, None).await.assert_outcome(404);
    let next = aws.kickoff("/fhir/Patient/$export?_type=Patient").await;
    assert_eq!(next.status, 202, "lock free after cancel");

    // Once every worker has stopped, nothing of the cancelled job is left, though it had files.
    aws.wait_until_quiet(&job).await;
    assert!(!before.is_empty());
    let after = aws.objects(&job).await;
    assert!(
        after.is_empty(),
        "a cancelled job's objects are deleted: {after:?}"
    );
    aws.call("GET", &status, None).await.assert_outcome(404);
    // The next export is unaffected by the cancelled one's late workers.
    let manifest = aws.wait_for_manifest(&next.status_path()).await;
    assert_eq!(download(&manifest)["Patient"].len(), 4);
    assert!(aws.objects(&job).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_worker_fails_the_job_and_frees_the_lock() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let mut broken = aws.settings.clone();
    broken.bucket = "no-such-bucket".into();
    let broken_worker = Arc::new(
        export_aws::AwsService::new(&aws.sdk, broken)
            .await
            .expect("service"),
    );
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
    let expected = local_mode_export(
        &resources,
        ExportLevel::Patient,
        ExportParams::default(),
        &aws.settings.export,
    )
    .await;
    assert_same_lines(
        &exported,
        &expected,
        "exact lines after continuations and duplicate deliveries",
    );
    let parts = manifest["output"].as_array().unwrap().len();
    let continuations = aws.continuations.load(std::sync::atomic::Ordering::SeqCst);
    // Every part but each item's last ends an invocation, so almost every part is followed by a
    // continuation message (some items have a single part).
    assert!(
        continuations * 2 > parts,
        "{continuations} continuations for {parts} parts"
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
async fn type_filter_elements_and_deletions_match_the_oracle_and_the_local_mode() {
    let mut resources = generated(3);
    let before_deletes = now_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let now = now_millis();
    let deletions = [
        ("Observation", "obs-pat-000000-3"),
        ("Condition", "cond-pat-000001-0"),
        ("Patient", "pat-000002"),
    ];
    for (t, id) in deletions {
        resources.push(export_core::load::deletion(t, id, now));
    }
    let data = live_values(&resources);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);

    let since = export_core::fhir::time::format_instant(before_deletes);
    let codes = ["8867-4", "2339-0"];
    let has_code = |r: &Value| {
        r["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| codes.contains(&c["code"].as_str().unwrap_or("")))
    };
    let after_since = |r: &Value| r["meta"]["lastUpdated"].as_str().unwrap() > since.as_str();
    let live_patients = all_patients(&data);
    let reference = e2e_tests::CompartmentReference::load();
    let deleted_url = |(t, id): &(&str, &str)| format!("{t}/{id}");
    // (path, level and parameters for the local mode, the oracle's outputs, its deleted urls)
    let cases = [
        (
            "/fhir/$export?_type=Observation,Condition&_typeFilter=Observation%3Fcode%3D8867-4,2339-0&_elements=Condition.code".to_string(),
            ExportLevel::System,
            ExportParams {
                types: Some(vec!["Observation".into(), "Condition".into()]),
                type_filters: vec!["Observation?code=8867-4,2339-0".into()],
                elements: vec!["Condition.code".into()],
                ..ExportParams::default()
            },
            expected(&data, |r| {
                r["resourceType"] == "Condition" || (r["resourceType"] == "Observation" && has_code(r))
            }),
            vec![],
        ),
        (
            format!("/fhir/$export?_since={since}"),
            ExportLevel::System,
            ExportParams {
                since: Some(before_deletes),
                ..ExportParams::default()
            },
            expected(&data, after_since),
            deletions.iter().map(deleted_url).collect(),
        ),
        (
            format!("/fhir/Patient/$export?_since={since}"),
            ExportLevel::Patient,
            ExportParams {
                since: Some(before_deletes),
                ..ExportParams::default()
            },
            expected(&data, |r| {
                after_since(r) && e2e_tests::oracle::in_compartment_of(&reference, r, &live_patients)
            }),
            // A deleted Patient's own deletion is not listed at Patient level (its compartment is gone).
            deletions[..2].iter().map(deleted_url).collect(),
        ),
        (
            "/fhir/Patient/$export".to_string(),
            ExportLevel::Patient,
            ExportParams::default(),
            compartment_export(&data, &live_patients, None),
            vec![],
        ),
    ];
    for (path, level, params, want, want_deleted) in cases {
        let kick = aws.kickoff(&path).await;
        assert_eq!(kick.status, 202, "{path}: {}", kick.body);
        let exported = download(&aws.wait_for_manifest(&kick.status_path()).await);
        let mut deleted: Vec<String> = exported
            .get("Bundle")
            .into_iter()
            .flatten()
            .map(|line| {
                let bundle: Value = serde_json::from_str(line).unwrap();
                assert_eq!(bundle["type"], "transaction");
                assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
                bundle["entry"][0]["request"]["url"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        deleted.sort();
        let mut want_deleted = want_deleted;
        want_deleted.sort();
        assert_eq!(deleted, want_deleted, "{path}: deleted");
        let mut outputs = exported.clone();
        outputs.remove("Bundle");
        assert_eq!(ids_of_lines(&outputs), want, "{path}: the oracle");
        for line in outputs.get("Condition").into_iter().flatten() {
            if path.contains("_elements") {
                let condition: Value = serde_json::from_str(line).unwrap();
                let keys: BTreeSet<&str> = condition
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    keys,
                    BTreeSet::from(["resourceType", "id", "meta", "code", "subject"]),
                    "Condition.code plus the mandatory subject"
                );
                assert!(line.contains("SUBSETTED"));
            }
        }
        let expected = local_mode_export(&resources, level, params, &aws.settings.export).await;
        assert_same_lines(
            &exported,
            &expected,
            &format!("{path}: identical to the local mode"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn organized_partial_manifests_with_separate_status_match_the_oracle_and_the_local_mode() {
    let resources = generated(3);
    // Small files written slowly, so polls see the export running with some files finished.
    let mut aws = Deployment::create(|s| {
        s.export.max_file_resources = 150;
        s.export.page_size = 50;
        s.export.page_delay = Duration::from_millis(100);
    })
    .await;
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
    let mut partial: Option<Value> = None;
    let manifest = loop {
        let r = aws.call("GET", &status_path, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        match r.header("x-export-status").as_deref() {
            Some("200 OK") => break r.json(),
            Some("202 Accepted") if !r.body.is_empty() => {
                let page = r.json();
                if let Some(first) = &partial {
                    assert_eq!(
                        manifest_files(first),
                        manifest_files(&page),
                        "a shown page never changes"
                    );
                }
                partial = Some(page);
            }
            Some("202 Accepted") => {}
            other => panic!("X-Export-Status {other:?}: {}", r.body),
        }
        assert!(started.elapsed() < Duration::from_secs(240));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    // A running export's poll listed finished files; the completed status shows that same page,
    // now linked to the next one, and its files stay as they were.
    let partial = partial.expect("a poll while running showed a partial manifest");
    assert!(!partial["output"].as_array().unwrap().is_empty());
    assert_eq!(manifest_files(&manifest), manifest_files(&partial));
    assert!(
        manifest["link"][0]["url"].is_string(),
        "later files are on a next page"
    );
    // Gather every page's files.
    let outputs: Vec<Value> = aws
        .manifest_pages(manifest)
        .await
        .iter()
        .flat_map(|page| page["output"].as_array().unwrap().iter().cloned())
        .collect();
    // Blocks, read in manifest order: each holds exactly its patient's compartment.
    let data = live_values(&resources);
    let reference = e2e_tests::CompartmentReference::load();
    let mut blocks: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for entry in &outputs {
        for line in fetch_lines(entry["url"].as_str().unwrap()) {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["resourceType"] == "Parameters" {
                let patient = v["parameter"][0]["valueReference"]["reference"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("Patient/")
                    .to_string();
                current = Some(patient);
                continue;
            }
            let patient = current.clone().expect("a file starts with a header");
            blocks.entry(patient).or_default().insert(format!(
                "{}/{}",
                v["resourceType"].as_str().unwrap(),
                v["id"].as_str().unwrap()
            ));
        }
    }
    let want: BTreeMap<String, BTreeSet<String>> = all_patients(&data)
        .into_iter()
        .map(|p| {
            let members = data
                .iter()
                .filter(|r| reference.patients_of(r).contains(&p))
                .map(|r| {
                    format!(
                        "{}/{}",
                        r["resourceType"].as_str().unwrap(),
                        r["id"].as_str().unwrap()
                    )
                })
                .collect();
            (p, members)
        })
        .collect();
    assert_eq!(
        blocks, want,
        "one block per patient holding its compartment"
    );

    let all = json!({"output": outputs, "deleted": [], "outputOrganizedBy": "Patient"});
    let exported = download(&all);
    let params = ExportParams {
        organize_by: Some("Patient".into()),
        ..ExportParams::default()
    };
    let expected = local_mode_export(
        &resources,
        ExportLevel::Patient,
        params,
        &aws.settings.export,
    )
    .await;
    assert_same_lines(&exported, &expected, "identical to the local mode");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_kickoffs_take_the_dynamodb_lock_once() {
    let aws = Arc::new(Deployment::create(|_| {}).await);
    aws.load(generated(1)).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tokens = Vec::new();
    for i in 0..8 {
        tokens.push(
            aws.client_token(&format!("client-{i}"), "system/*.rs")
                .await,
        );
    }
    let calls: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let (aws, barrier) = (aws.clone(), barrier.clone());
            tokio::spawn(async move {
                // Eight clients (different credentials), so none is sent to another's export.
                let token = format!("Bearer {token}");
                barrier.wait().await;
                aws.call_with_headers("GET", "/fhir/$export", None, &[("authorization", &token)])
                    .await
            })
        })
        .collect();
    let mut accepted = 0;
    for call in calls {
        let response = call.await.unwrap();
        match response.status {
            202 => accepted += 1,
            _ => {
                response.assert_outcome(429);
                assert!(response.header("retry-after").is_some());
            }
        }
    }
    assert_eq!(accepted, 1, "exactly one kick-off takes the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_loses_its_lease_fails() {
    // Slow workers, so the export runs while its lease is taken over.
    let mut aws = Deployment::create(|s| {
        s.export.page_size = 20;
        s.export.page_delay = Duration::from_millis(200);
    })
    .await;
    aws.load(generated(2)).await;
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export").await;
    let status = kick.status_path();
    let job = job_id_of(&status);
    let started = std::time::Instant::now();
    while aws.objects(&job).await.is_empty()
        && aws.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no work started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another export takes the lock as if the lease had run out.
    let lease = aws.service.exporter.settings.lock_lease;
    let later = now_millis() + chrono::Duration::from_std(lease * 2).unwrap();
    let lock = aws.service.exporter.ports.lock.clone();
    assert!(lock.acquire("intruder", lease, later).await.unwrap());
    // The next heartbeat finds the lease gone and fails the job.
    let failed = aws.wait_for_failure(&status).await;
    failed.assert_outcome(500);
    assert!(
        failed.body.contains("lost its lock lease"),
        "{}",
        failed.body
    );
    aws.wait_until_quiet(&job).await;
    assert!(
        aws.objects(&job).await.is_empty(),
        "a failed job's files are deleted"
    );
    assert_eq!(
        lock.holder(later).await.unwrap().as_deref(),
        Some("intruder"),
        "failing never frees a lock the job no longer holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn until_associated_provenance_and_group_patients_match_the_oracle() {
    let resources = generated(5);
    let data = live_values(&resources);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);

    // _until: what was last updated up to then.
    let until = "2023-06-30T00:00:00Z";
    let kick = aws
        .kickoff(&format!(
            "/fhir/$export?_type=Observation,Patient&_until={until}"
        ))
        .await;
    let exported = ids_of_lines(&download(&aws.wait_for_manifest(&kick.status_path()).await));
    let want = expected(&data, |r| {
        (r["resourceType"] == "Observation" || r["resourceType"] == "Patient")
            && r["meta"]["lastUpdated"].as_str().unwrap() <= "2023-06-30T00:00:00.000Z"
    });
    assert!(
        want["Observation"].len()
            < data
                .iter()
                .filter(|r| r["resourceType"] == "Observation")
                .count()
    );
    assert_eq!(exported, want, "_until");

    // includeAssociatedData at system level: the Patients and every Provenance about them.
    let kick = aws
        .kickoff("/fhir/$export?_type=Patient&includeAssociatedData=RelevantProvenanceResources")
        .await;
    let exported = ids_of_lines(&download(&aws.wait_for_manifest(&kick.status_path()).await));
    let patients: BTreeSet<String> = all_patients(&data)
        .iter()
        .map(|p| format!("Patient/{p}"))
        .collect();
    let want = expected(&data, |r| {
        r["resourceType"] == "Patient"
            || (r["resourceType"] == "Provenance"
                && r["target"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| patients.contains(t["reference"].as_str().unwrap())))
    });
    assert!(
        want.contains_key("Provenance"),
        "the data has Provenance about Patients"
    );
    assert_eq!(exported, want, "includeAssociatedData");

    // Group with a patient parameter: that member's compartment only.
    let members = group_members(&data, "group-0");
    let member = members.iter().next().unwrap().clone();
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": format!("Patient/{member}")}}]});
    let kick = aws
        .call("POST", "/fhir/Group/group-0/$export", Some(&body))
        .await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let exported = ids_of_lines(&download(&aws.wait_for_manifest(&kick.status_path()).await));
    assert_eq!(
        exported,
        compartment_export(&data, &BTreeSet::from([member]), Some("group-0")),
        "Group with patient"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_gzip_output_objects_are_plain_ndjson() {
    let resources = generated(1);
    let data = live_values(&resources);
    let mut aws = Deployment::create(|s| s.gzip_output = false).await;
    aws.load(resources).await;
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export").await;
    let manifest = aws.wait_for_manifest(&kick.status_path()).await;
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in manifest["output"].as_array().unwrap() {
        let response = ureq::get(entry["url"].as_str().unwrap())
            .set("Accept-Encoding", "gzip")
            .call()
            .unwrap();
        assert_eq!(response.header("content-encoding"), None, "stored as it is");
        let body = response.into_string().unwrap();
        assert!(body.ends_with('\n'));
        for line in body.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            got.entry(v["resourceType"].as_str().unwrap().to_string())
                .or_default()
                .push(v["id"].as_str().unwrap().to_string());
        }
    }
    got.values_mut().for_each(|ids| ids.sort());
    assert_eq!(got, expected(&data, |_| true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_load_command_fills_the_dynamodb_table() {
    let mut aws = Deployment::create(|_| {}).await;
    let dir = std::env::temp_dir().join(format!("aws-load-cli-{}", export_core::ids::new_id()));
    let data_dir = dir.join("data");
    // `bulk-export` built with `--features aws`, copied aside by tests/run.sh so that `cargo test`
    // rebuilding the plain binary does not replace it.
    let binary = e2e_tests::binary().with_file_name("bulk-export-aws");
    assert!(
        binary.exists(),
        "{} is missing: tests/run.sh builds it (cargo build -p bulk-export --features aws)",
        binary.display()
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&binary)
            .args(args)
            .env("AWS_ENDPOINT_URL", endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "bulk-export {args:?}: {text}");
        text
    };
    run(&[
        "generate",
        "--patients",
        "2",
        "--out",
        data_dir.to_str().unwrap(),
        "--seed",
        "4",
    ]);
    let report = run(&[
        "load",
        "--dynamodb-table",
        &aws.settings.resources_table,
        "--shards",
        &aws.settings.shards.to_string(),
        data_dir.to_str().unwrap(),
    ]);
    assert!(report.contains("into DynamoDB table"), "{report}");
    let data = e2e_tests::read_ndjson_dir(&data_dir);
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export").await;
    let exported = ids_of_lines(&download(&aws.wait_for_manifest(&kick.status_path()).await));
    assert_eq!(exported, expected(&data, |_| true));
    std::fs::remove_dir_all(&dir).ok();
}

/// The harness's own check: a handler runs in a spawned task, and its panic must still fail the
/// test that is waiting for the export.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[should_panic(expected = "the worker panicked on purpose")]
async fn a_panic_inside_a_lambda_handler_fails_the_test() {
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    aws.start_lambdas(Delivery::Panic, None);
    let kick = aws.kickoff("/fhir/$export?_type=Patient").await;
    aws.wait_for_manifest(&kick.status_path()).await;
}

/// A full export with authentication on, as deployed: a SMART client gets a token signed by KMS
/// (verified here independently against KMS's public key), kicks off, polls and downloads
/// through the API's checked route, which redirects to a fresh presigned URL; another client and
/// an anonymous caller see nothing; assertion ids cannot be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secured_export_with_kms_signed_tokens_end_to_end() {
    let resources = generated(2);
    let data = live_values(&resources);
    let mut aws = Deployment::create_secured(|_| {}).await;
    aws.load(resources).await;
    aws.start_lambdas(Delivery::Once, None);

    // Without a token: 401 with a challenge.
    let anonymous = aws.kickoff("/fhir/$export").await;
    anonymous.assert_outcome(401);
    assert!(
        anonymous
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );

    let token = aws.client_token("alice", "system/*.rs").await;
    // The token verifies against the KMS key's public half, read straight from KMS.
    let kms = aws_sdk_kms::Client::new(&aws.sdk);
    let der = kms
        .get_public_key()
        .key_id(aws.settings.signing_key_id.as_deref().unwrap())
        .send()
        .await
        .unwrap()
        .public_key
        .unwrap();
    let key = jsonwebtoken::DecodingKey::from_ec_der(&spki_point(der.as_ref()));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["bulk-export-fhir"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
        .expect("the access token verifies with the KMS public key")
        .claims;
    assert_eq!(claims["client_id"], "alice");
    assert_eq!(claims["scope"], "system/*.rs");

    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let kick = aws
        .call_with_headers("GET", "/fhir/$export", None, &auth)
        .await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let status = kick.status_path();
    let manifest = loop {
        let r = aws.call_with_headers("GET", &status, None, &auth).await;
        match r.status {
            200 => break r.json(),
            202 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("{other}: {}", r.body),
        }
    };
    assert_eq!(manifest["requiresAccessToken"], true);
    let bob = aws.client_token("bob", "system/*.rs").await;
    let bob = format!("Bearer {bob}");
    aws.call_with_headers("GET", &status, None, &[("authorization", &bob)])
        .await
        .assert_outcome(404);
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in manifest["output"].as_array().unwrap() {
        let url = entry["url"].as_str().unwrap();
        let path = url
            .strip_prefix("https://abc123.execute-api.us-east-1.amazonaws.com")
            .unwrap_or_else(|| panic!("the manifest lists the API's route: {url}"));
        assert!(path.starts_with("/fhir/$export-output/"), "{path}");
        aws.call("GET", path, None).await.assert_outcome(401);
        aws.call_with_headers("GET", path, None, &[("authorization", &bob)])
            .await
            .assert_outcome(404);
        let redirect = aws.call_with_headers("GET", path, None, &auth).await;
        assert_eq!(redirect.status, 307, "{}", redirect.body);
        let location = redirect.header("location").unwrap();
        assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=300"));
        let lines = fetch_lines(&location);
        assert_eq!(lines.len() as u64, entry["count"].as_u64().unwrap());
        for line in lines {
            let v: Value = serde_json::from_str(&line).unwrap();
            got.entry(v["resourceType"].as_str().unwrap().to_string())
                .or_default()
                .push(v["id"].as_str().unwrap().to_string());
        }
    }
    got.values_mut().for_each(|ids| ids.sort());
    assert_eq!(
        got,
        expected(&data, |_| true),
        "every resource, through the checked route"
    );

    // A replayed assertion is refused (the jti is taken with a conditional write).
    use export_auth::ports::ReplayCache;
    assert!(
        aws.service
            .auth_store
            .first_use("c#1", 2_000_000_000, 1_800_000_000)
            .await
            .unwrap()
    );
    assert!(
        !aws.service
            .auth_store
            .first_use("c#1", 2_000_000_000, 1_800_000_000)
            .await
            .unwrap()
    );
    assert!(
        aws.service
            .auth_store
            .first_use("c#1", 2_000_000_000, 2_000_000_001)
            .await
            .unwrap(),
        "an expired entry no longer blocks"
    );
}

/// The uncompressed EC point at the end of a P-256 SubjectPublicKeyInfo (what `from_ec_der`
/// wants): 0x04, x, y.
fn spki_point(der: &[u8]) -> Vec<u8> {
    der[der.len() - 65..].to_vec()
}

/// Each sample API event in `events/` is answered by the API handler as its name says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_sample_api_event_is_answered() {
    let aws = Deployment::create(|_| {}).await;
    aws.load(generated(1)).await;
    let dir = repo_root().join("events");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("api-"))
        .collect();
    names.sort();
    assert!(names.len() >= 5);
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let request = export_aws::lambda_http::request::from_str(&text).unwrap();
        let response = export_aws::handlers::api(&aws.service, request).await;
        let status = response.status().as_u16();
        let body = String::from_utf8_lossy(response.body().as_ref()).into_owned();
        let want = match name.as_str() {
            n if n.contains("metadata") => 200,
            n if n.contains("kickoff") => 202,
            // The samples name an export this deployment does not have.
            n if n.contains("status") || n.contains("cancel") => 404,
            other => panic!("no expectation for {other}"),
        };
        assert_eq!(status, want, "{name}: {body}");
        assert!(response.headers().contains_key("x-request-id"), "{name}");
        if want == 202 {
            // One export at a time: delete it before the next sample kicks off.
            let location = response.headers()["content-location"].to_str().unwrap();
            let path = &location[location.find("/fhir/").unwrap()..];
            assert_eq!(aws.call("DELETE", path, None).await.status, 202);
        }
    }
}

/// `bulk-export clients add --dynamodb-table` registers a client the deployment then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_clients_command_registers_in_the_auth_table() {
    let aws = Deployment::create_secured(|_| {}).await;
    let binary = e2e_tests::binary().with_file_name("bulk-export-aws");
    assert!(binary.exists(), "tests/run.sh builds bulk-export-aws");
    let dir = std::env::temp_dir().join(format!("aws-clients-{}", export_core::ids::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client = e2e_tests::smart::TestClient::new("etl");
    let jwks = dir.join("etl.jwks.json");
    std::fs::write(&jwks, client.jwks.to_string()).unwrap();
    let out = std::process::Command::new(&binary)
        .args([
            "clients",
            "add",
            "--dynamodb-table",
            &aws.settings.auth_table,
        ])
        .args([
            "--id",
            "etl",
            "--jwks",
            jwks.to_str().unwrap(),
            "--scope",
            "system/Patient.read",
        ])
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_url = "https://abc123.execute-api.us-east-1.amazonaws.com/auth/token";
    let body = format!(
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}&scope=system%2F%2A.read",
        client.assertion(token_url, |_| {})
    );
    let response = aws
        .call_raw(
            "POST",
            "/auth/token",
            Some(&body),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["scope"], "system/Patient.rs");
    std::fs::remove_dir_all(&dir).ok();
}

/// A person in a moto Cognito user pool, signed in through an app client: their ID token, and
/// how the service trusts the pool.
struct CognitoPerson {
    id_token: String,
    app: String,
    issuer: String,
    jwks_url: String,
}

impl CognitoPerson {
    fn trusted(&self, audience: &str) -> export_auth::oidc::TrustedIssuer {
        export_auth::oidc::TrustedIssuer {
            issuer: self.issuer.clone(),
            audience: audience.to_string(),
            keys: export_auth::oidc::IssuerKeys::Url(self.jwks_url.clone()),
        }
    }
}

/// ana@example.org in a new user pool, signed in with a password.
async fn cognito_person() -> CognitoPerson {
    use aws_sdk_cognitoidentityprovider as cognito;
    let sdk = sdk_config().await;
    let idp = cognito::Client::new(&sdk);
    let pool = idp
        .create_user_pool()
        .pool_name(format!("people-{}", export_core::ids::new_id()))
        .send()
        .await
        .unwrap()
        .user_pool
        .unwrap()
        .id
        .unwrap();
    let app = idp
        .create_user_pool_client()
        .user_pool_id(&pool)
        .client_name("exports-page")
        .explicit_auth_flows(cognito::types::ExplicitAuthFlowsType::AllowAdminUserPasswordAuth)
        // Its ID tokens carry the e-mail (memberships are kept by e-mail).
        .read_attributes("email")
        .read_attributes("email_verified")
        .send()
        .await
        .unwrap()
        .user_pool_client
        .unwrap()
        .client_id
        .unwrap();
    idp.admin_create_user()
        .user_pool_id(&pool)
        .username("ana@example.org")
        .user_attributes(
            cognito::types::AttributeType::builder()
                .name("email")
                .value("ana@example.org")
                .build()
                .unwrap(),
        )
        .user_attributes(
            cognito::types::AttributeType::builder()
                .name("email_verified")
                .value("true")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    idp.admin_set_user_password()
        .user_pool_id(&pool)
        .username("ana@example.org")
        .password("Correct-Horse-9")
        .permanent(true)
        .send()
        .await
        .unwrap();
    let auth = idp
        .admin_initiate_auth()
        .user_pool_id(&pool)
        .client_id(&app)
        .auth_flow(cognito::types::AuthFlowType::AdminUserPasswordAuth)
        .auth_parameters("USERNAME", "ana@example.org")
        .auth_parameters("PASSWORD", "Correct-Horse-9")
        .send()
        .await
        .unwrap();
    let id_token = auth.authentication_result.unwrap().id_token.unwrap();
    // The issuer exactly as the token names it; the keys from moto's JWKS endpoint.
    let payload = id_token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let issuer = claims["iss"].as_str().unwrap().to_string();
    let jwks_url = format!("{}/{pool}/.well-known/jwks.json", endpoint());
    CognitoPerson {
        id_token,
        app,
        issuer,
        jwks_url,
    }
}

/// People's tokens on AWS: an ID token of a Cognito user pool (moto's) is verified against the
/// pool's JWKS and authenticates the person (who then may not use the FHIR API: 403, not 401);
/// a token for another app client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cognito_id_tokens_authenticate_people() {
    let person = cognito_person().await;
    let (id_token, app) = (person.id_token.clone(), person.app.clone());
    let trusted = |audience: &str| person.trusted(audience);
    let bearer = format!("Bearer {id_token}");
    let kickoff = [("authorization", bearer.as_str())];

    let right = Deployment::create_secured(|s| s.trusted_issuers = vec![trusted(&app)]).await;
    let person = right
        .call_with_headers("GET", "/fhir/$export", None, &kickoff)
        .await;
    person.assert_outcome(403);
    assert!(
        person.body.contains("SMART Backend Services"),
        "{}",
        person.body
    );

    let wrong =
        Deployment::create_secured(|s| s.trusted_issuers = vec![trusted("another-app")]).await;
    wrong
        .call_with_headers("GET", "/fhir/$export", None, &kickoff)
        .await
        .assert_outcome(401);
}

/// The study export API on AWS: jobs through the work queue and the worker, files in S3 (a
/// FHIR export's parts packaged into one ZIP object by streaming them back from S3), downloads
/// through presigned URLs, the audit chain written with conditional puts, expiry by the duties.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn study_exports_run_on_aws() {
    let resources = generated(6);
    let data = live_values(&resources);
    let mut aws = Deployment::create(|_| {}).await;
    aws.load(resources).await;
    aws.start_lambdas(Delivery::Once, None);
    let json_type = [("content-type", "application/json")];
    let post = |path: &'static str, body: Value| {
        let aws = &aws;
        async move {
            aws.call_raw("POST", path, Some(&body.to_string()), &json_type)
                .await
        }
    };
    // Participants of study-0 in two statuses, independently of the server.
    let subjects: Vec<&Value> = data
        .iter()
        .filter(|r| {
            r["resourceType"] == "ResearchSubject"
                && r["study"]["reference"] == "ResearchStudy/study-0"
        })
        .collect();
    let wanted = ["on-study", "withdrawn", "candidate"];
    let mut want: Vec<String> = subjects
        .iter()
        .filter(|s| wanted.contains(&s["status"].as_str().unwrap()))
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    want.sort();

    let csv = post(
        "/api/v1/exports/data",
        json!({"study_id": "study-0", "type": "participants_csv", "filters": {"statuses": wanted}}),
    )
    .await;
    assert_eq!(csv.status, 202, "{}", csv.body);
    let fhir = post(
        "/api/v1/exports/data",
        json!({"study_id": "study-0", "type": "fhir", "filters": {"statuses": wanted}}),
    )
    .await;
    assert_eq!(fhir.status, 202, "{}", fhir.body);
    let wait = |id: String| {
        let aws = &aws;
        async move {
            let started = std::time::Instant::now();
            loop {
                let job = aws
                    .call("GET", &format!("/api/v1/exports/jobs/{id}"), None)
                    .await
                    .json();
                if job["status"] != "pending" {
                    return job;
                }
                assert!(started.elapsed() < Duration::from_secs(240), "{job}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let csv_job = wait(csv.json()["id"].as_str().unwrap().to_string()).await;
    assert_eq!(csv_job["status"], "completed", "{csv_job}");
    let fhir_job = wait(fhir.json()["id"].as_str().unwrap().to_string()).await;
    assert_eq!(fhir_job["status"], "completed", "{fhir_job}");

    // Downloads redirect to presigned URLs; the bytes match the recorded digest.
    let fetch = |job: &Value| {
        let path = format!(
            "/api/v1/exports/jobs/{}/download",
            job["id"].as_str().unwrap()
        );
        let aws = &aws;
        async move {
            let r = aws.call("GET", &path, None).await;
            assert_eq!(r.status, 307, "{}", r.body);
            let location = r.header("location").unwrap();
            assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires="));
            let response = ureq::get(&location).call().unwrap();
            let gzipped = response.header("content-encoding") == Some("gzip");
            let mut bytes = Vec::new();
            let mut reader = response.into_reader();
            if gzipped {
                std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(reader),
                    &mut bytes,
                )
                .unwrap();
            } else {
                std::io::Read::read_to_end(&mut reader, &mut bytes).unwrap();
            }
            (bytes, r.header("repr-digest").unwrap())
        }
    };
    let (csv_bytes, digest) = fetch(&csv_job).await;
    use base64::Engine;
    use sha2::Digest;
    let computed =
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&csv_bytes));
    assert_eq!(digest, format!("sha-256=:{computed}:"));
    let text = String::from_utf8(csv_bytes).unwrap();
    let mut got: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want, "participants_csv rows");

    let (zip_bytes, _) = fetch(&fhir_job).await;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).expect("a ZIP");
    let names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"manifest.json".to_string())
            && names.contains(&"ResearchStudy.ndjson".to_string())
    );
    let mut subjects_exported = Vec::new();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).unwrap();
        if file.name().unwrap().starts_with("ResearchSubject") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut file, &mut text).unwrap();
            subjects_exported.extend(text.lines().map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }));
        }
    }
    subjects_exported.sort();
    assert_eq!(
        subjects_exported, want,
        "the selected participants' ResearchSubjects"
    );

    // The audit chain, written with conditional puts, verifies; it recorded the downloads.
    let records = aws.service.study.ports.audit.all_records().await.unwrap();
    assert_eq!(
        export_study::audit::verify(&records),
        Ok(records.len() as u64)
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.entry.action == "download")
            .count(),
        2
    );
    assert!(
        records
            .iter()
            .any(|r| r.entry.action == "status_change" && !r.entry.digests.is_empty())
    );

    // Deleting a finished job removes its objects; the duties expire past-retention ones.
    let id = csv_job["id"].as_str().unwrap();
    assert_eq!(
        aws.call("DELETE", &format!("/api/v1/exports/jobs/{id}"), None)
            .await
            .status,
        200
    );
    assert!(aws.objects(&format!("study-{id}")).await.is_empty());
    let gone = aws
        .call("GET", &format!("/api/v1/exports/jobs/{id}/download"), None)
        .await;
    assert_eq!(gone.status, 404);
    assert!(
        gone.body.contains("EXP001") && gone.body.contains("again"),
        "{}",
        gone.body
    );
}

/// The Exports page on AWS, through the API Lambda: without a session it sends people to sign
/// in; a session kept in the DynamoDB auth table (as the callback stores it, with a Cognito ID
/// token) opens the study's page as that person, whose form creates an export the worker runs and
/// whose download redirects to S3; a POST without the session's CSRF token is refused; sign-out
/// deletes the session item.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_serves_people_with_sessions_in_dynamodb() {
    use export_aws::dynamo::DynamoTable;
    use export_aws::session_store::DynamoSessionStore;
    use export_web::session::{Session, SessionKind, SessionStore};
    const SITE: &str = "https://exports.example.org";
    let person = cognito_person().await;
    let mut aws = Deployment::create_secured(|s| {
        s.trusted_issuers = vec![person.trusted(&person.app)];
        s.page_url = Some(SITE.into());
    })
    .await;
    aws.load(generated(4)).await;
    aws.start_lambdas(Delivery::Once, None);
    use export_auth::ports::MembershipStore;
    aws.service
        .auth_store
        .grant(
            "ana@example.org",
            &export_auth::Membership {
                study: "study-0".into(),
                role: export_auth::Role::StudyAdmin,
                sites: export_auth::SiteScope::All,
            },
        )
        .await
        .unwrap();

    let anonymous = aws
        .call_raw("GET", "/studies/study-0/exports", None, &[])
        .await;
    assert_eq!(anonymous.status, 303, "{}", anonymous.body);
    assert_eq!(
        anonymous.header("location").as_deref(),
        Some("/login?return_to=%2Fstudies%2Fstudy-0%2Fexports")
    );
    let css = aws.call_raw("GET", "/static/app.css", None, &[]).await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").unwrap().starts_with("text/css"));

    // A signed-in session, stored where the callback stores it.
    let sessions = DynamoSessionStore::new(DynamoTable::new(
        aws_sdk_dynamodb::Client::new(&aws.sdk),
        &aws.settings.auth_table,
    ));
    let now = chrono::Utc::now().timestamp();
    let (session, cookie) = Session::new(
        SessionKind::SignedIn {
            id_token: person.id_token.clone(),
            label: "ana@example.org".into(),
        },
        now,
        now + 3600,
    );
    sessions.put_session(&session).await.unwrap();
    let item = DynamoTable::new(
        aws_sdk_dynamodb::Client::new(&aws.sdk),
        &aws.settings.auth_table,
    )
    .get(&format!("session#{}", session.key), "session")
    .await
    .unwrap()
    .expect("the session item");
    assert_eq!(
        export_aws::dynamo::get_n(&item, "ttl"),
        Some(now + 3600 + 3600),
        "DynamoDB's TTL removes it an hour after it ends"
    );
    assert!(
        !format!("{item:?}").contains(&cookie),
        "the store never holds the cookie"
    );
    // An https site: the cookie has the __Host- prefix.
    let cookie_header = format!("__Host-bx_session={cookie}");
    let with_cookie = |extra: &[(&'static str, &'static str)]| {
        let mut headers: Vec<(&str, String)> = vec![("cookie", cookie_header.clone())];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        headers
    };
    let call = |method: &'static str,
                path: String,
                body: Option<String>,
                headers: Vec<(&'static str, String)>| {
        let aws = &aws;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            aws.call_raw(method, &path, body.as_deref(), &headers).await
        }
    };

    let page = call(
        "GET",
        "/studies/study-0/exports".into(),
        None,
        with_cookie(&[]),
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains("Signed in as <strong>ana@example.org</strong>")
    );
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );

    let form_headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("origin", SITE),
    ];
    let forged = call(
        "POST",
        "/studies/study-0/exports".into(),
        Some("type=sites_csv&csrf=forged".into()),
        with_cookie(&form_headers),
    )
    .await;
    assert_eq!(forged.status, 403, "a POST without the session's token");
    let created = call(
        "POST",
        "/studies/study-0/exports".into(),
        Some(format!("type=sites_csv&csrf={}", session.csrf)),
        with_cookie(&form_headers),
    )
    .await;
    assert_eq!(created.status, 303, "{}", created.body);

    // The worker runs it; the history fragment shows it completed, with its download.
    let started = std::time::Instant::now();
    let job = loop {
        aws.check();
        let history = call(
            "GET",
            "/studies/study-0/exports/history".into(),
            None,
            with_cookie(&[]),
        )
        .await;
        if let Some((_, rest)) = history.body.split_once("id=\"download-") {
            break rest.split('"').next().unwrap().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the export did not complete: {}",
            history.body
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let download = call(
        "GET",
        format!("/studies/study-0/exports/{job}/download"),
        None,
        with_cookie(&[]),
    )
    .await;
    assert_eq!(download.status, 307, "{}", download.body);
    assert!(
        download
            .header("location")
            .unwrap()
            .contains("X-Amz-Signature="),
        "a presigned S3 URL"
    );

    let signed_out = call(
        "POST",
        "/logout".into(),
        Some(format!("csrf={}", session.csrf)),
        with_cookie(&form_headers),
    )
    .await;
    assert_eq!(signed_out.status, 200, "{}", signed_out.body);
    assert!(signed_out.body.contains("You are signed out"));
    assert!(
        sessions.session(&session.key).await.unwrap().is_none(),
        "sign-out deletes the session item"
    );
    let after = call(
        "GET",
        "/studies/study-0/exports".into(),
        None,
        with_cookie(&[]),
    )
    .await;
    assert_eq!(after.status, 303, "the old cookie opens nothing");
    aws.check();
}
