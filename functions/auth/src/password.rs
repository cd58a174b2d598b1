//! Passwords of the local sign-in page: stored only as Argon2id hashes (PHC strings, with the
//! crate's default cost), checked in constant time. A sign-in for someone without a password
//! costs exactly as much as a wrong password, so the answer's timing does not tell who exists.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

/// Passwords shorter than this are refused when set.
pub const MIN_LENGTH: usize = 8;
/// Longer passwords are refused when set and never checked: a bound on the hashing work one
/// sign-in attempt can cause.
pub const MAX_LENGTH: usize = 1024;

/// The hash checked when there is no user (or no password) to check against: the same
/// algorithm and cost as real hashes, so the work is the same. Its password is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$gaLx0n1JmqTt7iezCZk4rA$gYgq9c7Dtp3NvRu0jrXY/eTIUT+E8N3eiwz4gRCZMkc";

/// Why a new password is refused.
pub fn check_new(password: &str) -> Result<(), String> {
    let length = password.chars().count();
    if length < MIN_LENGTH {
        return Err(format!(
            "the password is too short: use at least {MIN_LENGTH} characters"
        ));
    }
    if password.len() > MAX_LENGTH {
        return Err(format!(
            "the password is too long: use at most {MAX_LENGTH} bytes"
        ));
    }
    Ok(())
}

/// The Argon2id PHC string of `password`, with a fresh random salt.
pub fn hash(password: &str) -> String {
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &crate::random::bytes::<16>())
        .expect("Argon2id with default parameters hashes any password of bounded length")
        .to_string()
}

/// Whether `password` matches `stored`. Without a stored hash (or with one that cannot be read)
/// a dummy hash is checked, so that the work, and the time it takes, are the same; the answer is
/// then false.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    let argon2 = Argon2::default();
    if password.len() > MAX_LENGTH {
        let _ = argon2.verify_password(b"", DUMMY_HASH);
        return false;
    }
    match stored {
        Some(phc) if phc.starts_with("$argon2id$") => {
            argon2.verify_password(password.as_bytes(), phc).is_ok()
        }
        _ => {
            let _ = argon2.verify_password(password.as_bytes(), DUMMY_HASH);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let stored = hash("correct horse battery");
        assert!(
            stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{stored}"
        );
        assert!(verify("correct horse battery", Some(&stored)));
        assert!(!verify("correct horse batterY", Some(&stored)));
        assert!(!verify("", Some(&stored)));
        // A fresh salt each time: the same password never hashes alike.
        assert_ne!(stored, hash("correct horse battery"));
    }

    #[test]
    fn without_a_hash_nothing_verifies() {
        assert!(!verify("anything at all", None));
        assert!(!verify("anything at all", Some("not a PHC string")));
        assert!(!verify("anything at all", Some("$argon2id$broken")));
        // Only Argon2id: the weaker variants are not accepted even if they match.
        let argon2i = Argon2::new(
            argon2::Algorithm::Argon2i,
            argon2::Version::V0x13,
            argon2::Params::default(),
        )
        .hash_password_with_salt(b"password123", &[7u8; 16])
        .unwrap()
        .to_string();
        assert!(!verify("password123", Some(&argon2i)));
    }

    /// The dummy costs what a real hash costs: same algorithm, version and parameters as
    /// `hash` writes.
    #[test]
    fn the_dummy_hash_has_the_real_cost() {
        let real = hash("whatever password");
        let params = |phc: &str| phc.rsplitn(3, '$').nth(2).unwrap().to_string();
        assert_eq!(params(DUMMY_HASH), params(&real));
        assert!(argon2::PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn new_passwords_have_a_length_range() {
        assert!(check_new("1234567").is_err());
        assert!(check_new("12345678").is_ok());
        assert!(
            check_new("ééééééé").is_err(),
            "characters, not bytes, count"
        );
        assert!(check_new(&"x".repeat(MAX_LENGTH + 1)).is_err());
        assert!(!verify(
            &"x".repeat(MAX_LENGTH + 1),
            Some(&hash("12345678"))
        ));
    }
}
