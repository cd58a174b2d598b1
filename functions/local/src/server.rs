//! The local HTTP server: hyper in front of the shared router, plus the background duties of a
//! long-running process (resume interrupted jobs at start, expire old ones).

use crate::dispatch::LocalDispatcher;
use crate::files::FileOutput;
use crate::sqlite::SqliteStore;
use bytes::Bytes;
use export_core::fhir::outcome::IssueCode;
use export_core::fhir::time::now_millis;
use export_core::ports::Dispatcher;
use export_core::router::MAX_BODY;
use export_core::{Api, ApiError, Body, Exporter, Ports, Settings};
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

/// The wired-up service: API, engine and dispatcher over one store and one output directory.
pub struct LocalService {
    pub api: Arc<Api>,
    pub exporter: Arc<Exporter>,
    pub dispatcher: Arc<LocalDispatcher>,
}

impl LocalService {
    pub fn new(store: SqliteStore, output: FileOutput, settings: Settings) -> Self {
        let store = Arc::new(store);
        let ports = Ports {
            resources: store.clone(),
            jobs: store.clone(),
            lock: store,
            output: Arc::new(output),
        };
        let exporter = Arc::new(Exporter::new(ports, settings));
        let dispatcher = Arc::new(LocalDispatcher::new(exporter.clone()));
        let api = Arc::new(Api::new(exporter.clone(), dispatcher.clone(), "/fhir"));
        LocalService {
            api,
            exporter,
            dispatcher,
        }
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

/// Serves HTTP on `listener` until the process ends.
pub async fn serve(service: LocalService, listener: TcpListener) -> std::io::Result<()> {
    let resumed = service
        .resume_interrupted()
        .await
        .map_err(std::io::Error::other)?;
    if resumed > 0 {
        println!("resumed {resumed} interrupted export(s)");
    }
    let exporter = service.exporter.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_SWEEP);
        loop {
            tick.tick().await;
            if let Err(e) = exporter.expire_due(now_millis()).await {
                tracing::warn!(error = %e, "expiry sweep failed");
            }
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let api = service.api.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |request| handle(api.clone(), request));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

async fn handle(
    api: Arc<Api>,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<ResponseBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let response = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => {
            api.handle(hyper::Request::from_parts(parts, collected.to_bytes()))
                .await
        }
        Err(_) => {
            let error = ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                IssueCode::Invalid,
                format!("request body larger than {MAX_BODY} bytes"),
            );
            api.refuse(hyper::Request::from_parts(parts, Bytes::new()), error)
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
