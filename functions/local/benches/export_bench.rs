//! Export benchmark: generates synthetic data into SQLite, then runs system-, Patient- and
//! Group-level (a 10-patient Group) exports through the real engine and adapters, printing
//! resources/s, MB/s and peak RSS. Then the cost of the optional features: Observation alone,
//! with a `_typeFilter`, with `_elements`, a Patient export `organizeOutputBy=Patient`, and the
//! gzip that compressed downloads (and S3 objects) go through.
//!
//! `cargo bench -p bulk-export` runs 10k, 100k and 1M resources (set `BENCH_SIZES=10000,100000`
//! to choose, and `BENCH_CASES=system,group(10)` to run only some cases). Each case, like each
//! floor, is the best of `BENCH_RUNS` runs (3; peak RSS is the largest of them), so a busy moment
//! of the machine does not decide a ratio; "cpu s" is the process's user+system time of that run
//! (up to twice "seconds" on two cores). Under `cargo test` it runs one tiny size as a smoke check. Generated stores are kept
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

#[path = "support/process.rs"]
mod process;
use process::{cpu_seconds, peak_rss_kb, reset_peak_rss};

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
    // Where the exports and floors write (BENCH_OUT; the stores' directory unless set).
    let written = std::env::var("BENCH_OUT").map_or(root.clone(), PathBuf::from);
    std::fs::create_dir_all(&written).expect("output dir");
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if benchmarking { 3 } else { 1 })
        .max(1);
    let runtime = bulk_export_local::runtime::build().expect("runtime");
    println!(
        "{:<10} {:>10} {:>9} {:>7} {:>10} {:>9} {:>8} {:>12} {:>8}",
        "level",
        "resources",
        "seconds",
        "cpu s",
        "res/s",
        "MB/s",
        "files",
        "peak RSS MB",
        "x floor"
    );
    for size in sizes {
        let patients = size.div_ceil(PER_PATIENT).max(1);
        let db = root.join(format!("store-{patients}.db"));
        let store = ensure_store(&db, patients);
        let observations = || ExportParams {
            types: Some(vec!["Observation".into()]),
            ..ExportParams::default()
        };
        let cases = [
            ("system", ExportLevel::System, ExportParams::default()),
            ("patient", ExportLevel::Patient, ExportParams::default()),
            (
                "group(10)",
                ExportLevel::Group("group-0".into()),
                ExportParams::default(),
            ),
            ("obs", ExportLevel::System, observations()),
            (
                "obs+filter",
                ExportLevel::System,
                ExportParams {
                    type_filters: vec![
                        "Observation?code=http://loinc.org|8867-4,2339-0&date=ge2022".into(),
                    ],
                    ..observations()
                },
            ),
            (
                "obs+elems",
                ExportLevel::System,
                ExportParams {
                    elements: vec!["Observation.value,Observation.subject".into()],
                    ..observations()
                },
            ),
            (
                "by-patient",
                ExportLevel::Patient,
                ExportParams {
                    organize_by: Some("Patient".into()),
                    ..ExportParams::default()
                },
            ),
        ];
        let chosen = std::env::var("BENCH_CASES").ok();
        // BENCH_FLOOR=0 skips the floors (to profile the exports alone).
        let floors = std::env::var("BENCH_FLOOR").map_or(true, |f| f != "0");
        let wanted = |name: &str| {
            chosen
                .as_ref()
                .is_none_or(|c| c.split(',').any(|c| c == name))
        };
        // The floors: every stored body read from the same file and written to one file, on one
        // core, as `sqlite3 store.db "select body from resources" > out.ndjson` does (measured
        // only when a case is compared with them).
        let everything = match floors && ["system", "patient", "by-patient"].into_iter().any(wanted)
        {
            true => floor(&db, "SELECT body FROM resources", &written, runs),
            false => f64::NAN,
        };
        let observations_floor = match floors && ["obs", "obs+filter", "obs+elems"].into_iter().any(wanted) {
            true => floor(
                &db,
                "SELECT body FROM resources WHERE type = 'Observation'",
                &written,
                runs,
            )
            .min(floor(
                &db,
                "SELECT body FROM resources WHERE rid >= (SELECT num << 40 FROM resource_types WHERE type = 'Observation') \
                 AND rid < (SELECT (num + 1) << 40 FROM resource_types WHERE type = 'Observation')",
                &written,
                runs,
            )),
            false => f64::NAN,
        };
        println!(
            "(floor: all bodies {everything:.2}s, Observation bodies {observations_floor:.2}s)"
        );
        for (name, level, params) in cases {
            if !wanted(name) {
                continue;
            }
            let out = written.join("out");
            let mut best: Option<Stats> = None;
            let mut peak_rss_kb = 0;
            for _ in 0..runs {
                let _ = std::fs::remove_dir_all(&out);
                let stats = runtime.block_on(run_export(
                    store.clone(),
                    &out,
                    level.clone(),
                    params.clone(),
                ));
                peak_rss_kb = peak_rss_kb.max(stats.peak_rss_kb);
                if best.as_ref().is_none_or(|b| stats.seconds < b.seconds) {
                    best = Some(stats);
                }
            }
            let stats = best.expect("at least one run");
            if name == "system" {
                gzip_cost(&out);
            }
            let floor = match name {
                "system" | "patient" | "by-patient" => Some(everything),
                "obs" | "obs+filter" | "obs+elems" => Some(observations_floor),
                _ => None,
            };
            let ratio = floor.map_or("-".to_string(), |f| format!("{:.2}", stats.seconds / f));
            println!(
                "{:<10} {:>10} {:>9.2} {:>7.2} {:>10.0} {:>9.1} {:>8} {:>12.1} {:>8}",
                name,
                stats.resources,
                stats.seconds,
                stats.cpu_seconds,
                stats.resources as f64 / stats.seconds,
                stats.bytes as f64 / 1e6 / stats.seconds,
                stats.files,
                peak_rss_kb as f64 / 1024.0,
                ratio
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

/// Seconds to run `sql` (one text column) and write every value as a line of one file: the
/// floor an export of the same rows is measured against (the best of `runs` runs).
fn floor(db: &Path, sql: &str, root: &Path, runs: usize) -> f64 {
    use std::io::Write;
    let conn = rusqlite::Connection::open(db).expect("open store");
    conn.execute_batch("PRAGMA cache_size=-8192;")
        .expect("pragma");
    let path = root.join("floor.ndjson");
    let mut best = f64::MAX;
    for _ in 0..runs {
        let started = Instant::now();
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&path).expect("floor file"),
        );
        let mut stmt = conn.prepare(sql).expect("floor query");
        let mut rows = stmt.query([]).expect("floor query");
        while let Some(row) = rows.next().expect("row") {
            out.write_all(row.get_ref(0).expect("body").as_bytes().expect("text"))
                .expect("write");
            out.write_all(b"\n").expect("write");
        }
        out.flush().expect("flush");
        best = best.min(started.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&path);
    best
}

struct Stats {
    resources: u64,
    bytes: u64,
    files: usize,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_kb: u64,
}

/// Compresses every file of an export the way downloads and S3 objects are (gzip, fast level)
/// and prints the throughput and the ratio.
fn gzip_cost(out: &Path) {
    use std::io::Write;
    let mut files = vec![out.to_path_buf()];
    let (mut plain, mut packed) = (0u64, 0u64);
    let started = Instant::now();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("dir")
                    .map(|e| e.expect("entry").path()),
            );
            continue;
        }
        let bytes = std::fs::read(&path).expect("file");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&bytes).expect("gzip");
        plain += bytes.len() as u64;
        packed += encoder.finish().expect("gzip").len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "(gzip of the system export: {:.1} MB -> {:.1} MB, {:.1}x smaller, {:.0} MB/s on one core)",
        plain as f64 / 1e6,
        packed as f64 / 1e6,
        plain as f64 / packed.max(1) as f64,
        plain as f64 / 1e6 / seconds
    );
}

async fn run_export(
    store: SqliteStore,
    out: &Path,
    level: ExportLevel,
    params: ExportParams,
) -> Stats {
    let store = Arc::new(store);
    let output = Arc::new(FileOutput::new(out).expect("output dir"));
    let ports = Ports {
        resources: store.clone(),
        jobs: store.clone(),
        lock: store.clone(),
        output,
    };
    let mut settings = Settings::default();
    if let Some(rows) = std::env::var("BENCH_PAGE")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        settings.page_size = rows;
    }
    if let Some(items) = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        settings.concurrency = items;
    }
    let exporter = Arc::new(Exporter::new(ports, settings));
    reset_peak_rss();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let job = exporter
        .kickoff(level, params, "bench".into())
        .await
        .expect("kick-off");
    runner::run_job(exporter.clone(), job.id.clone()).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds() - cpu_before;
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
        cpu_seconds,
        peak_rss_kb,
    }
}
