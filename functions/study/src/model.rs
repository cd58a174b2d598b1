//! The study data model, read from the FHIR store: a study is a `ResearchStudy`, its sites are
//! the `Location`s of `ResearchStudy.site`, and its participants are the `ResearchSubject`s whose
//! `study` names it, each assigned to one site by the [`SITE_EXTENSION`] and linked to its
//! `Patient` by `individual`.

pub use export_core::fhir::study::{SITE_EXTENSION, SUBJECT_STATUSES};
use export_core::fhir::time::now_millis;
use export_core::ports::{PatientScope, ReadScope, ResourceStore, read_all};
use export_core::{StoreError, StoreResult};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// A study as exports show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Study {
    pub id: String,
    pub title: String,
    pub status: String,
    /// The `ResearchStudy` as stored.
    pub resource: Value,
}

/// One site of a study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub city: String,
    pub state: String,
    pub country: String,
    /// `Location.status`: active, suspended or inactive.
    pub status: String,
    /// The `Location` as stored.
    pub resource: Value,
}

/// One participant of a study.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Participant {
    /// The `ResearchSubject` id.
    pub id: String,
    /// Its first identifier's value.
    pub identifier: String,
    /// The site (`Location` id) of the site extension; empty when absent.
    pub site_id: String,
    pub status: String,
    /// `period.start` as a date (`YYYY-MM-DD`), the enrolment date.
    pub enrolled: String,
    /// `period.end` as a date.
    pub ended: String,
    pub assigned_arm: String,
    pub actual_arm: String,
    /// `consent.reference`.
    pub consent: String,
    /// The `Patient` id of `individual`.
    pub patient_id: String,
    pub gender: String,
    pub birth_date: String,
}

/// Everything an export of one study reads.
#[derive(Debug, Clone)]
pub struct StudyData {
    pub study: Study,
    pub sites: Vec<Site>,
    pub participants: Vec<Participant>,
}

impl StudyData {
    /// The site named `id`.
    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.id == id)
    }

    /// The study with only the sites a site filter names (every site without one): a site filter
    /// limits every export to those sites, so site staff never receive other sites' details.
    pub fn with_sites(mut self, sites: Option<&[String]>) -> StudyData {
        if let Some(sites) = sites {
            self.sites.retain(|s| sites.contains(&s.id));
        }
        self
    }
}

fn text(value: &Value, path: &[&str]) -> String {
    let mut v = value;
    for step in path {
        v = match step.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[*step],
        };
    }
    v.as_str().unwrap_or_default().to_string()
}

/// The date part of a FHIR date or dateTime.
fn date_part(text: &str) -> String {
    text.get(..10).unwrap_or(text).to_string()
}

/// The id a reference names (`Type/id` → `id`).
fn reference_id(reference: &str, resource_type: &str) -> Option<String> {
    reference
        .rsplit_once(&format!("{resource_type}/"))
        .map(|(_, id)| id.split('/').next().unwrap_or(id).to_string())
        .filter(|id| !id.is_empty())
}

impl Study {
    fn from_resource(resource: Value) -> Study {
        Study {
            id: text(&resource, &["id"]),
            title: text(&resource, &["title"]),
            status: text(&resource, &["status"]),
            resource,
        }
    }
}

impl Site {
    fn from_resource(resource: Value) -> Site {
        Site {
            id: text(&resource, &["id"]),
            name: text(&resource, &["name"]),
            city: text(&resource, &["address", "city"]),
            state: text(&resource, &["address", "state"]),
            country: text(&resource, &["address", "country"]),
            status: text(&resource, &["status"]),
            resource,
        }
    }
}

impl Participant {
    /// A participant from its `ResearchSubject` (the patient fields are filled in later).
    pub fn from_subject(subject: &Value) -> Participant {
        let site = subject["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["url"] == SITE_EXTENSION)
            .and_then(|e| e["valueReference"]["reference"].as_str())
            .and_then(|r| reference_id(r, "Location"))
            .unwrap_or_default();
        Participant {
            id: text(subject, &["id"]),
            identifier: text(subject, &["identifier", "0", "value"]),
            site_id: site,
            status: text(subject, &["status"]),
            enrolled: date_part(&text(subject, &["period", "start"])),
            ended: date_part(&text(subject, &["period", "end"])),
            assigned_arm: text(subject, &["assignedArm"]),
            actual_arm: text(subject, &["actualArm"]),
            consent: text(subject, &["consent", "reference"]),
            patient_id: reference_id(&text(subject, &["individual", "reference"]), "Patient")
                .unwrap_or_default(),
            gender: String::new(),
            birth_date: String::new(),
        }
    }
}

/// Reads a study, its sites and participants from the store, as of now. `None` if the study
/// does not exist.
pub async fn load_study(
    store: &dyn ResourceStore,
    study_id: &str,
    page_size: usize,
) -> StoreResult<Option<StudyData>> {
    let Some((study, sites)) = study_and_sites(store, study_id).await? else {
        return Ok(None);
    };
    let participants = participants(store, study_id, page_size).await?;
    Ok(Some(StudyData {
        study,
        sites,
        participants,
    }))
}

/// A study and its sites, without its participants (what a list of studies shows).
pub async fn study_and_sites(
    store: &dyn ResourceStore,
    study_id: &str,
) -> StoreResult<Option<(Study, Vec<Site>)>> {
    let now = now_millis();
    let Some(version) = store.resource_at("ResearchStudy", study_id, now).await? else {
        return Ok(None);
    };
    let study = Study::from_resource(parse(&version.json)?);
    let site_ids: Vec<String> = study.resource["site"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["reference"].as_str())
        .filter_map(|r| reference_id(r, "Location"))
        .collect();
    let targets: Vec<(String, String)> = site_ids
        .iter()
        .map(|id| ("Location".to_string(), id.clone()))
        .collect();
    let mut sites = Vec::new();
    for version in store
        .resources_at(&targets, now)
        .await?
        .into_iter()
        .flatten()
    {
        sites.push(Site::from_resource(parse(&version.json)?));
    }
    Ok(Some((study, sites)))
}

/// Every study in the store, by id.
pub async fn study_ids(store: &dyn ResourceStore, page_size: usize) -> StoreResult<Vec<String>> {
    let mut ids = Vec::new();
    read_type(store, "ResearchStudy", page_size, |resource| {
        ids.push(text(&resource, &["id"]));
    })
    .await?;
    ids.sort();
    Ok(ids)
}

/// Calls `each` with every current resource of a type, read partition by partition.
async fn read_type(
    store: &dyn ResourceStore,
    resource_type: &str,
    page_size: usize,
    mut each: impl FnMut(Value),
) -> StoreResult<()> {
    let now = now_millis();
    let partitions = store.partitions(resource_type, None).await?.max(1);
    for partition in 0..partitions {
        let scope = ReadScope {
            resource_type: resource_type.into(),
            partition,
            partitions,
            since: None,
            until: now,
            as_of: now,
            patients: PatientScope::Everything,
            deleted: false,
        };
        read_all(store, &scope, page_size, |page| {
            for resource in page {
                each(parse(&resource.json)?);
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// The participants of a study, by id, with their patients' gender and birth date.
async fn participants(
    store: &dyn ResourceStore,
    study_id: &str,
    page_size: usize,
) -> StoreResult<Vec<Participant>> {
    let now = now_millis();
    // The ResearchSubjects naming this study.
    let reference = format!("ResearchStudy/{study_id}");
    let mut participants = Vec::new();
    read_type(store, "ResearchSubject", page_size, |subject| {
        let names = subject["study"]["reference"]
            .as_str()
            .is_some_and(|r| r == reference || r.ends_with(&format!("/{reference}")));
        if names {
            participants.push(Participant::from_subject(&subject));
        }
    })
    .await?;
    participants.sort_by(|a, b| a.id.cmp(&b.id));

    // Their patients' gender and birth date, in batches.
    for chunk in participants.chunks_mut(100) {
        let targets: Vec<(String, String)> = chunk
            .iter()
            .map(|p| ("Patient".to_string(), p.patient_id.clone()))
            .collect();
        let found = store.resources_at(&targets, now).await?;
        for (participant, version) in chunk.iter_mut().zip(found) {
            if let Some(version) = version {
                let patient = parse(&version.json)?;
                participant.gender = text(&patient, &["gender"]);
                participant.birth_date = text(&patient, &["birthDate"]);
            }
        }
    }
    Ok(participants)
}

fn parse(json: &[u8]) -> StoreResult<Value> {
    serde_json::from_slice(json).map_err(StoreError::from)
}

/// Participants per site and status (for the sites CSV and the dashboard).
pub fn counts_by_site(participants: &[&Participant]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for p in participants {
        *counts
            .entry(p.site_id.clone())
            .or_default()
            .entry(p.status.clone())
            .or_default() += 1;
    }
    counts
}

/// The statuses this service knows, as a set.
pub fn known_statuses() -> BTreeSet<&'static str> {
    SUBJECT_STATUSES.into_iter().collect()
}
