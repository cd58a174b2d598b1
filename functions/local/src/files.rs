//! File-system output: each part is written to `<root>/<key>.partial`, synced, then renamed to
//! `<root>/<key>`, so a crash can never leave a truncated file under a recorded key.

use async_trait::async_trait;
use bytes::Bytes;
use export_core::error::{StoreError, StoreResult};
use export_core::ports::{ByteStream, OutputStore, PartWriter};
use std::path::{Component, Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// NDJSON parts under a directory, served by this server's download route.
#[derive(Clone)]
pub struct FileOutput {
    root: PathBuf,
}

impl FileOutput {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(FileOutput {
            root: root.to_path_buf(),
        })
    }

    /// The path of `key`, refusing anything that could leave the output directory.
    fn path(&self, key: &str) -> StoreResult<PathBuf> {
        let relative = Path::new(key);
        if key.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(StoreError::new(format!("invalid output key '{key}'")));
        }
        Ok(self.root.join(relative))
    }
}

struct FilePart {
    file: tokio::io::BufWriter<tokio::fs::File>,
    partial: PathBuf,
    target: PathBuf,
}

#[async_trait]
impl PartWriter for FilePart {
    async fn write(&mut self, data: Bytes) -> StoreResult<()> {
        Ok(self.file.write_all(&data).await?)
    }

    async fn finish(mut self: Box<Self>) -> StoreResult<()> {
        self.file.flush().await?;
        self.file.get_ref().sync_data().await?;
        tokio::fs::rename(&self.partial, &self.target).await?;
        Ok(())
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        drop(self.file);
        match tokio::fs::remove_file(&self.partial).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl OutputStore for FileOutput {
    async fn create_part(&self, key: &str) -> StoreResult<Box<dyn PartWriter>> {
        let target = self.path(key)?;
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let partial = target.with_extension("ndjson.partial");
        let file = tokio::fs::File::create(&partial).await?;
        Ok(Box::new(FilePart {
            file: tokio::io::BufWriter::with_capacity(1 << 20, file),
            partial,
            target,
        }))
    }

    async fn download_url(&self, key: &str, base_url: &str) -> StoreResult<String> {
        Ok(format!("{base_url}/$export-output/{key}"))
    }

    async fn open(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        match tokio::fs::File::open(self.path(key)?).await {
            Ok(file) => Ok(Some(Box::pin(tokio_util::io::ReaderStream::with_capacity(
                file,
                256 * 1024,
            )))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_job(&self, job_id: &str) -> StoreResult<()> {
        match tokio::fs::remove_dir_all(self.path(job_id)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
