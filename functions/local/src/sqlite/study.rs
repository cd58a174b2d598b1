//! The study exports' records: jobs (with the columns their history pages filter on), study
//! settings, idempotency keys, the audit trail (one row per sequence number, so a second writer
//! of the same place fails) and the webhook outbox.

use super::{SqliteStore, db_err};
use async_trait::async_trait;
use export_core::{StoreError, StoreResult};
use export_study::audit::{AuditLog, AuditQuery, AuditRecord};
use export_study::jobs::{
    IdempotencyRecord, JobQuery, StudyJob, StudyJobStatus, StudyJobStore, StudySettings,
};
use export_study::webhooks::{Delivery, DeliveryStatus, WebhookOutbox};
use rusqlite::params;

fn doc<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(StoreError::from)
}

impl SqliteStore {
    async fn docs<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        sql: &'static str,
        values: Vec<rusqlite::types::Value>,
    ) -> StoreResult<Vec<T>> {
        let texts: Vec<String> = self
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(values), |r| r.get(0))
                    .map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)
            })
            .await?;
        texts.iter().map(|t| doc(t)).collect()
    }
}

#[async_trait]
impl StudyJobStore for SqliteStore {
    async fn create_job(&self, job: &StudyJob) -> StoreResult<()> {
        let (id, study, status, requested, expires, body) = (
            job.id.clone(),
            job.study_id.clone(),
            job.status.as_str(),
            job.requested_at,
            job.expires_at,
            serde_json::to_string(job)?,
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO study_jobs (id, study, status, requested, expires, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, study, status, requested, expires, body],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn job(&self, id: &str) -> StoreResult<Option<StudyJob>> {
        Ok(self
            .docs(
                "SELECT doc FROM study_jobs WHERE id = ?1",
                vec![id.to_string().into()],
            )
            .await?
            .pop())
    }

    async fn update_job(&self, job: &StudyJob, expected: StudyJobStatus) -> StoreResult<bool> {
        let (id, status, expires, body) = (
            job.id.clone(),
            job.status.as_str(),
            job.expires_at,
            serde_json::to_string(job)?,
        );
        let expected = expected.as_str();
        self.run(move |conn| {
            conn.execute(
                "UPDATE study_jobs SET status = ?2, expires = ?3, doc = ?4 WHERE id = ?1 AND status = ?5",
                params![id, status, expires, body, expected],
            )
            .map_err(db_err)
            .map(|n| n == 1)
        })
        .await
    }

    async fn jobs(&self, query: &JobQuery) -> StoreResult<(Vec<StudyJob>, u64)> {
        // A study's jobs, newest first; the finer filters are applied here, on the documents.
        let all: Vec<StudyJob> = self
            .docs(
                "SELECT doc FROM study_jobs WHERE study = ?1 ORDER BY requested DESC, id DESC",
                vec![query.study_id.clone().into()],
            )
            .await?;
        let selected: Vec<StudyJob> = all.into_iter().filter(|j| query.selects(j)).collect();
        let total = selected.len() as u64;
        let skip = ((query.page.max(1) - 1) * query.page_size) as usize;
        Ok((
            selected
                .into_iter()
                .skip(skip)
                .take(query.page_size as usize)
                .collect(),
            total,
        ))
    }

    async fn pending_jobs(&self) -> StoreResult<Vec<StudyJob>> {
        self.docs(
            "SELECT doc FROM study_jobs WHERE status = 'pending' ORDER BY requested",
            vec![],
        )
        .await
    }

    async fn expiring_jobs(&self, now: i64) -> StoreResult<Vec<StudyJob>> {
        self.docs(
            "SELECT doc FROM study_jobs WHERE status IN ('completed', 'error') AND expires <= ?1",
            vec![now.into()],
        )
        .await
    }

    async fn settings(&self, study_id: &str) -> StoreResult<Option<StudySettings>> {
        Ok(self
            .docs(
                "SELECT doc FROM study_settings WHERE study = ?1",
                vec![study_id.to_string().into()],
            )
            .await?
            .pop())
    }

    async fn put_settings(&self, settings: &StudySettings) -> StoreResult<()> {
        let (study, body) = (settings.study_id.clone(), serde_json::to_string(settings)?);
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO study_settings (study, doc) VALUES (?1, ?2)",
                params![study, body],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn all_settings(&self) -> StoreResult<Vec<StudySettings>> {
        self.docs("SELECT doc FROM study_settings ORDER BY study", vec![])
            .await
    }

    async fn remember_idempotency(
        &self,
        record: &IdempotencyRecord,
        now: i64,
    ) -> StoreResult<IdempotencyRecord> {
        let (key, created, body) = (
            record.key.clone(),
            record.created,
            serde_json::to_string(record)?,
        );
        let held: String = self
            .run(move |conn| {
                let tx = conn.transaction().map_err(db_err)?;
                tx.execute(
                    "DELETE FROM study_idempotency WHERE key = ?1 AND created < ?2",
                    params![key, now - 24 * 3600 * 1000],
                )
                .map_err(db_err)?;
                tx.execute(
                    "INSERT OR IGNORE INTO study_idempotency (key, created, doc) VALUES (?1, ?2, ?3)",
                    params![key, created, body],
                )
                .map_err(db_err)?;
                let held = tx
                    .query_row(
                        "SELECT doc FROM study_idempotency WHERE key = ?1",
                        params![key],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(held)
            })
            .await?;
        doc(&held)
    }

    async fn complete_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<()> {
        let (key, body) = (record.key.clone(), serde_json::to_string(record)?);
        self.run(move |conn| {
            conn.execute(
                "UPDATE study_idempotency SET doc = ?2 WHERE key = ?1",
                params![key, body],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }
}

#[async_trait]
impl AuditLog for SqliteStore {
    async fn last_record(&self) -> StoreResult<Option<AuditRecord>> {
        Ok(self
            .docs(
                "SELECT doc FROM audit_log ORDER BY seq DESC LIMIT 1",
                vec![],
            )
            .await?
            .pop())
    }

    async fn insert_record(&self, record: &AuditRecord) -> StoreResult<bool> {
        let (seq, study, body) = (
            record.seq as i64,
            record.entry.study_id.clone(),
            serde_json::to_string(record)?,
        );
        self.run(move |conn| {
            // The primary key makes a second writer of the same place fail.
            conn.execute(
                "INSERT OR IGNORE INTO audit_log (seq, study, doc) VALUES (?1, ?2, ?3)",
                params![seq, study, body],
            )
            .map_err(db_err)
            .map(|n| n == 1)
        })
        .await
    }

    async fn records(&self, query: &AuditQuery) -> StoreResult<(Vec<AuditRecord>, u64)> {
        let all: Vec<AuditRecord> = match &query.study_id {
            Some(study) => {
                self.docs(
                    "SELECT doc FROM audit_log WHERE study = ?1 ORDER BY seq DESC",
                    vec![study.clone().into()],
                )
                .await?
            }
            None => {
                self.docs("SELECT doc FROM audit_log ORDER BY seq DESC", vec![])
                    .await?
            }
        };
        let selected: Vec<AuditRecord> = all.into_iter().filter(|r| query.selects(r)).collect();
        let total = selected.len() as u64;
        let skip = ((query.page.max(1) - 1) * query.page_size) as usize;
        Ok((
            selected
                .into_iter()
                .skip(skip)
                .take(query.page_size as usize)
                .collect(),
            total,
        ))
    }

    async fn all_records(&self) -> StoreResult<Vec<AuditRecord>> {
        self.docs("SELECT doc FROM audit_log ORDER BY seq", vec![])
            .await
    }
}

#[async_trait]
impl WebhookOutbox for SqliteStore {
    async fn enqueue(&self, delivery: &Delivery) -> StoreResult<()> {
        self.update_delivery(delivery).await
    }

    async fn due(&self, now: i64) -> StoreResult<Vec<Delivery>> {
        self.docs(
            "SELECT doc FROM webhook_outbox WHERE status = 'pending' AND due <= ?1 ORDER BY due",
            vec![now.into()],
        )
        .await
    }

    async fn update_delivery(&self, delivery: &Delivery) -> StoreResult<()> {
        let status = match delivery.status {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        };
        let (id, study, due, created, body) = (
            delivery.id.clone(),
            delivery.study_id.clone(),
            delivery.next_attempt,
            delivery.created,
            serde_json::to_string(delivery)?,
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO webhook_outbox (id, study, status, due, created, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, study, status, due, created, body],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn deliveries(&self, study_id: &str, limit: usize) -> StoreResult<Vec<Delivery>> {
        let mut all: Vec<Delivery> = self
            .docs(
                "SELECT doc FROM webhook_outbox WHERE study = ?1 ORDER BY created DESC",
                vec![study_id.to_string().into()],
            )
            .await?;
        all.truncate(limit);
        Ok(all)
    }
}
