//! The study report: one self-contained, printable HTML page of the dashboard's numbers.
//!
//! It is opened from disk, mailed and archived, so it loads nothing (no scripts, stylesheets,
//! fonts or images from anywhere; the chart is inline SVG) and every text from the study is
//! HTML-escaped: site, study and filter values come from the FHIR store and may hold markup.

use crate::dashboard::{Dashboard, MonthlyEnrolment};
use crate::model::{Participant, SUBJECT_STATUSES, StudyData};
use crate::options::Filters;
use std::fmt::Write;

/// Escapes text for HTML content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Screen and print rules. Print: A4 margins, table rows and the chart never split across
/// pages, table headers repeated on each page, the wide sites table in a smaller type with
/// vertical status headings so its 16 columns fit a portrait page.
const STYLE: &str = "
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif;
  color: #111; background: #fff; line-height: 1.4; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .25rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .25rem 0; }
th, td { border: 1px solid #bbb; padding: .2rem .4rem; vertical-align: top; }
thead th { background: #eef2f7; vertical-align: bottom; }
tfoot th, tfoot td { font-weight: 600; border-top: 2px solid #666; }
.num { text-align: right; }
th.status span { display: inline-block; writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; }
table.wide td.name { min-width: 8rem; }
figure.chart { margin: .5rem 0 1rem; max-width: 760px; }
figure.chart svg { width: 100%; height: auto; }
figure.chart svg text { font-size: 11px; fill: #333; }
.bar { fill: #9ecae1; }
.line { fill: none; stroke: #08519c; stroke-width: 2; }
.axis { stroke: #666; stroke-width: 1; }
.grid { stroke: #ddd; stroke-width: 1; }
.note { color: #444; font-size: .9rem; }
@page { size: A4; margin: 15mm; }
@media print {
  body { margin: 0; max-width: none; padding: 0; font-size: 10pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  tr, th, td { break-inside: avoid; page-break-inside: avoid; }
  thead { display: table-header-group; }
  tfoot { display: table-footer-group; }
  table { width: 100%; }
  table.wide { font-size: 8pt; }
  figure.chart { break-inside: avoid; page-break-inside: avoid; max-width: 100%; }
  thead th { background: none; }
}
";

/// The report of `selected` (the participants the dashboard counted). The filters shown are
/// the dashboard's ([`Dashboard::with_filters`]).
pub fn report_html(
    data: &StudyData,
    selected: &[&Participant],
    dashboard: &Dashboard,
    generated_at: &str,
) -> String {
    let study = &data.study;
    let mut html = String::new();
    html.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(
        html,
        "<title>Study report: {} ({})</title>",
        escape(&study.title),
        escape(&study.id)
    );
    let _ = writeln!(html, "<style>{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(html, "<h1>Study report: {}</h1>", escape(&study.title));

    html.push_str("<section>\n<h2>Summary</h2>\n<dl class=\"summary\">\n");
    let summary = [
        ("Study id", escape(&study.id)),
        ("Title", escape(&study.title)),
        ("Status", escape(&study.status)),
        (
            "Generated at",
            format!("<time datetime=\"{0}\">{0}</time>", escape(generated_at)),
        ),
        (
            "Participants",
            format!(
                "{} selected of {} in the study",
                selected.len(),
                data.participants.len()
            ),
        ),
        ("Filters applied", filters_html(data, &dashboard.filters)),
    ];
    for (term, value) in summary {
        let _ = writeln!(html, "<dt>{term}</dt><dd>{value}</dd>");
    }
    html.push_str("</dl>\n</section>\n");

    sites_table(&mut html, data, dashboard);
    rates_table(&mut html, dashboard);

    html.push_str("<section>\n<h2>Enrolment</h2>\n");
    let _ = writeln!(
        html,
        "<figure class=\"chart\">{}</figure>",
        chart(&dashboard.enrolment_by_month)
    );
    months_table(&mut html, dashboard);
    let _ = writeln!(
        html,
        "<p class=\"note\">Participants without an enrolment date (not in the chart and table): \
         {}.</p>\n</section>",
        dashboard.without_enrolment_date
    );
    html.push_str("</body>\n</html>\n");
    html
}

/// The filters in words, escaped; sites by name and id.
fn filters_html(data: &StudyData, filters: &Filters) -> String {
    let mut parts = Vec::new();
    if let Some(range) = &filters.date_range {
        match (range.from, range.to) {
            (Some(from), Some(to)) => parts.push(format!("enrolled from {from} to {to}")),
            (Some(from), None) => parts.push(format!("enrolled on or after {from}")),
            (None, Some(to)) => parts.push(format!("enrolled on or before {to}")),
            (None, None) => {}
        }
    }
    if let Some(sites) = &filters.sites {
        let names: Vec<String> = sites
            .iter()
            .map(|id| match data.site(id) {
                Some(site) => format!("{} ({})", escape(&site.name), escape(id)),
                None => escape(id),
            })
            .collect();
        parts.push(format!("sites: {}", or_none(names)));
    }
    if let Some(statuses) = &filters.statuses {
        let statuses: Vec<String> = statuses.iter().map(|s| escape(s)).collect();
        parts.push(format!("statuses: {}", or_none(statuses)));
    }
    if parts.is_empty() {
        "none (all participants)".to_string()
    } else {
        parts.join("; ")
    }
}

fn or_none(items: Vec<String>) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// Sites × statuses, with a totals row; participants at no site of the study are marked so.
fn sites_table(html: &mut String, data: &StudyData, d: &Dashboard) {
    html.push_str("<section>\n<h2>Participants per site and status</h2>\n");
    html.push_str(
        "<table class=\"wide\">\n<caption>Selected participants per site and status</caption>\n",
    );
    html.push_str("<thead><tr><th scope=\"col\">Site id</th><th scope=\"col\">Site name</th>");
    for status in SUBJECT_STATUSES {
        let _ = write!(
            html,
            "<th scope=\"col\" class=\"status\"><span>{}</span></th>",
            escape(status)
        );
    }
    html.push_str("<th scope=\"col\" class=\"num\">Total</th></tr></thead>\n<tbody>\n");
    for site in &d.by_site_status {
        let name = match data.site(&site.site_id) {
            Some(_) => escape(&site.site_name),
            None => "<em>not a site of this study</em>".to_string(),
        };
        let _ = write!(
            html,
            "<tr><th scope=\"row\">{}</th><td class=\"name\">{name}</td>",
            escape(&site.site_id),
        );
        for status in SUBJECT_STATUSES {
            let n = site.statuses.get(status).copied().unwrap_or(0);
            let _ = write!(html, "<td class=\"num\">{n}</td>");
        }
        let _ = writeln!(html, "<td class=\"num\">{}</td></tr>", site.total);
    }
    html.push_str("</tbody>\n<tfoot><tr><th scope=\"row\" colspan=\"2\">All sites</th>");
    for status in SUBJECT_STATUSES {
        let n: u64 = d
            .by_site_status
            .iter()
            .map(|s| s.statuses.get(status).copied().unwrap_or(0))
            .sum();
        let _ = write!(html, "<td class=\"num\">{n}</td>");
    }
    let total: u64 = d.by_site_status.iter().map(|s| s.total).sum();
    let _ = writeln!(
        html,
        "<td class=\"num\">{total}</td></tr></tfoot>\n</table>\n</section>"
    );
}

/// A rate as a percentage; a dash when undefined.
fn percent(rate: Option<f64>) -> String {
    rate.map(|r| format!("{:.2}&#160;%", r * 100.0))
        .unwrap_or_else(|| "&#8212;".to_string())
}

fn rates_table(html: &mut String, d: &Dashboard) {
    html.push_str("<section>\n<h2>Rates</h2>\n<table>\n<caption>Screen failure and withdrawal rates</caption>\n");
    html.push_str(
        "<thead><tr><th scope=\"col\">Metric</th><th scope=\"col\" class=\"num\">Numerator</th>\
         <th scope=\"col\" class=\"num\">Denominator</th><th scope=\"col\" class=\"num\">Rate</th>\
         <th scope=\"col\">Definition</th></tr></thead>\n<tbody>\n",
    );
    let rows = [
        (
            "Screen failure rate",
            d.screen_failures,
            d.screened,
            d.screen_failure_rate,
            "Participants with status ineligible or not-registered, divided by those screened: \
             every status except candidate and potential-candidate.",
        ),
        (
            "Withdrawal rate",
            d.withdrawals,
            d.enrolled,
            d.withdrawal_rate,
            "Participants with status withdrawn, divided by those enrolled: with an assigned or \
             actual arm, or status on-study, on-study-intervention, on-study-observation, \
             follow-up, off-study or withdrawn.",
        ),
    ];
    for (metric, numerator, denominator, rate, definition) in rows {
        let _ = writeln!(
            html,
            "<tr><th scope=\"row\">{metric}</th><td class=\"num\">{numerator}</td>\
             <td class=\"num\">{denominator}</td><td class=\"num\">{}</td><td>{definition}</td></tr>",
            percent(rate)
        );
    }
    html.push_str("</tbody>\n</table>\n</section>\n");
}

fn months_table(html: &mut String, d: &Dashboard) {
    html.push_str("<table>\n<caption>Enrolment per month</caption>\n");
    html.push_str(
        "<thead><tr><th scope=\"col\">Month</th><th scope=\"col\" class=\"num\">New enrolments</th>\
         <th scope=\"col\" class=\"num\">Cumulative</th></tr></thead>\n<tbody>\n",
    );
    for m in &d.enrolment_by_month {
        let _ = writeln!(
            html,
            "<tr><th scope=\"row\">{}</th><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&m.month),
            m.enrolled,
            m.cumulative
        );
    }
    html.push_str("</tbody>\n</table>\n");
}

/// An axis step of 1, 2 or 5 × 10ⁿ giving about four intervals up to `max`.
fn nice_step(max: u64) -> u64 {
    let raw = max.div_ceil(4).max(1);
    let mut magnitude = 1;
    while magnitude * 10 <= raw {
        magnitude *= 10;
    }
    [1, 2, 5, 10]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10 * magnitude)
}

/// Chart geometry (SVG user units).
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 56.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;

/// Cumulative enrolment as a line (left axis) over monthly enrolments as bars (right axis):
/// the two differ in scale by the number of months, so each has its own axis.
pub fn chart(months: &[MonthlyEnrolment]) -> String {
    let mut svg = String::new();
    let (Some(first), Some(last)) = (months.first(), months.last()) else {
        svg.push_str(
            "<svg viewBox=\"0 0 720 60\" role=\"img\" aria-label=\"Enrolment over time: no \
             enrolment dates\"><title>Enrolment over time</title>\
             <text x=\"10\" y=\"35\">No selected participant has an enrolment date.</text></svg>",
        );
        return svg;
    };
    let peak = months.iter().max_by_key(|m| m.enrolled).unwrap_or(first);
    let label = format!(
        "Enrolment over time: {} enrolments from {} to {}, at most {} in a month ({})",
        last.cumulative, first.month, last.month, peak.enrolled, peak.month
    );
    let _ = write!(
        svg,
        "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{0}\">\
         <title>{0}</title>",
        escape(&label)
    );

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let base = TOP + plot_h;
    let band = plot_w / months.len() as f64;
    let total_step = nice_step(last.cumulative);
    let total_max = (total_step * last.cumulative.div_ceil(total_step)).max(total_step);
    let month_step = nice_step(peak.enrolled);
    let month_max = (month_step * peak.enrolled.div_ceil(month_step)).max(month_step);
    let y_total = |n: u64| base - plot_h * n as f64 / total_max as f64;
    let y_month = |n: u64| base - plot_h * n as f64 / month_max as f64;

    // Left axis (cumulative) with grid lines.
    for n in (0..=total_max).step_by(total_step as usize) {
        let y = y_total(n);
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{n}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    // Right axis (per month).
    for n in (0..=month_max).step_by(month_step as usize) {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"start\">{n}</text>",
            LEFT + plot_w + 6.0,
            y_month(n) + 4.0
        );
    }
    // Bars.
    let bar_w = (band * 0.7).clamp(0.5, 40.0);
    for (i, m) in months.iter().enumerate() {
        let y = y_month(m.enrolled);
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\"/>",
            LEFT + band * i as f64 + (band - bar_w) / 2.0,
            base - y
        );
    }
    // Cumulative line.
    let points: Vec<String> = months
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "{:.1},{:.1}",
                LEFT + band * (i as f64 + 0.5),
                y_total(m.cumulative)
            )
        })
        .collect();
    let _ = write!(
        svg,
        "<polyline class=\"line\" points=\"{}\"/>",
        points.join(" ")
    );
    // Axes lines.
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base:.1}\"/>\
         <line class=\"axis\" x1=\"{0:.1}\" y1=\"{TOP}\" x2=\"{0:.1}\" y2=\"{base:.1}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{base:.1}\" x2=\"{0:.1}\" y2=\"{base:.1}\"/>",
        LEFT + plot_w
    );
    // About six month labels: every so many months, and the last unless it would crowd one.
    let every = months.len().div_ceil(6);
    let last_i = months.len() - 1;
    for (i, m) in months.iter().enumerate() {
        if i % every == 0 || (i == last_i && i % every >= every.div_ceil(2)) {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                LEFT + band * (i as f64 + 0.5),
                base + 16.0,
                escape(&m.month)
            );
        }
    }
    // Legend and axis names.
    let _ = write!(
        svg,
        "<line class=\"line\" x1=\"{LEFT}\" y1=\"12\" x2=\"{:.1}\" y2=\"12\"/>\
         <text x=\"{:.1}\" y=\"16\">Cumulative enrolments (left axis)</text>\
         <rect class=\"bar\" x=\"{:.1}\" y=\"6\" width=\"12\" height=\"12\"/>\
         <text x=\"{:.1}\" y=\"16\">New enrolments per month (right axis)</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">Month of enrolment</text>",
        LEFT + 20.0,
        LEFT + 26.0,
        LEFT + 260.0,
        LEFT + 278.0,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0
    );
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::{select, tests::study};
    use crate::dashboard::dashboard;
    use crate::options::DateRange;

    const HOSTILE: &str = "<img src=x onerror=alert(1)>";

    fn report(data: &StudyData, filters: &Filters) -> String {
        let selected = select(data, filters);
        let d = dashboard(data, &selected, "2024-05-01T12:00:00Z").with_filters(filters);
        report_html(data, &selected, &d, "2024-05-01T12:00:00Z")
    }

    /// The tags of a page (escaped text has no `<`, so these are only real tags).
    fn tags(html: &str) -> Vec<&str> {
        html.split('<')
            .skip(1)
            .map(|t| t.split('>').next().unwrap())
            .collect()
    }

    #[test]
    fn escape_covers_the_five_characters() {
        assert_eq!(
            escape("a & b < c > d \" e ' f"),
            "a &amp; b &lt; c &gt; d &quot; e &#39; f"
        );
    }

    #[test]
    fn the_page_is_self_contained() {
        let mut data = study();
        data.sites[0].name = HOSTILE.into();
        data.study.title = "T\"itle' <b>&".into();
        let html = report(&data, &Filters::default());
        assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        assert!(html.contains("<style>") && html.contains("@media print"));
        let lower = html.to_lowercase();
        for banned in [
            "<script", "<link", "<img", "<iframe", "<object", "url(", "@import", "http",
        ] {
            assert!(!lower.contains(banned), "{banned}");
        }
        for tag in tags(&html) {
            let tag = tag.to_lowercase();
            assert!(!tag.contains("src=") && !tag.contains("href="), "{tag}");
            assert!(!tag.contains(" on"), "an event handler in <{tag}>");
        }
    }

    #[test]
    fn hostile_names_are_escaped() {
        let mut data = study();
        data.sites[0].name = HOSTILE.into();
        data.study.title = "T\"itle' <b>&".into();
        let filters = Filters {
            sites: Some(vec!["s2".into(), "<s>".into()]),
            statuses: Some(vec!["on-study\"><script>".into(), "withdrawn".into()]),
            ..Filters::default()
        };
        let html = report(&data, &filters);
        assert!(!html.contains(HOSTILE));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(
            html.contains("<title>Study report: T&quot;itle&#39; &lt;b&gt;&amp; (st1)</title>")
        );
        assert!(html.contains(
            "sites: &lt;img src=x onerror=alert(1)&gt; (s2), &lt;s&gt;; \
             statuses: on-study&quot;&gt;&lt;script&gt;, withdrawn"
        ));
        assert!(!html.to_lowercase().contains("<script"));
    }

    #[test]
    fn summary_says_what_was_selected() {
        let data = study();
        let filters = Filters {
            date_range: Some(DateRange {
                from: Some("2021-01-01".parse().unwrap()),
                to: Some("2021-12-31".parse().unwrap()),
            }),
            ..Filters::default()
        };
        let html = report(&data, &filters);
        // p1, p2, p3, p5 are enrolled in 2021 with full dates.
        assert!(html.contains("<dd>4 selected of 7 in the study</dd>"));
        assert!(html.contains("<dd>enrolled from 2021-01-01 to 2021-12-31</dd>"));
        assert!(html.contains("<dt>Status</dt><dd>active</dd>"));
        assert!(html.contains("<time datetime=\"2024-05-01T12:00:00Z\">"));
        let html = report(&data, &Filters::default());
        assert!(html.contains("<dd>none (all participants)</dd>"));
    }

    /// The cells of the table row headed `head`.
    fn row<'a>(html: &'a str, head: &str) -> Vec<&'a str> {
        cells(html, &format!("<th scope=\"row\">{head}</th>"))
    }

    /// The cells of the table row starting at `start`.
    fn cells<'a>(html: &'a str, start: &str) -> Vec<&'a str> {
        let start = html.find(start).unwrap();
        let end = start + html[start..].find("</tr>").unwrap();
        html[start..end]
            .split("<td")
            .skip(1)
            .map(|c| {
                let c = &c[c.find('>').unwrap() + 1..];
                &c[..c.find("</td>").unwrap()]
            })
            .collect()
    }

    #[test]
    fn tables_hold_the_hand_counted_numbers() {
        let data = study();
        let html = report(&data, &Filters::default());
        assert!(html.contains("<caption>Selected participants per site and status</caption>"));
        assert!(html.contains("<caption>Enrolment per month</caption>"));
        assert!(html.contains("<th scope=\"col\" class=\"status\"><span>on-study</span></th>"));
        // Columns: name, 13 statuses (alphabetical), total.
        // s2: ineligible p7, on-study p4, withdrawn p3.
        assert_eq!(
            row(&html, "s2"),
            [
                "Second", "0", "0", "0", "1", "0", "0", "1", "0", "0", "0", "0", "0", "1", "3"
            ]
        );
        // s1: candidate p5, on-study p1, screening p2.
        assert_eq!(
            row(&html, "s1"),
            [
                "First", "1", "0", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1", "0", "3"
            ]
        );
        assert_eq!(row(&html, "s3")[14], "0");
        assert_eq!(row(&html, "s9")[0], "<em>not a site of this study</em>");
        assert_eq!(row(&html, "s9")[14], "1");
        let totals = cells(&html, "<th scope=\"row\" colspan=\"2\">All sites</th>");
        assert_eq!(totals.len(), 14);
        assert_eq!(totals[6], "3"); // on-study: p1, p4, p6
        assert_eq!(totals[13], "7");

        // Months: 2020-12 p6; 2021-01 p1, p2; 2021-02 p5; 2021-03 p3 (p4, p7 have no date).
        assert_eq!(row(&html, "2020-12"), ["1", "1"]);
        assert_eq!(row(&html, "2021-01"), ["2", "3"]);
        assert_eq!(row(&html, "2021-02"), ["1", "4"]);
        assert_eq!(row(&html, "2021-03"), ["1", "5"]);
        assert!(html.contains("(not in the chart and table): 2.</p>"));

        // Screened: all but p5 (6); failures: p7. Enrolled: p1, p3, p4, p6; withdrawn: p3.
        assert_eq!(
            row(&html, "Screen failure rate")[..3],
            ["1", "6", "16.67&#160;%"]
        );
        assert_eq!(
            row(&html, "Withdrawal rate")[..3],
            ["1", "4", "25.00&#160;%"]
        );
    }

    #[test]
    fn undefined_rates_show_a_dash() {
        let data = study();
        let filters = Filters {
            statuses: Some(vec!["candidate".into()]),
            ..Filters::default()
        };
        let html = report(&data, &filters);
        assert_eq!(
            row(&html, "Screen failure rate")[..3],
            ["0", "0", "&#8212;"]
        );
    }

    #[test]
    fn the_chart_is_an_accessible_inline_svg() {
        let data = study();
        let html = report(&data, &Filters::default());
        let start = html.find("<svg").unwrap();
        let svg = &html[start..html.find("</svg>").unwrap()];
        assert!(svg.contains("role=\"img\""));
        assert!(svg.contains(
            "aria-label=\"Enrolment over time: 5 enrolments from 2020-12 to 2021-03, at most 2 \
             in a month (2021-01)\""
        ));
        assert!(svg.contains("<title>Enrolment over time: 5 enrolments"));
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 4 + 1); // + the legend
        let points = svg.split("points=\"").nth(1).unwrap();
        assert_eq!(points[..points.find('"').unwrap()].split(' ').count(), 4);
        for month in ["2020-12", "2021-01", "2021-02", "2021-03"] {
            assert!(svg.contains(&format!(">{month}</text>")), "{month}");
        }
        // Axis labels: cumulative 0..=5 by 2 up to 6, monthly 0..=2 by 1.
        assert!(svg.contains("text-anchor=\"end\">6</text>"));
        assert!(svg.contains("text-anchor=\"start\">2</text>"));

        let none = report(
            &data,
            &Filters {
                sites: Some(vec![]),
                ..Filters::default()
            },
        );
        assert!(none.contains("<svg") && none.contains("role=\"img\""));
        assert!(none.contains("No selected participant has an enrolment date."));
    }

    #[test]
    fn axis_steps_are_round() {
        let steps: Vec<u64> = [0, 1, 4, 5, 9, 12, 37, 100, 1234].map(nice_step).to_vec();
        assert_eq!(steps, [1, 1, 1, 2, 5, 5, 10, 50, 500]);
    }
}
