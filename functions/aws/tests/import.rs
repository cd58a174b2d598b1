//! The import that runs in the cloud (`export_aws::import`), against moto: objects put under
//! `import/<name>/` of the import bucket reach the importer as S3 sends them (moto delivers the
//! bucket's notifications to the import queue), and this process plays the importer Lambda.
//!
//! Expected results come from the generated input (which lines are good, which were made bad),
//! never from the importer; the table is read back through a real export.

mod support;

use export_aws::import::event::{self, ImportMessage};
use export_aws::import::{ImportSettings, Importer, handler, status};
use export_core::fhir::time::now_millis;
use export_core::ports::ResourceStore;
use futures_util::future::join_all;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};
use support::{Delivery, Deployment, download};

/// An import bucket and queue next to a deployment, with S3 notifying the queue of `import/`.
struct ImportSite {
    importer: Importer,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    /// Every chunk message the importer was given (for redelivering one).
    chunk_bodies: Vec<String>,
}

async fn import_site(aws: &Deployment, chunk_bytes: u64, batch: usize) -> ImportSite {
    let prefix = aws.settings.bucket.trim_end_matches("-exports").to_string();
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws.sdk)
            .force_path_style(true)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let bucket = format!("{prefix}-import");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("{prefix}-import"))
        // A failed message comes back soon (the template's is longer than the function's timeout).
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            "2",
        )
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    use aws_sdk_s3::types::{
        FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
        QueueConfiguration, S3KeyFilter,
    };
    s3.put_bucket_notification_configuration()
        .bucket(&bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(
                    QueueConfiguration::builder()
                        .queue_arn(queue_arn)
                        .events(aws_sdk_s3::types::Event::S3ObjectCreated)
                        .filter(
                            NotificationConfigurationFilter::builder()
                                .key(
                                    S3KeyFilter::builder()
                                        .filter_rules(
                                            FilterRule::builder()
                                                .name(FilterRuleName::Prefix)
                                                .value("import/")
                                                .build(),
                                        )
                                        .build(),
                                )
                                .build(),
                        )
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let settings = ImportSettings {
        resources_table: aws.settings.resources_table.clone(),
        jobs_table: aws.settings.jobs_table.clone(),
        shards: aws.settings.shards,
        resource_bucket: aws.settings.resource_bucket.clone(),
        bucket,
        queue_url,
        chunk_bytes,
        batch,
        reserve: Duration::from_secs(1),
        max_attempts: 4,
    };
    ImportSite {
        importer: Importer::new(&aws.sdk, settings),
        s3,
        sqs,
        chunk_bodies: Vec::new(),
    }
}

impl ImportSite {
    async fn put(&self, key: &str, body: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(&self.importer.settings.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }

    async fn send(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.importer.settings.queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Plays the importer Lambda (batch size 1, up to 10 at once) until the queue stays empty.
    /// Returns the number of messages handled.
    async fn drain(&mut self) -> usize {
        let started = Instant::now();
        let mut handled = 0;
        let mut quiet = 0;
        while quiet < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the import queue did not drain"
            );
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.importer.settings.queue_url)
                .max_number_of_messages(10)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                let attributes = self
                    .sqs
                    .get_queue_attributes()
                    .queue_url(&self.importer.settings.queue_url)
                    .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                    .send()
                    .await
                    .unwrap();
                let waiting: usize = [
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                ]
                .iter()
                .filter_map(|n| attributes.attributes().and_then(|a| a.get(n)))
                .filter_map(|n| n.parse::<usize>().ok())
                .sum();
                quiet = if waiting == 0 { quiet + 1 } else { 0 };
                continue;
            }
            quiet = 0;
            let mut runs = Vec::new();
            for message in &messages {
                let body = message.body.clone().unwrap_or_default();
                if matches!(event::parse(&body), Ok(ImportMessage::Chunk(_))) {
                    self.chunk_bodies.push(body.clone());
                }
                let mut record = export_aws::aws_lambda_events::event::sqs::SqsMessage::default();
                record.message_id = message.message_id.clone();
                record.body = Some(body);
                for (name, value) in message.attributes().into_iter().flatten() {
                    record
                        .attributes
                        .insert(name.as_str().to_string(), value.clone());
                }
                let mut event = export_aws::aws_lambda_events::event::sqs::SqsEvent::default();
                event.records = vec![record];
                let deadline = Instant::now() + Duration::from_secs(900);
                runs.push(handler::importer(&self.importer, event, deadline));
            }
            for (message, response) in messages.iter().zip(join_all(runs).await) {
                handled += 1;
                if response.batch_item_failures.is_empty() {
                    self.sqs
                        .delete_message()
                        .queue_url(&self.importer.settings.queue_url)
                        .receipt_handle(message.receipt_handle.clone().unwrap_or_default())
                        .send()
                        .await
                        .unwrap();
                }
            }
        }
        handled
    }

    async fn status(&self, id: &str) -> Value {
        status::show(&self.importer.records, id)
            .await
            .unwrap()
            .expect("the import job exists")
    }

    /// The job's error file, as (file, line or entry, message) sorted.
    async fn error_file(&self, id: &str) -> Vec<Value> {
        let job = self.status(id).await;
        let uri = job["errorFile"]
            .as_str()
            .expect("an error file")
            .to_string();
        let key = uri
            .strip_prefix(&format!("s3://{}/", self.importer.settings.bucket))
            .unwrap();
        let body = self
            .s3
            .get_object()
            .bucket(&self.importer.settings.bucket)
            .key(key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The generated input: resources by type, each a JSON value with `meta.lastUpdated`.
fn generated(patients: usize) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    export_core::generate::generate(patients, 7, &mut |t, r| {
        out.entry(t.to_string()).or_default().push(r)
    });
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn ndjson(resources: &[Value]) -> Vec<u8> {
    resources
        .iter()
        .flat_map(|r| format!("{r}\n").into_bytes())
        .collect()
}

/// What an export of the imported data must hold: every good input resource, as version 1.
fn as_version_one(resources: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in resources {
        let mut r = r.clone();
        r["meta"]["versionId"] = "1".into();
        out.entry(r["resourceType"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    for list in out.values_mut() {
        list.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
    }
    out
}

fn exported_values(lines: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<Value>> {
    lines
        .into_iter()
        .map(|(t, lines)| {
            let mut values: Vec<Value> = lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            values.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
            (t, values)
        })
        .collect()
}

/// (file, line or entry) of each error record, to compare with where bad input was put.
fn places(errors: &[Value]) -> BTreeSet<(String, String)> {
    errors
        .iter()
        .map(|e| {
            let place = match (&e["line"], &e["entry"]) {
                (Value::Number(n), _) => format!("line {n}"),
                (_, Value::Number(n)) => format!("entry {n}"),
                _ => "file".to_string(),
            };
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            (e["file"].as_str().unwrap().to_string(), place)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_put_under_the_prefix_import_exactly_once_whatever_is_redelivered() {
    let data = generated(2);
    let mut aws = Deployment::create(|_| {}).await;
    // Chunks of 4 KiB: the NDJSON object is cut into dozens of chunks, many inside a line.
    let mut site = import_site(&aws, 4096, 40).await;

    // The NDJSON object: every type but those of the other two objects, with bad lines (and
    // blank ones, which are no error) put in at known places.
    let in_gzip = ["Condition", "Procedure"];
    let in_bundle = ["Organization", "Location"];
    let mut good: Vec<Value> = Vec::new();
    let mut text = Vec::new();
    let mut bad_places = BTreeSet::new();
    let ndjson_key = "import/batch-1/clinical data.ndjson";
    let bad_lines = [
        "{\"resourceType\":\"Observation\",\"id\":\"cut-off\",\"status\":",
        "{\"resourceType\":\"NotAType\",\"id\":\"x\"}",
        "{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"No id\"}]}",
        "[1,2,3]",
    ];
    let mut line = 0;
    for (resource_type, resources) in &data {
        if in_gzip.contains(&resource_type.as_str()) || in_bundle.contains(&resource_type.as_str())
        {
            continue;
        }
        for r in resources {
            line += 1;
            text.extend(format!("{r}\n").into_bytes());
            good.push(r.clone());
            if line % 53 == 0 {
                line += 1;
                text.extend(format!("{}\n", bad_lines[line % bad_lines.len()]).into_bytes());
                bad_places.insert((ndjson_key.to_string(), format!("line {line}")));
            }
            if line % 71 == 0 {
                line += 1;
                text.extend(b"\n");
            }
        }
    }
    // The last line without its newline.
    text.pop();
    let gzip_resources: Vec<Value> = in_gzip.iter().flat_map(|t| data[*t].clone()).collect();
    good.extend(gzip_resources.clone());
    let bundle_resources: Vec<Value> = in_bundle.iter().flat_map(|t| data[*t].clone()).collect();
    good.extend(bundle_resources.clone());
    let mut entries: Vec<Value> = bundle_resources
        .iter()
        .map(|r| json!({"resource": r}))
        .collect();
    entries.insert(1, json!({"resource": {"resourceType": "Organization"}}));
    bad_places.insert((
        "import/batch-1/reference.json".to_string(),
        "entry 1".to_string(),
    ));
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    assert!(
        text.len() > 40 * 4096,
        "the NDJSON object spans many chunks"
    );

    site.put(ndjson_key, text.clone()).await;
    site.put(
        "import/batch-1/conditions and procedures.ndjson.gz",
        gzip(&ndjson(&gzip_resources)),
    )
    .await;
    site.put(
        "import/batch-1/reference.json",
        bundle.to_string().into_bytes(),
    )
    .await;
    // Not under the prefix, and not a data file: neither starts anything.
    site.put("elsewhere/x.ndjson", ndjson(&gzip_resources))
        .await;
    site.put("import/batch-1/notes.txt", b"hello".to_vec())
        .await;
    site.drain().await;

    let job = site.status("batch-1").await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["files"].as_array().unwrap().len(), 3, "{job}");
    assert_eq!(job["resourcesWritten"], good.len(), "{job}");
    assert_eq!(job["resourcesUnchanged"], 0, "{job}");
    assert_eq!(job["errors"], bad_places.len(), "{job}");
    assert!(job["chunks"].as_u64().unwrap() > 40, "{job}");
    assert_eq!(job["chunks"], job["chunksDone"], "{job}");
    assert!(job["finished"].is_string());
    assert_eq!(
        places(&site.error_file("batch-1").await),
        bad_places,
        "the error file lists exactly the bad lines"
    );

    // A redelivered chunk message, a chunk that crashed after writing and before recording its
    // progress (its item reset to the start), a duplicate S3 event, the same object put again,
    // and the same data in another object: no resource gets a second version.
    let ndjson_chunks: Vec<String> = site
        .chunk_bodies
        .iter()
        .filter(|b| b.contains("clinical data.ndjson"))
        .cloned()
        .collect();
    let redelivered = ndjson_chunks[3].clone();
    site.send(&redelivered).await;
    let crashed = ndjson_chunks[7].clone();
    let ImportMessage::Chunk(chunk) = event::parse(&crashed).unwrap() else {
        unreachable!()
    };
    let ddb = aws_sdk_dynamodb::Client::new(&aws.sdk);
    ddb.delete_item()
        .table_name(&aws.settings.jobs_table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S("imp#batch-1".into()),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!(
                "chunk#{}#{:06}",
                chunk.file_id, chunk.index
            )),
        )
        .send()
        .await
        .unwrap();
    site.send(&crashed).await;
    site.put(ndjson_key, text.clone()).await;
    site.put(
        "import/batch-1/again.ndjson.gz",
        gzip(&ndjson(&gzip_resources)),
    )
    .await;
    site.drain().await;
    let job = site.status("batch-1").await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["files"].as_array().unwrap().len(), 4, "{job}");
    assert_eq!(
        job["resourcesUnchanged"].as_u64().unwrap(),
        gzip_resources.len() as u64 + job_chunk_resources(&site, &chunk).await,
        "{job}"
    );
    assert_eq!(
        job["resourcesWritten"].as_u64().unwrap() + job["resourcesUnchanged"].as_u64().unwrap(),
        (good.len() + gzip_resources.len()) as u64,
        "{job}"
    );
    assert_eq!(
        places(&site.error_file("batch-1").await),
        bad_places,
        "the error file after the repeats"
    );

    // An export of the table holds exactly the good input, each resource once, as version 1.
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export").await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = aws.wait_for_manifest(&kick.status_path()).await;
    let exported = exported_values(download(&manifest));
    let expected = as_version_one(&good);
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (resource_type, want) in &expected {
        assert_eq!(&exported[resource_type], want, "{resource_type}");
    }
}

/// The resources a chunk's (reset) item says it found, written or not.
async fn job_chunk_resources(
    site: &ImportSite,
    chunk: &export_aws::import::event::ChunkMessage,
) -> u64 {
    let state = site.importer.records.chunk(chunk).await.unwrap().unwrap();
    assert!(state.done);
    assert_eq!(state.written, 0, "the repeated chunk wrote nothing new");
    state.unchanged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_smaller_than_a_line_lose_no_line() {
    let aws = Deployment::create(|_| {}).await;
    // 64-byte chunks over lines of 60 to 900 bytes: most chunks begin and end inside a line,
    // many hold no line start at all.
    let mut site = import_site(&aws, 64, 5).await;
    let now = now_millis();
    let mut text = String::new();
    let mut want = Vec::new();
    for i in 0..30 {
        let r = json!({"resourceType": "Patient", "id": format!("p{i}"),
            "meta": {"lastUpdated": "2024-01-01T00:00:00.000Z"},
            "name": [{"family": "x".repeat(i * 29)}]});
        text.push_str(&format!("{r}\n"));
        want.push(r);
        if i == 11 {
            text.push_str("{\"resourceType\":\"Patient\",\"id\":\"bad id\"}\n");
        }
    }
    site.put("import/tiny/patients.ndjson", text.into_bytes())
        .await;
    site.drain().await;
    let job = site.status("tiny").await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["lines"], 31, "{job}");
    assert_eq!(job["resourcesWritten"], 30, "{job}");
    assert_eq!(
        places(&site.error_file("tiny").await),
        BTreeSet::from([(
            "import/tiny/patients.ndjson".to_string(),
            "line 13".to_string()
        )])
    );
    let targets: Vec<(String, String)> = want
        .iter()
        .map(|r| ("Patient".to_string(), r["id"].as_str().unwrap().to_string()))
        .collect();
    let stored = aws
        .service
        .resources
        .resources_at(&targets, now)
        .await
        .unwrap();
    for (r, version) in want.iter().zip(stored) {
        let stored: Value = serde_json::from_slice(&version.expect("imported").json).unwrap();
        let mut r = r.clone();
        r["meta"]["versionId"] = "1".into();
        assert_eq!(stored, r);
    }
}

/// Import throughput against moto (a figure, not a test): `cargo test -p export-aws --test import
/// -- --ignored --nocapture` with `IMPORT_BENCH_PATIENTS` (default 10, about 3,000 resources).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn import_throughput_against_moto() {
    let patients = std::env::var("IMPORT_BENCH_PATIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let data = generated(patients);
    let aws = Deployment::create(|_| {}).await;
    let mut site = import_site(&aws, 256 << 10, 250).await;
    let all: Vec<Value> = data.values().flatten().cloned().collect();
    let body = ndjson(&all);
    let started = Instant::now();
    site.put("import/bench/all.ndjson", body.clone()).await;
    site.drain().await;
    let seconds = started.elapsed().as_secs_f64();
    let job = site.status("bench").await;
    assert_eq!(job["resourcesWritten"], all.len(), "{job}");
    println!(
        "import against moto: {} resources ({:.1} MB, {} chunks) in {seconds:.1} s = {:.0} resources/s",
        all.len(),
        body.len() as f64 / 1e6,
        job["chunks"],
        all.len() as f64 / seconds
    );
}
