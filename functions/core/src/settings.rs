//! Tunables shared by every deployment.

use std::time::Duration;

/// How exports are cut into files, kept and paced.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A file is closed before a line would take it past this many bytes.
    pub max_file_bytes: u64,
    /// A file is closed before it would hold more than this many resources.
    pub max_file_resources: u64,
    /// How long a finished export's files and status stay available.
    pub retention: Duration,
    /// The export lock's lease; the running job renews it well before it ends.
    pub lock_lease: Duration,
    /// Resources read from the store per page (bounds a worker's memory).
    pub page_size: usize,
    /// A file is also closed once this many resources were read from the store while it was
    /// open, whether or not they were kept: then a selective `_typeFilter` over a big type
    /// still reaches a file boundary, where a worker near its deadline can stop, after a
    /// bounded read. It counts stored rows, not pages or time, so boundaries depend only on
    /// the data and a repeated item rewrites identical files.
    pub part_scan_limit: u64,
    /// `Retry-After` (seconds) for status polls while an export runs.
    pub poll_retry_after: u64,
    /// `Retry-After` (seconds) on a 429 while another export runs.
    pub busy_retry_after: u64,
    /// Work items run at once by an in-process runner.
    pub concurrency: usize,
    /// Pause after each page (tests use it to catch an export mid-run).
    pub page_delay: Duration,
    /// Manifests say `requiresAccessToken: true` and list download routes of this API, which
    /// check the token and owner (and redirect to storage where storage serves the bytes).
    /// Off, manifests list URLs anyone holding them can use (presigned URLs on AWS).
    pub requires_access_token: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_file_bytes: 64 * 1024 * 1024,
            max_file_resources: u64::MAX,
            retention: Duration::from_secs(24 * 3600),
            lock_lease: Duration::from_secs(60),
            page_size: 1000,
            part_scan_limit: 200_000,
            poll_retry_after: 1,
            busy_retry_after: 10,
            concurrency: 2,
            page_delay: Duration::ZERO,
            requires_access_token: false,
        }
    }
}
