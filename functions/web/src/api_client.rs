//! The page is a client of the study export API: every read and action goes through the same
//! router, in process, as the signed-in caller. So the page cannot grant what the API refuses,
//! and its messages are the API's (EXP codes, the field at fault).

use bytes::Bytes;
use export_core::Body;
use export_study::router::{BASE, StudyApi};
use export_study::service::Caller;
use http::{HeaderMap, Method, Request, Response};
use serde_json::Value;

/// An error the API answered.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// The request field at fault (a form field of the page).
    pub field: Option<String>,
}

/// The study API as one caller sees it.
pub struct StudyClient<'a> {
    pub api: &'a StudyApi,
    pub caller: &'a Caller,
    /// The browser request's host headers, so links the API builds point where the browser is.
    pub host_headers: HeaderMap,
}

impl StudyClient<'_> {
    /// `GET BASE + path` (a path with its query).
    pub async fn get(&self, path: &str) -> Result<Value, ApiFailure> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiFailure> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ApiFailure> {
        self.json(Method::DELETE, path, None).await
    }

    /// The API's response as is (downloads: a stream or a redirect).
    pub async fn raw(&self, method: Method, path: &str, body: Option<&Value>) -> Response<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{BASE}{path}"))
            .body(Bytes::from(
                body.map(|b| serde_json::to_vec(b).expect("JSON serializes"))
                    .unwrap_or_default(),
            ))
            .expect("a valid request");
        for (name, value) in &self.host_headers {
            request.headers_mut().insert(name, value.clone());
        }
        if body.is_some() {
            request.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        self.api.handle(&request, Some(self.caller)).await
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiFailure> {
        let response = self.raw(method, path, body).await;
        let status = response.status().as_u16();
        let bytes = match response.into_body() {
            Body::Full(bytes) => bytes,
            Body::Stream(_) => Bytes::new(),
        };
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let error = &value["error"];
        Err(ApiFailure {
            status,
            code: error["code"].as_str().unwrap_or("EXP005").to_string(),
            message: error["message"]
                .as_str()
                .unwrap_or("the export service could not answer")
                .to_string(),
            field: error["field"].as_str().map(String::from),
        })
    }
}

/// A query string from pairs, skipping empty values (what an untouched filter form sends).
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if !value.is_empty() {
            serializer.append_pair(name, value);
        }
    }
    serializer.finish()
}
