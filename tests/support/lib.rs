//! Test support: run the real `bulk-export` binary and talk to it over HTTP.

pub mod oracle;
pub mod smart;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The `bulk-export` binary built next to this test (`cargo build --bins` first).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("bulk-export{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` before the end-to-end tests (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A fresh scratch directory under the target directory. Directories are named after the test
/// process, and the first call of a process removes those of processes that have ended: a failed
/// run's data stays for inspection until the next run, and runs do not fill the disk.
pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    let root = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("e2e-scratch");
    SWEEP.call_once(|| remove_ended_runs(&root));
    let dir = root.join(format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Removes the scratch directories (`name-pid-n`) of test processes that are no longer running.
fn remove_ended_runs(root: &Path) {
    // Without /proc (not Linux) no process can be told to have ended: keep everything.
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        let running = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if pid.is_some() && !running {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs a `bulk-export` subcommand to completion and returns its stdout and stderr.
pub fn run_cli(args: &[&str]) -> (String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run bulk-export");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "bulk-export {args:?} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// Generates `patients` synthetic patients into `dir/data` and loads them into `dir/store.db`.
pub fn generated_store(dir: &Path, patients: usize) -> PathBuf {
    let data = dir.join("data");
    run_cli(&[
        "generate",
        "--patients",
        &patients.to_string(),
        "--out",
        data.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    let db = dir.join("store.db");
    run_cli(&["load", "--db", db.to_str().unwrap(), data.to_str().unwrap()]);
    data
}

/// A running `bulk-export serve`, killed when dropped.
pub struct Server {
    pub base: String,
    pub dir: PathBuf,
    extra: Vec<String>,
    log: Option<PathBuf>,
    child: Child,
}

impl Server {
    /// Starts a server over `dir/store.db` and `dir/exports` with extra `serve` arguments.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Self::start_with(dir, extra, None)
    }

    /// Like [`Server::start`], with the server's stderr (its log) written to `dir/server.log`.
    pub fn start_logged(dir: &Path, extra: &[&str]) -> Server {
        Self::start_with(dir, extra, Some(dir.join("server.log")))
    }

    fn start_with(dir: &Path, extra: &[&str], log: Option<PathBuf>) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, base) = spawn(dir, &extra, log.as_deref());
        Server {
            base,
            dir: dir.to_path_buf(),
            extra,
            log,
            child,
        }
    }

    /// Kills the process abruptly (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(&mut self) {
        self.crash();
        self.restart();
    }

    /// Kills the process abruptly (SIGKILL) and waits until it is gone; [`Server::restart`]
    /// starts it again.
    pub fn crash(&mut self) {
        self.child.kill().expect("kill server");
        self.child.wait().expect("reap server");
    }

    /// Starts the process again on the same data, after [`Server::crash`].
    pub fn restart(&mut self) {
        assert!(
            self.child.try_wait().expect("server state").is_some(),
            "restart after crash"
        );
        let (child, base) = spawn(&self.dir, &self.extra, self.log.as_deref());
        self.child = child;
        self.base = base;
    }

    /// What the server has logged so far (started with [`Server::start_logged`]).
    pub fn log(&self) -> String {
        let path = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(path).expect("server log")
    }

    pub fn exports_dir(&self) -> PathBuf {
        self.dir.join("exports")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET/POST kick-off with the required headers.
    pub fn kickoff(&self, path: &str) -> Response {
        request("GET", &self.url(path), &KICKOFF_HEADERS, None)
    }

    pub fn kickoff_post(&self, path: &str, body: &Value) -> Response {
        request(
            "POST",
            &self.url(path),
            &KICKOFF_HEADERS,
            Some(body.to_string()),
        )
    }

    /// Kicks off, polls to completion, and returns the manifest.
    pub fn export(&self, path: &str) -> Value {
        let kick = self.kickoff(path);
        assert_eq!(kick.status, 202, "kick-off {path}: {}", kick.body);
        wait_for_manifest(&kick.header("content-location").expect("Content-Location"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, extra: &[String], log: Option<&Path>) -> (Child, String) {
    // Without a log file the server's stderr is the test's: keep it to warnings and errors.
    let level = if log.is_some() { "info" } else { "warn" };
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("server log file"),
        ),
        None => Stdio::inherit(),
    };
    let mut child = Command::new(binary())
        .arg("serve")
        .args(["--addr", "127.0.0.1:0"])
        .args(["--db", dir.join("store.db").to_str().unwrap()])
        .args(["--output", dir.join("exports").to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", level)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start bulk-export serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .expect("read stdout");
        if let Some(rest) = line.strip_prefix("FHIR Bulk Data server listening on ") {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

pub const KICKOFF_HEADERS: [(&str, &str); 2] = [
    ("Accept", "application/fhir+json"),
    ("Prefer", "respond-async"),
];

/// An HTTP response, whatever its status.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// Asserts this is an error answered with an OperationOutcome.
    pub fn assert_outcome(&self, status: u16) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/fhir+json"),
            "{}",
            self.body
        );
        let body = self.json();
        assert_eq!(body["resourceType"], "OperationOutcome", "{}", self.body);
        assert!(
            body["issue"][0]["severity"].is_string() && body["issue"][0]["code"].is_string(),
            "{}",
            self.body
        );
    }
}

/// A number unique in this test process (for ids that must not repeat).
pub fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `%`-encodes every byte but ASCII letters, digits, `-`, `_` and `.`, for a query string.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends one request.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Response {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(60));
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let has_type = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    if body.is_some() && !has_type {
        req = req.set("Content-Type", "application/fhir+json");
    }
    let result = match body {
        Some(body) => req.send_string(&body),
        None => req.call(),
    };
    response_of(result, method, url)
}

/// The response of a request that reached the server, whatever its status (ureq reports 4xx and
/// 5xx as errors); a request that did not reach it fails the test.
pub fn response_of(
    result: Result<ureq::Response, ureq::Error>,
    method: &str,
    url: &str,
) -> Response {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .iter()
        .map(|n| (n.clone(), response.header(n).unwrap_or("").to_string()))
        .collect();
    let body = response.into_string().expect("response body");
    Response {
        status,
        headers,
        body,
    }
}

/// Sends `method` with the request-target exactly as given (no normalisation of `..`, `%2e` or
/// `\\`, which an HTTP client library would apply) to the server of `base`, over a fresh
/// connection, and returns the response with a de-chunked body.
pub fn raw_request(base: &str, method: &str, target: &[u8]) -> Response {
    use std::io::{Read, Write};
    let authority = base
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("http base url");
    let mut stream = std::net::TcpStream::connect(authority).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = Vec::new();
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    stream.write_all(&head).expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[..size.min(rest.len())]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        body = decoded;
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub fn get(url: &str) -> Response {
    request("GET", url, &[], None)
}

/// Polls a status URL until it answers 200 and returns the manifest.
pub fn wait_for_manifest(status_url: &str) -> Value {
    let started = Instant::now();
    loop {
        let r = get(status_url);
        match r.status {
            200 => {
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/json")
                );
                assert!(
                    r.header("expires").is_some(),
                    "a completed status has Expires"
                );
                return r.json();
            }
            202 => {
                let progress = r.header("x-progress").expect("X-Progress while running");
                assert!(progress.len() < 100, "X-Progress too long: {progress}");
                assert!(
                    r.header("retry-after").is_some(),
                    "Retry-After while running"
                );
            }
            other => panic!("status {other} while polling {status_url}: {}", r.body),
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "export did not finish in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Downloads every output file of a manifest, checks each line is a complete resource of the
/// file's type and each count matches, and returns the resources by type.
pub fn download_all(manifest: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in manifest["output"].as_array().expect("output array") {
        let url = entry["url"].as_str().expect("url");
        assert!(
            url.starts_with("http://"),
            "manifest urls are absolute: {url}"
        );
        let r = get(url);
        assert_eq!(r.status, 200, "download {url}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/fhir+ndjson")
        );
        let resource_type = entry["type"].as_str().expect("type");
        let lines: Vec<&str> = r.body.lines().collect();
        assert!(r.body.ends_with('\n'), "{url}: last line must be complete");
        assert_eq!(
            lines.len() as u64,
            entry["count"].as_u64().expect("count"),
            "{url}: count"
        );
        for line in lines {
            let resource: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{url}: bad line ({e}): {line}"));
            assert_eq!(resource["resourceType"], resource_type, "{url}");
            assert_eq!(
                serde_json::to_string(&resource).unwrap(),
                line,
                "{url}: lines are minified"
            );
            by_type
                .entry(resource_type.to_string())
                .or_default()
                .push(resource);
        }
    }
    by_type
}

/// `type → sorted ids` of exported resources, asserting no resource appears twice.
pub fn ids_by_type(resources: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, Vec<String>> {
    resources
        .iter()
        .map(|(t, list)| {
            let mut ids: Vec<String> = list
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            let before = ids.len();
            ids.dedup();
            assert_eq!(before, ids.len(), "{t}: a resource was exported twice");
            (t.clone(), ids)
        })
        .collect()
}

/// Every resource of an NDJSON directory.
pub fn read_ndjson_dir(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// An independent reading of the R4 Patient CompartmentDefinition (tests/fixtures), used as the
/// reference the server's compartment logic is compared with.
pub struct CompartmentReference {
    paths: BTreeMap<String, Vec<String>>,
}

impl CompartmentReference {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/patient-compartment.json"),
        )
        .unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let mut paths = BTreeMap::new();
        for r in doc["resources"].as_array().unwrap() {
            let t = r["resourceType"].as_str().unwrap().to_string();
            let params = r["params"].as_array().unwrap();
            if params.is_empty() {
                continue;
            }
            let mut list = Vec::new();
            for p in params {
                for branch in p["expression"].as_str().unwrap_or("").split(" | ") {
                    let branch = branch.trim();
                    let Some(path) = branch.strip_prefix(&format!("{t}.")) else {
                        continue;
                    };
                    list.push(path.split(".where(").next().unwrap().to_string());
                }
            }
            paths.insert(t, list);
        }
        CompartmentReference { paths }
    }

    /// Types with at least one compartment param.
    pub fn types(&self) -> impl Iterator<Item = (&String, &Vec<String>)> {
        self.paths.iter()
    }

    /// Patients whose compartment holds `resource` (by reference, plus a Patient itself).
    pub fn patients_of(&self, resource: &Value) -> Vec<String> {
        let t = resource["resourceType"].as_str().unwrap_or("");
        let mut out = Vec::new();
        if t == "Patient" {
            out.push(resource["id"].as_str().unwrap().to_string());
        }
        for path in self.paths.get(t).into_iter().flatten() {
            let mut values = vec![resource.clone()];
            for step in path.split('.') {
                values = values
                    .into_iter()
                    .flat_map(|v| match v.get(step) {
                        Some(Value::Array(a)) => a.clone(),
                        Some(other) => vec![other.clone()],
                        None => vec![],
                    })
                    .collect();
            }
            for v in values {
                if let Some(r) = v["reference"].as_str()
                    && let Some(id) = r.strip_prefix("Patient/")
                {
                    out.push(id.to_string());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}
