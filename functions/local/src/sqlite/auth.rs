//! What authentication keeps: registered clients, used assertion ids, users, study memberships,
//! API key hashes, and the local signing key. Each record is one JSON document.

use super::{SqliteStore, db_err};
use async_trait::async_trait;
use export_auth::ports::{
    ApiKeyRecord, ApiKeyStore, ClientStore, MembershipStore, RegisteredClient, ReplayCache, User,
    UserStore,
};
use export_auth::principal::Membership;
use export_auth::signer::LocalSigner;
use export_auth::{StoreError, StoreResult};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn auth_err(e: export_core::StoreError) -> StoreError {
    StoreError(e.0)
}

fn to_doc(value: &impl Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(StoreError::new)
}

fn from_doc<T: DeserializeOwned>(doc: &str) -> StoreResult<T> {
    serde_json::from_str(doc).map_err(StoreError::new)
}

impl SqliteStore {
    /// Runs one statement with text parameters; returns the number of rows changed.
    async fn auth_execute(&self, sql: &'static str, values: Vec<String>) -> StoreResult<usize> {
        self.run(move |conn| {
            conn.execute(sql, rusqlite::params_from_iter(values.iter()))
                .map_err(db_err)
        })
        .await
        .map_err(auth_err)
    }

    /// The documents one query selects.
    async fn auth_docs<T: DeserializeOwned>(
        &self,
        sql: &'static str,
        values: Vec<String>,
    ) -> StoreResult<Vec<T>> {
        let docs: Vec<String> = self
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(values.iter()), |r| r.get(0))
                    .map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)
            })
            .await
            .map_err(auth_err)?;
        docs.iter().map(|d| from_doc(d)).collect()
    }

    /// A setting kept in the store (e.g. the local issuer `serve` announced).
    pub fn setting(&self, name: &str) -> StoreResult<Option<String>> {
        let name = name.to_string();
        self.with_conn(|conn| {
            conn.query_row(
                "SELECT value FROM auth_secrets WHERE name = ?1",
                params![format!("setting:{name}")],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map_err(db_err)
        })
        .map_err(auth_err)
        .map(|v| v.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    pub fn set_setting(&self, name: &str, value: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO auth_secrets (name, value) VALUES (?1, ?2)",
                params![format!("setting:{name}"), value.as_bytes()],
            )
            .map_err(db_err)
            .map(|_| ())
        })
        .map_err(auth_err)
    }

    /// The local signing key, created on first use. Two processes starting together agree on one
    /// key: the first insert wins and both read it back.
    pub fn signing_key(&self) -> StoreResult<LocalSigner> {
        let (_, fresh) = LocalSigner::generate();
        let der: Vec<u8> = self
            .with_conn(|conn| {
                conn.execute(
                    "INSERT OR IGNORE INTO auth_secrets (name, value) VALUES ('signing-key', ?1)",
                    params![fresh],
                )
                .map_err(db_err)?;
                conn.query_row(
                    "SELECT value FROM auth_secrets WHERE name = 'signing-key'",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)
            })
            .map_err(auth_err)?;
        LocalSigner::from_pkcs8(&der)
    }
}

#[async_trait]
impl ClientStore for SqliteStore {
    async fn put_client(&self, client: &RegisteredClient) -> StoreResult<()> {
        let doc = to_doc(client)?;
        self.auth_execute(
            "INSERT OR REPLACE INTO auth_clients (id, doc) VALUES (?1, ?2)",
            vec![client.id.clone(), doc],
        )
        .await
        .map(|_| ())
    }
    async fn client(&self, id: &str) -> StoreResult<Option<RegisteredClient>> {
        Ok(self
            .auth_docs(
                "SELECT doc FROM auth_clients WHERE id = ?1",
                vec![id.into()],
            )
            .await?
            .pop())
    }
    async fn clients(&self) -> StoreResult<Vec<RegisteredClient>> {
        self.auth_docs("SELECT doc FROM auth_clients ORDER BY id", vec![])
            .await
    }
    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .auth_execute("DELETE FROM auth_clients WHERE id = ?1", vec![id.into()])
            .await?
            > 0)
    }
}

#[async_trait]
impl ReplayCache for SqliteStore {
    async fn first_use(&self, key: &str, expires: i64, now: i64) -> StoreResult<bool> {
        let key = key.to_string();
        self.run(move |conn| {
            // Forget what can no longer be replayed, then insert unless a live entry exists.
            conn.execute("DELETE FROM auth_jti WHERE expires < ?1", params![now])
                .map_err(db_err)?;
            let inserted = conn
                .execute(
                    "INSERT OR IGNORE INTO auth_jti (key, expires) VALUES (?1, ?2)",
                    params![key, expires],
                )
                .map_err(db_err)?;
            Ok(inserted == 1)
        })
        .await
        .map_err(auth_err)
    }
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn put_user(&self, user: &User) -> StoreResult<()> {
        let existing = self.user(&user.email).await?;
        let mut user = user.clone();
        if let Some(existing) = existing {
            user.subject = existing.subject;
            user.created = existing.created;
        }
        let doc = to_doc(&user)?;
        self.auth_execute(
            "INSERT OR REPLACE INTO auth_users (email, doc) VALUES (?1, ?2)",
            vec![user.email.clone(), doc],
        )
        .await
        .map(|_| ())
    }
    async fn user(&self, email: &str) -> StoreResult<Option<User>> {
        Ok(self
            .auth_docs(
                "SELECT doc FROM auth_users WHERE email = ?1",
                vec![email.to_ascii_lowercase()],
            )
            .await?
            .pop())
    }
    async fn users(&self) -> StoreResult<Vec<User>> {
        self.auth_docs("SELECT doc FROM auth_users ORDER BY email", vec![])
            .await
    }
}

#[async_trait]
impl MembershipStore for SqliteStore {
    async fn grant(&self, email: &str, membership: &Membership) -> StoreResult<()> {
        let doc = to_doc(membership)?;
        self.auth_execute(
            "INSERT OR REPLACE INTO auth_memberships (email, study, doc) VALUES (?1, ?2, ?3)",
            vec![email.to_ascii_lowercase(), membership.study.clone(), doc],
        )
        .await
        .map(|_| ())
    }
    async fn revoke(&self, email: &str, study: &str) -> StoreResult<bool> {
        Ok(self
            .auth_execute(
                "DELETE FROM auth_memberships WHERE email = ?1 AND study = ?2",
                vec![email.to_ascii_lowercase(), study.into()],
            )
            .await?
            > 0)
    }
    async fn memberships(&self, email: &str) -> StoreResult<Vec<Membership>> {
        self.auth_docs(
            "SELECT doc FROM auth_memberships WHERE email = ?1 ORDER BY study",
            vec![email.to_ascii_lowercase()],
        )
        .await
    }
    async fn all_memberships(&self) -> StoreResult<Vec<(String, Membership)>> {
        let rows: Vec<(String, String)> = self
            .run(|conn| {
                let mut stmt = conn
                    .prepare("SELECT email, doc FROM auth_memberships ORDER BY study, email")
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)
            })
            .await
            .map_err(auth_err)?;
        rows.into_iter()
            .map(|(email, doc)| Ok((email, from_doc(&doc)?)))
            .collect()
    }
}

#[async_trait]
impl ApiKeyStore for SqliteStore {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let doc = to_doc(key)?;
        self.auth_execute(
            "INSERT OR REPLACE INTO auth_api_keys (id, hash, doc) VALUES (?1, ?2, ?3)",
            vec![key.id.clone(), key.hash.clone(), doc],
        )
        .await
        .map(|_| ())
    }
    async fn api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(self
            .auth_docs(
                "SELECT doc FROM auth_api_keys WHERE hash = ?1",
                vec![hash.into()],
            )
            .await?
            .pop())
    }
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.auth_docs("SELECT doc FROM auth_api_keys ORDER BY id", vec![])
            .await
    }
    async fn revoke_api_key(&self, id: &str) -> StoreResult<bool> {
        self.update_api_key(id, |k| k.revoked = true).await
    }
    async fn touch_api_key(&self, id: &str, now: i64) -> StoreResult<()> {
        self.update_api_key(id, move |k| k.last_used = Some(now))
            .await
            .map(|_| ())
    }
}

impl SqliteStore {
    /// Reads, changes and writes back one API key in a transaction.
    async fn update_api_key(
        &self,
        id: &str,
        change: impl FnOnce(&mut ApiKeyRecord) + Send + 'static,
    ) -> StoreResult<bool> {
        let id = id.to_string();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(db_err)?;
            let doc: Option<String> = tx
                .query_row(
                    "SELECT doc FROM auth_api_keys WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let Some(doc) = doc else {
                return Ok(false);
            };
            let mut key: ApiKeyRecord = serde_json::from_str(&doc)?;
            change(&mut key);
            tx.execute(
                "UPDATE auth_api_keys SET doc = ?2 WHERE id = ?1",
                params![id, serde_json::to_string(&key)?],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
        .map_err(auth_err)
    }
}
