//! HTTP pieces of the page: responses with the security headers every page carries, redirects,
//! cookies, and form bodies.

use bytes::Bytes;
use export_core::Body;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use maud::Markup;
use std::collections::BTreeMap;

/// The pages load only this site's stylesheet and script, submit forms only here, and cannot
/// be framed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "bx_session";
/// The cookie of a sign-in in progress.
pub const LOGIN_COOKIE: &str = "bx_login";

/// A cookie's name as set on `secure` sites: `__Host-` there, so the browser accepts it only
/// from this host, over https, for the whole site (a sibling subdomain cannot plant one).
pub fn cookie_name(base: &'static str, secure: bool) -> &'static str {
    match (base, secure) {
        (SESSION_COOKIE, true) => "__Host-bx_session",
        (LOGIN_COOKIE, true) => "__Host-bx_login",
        (base, _) => base,
    }
}

/// An HTML page.
pub fn page(status: StatusCode, markup: Markup) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::from(markup.into_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(response.headers_mut(), PAGE_CSP);
    response
}

/// The headers of every answer of the page: its content security policy, no sniffing, no
/// caching (pages hold study data), no referrer leaving the site.
pub fn secure_headers(headers: &mut HeaderMap, csp: &str) {
    headers.insert(
        "content-security-policy",
        HeaderValue::from_str(csp).expect("a valid policy"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// `303 See Other` to `location` (after a POST, and to send the browser elsewhere).
pub fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(Body::Full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    secure_headers(response.headers_mut(), PAGE_CSP);
    response
}

/// Adds a `Set-Cookie`: `HttpOnly`, `SameSite=Lax` (sent on the identity provider's redirect
/// back, not on cross-site POSTs), `Secure` unless the site is plain http on loopback.
pub fn set_cookie(
    response: &mut Response<Body>,
    name: &str,
    value: &str,
    max_age: i64,
    secure: bool,
) {
    let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}");
    if secure {
        cookie.push_str("; Secure");
    }
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(SET_COOKIE, value);
    }
}

/// Removes a cookie.
pub fn clear_cookie(response: &mut Response<Body>, name: &str, secure: bool) {
    set_cookie(response, name, "", 0, secure);
}

/// A cookie the browser sent.
pub fn cookie(request: &Request<Bytes>, name: &str) -> Option<String> {
    request
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Form fields; a field sent several times (checkboxes) keeps every value.
pub fn form(body: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        fields
            .entry(name.into_owned())
            .or_default()
            .push(value.into_owned());
    }
    fields
}

/// The first value of a field, or "".
pub fn first<'a>(fields: &'a BTreeMap<String, Vec<String>>, name: &str) -> &'a str {
    fields
        .get(name)
        .and_then(|v| v.first())
        .map_or("", String::as_str)
}

/// The request's query parameters (the last value of a repeated one).
pub fn query(request: &Request<Bytes>) -> BTreeMap<String, String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Where the browser reaches this site: `scheme://host`, from the proxy's headers or `Host`.
pub fn origin(request: &Request<Bytes>) -> String {
    let headers = request.headers();
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let scheme = first("x-forwarded-proto")
        .filter(|s| s == "https" || s == "http")
        .unwrap_or_else(|| "http".into());
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .unwrap_or_else(|| "localhost".into());
    format!("{scheme}://{host}")
}

/// Whether cookies of `origin` need `Secure`: always, except plain http on loopback (the
/// development server), where a browser would not send them back.
pub fn needs_secure(origin: &str) -> bool {
    !(origin.starts_with("http://") && export_auth::jwks::fetchable(origin))
}

/// Whether a POST comes from a page of this site. Browsers send `Origin` on POSTs; one naming
/// another site is refused even with a valid CSRF token.
pub fn same_origin(request: &Request<Bytes>, own: &str) -> bool {
    match request
        .headers()
        .get("origin")
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(sent) => sent == own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut builder = Request::builder().uri("/x?a=1&b=2&b=3");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(Bytes::new()).unwrap()
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let r = request(&[
            ("cookie", "a=1; bx_session=abc; bx_session_x=no"),
            ("cookie", "c=3"),
        ]);
        assert_eq!(cookie(&r, "bx_session").as_deref(), Some("abc"));
        assert_eq!(cookie(&r, "c").as_deref(), Some("3"));
        assert_eq!(cookie(&r, "bx"), None);
        let empty = request(&[("cookie", "bx_session=")]);
        assert_eq!(cookie(&empty, "bx_session"), None);
    }

    #[test]
    fn set_cookies_carry_every_attribute() {
        let mut response = Response::new(Body::Full(Bytes::new()));
        set_cookie(&mut response, "n", "v", 60, true);
        clear_cookie(&mut response, "m", false);
        let cookies: Vec<&str> = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            [
                "n=v; Path=/; HttpOnly; SameSite=Lax; Max-Age=60; Secure",
                "m=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
            ]
        );
    }

    #[test]
    fn forms_keep_repeated_fields() {
        let f = form(b"site=a&site=b+c&csrf=t%2F1");
        assert_eq!(f["site"], ["a", "b c"]);
        assert_eq!(first(&f, "csrf"), "t/1");
        assert_eq!(first(&f, "missing"), "");
        assert_eq!(query(&request(&[]))["b"], "3");
    }

    #[test]
    fn origins_and_cookie_security() {
        let direct = request(&[("host", "127.0.0.1:8080")]);
        assert_eq!(origin(&direct), "http://127.0.0.1:8080");
        let proxied = request(&[
            ("host", "internal"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "exports.example.org"),
        ]);
        assert_eq!(origin(&proxied), "https://exports.example.org");
        assert!(!needs_secure("http://127.0.0.1:8080"));
        assert!(!needs_secure("http://localhost:3000"));
        assert!(needs_secure("https://127.0.0.1:8443"));
        assert!(needs_secure("http://exports.example.org"));
    }

    #[test]
    fn posts_from_other_sites_are_told_apart() {
        let own = "http://127.0.0.1:8080";
        assert!(same_origin(&request(&[]), own));
        assert!(same_origin(&request(&[("origin", own)]), own));
        assert!(!same_origin(
            &request(&[("origin", "https://evil.example")]),
            own
        ));
        assert!(!same_origin(&request(&[("origin", "null")]), own));
    }
}
