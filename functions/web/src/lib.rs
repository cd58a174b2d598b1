//! The Exports page for study teams: Study → Exports in the browser.
//!
//! Server-rendered HTML (maud) over the study export API, called in process as the signed-in
//! person, so the page can offer only what the API allows and the API still decides. Sign-in is
//! OpenID Connect (authorization code with PKCE) against the configured issuer; a session
//! cookie then names a server-side session holding the ID token. One stylesheet and one small
//! script are served from the binary: no build step, no CDN, a strict Content-Security-Policy.
//!
//! Paths: `/` (the studies), `/studies/{id}/exports…`, `/studies/{id}/audit`,
//! `/studies/{id}/webhooks`, `/login`, `/callback`, `/logout`, `/signed-out`, `/static/…`.

pub mod api_client;
mod assets;
pub mod browser;
mod handlers;
pub mod pages;
pub mod relying_party;
pub mod session;
mod sign_in;

use bytes::Bytes;
use export_auth::Authenticator;
use export_auth::rate_limit::RateLimiter;
use export_core::Body;
use export_study::router::StudyApi;
use http::{Request, Response};
use relying_party::RelyingParty;
use session::SessionStore;
use std::sync::Arc;

/// The page.
pub struct WebPage {
    pub study: Arc<StudyApi>,
    pub auth: Arc<Authenticator>,
    pub sessions: Arc<dyn SessionStore>,
    /// How people sign in; `None` where authentication is off (the local quick start), and
    /// every visitor is the local administrator.
    pub sign_in: Option<RelyingParty>,
    /// Where browsers reach the site (`https://host`); without it, taken from each request.
    pub public_url: Option<String>,
    /// Sign-ins started per client address: each one stores a row, so anonymous visitors
    /// cannot fill the session store.
    login_starts: RateLimiter,
}

/// What the transport knows about a request.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: String,
    pub client_address: Option<String>,
}

impl WebPage {
    pub fn new(
        study: Arc<StudyApi>,
        auth: Arc<Authenticator>,
        sessions: Arc<dyn SessionStore>,
        sign_in: Option<RelyingParty>,
        public_url: Option<String>,
    ) -> Self {
        WebPage {
            study,
            auth,
            sessions,
            sign_in,
            public_url,
            // Ten at once, then one every six seconds per address.
            login_starts: RateLimiter::new(10, 1.0 / 6.0),
        }
    }

    /// Whether `path` is the page's.
    pub fn owns(path: &str) -> bool {
        matches!(
            path,
            "/" | "/login" | "/callback" | "/logout" | "/signed-out"
        ) || path.starts_with("/studies/")
            || path.starts_with("/static/")
    }

    /// Answers one request of the page.
    pub async fn handle(
        &self,
        request: &Request<Bytes>,
        context: &RequestContext,
    ) -> Response<Body> {
        let path = request.uri().path().to_string();
        // Sign-in cookies belong to one host name: on the development server (plain http on
        // loopback), a page opened under another name (localhost for 127.0.0.1) moves to the
        // announced one first.
        if let Some(public) = &self.public_url
            && !browser::needs_secure(public)
            && request.method() == http::Method::GET
            && browser::origin(request) != public.trim_end_matches('/')
        {
            let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
            return browser::redirect(&format!("{}{target}", public.trim_end_matches('/')));
        }
        if let Some(asset) = path.strip_prefix("/static/") {
            return assets::serve(asset);
        }
        match path.as_str() {
            "/login" => self.login(request, context).await,
            "/callback" => self.callback(request).await,
            "/logout" => self.logout(request).await,
            "/signed-out" => sign_in::signed_out(),
            _ => self.study_pages(request, context).await,
        }
    }

    /// The site's origin as browsers see it.
    fn origin(&self, request: &Request<Bytes>) -> String {
        self.public_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| browser::origin(request))
    }
}
