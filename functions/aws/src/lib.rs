//! The AWS deployment of the FHIR Bulk Data export service: DynamoDB resource and job stores
//! (with the export lock), S3 output, Step Functions dispatch, and the Lambda handlers.

pub mod auth_store;
pub mod config;
pub mod dispatch;
pub mod dynamo;
pub mod fanout;
pub mod handlers;
pub mod import;
pub mod jobs;
pub mod kms;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod output;
pub mod resources;
pub mod service;
pub mod session_store;
pub mod study_store;
pub mod sweeper;

pub use config::AwsSettings;
pub use service::AwsService;

/// Re-exported for the function binaries.
pub use {aws_lambda_events, lambda_http, lambda_runtime};
