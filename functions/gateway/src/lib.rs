//! The one HTTP entry of the service, shared by `bulk-export serve` and the API Lambda.
//!
//! Every request gets an id (`X-Request-Id`) and one line in the request log. Requests to the
//! FHIR API are authenticated here, once, and the principal is handed to the FHIR router, which
//! decides what it may do. The auth endpoints (`/auth/token`, `/auth/jwks`) and the SMART
//! discovery document are answered here and are public, like the CapabilityStatement.

mod auth_routes;
pub mod request_log;

use bytes::Bytes;
use export_auth::Authenticator;
use export_core::fhir::outcome::IssueCode;
use export_core::fhir::time::now_millis;
use export_core::ids::new_id;
use export_core::router::{RouteInfo, error_response, unauthorized_response};
use export_core::{Api, ApiError, Body};
use export_study::error::StudyError;
use export_study::router::{StudyApi, error_response as study_error_response};
use export_study::service::Caller;
use export_web::{RequestContext, WebPage};
use http::header::ACCEPT;
use http::{HeaderValue, Request, Response};
use request_log::{LoggedStream, RequestRecord};
use std::sync::Arc;
use tracing::Instrument;

/// The service's HTTP front.
pub struct Gateway {
    pub fhir: Arc<Api>,
    pub auth: Arc<Authenticator>,
    /// The study export API, where the deployment has one.
    pub study: Option<Arc<StudyApi>>,
    /// The Exports page, where the deployment has one.
    pub web: Option<Arc<WebPage>>,
}

/// The address a request came from, as the transport saw it (set by the local server and the
/// API Lambda; never read from a header a client can set).
#[derive(Debug, Clone)]
pub struct ClientAddress(pub String);

impl Gateway {
    pub fn new(fhir: Arc<Api>, auth: Arc<Authenticator>) -> Self {
        Gateway {
            fhir,
            auth,
            study: None,
            web: None,
        }
    }

    /// With the Exports page at `/`.
    pub fn with_web(mut self, web: Arc<WebPage>) -> Self {
        self.web = Some(web);
        self
    }

    /// With the study export API at `/api/v1`.
    pub fn with_study(mut self, study: Arc<StudyApi>) -> Self {
        self.study = Some(study);
        self
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Body> {
        self.respond(request, None).await
    }

    /// Answers a request the transport already refused (e.g. a body over
    /// [`export_core::router::MAX_BODY`]) with `error`, logged like every other.
    pub async fn refuse(&self, request: Request<Bytes>, error: ApiError) -> Response<Body> {
        self.respond(request, Some(error)).await
    }

    async fn respond(&self, request: Request<Bytes>, refused: Option<ApiError>) -> Response<Body> {
        let mut record = RequestRecord::new(new_id(), request.method());
        let accept = request
            .headers()
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        // Everything logged while the request is answered carries its id.
        let span = tracing::info_span!("request", request_id = %record.request_id);
        let mut response = match refused {
            Some(error) => error_response(&error, accept.as_deref()),
            None => {
                self.route(&request, accept.as_deref(), &mut record)
                    .instrument(span)
                    .await
            }
        };
        if response.status().is_server_error() {
            response = with_request_id(response, &record.request_id);
        }
        if let Some(info) = response.extensions_mut().remove::<RouteInfo>() {
            if !info.route.is_empty() {
                record.route = info.route;
            }
            if let Some(id) = info.export_id {
                record.set_export_id(&id);
            }
            record.file = info.file;
        }
        record.status = response.status().as_u16();
        response.headers_mut().insert(
            "x-request-id",
            HeaderValue::from_str(&record.request_id).expect("hex id"),
        );
        logged(response, record)
    }

    async fn route(
        &self,
        request: &Request<Bytes>,
        accept: Option<&str>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let path = request.uri().path();
        if let Some(response) = self.auth_route(request, record).await {
            return response;
        }
        if StudyApi::owns(path) {
            return self.study_route(request, record).await;
        }
        if let Some(web) = &self.web
            && WebPage::owns(path)
        {
            record.route = page_route(path).to_string();
            let context = RequestContext {
                request_id: record.request_id.clone(),
                client_address: client_address(request),
            };
            return web.handle(request, &context).await;
        }
        let fhir_base = self.fhir.base_path();
        if path != fhir_base && !path.starts_with(&format!("{fhir_base}/")) {
            return error_response(
                &ApiError::new(
                    http::StatusCode::NOT_FOUND,
                    IssueCode::NotFound,
                    format!("no endpoint at {path}; the FHIR base is {fhir_base}"),
                ),
                accept,
            );
        }
        if self.fhir.is_public(request) {
            return self.fhir.handle(request, None).await;
        }
        let now = now_millis().timestamp();
        let principal = match self.auth.authenticate(request.headers(), now).await {
            Ok(principal) => principal,
            Err(failure) => {
                if let export_auth::AuthFailure::Internal(detail) = &failure {
                    tracing::error!(request_id = %record.request_id, error = %detail, "authentication failed");
                }
                return unauthorized_response(&failure, accept);
            }
        };
        record.principal = Some(principal.id());
        if self.fhir.is_rate_limited(request)
            && let Err(failure) = self.auth.rate_check(&principal)
        {
            return unauthorized_response(&failure, accept);
        }
        self.fhir.handle(request, Some(&principal)).await
    }
}

impl Gateway {
    /// `/api/v1`: the study export API, with its own (EXP) error shape.
    async fn study_route(
        &self,
        request: &Request<Bytes>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let Some(study) = &self.study else {
            let error = StudyError::not_found("the study export API is not enabled here");
            return study_error_response(&error, &record.request_id);
        };
        if StudyApi::is_public(request.uri().path()) {
            return study.handle(request, None).await;
        }
        let now = now_millis().timestamp();
        let principal = match self.auth.authenticate(request.headers(), now).await {
            Ok(principal) => principal,
            Err(failure) => {
                if let export_auth::AuthFailure::Internal(detail) = &failure {
                    tracing::error!(error = %detail, "authentication failed");
                }
                let error = match &failure {
                    export_auth::AuthFailure::RateLimited { retry_after } => {
                        StudyError::too_many(*retry_after)
                    }
                    export_auth::AuthFailure::Internal(_) => StudyError::server(),
                    other => StudyError::unauthenticated(other.message(), other.challenge()),
                };
                return study_error_response(&error, &record.request_id);
            }
        };
        record.principal = Some(principal.id());
        if let Err(export_auth::AuthFailure::RateLimited { retry_after }) =
            self.auth.rate_check(&principal)
        {
            return study_error_response(&StudyError::too_many(retry_after), &record.request_id);
        }
        let caller = Caller {
            principal,
            request_id: record.request_id.clone(),
            client_address: client_address(request),
        };
        study.handle(request, Some(&caller)).await
    }
}

/// The address the transport saw.
fn client_address(request: &Request<Bytes>) -> Option<String> {
    request
        .extensions()
        .get::<ClientAddress>()
        .map(|a| a.0.clone())
}

/// The page's route as the request log names it (ids left out).
fn page_route(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/login" => "/login",
        "/callback" => "/callback",
        "/logout" => "/logout",
        p if p.starts_with("/static/") => "/static/{name}",
        p if p.ends_with("/exports/history") => "/studies/{id}/exports/history",
        p if p.ends_with("/exports") => "/studies/{id}/exports",
        p if p.contains("/exports/") => "/studies/{id}/exports/{job}/{action}",
        p if p.ends_with("/audit") => "/studies/{id}/audit",
        p if p.ends_with("/webhooks") => "/studies/{id}/webhooks",
        _ => "/studies/{id}/…",
    }
}

/// A 5xx OperationOutcome names the request id, under which the log has the details.
fn with_request_id(response: Response<Body>, request_id: &str) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let Body::Full(bytes) = body else {
        return Response::from_parts(parts, body);
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut outcome) if outcome["resourceType"] == "OperationOutcome" => {
            if let Some(text) = outcome["issue"][0]["diagnostics"].as_str() {
                outcome["issue"][0]["diagnostics"] =
                    format!("{text} (request id {request_id})").into();
            }
            Bytes::from(outcome.to_string())
        }
        _ => bytes,
    };
    let mut response = Response::from_parts(parts, Body::Full(body));
    response.headers_mut().remove(http::header::CONTENT_LENGTH);
    response
}

/// A response whose body writes the request's log line once it is sent.
fn logged(response: Response<Body>, record: RequestRecord) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let body = match body {
        Body::Full(bytes) => {
            record.finish(bytes.len() as u64);
            Body::Full(bytes)
        }
        Body::Stream(stream) => Body::Stream(Box::pin(LoggedStream::new(stream, record))),
    };
    Response::from_parts(parts, body)
}
