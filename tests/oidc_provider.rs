//! The local OpenID provider end to end, against `bulk-export serve --auth on`, driven the way a
//! browser and the page's relying-party code would: discovery, the authorization request, the
//! sign-in form parsed from its HTML and posted back with its cookie, the 303 to the callback,
//! the code exchanged with the PKCE verifier. The ID token's signature is checked here with
//! `p256` against the JWK Set of `jwks_uri`, the PKCE challenge computed with `sha2`; the token
//! then opens the study API as the member. Then every refusal: wrong password, unknown user,
//! reused code, wrong verifier or redirect URI, unknown client, missing PKCE, the failure limit,
//! a missing CSRF token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e_tests::*;
use p256::ecdsa::signature::Verifier;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ANA_PASSWORD: &str = "Ana's long passphrase 1";
const CARL_PASSWORD: &str = "carl-password-42";
const WRONG_CREDENTIALS: &str = "The e-mail or password is wrong.";

/// A server with three people: Ana (investigator of study-1, password from stdin), Carl (no
/// membership, password on the command line), Bob (no password).
fn setup(name: &str) -> Server {
    let dir = scratch_dir(name);
    generated_store(&dir, 1);
    let db = dir.join("store.db");
    let db = db.to_str().unwrap();
    add_user_with_stdin(db, "Ana@Example.org", "Ana Silva", ANA_PASSWORD);
    run_cli(&[
        "users",
        "add",
        "--db",
        db,
        "--email",
        "carl@example.org",
        "--name",
        "Carl",
        "--password",
        CARL_PASSWORD,
    ]);
    run_cli(&[
        "users",
        "add",
        "--db",
        db,
        "--email",
        "bob@example.org",
        "--name",
        "Bob",
    ]);
    run_cli(&[
        "members",
        "grant",
        "--db",
        db,
        "--user",
        "ana@example.org",
        "--study",
        "study-1",
        "--role",
        "investigator",
    ]);
    Server::start_logged(&dir, &["--auth", "on"])
}

/// `users add --password-stdin`, the password written to the command's standard input.
fn add_user_with_stdin(db: &str, email: &str, name: &str, password: &str) {
    let mut child = Command::new(binary())
        .args(["users", "add", "--db", db, "--email", email, "--name", name])
        .arg("--password-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bulk-export");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn origin(server: &Server) -> String {
    server.base.trim_end_matches("/fhir").to_string()
}

fn db(server: &Server) -> String {
    server.dir.join("store.db").to_str().unwrap().to_string()
}

/// One request as a browser sends it, redirects not followed.
fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    form: Option<&[(&str, &str)]>,
) -> Response {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(60))
        .build();
    let mut req = agent.request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let result = match form {
        Some(pairs) => req.send_form(pairs),
        None => req.call(),
    };
    response_of(result, method, url)
}

fn random_verifier() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    URL_SAFE_NO_PAD.encode(bytes)
}

fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// What the page puts in the authorization request.
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    state: String,
    nonce: String,
    verifier: String,
    pkce: bool,
}

impl AuthRequest {
    fn new(server: &Server) -> AuthRequest {
        AuthRequest {
            client_id: "bulk-export".into(),
            redirect_uri: format!("{}/callback", origin(server)),
            state: format!("state-{}", unique()),
            nonce: format!("nonce-{}", unique()),
            verifier: random_verifier(),
            pkce: true,
        }
    }

    fn url(&self, authorization_endpoint: &str) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", "openid email profile")
            .append_pair("state", &self.state)
            .append_pair("nonce", &self.nonce);
        if self.pkce {
            q.append_pair("code_challenge", &s256(&self.verifier))
                .append_pair("code_challenge_method", "S256");
        }
        format!("{authorization_endpoint}?{}", q.finish())
    }
}

fn discovery(server: &Server) -> Value {
    let r = get(&format!(
        "{}/.well-known/openid-configuration",
        origin(server)
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The sign-in form as parsed from the page: where it posts, its hidden fields, its cookie.
struct LoginForm {
    action: String,
    hidden: Vec<(String, String)>,
    cookie: String,
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// An attribute's value within one tag.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let marker = format!(" {name}=\"");
    let start = tag.find(&marker)? + marker.len();
    let end = start + tag[start..].find('"')?;
    Some(unescape(&tag[start..end]))
}

fn parse_form(server: &Server, page: &Response) -> LoginForm {
    let html = &page.body;
    let form_tag = html
        .split("<form")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .unwrap_or_else(|| panic!("no form in {html}"));
    assert_eq!(attribute(form_tag, "method").as_deref(), Some("post"));
    let action = attribute(form_tag, "action").expect("form action");
    let action = if action.starts_with('/') {
        format!("{}{action}", origin(server))
    } else {
        action
    };
    let hidden = html
        .split("<input")
        .skip(1)
        .map(|rest| rest.split('>').next().unwrap())
        .filter(|tag| attribute(tag, "type").as_deref() == Some("hidden"))
        .map(|tag| {
            (
                attribute(tag, "name").unwrap(),
                attribute(tag, "value").unwrap(),
            )
        })
        .collect();
    let set_cookie = page.header("set-cookie").expect("the form sets a cookie");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    LoginForm {
        action,
        hidden,
        cookie,
    }
}

impl LoginForm {
    /// Posts the form as the browser would: hidden fields, e-mail, password, the cookie.
    fn submit(&self, email: &str, password: &str) -> Response {
        self.submit_with(email, password, |_| {}, true)
    }

    fn submit_with(
        &self,
        email: &str,
        password: &str,
        edit: impl FnOnce(&mut Vec<(String, String)>),
        with_cookie: bool,
    ) -> Response {
        let mut fields = self.hidden.clone();
        fields.push(("email".into(), email.into()));
        fields.push(("password".into(), password.into()));
        edit(&mut fields);
        let pairs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let cookie = [("Cookie", self.cookie.as_str())];
        let headers: &[(&str, &str)] = if with_cookie { &cookie } else { &[] };
        send("POST", &self.action, headers, Some(&pairs))
    }
}

/// GET the authorization endpoint; the sign-in form it shows.
fn open_form(server: &Server, request: &AuthRequest) -> (Response, LoginForm) {
    let config = discovery(server);
    let page = send(
        "GET",
        &request.url(config["authorization_endpoint"].as_str().unwrap()),
        &[],
        None,
    );
    assert_eq!(page.status, 200, "{}", page.body);
    let form = parse_form(server, &page);
    (page, form)
}

/// The query of a 303 to the callback.
fn callback(server: &Server, response: &Response) -> Vec<(String, String)> {
    assert_eq!(response.status, 303, "{}", response.body);
    let location = response.header("location").expect("Location");
    let prefix = format!("{}/callback?", origin(server));
    let query = location
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{location} is not the callback"));
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Signs in and returns the code (asserting the state came back).
fn sign_in(server: &Server, request: &AuthRequest, email: &str, password: &str) -> String {
    let (_, form) = open_form(server, request);
    let params = callback(server, &form.submit(email, password));
    assert_eq!(param(&params, "state"), Some(request.state.as_str()));
    param(&params, "code").expect("a code").to_string()
}

fn exchange(server: &Server, code: &str, redirect_uri: &str, verifier: Option<&str>) -> Response {
    let token_endpoint = discovery(server)["token_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let mut pairs = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("client_id", "bulk-export"),
    ];
    if let Some(v) = verifier {
        pairs.push(("code_verifier", v));
    }
    send("POST", &token_endpoint, &[], Some(&pairs))
}

fn oauth_error(r: &Response) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

fn b64_json(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Checks an ES256 JWT against the JWK Set at `jwks_uri` with p256 alone; returns its claims.
fn verify_es256(jwks_uri: &str, token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = b64_json(parts[0]);
    assert_eq!(header["alg"], "ES256");
    let jwks = get(jwks_uri).json();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the token's kid is in the JWK Set");
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let signature =
        p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .expect("the signature verifies with the published key");
    // A changed payload does not.
    let mut forged = b64_json(parts[1]);
    forged["email"] = "mallory@example.org".into();
    let forged = URL_SAFE_NO_PAD.encode(forged.to_string());
    assert!(
        key.verify(format!("{}.{forged}", parts[0]).as_bytes(), &signature)
            .is_err()
    );
    b64_json(parts[1])
}

fn formats(server: &Server, token: &str) -> Response {
    request(
        "GET",
        &formats_url(server),
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn a_member_signs_in_like_a_browser_and_the_id_token_opens_the_study_api() {
    let server = setup("oidc-flow");
    let origin = origin(&server);

    // Discovery: the endpoints under the issuer, and what the page needs to know.
    let config = discovery(&server);
    assert_eq!(config["issuer"], origin.as_str());
    assert_eq!(
        config["authorization_endpoint"],
        format!("{origin}/oidc/authorize")
    );
    assert_eq!(config["token_endpoint"], format!("{origin}/oidc/token"));
    assert_eq!(config["jwks_uri"], format!("{origin}/auth/jwks"));
    for (field, value) in [
        ("response_types_supported", "code"),
        ("grant_types_supported", "authorization_code"),
        ("code_challenge_methods_supported", "S256"),
        ("subject_types_supported", "public"),
        ("id_token_signing_alg_values_supported", "ES256"),
        ("token_endpoint_auth_methods_supported", "none"),
    ] {
        assert_eq!(config[field], serde_json::json!([value]), "{field}");
    }
    assert_eq!(
        config["scopes_supported"],
        serde_json::json!(["openid", "email", "profile"])
    );

    // The authorization request shows the sign-in form.
    let request = AuthRequest::new(&server);
    let (page, form) = open_form(&server, &request);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'none'",
        "style-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
    let html = &page.body;
    assert!(html.contains("<html lang=\"en\">") && html.contains("<main") && html.contains("<h1>"));
    assert!(html.contains("<link rel=\"stylesheet\" href=\"/static/app.css\">"));
    assert!(html.contains("<label for=\"email\">") && html.contains("<label for=\"password\">"));
    assert!(!html.contains("<script") && !html.contains("style="));
    let set_cookie = page.header("set-cookie").unwrap();
    assert!(set_cookie.starts_with("bulk_export_login="), "{set_cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/oidc/authorize"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain http on loopback");
    assert!(form.hidden.iter().any(|(n, _)| n == "csrf_token"));

    // Credentials as typed (the address in another case): 303 to the callback with code and state.
    let signed_in = form.submit("ana@EXAMPLE.org", ANA_PASSWORD);
    let params = callback(&server, &signed_in);
    assert_eq!(param(&params, "state"), Some(request.state.as_str()));
    let code = param(&params, "code").unwrap().to_string();
    assert!(
        signed_in
            .header("set-cookie")
            .unwrap()
            .contains("Max-Age=0")
    );

    // The code and the verifier buy the tokens.
    let started = now();
    let tokens = exchange(
        &server,
        &code,
        &request.redirect_uri,
        Some(&request.verifier),
    );
    assert_eq!(tokens.status, 200, "{}", tokens.body);
    assert_eq!(tokens.header("cache-control").as_deref(), Some("no-store"));
    let tokens = tokens.json();
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3600);
    let id_token = tokens["id_token"].as_str().unwrap();
    let access_token = tokens["access_token"].as_str().unwrap();

    // The ID token, verified here against jwks_uri. Its subject is the one `bulk-export token`
    // puts in Ana's tokens.
    let claims = verify_es256(config["jwks_uri"].as_str().unwrap(), id_token);
    let (cli_token, _) = run_cli(&["token", "--db", &db(&server), "--user", "ana@example.org"]);
    let cli_claims = b64_json(cli_token.trim().split('.').nth(1).unwrap());
    assert_eq!(claims["iss"], origin.as_str());
    assert_eq!(claims["aud"], "bulk-export");
    assert_eq!(claims["sub"], cli_claims["sub"]);
    assert_eq!(claims["email"], "ana@example.org");
    assert_eq!(claims["name"], "Ana Silva");
    assert_eq!(claims["nonce"], request.nonce.as_str());
    let iat = claims["iat"].as_i64().unwrap();
    assert!((started - 5..=now() + 5).contains(&iat), "iat {iat}");
    assert_eq!(claims["exp"].as_i64().unwrap(), iat + 3600);
    let auth_time = claims["auth_time"].as_i64().unwrap();
    assert!(auth_time <= iat && auth_time >= started - 60);
    // The access token is a user token of the same person, like the CLI's.
    let access = verify_es256(config["jwks_uri"].as_str().unwrap(), access_token);
    assert_eq!(
        (&access["sub"], &access["aud"]),
        (&cli_claims["sub"], &cli_claims["aud"])
    );

    // Both open the study API as Ana, an investigator of study-1: every type may be created.
    for token in [id_token, access_token] {
        let r = formats(&server, token);
        assert_eq!(r.status, 200, "{}", r.body);
        let formats = r.json()["formats"].as_array().unwrap().clone();
        assert!(!formats.is_empty());
        assert!(formats.iter().all(|f| f["allowed"] == true), "{formats:?}");
    }
    // Carl signs in the same way but is no member: nothing may be created.
    let carl = AuthRequest::new(&server);
    let carl_code = sign_in(&server, &carl, "carl@example.org", CARL_PASSWORD);
    let carl_tokens = exchange(
        &server,
        &carl_code,
        &carl.redirect_uri,
        Some(&carl.verifier),
    )
    .json();
    let r = formats(&server, carl_tokens["id_token"].as_str().unwrap());
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["formats"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["allowed"] == false)
    );
    // Without a token, the study API answers 401.
    assert_eq!(
        e2e_tests::request("GET", &formats_url(&server), &[], None).status,
        401
    );

    // The code was single use.
    let again = exchange(
        &server,
        &code,
        &request.redirect_uri,
        Some(&request.verifier),
    );
    assert_eq!(
        (again.status, oauth_error(&again).as_str()),
        (400, "invalid_grant")
    );

    // The log records sign-ins, never a password.
    let log = server.log();
    assert!(log.contains("signed in"), "{log}");
    assert!(!log.contains(ANA_PASSWORD) && !log.contains(CARL_PASSWORD));
}

fn formats_url(server: &Server) -> String {
    format!("{}/api/v1/exports/formats?study_id=study-1", origin(server))
}

#[test]
fn wrong_passwords_and_unknown_people_get_the_same_answer_and_are_limited() {
    let server = setup("oidc-failures");
    let request = AuthRequest::new(&server);
    let (_, form) = open_form(&server, &request);
    let refused = |email: &str, password: &str| {
        let r = form.submit(email, password);
        assert!(r.header("location").is_none(), "no redirect on failure");
        (r.status, r.body.contains(WRONG_CREDENTIALS), r)
    };
    let (status, generic, wrong) = refused("ana@example.org", "not Ana's password");
    assert_eq!((status, generic), (401, true), "{}", wrong.body);
    assert!(wrong.body.contains("value=\"ana@example.org\""));
    let (status, generic, _) = refused("nobody@example.org", ANA_PASSWORD);
    assert_eq!(
        (status, generic),
        (401, true),
        "unknown user: the same answer"
    );
    let (status, generic, _) = refused("bob@example.org", "bob has no password");
    assert_eq!(
        (status, generic),
        (401, true),
        "no password: the same answer"
    );

    // Five failures for an address: the sixth attempt waits, even with the right password.
    for i in 0..4 {
        let (status, _, _) = refused("carl@example.org", &format!("guess {i}"));
        assert_eq!(status, 401);
    }
    let (status, _, _) = refused("carl@example.org", "guess 5");
    assert_eq!(status, 401);
    let locked = form.submit("carl@example.org", CARL_PASSWORD);
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert!(
        locked.body.contains("Too many failed sign-ins"),
        "{}",
        locked.body
    );
    let wait: u64 = locked.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 14 * 60 && wait <= 15 * 60, "{wait}");
    // Ana is not affected: the limit is per address.
    let params = callback(&server, &form.submit("ana@example.org", ANA_PASSWORD));
    assert!(param(&params, "code").is_some());

    let log = server.log();
    assert!(log.contains("sign-in failed"), "{log}");
    assert!(!log.contains("not Ana's password") && !log.contains("guess 5"));
}

#[test]
fn the_form_needs_its_csrf_token() {
    let server = setup("oidc-csrf");
    let request = AuthRequest::new(&server);
    let (_, form) = open_form(&server, &request);
    let no_token = form.submit_with(
        "ana@example.org",
        ANA_PASSWORD,
        |fields| fields.retain(|(n, _)| n != "csrf_token"),
        true,
    );
    assert_eq!(no_token.status, 403, "{}", no_token.body);
    assert!(no_token.header("location").is_none());
    let no_cookie = form.submit_with("ana@example.org", ANA_PASSWORD, |_| {}, false);
    assert_eq!(no_cookie.status, 403, "{}", no_cookie.body);
    let other_token = form.submit_with(
        "ana@example.org",
        ANA_PASSWORD,
        |fields| {
            for (n, v) in fields.iter_mut() {
                if n == "csrf_token" {
                    *v = random_verifier();
                }
            }
        },
        true,
    );
    assert_eq!(other_token.status, 403);
    // The form offered again works.
    let again = parse_form(&server, &no_cookie);
    let params = callback(&server, &again.submit("ana@example.org", ANA_PASSWORD));
    assert_eq!(param(&params, "state"), Some(request.state.as_str()));
}

#[test]
fn codes_need_the_verifier_and_the_redirect_uri_and_work_once() {
    let server = setup("oidc-codes");
    let request = AuthRequest::new(&server);
    let code = sign_in(&server, &request, "ana@example.org", ANA_PASSWORD);
    let wrong_verifier = exchange(
        &server,
        &code,
        &request.redirect_uri,
        Some(&random_verifier()),
    );
    assert_eq!(
        (wrong_verifier.status, oauth_error(&wrong_verifier).as_str()),
        (400, "invalid_grant")
    );
    assert_eq!(
        wrong_verifier.header("cache-control").as_deref(),
        Some("no-store")
    );
    let other_redirect = format!("{}/elsewhere", origin(&server));
    let wrong_redirect = exchange(&server, &code, &other_redirect, Some(&request.verifier));
    assert_eq!(oauth_error(&wrong_redirect), "invalid_grant");
    let no_verifier = exchange(&server, &code, &request.redirect_uri, None);
    assert_eq!(
        (no_verifier.status, oauth_error(&no_verifier).as_str()),
        (400, "invalid_request")
    );
    // The right exchange still works (failures do not spend the code), once.
    let ok = exchange(
        &server,
        &code,
        &request.redirect_uri,
        Some(&request.verifier),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let reused = exchange(
        &server,
        &code,
        &request.redirect_uri,
        Some(&request.verifier),
    );
    assert_eq!(oauth_error(&reused), "invalid_grant");
    // Another grant type is not supported; GET is not how tokens are asked for.
    let token_endpoint = format!("{}/oidc/token", origin(&server));
    let other = send(
        "POST",
        &token_endpoint,
        &[],
        Some(&[("grant_type", "password")]),
    );
    assert_eq!(oauth_error(&other), "unsupported_grant_type");
    assert_eq!(send("GET", &token_endpoint, &[], None).status, 405);
}

#[test]
fn authorization_requests_are_checked_before_any_redirect() {
    let server = setup("oidc-authorize");
    let endpoint = discovery(&server)["authorization_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    // Unknown client or redirect URI: an error page, never a redirect.
    let mut stranger = AuthRequest::new(&server);
    stranger.client_id = "someone-else".into();
    let mut elsewhere = AuthRequest::new(&server);
    elsewhere.redirect_uri = "https://evil.example/callback".into();
    for (request, why) in [
        (stranger, "unknown client_id"),
        (elsewhere, "unknown redirect_uri"),
    ] {
        let r = send("GET", &request.url(&endpoint), &[], None);
        assert_eq!(r.status, 400, "{why}: {}", r.body);
        assert!(r.header("location").is_none(), "{why}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        assert!(
            !r.body.contains("<form") && r.body.contains("<h1>"),
            "{why}"
        );
        assert!(!r.body.contains("evil.example"));
    }
    // No PKCE: back to the callback with invalid_request and the state.
    let mut no_pkce = AuthRequest::new(&server);
    no_pkce.pkce = false;
    let params = callback(&server, &send("GET", &no_pkce.url(&endpoint), &[], None));
    assert_eq!(param(&params, "error"), Some("invalid_request"));
    assert_eq!(param(&params, "state"), Some(no_pkce.state.as_str()));
    assert_eq!(param(&params, "code"), None);
    // Not OpenID (no openid scope): invalid_scope.
    let request = AuthRequest::new(&server);
    let url = request
        .url(&endpoint)
        .replace("scope=openid+email+profile", "scope=email");
    let params = callback(&server, &send("GET", &url, &[], None));
    assert_eq!(param(&params, "error"), Some("invalid_scope"));
    let url = request
        .url(&endpoint)
        .replace("response_type=code", "response_type=token");
    let params = callback(&server, &send("GET", &url, &[], None));
    assert_eq!(param(&params, "error"), Some("unsupported_response_type"));
}

#[test]
fn passwords_are_stored_as_argon2id_hashes_and_can_be_changed() {
    let server = setup("oidc-passwords");
    let db = db(&server);
    let (list, _) = run_cli(&["users", "list", "--db", &db]);
    assert!(
        !list.contains("$argon2") && !list.contains(ANA_PASSWORD),
        "{list}"
    );
    assert!(
        list.contains("ana@example.org\tAna Silva\tpassword"),
        "{list}"
    );
    assert!(list.contains("bob@example.org\tBob\tno password"), "{list}");
    let stored = || -> Value {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let doc: String = conn
            .query_row(
                "SELECT doc FROM auth_users WHERE email = 'ana@example.org'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        serde_json::from_str(&doc).unwrap()
    };
    let first = stored();
    let hash = first["password_hash"].as_str().unwrap().to_string();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash.contains(ANA_PASSWORD));

    // Renaming without a password keeps the hash (and the subject).
    run_cli(&[
        "users",
        "add",
        "--db",
        &db,
        "--email",
        "ana@example.org",
        "--name",
        "Ana S.",
    ]);
    let renamed = stored();
    assert_eq!(renamed["password_hash"], first["password_hash"]);
    assert_eq!(renamed["subject"], first["subject"]);
    assert_eq!(renamed["name"], "Ana S.");
    // A new password replaces the old one.
    add_user_with_stdin(&db, "ana@example.org", "Ana S.", "a brand new passphrase");
    assert_ne!(stored()["password_hash"], first["password_hash"]);
    let request = AuthRequest::new(&server);
    let (_, form) = open_form(&server, &request);
    assert_eq!(form.submit("ana@example.org", ANA_PASSWORD).status, 401);
    let params = callback(
        &server,
        &form.submit("ana@example.org", "a brand new passphrase"),
    );
    let code = param(&params, "code").unwrap();
    let tokens = exchange(
        &server,
        code,
        &request.redirect_uri,
        Some(&request.verifier),
    )
    .json();
    let claims = b64_json(
        tokens["id_token"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap(),
    );
    assert_eq!(
        (claims["name"].as_str(), &claims["sub"]),
        (Some("Ana S."), &first["subject"])
    );

    // Too short a password is refused.
    let out = Command::new(binary())
        .args([
            "users",
            "add",
            "--db",
            &db,
            "--email",
            "dan@example.org",
            "--name",
            "Dan",
        ])
        .args(["--password", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8"));
}
