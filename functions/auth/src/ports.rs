//! The stores and the signer authentication needs. Each is small; SQLite and a local key
//! implement them on one machine, DynamoDB and KMS on AWS.

use crate::error::StoreResult;
use crate::principal::Membership;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// Where a client's public keys are: given at registration, or fetched from its JWKS URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKeys {
    /// A JWK Set (`{"keys": [...]}`), public keys only.
    Inline(Value),
    /// An `https` URL serving the JWK Set (`http` only on loopback, for development).
    Url(String),
}

/// A SMART Backend Services client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredClient {
    pub id: String,
    pub keys: ClientKeys,
    /// The scopes it may be granted (v2 form); a request is narrowed to these.
    pub allowed_scopes: String,
    /// Seconds since the epoch.
    pub created: i64,
}

#[async_trait]
pub trait ClientStore: Send + Sync {
    /// Adds or replaces a client.
    async fn put_client(&self, client: &RegisteredClient) -> StoreResult<()>;
    async fn client(&self, id: &str) -> StoreResult<Option<RegisteredClient>>;
    async fn clients(&self) -> StoreResult<Vec<RegisteredClient>>;
    /// Returns whether it existed.
    async fn remove_client(&self, id: &str) -> StoreResult<bool>;
}

/// Token ids seen, so an assertion cannot be replayed while it is valid.
#[async_trait]
pub trait ReplayCache: Send + Sync {
    /// Records `key` until `expires` (seconds since the epoch) and returns true, or returns false
    /// if it is already recorded and not yet expired. One atomic step: two concurrent uses of
    /// the same key cannot both get true.
    async fn first_use(&self, key: &str, expires: i64, now: i64) -> StoreResult<bool>;
}

/// A person known to the local issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Lowercased; how the CLI and memberships name the user.
    pub email: String,
    pub name: String,
    /// The stable `sub` of the tokens the local issuer signs for this user.
    pub subject: String,
    pub created: i64,
    /// The Argon2id hash (a PHC string) of the password the local sign-in page checks; none for
    /// people who only get tokens from `bulk-export token` or another issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

#[async_trait]
pub trait UserStore: Send + Sync {
    /// Adds a user, or replaces the name and password hash of an existing one (the subject and
    /// creation time never change).
    async fn put_user(&self, user: &User) -> StoreResult<()>;
    async fn user(&self, email: &str) -> StoreResult<Option<User>>;
    async fn users(&self) -> StoreResult<Vec<User>>;
}

/// Study memberships, kept by the service (not read from tokens), by user e-mail.
#[async_trait]
pub trait MembershipStore: Send + Sync {
    /// Grants (or replaces) `email`'s role in `membership.study`.
    async fn grant(&self, email: &str, membership: &Membership) -> StoreResult<()>;
    /// Returns whether there was a membership.
    async fn revoke(&self, email: &str, study: &str) -> StoreResult<bool>;
    async fn memberships(&self, email: &str) -> StoreResult<Vec<Membership>>;
    /// Every membership, as (e-mail, membership).
    async fn all_memberships(&self) -> StoreResult<Vec<(String, Membership)>>;
}

/// An API key as stored: its SHA-256, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    pub membership: Membership,
    pub created: i64,
    pub last_used: Option<i64>,
    pub revoked: bool,
}

#[async_trait]
pub trait ApiKeyStore: Send + Sync {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    async fn api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>>;
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Returns whether a key with this id existed (revoked keys stay listed).
    async fn revoke_api_key(&self, id: &str) -> StoreResult<bool>;
    async fn touch_api_key(&self, id: &str, now: i64) -> StoreResult<()>;
}

/// Signs the tokens this service issues (ES256). The private key never leaves the signer.
#[async_trait]
pub trait Signer: Send + Sync {
    /// The `kid` of the signing key.
    fn key_id(&self) -> String;
    /// The public key as a JWK (`kty` EC, `crv` P-256, `x`, `y`, `kid`, `alg` ES256).
    fn public_jwk(&self) -> Value;
    /// The ES256 signature of `message`: 64 bytes, r then s.
    async fn sign(&self, message: &[u8]) -> StoreResult<Vec<u8>>;
}

/// Fetches a JWK Set from a URL (a client's or an OpenID issuer's).
#[async_trait]
pub trait JwksFetcher: Send + Sync {
    async fn fetch(&self, url: &str) -> Result<Value, String>;
}

/// Every port authentication uses.
#[derive(Clone)]
pub struct AuthPorts {
    pub clients: Arc<dyn ClientStore>,
    pub replay: Arc<dyn ReplayCache>,
    pub users: Arc<dyn UserStore>,
    pub memberships: Arc<dyn MembershipStore>,
    pub api_keys: Arc<dyn ApiKeyStore>,
    pub signer: Arc<dyn Signer>,
    pub fetcher: Arc<dyn JwksFetcher>,
}
