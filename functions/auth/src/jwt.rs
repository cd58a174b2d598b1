//! JSON Web Tokens: checking a signature against a JWK Set, and signing the tokens this service
//! issues. Claims (issuer, audience, expiry) are checked by the callers, who know what they expect.

use crate::error::StoreResult;
use crate::ports::Signer;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// Longest token accepted: a bound on the work an unauthenticated request can cause.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A token's header, read before its signature is checked (to find the key).
#[derive(Debug, Clone)]
pub struct UnverifiedHeader {
    pub alg: String,
    pub kid: Option<String>,
    pub jku: Option<String>,
    pub typ: Option<String>,
}

/// Reads the header of a compact JWS, and checks the token's shape and size.
pub fn read_header(token: &str) -> Result<UnverifiedHeader, String> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("the token is longer than {MAX_TOKEN_BYTES} bytes"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err("not a signed JWT (header.payload.signature)".into());
    }
    let header: Value = URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the JWT header is not base64url JSON")?;
    let text = |name: &str| header.get(name).and_then(Value::as_str).map(String::from);
    Ok(UnverifiedHeader {
        alg: text("alg").ok_or("the JWT header has no alg")?,
        kid: text("kid"),
        jku: text("jku"),
        typ: text("typ"),
    })
}

/// The algorithms accepted for client assertions and OpenID tokens.
fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

/// The signing algorithms this service verifies, for discovery documents.
pub const SUPPORTED_ALGORITHMS: [&str; 4] = ["RS384", "ES384", "RS256", "ES256"];

/// Checks `token`'s signature with the key of `jwks` its header names and returns its claims.
/// The key's `kty`, `crv` and `alg` must agree with the header's `alg`; a JWK Set of several keys
/// needs a `kid` to choose one.
pub fn verify(token: &str, jwks: &Value) -> Result<Value, String> {
    let header = read_header(token)?;
    let alg = algorithm(&header.alg).ok_or_else(|| {
        format!(
            "alg {} is not accepted (use one of {})",
            header.alg,
            SUPPORTED_ALGORITHMS.join(", ")
        )
    })?;
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWK Set has no keys")?;
    // By `kid`; failing that, by the key's RFC 7638 thumbprint, which some clients (jwcrypto,
    // for one) put in `kid` whatever the registered set calls the key.
    let mut candidates: Vec<&Value> = keys
        .iter()
        .filter(|k| match &header.kid {
            Some(kid) => k.get("kid").and_then(Value::as_str) == Some(kid.as_str()),
            None => true,
        })
        .collect();
    if candidates.is_empty()
        && let Some(kid) = &header.kid
    {
        candidates = keys
            .iter()
            .filter(|k| thumbprint(k).as_deref() == Some(kid.as_str()))
            .collect();
    }
    let key = match candidates.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "no key with kid {:?} in the client's JWK Set",
                header.kid.unwrap_or_default()
            ));
        }
        _ => return Err("several keys match; the JWT header needs a kid".into()),
    };
    let decoding = decoding_key(key, &header.alg)?;
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &decoding, &validation)
        .map(|data| data.claims)
        .map_err(|e| format!("the signature does not verify ({e})"))
}

/// The RFC 7638 thumbprint of an EC or RSA public JWK: the SHA-256 of its required members, in
/// lexicographic order, without spaces.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    use sha2::{Digest, Sha256};
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let canonical = match field("kty")? {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            field("crv")?,
            field("x")?,
            field("y")?
        ),
        "RSA" => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            field("e")?,
            field("n")?
        ),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// The public key of a JWK, if it suits `alg`.
fn decoding_key(jwk: &Value, alg: &str) -> Result<DecodingKey, String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if let Some(key_alg) = field("alg")
        && key_alg != alg
    {
        return Err(format!(
            "the key is for {key_alg}, the JWT is signed with {alg}"
        ));
    }
    if jwk.get("d").is_some() {
        return Err("the JWK Set holds a private key; register public keys only".into());
    }
    let (kty, crv) = (field("kty").unwrap_or(""), field("crv"));
    let fits = match alg {
        "RS256" | "RS384" => kty == "RSA",
        "ES256" => kty == "EC" && crv == Some("P-256"),
        "ES384" => kty == "EC" && crv == Some("P-384"),
        _ => false,
    };
    if !fits {
        return Err(format!(
            "a {kty} {} key cannot verify {alg}",
            crv.unwrap_or("")
        ));
    }
    let bad = |e: jsonwebtoken::errors::Error| format!("the JWK is not a usable key ({e})");
    match kty {
        "RSA" => DecodingKey::from_rsa_components(
            field("n").ok_or("the RSA JWK has no n")?,
            field("e").ok_or("the RSA JWK has no e")?,
        )
        .map_err(bad),
        _ => DecodingKey::from_ec_components(
            field("x").ok_or("the EC JWK has no x")?,
            field("y").ok_or("the EC JWK has no y")?,
        )
        .map_err(bad),
    }
}

/// Signs `claims` as an ES256 JWT with the service's key.
pub async fn sign(signer: &dyn Signer, claims: &Value) -> StoreResult<String> {
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": signer.key_id()});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = signer.sign(input.as_bytes()).await?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// The JWK Set of the service's own signing key (what its tokens verify against).
pub fn own_jwks(signer: &dyn Signer) -> Value {
    json!({"keys": [signer.public_jwk()]})
}

/// A claim as seconds since the epoch.
pub fn seconds(claims: &Value, name: &str) -> Option<i64> {
    claims.get(name).and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
    })
}

/// Whether `aud` (a string or an array) names `expected`.
pub fn audience_includes(claims: &Value, expected: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => aud == expected,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// RFC 7638 §3.1's example key and thumbprint.
    #[test]
    fn thumbprints_follow_rfc_7638() {
        let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            super::thumbprint(&jwk).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
    }
}
