//! The request log: one line per request, written when its response body has been sent, so a
//! download's line carries the bytes that really went out and the time it took.
//!
//! A line holds what an operator needs and nothing a request may carry about patients: the route
//! template (`/fhir/$export-status/{id}`), never the path's values, query strings, bodies or
//! resource content.

use bytes::Bytes;
use export_core::ports::ByteStream;
use futures_core::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Where the request log goes (`RUST_LOG=request=off` silences it).
pub const TARGET: &str = "request";

/// What the log line of one request says, filled in while it is answered.
#[derive(Debug)]
pub struct RequestRecord {
    pub request_id: String,
    pub method: String,
    /// The route template, e.g. `/fhir/Group/{id}/$export`.
    pub route: String,
    pub status: u16,
    /// The export the request is about, where there is one.
    pub export_id: Option<String>,
    /// The file a download sent (`<type>/<file>`).
    pub file: Option<String>,
    /// Who asked (a principal id such as `client:<id>`; never a credential).
    pub principal: Option<String>,
    started: Instant,
}

impl RequestRecord {
    pub fn new(request_id: String, method: &http::Method) -> Self {
        RequestRecord {
            request_id,
            method: method.to_string(),
            route: String::new(),
            status: 0,
            export_id: None,
            file: None,
            principal: None,
            started: Instant::now(),
        }
    }

    /// Notes the export the request is about. Only values shaped like this service's ids are
    /// kept: a path segment is client input and must not smuggle anything else into the log.
    pub fn set_export_id(&mut self, id: &str) {
        if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            self.export_id = Some(id.to_string());
        }
    }

    /// Writes the line, with the body bytes sent.
    pub fn finish(self, bytes: u64) {
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            method = %self.method,
            route = %self.route,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes,
            export_id = self.export_id.as_deref(),
            file = self.file.as_deref(),
            principal = self.principal.as_deref(),
            "request"
        );
    }
}

/// A streamed body that counts what it sends and writes the request's line when it is dropped:
/// after the last byte, or when the client went away mid-download.
pub struct LoggedStream {
    inner: ByteStream,
    bytes: u64,
    record: Option<RequestRecord>,
}

impl LoggedStream {
    pub fn new(inner: ByteStream, record: RequestRecord) -> Self {
        LoggedStream {
            inner,
            bytes: 0,
            record: Some(record),
        }
    }
}

impl Stream for LoggedStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &polled {
            self.bytes += chunk.len() as u64;
        }
        polled
    }
}

impl Drop for LoggedStream {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.bytes);
        }
    }
}
