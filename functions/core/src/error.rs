//! Errors: `ApiError` is what the FHIR API answers with; `StoreError` is what adapters fail with.

use crate::fhir::outcome::{IssueCode, error_outcome};
use http::StatusCode;
use serde_json::Value;

/// A failed request: an HTTP status, an OperationOutcome, and optional extra headers.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: IssueCode,
    pub diagnostics: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueCode, diagnostics: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            diagnostics: diagnostics.into(),
            retry_after: None,
        }
    }

    /// 400 with issue code `invalid`.
    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, IssueCode::Invalid, diagnostics)
    }

    /// 400 with issue code `not-supported`.
    pub fn not_supported(diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            IssueCode::NotSupported,
            diagnostics,
        )
    }

    /// 404 with issue code `not-found`.
    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueCode::NotFound, diagnostics)
    }

    /// 500 with issue code `exception`.
    pub fn internal(diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            diagnostics,
        )
    }

    /// The OperationOutcome body.
    pub fn outcome(&self) -> Value {
        error_outcome(self.code, &self.diagnostics)
    }
}

/// A failure inside a port adapter (database, file system, cloud service).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn new(message: impl std::fmt::Display) -> Self {
        StoreError(message.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::new(e)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::new(e)
    }
}

impl From<StoreError> for ApiError {
    /// The adapter's text (SDK errors, paths, ARNs) goes to the log, never to the client.
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e.0, "storage failure");
        ApiError::internal(INTERNAL_ERROR)
    }
}

/// What a client is told of a failure inside the service; the gateway adds the request id,
/// under which the details are in the log.
pub const INTERNAL_ERROR: &str = "an internal error occurred; the server's log has the details";

/// Result of a port call.
pub type StoreResult<T> = Result<T, StoreError>;
