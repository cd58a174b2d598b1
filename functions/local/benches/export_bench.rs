//! Export benchmark: generates synthetic data into SQLite, then runs system-, Patient- and
//! Group-level (a 10-patient Group) exports through the real engine and adapters, printing
//! resources/s, MB/s and peak RSS.
//!
//! `cargo bench -p bulk-export` runs 10k, 100k and 1M resources (set `BENCH_SIZES=10000,100000`
//! to choose). Under `cargo test` it runs one tiny size as a smoke check. Generated stores are kept
//! in `target/bench-data` and reused.

use bulk_export_local::files::FileOutput;
use bulk_export_local::sqlite::SqliteStore;
use export_core::engine::Ports;
use export_core::fhir::time::now_millis;
use export_core::generate::generate;
use export_core::load::prepare;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::JobStore;
use export_core::{Exporter, Settings, runner};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Resources the generator makes per patient (about).
const PER_PATIENT: usize = 294;

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        Err(_) if benchmarking => vec![10_000, 100_000, 1_000_000],
        Err(_) => vec![3_000],
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-data");
    std::fs::create_dir_all(&root).expect("bench dir");
    let runtime = bulk_export_local::runtime::build().expect("runtime");
    println!(
        "{:<10} {:>10} {:>9} {:>10} {:>9} {:>8} {:>12}",
        "level", "resources", "seconds", "res/s", "MB/s", "files", "peak RSS MB"
    );
    for size in sizes {
        let patients = size.div_ceil(PER_PATIENT).max(1);
        let db = root.join(format!("store-{patients}.db"));
        let store = ensure_store(&db, patients);
        for level in [
            ExportLevel::System,
            ExportLevel::Patient,
            ExportLevel::Group("group-0".into()),
        ] {
            let out = root.join("out");
            let _ = std::fs::remove_dir_all(&out);
            let stats = runtime.block_on(run_export(store.clone(), &out, level.clone()));
            println!(
                "{:<10} {:>10} {:>9.2} {:>10.0} {:>9.1} {:>8} {:>12.1}",
                match level {
                    ExportLevel::System => "system",
                    ExportLevel::Patient => "patient",
                    ExportLevel::Group(_) => "group(10)",
                },
                stats.resources,
                stats.seconds,
                stats.resources as f64 / stats.seconds,
                stats.bytes as f64 / 1e6 / stats.seconds,
                stats.files,
                stats.peak_rss_kb as f64 / 1024.0
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
}

/// Opens the store for `patients` generated patients, generating it first if needed.
fn ensure_store(db: &Path, patients: usize) -> SqliteStore {
    let ready = db.with_extension("ready");
    if !ready.exists() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let store = SqliteStore::open(db).expect("open store");
        let started = Instant::now();
        let now = now_millis();
        let mut batch = Vec::new();
        generate(patients, 42, &mut |_, r| {
            batch.push(prepare(r, now).expect("generated data is valid"));
            if batch.len() >= 10_000 {
                store
                    .put_resources_blocking(std::mem::take(&mut batch))
                    .expect("load");
            }
        });
        store.put_resources_blocking(batch).expect("load");
        eprintln!(
            "(generated {patients} patients into {} in {:.1}s)",
            db.display(),
            started.elapsed().as_secs_f64()
        );
        std::fs::write(&ready, "").expect("marker");
    }
    SqliteStore::open(db).expect("open store")
}

struct Stats {
    resources: u64,
    bytes: u64,
    files: usize,
    seconds: f64,
    peak_rss_kb: u64,
}

async fn run_export(store: SqliteStore, out: &Path, level: ExportLevel) -> Stats {
    let store = Arc::new(store);
    let output = Arc::new(FileOutput::new(out).expect("output dir"));
    let ports = Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let exporter = Arc::new(Exporter::new(ports, Settings::default()));
    reset_peak_rss();
    let started = Instant::now();
    let job = exporter
        .kickoff(level, ExportParams::default(), "bench".into())
        .await
        .expect("kick-off");
    runner::run_job(exporter.clone(), job.id.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kb = peak_rss_kb();
    let parts = store.parts(&job.id).await.expect("parts");
    let done = store.get(&job.id).await.expect("job").expect("job exists");
    assert_eq!(
        done.status,
        export_core::job::JobStatus::Completed,
        "{:?}",
        done.error
    );
    Stats {
        resources: parts.iter().map(|p| p.count).sum(),
        bytes: parts.iter().map(|p| p.bytes).sum(),
        files: parts.len(),
        seconds,
        peak_rss_kb,
    }
}

/// Resets the kernel's peak-RSS counter for this process (Linux), so each export is measured alone.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size (VmHWM) in KiB, or 0 where /proc is not available.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}
