//! People's tokens: OpenID Connect ID or access tokens from issuers the service is configured to
//! trust (Cognito on AWS, any OIDC provider, and the local server itself). The token says who the
//! person is; what they may do comes from the memberships the service keeps.

use crate::error::AuthFailure;
use crate::jwks::JwksCache;
use crate::jwt;
use crate::ports::{AuthPorts, JwksFetcher, Signer};
use crate::principal::Principal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;

/// Clock difference tolerated on `exp` and `nbf`.
const LEEWAY: i64 = 60;
/// The audience of the user tokens the local issuer signs.
pub const LOCAL_AUDIENCE: &str = "bulk-export";

/// An issuer whose tokens are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrustedIssuer {
    /// Exactly the token's `iss`.
    pub issuer: String,
    /// The `aud` (or, for Cognito access tokens, `client_id`) the token must carry.
    pub audience: String,
    pub keys: IssuerKeys,
}

/// Where an issuer's public keys are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKeys {
    /// Its `jwks_uri`.
    Url(String),
    /// A JWK Set given in the configuration (read from a file).
    Inline(Value),
    /// This service's own signing key: the local issuer.
    Own,
}

/// Verifies people's tokens against the trusted issuers.
pub struct UserTokens {
    issuers: Vec<TrustedIssuer>,
    jwks: JwksCache,
    signer: Arc<dyn Signer>,
}

impl UserTokens {
    pub fn new(
        issuers: Vec<TrustedIssuer>,
        fetcher: Arc<dyn JwksFetcher>,
        signer: Arc<dyn Signer>,
    ) -> Self {
        UserTokens {
            issuers,
            jwks: JwksCache::new(fetcher),
            signer,
        }
    }

    /// Whether `issuer` is trusted.
    pub fn trusts(&self, issuer: &str) -> bool {
        self.issuers.iter().any(|i| i.issuer == issuer)
    }

    /// The person a token names, with their memberships.
    pub async fn verify(
        &self,
        token: &str,
        claims_issuer: &str,
        ports: &AuthPorts,
        now: i64,
    ) -> Result<Principal, AuthFailure> {
        let invalid = |why: &str| AuthFailure::Invalid(why.to_string());
        // One issuer can be trusted for several audiences (the API's client and the page's).
        let candidates: Vec<&TrustedIssuer> = self
            .issuers
            .iter()
            .filter(|i| i.issuer == claims_issuer)
            .collect();
        let trusted = *candidates
            .first()
            .ok_or_else(|| invalid("the token's issuer is not trusted"))?;
        let header = jwt::read_header(token).map_err(|e| invalid(&e))?;
        let keys = match &trusted.keys {
            IssuerKeys::Own => jwt::own_jwks(self.signer.as_ref()),
            IssuerKeys::Inline(set) => set.clone(),
            IssuerKeys::Url(url) => self
                .jwks
                .get(url, header.kid.as_deref())
                .await
                .map_err(|e| AuthFailure::Internal(format!("issuer JWKS: {e}")))?,
        };
        let claims = jwt::verify(token, &keys).map_err(|e| invalid(&e))?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(String::from);
        if text("iss").as_deref() != Some(trusted.issuer.as_str()) {
            return Err(invalid("the token's issuer is not trusted"));
        }
        let audience_ok = candidates.iter().any(|t| {
            jwt::audience_includes(&claims, &t.audience)
                || (claims.get("aud").is_none()
                    && text("client_id").as_deref() == Some(t.audience.as_str()))
        });
        if !audience_ok {
            return Err(invalid("the token is not meant for this service (aud)"));
        }
        match jwt::seconds(&claims, "exp") {
            Some(exp) if exp + LEEWAY >= now => {}
            Some(_) => return Err(invalid("the token has expired")),
            None => return Err(invalid("the token has no exp")),
        }
        if jwt::seconds(&claims, "nbf").is_some_and(|nbf| nbf > now + LEEWAY) {
            return Err(invalid("the token is not valid yet"));
        }
        let subject = text("sub").ok_or_else(|| invalid("the token has no sub"))?;
        // Memberships are kept by e-mail, so an address counts only if the issuer vouches for it:
        // `email_verified` true (a person could otherwise set someone else's address in their
        // profile), or the local issuer, whose users an administrator made.
        let verified = matches!(trusted.keys, IssuerKeys::Own)
            || matches!(claims.get("email_verified"), Some(Value::Bool(true)))
            || claims.get("email_verified").and_then(Value::as_str) == Some("true");
        let email = text("email")
            .filter(|_| verified)
            .map(|e| e.to_ascii_lowercase());
        let memberships = match &email {
            Some(email) => ports.memberships.memberships(email).await?,
            None => Vec::new(),
        };
        Ok(Principal::User {
            issuer: trusted.issuer.clone(),
            subject,
            email,
            name: text("name"),
            memberships,
        })
    }
}

/// A user token signed by the local issuer, as `bulk-export token` prints it.
pub async fn local_user_token(
    signer: &dyn Signer,
    issuer: &str,
    user: &crate::ports::User,
    now: i64,
    ttl_seconds: i64,
) -> crate::error::StoreResult<String> {
    let claims = json!({
        "iss": issuer,
        "aud": LOCAL_AUDIENCE,
        "sub": user.subject,
        "email": user.email,
        "name": user.name,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": crate::random::hex_id(),
    });
    jwt::sign(signer, &claims).await
}
