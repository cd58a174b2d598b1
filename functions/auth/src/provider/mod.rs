//! The local OpenID Connect provider: on one machine, `bulk-export serve` signs people in itself
//! (the users of `bulk-export users add --password`), so the page's sign-in code is the same as
//! against Cognito on AWS. One public client, the page ([`CLIENT_ID`]), whose only redirect URI
//! is `{issuer}/callback`; the authorization code flow with PKCE S256 only.
//!
//! - discovery: [`LocalProvider::discovery`]; keys: the service's own JWK Set (`/auth/jwks`).
//! - authorization endpoint: [`LocalProvider::authorize`] checks the request ([`request`]) and
//!   shows the sign-in form ([`page`]); [`LocalProvider::sign_in`] checks the form's CSRF token,
//!   the password ([`crate::password`]) and the failure limit ([`lockout`]), and sends the browser
//!   back with a code ([`code`]).
//! - token endpoint: [`LocalProvider::token`] redeems the code with the PKCE verifier ([`pkce`])
//!   for an ID token and an access token, both user tokens of the local issuer.
//!
//! Nothing here is HTTP plumbing: the gateway turns [`Answer`]s into responses and sets cookies.

pub mod code;
pub mod lockout;
pub mod page;
pub mod pkce;
pub mod request;

use crate::error::{OAuthError, StoreResult};
use crate::oidc::LOCAL_AUDIENCE;
use crate::password;
use crate::ports::{AuthPorts, User};
use code::{Grant, Redemption};
use http::StatusCode;
use lockout::Lockout;
use page::LoginForm;
use request::{AuthorizationRequest, Refusal};
use serde_json::{Value, json};

/// The page's client id: a public client (no secret), which is also the audience of the local
/// issuer's user tokens.
pub const CLIENT_ID: &str = LOCAL_AUDIENCE;
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const AUTHORIZE_PATH: &str = "/oidc/authorize";
pub const TOKEN_PATH: &str = "/oidc/token";
/// The page's callback, under the issuer: the client's only redirect URI.
pub const CALLBACK_PATH: &str = "/callback";
/// Where the service's public keys are, under the issuer.
pub const JWKS_PATH: &str = "/auth/jwks";
/// How long ID and access tokens live.
pub const TOKEN_SECONDS: i64 = 3600;
/// The cookie holding the sign-in form's CSRF token (the form holds it too).
pub const LOGIN_COOKIE: &str = "bulk_export_login";
/// The one answer to a failed sign-in, whatever failed.
pub const WRONG_CREDENTIALS: &str = "The e-mail or password is wrong.";
/// Longest e-mail address looked up (RFC 5321's path limit).
const MAX_EMAIL: usize = 320;

/// What the authorization endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An HTML page: the sign-in form, or why sign-in cannot go on.
    Page {
        status: StatusCode,
        html: String,
        /// A new CSRF token to set as the login cookie (with the form that carries it).
        login_cookie: Option<String>,
        /// Seconds to wait, with 429.
        retry_after: Option<i64>,
    },
    /// 303 See Other to the client's redirect URI, with a code or an error.
    Redirect { location: String },
}

/// The local OpenID provider.
pub struct LocalProvider {
    issuer: String,
    ports: AuthPorts,
    lockout: Lockout,
}

impl LocalProvider {
    /// The provider of `issuer` (the server's public origin).
    pub fn new(issuer: &str, ports: AuthPorts) -> Self {
        LocalProvider {
            issuer: issuer.trim_end_matches('/').to_string(),
            ports,
            lockout: Lockout::default(),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The page's only redirect URI.
    pub fn redirect_uri(&self) -> String {
        format!("{}{CALLBACK_PATH}", self.issuer)
    }

    /// `/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §3).
    pub fn discovery(&self) -> Value {
        let issuer = &self.issuer;
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}{AUTHORIZE_PATH}"),
            "token_endpoint": format!("{issuer}{TOKEN_PATH}"),
            "jwks_uri": format!("{issuer}{JWKS_PATH}"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "scopes_supported": request::SUPPORTED_SCOPES,
            "token_endpoint_auth_methods_supported": ["none"],
            "claims_supported": ["iss", "aud", "sub", "email", "name", "nonce", "iat", "exp", "auth_time"],
            "request_parameter_supported": false,
            "request_uri_parameter_supported": false,
        })
    }

    /// `GET /oidc/authorize?…` (`query` as sent): the sign-in form, or the request's refusal.
    pub async fn authorize(&self, query: &str, now: i64) -> Answer {
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        match request::parse(&params, CLIENT_ID, &self.redirect_uri()) {
            Ok(checked) => {
                let hint = request::login_hint(&params).unwrap_or_default();
                self.form(StatusCode::OK, &checked, &hint, None, now).await
            }
            Err(Refusal::Page(message)) => {
                tracing::warn!(reason = %message, "authorization request refused");
                page(StatusCode::BAD_REQUEST, "Sign-in request refused", &message)
            }
            Err(Refusal::Redirect(error)) => {
                tracing::info!(error = error.error, reason = %error.description, "authorization request refused");
                Answer::Redirect {
                    location: error.location(),
                }
            }
        }
    }

    /// `POST /oidc/authorize`: the sign-in form sent back, with the login cookie's value.
    pub async fn sign_in(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        login_cookie: Option<&str>,
        now: i64,
    ) -> Answer {
        let Ok(params) = read_form(content_type, body) else {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in form not understood",
                "The sign-in form was not sent as a form. Go back to the application and sign in again.",
            );
        };
        let one = |name: &str| single(&params, name);
        let signer = self.ports.signer.as_ref();
        let Some(login) = one("login_request")
            .and_then(|t| request::read_login_request(signer, &self.issuer, t, now).ok())
        else {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in expired",
                "This sign-in form has expired or is not valid. Go back to the application and sign in again.",
            );
        };
        let email = one("email").unwrap_or_default().trim().to_ascii_lowercase();
        let form_token = one("csrf_token").unwrap_or_default();
        if !login.csrf_matches(form_token) || !login_cookie.is_some_and(|c| login.csrf_matches(c)) {
            tracing::warn!(
                "sign-in form refused: its CSRF token is missing or does not match the cookie"
            );
            let message = "The form could not be verified (it may have expired, or cookies are blocked). Please sign in again.";
            return self
                .form(
                    StatusCode::FORBIDDEN,
                    &login.request,
                    &email,
                    Some(message),
                    now,
                )
                .await;
        }
        let password = one("password").unwrap_or_default();
        if email.is_empty() || password.is_empty() {
            let message = "Enter your e-mail address and password.";
            return self
                .form(
                    StatusCode::BAD_REQUEST,
                    &login.request,
                    &email,
                    Some(message),
                    now,
                )
                .await;
        }
        if email.len() > MAX_EMAIL {
            return self
                .refuse(&login.request, &email, "e-mail address too long", now)
                .await;
        }
        if let Err(wait) = self.lockout.attempt(&email, now) {
            tracing::warn!(email = %email, "sign-in refused: too many failures for this address");
            let minutes = (wait + 59) / 60;
            let message = format!(
                "Too many failed sign-ins for this e-mail address. Wait {minutes} minute{} and try again.",
                if minutes == 1 { "" } else { "s" }
            );
            let mut answer = self
                .form(
                    StatusCode::TOO_MANY_REQUESTS,
                    &login.request,
                    &email,
                    Some(&message),
                    now,
                )
                .await;
            if let Answer::Page { retry_after, .. } = &mut answer {
                *retry_after = Some(wait);
            }
            return answer;
        }
        let user = match self.ports.users.user(&email).await {
            Ok(user) => user,
            Err(e) => {
                tracing::error!(error = %e, "sign-in: the user store failed");
                return unavailable();
            }
        };
        let stored = user.as_ref().and_then(|u| u.password_hash.clone());
        let has_password = stored.is_some();
        let typed = password.to_string();
        // Argon2 takes tens of milliseconds of CPU: off the async workers.
        let matches =
            tokio::task::spawn_blocking(move || password::verify(&typed, stored.as_deref()))
                .await
                .unwrap_or(false);
        let user = match user {
            Some(user) if matches => user,
            _ => {
                let reason = match (&user, has_password) {
                    (None, _) => "unknown user",
                    (Some(_), false) => "no password set",
                    (Some(_), true) => "wrong password",
                };
                return self.refuse(&login.request, &email, reason, now).await;
            }
        };
        self.lockout.succeeded(&email);
        let grant = Grant {
            request: login.request,
            email: user.email.clone(),
            subject: user.subject.clone(),
            auth_time: now,
        };
        let code = match code::mint(signer, &self.issuer, &grant, now).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = %e, "sign-in: the code could not be signed");
                return unavailable();
            }
        };
        tracing::info!(email = %user.email, "signed in");
        let mut pairs = vec![("code", code.as_str())];
        if let Some(state) = &grant.request.state {
            pairs.push(("state", state));
        }
        Answer::Redirect {
            location: request::with_query(&grant.request.redirect_uri, &pairs),
        }
    }

    /// `POST /oidc/token`: a code and its PKCE verifier for an ID token and an access token.
    pub async fn token(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<Value, OAuthError> {
        let params = read_form(content_type, body).map_err(OAuthError::invalid_request)?;
        let mut names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(OAuthError::invalid_request(format!(
                "parameter {} appears more than once",
                w[0]
            )));
        }
        let field = |name: &str| single(&params, name).filter(|v| !v.is_empty());
        let required = |name: &str| {
            field(name).ok_or_else(|| OAuthError::invalid_request(format!("{name} is missing")))
        };
        match required("grant_type")? {
            "authorization_code" => {}
            other => {
                return Err(OAuthError::unsupported_grant_type(format!(
                    "grant_type {other} is not supported; use authorization_code"
                )));
            }
        }
        let client_id = required("client_id")?;
        if client_id != CLIENT_ID {
            return Err(OAuthError::invalid_client(format!(
                "unknown client {client_id}"
            )));
        }
        let code = required("code")?;
        let presented = Redemption {
            client_id,
            redirect_uri: required("redirect_uri")?,
            code_verifier: required("code_verifier")?,
        };
        let signer = self.ports.signer.as_ref();
        let grant = code::redeem(
            signer,
            self.ports.replay.as_ref(),
            &self.issuer,
            code,
            &presented,
            now,
        )
        .await
        .inspect_err(|e| tracing::warn!(reason = %e.description, "authorization code refused"))?;
        let user = self
            .ports
            .users
            .user(&grant.email)
            .await
            .map_err(|e| server_error(&e.0))?
            .filter(|u| u.password_hash.is_some())
            .ok_or_else(|| OAuthError::invalid_grant("this person can no longer sign in"))?;
        let id_token = self
            .id_token(&user, &grant, now)
            .await
            .map_err(|e| server_error(&e.0))?;
        let access_token =
            crate::oidc::local_user_token(signer, &self.issuer, &user, now, TOKEN_SECONDS)
                .await
                .map_err(|e| server_error(&e.0))?;
        tracing::info!(email = %user.email, "tokens issued for a sign-in");
        Ok(json!({
            "access_token": access_token,
            "id_token": id_token,
            "token_type": "Bearer",
            "expires_in": TOKEN_SECONDS,
            "scope": grant.request.scope,
        }))
    }

    /// The ID token of a sign-in (OpenID Connect Core §2): a user token of the local issuer,
    /// with the nonce of the authorization request and the time of the sign-in.
    async fn id_token(&self, user: &User, grant: &Grant, now: i64) -> StoreResult<String> {
        let mut claims = json!({
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": user.subject,
            "email": user.email,
            "name": user.name,
            "iat": now,
            "exp": now + TOKEN_SECONDS,
            "auth_time": grant.auth_time,
        });
        if let Some(nonce) = &grant.request.nonce {
            claims["nonce"] = json!(nonce);
        }
        crate::jwt::sign(self.ports.signer.as_ref(), &claims).await
    }

    /// The form again, after a failed sign-in: one message whatever failed.
    async fn refuse(
        &self,
        request: &AuthorizationRequest,
        email: &str,
        reason: &str,
        now: i64,
    ) -> Answer {
        tracing::warn!(email = %email, reason, "sign-in failed");
        self.form(
            StatusCode::UNAUTHORIZED,
            request,
            email,
            Some(WRONG_CREDENTIALS),
            now,
        )
        .await
    }

    /// The sign-in form for `request`, with a fresh CSRF token (in the form and the cookie).
    async fn form(
        &self,
        status: StatusCode,
        request: &AuthorizationRequest,
        email: &str,
        message: Option<&str>,
        now: i64,
    ) -> Answer {
        let csrf = crate::random::token::<32>();
        let signed = match request::sign_login_request(
            self.ports.signer.as_ref(),
            &self.issuer,
            request,
            &csrf,
            now,
        )
        .await
        {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!(error = %e, "sign-in: the form could not be signed");
                return unavailable();
            }
        };
        let email: String = email.chars().take(MAX_EMAIL).collect();
        let html = page::login_form(&LoginForm {
            action: AUTHORIZE_PATH,
            login_request: &signed,
            csrf_token: &csrf,
            email: &email,
            message,
        });
        Answer::Page {
            status,
            html,
            login_cookie: Some(csrf),
            retry_after: None,
        }
    }
}

fn page(status: StatusCode, title: &str, message: &str) -> Answer {
    Answer::Page {
        status,
        html: page::error_page(title, message),
        login_cookie: None,
        retry_after: None,
    }
}

fn unavailable() -> Answer {
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Sign-in unavailable",
        "Signing in is not possible right now. Please try again later.",
    )
}

/// A form body (`application/x-www-form-urlencoded`), decoded.
fn read_form(content_type: Option<&str>, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/x-www-form-urlencoded") {
        return Err("the request must be application/x-www-form-urlencoded".into());
    }
    Ok(form_urlencoded::parse(body).into_owned().collect())
}

/// The value of a parameter given exactly once.
fn single<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut values = params.iter().filter(|(n, _)| n == name);
    match (values.next(), values.next()) {
        (Some((_, value)), None) => Some(value),
        _ => None,
    }
}

/// A store or signer failure at the token endpoint: logged, and `server_error` to the client.
pub(crate) fn server_error(detail: &str) -> OAuthError {
    tracing::error!(error = %detail, "OpenID provider storage failure");
    OAuthError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "server_error",
        description: "the tokens could not be issued; retry later".into(),
        retry_after: None,
    }
}
