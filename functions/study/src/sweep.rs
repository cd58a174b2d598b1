//! The background duties of the study service: expiring jobs past their study's retention (the
//! files go, the history row stays, the audit trail records it) and delivering webhooks.

use crate::audit::{AuditAction, AuditEntry, append};
use crate::jobs::StudyJobStatus;
use crate::service::{StudyService, describe};
use crate::webhooks::{Attempt, DeliveryStatus, WebhookSender, allowed_target, signed_headers};
use export_core::StoreResult;

impl StudyService {
    /// Expires the completed and failed jobs whose files are past retention at `now` (ms).
    pub async fn expire_due(&self, now: i64) -> StoreResult<usize> {
        let mut expired = 0;
        for mut job in self.ports.jobs.expiring_jobs(now).await? {
            let before = job.status;
            if !matches!(before, StudyJobStatus::Completed | StudyJobStatus::Error) {
                continue;
            }
            job.status = StudyJobStatus::Expired;
            if !self.ports.jobs.update_job(&job, before).await? {
                continue;
            }
            self.delete_files(&job).await;
            let mut entry = AuditEntry::new("system", "retention", AuditAction::Expire);
            describe(&mut entry, &job);
            append(self.ports.audit.as_ref(), entry).await?;
            expired += 1;
        }
        Ok(expired)
    }

    /// Sends the deliveries due at `now` (ms), one attempt each, and records the outcomes.
    pub async fn deliver_webhooks(
        &self,
        sender: &dyn WebhookSender,
        now: i64,
    ) -> StoreResult<usize> {
        let mut sent = 0;
        for mut delivery in self.ports.outbox.due(now).await? {
            if delivery.status != DeliveryStatus::Pending {
                continue;
            }
            let secret = self
                .ports
                .jobs
                .settings(&delivery.study_id)
                .await?
                .and_then(|s| s.webhook_secret);
            let body = serde_json::to_vec(&delivery.payload)?;
            let attempt = match (secret, allowed_target(&delivery.url)) {
                (None, _) => Attempt {
                    at: now,
                    status: None,
                    error: Some("the study has no webhook secret any more".into()),
                },
                (_, false) => Attempt {
                    at: now,
                    status: None,
                    error: Some("the target is not https (or http to loopback)".into()),
                },
                (Some(secret), true) => {
                    match signed_headers(&secret, &delivery.id, now / 1000, &body) {
                        Err(e) => Attempt {
                            at: now,
                            status: None,
                            error: Some(e),
                        },
                        Ok(headers) => match sender.post(&delivery.url, &headers, &body).await {
                            Ok(status) if (200..300).contains(&status) => Attempt {
                                at: now,
                                status: Some(status),
                                error: None,
                            },
                            Ok(status) => Attempt {
                                at: now,
                                status: Some(status),
                                error: Some(format!("the target answered {status}")),
                            },
                            Err(e) => Attempt {
                                at: now,
                                status: None,
                                error: Some(e),
                            },
                        },
                    }
                }
            };
            delivery.record(attempt);
            self.ports.outbox.update_delivery(&delivery).await?;
            sent += 1;
        }
        Ok(sent)
    }
}
