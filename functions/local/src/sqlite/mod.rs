//! The embedded store: one SQLite file holding the FHIR resources (every version, with the
//! Patient-compartment index written at load time), the jobs, their parts, the export lock,
//! what authentication keeps (clients, users, memberships, API key hashes, the signing key), and
//! the study exports' jobs, settings, audit trail and webhook outbox, and the page's sessions.
//!
//! Resources are versioned: each row knows when the next version replaced it (`superseded`), so
//! an export reads exactly the versions current at its transaction time, whatever is written
//! while it runs.

use export_core::error::{StoreError, StoreResult};
use export_core::item_thread;
use rusqlite::Connection;
use rusqlite::config::DbConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS resources (
    rid        INTEGER PRIMARY KEY,
    type       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    lu         INTEGER NOT NULL,  -- meta.lastUpdated, microseconds since the epoch
    superseded INTEGER,           -- lastUpdated of the next version; NULL while current
    body       TEXT    NOT NULL,  -- minified JSON
    deleted    INTEGER NOT NULL DEFAULT 0  -- 1: this version deletes the resource
);
CREATE UNIQUE INDEX IF NOT EXISTS resources_by_id ON resources (type, id, version);
-- Each type owns a range of rids (`num << 40` and up, see resources.rs), so one type's rows are
-- contiguous in the table and a type is read as one sequential range, not row by row.
CREATE TABLE IF NOT EXISTS resource_types (type TEXT PRIMARY KEY, num INTEGER NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS resources_by_time ON resources (type, lu);
CREATE TABLE IF NOT EXISTS membership (
    patient TEXT    NOT NULL,
    type    TEXT    NOT NULL,
    rid     INTEGER NOT NULL,
    PRIMARY KEY (patient, type, rid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS membership_by_rid ON membership (rid, patient);
CREATE TABLE IF NOT EXISTS provenance_targets (
    target TEXT NOT NULL,  -- `Type/id` named in Provenance.target
    id     TEXT NOT NULL,  -- the Provenance id
    PRIMARY KEY (target, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    id      TEXT PRIMARY KEY,
    status  TEXT NOT NULL,
    expires INTEGER,
    doc     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_patients (job TEXT NOT NULL, patient TEXT NOT NULL, PRIMARY KEY (job, patient)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_items (job TEXT NOT NULL, item INTEGER NOT NULL, doc TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job, item)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_parts (job TEXT NOT NULL, key TEXT NOT NULL, item INTEGER NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (job, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_manifest_pages (job TEXT NOT NULL, page INTEGER NOT NULL, keys TEXT NOT NULL, PRIMARY KEY (job, page)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_lock (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS auth_clients (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_jti (key TEXT PRIMARY KEY, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS auth_users (email TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_memberships (email TEXT NOT NULL, study TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (email, study));
CREATE TABLE IF NOT EXISTS auth_api_keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auth_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS study_jobs (
    id        TEXT PRIMARY KEY,
    study     TEXT NOT NULL,
    status    TEXT NOT NULL,
    requested INTEGER NOT NULL,  -- ms since the epoch
    expires   INTEGER,
    doc       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS study_jobs_by_study ON study_jobs (study, requested);
CREATE TABLE IF NOT EXISTS study_settings (study TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS study_idempotency (key TEXT PRIMARY KEY, created INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_log (seq INTEGER PRIMARY KEY, study TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS web_sessions (key TEXT PRIMARY KEY, expires INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id     TEXT PRIMARY KEY,
    study  TEXT NOT NULL,
    status TEXT NOT NULL,
    due    INTEGER NOT NULL,
    created INTEGER NOT NULL,
    doc    TEXT NOT NULL
);
"#;

/// Visibility of a version at `as_of` (bound as `?as_of`).
pub(super) const CURRENT_AT: &str = "(superseded IS NULL OR superseded > :as_of)";

/// The SQLite store. Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
    /// The Patients live at an export's transaction time, for its Patient-level pages.
    live_patients: Arc<Mutex<Option<resources::LivePatients>>>,
    /// Row ids per partition of a type ([`resources::ROWS_PER_PARTITION`] unless a test asks
    /// for smaller ones).
    rows_per_partition: i64,
}

pub(super) fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(format!("sqlite: {e}"))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let store = SqliteStore {
            path: path.to_path_buf(),
            pool: Arc::new(Mutex::new(Vec::new())),
            live_patients: Arc::default(),
            rows_per_partition: resources::ROWS_PER_PARTITION,
        };
        let conn = store.connect()?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        // Stores created before deletions were kept get the column (an error means it exists).
        let _ = conn.execute(
            "ALTER TABLE resources ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
            [],
        );
        Self::index_old_provenance(&conn)?;
        Self::cluster_old_rows(&conn)?;
        store.pool.lock().expect("pool").push(conn);
        Ok(store)
    }

    /// The same store with partitions of `rows` row ids (tests use a few, to have many).
    pub fn with_rows_per_partition(mut self, rows: u64) -> Self {
        self.rows_per_partition = rows.clamp(1, i64::MAX as u64) as i64;
        self
    }

    fn connect(&self) -> StoreResult<Connection> {
        let conn = Connection::open(&self.path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(db_err)?;
        // 4 MiB of page cache per connection: a pool of a few connections filled 8 MiB each on a
        // 10M store (Patient export at 72 MB peak RSS), and reads were no faster for it.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-4096;",
        )
        .map_err(db_err)?;
        // The bundled SQLite has STAT4, with which a statement compared with an indexed column
        // is compiled again each time its parameters change (every page and compartment read);
        // the query planner stability guarantee keeps one plan per statement.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(db_err)?;
        Ok(conn)
    }

    /// Runs `f` with a pooled connection on the calling thread.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let pooled = self.pool.lock().expect("pool").pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = f(&mut conn);
        self.pool.lock().expect("pool").push(conn);
        result
    }

    /// Runs `f` with a pooled connection: on an item's own thread right there, else on tokio's
    /// blocking pool (see [`export_core::item_thread`]).
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let store = self.clone();
        item_thread::blocking(move || store.with_conn(f))
            .await
            .map_err(db_err)?
    }
}

mod auth;
mod jobs;
mod lock;
mod resources;
mod sessions;
mod study;
