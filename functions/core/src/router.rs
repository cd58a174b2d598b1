//! The FHIR HTTP API as one function, `http::Request -> http::Response`, shared by the local server
//! and the API Lambda.
//!
//! Routes (below the base path, `/fhir` by default):
//! `GET metadata`; `GET|POST $export`, `Patient/$export`, `Group/{id}/$export`;
//! `GET|DELETE $export-status/{id}`; `GET $export-output/{job}/{type}/{file}`.

use crate::accept::{FHIR_JSON, resource_content_type};
use crate::engine::{Exporter, JobView};
use crate::error::ApiError;
use crate::fhir::capability::capability_statement;
use crate::fhir::outcome::{IssueCode, operation_outcome};
use crate::fhir::time::now_millis;
use crate::gzip::{accepts_gzip, gzip_stream};
use crate::ids::new_id;
use crate::params::{
    ExportLevel, KickoffHeaders, KickoffMethod, check_kickoff_headers, parse_kickoff,
};
use crate::ports::{ByteStream, Dispatcher};
use crate::request_log::{LoggedStream, RequestRecord};
use bytes::Bytes;
use http::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_LOCATION,
    CONTENT_TYPE, EXPIRES, HOST, RETRY_AFTER, VARY,
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

/// The export a kick-off created, handed from the kick-off to the request log.
#[derive(Clone)]
struct ExportId(String);

impl Api {
    /// `base_path` is where the FHIR API lives, e.g. `/fhir`.
    pub fn new(exporter: Arc<Exporter>, dispatcher: Arc<dyn Dispatcher>, base_path: &str) -> Self {
        Api {
            exporter,
            dispatcher,
            base_path: base_path.trim_end_matches('/').to_string(),
        }
    }

    /// Answers one request. Every error is an OperationOutcome, in the JSON flavour the request's
    /// `Accept` asks for. Each response carries `X-Request-Id`, and each request gets one line in
    /// the request log once its body is sent.
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Body> {
        self.respond(request, None).await
    }

    /// Answers a request the transport already refused (e.g. a body over [`MAX_BODY`]) with
    /// `error`, through the same log and headers as every other answer.
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
        let routed = self.route(&request);
        if let Ok(route) = &routed {
            record.route = format!("{}{}", self.base_path, route.template());
            if let Some(id) = route.export_id() {
                record.set_export_id(id);
            }
        }
        let mut response = match (refused, routed) {
            (Some(error), _) | (None, Err(error)) => Err(error),
            (None, Ok(route)) => self.answer(route, &request).await,
        }
        .unwrap_or_else(|error| error_response(&error, accept.as_deref()));
        if let Some(ExportId(id)) = response.extensions_mut().remove::<ExportId>() {
            record.set_export_id(&id);
        }
        record.status = response.status().as_u16();
        response
            .headers_mut()
            .insert("x-request-id", header(&record.request_id));
        logged(response, record)
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
    ) -> Result<Response<Body>, ApiError> {
        let method = request.method();
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        match (route, method) {
            (Route::Metadata, &Method::GET) => Ok(self.metadata(request)),
            (Route::Kickoff(level), &Method::GET | &Method::POST) => {
                self.kickoff(request, level).await
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
            (Route::Download { key, .. }, &Method::GET) => self.download(request, &key).await,
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                IssueCode::NotSupported,
                format!("method {method} is not allowed on {}", request.uri().path()),
            )),
        }
    }

    fn metadata(&self, request: &Request<Bytes>) -> Response<Body> {
        let statement = capability_statement(
            &self.base_url(request),
            env!("CARGO_PKG_VERSION"),
            "2026-11-22",
        );
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        json_response(StatusCode::OK, resource_content_type(accept), &statement)
    }

    async fn kickoff(
        &self,
        request: &Request<Bytes>,
        level: ExportLevel,
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
        let params = parse_kickoff(
            &level,
            method,
            &query,
            Some(request.body()),
            &headers,
            now_millis(),
        )?;
        let client = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (job, is_new) = self
            .exporter
            .kickoff_for(level, params, self.request_url(request), client)
            .await?;
        if is_new && let Err(e) = self.dispatcher.start(&job.id).await {
            self.exporter
                .fail(&job.id, &format!("could not start the export: {e}"))
                .await
                .ok();
            return Err(ApiError::internal(format!(
                "could not start the export: {e}"
            )));
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
        self.dispatcher.cancel(job_id).await?;
        self.exporter.discard(job_id).await?;
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
        let stream = self
            .exporter
            .ports
            .output
            .open(&part.key)
            .await?
            .ok_or_else(gone)?;
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
