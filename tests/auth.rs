//! Authentication and authorization end to end, against `bulk-export serve --auth on`: SMART
//! Backend Services clients with keys generated here, the local issuer's user tokens, API keys,
//! ownership of exports, scopes, discovery, and rate limits.

use e2e_tests::smart::TestClient;
use e2e_tests::*;
use serde_json::Value;

const FHIR_JSON: &str = "application/fhir+json";

fn secured(name: &str, patients: usize, extra: &[&str]) -> Server {
    let dir = scratch_dir(name);
    generated_store(&dir, patients);
    let mut args = vec!["--auth", "on"];
    args.extend_from_slice(extra);
    Server::start_logged(&dir, &args)
}

fn with_token<'a>(token: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, String)> {
    let mut headers: Vec<(&str, String)> = vec![("Authorization", format!("Bearer {token}"))];
    headers.extend(extra.iter().map(|(n, v)| (*n, v.to_string())));
    headers
}

fn call(method: &str, url: &str, headers: &[(&str, String)]) -> Response {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    request(method, url, &headers, None)
}

fn kickoff_as(server: &Server, token: &str, path: &str) -> Response {
    call(
        "GET",
        &server.url(path),
        &with_token(token, &[("Accept", FHIR_JSON), ("Prefer", "respond-async")]),
    )
}

fn manifest_as(token: &str, status_url: &str) -> Value {
    for _ in 0..600 {
        let r = call("GET", status_url, &with_token(token, &[]));
        match r.status {
            200 => return r.json(),
            202 => std::thread::sleep(std::time::Duration::from_millis(100)),
            other => panic!("status {other}: {}", r.body),
        }
    }
    panic!("the export did not finish");
}

fn assert_unauthorized(r: &Response, why: &str) {
    r.assert_outcome(401);
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{why}: {challenge}");
    assert_eq!(r.json()["issue"][0]["code"], "login", "{why}");
}

#[test]
fn discovery_and_metadata_are_public_and_declare_the_token_endpoint() {
    let server = secured("auth-discovery", 1, &[]);
    let token_url = server.token_url();
    let config = get(&server.url("/.well-known/smart-configuration"));
    assert_eq!(config.status, 200);
    let config = config.json();
    assert_eq!(config["token_endpoint"], token_url.as_str());
    assert_eq!(
        config["token_endpoint_auth_methods_supported"][0],
        "private_key_jwt"
    );
    let algs: Vec<&str> = config["token_endpoint_auth_signing_alg_values_supported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(algs.contains(&"RS384") && algs.contains(&"ES384"));
    let capabilities = config["capabilities"].to_string();
    assert!(capabilities.contains("client-confidential-asymmetric"));
    assert_eq!(config["grant_types_supported"][0], "client_credentials");

    let metadata = get(&server.url("/metadata"));
    assert_eq!(metadata.status, 200);
    let security = &metadata.json()["rest"][0]["security"];
    assert_eq!(
        security["extension"][0]["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert_eq!(
        security["extension"][0]["extension"][0]["valueUri"],
        token_url.as_str()
    );
    // The service's public key, which its tokens verify against.
    let jwks = get(&format!(
        "{}/auth/jwks",
        server.base.trim_end_matches("/fhir")
    ))
    .json();
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert!(jwks["keys"][0].get("d").is_none(), "never the private key");
}

#[test]
fn requests_without_a_valid_token_are_refused() {
    let server = secured("auth-refused", 1, &[]);
    let kickoff = [
        ("Accept", FHIR_JSON.to_string()),
        ("Prefer", "respond-async".to_string()),
    ];
    let none = call("GET", &server.url("/$export"), &kickoff);
    assert_unauthorized(&none, "no token");
    for (what, value) in [
        ("not bearer", "Basic dXNlcjpwYXNz"),
        ("empty bearer", "Bearer "),
        ("not a JWT", "Bearer hello"),
        ("garbage JWT", "Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln"),
        ("unknown API key", "Bearer bek_abcdefghijklmnopqrstuvwxyz"),
    ] {
        let mut headers = kickoff.to_vec();
        headers.push(("Authorization", value.to_string()));
        let r = call("GET", &server.url("/$export"), &headers);
        assert_unauthorized(&r, what);
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );
    }
    // Status, cancel, pages and downloads need a token too.
    for (method, path) in [
        ("GET", "/$export-status/0123456789abcdef0123456789abcdef"),
        ("DELETE", "/$export-status/0123456789abcdef0123456789abcdef"),
        (
            "GET",
            "/$export-output/0123456789abcdef0123456789abcdef/Patient/000-0000.ndjson",
        ),
    ] {
        assert_unauthorized(&call(method, &server.url(path), &[]), path);
    }
    // A token signed by a key the server does not trust.
    let stranger = TestClient::new("stranger");
    let forged = stranger.assertion(&server.token_url(), |_| {});
    assert_unauthorized(
        &call(
            "GET",
            &server.url("/$export"),
            &with_token(
                &forged,
                &[("Accept", FHIR_JSON), ("Prefer", "respond-async")],
            ),
        ),
        "an assertion is not an access token",
    );
}

#[test]
fn an_export_belongs_to_the_client_that_started_it() {
    let server = secured("auth-owner", 3, &[]);
    let alice = server.client_token("alice", "system/*.read");
    let bob = server.client_token("bob", "system/*.rs");
    let kick = kickoff_as(&server, &alice, "/$export?_type=Patient,Condition");
    assert_eq!(kick.status, 202, "{}", kick.body);
    let status_url = kick.header("content-location").unwrap();
    let manifest = manifest_as(&alice, &status_url);
    assert_eq!(manifest["requiresAccessToken"], true);
    let files: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap().to_string())
        .collect();
    assert!(!files.is_empty());
    for url in &files {
        assert!(url.contains("/fhir/$export-output/"), "{url}");
        // Without a token: 401; with another client's: 404; with the owner's: the file.
        assert_unauthorized(&get(url), "download without a token");
        call("GET", url, &with_token(&bob, &[])).assert_outcome(404);
        let mine = call("GET", url, &with_token(&alice, &[]));
        assert_eq!(mine.status, 200);
        assert!(mine.body.ends_with('\n'));
    }
    // Each download is recorded: who, when, which file, how many bytes.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let downloads: Vec<Value> = server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["route"] == "/fhir/$export-output/{id}/{type}/{file}" && l["status"] == 200)
        .collect();
    assert_eq!(downloads.len(), files.len(), "one line per download");
    for line in &downloads {
        assert_eq!(line["principal"], "client:alice");
        assert!(
            line["file"].as_str().unwrap().ends_with(".ndjson"),
            "{line}"
        );
        assert!(line["bytes"].as_u64().unwrap() > 0 && line["timestamp"].is_string());
    }
    assert!(!server.log().contains(&alice), "tokens never reach the log");
    // Another client sees no status, page or cancel either (404, not 403).
    call("GET", &status_url, &with_token(&bob, &[])).assert_outcome(404);
    call(
        "GET",
        &format!("{status_url}/page/1"),
        &with_token(&bob, &[]),
    )
    .assert_outcome(404);
    call("DELETE", &status_url, &with_token(&bob, &[])).assert_outcome(404);
    // Still there for its owner, who may delete it.
    assert_eq!(
        call("GET", &status_url, &with_token(&alice, &[])).status,
        200
    );
    assert_eq!(
        call("DELETE", &status_url, &with_token(&alice, &[])).status,
        202
    );
    call("GET", &status_url, &with_token(&alice, &[])).assert_outcome(404);

    // The same client repeating an identical kick-off is sent to its running export; another
    // client sending the same request gets 429.
    let slow = secured(
        "auth-repeat",
        10,
        &["--page-size", "50", "--page-delay-ms", "40"],
    );
    let (a, b) = (
        slow.client_token("a", "system/*.rs"),
        slow.client_token("b", "system/*.rs"),
    );
    let first = kickoff_as(&slow, &a, "/$export");
    assert_eq!(first.status, 202);
    let again = kickoff_as(&slow, &a, "/$export");
    assert_eq!(again.status, 202);
    assert_eq!(
        again.header("content-location"),
        first.header("content-location")
    );
    kickoff_as(&slow, &b, "/$export").assert_outcome(429);
}

#[test]
fn scopes_limit_what_a_client_may_export() {
    let server = secured("auth-scopes", 2, &[]);
    let narrow = server.client_token("narrow", "system/Patient.read system/Observation.rs");
    // A _type beyond the scopes is refused.
    let r = kickoff_as(&server, &narrow, "/$export?_type=Patient,Condition");
    r.assert_outcome(403);
    assert!(r.body.contains("Condition"), "{}", r.body);
    // Without _type: only the granted types, and the error file says so (information).
    let kick = kickoff_as(&server, &narrow, "/$export");
    assert_eq!(kick.status, 202, "{}", kick.body);
    let manifest = manifest_as(&narrow, &kick.header("content-location").unwrap());
    let mut types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["Observation", "Patient"]);
    let error = manifest["error"].as_array().unwrap();
    assert_eq!(error.len(), 1);
    let note = call(
        "GET",
        error[0]["url"].as_str().unwrap(),
        &with_token(&narrow, &[]),
    )
    .body;
    let note: Value = serde_json::from_str(note.lines().next().unwrap()).unwrap();
    assert_eq!(note["issue"][0]["severity"], "information");
    assert!(
        note["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Observation, Patient")
    );

    // Scopes the client may not have are not granted; a client registered for fewer types gets
    // only those.
    let limited = TestClient::new("limited");
    limited.register(&server, "system/Patient.rs");
    let granted = limited.request_token(&server, "system/*.read");
    assert_eq!(granted.status, 200);
    assert_eq!(granted.json()["scope"], "system/Patient.rs");
    assert_eq!(granted.header("cache-control").as_deref(), Some("no-store"));
    let refused = limited.request_token(&server, "system/Observation.read");
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"], "invalid_scope");
    assert_eq!(refused.header("cache-control").as_deref(), Some("no-store"));
}

#[test]
fn the_token_endpoint_answers_in_rfc_6749_errors() {
    let server = secured("auth-token-errors", 1, &[]);
    let client = TestClient::new("c1");
    client.register(&server, "system/*.rs");
    let token_url = server.token_url();
    let post = |body: String| {
        request(
            "POST",
            &token_url,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(body),
        )
    };
    let form = |assertion: &str, scope: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", assertion)
            .append_pair("scope", scope)
            .finish()
    };
    let good = client.assertion(&token_url, |_| {});
    // (what, body, status, error)
    let cases = [
        (
            "a replayed assertion",
            form(&good, "system/*.rs"),
            400,
            "invalid_grant",
        ),
        (
            "the wrong audience",
            form(
                &client.assertion("https://elsewhere.example/token", |_| {}),
                "system/*.rs",
            ),
            401,
            "invalid_client",
        ),
        (
            "iss not sub",
            form(
                &client.assertion(&token_url, |c| c["sub"] = "x".into()),
                "system/*.rs",
            ),
            401,
            "invalid_client",
        ),
        (
            "far-future exp",
            form(
                &client.assertion(&token_url, |c| {
                    c["exp"] = (c["exp"].as_i64().unwrap() + 3600).into()
                }),
                "system/*.rs",
            ),
            401,
            "invalid_client",
        ),
        (
            "an unknown client",
            form(
                &TestClient::new("nobody").assertion(&token_url, |_| {}),
                "system/*.rs",
            ),
            401,
            "invalid_client",
        ),
        (
            "bad scope syntax",
            form(&client.assertion(&token_url, |_| {}), "system/Patient"),
            400,
            "invalid_scope",
        ),
        (
            "password grant",
            "grant_type=password".to_string(),
            400,
            "unsupported_grant_type",
        ),
    ];
    assert_eq!(post(form(&good, "system/*.rs")).status, 200, "first use");
    for (what, body, status, error) in cases {
        let r = post(body);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert_eq!(r.json()["error"], error, "{what}");
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("no-store"),
            "{what}"
        );
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
    }
    // GET is not how tokens are asked for.
    assert_eq!(get(&token_url).status, 405);
}

#[test]
fn user_tokens_and_api_keys_do_not_open_the_fhir_api() {
    let server = secured("auth-people", 1, &[]);
    let db = server.dir.join("store.db");
    let db = db.to_str().unwrap();
    run_cli(&[
        "users",
        "add",
        "--db",
        db,
        "--email",
        "Ana@Example.org",
        "--name",
        "Ana",
    ]);
    run_cli(&[
        "members",
        "grant",
        "--db",
        db,
        "--user",
        "ana@example.org",
        "--study",
        "s1",
        "--role",
        "investigator",
    ]);
    let (token, _) = run_cli(&[
        "token",
        "--db",
        db,
        "--user",
        "ana@example.org",
        "--ttl",
        "10m",
    ]);
    let user = kickoff_as(&server, token.trim(), "/$export");
    user.assert_outcome(403);
    assert_eq!(user.json()["issue"][0]["code"], "forbidden");

    let (key, stderr) = run_cli(&[
        "api-keys",
        "create",
        "--db",
        db,
        "--name",
        "etl",
        "--study",
        "s1",
        "--role",
        "data-reviewer",
    ]);
    let key = key.trim().to_string();
    assert!(key.starts_with("bek_") && !stderr.contains(&key));
    kickoff_as(&server, &key, "/$export").assert_outcome(403);
    let (list, _) = run_cli(&["api-keys", "list", "--db", db]);
    assert!(!list.contains(&key), "the key itself is never listed");
    let id = list.split('\t').next().unwrap().to_string();
    assert!(list.contains("last used 20"), "last use recorded: {list}");
    run_cli(&["api-keys", "revoke", "--db", db, "--id", &id]);
    assert_unauthorized(&kickoff_as(&server, &key, "/$export"), "a revoked API key");

    // A token of an issuer the server does not trust (another store's key).
    let other = scratch_dir("auth-other-issuer");
    let other_db = other.join("store.db");
    let other_db = other_db.to_str().unwrap();
    let other_server = Server::start(&other, &["--auth", "on"]);
    run_cli(&[
        "users",
        "add",
        "--db",
        other_db,
        "--email",
        "eve@example.org",
        "--name",
        "Eve",
    ]);
    let (foreign, _) = run_cli(&["token", "--db", other_db, "--user", "eve@example.org"]);
    drop(other_server);
    assert_unauthorized(
        &kickoff_as(&server, foreign.trim(), "/$export"),
        "untrusted issuer",
    );
}

#[test]
fn kickoffs_and_polls_are_rate_limited_per_client() {
    let server = secured("auth-rate", 1, &[]);
    let token = server.client_token("eager", "system/*.rs");
    let status = server.url("/$export-status/0123456789abcdef0123456789abcdef");
    let mut limited = None;
    for _ in 0..400 {
        let r = call("GET", &status, &with_token(&token, &[]));
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 404);
    }
    let r = limited.expect("a burst of polls is limited");
    r.assert_outcome(429);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // Another client is not affected.
    let calm = server.client_token("calm", "system/*.rs");
    assert_eq!(call("GET", &status, &with_token(&calm, &[])).status, 404);
}

#[test]
fn serving_a_non_loopback_address_without_authentication_needs_insisting() {
    // Refused before any socket is opened, so nothing binds beyond 127.0.0.1.
    let dir = scratch_dir("auth-open");
    let out = std::process::Command::new(binary())
        .args(["serve", "--addr", "0.0.0.0:0", "--auth", "off"])
        .args(["--db", dir.join("store.db").to_str().unwrap()])
        .args(["--output", dir.join("exports").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-no-auth"));
}

/// `serve --tls-cert --tls-key` serves HTTPS (TLS 1.3 and 1.2; rustls has nothing older) with a
/// certificate generated here, and nothing in clear on that port.
#[test]
fn serve_speaks_tls_with_the_given_certificate() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    let dir = scratch_dir("tls");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = Server::start(
        &dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let address = server
        .base
        .trim_start_matches("https://")
        .trim_end_matches("/fhir")
        .to_string();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let socket = std::net::TcpStream::connect(&address).unwrap();
        let mut tls = rustls::StreamOwned::new(connection, socket);
        write!(
            tls,
            "GET /fhir/metadata HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{version:?}: {}",
            &text[..text.len().min(200)]
        );
        assert!(text.contains("CapabilityStatement"));
    }
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = std::net::TcpStream::connect(&address).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(plain, "GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("CapabilityStatement"));
}

/// A failure inside the service (here the export folder turned into a file) reaches the client
/// as a generic OperationOutcome naming the request id, never as the file system's or a
/// store's own text.
#[test]
fn internal_failures_never_show_their_internals() {
    let dir = scratch_dir("internals");
    generated_store(&dir, 1);
    let server = Server::start_logged(&dir, &[]);
    let exports = server.exports_dir();
    std::fs::remove_dir_all(&exports).ok();
    std::fs::write(&exports, "not a folder").unwrap();
    let kick = server.kickoff("/$export?_type=Patient");
    assert_eq!(kick.status, 202);
    let status_url = kick.header("content-location").unwrap();
    let failed = loop {
        let r = get(&status_url);
        if r.status != 202 {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    failed.assert_outcome(500);
    let diagnostics = failed.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    let request_id = failed.header("x-request-id").unwrap();
    assert!(diagnostics.contains(&request_id), "{diagnostics}");
    assert!(diagnostics.contains("internal error"), "{diagnostics}");
    for internal in [
        "os error",
        "Not a directory",
        "File exists",
        dir.to_str().unwrap(),
        "exports/",
    ] {
        assert!(
            !failed.body.contains(internal),
            "{internal} in {}",
            failed.body
        );
    }
    // The log has the cause, for the operator.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        server.log().contains("export failed"),
        "the cause is logged"
    );
}
