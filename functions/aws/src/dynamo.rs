//! A thin helper over one DynamoDB table with string keys `pk` and `sk`: paged queries, and
//! batched reads and writes that retry what DynamoDB leaves unprocessed.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, PutRequest, TransactWriteItem, Update, WriteRequest,
};
use export_core::error::{StoreError, StoreResult};
use std::collections::HashMap;
use std::time::Duration;

/// One DynamoDB item.
pub type Item = HashMap<String, AttributeValue>;

/// Attempts for a batch whose items keep coming back unprocessed (throttling).
const BATCH_ATTEMPTS: u32 = 8;

pub fn attr_s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

pub fn attr_n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub fn get_s(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

/// A list of strings, as DynamoDB's `L` of `S` values.
pub fn attr_string_list(values: &[String]) -> AttributeValue {
    AttributeValue::L(values.iter().map(|v| attr_s(v)).collect())
}

/// The strings of an `L` attribute (empty when absent).
pub fn get_string_list(item: &Item, name: &str) -> Vec<String> {
    match item.get(name) {
        Some(AttributeValue::L(list)) => {
            list.iter().filter_map(|v| v.as_s().ok().cloned()).collect()
        }
        _ => Vec::new(),
    }
}

pub fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

pub fn dynamo_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("dynamodb: {e:?}"))
}

/// Whether a write failed only because its condition did not hold.
pub fn is_condition_failure<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(ProvideErrorMetadata::code)
        == Some("ConditionalCheckFailedException")
}

/// Why a transaction did not apply.
#[derive(Debug)]
pub enum TransactError {
    /// A condition did not hold or another transaction touched the same items: nothing was
    /// written; read again and retry.
    Cancelled,
    /// Anything else (the request may or may not have been applied).
    Failed(StoreError),
}

/// One action of a transaction: a put, or a `SET` of one number, each with an optional condition.
pub enum TxAction {
    Put {
        item: Item,
        /// `None`: unconditional; `Some(None)`: only if the item does not exist; `Some(Some(v))`:
        /// only if its numeric attribute `v` equals the value.
        expect: Option<Option<(String, i64)>>,
    },
    /// Sets a numeric attribute of an item that must exist.
    SetNumber {
        pk: String,
        sk: String,
        name: String,
        value: i64,
    },
}

/// Which sort keys of a partition a query reads.
pub enum SortKeys<'a> {
    /// `from <= sk <= to`.
    Between(&'a str, &'a str),
    /// `sk` starts with this.
    Prefix(&'a str),
}

/// A table with `pk` (hash) and `sk` (range) string keys.
#[derive(Clone)]
pub struct DynamoTable {
    pub client: Client,
    pub name: String,
}

impl DynamoTable {
    /// Creates an on-demand table with string keys `pk` and `sk` (tests, benchmarks, local setups;
    /// the deployed tables come from template.yaml).
    pub async fn create(client: &Client, name: &str) -> StoreResult<()> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let attribute = |n: &str| {
            AttributeDefinition::builder()
                .attribute_name(n)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let key = |n: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(n)
                .key_type(kind)
                .build()
        };
        client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute("pk").map_err(dynamo_err)?)
            .attribute_definitions(attribute("sk").map_err(dynamo_err)?)
            .key_schema(key("pk", KeyType::Hash).map_err(dynamo_err)?)
            .key_schema(key("sk", KeyType::Range).map_err(dynamo_err)?)
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    pub fn new(client: Client, name: impl Into<String>) -> Self {
        DynamoTable {
            client,
            name: name.into(),
        }
    }

    fn key(pk: &str, sk: &str) -> Item {
        HashMap::from([
            ("pk".to_string(), attr_s(pk)),
            ("sk".to_string(), attr_s(sk)),
        ])
    }

    pub async fn get(&self, pk: &str, sk: &str) -> StoreResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.name)
            .set_key(Some(Self::key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(out.item)
    }

    /// Sets one numeric attribute of an existing item.
    pub async fn set_number(&self, pk: &str, sk: &str, name: &str, value: i64) -> StoreResult<()> {
        self.client
            .update_item()
            .table_name(&self.name)
            .set_key(Some(Self::key(pk, sk)))
            .update_expression("SET #a = :v")
            .expression_attribute_names("#a", name)
            .expression_attribute_values(":v", attr_n(value))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    /// Puts an item unless one with its key exists; returns whether it was written.
    pub async fn put_if_absent(&self, item: Item) -> StoreResult<bool> {
        let out = self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(dynamo_err(e)),
        }
    }

    /// Applies all actions or none (DynamoDB's TransactWriteItems: at most 100 actions, 4 MB).
    pub async fn transact(&self, actions: Vec<TxAction>) -> Result<(), TransactError> {
        let failed = |e| TransactError::Failed(dynamo_err(e));
        let mut items = Vec::with_capacity(actions.len());
        for action in actions {
            let item = match action {
                TxAction::Put { item, expect } => {
                    let put = Put::builder().table_name(&self.name).set_item(Some(item));
                    let put = match expect {
                        None => put,
                        Some(None) => put.condition_expression("attribute_not_exists(pk)"),
                        Some(Some((name, value))) => put
                            .condition_expression("#e = :e")
                            .expression_attribute_names("#e", name)
                            .expression_attribute_values(":e", attr_n(value)),
                    };
                    TransactWriteItem::builder()
                        .put(put.build().map_err(failed)?)
                        .build()
                }
                TxAction::SetNumber {
                    pk,
                    sk,
                    name,
                    value,
                } => {
                    let update = Update::builder()
                        .table_name(&self.name)
                        .set_key(Some(Self::key(&pk, &sk)))
                        .update_expression("SET #a = :v")
                        .expression_attribute_names("#a", name)
                        .expression_attribute_values(":v", attr_n(value))
                        .condition_expression("attribute_exists(pk)")
                        .build()
                        .map_err(failed)?;
                    TransactWriteItem::builder().update(update).build()
                }
            };
            items.push(item);
        }
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(_))
                | Some(TransactWriteItemsError::TransactionInProgressException(_)) => {
                    Err(TransactError::Cancelled)
                }
                _ => Err(TransactError::Failed(dynamo_err(e))),
            },
        }
    }

    /// Adds strings to a string-set attribute, creating the item if needed (idempotent).
    /// DynamoDB refuses a set that names a value twice, so the values are deduplicated here.
    pub async fn add_to_set(
        &self,
        pk: &str,
        sk: &str,
        name: &str,
        values: &[String],
    ) -> StoreResult<()> {
        self.client
            .update_item()
            .table_name(&self.name)
            .set_key(Some(Self::key(pk, sk)))
            .update_expression("ADD #a :v")
            .expression_attribute_names("#a", name)
            .expression_attribute_values(":v", AttributeValue::Ss(unique(values)))
            .send()
            .await
            .map_err(dynamo_err)?;
        Ok(())
    }

    /// Every item of a partition, optionally only those whose `sk` starts with `prefix`, in key
    /// order; `projection` limits the attributes read.
    pub async fn query_all(
        &self,
        pk: &str,
        prefix: Option<&str>,
        projection: Option<&str>,
    ) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.name)
                .consistent_read(true)
                .expression_attribute_values(":pk", attr_s(pk))
                .set_exclusive_start_key(start.take());
            query = match prefix {
                Some(p) => query
                    .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
                    .expression_attribute_values(":p", attr_s(p)),
                None => query.key_condition_expression("pk = :pk"),
            };
            if let Some(projection) = projection {
                query = query.projection_expression(projection);
            }
            let out = query.send().await.map_err(dynamo_err)?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    /// Up to `limit` items of a partition whose `sk` is in `range`, after `after_sk`; also returns
    /// the `sk` to continue from when more may follow.
    pub async fn query_page(
        &self,
        pk: &str,
        range: SortKeys<'_>,
        after_sk: Option<&str>,
        limit: usize,
    ) -> StoreResult<(Vec<Item>, Option<String>)> {
        let query = self
            .client
            .query()
            .table_name(&self.name)
            .expression_attribute_values(":pk", attr_s(pk))
            .set_exclusive_start_key(after_sk.map(|sk| Self::key(pk, sk)))
            .limit(limit.clamp(1, 10_000) as i32);
        let query = match range {
            SortKeys::Between(from, to) => query
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":from", attr_s(from))
                .expression_attribute_values(":to", attr_s(to)),
            SortKeys::Prefix(prefix) => query
                .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
                .expression_attribute_values(":p", attr_s(prefix)),
        };
        let out = query.send().await.map_err(dynamo_err)?;
        let last = out.last_evaluated_key.as_ref().and_then(|k| get_s(k, "sk"));
        Ok((out.items.unwrap_or_default(), last))
    }

    /// Reads items by key, 100 per request, retrying unprocessed keys. Missing items are skipped.
    pub async fn batch_get(&self, keys: &[(String, String)]) -> StoreResult<Vec<Item>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(100) {
            let mut unique: Vec<&(String, String)> = chunk.iter().collect();
            unique.sort();
            unique.dedup();
            let mut pending: Vec<Item> = unique.iter().map(|(pk, sk)| Self::key(pk, sk)).collect();
            for attempt in 0..BATCH_ATTEMPTS {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending))
                    .consistent_read(true)
                    .build()
                    .map_err(dynamo_err)?;
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.name, request)
                    .send()
                    .await
                    .map_err(dynamo_err)?;
                found.extend(
                    out.responses
                        .unwrap_or_default()
                        .remove(&self.name)
                        .unwrap_or_default(),
                );
                pending = out
                    .unprocessed_keys
                    .unwrap_or_default()
                    .remove(&self.name)
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                backoff(attempt).await;
            }
            if !pending.is_empty() {
                return Err(StoreError::new(
                    "dynamodb: batch read kept returning unprocessed keys",
                ));
            }
        }
        Ok(found)
    }

    /// Writes items, 25 per request, retrying unprocessed items with exponential backoff.
    pub async fn batch_put(&self, items: Vec<Item>) -> StoreResult<()> {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut pending: Vec<WriteRequest> = items
                .by_ref()
                .take(25)
                .map(|item| {
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(item))
                                .build()
                                .expect("item set"),
                        )
                        .build()
                })
                .collect();
            for attempt in 0..BATCH_ATTEMPTS {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.name, pending)
                    .send()
                    .await
                    .map_err(dynamo_err)?;
                pending = out
                    .unprocessed_items
                    .unwrap_or_default()
                    .remove(&self.name)
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                backoff(attempt).await;
            }
            if !pending.is_empty() {
                return Err(StoreError::new(
                    "dynamodb: batch write kept returning unprocessed items",
                ));
            }
        }
        Ok(())
    }
}

/// The values once each, in order (a string set must not repeat one).
fn unique(values: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    values
        .iter()
        .filter(|v| seen.insert(v.as_str()))
        .cloned()
        .collect()
}

pub async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(50u64 << attempt.min(6))).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn set_values_are_sent_once_each() {
        let values = ["a", "b", "a", "c", "b"].map(String::from);
        assert_eq!(super::unique(&values), ["a", "b", "c"]);
    }
}
