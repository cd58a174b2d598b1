//! API keys for system integrations: 256 random bits shown once at creation; the service keeps
//! only their SHA-256, so a leaked store does not leak working keys.

use crate::ports::ApiKeyRecord;
use crate::principal::Membership;
use sha2::{Digest, Sha256};

/// Every key starts with this, so a key is recognised without a lookup (and by secret scanners).
pub const PREFIX: &str = "bek_";

/// A new key for `membership`: the key to show once, and the record to store.
pub fn create(name: &str, membership: Membership, now: i64) -> (String, ApiKeyRecord) {
    let key = format!("{PREFIX}{}", crate::random::token::<32>());
    let record = ApiKeyRecord {
        id: crate::random::hex_id()[..16].to_string(),
        name: name.to_string(),
        hash: hash(&key),
        membership,
        created: now,
        last_used: None,
        revoked: false,
    };
    (key, record)
}

/// The hex SHA-256 a key is stored and looked up by.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a credential is shaped like an API key (rather than a JWT).
pub fn is_api_key(credential: &str) -> bool {
    credential.starts_with(PREFIX) && credential.len() < 128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::Role;

    #[test]
    fn keys_are_random_and_stored_as_hashes() {
        let m = Membership::new("s1", Role::DataReviewer, vec![]).unwrap();
        let (key, record) = create("etl", m.clone(), 1);
        let (other, _) = create("etl", m, 1);
        assert!(is_api_key(&key) && key.len() == PREFIX.len() + 43);
        assert_ne!(key, other);
        assert_eq!(record.hash, hash(&key));
        assert!(!record.hash.contains(&key[PREFIX.len()..]));
        assert!(!is_api_key("eyJhbGciOi.x.y"));
    }
}
