//! In-memory stores and test keys for the auth tests.

#![allow(dead_code)]

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use export_auth::StoreResult;
use export_auth::ports::*;
use export_auth::principal::Membership;
use export_auth::signer::LocalSigner;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Memory {
    clients: Mutex<HashMap<String, RegisteredClient>>,
    seen: Mutex<HashMap<String, i64>>,
    users: Mutex<HashMap<String, User>>,
    memberships: Mutex<Vec<(String, Membership)>>,
    keys: Mutex<Vec<ApiKeyRecord>>,
    /// JWK Sets served at URLs, and how often each was fetched.
    pub served: Mutex<HashMap<String, Value>>,
    pub fetches: Mutex<usize>,
}

#[async_trait]
impl ClientStore for Memory {
    async fn put_client(&self, c: &RegisteredClient) -> StoreResult<()> {
        self.clients.lock().unwrap().insert(c.id.clone(), c.clone());
        Ok(())
    }
    async fn client(&self, id: &str) -> StoreResult<Option<RegisteredClient>> {
        Ok(self.clients.lock().unwrap().get(id).cloned())
    }
    async fn clients(&self) -> StoreResult<Vec<RegisteredClient>> {
        Ok(self.clients.lock().unwrap().values().cloned().collect())
    }
    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        Ok(self.clients.lock().unwrap().remove(id).is_some())
    }
}

#[async_trait]
impl ReplayCache for Memory {
    async fn first_use(&self, key: &str, expires: i64, now: i64) -> StoreResult<bool> {
        let mut seen = self.seen.lock().unwrap();
        if seen.get(key).is_some_and(|e| *e >= now) {
            return Ok(false);
        }
        seen.insert(key.to_string(), expires);
        Ok(true)
    }
}

#[async_trait]
impl UserStore for Memory {
    async fn put_user(&self, u: &User) -> StoreResult<()> {
        self.users
            .lock()
            .unwrap()
            .insert(u.email.clone(), u.clone());
        Ok(())
    }
    async fn user(&self, email: &str) -> StoreResult<Option<User>> {
        Ok(self.users.lock().unwrap().get(email).cloned())
    }
    async fn users(&self) -> StoreResult<Vec<User>> {
        Ok(self.users.lock().unwrap().values().cloned().collect())
    }
}

#[async_trait]
impl MembershipStore for Memory {
    async fn grant(&self, email: &str, m: &Membership) -> StoreResult<()> {
        let mut all = self.memberships.lock().unwrap();
        all.retain(|(e, x)| !(e == email && x.study == m.study));
        all.push((email.to_string(), m.clone()));
        Ok(())
    }
    async fn revoke(&self, email: &str, study: &str) -> StoreResult<bool> {
        let mut all = self.memberships.lock().unwrap();
        let before = all.len();
        all.retain(|(e, x)| !(e == email && x.study == study));
        Ok(all.len() < before)
    }
    async fn memberships(&self, email: &str) -> StoreResult<Vec<Membership>> {
        Ok(self
            .memberships
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| e == email)
            .map(|(_, m)| m.clone())
            .collect())
    }
    async fn all_memberships(&self) -> StoreResult<Vec<(String, Membership)>> {
        Ok(self.memberships.lock().unwrap().clone())
    }
}

#[async_trait]
impl ApiKeyStore for Memory {
    async fn put_api_key(&self, k: &ApiKeyRecord) -> StoreResult<()> {
        self.keys.lock().unwrap().push(k.clone());
        Ok(())
    }
    async fn api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(self
            .keys
            .lock()
            .unwrap()
            .iter()
            .find(|k| k.hash == hash)
            .cloned())
    }
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        Ok(self.keys.lock().unwrap().clone())
    }
    async fn revoke_api_key(&self, id: &str) -> StoreResult<bool> {
        let mut keys = self.keys.lock().unwrap();
        let found = keys.iter_mut().find(|k| k.id == id);
        Ok(found.map(|k| k.revoked = true).is_some())
    }
    async fn touch_api_key(&self, id: &str, now: i64) -> StoreResult<()> {
        if let Some(k) = self.keys.lock().unwrap().iter_mut().find(|k| k.id == id) {
            k.last_used = Some(now);
        }
        Ok(())
    }
}

#[async_trait]
impl JwksFetcher for Memory {
    async fn fetch(&self, url: &str) -> Result<Value, String> {
        *self.fetches.lock().unwrap() += 1;
        self.served
            .lock()
            .unwrap()
            .get(url)
            .cloned()
            .ok_or_else(|| format!("nothing at {url}"))
    }
}

/// Ports over one in-memory store and a fresh local signing key.
pub fn ports() -> (Arc<Memory>, AuthPorts) {
    let memory = Arc::new(Memory::default());
    let (signer, _) = LocalSigner::generate();
    let ports = AuthPorts {
        clients: memory.clone(),
        replay: memory.clone(),
        users: memory.clone(),
        memberships: memory.clone(),
        api_keys: memory.clone(),
        signer: Arc::new(signer),
        fetcher: memory.clone(),
    };
    (memory, ports)
}

/// A client's key pair, generated for the test.
pub struct ClientKey {
    pub alg: Algorithm,
    pub kid: String,
    encoding: EncodingKey,
    pub public: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl ClientKey {
    pub fn generate(alg: Algorithm) -> ClientKey {
        let kid = format!("{alg:?}-{}", export_auth::random::hex_id());
        let (encoding, mut public) = match alg {
            Algorithm::RS256 | Algorithm::RS384 => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                use rsa::traits::PublicKeyParts;
                let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap();
                let trim = |bytes: Box<[u8]>| {
                    let start = bytes.iter().position(|b| *b != 0).unwrap_or(0);
                    b64(&bytes[start..])
                };
                let public = json!({"kty": "RSA", "n": trim(key.n().to_be_bytes()), "e": trim(key.e().to_be_bytes())});
                let der = key.to_pkcs1_der().unwrap();
                (EncodingKey::from_rsa_der(der.as_bytes()), public)
            }
            Algorithm::ES384 => {
                use p384::pkcs8::EncodePrivateKey;
                let key = loop {
                    if let Ok(k) = p384::SecretKey::from_slice(&export_auth::random::bytes::<48>())
                    {
                        break k;
                    }
                };
                use p256::elliptic_curve::sec1::ToSec1Point;
                let point = key.public_key().to_sec1_point(false);
                let public = json!({"kty": "EC", "crv": "P-384",
                    "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
                let der = key.to_pkcs8_der().unwrap();
                (EncodingKey::from_ec_der(der.as_bytes()), public)
            }
            Algorithm::ES256 => {
                use p256::pkcs8::EncodePrivateKey;
                let key = loop {
                    if let Ok(k) = p256::SecretKey::from_slice(&export_auth::random::bytes::<32>())
                    {
                        break k;
                    }
                };
                use p256::elliptic_curve::sec1::ToSec1Point;
                let point = key.public_key().to_sec1_point(false);
                let public = json!({"kty": "EC", "crv": "P-256",
                    "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
                let der = key.to_pkcs8_der().unwrap();
                (EncodingKey::from_ec_der(der.as_bytes()), public)
            }
            other => panic!("no test key for {other:?}"),
        };
        public["kid"] = json!(kid);
        public["alg"] = json!(format!("{alg:?}"));
        ClientKey {
            alg,
            kid,
            encoding,
            public,
        }
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [self.public]})
    }

    /// Signs `claims` with this key; `edit` may change the header first.
    pub fn sign(&self, claims: &Value, edit: impl FnOnce(&mut Header)) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        edit(&mut header);
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}
