//! The token signing key on AWS: an asymmetric KMS key (ECC_NIST_P256, SIGN_VERIFY). The private
//! key never leaves KMS; the functions only call Sign, and read the public key once at start.

use async_trait::async_trait;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use export_auth::ports::Signer;
use export_auth::signer::ec_jwk;
use export_auth::{StoreError, StoreResult};
use p256::ecdsa::Signature;
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::pkcs8::DecodePublicKey;
use serde_json::Value;

/// Signs with a KMS key.
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    key_id: String,
    jwk: Value,
}

fn kms_err(e: impl std::fmt::Debug) -> StoreError {
    StoreError::new(format!("kms: {e:?}"))
}

impl KmsSigner {
    /// Reads the key's public half (a P-256 key is required).
    pub async fn new(client: aws_sdk_kms::Client, key_id: &str) -> StoreResult<KmsSigner> {
        let out = client
            .get_public_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(kms_err)?;
        let der = out
            .public_key
            .ok_or_else(|| StoreError::new("kms: the key has no public key"))?;
        let public = p256::PublicKey::from_public_key_der(der.as_ref())
            .map_err(|_| StoreError::new("kms: the signing key must be ECC_NIST_P256"))?;
        let point = public.to_sec1_point(false);
        let x = URL_SAFE_NO_PAD.encode(point.x().expect("uncompressed"));
        let y = URL_SAFE_NO_PAD.encode(point.y().expect("uncompressed"));
        Ok(KmsSigner {
            client,
            key_id: key_id.to_string(),
            jwk: ec_jwk(&x, &y),
        })
    }
}

#[async_trait]
impl Signer for KmsSigner {
    fn key_id(&self) -> String {
        self.jwk["kid"].as_str().unwrap_or_default().to_string()
    }

    fn public_jwk(&self) -> Value {
        self.jwk.clone()
    }

    async fn sign(&self, message: &[u8]) -> StoreResult<Vec<u8>> {
        let out = self
            .client
            .sign()
            .key_id(&self.key_id)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(kms_err)?;
        let der = out
            .signature
            .ok_or_else(|| StoreError::new("kms: no signature returned"))?;
        // KMS answers DER (ASN.1 r, s); a JWS needs the raw r ‖ s.
        let signature = Signature::from_der(der.as_ref())
            .map_err(|_| StoreError::new("kms: the signature is not DER ECDSA"))?;
        let signature = signature.normalize_s();
        Ok(signature.to_bytes().to_vec())
    }
}
