//! The export job and its state machine:
//! `accepted → in-progress → completed | failed | cancelled`, then `expired` after retention.

use crate::fhir::time::Instant;
use crate::params::{ExportLevel, ExportParams};
use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Accepted,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Expired,
}

impl JobStatus {
    /// Accepted or in progress: holds the export lock and may still write files.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Accepted | JobStatus::InProgress)
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Accepted, InProgress)
                | (Accepted | InProgress, Completed | Failed | Cancelled)
                | (Completed | Failed, Expired | Cancelled)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::InProgress => "in-progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }
}

/// One export, as the job store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    #[serde(flatten)]
    pub level: ExportLevel,
    /// The kick-off URL as the client sent it (the manifest's `request`).
    pub request_url: String,
    pub params: ExportParams,
    /// Fixed at kick-off: only resources last updated at or before it are exported.
    pub transaction_time: Instant,
    pub created_at: Instant,
    pub completed_at: Option<Instant>,
    /// When a finished job's files are deleted.
    pub expires_at: Option<Instant>,
    /// Why the job failed (an OperationOutcome's diagnostics).
    pub error: Option<String>,
    /// Number of work items the job was cut into (0 until planned).
    pub items_total: u32,
    /// Who asked for what: the same client repeating an identical kick-off is sent to this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The principal that started the export (`client:<id>`, `local-admin`): only it may see,
    /// cancel or download it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Job {
    /// A freshly accepted job.
    pub fn new(
        id: String,
        level: ExportLevel,
        request_url: String,
        params: ExportParams,
        now: Instant,
    ) -> Self {
        Job {
            id,
            status: JobStatus::Accepted,
            level,
            request_url,
            params,
            transaction_time: now,
            created_at: now,
            completed_at: None,
            expires_at: None,
            error: None,
            items_total: 0,
            fingerprint: None,
            owner: None,
        }
    }

    /// The upper bound of the export window: `_until` if given, else the transaction time.
    pub fn window_end(&self) -> Instant {
        match self.params.until {
            Some(until) if until < self.transaction_time => until,
            _ => self.transaction_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;

    #[test]
    fn transitions() {
        assert!(Accepted.can_become(InProgress));
        assert!(InProgress.can_become(Completed));
        assert!(InProgress.can_become(Cancelled));
        assert!(Completed.can_become(Expired));
        assert!(Completed.can_become(Cancelled));
        assert!(!Completed.can_become(InProgress));
        assert!(!Cancelled.can_become(InProgress));
        assert!(!Expired.can_become(Completed));
        assert!(!InProgress.can_become(Accepted));
    }
}
