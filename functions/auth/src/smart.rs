//! The SMART Backend Services token endpoint (SMART App Launch v2, `client-confidential-asymmetric`):
//! a registered client sends a JWT signed with its private key (`private_key_jwt`, RFC 7523) and
//! gets a short-lived access token with the SMART scopes it asked for and may have.

use crate::error::OAuthError;
use crate::jwks::JwksCache;
use crate::jwt;
use crate::ports::{AuthPorts, ClientKeys};
use crate::rate_limit::RateLimiter;
use crate::scopes::Scopes;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The only client assertion type of Backend Services.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// An assertion may be valid for at most this long (SMART: five minutes).
pub const MAX_ASSERTION_SECONDS: i64 = 300;
/// Access tokens live this long.
pub const ACCESS_TOKEN_SECONDS: i64 = 300;
/// Clock difference tolerated between client and server.
const LEEWAY: i64 = 30;
/// The audience of this service's access tokens.
pub const ACCESS_AUDIENCE: &str = "bulk-export-fhir";

/// Issues access tokens to registered clients.
pub struct TokenService {
    ports: AuthPorts,
    jwks: JwksCache,
    is_resource_type: fn(&str) -> bool,
    limiter: RateLimiter,
}

impl TokenService {
    /// `is_resource_type` tells R4 resource types (scopes naming others are refused).
    pub fn new(ports: AuthPorts, is_resource_type: fn(&str) -> bool) -> Self {
        TokenService {
            jwks: JwksCache::new(ports.fetcher.clone()),
            ports,
            is_resource_type,
            // A client needs one token per five minutes; 10 at once and one every 2 s is plenty.
            limiter: RateLimiter::new(10, 0.5),
        }
    }

    /// Answers a token request (`body` is the form). `token_url` is this endpoint's URL, which
    /// the assertion's `aud` must name; `issuer` goes into the access token. Returns the JSON
    /// response body.
    pub async fn token(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        token_url: &str,
        issuer: &str,
        now: i64,
    ) -> Result<Value, OAuthError> {
        let form = read_form(content_type, body)?;
        let field = |name: &str| form.get(name).map(String::as_str);
        match field("grant_type") {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(OAuthError::unsupported_grant_type(format!(
                    "grant_type {other} is not supported; use client_credentials"
                )));
            }
            None => return Err(OAuthError::invalid_request("grant_type is missing")),
        }
        if field("client_assertion_type") != Some(JWT_BEARER) {
            return Err(OAuthError::invalid_request(format!(
                "client_assertion_type must be {JWT_BEARER}"
            )));
        }
        let assertion = field("client_assertion")
            .ok_or_else(|| OAuthError::invalid_request("client_assertion is missing"))?;
        let requested = field("scope")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| OAuthError::invalid_request("scope is missing"))?;

        let header = jwt::read_header(assertion).map_err(OAuthError::invalid_client)?;
        let client_id = unverified_issuer(assertion).ok_or_else(|| {
            OAuthError::invalid_client("the assertion has no iss (the client id)")
        })?;
        let client = self
            .ports
            .clients
            .client(&client_id)
            .await
            .map_err(|e| internal(&e.0))?
            .ok_or_else(|| OAuthError::invalid_client(format!("unknown client {client_id}")))?;
        let keys = match (&client.keys, &header.jku) {
            (ClientKeys::Url(url), Some(jku)) if jku != url => {
                return Err(OAuthError::invalid_client(
                    "the jku header is not the JWKS URL registered for this client",
                ));
            }
            (ClientKeys::Inline(_), Some(_)) => {
                return Err(OAuthError::invalid_client(
                    "a jku header is not accepted: this client registered its keys, not a JWKS URL",
                ));
            }
            (ClientKeys::Inline(set), None) => set.clone(),
            (ClientKeys::Url(url), _) => self
                .jwks
                .get(url, header.kid.as_deref())
                .await
                .map_err(|e| OAuthError::invalid_client(format!("the client's JWKS: {e}")))?,
        };
        let claims = jwt::verify(assertion, &keys).map_err(OAuthError::invalid_client)?;
        check_assertion(&claims, &client_id, token_url, now)?;
        // Counted only once the client is proven: anyone can send assertions naming a client,
        // and they must not use up its allowance.
        if let Err(wait) = self.limiter.check(&client_id) {
            return Err(OAuthError::slow_down(wait));
        }
        let jti = claims["jti"].as_str().unwrap_or_default();
        let exp = jwt::seconds(&claims, "exp").unwrap_or(now);
        let first = self
            .ports
            .replay
            .first_use(&format!("{client_id}#{jti}"), exp + LEEWAY, now)
            .await
            .map_err(|e| internal(&e.0))?;
        if !first {
            return Err(OAuthError::invalid_grant(
                "this assertion (its jti) was already used; sign a new one",
            ));
        }

        let (wanted, refused) = Scopes::parse_request(requested, self.is_resource_type)
            .map_err(OAuthError::invalid_scope)?;
        let allowed = Scopes::from_granted(&client.allowed_scopes);
        let granted = wanted.intersect(&allowed);
        if granted.is_empty() {
            let mut why = refused;
            if !wanted.is_empty() {
                why.push(format!(
                    "this client may be granted only: {}",
                    client.allowed_scopes
                ));
            }
            return Err(OAuthError::invalid_scope(format!(
                "no requested scope can be granted ({})",
                why.join("; ")
            )));
        }
        let scope = granted.to_scope_string();
        let access = json!({
            "iss": issuer,
            "sub": client_id,
            "aud": ACCESS_AUDIENCE,
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + ACCESS_TOKEN_SECONDS,
            "jti": crate::random::hex_id(),
        });
        let access_token = jwt::sign(self.ports.signer.as_ref(), &access)
            .await
            .map_err(|e| internal(&e.0))?;
        tracing::info!(client = %client_id, scope = %scope, "access token issued");
        Ok(json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": ACCESS_TOKEN_SECONDS,
            "scope": scope,
        }))
    }
}

/// The form of a token request: `application/x-www-form-urlencoded`, each parameter once.
fn read_form(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<BTreeMap<String, String>, OAuthError> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request(
            "the token request must be application/x-www-form-urlencoded",
        ));
    }
    let mut form = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if form.insert(name.to_string(), value.into_owned()).is_some() {
            return Err(OAuthError::invalid_request(format!(
                "parameter {name} appears more than once"
            )));
        }
    }
    Ok(form)
}

/// The `iss` of a JWT before its signature is checked (it names the key to check it with).
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims["iss"].as_str().map(String::from)
}

/// The claims SMART requires of a client assertion.
fn check_assertion(
    claims: &Value,
    client_id: &str,
    token_url: &str,
    now: i64,
) -> Result<(), OAuthError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(client_id) || text("sub") != Some(client_id) {
        return Err(OAuthError::invalid_client(
            "iss and sub must both be the client id",
        ));
    }
    if !jwt::audience_includes(claims, token_url) {
        return Err(OAuthError::invalid_client(format!(
            "aud must be this token endpoint, {token_url}"
        )));
    }
    let exp = jwt::seconds(claims, "exp")
        .ok_or_else(|| OAuthError::invalid_client("the assertion has no exp"))?;
    if exp + LEEWAY < now {
        return Err(OAuthError::invalid_client("the assertion has expired"));
    }
    if exp > now + MAX_ASSERTION_SECONDS + LEEWAY {
        return Err(OAuthError::invalid_client(
            "exp must be at most five minutes in the future",
        ));
    }
    if jwt::seconds(claims, "nbf").is_some_and(|nbf| nbf > now + LEEWAY) {
        return Err(OAuthError::invalid_client(
            "the assertion is not valid yet (nbf)",
        ));
    }
    match text("jti") {
        Some(jti) if !jti.is_empty() && jti.len() <= 256 => Ok(()),
        _ => Err(OAuthError::invalid_client(
            "the assertion needs a jti (a unique id) of at most 256 characters",
        )),
    }
}

fn internal(detail: &str) -> OAuthError {
    tracing::error!(error = %detail, "token endpoint storage failure");
    OAuthError {
        status: http::StatusCode::INTERNAL_SERVER_ERROR,
        error: "server_error",
        description: "the token could not be issued; retry later".into(),
        retry_after: None,
    }
}
