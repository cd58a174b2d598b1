//! The SMART Backend Services token endpoint and bearer authentication, rule by rule, with keys
//! generated here for RS384, ES384, RS256 and ES256.

mod support;

use export_auth::ports::{ClientKeys, RegisteredClient};
use export_auth::smart::JWT_BEARER;
use export_auth::{AuthConfig, AuthFailure, Authenticator, OAuthError, Principal};
use http::HeaderMap;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use std::sync::Arc;
use support::*;

const TOKEN_URL: &str = "https://fhir.example.org/auth/token";
const ISSUER: &str = "https://fhir.example.org";
const NOW: i64 = 1_800_000_000;

fn is_type(t: &str) -> bool {
    ["Patient", "Observation", "Condition", "Encounter"].contains(&t)
}

struct Setup {
    memory: Arc<Memory>,
    auth: Authenticator,
}

fn setup() -> Setup {
    let (memory, ports) = ports();
    let config = AuthConfig {
        enforce: true,
        issuer: ISSUER.into(),
        trusted_issuers: vec![],
        provider: false,
    };
    Setup {
        memory,
        auth: Authenticator::new(config, ports, is_type),
    }
}

impl Setup {
    async fn register(&self, id: &str, keys: ClientKeys, allowed: &str) {
        use export_auth::ports::ClientStore;
        self.memory
            .put_client(&RegisteredClient {
                id: id.into(),
                keys,
                allowed_scopes: allowed.into(),
                created: NOW,
            })
            .await
            .unwrap();
    }

    async fn request(&self, assertion: &str, scope: &str) -> Result<Value, OAuthError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_assertion_type", JWT_BEARER)
            .append_pair("client_assertion", assertion)
            .append_pair("scope", scope)
            .finish();
        self.raw(&body).await
    }

    async fn raw(&self, body: &str) -> Result<Value, OAuthError> {
        self.auth
            .tokens
            .token(
                Some("application/x-www-form-urlencoded"),
                body.as_bytes(),
                TOKEN_URL,
                ISSUER,
                NOW,
            )
            .await
    }

    async fn principal(&self, access_token: &str, now: i64) -> Result<Principal, AuthFailure> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {access_token}").parse().unwrap(),
        );
        self.auth.authenticate(&headers, now).await
    }
}

fn claims(client: &str) -> Value {
    json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": NOW + 240,
        "jti": export_auth::random::hex_id()})
}

fn edited(client: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = claims(client);
    edit(&mut c);
    c
}

#[tokio::test]
async fn every_algorithm_gets_a_token_that_authenticates() {
    let s = setup();
    for alg in [
        Algorithm::RS384,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::ES256,
    ] {
        let key = ClientKey::generate(alg);
        let id = format!("client-{alg:?}");
        s.register(&id, ClientKeys::Inline(key.jwks()), "system/*.rs")
            .await;
        let response = s
            .request(
                &key.sign(&claims(&id), |_| {}),
                "system/Patient.read system/Observation.rs",
            )
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(response["token_type"], "bearer");
        assert_eq!(response["scope"], "system/Observation.rs system/Patient.rs");
        let expires_in = response["expires_in"].as_i64().unwrap();
        assert!(expires_in > 0 && expires_in <= 300);
        let token = response["access_token"].as_str().unwrap();
        match s.principal(token, NOW + 10).await.unwrap() {
            Principal::BulkClient { client_id, scopes } => {
                assert_eq!(client_id, id);
                assert!(scopes.allows("Patient") && scopes.allows("Observation"));
                assert!(!scopes.allows("Condition"));
            }
            other => panic!("{other:?}"),
        }
        // The access token expires.
        assert!(matches!(
            s.principal(token, NOW + expires_in + 1).await,
            Err(AuthFailure::Invalid(_))
        ));
    }
}

#[tokio::test]
async fn each_assertion_rule_is_enforced() {
    let s = setup();
    let key = ClientKey::generate(Algorithm::ES384);
    let other_key = ClientKey::generate(Algorithm::ES384);
    s.register("c", ClientKeys::Inline(key.jwks()), "system/*.rs")
        .await;
    let scope = "system/*.read";
    // (what is wrong, the assertion, the error code expected)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong aud",
            key.sign(
                &edited("c", |c| c["aud"] = json!("https://elsewhere/token")),
                |_| {},
            ),
            "invalid_client",
        ),
        (
            "iss differs from sub",
            key.sign(&edited("c", |c| c["sub"] = json!("someone")), |_| {}),
            "invalid_client",
        ),
        (
            "expired",
            key.sign(&edited("c", |c| c["exp"] = json!(NOW - 120)), |_| {}),
            "invalid_client",
        ),
        (
            "exp too far ahead",
            key.sign(&edited("c", |c| c["exp"] = json!(NOW + 3600)), |_| {}),
            "invalid_client",
        ),
        (
            "no exp",
            key.sign(
                &edited("c", |c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                |_| {},
            ),
            "invalid_client",
        ),
        (
            "no jti",
            key.sign(
                &edited("c", |c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
                |_| {},
            ),
            "invalid_client",
        ),
        (
            "not yet valid",
            key.sign(&edited("c", |c| c["nbf"] = json!(NOW + 200)), |_| {}),
            "invalid_client",
        ),
        (
            "unknown client",
            key.sign(&claims("nobody"), |_| {}),
            "invalid_client",
        ),
        (
            "signed with another key",
            other_key.sign(&claims("c"), |h| h.kid = Some(key.kid.clone())),
            "invalid_client",
        ),
        (
            "unknown kid",
            key.sign(&claims("c"), |h| h.kid = Some("nope".into())),
            "invalid_client",
        ),
        (
            "jku not registered",
            key.sign(&claims("c"), |h| {
                h.jku = Some("https://attacker.example/jwks".into())
            }),
            "invalid_client",
        ),
        ("not a JWT", "abc.def".to_string(), "invalid_client"),
    ];
    for (what, assertion, code) in cases {
        let error = s.request(&assertion, scope).await.expect_err(what);
        assert_eq!(error.error, code, "{what}: {error:?}");
        assert_eq!(
            error.status,
            if code == "invalid_client" { 401 } else { 400 },
            "{what}"
        );
        assert!(!error.description.is_empty());
    }

    // A replayed assertion (same jti) is refused the second time.
    let once = key.sign(&claims("c"), |_| {});
    assert!(s.request(&once, scope).await.is_ok());
    assert_eq!(
        s.request(&once, scope).await.unwrap_err().error,
        "invalid_grant"
    );

    // A key whose alg does not match the header's.
    let mut mismatched = key.jwks();
    mismatched["keys"][0]["alg"] = json!("ES256");
    s.register("m", ClientKeys::Inline(mismatched), "system/*.rs")
        .await;
    let e = s
        .request(&key.sign(&claims("m"), |_| {}), scope)
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_client");
    // An RSA key cannot verify an ES384 signature, whatever its kid.
    let rsa = ClientKey::generate(Algorithm::RS384);
    let mut wrong_kty = rsa.jwks();
    wrong_kty["keys"][0]["kid"] = json!(key.kid);
    wrong_kty["keys"][0].as_object_mut().unwrap().remove("alg");
    s.register("k", ClientKeys::Inline(wrong_kty), "system/*.rs")
        .await;
    assert_eq!(
        s.request(&key.sign(&claims("k"), |_| {}), scope)
            .await
            .unwrap_err()
            .error,
        "invalid_client"
    );
}

#[tokio::test]
async fn form_grant_and_scope_errors_follow_rfc_6749() {
    let s = setup();
    let key = ClientKey::generate(Algorithm::RS384);
    s.register(
        "c",
        ClientKeys::Inline(key.jwks()),
        "system/Patient.rs system/Observation.rs",
    )
    .await;
    let assertion = |s2: &str| key.sign(&claims(s2), |_| {});
    let cases: Vec<(String, &str)> = vec![
        (
            "grant_type=password&scope=system%2F*.read".into(),
            "unsupported_grant_type",
        ),
        ("scope=system%2F*.read".into(), "invalid_request"),
        (
            format!(
                "grant_type=client_credentials&client_assertion_type=other&client_assertion={}&scope=system%2F*.read",
                assertion("c")
            ),
            "invalid_request",
        ),
        (
            format!(
                "grant_type=client_credentials&client_assertion_type={}&scope=system%2F*.read",
                form_urlencoded::byte_serialize(JWT_BEARER.as_bytes()).collect::<String>()
            ),
            "invalid_request",
        ),
        (
            format!(
                "grant_type=client_credentials&grant_type=client_credentials&client_assertion_type={}&client_assertion={}&scope=system%2F*.read",
                form_urlencoded::byte_serialize(JWT_BEARER.as_bytes()).collect::<String>(),
                assertion("c")
            ),
            "invalid_request",
        ),
        (
            format!(
                "grant_type=client_credentials&client_assertion_type={}&client_assertion={}",
                form_urlencoded::byte_serialize(JWT_BEARER.as_bytes()).collect::<String>(),
                assertion("c")
            ),
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let e = s.raw(&body).await.unwrap_err();
        assert_eq!(e.error, code, "{body}: {e:?}");
        assert_eq!(e.status, 400);
    }
    // Wrong content type.
    let e = s
        .auth
        .tokens
        .token(Some("application/json"), b"{}", TOKEN_URL, ISSUER, NOW)
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_request");

    // Scopes: malformed, nothing grantable, beyond the registration, and a mixed request.
    for scope in [
        "system/Patient",
        "system/*.write",
        "patient/*.read",
        "system/Foo.read",
        "system/Condition.rs",
    ] {
        let e = s.request(&assertion("c"), scope).await.unwrap_err();
        assert_eq!(e.error, "invalid_scope", "{scope}");
    }
    let mixed = s
        .request(
            &assertion("c"),
            "system/Patient.read system/Observation.write system/Condition.rs patient/*.rs",
        )
        .await
        .unwrap();
    assert_eq!(
        mixed["scope"], "system/Patient.rs",
        "granted without the write and the unregistered parts"
    );
    // `system/*.read` is narrowed to what the client may have.
    let all = s.request(&assertion("c"), "system/*.read").await.unwrap();
    assert_eq!(all["scope"], "system/Observation.rs system/Patient.rs");
}

#[tokio::test]
async fn clients_with_a_jwks_url_are_fetched_and_checked_against_jku() {
    let s = setup();
    let key = ClientKey::generate(Algorithm::ES384);
    let url = "https://client.example/jwks.json";
    s.memory
        .served
        .lock()
        .unwrap()
        .insert(url.into(), key.jwks());
    s.register("u", ClientKeys::Url(url.into()), "system/*.rs")
        .await;
    assert!(
        s.request(&key.sign(&claims("u"), |_| {}), "system/*.rs")
            .await
            .is_ok()
    );
    assert!(
        s.request(
            &key.sign(&claims("u"), |h| h.jku = Some(url.into())),
            "system/*.rs"
        )
        .await
        .is_ok(),
        "a jku equal to the registered URL is fine"
    );
    let e = s
        .request(
            &key.sign(&claims("u"), |h| {
                h.jku = Some("https://client.example/other".into())
            }),
            "system/*.rs",
        )
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_client");
    assert_eq!(*s.memory.fetches.lock().unwrap(), 1, "the set is cached");
}

#[tokio::test]
async fn token_requests_are_rate_limited_per_client() {
    let s = setup();
    let key = ClientKey::generate(Algorithm::ES256);
    s.register("busy", ClientKeys::Inline(key.jwks()), "system/*.rs")
        .await;
    let mut limited = None;
    for _ in 0..30 {
        if let Err(e) = s
            .request(&key.sign(&claims("busy"), |_| {}), "system/*.rs")
            .await
        {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("a burst of token requests is limited");
    assert_eq!((e.status.as_u16(), e.error), (429, "slow_down"));
    assert!(e.retry_after.unwrap() >= 1);
}

#[tokio::test]
async fn bearer_tokens_and_api_keys() {
    use export_auth::ports::{ApiKeyStore, MembershipStore, User};
    use export_auth::principal::{Membership, Role};
    let s = setup();
    // No credential with enforcement on; malformed headers.
    let none = HeaderMap::new();
    assert_eq!(
        s.auth.authenticate(&none, NOW).await,
        Err(AuthFailure::Missing)
    );
    for value in ["Basic abc", "Bearer", "Bearer not-a-jwt", "Bearer a.b.c"] {
        let mut h = HeaderMap::new();
        h.insert("authorization", value.parse().unwrap());
        assert!(
            matches!(
                s.auth.authenticate(&h, NOW).await,
                Err(AuthFailure::Invalid(_))
            ),
            "{value}"
        );
    }

    // A local user token carries the user's memberships.
    let user = User {
        email: "ana@example.org".into(),
        name: "Ana".into(),
        subject: "u-1".into(),
        created: NOW,
        password_hash: None,
    };
    let member = Membership::new("study-1", Role::Investigator, vec![]).unwrap();
    s.memory.grant(&user.email, &member).await.unwrap();
    let token =
        export_auth::oidc::local_user_token(s.auth.ports.signer.as_ref(), ISSUER, &user, NOW, 3600)
            .await
            .unwrap();
    match s.principal(&token, NOW + 5).await.unwrap() {
        Principal::User {
            email, memberships, ..
        } => {
            assert_eq!(email.as_deref(), Some("ana@example.org"));
            assert_eq!(memberships, vec![member.clone()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(
            s.principal(&token, NOW + 7200).await,
            Err(AuthFailure::Invalid(_))
        ),
        "expired"
    );
    // A user token is not an access token: it does not reach the FHIR API as a client.
    assert!(
        s.principal(&token, NOW)
            .await
            .unwrap()
            .fhir_scopes()
            .is_none()
    );

    // Untrusted issuer, wrong audience (signed by a key the service does not know, or its own).
    let stranger = ClientKey::generate(Algorithm::RS256);
    let foreign = stranger.sign(
        &json!({"iss": "https://idp.example", "aud": "bulk-export", "sub": "x", "exp": NOW + 60}),
        |_| {},
    );
    assert!(
        matches!(s.principal(&foreign, NOW).await, Err(AuthFailure::Invalid(m)) if m.contains("issuer"))
    );
    let wrong_aud = export_auth::jwt::sign(
        s.auth.ports.signer.as_ref(),
        &json!({"iss": ISSUER, "aud": "someone-else", "sub": "u-1", "exp": NOW + 60}),
    )
    .await
    .unwrap();
    assert!(
        matches!(s.principal(&wrong_aud, NOW).await, Err(AuthFailure::Invalid(m)) if m.contains("aud"))
    );

    // API keys, by either header; a revoked key is refused.
    let (key, record) = export_auth::api_keys::create("etl", member.clone(), NOW);
    s.memory.put_api_key(&record).await.unwrap();
    let mut by_bearer = HeaderMap::new();
    by_bearer.insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut by_header = HeaderMap::new();
    by_header.insert("x-api-key", key.parse().unwrap());
    for headers in [&by_bearer, &by_header] {
        match s.auth.authenticate(headers, NOW).await.unwrap() {
            Principal::ApiKey { membership, .. } => assert_eq!(membership, member),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.memory.api_keys().await.unwrap()[0].last_used, Some(NOW));
    s.memory.revoke_api_key(&record.id).await.unwrap();
    assert!(matches!(
        s.auth.authenticate(&by_bearer, NOW).await,
        Err(AuthFailure::Invalid(_))
    ));
    let mut guessed = HeaderMap::new();
    guessed.insert("x-api-key", "bek_guess".parse().unwrap());
    assert!(matches!(
        s.auth.authenticate(&guessed, NOW).await,
        Err(AuthFailure::Invalid(_))
    ));
}

#[tokio::test]
async fn without_enforcement_no_credential_is_the_local_administrator() {
    let (_, ports) = ports();
    let config = AuthConfig {
        enforce: false,
        issuer: ISSUER.into(),
        trusted_issuers: vec![],
        provider: false,
    };
    let auth = Authenticator::new(config, ports, is_type);
    assert_eq!(
        auth.authenticate(&HeaderMap::new(), NOW).await,
        Ok(Principal::LocalAdmin)
    );
    // A credential that is sent is still checked.
    let mut h = HeaderMap::new();
    h.insert("authorization", "Bearer a.b.c".parse().unwrap());
    assert!(auth.authenticate(&h, NOW).await.is_err());
}
