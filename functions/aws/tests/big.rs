//! Resources and exports of any size against moto: bodies over the item limit, a Group of 20,000
//! members, a Provenance naming one target twice, a crash between the writes of a version, and a
//! manifest of more files than one Lambda response holds. Expectations come from the input data (and the local mode as a second check).

mod support;

use aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemInput;
use aws_sdk_dynamodb::operation::put_item::PutItemInput;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemInput;
use aws_sdk_dynamodb::types::AttributeValue;
use export_aws::dynamo::DynamoTable;
use export_aws::resources::DynamoResourceStore;
use export_core::Settings;
use export_core::fhir::time::now_millis;
use export_core::params::{ExportLevel, ExportParams};
use export_core::ports::{NewResource, PatientScope, ReadScope, ResourceStore};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::*;

/// DynamoDB's item size limit.
const ITEM_LIMIT: usize = 400 * 1024;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique(name: &str) -> String {
    format!(
        "big{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn s3(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(true)
            .build(),
    )
}

/// A bucket for resource bodies, created in moto.
async fn body_bucket(sdk: &aws_config::SdkConfig) -> String {
    let bucket = unique("bodies");
    s3(sdk)
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket");
    bucket
}

/// A deployment whose resource store keeps big bodies in a bucket of its own.
async fn deployment() -> Deployment {
    let sdk = sdk_config().await;
    let bucket = body_bucket(&sdk).await;
    Deployment::create(move |s| s.resource_bucket = Some(bucket)).await
}

/// A resource as `load` prepares it.
fn prepared(json: Value) -> NewResource {
    export_core::load::prepare(json, now_millis()).expect("valid resource")
}

/// The line an export writes for the first version of `r`, from the input alone.
fn first_version(r: &NewResource) -> Value {
    let mut json = r.json.clone();
    json["meta"]["versionId"] = json!("1");
    json
}

/// A valid base64 string of `len` characters.
fn base64_of_len(len: usize) -> String {
    "QUJD".repeat(len / 4)
}

/// The bytes DynamoDB counts for an item (names and values).
fn item_size(item: &std::collections::HashMap<String, AttributeValue>) -> usize {
    fn value(v: &AttributeValue) -> usize {
        match v {
            AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
            AttributeValue::L(l) => 3 + l.iter().map(|v| 1 + value(v)).sum::<usize>(),
            AttributeValue::Ss(s) => s.iter().map(String::len).sum(),
            AttributeValue::M(m) => {
                3 + m.iter().map(|(k, v)| 1 + k.len() + value(v)).sum::<usize>()
            }
            _ => 1,
        }
    }
    item.iter().map(|(k, v)| k.len() + value(v)).sum()
}

/// The largest item of a table (its size and key).
async fn largest_item(sdk: &aws_config::SdkConfig, table: &str) -> (usize, String) {
    let client = aws_sdk_dynamodb::Client::new(sdk);
    let mut largest = (0, String::new());
    let mut start = None;
    loop {
        let out = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan");
        for item in out.items() {
            let size = item_size(item);
            if size > largest.0 {
                let key = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
                largest = (size, format!("{:?}/{:?}", key("pk"), key("sk")));
            }
        }
        match out.last_evaluated_key {
            Some(key) if !key.is_empty() => start = Some(key),
            _ => return largest,
        }
    }
}

/// Exports `path` on AWS and returns type → lines (sorted).
async fn export(aws: &Deployment, path: &str) -> BTreeMap<String, Vec<String>> {
    let kick = aws.kickoff(path).await;
    assert_eq!(kick.status, 202, "{path}: {}", kick.body);
    download(&aws.wait_for_manifest(&kick.status_path()).await)
}

fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_item_limit_export_byte_identically_at_every_level() {
    let patient = prepared(json!({"resourceType": "Patient", "id": "pat-big",
        "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}, "name": [{"family": "Large"}]}));
    let binary = prepared(json!({"resourceType": "Binary", "id": "bin-1mb",
        "meta": {"lastUpdated": "2024-01-02T00:00:00Z"},
        "contentType": "application/pdf", "data": base64_of_len(1024 * 1024)}));
    let document = prepared(
        json!({"resourceType": "DocumentReference", "id": "doc-500kb",
        "meta": {"lastUpdated": "2024-01-03T00:00:00Z"}, "status": "current",
        "subject": {"reference": "Patient/pat-big"},
        "content": [{"attachment": {"contentType": "text/plain",
            "data": base64_of_len(500 * 1024)}}]}),
    );
    let small_document = prepared(
        json!({"resourceType": "DocumentReference", "id": "doc-small",
        "meta": {"lastUpdated": "2024-01-04T00:00:00Z"}, "status": "superseded",
        "subject": {"reference": "Patient/pat-big"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "QUJD"}}]}),
    );
    let group = prepared(json!({"resourceType": "Group", "id": "grp-big",
        "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}, "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/pat-big"}}]}));
    assert_eq!(
        document.patients,
        ["pat-big"],
        "the document is in the compartment"
    );
    let resources = vec![patient, binary, document, small_document, group];
    let by_id: BTreeMap<String, Value> = resources
        .iter()
        .map(|r| (r.id.clone(), first_version(r)))
        .collect();

    let mut aws = deployment().await;
    aws.load(resources.clone()).await;
    let (size, key) = largest_item(&aws.sdk, &aws.settings.resources_table).await;
    assert!(size < ITEM_LIMIT, "{key} is {size} bytes");
    aws.start_lambdas(Delivery::Once, None);

    let cases = [
        (
            "/fhir/$export?_type=Binary,DocumentReference",
            ExportLevel::System,
            "Binary,DocumentReference",
            vec!["bin-1mb", "doc-500kb", "doc-small"],
        ),
        (
            "/fhir/Patient/$export?_type=DocumentReference",
            ExportLevel::Patient,
            "DocumentReference",
            vec!["doc-500kb", "doc-small"],
        ),
        (
            "/fhir/Group/grp-big/$export?_type=DocumentReference",
            ExportLevel::Group("grp-big".into()),
            "DocumentReference",
            vec!["doc-500kb", "doc-small"],
        ),
    ];
    for (path, level, types, ids) in cases {
        let exported = export(&aws, path).await;
        let mut got: Vec<Value> = exported.values().flat_map(|l| parsed(l)).collect();
        got.sort_by_key(|v| v["id"].as_str().unwrap().to_string());
        let want: Vec<Value> = ids.iter().map(|id| by_id[*id].clone()).collect();
        assert!(got == want, "{path}: the input's resources, whole");
        let params = ExportParams {
            types: Some(types.split(',').map(String::from).collect()),
            ..ExportParams::default()
        };
        assert!(
            exported == local_mode_export(&resources, level, params, &Settings::default()).await,
            "{path}: byte-identical to the local mode"
        );
    }

    // _typeFilter and _elements read the big bodies too.
    let filtered = export(
        &aws,
        "/fhir/Patient/$export?_type=DocumentReference&_typeFilter=DocumentReference%3Fstatus%3Dcurrent",
    )
    .await;
    let got = parsed(&filtered["DocumentReference"]);
    assert_eq!(got, [by_id["doc-500kb"].clone()], "status=current");
    let trimmed = export(
        &aws,
        "/fhir/$export?_type=Binary&_elements=Binary.contentType",
    )
    .await;
    let got = parsed(&trimmed["Binary"]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["contentType"], "application/pdf");
    assert!(got[0].get("data").is_none(), "data left out by _elements");
    let params = ExportParams {
        types: Some(vec!["Binary".into()]),
        elements: vec!["Binary.contentType".into()],
        ..ExportParams::default()
    };
    assert!(
        trimmed
            == local_mode_export(
                &resources,
                ExportLevel::System,
                params,
                &Settings::default()
            )
            .await
    );
    aws.check();
}

/// Fails DynamoDB requests as the real service would where moto does not (a string set that names
/// a value twice), and fails the `fail_at`-th write request once (a crash between writes).
#[derive(Debug, Default)]
struct Faults {
    writes: AtomicUsize,
    fail_at: AtomicUsize,
}

impl Intercept for Faults {
    fn name(&self) -> &'static str {
        "Faults"
    }

    fn read_before_execution(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = context.input();
        if let Some(update) = input.downcast_ref::<UpdateItemInput>() {
            for value in update.expression_attribute_values().into_iter().flatten() {
                if let (_, AttributeValue::Ss(set)) = value
                    && set.iter().collect::<BTreeSet<_>>().len() != set.len()
                {
                    return Err("ValidationException: Input collection contains duplicates".into());
                }
            }
        }
        let write = input.downcast_ref::<TransactWriteItemsInput>().is_some()
            || input.downcast_ref::<BatchWriteItemInput>().is_some()
            || input.downcast_ref::<PutItemInput>().is_some()
            || input.downcast_ref::<UpdateItemInput>().is_some();
        if write {
            let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.fail_at.load(Ordering::SeqCst) {
                return Err(format!("injected crash at write {n}").into());
            }
        }
        Ok(())
    }
}

/// A resource store over `table` whose DynamoDB client goes through `faults`.
async fn store_with(
    table: &str,
    bucket: &str,
    shards: u32,
    faults: Arc<Faults>,
) -> DynamoResourceStore {
    let sdk = sdk_config().await;
    let config = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .interceptor(FaultsRef(faults))
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    DynamoResourceStore::new(DynamoTable::new(client, table), shards)
        .with_bodies(s3(&sdk), Some(bucket.to_string()))
}

/// Shares one [`Faults`] between the client and the test.
#[derive(Debug)]
struct FaultsRef(Arc<Faults>);

impl Intercept for FaultsRef {
    fn name(&self) -> &'static str {
        "Faults"
    }

    fn read_before_execution(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.read_before_execution(context, cfg)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provenance_naming_one_target_twice_is_indexed_once() {
    let sdk = sdk_config().await;
    let bucket = body_bucket(&sdk).await;
    let table = unique("prov");
    DynamoTable::create(&aws_sdk_dynamodb::Client::new(&sdk), &table)
        .await
        .unwrap();
    let store = store_with(&table, &bucket, 2, Arc::new(Faults::default())).await;

    // The guard itself refuses what DynamoDB refuses (moto accepts it).
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(Faults::default())
            .build(),
    );
    let duplicate = client
        .update_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("x".into()))
        .key("sk", AttributeValue::S("y".into()))
        .update_expression("ADD ids :v")
        .expression_attribute_values(":v", AttributeValue::Ss(vec!["a".into(), "a".into()]))
        .send()
        .await;
    assert!(duplicate.is_err(), "the guard models DynamoDB's refusal");

    let patient = prepared(json!({"resourceType": "Patient", "id": "p1"}));
    let provenance = prepared(json!({"resourceType": "Provenance", "id": "prov-twice",
        "recorded": "2024-01-01T00:00:00Z",
        "target": [{"reference": "Patient/p1"}, {"reference": "Patient/p1"},
                   {"reference": "Observation/o1"}],
        "agent": [{"who": {"display": "x"}}]}));
    store
        .put_resources(vec![patient, provenance])
        .await
        .expect("a Provenance naming its target twice loads");
    assert_eq!(
        store
            .provenance_targeting(&["Patient/p1".into()])
            .await
            .unwrap(),
        ["prov-twice"]
    );
    assert_eq!(
        store
            .provenance_targeting(&["Observation/o1".into()])
            .await
            .unwrap(),
        ["prov-twice"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_20000_members_loads_and_its_members_read_back_complete() {
    let sdk = sdk_config().await;
    let bucket = body_bucket(&sdk).await;
    let table = unique("group");
    DynamoTable::create(&aws_sdk_dynamodb::Client::new(&sdk), &table)
        .await
        .unwrap();
    let store = store_with(&table, &bucket, 4, Arc::new(Faults::default())).await;
    let members: Vec<String> = (0..20_000).map(|i| format!("pat-{i:06}")).collect();
    let group_json = |members: &[String], updated: &str| {
        json!({"resourceType": "Group", "id": "grp-20k", "type": "person", "actual": true,
            "meta": {"lastUpdated": updated},
            "member": members.iter()
                .map(|m| json!({"entity": {"reference": format!("Patient/{m}")}}))
                .collect::<Vec<_>>()})
    };
    let group = prepared(group_json(&members, "2024-01-01T00:00:00Z"));
    assert_eq!(
        group.patients.len(),
        20_000,
        "in every member's compartment"
    );
    let started = std::time::Instant::now();
    store.put_resources(vec![group]).await.expect("load");
    println!(
        "a Group of 20,000 members loaded in {:?}",
        started.elapsed()
    );
    let (size, key) = largest_item(&sdk, &table).await;
    assert!(size < ITEM_LIMIT, "{key} is {size} bytes");

    let now = now_millis();
    let mut read: Vec<String> = store
        .group_members("grp-20k", now)
        .await
        .unwrap()
        .expect("the Group exists");
    read.sort();
    assert_eq!(read, members, "every member, once");

    // Its compartment entries: read under each listed member, once per export.
    let in_compartments = |patients: Vec<String>| {
        let store = &store;
        async move {
            let scope = ReadScope {
                resource_type: "Group".into(),
                partition: 0,
                partitions: 1,
                since: None,
                until: now_millis(),
                as_of: now_millis(),
                patients: PatientScope::Listed(Arc::new(patients)),
                deleted: false,
            };
            read_all(store, &scope).await
        }
    };
    let last = members.last().unwrap().clone();
    let got = in_compartments(vec![members[7].clone(), last.clone()]).await;
    assert_eq!(got.len(), 1, "once for two listed members");
    assert_eq!(version_of(&got[0]), "1");

    // A second version without the last member leaves that member's compartment at once.
    let fewer = &members[..members.len() - 1];
    store
        .put_resources(vec![prepared(group_json(fewer, "2024-02-01T00:00:00Z"))])
        .await
        .expect("second version");
    assert!(in_compartments(vec![last.clone()]).await.is_empty());
    let got = in_compartments(vec![members[0].clone()]).await;
    assert_eq!(got.iter().map(version_of).collect::<Vec<_>>(), ["2"]);
    let mut read = store
        .group_members("grp-20k", now_millis())
        .await
        .unwrap()
        .unwrap();
    read.sort();
    assert_eq!(read, fewer);
}

/// Every resource a scope reads, over all its pages.
async fn read_all(store: &DynamoResourceStore, scope: &ReadScope) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .read_page(scope, cursor.as_deref(), 100)
            .await
            .expect("read");
        out.extend(
            page.resources
                .iter()
                .map(|r| serde_json::from_slice::<Value>(&r.json).unwrap()),
        );
        if !page.more {
            return out;
        }
        cursor = page.next;
    }
}

fn version_of(v: &Value) -> String {
    v["meta"]["versionId"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Two versions of a few resources: `(first, second)`; the second changes each one's content.
fn two_versions() -> (Vec<NewResource>, Vec<NewResource>) {
    let members: Vec<Value> = (0..60)
        .map(|i| json!({"entity": {"reference": format!("Patient/m{i:02}")}}))
        .collect();
    let version = |n: u32, updated: &str| {
        let mut out = vec![
            prepared(json!({"resourceType": "Patient", "id": "p1",
                "meta": {"lastUpdated": updated}, "name": [{"family": format!("V{n}")}]})),
            prepared(json!({"resourceType": "Group", "id": "g-wide",
                "meta": {"lastUpdated": updated}, "type": "person", "actual": true,
                "name": format!("V{n}"), "member": members})),
        ];
        for i in 0..3 {
            out.push(prepared(
                json!({"resourceType": "Observation", "id": format!("o{i}"),
                "meta": {"lastUpdated": updated}, "status": "final",
                "code": {"text": format!("V{n}")}, "subject": {"reference": "Patient/p1"}}),
            ));
        }
        out
    };
    (
        version(1, "2024-01-01T00:00:00Z"),
        version(2, "2024-06-01T00:00:00Z"),
    )
}

/// Which version (by the `V<n>` the test wrote into it) of each resource a store shows:
/// `(type, id) → versions seen`, over every shard and over the compartments of `patients`.
async fn visible(
    store: &DynamoResourceStore,
    shards: u32,
    patients: &[String],
) -> BTreeMap<(String, String, &'static str), Vec<String>> {
    let mut seen: BTreeMap<(String, String, &'static str), Vec<String>> = BTreeMap::new();
    for resource_type in ["Patient", "Group", "Observation"] {
        let mut scopes = Vec::new();
        for partition in 0..shards {
            scopes.push((
                "type",
                ReadScope {
                    resource_type: resource_type.into(),
                    partition,
                    partitions: shards,
                    since: None,
                    until: now_millis(),
                    as_of: now_millis(),
                    patients: PatientScope::Everything,
                    deleted: false,
                },
            ));
        }
        scopes.push((
            "compartments",
            ReadScope {
                resource_type: resource_type.into(),
                partition: 0,
                partitions: 1,
                since: None,
                until: now_millis(),
                as_of: now_millis(),
                patients: PatientScope::Listed(Arc::new(patients.to_vec())),
                deleted: false,
            },
        ));
        for (how, scope) in scopes {
            for v in read_all(store, &scope).await {
                let label = v["name"][0]["family"]
                    .as_str()
                    .or(v["name"].as_str())
                    .or(v["code"]["text"].as_str())
                    .unwrap()
                    .to_string();
                seen.entry((resource_type.into(), v["id"].as_str().unwrap().into(), how))
                    .or_default()
                    .push(label);
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_the_writes_of_a_version_never_shows_two_versions() {
    let sdk = sdk_config().await;
    let bucket = body_bucket(&sdk).await;
    let (first, second) = two_versions();
    let mut patients: Vec<String> = first.iter().flat_map(|r| r.patients.clone()).collect();
    patients.sort();
    patients.dedup();
    let ids: BTreeSet<(String, String)> = first
        .iter()
        .map(|r| (r.resource_type.clone(), r.id.clone()))
        .collect();
    // Where the oracle expects each resource: its type's shards, and (for those in a
    // compartment) the compartments.
    let places = |label: &str| -> BTreeMap<(String, String, &'static str), Vec<String>> {
        let mut out = BTreeMap::new();
        for r in &first {
            out.insert(
                (r.resource_type.clone(), r.id.clone(), "type"),
                vec![label.to_string()],
            );
            if !r.patients.is_empty() {
                out.insert(
                    (r.resource_type.clone(), r.id.clone(), "compartments"),
                    vec![label.to_string()],
                );
            }
        }
        out
    };
    assert_eq!(ids.len(), 5);

    // A crash at every write of the second load in turn: afterwards each resource shows one
    // version (either), and after the load is retried, the second one only.
    let mut crash_points = 0;
    for fail_at in 1.. {
        let table = unique("crash");
        DynamoTable::create(&aws_sdk_dynamodb::Client::new(&sdk), &table)
            .await
            .unwrap();
        let healthy = store_with(&table, &bucket, 2, Arc::new(Faults::default())).await;
        healthy.put_resources(first.clone()).await.expect("first");
        assert_eq!(visible(&healthy, 2, &patients).await, places("V1"));
        let faults = Arc::new(Faults::default());
        faults.fail_at.store(fail_at, Ordering::SeqCst);
        let crashing = store_with(&table, &bucket, 2, faults.clone()).await;
        let crashed = crashing.put_resources(second.clone()).await.is_err();
        let after_crash = visible(&healthy, 2, &patients).await;
        for (place, versions) in &after_crash {
            assert_eq!(
                versions.len(),
                1,
                "crash at write {fail_at}: {place:?} {versions:?}"
            );
        }
        assert_eq!(
            after_crash.keys().collect::<Vec<_>>(),
            places("V1").keys().collect::<Vec<_>>(),
            "crash at write {fail_at}: every resource still visible"
        );
        if !crashed {
            assert_eq!(after_crash, places("V2"));
            break;
        }
        crash_points += 1;
        healthy.put_resources(second.clone()).await.expect("retry");
        assert_eq!(
            visible(&healthy, 2, &patients).await,
            places("V2"),
            "retried after a crash at write {fail_at}"
        );
        // Loading the same versions again adds none.
        healthy.put_resources(second.clone()).await.expect("again");
        let current = healthy
            .resources_at(&ids.iter().cloned().collect::<Vec<_>>(), now_millis())
            .await
            .unwrap();
        for version in current {
            let json: Value = serde_json::from_slice(&version.expect("present").json).unwrap();
            assert_eq!(version_of(&json), "2", "{json}");
        }
    }
    assert!(crash_points >= 3, "{crash_points} crash points");

    // The same through a whole export: the second write fails once, then the load is retried.
    let mut aws = deployment().await;
    aws.load(first.clone()).await;
    let faults = Arc::new(Faults::default());
    faults.fail_at.store(2, Ordering::SeqCst);
    let crashing = store_with(
        &aws.settings.resources_table,
        aws.settings.resource_bucket.as_deref().unwrap(),
        aws.settings.shards,
        faults,
    )
    .await;
    assert!(crashing.put_resources(second.clone()).await.is_err());
    aws.start_lambdas(Delivery::Once, None);
    let exported_ids = |exported: &BTreeMap<String, Vec<String>>| -> Vec<(String, String)> {
        let mut ids: Vec<(String, String)> = exported
            .values()
            .flat_map(|lines| parsed(lines))
            .map(|v| {
                (
                    v["resourceType"].as_str().unwrap().to_string(),
                    v["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        ids.sort();
        ids
    };
    let path = "/fhir/$export?_type=Patient,Group,Observation";
    let exported = export(&aws, path).await;
    assert_eq!(
        exported_ids(&exported),
        ids.iter().cloned().collect::<Vec<_>>()
    );
    aws.service
        .resources
        .put_resources(second.clone())
        .await
        .expect("retry");
    let exported = export(&aws, path).await;
    assert_eq!(
        exported_ids(&exported),
        ids.iter().cloned().collect::<Vec<_>>()
    );
    for v in exported.values().flat_map(|l| parsed(l)) {
        assert_eq!(version_of(&v), "2", "{v}");
    }
    aws.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shard_count_is_stored_with_the_table_and_another_is_refused() {
    let sdk = sdk_config().await;
    let bucket = body_bucket(&sdk).await;
    let table = unique("shards");
    DynamoTable::create(&aws_sdk_dynamodb::Client::new(&sdk), &table)
        .await
        .unwrap();
    let resources = generated(1);
    let four = store_with(&table, &bucket, 4, Arc::new(Faults::default())).await;
    four.put_resources(resources.clone()).await.expect("load");
    let two = store_with(&table, &bucket, 2, Arc::new(Faults::default())).await;
    let refused = two
        .put_resources(resources[..1].to_vec())
        .await
        .expect_err("another count");
    assert!(refused.to_string().contains("4 shards"), "{refused}");
    // A reader told another count reads the stored one, and finds every resource.
    assert_eq!(two.partitions("Observation", None).await.unwrap(), 4);
    let observations = resources
        .iter()
        .filter(|r| r.resource_type == "Observation")
        .count();
    let mut read = 0;
    for partition in 0..4 {
        let scope = ReadScope {
            resource_type: "Observation".into(),
            partition,
            partitions: 4,
            since: None,
            until: now_millis(),
            as_of: now_millis(),
            patients: PatientScope::Everything,
            deleted: false,
        };
        read += read_all(&two, &scope).await.len();
    }
    assert_eq!(read, observations);
    // Without an explicit count, a writer uses the stored one.
    let stored = store_with(&table, &bucket, 2, Arc::new(Faults::default()))
        .await
        .shards_from_table();
    stored
        .put_resources(resources[..1].to_vec())
        .await
        .expect("the stored count");
}

/// A manifest past 1,000 files is paged through the API Lambda (whose responses stop at 6 MB), and
/// the pages live beside the job: the job item stays small however many files the job wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_past_a_thousand_files_is_paged_and_the_job_item_stays_small() {
    let ids: Vec<String> = (0..1_050).map(|n| format!("p{n:04}")).collect();
    let resources: Vec<NewResource> = ids
        .iter()
        .map(|id| prepared(json!({"resourceType": "Patient", "id": id, "gender": "female"})))
        .collect();
    let mut aws = Deployment::create(|s| s.export.max_file_resources = 1).await;
    aws.load(resources).await;
    aws.start_lambdas(Delivery::Once, None);
    let kick = aws.kickoff("/fhir/$export?_type=Patient").await;
    assert_eq!(kick.status, 202, "{}", kick.body);
    let first = aws.wait_for_manifest(&kick.status_path()).await;
    let pages = aws.manifest_pages(first.clone()).await;

    // One Patient per file: 1,050 files, 1,000 on the first page.
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["output"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 50]);
    let mut merged = first.clone();
    merged["output"] = pages
        .iter()
        .flat_map(|p| p["output"].as_array().unwrap().iter().cloned())
        .collect();
    let exported = download(&merged);
    assert_eq!(
        ids_of_lines(&exported),
        BTreeMap::from([("Patient".to_string(), ids)])
    );
    // Polling again shows the same first page (the same objects; presigned URLs are minted anew).
    let again = aws.call("GET", &kick.status_path(), None).await;
    assert_eq!(manifest_files(&again.json()), manifest_files(&first));

    let job = kick.status_path().rsplit('/').next().unwrap().to_string();
    let item = aws_sdk_dynamodb::Client::new(&aws.sdk)
        .get_item()
        .table_name(&aws.settings.jobs_table)
        .key("pk", AttributeValue::S(format!("job#{job}")))
        .key("sk", AttributeValue::S("job".into()))
        .send()
        .await
        .expect("get the job item")
        .item
        .expect("the job item");
    let size = item_size(&item);
    assert!(
        size < 4096,
        "the job item holds {size} bytes for 1,050 files"
    );
}
