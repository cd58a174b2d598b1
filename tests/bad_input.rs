//! Every bad kick-off, status and download request gets the right status and an OperationOutcome.

use e2e_tests::*;
use serde_json::json;

const ACCEPT: (&str, &str) = ("Accept", "application/fhir+json");
const ASYNC: (&str, &str) = ("Prefer", "respond-async");

/// (description, method, path, headers, body, expected status)
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<String>,
    u16,
);

#[test]
fn bad_requests_get_operation_outcomes() {
    let dir = scratch_dir("bad-input");
    generated_store(&dir, 12);
    let server = Server::start(&dir, &[]);
    let patient = |id: &str| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}});
    let params = |list: Vec<serde_json::Value>| {
        Some(json!({"resourceType": "Parameters", "parameter": list}).to_string())
    };

    let cases: Vec<Case> = vec![
        ("no Prefer", "GET", "/$export", vec![ACCEPT], None, 400),
        (
            "Prefer without respond-async",
            "GET",
            "/$export",
            vec![ACCEPT, ("Prefer", "return=minimal")],
            None,
            400,
        ),
        (
            "empty Accept",
            "GET",
            "/$export",
            vec![("Accept", ""), ASYNC],
            None,
            400,
        ),
        (
            "Accept XML",
            "GET",
            "/$export",
            vec![("Accept", "application/fhir+xml"), ASYNC],
            None,
            400,
        ),
        (
            "_outputFormat csv",
            "GET",
            "/$export?_outputFormat=text/csv",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_since not an instant",
            "GET",
            "/$export?_since=last-week",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_since a bare date",
            "GET",
            "/$export?_since=2020-01-01",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_since in the future",
            "GET",
            "/$export?_since=2999-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_until in the future",
            "GET",
            "/$export?_until=2999-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_until invalid",
            "GET",
            "/$export?_until=2020-02-31T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_since after _until",
            "GET",
            "/$export?_since=2021-01-01T00:00:00Z&_until=2020-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_since twice",
            "GET",
            "/$export?_since=2020-01-01T00:00:00Z&_since=2021-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_type unknown",
            "GET",
            "/$export?_type=Patient,Unicorn",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_type wrong case",
            "GET",
            "/Patient/$export?_type=observation",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_type empty",
            "GET",
            "/$export?_type=",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_typeFilter with an unknown search parameter",
            "GET",
            "/$export?_typeFilter=Observation%3Fcolour%3Dblue",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "_elements below the top level",
            "GET",
            "/$export?_elements=Patient.name.given",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "includeAssociatedData with an unknown value",
            "GET",
            "/Patient/$export?includeAssociatedData=LatestProvenanceResources,AllTheThings",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "unknown parameter",
            "GET",
            "/$export?colour=blue",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "patient in a GET",
            "GET",
            "/Patient/$export?patient=Patient/pat-000001",
            vec![ACCEPT, ASYNC],
            None,
            400,
        ),
        (
            "patient at system level",
            "POST",
            "/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("pat-000001")]),
            400,
        ),
        (
            "unknown patient",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("nobody")]),
            400,
        ),
        (
            "patient not in the Group",
            "POST",
            "/Group/group-0/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("pat-000011")]),
            400,
        ),
        (
            "patient not a reference",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            params(vec![
                json!({"name": "patient", "valueString": "pat-000001"}),
            ]),
            400,
        ),
        (
            "body not JSON",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            Some("{oops".into()),
            400,
        ),
        (
            "body not Parameters",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            Some(json!({"resourceType": "Patient"}).to_string()),
            400,
        ),
        (
            "unknown Group",
            "GET",
            "/Group/no-such-group/$export",
            vec![ACCEPT, ASYNC],
            None,
            404,
        ),
        (
            "unknown status id",
            "GET",
            "/$export-status/0123456789abcdef",
            vec![],
            None,
            404,
        ),
        (
            "cancel unknown id",
            "DELETE",
            "/$export-status/0123456789abcdef",
            vec![],
            None,
            404,
        ),
        (
            "unknown download",
            "GET",
            "/$export-output/0123/Patient/000-0000.ndjson",
            vec![],
            None,
            404,
        ),
        (
            "download path traversal",
            "GET",
            "/$export-output/..%2F..%2Fetc/passwd/x",
            vec![],
            None,
            404,
        ),
        ("unknown route", "GET", "/Patient/123", vec![], None, 404),
        ("outside the FHIR base", "GET", "/admin", vec![], None, 404),
        (
            "wrong method on kick-off",
            "DELETE",
            "/$export",
            vec![ACCEPT, ASYNC],
            None,
            405,
        ),
        (
            "wrong method on metadata",
            "POST",
            "/metadata",
            vec![],
            Some("{}".into()),
            405,
        ),
    ];
    for (what, method, path, headers, body, status) in cases {
        let url = if path == "/admin" {
            server.base.replace("/fhir", "/admin")
        } else {
            server.url(path)
        };
        let response = request(method, &url, &headers, body);
        assert_eq!(response.status, status, "{what}: {}", response.body);
        response.assert_outcome(status);
    }
    // None of the rejected kick-offs took the lock.
    assert_eq!(server.kickoff("/$export?_type=Patient").status, 202);
}

#[test]
fn lenient_handling_reports_ignored_parameters_in_error_files() {
    let dir = scratch_dir("lenient");
    generated_store(&dir, 3);
    let server = Server::start(&dir, &[]);
    let response = request(
        "GET",
        &server.url("/$export?_type=Patient&_typeFilter=Patient%3Fcolour%3Dblue&colour=blue"),
        &[ACCEPT, ("Prefer", "respond-async, handling=lenient")],
        None,
    );
    assert_eq!(response.status, 202, "{}", response.body);
    let manifest = wait_for_manifest(&response.header("content-location").unwrap());
    assert_eq!(manifest["output"].as_array().unwrap().len(), 1);
    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["type"], "OperationOutcome");
    assert_eq!(errors[0]["count"], 2);
    let body = get(errors[0]["url"].as_str().unwrap()).body;
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l["resourceType"] == "OperationOutcome")
    );
    let diagnostics: Vec<&str> = lines
        .iter()
        .map(|l| l["issue"][0]["diagnostics"].as_str().unwrap())
        .collect();
    assert!(
        diagnostics[0].contains("parameter colour"),
        "{diagnostics:?}"
    );
    assert!(diagnostics[1].contains("_typeFilter"), "{diagnostics:?}");
}

#[test]
fn metadata_declares_bulk_export() {
    let dir = scratch_dir("metadata");
    let server = Server::start(&dir, &[]);
    let response = get(&server.url("/metadata"));
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type").as_deref(),
        Some("application/fhir+json")
    );
    let cs = response.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(
        cs["instantiates"][0],
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    );
    let rest = &cs["rest"][0];
    assert_eq!(rest["operation"][0]["name"], "export");
    let resource_ops: Vec<(&str, &str)> = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("operation").is_some())
        .map(|r| {
            (
                r["type"].as_str().unwrap(),
                r["operation"][0]["definition"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(resource_ops.len(), 2);
    let documentation = rest["operation"][0]["documentation"].as_str().unwrap();
    for param in [
        "_since",
        "_until",
        "_type",
        "_typeFilter",
        "_elements",
        "patient",
    ] {
        assert!(documentation.contains(param), "{documentation}");
    }
    // Every R4 type lists the search parameters _typeFilter can use.
    let resources = rest["resource"].as_array().unwrap();
    assert_eq!(resources.len(), 145);
    let observation = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    let params: Vec<(&str, &str)> = observation["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["type"].as_str().unwrap()))
        .collect();
    for wanted in [
        ("code", "token"),
        ("date", "date"),
        ("subject", "reference"),
        ("value-quantity", "quantity"),
        ("value-string", "string"),
        ("_lastUpdated", "date"),
    ] {
        assert!(params.contains(&wanted), "{wanted:?} in {params:?}");
    }
    assert!(!params.iter().any(|(_, t)| *t == "composite"));
    assert!(resource_ops.contains(&(
        "Patient",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
    )));
    assert!(resource_ops.contains(&(
        "Group",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
    )));
}
