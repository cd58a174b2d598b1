//! A worker near its deadline stops between pages, even inside a selective `_typeFilter` that keeps
//! a file open for long; and wherever it stops, the files it writes are the ones a run without a
//! deadline writes, byte for byte.

use bulk_export_local::files::FileOutput;
use bulk_export_local::sqlite::SqliteStore;
use export_core::engine::{ItemOutcome, Ports};
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, KickoffHeaders, KickoffMethod, parse_kickoff};
use export_core::ports::JobStore;
use export_core::{Exporter, Settings};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bulk-export-deadline-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs every item of a system export with the parameters `query`, each invocation with `deadline` (a fresh one per
/// call), until all are done; returns the files (key → bytes) and the number of invocations that
/// stopped early.
async fn export(
    name: &str,
    query: &[(&str, &str)],
    settings: Settings,
    deadline: impl Fn() -> Option<Instant>,
) -> (BTreeMap<String, String>, usize) {
    let dir = temp_dir(name);
    let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
    let now = now_millis();
    let mut resources = Vec::new();
    export_core::generate::generate(8, 5, &mut |_, r| {
        resources.push(export_core::load::prepare(r, now).unwrap())
    });
    store.put_resources_blocking(resources).unwrap();
    let output = Arc::new(FileOutput::new(&dir.join("out")).unwrap());
    let ports = Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let exporter = Exporter::new(ports, settings);
    let query: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let params = parse_kickoff(
        &ExportLevel::System,
        KickoffMethod::Get,
        &query,
        None,
        &KickoffHeaders::default(),
        now_millis(),
    )
    .unwrap();
    let job = exporter
        .kickoff(ExportLevel::System, params, "test".into())
        .await
        .unwrap();
    let mut early = 0;
    for item in exporter.plan(&job.id).await.unwrap() {
        let mut resume = None;
        loop {
            match exporter
                .export_item(&item, resume.take(), deadline())
                .await
                .unwrap()
            {
                ItemOutcome::Done => break,
                ItemOutcome::Continue(cursor) => {
                    early += 1;
                    resume = Some(cursor);
                }
                ItemOutcome::Stopped => panic!("the job stopped"),
            }
        }
    }
    let mut files = BTreeMap::new();
    for part in store.parts(&job.id).await.unwrap() {
        let text = std::fs::read_to_string(dir.join("out").join(&part.key)).unwrap();
        files.insert(part.key.trim_start_matches(&job.id).to_string(), text);
    }
    std::fs::remove_dir_all(&dir).ok();
    (files, early)
}

#[tokio::test]
async fn a_selective_filter_stops_between_pages_and_writes_the_same_files() {
    // One Observation code in eight is kept: with no file limit in reach, a file stays open for
    // the whole type unless reading ends it. Pages of four rows are shorter than the usual gap
    // between kept ones, so whatever order the store reads in, some page ends with no file open.
    let query = &[
        ("_type", "Observation"),
        ("_typeFilter", "Observation?code=8867-4"),
    ];
    let settings = Settings {
        page_size: 4,
        part_scan_limit: 60,
        ..Settings::default()
    };
    let (unhurried, stops) = export("unhurried", query, settings.clone(), || None).await;
    assert_eq!(stops, 0);
    let kept: usize = unhurried.values().map(|t| t.lines().count()).sum();
    assert!(kept > 10, "the filter keeps some Observations: {kept}");
    assert!(
        unhurried.len() > 2,
        "reading 60 resources ends a file: {} files",
        unhurried.len()
    );
    // Every invocation is already past its deadline: each stops at its first chance.
    let (hurried, stops) = export("hurried", query, settings, || Some(Instant::now())).await;
    assert!(
        stops > unhurried.len(),
        "{stops} early stops for {} files: the worker stops between pages too",
        unhurried.len()
    );
    assert_eq!(hurried, unhurried, "the same files, byte for byte");
}

#[tokio::test]
async fn organized_blocks_stop_between_pages_and_write_the_same_files() {
    let query = &[
        ("_type", "Observation"),
        ("_typeFilter", "Observation?code=8867-4"),
        ("organizeOutputBy", "Patient"),
    ];
    let settings = Settings {
        page_size: 10,
        part_scan_limit: 30,
        ..Settings::default()
    };
    let (unhurried, stops) = export("organized-unhurried", query, settings.clone(), || None).await;
    assert_eq!(stops, 0);
    assert!(unhurried.len() > 2, "{} files", unhurried.len());
    let (hurried, stops) = export(
        "organized-hurried",
        query,
        settings,
        || Some(Instant::now()),
    )
    .await;
    assert!(
        stops > unhurried.len(),
        "{stops} early stops for {} files",
        unhurried.len()
    );
    assert_eq!(hurried, unhurried, "the same files, byte for byte");
}
