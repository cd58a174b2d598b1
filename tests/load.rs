//! `bulk-export load`: NDJSON, gzip and Bundles; bad lines reported and skipped; reloads replace.
//! Also: compartment membership for every type of the R4 Patient compartment, end to end.

use e2e_tests::*;
use flate2::{Compression, write::GzEncoder};
use serde_json::{Value, json};
use std::io::Write;

fn load(dir: &std::path::Path, files: &[&std::path::Path]) -> (String, String) {
    let db = dir.join("store.db");
    let mut args = vec!["load", "--db", db.to_str().unwrap()];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    run_cli(&args)
}

/// The same content loaded again (same lastUpdated, same body) is not a new version, as on AWS
/// (`NewResource::content_digest`); changed content with the same lastUpdated is.
#[test]
fn loading_the_same_resources_again_adds_no_version() {
    let dir = scratch_dir("load-same");
    let lines = |status: &str| {
        [
            json!({"resourceType": "Patient", "id": "p1", "gender": "female",
                "meta": {"lastUpdated": "2021-03-04T05:06:07.000Z"}}),
            json!({"resourceType": "Observation", "id": "o1", "status": status,
                "meta": {"lastUpdated": "2021-03-04T05:06:07.000Z"}, "subject": {"reference": "Patient/p1"}}),
        ]
        .map(|v| v.to_string())
        .join("\n")
    };
    let first = dir.join("first.ndjson");
    std::fs::write(&first, lines("final")).unwrap();
    let changed = dir.join("changed.ndjson");
    std::fs::write(&changed, lines("amended")).unwrap();
    load(&dir, &[&first]);
    load(&dir, &[&first]);
    load(&dir, &[&changed]);

    let server = Server::start(&dir, &[]);
    let exported = download_all(&server.export("/$export"));
    assert_eq!(exported["Patient"].len(), 1);
    assert_eq!(exported["Patient"][0]["meta"]["versionId"], "1");
    assert_eq!(exported["Observation"].len(), 1);
    assert_eq!(exported["Observation"][0]["status"], "amended");
    assert_eq!(exported["Observation"][0]["meta"]["versionId"], "2");
}

#[test]
fn loads_ndjson_gzip_and_bundles_skipping_bad_lines() {
    let dir = scratch_dir("load");
    let ndjson = dir.join("patients.ndjson");
    std::fs::write(
        &ndjson,
        [
            json!({"resourceType": "Patient", "id": "p1", "gender": "female"}).to_string(),
            json!({"resourceType": "Patient", "id": "p2"}).to_string(),
            "{this is not json".to_string(),
            json!({"resourceType": "Unicorn", "id": "u1"}).to_string(),
            json!({"resourceType": "Patient"}).to_string(),
            String::new(),
            json!({"resourceType": "Patient", "id": "p3", "meta": {"lastUpdated": "2021-03-04T05:06:07.000Z"}}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let gz = dir.join("observations.ndjson.gz");
    let mut encoder = GzEncoder::new(std::fs::File::create(&gz).unwrap(), Compression::default());
    for i in 0..50 {
        writeln!(encoder, "{}", json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final", "subject": {"reference": "Patient/p1"}})).unwrap();
    }
    encoder.finish().unwrap();
    let transaction = dir.join("transaction.json");
    std::fs::write(&transaction, json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7f3a-p4", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:c-1", "resource": {"resourceType": "Condition", "subject": {"reference": "urn:uuid:7f3a-p4"}}, "request": {"method": "POST", "url": "Condition"}},
        {"resource": {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p2"}}, "request": {"method": "PUT", "url": "Encounter/e1"}},
        {"resource": {"resourceType": "Nope"}, "request": {"method": "POST", "url": "Nope"}}
    ]}).to_string()).unwrap();
    let collection = dir.join("collection.json");
    std::fs::write(
        &collection,
        json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Practitioner", "id": "dr1"}},
            {"resource": {"resourceType": "Patient", "id": "p1", "gender": "male"}}
        ]})
        .to_string(),
    )
    .unwrap();
    let batch = dir.join("batch.json");
    std::fs::write(&batch, json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Organization", "id": "org1"}, "request": {"method": "PUT", "url": "Organization/org1"}}
    ]}).to_string()).unwrap();

    let (stdout, stderr) = load(&dir, &[&ndjson, &gz, &transaction, &collection, &batch]);
    for bad_line in [
        ":3: not valid JSON",
        ":4: 'Unicorn' is not an R4 resource type",
        ":5: Patient has no id",
        "transaction.json:entry[3]",
    ] {
        assert!(
            stderr.contains(bad_line),
            "stderr should report {bad_line}:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("Observation") && stdout.contains("50"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("loaded") && l.trim_end().ends_with(" 59")),
        "{stdout}"
    );

    let server = Server::start(&dir, &[]);
    let exported = download_all(&server.export("/$export"));
    let ids = ids_by_type(&exported);
    assert_eq!(ids["Patient"], vec!["7f3a-p4", "p1", "p2", "p3"]);
    assert_eq!(ids["Observation"].len(), 50);
    assert_eq!(ids["Practitioner"], vec!["dr1"]);
    assert_eq!(ids["Organization"], vec!["org1"]);
    assert_eq!(ids["Encounter"], vec!["e1"]);
    let condition = &exported["Condition"][0];
    assert_eq!(
        condition["subject"]["reference"], "Patient/7f3a-p4",
        "urn:uuid references are resolved"
    );

    let patient = |id: &str| {
        exported["Patient"]
            .iter()
            .find(|p| p["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        patient("p1")["gender"],
        "male",
        "a reload replaces the earlier version"
    );
    assert_eq!(patient("p1")["meta"]["versionId"], "2");
    assert_eq!(patient("p2")["meta"]["versionId"], "1");
    assert_eq!(
        patient("p3")["meta"]["lastUpdated"],
        "2021-03-04T05:06:07.000Z",
        "a given lastUpdated is kept"
    );
    assert!(
        patient("p2")["meta"]["lastUpdated"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "a missing lastUpdated is set"
    );

    // The Patient-level export follows the resolved references too.
    let ids = ids_by_type(&download_all(&server.export("/Patient/$export")));
    assert_eq!(ids["Condition"].len(), 1);
    assert!(!ids.contains_key("Practitioner"));
}

/// Builds `{"a": {"b": [{"reference": ...}]}}` for path `a.b`, using arrays on every other level
/// so both JSON shapes FHIR allows are exercised.
fn nest(path: &str, reference: &str) -> (String, Value) {
    let steps: Vec<&str> = path.split('.').collect();
    let mut value = json!({"reference": reference});
    for (depth, step) in steps.iter().enumerate().skip(1).rev() {
        let wrapped = if depth % 2 == 1 {
            json!([value])
        } else {
            value
        };
        value = json!({ *step: wrapped });
    }
    (steps[0].to_string(), value)
}

#[test]
fn every_patient_compartment_type_and_param_is_honoured() {
    let dir = scratch_dir("compartments");
    let reference = CompartmentReference::load();
    let mut lines = vec![
        json!({"resourceType": "Patient", "id": "target"}).to_string(),
        json!({"resourceType": "Patient", "id": "other"}).to_string(),
    ];
    let mut expected_in: Vec<(String, String)> = Vec::new();
    let mut types = 0;
    for (resource_type, paths) in reference.types() {
        types += 1;
        for (n, path) in paths.iter().enumerate() {
            let id = format!("in-{n}");
            let (field, value) = nest(path, "Patient/target");
            let mut resource = json!({"resourceType": resource_type, "id": id});
            resource[field] = value;
            lines.push(resource.to_string());
            if resource_type != "Patient" {
                expected_in.push((resource_type.clone(), id));
            }
        }
        // The same type pointing at another patient, and at the target through no listed param.
        lines.push(json!({"resourceType": resource_type, "id": "other-patient", paths[0].split('.').next().unwrap(): nest(&paths[0], "Patient/other").1}).to_string());
        lines.push(json!({"resourceType": resource_type, "id": "unlisted", "extension": [{"url": "x", "valueReference": {"reference": "Patient/target"}}]}).to_string());
    }
    assert_eq!(
        types, 66,
        "the R4 Patient compartment has 66 types with params"
    );
    let file = dir.join("compartments.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();
    load(&dir, &[&file]);

    let server = Server::start(&dir, &[]);
    let body = json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/target"}}]});
    let kick = server.kickoff_post("/Patient/$export", &body);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let exported = ids_by_type(&download_all(&wait_for_manifest(
        &kick.header("content-location").unwrap(),
    )));
    let mut got: Vec<(String, String)> = exported
        .iter()
        .flat_map(|(t, ids)| ids.iter().map(move |id| (t.clone(), id.clone())))
        .filter(|(t, _)| t != "Patient")
        .collect();
    got.sort();
    expected_in.sort();
    assert_eq!(got, expected_in);
    // Patient.link.other: the Patient that links to the target is in its compartment.
    assert_eq!(exported["Patient"], vec!["in-0", "target"]);
}
