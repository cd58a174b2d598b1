//! One step for every request: the credentials it carries become a [`Principal`], or it is
//! refused. Routers decide what the principal may do.

use crate::api_keys;
use crate::error::AuthFailure;
use crate::jwt;
use crate::oidc::{IssuerKeys, LOCAL_AUDIENCE, TrustedIssuer, UserTokens};
use crate::ports::AuthPorts;
use crate::principal::Principal;
use crate::provider::LocalProvider;
use crate::rate_limit::RateLimiter;
use crate::scopes::Scopes;
use crate::smart::{ACCESS_AUDIENCE, TokenService};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use serde_json::Value;

/// How authentication is set up.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Whether requests need credentials. Off, a request without any acts as the local
    /// administrator (a credential that is sent is still checked).
    pub enforce: bool,
    /// The `iss` of the tokens this service signs (access tokens and local user tokens).
    pub issuer: String,
    /// Other OpenID issuers whose user tokens are accepted.
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// Whether this service is itself an OpenID provider for its users with passwords (the
    /// local server; on AWS, Cognito signs people in).
    pub provider: bool,
}

/// Turns credentials into principals.
pub struct Authenticator {
    pub config: AuthConfig,
    pub ports: AuthPorts,
    pub tokens: TokenService,
    /// The local OpenID provider, where [`AuthConfig::provider`] turns it on.
    pub provider: Option<LocalProvider>,
    users: UserTokens,
    /// Limits kick-offs and status polls per principal.
    requests: RateLimiter,
}

/// A credential as sent.
enum Credential<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
}

impl Authenticator {
    pub fn new(config: AuthConfig, ports: AuthPorts, is_resource_type: fn(&str) -> bool) -> Self {
        let mut issuers = config.trusted_issuers.clone();
        issuers.push(TrustedIssuer {
            issuer: config.issuer.clone(),
            audience: LOCAL_AUDIENCE.into(),
            keys: IssuerKeys::Own,
        });
        Authenticator {
            users: UserTokens::new(issuers, ports.fetcher.clone(), ports.signer.clone()),
            tokens: TokenService::new(ports.clone(), is_resource_type),
            provider: config
                .provider
                .then(|| LocalProvider::new(&config.issuer, ports.clone())),
            // Polls every second are well within; a client hammering the API is not.
            requests: RateLimiter::new(120, 20.0),
            config,
            ports,
        }
    }

    /// Who sent `headers`. Without credentials: the local administrator when enforcement is off,
    /// `Missing` when it is on.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<Principal, AuthFailure> {
        match credential(headers)? {
            None if self.config.enforce => Err(AuthFailure::Missing),
            None => Ok(Principal::LocalAdmin),
            Some(Credential::ApiKey(key)) => self.api_key(key, now).await,
            Some(Credential::Bearer(token)) if api_keys::is_api_key(token) => {
                self.api_key(token, now).await
            }
            Some(Credential::Bearer(token)) => self.bearer(token, now).await,
        }
    }

    /// Limits each principal to `per_second` rate-limited requests (bursts of six seconds' worth).
    pub fn with_request_rate(mut self, per_second: u32) -> Self {
        self.requests = RateLimiter::new(per_second.saturating_mul(6), f64::from(per_second));
        self
    }

    /// Counts one rate-limited request (kick-off, status poll) of `principal`. The local
    /// administrator (enforcement off, on loopback) is not limited.
    pub fn rate_check(&self, principal: &Principal) -> Result<(), AuthFailure> {
        if *principal == Principal::LocalAdmin {
            return Ok(());
        }
        self.requests
            .check(&principal.id())
            .map_err(|retry_after| AuthFailure::RateLimited { retry_after })
    }

    async fn api_key(&self, key: &str, now: i64) -> Result<Principal, AuthFailure> {
        let record = self
            .ports
            .api_keys
            .api_key_by_hash(&api_keys::hash(key))
            .await?
            .filter(|r| !r.revoked)
            .ok_or_else(|| AuthFailure::Invalid("unknown or revoked API key".into()))?;
        // Last use is informational: a failure to record it must not refuse the request.
        if let Err(e) = self.ports.api_keys.touch_api_key(&record.id, now).await {
            tracing::warn!(error = %e, "could not record an API key's last use");
        }
        Ok(Principal::ApiKey {
            key_id: record.id,
            name: record.name,
            membership: record.membership,
        })
    }

    async fn bearer(&self, token: &str, now: i64) -> Result<Principal, AuthFailure> {
        let claims = unverified_claims(token)
            .ok_or_else(|| AuthFailure::Invalid("not a JWT or an API key".into()))?;
        let issuer = claims["iss"].as_str().unwrap_or_default();
        if issuer == self.config.issuer && jwt::audience_includes(&claims, ACCESS_AUDIENCE) {
            return self.access_token(token, now);
        }
        if !self.users.trusts(issuer) {
            return Err(AuthFailure::Invalid(
                "the token's issuer is not trusted".into(),
            ));
        }
        self.users.verify(token, issuer, &self.ports, now).await
    }

    /// An access token issued by this service's token endpoint.
    fn access_token(&self, token: &str, now: i64) -> Result<Principal, AuthFailure> {
        let claims = jwt::verify(token, &jwt::own_jwks(self.ports.signer.as_ref()))
            .map_err(AuthFailure::Invalid)?;
        if claims["iss"].as_str() != Some(self.config.issuer.as_str())
            || !jwt::audience_includes(&claims, ACCESS_AUDIENCE)
        {
            return Err(AuthFailure::Invalid(
                "not an access token of this service".into(),
            ));
        }
        match jwt::seconds(&claims, "exp") {
            Some(exp) if exp > now => {}
            _ => return Err(AuthFailure::Invalid("the access token has expired".into())),
        }
        let client_id = claims["client_id"]
            .as_str()
            .ok_or_else(|| AuthFailure::Invalid("the access token names no client".into()))?;
        Ok(Principal::BulkClient {
            client_id: client_id.to_string(),
            scopes: Scopes::from_granted(claims["scope"].as_str().unwrap_or_default()),
        })
    }
}

/// The credential of a request: `Authorization: Bearer …` or `X-API-Key: …`.
fn credential(headers: &HeaderMap) -> Result<Option<Credential<'_>>, AuthFailure> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| AuthFailure::Invalid("the Authorization header is not text".into()))?;
        let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthFailure::Invalid(
                "use Authorization: Bearer <token>".into(),
            ));
        }
        return Ok(Some(Credential::Bearer(token)));
    }
    match headers.get("x-api-key") {
        Some(value) => value
            .to_str()
            .ok()
            .map(|k| Some(Credential::ApiKey(k.trim())))
            .ok_or_else(|| AuthFailure::Invalid("the X-API-Key header is not text".into())),
        None => Ok(None),
    }
}

/// A JWT's claims before its signature is checked (they say which issuer's keys to check with).
fn unverified_claims(token: &str) -> Option<Value> {
    if token.len() > jwt::MAX_TOKEN_BYTES {
        return None;
    }
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}
