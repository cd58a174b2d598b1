//! What real bulk clients and conformance suites send, end to end over HTTP: `_typeFilter` in
//! both encodings, the kick-off `Accept` rule, the CapabilityStatement's operations, the content
//! type of error bodies, lenient `patient` ids, and the request log. Expected results come from
//! the test's own data and plain predicates.

use e2e_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;

const FHIR_JSON: &str = "application/fhir+json";
const ASYNC: (&str, &str) = ("Prefer", "respond-async");
const LENIENT: (&str, &str) = ("Prefer", "respond-async, handling=lenient");

/// Exported ids of one type, sorted.
fn exported(manifest: &Value, resource_type: &str) -> Vec<String> {
    ids_by_type(&download_all(manifest))
        .remove(resource_type)
        .unwrap_or_default()
}

/// Deletes an export (or cancels it), so the next kick-off is not refused with 429.
fn discard(kickoff: &Response) {
    let url = kickoff
        .header("content-location")
        .expect("Content-Location");
    assert_eq!(request("DELETE", &url, &[], None).status, 202);
}

/// Identifier values with the characters a query string treats specially.
const TRICKY: [&str; 8] = [
    "a&b",
    "a=b",
    "a,b",
    "a|b",
    "a$b",
    "a b",
    "Zoë Ørsted",
    "plain",
];

#[test]
fn type_filter_values_select_the_same_patients_in_both_encodings() {
    let dir = scratch_dir("typefilter-encodings");
    let lines: Vec<String> = TRICKY
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({"resourceType": "Patient", "id": format!("p{i}"),
                "identifier": [{"system": "urn:t", "value": v}]})
            .to_string()
        })
        .collect();
    let file = dir.join("patients.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();
    run_cli(&[
        "load",
        "--db",
        dir.join("store.db").to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    let server = Server::start(&dir, &[]);
    let ids_with = |values: &[&str]| -> Vec<String> {
        let mut ids: Vec<String> = TRICKY
            .iter()
            .enumerate()
            .filter(|(_, v)| values.contains(v))
            .map(|(i, _)| format!("p{i}"))
            .collect();
        ids.sort();
        ids
    };

    // (the inner query written raw, or None where it cannot be; the same with its names and values
    // percent-encoded, as smart-fetch, Epic and HAPI send it; the identifier values it selects)
    let cases: &[(Option<&str>, &str, &[&str])] = &[
        (None, "identifier=urn%3At%7Ca%26b", &["a&b"]),
        (
            Some("identifier=urn:t|a=b"),
            "identifier=urn%3At%7Ca%3Db",
            &["a=b"],
        ),
        (
            Some(r"identifier=urn:t|a\,b"),
            "identifier=urn%3At%7Ca%5C%2Cb",
            &["a,b"],
        ),
        (
            Some("identifier=urn:t|plain,urn:t|a$b"),
            "identifier=urn%3At%7Cplain%2Curn%3At%7Ca%24b",
            &["plain", "a$b"],
        ),
        (
            Some("identifier=urn:t|a|b"),
            "identifier=urn%3At%7Ca%7Cb",
            &["a|b"],
        ),
        (
            Some("identifier=urn:t|a b"),
            "identifier=urn%3At%7Ca%20b",
            &["a b"],
        ),
        (
            Some("identifier=urn:t|Zoë Ørsted"),
            "identifier=urn%3At%7CZo%C3%AB%20%C3%98rsted",
            &["Zoë Ørsted"],
        ),
    ];
    for (raw, encoded, selects) in cases {
        let want = ids_with(selects);
        assert!(!want.is_empty());
        let mut queries = vec![format!("Patient?{encoded}")];
        queries.extend(raw.map(|r| format!("Patient?{r}")));
        for query in queries {
            let get = server.kickoff(&format!(
                "/$export?_type=Patient&_typeFilter={}",
                percent_encode(&query)
            ));
            assert_eq!(get.status, 202, "GET {query}: {}", get.body);
            let manifest = wait_for_manifest(&get.header("content-location").unwrap());
            assert_eq!(exported(&manifest, "Patient"), want, "GET {query}");
            discard(&get);

            let body = json!({"resourceType": "Parameters", "parameter": [
                {"name": "_type", "valueString": "Patient"},
                {"name": "_typeFilter", "valueString": query}]});
            let post = server.kickoff_post("/$export", &body);
            assert_eq!(post.status, 202, "POST {query}: {}", post.body);
            let manifest = wait_for_manifest(&post.header("content-location").unwrap());
            assert_eq!(exported(&manifest, "Patient"), want, "POST {query}");
            discard(&post);
        }
    }

    // A raw `&` inside a value cannot be told from a separator: a clear 400, never an empty type.
    let raw_ampersand = server.kickoff(&format!(
        "/$export?_type=Patient&_typeFilter={}",
        percent_encode("Patient?identifier=urn:t|a&b")
    ));
    raw_ampersand.assert_outcome(400);
    let diagnostics = raw_ampersand.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        diagnostics.contains("_typeFilter") && diagnostics.contains("name=value"),
        "{diagnostics}"
    );
}

/// smart-fetch 1.0.3's default Observation filter, as it sends it: the categories are joined with
/// `%2C` inside the query, which the URL encodes once more (`%252C` on the wire).
const SMART_FETCH_CATEGORIES: [&str; 9] = [
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

#[test]
fn smart_fetch_default_observation_filter_counts_every_listed_category() {
    let dir = scratch_dir("smart-fetch-filter");
    let data = read_ndjson_dir(&generated_store(&dir, 10));
    let server = Server::start(&dir, &[]);
    let inner = format!(
        "Observation?category={}",
        SMART_FETCH_CATEGORIES.join("%2C")
    );
    let want: Vec<String> = {
        let mut ids: Vec<String> = data
            .iter()
            .filter(|r| r["resourceType"] == "Observation")
            .filter(|r| {
                r["category"].as_array().into_iter().flatten().any(|c| {
                    c["coding"].as_array().into_iter().flatten().any(|coding| {
                        SMART_FETCH_CATEGORIES.contains(&coding["code"].as_str().unwrap_or(""))
                    })
                })
            })
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let observations = data
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .count();
    assert!(
        !want.is_empty() && want.len() < observations,
        "the data must have Observations inside and outside the categories"
    );
    for level in ["/$export", "/Patient/$export"] {
        let manifest = server.export(&format!(
            "{level}?_type=Observation&_typeFilter={}",
            percent_encode(&inner)
        ));
        assert_eq!(exported(&manifest, "Observation"), want, "{level}");
    }
}

#[test]
fn kickoff_needs_accept_fhir_json_unless_lenient() {
    let dir = scratch_dir("accept");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &[]);
    // (Accept header, lenient, expected status)
    let cases: &[(Option<&str>, bool, u16)] = &[
        (Some(FHIR_JSON), false, 202),
        (Some("application/fhir+json; charset=utf-8"), false, 202),
        (Some("text/html, application/fhir+json;q=0.9"), false, 202),
        (None, false, 400),
        (Some("*/*"), false, 400),
        (Some("application/json"), false, 400),
        (Some("application/json+fhir"), false, 400),
        (Some("application/fhir+json;q=0"), false, 400),
        (Some("application/fhir+xml"), false, 400),
        (None, true, 202),
        (Some("*/*"), true, 202),
        (Some("application/json"), true, 202),
    ];
    for (accept, lenient, status) in cases {
        let mut headers = vec![if *lenient { LENIENT } else { ASYNC }];
        if let Some(accept) = accept {
            headers.push(("Accept", accept));
        }
        let r = request("GET", &server.url("/$export"), &headers, None);
        if *status == 202 {
            assert_eq!(r.status, 202, "{accept:?} lenient={lenient}: {}", r.body);
            discard(&r);
        } else {
            assert_eq!(r.status, *status, "{accept:?} lenient={lenient}");
            let outcome = r.json();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            assert!(
                outcome["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains("Accept"),
                "{}",
                r.body
            );
        }
    }

    // Polls and downloads keep accepting what clients send there.
    let kick = server.kickoff("/$export?_type=Patient");
    let status_url = kick.header("content-location").unwrap();
    let manifest = wait_for_manifest(&status_url);
    let file = manifest["output"][0]["url"].as_str().unwrap();
    for accept in ["application/json", "*/*", "application/fhir+ndjson"] {
        let poll = request("GET", &status_url, &[("Accept", accept)], None);
        assert_eq!(poll.status, 200, "poll with Accept {accept}");
        let download = request("GET", file, &[("Accept", accept)], None);
        assert_eq!(download.status, 200, "download with Accept {accept}");
    }
}

#[test]
fn capability_statement_declares_export_at_system_patient_and_group_level() {
    let dir = scratch_dir("capability");
    let server = Server::start(&dir, &[]);
    let statement = get(&server.url("/metadata")).json();
    let rest = &statement["rest"][0];
    let operations_of = |resource_type: Option<&str>| -> BTreeSet<(String, String)> {
        let list = match resource_type {
            None => rest["operation"].clone(),
            Some(t) => rest["resource"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["type"] == t)
                .unwrap()["operation"]
                .clone(),
        };
        list.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap().to_string(),
                    o["definition"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let ig = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition";
    let pair = |name: &str, def: &str| (name.to_string(), format!("{ig}/{def}"));
    assert_eq!(
        operations_of(None),
        BTreeSet::from([pair("export", "export")])
    );
    assert_eq!(
        operations_of(Some("Patient")),
        BTreeSet::from([
            pair("export", "patient-export"),
            pair("patient-export", "patient-export")
        ])
    );
    assert_eq!(
        operations_of(Some("Group")),
        BTreeSet::from([
            pair("export", "group-export"),
            pair("group-export", "group-export")
        ])
    );
}

#[test]
fn error_bodies_are_labelled_as_the_request_asks() {
    let dir = scratch_dir("error-content-type");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &[]);
    // (Accept, expected Content-Type)
    let cases: &[(Option<&str>, &str)] = &[
        (None, FHIR_JSON),
        (Some(FHIR_JSON), FHIR_JSON),
        (Some("*/*"), FHIR_JSON),
        (Some("application/json"), "application/json"),
        (
            Some("application/json, text/plain;q=0.5"),
            "application/json",
        ),
        (Some("application/json, application/fhir+json"), FHIR_JSON),
        (Some("text/html"), FHIR_JSON),
    ];
    let unknown_status = server.url("/$export-status/0123456789abcdef0123456789abcdef");
    for (accept, content_type) in cases {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("Accept", *a)).collect();
        for (method, url, status) in [
            ("GET", unknown_status.clone(), 404),
            ("DELETE", unknown_status.clone(), 404),
            ("GET", server.url("/nowhere"), 404),
            ("PUT", server.url("/$export"), 405),
        ] {
            let r = request(method, &url, &headers, None);
            assert_eq!(r.status, status, "{method} {url}");
            assert_eq!(
                r.header("content-type").as_deref(),
                Some(*content_type),
                "{method} {url} with Accept {accept:?}"
            );
            assert_eq!(r.json()["resourceType"], "OperationOutcome");
        }
        let metadata = request("GET", &server.url("/metadata"), &headers, None);
        assert_eq!(
            metadata.header("content-type").as_deref(),
            Some(*content_type),
            "metadata with Accept {accept:?}"
        );
    }
    // A strict kick-off that asks for plain JSON is refused, in plain JSON.
    let r = request(
        "GET",
        &server.url("/$export"),
        &[ASYNC, ("Accept", "application/json")],
        None,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
}

#[test]
fn unknown_patient_ids_are_refused_or_reported_when_lenient() {
    let dir = scratch_dir("lenient-patients");
    let data = read_ndjson_dir(&generated_store(&dir, 12));
    let server = Server::start(&dir, &[]);
    let group = data
        .iter()
        .find(|r| r["resourceType"] == "Group")
        .expect("a Group");
    let group_id = group["id"].as_str().unwrap();
    let members: Vec<String> = group["member"]
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
    let outsider = data
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .find(|id| !members.contains(id))
        .expect("a patient outside the Group");
    let member = members[0].clone();
    let patients = |ids: &[&str]| {
        json!({"resourceType": "Parameters", "parameter": ids.iter().map(|id| json!(
            {"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
            .chain(std::iter::once(json!({"name": "_type", "valueString": "Patient"})))
            .collect::<Vec<_>>()})
        .to_string()
    };
    let lenient_headers = [("Accept", FHIR_JSON), LENIENT];
    let group_url = server.url(&format!("/Group/{group_id}/$export"));

    // (url, ids sent, ids refused or reported, ids exported)
    let cases = [
        (
            server.url("/Patient/$export"),
            vec![member.as_str(), "no-such-patient"],
            vec!["no-such-patient"],
            vec![member.clone()],
        ),
        (
            group_url.clone(),
            vec![member.as_str(), outsider.as_str(), "no-such-patient"],
            vec![outsider.as_str(), "no-such-patient"],
            vec![member.clone()],
        ),
        (
            group_url,
            vec!["no-such-patient", "another-unknown"],
            vec!["no-such-patient", "another-unknown"],
            vec![],
        ),
    ];
    for (url, sent, bad, exported_ids) in cases {
        let strict = request("POST", &url, &KICKOFF_HEADERS, Some(patients(&sent)));
        strict.assert_outcome(400);
        assert!(
            strict.body.contains(bad[0]),
            "strict names the first bad id: {}",
            strict.body
        );

        let lenient = request("POST", &url, &lenient_headers, Some(patients(&sent)));
        assert_eq!(lenient.status, 202, "{}", lenient.body);
        let manifest = wait_for_manifest(&lenient.header("content-location").unwrap());
        assert_eq!(
            exported(&manifest, "Patient"),
            exported_ids,
            "{url} {sent:?}"
        );
        let errors = manifest["error"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{manifest}");
        let lines: Vec<Value> = get(errors[0]["url"].as_str().unwrap())
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), bad.len(), "one line per bad id: {lines:?}");
        for (line, id) in lines.iter().zip(&bad) {
            assert_eq!(line["resourceType"], "OperationOutcome");
            let diagnostics = line["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(
                diagnostics.contains(&format!("Patient/{id}")),
                "{diagnostics}"
            );
        }
        discard(&lenient);
    }
}

#[test]
fn every_request_gets_one_log_line_without_query_values() {
    let dir = scratch_dir("request-log");
    generated_store(&dir, 3);
    let server = Server::start_logged(&dir, &[]);
    let secret = "Zebulon-Quixote";
    let kick = server.kickoff(&format!(
        "/$export?_type=Patient&_typeFilter={}",
        percent_encode(&format!("Patient?name:contains={secret}"))
    ));
    assert_eq!(kick.status, 202, "{}", kick.body);
    let status_url = kick.header("content-location").unwrap();
    let job = status_url.rsplit('/').next().unwrap().to_string();
    let manifest = wait_for_manifest(&status_url);
    let missing = get(&server.url("/$export-status/ffffffffffffffffffffffffffffffff"));
    let other = get(&server.url("/$export?x=1"));
    let download = {
        // An unfiltered export, so there is a file to download.
        discard(&kick);
        let kick = server.kickoff("/$export?_type=Patient");
        let manifest = wait_for_manifest(&kick.header("content-location").unwrap());
        get(manifest["output"][0]["url"].as_str().unwrap())
    };
    assert!(manifest["output"].as_array().unwrap().is_empty());

    // The download's line is written once its body has gone out; give the server a moment.
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..50 {
        lines = server
            .log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .filter(|l: &Value| l["message"] == "request")
            .collect();
        if lines
            .iter()
            .any(|l| l["request_id"].as_str() == download.header("x-request-id").as_deref())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let line_of = |r: &Response| -> Value {
        let id = r.header("x-request-id").expect("X-Request-Id");
        let found: Vec<&Value> = lines.iter().filter(|l| l["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "one line for request {id}: {lines:#?}");
        found[0].clone()
    };
    let k = line_of(&kick);
    assert_eq!(k["method"], "GET");
    assert_eq!(k["route"], "/fhir/$export");
    assert_eq!(k["status"], 202);
    assert_eq!(k["export_id"], job.as_str());
    assert_eq!(k["bytes"], kick.body.len());
    assert!(k["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(k["timestamp"].is_string());

    let m = line_of(&missing);
    assert_eq!(m["route"], "/fhir/$export-status/{id}");
    assert_eq!(m["status"], 404);

    let o = line_of(&other);
    assert_eq!(o["status"], 400);

    let d = line_of(&download);
    assert_eq!(d["route"], "/fhir/$export-output/{id}/{type}/{file}");
    assert_eq!(d["status"], 200);
    assert_eq!(d["bytes"], download.body.len());

    let ids: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), lines.len(), "request ids are unique");

    // Nothing from a query string, a body or a resource reaches the log.
    let log = server.log();
    for leaked in [secret, "_typeFilter", "x=1", "pat-0000", "\"family\""] {
        assert!(!log.contains(leaked), "the log contains {leaked:?}:\n{log}");
    }
}

#[test]
fn text_log_format_is_one_readable_line_per_request() {
    let dir = scratch_dir("request-log-text");
    let server = Server::start_logged(&dir, &["--log-format", "text"]);
    let r = get(&server.url("/metadata"));
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap();
    let mut log = String::new();
    for _ in 0..50 {
        log = server.log();
        if log.contains(&id) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let line = log
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("no line for {id}:\n{log}"));
    assert!(serde_json::from_str::<Value>(line).is_err(), "{line}");
    assert!(
        line.contains("route=/fhir/metadata") && line.contains("status=200"),
        "{line}"
    );
}
