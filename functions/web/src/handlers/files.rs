//! An export's files: the download (the API's answer as is) and the report and dashboard shown
//! in the browser.

use super::Ctx;
use crate::api_client::ApiFailure;
use crate::browser;
use crate::pages::layout::{Section, enc};
use crate::pages::views::dashboard_page;
use bytes::Bytes;
use export_core::Body;
use http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{HeaderValue, Method};
use http::{Response, StatusCode};
use serde_json::Value;

/// `GET …/{job}/download`: the API's download (a stream, or a redirect to storage).
pub(super) async fn download(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
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
pub(super) async fn view(ctx: &Ctx<'_>, study_id: &str, job_id: &str) -> Response<Body> {
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
        "default-src 'none'; style-src 'sha256-{hash}'; img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'; sandbox"
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
