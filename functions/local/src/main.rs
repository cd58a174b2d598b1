//! `bulk-export`: run the FHIR Bulk Data export server locally, load data, generate sample data.

use bulk_export_local::files::FileOutput;
use bulk_export_local::server::{LocalService, serve};
use bulk_export_local::sqlite::SqliteStore;
use clap::{Args, Parser, Subcommand};
use export_core::Settings;
use export_core::fhir::time::now_millis;
use export_core::generate::generate;
use export_core::load::{data_files, prepare, read_file};
use export_core::ports::NewResource;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "bulk-export",
    version,
    about = "FHIR Bulk Data ($export) server with an embedded store"
)]
struct Cli {
    /// Log lines on stderr as JSON (one object per line) or as text. `RUST_LOG` sets what is
    /// logged (default `info`: one line per request, plus warnings and errors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the FHIR API at http://ADDR/fhir.
    Serve(ServeArgs),
    /// Import .ndjson, .ndjson.gz and Bundle .json files (or directories of them) into the store.
    Load {
        #[arg(long, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Load into this DynamoDB resource table (the AWS deployment) instead of SQLite.
        /// Needs a build with `--features aws`; uses the usual AWS environment (region, credentials,
        /// AWS_ENDPOINT_URL).
        #[arg(long)]
        dynamodb_table: Option<String>,
        /// Partitions per type in the DynamoDB table (the stack's `Shards` parameter).
        #[arg(long, default_value_t = 16)]
        shards: u32,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Write deterministic synthetic R4 data, one NDJSON file per type.
    Generate {
        #[arg(long)]
        patients: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// SQLite database holding resources and jobs.
    #[arg(long, default_value = "bulk-export.db")]
    db: PathBuf,
    /// Directory for export files.
    #[arg(long, default_value = "exports")]
    output: PathBuf,
    /// Generate N synthetic patients first if the store is empty.
    #[arg(long)]
    sample: Option<usize>,
    /// Close an output file before it would pass this many bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Close an output file before it would hold more than this many resources.
    #[arg(long)]
    max_file_resources: Option<u64>,
    /// Seconds a completed export's files and status stay available.
    #[arg(long, default_value_t = 24 * 3600)]
    retention_secs: u64,
    /// Work items exported at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Seconds of the export lock's lease (renewed while an export runs).
    #[arg(long, default_value_t = 60, hide = true)]
    lock_lease_secs: u64,
    /// Resources read per page.
    #[arg(long, default_value_t = 1000, hide = true)]
    page_size: usize,
    /// Pause after each page, to make exports slow in tests.
    #[arg(long, default_value_t = 0, hide = true)]
    page_delay_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Command::Serve(args) => bulk_export_local::runtime::build()
            .map_err(Into::into)
            .and_then(|runtime| runtime.block_on(run_serve(args))),
        Command::Load {
            db,
            dynamodb_table: None,
            paths,
            ..
        } => run_load(&db, &paths),
        Command::Load {
            dynamodb_table: Some(table),
            shards,
            paths,
            ..
        } => run_load_dynamodb(&table, shards, paths),
        Command::Generate {
            patients,
            out,
            seed,
        } => run_generate(patients, &out, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn run_serve(args: ServeArgs) -> CliResult {
    let store = SqliteStore::open(&args.db)?;
    if let Some(patients) = args.sample {
        if store.counts()?.is_empty() {
            let started = std::time::Instant::now();
            let store = store.clone();
            let loaded =
                tokio::task::spawn_blocking(move || load_generated(&store, patients)).await??;
            println!(
                "generated {loaded} resources for {patients} patients in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        } else {
            println!("the store already holds data; --sample skipped");
        }
    }
    let settings = Settings {
        max_file_bytes: args.max_file_bytes,
        max_file_resources: args.max_file_resources.unwrap_or(u64::MAX),
        retention: Duration::from_secs(args.retention_secs),
        lock_lease: Duration::from_secs(args.lock_lease_secs.max(1)),
        page_size: args.page_size.max(1),
        concurrency: args.concurrency.max(1),
        page_delay: Duration::from_millis(args.page_delay_ms),
        ..Settings::default()
    };
    let service = LocalService::new(store, FileOutput::new(&args.output)?, settings);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    let base = format!("http://{}/fhir", listener.local_addr()?);
    println!("FHIR Bulk Data server listening on {base}");
    println!(
        "  try:  curl -i -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' '{base}/Patient/$export'"
    );
    println!(
        "  then: curl -i '<Content-Location from above>'   (repeat until 200; the body lists the files)"
    );
    println!("  and:  curl '<an output url from the manifest>'");
    std::io::stdout().flush()?;
    tokio::select! {
        served = serve(service, listener) => served?,
        _ = tokio::signal::ctrl_c() => println!("shutting down"),
    }
    Ok(())
}

/// Writes `patients` generated patients (and their resources) into the store.
fn load_generated(store: &SqliteStore, patients: usize) -> Result<usize, export_core::StoreError> {
    let now = now_millis();
    let mut batch = Vec::new();
    let mut total = 0;
    let mut failure = None;
    generate(patients, 1, &mut |_, resource| {
        if failure.is_some() {
            return;
        }
        match prepare(resource, now) {
            Ok(r) => batch.push(r),
            Err(e) => failure = Some(export_core::StoreError::new(e)),
        }
        if batch.len() >= 5000 {
            total += batch.len();
            if let Err(e) = store.put_resources_blocking(std::mem::take(&mut batch)) {
                failure = Some(e);
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    total += batch.len();
    store.put_resources_blocking(batch)?;
    Ok(total)
}

fn run_load(db: &Path, paths: &[PathBuf]) -> CliResult {
    let store = SqliteStore::open(db)?;
    let now = now_millis();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut problems = 0u64;
    let mut batch: Vec<NewResource> = Vec::new();
    let mut failure = None;
    for file in data_files(paths)? {
        read_file(
            &file,
            now,
            &mut |resource| {
                *counts.entry(resource.resource_type.clone()).or_default() += 1;
                batch.push(resource);
                if batch.len() >= 5000
                    && let Err(e) = store.put_resources_blocking(std::mem::take(&mut batch))
                {
                    failure.get_or_insert(e);
                }
            },
            &mut |issue| {
                problems += 1;
                eprintln!("skipped {issue}");
            },
        )
        .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    store.put_resources_blocking(batch)?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let total: u64 = counts.values().sum();
    for (resource_type, count) in &counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!("{:<28} {total:>10}", "loaded");
    if problems > 0 {
        println!("{:<28} {problems:>10}", "skipped (see above)");
    }
    Ok(())
}

#[cfg(feature = "aws")]
fn run_load_dynamodb(table: &str, shards: u32, paths: Vec<PathBuf>) -> CliResult {
    let runtime = bulk_export_local::runtime::build()?;
    let report = runtime.block_on(async {
        let store = export_aws::AwsService::resource_store(table, shards).await;
        export_aws::load::load_files(&store, paths).await
    })?;
    for issue in &report.issues {
        eprintln!("skipped {issue}");
    }
    for (resource_type, count) in &report.counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!(
        "{:<28} {:>10}  (into DynamoDB table {table})",
        "loaded",
        report.counts.values().sum::<u64>()
    );
    Ok(())
}

#[cfg(not(feature = "aws"))]
fn run_load_dynamodb(_table: &str, _shards: u32, _paths: Vec<PathBuf>) -> CliResult {
    Err("this bulk-export was built without DynamoDB support: rebuild with `--features aws`".into())
}

fn run_generate(patients: usize, out: &Path, seed: u64) -> CliResult {
    std::fs::create_dir_all(out)?;
    let mut writers: BTreeMap<String, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut failure: Option<std::io::Error> = None;
    generate(patients, seed, &mut |resource_type, resource| {
        if failure.is_some() {
            return;
        }
        let writer = match writers.entry(resource_type.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                match std::fs::File::create(out.join(format!("{resource_type}.ndjson"))) {
                    Ok(f) => e.insert(std::io::BufWriter::new(f)),
                    Err(err) => {
                        failure = Some(err);
                        return;
                    }
                }
            }
        };
        let written = serde_json::to_writer(&mut *writer, &resource)
            .map_err(std::io::Error::from)
            .and_then(|_| writer.write_all(b"\n"));
        if let Err(e) = written {
            failure = Some(e);
        }
        *counts.entry(resource_type.to_string()).or_default() += 1;
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    for writer in writers.values_mut() {
        writer.flush()?;
    }
    for (resource_type, count) in &counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!(
        "{:<28} {:>10}  (in {})",
        "generated",
        counts.values().sum::<u64>(),
        out.display()
    );
    Ok(())
}
