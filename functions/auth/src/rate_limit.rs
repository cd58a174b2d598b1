//! Per-caller rate limits: a token bucket per key (client id, principal, address), in memory. On
//! AWS each Lambda instance keeps its own buckets, so the limit there is per instance; API
//! Gateway's throttling bounds the total.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Requests allowed per key: `burst` at once, refilled at `per_second`.
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(burst: u32, per_second: f64) -> Self {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(0.001),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket: `Ok`, or `Err(seconds to wait)`.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter");
        if buckets.len() > 100_000 {
            // Forget idle callers rather than grow without bound.
            let burst = self.burst;
            let rate = self.per_second;
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_burst_then_a_wait() {
        let limiter = super::RateLimiter::new(3, 0.5);
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        assert_eq!(limiter.check("a"), Err(2));
        assert!(limiter.check("b").is_ok(), "buckets are per key");
    }
}
