//! Study exports: what clinical-trial teams export from a study, who may, and the record of it.
//!
//! A study is read from the FHIR store ([`model`]); an export request ([`options`]) becomes a
//! study job that runs with bounded concurrency (not under the FHIR single-export lock) and
//! writes its files to the same output store as `$export`. Roles come from study memberships
//! ([`export_auth::Membership`]); every export, download and change is appended to a hash-chained
//! audit trail.

// A study error carries its field, details and headers; it is built on the cold path of a
// request, so its size does not matter and boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod audit;
pub mod csv;
pub mod dashboard;
pub mod error;
pub mod jobs;
pub mod model;
pub mod options;
pub mod package;
pub mod queue;
pub mod report;
pub mod roles;
pub mod router;
pub mod run;
pub mod service;
pub mod sweep;
pub mod webhooks;
