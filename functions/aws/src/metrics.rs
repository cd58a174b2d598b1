//! The service's CloudWatch metrics, in the embedded metric format (EMF): one JSON object per line
//! on standard output, which CloudWatch Logs turns into metrics as it ingests the function's log.
//! No `PutMetricData` call, so no latency, no IAM permission and no failure mode on the export's
//! path; the line also stays readable in the log next to the request and work-item lines.
//!
//! Metrics are counted where the state change happens exactly once (the call that moves a job to
//! completed or failed), never per delivery of a message, so a redelivered or duplicated message
//! does not count twice. Namespace `BulkExport`, one dimension `Stack` (the stack's name), so
//! two deployments in one account keep their figures apart while alarms stay simple.

use aws_lambda_events::event::sqs::SqsMessage;
use export_core::job::JobStatus;
use export_core::{Exporter, StoreResult};
use serde_json::{Map, Value, json};
use std::time::Instant;

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "BulkExport";
/// The one dimension's name; its value is `STACK_NAME` (set by the template).
pub const DIMENSION: &str = "Stack";

/// Metric names (also what dashboards and alarms refer to).
pub const EXPORTS_STARTED: &str = "ExportsStarted";
pub const EXPORTS_COMPLETED: &str = "ExportsCompleted";
pub const EXPORTS_FAILED: &str = "ExportsFailed";
pub const RESOURCES_EXPORTED: &str = "ResourcesExported";
pub const BYTES_EXPORTED: &str = "BytesExported";
pub const ITEM_DURATION: &str = "ItemDuration";
pub const ITEM_RETRIES: &str = "ItemRetries";

/// A unit as CloudWatch spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Milliseconds,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// One metric value.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub unit: Unit,
    pub value: f64,
}

impl Metric {
    pub fn count(name: &'static str, value: u64) -> Self {
        Metric {
            name,
            unit: Unit::Count,
            value: value as f64,
        }
    }
}

/// The EMF document of `metrics` at `timestamp_ms` for stack `stack`.
pub fn document(metrics: &[Metric], timestamp_ms: u64, stack: &str) -> Value {
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|m| json!({"Name": m.name, "Unit": m.unit.name()}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[DIMENSION]],
                "Metrics": definitions,
            }],
        }),
    );
    root.insert(DIMENSION.into(), stack.into());
    for m in metrics {
        root.insert(m.name.into(), json!(m.value));
    }
    Value::Object(root)
}

/// Writes one EMF line to standard output (where the Lambda log is read from).
pub fn emit(metrics: &[Metric]) {
    if metrics.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let stack = std::env::var("STACK_NAME").unwrap_or_else(|_| "bulk-export".into());
    // `println!` holds standard output's lock for the whole line, so it never interleaves with a
    // log line; tests that run handlers in-process have it captured like their other output.
    println!("{}", document(metrics, now, &stack));
}

/// Whether an API request is a FHIR `$export` kick-off, remembered until its answer is known.
#[derive(Debug, Clone, Copy)]
pub struct Kickoff(bool);

impl Kickoff {
    pub fn of(parts: &http::request::Parts) -> Self {
        let path = parts.uri.path();
        let method = &parts.method;
        Kickoff(
            (method == http::Method::GET || method == http::Method::POST)
                && path.starts_with("/fhir/")
                && path.ends_with("/$export"),
        )
    }

    /// Counts an export started when the kick-off was accepted (202).
    pub fn answered(self, status: http::StatusCode) {
        if self.0 && status == http::StatusCode::ACCEPTED {
            emit(&[Metric::count(EXPORTS_STARTED, 1)]);
        }
    }
}

/// A work message handled: how long it took, and whether it was a retry (SQS delivered it
/// before, `ApproximateReceiveCount` > 1).
pub fn work_item(record: &SqsMessage, started: Instant) {
    let mut metrics = vec![Metric {
        name: ITEM_DURATION,
        unit: Unit::Milliseconds,
        value: started.elapsed().as_secs_f64() * 1000.0,
    }];
    if receive_count(record) > 1 {
        metrics.push(Metric::count(ITEM_RETRIES, 1));
    }
    emit(&metrics);
}

/// How many times SQS has delivered the message (1 for the first delivery).
pub fn receive_count(record: &SqsMessage) -> u32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// Finalizes a job; when this call completed it, counts the export completed with its resources
/// and bytes (read from its recorded parts, so a retried item's rewritten part counts once).
pub async fn finalize(exporter: &Exporter, job_id: &str) -> StoreResult<()> {
    let was_running = is(exporter, job_id, JobStatus::InProgress).await?;
    exporter.finalize(job_id).await?;
    if was_running && is(exporter, job_id, JobStatus::Completed).await? {
        let parts = exporter.ports.jobs.parts(job_id).await?;
        let output = parts.iter().filter(|p| !p.is_error && !p.is_deleted);
        let (resources, bytes) = output.fold((0, 0), |(r, b), p| (r + p.count, b + p.bytes));
        emit(&[
            Metric::count(EXPORTS_COMPLETED, 1),
            Metric::count(RESOURCES_EXPORTED, resources),
            Metric {
                name: BYTES_EXPORTED,
                unit: Unit::Bytes,
                value: bytes as f64,
            },
        ]);
    }
    Ok(())
}

/// Fails a job; when this call moved it from active to failed, counts the export failed.
pub async fn fail(exporter: &Exporter, job_id: &str, diagnostics: &str) -> StoreResult<()> {
    let job = exporter.ports.jobs.get(job_id).await?;
    let was_active = job.is_some_and(|j| j.status.is_active());
    exporter.fail(job_id, diagnostics).await?;
    if was_active && is(exporter, job_id, JobStatus::Failed).await? {
        emit(&[Metric::count(EXPORTS_FAILED, 1)]);
    }
    Ok(())
}

async fn is(exporter: &Exporter, job_id: &str, status: JobStatus) -> StoreResult<bool> {
    Ok(exporter
        .ports
        .jobs
        .get(job_id)
        .await?
        .is_some_and(|j| j.status == status))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks a line against the EMF specification's rules, independently of [`document`]:
    /// one line of JSON; `_aws.Timestamp` an integer; `CloudWatchMetrics` a non-empty array of
    /// directives, each with a non-empty `Namespace`, `Dimensions` an array of at most 30-key
    /// arrays whose keys are string members of the root, and `Metrics` (at most 100) naming
    /// members of the root whose values are numbers, with a unit CloudWatch knows. Returns the
    /// metric values by name.
    fn check_emf(line: &str) -> std::collections::BTreeMap<String, f64> {
        assert!(!line.contains('\n'), "one line");
        let root: Value = serde_json::from_str(line).expect("JSON");
        let aws = &root["_aws"];
        assert!(aws["Timestamp"].is_u64(), "Timestamp in ms: {line}");
        let directives = aws["CloudWatchMetrics"]
            .as_array()
            .expect("CloudWatchMetrics");
        assert!(!directives.is_empty());
        let units = [
            "Seconds",
            "Microseconds",
            "Milliseconds",
            "Bytes",
            "Kilobytes",
            "Megabytes",
            "Gigabytes",
            "Terabytes",
            "Bits",
            "Count",
            "Bytes/Second",
            "Count/Second",
            "Percent",
            "None",
        ];
        let mut values = std::collections::BTreeMap::new();
        for directive in directives {
            let namespace = directive["Namespace"].as_str().expect("Namespace");
            assert!(!namespace.is_empty() && namespace.len() <= 1024);
            for set in directive["Dimensions"].as_array().expect("Dimensions") {
                let keys = set.as_array().expect("a dimension set");
                assert!(keys.len() <= 30);
                for key in keys {
                    let key = key.as_str().expect("dimension key");
                    assert!(root[key].is_string(), "dimension {key} is a root member");
                }
            }
            let metrics = directive["Metrics"].as_array().expect("Metrics");
            assert!(!metrics.is_empty() && metrics.len() <= 100);
            for metric in metrics {
                let name = metric["Name"].as_str().expect("Name");
                let unit = metric["Unit"].as_str().expect("Unit");
                assert!(units.contains(&unit), "unit {unit}");
                let value = root[name]
                    .as_f64()
                    .unwrap_or_else(|| panic!("value of {name}"));
                values.insert(name.to_string(), value);
            }
        }
        values
    }

    #[test]
    fn documents_are_valid_emf_with_the_values_given() {
        let doc = document(
            &[
                Metric::count(EXPORTS_COMPLETED, 1),
                Metric::count(RESOURCES_EXPORTED, 1234),
                Metric {
                    name: BYTES_EXPORTED,
                    unit: Unit::Bytes,
                    value: 56789.0,
                },
                Metric {
                    name: ITEM_DURATION,
                    unit: Unit::Milliseconds,
                    value: 12.5,
                },
            ],
            1_795_003_200_000,
            "my-stack",
        );
        let line = doc.to_string();
        let values = check_emf(&line);
        assert_eq!(values[EXPORTS_COMPLETED], 1.0);
        assert_eq!(values[RESOURCES_EXPORTED], 1234.0);
        assert_eq!(values[BYTES_EXPORTED], 56789.0);
        assert_eq!(values[ITEM_DURATION], 12.5);
        let root: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(root["_aws"]["Timestamp"], 1_795_003_200_000u64);
        assert_eq!(
            root["_aws"]["CloudWatchMetrics"][0]["Namespace"],
            "BulkExport"
        );
        assert_eq!(root["Stack"], "my-stack");
    }

    #[test]
    fn the_checker_rejects_what_cloudwatch_would_not_read() {
        let good = document(&[Metric::count(EXPORTS_STARTED, 1)], 1, "s").to_string();
        check_emf(&good);
        let mut no_value: Value = serde_json::from_str(&good).unwrap();
        no_value.as_object_mut().unwrap().remove(EXPORTS_STARTED);
        let mut no_dimension: Value = serde_json::from_str(&good).unwrap();
        no_dimension.as_object_mut().unwrap().remove(DIMENSION);
        let mut bad_unit: Value = serde_json::from_str(&good).unwrap();
        bad_unit["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] = "Things".into();
        for broken in [no_value, no_dimension, bad_unit] {
            let line = broken.to_string();
            assert!(
                std::panic::catch_unwind(|| check_emf(&line)).is_err(),
                "accepted {line}"
            );
        }
    }

    #[test]
    fn kickoffs_are_fhir_export_requests() {
        let parts = |method: &str, uri: &str| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert!(Kickoff::of(&parts("GET", "/fhir/$export")).0);
        assert!(Kickoff::of(&parts("POST", "/fhir/Group/g1/$export")).0);
        assert!(Kickoff::of(&parts("GET", "/fhir/Patient/$export?_type=Patient")).0);
        assert!(!Kickoff::of(&parts("GET", "/fhir/$export-status/abc")).0);
        assert!(!Kickoff::of(&parts("DELETE", "/fhir/$export")).0);
        assert!(!Kickoff::of(&parts("POST", "/api/v1/exports")).0);
    }

    #[test]
    fn a_redelivered_message_is_a_retry() {
        let mut record = SqsMessage::default();
        assert_eq!(receive_count(&record), 1);
        record
            .attributes
            .insert("ApproximateReceiveCount".into(), "3".into());
        assert_eq!(receive_count(&record), 3);
    }
}
