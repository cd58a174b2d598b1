//! `organizeOutputBy=Patient`: files of resource blocks instead of files of one type. A block is
//! a `Parameters` header naming `Patient/<id>`, then the resources of that patient's compartment
//! (the Patient first). A block cut by a file limit goes on in the next file, which starts with the
//! header again; the cut file's record says so (`continues`), and the manifest names the next file
//! in `continuesInFile`. Work items are slices of the patient set, so blocks are written in
//! parallel and, as everywhere else, part boundaries depend only on the data.

use crate::engine::{Exporter, ItemCursor, ItemOutcome, OpenPart};
use crate::error::StoreResult;
use crate::fhir::compartment::in_patient_compartment;
use crate::job::Job;
use crate::manifest::part_key;
use crate::params::ExportLevel;
use crate::ports::{PatientScope, ReadScope, WorkItem, read_all};
use crate::provenance;
use crate::shaping::Shaping;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

/// Patients per work item of an organized export.
const PATIENTS_PER_ITEM: usize = 100;
/// The type segment of organized part keys: `<job>/by-Patient/<slice>-<seq>.ndjson`.
const BLOCK_KEY_TYPE: &str = "by-Patient";

/// Where a block item stopped: patient (in the item's slice), type, store position, and whether
/// that patient's block has begun (so a new file repeats its header).
#[derive(Debug, Default, Serialize, Deserialize)]
struct BlockCursor {
    patient: usize,
    type_index: usize,
    store: Option<String>,
    in_block: bool,
}

/// The header line of a patient's block.
pub fn block_header(patient: &str) -> Bytes {
    let header = json!({"resourceType": "Parameters", "parameter": [
        {"name": "header", "valueReference": {"reference": format!("Patient/{patient}")}}]});
    Bytes::from(header.to_string())
}

impl Exporter {
    /// The work items of an organized export: slices of the patient set. Patient and system
    /// level export every Patient existing at the transaction time (resources in no patient's
    /// compartment are left out, as the IG allows); the set is stored for the workers.
    pub(crate) async fn block_items(
        &self,
        job: &Job,
        set_stored: bool,
    ) -> StoreResult<Vec<WorkItem>> {
        let patients = if set_stored {
            self.ports.jobs.patient_set(&job.id).await?
        } else {
            let all = self.existing_patients(job).await?;
            self.ports.jobs.put_patient_set(&job.id, &all).await?;
            all
        };
        let partitions = patients.len().div_ceil(PATIENTS_PER_ITEM) as u32;
        Ok((0..partitions)
            .map(|partition| WorkItem {
                job_id: job.id.clone(),
                item: partition,
                resource_type: "Patient".into(),
                partition,
                partitions,
                deleted: false,
            })
            .collect())
    }

    /// The ids of every Patient current (and not deleted) at the job's transaction time, sorted.
    async fn existing_patients(&self, job: &Job) -> StoreResult<Vec<String>> {
        let resources = &self.ports.resources;
        let partitions = resources.partitions("Patient", None).await?.max(1);
        let mut ids = Vec::new();
        for partition in 0..partitions {
            let scope = ReadScope {
                resource_type: "Patient".into(),
                partition,
                partitions,
                since: None,
                until: job.transaction_time,
                as_of: job.transaction_time,
                patients: PatientScope::Everything,
                deleted: false,
            };
            read_all(
                resources.as_ref(),
                &scope,
                self.settings.page_size,
                |page| {
                    ids.extend(page.iter().map(|r| r.id.to_string()));
                    Ok(())
                },
            )
            .await?;
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The types a block holds: the selected Patient-compartment types present in the store,
    /// the Patient first.
    async fn block_types(&self, job: &Job) -> StoreResult<Vec<String>> {
        let mut types: Vec<String> = self
            .ports
            .resources
            .resource_types()
            .await?
            .into_iter()
            .filter(|t| in_patient_compartment(t))
            .filter(|t| match t.as_str() {
                "Provenance" => provenance::wanted(job),
                t => job.params.wants_type(t),
            })
            .collect();
        types.sort_by_key(|t| (t != "Patient", t.clone()));
        Ok(types)
    }

    /// Writes the blocks of one slice of patients, from its start or from `resume`.
    pub(crate) async fn export_blocks(
        &self,
        job: &Job,
        item: &WorkItem,
        resume: Option<ItemCursor>,
        deadline: Option<std::time::Instant>,
    ) -> StoreResult<ItemOutcome> {
        let all = self.ports.jobs.patient_set(&job.id).await?;
        let start = (item.partition as usize * PATIENTS_PER_ITEM).min(all.len());
        let slice = &all[start..(start + PATIENTS_PER_ITEM).min(all.len())];
        let types = self.block_types(job).await?;
        let shaping = Shaping::new(&job.params);
        let skip_group = match &job.level {
            ExportLevel::Group(id) => Some(id.as_str()),
            _ => None,
        };
        let (mut at, mut seq) = match resume {
            Some(r) => (serde_json::from_str::<BlockCursor>(&r.cursor)?, r.next_seq),
            None => (BlockCursor::default(), 0),
        };
        let settings = &self.settings;
        let mut part: Option<OpenPart> = None;
        let mut read_any = false;
        while at.patient < slice.len() {
            let patient = &slice[at.patient];
            let header = block_header(patient);
            while at.type_index < types.len() {
                let resource_type = &types[at.type_index];
                let scope =
                    ReadScope::of_patients(job, resource_type, Arc::new(vec![patient.clone()]));
                loop {
                    // Between files, a worker past its deadline stops before any page once this
                    // run has read one.
                    if read_any
                        && part.is_none()
                        && deadline.is_some_and(|d| std::time::Instant::now() >= d)
                    {
                        let at_text = serde_json::to_string(&at)?;
                        self.ports
                            .jobs
                            .record_progress(&item.job_id, item.item, &at_text, seq)
                            .await?;
                        return Ok(ItemOutcome::Continue(ItemCursor {
                            cursor: at_text,
                            next_seq: seq,
                        }));
                    }
                    read_any = true;
                    let page = self
                        .ports
                        .resources
                        .read_page(&scope, at.store.as_deref(), settings.page_size)
                        .await?;
                    for (resource, position) in page.resources.into_iter().zip(page.cursors) {
                        // A file that read its share of the store ends before this resource.
                        if part
                            .as_ref()
                            .is_some_and(|open| open.scanned >= settings.part_scan_limit)
                        {
                            let open = part.take().expect("open part");
                            seq += 1;
                            let at_text = serde_json::to_string(&at)?;
                            if let Some(stop) = self
                                .cut(open, item, at.in_block, &at_text, seq, deadline)
                                .await?
                            {
                                return Ok(stop);
                            }
                        }
                        if let Some(open) = &mut part {
                            open.scanned += 1;
                        }
                        let is_the_group =
                            resource_type == "Group" && skip_group == Some(resource.id.as_str());
                        let line = match is_the_group {
                            true => None,
                            false => shaping.shape(resource_type, resource.json)?,
                        };
                        let Some(line) = line else {
                            at.store = Some(position.to_string());
                            continue;
                        };
                        let (lines, bytes) = match at.in_block {
                            true => (1, line.len() as u64 + 1),
                            false => (2, (line.len() + header.len()) as u64 + 2),
                        };
                        if let Some(open) = &part
                            && (open.bytes + bytes > settings.max_file_bytes
                                || open.count + lines > settings.max_file_resources)
                        {
                            let open = part.take().expect("open part");
                            seq += 1;
                            let at_text = serde_json::to_string(&at)?;
                            if let Some(stop) = self
                                .cut(open, item, at.in_block, &at_text, seq, deadline)
                                .await?
                            {
                                return Ok(stop);
                            }
                        }
                        let open = match &mut part {
                            Some(open) => open,
                            None => {
                                let key = part_key(&job.id, BLOCK_KEY_TYPE, item.partition, seq);
                                let writer = self.ports.output.create_part(&key).await?;
                                part.insert(OpenPart::new(key, seq, writer))
                            }
                        };
                        // A block starts with its header, and so does every file it goes on in.
                        if !at.in_block || open.count == 0 {
                            open.push(&header).await?;
                            at.in_block = true;
                        }
                        open.push(&line).await?;
                        at.store = Some(position.to_string());
                    }
                    self.pause_after_page().await;
                    if !page.more {
                        break;
                    }
                    if page.next.is_some() {
                        at.store = page.next;
                    }
                }
                at.type_index += 1;
                at.store = None;
            }
            at.patient += 1;
            at.type_index = 0;
            at.in_block = false;
        }
        self.close_item(part, item).await
    }
}
