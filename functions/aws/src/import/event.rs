//! What arrives on the import queue: S3's announcement of new objects (as S3 sends it to SQS),
//! S3's test event, or one of the importer's own chunk messages.

use serde::{Deserialize, Serialize};

/// A message of the import queue.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportMessage {
    /// New objects (one S3 event may carry several records).
    Objects(Vec<PutObject>),
    /// A chunk of an object to import (or to go on importing).
    Chunk(ChunkMessage),
    /// S3's `s3:TestEvent`, sent when the notification is configured: nothing to do.
    Test,
}

/// An object S3 announced.
#[derive(Debug, Clone, PartialEq)]
pub struct PutObject {
    pub bucket: String,
    /// The key, decoded (S3 URL-encodes it in events).
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// When the object was put (milliseconds since the epoch): resources without
    /// `meta.lastUpdated` get this, so every delivery of the object gives them the same one.
    pub time_ms: i64,
}

/// One chunk of one object. The message never changes: progress is recorded in the chunk's item,
/// so a redelivery, a duplicate and a continuation are the same message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkMessage {
    pub import_id: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    /// Names the object's version (key and ETag) in the job's items and error parts.
    pub file_id: String,
    pub size: u64,
    pub index: u32,
    /// The chunk's byte range (see [`super::chunks`]).
    pub start: u64,
    pub end: u64,
    pub time_ms: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChunkEnvelope {
    import_chunk: ChunkMessage,
}

/// Wraps a chunk for the queue.
pub fn chunk_body(chunk: &ChunkMessage) -> String {
    serde_json::to_string(&ChunkEnvelope {
        import_chunk: chunk.clone(),
    })
    .expect("a chunk message serializes")
}

#[derive(Deserialize)]
struct S3Event {
    #[serde(rename = "Records")]
    records: Vec<S3Record>,
}

#[derive(Deserialize)]
struct S3Record {
    #[serde(rename = "eventName", default)]
    event_name: String,
    #[serde(rename = "eventTime", default)]
    event_time: String,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: S3Bucket,
    object: S3Object,
}

#[derive(Deserialize)]
struct S3Bucket {
    name: String,
}

#[derive(Deserialize)]
struct S3Object {
    key: String,
    #[serde(default)]
    size: u64,
    #[serde(rename = "eTag", default)]
    etag: String,
}

/// Reads a queue message body.
pub fn parse(body: &str) -> Result<ImportMessage, String> {
    if let Ok(envelope) = serde_json::from_str::<ChunkEnvelope>(body) {
        return Ok(ImportMessage::Chunk(envelope.import_chunk));
    }
    if let Ok(event) = serde_json::from_str::<S3Event>(body) {
        let objects = event
            .records
            .into_iter()
            // Only new objects start imports (deletions and restores do not).
            .filter(|r| r.event_name.starts_with("ObjectCreated:"))
            .map(|r| PutObject {
                bucket: r.s3.bucket.name,
                key: decode_key(&r.s3.object.key),
                size: r.s3.object.size,
                etag: r.s3.object.etag.trim_matches('"').to_string(),
                time_ms: export_core::fhir::time::parse_instant(&r.event_time)
                    .map(|t| t.timestamp_millis())
                    .unwrap_or_else(|_| chrono::Utc::now().timestamp_millis()),
            })
            .collect();
        return Ok(ImportMessage::Objects(objects));
    }
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if value["Event"] == "s3:TestEvent" {
        return Ok(ImportMessage::Test);
    }
    Err("neither an S3 event nor a chunk message".into())
}

/// S3 event keys are URL-encoded with `+` for spaces.
fn decode_key(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The import job an object belongs to: `<name>` of `import/<name>/…`, a FHIR-id-like name (so
/// it is safe as a key part and in a command line).
pub fn import_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(super::IMPORT_PREFIX)?;
    let (name, file) = rest.split_once('/')?;
    (!file.is_empty() && export_core::load::is_valid_id(name)).then_some(name)
}

/// A short, stable name for one version of one object (key and ETag), for item keys and error
/// part keys (an S3 key can be longer than a DynamoDB sort key may be).
pub fn file_id(key: &str, etag: &str) -> String {
    let hash = key
        .bytes()
        .chain([0])
        .chain(etag.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_s3_events_as_s3_sends_them() {
        let body = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventTime":"2026-11-30T07:24:27.925Z","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"import/a+b/x%2By.ndjson","size":8,"eTag":"4588ff"}}},
            {"eventName":"ObjectRemoved:Delete","eventTime":"2026-11-30T07:24:27.925Z","s3":{"bucket":{"name":"b"},"object":{"key":"import/x/y.ndjson"}}}]}"#;
        let ImportMessage::Objects(objects) = parse(body).unwrap() else {
            panic!("objects")
        };
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].key, "import/a b/x+y.ndjson");
        assert_eq!(objects[0].size, 8);
        assert_eq!(objects[0].time_ms, 1_796_023_467_925);
        assert_eq!(
            parse(r#"{"Service":"Amazon S3","Event":"s3:TestEvent"}"#).unwrap(),
            ImportMessage::Test
        );
        assert!(parse("{}").is_err());
    }

    #[test]
    fn chunk_messages_round_trip() {
        let chunk = ChunkMessage {
            import_id: "i".into(),
            bucket: "b".into(),
            key: "import/i/a.ndjson".into(),
            etag: "e".into(),
            file_id: file_id("import/i/a.ndjson", "e"),
            size: 10,
            index: 1,
            start: 5,
            end: 10,
            time_ms: 1,
        };
        assert_eq!(
            parse(&chunk_body(&chunk)).unwrap(),
            ImportMessage::Chunk(chunk)
        );
    }

    #[test]
    fn import_names_come_from_the_first_folder() {
        assert_eq!(import_id("import/batch-1/Patient.ndjson"), Some("batch-1"));
        assert_eq!(
            import_id("import/batch-1/sub/Patient.ndjson"),
            Some("batch-1")
        );
        assert_eq!(import_id("import/Patient.ndjson"), None);
        assert_eq!(import_id("import/bad name/Patient.ndjson"), None);
        assert_eq!(import_id("import/x/"), None);
        assert_eq!(import_id("other/x/y.ndjson"), None);
        assert_ne!(file_id("a", "e1"), file_id("a", "e2"));
    }
}
