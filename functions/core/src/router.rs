//! The FHIR HTTP API as one function, `http::Request -> http::Response`, shared by the local server
//! and the API Lambda (behind the gateway, which authenticates and logs each request).
//!
//! Routes (below the base path, `/fhir` by default):
//! `GET metadata`; `GET|POST $export`, `Patient/$export`, `Group/{id}/$export`;
//! `GET|DELETE $export-status/{id}`; `GET $export-output/{job}/{type}/{file}`.
//!
//! Everything but `metadata` needs a principal with FHIR scopes. An export belongs to the principal
//! that started it: to anyone else its status, pages and files do not exist (404, not 403).

use crate::accept::{FHIR_JSON, resource_content_type};
use crate::engine::{Exporter, JobView};
use crate::error::{ApiError, StoreError};
use crate::fhir::capability::capability_statement;
use crate::fhir::outcome::{IssueCode, operation_outcome};
use crate::fhir::time::now_millis;
use crate::gzip::{accepts_gzip, gzip_stream};
use crate::params::{
    ExportLevel, ExportParams, KickoffHeaders, KickoffMethod, check_kickoff_headers, parse_kickoff,
};
use crate::ports::{ByteStream, Dispatcher};
use bytes::Bytes;
use export_auth::{AuthFailure, Principal, Scopes};
use http::header::{
    ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_TYPE,
    EXPIRES, HOST, LOCATION, RETRY_AFTER, VARY, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;

const FHIR_NDJSON: &str = "application/fhir+ndjson";

/// Largest request body accepted (a kick-off `Parameters` resource).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A response body: small JSON in memory, or a file streamed from storage.
pub enum Body {
    Full(Bytes),
    Stream(ByteStream),
}

/// The FHIR Bulk Data API.
pub struct Api {
    exporter: Arc<Exporter>,
    dispatcher: Arc<dyn Dispatcher>,
    base_path: String,
    /// Whether clients need tokens (the CapabilityStatement then declares the token endpoint).
    secured: bool,
}

/// What the router tells the request log about a request it answered (a response extension):
/// the route template, and the export and file it was about.
#[derive(Debug, Clone, Default)]
pub struct RouteInfo {
    pub route: String,
    pub export_id: Option<String>,
    /// `<type>/<file>` of a download.
    pub file: Option<String>,
}

/// The route a path names.
enum Route {
    Metadata,
    Kickoff(ExportLevel),
    Status(String),
    ManifestPage(String, usize),
    Download { job: String, key: String },
}

impl Route {
    /// The route as the request log names it, without the values the path carries.
    fn template(&self) -> &'static str {
        match self {
            Route::Metadata => "/metadata",
            Route::Kickoff(ExportLevel::System) => "/$export",
            Route::Kickoff(ExportLevel::Patient) => "/Patient/$export",
            Route::Kickoff(ExportLevel::Group(_)) => "/Group/{id}/$export",
            Route::Status(_) => "/$export-status/{id}",
            Route::ManifestPage(..) => "/$export-status/{id}/page/{n}",
            Route::Download { .. } => "/$export-output/{id}/{type}/{file}",
        }
    }

    /// The export a status, page or download request is about.
    fn export_id(&self) -> Option<&str> {
        match self {
            Route::Status(id) | Route::ManifestPage(id, _) | Route::Download { job: id, .. } => {
                Some(id)
            }
            _ => None,
        }
    }
}

impl Api {
    /// `base_path` is where the FHIR API lives, e.g. `/fhir`; `secured` says whether its clients
    /// need tokens.
    pub fn new(
        exporter: Arc<Exporter>,
        dispatcher: Arc<dyn Dispatcher>,
        base_path: &str,
        secured: bool,
    ) -> Self {
        Api {
            exporter,
            dispatcher,
            base_path: base_path.trim_end_matches('/').to_string(),
            secured,
        }
    }

    /// The base path, e.g. `/fhir`.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// Whether a request counts against its principal's rate limit (kick-offs and status
    /// polls; downloads do not, a manifest may list hundreds of files).
    pub fn is_rate_limited(&self, request: &Request<Bytes>) -> bool {
        matches!(
            self.route(request),
            Ok(Route::Kickoff(_) | Route::Status(_) | Route::ManifestPage(..))
        )
    }

    /// Whether a request may be answered without a principal (the CapabilityStatement).
    pub fn is_public(&self, request: &Request<Bytes>) -> bool {
        matches!(self.route(request), Ok(Route::Metadata))
    }

    /// Answers one request for `principal` (`None` only for public routes). Every error is an
    /// OperationOutcome, in the JSON flavour the request's `Accept` asks for. The response
    /// carries a [`RouteInfo`] extension for the request log.
    pub async fn handle(
        &self,
        request: &Request<Bytes>,
        principal: Option<&Principal>,
    ) -> Response<Body> {
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        let mut info = RouteInfo::default();
        let routed = self.route(request);
        if let Ok(route) = &routed {
            info.route = format!("{}{}", self.base_path, route.template());
            info.export_id = route.export_id().map(String::from);
        }
        let answered = match routed {
            Err(error) => Err(error),
            Ok(Route::Metadata) if request.method() == Method::GET => Ok(self.metadata(request)),
            Ok(Route::Metadata) => Err(method_not_allowed(request)),
            Ok(route) => match principal {
                Some(principal) => self.answer(route, request, principal, &mut info).await,
                None => return unauthorized_response(&AuthFailure::Missing, accept),
            },
        };
        let mut response = answered.unwrap_or_else(|error| error_response(&error, accept));
        response.extensions_mut().insert(info);
        response
    }

    /// The route a request's path names.
    fn route(&self, request: &Request<Bytes>) -> Result<Route, ApiError> {
        let path = request.uri().path();
        let Some(rest) = path.strip_prefix(&self.base_path) else {
            return Err(ApiError::not_found(format!(
                "no FHIR endpoint at {path}; the FHIR base is {}",
                self.base_path
            )));
        };
        let segments: Vec<String> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        Ok(match segments.as_slice() {
            ["metadata"] => Route::Metadata,
            ["$export"] => Route::Kickoff(ExportLevel::System),
            ["Patient", "$export"] => Route::Kickoff(ExportLevel::Patient),
            ["Group", id, "$export"] => Route::Kickoff(ExportLevel::Group(id.to_string())),
            ["$export-status", id] => Route::Status(id.to_string()),
            ["$export-status", id, "page", n] => match n.parse::<usize>() {
                Ok(n) => Route::ManifestPage(id.to_string(), n),
                Err(_) => return Err(ApiError::not_found(format!("no manifest page {n}"))),
            },
            ["$export-output", job, resource_type, file] => Route::Download {
                job: job.to_string(),
                key: format!("{job}/{resource_type}/{file}"),
            },
            _ => return Err(ApiError::not_found(format!("no FHIR endpoint at {path}"))),
        })
    }

    async fn answer(
        &self,
        route: Route,
        request: &Request<Bytes>,
        principal: &Principal,
        info: &mut RouteInfo,
    ) -> Result<Response<Body>, ApiError> {
        let method = request.method();
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        let Some(scopes) = principal.fhir_scopes() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                IssueCode::Forbidden,
                "this credential cannot use the FHIR Bulk Data API: it needs a SMART Backend Services access token",
            ));
        };
        if let Some(id) = route.export_id() {
            self.owned_job(id, principal).await?;
        }
        match (route, method) {
            (Route::Kickoff(level), &Method::GET | &Method::POST) => {
                let response = self.kickoff(request, level, principal, &scopes).await?;
                info.export_id = response.extensions().get::<ExportId>().map(|e| e.0.clone());
                Ok(response)
            }
            (Route::Status(id), &Method::GET) => self.status(request, &id).await,
            (Route::Status(id), &Method::DELETE) => self.cancel(&id, accept).await,
            (Route::ManifestPage(id, n), &Method::GET) => {
                let page = self
                    .exporter
                    .manifest_page(&id, n, &self.base_url(request))
                    .await?
                    .ok_or_else(|| {
                        ApiError::not_found(format!("export {id} has no manifest page {n}"))
                    })?;
                Ok(json_response(StatusCode::OK, "application/json", &page))
            }
            (Route::Download { key, .. }, &Method::GET) => {
                info.file = key.split_once('/').map(|(_, file)| file.to_string());
                self.download(request, &key).await
            }
            _ => Err(method_not_allowed(request)),
        }
    }

    fn metadata(&self, request: &Request<Bytes>) -> Response<Body> {
        let base = self.base_url(request);
        let token_url = self
            .secured
            .then(|| format!("{}/auth/token", self.origin(&base)));
        let statement = capability_statement(
            &base,
            env!("CARGO_PKG_VERSION"),
            "2026-11-22",
            token_url.as_deref(),
        );
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        json_response(StatusCode::OK, resource_content_type(accept), &statement)
    }

    /// The job `id` if `principal` may see it: its owner does, and the local administrator sees
    /// every export. To anyone else it does not exist.
    async fn owned_job(&self, id: &str, principal: &Principal) -> Result<(), ApiError> {
        let job = self.exporter.ports.jobs.get(id).await?;
        let visible = job.is_some_and(|job| {
            *principal == Principal::LocalAdmin || job.owner.as_deref() == Some(&principal.id())
        });
        if visible {
            Ok(())
        } else {
            Err(unknown_job(id))
        }
    }

    async fn kickoff(
        &self,
        request: &Request<Bytes>,
        level: ExportLevel,
        principal: &Principal,
        scopes: &Scopes,
    ) -> Result<Response<Body>, ApiError> {
        let headers = KickoffHeaders {
            prefer: request
                .headers()
                .get_all("prefer")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(String::from)
                .collect(),
            accept: request
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        };
        check_kickoff_headers(&headers)?;
        let method = if request.method() == Method::POST {
            KickoffMethod::Post
        } else {
            KickoffMethod::Get
        };
        let query: Vec<(String, String)> =
            form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let mut params = parse_kickoff(
            &level,
            method,
            &query,
            Some(request.body()),
            &headers,
            now_millis(),
        )?;
        limit_to_scopes(&mut params, scopes)?;
        let (job, is_new) = self
            .exporter
            .kickoff_for(level, params, self.request_url(request), &principal.id())
            .await?;
        if is_new && let Err(e) = self.dispatcher.start(&job.id).await {
            tracing::error!(export_id = %job.id, error = %e, "could not start the export");
            self.exporter
                .fail(&job.id, "the export could not be started")
                .await
                .ok();
            return Err(ApiError::internal(crate::error::INTERNAL_ERROR));
        }
        let status_url = format!("{}/$export-status/{}", self.base_url(request), job.id);
        let outcome = operation_outcome(
            "information",
            IssueCode::Informational,
            &format!("export accepted; poll {status_url}"),
        );
        let mut response = json_response(StatusCode::ACCEPTED, FHIR_JSON, &outcome);
        response
            .headers_mut()
            .insert(CONTENT_LOCATION, header(&status_url));
        let mut applied = vec!["respond-async"];
        if job.params.lenient {
            applied.push("handling=lenient");
        }
        if job.params.separate_status {
            applied.push("separate-export-status");
        }
        response
            .headers_mut()
            .insert("preference-applied", header(&applied.join(", ")));
        response.extensions_mut().insert(ExportId(job.id));
        Ok(response)
    }

    async fn status(
        &self,
        request: &Request<Bytes>,
        job_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let Some(view) = self.exporter.view(job_id, &self.base_url(request)).await? else {
            return Err(unknown_job(job_id));
        };
        let mut response = match view.state {
            JobView::Running { progress, partial } => {
                let mut response = match partial {
                    Some(manifest) => {
                        json_response(StatusCode::ACCEPTED, "application/json", &manifest)
                    }
                    None => empty(StatusCode::ACCEPTED),
                };
                let headers = response.headers_mut();
                headers.insert("x-progress", header(&progress));
                headers.insert(
                    RETRY_AFTER,
                    header(&self.exporter.settings.poll_retry_after.to_string()),
                );
                response
            }
            JobView::Completed { manifest, expires } => {
                let mut response = json_response(StatusCode::OK, "application/json", &manifest);
                let expires = SystemTime::from(expires);
                response
                    .headers_mut()
                    .insert(EXPIRES, header(&httpdate::fmt_http_date(expires)));
                response
            }
            JobView::Failed { diagnostics } => {
                let error = ApiError::internal(diagnostics);
                let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
                if !view.separate_status {
                    return Err(error);
                }
                error_response(&error, accept)
            }
        };
        if view.separate_status {
            // The HTTP status answers the poll itself; the export's own is in X-Export-Status.
            let export_status = response.status();
            *response.status_mut() = StatusCode::OK;
            let headers = response.headers_mut();
            headers.insert(
                "x-export-status",
                header(&format!(
                    "{} {}",
                    export_status.as_u16(),
                    export_status.canonical_reason().unwrap_or("")
                )),
            );
            headers.insert(
                "preference-applied",
                HeaderValue::from_static("separate-export-status"),
            );
        }
        Ok(response)
    }

    async fn cancel(&self, job_id: &str, accept: Option<&str>) -> Result<Response<Body>, ApiError> {
        if !self.exporter.mark_cancelled(job_id).await? {
            return Err(unknown_job(job_id));
        }
        // Stopping the work can take a moment (items stop after their page): done in a task of
        // its own, so a client that gives up waiting does not leave the files and the lock behind.
        let (exporter, dispatcher, id) = (
            self.exporter.clone(),
            self.dispatcher.clone(),
            job_id.to_string(),
        );
        tokio::spawn(async move {
            dispatcher.cancel(&id).await?;
            exporter.discard(&id).await
        })
        .await
        .map_err(|e| StoreError::new(format!("cancelling ended abnormally: {e}")))??;
        let outcome = operation_outcome(
            "information",
            IssueCode::Informational,
            &format!("export {job_id} was cancelled and its files deleted"),
        );
        Ok(json_response(
            StatusCode::ACCEPTED,
            resource_content_type(accept),
            &outcome,
        ))
    }

    /// Streams an export file; with `Accept-Encoding: gzip` it is gzipped on the fly.
    async fn download(
        &self,
        request: &Request<Bytes>,
        key: &str,
    ) -> Result<Response<Body>, ApiError> {
        let gone = || ApiError::not_found(format!("no export file {key}"));
        let part = self
            .exporter
            .downloadable_part(key)
            .await?
            .ok_or_else(gone)?;
        let output = &self.exporter.ports.output;
        let Some(stream) = output.open(&part.key).await? else {
            // Storage that serves files itself (S3): send the client there, with a fresh
            // short-lived URL, now that its token and ownership are checked.
            let url = output.redirect_url(&part.key).await?.ok_or_else(gone)?;
            let mut response = empty(StatusCode::TEMPORARY_REDIRECT);
            response.headers_mut().insert(LOCATION, header(&url));
            return Ok(response);
        };
        let gzip = request
            .headers()
            .get(ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(accepts_gzip);
        let mut response = Response::new(Body::Stream(if gzip {
            gzip_stream(stream)
        } else {
            stream
        }));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_NDJSON));
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        if gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        } else {
            headers.insert(CONTENT_LENGTH, header(&part.bytes.to_string()));
        }
        Ok(response)
    }

    /// The scheme and host of a base URL (`https://example.org` of `https://example.org/fhir`).
    fn origin<'a>(&self, base_url: &'a str) -> &'a str {
        base_url.strip_suffix(&self.base_path).unwrap_or(base_url)
    }

    /// The absolute FHIR base URL as the client sees it (scheme and host from the request).
    pub fn base_url(&self, request: &Request<Bytes>) -> String {
        let headers = request.headers();
        let value = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
        };
        let scheme = value("x-forwarded-proto")
            .filter(|s| s == "https" || s == "http")
            .unwrap_or_else(|| "http".into());
        let host = value("x-forwarded-host")
            .or_else(|| {
                headers
                    .get(HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            })
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into());
        format!("{scheme}://{host}{}", self.base_path)
    }

    fn request_url(&self, request: &Request<Bytes>) -> String {
        let base = self.base_url(request);
        let path = request
            .uri()
            .path()
            .strip_prefix(&self.base_path)
            .unwrap_or("");
        match request.uri().query() {
            Some(q) if !q.is_empty() => format!("{base}{path}?{q}"),
            _ => format!("{base}{path}"),
        }
    }
}

fn method_not_allowed(request: &Request<Bytes>) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// The export a kick-off created, handed from the kick-off to the request log.
#[derive(Clone)]
struct ExportId(String);

/// Narrows a kick-off to what the client's scopes allow: a `_type` beyond them is refused, and
/// without `_type` only the granted types are exported (the error file says so).
fn limit_to_scopes(params: &mut ExportParams, scopes: &Scopes) -> Result<(), ApiError> {
    let Some(granted) = scopes.types() else {
        return Ok(());
    };
    match &params.types {
        Some(types) => {
            let refused: Vec<&str> = types
                .iter()
                .map(String::as_str)
                .filter(|t| !scopes.allows(t))
                .collect();
            if !refused.is_empty() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    IssueCode::Forbidden,
                    format!(
                        "_type asks for {} beyond the access token's scopes ({})",
                        refused.join(", "),
                        scopes.to_scope_string()
                    ),
                ));
            }
        }
        None => {
            params.types = Some(granted.iter().cloned().collect());
            params.notes.push(format!(
                "the access token's scopes allow only {}; other resource types were not exported",
                granted.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

fn unknown_job(job_id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no export {job_id}: it never existed, was cancelled, or has expired"
    ))
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, content_type: &'static str, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The 401 (or 429, 500) for credentials the gateway refused, as an OperationOutcome with the
/// `WWW-Authenticate` challenge of RFC 6750.
pub fn unauthorized_response(failure: &AuthFailure, accept: Option<&str>) -> Response<Body> {
    let code = match failure {
        AuthFailure::RateLimited { .. } => IssueCode::Throttled,
        AuthFailure::Internal(_) => IssueCode::Exception,
        _ => IssueCode::Login,
    };
    let mut error = ApiError::new(failure.status(), code, failure.message());
    if let AuthFailure::RateLimited { retry_after } = failure {
        error.retry_after = Some(*retry_after);
    }
    let mut response = error_response(&error, accept);
    if let Some(challenge) = failure.challenge() {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, header(&challenge));
    }
    response
}

/// The OperationOutcome response for an error, labelled as the request's `Accept` asks
/// (see [`resource_content_type`]).
pub fn error_response(error: &ApiError, accept: Option<&str>) -> Response<Body> {
    let mut response = json_response(
        error.status,
        resource_content_type(accept),
        &error.outcome(),
    );
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, header(&seconds.to_string()));
    }
    response
}
