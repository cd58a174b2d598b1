//! Creating exports and following them: the exports page, its history fragment, the form,
//! retry, and cancel or delete with their confirmation.

use super::Ctx;
use crate::api_client::{ApiFailure, query};
use crate::browser;
use crate::pages::exports::{
    ExportsPage, FormState, HistoryQuery, confirm_page, exports_page, history,
};
use crate::pages::layout::{Section, enc};
use export_core::Body;
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// History rows per page.
const HISTORY_PAGE: u64 = 20;

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
pub(super) async fn exports(
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
pub(super) async fn history_fragment(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
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
pub(super) async fn create(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
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
pub(super) async fn retry(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
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
pub(super) async fn confirm(
    ctx: &Ctx<'_>,
    study_id: &str,
    job_id: &str,
    action: &str,
) -> Response<Body> {
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
pub(super) async fn remove(
    ctx: &Ctx<'_>,
    study_id: &str,
    job_id: &str,
    action: &str,
) -> Response<Body> {
    let job = match ctx.job(study_id, job_id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    // The button said what would happen: cancelling never deletes a finished export's files,
    // deleting never stops a running one.
    let running = job["status"] == "pending";
    if running != (action == "cancel") {
        let message = if running {
            "This export is still running: cancel it instead."
        } else {
            "This export is no longer running: nothing was cancelled. Its files are only deleted with Delete."
        };
        return ctx.failure_page(&ApiFailure {
            status: 409,
            code: "EXP004".into(),
            message: message.into(),
            field: None,
        });
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
