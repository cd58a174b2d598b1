//! Unguessable ids: a job id is the only key to its status and files.

/// A 128-bit random id from the operating system's random source, as 32 lowercase hex digits.
pub fn new_id() -> String {
    export_auth::random::hex_id()
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

/// The SHA-256 of `data` as 64 lowercase hex digits: content hashes (resource versions, stored
/// blobs, the audit chain) and keys derived from secrets.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_of_the_empty_string() {
        assert_eq!(
            super::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn ids_differ() {
        let a = super::new_id();
        let b = super::new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
