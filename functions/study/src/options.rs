//! What a study export request asks for: its type, filters, and CSV options. These types are the
//! request's JSON (and the OpenAPI document's schemas).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The kinds of study export.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ExportType {
    /// The study, its sites, and the Patient compartments of the selected participants, as
    /// NDJSON per resource type (a ZIP with a `manifest.json`).
    Fhir,
    /// One row per site.
    SitesCsv,
    /// One row per participant.
    ParticipantsCsv,
    /// Study metrics as JSON and CSV files (a ZIP).
    Dashboard,
    /// A self-contained, printable HTML study report.
    Report,
}

impl ExportType {
    pub const ALL: [ExportType; 5] = [
        ExportType::Fhir,
        ExportType::SitesCsv,
        ExportType::ParticipantsCsv,
        ExportType::Dashboard,
        ExportType::Report,
    ];

    /// The id used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportType::Fhir => "fhir",
            ExportType::SitesCsv => "sites_csv",
            ExportType::ParticipantsCsv => "participants_csv",
            ExportType::Dashboard => "dashboard",
            ExportType::Report => "report",
        }
    }

    pub fn parse(text: &str) -> Option<ExportType> {
        ExportType::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// What people see (the page, the formats endpoint).
    pub fn label(self) -> &'static str {
        match self {
            ExportType::Fhir => "FHIR JSON",
            ExportType::SitesCsv => "Sites CSV",
            ExportType::ParticipantsCsv => "Participants CSV",
            ExportType::Dashboard => "Dashboard",
            ExportType::Report => "Study report",
        }
    }

    /// A data export (what data reviewers may create).
    pub fn is_data(self) -> bool {
        matches!(
            self,
            ExportType::Fhir | ExportType::SitesCsv | ExportType::ParticipantsCsv
        )
    }

    /// Whether the CSV options apply.
    pub fn is_csv(self) -> bool {
        matches!(
            self,
            ExportType::SitesCsv | ExportType::ParticipantsCsv | ExportType::Dashboard
        )
    }
}

/// `{from, to}`, inclusive dates (`YYYY-MM-DD`): resources' `meta.lastUpdated` for FHIR, the
/// enrolment date for participants and sites.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DateRange {
    #[schema(value_type = Option<String>, format = Date, example = "2021-01-01")]
    pub from: Option<chrono::NaiveDate>,
    #[schema(value_type = Option<String>, format = Date, example = "2023-12-31")]
    pub to: Option<chrono::NaiveDate>,
}

/// Which participants an export covers; every filter left out selects all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    pub date_range: Option<DateRange>,
    /// Site ids (`Location` ids of the study's sites).
    #[schema(min_items = 1)]
    pub sites: Option<Vec<String>>,
    /// R4 `ResearchSubject` statuses.
    #[schema(min_items = 1, inline, value_type = Option<Vec<SubjectStatus>>)]
    pub statuses: Option<Vec<String>>,
}

/// The R4 `ResearchSubject.status` codes (for the OpenAPI document; requests carry strings).
#[derive(ToSchema)]
#[schema(rename_all = "kebab-case")]
#[allow(dead_code)]
pub enum SubjectStatus {
    Candidate,
    Eligible,
    FollowUp,
    Ineligible,
    NotRegistered,
    OffStudy,
    OnStudy,
    OnStudyIntervention,
    OnStudyObservation,
    PendingOnStudy,
    PotentialCandidate,
    Screening,
    Withdrawn,
}

/// Character encodings of CSV files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum CsvEncoding {
    #[default]
    #[serde(rename = "utf-8")]
    Utf8,
    /// UTF-8 with a byte order mark, which Excel needs to read UTF-8.
    #[serde(rename = "utf-8-bom")]
    Utf8Bom,
    /// UTF-16 little endian with a byte order mark.
    #[serde(rename = "utf-16le")]
    Utf16Le,
    /// Latin-1: a character it cannot represent fails the export, naming the row and column.
    #[serde(rename = "iso-8859-1")]
    Iso88591,
}

/// Field separators of CSV files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delimiter {
    #[default]
    Comma,
    Tab,
    Semicolon,
}

impl Delimiter {
    pub fn byte(self) -> u8 {
        match self {
            Delimiter::Comma => b',',
            Delimiter::Tab => b'\t',
            Delimiter::Semicolon => b';',
        }
    }
}

/// Options of an export (the CSV ones apply to the CSV types and the dashboard's CSV files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportOptions {
    #[serde(default)]
    pub encoding: CsvEncoding,
    #[serde(default)]
    pub delimiter: Delimiter,
}
