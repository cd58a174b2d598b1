//! The study pages: what each address shows or does, through the study API as the visitor.

use crate::RequestContext;
use crate::WebPage;
use crate::api_client::{ApiFailure, StudyClient, query};
use crate::browser::{self, SESSION_COOKIE};
use crate::pages::exports::{
    ExportsPage, FormState, HistoryQuery, confirm_page, exports_page, history,
};
use crate::pages::layout::{Section, StudyNav, Viewer, bare_page, enc, page};
use crate::pages::views::{
    AuditQuery, audit_page, dashboard_page, problem_page, studies_page, webhooks_page,
};
use crate::sign_in::{Visitor, forbidden, method_not_allowed};
use bytes::Bytes;
use export_core::Body;
use export_study::service::Caller;
use http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use maud::Markup;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// History rows per page.
const HISTORY_PAGE: u64 = 20;
/// Audit records per page.
const AUDIT_PAGE: u64 = 50;

/// One request, with what every handler needs.
struct Ctx<'a> {
    page: &'a WebPage,
    request: &'a Request<Bytes>,
    client: StudyClient<'a>,
    visitor: &'a Visitor,
}

impl Ctx<'_> {
    fn viewer(&self) -> Viewer<'_> {
        let label = match &self.visitor.session.kind {
            crate::session::SessionKind::SignedIn { label, .. } => Some(label.as_str()),
            _ => None,
        };
        Viewer {
            label,
            csrf: &self.visitor.session.csrf,
        }
    }

    /// A whole page of `study`.
    fn study_page(
        &self,
        status: StatusCode,
        title: &str,
        study: &Value,
        section: Section,
        content: Markup,
    ) -> Response<Body> {
        let nav = StudyNav {
            id: study["id"].as_str().unwrap_or_default(),
            title: study["title"].as_str().unwrap_or_default(),
            may_audit: study["may_audit"].as_bool().unwrap_or(false),
        };
        browser::page(
            status,
            page(title, &self.viewer(), Some(&nav), section, content),
        )
    }

    /// A page that reports what the API refused.
    fn failure_page(&self, failure: &ApiFailure) -> Response<Body> {
        let status =
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let heading = match failure.code.as_str() {
            "EXP001" => "Not found",
            "EXP003" => "Not allowed",
            "EXP004" => "Not possible now",
            "EXP005" => "Something went wrong",
            _ => "The request was not accepted",
        };
        let mut response = browser::page(
            status,
            page(
                heading,
                &self.viewer(),
                None,
                Section::Studies,
                problem_page(heading, &failure.message, Some(("/", "Go to your studies"))),
            ),
        );
        if let Some(retry) = (failure.status == 429).then_some("1") {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static(retry));
        }
        response
    }

    /// The study as `/studies` lists it for the visitor.
    async fn study(&self, id: &str) -> Result<Value, Response<Body>> {
        let studies = self
            .client
            .get("/studies")
            .await
            .map_err(|f| self.failure_page(&f))?;
        studies["studies"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"] == id)
            .cloned()
            .ok_or_else(|| {
                self.failure_page(&ApiFailure {
                    status: 404,
                    code: "EXP001".into(),
                    message: format!("There is no study {id}, or you have no role in it."),
                    field: None,
                })
            })
    }

    /// A job of `study`, as the visitor may see it.
    async fn job(&self, study: &str, id: &str) -> Result<Value, Response<Body>> {
        let job = self
            .client
            .get(&format!("/jobs/{}", enc(id)))
            .await
            .map_err(|f| self.failure_page(&f))?;
        if job["study_id"] != study {
            return Err(self.failure_page(&ApiFailure {
                status: 404,
                code: "EXP001".into(),
                message: format!("Study {study} has no export {id}."),
                field: None,
            }));
        }
        Ok(job)
    }
}

impl WebPage {
    /// Every page but sign-in and assets.
    pub(crate) async fn study_pages(
        &self,
        request: &Request<Bytes>,
        context: &RequestContext,
    ) -> Response<Body> {
        let visitor = match self.visitor(request).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        if let Err(export_auth::AuthFailure::RateLimited { retry_after }) =
            self.auth.rate_check(&visitor.principal)
        {
            let mut response = browser::page(
                StatusCode::TOO_MANY_REQUESTS,
                bare_page(
                    "Slow down",
                    problem_page(
                        "Too many requests",
                        "Wait a moment, then reload the page.",
                        None,
                    ),
                ),
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
            return response;
        }
        let origin = self.origin(request);
        if request.method() == Method::POST {
            let fields = browser::form(request.body());
            if !browser::same_origin(request, &origin)
                || !visitor
                    .session
                    .csrf_matches(browser::first(&fields, "csrf"))
            {
                return forbidden();
            }
        }
        let caller = Caller {
            principal: visitor.principal.clone(),
            request_id: context.request_id.clone(),
            client_address: context.client_address.clone(),
        };
        let mut host_headers = HeaderMap::new();
        for name in ["host", "x-forwarded-host", "x-forwarded-proto"] {
            if let Some(v) = request.headers().get(name) {
                host_headers.insert(name, v.clone());
            }
        }
        let ctx = Ctx {
            page: self,
            request,
            client: StudyClient {
                api: &self.study,
                caller: &caller,
                host_headers,
            },
            visitor: &visitor,
        };
        let segments: Vec<String> = request
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = request.method().clone();
        let mut response = match (&method, segments.as_slice()) {
            (&Method::GET, []) => home(&ctx).await,
            (&Method::GET, ["studies", s, "exports"]) => {
                exports(&ctx, s, FormState::default(), StatusCode::OK).await
            }
            (&Method::POST, ["studies", s, "exports"]) => create(&ctx, s).await,
            (&Method::GET, ["studies", s, "exports", "history"]) => history_fragment(&ctx, s).await,
            (&Method::GET, ["studies", s, "exports", job, "download"]) => {
                download(&ctx, s, job).await
            }
            (&Method::GET, ["studies", s, "exports", job, "view"]) => view(&ctx, s, job).await,
            (&Method::GET, ["studies", s, "exports", job, action @ ("cancel" | "delete")]) => {
                confirm(&ctx, s, job, action).await
            }
            (&Method::POST, ["studies", s, "exports", job, action @ ("cancel" | "delete")]) => {
                remove(&ctx, s, job, action).await
            }
            (&Method::POST, ["studies", s, "exports", job, "retry"]) => retry(&ctx, s, job).await,
            (&Method::GET, ["studies", s, "audit"]) => audit(&ctx, s).await,
            (&Method::GET, ["studies", s, "webhooks"]) => webhooks(&ctx, s).await,
            (_, [] | ["studies", _, "exports" | "audit" | "webhooks", ..]) => {
                method_not_allowed(if segments.len() == 3 && segments[2] == "exports" {
                    "GET, POST"
                } else if method == Method::GET {
                    "POST"
                } else {
                    "GET"
                })
            }
            _ => ctx.failure_page(&ApiFailure {
                status: 404,
                code: "EXP001".into(),
                message: "There is no page at this address.".into(),
                field: None,
            }),
        };
        if let Some(cookie) = &visitor.new_cookie {
            browser::set_cookie(
                &mut response,
                SESSION_COOKIE,
                cookie,
                12 * 3600,
                browser::needs_secure(&origin),
            );
        }
        response
    }
}

/// `/`: the visitor's studies (straight to the study when there is one).
async fn home(ctx: &Ctx<'_>) -> Response<Body> {
    let studies = match ctx.client.get("/studies").await {
        Ok(s) => s,
        Err(f) => return ctx.failure_page(&f),
    };
    let list = studies["studies"].as_array().cloned().unwrap_or_default();
    if let [only] = list.as_slice() {
        return browser::redirect(&format!(
            "/studies/{}/exports",
            enc(only["id"].as_str().unwrap_or_default())
        ));
    }
    browser::page(
        StatusCode::OK,
        page(
            "Your studies",
            &ctx.viewer(),
            None,
            Section::Studies,
            studies_page(&studies),
        ),
    )
}

fn history_query(q: &BTreeMap<String, String>) -> HistoryQuery {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    HistoryQuery {
        status: get("status"),
        export_type: get("type"),
        requestor: get("requestor"),
        from: get("from"),
        to: get("to"),
        page: q
            .get("page")
            .and_then(|p| p.parse().ok())
            .filter(|p| *p >= 1)
            .unwrap_or(1),
    }
}

/// `/jobs` of the study with the history's filters.
async fn jobs(ctx: &Ctx<'_>, study: &str, q: &HistoryQuery) -> Result<Value, ApiFailure> {
    let page = q.page.to_string();
    let size = HISTORY_PAGE.to_string();
    let pairs = [
        ("study_id", study),
        ("status", q.status.as_str()),
        ("type", q.export_type.as_str()),
        ("requestor", q.requestor.as_str()),
        ("from", q.from.as_str()),
        ("to", q.to.as_str()),
        ("page", page.as_str()),
        ("page_size", size.as_str()),
    ];
    ctx.client.get(&format!("/jobs?{}", query(&pairs))).await
}

const NOTICES: [(&str, &str); 4] = [
    (
        "queued",
        "The export is queued. Its row below updates by itself until it is ready.",
    ),
    ("cancelled", "The export was cancelled."),
    ("deleted", "The export's files were deleted."),
    ("retried", "The export is queued again."),
];

/// The exports page; `form` holds a refused request's values.
async fn exports(
    ctx: &Ctx<'_>,
    study_id: &str,
    form: FormState,
    status: StatusCode,
) -> Response<Body> {
    let study = match ctx.study(study_id).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let formats = match ctx
        .client
        .get(&format!("/formats?{}", query(&[("study_id", study_id)])))
        .await
    {
        Ok(f) => f,
        Err(f) => return ctx.failure_page(&f),
    };
    let raw_query = browser::query(ctx.request);
    let q = history_query(&raw_query);
    let (listed, problem) = match jobs(ctx, study_id, &q).await {
        Ok(j) => (j, None),
        Err(f) => (
            json!({"items": [], "total": 0, "page": 1, "page_size": HISTORY_PAGE}),
            Some(f.message),
        ),
    };
    let notice = problem.or_else(|| {
        raw_query
            .get("notice")
            .and_then(|n| NOTICES.iter().find(|(k, _)| k == n))
            .map(|(_, text)| text.to_string())
    });
    let content = exports_page(&ExportsPage {
        study: &study,
        formats: &formats,
        jobs: &listed,
        query: &q,
        form: &form,
        csrf: &ctx.visitor.session.csrf,
        notice: notice.as_deref(),
    });
    ctx.study_page(status, "Exports", &study, Section::Exports, content)
}

/// The history table alone, for the script's refresh.
async fn history_fragment(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
    let q = history_query(&browser::query(ctx.request));
    match jobs(ctx, study_id, &q).await {
        Ok(listed) => browser::page(
            StatusCode::OK,
            history(study_id, &listed, &q, &ctx.visitor.session.csrf),
        ),
        Err(f) => browser::page(
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST),
            maud::html! { p role="alert" { (f.message) } },
        ),
    }
}

/// The API endpoint that creates a type, and whether its body names the type.
fn endpoint_of(export_type: &str) -> (&'static str, bool) {
    match export_type {
        "dashboard" => ("/dashboard", false),
        "report" => ("/report", false),
        _ => ("/data", true),
    }
}

/// The request body of an export.
fn export_body(study: &str, export_type: &str, filters: Value, options: Value) -> (String, Value) {
    let (endpoint, typed) = endpoint_of(export_type);
    let mut body = json!({"study_id": study, "filters": filters, "options": options});
    if typed {
        body["type"] = json!(export_type);
    }
    (endpoint.to_string(), body)
}

/// `POST /studies/{id}/exports`: the form becomes an API request.
async fn create(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
    let fields = browser::form(ctx.request.body());
    let get = |k: &str| browser::first(&fields, k).to_string();
    let form = FormState {
        export_type: get("type"),
        from: get("from"),
        to: get("to"),
        sites: fields.get("site").cloned().unwrap_or_default(),
        statuses: fields.get("status").cloned().unwrap_or_default(),
        encoding: get("encoding"),
        delimiter: get("delimiter"),
        error: None,
    };
    let mut filters = json!({});
    if !form.from.is_empty() || !form.to.is_empty() {
        let mut range = json!({});
        if !form.from.is_empty() {
            range["from"] = json!(form.from);
        }
        if !form.to.is_empty() {
            range["to"] = json!(form.to);
        }
        filters["date_range"] = range;
    }
    if !form.sites.is_empty() {
        filters["sites"] = json!(form.sites);
    }
    if !form.statuses.is_empty() {
        filters["statuses"] = json!(form.statuses);
    }
    let mut options = json!({});
    if !form.encoding.is_empty() {
        options["encoding"] = json!(form.encoding);
    }
    if !form.delimiter.is_empty() {
        options["delimiter"] = json!(form.delimiter);
    }
    if form.export_type.is_empty() {
        let failure = ApiFailure {
            status: 400,
            code: "EXP002".into(),
            message: "Choose an export type.".into(),
            field: Some("type".into()),
        };
        return exports(
            ctx,
            study_id,
            FormState {
                error: Some(failure),
                ..form
            },
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    let (endpoint, body) = export_body(study_id, &form.export_type, filters, options);
    match ctx.client.post(&endpoint, &body).await {
        Ok(_) => browser::redirect(&format!(
            "/studies/{}/exports?notice=queued#history-heading",
            enc(study_id)
        )),
        Err(failure) => {
            let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::BAD_REQUEST);
            exports(
                ctx,
                study_id,
                FormState {
                    error: Some(failure),
                    ..form
                },
                status,
            )
            .await
        }
    }
}

/// `POST …/{job}/retry`: the same export again (after an error, a cancel or expiry).
async fn retry(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
    let job = match ctx.job(study_id, job_id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let export_type = job["type"].as_str().unwrap_or_default();
    let (endpoint, body) = export_body(
        study_id,
        export_type,
        job["filters"].clone(),
        job["options"].clone(),
    );
    match ctx.client.post(&endpoint, &body).await {
        Ok(_) => browser::redirect(&format!(
            "/studies/{}/exports?notice=retried#history-heading",
            enc(study_id)
        )),
        Err(f) => ctx.failure_page(&f),
    }
}

/// `GET …/{job}/cancel|delete`: asks first.
async fn confirm(ctx: &Ctx<'_>, study_id: &str, job_id: &str, action: &str) -> Response<Body> {
    let study = match ctx.study(study_id).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let job = match ctx.job(study_id, job_id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let title = if action == "cancel" {
        "Cancel an export"
    } else {
        "Delete an export"
    };
    ctx.study_page(
        StatusCode::OK,
        title,
        &study,
        Section::Exports,
        confirm_page(study_id, &job, action, &ctx.visitor.session.csrf),
    )
}

/// `POST …/{job}/cancel|delete`: cancels a running export or deletes a finished one's files.
async fn remove(ctx: &Ctx<'_>, study_id: &str, job_id: &str, action: &str) -> Response<Body> {
    if let Err(r) = ctx.job(study_id, job_id).await {
        return r;
    }
    match ctx.client.delete(&format!("/jobs/{}", enc(job_id))).await {
        Ok(_) => {
            let notice = if action == "cancel" {
                "cancelled"
            } else {
                "deleted"
            };
            browser::redirect(&format!(
                "/studies/{}/exports?notice={notice}#history-heading",
                enc(study_id)
            ))
        }
        Err(f) => ctx.failure_page(&f),
    }
}

/// `GET …/{job}/download`: the API's download (a stream, or a redirect to storage).
async fn download(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
    if let Err(r) = ctx.job(study_id, job_id).await {
        return r;
    }
    let response = ctx
        .client
        .raw(
            Method::GET,
            &format!("/jobs/{}/download", enc(job_id)),
            None,
        )
        .await;
    if response.status().is_success() || response.status().is_redirection() {
        let mut response = response;
        // Served as an attachment; never interpreted as a page of this site.
        browser::secure_headers(response.headers_mut(), "default-src 'none'; sandbox");
        return response;
    }
    let failure = failure_of(response);
    ctx.failure_page(&failure)
}

/// The API failure a raw response carries.
fn failure_of(response: Response<Body>) -> ApiFailure {
    let status = response.status().as_u16();
    let body = match response.into_body() {
        Body::Full(b) => serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
        Body::Stream(_) => Value::Null,
    };
    ApiFailure {
        status,
        code: body["error"]["code"]
            .as_str()
            .unwrap_or("EXP005")
            .to_string(),
        message: body["error"]["message"]
            .as_str()
            .unwrap_or("the export service could not answer")
            .to_string(),
        field: None,
    }
}

/// Reads a (small) file of a job the caller may download; the read is audited as a download.
async fn read_file(
    ctx: &Ctx<'_>,
    job_id: &str,
    name: Option<&str>,
) -> Result<Vec<u8>, Response<Body>> {
    use futures_util::StreamExt;
    let service = &ctx.page.study.service;
    let file = service
        .downloadable(ctx.client.caller, job_id, name)
        .await
        .map_err(|e| {
            ctx.failure_page(&ApiFailure {
                status: e.status.as_u16(),
                code: e.code.as_str().to_string(),
                message: e.message.clone(),
                field: None,
            })
        })?;
    let missing = || {
        ctx.failure_page(&ApiFailure {
            status: 404,
            code: "EXP001".into(),
            message: "The file is no longer stored: generate the export again.".into(),
            field: None,
        })
    };
    let mut stream = match service.ports.output.read(&file.key).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(missing()),
        Err(e) => {
            tracing::error!(error = %e, "could not read an export file");
            return Err(missing());
        }
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => bytes.extend_from_slice(&c),
            Err(e) => {
                tracing::error!(error = %e, "could not read an export file");
                return Err(missing());
            }
        }
    }
    Ok(bytes)
}

/// `GET …/{job}/view`: a report as the page it is, a dashboard rendered with its chart.
async fn view(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
    let study = match ctx.study(study_id).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let job = match ctx.job(study_id, job_id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    match job["type"].as_str() {
        Some("report") => match read_file(ctx, job_id, None).await {
            Ok(html) => report_response(html),
            Err(r) => r,
        },
        Some("dashboard") => match read_file(ctx, job_id, Some("dashboard.json")).await {
            Ok(bytes) => {
                let d: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                ctx.study_page(
                    StatusCode::OK,
                    "Dashboard",
                    &study,
                    Section::Exports,
                    dashboard_page(&d),
                )
            }
            Err(r) => r,
        },
        _ => ctx.failure_page(&ApiFailure {
            status: 404,
            code: "EXP001".into(),
            message: "Only reports and dashboards open in the browser; download the others.".into(),
            field: None,
        }),
    }
}

/// The report, inline. It is self-contained with one inline `<style>`: the policy allows
/// exactly that stylesheet (by its hash) and nothing else.
fn report_response(html: Vec<u8>) -> Response<Body> {
    use base64::Engine;
    use sha2::Digest;
    let text = String::from_utf8_lossy(&html);
    let style = text
        .split_once("<style>")
        .and_then(|(_, rest)| rest.split_once("</style>"))
        .map(|(css, _)| css)
        .unwrap_or_default();
    let hash =
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(style.as_bytes()));
    let csp = format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    );
    let mut response = Response::new(Body::Full(Bytes::from(html)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("inline; filename=\"report.html\""),
    );
    browser::secure_headers(headers, &csp);
    response
}

/// `GET /studies/{id}/audit`.
async fn audit(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
    let study = match ctx.study(study_id).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let raw = browser::query(ctx.request);
    let get = |k: &str| raw.get(k).cloned().unwrap_or_default();
    let q = AuditQuery {
        user: get("user"),
        action: get("action"),
        from: get("from"),
        to: get("to"),
        page: raw
            .get("page")
            .and_then(|p| p.parse().ok())
            .filter(|p| *p >= 1)
            .unwrap_or(1),
    };
    let page = q.page.to_string();
    let size = AUDIT_PAGE.to_string();
    let pairs = [
        ("study_id", study_id),
        ("user", q.user.as_str()),
        ("action", q.action.as_str()),
        ("from", q.from.as_str()),
        ("to", q.to.as_str()),
        ("page", page.as_str()),
        ("page_size", size.as_str()),
    ];
    match ctx.client.get(&format!("/audit?{}", query(&pairs))).await {
        Ok(records) => ctx.study_page(
            StatusCode::OK,
            "Audit trail",
            &study,
            Section::Audit,
            audit_page(study_id, &records, &q),
        ),
        Err(f) => ctx.failure_page(&f),
    }
}

/// `GET /studies/{id}/webhooks`.
async fn webhooks(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
    let study = match ctx.study(study_id).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match ctx
        .client
        .get(&format!(
            "/webhooks/deliveries?{}",
            query(&[("study_id", study_id)])
        ))
        .await
    {
        Ok(d) => ctx.study_page(
            StatusCode::OK,
            "Webhook deliveries",
            &study,
            Section::Webhooks,
            webhooks_page(&d),
        ),
        Err(f) => ctx.failure_page(&f),
    }
}
