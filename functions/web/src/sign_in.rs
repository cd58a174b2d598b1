//! Signing in and out, and finding the session (and so the person) of each request.

use crate::WebPage;
use crate::browser::{self, LOGIN_COOKIE, SESSION_COOKIE};
use crate::pages::layout::bare_page;
use crate::pages::views::{problem_page, signed_out_page};
use crate::relying_party::{claim, new_verifier};
use crate::session::{LOGIN_LIMIT, OPEN_SESSION, Session, SessionKind, key_of};
use bytes::Bytes;
use export_auth::Principal;
use export_core::Body;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

/// `last_seen` is written back at most this often (seconds), not on every request.
const TOUCH_EVERY: i64 = 60;

/// A request's session and who it is.
pub struct Visitor {
    pub session: Session,
    pub principal: Principal,
    /// A new session's cookie, to set on the response.
    pub new_cookie: Option<String>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl WebPage {
    /// `GET /login`: starts the authorization code flow.
    pub(crate) async fn login(
        &self,
        request: &Request<Bytes>,
        context: &crate::RequestContext,
    ) -> Response<Body> {
        let Some(rp) = &self.sign_in else {
            return browser::redirect("/");
        };
        let address = context.client_address.as_deref().unwrap_or("unknown");
        if let Err(wait) = self.login_starts.check(address) {
            let mut response = browser::page(
                StatusCode::TOO_MANY_REQUESTS,
                bare_page(
                    "Slow down",
                    problem_page(
                        "Too many sign-ins started",
                        "Wait a minute, then try again.",
                        None,
                    ),
                ),
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
            return response;
        }
        let origin = self.origin(request);
        let return_to = browser::query(request)
            .get("return_to")
            .and_then(|p| safe_return_to(p))
            .unwrap_or_else(|| "/".into());
        let (state, nonce, verifier) = (
            export_auth::random::token::<24>(),
            export_auth::random::token::<24>(),
            new_verifier(),
        );
        let url = match rp
            .authorization_url(&format!("{origin}/callback"), &state, &nonce, &verifier)
            .await
        {
            Ok(url) => url,
            Err(e) => {
                tracing::error!(error = %e, "the identity provider's discovery failed");
                return unavailable();
            }
        };
        let kind = SessionKind::Login {
            state,
            nonce,
            verifier,
            return_to,
        };
        let now = now();
        let (session, cookie) = Session::new(kind, now, now + LOGIN_LIMIT);
        if let Err(e) = self.sessions.put_session(&session).await {
            tracing::error!(error = %e, "could not store a sign-in");
            return unavailable();
        }
        let mut response = browser::redirect(&url);
        let secure = browser::needs_secure(&origin);
        browser::set_cookie(
            &mut response,
            browser::cookie_name(LOGIN_COOKIE, secure),
            &cookie,
            LOGIN_LIMIT,
            secure,
        );
        response
    }

    /// `GET /callback`: the identity provider sends the browser back with a code.
    pub(crate) async fn callback(&self, request: &Request<Bytes>) -> Response<Body> {
        let Some(rp) = &self.sign_in else {
            return browser::redirect("/");
        };
        let origin = self.origin(request);
        let secure = browser::needs_secure(&origin);
        let query = browser::query(request);
        let failed = |message: &str| {
            let mut response = browser::page(
                StatusCode::BAD_REQUEST,
                bare_page(
                    "Sign-in failed",
                    problem_page("Sign-in failed", message, Some(("/login", "Sign in again"))),
                ),
            );
            browser::clear_cookie(
                &mut response,
                browser::cookie_name(LOGIN_COOKIE, secure),
                secure,
            );
            response
        };
        let Some(cookie) = browser::cookie(request, browser::cookie_name(LOGIN_COOKIE, secure))
        else {
            return failed("This sign-in was not started here, or took too long. Start again.");
        };
        let key = key_of(&cookie);
        let login = match self.sessions.session(&key).await {
            Ok(Some(s)) if s.is_live(now()) => s,
            Ok(_) => return failed("This sign-in took too long. Start again."),
            Err(e) => {
                tracing::error!(error = %e, "could not read a sign-in");
                return unavailable();
            }
        };
        // One use: whatever happens next, this sign-in is over.
        let _ = self.sessions.delete_session(&key).await;
        let SessionKind::Login {
            state,
            nonce,
            verifier,
            return_to,
        } = &login.kind
        else {
            return failed("This sign-in was not started here. Start again.");
        };
        if query.get("state") != Some(state) {
            return failed(
                "The answer of the identity provider does not match this sign-in. Start again.",
            );
        }
        if let Some(error) = query.get("error") {
            // Only RFC 6749's codes reach the log: the value comes from the browser.
            let known = [
                "access_denied",
                "invalid_request",
                "unauthorized_client",
                "unsupported_response_type",
                "invalid_scope",
                "server_error",
                "temporarily_unavailable",
                "login_required",
                "interaction_required",
                "consent_required",
            ];
            let error = known.into_iter().find(|k| k == error).unwrap_or("other");
            tracing::info!(error, "the identity provider refused a sign-in");
            return failed("The identity provider did not sign you in.");
        }
        let Some(code) = query.get("code") else {
            return failed("The identity provider sent no code. Start again.");
        };
        let tokens = match rp
            .exchange(code, verifier, &format!("{origin}/callback"))
            .await
        {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(error = %e, "a code exchange failed");
                return failed("The identity provider did not confirm the sign-in. Start again.");
            }
        };
        if claim(&tokens.id_token, "nonce")
            .as_ref()
            .and_then(|v| v.as_str())
            != Some(nonce)
        {
            return failed("The identity provider's answer is not for this sign-in. Start again.");
        }
        let principal = match self.authenticate(Some(&tokens.id_token)).await {
            Ok(p @ Principal::User { .. }) => p,
            Ok(_) | Err(_) => {
                return failed("The sign-in could not be verified. Start again.");
            }
        };
        let now = now();
        let expires = claim(&tokens.id_token, "exp")
            .and_then(|v| v.as_i64())
            .unwrap_or(now);
        let kind = SessionKind::SignedIn {
            id_token: tokens.id_token,
            label: principal.label(),
        };
        let (session, cookie) = Session::new(kind, now, expires);
        if let Err(e) = self.sessions.put_session(&session).await {
            tracing::error!(error = %e, "could not store a session");
            return unavailable();
        }
        tracing::info!(principal = %principal.id(), "signed in to the page");
        let mut response = browser::redirect(return_to);
        browser::clear_cookie(
            &mut response,
            browser::cookie_name(LOGIN_COOKIE, secure),
            secure,
        );
        browser::set_cookie(
            &mut response,
            browser::cookie_name(SESSION_COOKIE, secure),
            &cookie,
            (expires - now).max(0),
            secure,
        );
        response
    }

    /// `POST /logout`: ends the session (its CSRF token required), then the identity
    /// provider's own session where it has a way to end it.
    pub(crate) async fn logout(&self, request: &Request<Bytes>) -> Response<Body> {
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let origin = self.origin(request);
        let secure = browser::needs_secure(&origin);
        let fields = browser::form(request.body());
        if let Some(cookie) = browser::cookie(request, browser::cookie_name(SESSION_COOKIE, secure))
        {
            let key = key_of(&cookie);
            if let Ok(Some(session)) = self.sessions.session(&key).await {
                if !browser::same_origin(request, &origin)
                    || !session.csrf_matches(browser::first(&fields, "csrf"))
                {
                    return forbidden();
                }
                let _ = self.sessions.delete_session(&key).await;
            }
        }
        let Some(rp) = &self.sign_in else {
            return browser::redirect("/");
        };
        let mut response = match rp.logout_url(&format!("{origin}/signed-out")).await {
            Some(url) => browser::redirect(&url),
            None => signed_out(),
        };
        browser::clear_cookie(
            &mut response,
            browser::cookie_name(SESSION_COOKIE, secure),
            secure,
        );
        response
            .headers_mut()
            .insert("clear-site-data", HeaderValue::from_static("\"cache\""));
        response
    }

    /// The request's session and person, or the response to send instead (a redirect to sign
    /// in). Where authentication is off, everyone gets an open session as the local
    /// administrator.
    pub(crate) async fn visitor(
        &self,
        request: &Request<Bytes>,
    ) -> Result<Visitor, Response<Body>> {
        let now = now();
        let secure = browser::needs_secure(&self.origin(request));
        let found = match browser::cookie(request, browser::cookie_name(SESSION_COOKIE, secure)) {
            Some(cookie) => match self.sessions.session(&key_of(&cookie)).await {
                Ok(found) => found.filter(|s| s.is_live(now)),
                Err(e) => {
                    tracing::error!(error = %e, "could not read a session");
                    return Err(unavailable());
                }
            },
            None => None,
        };
        let sign_in_again = || {
            // The script's refresh cannot follow a sign-in (another site): it gets 401 and
            // reloads the page, which then signs in.
            let fetched = request
                .headers()
                .get("sec-fetch-mode")
                .is_some_and(|m| m != "navigate")
                || request.uri().path().ends_with("/exports/history");
            if fetched {
                return browser::page(
                    StatusCode::UNAUTHORIZED,
                    maud::html! { p role="alert" { "Your session has ended: reload the page to sign in again." } },
                );
            }
            // After signing in, a GET comes back where it was; a form sent with an ended
            // session comes back to the page it was on, not to its action.
            let back = if request.method() == Method::GET {
                request
                    .uri()
                    .path_and_query()
                    .map_or("/".to_string(), |p| p.as_str().to_string())
            } else {
                let path = request.uri().path();
                match path.split('/').nth(2) {
                    Some(study) if path.starts_with("/studies/") => {
                        format!("/studies/{study}/exports")
                    }
                    _ => "/".to_string(),
                }
            };
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("return_to", &back)
                .finish();
            browser::redirect(&format!("/login?{query}"))
        };
        match (&self.sign_in, found) {
            (Some(_), Some(mut session)) => {
                let SessionKind::SignedIn { id_token, .. } = &session.kind else {
                    return Err(sign_in_again());
                };
                let principal = match self.authenticate(Some(id_token)).await {
                    Ok(p) => p,
                    Err(_) => return Err(sign_in_again()),
                };
                if now - session.last_seen >= TOUCH_EVERY {
                    session.last_seen = now;
                    // Only if it still exists: a request in flight at sign-out must not bring
                    // the session back.
                    let _ = self.sessions.touch_session(&session).await;
                }
                Ok(Visitor {
                    session,
                    principal,
                    new_cookie: None,
                })
            }
            (Some(_), None) => Err(sign_in_again()),
            (None, found) => {
                // Authentication is on but no identity provider is configured for the page.
                let principal = self.authenticate(None).await.map_err(|_| no_sign_in())?;
                let (session, new_cookie) = match found {
                    Some(s) if s.kind == SessionKind::Open => (s, None),
                    _ => {
                        let (s, cookie) = Session::new(SessionKind::Open, now, now + OPEN_SESSION);
                        if let Err(e) = self.sessions.put_session(&s).await {
                            tracing::error!(error = %e, "could not store a session");
                            return Err(unavailable());
                        }
                        (s, Some(cookie))
                    }
                };
                Ok(Visitor {
                    session,
                    principal,
                    new_cookie,
                })
            }
        }
    }

    /// The principal a token (or, with authentication off, no token) stands for, decided by
    /// the service's one authenticator.
    pub(crate) async fn authenticate(&self, token: Option<&str>) -> Result<Principal, ()> {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ())?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        self.auth
            .authenticate(&headers, now())
            .await
            .map_err(|failure| {
                if let export_auth::AuthFailure::Internal(detail) = &failure {
                    tracing::error!(error = %detail, "authentication failed");
                }
            })
    }
}

/// `GET /signed-out` (where the identity provider sends the browser back after its logout).
pub(crate) fn signed_out() -> Response<Body> {
    browser::page(StatusCode::OK, bare_page("Signed out", signed_out_page()))
}

/// A path of this site to return to after signing in, or `None`: only a path (one leading
/// slash, not two), no backslash, no space or control character (browsers drop tabs and line
/// breaks from URLs, which turns `/\t/evil.example` into `//evil.example`).
pub(crate) fn safe_return_to(path: &str) -> Option<String> {
    let ok = path.starts_with('/')
        && !path.starts_with("//")
        && path.len() <= 2048
        && path.chars().all(|c| c.is_ascii_graphic() && c != '\\');
    ok.then(|| path.to_string())
}

/// 503 with a page that says to try again.
pub(crate) fn unavailable() -> Response<Body> {
    browser::page(
        StatusCode::SERVICE_UNAVAILABLE,
        bare_page(
            "Try again",
            problem_page(
                "The page cannot answer right now",
                "Try again in a moment. If it keeps happening, contact support.",
                Some(("/", "Go to your studies")),
            ),
        ),
    )
}

fn no_sign_in() -> Response<Body> {
    browser::page(
        StatusCode::SERVICE_UNAVAILABLE,
        bare_page(
            "Sign-in unavailable",
            problem_page(
                "Sign-in is not set up here",
                "This deployment has no identity provider for people. Its administrator can configure one (an OpenID issuer).",
                None,
            ),
        ),
    )
}

pub(crate) fn forbidden() -> Response<Body> {
    browser::page(
        StatusCode::FORBIDDEN,
        bare_page(
            "Not allowed",
            problem_page(
                "This request was refused",
                "It did not come from a page of this site, or the page was too old. Go back, reload the page and try again.",
                Some(("/", "Go to your studies")),
            ),
        ),
    )
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = browser::page(
        StatusCode::METHOD_NOT_ALLOWED,
        bare_page(
            "Not allowed",
            problem_page(
                "This address does not take that request",
                "Use the page's buttons.",
                Some(("/", "Go to your studies")),
            ),
        ),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::safe_return_to;

    #[test]
    fn only_paths_of_this_site_are_returned_to() {
        for good in [
            "/",
            "/studies/study-0/exports?page=2",
            "/studies/a%20b/audit",
        ] {
            assert_eq!(safe_return_to(good).as_deref(), Some(good));
        }
        for bad in [
            "//evil.example",
            "/\t/evil.example",
            "/\u{9}/evil.example",
            "/\n/evil.example",
            "/\\evil.example",
            "\\/evil.example",
            "https://evil.example/",
            "evil.example",
            "/ /x",
            "/é",
            "",
        ] {
            assert_eq!(safe_return_to(bad), None, "{bad:?}");
        }
    }
}
