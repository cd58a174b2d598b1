//! Signing in and out, and finding the session (and so the person) of each request.

use crate::WebPage;
use crate::browser::{self, LOGIN_COOKIE, SESSION_COOKIE};
use crate::pages::layout::bare_page;
use crate::pages::views::{problem_page, signed_out_page};
use crate::relying_party::{claim, new_verifier};
use crate::session::{LOGIN_LIMIT, Session, SessionKind, key_of};
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
    pub(crate) async fn login(&self, request: &Request<Bytes>) -> Response<Body> {
        let Some(rp) = &self.sign_in else {
            return browser::redirect("/");
        };
        let origin = self.origin(request);
        let return_to = browser::query(request)
            .get("return_to")
            .filter(|p| p.starts_with('/') && !p.starts_with("//") && !p.contains('\\'))
            .cloned()
            .unwrap_or_else(|| "/".into());
        let kind = SessionKind::Login {
            state: export_auth::random::token::<24>(),
            nonce: export_auth::random::token::<24>(),
            verifier: new_verifier(),
            return_to,
        };
        let SessionKind::Login {
            state,
            nonce,
            verifier,
            ..
        } = &kind
        else {
            unreachable!("built above")
        };
        let url = match rp
            .authorization_url(&format!("{origin}/callback"), state, nonce, verifier)
            .await
        {
            Ok(url) => url,
            Err(e) => {
                tracing::error!(error = %e, "the identity provider's discovery failed");
                return unavailable();
            }
        };
        let now = now();
        let (session, cookie) = Session::new(kind, now, now + LOGIN_LIMIT);
        if let Err(e) = self.sessions.put_session(&session).await {
            tracing::error!(error = %e, "could not store a sign-in");
            return unavailable();
        }
        let mut response = browser::redirect(&url);
        let secure = browser::needs_secure(&origin);
        browser::set_cookie(&mut response, LOGIN_COOKIE, &cookie, LOGIN_LIMIT, secure);
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
            browser::clear_cookie(&mut response, LOGIN_COOKIE, secure);
            response
        };
        let Some(cookie) = browser::cookie(request, LOGIN_COOKIE) else {
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
            tracing::info!(error = %error, "the identity provider refused a sign-in");
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
        browser::clear_cookie(&mut response, LOGIN_COOKIE, secure);
        browser::set_cookie(
            &mut response,
            SESSION_COOKIE,
            &cookie,
            (expires - now).max(0),
            secure,
        );
        response
    }

    /// `POST /logout`: ends the session (its CSRF token required).
    pub(crate) async fn logout(&self, request: &Request<Bytes>) -> Response<Body> {
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let origin = self.origin(request);
        let secure = browser::needs_secure(&origin);
        let fields = browser::form(request.body());
        if let Some(cookie) = browser::cookie(request, SESSION_COOKIE) {
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
        if self.sign_in.is_none() {
            return browser::redirect("/");
        }
        let mut response =
            browser::page(StatusCode::OK, bare_page("Signed out", signed_out_page()));
        browser::clear_cookie(&mut response, SESSION_COOKIE, secure);
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
        let found = match browser::cookie(request, SESSION_COOKIE) {
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
            let back = request
                .uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string());
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
                    let _ = self.sessions.put_session(&session).await;
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
                        let (s, cookie) = Session::new(SessionKind::Open, now, now + 12 * 3600);
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
