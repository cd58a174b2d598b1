//! The coordinator Lambda: the state machine's plan, finalize and fail tasks, via SQS.

use export_aws::aws_lambda_events::event::sqs::SqsEvent;
use export_aws::lambda_runtime::{self, Error, LambdaEvent, service_fn};
use export_aws::{AwsService, handlers};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    export_aws::logging::init();
    let service = Arc::new(AwsService::from_env().await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let service = service.clone();
        async move { Ok::<_, Error>(handlers::coordinator(&service, event.payload).await) }
    }))
    .await
}
