//! Jobs, their work items, patient sets and finished parts.

use super::{SqliteStore, db_err};
use async_trait::async_trait;
use export_core::error::StoreResult;
use export_core::fhir::time::{Instant, to_micros};
use export_core::job::{Job, JobStatus};
use export_core::ports::{JobStore, PartRecord, WorkItem};
use rusqlite::{OptionalExtension, params};

fn job_from(doc: String) -> StoreResult<Job> {
    Ok(serde_json::from_str(&doc)?)
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn create(&self, job: &Job) -> StoreResult<()> {
        let (id, status, expires, doc) = (
            job.id.clone(),
            job.status.as_str(),
            job.expires_at.map(to_micros),
            serde_json::to_string(job)?,
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO jobs (id, status, expires, doc) VALUES (?1, ?2, ?3, ?4)",
                params![id, status, expires, doc],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Job>> {
        let id = id.to_string();
        let doc: Option<String> = self
            .run(move |conn| {
                conn.query_row("SELECT doc FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                    .optional()
                    .map_err(db_err)
            })
            .await?;
        doc.map(job_from).transpose()
    }

    async fn update(&self, job: &Job, expected: JobStatus) -> StoreResult<bool> {
        let (id, status, expires, doc) = (
            job.id.clone(),
            job.status.as_str(),
            job.expires_at.map(to_micros),
            serde_json::to_string(job)?,
        );
        self.run(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE jobs SET status = ?2, expires = ?3, doc = ?4 WHERE id = ?1 AND status = ?5",
                    params![id, status, expires, doc, expected.as_str()],
                )
                .map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn active_jobs(&self) -> StoreResult<Vec<Job>> {
        self.jobs_where("status IN ('accepted', 'in-progress')", i64::MAX)
            .await
    }

    async fn expired_jobs(&self, now: Instant) -> StoreResult<Vec<Job>> {
        self.jobs_where(
            "status IN ('completed', 'failed') AND expires <= ?1",
            to_micros(now),
        )
        .await
    }

    async fn put_patient_set(&self, job_id: &str, patients: &[String]) -> StoreResult<()> {
        let (job, patients) = (job_id.to_string(), patients.to_vec());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            {
                let mut insert = tx
                    .prepare("INSERT OR IGNORE INTO job_patients (job, patient) VALUES (?1, ?2)")
                    .map_err(db_err)?;
                for p in &patients {
                    insert.execute(params![job, p]).map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn patient_set(&self, job_id: &str) -> StoreResult<Vec<String>> {
        self.column(
            "SELECT patient FROM job_patients WHERE job = ?1 ORDER BY patient",
            job_id,
        )
        .await
    }

    async fn put_items(&self, items: &[WorkItem]) -> StoreResult<()> {
        let docs: Vec<(String, u32, String)> = items
            .iter()
            .map(|i| Ok((i.job_id.clone(), i.item, serde_json::to_string(i)?)))
            .collect::<StoreResult<_>>()?;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            {
                let mut insert = tx
                    .prepare("INSERT OR IGNORE INTO job_items (job, item, doc) VALUES (?1, ?2, ?3)")
                    .map_err(db_err)?;
                for (job, item, doc) in &docs {
                    insert.execute(params![job, item, doc]).map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn items(&self, job_id: &str) -> StoreResult<Vec<WorkItem>> {
        let docs = self
            .column(
                "SELECT doc FROM job_items WHERE job = ?1 ORDER BY item",
                job_id,
            )
            .await?;
        docs.iter().map(|d| Ok(serde_json::from_str(d)?)).collect()
    }

    async fn complete_item(&self, job_id: &str, item: u32) -> StoreResult<()> {
        let job = job_id.to_string();
        self.run(move |conn| {
            conn.execute(
                "UPDATE job_items SET done = 1 WHERE job = ?1 AND item = ?2",
                params![job, item],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn completed_items(&self, job_id: &str) -> StoreResult<Vec<u32>> {
        let items = self
            .column(
                "SELECT CAST(item AS TEXT) FROM job_items WHERE job = ?1 AND done = 1",
                job_id,
            )
            .await?;
        Ok(items.iter().filter_map(|i| i.parse().ok()).collect())
    }

    async fn record_part(&self, part: &PartRecord) -> StoreResult<()> {
        let (job, key, item, doc) = (
            part.job_id.clone(),
            part.key.clone(),
            part.item,
            serde_json::to_string(part)?,
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO job_parts (job, key, item, doc) VALUES (?1, ?2, ?3, ?4)",
                params![job, key, item, doc],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn parts(&self, job_id: &str) -> StoreResult<Vec<PartRecord>> {
        let docs = self
            .column(
                "SELECT doc FROM job_parts WHERE job = ?1 ORDER BY key",
                job_id,
            )
            .await?;
        docs.iter().map(|d| Ok(serde_json::from_str(d)?)).collect()
    }

    async fn part(&self, job_id: &str, key: &str) -> StoreResult<Option<PartRecord>> {
        let (job, key) = (job_id.to_string(), key.to_string());
        let doc: Option<String> = self
            .run(move |conn| {
                conn.query_row(
                    "SELECT doc FROM job_parts WHERE job = ?1 AND key = ?2",
                    [job, key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)
            })
            .await?;
        doc.map(|d| Ok(serde_json::from_str(&d)?)).transpose()
    }

    async fn put_manifest_page(
        &self,
        job_id: &str,
        page: u32,
        keys: &[String],
    ) -> StoreResult<bool> {
        let (job, keys) = (job_id.to_string(), serde_json::to_string(keys)?);
        self.run(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO job_manifest_pages (job, page, keys) VALUES (?1, ?2, ?3)",
                params![job, page, keys],
            )
            .map_err(db_err)
            .map(|inserted| inserted == 1)
        })
        .await
    }

    async fn manifest_pages(&self, job_id: &str) -> StoreResult<Vec<Vec<String>>> {
        let docs = self
            .column(
                "SELECT keys FROM job_manifest_pages WHERE job = ?1 ORDER BY page",
                job_id,
            )
            .await?;
        docs.iter().map(|d| Ok(serde_json::from_str(d)?)).collect()
    }
}

impl SqliteStore {
    /// The first column, as text, of the rows `sql` selects for one `?1` value.
    async fn column(&self, sql: &'static str, value: &str) -> StoreResult<Vec<String>> {
        let value = value.to_string();
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
            let rows = stmt.query_map([value], |r| r.get(0)).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn jobs_where(&self, condition: &'static str, bound: i64) -> StoreResult<Vec<Job>> {
        let docs: Vec<String> = self
            .run(move |conn| {
                let sql = format!("SELECT doc FROM jobs WHERE {condition}");
                let mut stmt = conn.prepare(&sql).map_err(db_err)?;
                let params: &[&dyn rusqlite::ToSql] = if condition.contains("?1") {
                    &[&bound]
                } else {
                    &[]
                };
                let rows = stmt.query_map(params, |r| r.get(0)).map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)
            })
            .await?;
        docs.into_iter().map(job_from).collect()
    }
}
