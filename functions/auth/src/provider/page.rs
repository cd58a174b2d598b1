//! The sign-in page and the page that refuses an authorization request, as plain HTML: no script
//! and no inline style, so they work under a strict Content-Security-Policy; the service's
//! stylesheet at `/static/app.css`. Everything that came from a request is escaped.

/// What the sign-in form shows.
pub struct LoginForm<'a> {
    /// Where the form posts (the authorization endpoint's path).
    pub action: &'a str,
    /// The signed authorization request, carried through the form.
    pub login_request: &'a str,
    /// The value the login cookie also holds.
    pub csrf_token: &'a str,
    /// Pre-filled e-mail address (after a failure, or a `login_hint`).
    pub email: &'a str,
    /// Why the form is shown again, if it is.
    pub message: Option<&'a str>,
}

/// The sign-in form.
pub fn login_form(form: &LoginForm) -> String {
    let message = form
        .message
        .map(|m| format!("\n<p class=\"error\" role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Sign in</h1>{message}
<form method="post" action="{action}">
<input type="hidden" name="login_request" value="{request}">
<input type="hidden" name="csrf_token" value="{csrf}">
<p><label for="email">E-mail address</label>
<input id="email" name="email" type="email" autocomplete="username" required maxlength="320" value="{email}"></p>
<p><label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p>
</form>"#,
        action = escape(form.action),
        request = escape(form.login_request),
        csrf = escape(form.csrf_token),
        email = escape(form.email),
    );
    document("Sign in", &body)
}

/// A page that explains why sign-in cannot go on (nothing to redirect to, or an internal error).
pub fn error_page(title: &str, message: &str) -> String {
    let body = format!(
        "<h1>{}</h1>\n<p class=\"error\" role=\"alert\">{}</p>",
        escape(title),
        escape(message)
    );
    document(title, &body)
}

fn document(title: &str, body: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{} – bulk-export</title>
<link rel="stylesheet" href="/static/app.css">
</head>
<body>
<main class="sign-in">
{body}
</main>
</body>
</html>
"#,
        escape(title)
    )
}

/// Text for HTML element content and double- or single-quoted attribute values.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_echoed_is_escaped() {
        let html = login_form(&LoginForm {
            action: "/oidc/authorize",
            login_request: "a.b.c",
            csrf_token: "tok",
            email: "\"><script>alert(1)</script>",
            message: Some("<b>wrong</b> & 'quoted'"),
        });
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(html.contains("&lt;b&gt;wrong&lt;/b&gt; &amp; &#39;quoted&#39;"));
        let error = error_page("<t>", "<m>");
        assert!(error.contains("<h1>&lt;t&gt;</h1>") && error.contains("&lt;m&gt;"));
    }

    #[test]
    fn the_form_is_labelled_and_has_no_inline_script_or_style() {
        let html = login_form(&LoginForm {
            action: "/oidc/authorize",
            login_request: "r",
            csrf_token: "c",
            email: "",
            message: None,
        });
        assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
        assert!(html.contains("<main") && html.contains("<h1>Sign in</h1>"));
        assert!(html.contains("<link rel=\"stylesheet\" href=\"/static/app.css\">"));
        for field in ["email", "password"] {
            assert!(
                html.contains(&format!("<label for=\"{field}\">")),
                "{field}"
            );
            assert!(
                html.contains(&format!("id=\"{field}\" name=\"{field}\"")),
                "{field}"
            );
        }
        for inline in [
            "<script",
            "style=",
            "<style",
            "onclick",
            "onsubmit",
            "javascript:",
        ] {
            assert!(!html.contains(inline), "{inline}");
        }
        assert!(!html.contains("role=\"alert\""), "no message, no alert");
    }
}
