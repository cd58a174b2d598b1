//! Writing a job's files into the output store: one file at a time, streamed, each with its
//! SHA-256 computed as it goes; and ZIPs of several files (a FHIR export's NDJSON parts, the
//! dashboard's files) assembled by streaming each member from the store into the archive, so no
//! file is ever held in memory whole.

use crate::jobs::JobFile;
use bytes::Bytes;
use export_core::ports::{OutputStore, PartWriter};
use export_core::{StoreError, StoreResult};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// A file being written: its bytes go to the store, its size and digest are kept.
pub struct FileWriter {
    writer: Box<dyn PartWriter>,
    hasher: Sha256,
    size: u64,
    name: String,
    key: String,
    content_type: String,
}

impl FileWriter {
    pub async fn create(
        output: &dyn OutputStore,
        key: &str,
        name: &str,
        content_type: &str,
    ) -> StoreResult<FileWriter> {
        Ok(FileWriter {
            writer: output.create_part(key).await?,
            hasher: Sha256::new(),
            size: 0,
            name: name.to_string(),
            key: key.to_string(),
            content_type: content_type.to_string(),
        })
    }

    pub async fn write(&mut self, data: Vec<u8>) -> StoreResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(&data);
        self.size += data.len() as u64;
        self.writer.write(Bytes::from(data)).await
    }

    /// Makes the file visible under its key and returns its record.
    pub async fn finish(self) -> StoreResult<JobFile> {
        self.writer.finish().await?;
        Ok(JobFile {
            name: self.name,
            key: self.key,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
            content_type: self.content_type,
        })
    }

    pub async fn abort(self) -> StoreResult<()> {
        self.writer.abort().await
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes one file whole (small files: a report, a dashboard's JSON).
pub async fn write_file(
    output: &dyn OutputStore,
    key: &str,
    name: &str,
    content_type: &str,
    data: Vec<u8>,
) -> StoreResult<JobFile> {
    let mut file = FileWriter::create(output, key, name, content_type).await?;
    file.write(data).await?;
    file.finish().await
}

/// A `Write` whose bytes are taken out between writes and sent on to the store.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().expect("buffer"))
    }
}

fn zip_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(format!("zip: {e}"))
}

/// One member of a ZIP: its name in the archive, and where its bytes are (a stored file) or
/// the bytes themselves.
pub enum Member {
    Stored { name: String, key: String },
    Bytes { name: String, data: Vec<u8> },
}

/// Assembles `members` into one ZIP under `key`, streaming each stored member from the output
/// store (deflated), and returns the ZIP's record.
pub async fn zip(
    output: &dyn OutputStore,
    key: &str,
    name: &str,
    members: Vec<Member>,
) -> StoreResult<JobFile> {
    let buffer = Shared::default();
    let mut archive = zip::ZipWriter::new_stream(buffer.clone());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    let mut file = FileWriter::create(output, key, name, "application/zip").await?;
    for member in members {
        match member {
            Member::Bytes { name, data } => {
                archive.start_file(name, options).map_err(zip_err)?;
                archive.write_all(&data).map_err(zip_err)?;
            }
            Member::Stored { name, key } => {
                archive.start_file(name, options).map_err(zip_err)?;
                let mut stream = output
                    .read(&key)
                    .await?
                    .ok_or_else(|| StoreError::new(format!("zip: {key} is missing")))?;
                while let Some(chunk) = stream.next().await {
                    archive.write_all(&chunk?).map_err(zip_err)?;
                    file.write(buffer.take()).await?;
                }
            }
        }
        file.write(buffer.take()).await?;
    }
    archive.finish().map_err(zip_err)?;
    file.write(buffer.take()).await?;
    file.finish().await
}
