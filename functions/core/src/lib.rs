//! FHIR Bulk Data export, independent of where it runs.
//!
//! This crate holds the FHIR semantics (kick-off parameters, the Patient compartment, the job state
//! machine, NDJSON parts, the manifest) and the HTTP API. Storage, output, the export lock and work
//! dispatch are ports ([`ports`]) implemented by the local adapters (SQLite, files) and the AWS
//! adapters (DynamoDB, S3, Step Functions).

pub mod accept;
pub mod elements;
pub mod engine;
pub mod error;
pub mod fhir;
pub mod generate;
pub mod gzip;
pub mod ids;
pub mod item_thread;
pub mod job;
pub mod load;
pub mod manifest;
pub mod organize;
pub mod params;
pub mod ports;
pub mod provenance;
pub mod read_ahead;
pub mod router;
pub mod runner;
pub mod settings;
pub mod shaping;
pub mod type_filter;

pub use engine::{Exporter, Ports};
pub use error::{ApiError, StoreError, StoreResult};
pub use router::{Api, Body};
pub use settings::Settings;
