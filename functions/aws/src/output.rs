//! NDJSON parts in S3, written by streaming multipart upload and downloaded through presigned
//! URLs minted at each status poll.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream as S3Bytes;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use export_core::error::{StoreError, StoreResult};
use export_core::ports::{ByteStream, OutputStore, PartWriter};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::time::Duration;

/// Bytes buffered before one multipart part is uploaded (S3's minimum is 5 MiB).
pub const UPLOAD_PART_BYTES: usize = 8 * 1024 * 1024;
/// S3's limit on the parts of one multipart upload.
pub const S3_MAX_PARTS: u64 = 10_000;
/// The largest `MaxFileBytes`: a file of this size uploads in at most 9,900 parts of
/// [`UPLOAD_PART_BYTES`] (each part but the last is exactly that long), which leaves 1% for
/// gzip's worst-case growth of incompressible data (well under 0.1%) and for the last line,
/// which may pass the limit when it alone is bigger than a file.
pub const MAX_FILE_BYTES: u64 = UPLOAD_PART_BYTES as u64 * (S3_MAX_PARTS - S3_MAX_PARTS / 100);

/// `MaxFileBytes` as given, or why it cannot be used.
pub fn check_max_file_bytes(bytes: u64) -> Result<u64, String> {
    if bytes > MAX_FILE_BYTES {
        return Err(format!(
            "MAX_FILE_BYTES={bytes} is over {MAX_FILE_BYTES}: a file is uploaded to S3 in parts of \
             {UPLOAD_PART_BYTES} bytes, and S3 takes at most {S3_MAX_PARTS} parts per object"
        ));
    }
    Ok(bytes)
}

fn s3_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("s3: {e:?}"))
}

/// The export bucket.
#[derive(Clone)]
pub struct S3Output {
    client: Client,
    bucket: String,
    url_expiry: Duration,
    gzip: bool,
}

impl S3Output {
    /// `url_expiry` is how long a presigned download URL stays valid (at most 300 s).
    pub fn new(client: Client, bucket: impl Into<String>, url_expiry: Duration) -> Self {
        S3Output {
            client,
            bucket: bucket.into(),
            url_expiry: url_expiry.min(Duration::from_secs(300)),
            gzip: true,
        }
    }

    /// Whether objects are stored gzipped with `Content-Encoding: gzip` (the default), so that
    /// presigned downloads are compressed too. HTTP clients that send no `Accept-Encoding` accept
    /// any coding (RFC 9110 §12.5.3); turn this off for clients that cannot decode gzip.
    pub fn with_gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Every object key under `prefix`.
    async fn keys_under(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(s3_err)?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
            match out.next_continuation_token {
                Some(next) if out.is_truncated == Some(true) => token = Some(next),
                _ => return Ok(keys),
            }
        }
    }
}

/// One part being uploaded; nothing is visible under the key until `finish`.
struct S3Part {
    client: Client,
    bucket: String,
    key: String,
    buffer: BytesMut,
    upload_id: Option<String>,
    completed: Vec<CompletedPart>,
    /// Compresses what is written, when objects are stored gzipped.
    gzip: Option<GzEncoder<Vec<u8>>>,
}

impl S3Part {
    fn content_encoding(&self) -> Option<String> {
        self.gzip.as_ref().map(|_| "gzip".to_string())
    }

    async fn upload(&mut self, chunk: Bytes) -> StoreResult<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .content_type("application/fhir+ndjson")
                    .set_content_encoding(self.content_encoding())
                    .send()
                    .await
                    .map_err(s3_err)?;
                let id = out.upload_id.ok_or_else(|| s3_err("no upload id"))?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = self.completed.len() as i32 + 1;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(S3Bytes::from(chunk))
            .send()
            .await
            .map_err(s3_err)?;
        self.completed.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .build(),
        );
        Ok(())
    }
}

#[async_trait]
impl PartWriter for S3Part {
    async fn write(&mut self, data: Bytes) -> StoreResult<()> {
        match &mut self.gzip {
            Some(encoder) => {
                encoder.write_all(&data)?;
                self.buffer.extend_from_slice(encoder.get_ref());
                encoder.get_mut().clear();
            }
            None => self.buffer.extend_from_slice(&data),
        }
        while self.buffer.len() >= UPLOAD_PART_BYTES {
            let chunk = self.buffer.split_to(UPLOAD_PART_BYTES).freeze();
            self.upload(chunk).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> StoreResult<()> {
        if let Some(encoder) = self.gzip.take() {
            let tail = encoder.finish()?;
            self.buffer.extend_from_slice(&tail);
            self.gzip = Some(GzEncoder::new(Vec::new(), Compression::fast()));
        }
        let rest = self.buffer.split().freeze();
        if self.upload_id.is_none() {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .content_type("application/fhir+ndjson")
                .set_content_encoding(self.content_encoding())
                .body(S3Bytes::from(rest))
                .send()
                .await
                .map_err(s3_err)?;
            return Ok(());
        }
        if !rest.is_empty() {
            self.upload(rest).await?;
        }
        let parts = CompletedMultipartUpload::builder()
            .set_parts(Some(std::mem::take(&mut self.completed)))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(self.upload_id.as_deref().unwrap_or_default())
            .multipart_upload(parts)
            .send()
            .await
            .map_err(s3_err)?;
        Ok(())
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        if let Some(upload_id) = &self.upload_id {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(s3_err)?;
        }
        Ok(())
    }
}

#[async_trait]
impl OutputStore for S3Output {
    async fn create_part(&self, key: &str) -> StoreResult<Box<dyn PartWriter>> {
        Ok(Box::new(S3Part {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            buffer: BytesMut::new(),
            upload_id: None,
            completed: Vec::new(),
            gzip: self
                .gzip
                .then(|| GzEncoder::new(Vec::new(), Compression::fast())),
        }))
    }

    async fn download_url(&self, key: &str, _base_url: &str) -> StoreResult<String> {
        let config = PresigningConfig::expires_in(self.url_expiry).map_err(s3_err)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(s3_err)?;
        Ok(request.uri().to_string())
    }

    /// Downloads go straight to S3 through presigned URLs.
    async fn open(&self, _key: &str) -> StoreResult<Option<ByteStream>> {
        Ok(None)
    }

    /// The object's bytes, streamed from S3 and gunzipped as they arrive when it was stored
    /// gzipped (packaging a study export's ZIP reads its parts this way).
    async fn read(&self, key: &str) -> StoreResult<Option<ByteStream>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(s3_err(e)),
        };
        let gzipped = out.content_encoding() == Some("gzip");
        let body = out.body;
        let stream = futures_util::stream::unfold(
            (
                body,
                gzipped.then(|| flate2::write::GzDecoder::new(Vec::new())),
                false,
            ),
            |(mut body, mut decoder, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match body.next().await {
                        Some(Ok(chunk)) => match &mut decoder {
                            None => return Some((Ok(chunk), (body, decoder, false))),
                            Some(d) => {
                                if let Err(e) = d.write_all(&chunk) {
                                    return Some((Err(e), (body, decoder, true)));
                                }
                                let plain = std::mem::take(d.get_mut());
                                if !plain.is_empty() {
                                    return Some((Ok(Bytes::from(plain)), (body, decoder, false)));
                                }
                            }
                        },
                        Some(Err(e)) => {
                            let e = std::io::Error::other(format!("s3 read: {e}"));
                            return Some((Err(e), (body, decoder, true)));
                        }
                        None => {
                            let rest = match decoder.take() {
                                Some(d) => d.finish(),
                                None => Ok(Vec::new()),
                            };
                            return match rest {
                                Ok(rest) if rest.is_empty() => None,
                                Ok(rest) => Some((Ok(Bytes::from(rest)), (body, None, true))),
                                Err(e) => Some((Err(e), (body, None, true))),
                            };
                        }
                    }
                }
            },
        );
        Ok(Some(Box::pin(stream)))
    }

    /// A fresh presigned URL, for the API's checked download route to redirect to.
    async fn redirect_url(&self, key: &str) -> StoreResult<Option<String>> {
        self.download_url(key, "").await.map(Some)
    }

    /// Deletes a job's objects and aborts its unfinished multipart uploads.
    async fn delete_job(&self, job_id: &str) -> StoreResult<()> {
        let prefix = format!("{job_id}/");
        let uploads = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .send()
            .await
            .map_err(s3_err)?;
        for upload in uploads.uploads() {
            if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(s3_err)?;
            }
        }
        let keys = self.keys_under(&prefix).await?;
        for chunk in keys.chunks(1000) {
            let objects = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build().map_err(s3_err))
                .collect::<StoreResult<Vec<_>>>()?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(s3_err)?;
            self.client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(s3_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts of an upload of `bytes`: full parts of UPLOAD_PART_BYTES and one for the rest.
    fn parts(bytes: u64) -> u64 {
        bytes.div_ceil(UPLOAD_PART_BYTES as u64)
    }

    #[test]
    fn the_largest_file_fits_s3s_part_limit_even_when_gzip_grows_it() {
        // Deflate's stored blocks add 5 bytes per 64 KiB, plus an 18-byte gzip frame: 0.008%.
        let worst_gzip = MAX_FILE_BYTES + MAX_FILE_BYTES / 10_000 + 18;
        assert!(parts(worst_gzip) <= 10_000, "{} parts", parts(worst_gzip));
        // One more resource line of a megabyte after the limit still fits.
        assert!(parts(worst_gzip + 1024 * 1024) <= 10_000);
    }

    #[test]
    fn max_file_bytes_over_the_limit_is_refused_with_the_reason() {
        assert_eq!(check_max_file_bytes(64 * 1024 * 1024), Ok(64 * 1024 * 1024));
        assert_eq!(check_max_file_bytes(MAX_FILE_BYTES), Ok(MAX_FILE_BYTES));
        let refused = check_max_file_bytes(MAX_FILE_BYTES + 1).unwrap_err();
        assert!(refused.contains("at most 10000 parts"), "{refused}");
        // 100 GiB would need 12,800 parts.
        assert!(parts(100 << 30) > 10_000);
        assert!(check_max_file_bytes(100 << 30).is_err());
    }
}
