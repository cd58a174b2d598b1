//! The local signing key: an ES256 (P-256) key kept in the local store and never printed. On AWS
//! a KMS key plays this part (see the aws crate).

use crate::error::{StoreError, StoreResult};
use crate::ports::Signer;
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde_json::{Value, json};

/// An ES256 key held in memory.
pub struct LocalSigner {
    key: SigningKey,
    jwk: Value,
}

impl LocalSigner {
    /// A new random key, and its PKCS#8 DER form for the store.
    pub fn generate() -> (LocalSigner, Vec<u8>) {
        loop {
            // Almost every 32 random bytes are a valid scalar; retry the rare ones that are not.
            if let Ok(key) = SigningKey::from_slice(&crate::random::bytes::<32>()) {
                let der = key
                    .to_pkcs8_der()
                    .expect("a P-256 key encodes as PKCS#8")
                    .as_bytes()
                    .to_vec();
                return (LocalSigner::new(key), der);
            }
        }
    }

    /// The key stored earlier (PKCS#8 DER).
    pub fn from_pkcs8(der: &[u8]) -> StoreResult<LocalSigner> {
        SigningKey::from_pkcs8_der(der)
            .map(LocalSigner::new)
            .map_err(|_| StoreError::new("the stored signing key is not a P-256 PKCS#8 key"))
    }

    fn new(key: SigningKey) -> LocalSigner {
        let point = key.verifying_key().to_sec1_point(false);
        let x = URL_SAFE_NO_PAD.encode(point.x().expect("uncompressed point"));
        let y = URL_SAFE_NO_PAD.encode(point.y().expect("uncompressed point"));
        LocalSigner {
            key,
            jwk: ec_jwk(&x, &y),
        }
    }
}

/// The public JWK of a P-256 key, with its RFC 7638 thumbprint as `kid`.
pub fn ec_jwk(x: &str, y: &str) -> Value {
    let mut jwk =
        json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "alg": "ES256", "use": "sig"});
    jwk["kid"] = json!(crate::jwt::thumbprint(&jwk).expect("an EC JWK has a thumbprint"));
    jwk
}

#[async_trait]
impl Signer for LocalSigner {
    fn key_id(&self) -> String {
        self.jwk["kid"].as_str().unwrap_or_default().to_string()
    }

    fn public_jwk(&self) -> Value {
        self.jwk.clone()
    }

    async fn sign(&self, message: &[u8]) -> StoreResult<Vec<u8>> {
        let signature: Signature = self.key.sign(message);
        Ok(signature.to_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_signed_locally_verify_with_the_public_jwk_only() {
        let (signer, der) = LocalSigner::generate();
        let again = LocalSigner::from_pkcs8(&der).unwrap();
        assert_eq!(signer.key_id(), again.key_id());
        let token = crate::jwt::sign(&again, &json!({"sub": "x"}))
            .await
            .unwrap();
        let claims = crate::jwt::verify(&token, &crate::jwt::own_jwks(&signer)).unwrap();
        assert_eq!(claims["sub"], "x");
        let (other, _) = LocalSigner::generate();
        let mut foreign = crate::jwt::own_jwks(&other);
        foreign["keys"][0]["kid"] = json!(signer.key_id());
        assert!(crate::jwt::verify(&token, &foreign).is_err());
        assert!(signer.public_jwk().get("d").is_none());
    }
}
