//! The public auth endpoints: the SMART token endpoint, this service's JWK Set (what its tokens
//! verify against), and the SMART configuration document; where the deployment has it, the local
//! OpenID provider's endpoints ([`oidc_provider`]).

mod oidc_provider;

use crate::Gateway;
use crate::request_log::RequestRecord;
use bytes::Bytes;
use export_auth::discovery::smart_configuration;
use export_auth::jwt::own_jwks;
use export_core::Body;
use export_core::fhir::time::now_millis;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{Value, json};

impl Gateway {
    /// Answers the request if it is for an auth endpoint.
    pub(crate) async fn auth_route(
        &self,
        request: &Request<Bytes>,
        record: &mut RequestRecord,
    ) -> Option<Response<Body>> {
        if let Some(response) = self.oidc_provider_route(request, record).await {
            return Some(response);
        }
        let path = request.uri().path();
        let discovery = format!("{}/.well-known/smart-configuration", self.fhir.base_path());
        let route = match path {
            "/auth/token" => "/auth/token",
            "/auth/jwks" => "/auth/jwks",
            p if p == discovery || p == "/.well-known/smart-configuration" => {
                "/.well-known/smart-configuration"
            }
            _ => return None,
        };
        record.route = route.to_string();
        let origin = self.origin(request);
        let response = match (route, request.method()) {
            ("/auth/token", &Method::POST) => self.token(request, &origin).await,
            ("/auth/jwks", &Method::GET) => {
                json(StatusCode::OK, &own_jwks(self.auth.ports.signer.as_ref()))
            }
            ("/.well-known/smart-configuration", &Method::GET) => json(
                StatusCode::OK,
                &smart_configuration(&origin, &self.auth.config.issuer),
            ),
            _ => json(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "invalid_request", "error_description": format!("{} is not allowed here", request.method())}),
            ),
        };
        Some(response)
    }

    async fn token(&self, request: &Request<Bytes>, origin: &str) -> Response<Body> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let token_url = format!("{origin}/auth/token");
        let now = now_millis().timestamp();
        let answer = self
            .auth
            .tokens
            .token(
                content_type,
                request.body(),
                &token_url,
                &self.auth.config.issuer,
                now,
            )
            .await;
        let mut response = match answer {
            Ok(body) => json(StatusCode::OK, &body),
            Err(error) => {
                let mut response = json(error.status, &error.body());
                if let Some(seconds) = error.retry_after {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(seconds));
                }
                response
            }
        };
        // RFC 6749 §5.1: token responses must not be cached.
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        response
    }

    /// The scheme and host clients use, from the FHIR base URL as the request shows it.
    fn origin(&self, request: &Request<Bytes>) -> String {
        let base = self.fhir.base_url(request);
        base.strip_suffix(self.fhir.base_path())
            .unwrap_or(&base)
            .to_string()
    }
}

fn json(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
