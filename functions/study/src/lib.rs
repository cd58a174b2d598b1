//! Study exports: what clinical-trial teams export from a study, who may, and the record of it.
//!
//! A study is read from the FHIR store ([`model`]); an export request ([`options`]) becomes a
//! study job that runs with bounded concurrency (not under the FHIR single-export lock) and
//! writes its files to the same output store as `$export`. Roles come from study memberships
//! ([`export_auth::Membership`]); every export, download and change is appended to a hash-chained
//! audit trail.

pub mod csv;
pub mod dashboard;
pub mod model;
pub mod options;
pub mod report;
