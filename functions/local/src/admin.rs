//! The administration commands: registered SMART clients, users of the local issuer and their
//! tokens, study memberships, and API keys. Each works on the same store `serve` uses.

use crate::sqlite::SqliteStore;
use clap::Subcommand;
use export_auth::ports::{
    ApiKeyStore, ClientKeys, ClientStore, MembershipStore, RegisteredClient, User, UserStore,
};
use export_auth::principal::{Membership, Role};
use export_auth::scopes::Scopes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum ClientsCommand {
    /// Register a SMART Backend Services client with its public keys.
    Add {
        #[arg(long)]
        id: String,
        /// A file holding the client's JWK Set (public keys).
        #[arg(
            long,
            conflicts_with = "jwks_url",
            required_unless_present = "jwks_url"
        )]
        jwks: Option<PathBuf>,
        /// Where the client serves its JWK Set (https; http only on loopback).
        #[arg(long)]
        jwks_url: Option<String>,
        /// The scopes it may be granted (SMART v1 or v2, space-separated).
        #[arg(long, default_value = "system/*.rs")]
        scope: String,
    },
    List,
    Remove {
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Add a user of the local issuer (or rename one). With a password, they can sign in on the
    /// page; given again, it replaces the old one (without one, the old one is kept).
    Add {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// Read the password from the first line of standard input (the safe way: it stays out
        /// of the shell history and the process list).
        #[arg(long, conflicts_with = "password")]
        password_stdin: bool,
        /// The password on the command line (for development and scripts only: other users of
        /// the machine can see it in the process list).
        #[arg(long)]
        password: Option<String>,
    },
    /// Every user: e-mail, name, and whether they have a password (never the hash).
    List,
}

#[derive(Subcommand)]
pub enum MembersCommand {
    /// Give a user a role in a study (replacing any earlier one).
    Grant {
        #[arg(long)]
        user: String,
        #[arg(long)]
        study: String,
        /// study-admin, investigator, data-reviewer or site-staff.
        #[arg(long)]
        role: String,
        /// The sites of a site-staff member (repeat for several).
        #[arg(long = "site")]
        sites: Vec<String>,
    },
    List {
        #[arg(long)]
        study: Option<String>,
    },
    Revoke {
        #[arg(long)]
        user: String,
        #[arg(long)]
        study: String,
    },
}

#[derive(Subcommand)]
pub enum ApiKeysCommand {
    /// Create a key for one study and role; it is printed once and only its hash is kept.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        study: String,
        #[arg(long)]
        role: String,
        #[arg(long = "site")]
        sites: Vec<String>,
    },
    List,
    Revoke {
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum StudiesCommand {
    /// Set a study's retention and webhook.
    Set {
        #[arg(long)]
        study: String,
        /// Days a study's export files are kept (default 7).
        #[arg(long)]
        retention_days: Option<u32>,
        /// Where completed and failed exports are announced (https; http only on loopback).
        /// A new signing secret is printed once.
        #[arg(long, conflicts_with = "no_webhook")]
        webhook_url: Option<String>,
        /// Stop announcing this study's exports.
        #[arg(long)]
        no_webhook: bool,
    },
    /// Every study's settings.
    List,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the audit trail's hash chain; names the first record that breaks it.
    Verify,
    /// Print the trail as JSON lines (oldest first).
    Export,
}

fn now() -> i64 {
    export_core::fhir::time::now_millis().timestamp()
}

/// The stores the administration commands write: the local SQLite store, or with
/// `--dynamodb-table` the AWS deployment's auth table.
struct Stores {
    clients: Arc<dyn ClientStore>,
    users: Arc<dyn UserStore>,
    memberships: Arc<dyn MembershipStore>,
    api_keys: Arc<dyn ApiKeyStore>,
    /// The audit trail membership changes go to (the local store's).
    audit: Option<Arc<dyn export_study::audit::AuditLog>>,
}

/// Where the administration commands keep their records.
pub enum Target<'a> {
    Sqlite(&'a Path),
    /// The AWS deployment's auth table (its stack output `AuthTableName`).
    DynamoDb(&'a str),
}

fn open(target: &Target) -> Result<Stores, Box<dyn std::error::Error>> {
    match target {
        Target::Sqlite(db) => {
            let store = Arc::new(SqliteStore::open(db)?);
            Ok(Stores {
                clients: store.clone(),
                users: store.clone(),
                memberships: store.clone(),
                api_keys: store.clone(),
                audit: Some(store),
            })
        }
        Target::DynamoDb(table) => dynamodb_stores(table),
    }
}

#[cfg(feature = "aws")]
fn dynamodb_stores(table: &str) -> Result<Stores, Box<dyn std::error::Error>> {
    let store = Arc::new(block(export_aws::AwsService::auth_store(table)));
    Ok(Stores {
        clients: store.clone(),
        users: store.clone(),
        memberships: store.clone(),
        api_keys: store,
        audit: None,
    })
}

#[cfg(not(feature = "aws"))]
fn dynamodb_stores(_table: &str) -> Result<Stores, Box<dyn std::error::Error>> {
    Err("this bulk-export was built without DynamoDB support: rebuild with `--features aws`".into())
}

fn block<T>(future: impl std::future::Future<Output = T>) -> T {
    crate::runtime::build().expect("runtime").block_on(future)
}

fn membership(study: &str, role: &str, sites: Vec<String>) -> Result<Membership, String> {
    let role = Role::parse(role).ok_or_else(|| {
        format!("unknown role {role}: use study-admin, investigator, data-reviewer or site-staff")
    })?;
    Membership::new(study, role, sites)
}

pub fn clients(target: &Target, command: ClientsCommand) -> CliResult {
    let store = open(target)?.clients;
    match command {
        ClientsCommand::Add {
            id,
            jwks,
            jwks_url,
            scope,
        } => {
            let keys = match (jwks, jwks_url) {
                (Some(file), _) => {
                    let set: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(&file)?)
                            .map_err(|e| format!("{}: not JSON ({e})", file.display()))?;
                    let keys = set["keys"].as_array().ok_or("the file is not a JWK Set")?;
                    if keys.is_empty() || keys.iter().any(|k| k.get("d").is_some()) {
                        return Err("the JWK Set must hold public keys only, at least one".into());
                    }
                    ClientKeys::Inline(set)
                }
                (None, Some(url)) => {
                    if !export_auth::jwks::fetchable(&url) {
                        return Err("--jwks-url must be https (http only on loopback)".into());
                    }
                    ClientKeys::Url(url)
                }
                (None, None) => return Err("give --jwks FILE or --jwks-url URL".into()),
            };
            let (granted, refused) =
                Scopes::parse_request(&scope, export_core::fhir::is_resource_type)?;
            if granted.is_empty() {
                return Err(
                    format!("no grantable scope in --scope: {}", refused.join("; ")).into(),
                );
            }
            let client = RegisteredClient {
                id: id.clone(),
                keys,
                allowed_scopes: granted.to_scope_string(),
                created: now(),
            };
            block(store.put_client(&client))?;
            println!(
                "registered client {id} (may be granted: {})",
                client.allowed_scopes
            );
        }
        ClientsCommand::List => {
            for c in block(store.clients())? {
                let keys = match &c.keys {
                    ClientKeys::Inline(set) => format!(
                        "{} key(s) registered",
                        set["keys"].as_array().map_or(0, Vec::len)
                    ),
                    ClientKeys::Url(url) => url.clone(),
                };
                println!("{}\t{}\t{keys}", c.id, c.allowed_scopes);
            }
        }
        ClientsCommand::Remove { id } => {
            if !block(store.remove_client(&id))? {
                return Err(format!("no client {id}").into());
            }
            println!("removed client {id}");
        }
    }
    Ok(())
}

pub fn users(target: &Target, command: UsersCommand) -> CliResult {
    let store = open(target)?.users;
    match command {
        UsersCommand::Add {
            email,
            name,
            password_stdin,
            password,
        } => {
            if !email.contains('@') {
                return Err("--email must be an e-mail address".into());
            }
            let password = match (password_stdin, password) {
                (true, _) => Some(read_password_line()?),
                (false, given) => given,
            };
            if let Some(password) = &password {
                export_auth::password::check_new(password)?;
            }
            let email = email.to_ascii_lowercase();
            let existing = block(store.user(&email))?;
            let password_hash = match &password {
                Some(password) => Some(export_auth::password::hash(password)),
                None => existing.and_then(|u| u.password_hash),
            };
            let signs_in = password_hash.is_some();
            let user = User {
                email,
                name,
                subject: export_auth::random::hex_id(),
                created: now(),
                password_hash,
            };
            block(store.put_user(&user))?;
            if password.is_some() && matches!(target, Target::DynamoDb(_)) {
                eprintln!(
                    "note: on AWS people sign in with the Cognito user pool; this password is only used by a local `bulk-export serve`"
                );
            }
            let how = if signs_in {
                "signs in with a password"
            } else {
                "no password: tokens from `bulk-export token` only"
            };
            println!("user {} ready ({how})", user.email);
        }
        UsersCommand::List => {
            for u in block(store.users())? {
                let password = if u.password_hash.is_some() {
                    "password"
                } else {
                    "no password"
                };
                println!("{}\t{}\t{password}", u.email, u.name);
            }
        }
    }
    Ok(())
}

/// The first line of standard input, without its line ending.
fn read_password_line() -> Result<String, Box<dyn std::error::Error>> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err("--password-stdin: standard input had no password".into());
    }
    Ok(password)
}

/// Prints a token of the local issuer for a user (for curl, scripts and tests).
pub fn token(db: &Path, user: &str, ttl: &str) -> CliResult {
    let store = SqliteStore::open(db)?;
    let ttl = parse_duration(ttl)?;
    let user = block(store.user(&user.to_ascii_lowercase()))?
        .ok_or_else(|| format!("no user {user}: add it with `bulk-export users add`"))?;
    let issuer = store
        .setting("issuer")?
        .ok_or("the local issuer is not known yet: start `bulk-export serve` once on this store")?;
    let signer = store.signing_key()?;
    let token = block(export_auth::oidc::local_user_token(
        &signer,
        &issuer,
        &user,
        now(),
        ttl,
    ))?;
    println!("{token}");
    Ok(())
}

pub fn members(target: &Target, command: MembersCommand) -> CliResult {
    let stores = open(target)?;
    let store = stores.memberships.clone();
    match command {
        MembersCommand::Grant {
            user,
            study,
            role,
            sites,
        } => {
            let m = membership(&study, &role, sites)?;
            block(store.grant(&user, &m))?;
            audit_membership(
                &stores,
                serde_json::json!({"change": "grant", "user": user.to_ascii_lowercase(), "study": study,
                    "role": m.role.as_str(), "sites": m.sites.list()}),
            )?;
            println!("{user} is {} of study {study}", m.role.as_str());
        }
        MembersCommand::List { study } => {
            for (email, m) in block(store.all_memberships())? {
                if study.as_ref().is_some_and(|s| *s != m.study) {
                    continue;
                }
                println!(
                    "{}\t{email}\t{}\t{}",
                    m.study,
                    m.role.as_str(),
                    m.sites.list().join(",")
                );
            }
        }
        MembersCommand::Revoke { user, study } => {
            if !block(store.revoke(&user, &study))? {
                return Err(format!("{user} has no membership in study {study}").into());
            }
            audit_membership(
                &stores,
                serde_json::json!({"change": "revoke", "user": user.to_ascii_lowercase(), "study": study}),
            )?;
            println!("revoked {user} from study {study}");
        }
    }
    Ok(())
}

pub fn api_keys(target: &Target, command: ApiKeysCommand) -> CliResult {
    let store = open(target)?.api_keys;
    match command {
        ApiKeysCommand::Create {
            name,
            study,
            role,
            sites,
        } => {
            let m = membership(&study, &role, sites)?;
            let (key, record) = export_auth::api_keys::create(&name, m, now());
            block(store.put_api_key(&record))?;
            eprintln!(
                "API key {} ({name}) created; it is shown only now, keep it secret:",
                record.id
            );
            println!("{key}");
        }
        ApiKeysCommand::List => {
            for k in block(store.api_keys())? {
                let used = k.last_used.map_or("never".to_string(), format_time);
                let state = if k.revoked { "revoked" } else { "active" };
                println!(
                    "{}\t{}\t{}\t{}\tcreated {}\tlast used {used}\t{state}",
                    k.id,
                    k.name,
                    k.membership.study,
                    k.membership.role.as_str(),
                    format_time(k.created)
                );
            }
        }
        ApiKeysCommand::Revoke { id } => {
            if !block(store.revoke_api_key(&id))? {
                return Err(format!("no API key {id}").into());
            }
            println!("revoked API key {id}");
        }
    }
    Ok(())
}

fn format_time(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `90s`, `15m`, `1h`, `2d` or plain seconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: i64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (e.g. 15m, 1h)"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("'{text}' is not a duration (e.g. 15m, 1h)")),
    };
    if seconds <= 0 || seconds > 30 * 86_400 {
        return Err("a token lives between 1 second and 30 days".into());
    }
    Ok(seconds)
}

pub fn studies(db: &Path, command: StudiesCommand) -> CliResult {
    use export_study::jobs::{DEFAULT_RETENTION_DAYS, StudyJobStore, StudySettings};
    let store = SqliteStore::open(db)?;
    match command {
        StudiesCommand::Set {
            study,
            retention_days,
            webhook_url,
            no_webhook,
        } => {
            let mut settings = block(store.settings(&study))?.unwrap_or(StudySettings {
                study_id: study.clone(),
                retention_days: DEFAULT_RETENTION_DAYS,
                webhook_url: None,
                webhook_secret: None,
            });
            if let Some(days) = retention_days {
                if days == 0 || days > 3650 {
                    return Err("--retention-days must be 1 to 3650".into());
                }
                settings.retention_days = days;
            }
            if no_webhook {
                settings.webhook_url = None;
                settings.webhook_secret = None;
            }
            let mut new_secret = None;
            if let Some(url) = webhook_url {
                if !export_study::webhooks::allowed_target(&url) {
                    return Err("--webhook-url must be https (http only on loopback)".into());
                }
                let secret = export_study::webhooks::new_secret();
                settings.webhook_url = Some(url);
                settings.webhook_secret = Some(secret.clone());
                new_secret = Some(secret);
            }
            block(store.put_settings(&settings))?;
            println!(
                "study {study}: files kept {} days; webhook {}",
                settings.retention_days,
                settings.webhook_url.as_deref().unwrap_or("none")
            );
            if let Some(secret) = new_secret {
                eprintln!(
                    "the webhook signing secret (shown only now; verify webhook-signature with it):"
                );
                println!("{secret}");
            }
        }
        StudiesCommand::List => {
            for s in block(store.all_settings())? {
                println!(
                    "{}\tretention {} days\twebhook {}",
                    s.study_id,
                    s.retention_days,
                    s.webhook_url.as_deref().unwrap_or("none")
                );
            }
        }
    }
    Ok(())
}

pub fn audit(db: &Path, command: AuditCommand) -> CliResult {
    use export_study::audit::{AuditLog, verify};
    let store = SqliteStore::open(db)?;
    let records = block(store.all_records())?;
    match command {
        AuditCommand::Verify => match verify(&records) {
            Ok(count) => println!("the audit trail is intact: {count} records"),
            Err(broken) => {
                return Err(format!(
                    "the audit trail is broken at record {} (found {}): {}",
                    broken.expected_seq,
                    broken
                        .found_seq
                        .map_or("nothing".to_string(), |s| format!("seq {s}")),
                    broken.reason
                )
                .into());
            }
        },
        AuditCommand::Export => {
            for r in records {
                println!("{}", serde_json::to_string(&r)?);
            }
        }
    }
    Ok(())
}

/// Records a membership change made on the command line in the audit trail.
fn audit_membership(store: &Stores, details: serde_json::Value) -> CliResult {
    use export_study::audit::{AuditAction, AuditEntry, append};
    let Some(log) = &store.audit else {
        return Ok(());
    };
    let mut entry = AuditEntry::new("cli", "command line", AuditAction::MembershipChange);
    entry.study_id = details["study"].as_str().map(String::from);
    entry.details = Some(details);
    block(append(log.as_ref(), entry))?;
    Ok(())
}
