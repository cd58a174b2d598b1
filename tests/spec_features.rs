//! The optional rows of the Bulk Data IG, end to end over HTTP against the local server:
//! `_typeFilter`, `_elements`, and how they fail. Expected results are computed here from the
//! generated data with plain Rust predicates, independently of the server's search code.

use e2e_tests::oracle::*;
use e2e_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const PATIENTS: usize = 30;

fn setup(name: &str) -> (Server, Vec<Value>) {
    let dir = scratch_dir(name);
    let data = generated_store(&dir, PATIENTS);
    (Server::start(&dir, &[]), read_ndjson_dir(&data))
}

fn ids(resources: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<String> {
    let mut out: Vec<String> = resources
        .iter()
        .filter(|r| keep(r))
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn of_type(data: &[Value], t: &str) -> Vec<Value> {
    data.iter()
        .filter(|r| r["resourceType"] == t)
        .cloned()
        .collect()
}

fn exported_ids(manifest: &Value) -> BTreeMap<String, Vec<String>> {
    ids_by_type(&download_all(manifest))
}

/// Lower case without the accents of the generated names, for string search's case- and
/// accent-insensitive matching.
fn fold(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ä' | 'ã' | 'å' => 'a',
            'è' | 'é' | 'ê' | 'ë' => 'e',
            'ì' | 'í' | 'î' | 'ï' => 'i',
            'ò' | 'ó' | 'ô' | 'ö' | 'õ' => 'o',
            'ù' | 'ú' | 'û' | 'ü' => 'u',
            'ç' => 'c',
            'ñ' => 'n',
            other => other,
        })
        .collect()
}

fn effective(r: &Value) -> &str {
    r["effectiveDateTime"].as_str().unwrap()
}

#[test]
fn type_filter_or_of_and_queries_over_get_and_post() {
    let (server, data) = setup("typefilter");
    let observations = of_type(&data, "Observation");
    // A date that splits the observations roughly in half.
    let mut dates: Vec<&str> = observations.iter().map(effective).collect();
    dates.sort();
    let cut = &dates[dates.len() / 2][..10];

    let heart = |r: &Value| r["code"]["coding"][0]["code"] == "8867-4";
    let after_cut = |r: &Value| &effective(r)[..10] >= cut;
    let low_value = |r: &Value| r["valueQuantity"]["value"].as_f64().unwrap() < 10.0;
    let first = format!("Observation?code=http://loinc.org|8867-4&date=ge{cut}");
    let second = "Observation?value-quantity=lt10".to_string();
    let path = format!(
        "/$export?_type=Observation,Condition&_typeFilter={}&_typeFilter={}",
        percent_encode(&first),
        percent_encode(&second)
    );
    let got = exported_ids(&server.export(&path));
    let want_obs = ids(&observations, |r| {
        (heart(r) && after_cut(r)) || low_value(r)
    });
    assert!(!want_obs.is_empty() && want_obs.len() < observations.len());
    assert_eq!(got["Observation"], want_obs);
    // A type without a filter is exported whole.
    assert_eq!(
        got["Condition"],
        ids(&of_type(&data, "Condition"), |_| true)
    );
    assert_eq!(got.len(), 2);

    // POST, Patient level: a token, a date prefix, and a string prefix (case- and
    // accent-insensitive: `MU` finds Müller).
    let patients = of_type(&data, "Patient");
    let female_before_1975 =
        |r: &Value| r["gender"] == "female" && r["birthDate"].as_str().unwrap() < "1975";
    let family = |r: &Value| r["name"][0]["family"].as_str().unwrap().to_string();
    // A prefix of one of those patients' family names that leaves some of them out, preferring
    // a name with an accent.
    let mut families: Vec<String> = patients
        .iter()
        .filter(|r| female_before_1975(r))
        .map(family)
        .collect();
    families.sort_by_key(|f| f.is_ascii());
    let prefix_of = |f: &str| fold(f).chars().take(2).collect::<String>().to_uppercase();
    let with_prefix = |prefix: &str| {
        ids(&patients, |r| {
            female_before_1975(r) && fold(&family(r)).starts_with(&prefix.to_lowercase())
        })
    };
    let all_matching = ids(&patients, female_before_1975);
    let prefix = families
        .iter()
        .map(|f| prefix_of(f))
        .find(|p| with_prefix(p).len() < all_matching.len())
        .expect("a family prefix that leaves some matching patients out");
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "_typeFilter",
         "valueString": format!("Patient?gender=female&birthdate=lt1975&family={prefix}")},
        {"name": "_typeFilter", "valueString": "Observation?code:not=8867-4&subject:missing=false"}]});
    let kick = server.kickoff_post("/Patient/$export", &body);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let got = exported_ids(&wait_for_manifest(
        &kick.header("content-location").unwrap(),
    ));
    let want = with_prefix(&prefix);
    assert!(!want.is_empty(), "{prefix}");
    assert_eq!(got["Patient"], want, "family={prefix}");
    assert_eq!(got["Observation"], ids(&observations, |r| !heart(r)));
}

/// R4 number search over HTTP: `value-quantity=12.3` stands for [12.25, 12.35), so a stored
/// 12.25 is exported and a stored 12.35 is not. The generated values have two decimals; the
/// search values are tenths whose two edges are both among them, and the expected set is
/// computed in whole hundredths.
#[test]
fn type_filter_number_edges_follow_the_significant_figures() {
    let (server, data) = setup("typefilter-number-edges");
    let observations = of_type(&data, "Observation");
    let hundredths =
        |r: &Value| (r["valueQuantity"]["value"].as_f64().unwrap() * 100.0).round() as i64;
    let stored: BTreeSet<i64> = observations.iter().map(hundredths).collect();
    // Tenths t (in hundredths, a multiple of 10) with t - 5 and t + 5 both stored.
    let tenths: Vec<i64> = (1..2000)
        .map(|t| t * 10)
        .filter(|t| stored.contains(&(t - 5)) && stored.contains(&(t + 5)))
        .take(30)
        .collect();
    assert!(tenths.len() >= 10, "{tenths:?}");
    let search: Vec<String> = tenths
        .iter()
        .map(|t| format!("{}.{}", t / 100, (t % 100) / 10))
        .collect();
    let filter = format!("Observation?value-quantity={}", search.join(","));
    let got = exported_ids(&server.export(&format!(
        "/$export?_type=Observation&_typeFilter={}",
        percent_encode(&filter)
    )));
    let want = ids(&observations, |r| {
        let v = hundredths(r);
        tenths.iter().any(|t| t - 5 <= v && v < t + 5)
    });
    assert!(want.iter().any(|id| {
        let r = observations
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap();
        tenths.contains(&(hundredths(r) + 5))
    }));
    assert_eq!(got["Observation"], want, "{filter}");
}

#[test]
fn elements_keep_selected_and_mandatory_elements_and_tag_subsetted() {
    let (server, data) = setup("elements");
    let manifest =
        server.export("/$export?_type=Observation,Patient,Condition&_elements=Observation.value,Patient.gender,Patient.name");
    let files = download_all(&manifest);
    for obs in &files["Observation"] {
        let keys: Vec<&str> = obs
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // status and code are mandatory in R4.
        assert_eq!(
            keys,
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "valueQuantity"
            ]
        );
        let tags = obs["meta"]["tag"].as_array().unwrap();
        assert!(tags.iter().any(|t| t["code"] == "SUBSETTED"
            && t["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"));
    }
    for patient in &files["Patient"] {
        let keys: Vec<&str> = patient
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "name", "gender"]);
    }
    // Condition was not named: whole, untagged, byte-for-byte the stored resource: the loaded
    // resource (plus the versionId the load gave it), in the very bytes an export without
    // _elements writes.
    let stored = of_type(&data, "Condition");
    assert_eq!(files["Condition"].len(), stored.len());
    for condition in &files["Condition"] {
        assert!(condition["meta"].get("tag").is_none());
        let mut original = stored
            .iter()
            .find(|c| c["id"] == condition["id"])
            .unwrap()
            .clone();
        original["meta"]["versionId"] = json!("1");
        assert_eq!(condition, &original);
    }
    let plain = server.export("/$export?_type=Condition");
    assert_eq!(
        raw_lines(&manifest, "Condition"),
        raw_lines(&plain, "Condition")
    );
    assert_eq!(
        files["Observation"].len(),
        of_type(&data, "Observation").len()
    );
}

/// The lines of a manifest's files of `resource_type`, as downloaded, sorted.
fn raw_lines(manifest: &Value, resource_type: &str) -> Vec<String> {
    let mut lines: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == resource_type)
        .flat_map(|o| {
            get(o["url"].as_str().unwrap())
                .body
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!lines.is_empty(), "no {resource_type} lines");
    lines.sort();
    lines
}

#[test]
fn unusable_filters_are_rejected_or_reported_when_lenient() {
    let (server, data) = setup("filter-errors");
    for bad in [
        "_typeFilter=Observation%3Ffoo%3D1",
        "_typeFilter=Observation%3Fsubject.name%3Dx",
        "_typeFilter=Observation%3F_include%3DObservation%3Asubject",
        "_typeFilter=Observation%3Fdate%3Dyesterday",
        "_typeFilter=Observation%3Fcode%3Atext%3Dx",
        "_typeFilter=Observation",
        "_typeFilter=Nope%3Fx%3D1",
        "_elements=Patient.name.family",
        "_elements=Nope.id",
    ] {
        let r = server.kickoff(&format!("/$export?{bad}"));
        r.assert_outcome(400);
    }

    let lenient = [
        ("Accept", "application/fhir+json"),
        ("Prefer", "respond-async, handling=lenient"),
    ];
    // Under lenient handling an unusable criterion is dropped from its query, not the query
    // from the filter nor the filter from the type: three queries whose results tell these apart.
    let queries = [
        "Observation?foo=1&code=http://loinc.org|8867-4",
        "Observation?code:text=glucose&value-quantity=lt10",
        "Observation?code=2093-3",
    ];
    let observations = of_type(&data, "Observation");
    let code = |r: &Value| r["code"]["coding"][0]["code"].as_str().unwrap().to_string();
    let heart = ids(&observations, |r| code(r) == "8867-4");
    let low = ids(&observations, |r| {
        r["valueQuantity"]["value"].as_f64().unwrap() < 10.0
    });
    let cholesterol = ids(&observations, |r| code(r) == "2093-3");
    let union = |sets: &[&Vec<String>]| -> Vec<String> {
        let all: BTreeSet<String> = sets.iter().flat_map(|s| s.iter().cloned()).collect();
        all.into_iter().collect()
    };
    let want = union(&[&heart, &low, &cholesterol]);
    for (what, other) in [
        ("the first query dropped", union(&[&low, &cholesterol])),
        ("the second query dropped", union(&[&heart, &cholesterol])),
        ("both queries dropped", cholesterol.clone()),
        ("the filter dropped", ids(&observations, |_| true)),
    ] {
        assert_ne!(
            want, other,
            "the data cannot tell the criterion from {what}"
        );
    }
    let path = format!(
        "/$export?_type=Observation{}",
        queries
            .iter()
            .map(|q| format!("&_typeFilter={}", percent_encode(q)))
            .collect::<String>()
    );
    server.kickoff(&path).assert_outcome(400);
    let kick = request("GET", &server.url(&path), &lenient, None);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = wait_for_manifest(&kick.header("content-location").unwrap());
    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    let lines: Vec<Value> = get(errors[0]["url"].as_str().unwrap())
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let diagnostics: Vec<&str> = lines
        .iter()
        .map(|l| l["issue"][0]["diagnostics"].as_str().unwrap())
        .collect();
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    assert!(diagnostics[0].contains("foo"), "{diagnostics:?}");
    assert!(diagnostics[1].contains(":text"), "{diagnostics:?}");
    let got = exported_ids(&manifest);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["Observation"]);
    assert_eq!(got["Observation"], want);
}

fn load_file(dir: &std::path::Path, name: &str, content: &str) {
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap();
    run_cli(&[
        "load",
        "--db",
        dir.join("store.db").to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
}

/// Lines of the manifest's `deleted` files, checked to be DELETE transaction Bundles; returns
/// the deleted `Type/id`s, sorted.
fn deleted_urls(manifest: &Value) -> Vec<String> {
    let mut urls = Vec::new();
    for entry in manifest["deleted"].as_array().expect("deleted array") {
        assert_eq!(entry["type"], "Bundle");
        let body = get(entry["url"].as_str().unwrap()).body;
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, entry["count"].as_u64().unwrap());
        for bundle in lines {
            assert_eq!(bundle["resourceType"], "Bundle");
            assert_eq!(bundle["type"], "transaction");
            let request = &bundle["entry"][0]["request"];
            assert_eq!(request["method"], "DELETE");
            urls.push(request["url"].as_str().unwrap().to_string());
        }
    }
    urls.sort();
    urls
}

/// A store of 6 generated patients plus Group `cohort` (pat-000000, pat-000001, pat-000003),
/// where, after the returned instant, Observations obs-pat-000000-0, obs-pat-000000-1 and
/// obs-pat-000002-5 and Patient pat-000001 were deleted and obs-pat-000000-1 was loaded again.
/// Returns the server, the instant, and the resources live now.
fn store_with_deletions(name: &str) -> (Server, String, Vec<Value>) {
    let dir = scratch_dir(name);
    let data_dir = generated_store(&dir, 6);
    let mut data = read_ndjson_dir(&data_dir);
    // A Group of three patients, one of whom is deleted below; loaded before the window.
    let cohort = json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/pat-000000"}},
                   {"entity": {"reference": "Patient/pat-000001"}},
                   {"entity": {"reference": "Patient/pat-000003"}}]});
    load_file(&dir, "cohort.ndjson", &format!("{cohort}\n"));
    data.push(cohort);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before_deletes = chrono_now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let deletes = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/obs-pat-000000-0"}},
        {"request": {"method": "DELETE", "url": "Observation/obs-pat-000000-1"}},
        {"request": {"method": "DELETE", "url": "Observation/obs-pat-000002-5"}},
        {"request": {"method": "DELETE", "url": "Patient/pat-000001"}},
        {"request": {"method": "DELETE", "url": "Observation/never-existed"}}]});
    load_file(&dir, "deletes.json", &deletes.to_string());
    let mut recreated = data
        .iter()
        .find(|r| r["id"] == "obs-pat-000000-1")
        .unwrap()
        .clone();
    recreated["meta"]
        .as_object_mut()
        .unwrap()
        .remove("lastUpdated");
    recreated["status"] = json!("amended");
    load_file(&dir, "recreate.ndjson", &format!("{recreated}\n"));
    let gone = ["obs-pat-000000-0", "obs-pat-000002-5", "pat-000001"];
    let live: Vec<Value> = data
        .iter()
        .filter(|r| !gone.contains(&r["id"].as_str().unwrap()))
        .cloned()
        .collect();
    (Server::start(&dir, &[]), before_deletes, live)
}

fn of_types(types: &'static [&'static str]) -> impl Fn(&Value) -> bool {
    move |r: &Value| types.contains(&r["resourceType"].as_str().unwrap())
}

/// What a `_since` export after the deletions outputs: the re-created Observation only.
fn only_recreated() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(
        "Observation".to_string(),
        vec!["obs-pat-000000-1".to_string()],
    )])
}

#[test]
fn deleted_resources_are_listed_with_since_and_never_exported() {
    let (server, before_deletes, live) = store_with_deletions("deleted");
    let reference = CompartmentReference::load();

    // Without _since: deleted resources are simply absent; the re-created one is live.
    let manifest = server.export("/$export?_type=Observation,Patient");
    assert!(manifest["deleted"].as_array().unwrap().is_empty());
    let got = exported_ids(&manifest);
    assert_same_ids(
        &got,
        &expected(&live, of_types(&["Observation", "Patient"])),
        "system",
    );
    assert!(got["Observation"].contains(&"obs-pat-000000-1".to_string()));
    assert!(!got["Observation"].contains(&"obs-pat-000000-0".to_string()));
    assert!(!got["Patient"].contains(&"pat-000001".to_string()));

    // With _since: the deletions in the window, as DELETE Bundles; output has only what changed.
    let manifest = server.export(&format!("/$export?_since={before_deletes}"));
    assert_eq!(
        deleted_urls(&manifest),
        vec![
            "Observation/obs-pat-000000-0",
            "Observation/obs-pat-000002-5",
            "Patient/pat-000001"
        ]
    );
    assert_eq!(exported_ids(&manifest), only_recreated());

    // Patient level: a deleted Patient's compartment is gone, other deletions are listed.
    let manifest = server.export(&format!("/Patient/$export?_since={before_deletes}"));
    assert_eq!(
        deleted_urls(&manifest),
        vec![
            "Observation/obs-pat-000000-0",
            "Observation/obs-pat-000002-5"
        ]
    );
    assert_eq!(exported_ids(&manifest), only_recreated());
    let live_patients = all_patients(&live);
    assert!(!live_patients.contains("pat-000001"));
    let got = exported_ids(&server.export("/Patient/$export?_type=Observation,Patient"));
    let want = expected(&live, |r| {
        of_types(&["Observation", "Patient"])(r) && in_compartment_of(&reference, r, &live_patients)
    });
    assert!(
        !want["Observation"]
            .iter()
            .any(|id| id.starts_with("obs-pat-000001-"))
    );
    assert_same_ids(&got, &want, "Patient level");
}

#[test]
fn group_exports_list_their_members_deletions_with_since() {
    let (server, before_deletes, _) = store_with_deletions("deleted-group");
    // The deletions in the live members' compartments: not obs-pat-000002-5, and, as at
    // Patient level, not the deleted member Patient, whose compartment left the export.
    let manifest = server.export(&format!("/Group/cohort/$export?_since={before_deletes}"));
    assert_eq!(
        deleted_urls(&manifest),
        vec!["Observation/obs-pat-000000-0"]
    );
    assert_eq!(exported_ids(&manifest), only_recreated());
}

#[test]
fn a_deleted_patient_leaves_group_exports() {
    let (server, _, live) = store_with_deletions("deleted-member");
    let reference = CompartmentReference::load();
    let members: BTreeSet<String> = ["pat-000000".to_string(), "pat-000003".to_string()].into();
    let got = exported_ids(&server.export("/Group/cohort/$export?_type=Observation,Patient"));
    let want = expected(&live, |r| {
        of_types(&["Observation", "Patient"])(r) && in_compartment_of(&reference, r, &members)
    });
    assert_eq!(want["Patient"], ["pat-000000", "pat-000003"]);
    assert_same_ids(&got, &want, "Group cohort");
}

/// Now as a FHIR instant, for `_since`.
fn chrono_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The `Type/id` targets of a Provenance.
fn targets_of(provenance: &Value) -> Vec<String> {
    provenance["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reference"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn provenance_follows_the_exported_resources() {
    let dir = scratch_dir("provenance");
    let data_dir = generated_store(&dir, 12);
    // Two more Provenance about one Encounter: an older and a newer record.
    let extra = |id: &str, recorded: &str| {
        json!({"resourceType": "Provenance", "id": id, "recorded": recorded,
            "target": [{"reference": "Encounter/enc-pat-000000-0"}, {"reference": "Practitioner/prac-0"}],
            "agent": [{"who": {"reference": "Practitioner/prac-0"}}]})
    };
    load_file(
        &dir,
        "extra.ndjson",
        &format!(
            "{}\n{}\n",
            extra("prov-extra-old", "2001-01-01T00:00:00Z"),
            extra("prov-extra-new", "2030-01-01T00:00:00Z")
        ),
    );
    let mut data = read_ndjson_dir(&data_dir);
    data.push(extra("prov-extra-old", "2001-01-01T00:00:00Z"));
    data.push(extra("prov-extra-new", "2030-01-01T00:00:00Z"));
    let provenance = of_type(&data, "Provenance");
    let server = Server::start(&dir, &[]);
    let provenance_of = |manifest: &Value| {
        exported_ids(manifest)
            .remove("Provenance")
            .unwrap_or_default()
    };

    // Patient level, Provenance asked for as a type: about the Patients exported.
    let got = provenance_of(&server.export("/Patient/$export?_type=Patient,Provenance"));
    assert_eq!(
        got,
        ids(&provenance, |p| targets_of(p)
            .iter()
            .any(|t| t.starts_with("Patient/")))
    );

    // Group level: about the members or the exported Encounters of the members.
    let group = data.iter().find(|r| r["id"] == "group-0").unwrap();
    let members: Vec<String> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap()["Patient/".len()..].to_string())
        .collect();
    let got = provenance_of(&server.export("/Group/group-0/$export?_type=Encounter,Provenance"));
    let want = ids(&provenance, |p| {
        targets_of(p).iter().any(|t| {
            members.iter().any(|m| {
                *t == format!("Patient/{m}") || t.starts_with(&format!("Encounter/enc-{m}-"))
            })
        })
    });
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // _type without Provenance: none.
    let manifest = server.export("/Patient/$export?_type=Encounter");
    assert!(!exported_ids(&manifest).contains_key("Provenance"));

    // includeAssociatedData: Relevant = every Provenance about an exported Encounter.
    let about_encounters = |p: &Value| targets_of(p).iter().any(|t| t.starts_with("Encounter/"));
    let got = provenance_of(
        &server
            .export("/$export?_type=Encounter&includeAssociatedData=RelevantProvenanceResources"),
    );
    assert_eq!(got, ids(&provenance, about_encounters));
    assert!(got.contains(&"prov-extra-old".to_string()));

    // Latest = for each exported Encounter, the Provenance about it recorded last.
    let got = provenance_of(
        &server.export("/$export?_type=Encounter&includeAssociatedData=LatestProvenanceResources"),
    );
    let encounters = expected(&data, |r| r["resourceType"] == "Encounter");
    let want = latest_provenance(&data, &references(&encounters));
    // The extra records make one Encounter have three Provenance: Latest keeps fewer than
    // Relevant.
    assert!(want.len() < ids(&provenance, about_encounters).len());
    assert_eq!(got, want);

    // The same at Group level, where Provenance is found through the target index.
    let got = provenance_of(&server.export(
        "/Group/group-0/$export?_type=Encounter&includeAssociatedData=LatestProvenanceResources",
    ));
    let reference = CompartmentReference::load();
    let member_set: BTreeSet<String> = members.iter().cloned().collect();
    let member_encounters = expected(&data, |r| {
        r["resourceType"] == "Encounter" && in_compartment_of(&reference, r, &member_set)
    });
    let want_group = latest_provenance(&data, &references(&member_encounters));
    assert!(!want_group.is_empty() && want_group.len() < want.len());
    assert_eq!(got, want_group);

    server
        .kickoff("/$export?includeAssociatedData=SomethingElse")
        .assert_outcome(400);
}

const SLOW: [&str; 6] = [
    "--page-size",
    "50",
    "--page-delay-ms",
    "30",
    "--max-file-resources",
    "200",
];

#[test]
fn separate_export_status_answers_polls_with_200_and_x_export_status() {
    let dir = scratch_dir("separate-status");
    generated_store(&dir, 8);
    let server = Server::start(&dir, &SLOW);
    let headers = [
        ("Accept", "application/fhir+json"),
        ("Prefer", "respond-async, separate-export-status"),
    ];
    let kick = request("GET", &server.url("/$export"), &headers, None);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let applied = kick.header("preference-applied").unwrap();
    assert!(applied.contains("separate-export-status"), "{applied}");
    let location = kick.header("content-location").unwrap();
    let mut saw_running = false;
    let manifest = loop {
        let r = get(&location);
        assert_eq!(r.status, 200, "{}", r.body);
        match r.header("x-export-status").as_deref() {
            Some("202 Accepted") => {
                saw_running = true;
                assert!(r.header("x-progress").is_some());
            }
            Some("200 OK") => {
                assert!(r.header("expires").is_some());
                break r.json();
            }
            other => panic!("X-Export-Status {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(saw_running, "the slow export was seen running");
    assert!(!manifest["output"].as_array().unwrap().is_empty());
    // An unknown export is still a 404 of the poll itself.
    get(&server.url("/$export-status/nope")).assert_outcome(404);
    // Without the preference, polls keep the classic codes.
    let plain = server.kickoff("/$export?_type=Patient");
    let location = plain.header("content-location").unwrap();
    assert!(wait_for_manifest(&location)["output"].is_array());
    assert!(get(&location).header("x-export-status").is_none());
}

#[test]
fn partial_manifests_list_finished_files_and_never_change() {
    let dir = scratch_dir("partial-manifests");
    let data = read_ndjson_dir(&generated_store(&dir, 8));
    let server = Server::start(&dir, &SLOW);
    let kick = server.kickoff("/$export?allowPartialManifests=true");
    assert_eq!(kick.status, 202, "{}", kick.body);
    let location = kick.header("content-location").unwrap();

    // While running: 202 with the first page once files are ready.
    let mut first_page: Option<Value> = None;
    let mut early_files: BTreeMap<String, String> = BTreeMap::new();
    let final_manifest = loop {
        let r = get(&location);
        match r.status {
            202 if !r.body.is_empty() => {
                let page = r.json();
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/json")
                );
                let mut without_link = page.clone();
                without_link.as_object_mut().unwrap().remove("link");
                match &first_page {
                    None => {
                        for entry in page["output"].as_array().unwrap() {
                            let url = entry["url"].as_str().unwrap().to_string();
                            let file = get(&url);
                            assert_eq!(file.status, 200, "a listed file is ready: {}", file.body);
                            early_files.insert(url.clone(), file.body);
                        }
                        first_page = Some(without_link);
                    }
                    Some(first) => assert_eq!(&without_link, first, "a shown page never changes"),
                }
            }
            202 => {}
            200 => break r.json(),
            other => panic!("{other}: {}", r.body),
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    };
    let first_page = first_page.expect("a partial manifest was returned while running");
    assert!(!early_files.is_empty());
    let mut final_first = final_manifest.clone();
    final_first.as_object_mut().unwrap().remove("link");
    assert_eq!(
        final_first, first_page,
        "the completed status shows the same first page"
    );

    // Follow the links; together the pages hold every resource exactly once.
    let mut all = Vec::new();
    let mut page = final_manifest;
    let mut pages = 1;
    loop {
        all.extend(page["output"].as_array().unwrap().iter().cloned());
        let Some(next) = page["link"][0]["url"].as_str().map(String::from) else {
            break;
        };
        assert_eq!(page["link"][0]["relation"], "next");
        let r = get(&next);
        assert_eq!(r.status, 200, "{}", r.body);
        page = r.json();
        assert_eq!(page["transactionTime"], first_page["transactionTime"]);
        pages += 1;
    }
    assert!(pages >= 2, "the slow export spread over several pages");
    let exported = exported_ids(&json!({"output": all}));
    let want = expected(&data, |_| true);
    assert_eq!(exported, want);
    // Files shown early were final: same bytes now.
    for (url, body) in early_files {
        assert_eq!(get(&url).body, body);
    }
    get(&format!("{location}/page/99")).assert_outcome(404);
}

/// A manifest of more files than a page holds (1,000) is paged even when the client did not ask
/// for `allowPartialManifests`: on AWS the status answer passes through Lambda, whose responses
/// stop at 6 MB. Pages are cut in manifest order and together list every resource once.
#[test]
fn a_manifest_of_more_than_a_thousand_files_is_paged() {
    let dir = scratch_dir("paged-manifest");
    let data = read_ndjson_dir(&generated_store(&dir, 4));
    assert!(
        data.len() > 1000,
        "{} resources: too few for two pages",
        data.len()
    );
    let server = Server::start(&dir, &["--max-file-resources", "1"]);
    let kick = server.kickoff("/$export");
    assert_eq!(kick.status, 202, "{}", kick.body);
    let location = kick.header("content-location").unwrap();
    let first = wait_for_manifest(&location);
    let mut pages = vec![first.clone()];
    while let Some(next) = pages.last().unwrap()["link"][0]["url"]
        .as_str()
        .map(String::from)
    {
        assert_eq!(pages.last().unwrap()["link"][0]["relation"], "next");
        let r = get(&next);
        assert_eq!(r.status, 200, "{}", r.body);
        pages.push(r.json());
    }
    // One resource per file: as many files as resources, 1,000 to a page.
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["output"].as_array().unwrap().len())
        .collect();
    let mut want_sizes = vec![1000; data.len() / 1000];
    if !data.len().is_multiple_of(1000) {
        want_sizes.push(data.len() % 1000);
    }
    assert_eq!(sizes, want_sizes);
    for page in &pages {
        assert_eq!(page["transactionTime"], first["transactionTime"]);
    }
    let all: Vec<Value> = pages
        .iter()
        .flat_map(|p| p["output"].as_array().unwrap().iter().cloned())
        .collect();
    let urls: BTreeSet<&str> = all.iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert_eq!(urls.len(), all.len(), "no file is listed twice");
    let want = expected(&data, |_| true);
    assert_eq!(exported_ids(&json!({"output": all})), want);
    // Polling again shows the same first page.
    assert_eq!(wait_for_manifest(&location), first);
}

/// The blocks of an organized export, read from its files in manifest order.
struct Blocks {
    /// Patient id → the `(type, id)` of the resources of its block (without the Patient).
    content: BTreeMap<String, Vec<(String, String)>>,
    /// Patient id → how many fresh blocks (a header then the Patient) it has.
    starts: BTreeMap<String, usize>,
    /// Headers that continue a block cut at the end of the previous file.
    continuations: usize,
}

/// Reads an organized manifest's files, checking the block structure on the way: every file starts
/// with a header; a fresh block is a header, then its Patient; a continued block repeats the header
/// of the block the previous file (whose entry names this one in `continuesInFile`) ended with.
fn read_blocks(manifest: &Value, max_lines: usize) -> Blocks {
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let mut blocks = Blocks {
        content: BTreeMap::new(),
        starts: BTreeMap::new(),
        continuations: 0,
    };
    let mut previous_last: Option<String> = None;
    let mut previous_continues: Option<String> = None;
    for entry in manifest["output"].as_array().unwrap() {
        assert!(
            entry.get("type").is_none(),
            "organized entries have no type"
        );
        let url = entry["url"].as_str().unwrap();
        let body = get(url).body;
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, entry["count"].as_u64().unwrap());
        assert!(lines.len() <= max_lines);
        let mut current: Option<String> = None;
        let mut patient_line = None;
        for (i, line) in lines.iter().enumerate() {
            if Some(i) == patient_line {
                continue;
            }
            if line["resourceType"] == "Parameters" {
                assert_eq!(line["parameter"][0]["name"], "header");
                let patient = line["parameter"][0]["valueReference"]["reference"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("Patient/")
                    .unwrap()
                    .to_string();
                let continued = i == 0 && previous_continues.as_deref() == Some(url);
                if continued {
                    assert_eq!(previous_last.as_deref(), Some(patient.as_str()));
                    blocks.continuations += 1;
                } else {
                    *blocks.starts.entry(patient.clone()).or_default() += 1;
                    // A fresh block starts with the Patient itself.
                    assert_eq!(lines[i + 1]["resourceType"], "Patient");
                    assert_eq!(lines[i + 1]["id"], patient.as_str());
                    patient_line = Some(i + 1);
                }
                current = Some(patient);
                continue;
            }
            let patient = current.clone().expect("a file starts with a header");
            blocks.content.entry(patient).or_default().push((
                line["resourceType"].as_str().unwrap().to_string(),
                line["id"].as_str().unwrap().to_string(),
            ));
        }
        previous_last = current;
        previous_continues = entry["continuesInFile"].as_str().map(String::from);
    }
    blocks
}

/// Asserts each of `patients` has exactly one block, holding the resources of `data` that `in_block`
/// selects for it (besides the Patient itself), and that no other patient has one.
fn assert_blocks(
    blocks: &Blocks,
    data: &[Value],
    patients: &BTreeSet<String>,
    in_block: impl Fn(&Value, &str) -> bool,
) {
    assert_eq!(
        blocks.starts.keys().cloned().collect::<BTreeSet<_>>(),
        *patients
    );
    assert!(
        blocks.starts.values().all(|n| *n == 1),
        "{:?}",
        blocks.starts
    );
    for patient in patients {
        let mut want: Vec<(String, String)> = data
            .iter()
            .filter(|r| !(r["resourceType"] == "Patient" && r["id"] == patient.as_str()))
            .filter(|r| in_block(r, patient))
            .map(|r| {
                (
                    r["resourceType"].as_str().unwrap().to_string(),
                    r["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        want.sort();
        let mut got = blocks.content.get(patient).cloned().unwrap_or_default();
        got.sort();
        assert!(got.len() > 100, "{patient}'s block is a real compartment");
        assert_eq!(got, want, "block of {patient}");
    }
}

#[test]
fn organize_output_by_patient_writes_resource_blocks() {
    let dir = scratch_dir("organize");
    let mut data = read_ndjson_dir(&generated_store(&dir, 6));
    let trio = json!({"resourceType": "Group", "id": "trio", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/pat-000001"}},
                   {"entity": {"reference": "Patient/pat-000002"}},
                   {"entity": {"reference": "Patient/pat-000004"}}]});
    load_file(&dir, "trio.ndjson", &format!("{trio}\n"));
    data.push(trio);
    // Small files, so every patient's block is cut across several.
    let server = Server::start(&dir, &["--max-file-resources", "120"]);
    let reference = CompartmentReference::load();
    let in_compartment =
        |r: &Value, patient: &str| reference.patients_of(r).iter().any(|p| p == patient);
    let patients = all_patients(&data);

    // Patient level: each patient's block holds its compartment (Provenance by target, which is
    // outside it, is not associated).
    let manifest = server.export("/Patient/$export?organizeOutputBy=Patient");
    assert!(manifest["output"].as_array().unwrap().len() > 6);
    let blocks = read_blocks(&manifest, 120);
    assert!(blocks.continuations > 0, "blocks were cut and continued");
    assert_blocks(&blocks, &data, &patients, in_compartment);

    // System level: the same blocks; what is in no patient's compartment is left out.
    let manifest = server.export("/$export?organizeOutputBy=Patient");
    let blocks = read_blocks(&manifest, 120);
    assert_blocks(&blocks, &data, &patients, in_compartment);
    let listed: BTreeSet<&str> = blocks
        .content
        .values()
        .flatten()
        .map(|(t, _)| t.as_str())
        .collect();
    for outside in ["Practitioner", "Organization", "Location", "ResearchStudy"] {
        assert!(!listed.contains(outside), "{outside} is in no compartment");
    }

    // Group level: the members' blocks only, without the Group itself.
    let members = group_members(&data, "trio");
    let manifest = server.export("/Group/trio/$export?organizeOutputBy=Patient");
    let blocks = read_blocks(&manifest, 120);
    assert_blocks(&blocks, &data, &members, |r, patient| {
        !(r["resourceType"] == "Group" && r["id"] == "trio") && in_compartment(r, patient)
    });

    server
        .kickoff("/Patient/$export?organizeOutputBy=Encounter")
        .assert_outcome(400);
}

/// `meta.lastUpdated`.
fn last_updated(r: &Value) -> &str {
    r["meta"]["lastUpdated"].as_str().unwrap()
}

/// What a Patient or Group export with `_type=Encounter,Provenance` holds: the Encounters of the
/// patients' compartments that `encounter_kept` keeps, the Provenance of the compartments, and
/// the Provenance about those Encounters, with every Provenance itself also passing
/// `provenance_kept` (the window).
fn encounters_and_their_provenance(
    data: &[Value],
    patients: &BTreeSet<String>,
    encounter_kept: impl Fn(&Value) -> bool,
    provenance_kept: impl Fn(&Value) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let reference = CompartmentReference::load();
    let encounters = expected(data, |r| {
        r["resourceType"] == "Encounter"
            && in_compartment_of(&reference, r, patients)
            && encounter_kept(r)
    });
    let exported = references(&encounters);
    let mut want = encounters;
    want.insert(
        "Provenance".into(),
        ids(data, |r| {
            r["resourceType"] == "Provenance"
                && provenance_kept(r)
                && (in_compartment_of(&reference, r, patients)
                    || targets_of(r).iter().any(|t| exported.contains(t)))
        }),
    );
    want
}

#[test]
fn provenance_by_target_follows_the_targets_type_filter_and_since() {
    let (server, data) = setup("provenance-target-rules");
    let by_id = |id: &str| data.iter().find(|r| r["id"] == id).unwrap();
    let members = group_members(&data, "group-0");
    let everyone = all_patients(&data);
    assert!(members.len() < everyone.len());
    // Provenance about an Encounter of a member of group-0 (prov-<patient>-1 is about
    // enc-<patient>-0); the cut and the instant below are chosen among them, so both levels
    // have Provenance on both sides.
    let about_encounter: Vec<&Value> = data
        .iter()
        .filter(|r| r["resourceType"] == "Provenance")
        .filter(|p| targets_of(p)[0].starts_with("Encounter/"))
        .filter(|p| {
            let encounter = by_id(&targets_of(p)[0]["Encounter/".len()..]);
            let patient = &encounter["subject"]["reference"].as_str().unwrap()["Patient/".len()..];
            members.contains(patient)
        })
        .collect();
    let target_of = |p: &Value| by_id(&targets_of(p)[0]["Encounter/".len()..]);
    let start = |e: &Value| e["period"]["start"].as_str().unwrap()[..10].to_string();

    // _typeFilter on Encounter: the Provenance of a filtered-out Encounter stays out.
    let mut starts: Vec<String> = about_encounter
        .iter()
        .map(|p| start(target_of(p)))
        .collect();
    starts.sort();
    let cut = starts[starts.len() / 2].clone();
    assert!(about_encounter.iter().any(|p| start(target_of(p)) < cut));
    assert!(about_encounter.iter().any(|p| start(target_of(p)) >= cut));
    let filter = percent_encode(&format!("Encounter?date=ge{cut}"));
    for (level, patients) in [("/Patient", &everyone), ("/Group/group-0", &members)] {
        let got = exported_ids(&server.export(&format!(
            "{level}/$export?_type=Encounter,Provenance&_typeFilter={filter}"
        )));
        let want = encounters_and_their_provenance(&data, patients, |e| start(e) >= cut, |_| true);
        assert_same_ids(&got, &want, &format!("{level} with _typeFilter"));
    }

    // _since: a Provenance in the window about an Encounter outside it stays out. The instant
    // leaves such a Provenance, and one about an Encounter in the window.
    let since = about_encounter
        .iter()
        .map(|p| last_updated(p).to_string())
        .filter(|s| {
            let in_window = |r: &Value| last_updated(r) > s.as_str();
            about_encounter
                .iter()
                .any(|p| in_window(p) && !in_window(target_of(p)))
                && about_encounter
                    .iter()
                    .any(|p| in_window(p) && in_window(target_of(p)))
        })
        .min()
        .expect("an instant that tells the target's window apart");
    let in_window = |r: &Value| last_updated(r) > since.as_str();
    for (level, patients) in [("/Patient", &everyone), ("/Group/group-0", &members)] {
        let got = exported_ids(&server.export(&format!(
            "{level}/$export?_type=Encounter,Provenance&_since={since}"
        )));
        let want = encounters_and_their_provenance(&data, patients, in_window, in_window);
        assert_same_ids(&got, &want, &format!("{level} with _since={since}"));
    }
}

#[test]
fn provenance_by_target_uses_the_target_at_the_transaction_time() {
    let dir = scratch_dir("provenance-transaction-time");
    let data = read_ndjson_dir(&generated_store(&dir, 10));
    let allergy = |id: &str, criticality: &str| {
        json!({"resourceType": "AllergyIntolerance", "id": id, "criticality": criticality,
            "patient": {"reference": "Patient/pat-000000"}})
    };
    let provenance = |id: &str, target: &str| {
        json!({"resourceType": "Provenance", "id": id, "recorded": "2025-06-01T00:00:00Z",
            "target": [{"reference": format!("AllergyIntolerance/{target}")}],
            "agent": [{"who": {"reference": "Practitioner/prac-0"}}]})
    };
    // Loaded last, these Provenance are the last pages the export reads.
    load_file(
        &dir,
        "before.ndjson",
        &[
            allergy("allergy-pass", "high"),
            allergy("allergy-fail", "low"),
            provenance("prov-about-pass", "allergy-pass"),
            provenance("prov-about-fail", "allergy-fail"),
            provenance("prov-about-late", "allergy-late"),
        ]
        .map(|r| r.to_string())
        .join("\n"),
    );
    // One resource per page, 250 ms each: the export reads for several seconds, longer than the
    // load below takes on a busy machine (at 80 ms an item could end before the poll).
    let server = Server::start(&dir, &["--page-size", "1", "--page-delay-ms", "250"]);
    let path = format!(
        "/Patient/$export?_type=AllergyIntolerance,Provenance&_typeFilter={}",
        percent_encode("AllergyIntolerance?criticality=high")
    );
    let kick = server.kickoff(&path);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let location = kick.header("content-location").unwrap();
    // While it runs: allergy-pass stops passing the filter, allergy-fail starts to, and
    // allergy-late appears.
    load_file(
        &dir,
        "during.ndjson",
        &[
            allergy("allergy-pass", "low"),
            allergy("allergy-fail", "high"),
            allergy("allergy-late", "high"),
        ]
        .map(|r| r.to_string())
        .join("\n"),
    );
    let poll = get(&location);
    assert_eq!(
        poll.status, 202,
        "the export was still running after the writes"
    );
    assert!(
        poll.header("x-progress").unwrap().starts_with("0/"),
        "no item had finished: {:?}",
        poll.header("x-progress")
    );
    let reference = CompartmentReference::load();
    let everyone = all_patients(&data);
    let compartment_provenance = ids(&data, |r| {
        r["resourceType"] == "Provenance" && in_compartment_of(&reference, r, &everyone)
    });
    let want = |allergy: &str, about: &str| {
        let mut provenance = compartment_provenance.clone();
        provenance.push(about.to_string());
        provenance.sort();
        BTreeMap::from([
            ("AllergyIntolerance".to_string(), vec![allergy.to_string()]),
            ("Provenance".to_string(), provenance),
        ])
    };
    // As at the transaction time: allergy-pass (its old version) and its Provenance only.
    let manifest = wait_for_manifest(&location);
    let got = download_all(&manifest);
    assert_eq!(got["AllergyIntolerance"][0]["criticality"], "high");
    assert_same_ids(
        &ids_by_type(&got),
        &want("allergy-pass", "prov-about-pass"),
        "as at the transaction time",
    );
    // A new export sees the new state.
    let got = exported_ids(&server.export(&path));
    let mut now = want("allergy-fail", "prov-about-fail");
    now.get_mut("AllergyIntolerance")
        .unwrap()
        .push("allergy-late".into());
    now.get_mut("Provenance")
        .unwrap()
        .push("prov-about-late".into());
    now.values_mut().for_each(|ids| ids.sort());
    assert_same_ids(&got, &now, "after the writes");
}

/// The partition and sequence of a part's URL (`…/<folder>/<partition>-<seq>.ndjson`), and its
/// folder.
fn part_position(url: &str) -> (String, u32, u32) {
    let mut segments = url.rsplit('/');
    let name = segments.next().unwrap().strip_suffix(".ndjson").unwrap();
    let folder = segments.next().unwrap().to_string();
    let (partition, seq) = name.split_once('-').unwrap();
    (folder, partition.parse().unwrap(), seq.parse().unwrap())
}

/// One organized file as downloaded: its lines, parsed, and its text.
fn organized_file(entry: &Value) -> (Vec<Value>, String) {
    assert!(
        entry.get("type").is_none(),
        "organized entries have no type"
    );
    let url = entry["url"].as_str().unwrap();
    let r = get(url);
    assert_eq!(r.status, 200, "{url}");
    assert!(r.body.ends_with('\n'), "{url}: last line is complete");
    let lines: Vec<Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len() as u64,
        entry["count"].as_u64().unwrap(),
        "{url}"
    );
    (lines, r.body)
}

/// A patient's block: its id, and the `(type, id)` of its resources after the Patient.
type Block = (String, Vec<(String, String)>);

/// Whether a file (its lines and its text) keeps to the export's file limit.
type FileLimit = Box<dyn Fn(&[Value], &str) -> bool>;

/// The patient a block header names, if `line` is one.
fn header_patient(line: &Value) -> Option<String> {
    if line["resourceType"] != "Parameters" {
        return None;
    }
    assert_eq!(line["parameter"].as_array().unwrap().len(), 1, "{line}");
    assert_eq!(line["parameter"][0]["name"], "header", "{line}");
    let reference = line["parameter"][0]["valueReference"]["reference"]
        .as_str()
        .unwrap();
    Some(reference.strip_prefix("Patient/").unwrap().to_string())
}

/// Reads an organized manifest in its order and puts cut blocks back together, checking the
/// Bulk Data IG's `continuesInFile` on the way: a file whose last block goes on names the next
/// file, which starts with the same block's header; a file whose last block is complete names
/// none, and the next file starts a new block (with its Patient). Returns the blocks in order as
/// (patient, its resources as `(type, id)`), and the longest chain of files one block spanned.
fn organized_blocks(
    manifest: &Value,
    fits: impl Fn(&[Value], &str) -> bool,
) -> (Vec<Block>, usize) {
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let entries = manifest["output"].as_array().unwrap();
    let mut blocks: Vec<Block> = Vec::new();
    let (mut chain, mut longest_chain) = (1, 1);
    let mut continues_in: Option<String> = None;
    for entry in entries {
        let url = entry["url"].as_str().unwrap();
        let (lines, text) = organized_file(entry);
        assert!(fits(&lines, &text), "{url} is within the file limit");
        let first = header_patient(&lines[0]).expect("every file starts with a block header");
        match continues_in.take() {
            Some(next) => {
                assert_eq!(next, url, "continuesInFile names the file that follows");
                let (patient, _) = blocks.last().unwrap();
                assert_eq!(
                    &first, patient,
                    "{url} goes on with the block the previous file ended with"
                );
                chain += 1;
                longest_chain = longest_chain.max(chain);
            }
            None => chain = 1,
        }
        let mut patient_line = None;
        for (i, line) in lines.iter().enumerate() {
            if patient_line == Some(i) {
                continue;
            }
            match header_patient(line) {
                Some(patient) if i == 0 && chain > 1 => assert_eq!(patient, first),
                Some(patient) => {
                    // A new block: the header, then the Patient itself.
                    let next = lines
                        .get(i + 1)
                        .unwrap_or_else(|| panic!("{url}: the header of {patient} ends the file"));
                    assert_eq!(next["resourceType"], "Patient", "{url}");
                    assert_eq!(next["id"], patient.as_str(), "{url}");
                    patient_line = Some(i + 1);
                    blocks.push((patient, Vec::new()));
                }
                None => blocks.last_mut().unwrap().1.push((
                    line["resourceType"].as_str().unwrap().to_string(),
                    line["id"].as_str().unwrap().to_string(),
                )),
            }
        }
        continues_in = entry["continuesInFile"].as_str().map(String::from);
    }
    assert!(continues_in.is_none(), "the last file continues nowhere");
    (blocks, longest_chain)
}

/// `organizeOutputBy=Patient` with blocks cut across files, over more than one work item (slice
/// of patients): each patient's block is there once, whole, in one piece across its chain of
/// files, with its resources grouped by type; the manifest lists the files in order (partition,
/// then sequence), so reading them in that order reads the patients in order.
#[test]
fn organized_blocks_cut_across_files_over_several_slices() {
    let dir = scratch_dir("organize-slices");
    let mut data = read_ndjson_dir(&generated_store(&dir, 130));
    // A patient with nothing else: a block of a header and the Patient.
    let lonely = json!({"resourceType": "Patient", "id": "pat-lonely", "gender": "unknown"});
    load_file(&dir, "lonely.ndjson", &format!("{lonely}\n"));
    data.push(lonely);
    let types = [
        "AllergyIntolerance",
        "Condition",
        "Patient",
        "ResearchSubject",
    ];
    let reference = CompartmentReference::load();
    let mut patients: Vec<String> = all_patients(&data).into_iter().collect();
    patients.sort();
    let want: Vec<(String, BTreeMap<String, Vec<String>>)> = patients
        .iter()
        .map(|p| {
            // Besides the Patient itself, which opens the block (another Patient can be in
            // the compartment, through Patient.link).
            let block = expected(&data, |r| {
                let t = r["resourceType"].as_str().unwrap();
                !(t == "Patient" && r["id"] == p.as_str())
                    && types.contains(&t)
                    && reference.patients_of(r).iter().any(|q| q == p)
            });
            (p.clone(), block)
        })
        .collect();
    assert!(
        want.iter()
            .any(|(_, b)| b.values().map(Vec::len).sum::<usize>() >= 12)
    );

    let path = format!(
        "/Patient/$export?organizeOutputBy=Patient&_type={}",
        types.join(",")
    );
    let limits: [(&[&str], FileLimit); 2] = [
        (
            &["--max-file-resources", "6"],
            Box::new(|lines: &[Value], _: &str| lines.len() <= 6),
        ),
        // A file may pass the byte limit only when it holds a header and a single resource.
        (
            &["--max-file-bytes", "2000"],
            Box::new(|lines: &[Value], text: &str| text.len() <= 2000 || lines.len() == 2),
        ),
    ];
    for (limit, fits) in limits {
        let server = Server::start(&dir, limit);
        let manifest = server.export(&path);
        let entries = manifest["output"].as_array().unwrap();

        // Listed in order: partition, then sequence, each partition's files numbered from 0.
        let positions: Vec<(String, u32, u32)> = entries
            .iter()
            .map(|e| part_position(e["url"].as_str().unwrap()))
            .collect();
        let mut sorted = positions.clone();
        sorted.sort();
        assert_eq!(positions, sorted, "{limit:?}: manifest order");
        for pair in positions.windows(2) {
            let ((_, p0, s0), (_, p1, s1)) = (&pair[0], &pair[1]);
            assert!(
                (p1 == p0 && *s1 == s0 + 1) || (p1 > p0 && *s1 == 0),
                "{limit:?}: {pair:?}"
            );
        }
        let partitions: BTreeSet<u32> = positions.iter().map(|(_, p, _)| *p).collect();
        assert!(
            partitions.len() >= 2,
            "{limit:?}: the patients span several work items: {partitions:?}"
        );

        let (blocks, longest_chain) = organized_blocks(&manifest, fits);
        assert!(
            longest_chain >= 3,
            "{limit:?}: a block went on over several files"
        );
        // Every patient once, in order of id, each block whole and grouped by type.
        let got_patients: Vec<&String> = blocks.iter().map(|(p, _)| p).collect();
        assert_eq!(
            got_patients,
            patients.iter().collect::<Vec<_>>(),
            "{limit:?}"
        );
        for ((patient, content), (_, want_block)) in blocks.iter().zip(&want) {
            let mut runs: Vec<&str> = content.iter().map(|(t, _)| t.as_str()).collect();
            runs.dedup();
            let distinct: BTreeSet<&str> = runs.iter().copied().collect();
            assert_eq!(
                runs.len(),
                distinct.len(),
                "{limit:?}: {patient}'s resources are grouped by type: {runs:?}"
            );
            let mut got_block: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (t, id) in content {
                got_block.entry(t.clone()).or_default().push(id.clone());
            }
            assert_same_ids(
                &ids_once(got_block),
                want_block,
                &format!("{limit:?}: block of {patient}"),
            );
        }
    }
}

/// Sorts each type's ids, asserting none is there twice.
fn ids_once(mut by_type: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    for (t, ids) in by_type.iter_mut() {
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!(before, ids.len(), "a {t} is there twice");
    }
    by_type
}

/// The manifest lists a by-type export's files by type, then partition, then sequence (the
/// README's deterministic `<Type>/<partition>-<seq>` names, in order); each type is split only
/// when a file is full, so every file but the last of a type holds `--max-file-resources` lines.
#[test]
fn manifest_lists_files_by_type_then_sequence() {
    let dir = scratch_dir("manifest-order");
    let data = read_ndjson_dir(&generated_store(&dir, 8));
    let server = Server::start(&dir, &["--max-file-resources", "40"]);
    let manifest = server.export("/$export?_type=Observation,Patient,Condition,Encounter");
    let entries = manifest["output"].as_array().unwrap();
    let listed: Vec<(String, String, u32, u32)> = entries
        .iter()
        .map(|e| {
            let (folder, partition, seq) = part_position(e["url"].as_str().unwrap());
            assert_eq!(folder, e["type"].as_str().unwrap());
            (
                e["type"].as_str().unwrap().to_string(),
                folder,
                partition,
                seq,
            )
        })
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "manifest order");
    let types: Vec<&str> = listed.iter().map(|(t, ..)| t.as_str()).collect();
    let mut distinct = types.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        ["Condition", "Encounter", "Observation", "Patient"]
    );
    for (i, entry) in entries.iter().enumerate() {
        let last_of_its_type = listed.get(i + 1).is_none_or(|next| next.0 != listed[i].0);
        let (_, _, _, seq) = &listed[i];
        if i > 0 && listed[i - 1].0 == listed[i].0 {
            assert_eq!(*seq, listed[i - 1].3 + 1, "{entry}");
        } else {
            assert_eq!(*seq, 0, "{entry}");
        }
        if !last_of_its_type {
            assert_eq!(entry["count"], 40, "{entry}");
        }
    }
    let observations = of_type(&data, "Observation").len();
    assert!(observations > 400, "{observations}");
    assert_eq!(
        listed.iter().filter(|(t, ..)| t == "Observation").count(),
        observations.div_ceil(40)
    );
    assert_eq!(
        exported_ids(&manifest),
        expected(
            &data,
            of_types(&["Observation", "Patient", "Condition", "Encounter"])
        )
    );
}
