//! Randomness from the operating system, for everything that must not be guessed: job ids, API
//! keys, token ids, signing keys.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `N` random bytes from the OS. The OS source does not fail on the platforms this runs on; if
/// it did, carrying on with predictable bytes would be worse than stopping.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the operating system's random source failed");
    out
}

/// 128 random bits as 32 lowercase hex digits.
pub fn hex_id() -> String {
    bytes::<16>().iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` random bytes, base64url without padding.
pub fn token<const N: usize>() -> String {
    URL_SAFE_NO_PAD.encode(bytes::<N>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_random_and_well_formed() {
        let (a, b) = (super::hex_id(), super::hex_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(super::token::<32>().len(), 43);
    }
}
