//! What does not fit in a DynamoDB item (400 KB) lives in S3: a version's body when it is too
//! big to be copied into its version item and compartment entries, and its patient list when it
//! names so many patients (a large Group) that copying it into every entry would grow with the
//! square of the group. Items then carry the object's bucket and key instead.
//!
//! Objects are named by the SHA-256 of their content, so they never change once written: two
//! writers racing for the same version cannot leave an item pointing at the other's body.

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::ids::sha256_hex;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A body longer than this, or whose copies (version item plus one per compartment entry) would
/// pass [`COPIES_BUDGET`], goes to S3.
pub const BODY_INLINE_MAX: usize = 300 * 1024;
/// Bytes of body copies one version may write inline (a transaction takes at most 4 MB).
pub const COPIES_BUDGET: usize = 384 * 1024;
/// A version in more patients' compartments than this keeps its patient list in S3, and its
/// compartment entries take their superseded mark from its history item: its own items and the
/// marks of the version it replaces then fit in one transaction (3 + 40 + 2 + 40 of 100 actions).
pub const PATIENTS_INLINE_MAX: usize = 40;
/// Patient lists kept in memory by one process before the cache is cleared.
const PATIENT_LISTS_CACHED: usize = 64;

fn s3_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("s3: {e:?}"))
}

/// Whether a body of `len` bytes, copied into `copies` items, is stored inline.
pub fn body_inline(len: usize, copies: usize) -> bool {
    len <= BODY_INLINE_MAX && len.saturating_mul(copies.max(1)) <= COPIES_BUDGET
}

/// Where a big body or patient list is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub bucket: String,
    pub key: String,
}

/// Reads and writes the objects; remembers the patient lists it read.
pub struct Blobs {
    client: Client,
    patient_lists: Mutex<HashMap<String, Arc<Vec<String>>>>,
}

impl Blobs {
    pub fn new(client: Client) -> Self {
        Blobs {
            client,
            patient_lists: Mutex::new(HashMap::new()),
        }
    }

    /// The key of a resource's body or patient list with this content.
    pub fn key(resource_type: &str, id: &str, what: &str, content: &[u8]) -> String {
        format!(
            "resources/{resource_type}/{id}/{}.{what}.json",
            sha256_hex(content)
        )
    }

    pub async fn put(&self, blob: &BlobRef, content: Bytes) -> StoreResult<()> {
        self.client
            .put_object()
            .bucket(&blob.bucket)
            .key(&blob.key)
            .content_type("application/json")
            .body(ByteStream::from(content))
            .send()
            .await
            .map_err(s3_err)?;
        Ok(())
    }

    pub async fn get(&self, blob: &BlobRef) -> StoreResult<Bytes> {
        let out = self
            .client
            .get_object()
            .bucket(&blob.bucket)
            .key(&blob.key)
            .send()
            .await
            .map_err(s3_err)?;
        Ok(out.body.collect().await.map_err(s3_err)?.into_bytes())
    }

    /// A patient list kept in S3 (a JSON array of ids), read once per process.
    pub async fn patients(&self, blob: &BlobRef) -> StoreResult<Arc<Vec<String>>> {
        if let Some(list) = self.patient_lists.lock().expect("cache").get(&blob.key) {
            return Ok(list.clone());
        }
        let list: Arc<Vec<String>> = Arc::new(serde_json::from_slice(&self.get(blob).await?)?);
        let mut cache = self.patient_lists.lock().expect("cache");
        if cache.len() >= PATIENT_LISTS_CACHED {
            cache.clear();
        }
        cache.insert(blob.key.clone(), list.clone());
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_stay_inline_only_while_every_copy_fits() {
        assert!(body_inline(1_000, 3));
        assert!(body_inline(BODY_INLINE_MAX, 1));
        assert!(!body_inline(BODY_INLINE_MAX + 1, 1));
        // A 200 KB body in two compartments would write 600 KB of copies.
        assert!(!body_inline(200 * 1024, 3));
        assert!(body_inline(6 * 1024, 1 + PATIENTS_INLINE_MAX));
    }

    #[test]
    fn keys_name_the_content() {
        let a = Blobs::key("Binary", "b1", "body", b"one");
        assert_eq!(a, Blobs::key("Binary", "b1", "body", b"one"));
        assert_ne!(a, Blobs::key("Binary", "b1", "body", b"two"));
        assert!(a.starts_with("resources/Binary/b1/") && a.ends_with(".body.json"));
    }
}
