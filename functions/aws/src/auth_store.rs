//! What authentication keeps, in one DynamoDB table: registered clients, users, memberships and
//! API key hashes (each kind in one partition, listed by a query), and the assertion ids seen,
//! one item each with a TTL, taken by a conditional write.

use crate::dynamo::{DynamoTable, Item, attr_n, attr_s, get_s};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use export_auth::ports::{
    ApiKeyRecord, ApiKeyStore, ClientStore, MembershipStore, RegisteredClient, ReplayCache, User,
    UserStore,
};
use export_auth::principal::Membership;
use export_auth::{StoreError, StoreResult};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// The auth table (`pk`, `sk`; TTL on `ttl`).
#[derive(Clone)]
pub struct DynamoAuthStore {
    table: DynamoTable,
}

fn err(e: export_core::StoreError) -> StoreError {
    StoreError(e.0)
}

fn sdk_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("dynamodb: {e:?}"))
}

fn doc_item(pk: &str, sk: &str, value: &impl Serialize) -> StoreResult<Item> {
    Ok(HashMap::from([
        ("pk".to_string(), attr_s(pk)),
        ("sk".to_string(), attr_s(sk)),
        (
            "doc".to_string(),
            attr_s(&serde_json::to_string(value).map_err(StoreError::new)?),
        ),
    ]))
}

fn from_item<T: DeserializeOwned>(item: &Item) -> StoreResult<T> {
    serde_json::from_str(&get_s(item, "doc").unwrap_or_default()).map_err(StoreError::new)
}

const CLIENTS: &str = "clients";
const USERS: &str = "users";
const MEMBERS: &str = "members";
const API_KEYS: &str = "api-keys";
const API_KEY_HASHES: &str = "api-key-hashes";

impl DynamoAuthStore {
    pub fn new(table: DynamoTable) -> Self {
        DynamoAuthStore { table }
    }

    async fn put(&self, item: Item) -> StoreResult<()> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item))
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }

    async fn get_doc<T: DeserializeOwned>(&self, pk: &str, sk: &str) -> StoreResult<Option<T>> {
        match self.table.get(pk, sk).await.map_err(err)? {
            Some(item) => Ok(Some(from_item(&item)?)),
            None => Ok(None),
        }
    }

    async fn list<T: DeserializeOwned>(
        &self,
        pk: &str,
        prefix: Option<&str>,
    ) -> StoreResult<Vec<T>> {
        self.table
            .query_all(pk, prefix, None)
            .await
            .map_err(err)?
            .iter()
            .map(from_item)
            .collect()
    }

    /// Deletes one item; returns whether it existed.
    async fn delete(&self, pk: &str, sk: &str) -> StoreResult<bool> {
        let out = self
            .table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(pk))
            .key("sk", attr_s(sk))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }
}

#[async_trait]
impl ClientStore for DynamoAuthStore {
    async fn put_client(&self, client: &RegisteredClient) -> StoreResult<()> {
        self.put(doc_item(CLIENTS, &client.id, client)?).await
    }
    async fn client(&self, id: &str) -> StoreResult<Option<RegisteredClient>> {
        self.get_doc(CLIENTS, id).await
    }
    async fn clients(&self) -> StoreResult<Vec<RegisteredClient>> {
        self.list(CLIENTS, None).await
    }
    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        self.delete(CLIENTS, id).await
    }
}

#[async_trait]
impl ReplayCache for DynamoAuthStore {
    async fn first_use(&self, key: &str, expires: i64, now: i64) -> StoreResult<bool> {
        // TTL deletes old items eventually; the condition treats an expired one as absent.
        let put = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(&format!("jti#{key}")))
            .item("sk", attr_s("jti"))
            .item("expires", attr_n(expires))
            .item("ttl", attr_n(expires + 3600))
            .condition_expression("attribute_not_exists(pk) OR expires < :now")
            .expression_attribute_values(":now", attr_n(now))
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if e.err().code() == Some("ConditionalCheckFailedException") =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_err(e)),
        }
    }
}

#[async_trait]
impl UserStore for DynamoAuthStore {
    async fn put_user(&self, user: &User) -> StoreResult<()> {
        let mut user = user.clone();
        if let Some(existing) = self.user(&user.email).await? {
            user.subject = existing.subject;
            user.created = existing.created;
        }
        self.put(doc_item(USERS, &user.email, &user)?).await
    }
    async fn user(&self, email: &str) -> StoreResult<Option<User>> {
        self.get_doc(USERS, &email.to_ascii_lowercase()).await
    }
    async fn users(&self) -> StoreResult<Vec<User>> {
        self.list(USERS, None).await
    }
}

/// A membership's sort key: the e-mail (which has no `#`), then the study.
fn member_key(email: &str, study: &str) -> String {
    format!("{}#{study}", email.to_ascii_lowercase())
}

#[async_trait]
impl MembershipStore for DynamoAuthStore {
    async fn grant(&self, email: &str, membership: &Membership) -> StoreResult<()> {
        let mut item = doc_item(MEMBERS, &member_key(email, &membership.study), membership)?;
        item.insert("email".into(), attr_s(&email.to_ascii_lowercase()));
        self.put(item).await
    }
    async fn revoke(&self, email: &str, study: &str) -> StoreResult<bool> {
        self.delete(MEMBERS, &member_key(email, study)).await
    }
    async fn memberships(&self, email: &str) -> StoreResult<Vec<Membership>> {
        self.list(MEMBERS, Some(&member_key(email, ""))).await
    }
    async fn all_memberships(&self) -> StoreResult<Vec<(String, Membership)>> {
        self.table
            .query_all(MEMBERS, None, None)
            .await
            .map_err(err)?
            .iter()
            .map(|item| Ok((get_s(item, "email").unwrap_or_default(), from_item(item)?)))
            .collect()
    }
}

#[async_trait]
impl ApiKeyStore for DynamoAuthStore {
    async fn put_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.put(doc_item(API_KEYS, &key.id, key)?).await?;
        let mut pointer = doc_item(API_KEY_HASHES, &key.hash, &key.id)?;
        pointer.insert("id".into(), attr_s(&key.id));
        self.put(pointer).await
    }
    async fn api_key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let Some(id) = self.get_doc::<String>(API_KEY_HASHES, hash).await? else {
            return Ok(None);
        };
        self.get_doc(API_KEYS, &id).await
    }
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.list(API_KEYS, None).await
    }
    async fn revoke_api_key(&self, id: &str) -> StoreResult<bool> {
        let Some(mut key) = self.get_doc::<ApiKeyRecord>(API_KEYS, id).await? else {
            return Ok(false);
        };
        key.revoked = true;
        self.put(doc_item(API_KEYS, id, &key)?).await?;
        Ok(true)
    }
    async fn touch_api_key(&self, id: &str, now: i64) -> StoreResult<()> {
        if let Some(mut key) = self.get_doc::<ApiKeyRecord>(API_KEYS, id).await? {
            // A revocation written meanwhile must survive: only the last use is set.
            key.last_used = Some(now);
            let update = self
                .table
                .client
                .put_item()
                .table_name(&self.table.name)
                .set_item(Some(doc_item(API_KEYS, id, &key)?))
                .condition_expression("contains(doc, :active)")
                .expression_attribute_values(":active", attr_s("\"revoked\":false"))
                .send()
                .await;
            if let Err(e) = update
                && !matches!(&e, SdkError::ServiceError(s) if s.err().code() == Some("ConditionalCheckFailedException"))
            {
                return Err(sdk_err(e));
            }
        }
        Ok(())
    }
}
