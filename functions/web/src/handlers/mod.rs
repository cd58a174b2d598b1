//! The study pages: what each address shows or does, through the study API as the visitor.
//! `exports` creates and follows exports, `files` downloads and shows them, `admin` is the
//! study administrators' audit trail and webhook deliveries.

mod admin;
mod exports;
mod files;

use crate::RequestContext;
use crate::WebPage;
use crate::api_client::{ApiFailure, StudyClient};
use crate::browser::{self, SESSION_COOKIE};
use crate::pages::exports::FormState;
use crate::pages::layout::{Section, StudyNav, Viewer, bare_page, enc, page};
use crate::pages::views::{problem_page, studies_page};
use crate::session::OPEN_SESSION;
use crate::sign_in::{Visitor, forbidden, method_not_allowed};
use bytes::Bytes;
use export_core::Body;
use export_study::service::Caller;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use maud::Markup;
use serde_json::Value;

/// One request, with what every handler needs.
struct Ctx<'a> {
    page: &'a WebPage,
    request: &'a Request<Bytes>,
    client: StudyClient<'a>,
    visitor: &'a Visitor,
}

impl Ctx<'_> {
    fn viewer(&self) -> Viewer<'_> {
        let label = match &self.visitor.session.kind {
            crate::session::SessionKind::SignedIn { label, .. } => Some(label.as_str()),
            _ => None,
        };
        Viewer {
            label,
            csrf: &self.visitor.session.csrf,
        }
    }

    /// A whole page of `study`.
    fn study_page(
        &self,
        status: StatusCode,
        title: &str,
        study: &Value,
        section: Section,
        content: Markup,
    ) -> Response<Body> {
        let nav = StudyNav {
            id: study["id"].as_str().unwrap_or_default(),
            title: study["title"].as_str().unwrap_or_default(),
            may_audit: study["may_audit"].as_bool().unwrap_or(false),
        };
        browser::page(
            status,
            page(title, &self.viewer(), Some(&nav), section, content),
        )
    }

    /// A page that reports what the API refused.
    fn failure_page(&self, failure: &ApiFailure) -> Response<Body> {
        let status =
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let heading = match failure.code.as_str() {
            "EXP001" => "Not found",
            "EXP003" => "Not allowed",
            "EXP004" => "Not possible now",
            "EXP005" => "Something went wrong",
            _ => "The request was not accepted",
        };
        let mut response = browser::page(
            status,
            page(
                heading,
                &self.viewer(),
                None,
                Section::Studies,
                problem_page(heading, &failure.message, Some(("/", "Go to your studies"))),
            ),
        );
        if let Some(retry) = (failure.status == 429).then_some("1") {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static(retry));
        }
        response
    }

    /// The study as `/studies` lists it for the visitor.
    async fn study(&self, id: &str) -> Result<Value, Response<Body>> {
        let studies = self
            .client
            .get("/studies")
            .await
            .map_err(|f| self.failure_page(&f))?;
        studies["studies"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"] == id)
            .cloned()
            .ok_or_else(|| {
                self.failure_page(&ApiFailure {
                    status: 404,
                    code: "EXP001".into(),
                    message: format!("There is no study {id}, or you have no role in it."),
                    field: None,
                })
            })
    }

    /// A job of `study`, as the visitor may see it.
    async fn job(&self, study: &str, id: &str) -> Result<Value, Response<Body>> {
        let job = self
            .client
            .get(&format!("/jobs/{}", enc(id)))
            .await
            .map_err(|f| self.failure_page(&f))?;
        if job["study_id"] != study {
            return Err(self.failure_page(&ApiFailure {
                status: 404,
                code: "EXP001".into(),
                message: format!("Study {study} has no export {id}."),
                field: None,
            }));
        }
        Ok(job)
    }
}

impl WebPage {
    /// Every page but sign-in and assets.
    pub(crate) async fn study_pages(
        &self,
        request: &Request<Bytes>,
        context: &RequestContext,
    ) -> Response<Body> {
        let visitor = match self.visitor(request).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        if let Err(export_auth::AuthFailure::RateLimited { retry_after }) =
            self.auth.rate_check(&visitor.principal)
        {
            let mut response = browser::page(
                StatusCode::TOO_MANY_REQUESTS,
                bare_page(
                    "Slow down",
                    problem_page(
                        "Too many requests",
                        "Wait a moment, then reload the page.",
                        None,
                    ),
                ),
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
            return response;
        }
        let origin = self.origin(request);
        if request.method() == Method::POST {
            let fields = browser::form(request.body());
            if !browser::same_origin(request, &origin)
                || !visitor
                    .session
                    .csrf_matches(browser::first(&fields, "csrf"))
            {
                return forbidden();
            }
        }
        let caller = Caller {
            principal: visitor.principal.clone(),
            request_id: context.request_id.clone(),
            client_address: context.client_address.clone(),
        };
        let mut host_headers = HeaderMap::new();
        for name in ["host", "x-forwarded-host", "x-forwarded-proto"] {
            if let Some(v) = request.headers().get(name) {
                host_headers.insert(name, v.clone());
            }
        }
        let ctx = Ctx {
            page: self,
            request,
            client: StudyClient {
                api: &self.study,
                caller: &caller,
                host_headers,
            },
            visitor: &visitor,
        };
        let segments: Vec<String> = request
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = request.method().clone();
        // A download or a view is audited: a link from another site must not do it in the
        // visitor's name.
        let cross_site = request
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v == "cross-site");
        let mut response = match (&method, segments.as_slice()) {
            (&Method::GET, []) => home(&ctx).await,
            (&Method::GET, ["studies", s, "exports"]) => {
                exports::exports(&ctx, s, FormState::default(), StatusCode::OK).await
            }
            (&Method::POST, ["studies", s, "exports"]) => exports::create(&ctx, s).await,
            (&Method::GET, ["studies", s, "exports", "history"]) => {
                exports::history_fragment(&ctx, s).await
            }
            (&Method::GET, ["studies", s, "exports", _, "download" | "view"]) if cross_site => {
                browser::redirect(&format!("/studies/{}/exports", enc(s)))
            }
            (&Method::GET, ["studies", s, "exports", job, "download"]) => {
                files::download(&ctx, s, job).await
            }
            (&Method::GET, ["studies", s, "exports", job, "view"]) => {
                files::view(&ctx, s, job).await
            }
            (&Method::GET, ["studies", s, "exports", job, action @ ("cancel" | "delete")]) => {
                exports::confirm(&ctx, s, job, action).await
            }
            (&Method::POST, ["studies", s, "exports", job, action @ ("cancel" | "delete")]) => {
                exports::remove(&ctx, s, job, action).await
            }
            (&Method::POST, ["studies", s, "exports", job, "retry"]) => {
                exports::retry(&ctx, s, job).await
            }
            (&Method::GET, ["studies", s, "audit"]) => admin::audit(&ctx, s).await,
            (&Method::GET, ["studies", s, "webhooks"]) => admin::webhooks(&ctx, s).await,
            (_, path) => match allowed_methods(path) {
                Some(allow) => method_not_allowed(allow),
                None => ctx.failure_page(&ApiFailure {
                    status: 404,
                    code: "EXP001".into(),
                    message: "There is no page at this address.".into(),
                    field: None,
                }),
            },
        };
        if let Some(cookie) = &visitor.new_cookie {
            let secure = browser::needs_secure(&origin);
            browser::set_cookie(
                &mut response,
                browser::cookie_name(SESSION_COOKIE, secure),
                cookie,
                OPEN_SESSION,
                secure,
            );
        }
        response
    }
}

/// The methods a page address answers, or `None` for an address that is no page.
fn allowed_methods(path: &[&str]) -> Option<&'static str> {
    Some(match path {
        [] | ["studies", _, "audit" | "webhooks"] => "GET",
        ["studies", _, "exports"] => "GET, POST",
        ["studies", _, "exports", "history"] => "GET",
        ["studies", _, "exports", _, "download" | "view"] => "GET",
        ["studies", _, "exports", _, "cancel" | "delete"] => "GET, POST",
        ["studies", _, "exports", _, "retry"] => "POST",
        _ => return None,
    })
}

/// `/`: the visitor's studies (straight to the study when there is one).
async fn home(ctx: &Ctx<'_>) -> Response<Body> {
    let studies = match ctx.client.get("/studies").await {
        Ok(s) => s,
        Err(f) => return ctx.failure_page(&f),
    };
    let list = studies["studies"].as_array().cloned().unwrap_or_default();
    if let [only] = list.as_slice() {
        return browser::redirect(&format!(
            "/studies/{}/exports",
            enc(only["id"].as_str().unwrap_or_default())
        ));
    }
    browser::page(
        StatusCode::OK,
        page(
            "Your studies",
            &ctx.viewer(),
            None,
            Section::Studies,
            studies_page(&studies),
        ),
    )
}
