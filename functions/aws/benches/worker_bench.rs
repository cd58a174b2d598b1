//! Worker benchmark against moto: loads generated resources into a DynamoDB resource table, then
//! exports every work item of a system-level job the way the worker Lambda does (DynamoDB pages →
//! NDJSON → S3 multipart), printing resources/s, MB/s and the worker's peak RSS.
//!
//! `MOTO_ENDPOINT=http://127.0.0.1:PORT cargo bench -p export-aws` (tests/run.sh starts moto for
//! `cargo test`, where this runs once on a small store as a smoke check). `BENCH_RESOURCES` sets
//! the size (default 20000).

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use export_aws::{AwsService, AwsSettings};
use export_core::Settings;
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::ResourceStore;
use std::time::{Duration, Instant};

fn main() {
    let Ok(endpoint) = std::env::var("MOTO_ENDPOINT") else {
        println!("worker_bench: MOTO_ENDPOINT is not set; nothing measured");
        return;
    };
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let resources: usize = std::env::var("BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 20_000 } else { 600 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(&endpoint, resources));
}

async fn run(endpoint: &str, resources: usize) {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
        .load()
        .await;
    let prefix = format!("bench{}", std::process::id());
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    for table in ["resources", "jobs"] {
        ddb.create_table()
            .table_name(format!("{prefix}-{table}"))
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("sk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("sk")
                    .key_type(KeyType::Range)
                    .build()
                    .unwrap(),
            )
            .send()
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
    let settings = AwsSettings {
        resources_table: format!("{prefix}-resources"),
        jobs_table: format!("{prefix}-jobs"),
        bucket: format!("{prefix}-exports"),
        state_machine_arn: String::new(),
        work_queue_url: String::new(),
        shards: 4,
        url_expiry: Duration::from_secs(300),
        worker_reserve: Duration::from_secs(60),
        heartbeat_every: Duration::from_secs(60),
        export: Settings::default(),
    };
    let service = AwsService::new(&sdk, settings);

    let started = Instant::now();
    let now = now_millis();
    let mut batch = Vec::new();
    let patients = resources.div_ceil(294).max(1);
    let mut all = Vec::new();
    export_core::generate::generate(patients, 9, &mut |_, r| {
        all.push(export_core::load::prepare(r, now).unwrap())
    });
    for r in all {
        batch.push(r);
        if batch.len() == 1000 {
            service
                .resources
                .put_resources(std::mem::take(&mut batch))
                .await
                .expect("load");
        }
    }
    service.resources.put_resources(batch).await.expect("load");
    eprintln!(
        "(loaded {patients} patients into moto in {:.1}s)",
        started.elapsed().as_secs_f64()
    );

    let exporter = &service.exporter;
    let job = exporter
        .kickoff(ExportLevel::System, ExportParams::default(), "bench".into())
        .await
        .expect("kick-off");
    let items = exporter.plan(&job.id).await.expect("plan");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    for item in &items {
        exporter
            .export_item(item, None, None)
            .await
            .expect("export item");
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_kb: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let parts = exporter.ports.jobs.parts(&job.id).await.expect("parts");
    let count: u64 = parts.iter().map(|p| p.count).sum();
    let bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    println!(
        "{:>10} {:>6} {:>9} {:>10} {:>8} {:>12}",
        "resources", "items", "seconds", "res/s", "MB/s", "peak RSS MB"
    );
    println!(
        "{count:>10} {:>6} {seconds:>9.2} {:>10.0} {:>8.2} {:>12.1}",
        items.len(),
        count as f64 / seconds,
        bytes as f64 / 1e6 / seconds,
        peak_kb as f64 / 1024.0
    );
}
