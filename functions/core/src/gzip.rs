//! On-the-fly gzip of a streamed download (`Accept-Encoding: gzip`), chunk by chunk, so memory
//! does not grow with the file.

use crate::ports::ByteStream;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use futures_util::StreamExt;
use std::io::Write;

/// Whether an `Accept-Encoding` value allows gzip (`gzip` or `*`, with a q-value above zero).
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .find_map(|p| p.strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        (name == "gzip" || name == "x-gzip" || name == "*") && q > 0.0
    })
}

/// The gzip encoding of `input`, as a stream.
pub fn gzip_stream(input: ByteStream) -> ByteStream {
    let encoder = Some(GzEncoder::new(Vec::new(), Compression::fast()));
    Box::pin(futures_util::stream::unfold(
        (input, encoder),
        |(mut input, mut encoder)| async move {
            let active = encoder.as_mut()?;
            loop {
                match input.next().await {
                    Some(Ok(chunk)) => {
                        if let Err(e) = active.write_all(&chunk) {
                            return Some((Err(e), (input, None)));
                        }
                        let out = std::mem::take(active.get_mut());
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (input, encoder)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (input, None))),
                    None => {
                        let last = encoder.take().expect("encoder").finish().map(Bytes::from);
                        return Some((last, (input, None)));
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn reads_accept_encoding() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip(""));
    }

    #[tokio::test]
    async fn round_trips() {
        let chunks: Vec<std::io::Result<Bytes>> = (0..50)
            .map(|i| Ok(Bytes::from(format!("{{\"line\":{i}}}\n"))))
            .collect();
        let mut stream = gzip_stream(Box::pin(futures_util::stream::iter(chunks)));
        let mut compressed = Vec::new();
        while let Some(chunk) = stream.next().await {
            compressed.extend_from_slice(&chunk.unwrap());
        }
        let mut text = String::new();
        GzDecoder::new(&compressed[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 50);
        assert!(text.ends_with("{\"line\":49}\n"));
    }
}
