//! The local OpenID provider, rule by rule, over in-memory stores: the authorization code flow
//! with PKCE from the authorization request to tokens that authenticate, and every refusal on
//! the way. Expected values (PKCE challenges, token claims, signatures) are computed here with
//! sha2 and jsonwebtoken, not with the provider's own helpers.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use export_auth::ports::{MembershipStore, User, UserStore};
use export_auth::principal::{Membership, Role};
use export_auth::provider::{Answer, LocalProvider, WRONG_CREDENTIALS};
use export_auth::{AuthConfig, AuthFailure, Authenticator, Principal};
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use support::*;

const ISSUER: &str = "https://exports.example.org";
const CALLBACK: &str = "https://exports.example.org/callback";
const NOW: i64 = 1_800_000_000;
const PASSWORD: &str = "correct horse battery staple";
const VERIFIER: &str = "Zx9-long.enough_verifier~of-the-page-0123456789abcdef";

fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

struct Setup {
    memory: Arc<Memory>,
    auth: Authenticator,
}

impl Setup {
    fn provider(&self) -> &LocalProvider {
        self.auth.provider.as_ref().expect("the provider is on")
    }
}

async fn setup() -> Setup {
    let (memory, ports) = ports();
    let config = AuthConfig {
        enforce: true,
        issuer: ISSUER.into(),
        trusted_issuers: vec![],
        provider: true,
    };
    let auth = Authenticator::new(config, ports, |_| true);
    let ana = User {
        email: "ana@example.org".into(),
        name: "Ana Silva".into(),
        subject: "subject-of-ana".into(),
        created: NOW - 1000,
        password_hash: Some(export_auth::password::hash(PASSWORD)),
    };
    memory.put_user(&ana).await.unwrap();
    // Bob may only get tokens from `bulk-export token`: no password.
    let bob = User {
        email: "bob@example.org".into(),
        name: "Bob".into(),
        subject: "subject-of-bob".into(),
        created: NOW - 1000,
        password_hash: None,
    };
    memory.put_user(&bob).await.unwrap();
    let member = Membership::new("study-1", Role::Investigator, vec![]).unwrap();
    memory.grant("ana@example.org", &member).await.unwrap();
    Setup { memory, auth }
}

fn authorize_query(edit: impl FnOnce(&mut Vec<(&'static str, String)>)) -> String {
    let mut params: Vec<(&str, String)> = vec![
        ("response_type", "code".into()),
        ("client_id", "bulk-export".into()),
        ("redirect_uri", CALLBACK.into()),
        ("scope", "openid email profile".into()),
        ("state", "state-42".into()),
        ("nonce", "nonce-7".into()),
        ("code_challenge", challenge(VERIFIER)),
        ("code_challenge_method", "S256".into()),
    ];
    edit(&mut params);
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (n, v) in &params {
        query.append_pair(n, v);
    }
    query.finish()
}

/// The sign-in form as the browser sees it.
struct Form {
    status: StatusCode,
    html: String,
    login_request: String,
    csrf_token: String,
    cookie: String,
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + marker.len();
    html[start..start + html[start..].find('"').unwrap()].to_string()
}

fn form_of(answer: Answer) -> Form {
    match answer {
        Answer::Page {
            status,
            html,
            login_cookie,
            ..
        } => Form {
            status,
            login_request: hidden(&html, "login_request"),
            csrf_token: hidden(&html, "csrf_token"),
            cookie: login_cookie.expect("a form comes with its cookie"),
            html,
        },
        other => panic!("not a form: {other:?}"),
    }
}

async fn open_form(s: &Setup) -> Form {
    let form = form_of(s.provider().authorize(&authorize_query(|_| {}), NOW).await);
    assert_eq!(form.status, StatusCode::OK);
    form
}

fn body(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = form_urlencoded::Serializer::new(String::new());
    for (n, v) in pairs {
        b.append_pair(n, v);
    }
    b.finish().into_bytes()
}

async fn submit(s: &Setup, form: &Form, email: &str, password: &str, now: i64) -> Answer {
    let pairs = [
        ("login_request", form.login_request.as_str()),
        ("csrf_token", form.csrf_token.as_str()),
        ("email", email),
        ("password", password),
    ];
    s.provider()
        .sign_in(
            Some("application/x-www-form-urlencoded"),
            &body(&pairs),
            Some(&form.cookie),
            now,
        )
        .await
}

/// The query of a redirect to the callback.
fn callback_params(answer: &Answer) -> Vec<(String, String)> {
    let Answer::Redirect { location } = answer else {
        panic!("not a redirect: {answer:?}");
    };
    let query = location
        .strip_prefix(&format!("{CALLBACK}?"))
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

async fn sign_in(s: &Setup) -> String {
    let form = open_form(s).await;
    let answer = submit(s, &form, "Ana@Example.org", PASSWORD, NOW).await;
    let params = callback_params(&answer);
    assert_eq!(param(&params, "state"), Some("state-42"));
    param(&params, "code").expect("a code").to_string()
}

async fn exchange(
    provider: &LocalProvider,
    pairs: &[(&str, &str)],
    now: i64,
) -> Result<Value, export_auth::OAuthError> {
    provider
        .token(Some("application/x-www-form-urlencoded"), &body(pairs), now)
        .await
}

fn redemption<'a>(code: &'a str, verifier: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", CALLBACK),
        ("client_id", "bulk-export"),
        ("code_verifier", verifier),
    ]
}

async fn principal(s: &Setup, token: &str, now: i64) -> Result<Principal, AuthFailure> {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    s.auth.authenticate(&headers, now).await
}

#[tokio::test]
async fn a_member_signs_in_and_both_tokens_authenticate_them() {
    let s = setup().await;
    let form = open_form(&s).await;
    assert!(
        form.html
            .contains("<form method=\"post\" action=\"/oidc/authorize\">")
    );
    assert_eq!(form.csrf_token, form.cookie);
    let code = sign_in(&s).await;
    let response = exchange(s.provider(), &redemption(&code, VERIFIER), NOW + 5)
        .await
        .unwrap();
    assert_eq!(response["token_type"], "Bearer");
    assert_eq!(response["expires_in"], 3600);

    // The ID token, checked with the public JWK alone.
    let jwk = s.auth.ports.signer.public_jwk();
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["bulk-export"]);
    validation.set_issuer(&[ISSUER]);
    validation.validate_exp = false;
    let id_token = response["id_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(header.kid.as_deref(), jwk["kid"].as_str());
    let claims = jsonwebtoken::decode::<Value>(id_token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "subject-of-ana");
    assert_eq!(claims["email"], "ana@example.org");
    assert_eq!(claims["name"], "Ana Silva");
    assert_eq!(claims["nonce"], "nonce-7");
    assert_eq!(claims["iat"], NOW + 5);
    assert_eq!(claims["exp"], NOW + 5 + 3600);
    assert_eq!(claims["auth_time"], NOW);

    // Both tokens are the member, with their memberships.
    let access_token = response["access_token"].as_str().unwrap();
    for token in [id_token, access_token] {
        match principal(&s, token, NOW + 10).await.unwrap() {
            Principal::User {
                issuer,
                subject,
                email,
                memberships,
                ..
            } => {
                assert_eq!(issuer, ISSUER);
                assert_eq!(subject, "subject-of-ana");
                assert_eq!(email.as_deref(), Some("ana@example.org"));
                assert_eq!(memberships.len(), 1);
                assert_eq!(memberships[0].study, "study-1");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            principal(&s, token, NOW + 5 + 3600 + 61).await.is_err(),
            "expired"
        );
    }

    // A code, a sign-in form's signed request and the cookie are not bearer tokens.
    assert!(matches!(
        principal(&s, &code, NOW).await,
        Err(AuthFailure::Invalid(_))
    ));
    assert!(matches!(
        principal(&s, &form.login_request, NOW).await,
        Err(AuthFailure::Invalid(_))
    ));

    // The code was used up.
    let again = exchange(s.provider(), &redemption(&code, VERIFIER), NOW + 6).await;
    assert_eq!(again.unwrap_err().error, "invalid_grant");
}

#[tokio::test]
async fn a_code_is_bound_to_its_client_redirect_and_verifier_and_lives_60_seconds() {
    let s = setup().await;
    let code = sign_in(&s).await;
    let other_verifier = "another-verifier-of-at-least-43-characters-0123456789";
    let refused = async |pairs: Vec<(&str, &str)>, now: i64| {
        exchange(s.provider(), &pairs, now).await.unwrap_err()
    };
    let e = refused(redemption(&code, other_verifier), NOW).await;
    assert_eq!(
        (e.error, e.status),
        ("invalid_grant", StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        refused(redemption(&code, &challenge(VERIFIER)), NOW)
            .await
            .error,
        "invalid_grant"
    );
    let mut wrong_redirect = redemption(&code, VERIFIER);
    wrong_redirect[2].1 = "https://exports.example.org/callback/";
    assert_eq!(refused(wrong_redirect, NOW).await.error, "invalid_grant");
    let mut wrong_client = redemption(&code, VERIFIER);
    wrong_client[3].1 = "someone-else";
    let e = refused(wrong_client, NOW).await;
    assert_eq!(
        (e.error, e.status),
        ("invalid_client", StatusCode::UNAUTHORIZED)
    );
    let e = refused(redemption(&code, VERIFIER), NOW + 60).await;
    assert_eq!(e.error, "invalid_grant", "expired after 60 s");
    // A tampered code does not verify.
    let mut tampered = code.clone().into_bytes();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_eq!(
        refused(redemption(&tampered, VERIFIER), NOW).await.error,
        "invalid_grant"
    );

    // None of the failures used the code up; within 60 s the right request gets tokens, once.
    assert!(
        exchange(s.provider(), &redemption(&code, VERIFIER), NOW + 59)
            .await
            .is_ok()
    );
    assert_eq!(
        refused(redemption(&code, VERIFIER), NOW + 59).await.error,
        "invalid_grant"
    );
}

#[tokio::test]
async fn a_code_is_single_use_across_instances_sharing_the_store() {
    let s = setup().await;
    let code = sign_in(&s).await;
    // A second server instance: same store (same replay cache and key), its own memory.
    let second = LocalProvider::new(ISSUER, s.auth.ports.clone());
    assert!(
        exchange(&second, &redemption(&code, VERIFIER), NOW)
            .await
            .is_ok()
    );
    let e = exchange(s.provider(), &redemption(&code, VERIFIER), NOW)
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_grant");
}

#[tokio::test]
async fn the_token_endpoint_refuses_malformed_requests() {
    let s = setup().await;
    let code = sign_in(&s).await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("grant_type", "client_credentials")],
            "unsupported_grant_type",
        ),
        (
            vec![("grant_type", "refresh_token")],
            "unsupported_grant_type",
        ),
        (vec![], "invalid_request"),
        (
            redemption(&code, VERIFIER)
                .into_iter()
                .filter(|(n, _)| *n != "code_verifier")
                .collect(),
            "invalid_request",
        ),
        (
            redemption(&code, VERIFIER)
                .into_iter()
                .filter(|(n, _)| *n != "redirect_uri")
                .collect(),
            "invalid_request",
        ),
        (
            redemption(&code, VERIFIER)
                .into_iter()
                .filter(|(n, _)| *n != "client_id")
                .collect(),
            "invalid_request",
        ),
        (
            {
                let mut twice = redemption(&code, VERIFIER);
                twice.push(("code", "x"));
                twice
            },
            "invalid_request",
        ),
    ];
    for (pairs, error) in cases {
        let e = exchange(s.provider(), &pairs, NOW).await.unwrap_err();
        assert_eq!(e.error, error, "{pairs:?}");
    }
    let json = s
        .provider()
        .token(Some("application/json"), b"{}", NOW)
        .await
        .unwrap_err();
    assert_eq!(json.error, "invalid_request");
    // After all that, the code still works: refusals before the checks do not spend it.
    assert!(
        exchange(s.provider(), &redemption(&code, VERIFIER), NOW)
            .await
            .is_ok()
    );
}

/// The message and status of a refused sign-in, without the per-form hidden values.
fn refusal(answer: &Answer) -> (StatusCode, String) {
    match answer {
        Answer::Page { status, html, .. } => {
            let message = html
                .split("role=\"alert\">")
                .nth(1)
                .map(|rest| rest.split('<').next().unwrap().to_string())
                .unwrap_or_default();
            (*status, message)
        }
        other => panic!("not a page: {other:?}"),
    }
}

#[tokio::test]
async fn failed_sign_ins_say_the_same_thing_whoever_it_was() {
    let s = setup().await;
    let form = open_form(&s).await;
    let wrong = submit(&s, &form, "ana@example.org", "not the password", NOW).await;
    let unknown = submit(&s, &form, "nobody@example.org", PASSWORD, NOW).await;
    let no_password = submit(&s, &form, "bob@example.org", "", NOW).await;
    let bob = submit(&s, &form, "bob@example.org", "anything goes", NOW).await;
    let expected = (StatusCode::UNAUTHORIZED, WRONG_CREDENTIALS.to_string());
    for answer in [&wrong, &unknown, &bob] {
        assert_eq!(refusal(answer), expected);
    }
    // The typed address comes back, escaped; the password never does.
    let Answer::Page { html, .. } = &wrong else {
        unreachable!()
    };
    assert!(html.contains("value=\"ana@example.org\"") && !html.contains("not the password"));
    // An empty field is asked for again (nothing was checked).
    assert_eq!(refusal(&no_password).0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn five_failures_lock_an_address_for_fifteen_minutes() {
    let s = setup().await;
    let form = open_form(&s).await;
    for i in 0..5 {
        let answer = submit(&s, &form, "ana@example.org", "guess", NOW + i).await;
        assert_eq!(refusal(&answer).0, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    // Now even the right password waits; another address does not.
    let locked = submit(&s, &form, "ana@example.org", PASSWORD, NOW + 10).await;
    let (status, message) = refusal(&locked);
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("Wait 15 minutes"), "{message}");
    let Answer::Page { retry_after, .. } = locked else {
        unreachable!()
    };
    assert_eq!(retry_after, Some(15 * 60 - 10));
    let other = submit(&s, &form, "nobody@example.org", "guess", NOW + 10).await;
    assert_eq!(refusal(&other).0, StatusCode::UNAUTHORIZED);
    // Unknown addresses are locked alike.
    for i in 0..4 {
        submit(&s, &form, "nobody@example.org", "guess", NOW + 11 + i).await;
    }
    let nobody = submit(&s, &form, "nobody@example.org", "guess", NOW + 20).await;
    assert_eq!(refusal(&nobody).0, StatusCode::TOO_MANY_REQUESTS);
    // Fifteen minutes after the first failure, one more attempt is allowed (the form is new:
    // the first one expired after ten minutes).
    let fresh = form_of(
        s.provider()
            .authorize(&authorize_query(|_| {}), NOW + 900)
            .await,
    );
    let later = submit(&s, &fresh, "ana@example.org", PASSWORD, NOW + 900).await;
    assert!(matches!(later, Answer::Redirect { .. }), "{later:?}");
}

#[tokio::test]
async fn the_form_needs_its_csrf_token_in_the_form_and_the_cookie() {
    let s = setup().await;
    let form = open_form(&s).await;
    let other = open_form(&s).await;
    let post = async |pairs: Vec<(&'static str, String)>, cookie: Option<String>| {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
        s.provider()
            .sign_in(
                Some("application/x-www-form-urlencoded"),
                &body(&pairs),
                cookie.as_deref(),
                NOW,
            )
            .await
    };
    let fields = |csrf: Option<&str>| {
        let mut pairs = vec![
            ("login_request", form.login_request.clone()),
            ("email", "ana@example.org".to_string()),
            ("password", PASSWORD.to_string()),
        ];
        if let Some(csrf) = csrf {
            pairs.push(("csrf_token", csrf.to_string()));
        }
        pairs
    };
    for (csrf, cookie, why) in [
        (None, Some(form.cookie.clone()), "no token in the form"),
        (Some(form.csrf_token.as_str()), None, "no cookie"),
        (Some(""), Some(String::new()), "empty token and cookie"),
        (
            Some(other.csrf_token.as_str()),
            Some(other.cookie.clone()),
            "another form's token",
        ),
        (
            Some(form.csrf_token.as_str()),
            Some(other.cookie.clone()),
            "another form's cookie",
        ),
    ] {
        let answer = post(fields(csrf), cookie).await;
        assert_eq!(refusal(&answer).0, StatusCode::FORBIDDEN, "{why}");
        // A new form is offered, with a new token.
        let again = form_of(answer);
        assert_ne!(again.csrf_token, form.csrf_token, "{why}");
    }
    // No failure was counted against the address: the right submission signs in.
    let ok = post(fields(Some(&form.csrf_token)), Some(form.cookie.clone())).await;
    assert!(matches!(ok, Answer::Redirect { .. }));

    // A login request that was altered or has expired is not shown a form at all.
    let mut tampered = fields(Some(&form.csrf_token));
    tampered[0].1.push('x');
    let answer = post(tampered, Some(form.cookie.clone())).await;
    assert!(matches!(
        answer,
        Answer::Page {
            status: StatusCode::BAD_REQUEST,
            login_cookie: None,
            ..
        }
    ));
    let late = s
        .provider()
        .sign_in(
            Some("application/x-www-form-urlencoded"),
            &body(&[
                ("login_request", &form.login_request),
                ("csrf_token", &form.csrf_token),
                ("email", "ana@example.org"),
                ("password", PASSWORD),
            ]),
            Some(&form.cookie),
            NOW + 600,
        )
        .await;
    assert!(matches!(
        late,
        Answer::Page {
            status: StatusCode::BAD_REQUEST,
            ..
        }
    ));
}

#[tokio::test]
async fn authorization_errors_redirect_only_to_the_registered_callback() {
    let s = setup().await;
    for (name, value) in [
        ("client_id", "someone-else"),
        ("redirect_uri", "https://evil.example/callback"),
    ] {
        let query = authorize_query(|p| {
            p.retain(|(n, _)| *n != name);
            p.push((name, value.into()));
        });
        match s.provider().authorize(&query, NOW).await {
            Answer::Page {
                status,
                html,
                login_cookie,
                ..
            } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(login_cookie.is_none() && !html.contains("<form"));
                assert!(!html.contains("evil.example"));
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    let no_pkce = authorize_query(|p| p.retain(|(n, _)| !n.starts_with("code_challenge")));
    let answer = s.provider().authorize(&no_pkce, NOW).await;
    let params = callback_params(&answer);
    assert_eq!(param(&params, "error"), Some("invalid_request"));
    assert_eq!(param(&params, "state"), Some("state-42"));
    assert_eq!(param(&params, "code"), None);
    let plain = authorize_query(|p| {
        p.retain(|(n, _)| !n.starts_with("code_challenge"));
        p.push(("code_challenge", VERIFIER.into()));
        p.push(("code_challenge_method", "plain".into()));
    });
    let params = callback_params(&s.provider().authorize(&plain, NOW).await);
    assert_eq!(param(&params, "error"), Some("invalid_request"));
    // The login hint pre-fills the address, escaped.
    let hinted = authorize_query(|p| p.push(("login_hint", "a\"b@example.org".into())));
    let form = form_of(s.provider().authorize(&hinted, NOW).await);
    assert!(form.html.contains("value=\"a&quot;b@example.org\""));
}

#[tokio::test]
async fn discovery_names_the_endpoints_under_the_issuer() {
    let s = setup().await;
    let d = s.provider().discovery();
    assert_eq!(d["issuer"], ISSUER);
    assert_eq!(
        d["authorization_endpoint"],
        format!("{ISSUER}/oidc/authorize")
    );
    assert_eq!(d["token_endpoint"], format!("{ISSUER}/oidc/token"));
    assert_eq!(d["jwks_uri"], format!("{ISSUER}/auth/jwks"));
    assert_eq!(
        d["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    assert_eq!(
        d["token_endpoint_auth_methods_supported"],
        serde_json::json!(["none"])
    );
    assert_eq!(
        d["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(d["response_types_supported"], serde_json::json!(["code"]));
    assert_eq!(
        d["grant_types_supported"],
        serde_json::json!(["authorization_code"])
    );
    assert_eq!(d["subject_types_supported"], serde_json::json!(["public"]));
    assert_eq!(
        d["scopes_supported"],
        serde_json::json!(["openid", "email", "profile"])
    );
}

#[tokio::test]
async fn a_user_who_lost_their_password_cannot_redeem_a_code() {
    let s = setup().await;
    let code = sign_in(&s).await;
    let mut ana = s.memory.user("ana@example.org").await.unwrap().unwrap();
    ana.password_hash = None;
    s.memory.put_user(&ana).await.unwrap();
    let e = exchange(s.provider(), &redemption(&code, VERIFIER), NOW)
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_grant");
}

#[tokio::test]
async fn the_provider_can_be_off() {
    let (_, ports) = ports();
    let config = AuthConfig {
        enforce: true,
        issuer: ISSUER.into(),
        trusted_issuers: vec![],
        provider: false,
    };
    assert!(
        Authenticator::new(config, ports, |_| true)
            .provider
            .is_none()
    );
}
