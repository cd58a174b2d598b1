//! The stylesheet and the script, compiled into the binary: nothing is fetched from elsewhere
//! (hospital networks are locked down) and there is no front-end build.

use bytes::Bytes;
use export_core::Body;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

const STYLESHEET: &str = include_str!("../static/app.css");
const SCRIPT: &str = include_str!("../static/app.js");

/// `/static/{name}`.
pub fn serve(name: &str) -> Response<Body> {
    let (body, content_type) = match name {
        "app.css" => (STYLESHEET, "text/css; charset=utf-8"),
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        _ => ("not found", "text/plain; charset=utf-8"),
    };
    let mut response = Response::new(Body::Full(Bytes::from_static(body.as_bytes())));
    if body == "not found" {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated after an hour: a new release's assets reach browsers the same day.
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    crate::browser::secure_headers(headers, crate::browser::PAGE_CSP);
    response
}
