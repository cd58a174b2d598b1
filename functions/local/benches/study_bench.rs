//! Study export benchmark: generates one study of N participants (every generated patient is
//! enrolled) into SQLite, then runs the study exports through the real study service and
//! adapters (SQLite, files): participants CSV, sites CSV, dashboard, report and FHIR JSON (the
//! engine over the participants' compartments, zipped with a manifest). Prints rows/s, MB/s and
//! peak RSS.
//!
//! `cargo bench -p bulk-export --bench study_bench` runs 10,000 participants (set
//! `BENCH_PARTICIPANTS=1000` to choose). Under `cargo test` it runs 30 participants as a smoke
//! check. Generated stores are kept in `target/bench-data` and reused.

use async_trait::async_trait;
use bulk_export_local::files::FileOutput;
use bulk_export_local::sqlite::SqliteStore;
use export_auth::Principal;
use export_core::engine::Ports;
use export_core::fhir::time::now_millis;
use export_core::generate::generate_studies;
use export_core::load::prepare;
use export_core::ports::OutputStore;
use export_core::{Exporter, Settings, StoreResult};
use export_study::jobs::StudyJobStatus;
use export_study::options::{ExportOptions, ExportType, Filters};
use export_study::service::{Caller, ExportRequest, StudyDispatcher, StudyPorts, StudyService};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[path = "support/process.rs"]
mod process;
use process::{peak_rss_kb, reset_peak_rss};

/// The bench runs each job itself, right after creating it.
struct RunHere;

#[async_trait]
impl StudyDispatcher for RunHere {
    async fn submit(&self, _job_id: &str) -> StoreResult<()> {
        Ok(())
    }
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let participants: usize = match std::env::var("BENCH_PARTICIPANTS") {
        Ok(n) => n.trim().parse().expect("BENCH_PARTICIPANTS is a number"),
        Err(_) if benchmarking => 10_000,
        Err(_) => 30,
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-data");
    std::fs::create_dir_all(&root).expect("bench dir");
    let db = root.join(format!("study-{participants}.db"));
    let (store, resources) = ensure_store(&db, participants);
    let out = root.join("study-out");
    let _ = std::fs::remove_dir_all(&out);
    let runtime = bulk_export_local::runtime::build().expect("runtime");
    println!("one study, {participants} participants, {resources} resources in the store");
    println!(
        "{:<18} {:>10} {:>9} {:>10} {:>9} {:>10} {:>12}",
        "export", "rows", "seconds", "rows/s", "MB/s", "file MB", "peak RSS MB"
    );
    let service = runtime.block_on(service(store, &out));
    // The first read of a large store pays for the disk cache; measure warm, like a server.
    let warm = Instant::now();
    runtime
        .block_on(export_study::model::load_study(
            service.ports.resources.as_ref(),
            "study-0",
            service.page_size,
        ))
        .expect("load the study");
    eprintln!(
        "(warm-up: the study read once in {:.2}s)",
        warm.elapsed().as_secs_f64()
    );
    for export_type in [
        ExportType::ParticipantsCsv,
        ExportType::SitesCsv,
        ExportType::Dashboard,
        ExportType::Report,
        ExportType::Fhir,
    ] {
        let stats = runtime.block_on(run(&service, export_type, &out));
        let rows = stats.rows.map_or("—".to_string(), |rows| rows.to_string());
        let rate = stats.rows.map_or("—".to_string(), |rows| {
            format!("{:.0}", rows as f64 / stats.seconds)
        });
        println!(
            "{:<18} {:>10} {:>9.2} {:>10} {:>9.1} {:>10.1} {:>12.1}",
            export_type.as_str(),
            rows,
            stats.seconds,
            rate,
            stats.bytes as f64 / 1e6 / stats.seconds,
            stats.bytes as f64 / 1e6,
            stats.peak_rss_kb as f64 / 1024.0
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The study service over the store and a file output, as the local server wires it.
async fn service(store: SqliteStore, out: &Path) -> StudyService {
    let store = Arc::new(store);
    let output: Arc<dyn OutputStore> = Arc::new(FileOutput::new(out).expect("output dir"));
    let settings = Settings::default();
    let page_size = settings.page_size;
    let exporter = Arc::new(Exporter::new(
        Ports {
            resources: store.clone(),
            jobs: store.clone(),
            lock: store.clone(),
            output: output.clone(),
        },
        settings,
    ));
    StudyService {
        ports: StudyPorts {
            resources: store.clone(),
            jobs: store.clone(),
            audit: store.clone(),
            outbox: store,
            output,
        },
        exporter,
        dispatcher: Arc::new(RunHere),
        page_size,
    }
}

struct Stats {
    /// Rows (CSV) or resources (FHIR) written; none for the dashboard and the report.
    rows: Option<u64>,
    /// Bytes of the files the job wrote (for FHIR, the NDJSON inside the ZIP).
    bytes: u64,
    seconds: f64,
    peak_rss_kb: u64,
}

/// Creates a job of `export_type` over the whole study and runs it to its end.
async fn run(service: &StudyService, export_type: ExportType, out: &Path) -> Stats {
    let caller = Caller {
        principal: Principal::LocalAdmin,
        request_id: "bench".into(),
        client_address: None,
    };
    let request = ExportRequest {
        study_id: "study-0".into(),
        export_type,
        filters: Filters::default(),
        options: ExportOptions::default(),
    };
    reset_peak_rss();
    let started = Instant::now();
    let job = service.create(&caller, request).await.expect("create");
    service.run(&job.id).await.expect("run");
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kb = peak_rss_kb();
    let job = service
        .ports
        .jobs
        .job(&job.id)
        .await
        .expect("job")
        .expect("job exists");
    assert_eq!(job.status, StudyJobStatus::Completed, "{:?}", job.error);
    let (rows, bytes) = match export_type {
        ExportType::ParticipantsCsv | ExportType::SitesCsv => {
            let file = job.download.as_ref().expect("download");
            (Some(lines(&out.join(&file.key)) - 1), file.size)
        }
        ExportType::Fhir => {
            // The files after the ZIP are the NDJSON it holds (and its manifest).
            let ndjson: Vec<_> = job
                .files
                .iter()
                .filter(|f| f.name.ends_with(".ndjson"))
                .collect();
            let rows = ndjson.iter().map(|f| lines(&out.join(&f.key))).sum();
            (Some(rows), ndjson.iter().map(|f| f.size).sum())
        }
        _ => (None, job.download.as_ref().map_or(0, |f| f.size)),
    };
    Stats {
        rows,
        bytes,
        seconds,
        peak_rss_kb,
    }
}

/// Lines of a file, read in pieces.
fn lines(path: &Path) -> u64 {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("job file");
    let mut buffer = vec![0u8; 1 << 20];
    let mut count = 0;
    loop {
        let n = file.read(&mut buffer).expect("read");
        if n == 0 {
            return count;
        }
        count += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// Opens the store of one generated study of `participants`, generating it first if needed;
/// returns it with the number of resources it holds.
fn ensure_store(db: &Path, participants: usize) -> (SqliteStore, u64) {
    let ready = db.with_extension("ready");
    if !ready.exists() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let store = SqliteStore::open(db).expect("open store");
        let started = Instant::now();
        let now = now_millis();
        let (mut batch, mut count) = (Vec::new(), 0u64);
        generate_studies(participants, 42, Some(1), &mut |_, r| {
            batch.push(prepare(r, now).expect("generated data is valid"));
            count += 1;
            if batch.len() >= 10_000 {
                store
                    .put_resources_blocking(std::mem::take(&mut batch))
                    .expect("load");
            }
        });
        store.put_resources_blocking(batch).expect("load");
        eprintln!(
            "(generated {count} resources into {} in {:.1}s)",
            db.display(),
            started.elapsed().as_secs_f64()
        );
        std::fs::write(&ready, count.to_string()).expect("marker");
    }
    let count = std::fs::read_to_string(&ready)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    (SqliteStore::open(db).expect("open store"), count)
}
