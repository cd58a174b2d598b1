//! The settings that belong to the data, not to a process: how many shards each type is spread
//! over and which bucket holds the big bodies. Both are written once, with the table's first data
//! (a conditional put), and read from there by every reader and writer. A shard count that differs
//! from the stored one would put versions where no reader looks, so a writer that was given
//! another count fails instead of writing.

use crate::dynamo::{DynamoTable, Item, attr_n, attr_s, dynamo_err, get_n, get_s};
use export_core::error::{StoreError, StoreResult};
use std::collections::HashMap;

const PK: &str = "config";
const SK: &str = "table";

/// What the table's `config` item holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableConfig {
    pub shards: u32,
    /// The bucket of bodies and patient lists kept in S3 (none until a writer names one).
    pub bucket: Option<String>,
}

/// What a process was told, checked against what the table says.
#[derive(Debug, Clone)]
pub struct Requested {
    /// The shard count for a new table.
    pub shards: u32,
    /// Whether `shards` was given explicitly (a stored count that differs is then an error).
    pub shards_fixed: bool,
    /// The bucket for big bodies, if this process has one.
    pub bucket: Option<String>,
}

fn parse(item: &Item) -> Option<TableConfig> {
    Some(TableConfig {
        shards: u32::try_from(get_n(item, "shards")?).ok()?.max(1),
        bucket: get_s(item, "bucket"),
    })
}

/// The stored settings, if any.
pub async fn read(table: &DynamoTable) -> StoreResult<Option<TableConfig>> {
    Ok(table.get(PK, SK).await?.as_ref().and_then(parse))
}

/// The stored settings, writing `requested` first when the table has none, and refusing a
/// request that contradicts them.
pub async fn read_for_write(
    table: &DynamoTable,
    requested: &Requested,
) -> StoreResult<TableConfig> {
    let mut stored = read(table).await?;
    if stored.is_none() {
        let mut item = HashMap::from([
            ("pk".to_string(), attr_s(PK)),
            ("sk".to_string(), attr_s(SK)),
            ("shards".to_string(), attr_n(requested.shards.max(1) as i64)),
        ]);
        if let Some(bucket) = &requested.bucket {
            item.insert("bucket".into(), attr_s(bucket));
        }
        // Two first writers race: one put wins and both go on with what it wrote.
        table.put_if_absent(item).await?;
        stored = read(table).await?;
    }
    let mut stored = stored.ok_or_else(|| StoreError::new("the table's config item vanished"))?;
    check(&stored, requested)?;
    if stored.bucket.is_none()
        && let Some(bucket) = &requested.bucket
    {
        add_bucket(table, bucket).await?;
        stored = read(table)
            .await?
            .ok_or_else(|| StoreError::new("the table's config item vanished"))?;
        check(&stored, requested)?;
    }
    Ok(stored)
}

/// Whether `requested` agrees with `stored`.
pub fn check(stored: &TableConfig, requested: &Requested) -> StoreResult<()> {
    if requested.shards_fixed && stored.shards != requested.shards {
        return Err(StoreError::new(format!(
            "the resource table holds its data in {} shards, not {}: pass --shards {} (or leave \
             it out to use the stored count)",
            stored.shards, requested.shards, stored.shards
        )));
    }
    if let (Some(stored), Some(requested)) = (&stored.bucket, &requested.bucket)
        && stored != requested
    {
        return Err(StoreError::new(
            "the resource table keeps its big bodies in another bucket than the one given",
        ));
    }
    Ok(())
}

/// Names the bucket in a config item that has none (the first big body of an older table).
async fn add_bucket(table: &DynamoTable, bucket: &str) -> StoreResult<()> {
    let out = table
        .client
        .update_item()
        .table_name(&table.name)
        .key("pk", attr_s(PK))
        .key("sk", attr_s(SK))
        .update_expression("SET bucket = :b")
        .condition_expression("attribute_exists(pk) AND attribute_not_exists(bucket)")
        .expression_attribute_values(":b", attr_s(bucket))
        .send()
        .await;
    match out {
        Ok(_) => Ok(()),
        // Someone named one first: the caller reads and checks it.
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(dynamo_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(shards: u32, fixed: bool, bucket: Option<&str>) -> Requested {
        Requested {
            shards,
            shards_fixed: fixed,
            bucket: bucket.map(String::from),
        }
    }

    #[test]
    fn another_shard_count_is_refused_only_when_given() {
        let stored = TableConfig {
            shards: 16,
            bucket: None,
        };
        assert!(check(&stored, &requested(16, true, None)).is_ok());
        let refused = check(&stored, &requested(4, true, None)).unwrap_err();
        assert!(refused.to_string().contains("16 shards"), "{refused}");
        assert!(check(&stored, &requested(4, false, None)).is_ok());
    }

    #[test]
    fn another_bucket_is_refused() {
        let stored = TableConfig {
            shards: 2,
            bucket: Some("a".into()),
        };
        assert!(check(&stored, &requested(2, true, Some("a"))).is_ok());
        assert!(check(&stored, &requested(2, true, None)).is_ok());
        assert!(check(&stored, &requested(2, true, Some("b"))).is_err());
    }
}
