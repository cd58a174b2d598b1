//! Unguessable ids: a job id is the only key to its status and files.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A 128-bit random id as 32 lowercase hex digits.
///
/// `RandomState` is seeded from the operating system's randomness; two independently keyed
/// SipHash outputs over a counter and the clock give 128 unpredictable bits without another crate.
pub fn new_id() -> String {
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let half = |state: RandomState| {
        let mut h = state.build_hasher();
        h.write_u64(count);
        h.write_u128(nanos);
        h.finish()
    };
    format!(
        "{:016x}{:016x}",
        half(RandomState::new()),
        half(RandomState::new())
    )
}

/// A stable 64-bit FNV-1a digest as 16 hex digits: the same input gives the same digest in every
/// process and version (unlike `std`'s hashers), so Lambdas can compare kick-off fingerprints.
pub fn stable_digest(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ() {
        let a = super::new_id();
        let b = super::new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
