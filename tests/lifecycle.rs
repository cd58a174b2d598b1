//! The life of an export: one at a time, cancel, delete, restart mid-run, retention, and the
//! transaction time that keeps later writes out.

use e2e_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

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

/// Every file under `dir` (none when `dir` is missing).
fn files_under(dir: &Path) -> Vec<String> {
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
    out.sort();
    out
}

/// The files under `dir`, asserting the folder exists and holds some: what a later "the files are
/// gone" check compares with.
fn existing_files(dir: &Path) -> Vec<String> {
    assert!(dir.is_dir(), "{} is missing", dir.display());
    let files = files_under(dir);
    assert!(!files.is_empty(), "{} holds no files", dir.display());
    files
}

/// A finished file as found on disk: its bytes and its identity (inode and modification time),
/// which change when the file is written again even with the same bytes.
#[derive(Debug, PartialEq)]
struct OnDisk {
    bytes: Vec<u8>,
    inode: u64,
    modified: SystemTime,
}

/// The finished files of a job folder (not `*.partial`), by path relative to the folder.
fn snapshot(dir: &Path) -> BTreeMap<String, OnDisk> {
    files_under(dir)
        .into_iter()
        .filter(|f| !f.ends_with(".partial"))
        .map(|f| {
            let path = Path::new(&f);
            let meta = std::fs::metadata(path).unwrap();
            let relative = path.strip_prefix(dir).unwrap().display().to_string();
            let on_disk = OnDisk {
                bytes: std::fs::read(path).unwrap(),
                inode: inode(&meta),
                modified: meta.modified().unwrap(),
            };
            (relative, on_disk)
        })
        .collect()
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// The finished work items an X-Progress value reports (`3/19 work items done, …`).
fn items_done(progress: &str) -> usize {
    if progress.starts_with("planning") {
        return 0;
    }
    progress
        .split('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected X-Progress {progress:?}"))
}

/// The files of a manifest by name (`Type/partition-seq.ndjson`, without the job id), with their
/// downloaded bytes.
fn downloaded_files(manifest: &Value) -> BTreeMap<String, String> {
    manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let url = entry["url"].as_str().unwrap();
            let name: Vec<&str> = url.rsplit('/').take(2).collect();
            let r = get(url);
            assert_eq!(r.status, 200, "{url}");
            (format!("{}/{}", name[1], name[0]), r.body)
        })
        .collect()
}

#[test]
fn simultaneous_kickoffs_get_exactly_one_202() {
    let dir = scratch_dir("concurrency");
    generated_store(&dir, 6);
    let server = Arc::new(Server::start(&dir, &SLOW));
    // Eight different clients, each with its own access token.
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..8)
            .map(|i| server.client_token(&format!("client-{i}"), "system/*.read"))
            .collect(),
    );
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (server, barrier, tokens) = (server.clone(), barrier.clone(), tokens.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // Eight different clients: only one of them gets the lock.
                let path = ["/$export", "/Patient/$export", "/Group/group-0/$export"][i % 3];
                let token = format!("Bearer {}", tokens[i]);
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
    let cancelled_dir = server.exports_dir().join(job_id(&location));
    wait_for_progress(&server, &location);
    existing_files(&cancelled_dir);
    assert_eq!(server.kickoff("/$export?_type=Patient").status, 429);

    let cancel = request("DELETE", &location, &[], None);
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    get(&location).assert_outcome(404);
    request("DELETE", &location, &[], None).assert_outcome(404);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        files_under(&cancelled_dir),
        Vec::<String>::new(),
        "cancelled files are deleted"
    );

    // Lock free: the next export runs to completion; then DELETE removes a completed export too.
    let manifest = server.export("/$export?_type=Patient,Condition");
    // Workers of the cancelled export stopped: none wrote a file late.
    assert_eq!(
        files_under(&cancelled_dir),
        Vec::<String>::new(),
        "a worker of the cancelled export wrote after the cancel"
    );
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(get(&url).status, 200);
    let location = server.url(&format!(
        "/$export-status/{}",
        url.split('/').rev().nth(2).unwrap()
    ));
    let completed_dir = server.exports_dir().join(job_id(&location));
    existing_files(&completed_dir);
    assert_eq!(request("DELETE", &location, &[], None).status, 202);
    get(&location).assert_outcome(404);
    get(&url).assert_outcome(404);
    assert_eq!(files_under(&completed_dir), Vec::<String>::new());
}

#[test]
fn an_export_interrupted_by_a_crash_completes_after_restart() {
    let dir = scratch_dir("restart");
    let data = read_ndjson_dir(&generated_store(&dir, 20));
    let mut server = Server::start(&dir, &SLOW);
    let kick = server.kickoff("/$export");
    let location = kick.header("content-location").unwrap();
    let job_dir = server.exports_dir().join(job_id(&location));
    wait_for_progress(&server, &location);
    let poll = get(&location);
    assert_eq!(poll.status, 202, "still running before the crash");
    let done = items_done(&poll.header("x-progress").unwrap());
    assert!(done >= 1);

    server.crash();
    // What the crashed process left: at least the files of the `done` items it reported.
    let before = snapshot(&job_dir);
    assert!(
        before.len() >= done,
        "{done} items were done, yet only {before:?}"
    );
    server.restart();
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

    // Finished items were kept, not redone: the files of the `done` items are the very files
    // written before the crash (same inode and modification time). Any file that was redone (an
    // item that was still running, having renamed its file but not yet been recorded done) kept
    // its name and bytes.
    let after = snapshot(&job_dir);
    let mut kept = 0;
    for (name, old) in &before {
        let new = after
            .get(name)
            .unwrap_or_else(|| panic!("{name}, finished before the crash, is gone"));
        assert!(new.bytes == old.bytes, "{name} changed its bytes");
        if new == old {
            kept += 1;
        }
    }
    assert!(
        kept >= done,
        "only {kept} of the {} files finished before the crash were kept ({done} items were done)",
        before.len()
    );
    let files = downloaded_files(&manifest);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the manifest lists exactly the files on disk"
    );

    // The lock was released, and the same export without a crash writes the same file names
    // with the same bytes.
    let uninterrupted = server.export("/$export");
    assert_eq!(downloaded_files(&uninterrupted), files);
}

/// Polls an export to completion, returning the manifest, the Expires header as a time, and the
/// window in which the export completed: after the last poll that saw it running was sent, and
/// before the first poll that saw it completed was answered.
fn poll_to_completion(
    location: &str,
    kicked_off: SystemTime,
) -> (Value, SystemTime, SystemTime, SystemTime) {
    let mut running_at = kicked_off;
    loop {
        let sent = SystemTime::now();
        let r = get(location);
        match r.status {
            202 => running_at = sent,
            200 => {
                let answered = SystemTime::now();
                let expires = r.header("expires").expect("a completed status has Expires");
                let expires = chrono::DateTime::parse_from_rfc2822(&expires)
                    .unwrap_or_else(|e| panic!("Expires {expires:?} is not an HTTP date: {e}"));
                let expires =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(expires.timestamp() as u64);
                return (r.json(), expires, running_at, answered);
            }
            other => panic!("status {other}: {}", r.body),
        }
        assert!(kicked_off.elapsed().unwrap() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whole seconds since the epoch (an HTTP date's precision).
fn seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// Waits until `t` has passed.
fn sleep_until(t: SystemTime) {
    if let Ok(left) = t.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
}

#[test]
fn completed_exports_expire_after_retention() {
    const RETENTION: u64 = 1;
    let dir = scratch_dir("retention");
    generated_store(&dir, 2);
    let server = Server::start(&dir, &["--retention-secs", &RETENTION.to_string()]);
    let kicked_off = SystemTime::now();
    let kick = server.kickoff("/Patient/$export");
    let location = kick.header("content-location").unwrap();
    let (manifest, expires, running_at, completed_by) = poll_to_completion(&location, kicked_off);

    // Expires is the completion time plus the retention, to the second.
    let retention = Duration::from_secs(RETENTION);
    assert!(
        seconds(expires) >= seconds(running_at + retention)
            && seconds(expires) <= seconds(completed_by + retention),
        "Expires {} is not completion + {RETENTION} s (completed between {} and {})",
        seconds(expires),
        seconds(running_at),
        seconds(completed_by)
    );

    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let job_dir = server.exports_dir().join(job_id(&location));
    existing_files(&job_dir);
    // Expires has a second's precision: the export ends within the second after it.
    sleep_until(expires + Duration::from_millis(1100));
    get(&location).assert_outcome(404);
    get(&url).assert_outcome(404);
    assert_eq!(files_under(&job_dir), Vec::<String>::new());
}

/// Waits (without any request to the server) until `dir` holds no files.
fn wait_until_empty(dir: &Path, within: Duration) -> Duration {
    let started = Instant::now();
    while !files_under(dir).is_empty() {
        assert!(
            started.elapsed() < within,
            "{} still holds {:?} after {within:?}",
            dir.display(),
            files_under(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn expired_exports_are_swept_without_a_poll() {
    let dir = scratch_dir("sweep");
    generated_store(&dir, 2);
    let mut server = Server::start(&dir, &["--retention-secs", "1"]);
    let kicked_off = SystemTime::now();
    let kick = server.kickoff("/Patient/$export");
    let location = kick.header("content-location").unwrap();
    let (manifest, expires, _, _) = poll_to_completion(&location, kicked_off);
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let job_dir = server.exports_dir().join(job_id(&location));
    existing_files(&job_dir);

    // The server sweeps when it starts and then every 30 s. Stop it while the export is live,
    // and start it again once the retention is over: no request reaches it until its own sweep
    // has deleted the files.
    server.crash();
    sleep_until(expires + Duration::from_millis(1100));
    existing_files(&job_dir);
    server.restart();
    wait_until_empty(&job_dir, Duration::from_secs(10));
    get(&server.url(&status_path(&location))).assert_outcome(404);
    get(&server.url(&url[url.find("/$export-output/").unwrap()..])).assert_outcome(404);
}

/// The periodic sweep of a server that keeps running (every 30 s by default; every second here).
#[test]
fn a_running_server_sweeps_expired_exports() {
    let dir = scratch_dir("sweep-periodic");
    generated_store(&dir, 2);
    // The periodic sweep (not the one at start) must delete the files: every second here.
    let server = Server::start(&dir, &["--retention-secs", "1", "--expiry-sweep-secs", "1"]);
    let kicked_off = SystemTime::now();
    let kick = server.kickoff("/Patient/$export");
    let location = kick.header("content-location").unwrap();
    poll_to_completion(&location, kicked_off);
    let job_dir = server.exports_dir().join(job_id(&location));
    existing_files(&job_dir);
    wait_until_empty(&job_dir, Duration::from_secs(10));
    get(&location).assert_outcome(404);
}

#[test]
fn writes_during_an_export_do_not_leak_into_it() {
    let dir = scratch_dir("isolation");
    let data = read_ndjson_dir(&generated_store(&dir, 10));
    // One work item (Observation) of 30 pages, 100 ms each: it runs for 3 s.
    let server = Server::start(&dir, &["--page-size", "50", "--page-delay-ms", "100"]);
    let kick = server.kickoff("/$export?_type=Observation");
    let location = kick.header("content-location").unwrap();
    // The export is running before the write and, its only item not done, still after it: the
    // write lands while the export reads.
    let still_reading = |when: &str| {
        let r = get(&location);
        assert_eq!(r.status, 202, "{when} the write the export had finished");
        let progress = r.header("x-progress").unwrap();
        assert_eq!(items_done(&progress), 0, "{when} the write: {progress}");
    };
    still_reading("before");

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
    still_reading("after");

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
    let tokens: std::collections::BTreeMap<&str, String> = ["alice", "bob"]
        .into_iter()
        .map(|c| (c, server.client_token(c, "system/*.read")))
        .collect();
    let as_client = |client: &str, path: &str| {
        let token = format!("Bearer {}", tokens[client]);
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
