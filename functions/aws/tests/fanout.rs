//! The fan-out has no ceiling: a Group of 20,000 patients and an export of more than 5,000 work
//! items complete on moto with exactly the oracle's resources and the local mode's lines, and
//! their executions stay a few events long with small payloads (the limits moto does not enforce:
//! 256 KB per payload, 25,000 history events). Run by tests/run.sh with moto.

mod support;

use e2e_tests::oracle::{compartment_export, expected, group_members};
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::NewResource;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::*;

/// Step Functions' payload limit (bytes) and history limit (events).
const PAYLOAD_LIMIT: usize = 256 * 1024;
const HISTORY_LIMIT: usize = 25_000;

/// `patients` small Patients, an Observation for every tenth, and Group `cohort` of the first
/// `members` of them.
fn cohort(patients: usize, members: usize) -> Vec<NewResource> {
    let now = now_millis();
    let mut values = Vec::new();
    for n in 0..patients {
        let id = format!("p{n:05}");
        values.push(json!({"resourceType": "Patient", "id": id,
            "gender": if n % 2 == 0 { "female" } else { "male" },
            "birthDate": format!("19{:02}-01-01", n % 100)}));
        if n % 10 == 0 {
            values.push(
                json!({"resourceType": "Observation", "id": format!("o{n:05}"),
                "status": "final", "code": {"text": "weight"},
                "subject": {"reference": format!("Patient/{id}")},
                "valueQuantity": {"value": n % 90 + 10, "unit": "kg"}}),
            );
        }
    }
    let member: Vec<Value> = (0..members)
        .map(|n| json!({"entity": {"reference": format!("Patient/p{n:05}")}}))
        .collect();
    values.push(
        json!({"resourceType": "Group", "id": "cohort", "type": "person",
        "actual": true, "member": member}),
    );
    values
        .into_iter()
        .map(|v| export_core::load::prepare(v, now).unwrap())
        .collect()
}

fn values(resources: &[NewResource]) -> Vec<Value> {
    resources.iter().map(|r| r.json.clone()).collect()
}

/// Checks the execution stayed within Step Functions' limits whatever the job's size.
async fn assert_small_execution(aws: &Deployment, job: &str, items: usize) {
    assert_eq!(aws.wait_for_execution(job).await, "SUCCEEDED");
    let (events, largest) = aws.history_size(job).await;
    println!("{items} items: {events} history events, largest event {largest} bytes");
    assert!(
        events < 100,
        "{events} history events for {items} items: the history must not grow with the job"
    );
    assert!(events < HISTORY_LIMIT);
    assert!(
        largest < (16 * 1024).min(PAYLOAD_LIMIT),
        "an event of {largest} bytes: payloads must not carry the item list"
    );
}

/// Kicks off `path` on `aws` (loaded, Lambdas started), waits for its manifest and checks the
/// files hold exactly `want` (type → sorted ids) and the local mode's lines, and that the
/// execution stayed small; returns (work items, seconds).
async fn export_exactly(
    aws: &Deployment,
    path: &str,
    level: ExportLevel,
    resources: &[NewResource],
    want: &std::collections::BTreeMap<String, Vec<String>>,
) -> (usize, f64) {
    let started = Instant::now();
    let kick = aws.kickoff(path).await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = aws
        .wait_for_manifest_within(&kick.status_path(), Duration::from_secs(3600))
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let job = kick.status_path().rsplit('/').next().unwrap().to_string();
    let items = aws
        .service
        .exporter
        .ports
        .jobs
        .items(&job)
        .await
        .unwrap()
        .len();
    let exported = download(&manifest);
    let lines: usize = exported.values().map(Vec::len).sum();
    println!(
        "{path}: {items} work items, {lines} resources in {elapsed:.1} s ({:.1} items/s, {:.0} resources/s)",
        items as f64 / elapsed,
        lines as f64 / elapsed
    );
    assert_eq!(&ids_of_lines(&exported), want, "the oracle");
    let local = local_mode_export(
        resources,
        level,
        ExportParams::default(),
        &aws.settings.export,
    )
    .await;
    assert_same_lines_as(&exported, &local, "identical to the local mode");
    assert_small_execution(aws, &job, items).await;
    (items, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_20000_patients_exports_exactly() {
    let resources = cohort(20_500, 20_000);
    let data = values(&resources);
    let members = group_members(&data, "cohort");
    assert_eq!(members.len(), 20_000);
    let mut want = compartment_export(&data, &members, Some("cohort"));
    // The oracle lists Provenance even when the data has none; an export has no such file.
    want.retain(|_, ids| !ids.is_empty());

    let mut aws = Deployment::create(|_| {}).await;
    let started = Instant::now();
    aws.load(resources.clone()).await;
    println!(
        "loaded {} resources in {:.1} s",
        resources.len(),
        started.elapsed().as_secs_f64()
    );
    aws.start_lambdas(Delivery::Once, None);
    let level = ExportLevel::Group("cohort".into());
    export_exactly(&aws, "/fhir/Group/cohort/$export", level, &resources, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_of_more_than_5000_work_items_completes_exactly() {
    // 20 types in 256 partitions each: 5,120 work items.
    let mut resources = generated(2);
    let now = now_millis();
    for n in 0..3 {
        let device =
            json!({"resourceType": "Device", "id": format!("dev-{n}"), "status": "active"});
        resources.push(export_core::load::prepare(device, now).unwrap());
    }
    let data = values(&resources);
    let types = expected(&data, |_| true);
    assert_eq!(types.len(), 20, "{:?}", types.keys());

    let mut aws = Deployment::create(|s| s.shards = 256).await;
    aws.load(resources.clone()).await;
    aws.start_lambdas(Delivery::Once, None);
    let (items, _) = export_exactly(
        &aws,
        "/fhir/$export",
        ExportLevel::System,
        &resources,
        &types,
    )
    .await;
    assert!(items >= 5_000, "{items} work items");
}
