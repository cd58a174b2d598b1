//! The AWS wiring: the core engine and router over the DynamoDB, S3 and Step Functions adapters.

use crate::config::AwsSettings;
use crate::dispatch::SfnDispatcher;
use crate::dynamo::DynamoTable;
use crate::jobs::DynamoJobStore;
use crate::output::S3Output;
use crate::resources::DynamoResourceStore;
use aws_config::SdkConfig;
use export_core::{Api, Exporter, Ports};
use std::sync::Arc;

/// Everything a function needs, built once per Lambda container.
pub struct AwsService {
    pub exporter: Arc<Exporter>,
    pub api: Api,
    pub sfn: aws_sdk_sfn::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub resources: Arc<DynamoResourceStore>,
    pub settings: AwsSettings,
}

/// Loads the SDK configuration from the environment (region, credentials, `AWS_ENDPOINT_URL`).
pub async fn sdk_config() -> SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

impl AwsService {
    pub fn new(sdk: &SdkConfig, settings: AwsSettings) -> Self {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        // Path-style addressing works with every endpoint, including emulators.
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(true)
                .build(),
        );
        let sfn = aws_sdk_sfn::Client::new(sdk);
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let resources = Arc::new(DynamoResourceStore::new(
            DynamoTable::new(dynamodb.clone(), &settings.resources_table),
            settings.shards,
        ));
        let jobs = Arc::new(DynamoJobStore::new(DynamoTable::new(
            dynamodb,
            &settings.jobs_table,
        )));
        let output = Arc::new(
            S3Output::new(s3, &settings.bucket, settings.url_expiry)
                .with_gzip(settings.gzip_output),
        );
        let ports = Ports {
            resources: resources.clone(),
            jobs: jobs.clone(),
            lock: jobs,
            output,
        };
        let exporter = Arc::new(Exporter::new(ports, settings.export.clone()));
        let dispatcher = Arc::new(SfnDispatcher::new(sfn.clone(), &settings.state_machine_arn));
        let api = Api::new(exporter.clone(), dispatcher, "/fhir");
        AwsService {
            exporter,
            api,
            sfn,
            sqs,
            resources,
            settings,
        }
    }

    /// The resource store alone (for loading data), from the environment's SDK configuration.
    pub async fn resource_store(table: &str, shards: u32) -> DynamoResourceStore {
        let client = aws_sdk_dynamodb::Client::new(&sdk_config().await);
        DynamoResourceStore::new(DynamoTable::new(client, table), shards)
    }

    /// From the Lambda environment.
    pub async fn from_env() -> Result<Self, String> {
        let settings = AwsSettings::from_env()?;
        Ok(Self::new(&sdk_config().await, settings))
    }
}
