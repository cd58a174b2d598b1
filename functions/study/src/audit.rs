//! The audit trail (21 CFR Part 11): append-only records of who did what to which export, when,
//! from where. Each record carries the SHA-256 of the previous one, so an edited, deleted or
//! reordered record breaks the chain, and `verify` names the first record that does not fit.
//! Appends are conditional on the sequence number, so two writers cannot both take one place.

use async_trait::async_trait;
use export_core::StoreResult;
use export_core::ids::sha256_hex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Create,
    StatusChange,
    Download,
    Cancel,
    Delete,
    Expire,
    MembershipChange,
}

impl AuditAction {
    pub const ALL: [AuditAction; 7] = [
        AuditAction::Create,
        AuditAction::StatusChange,
        AuditAction::Download,
        AuditAction::Cancel,
        AuditAction::Delete,
        AuditAction::Expire,
        AuditAction::MembershipChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Create => "create",
            AuditAction::StatusChange => "status_change",
            AuditAction::Download => "download",
            AuditAction::Cancel => "cancel",
            AuditAction::Delete => "delete",
            AuditAction::Expire => "expire",
            AuditAction::MembershipChange => "membership_change",
        }
    }

    pub fn parse(text: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// A file's digest as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileDigest {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What the caller of [`append`] says; the chain fields are added there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// The principal id (`user:…`, `api-key:…`, `local-admin`, `system`).
    pub actor: String,
    /// Its label (an e-mail, a key's name).
    pub actor_label: String,
    #[schema(value_type = String)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<FileDigest>,
    /// Anything else worth keeping (the new status, a membership's role…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl AuditEntry {
    pub fn new(actor: &str, actor_label: &str, action: AuditAction) -> Self {
        AuditEntry {
            actor: actor.to_string(),
            actor_label: actor_label.to_string(),
            action: action.as_str().to_string(),
            ..AuditEntry::default()
        }
    }
}

/// One record of the trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    /// 1, 2, 3…: no gaps.
    pub seq: u64,
    /// When (RFC 3339, milliseconds, UTC).
    pub at: String,
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The previous record's `hash` (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 of this record without `hash`, as canonical JSON.
    pub hash: String,
}

/// The chain's start.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl AuditRecord {
    /// The hash a record with these contents must carry.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = serde_json::to_value(self).expect("a record serializes");
        unhashed.as_object_mut().expect("an object").remove("hash");
        // serde_json keeps insertion order here; sorting the keys makes the hash independent
        // of how a store happened to round-trip the document.
        let canonical = canonical_json(&unhashed);
        sha256_hex(canonical.as_bytes())
    }
}

/// JSON with object keys sorted at every level and no spaces.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let members: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// Which records a page of the trail shows.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub study_id: Option<String>,
    pub job_id: Option<String>,
    /// An actor id or label.
    pub actor: Option<String>,
    pub action: Option<AuditAction>,
    /// RFC 3339 bounds on `at`, inclusive.
    pub from: Option<String>,
    pub to: Option<String>,
    pub page: u64,
    pub page_size: u64,
}

impl AuditQuery {
    pub fn selects(&self, r: &AuditRecord) -> bool {
        self.study_id
            .as_ref()
            .is_none_or(|s| r.entry.study_id.as_ref() == Some(s))
            && self
                .job_id
                .as_ref()
                .is_none_or(|j| r.entry.job_id.as_ref() == Some(j))
            && self
                .actor
                .as_ref()
                .is_none_or(|a| r.entry.actor == *a || r.entry.actor_label == *a)
            && self.action.is_none_or(|a| r.entry.action == a.as_str())
            && self
                .from
                .as_ref()
                .is_none_or(|f| r.at.as_str() >= f.as_str())
            && self.to.as_ref().is_none_or(|t| r.at.as_str() <= t.as_str())
    }
}

/// Where records are kept.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// The record with the highest sequence number.
    async fn last_record(&self) -> StoreResult<Option<AuditRecord>>;
    /// Writes `record` if no record has its `seq` yet; returns whether it did.
    async fn insert_record(&self, record: &AuditRecord) -> StoreResult<bool>;
    /// The records `query` selects, newest first, one page, and how many in all.
    async fn records(&self, query: &AuditQuery) -> StoreResult<(Vec<AuditRecord>, u64)>;
    /// Every record in sequence order (for verification).
    async fn all_records(&self) -> StoreResult<Vec<AuditRecord>>;
}

/// Appends `entry` at the end of the chain, retrying when another writer took the place.
pub async fn append(log: &dyn AuditLog, entry: AuditEntry) -> StoreResult<AuditRecord> {
    for _ in 0..50 {
        let last = log.last_record().await?;
        let (seq, prev_hash) = match &last {
            Some(r) => (r.seq + 1, r.hash.clone()),
            None => (1, GENESIS.to_string()),
        };
        let mut record = AuditRecord {
            seq,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            entry: entry.clone(),
            prev_hash,
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        if log.insert_record(&record).await? {
            return Ok(record);
        }
    }
    Err(export_core::StoreError::new(
        "audit: could not take a place in the chain after 50 attempts",
    ))
}

/// Why a chain does not verify: the first record (by position) that does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The sequence number expected at that position.
    pub expected_seq: u64,
    /// The record found there, if any.
    pub found_seq: Option<u64>,
    pub reason: String,
}

/// Checks the chain: sequence numbers 1, 2, 3… without gaps, each record's hash over its own
/// contents, each `prev_hash` the hash of the record before.
pub fn verify(records: &[AuditRecord]) -> Result<u64, ChainBreak> {
    let mut prev = GENESIS.to_string();
    for (i, record) in records.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        let broken = |reason: &str| ChainBreak {
            expected_seq,
            found_seq: Some(record.seq),
            reason: reason.to_string(),
        };
        if record.seq != expected_seq {
            return Err(broken(
                "the sequence number is out of place (a record was deleted or reordered)",
            ));
        }
        if record.prev_hash != prev {
            return Err(broken(
                "prev_hash is not the previous record's hash (a record before it was changed, deleted or reordered)",
            ));
        }
        if record.compute_hash() != record.hash {
            return Err(broken(
                "the record's contents do not match its hash (it was edited)",
            ));
        }
        prev = record.hash.clone();
    }
    Ok(records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for seq in 1..=n {
            let prev_hash = out.last().map_or(GENESIS.to_string(), |r| r.hash.clone());
            let mut record = AuditRecord {
                seq,
                at: format!("2026-01-01T00:00:0{seq}.000Z"),
                entry: AuditEntry::new("user:x", "ana@example.org", AuditAction::Create),
                prev_hash,
                hash: String::new(),
            };
            record.hash = record.compute_hash();
            out.push(record);
        }
        out
    }

    #[test]
    fn an_intact_chain_verifies_and_every_tampering_is_named() {
        assert_eq!(verify(&chain(5)), Ok(5));
        // Edited.
        let mut edited = chain(5);
        edited[2].entry.actor_label = "mallory".into();
        assert_eq!(verify(&edited).unwrap_err().expected_seq, 3);
        // Edited and rehashed: the next record's prev_hash no longer fits.
        let mut rehashed = chain(5);
        rehashed[2].entry.actor_label = "mallory".into();
        rehashed[2].hash = rehashed[2].compute_hash();
        assert_eq!(verify(&rehashed).unwrap_err().expected_seq, 4);
        // Deleted.
        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(verify(&deleted).unwrap_err().expected_seq, 2);
        // Reordered.
        let mut reordered = chain(5);
        reordered.swap(3, 4);
        assert_eq!(verify(&reordered).unwrap_err().expected_seq, 4);
        // The last one deleted cannot be seen from the chain alone; the count tells.
        let mut truncated = chain(5);
        truncated.pop();
        assert_eq!(verify(&truncated), Ok(4));
    }

    #[test]
    fn the_hash_does_not_depend_on_key_order() {
        let r = chain(1).remove(0);
        let text = serde_json::to_string(&r).unwrap();
        let mut value: Value = serde_json::from_str(&text).unwrap();
        // Rebuild the object in reverse key order.
        let map = value.as_object().unwrap().clone();
        let mut reversed = serde_json::Map::new();
        for (k, v) in map.into_iter().rev() {
            reversed.insert(k, v);
        }
        value = Value::Object(reversed);
        let back: AuditRecord = serde_json::from_value(value).unwrap();
        assert_eq!(back.compute_hash(), r.hash);
    }
}
