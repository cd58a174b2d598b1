//! Every bad kick-off, status and download request gets the right status and an OperationOutcome.

use e2e_tests::*;
use serde_json::json;

const ACCEPT: (&str, &str) = ("Accept", "application/fhir+json");
const ASYNC: (&str, &str) = ("Prefer", "respond-async");

/// (description, method, path, headers, body, expected status, a distinctive part of the
/// OperationOutcome's diagnostics naming the cause)
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<String>,
    u16,
    &'a str,
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
        (
            "no Prefer",
            "GET",
            "/$export",
            vec![ACCEPT],
            None,
            400,
            "must include respond-async",
        ),
        (
            "Prefer without respond-async",
            "GET",
            "/$export",
            vec![ACCEPT, ("Prefer", "return=minimal")],
            None,
            400,
            "must include respond-async",
        ),
        (
            "empty Accept",
            "GET",
            "/$export",
            vec![("Accept", ""), ASYNC],
            None,
            400,
            "the Accept header must be application/fhir+json",
        ),
        (
            "Accept XML",
            "GET",
            "/$export",
            vec![("Accept", "application/fhir+xml"), ASYNC],
            None,
            400,
            "Accept 'application/fhir+xml' is not supported",
        ),
        (
            "_outputFormat csv",
            "GET",
            "/$export?_outputFormat=text/csv",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_outputFormat 'text/csv' is not supported",
        ),
        (
            "_since not an instant",
            "GET",
            "/$export?_since=last-week",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_since: 'last-week' is not a FHIR instant",
        ),
        (
            "_since a bare date",
            "GET",
            "/$export?_since=2020-01-01",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_since: '2020-01-01' is not a FHIR instant",
        ),
        (
            "_since in the future",
            "GET",
            "/$export?_since=2999-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_since (2999-01-01T00:00:00Z) is in the future",
        ),
        (
            "_until in the future",
            "GET",
            "/$export?_until=2999-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_until (2999-01-01T00:00:00Z) is in the future",
        ),
        (
            "_until invalid",
            "GET",
            "/$export?_until=2020-02-31T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_until: '2020-02-31T00:00:00Z' is not a valid FHIR instant",
        ),
        (
            "_since after _until",
            "GET",
            "/$export?_since=2021-01-01T00:00:00Z&_until=2020-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "must be before _until",
        ),
        (
            "_since twice",
            "GET",
            "/$export?_since=2020-01-01T00:00:00Z&_since=2021-01-01T00:00:00Z",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_since may appear only once",
        ),
        (
            "_type unknown",
            "GET",
            "/$export?_type=Patient,Unicorn",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_type 'Unicorn' is not an R4 resource type",
        ),
        (
            "_type wrong case",
            "GET",
            "/Patient/$export?_type=observation",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_type 'observation' is not an R4 resource type",
        ),
        (
            "_type empty",
            "GET",
            "/$export?_type=",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "_type has an empty value",
        ),
        (
            "_typeFilter with an unknown search parameter",
            "GET",
            "/$export?_typeFilter=Observation%3Fcolour%3Dblue",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "colour is not a supported search parameter of Observation",
        ),
        (
            "_elements below the top level",
            "GET",
            "/$export?_elements=Patient.name.given",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "'Patient.name.given' is not a top-level element",
        ),
        (
            "includeAssociatedData with an unknown value",
            "GET",
            "/Patient/$export?includeAssociatedData=LatestProvenanceResources,AllTheThings",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "includeAssociatedData 'AllTheThings' is not supported",
        ),
        (
            "unknown parameter",
            "GET",
            "/$export?colour=blue",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "unknown parameter 'colour'",
        ),
        (
            "patient in a GET",
            "GET",
            "/Patient/$export?patient=Patient/pat-000001",
            vec![ACCEPT, ASYNC],
            None,
            400,
            "patient parameter is supported only in a POST",
        ),
        (
            "patient at system level",
            "POST",
            "/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("pat-000001")]),
            400,
            "patient parameter is not allowed at system level",
        ),
        (
            "unknown patient",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("nobody")]),
            400,
            "Patient/nobody is not known",
        ),
        (
            "patient not in the Group",
            "POST",
            "/Group/group-0/$export",
            vec![ACCEPT, ASYNC],
            params(vec![patient("pat-000011")]),
            400,
            "Patient/pat-000011 is not a member of Group/group-0",
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
            "patient must be given as valueReference",
        ),
        (
            "body not JSON",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            Some("{oops".into()),
            400,
            "POST body is not valid JSON",
        ),
        (
            "body not Parameters",
            "POST",
            "/Patient/$export",
            vec![ACCEPT, ASYNC],
            Some(json!({"resourceType": "Patient"}).to_string()),
            400,
            "must be a FHIR Parameters resource",
        ),
        (
            "unknown Group",
            "GET",
            "/Group/no-such-group/$export",
            vec![ACCEPT, ASYNC],
            None,
            404,
            "Group/no-such-group is not known",
        ),
        (
            "unknown status id",
            "GET",
            "/$export-status/0123456789abcdef",
            vec![],
            None,
            404,
            "no export 0123456789abcdef",
        ),
        (
            "cancel unknown id",
            "DELETE",
            "/$export-status/0123456789abcdef",
            vec![],
            None,
            404,
            "no export 0123456789abcdef",
        ),
        (
            "unknown download",
            "GET",
            "/$export-output/0123/Patient/000-0000.ndjson",
            vec![],
            None,
            404,
            "no export 0123: it never existed",
        ),
        (
            "download path traversal",
            "GET",
            "/$export-output/..%2F..%2Fetc/passwd/x",
            vec![],
            None,
            404,
            "no export ../../etc: it never existed",
        ),
        (
            "unknown route",
            "GET",
            "/Patient/123",
            vec![],
            None,
            404,
            "no FHIR endpoint at /fhir/Patient/123",
        ),
        (
            "outside the FHIR base",
            "GET",
            "/admin",
            vec![],
            None,
            404,
            "the FHIR base is /fhir",
        ),
        (
            "wrong method on kick-off",
            "DELETE",
            "/$export",
            vec![ACCEPT, ASYNC],
            None,
            405,
            "method DELETE is not allowed on /fhir/$export",
        ),
        (
            "wrong method on metadata",
            "POST",
            "/metadata",
            vec![],
            Some("{}".into()),
            405,
            "method POST is not allowed on /fhir/metadata",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, method, path, headers, body, status, says) in cases {
        let url = if path == "/admin" {
            server.base.replace("/fhir", "/admin")
        } else {
            server.url(path)
        };
        let response = request(method, &url, &headers, body);
        assert_eq!(response.status, status, "{what}: {}", response.body);
        response.assert_outcome(status);
        let diagnostics = response.json()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if !diagnostics.contains(says) {
            wrong.push(format!("{what}: {diagnostics:?} does not say {says:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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

/// What the planted files hold: it must never come back from the server.
const PLANTED: &str = "{\"resourceType\":\"Basic\",\"id\":\"planted-outside-the-export-7f3c\"}\n";

#[test]
fn downloads_never_leave_the_export_folder() {
    let dir = scratch_dir("traversal");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &[]);
    let manifest = server.export("/$export?_type=Patient,Observation");
    let real_url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let base_path = server.base[server.base.find("/fhir").unwrap()..].to_string();
    let real_target = real_url[real_url.find("/fhir/").unwrap()..].to_string();
    let job = real_target.split('/').nth(3).unwrap().to_string();
    assert_eq!(
        real_target,
        format!("{base_path}/$export-output/{job}/Observation/000-0000.ndjson")
    );

    // Files outside the export folder (next to exports/ and the db) and files inside the job's
    // folder that the export never wrote; a server following the path would serve one of them.
    let exports = server.exports_dir();
    let planted = [
        dir.join("secret.ndjson"),
        dir.join("Observation/000-0000.ndjson"),
        dir.join("Observation/secret.ndjson"),
        exports.join("secret.ndjson"),
        exports.join(&job).join("secret.ndjson"),
        exports.join(&job).join("Observation/secret.ndjson"),
        exports.join(&job).join("Observation/000-0099.ndjson"),
        exports
            .join(&job)
            .join("Observation/000-0000.ndjson.partial"),
    ];
    for file in &planted {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, PLANTED).unwrap();
    }
    // The raw client reaches the download route: the real file comes back.
    let real = raw_request(&server.base, "GET", real_target.as_bytes());
    assert_eq!(real.status, 200, "{}", real.body);
    assert_eq!(real.body, get(&real_url).body);

    let absolute = |path: &std::path::Path| percent_encode(path.to_str().unwrap());
    let dots = [
        "..",
        "%2e%2e",
        "%2E%2E",
        ".%2e",
        "%2e.",
        "%252e%252e",
        "%c0%ae%c0%ae",
        "%e0%80%ae%e0%80%ae",
        "%ef%bc%8e%ef%bc%8e",
        "%u002e%u002e",
        "..%00",
        "..;",
        "...",
    ];
    let separators = [
        "/",
        "%2f",
        "%2F",
        "%252f",
        "%252F",
        "\\",
        "%5c",
        "%5C",
        "%255c",
        "%c0%af",
        "%e0%80%af",
    ];
    let mut targets: Vec<String> = Vec::new();
    let output = format!("{base_path}/$export-output");
    for dot in dots {
        // Traversal in the job segment: <exports>/../Observation/000-0000.ndjson is planted.
        targets.push(format!("{output}/{dot}/Observation/000-0000.ndjson"));
        targets.push(format!("{output}/{dot}/{dot}/secret.ndjson"));
        for sep in separators {
            // A real job with traversal in the type or file segment:
            // <exports>/<job>/../../Observation/000-0000.ndjson and <exports>/<job>/../../secret.ndjson.
            targets.push(format!(
                "{output}/{job}/{dot}/{dot}{sep}Observation{sep}000-0000.ndjson"
            ));
            targets.push(format!("{output}/{job}/{dot}/{dot}{sep}secret.ndjson"));
            targets.push(format!(
                "{output}/{job}/Observation/{dot}{sep}{dot}{sep}{dot}{sep}Observation{sep}000-0000.ndjson"
            ));
            targets.push(format!(
                "{output}/{job}/Observation/{dot}{sep}{dot}{sep}{dot}{sep}secret.ndjson"
            ));
            targets.push(format!(
                "{output}/{dot}{sep}{dot}{sep}{job}/Observation/000-0000.ndjson"
            ));
            // One step up from the job's folder: <exports>/secret.ndjson.
            targets.push(format!(
                "{output}/{job}/Observation/{dot}{sep}{dot}{sep}secret.ndjson"
            ));
        }
    }
    targets.extend([
        // Absolute paths, in every segment.
        format!("{output}/{}/Observation/000-0000.ndjson", absolute(&dir)),
        format!(
            "{output}/{job}/Observation/{}",
            absolute(&dir.join("secret.ndjson"))
        ),
        format!("{output}/{job}/{}/secret.ndjson", absolute(&dir)),
        format!("{output}/{job}/Observation/%2Fetc%2Fpasswd"),
        format!("{output}/%2Fetc%2Fpasswd/x/y"),
        format!("{output}/%2Fetc/passwd/x"),
        format!("{output}/{job}/%2Fetc/passwd"),
        format!("{output}/..%2F..%2Fetc/passwd/x"),
        format!("{output}/{job}/Observation/..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd"),
        // NUL bytes: after, inside and before real names.
        format!("{output}/{job}/Observation/000-0000.ndjson%00"),
        format!("{output}/{job}/Observation/000-0000.ndjson%00.txt"),
        format!("{output}/{job}/Observation%00/000-0000.ndjson"),
        format!("{output}/{job}%00/Observation/000-0000.ndjson"),
        format!("{output}/{job}/Observation/%00../../secret.ndjson"),
        // Files in the job's folder the export never recorded.
        format!("{output}/{job}/Observation/secret.ndjson"),
        format!("{output}/{job}/Observation/000-0099.ndjson"),
        format!("{output}/{job}/Observation/000-0000.ndjson.partial"),
        format!("{output}/{job}/secret.ndjson/x"),
        format!("{output}/{job}/./secret.ndjson"),
        format!("{output}/{job}/%2e/secret.ndjson"),
        // Raw dot segments the client did not normalise, and the FHIR base itself.
        format!("{output}/{job}/../../secret.ndjson"),
        format!("{output}/../../secret.ndjson"),
        format!("{output}/../../../secret.ndjson"),
        format!("{base_path}/../secret.ndjson"),
        format!("{base_path}/%2e%2e/secret.ndjson"),
        "/secret.ndjson".to_string(),
        "/exports/secret.ndjson".to_string(),
        format!("/exports/{job}/Observation/000-0000.ndjson"),
    ]);

    for target in &targets {
        let r = raw_request(&server.base, "GET", target.as_bytes());
        assert!(
            !r.body.contains("planted-outside-the-export") && !r.body.contains("root:x:0:0"),
            "GET {target} leaked a file: {}",
            r.body
        );
        assert_eq!(r.status, 404, "GET {target}: {}", r.body);
        r.assert_outcome(404);
    }

    // Cancelling with a traversing id deletes nothing.
    for id in [
        "..".to_string(),
        "%2e%2e".to_string(),
        "..%2F..".to_string(),
        format!("{job}%2F..%2F.."),
        format!("{job}%2F.."),
        absolute(&dir),
        absolute(&exports),
        "%2F".to_string(),
    ] {
        let target = format!("{base_path}/$export-status/{id}");
        let r = raw_request(&server.base, "DELETE", target.as_bytes());
        assert_eq!(r.status, 404, "DELETE {target}: {}", r.body);
        r.assert_outcome(404);
    }
    for file in &planted {
        assert_eq!(std::fs::read_to_string(file).unwrap(), PLANTED, "{file:?}");
    }
    assert!(dir.join("store.db").is_file());
    assert_eq!(get(&real_url).status, 200, "the real export is still there");
}

#[test]
fn a_body_over_8_mib_gets_413() {
    const MAX_BODY: usize = 8 * 1024 * 1024;
    let dir = scratch_dir("body-limit");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &[]);
    // A valid Parameters body padded with JSON whitespace to `size` bytes.
    let padded = |size: usize| {
        let mut body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Patient"}]})
        .to_string();
        body.push_str(&" ".repeat(size - body.len()));
        assert_eq!(body.len(), size);
        body
    };
    let url = server.url("/Patient/$export");
    let over = request("POST", &url, &KICKOFF_HEADERS, Some(padded(MAX_BODY + 1)));
    over.assert_outcome(413);
    let diagnostics = over.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(diagnostics.contains("larger than"), "{diagnostics}");
    // Exactly the limit is read and honoured.
    let at_limit = request("POST", &url, &KICKOFF_HEADERS, Some(padded(MAX_BODY)));
    assert_eq!(at_limit.status, 202, "{}", at_limit.body);
    let manifest = wait_for_manifest(&at_limit.header("content-location").unwrap());
    assert_eq!(
        ids_by_type(&download_all(&manifest))
            .keys()
            .collect::<Vec<_>>(),
        ["Patient"]
    );
}

#[test]
fn lenient_handling_reports_unknown_associated_data_and_organization() {
    use e2e_tests::oracle::*;
    let dir = scratch_dir("lenient-values");
    let data = read_ndjson_dir(&generated_store(&dir, 3));
    let server = Server::start(&dir, &[]);
    let path = "/Patient/$export?_type=Encounter\
                &includeAssociatedData=AllTheThings,LatestProvenanceResources\
                &organizeOutputBy=Encounter";
    // Strict: refused. Lenient: ignored, reported, and the rest honoured.
    server.kickoff(path).assert_outcome(400);
    let response = request(
        "GET",
        &server.url(path),
        &[ACCEPT, ("Prefer", "respond-async, handling=lenient")],
        None,
    );
    assert_eq!(response.status, 202, "{}", response.body);
    let manifest = wait_for_manifest(&response.header("content-location").unwrap());

    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let lines: Vec<serde_json::Value> = get(errors[0]["url"].as_str().unwrap())
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(errors[0]["count"], lines.len());
    let mut diagnostics: Vec<String> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["resourceType"], "OperationOutcome");
            l["issue"][0]["diagnostics"].as_str().unwrap().to_string()
        })
        .collect();
    diagnostics.sort();
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    assert!(
        diagnostics[0].contains("includeAssociatedData")
            && diagnostics[0].contains("'AllTheThings'"),
        "{diagnostics:?}"
    );
    assert!(
        diagnostics[1].contains("organizeOutputBy") && diagnostics[1].contains("'Encounter'"),
        "{diagnostics:?}"
    );

    // Organized by type, as without organizeOutputBy; the known value is applied: the latest
    // Provenance of each exported Encounter rides along.
    assert!(manifest.get("outputOrganizedBy").is_none(), "{manifest}");
    let exported = ids_by_type(&download_all(&manifest));
    let encounters = expected(&data, |r| r["resourceType"] == "Encounter");
    let mut want = encounters.clone();
    want.insert(
        "Provenance".into(),
        latest_provenance(&data, &references(&encounters)),
    );
    assert!(!want["Provenance"].is_empty());
    assert_eq!(exported, want);
}
