//! Webhooks: when a job completes or fails, the study's webhook (if it has one) is called with
//! the job's summary, signed per the Standard Webhooks convention (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`), and retried with
//! exponential backoff for a day. Deliveries wait in an outbox, so a crash loses none; every
//! attempt is recorded. Targets must be `https` (plain `http` only to a loopback address, for
//! development); redirects are never followed.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use export_core::StoreResult;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use utoipa::ToSchema;

/// Waits between attempts: 5 s, 1 min, 5 min, 30 min, 2 h, 5 h, 8 h, 8 h — about a day in all.
pub const BACKOFF_SECONDS: [i64; 8] = [5, 60, 300, 1800, 7200, 18_000, 28_800, 28_800];
/// A delivery is given up a day after it was queued.
pub const GIVE_UP_AFTER_MS: i64 = 24 * 3600 * 1000;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    /// The target answered 2xx.
    Delivered,
    /// Given up after a day of failures.
    Failed,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// Milliseconds since the epoch.
    pub at: i64,
    /// The HTTP status answered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed (a transport error or a non-2xx status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One message to one study's webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// `msg_…`: the `webhook-id`, the same on every attempt (receivers deduplicate on it).
    pub id: String,
    pub study_id: String,
    pub job_id: String,
    pub url: String,
    /// `export.completed` or `export.failed`.
    pub event: String,
    pub payload: Value,
    pub status: DeliveryStatus,
    /// Milliseconds since the epoch.
    pub created: i64,
    pub next_attempt: i64,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
}

impl Delivery {
    /// Records an attempt's outcome and plans the next (or gives up).
    pub fn record(&mut self, attempt: Attempt) {
        let ok = attempt.status.is_some_and(|s| (200..300).contains(&s));
        let at = attempt.at;
        self.attempts.push(attempt);
        if ok {
            self.status = DeliveryStatus::Delivered;
            return;
        }
        let wait = BACKOFF_SECONDS[(self.attempts.len() - 1).min(BACKOFF_SECONDS.len() - 1)];
        let next = at + wait * 1000;
        if next - self.created > GIVE_UP_AFTER_MS {
            self.status = DeliveryStatus::Failed;
        } else {
            self.next_attempt = next;
        }
    }
}

/// The outbox.
#[async_trait]
pub trait WebhookOutbox: Send + Sync {
    async fn enqueue(&self, delivery: &Delivery) -> StoreResult<()>;
    /// Pending deliveries due by `now` (ms).
    async fn due(&self, now: i64) -> StoreResult<Vec<Delivery>>;
    async fn update_delivery(&self, delivery: &Delivery) -> StoreResult<()>;
    /// A study's deliveries, newest first.
    async fn deliveries(&self, study_id: &str, limit: usize) -> StoreResult<Vec<Delivery>>;
}

/// Sends one signed POST; returns the HTTP status, or why there was none.
#[async_trait]
pub trait WebhookSender: Send + Sync {
    async fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<u16, String>;
}

/// A new signing secret: `whsec_` and 24 random bytes in base64.
pub fn new_secret() -> String {
    format!(
        "whsec_{}",
        STANDARD.encode(export_auth::random::bytes::<24>())
    )
}

/// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256, keyed with the secret's
/// bytes (after `whsec_`), of `{id}.{timestamp}.{body}`.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "the webhook secret is not base64".to_string())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The headers of one attempt.
pub fn signed_headers(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    Ok(vec![
        ("content-type".into(), "application/json".into()),
        ("webhook-id".into(), id.to_string()),
        ("webhook-timestamp".into(), timestamp.to_string()),
        (
            "webhook-signature".into(),
            signature(secret, id, timestamp, body)?,
        ),
    ])
}

/// Whether a webhook may target `url`: `https`, or `http` to a loopback host.
pub fn allowed_target(url: &str) -> bool {
    export_auth::jwks::fetchable(url)
}

/// Sends webhooks with a blocking HTTP client on the blocking pool: 10 s timeout, redirects never
/// followed (a redirect could send the signed payload anywhere).
pub struct HttpWebhookSender;

#[async_trait]
impl WebhookSender for HttpWebhookSender {
    async fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<u16, String> {
        let (url, headers, body) = (url.to_string(), headers.to_vec(), body.to_vec());
        tokio::task::spawn_blocking(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(10))
                .redirects(0)
                .build();
            let mut request = agent.post(&url);
            for (name, value) in &headers {
                request = request.set(name, value);
            }
            match request.send_bytes(&body) {
                Ok(response) => Ok(response.status()),
                Err(ureq::Error::Status(code, _)) => Ok(code),
                Err(ureq::Error::Transport(t)) => Err(t.kind().to_string()),
            }
        })
        .await
        .map_err(|_| "the webhook call was interrupted".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example.
    #[test]
    fn signatures_follow_standard_webhooks() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn deliveries_back_off_for_a_day_then_give_up() {
        let mut d = Delivery {
            id: "msg_1".into(),
            study_id: "s".into(),
            job_id: "j".into(),
            url: "https://x".into(),
            event: "export.completed".into(),
            payload: Value::Null,
            status: DeliveryStatus::Pending,
            created: 0,
            next_attempt: 0,
            attempts: vec![],
        };
        let mut at = 0;
        let mut waits = Vec::new();
        while d.status == DeliveryStatus::Pending {
            d.record(Attempt {
                at,
                status: Some(500),
                error: None,
            });
            if d.status == DeliveryStatus::Pending {
                waits.push((d.next_attempt - at) / 1000);
                at = d.next_attempt;
            }
        }
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(&waits[..5], &[5, 60, 300, 1800, 7200]);
        assert!(
            at <= GIVE_UP_AFTER_MS && at > GIVE_UP_AFTER_MS / 2,
            "about a day: {at}"
        );
        let mut ok = d.clone();
        ok.status = DeliveryStatus::Pending;
        ok.record(Attempt {
            at,
            status: Some(204),
            error: None,
        });
        assert_eq!(ok.status, DeliveryStatus::Delivered);
    }

    #[test]
    fn only_https_or_loopback_targets() {
        assert!(allowed_target("https://hooks.example.org/x"));
        assert!(allowed_target("http://127.0.0.1:9000/hook"));
        assert!(!allowed_target("http://hooks.example.org/x"));
    }
}
