//! Study → Exports: the form that creates an export and the export history.
//!
//! The form offers only what the API says the caller may create (`/formats?study_id=`) and the
//! sites it may export (`/studies`); the API still decides. The history is one fragment, the
//! same markup whether the whole page is rendered or the script refreshes it while exports run.

use super::layout::{enc, size, when};
use crate::api_client::ApiFailure;
use maud::{Markup, html};
use serde_json::Value;

/// What the create form shows: the last request's values and what was wrong with it.
#[derive(Debug, Clone, Default)]
pub struct FormState {
    pub export_type: String,
    pub from: String,
    pub to: String,
    pub sites: Vec<String>,
    pub statuses: Vec<String>,
    pub encoding: String,
    pub delimiter: String,
    pub error: Option<ApiFailure>,
}

/// The history's filters and page, as the query string carries them.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub status: String,
    pub export_type: String,
    pub requestor: String,
    pub from: String,
    pub to: String,
    pub page: u64,
}

impl HistoryQuery {
    /// The pairs of the page's own query string.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let page = if self.page > 1 {
            self.page.to_string()
        } else {
            String::new()
        };
        vec![
            ("status", self.status.clone()),
            ("type", self.export_type.clone()),
            ("requestor", self.requestor.clone()),
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("page", page),
        ]
    }

    fn with_page(&self, page: u64) -> String {
        let mut q = self.clone();
        q.page = page;
        let pairs = q.pairs();
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::api_client::query(&borrowed)
    }
}

/// Everything the page shows.
pub struct ExportsPage<'a> {
    /// The study as `/studies` lists it (title, role, sites).
    pub study: &'a Value,
    /// `/formats?study_id=`.
    pub formats: &'a Value,
    /// `/jobs` with the history query.
    pub jobs: &'a Value,
    pub query: &'a HistoryQuery,
    pub form: &'a FormState,
    pub csrf: &'a str,
    /// A message after an action ("Export queued").
    pub notice: Option<&'a str>,
}

/// The content of the exports page.
pub fn exports_page(p: &ExportsPage) -> Markup {
    let study_id = p.study["id"].as_str().unwrap_or_default();
    html! {
        h1 { "Exports" }
        (create_form(p, study_id))
        section aria-labelledby="history-heading" {
            h2 id="history-heading" tabindex="-1" { "Export history" }
            @if let Some(notice) = p.notice {
                div class="notice" role="status" { p { (notice) } }
            }
            (history_filters(p, study_id))
            // The script announces status changes here (a region that stays while the table is
            // replaced) and offers the pause; without script both stay hidden.
            p id="history-status" class="visually-hidden" aria-live="polite" {}
            button type="button" id="history-pause" class="secondary" aria-pressed="false" hidden { "Pause updates" }
            div id="history" data-source=(format!("/studies/{}/exports/history?{}", enc(study_id), p.query.with_page(p.query.page))) {
                (history(study_id, p.jobs, p.query, p.csrf))
            }
        }
    }
}

fn field_error<'a>(form: &'a FormState, names: &[&str]) -> Option<&'a ApiFailure> {
    form.error.as_ref().filter(|e| {
        e.field.as_deref().is_some_and(|f| {
            names
                .iter()
                .any(|n| f == *n || f.starts_with(&format!("{n}.")))
        })
    })
}

fn create_form(p: &ExportsPage, study_id: &str) -> Markup {
    let form = p.form;
    let allowed: Vec<&Value> = p.formats["formats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["allowed"].as_bool().unwrap_or(true))
        .collect();
    let chosen = if allowed
        .iter()
        .any(|f| f["type"].as_str() == Some(form.export_type.as_str()))
    {
        form.export_type.clone()
    } else {
        allowed
            .first()
            .and_then(|f| f["type"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let sites = p.study["sites"].as_array().cloned().unwrap_or_default();
    let site_role = p.study["role"].as_str() == Some("site-staff");
    let statuses = p.formats["statuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let csv = p.formats["formats"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["options"].as_array().is_some_and(|o| !o.is_empty()));
    let option = |name: &str| -> (Vec<String>, String) {
        let found = csv
            .and_then(|f| f["options"].as_array())
            .into_iter()
            .flatten()
            .find(|o| o["name"] == name);
        let allowed = found
            .and_then(|o| o["allowed"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let default = found
            .and_then(|o| o["default"].as_str())
            .unwrap_or_default()
            .to_string();
        (allowed, default)
    };
    let (encodings, default_encoding) = option("encoding");
    let (delimiters, default_delimiter) = option("delimiter");
    let encoding = if form.encoding.is_empty() {
        default_encoding
    } else {
        form.encoding.clone()
    };
    let delimiter = if form.delimiter.is_empty() {
        default_delimiter
    } else {
        form.delimiter.clone()
    };
    html! {
        section aria-labelledby="new-export" {
            h2 id="new-export" { "New export" }
            @if let Some(error) = &form.error {
                div class="error-summary" role="alert" tabindex="-1" id="form-error" {
                    h3 { "The export was not created" }
                    p { (error.message) " " span class="muted" { "(" (error.code) ")" } }
                }
            }
            @if allowed.is_empty() {
                p { "Your role in this study does not allow creating exports." }
            } @else {
                form method="post" action=(format!("/studies/{}/exports", enc(study_id))) class="create" {
                    input type="hidden" name="csrf" value=(p.csrf);
                    fieldset aria-describedby=[field_error(form, &["type"]).map(|_| "type-error")] {
                        legend { "Export type" }
                        @if field_error(form, &["type"]).is_some() {
                            p class="field-error" id="type-error" { "Choose an export type you may create." }
                        }
                        @for f in &allowed {
                            @let t = f["type"].as_str().unwrap_or_default();
                            div class="choice" {
                                input type="radio" name="type" id=(format!("type-{t}")) value=(t)
                                    checked[t == chosen] aria-describedby=(format!("type-{t}-hint"));
                                label for=(format!("type-{t}")) { (f["label"].as_str().unwrap_or(t)) }
                                span class="hint" id=(format!("type-{t}-hint")) { (f["description"].as_str().unwrap_or_default()) }
                            }
                        }
                    }
                    fieldset {
                        legend { "Filters" }
                        p class="hint" id="dates-hint" {
                            "Dates are inclusive. FHIR JSON: resources last updated in the range; the other types: participants enrolled in it."
                        }
                        @let date_error = field_error(form, &["filters.date_range"]);
                        @if let Some(e) = date_error {
                            p class="field-error" id="dates-error" { (e.message) }
                        }
                        div class="dates" {
                            div {
                                label for="from" { "From" }
                                input type="date" id="from" name="from" value=(form.from)
                                    aria-describedby=(described("dates-hint", date_error.map(|_| "dates-error"))) aria-invalid=[date_error.map(|_| "true")];
                            }
                            div {
                                label for="to" { "To" }
                                input type="date" id="to" name="to" value=(form.to)
                                    aria-describedby=(described("dates-hint", date_error.map(|_| "dates-error"))) aria-invalid=[date_error.map(|_| "true")];
                            }
                        }
                        fieldset class="checks" aria-describedby=(described("sites-hint", field_error(form, &["filters.sites"]).map(|_| "sites-error"))) {
                            legend { "Sites" }
                            p class="hint" id="sites-hint" {
                                @if site_role { "Only your sites are listed. None checked: all of them." }
                                @else { "None checked: every site." }
                            }
                            @if let Some(e) = field_error(form, &["filters.sites"]) {
                                p class="field-error" id="sites-error" { (e.message) }
                            }
                            @for (i, site) in sites.iter().enumerate() {
                                @let id = site["id"].as_str().unwrap_or_default();
                                div class="choice" {
                                    input type="checkbox" name="site" id=(format!("site-{i}")) value=(id)
                                        checked[form.sites.iter().any(|s| s == id)];
                                    label for=(format!("site-{i}")) {
                                        (site["name"].as_str().unwrap_or(id))
                                        @if let Some(city) = site["city"].as_str().filter(|c| !c.is_empty()) {
                                            span class="muted" { ", " (city) }
                                        }
                                    }
                                }
                            }
                        }
                        fieldset class="checks" aria-describedby=(described("statuses-hint", field_error(form, &["filters.statuses"]).map(|_| "statuses-error"))) {
                            legend { "Participant statuses" }
                            p class="hint" id="statuses-hint" { "None checked: every status." }
                            @if let Some(e) = field_error(form, &["filters.statuses"]) {
                                p class="field-error" id="statuses-error" { (e.message) }
                            }
                            @for (i, status) in statuses.iter().filter_map(Value::as_str).enumerate() {
                                div class="choice" {
                                    input type="checkbox" name="status" id=(format!("status-{i}")) value=(status)
                                        checked[form.statuses.iter().any(|s| s == status)];
                                    label for=(format!("status-{i}")) { (status) }
                                }
                            }
                        }
                    }
                    fieldset {
                        legend { "CSV options" }
                        p class="hint" { "For Sites CSV, Participants CSV and the dashboard's CSV files." }
                        @if let Some(e) = field_error(form, &["options"]) {
                            p class="field-error" id="options-error" { (e.message) }
                        }
                        div class="dates" {
                            div {
                                label for="encoding" { "Encoding" }
                                select id="encoding" name="encoding" aria-describedby=[field_error(form, &["options"]).map(|_| "options-error")] {
                                    @for e in &encodings {
                                        option value=(e) selected[*e == encoding] { (encoding_label(e)) }
                                    }
                                }
                            }
                            div {
                                label for="delimiter" { "Delimiter" }
                                select id="delimiter" name="delimiter" aria-describedby=[field_error(form, &["options"]).map(|_| "options-error")] {
                                    @for d in &delimiters {
                                        option value=(d) selected[*d == delimiter] { (delimiter_label(d)) }
                                    }
                                }
                            }
                        }
                    }
                    button type="submit" { "Generate export" }
                }
            }
        }
    }
}

/// An `aria-describedby` of a hint and, when there is one, an error.
fn described(hint: &str, error: Option<&str>) -> String {
    match error {
        Some(error) => format!("{hint} {error}"),
        None => hint.to_string(),
    }
}

fn encoding_label(encoding: &str) -> String {
    match encoding {
        "utf-8" => "UTF-8".into(),
        "utf-8-bom" => "UTF-8 with BOM (Excel)".into(),
        "utf-16le" => "UTF-16LE with BOM".into(),
        "iso-8859-1" => "ISO-8859-1 (Latin-1)".into(),
        other => other.into(),
    }
}

fn delimiter_label(delimiter: &str) -> String {
    match delimiter {
        "comma" => "Comma (,)".into(),
        "tab" => "Tab".into(),
        "semicolon" => "Semicolon (;)".into(),
        other => other.into(),
    }
}

/// The statuses a job can have, with how the page names them.
const JOB_STATUSES: [(&str, &str); 5] = [
    ("pending", "Running"),
    ("completed", "Completed"),
    ("error", "Failed"),
    ("cancelled", "Cancelled"),
    ("expired", "Expired"),
];

/// The type ids with their labels.
const TYPES: [(&str, &str); 5] = [
    ("fhir", "FHIR JSON"),
    ("sites_csv", "Sites CSV"),
    ("participants_csv", "Participants CSV"),
    ("dashboard", "Dashboard"),
    ("report", "Study report"),
];

fn type_label(t: &str) -> &str {
    TYPES
        .iter()
        .find(|(id, _)| *id == t)
        .map_or(t, |(_, label)| label)
}

fn status_label(s: &str) -> &str {
    JOB_STATUSES
        .iter()
        .find(|(id, _)| *id == s)
        .map_or(s, |(_, label)| label)
}

fn history_filters(p: &ExportsPage, study_id: &str) -> Markup {
    let q = p.query;
    html! {
        form method="get" action=(format!("/studies/{}/exports", enc(study_id))) class="filters" aria-label="Filter the history" {
            div {
                label for="h-status" { "Status" }
                select id="h-status" name="status" {
                    option value="" { "Any" }
                    @for (id, label) in JOB_STATUSES {
                        option value=(id) selected[q.status == id] { (label) }
                    }
                }
            }
            div {
                label for="h-type" { "Type" }
                select id="h-type" name="type" {
                    option value="" { "Any" }
                    @for (id, label) in TYPES {
                        option value=(id) selected[q.export_type == id] { (label) }
                    }
                }
            }
            div {
                label for="h-requestor" { "Requested by" }
                input type="text" id="h-requestor" name="requestor" value=(q.requestor);
            }
            div {
                label for="h-from" { "Requested from" }
                input type="date" id="h-from" name="from" value=(q.from);
            }
            div {
                label for="h-to" { "Requested to" }
                input type="date" id="h-to" name="to" value=(q.to);
            }
            button type="submit" class="secondary" { "Filter" }
        }
    }
}

/// The history table with its pages: the fragment the script refreshes.
pub fn history(study_id: &str, jobs: &Value, query: &HistoryQuery, csrf: &str) -> Markup {
    let items = jobs["items"].as_array().cloned().unwrap_or_default();
    let total = jobs["total"].as_u64().unwrap_or(0);
    let page = jobs["page"].as_u64().unwrap_or(1).max(1);
    let page_size = jobs["page_size"].as_u64().unwrap_or(20).max(1);
    let pages = total.div_ceil(page_size).max(1);
    let base = format!("/studies/{}/exports", enc(study_id));
    html! {
        @if items.is_empty() {
            p { "No export matches." }
        } @else {
            table class="history" {
                caption { "Exports, newest first: page " (page) " of " (pages) ", " (total) " in all" }
                thead {
                    tr {
                        th scope="col" { "Requested" }
                        th scope="col" { "Type" }
                        th scope="col" { "Requested by" }
                        th scope="col" { "Status" }
                        th scope="col" class="num" { "Size" }
                        th scope="col" { "Files kept until" }
                        th scope="col" { "Actions" }
                    }
                }
                tbody {
                    @for job in &items {
                        (row(&base, job, csrf))
                    }
                }
            }
        }
        @if pages > 1 {
            nav aria-label="History pages" class="pages" {
                @if page > 1 {
                    a href=(format!("{base}?{}", query.with_page(page - 1))) rel="prev" { "Previous page" }
                }
                span { "Page " (page) " of " (pages) }
                @if page < pages {
                    a href=(format!("{base}?{}", query.with_page(page + 1))) rel="next" { "Next page" }
                }
            }
        }
    }
}

fn row(base: &str, job: &Value, csrf: &str) -> Markup {
    let id = job["id"].as_str().unwrap_or_default();
    let status = job["status"].as_str().unwrap_or_default();
    let export_type = job["type"].as_str().unwrap_or_default();
    let job_base = format!("{base}/{}", enc(id));
    let pending = status == "pending";
    html! {
        tr data-pending=[pending.then_some("true")] data-status=(status) data-label=(format!("{} export, {}", type_label(export_type), when(job["requested_at"].as_str().unwrap_or_default()))) id=(format!("job-{id}")) {
            td data-label="Requested" { time datetime=(job["requested_at"].as_str().unwrap_or_default()) { (when(job["requested_at"].as_str().unwrap_or_default())) } }
            td data-label="Type" { (type_label(export_type)) }
            td data-label="Requested by" { (job["requestor"].as_str().unwrap_or_default()) }
            td data-label="Status" {
                span class=(format!("status status-{status}")) { (status_label(status)) }
                @if pending {
                    @if let Some(progress) = job["progress"].as_str() {
                        br; span class="muted" { (progress) }
                    }
                }
                @if status == "error" {
                    br; span class="reason" { (job["error"]["message"].as_str().unwrap_or("the export failed")) }
                    br; span class="muted" { (job["error"]["action"].as_str().unwrap_or_default()) }
                }
                @if status == "expired" {
                    br; span class="muted" { "Its files were deleted after the study's retention period: generate it again." }
                }
            }
            td class="num" data-label="Size" {
                @if let Some(bytes) = job["size"].as_u64() {
                    (size(bytes))
                    @if let Some(n) = job["file_count"].as_u64().filter(|n| *n > 1) {
                        br; span class="muted" { (n) " files" }
                    }
                }
            }
            td data-label="Files kept until" {
                @if status == "completed" {
                    @if let Some(expires) = job["expires_at"].as_str() {
                        time datetime=(expires) { (when(expires)) }
                    }
                }
            }
            td class="actions" data-label="Actions" {
                @match status {
                    "pending" => {
                        a class="button secondary" href=(format!("{job_base}/cancel")) id=(format!("cancel-{id}")) { "Cancel" span class="visually-hidden" { " the " (type_label(export_type)) " export" } }
                    }
                    "completed" => {
                        a class="button" href=(format!("{job_base}/download")) id=(format!("download-{id}")) download { "Download" span class="visually-hidden" { " the " (type_label(export_type)) " export" } }
                        @if export_type == "report" || export_type == "dashboard" {
                            a class="button secondary" href=(format!("{job_base}/view")) id=(format!("view-{id}")) { "Open" span class="visually-hidden" { " the " (type_label(export_type)) } }
                        }
                        a class="button secondary" href=(format!("{job_base}/delete")) id=(format!("delete-{id}")) { "Delete" span class="visually-hidden" { " the " (type_label(export_type)) " export" } }
                    }
                    _ => {
                        form method="post" action=(format!("{job_base}/retry")) {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" id=(format!("retry-{id}")) {
                                @if status == "error" { "Retry" } @else { "Generate again" }
                                span class="visually-hidden" { " the " (type_label(export_type)) " export" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Asks before cancelling or deleting (a page of its own: it works without script and keeps
/// the focus order plain).
pub fn confirm_page(study_id: &str, job: &Value, action: &str, csrf: &str) -> Markup {
    let id = job["id"].as_str().unwrap_or_default();
    let export_type = type_label(job["type"].as_str().unwrap_or_default()).to_string();
    let back = format!("/studies/{}/exports", enc(study_id));
    let (heading, explanation, button) = if action == "cancel" {
        (
            "Cancel this export?",
            "The export stops and nothing is kept. You can generate it again later.",
            "Yes, cancel the export",
        )
    } else {
        (
            "Delete this export's files?",
            "Its files are deleted now; the history keeps the row. You can generate it again later.",
            "Yes, delete the files",
        )
    };
    html! {
        h1 { (heading) }
        dl class="summary" {
            dt { "Type" } dd { (export_type) }
            dt { "Requested" } dd { (when(job["requested_at"].as_str().unwrap_or_default())) }
            dt { "Requested by" } dd { (job["requestor"].as_str().unwrap_or_default()) }
            dt { "Status" } dd { (status_label(job["status"].as_str().unwrap_or_default())) }
        }
        p { (explanation) }
        form method="post" action=(format!("{back}/{}/{action}", enc(id))) class="confirm" {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" class="danger" { (button) }
            a class="button secondary" href=(back) { "No, go back" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(id: &str, status: &str, export_type: &str) -> Value {
        json!({"id": id, "type": export_type, "status": status, "requested_at": "2026-11-30T10:00:00.000Z",
            "requestor": "ana@example.org", "size": 2048, "file_count": 1,
            "expires_at": "2026-12-07T10:00:00.000Z", "progress": "queued",
            "error": {"code": "EXP002", "message": "row 3, column 2: no Latin-1", "action": "choose utf-8"}})
    }

    fn render(items: Vec<Value>, total: u64, page: u64) -> String {
        let jobs = json!({"items": items, "total": total, "page": page, "page_size": 20});
        history(
            "s-1",
            &jobs,
            &HistoryQuery {
                page,
                ..Default::default()
            },
            "tok",
        )
        .into_string()
    }

    #[test]
    fn each_status_offers_its_actions() {
        let html = render(
            vec![
                job("a", "pending", "fhir"),
                job("b", "completed", "report"),
                job("c", "error", "sites_csv"),
                job("d", "expired", "participants_csv"),
            ],
            4,
            1,
        );
        assert!(html.contains("id=\"cancel-a\"") && !html.contains("id=\"download-a\""));
        assert!(html.contains("data-pending=\"true\" data-status=\"pending\""));
        assert!(html.contains("id=\"download-b\"") && html.contains("id=\"view-b\""));
        assert!(html.contains("id=\"delete-b\""));
        assert!(html.contains("id=\"retry-c\"") && html.contains("row 3, column 2: no Latin-1"));
        assert!(html.contains("id=\"retry-d\"") && html.contains("generate it again"));
        assert!(html.contains("name=\"csrf\" value=\"tok\""));
        assert_eq!(html.matches("data-pending").count(), 1);
    }

    #[test]
    fn pages_link_both_ways_only_where_there_is_a_page() {
        let items = vec![job("a", "completed", "fhir")];
        let first = render(items.clone(), 45, 1);
        assert!(first.contains("Page 1 of 3") && first.contains("rel=\"next\""));
        assert!(!first.contains("rel=\"prev\""));
        let last = render(items.clone(), 45, 3);
        assert!(last.contains("rel=\"prev\"") && !last.contains("rel=\"next\""));
        let single = render(items, 1, 1);
        assert!(!single.contains("History pages"));
    }

    #[test]
    fn the_form_offers_only_allowed_types_and_given_sites() {
        let study = json!({"id": "s-1", "role": "site-staff", "sites": [{"id": "site-1", "name": "North", "city": "Oslo"}]});
        let formats = json!({"formats": [
            {"type": "fhir", "label": "FHIR JSON", "allowed": true, "options": []},
            {"type": "sites_csv", "label": "Sites CSV", "allowed": true,
             "options": [{"name": "encoding", "allowed": ["utf-8", "iso-8859-1"], "default": "utf-8"},
                         {"name": "delimiter", "allowed": ["comma", "tab"], "default": "comma"}]},
            {"type": "dashboard", "label": "Dashboard", "allowed": false, "options": []}],
            "statuses": ["candidate", "withdrawn"]});
        let jobs = json!({"items": [], "total": 0, "page": 1, "page_size": 20});
        let form = FormState {
            error: Some(ApiFailure {
                status: 400,
                code: "EXP002".into(),
                message: "filters.sites names an unknown site".into(),
                field: Some("filters.sites".into()),
            }),
            ..Default::default()
        };
        let html = exports_page(&ExportsPage {
            study: &study,
            formats: &formats,
            jobs: &jobs,
            query: &HistoryQuery::default(),
            form: &form,
            csrf: "tok",
            notice: None,
        })
        .into_string();
        assert!(html.contains("id=\"type-fhir\"") && html.contains("id=\"type-sites_csv\""));
        assert!(
            !html.contains("id=\"type-dashboard\""),
            "not allowed, not offered"
        );
        assert!(html.contains("value=\"site-1\"") && html.contains("Only your sites"));
        assert!(html.contains("value=\"withdrawn\""));
        assert!(html.contains("<option value=\"iso-8859-1\">"));
        assert!(html.contains("role=\"alert\"") && html.contains("names an unknown site"));
        assert!(html.contains("No export matches."));
    }
}
