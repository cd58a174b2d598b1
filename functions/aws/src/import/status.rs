//! An import job as people read it (`bulk-export imports show`): status, files, counts, and the
//! error file's address. Counts of a running job are summed from its chunks, so they move while
//! it runs.

use super::records::{ImportRecords, Summary, number};
use crate::dynamo::{DynamoTable, get_n, get_s};
use export_core::StoreResult;
use export_core::fhir::time::{format_instant, from_micros};
use serde_json::{Value, json};

/// The job `id`, or `None` if there is none.
pub async fn show(records: &ImportRecords, id: &str) -> StoreResult<Option<Value>> {
    let Some(job) = records.job(id).await? else {
        return Ok(None);
    };
    let chunks = records.chunks(id).await?;
    let files = records.files(id).await?;
    let summary = Summary::of(&chunks);
    let time = |name: &str| get_n(&job, name).map(|ms| format_instant(from_micros(ms * 1000)));
    Ok(Some(json!({
        "id": id,
        "status": get_s(&job, "status"),
        "started": time("started"),
        "finished": time("finished"),
        "files": files.iter().filter_map(|f| get_s(f, "key")).collect::<Vec<_>>(),
        "chunks": number(&job, "chunks"),
        "chunksDone": chunks.iter().filter(|c| c.state.done).count(),
        "lines": summary.lines,
        "resourcesWritten": summary.written,
        "resourcesUnchanged": summary.unchanged,
        "errors": summary.errors,
        "errorFile": get_s(&job, "error_file"),
    })))
}

/// [`show`] for the jobs table `table`, from the environment's AWS configuration.
pub async fn show_in(table: &str, id: &str) -> Result<Option<Value>, String> {
    let client = aws_sdk_dynamodb::Client::new(&crate::service::sdk_config().await);
    let records = ImportRecords::new(DynamoTable::new(client, table));
    show(&records, id).await.map_err(|e| e.to_string())
}
