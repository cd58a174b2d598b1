//! Cutting an object into chunks that import in parallel, and the rule that gives every line to
//! exactly one chunk.
//!
//! Plain NDJSON is cut into byte ranges `[start, end)`. A range rarely begins on a line, so a
//! chunk owns the lines that *start* in `(first newline at or after start, first newline at or
//! after end]`: it skips to just after the first newline at or after `start` (the first chunk
//! skips nothing) and reads on until it has read the line that holds the first newline at or
//! after `end`. The chunk before stops at that same newline, so no line is read twice or missed,
//! whatever the ranges and line lengths.
//!
//! Gzip objects and Bundles are one chunk each: a DEFLATE stream cannot be entered in the middle
//! (decoding byte n needs every byte before it), and a Bundle is one JSON document whose
//! `urn:uuid:` references are resolved across its entries.

use export_core::load::FileKind;

/// One chunk of an object: its index and byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: u32,
    pub start: u64,
    pub end: u64,
}

/// The chunks of an object of `size` bytes.
pub fn plan(size: u64, kind: FileKind, chunk_bytes: u64) -> Vec<Chunk> {
    let splittable = kind == FileKind::Ndjson;
    let step = chunk_bytes.max(1);
    if !splittable || size <= step {
        return vec![Chunk {
            index: 0,
            start: 0,
            end: size,
        }];
    }
    (0..size.div_ceil(step))
        .map(|i| Chunk {
            index: i as u32,
            start: i * step,
            end: ((i + 1) * step).min(size),
        })
        .collect()
}

impl Chunk {
    /// Whether the chunk begins by skipping the rest of the line its range starts in.
    pub fn skips_first_fragment(&self) -> bool {
        self.start > 0
    }

    /// Whether a line starting at byte `line_start` (after the skipped fragment) is this chunk's:
    /// the line that holds the first newline at or after `end` starts at or before `end`.
    pub fn owns(&self, line_start: u64) -> bool {
        line_start <= self.end
    }
}

/// Splits a byte stream fed in pieces into lines, each with the offset of its first byte.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out.
    pos: usize,
    /// The offset of `buf[pos]` in the object.
    offset: u64,
}

impl LineSplitter {
    /// A splitter whose first byte is at `offset` of the object.
    pub fn new(offset: u64) -> Self {
        LineSplitter {
            buf: Vec::new(),
            pos: 0,
            offset,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (newline included) and its offset.
    pub fn next_line(&mut self) -> Option<(u64, Vec<u8>)> {
        let newline = self.buf[self.pos..].iter().position(|b| *b == b'\n')?;
        Some(self.take(newline + 1))
    }

    /// At the end of the stream: the last line if it has no newline.
    pub fn rest(&mut self) -> Option<(u64, Vec<u8>)> {
        (self.pos < self.buf.len()).then(|| self.take(self.buf.len() - self.pos))
    }

    /// The offset of the next byte not yet handed out.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn take(&mut self, len: usize) -> (u64, Vec<u8>) {
        let line = self.buf[self.pos..self.pos + len].to_vec();
        let start = self.offset;
        self.pos += len;
        self.offset += len as u64;
        (start, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines chunk `c` reads of `data`, fed to the splitter in pieces of `piece` bytes.
    fn lines_of(data: &[u8], c: Chunk, piece: usize) -> Vec<Vec<u8>> {
        let mut splitter = LineSplitter::new(c.start);
        let mut skipping = c.skips_first_fragment();
        let mut out = Vec::new();
        let mut pieces = data[c.start as usize..].chunks(piece.max(1));
        loop {
            let line = match splitter.next_line() {
                Some(line) => Some(line),
                None => match pieces.next() {
                    Some(p) => {
                        splitter.push(p);
                        continue;
                    }
                    None => splitter.rest(),
                },
            };
            let Some((start, line)) = line else { break };
            if std::mem::take(&mut skipping) {
                continue;
            }
            if !c.owns(start) {
                break;
            }
            out.push(line);
        }
        out
    }

    #[test]
    fn every_line_belongs_to_exactly_one_chunk() {
        // Lines of every length from 1 to 40 bytes (some empty, one without a final newline),
        // cut by every chunk size from 1 to 50 bytes and read in pieces of 1, 3 and 64 bytes.
        let mut data = Vec::new();
        let mut expected = Vec::new();
        for i in 0..60usize {
            let mut line = vec![b'a' + (i % 26) as u8; i % 41];
            line.push(b'\n');
            data.extend_from_slice(&line);
            expected.push(line);
        }
        data.extend_from_slice(b"tail");
        expected.push(b"tail".to_vec());
        for chunk_bytes in 1..=50u64 {
            for piece in [1, 3, 64] {
                let chunks = plan(data.len() as u64, FileKind::Ndjson, chunk_bytes);
                let read: Vec<Vec<u8>> = chunks
                    .iter()
                    .flat_map(|c| lines_of(&data, *c, piece))
                    .collect();
                assert_eq!(read, expected, "chunk size {chunk_bytes}, piece {piece}");
            }
        }
    }

    #[test]
    fn gzip_and_bundles_are_one_chunk() {
        for kind in [FileKind::NdjsonGz, FileKind::Json, FileKind::JsonGz] {
            assert_eq!(plan(1 << 30, kind, 10).len(), 1);
        }
        let chunks = plan(25, FileKind::Ndjson, 10);
        assert_eq!(
            chunks.iter().map(|c| (c.start, c.end)).collect::<Vec<_>>(),
            vec![(0, 10), (10, 20), (20, 25)]
        );
        assert_eq!(plan(0, FileKind::Ndjson, 10).len(), 1);
    }
}
