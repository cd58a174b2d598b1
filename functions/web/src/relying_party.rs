//! Signing people in with OpenID Connect: the authorization code flow with PKCE (RFC 7636),
//! as a public client. The same code talks to Cognito's hosted UI on AWS and to the server's own
//! small provider locally; it only needs the issuer's discovery document.
//!
//! The ID token that comes back is verified by the service's authenticator (signature, issuer,
//! audience, expiry) when the session first uses it; here the nonce is checked, which binds the
//! token to the browser that started the sign-in.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a fetched discovery document is used.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// Who the page is to its identity provider.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// Exactly the provider's `issuer` (its discovery document is under it).
    pub issuer: String,
    /// The page's client id at the provider (a public client: no secret).
    pub client_id: String,
}

/// The endpoints the flow uses, from the discovery document.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    pub authorization: String,
    pub token: String,
    /// Where the provider's own session ends (RP-initiated logout), when it has one.
    pub end_session: Option<String>,
}

/// What the token endpoint answered.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub id_token: String,
}

/// HTTP as the flow needs it (a port, so tests can stand in for a provider).
#[async_trait]
pub trait OidcHttp: Send + Sync {
    async fn get_json(&self, url: &str) -> Result<Value, String>;
    /// POSTs a form; answers the status and the JSON body.
    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<(u16, Value), String>;
}

/// The relying party.
pub struct RelyingParty {
    pub settings: OidcSettings,
    http: Arc<dyn OidcHttp>,
    endpoints: Mutex<Option<(Endpoints, Instant)>>,
}

impl RelyingParty {
    pub fn new(settings: OidcSettings, http: Arc<dyn OidcHttp>) -> Self {
        RelyingParty {
            settings,
            http,
            endpoints: Mutex::new(None),
        }
    }

    /// The provider's endpoints (fetched once an hour). The document must name the configured
    /// issuer: a mismatch means a wrong or impersonated provider.
    pub async fn endpoints(&self) -> Result<Endpoints, String> {
        if let Some((endpoints, at)) = self.endpoints.lock().expect("endpoints").clone()
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(endpoints);
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        );
        let document = self.http.get_json(&url).await?;
        if document["issuer"].as_str() != Some(self.settings.issuer.as_str()) {
            return Err("the discovery document names another issuer".into());
        }
        let endpoint = |name: &str| {
            document[name]
                .as_str()
                .filter(|u| export_auth::jwks::fetchable(u))
                .map(String::from)
                .ok_or_else(|| format!("the discovery document has no usable {name}"))
        };
        let endpoints = Endpoints {
            authorization: endpoint("authorization_endpoint")?,
            token: endpoint("token_endpoint")?,
            end_session: endpoint("end_session_endpoint").ok(),
        };
        *self.endpoints.lock().expect("endpoints") = Some((endpoints.clone(), Instant::now()));
        Ok(endpoints)
    }

    /// Where to send the browser to sign in.
    pub async fn authorization_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        verifier: &str,
    ) -> Result<String, String> {
        let endpoints = self.endpoints().await?;
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", "openid email profile")
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &challenge(verifier))
            .append_pair("code_challenge_method", "S256")
            .finish();
        let separator = if endpoints.authorization.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{separator}{query}", endpoints.authorization))
    }

    /// Trades the code the browser brought back for tokens.
    pub async fn exchange(
        &self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<Tokens, String> {
        let endpoints = self.endpoints().await?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", self.settings.client_id.as_str()),
            ("code_verifier", verifier),
        ];
        let (status, body) = self.http.post_form(&endpoints.token, &form).await?;
        if status != 200 {
            let error = body["error"].as_str().unwrap_or("an error");
            return Err(format!("the token endpoint answered {status} ({error})"));
        }
        let id_token = body["id_token"]
            .as_str()
            .ok_or("the token endpoint sent no id_token")?;
        Ok(Tokens {
            id_token: id_token.to_string(),
        })
    }
}

impl RelyingParty {
    /// Where to send the browser so the provider's session ends too, and back to
    /// `after` (a shared ward computer must not sign the next person in unasked): OpenID
    /// RP-initiated logout where the provider has it; Cognito's hosted UI has `/logout` beside
    /// `/oauth2/authorize` instead.
    pub async fn logout_url(&self, after: &str) -> Option<String> {
        let endpoints = self.endpoints().await.ok()?;
        let client_id = self.settings.client_id.as_str();
        if let Some(end) = endpoints.end_session {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("client_id", client_id)
                .append_pair("post_logout_redirect_uri", after)
                .finish();
            return Some(format!("{end}?{query}"));
        }
        let domain = endpoints.authorization.strip_suffix("/oauth2/authorize")?;
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", client_id)
            .append_pair("logout_uri", after)
            .finish();
        Some(format!("{domain}/logout?{query}"))
    }
}

/// The PKCE S256 challenge of a verifier (the provider's own rule, shared).
pub fn challenge(verifier: &str) -> String {
    export_auth::provider::pkce::s256(verifier)
}

/// A new PKCE verifier: 256 random bits, 43 characters of the unreserved set.
pub fn new_verifier() -> String {
    export_auth::random::token::<32>()
}

/// A claim of a JWT's payload, read without verifying it (the authenticator verifies the token;
/// this reads `nonce` and `exp` of a token it accepted).
pub fn claim(token: &str, name: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get(name).cloned()
}

/// HTTP over `ureq`, with short timeouts and no redirects; `https` only (loopback `http` for
/// development).
pub struct UreqOidcHttp;

#[async_trait]
impl OidcHttp for UreqOidcHttp {
    async fn get_json(&self, url: &str) -> Result<Value, String> {
        if !export_auth::jwks::fetchable(url) {
            return Err("the provider's URL is not https".into());
        }
        let url = url.to_string();
        tokio::task::spawn_blocking(move || {
            let response = agent()
                .get(&url)
                .set("Accept", "application/json")
                .call()
                .map_err(|e| transport_error(&e))?;
            response
                .into_json::<Value>()
                .map_err(|_| "the provider did not answer JSON".to_string())
        })
        .await
        .map_err(|_| "the request was interrupted".to_string())?
    }

    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<(u16, Value), String> {
        if !export_auth::jwks::fetchable(url) {
            return Err("the provider's URL is not https".into());
        }
        let url = url.to_string();
        let form: Vec<(String, String)> = form
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let pairs: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let (status, response) = match agent()
                .post(&url)
                .set("Accept", "application/json")
                .send_form(&pairs)
            {
                Ok(r) => (r.status(), r),
                Err(ureq::Error::Status(code, r)) => (code, r),
                Err(e) => return Err(transport_error(&e)),
            };
            let body = response.into_json::<Value>().unwrap_or(Value::Null);
            Ok((status, body))
        })
        .await
        .map_err(|_| "the request was interrupted".to_string())?
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .redirects(0)
        .build()
}

/// The kind of a transport failure, never its full text (which can hold URLs and addresses).
fn transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("the provider answered HTTP {code}"),
        ureq::Error::Transport(t) => format!("the provider could not be reached ({})", t.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A provider that answers from fixed documents and records the token request.
    struct FakeProvider {
        discovery: Value,
        token_answer: (u16, Value),
        sent: Mutex<Vec<Vec<(String, String)>>>,
    }

    #[async_trait]
    impl OidcHttp for FakeProvider {
        async fn get_json(&self, url: &str) -> Result<Value, String> {
            assert_eq!(
                url,
                "https://idp.example/tenant/.well-known/openid-configuration"
            );
            Ok(self.discovery.clone())
        }
        async fn post_form(
            &self,
            url: &str,
            form: &[(&str, &str)],
        ) -> Result<(u16, Value), String> {
            assert_eq!(url, "https://idp.example/token");
            self.sent.lock().unwrap().push(
                form.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            Ok(self.token_answer.clone())
        }
    }

    fn party(
        issuer_in_document: &str,
        token_answer: (u16, Value),
    ) -> (RelyingParty, Arc<FakeProvider>) {
        let provider = Arc::new(FakeProvider {
            discovery: json!({
                "issuer": issuer_in_document,
                "authorization_endpoint": "https://idp.example/authorize?tenant=1",
                "token_endpoint": "https://idp.example/token",
            }),
            token_answer,
            sent: Mutex::new(Vec::new()),
        });
        let rp = RelyingParty::new(
            OidcSettings {
                issuer: "https://idp.example/tenant".into(),
                client_id: "page".into(),
            },
            provider.clone(),
        );
        (rp, provider)
    }

    #[test]
    fn the_challenge_is_rfc_7636s_example() {
        // RFC 7636, Appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let verifier = new_verifier();
        assert_eq!(verifier.len(), 43);
        assert!(
            verifier
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[tokio::test]
    async fn the_authorization_url_carries_every_parameter() {
        let (rp, _) = party("https://idp.example/tenant", (200, json!({})));
        let url = rp
            .authorization_url("https://page.example/callback", "st", "no", "ver")
            .await
            .unwrap();
        let (base, query) = url
            .split_once("?tenant=1&")
            .expect("keeps the endpoint's query");
        assert_eq!(base, "https://idp.example/authorize");
        let params: std::collections::BTreeMap<String, String> =
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(params["response_type"], "code");
        assert_eq!(params["client_id"], "page");
        assert_eq!(params["redirect_uri"], "https://page.example/callback");
        assert!(params["scope"].split(' ').any(|s| s == "openid"));
        assert_eq!(params["state"], "st");
        assert_eq!(params["nonce"], "no");
        assert_eq!(params["code_challenge"], challenge("ver"));
        assert_eq!(params["code_challenge_method"], "S256");
    }

    #[tokio::test]
    async fn a_discovery_document_of_another_issuer_is_refused() {
        let (rp, _) = party("https://evil.example/tenant", (200, json!({})));
        let error = rp.endpoints().await.unwrap_err();
        assert!(error.contains("another issuer"), "{error}");
    }

    #[tokio::test]
    async fn the_code_is_exchanged_with_the_verifier() {
        let (rp, provider) = party(
            "https://idp.example/tenant",
            (200, json!({"id_token": "a.b.c", "access_token": "x"})),
        );
        let tokens = rp
            .exchange("the-code", "the-verifier", "https://page.example/callback")
            .await
            .unwrap();
        assert_eq!(tokens.id_token, "a.b.c");
        let sent = provider.sent.lock().unwrap()[0].clone();
        let get = |k: &str| sent.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("grant_type"), Some("authorization_code"));
        assert_eq!(get("code"), Some("the-code"));
        assert_eq!(get("code_verifier"), Some("the-verifier"));
        assert_eq!(get("redirect_uri"), Some("https://page.example/callback"));
        assert_eq!(get("client_id"), Some("page"));
    }

    #[tokio::test]
    async fn a_refused_exchange_names_the_error_only() {
        let (rp, _) = party(
            "https://idp.example/tenant",
            (
                400,
                json!({"error": "invalid_grant", "error_description": "secret detail"}),
            ),
        );
        let error = rp
            .exchange("c", "v", "https://p/callback")
            .await
            .unwrap_err();
        assert!(
            error.contains("invalid_grant") && !error.contains("secret"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn sign_out_ends_the_providers_session_too() {
        let (rp, _) = party("https://idp.example/tenant", (200, json!({})));
        assert_eq!(
            rp.logout_url("https://page/signed-out").await,
            None,
            "no known way"
        );
        let cognito = RelyingParty::new(
            rp.settings.clone(),
            Arc::new(FakeProvider {
                discovery: json!({"issuer": "https://idp.example/tenant",
                    "authorization_endpoint": "https://pool.auth.example/oauth2/authorize",
                    "token_endpoint": "https://idp.example/token"}),
                token_answer: (200, json!({})),
                sent: Mutex::new(Vec::new()),
            }),
        );
        assert_eq!(
            cognito
                .logout_url("https://page/signed-out")
                .await
                .as_deref(),
            Some(
                "https://pool.auth.example/logout?client_id=page&logout_uri=https%3A%2F%2Fpage%2Fsigned-out"
            )
        );
        let oidc = RelyingParty::new(
            rp.settings.clone(),
            Arc::new(FakeProvider {
                discovery: json!({"issuer": "https://idp.example/tenant",
                    "authorization_endpoint": "https://idp.example/authorize",
                    "token_endpoint": "https://idp.example/token",
                    "end_session_endpoint": "https://idp.example/logout"}),
                token_answer: (200, json!({})),
                sent: Mutex::new(Vec::new()),
            }),
        );
        assert_eq!(
            oidc.logout_url("https://page/signed-out").await.as_deref(),
            Some(
                "https://idp.example/logout?client_id=page&post_logout_redirect_uri=https%3A%2F%2Fpage%2Fsigned-out"
            )
        );
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"nonce":"n1","exp":5}"#);
        let token = format!("h.{payload}.s");
        assert_eq!(claim(&token, "nonce"), Some(json!("n1")));
        assert_eq!(claim(&token, "exp"), Some(json!(5)));
        assert_eq!(claim(&token, "missing"), None);
        assert_eq!(claim("not-a-jwt", "nonce"), None);
    }
}
