//! `bulk-export`: run the FHIR Bulk Data export server locally, load data, generate sample data.

use bulk_export_local::admin;
use bulk_export_local::files::FileOutput;
use bulk_export_local::server::{LocalService, serve};
use bulk_export_local::sqlite::SqliteStore;
use clap::{Args, Parser, Subcommand};
use export_core::Settings;
use export_core::fhir::time::now_millis;
use export_core::generate::{generate, generate_studies};
use export_core::load::{data_files, prepare, read_file};
use export_core::ports::NewResource;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "bulk-export",
    version,
    about = "FHIR Bulk Data ($export) server with an embedded store"
)]
struct Cli {
    /// Log lines on stderr as JSON (one object per line) or as text. `RUST_LOG` sets what is
    /// logged (default `info`: one line per request, plus warnings and errors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ImportsCommand {
    /// Print an import job as JSON: status, files, lines, resources written and unchanged,
    /// errors, and the S3 address of its error file (NDJSON of {file, line or entry, message}).
    /// Needs a build with `--features aws` and the usual AWS environment.
    Show {
        /// The import's name (`<name>` of `import/<name>/`).
        id: String,
        /// The deployment's jobs table (stack output JobsTableName).
        #[arg(long)]
        dynamodb_table: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the FHIR API at http://ADDR/fhir.
    Serve(ServeArgs),
    /// SMART Backend Services clients (bulk FHIR clients) and their keys.
    Clients {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Write the AWS deployment's auth table (stack output AuthTableName) instead of SQLite.
        /// Needs a build with `--features aws` and the usual AWS environment.
        #[arg(long, global = true)]
        dynamodb_table: Option<String>,
        #[command(subcommand)]
        command: admin::ClientsCommand,
    },
    /// People who sign in with tokens of the local issuer.
    Users {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Write the AWS deployment's auth table (stack output AuthTableName) instead of SQLite.
        /// Needs a build with `--features aws` and the usual AWS environment.
        #[arg(long, global = true)]
        dynamodb_table: Option<String>,
        #[command(subcommand)]
        command: admin::UsersCommand,
    },
    /// Print a token of the local issuer for a user.
    Token {
        #[arg(long, default_value = "bulk-export.db")]
        db: PathBuf,
        #[arg(long)]
        user: String,
        /// How long the token lives: 90s, 15m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Study memberships: who has which role in which study.
    Members {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Write the AWS deployment's auth table (stack output AuthTableName) instead of SQLite.
        /// Needs a build with `--features aws` and the usual AWS environment.
        #[arg(long, global = true)]
        dynamodb_table: Option<String>,
        #[command(subcommand)]
        command: admin::MembersCommand,
    },
    /// Study export settings: retention and webhooks.
    Studies {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        #[command(subcommand)]
        command: admin::StudiesCommand,
    },
    /// The study exports' audit trail.
    Audit {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        #[command(subcommand)]
        command: admin::AuditCommand,
    },
    /// API keys for system integrations.
    ApiKeys {
        #[arg(long, global = true, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Write the AWS deployment's auth table (stack output AuthTableName) instead of SQLite.
        /// Needs a build with `--features aws` and the usual AWS environment.
        #[arg(long, global = true)]
        dynamodb_table: Option<String>,
        #[command(subcommand)]
        command: admin::ApiKeysCommand,
    },
    /// Import .ndjson, .ndjson.gz and Bundle .json files (or directories of them) into the store.
    Load {
        #[arg(long, default_value = "bulk-export.db")]
        db: PathBuf,
        /// Load into this DynamoDB resource table (the AWS deployment) instead of SQLite.
        /// Needs a build with `--features aws`; uses the usual AWS environment (region, credentials,
        /// AWS_ENDPOINT_URL).
        #[arg(long)]
        dynamodb_table: Option<String>,
        /// Partitions per type in the DynamoDB table (the stack's `Shards` parameter). The table
        /// stores its count with its first data; leave this out to use it (16 for a new table).
        /// A count that differs from the stored one is refused.
        #[arg(long)]
        shards: Option<u32>,
        /// The bucket for resources too big for a DynamoDB item (stack output
        /// ResourceBucketName); stored with the table, so later loads may leave it out.
        #[arg(long)]
        resource_bucket: Option<String>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Imports run by the AWS deployment (files put under import/<name>/ of its import bucket).
    Imports {
        #[command(subcommand)]
        command: ImportsCommand,
    },
    /// Write deterministic synthetic R4 data, one NDJSON file per type.
    Generate {
        #[arg(long)]
        patients: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Clinical studies the patients take part in (default: 3, or one per 200 patients).
        #[arg(long)]
        studies: Option<usize>,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// SQLite database holding resources and jobs.
    #[arg(long, default_value = "bulk-export.db")]
    db: PathBuf,
    /// Directory for export files.
    #[arg(long, default_value = "exports")]
    output: PathBuf,
    /// Generate N synthetic patients first if the store is empty.
    #[arg(long)]
    sample: Option<usize>,
    /// Close an output file before it would pass this many bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Close an output file before it would hold more than this many resources.
    #[arg(long)]
    max_file_resources: Option<u64>,
    /// Seconds a completed export's files and status stay available.
    #[arg(long, default_value_t = 24 * 3600)]
    retention_secs: u64,
    /// Work items exported at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Seconds of the export lock's lease (renewed while an export runs).
    #[arg(long, default_value_t = 60, hide = true)]
    lock_lease_secs: u64,
    /// Resources read per page.
    #[arg(long, default_value_t = 1000, hide = true)]
    page_size: usize,
    /// Pause after each page, to make exports slow in tests.
    #[arg(long, default_value_t = 0, hide = true)]
    page_delay_ms: u64,
    /// Row ids per partition of a type (tests use a few, to have many partitions).
    #[arg(long, hide = true)]
    rows_per_partition: Option<u64>,
    /// Seconds between sweeps that delete expired exports.
    #[arg(long, default_value_t = 30, hide = true)]
    expiry_sweep_secs: u64,
    /// Requests per second each caller may make (kick-offs, polls, the study API).
    #[arg(long, default_value_t = 20, hide = true)]
    request_rate: u32,
    /// Whether requests need credentials (bearer tokens, API keys). Default: off on a loopback
    /// address (a request without credentials acts as the local administrator), on elsewhere.
    #[arg(long, env = "BULK_EXPORT_AUTH", value_enum)]
    auth: Option<AuthSwitch>,
    /// Needed, besides `--auth off`, to serve without authentication on a non-loopback address.
    #[arg(long)]
    insecure_no_auth: bool,
    /// The URL clients use to reach this server (default: http(s)://ADDR); the issuer of the
    /// tokens it signs.
    #[arg(long)]
    public_url: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also trust user tokens of this OpenID issuer (exactly its `iss`); needs --oidc-audience
    /// and --oidc-jwks.
    #[arg(long, requires_all = ["oidc_audience", "oidc_jwks"])]
    oidc_issuer: Option<String>,
    /// The `aud` (or Cognito `client_id`) its tokens must carry.
    #[arg(long)]
    oidc_audience: Option<String>,
    /// Its JWK Set: an https URL or a file.
    #[arg(long)]
    oidc_jwks: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthSwitch {
    On,
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Command::Serve(args) => bulk_export_local::runtime::build()
            .map_err(Into::into)
            .and_then(|runtime| runtime.block_on(run_serve(args))),
        Command::Load {
            db,
            dynamodb_table: None,
            paths,
            ..
        } => run_load(&db, &paths),
        Command::Load {
            dynamodb_table: Some(table),
            shards,
            resource_bucket,
            paths,
            ..
        } => run_load_dynamodb(&table, shards, resource_bucket, paths),
        Command::Imports {
            command: ImportsCommand::Show { id, dynamodb_table },
        } => run_imports_show(&dynamodb_table, &id),
        Command::Generate {
            patients,
            out,
            seed,
            studies,
        } => run_generate(patients, &out, seed, studies),
        Command::Clients {
            db,
            dynamodb_table,
            command,
        } => admin::clients(&target(&db, &dynamodb_table), command),
        Command::Users {
            db,
            dynamodb_table,
            command,
        } => admin::users(&target(&db, &dynamodb_table), command),
        Command::Token { db, user, ttl } => admin::token(&db, &user, &ttl),
        Command::Studies { db, command } => admin::studies(&db, command),
        Command::Audit { db, command } => admin::audit(&db, command),
        Command::Members {
            db,
            dynamodb_table,
            command,
        } => admin::members(&target(&db, &dynamodb_table), command),
        Command::ApiKeys {
            db,
            dynamodb_table,
            command,
        } => admin::api_keys(&target(&db, &dynamodb_table), command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Where an administration command writes: `--dynamodb-table` or the SQLite `--db`.
fn target<'a>(db: &'a Path, table: &'a Option<String>) -> admin::Target<'a> {
    match table {
        Some(table) => admin::Target::DynamoDb(table),
        None => admin::Target::Sqlite(db),
    }
}

async fn run_serve(args: ServeArgs) -> CliResult {
    let mut store = SqliteStore::open(&args.db)?;
    if let Some(rows) = args.rows_per_partition {
        store = store.with_rows_per_partition(rows);
    }
    if let Some(patients) = args.sample {
        if store.counts()?.is_empty() {
            let started = std::time::Instant::now();
            let store = store.clone();
            let loaded =
                tokio::task::spawn_blocking(move || load_generated(&store, patients)).await??;
            println!(
                "generated {loaded} resources for {patients} patients in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        } else {
            println!("the store already holds data; --sample skipped");
        }
    }
    let settings = Settings {
        max_file_bytes: args.max_file_bytes,
        max_file_resources: args.max_file_resources.unwrap_or(u64::MAX),
        retention: Duration::from_secs(args.retention_secs),
        lock_lease: Duration::from_secs(args.lock_lease_secs.max(1)),
        page_size: args.page_size.max(1),
        concurrency: args.concurrency.max(1),
        page_delay: Duration::from_millis(args.page_delay_ms),
        ..Settings::default()
    };
    // Decided before binding: a refused configuration never opens a socket.
    let requested: std::net::SocketAddr = tokio::net::lookup_host(&args.addr)
        .await?
        .next()
        .ok_or_else(|| format!("--addr {} resolves to no address", args.addr))?;
    let loopback = requested.ip().is_loopback();
    let switch = args.auth.map(|a| a == AuthSwitch::On);
    let enforce =
        bulk_export_local::server::auth_enforced(switch, loopback, args.insecure_no_auth)?;
    let listener = tokio::net::TcpListener::bind(requested).await?;
    let bound = listener.local_addr()?;
    if !enforce && !loopback {
        eprintln!(
            "WARNING: authentication is off on {bound}: anyone who reaches it can export every patient"
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(bulk_export_local::server::tls_acceptor(cert, key)?),
        _ => None,
    };
    if tls.is_none() && !loopback {
        eprintln!(
            "NOTE: serving plain HTTP on {bound}: tokens must not travel in clear, so put a TLS-terminating proxy in front (or use --tls-cert/--tls-key)"
        );
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let origin = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{bound}"))
        .trim_end_matches('/')
        .to_string();
    // `bulk-export token` signs user tokens with this issuer.
    store.set_setting("issuer", &origin)?;
    let auth = export_auth::AuthConfig {
        enforce,
        issuer: origin.clone(),
        trusted_issuers: oidc_issuers(&args)?,
        // The sign-in page's provider for users with passwords (`users add --password-stdin`).
        provider: true,
    };
    let mut service = LocalService::with_request_rate(
        store,
        FileOutput::new(&args.output)?,
        settings,
        auth,
        args.request_rate.max(1),
    )?;
    service.expiry_sweep = Duration::from_secs(args.expiry_sweep_secs.max(1));
    let base = format!("{scheme}://{bound}/fhir");
    println!("FHIR Bulk Data server listening on {base}");
    println!(
        "  authentication: {}",
        if enforce {
            "on (bearer tokens or API keys; see the README)"
        } else {
            "off (loopback; requests without a token act as the local administrator)"
        }
    );
    println!(
        "  try:  curl -i -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' '{base}/Patient/$export'"
    );
    println!(
        "  then: curl -i '<Content-Location from above>'   (repeat until 200; the body lists the files)"
    );
    println!("  and:  curl '<an output url from the manifest>'");
    std::io::stdout().flush()?;
    tokio::select! {
        served = serve(service, listener, tls) => served?,
        _ = tokio::signal::ctrl_c() => println!("shutting down"),
    }
    Ok(())
}

/// The extra OpenID issuer given on the command line, if any.
fn oidc_issuers(args: &ServeArgs) -> Result<Vec<export_auth::oidc::TrustedIssuer>, String> {
    use export_auth::oidc::{IssuerKeys, TrustedIssuer};
    let (Some(issuer), Some(audience), Some(jwks)) =
        (&args.oidc_issuer, &args.oidc_audience, &args.oidc_jwks)
    else {
        return Ok(Vec::new());
    };
    let keys = if jwks.starts_with("https://") || jwks.starts_with("http://") {
        if !export_auth::jwks::fetchable(jwks) {
            return Err(
                "--oidc-jwks must be an https URL (http only on loopback) or a file".into(),
            );
        }
        IssuerKeys::Url(jwks.clone())
    } else {
        let text = std::fs::read_to_string(jwks).map_err(|e| format!("{jwks}: {e}"))?;
        IssuerKeys::Inline(serde_json::from_str(&text).map_err(|e| format!("{jwks}: {e}"))?)
    };
    Ok(vec![TrustedIssuer {
        issuer: issuer.clone(),
        audience: audience.clone(),
        keys,
    }])
}

/// Writes `patients` generated patients (and their resources) into the store.
fn load_generated(store: &SqliteStore, patients: usize) -> Result<usize, export_core::StoreError> {
    let now = now_millis();
    let mut batch = Vec::new();
    let mut total = 0;
    let mut failure = None;
    generate(patients, 1, &mut |_, resource| {
        if failure.is_some() {
            return;
        }
        match prepare(resource, now) {
            Ok(r) => batch.push(r),
            Err(e) => failure = Some(export_core::StoreError::new(e)),
        }
        if batch.len() >= 5000 {
            total += batch.len();
            if let Err(e) = store.put_resources_blocking(std::mem::take(&mut batch)) {
                failure = Some(e);
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    total += batch.len();
    store.put_resources_blocking(batch)?;
    Ok(total)
}

fn run_load(db: &Path, paths: &[PathBuf]) -> CliResult {
    let store = SqliteStore::open(db)?;
    let now = now_millis();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut problems = 0u64;
    let mut batch: Vec<NewResource> = Vec::new();
    let mut failure = None;
    for file in data_files(paths)? {
        read_file(
            &file,
            now,
            &mut |resource| {
                *counts.entry(resource.resource_type.clone()).or_default() += 1;
                batch.push(resource);
                if batch.len() >= 5000
                    && let Err(e) = store.put_resources_blocking(std::mem::take(&mut batch))
                {
                    failure.get_or_insert(e);
                }
            },
            &mut |issue| {
                problems += 1;
                eprintln!("skipped {issue}");
            },
        )
        .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    store.put_resources_blocking(batch)?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let total: u64 = counts.values().sum();
    for (resource_type, count) in &counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!("{:<28} {total:>10}", "loaded");
    if problems > 0 {
        println!("{:<28} {problems:>10}", "skipped (see above)");
    }
    Ok(())
}

#[cfg(feature = "aws")]
fn run_load_dynamodb(
    table: &str,
    shards: Option<u32>,
    bucket: Option<String>,
    paths: Vec<PathBuf>,
) -> CliResult {
    let runtime = bulk_export_local::runtime::build()?;
    let report = runtime.block_on(async {
        let store = export_aws::AwsService::resource_store(table, shards, bucket).await;
        export_aws::load::load_files(&store, paths).await
    })?;
    for issue in &report.issues {
        eprintln!("skipped {issue}");
    }
    for (resource_type, count) in &report.counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!(
        "{:<28} {:>10}  (into DynamoDB table {table})",
        "loaded",
        report.counts.values().sum::<u64>()
    );
    Ok(())
}

#[cfg(feature = "aws")]
fn run_imports_show(table: &str, id: &str) -> CliResult {
    let runtime = bulk_export_local::runtime::build()?;
    match runtime.block_on(export_aws::import::status::show_in(table, id))? {
        Some(job) => {
            println!("{}", serde_json::to_string_pretty(&job)?);
            Ok(())
        }
        None => Err(format!("no import '{id}' in table {table}").into()),
    }
}

#[cfg(not(feature = "aws"))]
fn run_imports_show(_table: &str, _id: &str) -> CliResult {
    Err("this bulk-export was built without DynamoDB support: rebuild with `--features aws`".into())
}

#[cfg(not(feature = "aws"))]
fn run_load_dynamodb(
    _table: &str,
    _shards: Option<u32>,
    _bucket: Option<String>,
    _paths: Vec<PathBuf>,
) -> CliResult {
    Err("this bulk-export was built without DynamoDB support: rebuild with `--features aws`".into())
}

fn run_generate(patients: usize, out: &Path, seed: u64, studies: Option<usize>) -> CliResult {
    std::fs::create_dir_all(out)?;
    let mut writers: BTreeMap<String, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut failure: Option<std::io::Error> = None;
    generate_studies(patients, seed, studies, &mut |resource_type, resource| {
        if failure.is_some() {
            return;
        }
        let writer = match writers.entry(resource_type.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                match std::fs::File::create(out.join(format!("{resource_type}.ndjson"))) {
                    Ok(f) => e.insert(std::io::BufWriter::new(f)),
                    Err(err) => {
                        failure = Some(err);
                        return;
                    }
                }
            }
        };
        let written = serde_json::to_writer(&mut *writer, &resource)
            .map_err(std::io::Error::from)
            .and_then(|_| writer.write_all(b"\n"));
        if let Err(e) = written {
            failure = Some(e);
        }
        *counts.entry(resource_type.to_string()).or_default() += 1;
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    for writer in writers.values_mut() {
        writer.flush()?;
    }
    for (resource_type, count) in &counts {
        println!("{resource_type:<28} {count:>10}");
    }
    println!(
        "{:<28} {:>10}  (in {})",
        "generated",
        counts.values().sum::<u64>(),
        out.display()
    );
    Ok(())
}
