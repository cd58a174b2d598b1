//! The export lock: one row, taken and renewed by single conditional statements.

use super::{SqliteStore, db_err};
use async_trait::async_trait;
use export_core::error::StoreResult;
use export_core::fhir::time::{Instant, to_micros};
use export_core::job::Job;
use export_core::ports::ExportLock;
use rusqlite::{OptionalExtension, params};
use std::time::Duration;
/// The lock row's name: there is one export lock per store.
const LOCK_NAME: &str = "export";

#[async_trait]
impl ExportLock for SqliteStore {
    async fn acquire(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool> {
        let owner = owner.to_string();
        let (now, expires) = (to_micros(now), to_micros(now) + lease.as_micros() as i64);
        self.run(move |conn| {
            // One statement: insert, or take over only an expired lease (or our own).
            let changed = conn
                .execute(
                    "INSERT INTO export_lock (name, owner, expires) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires \
                     WHERE export_lock.expires <= ?4 OR export_lock.owner = excluded.owner",
                    params![LOCK_NAME, owner, expires, now],
                )
                .map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn acquire_for_job(&self, job: &Job, lease: Duration, now: Instant) -> StoreResult<bool> {
        let (id, status, expires, doc) = (
            job.id.clone(),
            job.status.as_str(),
            job.expires_at.map(to_micros),
            serde_json::to_string(job)?,
        );
        let (now, until) = (to_micros(now), to_micros(now) + lease.as_micros() as i64);
        self.run(move |conn| {
            // One transaction: the lock row and the job row are written together or not at all.
            let tx = conn.transaction().map_err(db_err)?;
            let taken = tx
                .execute(
                    "INSERT INTO export_lock (name, owner, expires) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires \
                     WHERE export_lock.expires <= ?4 OR export_lock.owner = excluded.owner",
                    params![LOCK_NAME, id, until, now],
                )
                .map_err(db_err)?
                == 1;
            if !taken {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO jobs (id, status, expires, doc) VALUES (?1, ?2, ?3, ?4)",
                params![id, status, expires, doc],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn renew(&self, owner: &str, lease: Duration, now: Instant) -> StoreResult<bool> {
        let owner = owner.to_string();
        let expires = to_micros(now) + lease.as_micros() as i64;
        self.run(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE export_lock SET expires = ?3 WHERE name = ?1 AND owner = ?2",
                    params![LOCK_NAME, owner, expires],
                )
                .map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn holder(&self, now: Instant) -> StoreResult<Option<String>> {
        let now = to_micros(now);
        self.run(move |conn| {
            conn.query_row(
                "SELECT owner FROM export_lock WHERE name = ?1 AND expires > ?2",
                params![LOCK_NAME, now],
                |row| row.get(0),
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn release(&self, owner: &str) -> StoreResult<()> {
        let owner = owner.to_string();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM export_lock WHERE name = ?1 AND owner = ?2",
                params![LOCK_NAME, owner],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }
}
