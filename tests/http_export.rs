//! End to end over HTTP: kick-off → poll → download → parse every line, at all three levels,
//! compared with an independent reading of the R4 Patient compartment.

use e2e_tests::oracle::*;
use e2e_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;

const PATIENTS: usize = 60;

/// A server over freshly generated data, and that data.
fn setup(name: &str, extra: &[&str]) -> (Server, Vec<Value>) {
    let dir = scratch_dir(name);
    let data = generated_store(&dir, PATIENTS);
    (Server::start(&dir, extra), read_ndjson_dir(&data))
}

/// The ids of the Patients in the generated data.
fn patient_ids(data: &[Value]) -> BTreeSet<String> {
    data.iter()
        .filter(|r| r["resourceType"] == "Patient")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_manifest_shape(manifest: &Value, request_suffix: &str) {
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert!(
        manifest["request"]
            .as_str()
            .unwrap()
            .ends_with(request_suffix),
        "{}",
        manifest["request"]
    );
    assert_eq!(manifest["requiresAccessToken"], false);
    assert!(manifest["error"].as_array().unwrap().is_empty());
}

#[test]
fn system_level_exports_every_resource_once() {
    let (server, data) = setup("system", &[]);
    let manifest = server.export("/$export");
    assert_manifest_shape(&manifest, "/fhir/$export");
    let exported = ids_by_type(&download_all(&manifest));
    assert_eq!(exported, expected(&data, |_| true));
    assert_eq!(exported.len(), 19, "all generated types");
}

#[test]
fn patient_level_matches_the_compartment_reference() {
    let (server, data) = setup("patient", &[]);
    let reference = CompartmentReference::load();
    let all_patients = patient_ids(&data);
    let manifest = server.export("/Patient/$export");
    assert_manifest_shape(&manifest, "/fhir/Patient/$export");
    let exported = ids_by_type(&download_all(&manifest));
    assert_eq!(
        exported,
        with_provenance_of_targets(
            &data,
            expected(&data, |r| in_compartment_of(&reference, r, &all_patients))
        )
    );
    for outside in ["Practitioner", "Organization", "Location", "ResearchStudy"] {
        assert!(
            !exported.contains_key(outside),
            "{outside} is not in the Patient compartment"
        );
    }
    assert!(
        exported.contains_key("Group"),
        "Group.member.entity puts Groups in the compartment"
    );

    // POST with patient parameters: only those patients' compartments (pat-000049 links to 48).
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/pat-000003"}},
        {"name": "patient", "valueReference": {"reference": "Patient/pat-000048"}}]});
    let kick = server.kickoff_post("/Patient/$export", &body);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = wait_for_manifest(&kick.header("content-location").unwrap());
    let exported = ids_by_type(&download_all(&manifest));
    let wanted: BTreeSet<String> = ["pat-000003".to_string(), "pat-000048".to_string()].into();
    assert_eq!(
        exported,
        with_provenance_of_targets(
            &data,
            expected(&data, |r| in_compartment_of(&reference, r, &wanted))
        )
    );
    assert_eq!(
        exported["Patient"],
        vec!["pat-000003", "pat-000048", "pat-000049"]
    );
}

#[test]
fn patient_level_pages_of_a_few_rows_skip_those_outside_every_compartment() {
    // Three rows a page: most pages of Practitioner, Organization, ... keep nothing, and pages of
    // compartment types start and end at rows kept or not; `next` must move past both.
    let (server, data) = setup("patient-pages", &["--page-size", "3"]);
    let reference = CompartmentReference::load();
    let all_patients = patient_ids(&data);
    let manifest =
        server.export("/Patient/$export?_type=Patient,Encounter,Practitioner,Organization,Group");
    let exported = ids_by_type(&download_all(&manifest));
    let types = [
        "Patient",
        "Encounter",
        "Practitioner",
        "Organization",
        "Group",
    ];
    assert_eq!(
        exported,
        expected(&data, |r| {
            types.contains(&r["resourceType"].as_str().unwrap_or(""))
                && in_compartment_of(&reference, r, &all_patients)
        })
    );
}

#[test]
fn group_level_exports_the_members_compartments_only() {
    let (server, data) = setup("group", &[]);
    let reference = CompartmentReference::load();
    let group = data
        .iter()
        .find(|r| r["resourceType"] == "Group" && r["id"] == "group-1")
        .unwrap();
    let members: BTreeSet<String> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["entity"]["reference"]
                .as_str()
                .unwrap()
                .trim_start_matches("Patient/")
                .to_string()
        })
        .collect();
    assert_eq!(members.len(), 10);
    let manifest = server.export("/Group/group-1/$export");
    assert_manifest_shape(&manifest, "/fhir/Group/group-1/$export");
    let exported = ids_by_type(&download_all(&manifest));
    let want = with_provenance_of_targets(
        &data,
        expected(&data, |r| {
            !(r["resourceType"] == "Group" && r["id"] == "group-1")
                && in_compartment_of(&reference, r, &members)
        }),
    );
    assert_eq!(exported, want);
    assert!(
        !exported.contains_key("Group"),
        "the Group itself is not exported"
    );
    assert_eq!(exported["Patient"].len(), 10);

    // POST with a patient of the Group narrows the export to that member.
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/pat-000055"}},
        {"name": "_type", "valueString": "Patient,Condition"}]});
    let kick = server.kickoff_post("/Group/group-1/$export", &body);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let exported = ids_by_type(&download_all(&wait_for_manifest(
        &kick.header("content-location").unwrap(),
    )));
    assert_eq!(exported["Patient"], vec!["pat-000055"]);
    assert_eq!(exported["Condition"].len(), 10);
    assert_eq!(exported.len(), 2);
}

#[test]
fn types_read_in_many_partitions_export_each_resource_once() {
    // 40 row ids per partition: every generated type is cut into several rid ranges (one work
    // item each), read concurrently, with and without `_since` and at Patient level.
    let (server, data) = setup(
        "partitions",
        &["--rows-per-partition", "40", "--concurrency", "4"],
    );
    let manifest = server.export("/$export");
    let observation_files = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "Observation")
        .count();
    assert!(
        observation_files > 10,
        "{observation_files} Observation files"
    );
    assert_eq!(
        ids_by_type(&download_all(&manifest)),
        expected(&data, |_| true)
    );

    let since = "2023-01-01T00:00:00.000Z";
    let last_updated = |r: &Value| r["meta"]["lastUpdated"].as_str().unwrap().to_string();
    let exported = ids_by_type(&download_all(
        &server.export(&format!("/$export?_since={since}")),
    ));
    assert_eq!(
        exported,
        expected(&data, |r| last_updated(r).as_str() > since)
    );

    let reference = CompartmentReference::load();
    let all_patients = patient_ids(&data);
    let exported = ids_by_type(&download_all(&server.export("/Patient/$export")));
    assert_eq!(
        exported,
        with_provenance_of_targets(
            &data,
            expected(&data, |r| in_compartment_of(&reference, r, &all_patients))
        )
    );
}

#[test]
fn type_since_and_until_filter_the_export() {
    let (server, data) = setup("filters", &[]);
    let last_updated = |r: &Value| r["meta"]["lastUpdated"].as_str().unwrap().to_string();
    let since = "2023-01-01T00:00:00.000Z";
    let until = "2024-06-30T12:00:00.000Z";
    let manifest = server.export(&format!(
        "/$export?_type=Patient,Observation&_type=Condition&_since={since}&_until={until}"
    ));
    let exported = ids_by_type(&download_all(&manifest));
    let want = expected(&data, |r| {
        ["Patient", "Observation", "Condition"].contains(&r["resourceType"].as_str().unwrap())
            && last_updated(r).as_str() > since
            && last_updated(r).as_str() <= until
    });
    assert_eq!(exported, want);
    assert!(want["Observation"].len() > 100 && want["Observation"].len() < PATIENTS * 150);

    // A _since with an offset, sent with an unencoded '+' (arrives as a space), still works.
    let manifest = server.export("/Patient/$export?_type=Patient&_since=2025-01-01T01:00:00+01:00");
    let exported = ids_by_type(&download_all(&manifest));
    assert_eq!(
        exported,
        expected(&data, |r| r["resourceType"] == "Patient"
            && last_updated(r).as_str() > "2025-01-01T00:00:00.000Z")
    );
}

#[test]
fn large_types_are_split_into_deterministic_files() {
    let (server, data) = setup(
        "split",
        &["--max-file-resources", "700", "--max-file-bytes", "400000"],
    );
    let manifest = server.export("/$export?_type=Observation,Patient");
    let outputs = manifest["output"].as_array().unwrap();
    let observation_files: Vec<&Value> = outputs
        .iter()
        .filter(|o| o["type"] == "Observation")
        .collect();
    let total: u64 = observation_files
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, PATIENTS * 150);
    assert!(observation_files.len() >= (PATIENTS * 150).div_ceil(700));
    for (i, file) in observation_files.iter().enumerate() {
        assert!(file["count"].as_u64().unwrap() <= 700);
        let url = file["url"].as_str().unwrap();
        assert!(
            url.ends_with(&format!("/Observation/000-{i:04}.ndjson")),
            "{url}"
        );
        let body = get(url).body;
        assert!(body.len() <= 400_000, "{url} is {} bytes", body.len());
    }
    let exported = ids_by_type(&download_all(&manifest));
    assert_eq!(
        exported,
        expected(&data, |r| r["resourceType"] == "Observation"
            || r["resourceType"] == "Patient")
    );

    // Deterministic: the same export again writes the same file names with the same bytes.
    let files = |manifest: &Value| -> Vec<(String, String)> {
        manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let url = o["url"].as_str().unwrap();
                let job = url.split('/').rev().nth(2).unwrap();
                let name = url[url.find(job).unwrap() + job.len()..].to_string();
                (name, get(url).body)
            })
            .collect()
    };
    let again = server.export("/$export?_type=Observation,Patient");
    assert_ne!(again["output"][0]["url"], manifest["output"][0]["url"]);
    assert_eq!(files(&again), files(&manifest));
}

#[test]
fn downloads_are_gzipped_when_the_client_accepts_it() {
    use std::io::Read;
    let dir = scratch_dir("gzip");
    generated_store(&dir, 3);
    let server = Server::start(&dir, &[]);
    let manifest = server.export("/$export?_type=Observation");
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let plain = get(url);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(
        plain.header("content-length").unwrap(),
        plain.body.len().to_string()
    );

    let response = ureq::get(url)
        .set("Accept-Encoding", "gzip, deflate")
        .call()
        .unwrap();
    assert_eq!(response.header("content-encoding"), Some("gzip"));
    assert_eq!(
        response.header("content-type"),
        Some("application/fhir+ndjson")
    );
    let mut compressed = Vec::new();
    response.into_reader().read_to_end(&mut compressed).unwrap();
    assert!(
        compressed.len() < plain.body.len() / 3,
        "gzip shrinks NDJSON"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, plain.body);
}
