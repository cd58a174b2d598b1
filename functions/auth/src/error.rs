//! The ways authentication fails, each with the wire shape its caller expects.

use http::StatusCode;

/// A failure inside a store or signer adapter (database, cloud service). Its text is for logs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn new(message: impl std::fmt::Display) -> Self {
        StoreError(message.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An error of the token endpoint, as RFC 6749 §5.2 defines it: a code, a description, and
/// 400 (or 401 for a client that could not be authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub status: StatusCode,
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `invalid_scope`,
    /// `unsupported_grant_type`, or `slow_down` for a rate limit.
    pub error: &'static str,
    pub description: String,
    /// Seconds to wait, for `slow_down` (429).
    pub retry_after: Option<u64>,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
            retry_after: None,
        }
    }
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
    /// The client could not be authenticated: unknown, or its assertion did not verify.
    pub fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }
    pub fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }
    pub fn unsupported_grant_type(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            description,
        )
    }
    pub fn slow_down(retry_after: u64) -> Self {
        OAuthError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                "too many token requests; retry later",
            )
        }
    }
    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.error, "error_description": self.description})
    }
}

/// Why a request's credentials were refused (before any route looked at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials where they are required.
    Missing,
    /// A token or key that is malformed, expired, wrongly signed, revoked or unknown.
    Invalid(String),
    /// Too many requests from this caller.
    RateLimited { retry_after: u64 },
    /// The store or signer failed; the text is for the log only.
    Internal(String),
}

impl AuthFailure {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthFailure::Missing | AuthFailure::Invalid(_) => StatusCode::UNAUTHORIZED,
            AuthFailure::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AuthFailure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3) for a 401.
    pub fn challenge(&self) -> Option<String> {
        match self {
            AuthFailure::Missing => Some("Bearer realm=\"bulk-export\"".into()),
            AuthFailure::Invalid(_) => Some(
                "Bearer realm=\"bulk-export\", error=\"invalid_token\", error_description=\"the access token is missing, malformed, expired, revoked or not signed by a trusted key\"".into(),
            ),
            _ => None,
        }
    }

    /// What the client is told (never a store's or signer's own text).
    pub fn message(&self) -> String {
        match self {
            AuthFailure::Missing => {
                "this endpoint needs a bearer token (Authorization: Bearer ...)".into()
            }
            AuthFailure::Invalid(why) => format!("the bearer token was refused: {why}"),
            AuthFailure::RateLimited { retry_after } => {
                format!("too many requests; retry in {retry_after} s")
            }
            AuthFailure::Internal(_) => "authentication is unavailable; retry later".into(),
        }
    }
}

impl From<StoreError> for AuthFailure {
    fn from(e: StoreError) -> Self {
        AuthFailure::Internal(e.0)
    }
}
