//! Who may do what. Every caller of the service proves who it is in one of three ways, and this
//! crate turns that proof into a [`Principal`]:
//!
//! - FHIR bulk clients: SMART Backend Services ([`smart`]): a signed client assertion buys a
//!   short-lived access token carrying SMART scopes ([`scopes`]).
//! - People: OpenID Connect bearer tokens from trusted issuers ([`oidc`]), the local server being
//!   one of them; their rights are study memberships kept here ([`principal::Membership`]).
//!   Locally the server is also the OpenID provider that signs them in ([`provider`], with
//!   passwords kept as Argon2id hashes, [`password`]).
//! - Integrations: API keys ([`api_keys`]), stored only as hashes.
//!
//! Storage and signing are ports ([`ports`]): SQLite and a local key on one machine, DynamoDB and
//! KMS on AWS. Nothing here depends on either.

pub mod api_keys;
pub mod authenticate;
pub mod discovery;
pub mod error;
pub mod jwks;
pub mod jwt;
pub mod oidc;
pub mod password;
pub mod ports;
pub mod principal;
pub mod provider;
pub mod random;
pub mod rate_limit;
pub mod scopes;
pub mod signer;
pub mod smart;

pub use authenticate::{AuthConfig, Authenticator};
pub use error::{AuthFailure, OAuthError, StoreError, StoreResult};
pub use principal::{Membership, Principal, Role, SiteScope};
pub use scopes::Scopes;
