//! A SMART Backend Services client for the end-to-end tests: its own ES384 key (generated here,
//! signed with `jsonwebtoken`, not with the server's code), registered with `bulk-export clients
//! add`, and access tokens from the server's token endpoint.

use crate::{Server, request, run_cli};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p384::elliptic_curve::sec1::ToSec1Point;
use p384::pkcs8::EncodePrivateKey;
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// A client with a key pair.
pub struct TestClient {
    pub id: String,
    pub kid: String,
    encoding: EncodingKey,
    pub jwks: Value,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl TestClient {
    /// A new client `id` with a fresh P-384 key.
    pub fn new(id: &str) -> TestClient {
        let key = loop {
            let mut seed = [0u8; 48];
            getrandom::fill(&mut seed).unwrap();
            if let Ok(k) = p384::SecretKey::from_slice(&seed) {
                break k;
            }
        };
        let point = key.public_key().to_sec1_point(false);
        let kid = format!("{id}-key-1");
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-384", "alg": "ES384", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
        }]});
        TestClient {
            id: id.to_string(),
            kid,
            encoding: EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes()),
            jwks,
        }
    }

    /// Registers the client with the server's store, allowed `scope`.
    pub fn register(&self, server: &Server, scope: &str) {
        let file = server.dir.join(format!("{}.jwks.json", self.id));
        std::fs::write(&file, self.jwks.to_string()).unwrap();
        run_cli(&[
            "clients",
            "add",
            "--db",
            server.dir.join("store.db").to_str().unwrap(),
            "--id",
            &self.id,
            "--jwks",
            file.to_str().unwrap(),
            "--scope",
            scope,
        ]);
    }

    /// A signed client assertion for `token_url`; `edit` may change the claims first.
    pub fn assertion(&self, token_url: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = json!({"iss": self.id, "sub": self.id, "aud": token_url,
            "exp": now() + 240, "jti": format!("{}-{}", self.id, crate::unique())});
        edit(&mut claims);
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }

    /// Asks the token endpoint for `scope`; returns the HTTP response.
    pub fn request_token(&self, server: &Server, scope: &str) -> crate::Response {
        let token_url = server.token_url();
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", &self.assertion(&token_url, |_| {}))
            .append_pair("scope", scope)
            .finish();
        request(
            "POST",
            &token_url,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(body),
        )
    }

    /// An access token for `scope` (panics if refused).
    pub fn token(&self, server: &Server, scope: &str) -> String {
        let response = self.request_token(server, scope);
        assert_eq!(
            response.status, 200,
            "token for {}: {}",
            self.id, response.body
        );
        response.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Server {
    /// The token endpoint: the origin of the FHIR base, then `/auth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base.trim_end_matches("/fhir"))
    }

    /// A registered client (allowed every type) and an access token for `scope`.
    pub fn client_token(&self, id: &str, scope: &str) -> String {
        let client = TestClient::new(id);
        client.register(self, "system/*.rs");
        client.token(self, scope)
    }
}
