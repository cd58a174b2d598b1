//! The page's sessions in the auth table: one item per session (`pk` `session#<key>`, where the
//! key is the SHA-256 of the cookie), removed by DynamoDB's TTL an hour after it expires.

use crate::dynamo::{DynamoTable, attr_n, attr_s, dynamo_err, get_s};
use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use export_core::{StoreError, StoreResult};
use export_web::session::{Session, SessionStore};

const SORT_KEY: &str = "session";

/// Sessions in the auth table.
#[derive(Clone)]
pub struct DynamoSessionStore {
    table: DynamoTable,
}

impl DynamoSessionStore {
    pub fn new(table: DynamoTable) -> Self {
        DynamoSessionStore { table }
    }
}

fn partition(key: &str) -> String {
    format!("session#{key}")
}

#[async_trait]
impl SessionStore for DynamoSessionStore {
    async fn put_session(&self, session: &Session) -> StoreResult<()> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(&partition(&session.key)))
            .item("sk", attr_s(SORT_KEY))
            .item("doc", attr_s(&serde_json::to_string(session)?))
            .item("ttl", attr_n(session.expires + 3600))
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    async fn session(&self, key: &str) -> StoreResult<Option<Session>> {
        let Some(item) = self.table.get(&partition(key), SORT_KEY).await? else {
            return Ok(None);
        };
        let doc = get_s(&item, "doc").unwrap_or_default();
        serde_json::from_str(&doc)
            .map(Some)
            .map_err(StoreError::from)
    }

    async fn touch_session(&self, session: &Session) -> StoreResult<()> {
        let put = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item("pk", attr_s(&partition(&session.key)))
            .item("sk", attr_s(SORT_KEY))
            .item("doc", attr_s(&serde_json::to_string(session)?))
            .item("ttl", attr_n(session.expires + 3600))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if e.err().code() == Some("ConditionalCheckFailedException") =>
            {
                Ok(())
            }
            Err(e) => Err(dynamo_err(e)),
        }
    }

    async fn delete_session(&self, key: &str) -> StoreResult<()> {
        self.table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .key("pk", attr_s(&partition(key)))
            .key("sk", attr_s(SORT_KEY))
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }
}
