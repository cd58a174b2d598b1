//! The local HTTP server: hyper (over TLS when given a certificate) in front of the shared gateway,
//! plus the background duties of a long-running process (resume interrupted jobs at start, expire
//! old ones).

use crate::dispatch::LocalDispatcher;
use crate::files::FileOutput;
use crate::sqlite::SqliteStore;
use bytes::Bytes;
use export_auth::jwks::HttpJwksFetcher;
use export_auth::ports::AuthPorts;
use export_auth::{AuthConfig, Authenticator};
use export_core::fhir::outcome::IssueCode;
use export_core::fhir::time::now_millis;
use export_core::ports::Dispatcher;
use export_core::router::MAX_BODY;
use export_core::{Api, ApiError, Body, Exporter, Ports, Settings};
use export_gateway::{ClientAddress, Gateway};
use export_study::queue::{InProcessQueue, run_duties, run_queue};
use export_study::router::StudyApi;
use export_study::service::{StudyPorts, StudyService};
use export_study::webhooks::HttpWebhookSender;
use export_web::WebPage;
use export_web::relying_party::{OidcSettings, RelyingParty, UreqOidcHttp};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How often finished exports past their retention are deleted.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);
/// Largest request head (line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The wired-up service: gateway, engine and dispatcher over one store and one output directory.
pub struct LocalService {
    pub gateway: Arc<Gateway>,
    pub exporter: Arc<Exporter>,
    pub dispatcher: Arc<LocalDispatcher>,
    /// How often exports past their retention are deleted.
    pub expiry_sweep: Duration,
    /// Study exports and their in-process queue.
    pub study: Arc<StudyService>,
    study_queue: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Study export jobs run at once.
    pub study_concurrency: usize,
}

impl LocalService {
    /// With `auth.enforce`, manifests require the client's token for downloads.
    pub fn new(
        store: SqliteStore,
        output: FileOutput,
        settings: Settings,
        auth: AuthConfig,
    ) -> export_core::StoreResult<Self> {
        Self::with_request_rate(store, output, settings, auth, 20)
    }

    /// Like [`LocalService::new`], limiting each caller to `per_second` kick-offs, status polls
    /// and study API requests.
    pub fn with_request_rate(
        store: SqliteStore,
        output: FileOutput,
        mut settings: Settings,
        auth: AuthConfig,
        per_second: u32,
    ) -> export_core::StoreResult<Self> {
        let signer = store
            .signing_key()
            .map_err(|e| export_core::StoreError(e.0))?;
        let store = Arc::new(store);
        let sessions: Arc<dyn export_web::session::SessionStore> = store.clone();
        let auth_ports = AuthPorts {
            clients: store.clone(),
            replay: store.clone(),
            users: store.clone(),
            memberships: store.clone(),
            api_keys: store.clone(),
            signer: Arc::new(signer),
            fetcher: Arc::new(HttpJwksFetcher),
        };
        let secured = auth.enforce;
        settings.requires_access_token |= secured;
        let authenticator = Arc::new(
            Authenticator::new(auth, auth_ports, export_core::fhir::is_resource_type)
                .with_request_rate(per_second),
        );
        let output: Arc<dyn export_core::ports::OutputStore> = Arc::new(output);
        let ports = Ports {
            resources: store.clone(),
            jobs: store.clone(),
            lock: store.clone(),
            output: output.clone(),
        };
        let page_size = settings.page_size;
        let exporter = Arc::new(Exporter::new(ports, settings));
        let (queue, receiver) = InProcessQueue::new();
        let study = Arc::new(StudyService {
            ports: StudyPorts {
                resources: store.clone(),
                jobs: store.clone(),
                audit: store.clone(),
                outbox: store,
                output,
            },
            exporter: exporter.clone(),
            dispatcher: Arc::new(queue),
            page_size,
        });
        let dispatcher = Arc::new(LocalDispatcher::new(exporter.clone()));
        let api = Arc::new(Api::new(
            exporter.clone(),
            dispatcher.clone(),
            "/fhir",
            secured,
        ));
        let study_api = Arc::new(StudyApi::new(study.clone()));
        // The page signs people in at this server's own OpenID provider (when sign-in is on).
        let issuer = authenticator.config.issuer.clone();
        let sign_in = secured.then(|| {
            RelyingParty::new(
                OidcSettings {
                    issuer: issuer.clone(),
                    client_id: export_auth::oidc::LOCAL_AUDIENCE.into(),
                },
                Arc::new(UreqOidcHttp),
            )
        });
        let web = Arc::new(WebPage::new(
            study_api.clone(),
            authenticator.clone(),
            sessions.clone(),
            sign_in,
            Some(issuer),
        ));
        let gateway = Gateway::new(api, authenticator)
            .with_study(study_api)
            .with_web(web);
        Ok(LocalService {
            gateway: Arc::new(gateway),
            exporter,
            dispatcher,
            expiry_sweep: EXPIRY_SWEEP,
            study,
            study_queue: std::sync::Mutex::new(Some(receiver)),
            study_concurrency: 2,
        })
    }

    /// Restarts the jobs a previous process left accepted or in progress.
    pub async fn resume_interrupted(&self) -> export_core::StoreResult<usize> {
        let jobs = self.exporter.ports.jobs.active_jobs().await?;
        for job in &jobs {
            tracing::info!(export_id = %job.id, "resuming an export interrupted by a restart");
            self.dispatcher.start(&job.id).await?;
        }
        Ok(jobs.len())
    }
}

/// Serves HTTP on `listener` until the process ends; with `tls`, HTTPS only.
pub async fn serve(
    service: LocalService,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let resumed = service
        .resume_interrupted()
        .await
        .map_err(std::io::Error::other)?;
    if resumed > 0 {
        println!("resumed {resumed} interrupted export(s)");
    }
    if let Some(receiver) = service.study_queue.lock().expect("queue").take() {
        tokio::spawn(run_queue(
            service.study.clone(),
            receiver,
            service.study_concurrency,
        ));
    }
    tokio::spawn(run_duties(
        service.study.clone(),
        Arc::new(HttpWebhookSender),
        service.expiry_sweep.min(Duration::from_secs(5)),
    ));
    let exporter = service.exporter.clone();
    let sweep = service.expiry_sweep;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep);
        loop {
            tick.tick().await;
            if let Err(e) = exporter.expire_due(now_millis()).await {
                tracing::warn!(error = %e, "expiry sweep failed");
            }
        }
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let gateway = service.gateway.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |request| handle(gateway.clone(), request, peer));
            let mut http = http1::Builder::new();
            http.max_buf_size(MAX_HEAD_BYTES.max(8192));
            let served = match tls {
                None => http.serve_connection(TokioIo::new(stream), handler).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => http.serve_connection(TokioIo::new(stream), handler).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

async fn handle(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<hyper::Response<ResponseBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    parts
        .extensions
        .insert(ClientAddress(peer.ip().to_string()));
    let response = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => {
            gateway
                .handle(hyper::Request::from_parts(parts, collected.to_bytes()))
                .await
        }
        Err(_) => {
            let error = ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                IssueCode::Invalid,
                format!("request body larger than {MAX_BODY} bytes"),
            );
            gateway
                .refuse(hyper::Request::from_parts(parts, Bytes::new()), error)
                .await
        }
    };
    let (parts, body) = response.into_parts();
    let body: ResponseBody = match body {
        Body::Full(bytes) => Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
        Body::Stream(stream) => StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync(),
    };
    Ok(hyper::Response::from_parts(parts, body))
}

/// Whether requests need credentials, from `--auth on|off` (`switch`), whether the address is
/// loopback, and `--insecure-no-auth`. By default on, except on loopback (the quick start); off
/// on any other address only with `--insecure-no-auth` as well.
pub fn auth_enforced(switch: Option<bool>, loopback: bool, insecure: bool) -> Result<bool, String> {
    match (switch, loopback) {
        (Some(on), true) => Ok(on),
        (None, loopback) => Ok(!loopback),
        (Some(true), false) => Ok(true),
        (Some(false), false) if insecure => Ok(false),
        (Some(false), false) => Err(
            "--auth off on an address that is not loopback needs --insecure-no-auth as well".into(),
        ),
    }
}

/// A TLS acceptor from PEM files: TLS 1.2 and 1.3 only (rustls offers nothing older).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    // The provider is named: several may be compiled in (the AWS SDK brings its own).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS configuration: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::auth_enforced;

    #[test]
    fn authentication_is_on_except_on_loopback_and_off_elsewhere_only_when_insisted() {
        assert_eq!(auth_enforced(None, true, false), Ok(false));
        assert_eq!(auth_enforced(None, false, false), Ok(true));
        assert_eq!(auth_enforced(Some(true), true, false), Ok(true));
        assert_eq!(auth_enforced(Some(false), true, false), Ok(false));
        assert_eq!(auth_enforced(Some(true), false, false), Ok(true));
        assert!(auth_enforced(Some(false), false, false).is_err());
        assert_eq!(auth_enforced(Some(false), false, true), Ok(false));
        // --insecure-no-auth alone does not turn authentication off.
        assert_eq!(auth_enforced(None, false, true), Ok(true));
    }
}
