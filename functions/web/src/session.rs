//! Sessions of the page: who is signed in (their ID token), the CSRF token of their forms, and a
//! sign-in in progress (state, nonce, PKCE verifier).
//!
//! The browser holds only a random 256-bit id in an `HttpOnly` cookie; the store keys sessions
//! by the SHA-256 of that id, so a leaked store does not give working cookies (it does hold the
//! ID tokens, each valid for at most an hour: the store is as sensitive as the tokens). A session
//! ends at sign-out, when its token expires, or after [`IDLE_LIMIT`] without a request.

use async_trait::async_trait;
use export_core::StoreResult;
use export_core::ids::sha256_hex;
use serde::{Deserialize, Serialize};

/// A signed-in session ends after this long without a request (seconds).
pub const IDLE_LIMIT: i64 = 30 * 60;
/// A session where no sign-in is needed (authentication off) lasts this long (seconds).
pub const OPEN_SESSION: i64 = 12 * 3600;
/// A sign-in must come back from the identity provider within this long (seconds).
pub const LOGIN_LIMIT: i64 = 10 * 60;

/// What a session is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionKind {
    /// A person signed in: the ID token the identity provider issued, sent as the bearer token
    /// of each request so the same authenticator decides who they are and what they may do.
    SignedIn { id_token: String, label: String },
    /// No sign-in needed (authentication is off on this server): the session only carries the
    /// CSRF token.
    Open,
    /// A sign-in on its way to the identity provider and back.
    Login {
        state: String,
        nonce: String,
        verifier: String,
        /// Where to go after signing in (a path of this site).
        return_to: String,
    },
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Hex SHA-256 of the cookie's value.
    pub key: String,
    pub kind: SessionKind,
    /// Every form of the session carries it; a POST without it is refused.
    pub csrf: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub last_seen: i64,
    /// Hard end (the token's expiry, or the sign-in's limit).
    pub expires: i64,
}

impl Session {
    /// A new session and the cookie value that names it.
    pub fn new(kind: SessionKind, now: i64, expires: i64) -> (Session, String) {
        let cookie = export_auth::random::token::<32>();
        let session = Session {
            key: key_of(&cookie),
            kind,
            csrf: export_auth::random::token::<24>(),
            created: now,
            last_seen: now,
            expires,
        };
        (session, cookie)
    }

    /// Whether the session can still be used at `now`.
    pub fn is_live(&self, now: i64) -> bool {
        let idle = match self.kind {
            SessionKind::Login { .. } => false,
            _ => now - self.last_seen > IDLE_LIMIT,
        };
        now < self.expires && !idle
    }

    /// Whether `sent` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, sent: &str) -> bool {
        let (a, b) = (self.csrf.as_bytes(), sent.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The store key of a cookie value.
pub fn key_of(cookie: &str) -> String {
    sha256_hex(cookie.as_bytes())
}

/// Where sessions are kept: SQLite locally, DynamoDB (with TTL) on AWS.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Adds or replaces a session.
    async fn put_session(&self, session: &Session) -> StoreResult<()>;
    /// The session with this key, if it exists (expired ones may be returned; callers check).
    async fn session(&self, key: &str) -> StoreResult<Option<Session>>;
    async fn delete_session(&self, key: &str) -> StoreResult<()>;
    /// Writes the session back only if it still exists (a request in flight at sign-out must
    /// not bring it back).
    async fn touch_session(&self, session: &Session) -> StoreResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_at_expiry_and_after_idling() {
        let (mut s, cookie) = Session::new(SessionKind::Open, 1000, 5000);
        assert_eq!(s.key, key_of(&cookie));
        assert_ne!(s.key, cookie, "the store never holds the cookie");
        assert!(s.is_live(1000 + IDLE_LIMIT));
        assert!(!s.is_live(1001 + IDLE_LIMIT), "idle too long");
        s.last_seen = 4900;
        assert!(s.is_live(4999));
        assert!(!s.is_live(5000), "expired");
    }

    #[test]
    fn a_sign_in_in_progress_does_not_idle_out_but_expires() {
        let kind = SessionKind::Login {
            state: "s".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            return_to: "/".into(),
        };
        let (s, _) = Session::new(kind, 0, LOGIN_LIMIT);
        assert!(s.is_live(LOGIN_LIMIT - 1));
        assert!(!s.is_live(LOGIN_LIMIT));
    }

    #[test]
    fn csrf_tokens_compare_exactly() {
        let (s, _) = Session::new(SessionKind::Open, 0, 10);
        let token = s.csrf.clone();
        assert!(s.csrf_matches(&token));
        assert!(!s.csrf_matches(""));
        assert!(!s.csrf_matches(&token[1..]));
        let mut other = token.into_bytes();
        other[0] ^= 1;
        assert!(!s.csrf_matches(&String::from_utf8_lossy(&other)));
    }

    #[test]
    fn cookies_are_unguessable_and_distinct() {
        let (a, ca) = Session::new(SessionKind::Open, 0, 10);
        let (b, cb) = Session::new(SessionKind::Open, 0, 10);
        assert_ne!(ca, cb);
        assert_ne!(a.csrf, b.csrf);
        assert!(ca.len() >= 43, "256 bits, base64url");
    }
}
