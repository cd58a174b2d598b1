//! Reading one chunk of an object as a sequence of units (an NDJSON line, or a Bundle entry),
//! with the loader's parsing rules (`export_core::load`), from where the chunk's recorded
//! progress left off.
//!
//! Plain NDJSON is streamed from a byte range and resumes at a byte offset. Gzip objects are
//! streamed through a decoder and Bundles are read whole (one JSON document); both resume by
//! skipping the units already done, which `read_json` promises come in the same order each time.

use super::chunks::{Chunk, LineSplitter};
use super::event::ChunkMessage;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use export_core::fhir::time::Instant;
use export_core::load::{FileKind, LoadIssue, parse_line, read_json};
use export_core::ports::NewResource;
use std::io::{Read, Write};

/// One line or entry.
#[derive(Debug)]
pub enum Unit {
    Resource(NewResource),
    /// An NDJSON line that cannot be loaded, and why.
    BadLine(String),
    /// A Bundle entry (or the whole document) that cannot be loaded.
    Issue {
        location: Location,
        message: String,
    },
    /// An empty line.
    Blank,
}

/// Where in an object an issue is.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// 1-based line of the object.
    Line(u64),
    /// 0-based entry of a Bundle.
    Entry(u64),
    /// The object as a whole.
    File,
}

/// Why a chunk could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Reading again cannot help; the text is fixed (no SDK text) and goes into the error file.
    Permanent(&'static str),
    /// Throttling, a dropped connection: the message is retried.
    Transient(String),
}

/// Where a chunk resumes: units already done and, for plain NDJSON, the offset after them.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    pub units: u64,
    pub offset: u64,
}

/// A chunk being read.
pub struct ChunkReader {
    inner: Inner,
    now: Instant,
    /// Units still to skip (gzip and Bundles resume by skipping).
    skip: u64,
}

// One reader per chunk in flight: the size of the line variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Lines {
        body: ByteStream,
        gzip: Option<flate2::write::MultiGzDecoder<Vec<u8>>>,
        splitter: LineSplitter,
        /// The byte range rule for plain NDJSON; `None` when the chunk is the whole object.
        chunk: Option<Chunk>,
        skipping: bool,
        stream_done: bool,
        ended: bool,
    },
    Units(std::vec::IntoIter<Unit>),
}

impl ChunkReader {
    /// Opens chunk `message` at `resume`; `now` is the `meta.lastUpdated` of resources without one.
    pub async fn open(
        s3: &aws_sdk_s3::Client,
        message: &ChunkMessage,
        resume: Resume,
        now: Instant,
    ) -> Result<ChunkReader, ReadError> {
        let kind = FileKind::of(&message.key).unwrap_or(FileKind::Json);
        let chunk = Chunk {
            index: message.index,
            start: message.start,
            end: message.end,
        };
        if kind == FileKind::Ndjson {
            let fresh = resume.units == 0;
            let offset = if fresh { chunk.start } else { resume.offset };
            if offset >= message.size {
                return Ok(ChunkReader {
                    inner: Inner::Units(Vec::new().into_iter()),
                    now,
                    skip: 0,
                });
            }
            let body = get(s3, message, Some(offset)).await?;
            return Ok(ChunkReader {
                inner: Inner::Lines {
                    body,
                    gzip: None,
                    splitter: LineSplitter::new(offset),
                    chunk: Some(chunk),
                    skipping: fresh && chunk.skips_first_fragment(),
                    stream_done: false,
                    ended: false,
                },
                now,
                skip: 0,
            });
        }
        let body = get(s3, message, None).await?;
        if kind == FileKind::NdjsonGz {
            return Ok(ChunkReader {
                inner: Inner::Lines {
                    body,
                    gzip: Some(flate2::write::MultiGzDecoder::new(Vec::new())),
                    splitter: LineSplitter::new(0),
                    chunk: None,
                    skipping: false,
                    stream_done: false,
                    ended: false,
                },
                now,
                skip: resume.units,
            });
        }
        let bytes = body
            .collect()
            .await
            .map_err(|e| ReadError::Transient(format!("s3 body: {e}")))?
            .into_bytes();
        let units = bundle_units(&bytes, kind.is_gzip(), &message.key, now)?;
        Ok(ChunkReader {
            inner: Inner::Units(units.into_iter()),
            now,
            skip: resume.units,
        })
    }

    /// The next unit, or `None` at the end of the chunk.
    pub async fn next(&mut self) -> Result<Option<Unit>, ReadError> {
        loop {
            let unit = self.next_unskipped().await?;
            if unit.is_some() && self.skip > 0 {
                self.skip -= 1;
                continue;
            }
            return Ok(unit);
        }
    }

    /// For plain NDJSON, the offset of the next line not yet returned.
    pub fn offset(&self) -> u64 {
        match &self.inner {
            Inner::Lines { splitter, .. } => splitter.offset(),
            Inner::Units(_) => 0,
        }
    }

    async fn next_unskipped(&mut self) -> Result<Option<Unit>, ReadError> {
        let now = self.now;
        let Inner::Lines {
            body,
            gzip,
            splitter,
            chunk,
            skipping,
            stream_done,
            ended,
        } = &mut self.inner
        else {
            let Inner::Units(units) = &mut self.inner else {
                unreachable!()
            };
            return Ok(units.next());
        };
        loop {
            if *ended {
                return Ok(None);
            }
            let line = match splitter.next_line() {
                Some(line) => Some(line),
                None if *stream_done => splitter.rest(),
                None => {
                    match body.next().await {
                        Some(Ok(bytes)) => match gzip {
                            Some(decoder) => {
                                decoder.write_all(&bytes).map_err(|_| NOT_GZIP)?;
                                splitter.push(&std::mem::take(decoder.get_mut()));
                            }
                            None => splitter.push(&bytes),
                        },
                        Some(Err(e)) => return Err(ReadError::Transient(format!("s3 body: {e}"))),
                        None => {
                            if let Some(decoder) = gzip {
                                decoder.try_finish().map_err(|_| NOT_GZIP)?;
                                splitter.push(&std::mem::take(decoder.get_mut()));
                            }
                            *stream_done = true;
                        }
                    }
                    continue;
                }
            };
            let Some((start, line)) = line else {
                *ended = true;
                return Ok(None);
            };
            if std::mem::take(skipping) {
                continue;
            }
            if chunk.is_some_and(|c| !c.owns(start)) {
                *ended = true;
                return Ok(None);
            }
            return Ok(Some(line_unit(&line, now)));
        }
    }
}

const NOT_GZIP: ReadError = ReadError::Permanent("the object is not valid gzip");

fn line_unit(line: &[u8], now: Instant) -> Unit {
    let Ok(text) = std::str::from_utf8(line) else {
        return Unit::BadLine("not valid UTF-8".into());
    };
    if text.trim().is_empty() {
        return Unit::Blank;
    }
    match parse_line(text, now) {
        Ok(resource) => Unit::Resource(resource),
        Err(message) => Unit::BadLine(message),
    }
}

/// A Bundle's (or single resource's) units, in `read_json`'s order.
fn bundle_units(bytes: &[u8], gzip: bool, key: &str, now: Instant) -> Result<Vec<Unit>, ReadError> {
    let mut text = Vec::new();
    let reader: &[u8] = if gzip {
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut text)
            .map_err(|_| NOT_GZIP)?;
        &text
    } else {
        bytes
    };
    let units = std::cell::RefCell::new(Vec::new());
    read_json(
        reader,
        key,
        now,
        &mut |resource| units.borrow_mut().push(Unit::Resource(resource)),
        &mut |issue| units.borrow_mut().push(issue_unit(issue, key)),
    )
    .map_err(|_| ReadError::Permanent("the object could not be read"))?;
    Ok(units.into_inner())
}

/// `read_json` names places `key:entry[i]`, `key:line` (a syntax error) or `key`.
fn issue_unit(issue: LoadIssue, key: &str) -> Unit {
    let place = issue
        .location
        .strip_prefix(key)
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or("");
    let location = if let Some(i) = place
        .strip_prefix("entry[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse().ok())
    {
        Location::Entry(i)
    } else if let Ok(line) = place.parse() {
        Location::Line(line)
    } else {
        Location::File
    };
    Unit::Issue {
        location,
        message: issue.message,
    }
}

/// GETs the object version the message names (its ETag), from `offset` if given.
async fn get(
    s3: &aws_sdk_s3::Client,
    message: &ChunkMessage,
    offset: Option<u64>,
) -> Result<ByteStream, ReadError> {
    let mut request = s3.get_object().bucket(&message.bucket).key(&message.key);
    if !message.etag.is_empty() {
        request = request.if_match(format!("\"{}\"", message.etag));
    }
    if let Some(offset) = offset {
        request = request.range(format!("bytes={offset}-"));
    }
    match request.send().await {
        Ok(out) => Ok(out.body),
        Err(e) => Err(match e.code() {
            Some("NoSuchKey" | "NoSuchBucket") => {
                ReadError::Permanent("the object no longer exists")
            }
            Some("PreconditionFailed") => ReadError::Permanent(REPLACED),
            Some("InvalidRange") => ReadError::Permanent("the object is shorter than announced"),
            _ => ReadError::Transient(format!("s3: {e:?}")),
        }),
    }
}

/// The object was overwritten before this version was read: the new version has its own event.
pub const REPLACED: &str =
    "the object was replaced before it was read; its newer version is imported instead";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_issues_keep_their_entry() {
        let bundle = br#"{"resourceType":"Bundle","type":"collection","entry":[
            {"resource":{"resourceType":"Patient","id":"p1"}},
            {"resource":{"resourceType":"Patient"}}]}"#;
        let units = bundle_units(bundle, false, "import/x/b.json", chrono::Utc::now()).unwrap();
        assert!(matches!(units[0], Unit::Resource(_)));
        assert!(matches!(
            &units[1],
            Unit::Issue {
                location: Location::Entry(1),
                ..
            }
        ));
        let broken = bundle_units(b"{\n\"resourceType\":", false, "k", chrono::Utc::now()).unwrap();
        assert!(matches!(
            &broken[0],
            Unit::Issue {
                location: Location::Line(2),
                ..
            }
        ));
    }
}
