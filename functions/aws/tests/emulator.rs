//! The three Lambda binaries (`api`, `worker`, `coordinator`, as `cargo build` made them) run as
//! Lambda runs them: as processes that take their invocations from a Lambda Runtime API, here the
//! emulator of `cargo lambda watch` (`--only-lambda-apis`: it serves the Runtime and Invoke APIs
//! and leaves starting the functions to this test, so nothing is compiled a second time), with
//! the environment `template.yaml` gives each function, against moto. The test plays API Gateway
//! (HTTP API payload v2 events: token, kick-off, status, downloads) and the SQS event source
//! mappings (events built from the messages the state machine put on moto's queues). So the
//! mains, their environment configuration and their log output are exercised, not only the
//! handlers in-process (which `moto.rs` covers).
//!
//! Needs `MOTO_ENDPOINT` (tests/run.sh starts moto), `cargo-lambda` (tests/run.sh installs it
//! into `.tools/lambda`; `CARGO_LAMBDA` names another) and the debug binaries built
//! (`cargo build --workspace --bins`, which tests/run.sh runs first).

mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The functions of the template and their binaries.
const FUNCTIONS: [(&str, &str); 3] = [
    ("api", "ApiFunction"),
    ("worker", "WorkerFunction"),
    ("coordinator", "CoordinatorFunction"),
];
const STACK: &str = "emulator";

fn cargo_lambda() -> PathBuf {
    std::env::var_os("CARGO_LAMBDA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/lambda/bin/cargo-lambda"))
}

fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug").join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment variable names `template.yaml` gives a function: the `Globals` ones and its
/// own (read from the YAML's layout: the keys under each `Variables:`).
fn template_variables(function: &str) -> BTreeSet<String> {
    let template = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let mut names = BTreeSet::new();
    let mut section = "";
    let mut resource = String::new();
    let mut variables_indent: Option<usize> = None;
    for line in template.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if indent == 0 {
            section = if line.starts_with("Globals:") {
                "Globals"
            } else if line.starts_with("Resources:") {
                "Resources"
            } else {
                ""
            };
            variables_indent = None;
            continue;
        }
        if section == "Resources" && indent == 2 {
            resource = text.trim_end_matches(':').to_string();
        }
        if let Some(at) = variables_indent {
            if indent <= at {
                variables_indent = None;
            } else if indent == at + 2 {
                let in_scope = section == "Globals" || resource == function;
                if let Some((name, _)) = text.split_once(':')
                    && in_scope
                {
                    names.insert(name.to_string());
                }
                continue;
            } else {
                continue;
            }
        }
        if text == "Variables:" && (section == "Globals" || section == "Resources") {
            variables_indent = Some(indent);
        }
    }
    names
}

/// The value a template variable has in this moto deployment.
fn value_of(aws: &Deployment, name: &str) -> String {
    let s = &aws.settings;
    match name {
        "RESOURCES_TABLE" => s.resources_table.clone(),
        "JOBS_TABLE" => s.jobs_table.clone(),
        "EXPORT_BUCKET" => s.bucket.clone(),
        "WORK_QUEUE_URL" => s.work_queue_url.clone(),
        "AUTH_TABLE" => s.auth_table.clone(),
        "STUDY_TABLE" => s.study_table.clone(),
        "STATE_MACHINE_ARN" => aws.state_machine_arn.clone(),
        "SIGNING_KEY_ID" => s.signing_key_id.clone().expect("a KMS key"),
        "TOKEN_ISSUER" => format!("urn:bulk-export:{STACK}"),
        "STACK_NAME" => STACK.into(),
        "RESOURCE_BUCKET" => s.resource_bucket.clone().unwrap_or_default(),
        "SHARDS" => s.shards.to_string(),
        "URL_EXPIRY_SECONDS" => "300".into(),
        "GZIP_OUTPUT" => "true".into(),
        "MAX_FILE_BYTES" => "67108864".into(),
        "RETENTION_DAYS" => "1".into(),
        "PRESIGNED_MANIFESTS" => "false".into(),
        "WORKER_RESERVE_MS" => "60000".into(),
        "WORK_MAX_ATTEMPTS" => "5".into(),
        "RETRY_BASE_SECONDS" => "30".into(),
        "RETRY_MAX_SECONDS" => "300".into(),
        // No external OpenID issuer and no page URL: the template's defaults without a user pool.
        "OIDC_ISSUER" | "OIDC_AUDIENCE" | "OIDC_JWKS_URL" | "OIDC_PAGE_CLIENT" | "PAGE_URL" => {
            String::new()
        }
        other => panic!(
            "template.yaml gives {other} to a function: tell tests/emulator.rs (value_of) its value \
             against moto, so the binaries run with the template's whole environment"
        ),
    }
}

/// The emulator and the three function processes; all are killed when dropped.
struct Lambdas {
    port: u16,
    children: Vec<Child>,
    logs: PathBuf,
}

impl Lambdas {
    fn start(aws: &Deployment) -> Lambdas {
        let tool = cargo_lambda();
        assert!(
            tool.exists(),
            "{} is missing: tests/run.sh installs cargo-lambda (pip) into .tools/lambda",
            tool.display()
        );
        let logs = std::env::temp_dir().join(format!("emulator-{}", std::process::id()));
        std::fs::create_dir_all(&logs).unwrap();
        let port = free_port();
        let emulator = Command::new(&tool)
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(repo_root())
            .stdout(log_file(&logs, "emulator.out"))
            .stderr(log_file(&logs, "emulator.err"))
            .spawn()
            .expect("start cargo lambda watch");
        let mut lambdas = Lambdas {
            port,
            children: vec![emulator],
            logs,
        };
        lambdas.wait_for_port();
        for (function, resource) in FUNCTIONS {
            let path = binary(function);
            assert!(
                path.exists(),
                "{} is missing: build it with `cargo build --workspace --bins`",
                path.display()
            );
            let mut command = Command::new(&path);
            command
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", &lambdas.logs)
                // What Lambda sets for a custom runtime.
                .env(
                    "AWS_LAMBDA_RUNTIME_API",
                    format!("http://127.0.0.1:{port}/.rt/{function}"),
                )
                .env("AWS_LAMBDA_FUNCTION_NAME", function)
                .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
                .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                // Every AWS client of the function goes to moto.
                .env("AWS_ENDPOINT_URL", endpoint());
            let variables = template_variables(resource);
            assert!(
                variables.contains("RESOURCES_TABLE"),
                "read the template's variables of {resource}: {variables:?}"
            );
            for name in &variables {
                command.env(name, value_of(aws, name));
            }
            let child = command
                .stdout(log_file(&lambdas.logs, &format!("{function}.out")))
                .stderr(log_file(&lambdas.logs, &format!("{function}.err")))
                .spawn()
                .expect("start a function");
            lambdas.children.push(child);
        }
        lambdas
    }

    fn wait_for_port(&mut self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.children[0].try_wait().unwrap() {
                panic!(
                    "cargo lambda watch exited ({status}): {}",
                    self.log("emulator.err")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the emulator did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(name)).unwrap_or_default()
    }

    /// Invokes `function` through the emulator's Invoke API and returns its response payload.
    fn invoke(&self, function: &str, event: &Value) -> Value {
        let url = format!(
            "http://127.0.0.1:{}/2015-03-31/functions/{function}/invocations",
            self.port
        );
        let response = ureq::post(&url)
            .timeout(Duration::from_secs(300))
            .send_string(&event.to_string());
        let mut body = String::new();
        let status = match response {
            Ok(r) => {
                let status = r.status();
                r.into_reader().read_to_string(&mut body).unwrap();
                status
            }
            Err(ureq::Error::Status(status, r)) => {
                r.into_reader().read_to_string(&mut body).unwrap();
                status
            }
            Err(e) => panic!("invoke {function}: {e}"),
        };
        assert_eq!(
            status,
            200,
            "{function} failed: {body}\n{}",
            self.log(&format!("{function}.err"))
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{function} answered {body}: {e}"))
    }
}

impl Drop for Lambdas {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(name)).unwrap())
}

/// An API Gateway answer, read from the function's response payload.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn is_outcome(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.json()["resourceType"],
            "OperationOutcome",
            "{}",
            self.body
        );
    }
}

/// Sends an HTTP API (payload v2) event, built from `events/api-kickoff-system.json`, to the api
/// function. Every answer is checked for what must never reach a client.
fn call(
    lambdas: &Lambdas,
    method: &str,
    target: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut event: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("events/api-kickoff-system.json")).unwrap(),
    )
    .unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    event["rawPath"] = path.into();
    event["rawQueryString"] = query.into();
    event["requestContext"]["http"]["method"] = method.into();
    event["requestContext"]["http"]["path"] = path.into();
    for (name, value) in headers {
        event["headers"][name.to_ascii_lowercase()] = (*value).into();
    }
    if let Some(body) = body {
        event["body"] = body.into();
    }
    let payload = lambdas.invoke("api", &event);
    let headers: BTreeMap<String, String> = payload["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let answer = Answer {
        status: payload["statusCode"].as_u64().expect("statusCode") as u16,
        body: payload["body"].as_str().unwrap_or("").to_string(),
        headers,
    };
    let seen = format!("{} {:?}", answer.body, answer.headers);
    for secret in [
        "arn:aws",
        "123456789012",
        "dynamodb",
        "stepfunctions",
        "Sdk",
    ] {
        assert!(
            !seen.contains(secret),
            "{method} {target}: a client answer names {secret}: {seen}"
        );
    }
    answer
}

/// An SQS event of one message, as the event source mapping sends it.
fn sqs_event(message: &aws_sdk_sqs::types::Message, queue_url: &str) -> Value {
    let name = queue_url.rsplit('/').next().unwrap();
    let count = message
        .attributes()
        .and_then(|a| {
            a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
        })
        .cloned()
        .unwrap_or_else(|| "1".into());
    json!({"Records": [{
        "messageId": message.message_id(),
        "receiptHandle": message.receipt_handle(),
        "body": message.body(),
        "attributes": {"ApproximateReceiveCount": count, "SentTimestamp": "0",
                       "SenderId": "AIDAEXAMPLE", "ApproximateFirstReceiveTimestamp": "0"},
        "messageAttributes": {},
        "md5OfBody": message.md5_of_body(),
        "eventSource": "aws:sqs",
        "eventSourceARN": format!("arn:aws:sqs:us-east-1:123456789012:{name}"),
        "awsRegion": "us-east-1",
    }]})
}

/// Plays the event source mappings once: every visible message of both queues goes to its
/// function as a one-record event; a message the function does not report as failed is deleted.
/// Returns how many messages were handed over.
async fn deliver(aws: &Deployment, lambdas: &Lambdas) -> usize {
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let mut handed = 0;
    for (queue, function) in [
        (aws.coordinator_queue.clone(), "coordinator"),
        (aws.settings.work_queue_url.clone(), "worker"),
    ] {
        let out = sqs
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        for message in out.messages() {
            handed += 1;
            let response = lambdas.invoke(function, &sqs_event(message, &queue));
            let failures = response["batchItemFailures"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if failures.is_empty() {
                sqs.delete_message()
                    .queue_url(&queue)
                    .receipt_handle(message.receipt_handle().unwrap())
                    .send()
                    .await
                    .expect("delete");
            }
        }
    }
    handed
}

/// The EMF documents among a function's log lines: metric name → values.
fn metrics_in(log: &str) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        let Some(directives) = v["_aws"]["CloudWatchMetrics"].as_array() else {
            continue;
        };
        for directive in directives {
            assert_eq!(directive["Namespace"], "BulkExport");
            for metric in directive["Metrics"].as_array().unwrap() {
                let name = metric["Name"].as_str().unwrap();
                out.entry(name.to_string())
                    .or_default()
                    .push(v[name].as_f64().unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lambda_binaries_export_under_the_runtime_emulator() {
    // One patient (about 300 resources over 19 types): enough for several work items, small
    // enough for moto.
    let resources = generated(1);
    let data = live_values(&resources);
    let aws = Deployment::create_secured(|_| {}).await;
    aws.load(resources).await;
    // A registered SMART client (its key made by the test's own client code).
    let client = e2e_tests::smart::TestClient::new("emulator-client");
    {
        use export_auth::ports::{ClientKeys, ClientStore, RegisteredClient};
        aws.service
            .auth_store
            .put_client(&RegisteredClient {
                id: client.id.clone(),
                keys: ClientKeys::Inline(client.jwks.clone()),
                allowed_scopes: "system/*.rs".into(),
                created: 0,
            })
            .await
            .unwrap();
    }
    let lambdas = Lambdas::start(&aws);

    // Authentication is on with the Lambda's environment: no token, no export.
    call(
        &lambdas,
        "GET",
        "/fhir/$export",
        None,
        &[("prefer", "respond-async")],
    )
    .is_outcome(401);
    let metadata = call(&lambdas, "GET", "/fhir/metadata", None, &[]);
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");

    // A token from the token endpoint, signed by the KMS key named in SIGNING_KEY_ID.
    let token_url = "https://abc123.execute-api.us-east-1.amazonaws.com/auth/token";
    let form = format!(
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}&scope=system%2F%2A.rs",
        client.assertion(token_url, |_| {})
    );
    let token = call(
        &lambdas,
        "POST",
        "/auth/token",
        Some(&form),
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(token.status, 200, "{}", token.body);
    let bearer = format!("Bearer {}", token.json()["access_token"].as_str().unwrap());
    let auth = [
        ("authorization", bearer.as_str()),
        ("accept", "application/fhir+json"),
        ("prefer", "respond-async"),
    ];
    call(
        &lambdas,
        "GET",
        "/fhir/$export-status/0123456789abcdef0123456789abcdef",
        None,
        &auth,
    )
    .is_outcome(404);

    let kick = call(&lambdas, "GET", "/fhir/$export", None, &auth);
    assert_eq!(kick.status, 202, "{}", kick.body);
    let location = kick.headers["content-location"].clone();
    let status_path = &location[location.find("/fhir/").unwrap()..];

    // Play the event sources until the status says done.
    let started = Instant::now();
    let manifest = loop {
        let handed = deliver(&aws, &lambdas).await;
        let status = call(&lambdas, "GET", status_path, None, &auth);
        match status.status {
            200 => break status.json(),
            202 => assert!(status.headers.contains_key("x-progress")),
            other => panic!("status {other}: {}", status.body),
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the export did not finish under the emulator"
        );
        if handed == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // Download every file through the checked route: 307 to a presigned URL.
    assert_eq!(manifest["requiresAccessToken"], true);
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut bytes = 0u64;
    for entry in manifest["output"].as_array().unwrap() {
        let url = entry["url"].as_str().unwrap();
        let path = &url[url.find("/fhir/").expect("the API's download route")..];
        let redirect = call(&lambdas, "GET", path, None, &auth);
        assert_eq!(redirect.status, 307, "{}", redirect.body);
        let lines = fetch_lines(&redirect.headers["location"]);
        assert_eq!(lines.len() as u64, entry["count"].as_u64().unwrap());
        for line in lines {
            bytes += line.len() as u64 + 1;
            let v: Value = serde_json::from_str(&line).unwrap();
            got.entry(v["resourceType"].as_str().unwrap().to_string())
                .or_default()
                .push(v["id"].as_str().unwrap().to_string());
        }
    }
    got.values_mut().for_each(|ids| ids.sort());
    let want = e2e_tests::oracle::expected(&data, |_| true);
    assert_eq!(
        got, want,
        "every resource, as the oracle computes from the data"
    );
    let resources_total: usize = want.values().map(Vec::len).sum();

    // Give the last coordinator messages (if any) their turn, then read the logs.
    while deliver(&aws, &lambdas).await > 0 {}
    let api_log = lambdas.log("api.out");
    let worker_log = lambdas.log("worker.out");
    let coordinator_log = lambdas.log("coordinator.out");
    for (name, log) in [
        ("api", &api_log),
        ("worker", &worker_log),
        ("coordinator", &coordinator_log),
    ] {
        assert!(!log.trim().is_empty(), "{name} wrote no log");
        // Every line is one JSON object (metrics_in panics on any other line).
        metrics_in(log);
    }
    assert!(
        api_log
            .lines()
            .any(|l| l.contains("\"route\":\"/fhir/$export\"")),
        "the api logs a line per request"
    );
    assert_eq!(metrics_in(&api_log)["ExportsStarted"], vec![1.0]);
    let coordinator = metrics_in(&coordinator_log);
    assert_eq!(coordinator["ExportsCompleted"], vec![1.0]);
    assert_eq!(
        coordinator["ResourcesExported"],
        vec![resources_total as f64]
    );
    assert_eq!(coordinator["BytesExported"], vec![bytes as f64]);
    let worker = metrics_in(&worker_log);
    assert!(!worker["ItemDuration"].is_empty());
    assert!(
        !worker.contains_key("ItemRetries"),
        "no message was delivered twice"
    );
}
