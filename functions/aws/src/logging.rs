//! Logs of the Lambda functions: one JSON object per line, the same fields as `bulk-export serve`
//! writes (one line per API request, one per work item), so one query reads both.

use lambda_runtime::tracing::subscriber::{self, EnvFilter};

/// Installs the JSON log subscriber. The level comes from `AWS_LAMBDA_LOG_LEVEL` (Lambda's
/// logging controls), else `RUST_LOG`, else `info`.
pub fn init() {
    let filter = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(|level| level.to_ascii_lowercase())
        .unwrap_or_else(|_| "info".into());
    subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stdout)
        .init();
}
