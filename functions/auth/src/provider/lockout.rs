//! Guessing passwords: at most [`MAX_FAILURES`] failed sign-ins per e-mail address in
//! [`WINDOW_SECONDS`]. Addresses that do not exist are counted like those that do, so a refusal
//! says nothing about who has an account. Each attempt is counted as a failure before its
//! password is checked (and forgiven if it succeeds), so parallel guesses cannot slip past the
//! limit while the first ones are still hashing. Kept in memory: the local server is one process.

use std::collections::HashMap;
use std::sync::Mutex;

pub const MAX_FAILURES: usize = 5;
pub const WINDOW_SECONDS: i64 = 15 * 60;
/// Addresses remembered at most; beyond it, those without a recent failure are forgotten.
const MAX_ADDRESSES: usize = 100_000;

/// Failed sign-ins per address (times in seconds since the epoch).
#[derive(Default)]
pub struct Lockout {
    failures: Mutex<HashMap<String, Vec<i64>>>,
}

impl Lockout {
    /// Counts an attempt for `address`: `Ok`, or `Err(seconds until the next attempt may be
    /// made)` if the address has had too many failures recently.
    pub fn attempt(&self, address: &str, now: i64) -> Result<(), i64> {
        let mut failures = self.failures.lock().expect("lockout");
        if failures.len() >= MAX_ADDRESSES {
            failures.retain(|_, times| times.iter().any(|t| now - t < WINDOW_SECONDS));
        }
        let times = failures.entry(address.to_string()).or_default();
        times.retain(|t| now - t < WINDOW_SECONDS);
        if times.len() >= MAX_FAILURES {
            let oldest = times.iter().min().copied().unwrap_or(now);
            return Err((oldest + WINDOW_SECONDS - now).max(1));
        }
        times.push(now);
        Ok(())
    }

    /// The attempt succeeded: the address starts afresh.
    pub fn succeeded(&self, address: &str) {
        self.failures.lock().expect("lockout").remove(address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_then_a_wait_per_address() {
        let lockout = Lockout::default();
        let t0 = 1_000_000;
        for i in 0..5 {
            assert_eq!(lockout.attempt("ana@example.org", t0 + i), Ok(()));
        }
        // The sixth within 15 minutes of the first is refused until the first is 15 minutes old.
        assert_eq!(lockout.attempt("ana@example.org", t0 + 10), Err(900 - 10));
        assert_eq!(lockout.attempt("ana@example.org", t0 + 899), Err(1));
        assert_eq!(
            lockout.attempt("bob@example.org", t0 + 10),
            Ok(()),
            "per address"
        );
        assert_eq!(lockout.attempt("ana@example.org", t0 + 900), Ok(()));
    }

    #[test]
    fn success_forgives() {
        let lockout = Lockout::default();
        for i in 0..4 {
            lockout.attempt("ana@example.org", i).unwrap();
        }
        lockout.attempt("ana@example.org", 5).unwrap();
        lockout.succeeded("ana@example.org");
        for i in 0..5 {
            assert_eq!(lockout.attempt("ana@example.org", 10 + i), Ok(()));
        }
        assert!(lockout.attempt("ana@example.org", 20).is_err());
    }
}
