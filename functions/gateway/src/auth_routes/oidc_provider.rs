//! The local OpenID provider's endpoints over HTTP (the rules are in `export_auth::provider`):
//! discovery, the authorization endpoint (the sign-in form, GET and POST) and the token
//! endpoint. Only where the deployment turns the provider on; otherwise these paths are unknown.

use super::json;
use crate::Gateway;
use crate::request_log::RequestRecord;
use bytes::Bytes;
use export_auth::provider::request::LOGIN_REQUEST_SECONDS;
use export_auth::provider::{
    AUTHORIZE_PATH, Answer, DISCOVERY_PATH, LOGIN_COOKIE, LocalProvider, TOKEN_PATH,
};
use export_core::Body;
use export_core::fhir::time::now_millis;
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, PRAGMA, REFERRER_POLICY, RETRY_AFTER,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};

/// The pages have no script and no inline style; they post only to this origin and are never
/// framed (clickjacking a sign-in form).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

impl Gateway {
    /// Answers the request if it is for the local OpenID provider and the provider is on.
    pub(super) async fn oidc_provider_route(
        &self,
        request: &Request<Bytes>,
        record: &mut RequestRecord,
    ) -> Option<Response<Body>> {
        let provider = self.auth.provider.as_ref()?;
        let route = match request.uri().path() {
            DISCOVERY_PATH => DISCOVERY_PATH,
            AUTHORIZE_PATH => AUTHORIZE_PATH,
            TOKEN_PATH => TOKEN_PATH,
            _ => return None,
        };
        record.route = route.to_string();
        let now = now_millis().timestamp();
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let response = match (route, request.method()) {
            (DISCOVERY_PATH, &Method::GET) => json(StatusCode::OK, &provider.discovery()),
            (AUTHORIZE_PATH, &Method::GET) => {
                let query = request.uri().query().unwrap_or_default();
                answer(provider, provider.authorize(query, now).await, false)
            }
            (AUTHORIZE_PATH, &Method::POST) => {
                let cookie = login_cookie(request);
                let signed_in = provider
                    .sign_in(content_type, request.body(), cookie.as_deref(), now)
                    .await;
                answer(provider, signed_in, true)
            }
            (TOKEN_PATH, &Method::POST) => {
                let mut response = match provider.token(content_type, request.body(), now).await {
                    Ok(tokens) => json(StatusCode::OK, &tokens),
                    Err(error) => json(error.status, &error.body()),
                };
                // RFC 6749 §5.1: token responses must not be cached.
                let headers = response.headers_mut();
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
                response
            }
            (_, method) => {
                let allowed = if route == AUTHORIZE_PATH {
                    "GET, POST"
                } else if route == TOKEN_PATH {
                    "POST"
                } else {
                    "GET"
                };
                let mut response = json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &serde_json::json!({"error": "invalid_request", "error_description": format!("{method} is not allowed here; use {allowed}")}),
                );
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allowed));
                response
            }
        };
        Some(response)
    }
}

/// The response for an answer of the authorization endpoint. After the form's POST, the login
/// cookie has done its job and is removed.
fn answer(provider: &LocalProvider, answer: Answer, after_post: bool) -> Response<Body> {
    let secure = provider.issuer().starts_with("https://");
    let mut response = match answer {
        Answer::Page {
            status,
            html,
            login_cookie,
            retry_after,
        } => {
            let mut response = Response::new(Body::Full(Bytes::from(html)));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            headers.insert(
                "content-security-policy",
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
            headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            if let Some(value) = login_cookie {
                headers.insert(SET_COOKIE, cookie(&value, secure, LOGIN_REQUEST_SECONDS));
            }
            if let Some(seconds) = retry_after {
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            response
        }
        Answer::Redirect { location } => {
            let mut response = Response::new(Body::Full(Bytes::new()));
            *response.status_mut() = StatusCode::SEE_OTHER;
            // The location is built from the registered redirect URI and encoded parameters.
            match HeaderValue::from_str(&location) {
                Ok(value) => {
                    response.headers_mut().insert(LOCATION, value);
                }
                Err(_) => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            }
            if after_post {
                response
                    .headers_mut()
                    .insert(SET_COOKIE, cookie("", secure, 0));
            }
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The authorization request's URL (state, nonce) and the code stay out of Referer headers.
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// The login cookie: as long as the form it belongs to, only for the authorization endpoint, never readable by script, never sent
/// with another site's requests; `Secure` when the issuer is https.
fn cookie(value: &str, secure: bool, max_age: i64) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={value}; Path={AUTHORIZE_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("a base64url token is a valid cookie value")
}

/// The login cookie's value, as the browser sent it.
fn login_cookie(request: &Request<Bytes>) -> Option<String> {
    request
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == LOGIN_COOKIE)
        .map(|(_, value)| value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_cookie_is_read_among_others() {
        let request = Request::builder()
            .header(COOKIE, "theme=dark; bulk_export_login=abc-123_x ; other=1")
            .header(COOKIE, "bulk_export_login=second")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(login_cookie(&request).as_deref(), Some("abc-123_x"));
        let none = Request::builder()
            .header(COOKIE, "bulk_export_login_old=zzz")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(login_cookie(&none), None);
    }

    #[test]
    fn the_login_cookie_is_http_only_strict_and_secure_on_https() {
        let plain = cookie("v", false, 600);
        assert_eq!(
            plain.to_str().unwrap(),
            "bulk_export_login=v; Path=/oidc/authorize; Max-Age=600; HttpOnly; SameSite=Strict"
        );
        assert!(
            cookie("", true, 0)
                .to_str()
                .unwrap()
                .ends_with("Max-Age=0; HttpOnly; SameSite=Strict; Secure")
        );
    }
}
