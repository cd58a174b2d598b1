//! The frame every page shares: the document head (one stylesheet, one script, both served by
//! this binary), a skip link, the study navigation, who is signed in and the sign-out button.

use maud::{DOCTYPE, Markup, html};

/// Which part of a study a page shows (marked as the current one in the navigation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Studies,
    Exports,
    Audit,
    Webhooks,
}

/// The study a page belongs to.
pub struct StudyNav<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub may_audit: bool,
}

/// Who the page is for.
pub struct Viewer<'a> {
    /// Their name or e-mail; `None` when no sign-in is needed (authentication off).
    pub label: Option<&'a str>,
    pub csrf: &'a str,
}

/// A whole page.
pub fn page(
    title: &str,
    viewer: &Viewer,
    study: Option<&StudyNav>,
    section: Section,
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Study exports" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to the content" }
                header class="top" {
                    p class="brand" { a href="/" { "Study exports" } }
                    nav aria-label="Study" {
                        ul {
                            li { (nav_link("/", "Studies", section == Section::Studies)) }
                            @if let Some(study) = study {
                                li { (nav_link(&format!("/studies/{}/exports", enc(study.id)), "Exports", section == Section::Exports)) }
                                @if study.may_audit {
                                    li { (nav_link(&format!("/studies/{}/audit", enc(study.id)), "Audit trail", section == Section::Audit)) }
                                    li { (nav_link(&format!("/studies/{}/webhooks", enc(study.id)), "Webhook deliveries", section == Section::Webhooks)) }
                                }
                            }
                        }
                    }
                    div class="who" {
                        @match viewer.label {
                            Some(label) => {
                                span { "Signed in as " strong { (label) } }
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    button type="submit" class="secondary" { "Sign out" }
                                }
                            }
                            None => span { "Local administrator (authentication is off)" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    @if let Some(study) = study {
                        p class="study-name" { (study.title) " " span class="muted" { "(" (study.id) ")" } }
                    }
                    (content)
                }
            }
        }
    }
}

/// A page outside any study and without a session (sign-in errors, signed out).
pub fn bare_page(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Study exports" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/static/app.css";
            }
            body {
                header class="top" { p class="brand" { a href="/" { "Study exports" } } }
                main id="main" { (content) }
            }
        }
    }
}

fn nav_link(href: &str, text: &str, current: bool) -> Markup {
    html! {
        @if current {
            a href=(href) aria-current="page" { (text) }
        } @else {
            a href=(href) { (text) }
        }
    }
}

/// What a path segment keeps as is: letters, digits and RFC 3986's unreserved marks.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment, percent-encoded.
pub fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// An RFC 3339 time as people read it: `2026-11-30 14:05 UTC`.
pub fn when(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

/// A byte count as people read it.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1000), "1.0 KB");
        assert_eq!(size(1_234_567), "1.2 MB");
        assert_eq!(size(5_000_000_000), "5.0 GB");
        assert_eq!(when("2026-11-30T14:05:09.123Z"), "2026-11-30 14:05 UTC");
        assert_eq!(when("2026-11-30T15:05:09+01:00"), "2026-11-30 14:05 UTC");
        assert_eq!(when("garbage"), "garbage");
    }

    #[test]
    fn text_is_escaped_and_segments_encoded() {
        let viewer = Viewer {
            label: Some("<script>x</script>"),
            csrf: "t\"",
        };
        let study = StudyNav {
            id: "a/b",
            title: "<b>T</b>",
            may_audit: true,
        };
        let html = page("<T>", &viewer, Some(&study), Section::Exports, html! {}).into_string();
        assert!(!html.contains("<script>x") && html.contains("&lt;script&gt;x"));
        assert!(!html.contains("<b>T") && html.contains("&lt;b&gt;T"));
        assert!(html.contains("/studies/a%2Fb/exports"));
        assert!(html.contains("value=\"t&quot;\""));
        assert!(html.contains("aria-current=\"page\">Exports"));
    }
}
