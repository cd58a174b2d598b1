//! The study administrators' pages: the audit trail and the webhook deliveries.

use super::Ctx;
use crate::api_client::query;
use crate::browser;
use crate::pages::layout::Section;
use crate::pages::views::{AuditQuery, audit_page, webhooks_page};
use export_core::Body;
use http::{Response, StatusCode};

/// Audit records per page.
const AUDIT_PAGE: u64 = 50;

/// `GET /studies/{id}/audit`.
pub(super) async fn audit(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
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
pub(super) async fn webhooks(ctx: &Ctx<'_>, study_id: &str) -> Response<Body> {
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
