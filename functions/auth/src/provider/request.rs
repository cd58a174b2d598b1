//! The authorization request (OpenID Connect Core §3.1.2.1, with PKCE): what the page sends the
//! browser to the authorization endpoint with. The client and its redirect URI are checked first:
//! until both are known good, an error must not be sent back by redirecting (RFC 6749 §4.1.2.1),
//! or the endpoint would be an open redirector. While the person signs in, the checked request
//! travels through the form signed by the service (a "login request"), so the form's POST needs
//! no server-side session and cannot be altered.

use super::pkce;
use crate::error::StoreResult;
use crate::jwt;
use crate::ports::Signer;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The scopes this provider knows; others that are asked for are ignored (OIDC Core §3.1.2.1).
pub const SUPPORTED_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// Longest `state`, `nonce` and `login_hint` accepted (they are carried through the form).
const MAX_ECHOED: usize = 1024;
/// How long the sign-in form may stay open.
pub const LOGIN_REQUEST_SECONDS: i64 = 10 * 60;
/// The `aud` of a signed login request: only the sign-in form's POST accepts it, and no
/// bearer-token check does.
const LOGIN_AUDIENCE: &str = "urn:bulk-export:oidc-login-request";

/// A checked authorization request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationRequest {
    pub client_id: String,
    pub redirect_uri: String,
    /// The supported scopes asked for, space-separated (always with `openid`).
    pub scope: String,
    pub state: Option<String>,
    pub nonce: Option<String>,
    /// The S256 PKCE challenge.
    pub code_challenge: String,
}

/// Why an authorization request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client or its redirect URI is not the registered one: say so on a page.
    Page(String),
    /// Anything else: back to the client's redirect URI with an error.
    Redirect(ErrorRedirect),
}

/// An error response by redirection (RFC 6749 §4.1.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRedirect {
    pub redirect_uri: String,
    /// `invalid_request`, `unsupported_response_type`, `invalid_scope`, `login_required`,
    /// `request_not_supported`, `request_uri_not_supported`, `server_error`.
    pub error: &'static str,
    pub description: String,
    pub state: Option<String>,
}

impl ErrorRedirect {
    /// The `Location` to send the browser to.
    pub fn location(&self) -> String {
        let mut pairs = vec![
            ("error", self.error),
            ("error_description", self.description.as_str()),
        ];
        if let Some(state) = &self.state {
            pairs.push(("state", state));
        }
        with_query(&self.redirect_uri, &pairs)
    }
}

/// `uri` with `pairs` added to its query.
pub fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        query.append_pair(name, value);
    }
    let separator = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{separator}{}", query.finish())
}

/// Checks the parameters of an authorization request (the query string, decoded) for the one
/// registered client, whose only redirect URI is `registered_redirect`.
pub fn parse(
    params: &[(String, String)],
    client_id: &str,
    registered_redirect: &str,
) -> Result<AuthorizationRequest, Refusal> {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in params {
        by_name.entry(name).or_default().push(value);
    }
    let one = |name: &str| match by_name.get(name).map(Vec::as_slice) {
        Some([value]) => Some(*value),
        _ => None,
    };
    if one("client_id") != Some(client_id) {
        return Err(Refusal::Page(
            "The application that sent you here is not registered with this server (client_id)."
                .into(),
        ));
    }
    if one("redirect_uri") != Some(registered_redirect) {
        return Err(Refusal::Page(
            "The address the application asked to return to is not registered for it (redirect_uri)."
                .into(),
        ));
    }
    let state = one("state")
        .filter(|s| s.len() <= MAX_ECHOED)
        .map(String::from);
    let refuse = |error: &'static str, description: &str| {
        Err(Refusal::Redirect(ErrorRedirect {
            redirect_uri: registered_redirect.to_string(),
            error,
            description: description.to_string(),
            state: state.clone(),
        }))
    };
    if let Some((name, _)) = by_name.iter().find(|(_, values)| values.len() > 1) {
        return refuse(
            "invalid_request",
            &format!("the parameter {name} appears more than once"),
        );
    }
    if by_name.contains_key("request") {
        return refuse("request_not_supported", "request objects are not supported");
    }
    if by_name.contains_key("request_uri") {
        return refuse("request_uri_not_supported", "request_uri is not supported");
    }
    match one("response_type") {
        Some("code") => {}
        Some(_) => {
            return refuse(
                "unsupported_response_type",
                "only the authorization code flow is supported (response_type=code)",
            );
        }
        None => return refuse("invalid_request", "response_type is missing"),
    }
    let asked: Vec<&str> = one("scope").unwrap_or_default().split(' ').collect();
    if !asked.contains(&"openid") {
        return refuse(
            "invalid_scope",
            "this is an OpenID Connect provider: the scope must include openid",
        );
    }
    let scope = SUPPORTED_SCOPES
        .iter()
        .filter(|s| asked.contains(s))
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if one("code_challenge_method") != Some("S256") {
        return refuse(
            "invalid_request",
            "PKCE is required, with code_challenge_method=S256",
        );
    }
    let code_challenge = match one("code_challenge") {
        Some(c) if pkce::challenge_is_well_formed(c) => c.to_string(),
        Some(_) => {
            return refuse(
                "invalid_request",
                "code_challenge must be BASE64URL(SHA256(code_verifier)): 43 characters",
            );
        }
        None => {
            return refuse(
                "invalid_request",
                "PKCE is required: code_challenge is missing",
            );
        }
    };
    if one("state").is_some_and(|s| s.len() > MAX_ECHOED)
        || one("nonce").is_some_and(|n| n.len() > MAX_ECHOED)
    {
        return refuse(
            "invalid_request",
            &format!("state and nonce may be at most {MAX_ECHOED} characters"),
        );
    }
    // No session is kept between sign-ins, so there is never one to use silently.
    if one("prompt").is_some_and(|p| p.split(' ').any(|p| p == "none")) {
        return refuse("login_required", "the person must sign in");
    }
    Ok(AuthorizationRequest {
        client_id: client_id.to_string(),
        redirect_uri: registered_redirect.to_string(),
        scope,
        state: one("state").map(String::from),
        nonce: one("nonce").map(String::from),
        code_challenge,
    })
}

/// `login_hint`, if it can pre-fill the e-mail field.
pub fn login_hint(params: &[(String, String)]) -> Option<String> {
    params
        .iter()
        .find(|(name, _)| name == "login_hint")
        .map(|(_, value)| value.trim().to_string())
        .filter(|hint| hint.contains('@') && hint.len() <= 320)
}

/// A login request as signed into the form.
#[derive(Serialize, Deserialize)]
struct LoginClaims {
    iss: String,
    aud: String,
    exp: i64,
    request: AuthorizationRequest,
    /// The SHA-256 of the form's CSRF token, which the login cookie also holds.
    csrf: String,
}

/// Signs `request` for the sign-in form, bound to the CSRF token `csrf_token`.
pub async fn sign_login_request(
    signer: &dyn Signer,
    issuer: &str,
    request: &AuthorizationRequest,
    csrf_token: &str,
    now: i64,
) -> StoreResult<String> {
    let claims = LoginClaims {
        iss: issuer.to_string(),
        aud: LOGIN_AUDIENCE.to_string(),
        exp: now + LOGIN_REQUEST_SECONDS,
        request: request.clone(),
        csrf: pkce::s256(csrf_token),
    };
    jwt::sign(
        signer,
        &serde_json::to_value(claims).expect("claims are JSON"),
    )
    .await
}

/// A login request read back from the form: the request, and the hash its CSRF token must have.
pub struct LoginRequest {
    pub request: AuthorizationRequest,
    csrf: String,
}

impl LoginRequest {
    /// Whether `token` is the CSRF token this request was signed with.
    pub fn csrf_matches(&self, token: &str) -> bool {
        !token.is_empty() && pkce::s256(token) == self.csrf
    }
}

/// Checks a login request from the form: signed by this service for this issuer, not expired.
pub fn read_login_request(
    signer: &dyn Signer,
    issuer: &str,
    token: &str,
    now: i64,
) -> Result<LoginRequest, String> {
    let claims: Value = jwt::verify(token, &jwt::own_jwks(signer))?;
    let claims: LoginClaims =
        serde_json::from_value(claims).map_err(|_| "not a login request".to_string())?;
    if claims.iss != issuer || claims.aud != LOGIN_AUDIENCE {
        return Err("not a login request of this server".into());
    }
    if claims.exp <= now {
        return Err("the login request has expired".into());
    }
    Ok(LoginRequest {
        request: claims.request,
        csrf: claims.csrf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIRECT: &str = "https://app.example.org/callback";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn good() -> Vec<(String, String)> {
        [
            ("response_type", "code"),
            ("client_id", "bulk-export"),
            ("redirect_uri", REDIRECT),
            ("scope", "openid email profile offline_access"),
            ("state", "s-1"),
            ("nonce", "n-1"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
    }

    fn with(
        edit: impl FnOnce(&mut Vec<(String, String)>),
    ) -> Result<AuthorizationRequest, Refusal> {
        let mut params = good();
        edit(&mut params);
        parse(&params, "bulk-export", REDIRECT)
    }

    fn set(params: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
        params.retain(|(n, _)| n != name);
        if let Some(v) = value {
            params.push((name.into(), v.into()));
        }
    }

    fn redirect_error(
        result: Result<AuthorizationRequest, Refusal>,
    ) -> (&'static str, Option<String>) {
        match result {
            Err(Refusal::Redirect(r)) => {
                assert_eq!(r.redirect_uri, REDIRECT);
                (r.error, r.state)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_good_request_keeps_what_the_code_is_bound_to() {
        let request = with(|_| {}).unwrap();
        assert_eq!(
            request,
            AuthorizationRequest {
                client_id: "bulk-export".into(),
                redirect_uri: REDIRECT.into(),
                scope: "openid email profile".into(),
                state: Some("s-1".into()),
                nonce: Some("n-1".into()),
                code_challenge: CHALLENGE.into(),
            }
        );
    }

    #[test]
    fn an_unknown_client_or_redirect_uri_is_never_redirected_to() {
        for (name, value) in [
            ("client_id", Some("someone-else")),
            ("client_id", None),
            ("redirect_uri", Some("https://evil.example/callback")),
            (
                "redirect_uri",
                Some("https://app.example.org/callback/../x"),
            ),
            ("redirect_uri", None),
        ] {
            assert!(
                matches!(with(|p| set(p, name, value)), Err(Refusal::Page(_))),
                "{name} {value:?}"
            );
        }
        // Even when something else is wrong too.
        let r = with(|p| {
            set(p, "redirect_uri", Some("https://evil.example/"));
            set(p, "response_type", Some("token"));
        });
        assert!(matches!(r, Err(Refusal::Page(_))));
        // A repeated client_id or redirect_uri is not the registered one.
        let r = with(|p| p.push(("redirect_uri".into(), "https://evil.example/".into())));
        assert!(matches!(r, Err(Refusal::Page(_))));
    }

    #[test]
    fn other_errors_go_back_to_the_client_with_the_state() {
        let long_nonce = "n".repeat(1025);
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            ("response_type", Some("token"), "unsupported_response_type"),
            ("response_type", None, "invalid_request"),
            ("scope", Some("email profile"), "invalid_scope"),
            ("scope", None, "invalid_scope"),
            ("code_challenge", None, "invalid_request"),
            ("code_challenge", Some("short"), "invalid_request"),
            ("code_challenge_method", Some("plain"), "invalid_request"),
            ("code_challenge_method", None, "invalid_request"),
            ("nonce", Some(&long_nonce), "invalid_request"),
            ("prompt", Some("none"), "login_required"),
            ("request", Some("eyJ..."), "request_not_supported"),
        ];
        for (name, value, error) in cases {
            let (got, state) = redirect_error(with(|p| set(p, name, value)));
            assert_eq!(got, error, "{name} {value:?}");
            assert_eq!(state.as_deref(), Some("s-1"), "{name}");
        }
        let (error, state) = redirect_error(with(|p| p.push(("scope".into(), "openid".into()))));
        assert_eq!((error, state.as_deref()), ("invalid_request", Some("s-1")));
        // Without a state, none is sent back; nonce and state are optional.
        let (_, state) = redirect_error(with(|p| {
            set(p, "state", None);
            set(p, "response_type", Some("token"));
        }));
        assert_eq!(state, None);
        let request = with(|p| {
            set(p, "state", None);
            set(p, "nonce", None);
        })
        .unwrap();
        assert_eq!((request.state, request.nonce), (None, None));
    }

    #[test]
    fn error_locations_carry_error_and_state_encoded() {
        let location = ErrorRedirect {
            redirect_uri: REDIRECT.into(),
            error: "invalid_scope",
            description: "a b&c".into(),
            state: Some("x y".into()),
        }
        .location();
        assert_eq!(
            location,
            format!("{REDIRECT}?error=invalid_scope&error_description=a+b%26c&state=x+y")
        );
    }

    #[tokio::test]
    async fn a_login_request_comes_back_only_unaltered_and_in_time() {
        let (signer, _) = crate::signer::LocalSigner::generate();
        let request = with(|_| {}).unwrap();
        let issuer = "https://app.example.org";
        let token = sign_login_request(&signer, issuer, &request, "csrf-1", 100)
            .await
            .unwrap();
        let read = read_login_request(&signer, issuer, &token, 100 + 599).unwrap();
        assert_eq!(read.request, request);
        assert!(read.csrf_matches("csrf-1"));
        assert!(!read.csrf_matches("csrf-2") && !read.csrf_matches(""));
        assert!(
            read_login_request(&signer, issuer, &token, 100 + 600).is_err(),
            "expired"
        );
        assert!(read_login_request(&signer, "https://other.example", &token, 100).is_err());
        let (other, _) = crate::signer::LocalSigner::generate();
        assert!(
            read_login_request(&other, issuer, &token, 100).is_err(),
            "another key"
        );
        // A token of another kind (here a user token of the same issuer) is not a login request.
        let user = crate::ports::User {
            email: "a@example.org".into(),
            name: "A".into(),
            subject: "s".into(),
            created: 0,
            password_hash: None,
        };
        let user_token = crate::oidc::local_user_token(&signer, issuer, &user, 100, 60)
            .await
            .unwrap();
        assert!(read_login_request(&signer, issuer, &user_token, 100).is_err());
    }
}
