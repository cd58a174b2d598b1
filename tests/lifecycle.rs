//! The life of an export: one at a time, cancel, delete, restart mid-run, retention, and the
//! transaction time that keeps later writes out.

use e2e_tests::*;
use serde_json::Value;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Flags that make an export take a few seconds, so tests can act while it runs.
const SLOW: [&str; 4] = ["--page-size", "50", "--page-delay-ms", "40"];

fn status_path(location: &str) -> String {
    location[location.find("/$export-status/").expect("status url")..].to_string()
}

fn job_id(location: &str) -> String {
    location.rsplit('/').next().unwrap().to_string()
}

/// Polls until the export reports at least one finished work item.
fn wait_for_progress(server: &Server, location: &str) {
    let started = Instant::now();
    loop {
        let r = get(&server.url(&status_path(location)));
        assert_eq!(
            r.status, 202,
            "export finished too early to test mid-run behaviour: {}",
            r.body
        );
        let progress = r.header("x-progress").unwrap();
        if !progress.starts_with("0/") && !progress.starts_with("planning") {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[test]
fn simultaneous_kickoffs_get_exactly_one_202() {
    let dir = scratch_dir("concurrency");
    generated_store(&dir, 6);
    let server = Arc::new(Server::start(&dir, &SLOW));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (server, barrier) = (server.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // Eight different clients: only one of them gets the lock.
                let path = ["/$export", "/Patient/$export", "/Group/group-0/$export"][i % 3];
                let token = format!("Bearer client-{i}");
                let mut headers = KICKOFF_HEADERS.to_vec();
                headers.push(("Authorization", &token));
                request("GET", &server.url(path), &headers, None)
            })
        })
        .collect();
    let responses: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let accepted: Vec<&Response> = responses.iter().filter(|r| r.status == 202).collect();
    assert_eq!(accepted.len(), 1, "{responses:#?}");
    for busy in responses.iter().filter(|r| r.status != 202) {
        busy.assert_outcome(429);
        assert!(busy.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
    }
    // The lock is freed when the export completes.
    wait_for_manifest(&accepted[0].header("content-location").unwrap());
    assert_eq!(server.kickoff("/$export?_type=Patient").status, 202);
}

#[test]
fn cancel_stops_the_export_deletes_files_and_frees_the_lock() {
    let dir = scratch_dir("cancel");
    generated_store(&dir, 20);
    let server = Server::start(&dir, &SLOW);
    let kick = server.kickoff("/$export");
    assert_eq!(kick.status, 202);
    let location = kick.header("content-location").unwrap();
    wait_for_progress(&server, &location);
    assert_eq!(server.kickoff("/$export?_type=Patient").status, 429);

    let cancel = request("DELETE", &location, &[], None);
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    get(&location).assert_outcome(404);
    request("DELETE", &location, &[], None).assert_outcome(404);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        files_under(&server.exports_dir().join(job_id(&location))).is_empty(),
        "cancelled files are deleted"
    );

    // Lock free: the next export runs to completion; then DELETE removes a completed export too.
    let manifest = server.export("/$export?_type=Patient,Condition");
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(get(&url).status, 200);
    let location = server.url(&format!(
        "/$export-status/{}",
        url.split('/').rev().nth(2).unwrap()
    ));
    assert_eq!(request("DELETE", &location, &[], None).status, 202);
    get(&location).assert_outcome(404);
    get(&url).assert_outcome(404);
    assert!(files_under(&server.exports_dir().join(job_id(&location))).is_empty());
}

#[test]
fn an_export_interrupted_by_a_crash_completes_after_restart() {
    let dir = scratch_dir("restart");
    let data = read_ndjson_dir(&generated_store(&dir, 20));
    let mut server = Server::start(&dir, &SLOW);
    let kick = server.kickoff("/$export");
    let location = kick.header("content-location").unwrap();
    wait_for_progress(&server, &location);

    server.crash_and_restart();
    let manifest = wait_for_manifest(&server.url(&status_path(&location)));
    let exported = ids_by_type(&download_all(&manifest));
    let total: usize = exported.values().map(Vec::len).sum();
    assert_eq!(
        total,
        data.len(),
        "every resource exactly once after the restart"
    );
    assert!(
        !files_under(&server.exports_dir())
            .iter()
            .any(|f| f.ends_with(".partial")),
        "no partial file is left behind"
    );
    assert!(
        manifest["output"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&server.base),
        "urls use the restarted server"
    );
    assert_eq!(
        server.kickoff("/$export?_type=Patient").status,
        202,
        "the lock was released"
    );
}

#[test]
fn completed_exports_expire_after_retention() {
    let dir = scratch_dir("retention");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &["--retention-secs", "1"]);
    let kick = server.kickoff("/Patient/$export");
    let location = kick.header("content-location").unwrap();
    let manifest = wait_for_manifest(&location);
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    get(&location).assert_outcome(404);
    get(&url).assert_outcome(404);
    assert!(files_under(&server.exports_dir().join(job_id(&location))).is_empty());
}

#[test]
fn writes_during_an_export_do_not_leak_into_it() {
    let dir = scratch_dir("isolation");
    let data = read_ndjson_dir(&generated_store(&dir, 10));
    let server = Server::start(&dir, &SLOW);
    let kick = server.kickoff("/$export?_type=Observation");
    let location = kick.header("content-location").unwrap();

    let original = data
        .iter()
        .find(|r| r["id"] == "obs-pat-000000-0")
        .unwrap()
        .clone();
    let mut changed = original.clone();
    changed["status"] = Value::from("amended");
    changed["meta"]
        .as_object_mut()
        .unwrap()
        .remove("lastUpdated");
    let mut added = original.clone();
    added["id"] = Value::from("obs-added-later");
    added["meta"].as_object_mut().unwrap().remove("lastUpdated");
    let file = dir.join("later.ndjson");
    std::fs::write(&file, format!("{changed}\n{added}\n")).unwrap();
    run_cli(&[
        "load",
        "--db",
        dir.join("store.db").to_str().unwrap(),
        file.to_str().unwrap(),
    ]);

    let exported = download_all(&wait_for_manifest(&location));
    let observations = &exported["Observation"];
    assert_eq!(observations.len(), 10 * 150);
    assert!(!observations.iter().any(|o| o["id"] == "obs-added-later"));
    let seen = observations
        .iter()
        .find(|o| o["id"] == "obs-pat-000000-0")
        .unwrap();
    assert_eq!(seen["status"], "final");
    assert_eq!(seen["meta"]["versionId"], "1");

    // The next export sees the new state: the latest version only, and the added resource.
    let exported = download_all(&server.export("/$export?_type=Observation"));
    let observations = &exported["Observation"];
    assert_eq!(observations.len(), 10 * 150 + 1);
    let seen: Vec<&Value> = observations
        .iter()
        .filter(|o| o["id"] == "obs-pat-000000-0")
        .collect();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["status"], "amended");
    assert_eq!(seen[0]["meta"]["versionId"], "2");
}

#[test]
fn the_same_client_repeating_a_kickoff_is_sent_to_its_running_export() {
    let dir = scratch_dir("repeat");
    generated_store(&dir, 20);
    let server = Server::start(&dir, &SLOW);
    let as_client = |client: &str, path: &str| {
        let token = format!("Bearer {client}");
        let mut headers = KICKOFF_HEADERS.to_vec();
        headers.push(("Authorization", &token));
        request("GET", &server.url(path), &headers, None)
    };
    let first = as_client("alice", "/$export?_type=Patient,Observation");
    assert_eq!(first.status, 202, "{}", first.body);
    let location = first.header("content-location").unwrap();
    let again = as_client("alice", "/$export?_type=Patient,Observation");
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.header("content-location").unwrap(), location);
    // A different request, or the same request from another client, is still refused.
    as_client("alice", "/$export?_type=Patient").assert_outcome(429);
    as_client("bob", "/$export?_type=Patient,Observation").assert_outcome(429);
    server
        .kickoff("/$export?_type=Patient,Observation")
        .assert_outcome(429);
    let manifest = wait_for_manifest(&location);
    assert!(!manifest["output"].as_array().unwrap().is_empty());
    // Once it has finished, the same kick-off starts a new export.
    let after = as_client("alice", "/$export?_type=Patient,Observation");
    assert_eq!(after.status, 202);
    assert_ne!(after.header("content-location").unwrap(), location);
}
