//! Worker benchmark against moto: loads generated resources into a DynamoDB resource table, then a
//! fresh child process exports every work item of a system-level job the way the worker Lambda does
//! (DynamoDB pages → NDJSON → S3 multipart) and prints wall-clock resources/s and MB/s, the
//! worker's own CPU time per 1,000 resources, and its peak RSS.
//!
//! moto answers each DynamoDB Query by walking the whole table in Python (seconds per page), so the
//! wall-clock figures measure moto; the CPU and memory figures measure the worker.
//!
//! `MOTO_ENDPOINT=http://127.0.0.1:PORT cargo bench -p export-aws` (`BENCH_RESOURCES`, default
//! 5000). Under `cargo test` (tests/run.sh starts moto) it runs once on a small store.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;
use export_aws::dynamo::DynamoTable;
use export_aws::{AwsService, AwsSettings};
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::ResourceStore;
use std::time::Instant;

// The same /proc readings as the local benchmarks.
#[path = "../../local/benches/support/process.rs"]
mod process;
use process::{cpu_seconds, peak_rss_kb};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(spec) = std::env::var("WORKER_BENCH_JOB") {
        // Child: only the export, so its memory and CPU figures are the worker's alone.
        runtime.block_on(export_job(&spec));
        return;
    }
    let Ok(endpoint) = std::env::var("MOTO_ENDPOINT") else {
        println!("worker_bench: MOTO_ENDPOINT is not set; nothing measured");
        return;
    };
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let default = if benchmarking { 5_000 } else { 600 };
    let resources = std::env::var("BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    runtime.block_on(run(&endpoint, resources));
}

async fn sdk(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
        .load()
        .await
}

/// Creates the tables and bucket, loads the data, plans a job, and runs the export in a child.
async fn run(endpoint: &str, resources: usize) {
    let sdk = sdk(endpoint).await;
    let prefix = format!("bench{}", std::process::id());
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    for table in ["resources", "jobs", "auth"] {
        DynamoTable::create(&ddb, &format!("{prefix}-{table}"))
            .await
            .expect("create table");
    }
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    s3.create_bucket()
        .bucket(format!("{prefix}-exports"))
        .send()
        .await
        .expect("bucket");
    let service = AwsService::new(&sdk, AwsSettings::named(&prefix))
        .await
        .expect("service");

    let started = Instant::now();
    let now = now_millis();
    let patients = resources.div_ceil(294).max(1);
    let mut all = Vec::new();
    export_core::generate::generate(patients, 9, &mut |_, r| {
        all.push(export_core::load::prepare(r, now).unwrap())
    });
    for batch in all.chunks(1000) {
        service
            .resources
            .put_resources(batch.to_vec())
            .await
            .expect("load");
    }
    eprintln!(
        "(loaded {patients} patients into moto in {:.1}s)",
        started.elapsed().as_secs_f64()
    );

    let job = service
        .exporter
        .kickoff(ExportLevel::System, ExportParams::default(), "bench".into())
        .await
        .expect("kick-off");
    service.exporter.plan(&job.id).await.expect("plan");
    let child = std::process::Command::new(std::env::current_exe().expect("bench executable"))
        .env(
            "WORKER_BENCH_JOB",
            format!("{prefix} {} {endpoint}", job.id),
        )
        .output()
        .expect("run the export child");
    print!("{}", String::from_utf8_lossy(&child.stdout));
    eprint!("{}", String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success(), "export child failed");
}

/// Exports every item of a planned job (`"<prefix> <job id> <endpoint>"`) and prints the figures.
async fn export_job(spec: &str) {
    let mut words = spec.split(' ');
    let (prefix, job_id, endpoint) = (
        words.next().unwrap(),
        words.next().unwrap(),
        words.next().unwrap(),
    );
    let service = AwsService::new(&sdk(endpoint).await, AwsSettings::named(prefix))
        .await
        .expect("service");
    let exporter = &service.exporter;
    let items = exporter.ports.jobs.items(job_id).await.expect("items");
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for item in &items {
        exporter
            .export_item(item, None, None)
            .await
            .expect("export item");
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let peak_kb = peak_rss_kb();
    let parts = exporter.ports.jobs.parts(job_id).await.expect("parts");
    let count: u64 = parts.iter().map(|p| p.count).sum();
    let bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    println!(
        "{:>10} {:>6} {:>9} {:>8} {:>8} {:>14} {:>12}",
        "resources", "items", "seconds", "res/s", "MB/s", "CPU ms/1k", "peak RSS MB"
    );
    println!(
        "{count:>10} {:>6} {seconds:>9.1} {:>8.0} {:>8.2} {:>14.1} {:>12.1}",
        items.len(),
        count as f64 / seconds,
        bytes as f64 / 1e6 / seconds,
        cpu * 1000.0 / (count.max(1) as f64 / 1000.0),
        peak_kb as f64 / 1024.0
    );
}
