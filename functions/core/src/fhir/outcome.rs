//! `OperationOutcome`: the body of every FHIR API error and the lines of a manifest's error files.

use serde_json::{Value, json};

/// The FHIR `IssueType` codes this service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    NotFound,
    NotSupported,
    Throttled,
    Processing,
    Exception,
    Deleted,
    Informational,
    Login,
    Forbidden,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::NotFound => "not-found",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Throttled => "throttled",
            IssueCode::Processing => "processing",
            IssueCode::Exception => "exception",
            IssueCode::Deleted => "deleted",
            IssueCode::Informational => "informational",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
        }
    }
}

/// An `OperationOutcome` with a single issue.
pub fn operation_outcome(severity: &str, code: IssueCode, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": severity,
            "code": code.as_str(),
            "diagnostics": diagnostics,
        }]
    })
}

/// An error-severity `OperationOutcome`.
pub fn error_outcome(code: IssueCode, diagnostics: &str) -> Value {
    operation_outcome("error", code, diagnostics)
}
