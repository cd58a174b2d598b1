//! The study API's errors: `{"error":{code,message,field,details,timestamp,request_id}}` with the
//! codes EXP001–EXP005, each with its HTTP status. One mapping, here.

use http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// The error codes of the study API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not found (404): no such job or study, or not visible to the caller.
    NotFound,
    /// Validation (400, or 422 for a well-formed request that cannot be done).
    Validation,
    /// Unauthenticated (401) or forbidden (403).
    Access,
    /// Conflict (409), or too many requests (429).
    Conflict,
    /// Server error (500); never with internals.
    Server,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "EXP001",
            ErrorCode::Validation => "EXP002",
            ErrorCode::Access => "EXP003",
            ErrorCode::Conflict => "EXP004",
            ErrorCode::Server => "EXP005",
        }
    }
}

/// A failed study API request.
#[derive(Debug, Clone)]
pub struct StudyError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault (validation), e.g. `filters.sites`.
    pub field: Option<String>,
    pub details: Option<Value>,
    /// `Retry-After` seconds (429).
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate` (401).
    pub challenge: Option<String>,
    /// `Allow` (405).
    pub allow: Option<String>,
}

impl StudyError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        StudyError {
            status,
            code,
            message: message.into(),
            field: None,
            details: None,
            retry_after: None,
            challenge: None,
            allow: None,
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, ErrorCode::Validation, message);
        e.field = Some(field.to_string());
        e
    }
    /// A well-formed request that cannot be carried out (422).
    pub fn unprocessable(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::validation(field, message);
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e
    }
    pub fn unauthenticated(message: impl Into<String>, challenge: Option<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Access, message);
        e.challenge = challenge;
        e
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Access, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }
    pub fn too_many(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Conflict,
            format!("too many requests; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }
    pub fn method_not_allowed(method: &http::Method, allowed: &str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Validation,
            format!("method {method} is not allowed here; use {allowed}"),
        );
        e.allow = Some(allowed.to_string());
        e
    }
    /// A failure inside the service: logged with its cause; the client learns only that it
    /// happened (and the request id).
    pub fn server() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Server,
            "an internal error occurred; the server's log has the details under this request id",
        )
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The JSON body.
    pub fn body(&self, request_id: &str, timestamp: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: self.message.clone(),
                field: self.field.clone(),
                details: self.details.clone(),
                timestamp: timestamp.to_string(),
                request_id: request_id.to_string(),
            },
        }
    }
}

impl From<export_core::StoreError> for StudyError {
    fn from(e: export_core::StoreError) -> Self {
        tracing::error!(error = %e.0, "storage failure");
        StudyError::server()
    }
}

impl From<export_auth::StoreError> for StudyError {
    fn from(e: export_auth::StoreError) -> Self {
        tracing::error!(error = %e.0, "storage failure");
        StudyError::server()
    }
}

/// The error body of every `/api/v1` error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// EXP001 not found, EXP002 validation, EXP003 unauthenticated or forbidden, EXP004
    /// conflict or rate limited, EXP005 server error.
    #[schema(example = "EXP002")]
    pub code: String,
    pub message: String,
    /// The request field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// When the error happened (RFC 3339).
    pub timestamp: String,
    /// Also in the `X-Request-Id` header; the server's log has the details under it.
    pub request_id: String,
}
