//! Importing FHIR data files into the DynamoDB resource table (`bulk-export load --dynamodb-table`).
//!
//! Files are parsed on a blocking thread by the same reader the local store uses; batches flow
//! through a bounded channel to batched DynamoDB writes, so memory stays flat for any file size.

use crate::resources::DynamoResourceStore;
use export_core::fhir::time::now_millis;
use export_core::load::{LoadIssue, data_files, read_file};
use export_core::ports::{NewResource, ResourceStore};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Resources written per `put_resources` call.
const BATCH: usize = 500;

/// What a load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub counts: BTreeMap<String, u64>,
    pub issues: Vec<LoadIssue>,
}

/// Loads `paths` (files or directories) into the resource table.
pub async fn load_files(
    store: &DynamoResourceStore,
    paths: Vec<PathBuf>,
) -> Result<LoadReport, String> {
    // A shard count or bucket that contradicts the table's fails before any file is read.
    store
        .table_config_for_write()
        .await
        .map_err(|e| e.to_string())?;
    let (batches, mut received) = tokio::sync::mpsc::channel::<Vec<NewResource>>(4);
    let reader = tokio::task::spawn_blocking(move || -> Result<Vec<LoadIssue>, String> {
        let now = now_millis();
        let mut issues = Vec::new();
        let mut batch = Vec::with_capacity(BATCH);
        for file in data_files(&paths).map_err(|e| e.to_string())? {
            read_file(
                &file,
                now,
                &mut |resource| {
                    batch.push(resource);
                    if batch.len() >= BATCH {
                        let _ = batches.blocking_send(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(BATCH),
                        ));
                    }
                },
                &mut |issue| issues.push(issue),
            )
            .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        let _ = batches.blocking_send(batch);
        Ok(issues)
    });
    let mut report = LoadReport::default();
    while let Some(batch) = received.recv().await {
        for r in &batch {
            *report.counts.entry(r.resource_type.clone()).or_default() += 1;
        }
        store
            .put_resources(batch)
            .await
            .map_err(|e| e.to_string())?;
    }
    report.issues = reader.await.map_err(|e| e.to_string())??;
    Ok(report)
}
