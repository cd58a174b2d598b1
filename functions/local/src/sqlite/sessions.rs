//! The page's sessions: one row per session, keyed by the SHA-256 of its cookie; expired rows
//! are removed as new sessions are written.

use super::{SqliteStore, db_err};
use async_trait::async_trait;
use export_core::{StoreError, StoreResult};
use export_web::session::{Session, SessionStore};
use rusqlite::{OptionalExtension, params};

#[async_trait]
impl SessionStore for SqliteStore {
    async fn put_session(&self, session: &Session) -> StoreResult<()> {
        let (key, expires, doc) = (
            session.key.clone(),
            session.expires,
            serde_json::to_string(session)?,
        );
        let now = chrono::Utc::now().timestamp();
        self.run(move |conn| {
            conn.execute("DELETE FROM web_sessions WHERE expires < ?1", params![now])
                .map_err(db_err)?;
            conn.execute(
                "INSERT OR REPLACE INTO web_sessions (key, expires, doc) VALUES (?1, ?2, ?3)",
                params![key, expires, doc],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn session(&self, key: &str) -> StoreResult<Option<Session>> {
        let key = key.to_string();
        let doc: Option<String> = self
            .run(move |conn| {
                conn.query_row(
                    "SELECT doc FROM web_sessions WHERE key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)
            })
            .await?;
        doc.map(|d| serde_json::from_str(&d).map_err(StoreError::from))
            .transpose()
    }

    async fn touch_session(&self, session: &Session) -> StoreResult<()> {
        let (key, doc) = (session.key.clone(), serde_json::to_string(session)?);
        self.run(move |conn| {
            conn.execute(
                "UPDATE web_sessions SET doc = ?2 WHERE key = ?1",
                params![key, doc],
            )
            .map_err(db_err)
            .map(drop)
        })
        .await
    }

    async fn delete_session(&self, key: &str) -> StoreResult<()> {
        let key = key.to_string();
        self.run(move |conn| {
            conn.execute("DELETE FROM web_sessions WHERE key = ?1", params![key])
                .map_err(db_err)
                .map(drop)
        })
        .await
    }
}
