//! The study export API, `/api/v1/exports/…`, as `http::Request → http::Response` behind the
//! gateway (which authenticates). Every error has the EXP shape; every endpoint is described in
//! the OpenAPI document generated from these handlers and the request and response types.

use crate::api::*;
use crate::audit::{AuditAction, AuditQuery};
use crate::error::{ErrorBody, StudyError};
use crate::jobs::{IdempotencyRecord, JobQuery, StudyJob, StudyJobStatus};
use crate::model::SUBJECT_STATUSES;
use crate::options::{CsvEncoding, Delimiter, ExportType};
use crate::package::hex;
use crate::roles;
use crate::service::{Caller, ExportRequest, StudyService, now_ms};
use bytes::Bytes;
use export_core::Body;
use http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::OpenApi;

/// The API's base path.
pub const BASE: &str = "/api/v1/exports";
/// The OpenAPI document's path.
pub const OPENAPI: &str = "/api/v1/openapi.json";

/// The study export API.
pub struct StudyApi {
    pub service: Arc<StudyService>,
}

/// What a request names.
enum Route {
    Data,
    Dashboard,
    Report,
    Bulk,
    Jobs,
    Job(String),
    Download(String),
    Files(String),
    File(String, String),
    Formats,
    Audit,
    Deliveries,
    Studies,
}

impl Route {
    /// The methods the route answers (the `Allow` header of a 405).
    fn allowed(&self) -> &'static str {
        match self {
            Route::Data | Route::Dashboard | Route::Report | Route::Bulk => "POST",
            Route::Job(_) => "GET, DELETE",
            _ => "GET",
        }
    }

    fn template(&self) -> &'static str {
        match self {
            Route::Data => "/data",
            Route::Dashboard => "/dashboard",
            Route::Report => "/report",
            Route::Bulk => "/bulk",
            Route::Jobs => "/jobs",
            Route::Job(_) => "/jobs/{id}",
            Route::Download(_) => "/jobs/{id}/download",
            Route::Files(_) => "/jobs/{id}/files",
            Route::File(..) => "/jobs/{id}/files/{name}",
            Route::Formats => "/formats",
            Route::Audit => "/audit",
            Route::Deliveries => "/webhooks/deliveries",
            Route::Studies => "/studies",
        }
    }
}

/// What the router tells the request log (a response extension, like the FHIR router's).
pub use export_core::router::RouteInfo;

impl StudyApi {
    pub fn new(service: Arc<StudyService>) -> Self {
        StudyApi { service }
    }

    /// Whether `path` is this API's.
    pub fn owns(path: &str) -> bool {
        path == OPENAPI || path == BASE || path.starts_with(&format!("{BASE}/"))
    }

    /// Whether a request needs no principal (the OpenAPI document).
    pub fn is_public(path: &str) -> bool {
        path == OPENAPI
    }

    /// Answers one request of `caller` (`None` only for public routes).
    pub async fn handle(
        &self,
        request: &Request<Bytes>,
        caller: Option<&Caller>,
    ) -> Response<Body> {
        let request_id = caller.map_or(String::new(), |c| c.request_id.clone());
        let path = request.uri().path();
        let mut info = RouteInfo::default();
        let answered = if path == OPENAPI {
            info.route = OPENAPI.into();
            Ok(json(StatusCode::OK, &openapi()))
        } else {
            match (route(path), caller) {
                (Err(e), _) => Err(e),
                (Ok(r), None) => {
                    info.route = format!("{BASE}{}", r.template());
                    Err(StudyError::unauthenticated(
                        "this endpoint needs a bearer token or an API key",
                        None,
                    ))
                }
                (Ok(r), Some(caller)) => {
                    info.route = format!("{BASE}{}", r.template());
                    self.answer(r, request, caller, &mut info).await
                }
            }
        };
        let mut response = answered.unwrap_or_else(|e| error_response(&e, &request_id));
        response.extensions_mut().insert(info);
        response
    }

    async fn answer(
        &self,
        route: Route,
        request: &Request<Bytes>,
        caller: &Caller,
        info: &mut RouteInfo,
    ) -> Result<Response<Body>, StudyError> {
        let base = base_url(request);
        let method = request.method().clone();
        let query = query_map(request);
        match (route, &method) {
            (Route::Data, &Method::POST) => create_data(self, request, caller, &base).await,
            (Route::Dashboard, &Method::POST) => {
                create_study_export(self, request, caller, &base, ExportType::Dashboard).await
            }
            (Route::Report, &Method::POST) => {
                create_study_export(self, request, caller, &base, ExportType::Report).await
            }
            (Route::Bulk, &Method::POST) => create_bulk(self, request, caller, &base).await,
            (Route::Jobs, &Method::GET) => list_jobs(self, &query, caller, &base).await,
            (Route::Job(id), &Method::GET) => {
                info.export_id = Some(id.clone());
                let job = self.service.visible_job(caller, &id).await?;
                Ok(json(StatusCode::OK, &JobView::of(&job, &base)))
            }
            (Route::Job(id), &Method::DELETE) => {
                info.export_id = Some(id.clone());
                let job = self.service.cancel_or_delete(caller, &id).await?;
                Ok(json(StatusCode::OK, &JobView::of(&job, &base)))
            }
            (Route::Download(id), &Method::GET) => {
                info.export_id = Some(id.clone());
                self.download(caller, &id, None, info).await
            }
            (Route::Files(id), &Method::GET) => {
                info.export_id = Some(id.clone());
                let job = self.service.visible_job(caller, &id).await?;
                if job.status != StudyJobStatus::Completed {
                    return Err(StudyError::conflict(format!(
                        "export job {id} is {}: it has no files to list",
                        job.status.as_str()
                    )));
                }
                let files = job
                    .download
                    .iter()
                    .chain(&job.files)
                    .map(|f| FileView::of(f, &job.id, &base))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &FileList {
                        job_id: job.id,
                        files,
                    },
                ))
            }
            (Route::File(id, name), &Method::GET) => {
                info.export_id = Some(id.clone());
                self.download(caller, &id, Some(&name), info).await
            }
            (Route::Formats, &Method::GET) => formats(self, &query, caller).await,
            (Route::Audit, &Method::GET) => audit(self, &query, caller, &base).await,
            (Route::Deliveries, &Method::GET) => deliveries(self, &query, caller).await,
            (Route::Studies, &Method::GET) => studies(self, caller).await,
            (route, _) => Err(StudyError::method_not_allowed(&method, route.allowed())),
        }
    }

    /// Streams a job's download (or one of its files), with its digest; on storage that serves
    /// files itself, redirects to a short-lived URL.
    async fn download(
        &self,
        caller: &Caller,
        id: &str,
        name: Option<&str>,
        info: &mut RouteInfo,
    ) -> Result<Response<Body>, StudyError> {
        let file = self.service.downloadable(caller, id, name).await?;
        info.file = Some(file.name.clone());
        let output = &self.service.ports.output;
        let mut response = match output.open(&file.key).await? {
            Some(stream) => {
                let mut r = Response::new(Body::Stream(stream));
                r.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(file.size));
                r
            }
            None => {
                let url = output
                    .redirect_url(&file.key)
                    .await?
                    .ok_or_else(|| StudyError::not_found("the file is no longer stored"))?;
                let mut r = Response::new(Body::Full(Bytes::new()));
                *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                r.headers_mut().insert(LOCATION, header(&url));
                r
            }
        };
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, header(&file.content_type));
        headers.insert(
            CONTENT_DISPOSITION,
            header(&format!("attachment; filename=\"{}\"", file.name)),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // RFC 9530: the digest of the file as stored (the same bytes a redirect serves).
        headers.insert("repr-digest", header(&repr_digest(&file.sha256)));
        Ok(response)
    }
}

/// `sha-256=:<base64>:` from a hex digest.
fn repr_digest(hex_sha256: &str) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..hex_sha256.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(hex_sha256.get(i..i + 2)?, 16).ok())
        .collect();
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn route(path: &str) -> Result<Route, StudyError> {
    let rest = path.strip_prefix(BASE).unwrap_or("");
    let segments: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    Ok(match segments.as_slice() {
        ["data"] => Route::Data,
        ["dashboard"] => Route::Dashboard,
        ["report"] => Route::Report,
        ["bulk"] => Route::Bulk,
        ["jobs"] => Route::Jobs,
        ["jobs", id] => Route::Job(id.to_string()),
        ["jobs", id, "download"] => Route::Download(id.to_string()),
        ["jobs", id, "files"] => Route::Files(id.to_string()),
        ["jobs", id, "files", name] => Route::File(id.to_string(), name.to_string()),
        ["formats"] => Route::Formats,
        ["audit"] => Route::Audit,
        ["webhooks", "deliveries"] => Route::Deliveries,
        ["studies"] => Route::Studies,
        _ => {
            return Err(StudyError::not_found(format!(
                "there is no endpoint {path}"
            )));
        }
    })
}

/// The study API's base URL as the client sees it.
fn base_url(request: &Request<Bytes>) -> String {
    let headers = request.headers();
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
    };
    let scheme = first("x-forwarded-proto")
        .filter(|s| s == "https" || s == "http")
        .unwrap_or_else(|| "http".into());
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    format!("{scheme}://{host}{BASE}")
}

/// The query's parameters.
fn query_map(request: &Request<Bytes>) -> BTreeMap<String, String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A free-text filter; given empty (`?requestor=`, as forms send it) it filters nothing.
fn text_filter(query: &BTreeMap<String, String>, name: &str) -> Option<String> {
    query.get(name).filter(|v| !v.is_empty()).cloned()
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("a response serializes");
    let mut response = Response::new(Body::Full(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The EXP-shaped response of an error.
pub fn error_response(error: &StudyError, request_id: &str) -> Response<Body> {
    let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut response = json(error.status, &error.body(request_id, &timestamp));
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let Some(challenge) = &error.challenge {
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, header(challenge));
    }
    if let Some(allow) = &error.allow {
        response
            .headers_mut()
            .insert(http::header::ALLOW, header(allow));
    }
    response
}

/// A JSON body read into `T`; errors name the field at fault.
fn read_body<T: DeserializeOwned>(request: &Request<Bytes>) -> Result<T, StudyError> {
    let media = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/json") {
        return Err(StudyError::validation(
            "body",
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(request.body());
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "body".to_string()
        } else {
            field
        };
        StudyError::validation(&field, format!("{field}: {}", e.inner()))
    })
}

/// The `Idempotency-Key` of a POST, with the request's fingerprint.
fn idempotency(
    request: &Request<Bytes>,
    caller: &Caller,
) -> Result<Option<(String, String)>, StudyError> {
    let Some(key) = request.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        .ok_or_else(|| {
            StudyError::validation(
                "Idempotency-Key",
                "Idempotency-Key must be 1 to 255 visible characters",
            )
        })?;
    let mut hasher = Sha256::new();
    hasher.update(request.method().as_str());
    hasher.update(request.uri().path());
    hasher.update(request.body());
    Ok(Some((
        format!("{}#{key}", caller.principal.id()),
        hex(&hasher.finalize()),
    )))
}

/// Creates the jobs of `requests`, or, for a repeated `Idempotency-Key`, finds the jobs the
/// first request created.
async fn create_jobs(
    api: &StudyApi,
    request: &Request<Bytes>,
    caller: &Caller,
    requests: Vec<ExportRequest>,
) -> Result<Vec<StudyJob>, StudyError> {
    let key = idempotency(request, caller)?;
    let service = &api.service;
    if let Some((key, fingerprint)) = &key {
        let probe = IdempotencyRecord {
            key: key.clone(),
            fingerprint: fingerprint.clone(),
            job_ids: Vec::new(),
            created: now_ms(),
        };
        let held = service
            .ports
            .jobs
            .remember_idempotency(&probe, now_ms())
            .await?;
        if held != probe {
            if held.fingerprint != *fingerprint {
                return Err(StudyError::conflict(
                    "this Idempotency-Key was used within the last 24 hours for a different request",
                ));
            }
            if held.job_ids.is_empty() {
                return Err(StudyError::conflict(
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                ));
            }
            let mut jobs = Vec::new();
            for id in &held.job_ids {
                jobs.push(service.visible_job(caller, id).await?);
            }
            return Ok(jobs);
        }
    }
    let mut jobs = Vec::new();
    for r in requests {
        jobs.push(service.create(caller, r).await?);
    }
    if let Some((key, fingerprint)) = key {
        let record = IdempotencyRecord {
            key,
            fingerprint,
            job_ids: jobs.iter().map(|j| j.id.clone()).collect(),
            created: now_ms(),
        };
        service.ports.jobs.complete_idempotency(&record).await?;
    }
    Ok(jobs)
}

fn accepted(job: &StudyJob, base: &str) -> Response<Body> {
    let view = JobView::of(job, base);
    let mut response = json(StatusCode::ACCEPTED, &view);
    response
        .headers_mut()
        .insert(LOCATION, header(&view.links.self_));
    response
}

/// Creates a data export (FHIR JSON, Sites CSV or Participants CSV).
#[utoipa::path(post, path = "/api/v1/exports/data", tag = "exports",
    request_body = DataExportRequest,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$",
        description = "the same key and body within 24 h return the same job")),
    responses(
        (status = 202, description = "the job, queued", body = JobView, headers(("Location" = String, description = "the job"))),
        (status = 400, description = "EXP002: an invalid field", body = ErrorBody),
        (status = 422, description = "EXP002: a site or date range the study cannot have", body = ErrorBody),
        (status = 401, description = "EXP003: no valid credentials", body = ErrorBody),
        (status = 403, description = "EXP003: the role may not", body = ErrorBody),
        (status = 404, description = "EXP001: no such study", body = ErrorBody),
        (status = 409, description = "EXP004: an Idempotency-Key conflict", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
async fn create_data(
    api: &StudyApi,
    request: &Request<Bytes>,
    caller: &Caller,
    base: &str,
) -> Result<Response<Body>, StudyError> {
    let body: DataExportRequest = read_body(request)?;
    if !body.export_type.is_data() {
        return Err(StudyError::validation(
            "type",
            format!(
                "type {} is not a data export; POST /{} instead",
                body.export_type.as_str(),
                body.export_type.as_str()
            ),
        ));
    }
    let jobs = create_jobs(
        api,
        request,
        caller,
        vec![ExportRequest {
            study_id: body.study_id,
            export_type: body.export_type,
            filters: body.filters,
            options: body.options,
        }],
    )
    .await?;
    Ok(accepted(&jobs[0], base))
}

/// Creates a dashboard snapshot or a study report.
#[utoipa::path(post, path = "/api/v1/exports/dashboard", tag = "exports",
    request_body = StudyExportRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn create_study_export(
    api: &StudyApi,
    request: &Request<Bytes>,
    caller: &Caller,
    base: &str,
    export_type: ExportType,
) -> Result<Response<Body>, StudyError> {
    let body: StudyExportRequest = read_body(request)?;
    let jobs = create_jobs(
        api,
        request,
        caller,
        vec![ExportRequest {
            study_id: body.study_id,
            export_type,
            filters: body.filters,
            options: body.options,
        }],
    )
    .await?;
    Ok(accepted(&jobs[0], base))
}

/// Creates a study report (the same body as the dashboard).
#[utoipa::path(post, path = "/api/v1/exports/report", tag = "exports",
    request_body = StudyExportRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn create_report() {}

/// Creates several exports of one study; each becomes its own job.
#[utoipa::path(post, path = "/api/v1/exports/bulk", tag = "exports",
    request_body = BulkRequest,
    responses((status = 202, body = BulkResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn create_bulk(
    api: &StudyApi,
    request: &Request<Bytes>,
    caller: &Caller,
    base: &str,
) -> Result<Response<Body>, StudyError> {
    let body: BulkRequest = read_body(request)?;
    if body.exports.is_empty() || body.exports.len() > 10 {
        return Err(StudyError::validation(
            "exports",
            "exports must list 1 to 10 exports",
        ));
    }
    // Every export is checked before any job is created: all or nothing.
    let (membership, data) = api.service.member(caller, &body.study_id).await?;
    for (i, item) in body.exports.iter().enumerate() {
        crate::service::validate_filters(&data, &item.filters).map_err(|mut e| {
            e.field = e.field.map(|f| format!("exports[{i}].{f}"));
            e
        })?;
        roles::authorize_create(&membership, item.export_type, &item.filters)?;
    }
    let requests = body
        .exports
        .into_iter()
        .map(|item| ExportRequest {
            study_id: body.study_id.clone(),
            export_type: item.export_type,
            filters: item.filters,
            options: item.options,
        })
        .collect();
    let jobs = create_jobs(api, request, caller, requests).await?;
    let views = jobs.iter().map(|j| JobView::of(j, base)).collect();
    Ok(json(StatusCode::ACCEPTED, &BulkResponse { jobs: views }))
}

fn page_params(query: &BTreeMap<String, String>) -> Result<(u64, u64), StudyError> {
    let number = |name: &str, default: u64, max: u64| -> Result<u64, StudyError> {
        match query.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    StudyError::validation(
                        name,
                        format!("{name} must be a whole number from 1 to {max}"),
                    )
                }),
        }
    };
    Ok((number("page", 1, 1_000_000)?, number("page_size", 20, 100)?))
}

fn required<'a>(query: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, StudyError> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            StudyError::validation(name, format!("the query parameter {name} is required"))
        })
}

fn date_param(
    query: &BTreeMap<String, String>,
    name: &str,
    end_of_day: bool,
) -> Result<Option<i64>, StudyError> {
    let Some(text) = query.get(name) else {
        return Ok(None);
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.timestamp_millis()));
    }
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        StudyError::validation(
            name,
            format!("{name} must be a date (YYYY-MM-DD) or an RFC 3339 time"),
        )
    })?;
    let time = if end_of_day {
        date.and_hms_milli_opt(23, 59, 59, 999)
    } else {
        date.and_hms_opt(0, 0, 0)
    };
    Ok(time.map(|t| t.and_utc().timestamp_millis()))
}

fn links(
    base: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    page: u64,
    page_size: u64,
    total: u64,
) -> PageLinks {
    let at = |p: u64| {
        let mut q = query.clone();
        q.insert("page".into(), p.to_string());
        q.insert("page_size".into(), page_size.to_string());
        let encoded = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(q.iter())
            .finish();
        format!("{base}{path}?{encoded}")
    };
    PageLinks {
        self_: at(page),
        next: (page * page_size < total).then(|| at(page + 1)),
        prev: (page > 1).then(|| at(page - 1)),
    }
}

/// The export history of a study, newest first.
#[utoipa::path(get, path = "/api/v1/exports/jobs", tag = "exports",
    params(
        ("study_id" = String, Query), ("page" = Option<u64>, Query, minimum = 1, maximum = 1000000),
        ("page_size" = Option<u64>, Query, minimum = 1, maximum = 100),
        ("status" = Option<StudyJobStatus>, Query), ("type" = Option<ExportType>, Query),
        ("requestor" = Option<String>, Query, description = "an e-mail or key name"),
        ("from" = Option<String>, Query, format = Date, description = "requested on or after (a date; an RFC 3339 time also works)"),
        ("to" = Option<String>, Query, format = Date, description = "requested on or before (a date; an RFC 3339 time also works)")),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn list_jobs(
    api: &StudyApi,
    query: &BTreeMap<String, String>,
    caller: &Caller,
    base: &str,
) -> Result<Response<Body>, StudyError> {
    let study_id = required(query, "study_id")?.to_string();
    let (page, page_size) = page_params(query)?;
    let status = match query.get("status") {
        None => None,
        Some(s) => Some(StudyJobStatus::parse(s).ok_or_else(|| {
            StudyError::validation(
                "status",
                "status must be pending, completed, error, cancelled or expired",
            )
        })?),
    };
    let export_type = match query.get("type") {
        None => None,
        Some(t) => Some(ExportType::parse(t).ok_or_else(|| {
            StudyError::validation(
                "type",
                "type must be fhir, sites_csv, participants_csv, dashboard or report",
            )
        })?),
    };
    let job_query = JobQuery {
        study_id,
        status,
        export_type,
        requestor: text_filter(query, "requestor"),
        from: date_param(query, "from", false)?,
        to: date_param(query, "to", true)?,
        owner: None,
        page,
        page_size,
    };
    let (jobs, total) = api.service.history(caller, job_query).await?;
    let items = jobs.iter().map(|j| JobView::of(j, base)).collect();
    Ok(json(
        StatusCode::OK,
        &JobList {
            items,
            page,
            page_size,
            total,
            links: links(base, "/jobs", query, page, page_size, total),
        },
    ))
}

/// One job: `pending` with progress, `completed`, `error` with the reason and what to do,
/// `cancelled`, `expired`.
#[utoipa::path(get, path = "/api/v1/exports/jobs/{job_id}", tag = "exports",
    params(("job_id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn get_job() {}

/// Cancels a pending job, or deletes a finished one's files (the history row stays).
#[utoipa::path(delete, path = "/api/v1/exports/jobs/{job_id}", tag = "exports",
    params(("job_id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn delete_job() {}

/// Downloads the export: the CSV, the report, or a ZIP (FHIR JSON, dashboard) with a
/// `manifest.json`. `Repr-Digest` carries its SHA-256. On AWS, a redirect to a URL valid 300 s.
#[utoipa::path(get, path = "/api/v1/exports/jobs/{job_id}/download", tag = "exports",
    params(("job_id" = String, Path)),
    responses(
        (status = 200, description = "the file: a CSV, the HTML report, or a ZIP",
            content(("text/csv"), ("text/html"), ("application/zip")),
            headers(("Repr-Digest" = String, description = "sha-256=:<base64>:"))),
        (status = 307, description = "to a short-lived storage URL"),
        (status = 401, body = ErrorBody), (status = 404, description = "EXP001 (an expired job says to generate it again)", body = ErrorBody),
        (status = 409, description = "EXP004: not finished", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn download_job() {}

/// The files of a completed export, each with its own download link.
#[utoipa::path(get, path = "/api/v1/exports/jobs/{job_id}/files", tag = "exports",
    params(("job_id" = String, Path)),
    responses((status = 200, body = FileList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn list_files() {}

/// One file of a completed export.
#[utoipa::path(get, path = "/api/v1/exports/jobs/{job_id}/files/{name}", tag = "exports",
    params(("job_id" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the file",
            content(("text/csv"), ("text/html"), ("application/zip"), ("application/json"), ("application/fhir+ndjson")),
            headers(("Repr-Digest" = String, description = "sha-256=:<base64>:"))),
        (status = 307, description = "to a short-lived storage URL"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
#[allow(dead_code)]
async fn download_file() {}

/// The export types with their options, allowed values and defaults; with `study_id`, which
/// the caller may create there.
#[utoipa::path(get, path = "/api/v1/exports/formats", tag = "exports",
    params(("study_id" = Option<String>, Query)),
    responses((status = 200, body = FormatList), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn formats(
    _api: &StudyApi,
    query: &BTreeMap<String, String>,
    caller: &Caller,
) -> Result<Response<Body>, StudyError> {
    let membership = query
        .get("study_id")
        .map(|s| caller.principal.membership(s));
    let csv_options = || {
        vec![
            FormatOption {
                name: "encoding".into(),
                allowed: [
                    CsvEncoding::Utf8,
                    CsvEncoding::Utf8Bom,
                    CsvEncoding::Utf16Le,
                    CsvEncoding::Iso88591,
                ]
                .iter()
                .map(|e| {
                    serde_json::to_value(e)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                })
                .collect(),
                default: "utf-8".into(),
            },
            FormatOption {
                name: "delimiter".into(),
                allowed: [Delimiter::Comma, Delimiter::Tab, Delimiter::Semicolon]
                    .iter()
                    .map(|d| {
                        serde_json::to_value(d)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    })
                    .collect(),
                default: "comma".into(),
            },
        ]
    };
    let formats = ExportType::ALL
        .into_iter()
        .map(|t| {
            let (endpoint, content_type, description) = match t {
                ExportType::Fhir => ("/data", "application/zip", "the study, its sites and the selected participants' Patient compartments, NDJSON per resource type, in a ZIP with manifest.json"),
                ExportType::SitesCsv => ("/data", "text/csv", "one row per site: address, status, participants in total and per status"),
                ExportType::ParticipantsCsv => ("/data", "text/csv", "one row per participant: identifier, site, status, dates, arms, consent, patient gender and birth date"),
                ExportType::Dashboard => ("/dashboard", "application/zip", "study metrics (participants by site and status, enrolment per month, screen-failure and withdrawal rates) as JSON and CSV files in a ZIP"),
                ExportType::Report => ("/report", "text/html", "a self-contained, printable HTML study report with an enrolment chart"),
            };
            Format {
                export_type: t,
                label: t.label().into(),
                description: description.into(),
                endpoint: format!("{BASE}{endpoint}"),
                content_type: content_type.into(),
                options: if t.is_csv() { csv_options() } else { Vec::new() },
                filters: vec!["date_range".into(), "sites".into(), "statuses".into()],
                allowed: membership
                    .as_ref()
                    .map(|m| m.as_ref().is_some_and(|m| roles::may_create(m.role, t))),
            }
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &FormatList {
            formats,
            statuses: SUBJECT_STATUSES.iter().map(|s| s.to_string()).collect(),
        },
    ))
}

/// The audit trail of a study (study administrators only).
#[utoipa::path(get, path = "/api/v1/exports/audit", tag = "audit",
    params(("study_id" = String, Query), ("job_id" = Option<String>, Query), ("user" = Option<String>, Query),
        ("action" = Option<AuditAction>, Query),
        ("from" = Option<String>, Query, format = Date, description = "on or after (a date; an RFC 3339 time also works)"),
        ("to" = Option<String>, Query, format = Date, description = "on or before (a date; an RFC 3339 time also works)"),
        ("page" = Option<u64>, Query, minimum = 1, maximum = 1000000), ("page_size" = Option<u64>, Query, minimum = 1, maximum = 100)),
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn audit(
    api: &StudyApi,
    query: &BTreeMap<String, String>,
    caller: &Caller,
    base: &str,
) -> Result<Response<Body>, StudyError> {
    let study_id = required(query, "study_id")?.to_string();
    let membership = roles::membership(&caller.principal, &study_id)?;
    if !roles::may_audit(&membership) {
        return Err(StudyError::forbidden(
            "only study administrators may read the audit trail",
        ));
    }
    let (page, page_size) = page_params(query)?;
    let action = match query.get("action") {
        None => None,
        Some(a) => Some(AuditAction::parse(a).ok_or_else(|| {
            StudyError::validation("action", "action must be create, status_change, download, cancel, delete, expire or membership_change")
        })?),
    };
    let to_text = |ms: Option<i64>| {
        ms.and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    let audit_query = AuditQuery {
        study_id: Some(study_id),
        job_id: text_filter(query, "job_id"),
        actor: text_filter(query, "user"),
        action,
        from: to_text(date_param(query, "from", false)?),
        to: to_text(date_param(query, "to", true)?),
        page,
        page_size,
    };
    let (items, total) = api.service.ports.audit.records(&audit_query).await?;
    Ok(json(
        StatusCode::OK,
        &AuditList {
            items,
            page,
            page_size,
            total,
            links: links(base, "/audit", query, page, page_size, total),
        },
    ))
}

/// The study's webhook deliveries, newest first (study administrators only).
#[utoipa::path(get, path = "/api/v1/exports/webhooks/deliveries", tag = "audit",
    params(("study_id" = String, Query)),
    responses((status = 200, body = DeliveryList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn deliveries(
    api: &StudyApi,
    query: &BTreeMap<String, String>,
    caller: &Caller,
) -> Result<Response<Body>, StudyError> {
    let study_id = required(query, "study_id")?.to_string();
    let membership = roles::membership(&caller.principal, &study_id)?;
    if !roles::may_audit(&membership) {
        return Err(StudyError::forbidden(
            "only study administrators may see webhook deliveries",
        ));
    }
    let items = api.service.ports.outbox.deliveries(&study_id, 100).await?;
    Ok(json(StatusCode::OK, &DeliveryList { items }))
}

/// The studies the caller has a role in, with its role and the sites it may export.
#[utoipa::path(get, path = "/api/v1/exports/studies", tag = "exports",
    responses((status = 200, body = StudyList), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
async fn studies(api: &StudyApi, caller: &Caller) -> Result<Response<Body>, StudyError> {
    let studies = api.service.studies(caller).await?;
    Ok(json(StatusCode::OK, &StudyList { studies }))
}

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder, content::ContentBuilder};
        // Every operation can be refused, throttled or fail, and answers 405 to other methods.
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut operation.responses.responses;
                for (code, description) in [
                    ("400", "EXP002: a malformed request"),
                    ("401", "EXP003: no valid credentials"),
                    ("403", "EXP003: not allowed"),
                    ("404", "EXP001: not found, or not visible to the caller"),
                    ("429", "EXP004: too many requests (Retry-After)"),
                    (
                        "500",
                        "EXP005: an internal error (the request id names it in the log)",
                    ),
                ] {
                    responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(description));
                }
            }
        }
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT (OpenID Connect) or an API key")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Study export API", version = "1.0.0",
        description = "Exports of clinical studies for study teams: FHIR JSON, Sites CSV, Participants CSV, dashboards and reports, with an export history, downloads, roles and an audit trail. Errors are {\"error\":{code,message,field,details,timestamp,request_id}} with codes EXP001-EXP005."),
    paths(create_data, create_study_export, create_report, create_bulk, list_jobs, get_job, delete_job,
        download_job, list_files, download_file, formats, audit, deliveries, studies),
    components(schemas(ErrorBody, crate::error::ErrorDetail, AuditAction)),
    modifiers(&SecuritySchemes),
    tags((name = "exports", description = "study exports and their history"),
        (name = "audit", description = "the audit trail and webhook deliveries")))]
struct ApiDoc;

/// The OpenAPI 3.1 document of `/api/v1`.
pub fn openapi() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes")
}
