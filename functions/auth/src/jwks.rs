//! JWK Sets from URLs (a client's registered JWKS URL, an OpenID issuer's `jwks_uri`), fetched
//! over HTTPS and cached for a few minutes; fetched again once when a token names a key the
//! cached set lacks, which is how key rotation shows.

use crate::ports::JwksFetcher;
use async_trait::async_trait;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a fetched set is used before it is fetched again.
const TTL: Duration = Duration::from_secs(300);
/// The least time between two fetches of one URL, so tokens naming unknown keys cannot make the
/// service hammer a client's server.
const MIN_REFRESH: Duration = Duration::from_secs(10);

/// Cached JWK Sets by URL.
pub struct JwksCache {
    fetcher: Arc<dyn JwksFetcher>,
    entries: Mutex<HashMap<String, (Instant, Value)>>,
}

impl JwksCache {
    pub fn new(fetcher: Arc<dyn JwksFetcher>) -> Self {
        JwksCache {
            fetcher,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The set at `url`; with `kid`, fetched again (at most every 10 s) if it lacks that key.
    pub async fn get(&self, url: &str, kid: Option<&str>) -> Result<Value, String> {
        let cached = self.entries.lock().expect("jwks cache").get(url).cloned();
        if let Some((fetched, set)) = &cached {
            let has_kid = kid.is_none_or(|kid| has_key(set, kid));
            let fresh = fetched.elapsed() < TTL;
            if (fresh && has_kid) || fetched.elapsed() < MIN_REFRESH {
                return Ok(set.clone());
            }
        }
        let set = self.fetcher.fetch(url).await?;
        if !set.get("keys").is_some_and(Value::is_array) {
            return Err(format!("{url} does not serve a JWK Set"));
        }
        self.entries
            .lock()
            .expect("jwks cache")
            .insert(url.to_string(), (Instant::now(), set.clone()));
        Ok(set)
    }
}

fn has_key(set: &Value, kid: &str) -> bool {
    set["keys"]
        .as_array()
        .is_some_and(|keys| keys.iter().any(|k| k["kid"].as_str() == Some(kid)))
}

/// Whether a URL may be fetched: `https`, or `http` to a loopback host (development and tests).
pub fn fetchable(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// Fetches JWK Sets with a blocking HTTP client on the blocking pool: small, bounded, no
/// redirects (a redirect could point anywhere), 5 s timeout.
pub struct HttpJwksFetcher;

#[async_trait]
impl JwksFetcher for HttpJwksFetcher {
    async fn fetch(&self, url: &str) -> Result<Value, String> {
        if !fetchable(url) {
            return Err(format!("{url} is not an https URL"));
        }
        let url = url.to_string();
        tokio::task::spawn_blocking(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .redirects(0)
                .build();
            let response = agent
                .get(&url)
                .set("Accept", "application/json")
                .call()
                .map_err(|e| format!("could not fetch {url}: {}", short_error(&e)))?;
            let mut body = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(response.into_reader(), 256 * 1024),
                &mut body,
            )
            .map_err(|_| format!("could not read {url}"))?;
            serde_json::from_slice(&body).map_err(|_| format!("{url} did not answer JSON"))
        })
        .await
        .map_err(|_| "the JWKS fetch was interrupted".to_string())?
    }
}

fn short_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP {code}"),
        ureq::Error::Transport(t) => t.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_https_or_loopback_http() {
        for (url, ok) in [
            ("https://example.org/jwks.json", true),
            ("http://127.0.0.1:8080/jwks", true),
            ("http://localhost/jwks", true),
            ("http://[::1]:9/jwks", true),
            ("http://example.org/jwks.json", false),
            ("http://127.0.0.1.example.org/jwks", false),
            ("file:///etc/passwd", false),
            ("ftp://x", false),
        ] {
            assert_eq!(super::fetchable(url), ok, "{url}");
        }
    }
}
