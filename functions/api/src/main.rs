//! The API Lambda: API Gateway HTTP API (payload v2) → the shared FHIR router.

use export_aws::lambda_http::{self, Error, service_fn};
use export_aws::{AwsService, handlers};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    export_aws::logging::init();
    let service = Arc::new(AwsService::from_env().await?);
    lambda_http::run(service_fn(move |request| {
        let service = service.clone();
        async move { Ok::<_, Error>(handlers::api(&service, request).await) }
    }))
    .await
}
