//! The embedded deployment of the FHIR Bulk Data export service: a SQLite store, file output,
//! in-process workers and a hyper HTTP server, all wired over `export-core`.

pub mod admin;
pub mod dispatch;
pub mod files;
pub mod runtime;
pub mod server;
pub mod sqlite;

pub use server::LocalService;
