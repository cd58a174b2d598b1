//! Settings of the AWS deployment, read from the Lambda environment (see `template.yaml`).

use export_core::Settings;
use std::time::Duration;

/// Names of the AWS resources and the tunables of the functions.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub resources_table: String,
    pub jobs_table: String,
    pub bucket: String,
    pub state_machine_arn: String,
    pub work_queue_url: String,
    /// Partitions per resource type in the resource table (a table stores its own count once
    /// written; this is the count for a new one, and a writer with another count is refused).
    pub shards: u32,
    /// Where resource bodies and patient lists too big for a DynamoDB item are written
    /// (`RESOURCE_BUCKET`); readers take the bucket from the table's config item.
    pub resource_bucket: Option<String>,
    /// Lifetime of presigned download URLs (at most 300 s).
    pub url_expiry: Duration,
    /// Store NDJSON objects gzipped (`Content-Encoding: gzip`).
    pub gzip_output: bool,
    /// Time a worker keeps back before its Lambda deadline to hand over to a fresh invocation.
    pub worker_reserve: Duration,
    /// How often a worker renews the export lock while it exports an item.
    pub heartbeat_every: Duration,
    /// The first retry of a failed work item waits this long; each further one twice as long.
    pub retry_base: Duration,
    /// The longest wait before a retry (below the lock's lease, which the sweeper renews).
    pub retry_max: Duration,
    /// Deliveries of a work message before it goes to the dead-letter queue: the work queue's
    /// `maxReceiveCount` (the template sets both from one value).
    pub work_attempts: u32,
    pub export: Settings,
    /// The table of clients, users, memberships, API key hashes and used assertion ids.
    pub auth_table: String,
    /// The study exports' jobs, settings, audit trail and webhook outbox.
    pub study_table: String,
    /// The KMS key that signs tokens (ECC_NIST_P256); without one, an ephemeral key (tests, and
    /// functions that never sign).
    pub signing_key_id: Option<String>,
    /// The `iss` of the tokens the service signs.
    pub issuer: String,
    /// Whether requests need credentials. Always on when read from the Lambda environment; tests
    /// that do not exercise authentication turn it off.
    pub enforce_auth: bool,
    /// OpenID issuers whose user tokens are accepted (Cognito by default).
    pub trusted_issuers: Vec<export_auth::oidc::TrustedIssuer>,
    /// Where browsers reach the Exports page (`https://…`, `PAGE_URL`); the sign-in's redirect
    /// URI is this plus `/callback`. Without it, taken from each request's host.
    pub page_url: Option<String>,
}

/// A required environment variable (the import settings read theirs the same way).
pub(crate) fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}

/// An optional numeric environment variable, `default` when unset; an error when not a number.
pub(crate) fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}='{v}' is not a number")),
        Err(_) => Ok(default),
    }
}

impl AwsSettings {
    /// Settings for resources named `<prefix>-resources`, `-jobs`, `-auth` and `-exports`, with
    /// authentication off and an ephemeral signing key: tests and benchmarks against emulators.
    pub fn named(prefix: &str) -> Self {
        AwsSettings {
            resources_table: format!("{prefix}-resources"),
            jobs_table: format!("{prefix}-jobs"),
            bucket: format!("{prefix}-exports"),
            state_machine_arn: String::new(),
            work_queue_url: String::new(),
            shards: 4,
            resource_bucket: None,
            url_expiry: Duration::from_secs(300),
            gzip_output: true,
            worker_reserve: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(60),
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(300),
            work_attempts: 5,
            export: Settings::default(),
            auth_table: format!("{prefix}-auth"),
            study_table: format!("{prefix}-study"),
            signing_key_id: None,
            issuer: "https://abc123.execute-api.us-east-1.amazonaws.com".into(),
            enforce_auth: false,
            trusted_issuers: Vec::new(),
            page_url: None,
        }
    }

    /// Reads `RESOURCES_TABLE`, `JOBS_TABLE`, `EXPORT_BUCKET`, `STATE_MACHINE_ARN`,
    /// `WORK_QUEUE_URL`, and optional `SHARDS`, `URL_EXPIRY_SECONDS`, `GZIP_OUTPUT`,
    /// `MAX_FILE_BYTES`, `MAX_FILE_RESOURCES`, `RETENTION_DAYS` (or `RETENTION_SECONDS`),
    /// `LOCK_LEASE_SECONDS`, `WORKER_RESERVE_MS`, `RETRY_BASE_SECONDS`, `RETRY_MAX_SECONDS`,
    /// `WORK_MAX_ATTEMPTS`, `STUDY_TABLE`; for authentication `AUTH_TABLE`,
    /// `SIGNING_KEY_ID`, `TOKEN_ISSUER`, `PRESIGNED_MANIFESTS`, and the trusted OpenID issuer
    /// `OIDC_ISSUER`, `OIDC_AUDIENCE`, `OIDC_JWKS_URL` (Cognito's, by default in the template),
    /// which is also where the Exports page signs people in (as client `OIDC_AUDIENCE`), at
    /// `PAGE_URL`.
    pub fn from_env() -> Result<Self, String> {
        let defaults = Settings::default();
        Ok(AwsSettings {
            resources_table: var("RESOURCES_TABLE")?,
            jobs_table: var("JOBS_TABLE")?,
            bucket: var("EXPORT_BUCKET")?,
            state_machine_arn: std::env::var("STATE_MACHINE_ARN").unwrap_or_default(),
            work_queue_url: std::env::var("WORK_QUEUE_URL").unwrap_or_default(),
            shards: number("SHARDS", 16)?,
            resource_bucket: std::env::var("RESOURCE_BUCKET")
                .ok()
                .filter(|b| !b.is_empty()),
            url_expiry: Duration::from_secs(number("URL_EXPIRY_SECONDS", 300u64)?.min(300)),
            gzip_output: std::env::var("GZIP_OUTPUT").map_or(true, |v| v != "false"),
            worker_reserve: Duration::from_millis(number("WORKER_RESERVE_MS", 60_000)?),
            heartbeat_every: Duration::from_secs(60),
            retry_base: Duration::from_secs(number("RETRY_BASE_SECONDS", 30)?),
            retry_max: Duration::from_secs(number("RETRY_MAX_SECONDS", 300)?),
            work_attempts: number("WORK_MAX_ATTEMPTS", 5)?,
            auth_table: var("AUTH_TABLE")?,
            study_table: var("STUDY_TABLE")?,
            signing_key_id: std::env::var("SIGNING_KEY_ID")
                .ok()
                .filter(|k| !k.is_empty()),
            issuer: std::env::var("TOKEN_ISSUER").unwrap_or_else(|_| "urn:bulk-export".into()),
            // The deployment cannot turn authentication off: no variable is read for it.
            enforce_auth: true,
            trusted_issuers: trusted_issuers()?,
            page_url: std::env::var("PAGE_URL").ok().filter(|u| !u.is_empty()),
            export: Settings {
                // Manifests list the API's download route, which checks the token and redirects
                // to a fresh presigned URL; PRESIGNED_MANIFESTS=true lists presigned URLs instead.
                requires_access_token: std::env::var("PRESIGNED_MANIFESTS")
                    .map_or(true, |v| v != "true"),
                max_file_bytes: crate::output::check_max_file_bytes(number(
                    "MAX_FILE_BYTES",
                    defaults.max_file_bytes,
                )?)?,
                max_file_resources: number("MAX_FILE_RESOURCES", defaults.max_file_resources)?,
                retention: match std::env::var("RETENTION_SECONDS") {
                    Ok(_) => Duration::from_secs(number("RETENTION_SECONDS", 0)?),
                    Err(_) => Duration::from_secs(number("RETENTION_DAYS", 1u64)? * 24 * 3600),
                },
                lock_lease: Duration::from_secs(number("LOCK_LEASE_SECONDS", 900)?),
                ..defaults
            },
        })
    }
}

/// The OpenID issuer of `OIDC_ISSUER` / `OIDC_AUDIENCE` / `OIDC_JWKS_URL`, if set; with
/// `OIDC_PAGE_CLIENT`, trusted for the page's client too.
fn trusted_issuers() -> Result<Vec<export_auth::oidc::TrustedIssuer>, String> {
    use export_auth::oidc::{IssuerKeys, TrustedIssuer};
    let issuer = std::env::var("OIDC_ISSUER").unwrap_or_default();
    if issuer.is_empty() {
        return Ok(Vec::new());
    }
    let jwks = std::env::var("OIDC_JWKS_URL")
        .unwrap_or_else(|_| format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')));
    let mut trusted = vec![TrustedIssuer {
        audience: var("OIDC_AUDIENCE")?,
        issuer: issuer.clone(),
        keys: IssuerKeys::Url(jwks.clone()),
    }];
    // The Exports page's own client at the issuer: its ID tokens are accepted too.
    if let Some(page_client) = std::env::var("OIDC_PAGE_CLIENT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        trusted.push(TrustedIssuer {
            audience: page_client,
            issuer,
            keys: IssuerKeys::Url(jwks),
        });
    }
    Ok(trusted)
}
