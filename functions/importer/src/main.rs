//! The importer Lambda: S3 events and chunk messages from the import queue → versions in the
//! resource table, an import job and its error file.

use export_aws::aws_lambda_events::event::sqs::SqsEvent;
use export_aws::import::{Importer, handler};
use export_aws::lambda_runtime::{self, Error, LambdaEvent, service_fn};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    export_aws::logging::init();
    let importer = Arc::new(Importer::from_env().await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let importer = importer.clone();
        async move {
            let deadline = export_aws::handlers::deadline_from_epoch_ms(event.context.deadline);
            Ok::<_, Error>(handler::importer(&importer, event.payload, deadline).await)
        }
    }))
    .await
}
