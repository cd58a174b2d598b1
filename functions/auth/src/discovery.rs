//! What clients read before they ask for anything: the SMART configuration document.

use crate::jwt::SUPPORTED_ALGORITHMS;
use serde_json::{Value, json};

/// `/.well-known/smart-configuration` for a server whose origin is `origin`
/// (e.g. `https://example.org`): Backend Services with asymmetric client authentication.
pub fn smart_configuration(origin: &str, issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{origin}/auth/token"),
        "jwks_uri": format!("{origin}/auth/jwks"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": SUPPORTED_ALGORITHMS,
        "scopes_supported": ["system/*.rs", "system/*.read"],
        "response_types_supported": ["token"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    })
}
