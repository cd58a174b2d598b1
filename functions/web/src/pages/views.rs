//! Pages that show things rather than change them: the list of studies, a dashboard snapshot
//! opened in the browser, the audit trail and the webhook deliveries (study administrators),
//! and the short pages of sign-in and sign-out.

use super::layout::{enc, when};
use export_study::dashboard::MonthlyEnrolment;
use maud::{Markup, PreEscaped, html};
use serde_json::Value;

/// The studies the viewer has a role in.
pub fn studies_page(studies: &Value) -> Markup {
    let list = studies["studies"].as_array().cloned().unwrap_or_default();
    html! {
        h1 { "Your studies" }
        @if list.is_empty() {
            p { "You have no role in any study yet. A study administrator can give you one." }
        } @else {
            ul class="studies" {
                @for study in &list {
                    @let id = study["id"].as_str().unwrap_or_default();
                    li {
                        a href=(format!("/studies/{}/exports", enc(id))) {
                            (study["title"].as_str().filter(|t| !t.is_empty()).unwrap_or(id))
                        }
                        " "
                        span class="muted" { "(" (id) ") · " (role_label(study["role"].as_str().unwrap_or_default())) }
                    }
                }
            }
        }
    }
}

fn role_label(role: &str) -> &str {
    match role {
        "study-admin" => "Study Administrator",
        "investigator" => "CI / D-CI",
        "data-reviewer" => "Data Reviewer",
        "site-staff" => "Site staff",
        other => other,
    }
}

/// A dashboard snapshot (`dashboard.json` of a dashboard export), with the enrolment chart.
pub fn dashboard_page(d: &Value) -> Markup {
    let months: Vec<MonthlyEnrolment> = d["enrolment_by_month"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(month, m)| MonthlyEnrolment {
            month: month.clone(),
            enrolled: m["enrolled"].as_u64().unwrap_or(0),
            cumulative: m["cumulative"].as_u64().unwrap_or(0),
        })
        .collect();
    let sites: Vec<(&String, &Value)> = d["by_site_status"]
        .as_object()
        .into_iter()
        .flatten()
        .collect();
    // Only the statuses someone has, so the table stays readable; zero columns add nothing.
    let mut statuses: Vec<String> = Vec::new();
    for (_, site) in &sites {
        for (status, n) in site["statuses"].as_object().into_iter().flatten() {
            if n.as_u64().unwrap_or(0) > 0 && !statuses.contains(status) {
                statuses.push(status.clone());
            }
        }
    }
    let rate = |v: &Value| {
        v.as_f64()
            .map_or("—".to_string(), |r| format!("{:.1} %", r * 100.0))
    };
    html! {
        h1 { "Dashboard" }
        dl class="summary" {
            dt { "Study" } dd { (d["study_title"].as_str().unwrap_or_default()) " (" (d["study_id"].as_str().unwrap_or_default()) ")" }
            dt { "Snapshot taken" } dd { (when(d["generated_at"].as_str().unwrap_or_default())) }
            dt { "Participants" } dd { (d["participants_total"].as_u64().unwrap_or(0)) }
            dt { "Screen-failure rate" } dd { (rate(&d["screen_failure_rate"])) " (" (d["screen_failures"]) " of " (d["screened"]) " screened)" }
            dt { "Withdrawal rate" } dd { (rate(&d["withdrawal_rate"])) " (" (d["withdrawals"]) " of " (d["enrolled"]) " enrolled)" }
        }
        h2 { "Enrolment over time" }
        figure class="chart" {
            (PreEscaped(export_study::report::chart(&months)))
        }
        h2 id="sites-heading" { "Participants by site and status" }
        div class="table-wrap" role="region" aria-labelledby="sites-heading" tabindex="0" {
            table {
                thead {
                    tr {
                        th scope="col" { "Site" }
                        @for s in &statuses { th scope="col" class="num" { (s) } }
                        th scope="col" class="num" { "Total" }
                    }
                }
                tbody {
                    @for (id, site) in &sites {
                        tr {
                            th scope="row" { (site["site_name"].as_str().filter(|n| !n.is_empty()).unwrap_or(id)) }
                            @for s in &statuses { td class="num" { (site["statuses"][s].as_u64().unwrap_or(0)) } }
                            td class="num" { (site["total"].as_u64().unwrap_or(0)) }
                        }
                    }
                }
            }
        }
        h2 id="months-heading" { "Enrolment per month" }
        div class="table-wrap" role="region" aria-labelledby="months-heading" tabindex="0" {
            table {
                thead { tr { th scope="col" { "Month" } th scope="col" class="num" { "Enrolled" } th scope="col" class="num" { "Cumulative" } } }
                tbody {
                    @for m in &months {
                        tr { th scope="row" { (m.month) } td class="num" { (m.enrolled) } td class="num" { (m.cumulative) } }
                    }
                }
            }
        }
    }
}

/// The audit trail's filters, as the query carries them.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user: String,
    pub action: String,
    pub from: String,
    pub to: String,
    pub page: u64,
}

const ACTIONS: [&str; 7] = [
    "create",
    "status_change",
    "download",
    "cancel",
    "delete",
    "expire",
    "membership_change",
];

/// The audit trail of a study.
pub fn audit_page(study_id: &str, records: &Value, q: &AuditQuery) -> Markup {
    let items = records["items"].as_array().cloned().unwrap_or_default();
    let total = records["total"].as_u64().unwrap_or(0);
    let page = records["page"].as_u64().unwrap_or(1).max(1);
    let pages = total
        .div_ceil(records["page_size"].as_u64().unwrap_or(50).max(1))
        .max(1);
    let base = format!("/studies/{}/audit", enc(study_id));
    let link = |page: u64| {
        let page = page.to_string();
        let pairs = [
            ("user", q.user.as_str()),
            ("action", q.action.as_str()),
            ("from", q.from.as_str()),
            ("to", q.to.as_str()),
            ("page", page.as_str()),
        ];
        format!("{base}?{}", crate::api_client::query(&pairs))
    };
    html! {
        h1 { "Audit trail" }
        p { "Every export, status change, download, cancellation, deletion, expiry and membership change of this study, oldest first. Each record carries the SHA-256 of the one before it." }
        form method="get" action=(base) class="filters" aria-label="Filter the audit trail" {
            div { label for="a-user" { "User" } input type="text" id="a-user" name="user" value=(q.user); }
            div {
                label for="a-action" { "Action" }
                select id="a-action" name="action" {
                    option value="" { "Any" }
                    @for a in ACTIONS { option value=(a) selected[q.action == a] { (a.replace('_', " ")) } }
                }
            }
            div { label for="a-from" { "From" } input type="date" id="a-from" name="from" value=(q.from); }
            div { label for="a-to" { "To" } input type="date" id="a-to" name="to" value=(q.to); }
            button type="submit" class="secondary" { "Filter" }
        }
        @if items.is_empty() {
            p { "No record matches." }
        } @else {
            div class="table-wrap" role="region" aria-label="Audit records" tabindex="0" {
                table class="audit" {
                    caption { "Records: page " (page) " of " (pages) ", " (total) " in all" }
                    thead {
                        tr {
                            th scope="col" class="num" { "#" }
                            th scope="col" { "When" }
                            th scope="col" { "Who" }
                            th scope="col" { "Action" }
                            th scope="col" { "Export" }
                            th scope="col" { "Details" }
                        }
                    }
                    tbody {
                        @for r in &items {
                            tr {
                                td class="num" { (r["seq"]) }
                                td { (when(r["at"].as_str().unwrap_or_default())) }
                                td { (r["actor_label"].as_str().unwrap_or_default()) }
                                td { (r["action"].as_str().unwrap_or_default().replace('_', " ")) }
                                td {
                                    (r["export_type"].as_str().unwrap_or_default())
                                    @if let Some(job) = r["job_id"].as_str() { br; code { (job) } }
                                }
                                td class="details" { (details(r)) }
                            }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav aria-label="Audit pages" class="pages" {
                    @if page > 1 { a href=(link(page - 1)) rel="prev" { "Previous page" } }
                    span { "Page " (page) " of " (pages) }
                    @if page < pages { a href=(link(page + 1)) rel="next" { "Next page" } }
                }
            }
        }
    }
}

fn details(r: &Value) -> Markup {
    html! {
        @if let Some(status) = r["details"]["status"].as_str() { "status " (status) br; }
        @for d in r["digests"].as_array().into_iter().flatten() {
            (d["name"].as_str().unwrap_or_default()) " · SHA-256 " code { (d["sha256"].as_str().unwrap_or_default().get(..16).unwrap_or_default()) "…" } br;
        }
        @if let Some(address) = r["client_address"].as_str() { "from " (address) br; }
        @if let Some(id) = r["request_id"].as_str() { span class="muted" { "request " (id) } }
    }
}

/// The study's webhook deliveries, newest first.
pub fn webhooks_page(deliveries: &Value) -> Markup {
    let items = deliveries["items"].as_array().cloned().unwrap_or_default();
    let at = |ms: &Value| {
        ms.as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default()
    };
    html! {
        h1 { "Webhook deliveries" }
        p { "Finished and failed exports are announced to the study's webhook, signed (Standard Webhooks) and retried with backoff for a day." }
        @if items.is_empty() {
            p { "No delivery yet." }
        } @else {
            div class="table-wrap" role="region" aria-label="Deliveries" tabindex="0" {
                table {
                    thead {
                        tr {
                            th scope="col" { "Created" }
                            th scope="col" { "Event" }
                            th scope="col" { "Export" }
                            th scope="col" { "Status" }
                            th scope="col" { "Attempts" }
                        }
                    }
                    tbody {
                        @for d in &items {
                            tr {
                                td { (at(&d["created"])) }
                                td { (d["event"].as_str().unwrap_or_default()) }
                                td { code { (d["job_id"].as_str().unwrap_or_default()) } }
                                td { (d["status"].as_str().unwrap_or_default()) }
                                td {
                                    ol class="attempts" {
                                        @for a in d["attempts"].as_array().into_iter().flatten() {
                                            li {
                                                (at(&a["at"])) ": "
                                                @if let Some(s) = a["status"].as_u64() { "HTTP " (s) }
                                                @if let Some(e) = a["error"].as_str() { " " (e) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// After signing out.
pub fn signed_out_page() -> Markup {
    html! {
        h1 { "You are signed out" }
        p { a href="/login" { "Sign in again" } }
        p class="muted" { "On a shared computer, also close the browser." }
    }
}

/// A sign-in that could not finish, or a page that cannot be shown.
pub fn problem_page(heading: &str, message: &str, retry: Option<(&str, &str)>) -> Markup {
    html! {
        h1 { (heading) }
        p { (message) }
        @if let Some((href, text)) = retry { p { a href=(href) { (text) } } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_dashboard_shows_its_numbers_and_chart() {
        let d = json!({"study_id": "s", "study_title": "T", "generated_at": "2026-01-01T00:00:00Z",
            "participants_total": 3, "screen_failure_rate": 0.25, "screen_failures": 1, "screened": 4,
            "withdrawal_rate": null, "withdrawals": 0, "enrolled": 0,
            "by_site_status": {"site-1": {"site_name": "North", "statuses": {"withdrawn": 2, "candidate": 0}, "total": 2}},
            "enrolment_by_month": {"2024-01": {"enrolled": 1, "cumulative": 1}, "2024-02": {"enrolled": 0, "cumulative": 1}}});
        let html = dashboard_page(&d).into_string();
        assert!(html.contains("25.0 %") && html.contains("—"));
        assert!(html.contains("<svg") && html.contains("2024-02"));
        assert!(html.contains(">withdrawn<") && !html.contains(">candidate<"));
        assert!(html.contains(">North<"));
    }

    #[test]
    fn audit_pages_keep_their_filters() {
        let records = json!({"items": [{"seq": 1, "at": "2026-01-01T00:00:00Z", "actor_label": "a@b",
            "action": "download", "digests": [{"name": "x.csv", "sha256": "ab".repeat(32)}]}],
            "total": 120, "page": 2, "page_size": 50});
        let q = AuditQuery {
            action: "download".into(),
            page: 2,
            ..Default::default()
        };
        let html = audit_page("s 1", &records, &q).into_string();
        assert!(html.contains("/studies/s%201/audit?action=download&amp;page=1"));
        assert!(html.contains("/studies/s%201/audit?action=download&amp;page=3"));
        assert!(html.contains("x.csv"));
    }
}
