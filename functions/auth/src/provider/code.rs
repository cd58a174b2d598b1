//! Authorization codes. A code is self-contained: signed by the service, it names the person and
//! everything the token request must match (client, redirect URI, PKCE challenge, nonce), so no
//! store holds pending codes. It is good for [`CODE_SECONDS`] and for one token request: its id
//! goes into the replay cache, which the service's instances share, when it is redeemed.
//! Codes are signed, not encrypted: they carry the person's e-mail address, and travel only to
//! the registered redirect URI.

use super::pkce;
use super::request::AuthorizationRequest;
use crate::error::{OAuthError, StoreResult};
use crate::jwt;
use crate::ports::{ReplayCache, Signer};
use serde::{Deserialize, Serialize};

/// How long a code may wait to be redeemed.
pub const CODE_SECONDS: i64 = 60;
/// The `aud` of a code: only the token endpoint accepts it, and no bearer-token check does.
const CODE_AUDIENCE: &str = "urn:bulk-export:oidc-authorization-code";

/// What a code grants, and what redeeming it must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub request: AuthorizationRequest,
    /// The person, by the e-mail the user store knows them by.
    pub email: String,
    /// The person's stable subject, as the tokens will carry it.
    pub subject: String,
    /// When the person signed in (seconds since the epoch).
    pub auth_time: i64,
}

#[derive(Serialize, Deserialize)]
struct CodeClaims {
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
    jti: String,
    grant: Grant,
}

/// What the token request presents with the code.
pub struct Redemption<'a> {
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub code_verifier: &'a str,
}

/// A new code for `grant`.
pub async fn mint(
    signer: &dyn Signer,
    issuer: &str,
    grant: &Grant,
    now: i64,
) -> StoreResult<String> {
    let claims = CodeClaims {
        iss: issuer.to_string(),
        aud: CODE_AUDIENCE.to_string(),
        iat: now,
        exp: now + CODE_SECONDS,
        jti: crate::random::hex_id(),
        grant: grant.clone(),
    };
    jwt::sign(
        signer,
        &serde_json::to_value(claims).expect("claims are JSON"),
    )
    .await
}

/// The grant of `code`, if it is this issuer's, unexpired, matches the client, redirect URI and
/// PKCE verifier presented, and was not redeemed before. Every failure is `invalid_grant`
/// (RFC 6749 §5.2), and only a redemption that passes every check uses the code up: a request
/// without the verifier cannot spend someone else's code.
pub async fn redeem(
    signer: &dyn Signer,
    replay: &dyn ReplayCache,
    issuer: &str,
    code: &str,
    presented: &Redemption<'_>,
    now: i64,
) -> Result<Grant, OAuthError> {
    let refuse = |why: &str| OAuthError::invalid_grant(why);
    let claims = jwt::verify(code, &jwt::own_jwks(signer))
        .map_err(|_| refuse("the code is not one this server issued"))?;
    let claims: CodeClaims = serde_json::from_value(claims)
        .map_err(|_| refuse("the code is not an authorization code"))?;
    if claims.iss != issuer || claims.aud != CODE_AUDIENCE {
        return Err(refuse(
            "the code is not an authorization code of this server",
        ));
    }
    if now >= claims.exp {
        return Err(refuse("the code has expired; sign in again"));
    }
    let request = &claims.grant.request;
    if presented.client_id != request.client_id {
        return Err(refuse("the code was issued to another client"));
    }
    if presented.redirect_uri != request.redirect_uri {
        return Err(refuse(
            "redirect_uri is not the one of the authorization request",
        ));
    }
    if !pkce::verify(presented.code_verifier, &request.code_challenge) {
        return Err(refuse(
            "code_verifier does not match the code_challenge of the authorization request",
        ));
    }
    let first = replay
        .first_use(&format!("oidc-code#{}", claims.jti), claims.exp + 1, now)
        .await
        .map_err(|e| super::server_error(&e.0))?;
    if !first {
        return Err(refuse("the code was already used; sign in again"));
    }
    Ok(claims.grant)
}
