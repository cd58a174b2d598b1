//! The AWS wiring: the core engine and router over the DynamoDB, S3 and Step Functions adapters.

use crate::auth_store::DynamoAuthStore;
use crate::config::AwsSettings;
use crate::dispatch::SfnDispatcher;
use crate::dynamo::DynamoTable;
use crate::jobs::DynamoJobStore;
use crate::kms::KmsSigner;
use crate::output::S3Output;
use crate::resources::DynamoResourceStore;
use crate::session_store::DynamoSessionStore;
use crate::study_store::DynamoStudyStore;
use aws_config::SdkConfig;
use export_auth::jwks::HttpJwksFetcher;
use export_auth::ports::{AuthPorts, Signer};
use export_auth::signer::LocalSigner;
use export_auth::{AuthConfig, Authenticator};
use export_core::{Api, Exporter, Ports};
use export_gateway::Gateway;
use export_study::router::StudyApi;
use export_study::service::{StudyDispatcher, StudyPorts, StudyService};
use export_web::WebPage;
use export_web::relying_party::{OidcSettings, RelyingParty, UreqOidcHttp};
use std::sync::Arc;

/// Everything a function needs, built once per Lambda container.
pub struct AwsService {
    pub exporter: Arc<Exporter>,
    pub gateway: Gateway,
    pub auth_store: Arc<DynamoAuthStore>,
    /// Study exports (run by the worker function from the work queue).
    pub study: Arc<StudyService>,
    pub sfn: aws_sdk_sfn::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub resources: Arc<DynamoResourceStore>,
    /// The jobs table itself, for the fan-out's tally (the engine sees it as its ports).
    pub jobs: Arc<DynamoJobStore>,
    pub settings: AwsSettings,
}

/// Loads the SDK configuration from the environment (region, credentials, `AWS_ENDPOINT_URL`).
pub async fn sdk_config() -> SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

impl AwsService {
    pub async fn new(sdk: &SdkConfig, settings: AwsSettings) -> Result<Self, String> {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        // Path-style addressing works with every endpoint, including emulators.
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(true)
                .build(),
        );
        let sfn = aws_sdk_sfn::Client::new(sdk);
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let resources = Arc::new(
            DynamoResourceStore::new(
                DynamoTable::new(dynamodb.clone(), &settings.resources_table),
                settings.shards,
            )
            .with_bodies(s3.clone(), settings.resource_bucket.clone()),
        );
        let jobs = Arc::new(DynamoJobStore::new(DynamoTable::new(
            dynamodb,
            &settings.jobs_table,
        )));
        let output: Arc<dyn export_core::ports::OutputStore> = Arc::new(
            S3Output::new(s3, &settings.bucket, settings.url_expiry)
                .with_gzip(settings.gzip_output),
        );
        let ports = Ports {
            resources: resources.clone(),
            jobs: jobs.clone(),
            lock: jobs.clone(),
            output: output.clone(),
        };
        let mut export_settings = settings.export.clone();
        export_settings.requires_access_token &= settings.enforce_auth;
        let exporter = Arc::new(Exporter::new(ports, export_settings));
        let dispatcher = Arc::new(SfnDispatcher::new(sfn.clone(), &settings.state_machine_arn));
        let api = Api::new(exporter.clone(), dispatcher, "/fhir", settings.enforce_auth);

        let auth_store = Arc::new(DynamoAuthStore::new(DynamoTable::new(
            aws_sdk_dynamodb::Client::new(sdk),
            &settings.auth_table,
        )));
        let signer: Arc<dyn Signer> = match &settings.signing_key_id {
            Some(key) => Arc::new(
                KmsSigner::new(aws_sdk_kms::Client::new(sdk), key)
                    .await
                    .map_err(|e| format!("the signing key: {e}"))?,
            ),
            None => Arc::new(LocalSigner::generate().0),
        };
        let auth_ports = AuthPorts {
            clients: auth_store.clone(),
            replay: auth_store.clone(),
            users: auth_store.clone(),
            memberships: auth_store.clone(),
            api_keys: auth_store.clone(),
            signer,
            fetcher: Arc::new(HttpJwksFetcher),
        };
        let config = AuthConfig {
            enforce: settings.enforce_auth,
            issuer: settings.issuer.clone(),
            trusted_issuers: settings.trusted_issuers.clone(),
            // People sign in with Cognito's hosted UI here, never with passwords of this service.
            provider: false,
        };
        let authenticator =
            Authenticator::new(config, auth_ports, export_core::fhir::is_resource_type);
        let study_store = Arc::new(DynamoStudyStore::new(DynamoTable::new(
            aws_sdk_dynamodb::Client::new(sdk),
            &settings.study_table,
        )));
        let study = Arc::new(StudyService {
            ports: StudyPorts {
                resources: resources.clone(),
                jobs: study_store.clone(),
                audit: study_store.clone(),
                outbox: study_store,
                output,
            },
            exporter: exporter.clone(),
            dispatcher: Arc::new(SqsStudyDispatcher {
                sqs: sqs.clone(),
                queue_url: settings.work_queue_url.clone(),
            }),
            page_size: settings.export.page_size,
        });
        let authenticator = Arc::new(authenticator);
        let study_api = Arc::new(StudyApi::new(study.clone()));
        // The page signs people in at the trusted OpenID issuer (Cognito's hosted UI), as its
        // own client (the last audience trusted), once the page's address is configured; without
        // it the page says sign-in is not set up.
        let page_issuer = settings
            .page_url
            .as_ref()
            .and(settings.trusted_issuers.last());
        let sign_in = page_issuer.map(|issuer| {
            RelyingParty::new(
                OidcSettings {
                    issuer: issuer.issuer.clone(),
                    client_id: issuer.audience.clone(),
                },
                Arc::new(UreqOidcHttp),
            )
        });
        let web = Arc::new(WebPage::new(
            study_api.clone(),
            authenticator.clone(),
            Arc::new(DynamoSessionStore::new(DynamoTable::new(
                aws_sdk_dynamodb::Client::new(sdk),
                &settings.auth_table,
            ))),
            sign_in,
            settings.page_url.clone(),
        ));
        let gateway = Gateway::new(Arc::new(api), authenticator)
            .with_study(study_api)
            .with_web(web);
        Ok(AwsService {
            exporter,
            gateway,
            study,
            auth_store,
            sfn,
            sqs,
            resources,
            jobs,
            settings,
        })
    }

    /// The resource store alone (for loading data), from the environment's SDK configuration.
    /// `shards`: the count the caller expects (refused if the table holds another), or `None` to
    /// use the table's (16 for a new table); `bucket`: where big bodies go.
    pub async fn resource_store(
        table: &str,
        shards: Option<u32>,
        bucket: Option<String>,
    ) -> DynamoResourceStore {
        let sdk = sdk_config().await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        );
        let table = DynamoTable::new(aws_sdk_dynamodb::Client::new(&sdk), table);
        let store = match shards {
            Some(n) => DynamoResourceStore::new(table, n),
            None => DynamoResourceStore::new(table, 16).shards_from_table(),
        };
        store.with_bodies(s3, bucket)
    }

    /// The auth table alone (for the administration commands), from the environment's SDK
    /// configuration.
    pub async fn auth_store(table: &str) -> DynamoAuthStore {
        let client = aws_sdk_dynamodb::Client::new(&sdk_config().await);
        DynamoAuthStore::new(DynamoTable::new(client, table))
    }

    /// From the Lambda environment.
    pub async fn from_env() -> Result<Self, String> {
        let settings = AwsSettings::from_env()?;
        Self::new(&sdk_config().await, settings).await
    }
}

/// A study job message on the work queue: the worker runs the job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StudyJobMessage {
    pub study_job: String,
}

/// Queues study jobs on the work queue (the worker function runs them).
pub struct SqsStudyDispatcher {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
}

#[async_trait::async_trait]
impl StudyDispatcher for SqsStudyDispatcher {
    async fn submit(&self, job_id: &str) -> export_core::StoreResult<()> {
        let body = serde_json::to_string(&StudyJobMessage {
            study_job: job_id.to_string(),
        })?;
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| export_core::StoreError::new(format!("sqs: {e:?}")))?;
        Ok(())
    }
}
