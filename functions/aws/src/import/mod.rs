//! Importing FHIR data where it lives: NDJSON, NDJSON.gz and Bundle objects put under `import/<name>/`
//! of the import bucket become an import job that runs in the cloud, in parallel and resumably.
//!
//! S3 announces each new object on the import queue ([`event`]); the importer registers the object
//! with its import job and cuts it into chunks ([`chunks`]), one queue message each; every chunk is
//! read ([`reader`]), written through the resource store with unchanged versions left out
//! ([`identity`]), and records its progress after each batch ([`records`]), so a redelivered or
//! continued message resumes where the last recorded batch ended. The last chunk to finish writes
//! the job's error file and final counts ([`finish`]); [`status`] reads a job for people.

pub mod chunks;
pub mod event;
pub mod finish;
pub mod handler;
pub mod identity;
pub mod process;
pub mod reader;
pub mod records;
pub mod settings;
pub mod status;

use crate::dynamo::DynamoTable;
use crate::resources::DynamoResourceStore;
use aws_config::SdkConfig;
pub use settings::ImportSettings;

/// The prefix whose objects start imports: `import/<name>/…` belongs to import job `<name>`.
pub const IMPORT_PREFIX: &str = "import/";
/// Where error files are written: outside [`IMPORT_PREFIX`], so they never start an import.
pub const ERRORS_PREFIX: &str = "import-errors/";

/// Everything the importer function needs, built once per Lambda container.
pub struct Importer {
    pub settings: ImportSettings,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub records: records::ImportRecords,
    pub store: DynamoResourceStore,
}

impl Importer {
    pub fn new(sdk: &SdkConfig, settings: ImportSettings) -> Self {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        // Path-style addressing works with every endpoint, including emulators.
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(true)
                .build(),
        );
        Importer {
            records: records::ImportRecords::new(DynamoTable::new(
                dynamodb.clone(),
                &settings.jobs_table,
            )),
            store: DynamoResourceStore::new(
                DynamoTable::new(dynamodb, &settings.resources_table),
                settings.shards,
            )
            .with_bodies(s3.clone(), settings.resource_bucket.clone()),
            s3,
            sqs: aws_sdk_sqs::Client::new(sdk),
            settings,
        }
    }

    /// From the Lambda environment.
    pub async fn from_env() -> Result<Self, String> {
        let settings = ImportSettings::from_env()?;
        Ok(Self::new(&crate::service::sdk_config().await, settings))
    }
}
