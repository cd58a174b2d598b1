//! The dashboard: a snapshot of a study's metrics over the selected participants, as JSON and
//! CSV files (and the numbers the report shows).

use crate::csv::{CsvError, enrolment_date, write_csv};
use crate::model::{Participant, SUBJECT_STATUSES, StudyData, counts_by_site};
use crate::options::{ExportOptions, Filters};
use chrono::Datelike;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;

/// Statuses of people not yet screened (the screening denominator leaves them out).
const NOT_SCREENED: [&str; 2] = ["candidate", "potential-candidate"];

/// Statuses of failed screening.
const SCREEN_FAILED: [&str; 2] = ["ineligible", "not-registered"];

/// Statuses that imply enrolment even without an arm.
const ENROLLED: [&str; 6] = [
    "on-study",
    "on-study-intervention",
    "on-study-observation",
    "follow-up",
    "off-study",
    "withdrawn",
];

/// Study metrics at one moment. Counts are over the selected participants only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dashboard {
    pub study_id: String,
    pub study_title: String,
    /// RFC 3339; given by the caller so a snapshot is reproducible.
    pub generated_at: String,
    /// The filters that selected the participants (all when default), so a snapshot says what
    /// it covers; set with [`Dashboard::with_filters`].
    pub filters: Filters,
    pub participants_total: u64,
    /// Per site, in the study's site order (every site, even empty), then any site the
    /// participants name that is not the study's. JSON: an object keyed by site id.
    #[serde(serialize_with = "sites_by_id")]
    pub by_site_status: Vec<SiteStatusCounts>,
    /// Every month from the first to the last enrolment, gaps included (a chart needs them).
    /// JSON: an object keyed by month.
    #[serde(serialize_with = "months_by_month")]
    pub enrolment_by_month: Vec<MonthlyEnrolment>,
    /// Participants left out of `enrolment_by_month`: no full `YYYY-MM-DD` enrolment date.
    pub without_enrolment_date: u64,
    /// Participants with status `ineligible` or `not-registered`.
    pub screen_failures: u64,
    /// Participants who reached screening or beyond: any R4 status but `candidate` and
    /// `potential-candidate` (an unknown or missing status is not counted).
    pub screened: u64,
    /// `screen_failures / screened`, 4 decimals; null when no one was screened.
    pub screen_failure_rate: Option<f64>,
    /// Participants with status `withdrawn`.
    pub withdrawals: u64,
    /// Participants with an assigned or actual arm, or a status of on-study,
    /// on-study-intervention, on-study-observation, follow-up, off-study or withdrawn.
    pub enrolled: u64,
    /// `withdrawals / enrolled`, 4 decimals; null when no one was enrolled.
    pub withdrawal_rate: Option<f64>,
}

/// Participants of one site per status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteStatusCounts {
    #[serde(skip_serializing)]
    pub site_id: String,
    /// Empty for a site that is not the study's.
    pub site_name: String,
    /// Every R4 status (zero included), plus any other status participants have.
    pub statuses: BTreeMap<String, u64>,
    pub total: u64,
}

/// New enrolments in one month, and all enrolments up to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonthlyEnrolment {
    /// `YYYY-MM`.
    #[serde(skip_serializing)]
    pub month: String,
    pub enrolled: u64,
    pub cumulative: u64,
}

fn sites_by_id<S: Serializer>(sites: &[SiteStatusCounts], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(sites.iter().map(|site| (&site.site_id, site)))
}

fn months_by_month<S: Serializer>(months: &[MonthlyEnrolment], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(months.iter().map(|m| (&m.month, m)))
}

impl Dashboard {
    /// The same snapshot, recording the filters that selected its participants.
    pub fn with_filters(mut self, filters: &Filters) -> Dashboard {
        self.filters = filters.clone();
        self
    }
}

/// The metrics of `selected` (see [`crate::csv::select`]).
pub fn dashboard(data: &StudyData, selected: &[&Participant], generated_at: &str) -> Dashboard {
    let count = |test: &dyn Fn(&Participant) -> bool| -> u64 {
        selected.iter().filter(|p| test(p)).count() as u64
    };
    let has = |statuses: &[&str], p: &Participant| statuses.contains(&p.status.as_str());
    let screen_failures = count(&|p| has(&SCREEN_FAILED, p));
    let screened = count(&|p| has(&SUBJECT_STATUSES, p) && !has(&NOT_SCREENED, p));
    let withdrawals = count(&|p| p.status == "withdrawn");
    let enrolled =
        count(&|p| !p.assigned_arm.is_empty() || !p.actual_arm.is_empty() || has(&ENROLLED, p));
    let (enrolment_by_month, without_enrolment_date) = by_month(selected);
    Dashboard {
        study_id: data.study.id.clone(),
        study_title: data.study.title.clone(),
        generated_at: generated_at.to_string(),
        filters: Filters::default(),
        participants_total: selected.len() as u64,
        by_site_status: by_site(data, selected),
        enrolment_by_month,
        without_enrolment_date,
        screen_failures,
        screened,
        screen_failure_rate: rate(screen_failures, screened),
        withdrawals,
        enrolled,
        withdrawal_rate: rate(withdrawals, enrolled),
    }
}

/// `numerator / denominator` rounded to 4 decimals; `None` for a zero denominator.
fn rate(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| (numerator as f64 / denominator as f64 * 10_000.0).round() / 10_000.0)
}

fn by_site(data: &StudyData, selected: &[&Participant]) -> Vec<SiteStatusCounts> {
    let mut counts = counts_by_site(selected);
    let row = |site_id: &str, site_name: &str, found: Option<BTreeMap<String, u64>>| {
        let mut statuses: BTreeMap<String, u64> = SUBJECT_STATUSES
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        statuses.extend(found.unwrap_or_default());
        SiteStatusCounts {
            site_id: site_id.to_string(),
            site_name: site_name.to_string(),
            total: statuses.values().sum(),
            statuses,
        }
    };
    let mut rows: Vec<SiteStatusCounts> = data
        .sites
        .iter()
        .map(|site| row(&site.id, &site.name, counts.remove(&site.id)))
        .collect();
    // What is left names no site of the study; kept so the totals add up.
    rows.extend(
        counts
            .into_iter()
            .map(|(site_id, found)| row(&site_id, "", Some(found))),
    );
    rows
}

/// Enrolments per month, gaps filled, and the number of participants without a date.
fn by_month(selected: &[&Participant]) -> (Vec<MonthlyEnrolment>, u64) {
    let mut per_month: BTreeMap<(i32, u32), u64> = BTreeMap::new();
    let mut without = 0;
    for p in selected {
        match enrolment_date(p) {
            Some(date) => *per_month.entry((date.year(), date.month())).or_default() += 1,
            None => without += 1,
        }
    }
    let (Some(first), Some(last)) = (
        per_month.keys().next().copied(),
        per_month.keys().next_back().copied(),
    ) else {
        return (Vec::new(), without);
    };
    let mut months = Vec::new();
    let mut cumulative = 0;
    let mut month = first;
    while month <= last {
        let enrolled = per_month.get(&month).copied().unwrap_or(0);
        cumulative += enrolled;
        months.push(MonthlyEnrolment {
            month: format!("{:04}-{:02}", month.0, month.1),
            enrolled,
            cumulative,
        });
        month = if month.1 == 12 {
            (month.0 + 1, 1)
        } else {
            (month.0, month.1 + 1)
        };
    }
    (months, without)
}

/// The columns of `by_site_status.csv`.
fn site_status_columns() -> Vec<&'static str> {
    let mut columns = vec!["site_id", "site_name"];
    columns.extend(SUBJECT_STATUSES);
    columns.push("total");
    columns
}

/// A rate as CSV text: 4 decimals, empty when undefined.
fn rate_text(rate: Option<f64>) -> String {
    rate.map(|r| format!("{r:.4}")).unwrap_or_default()
}

/// The dashboard's files: `dashboard.json` (pretty), `by_site_status.csv`,
/// `enrolment_by_month.csv` and `rates.csv`, the CSVs with the export's options.
pub fn dashboard_files(
    d: &Dashboard,
    options: &ExportOptions,
) -> Result<Vec<(String, Vec<u8>)>, CsvError> {
    let mut json = serde_json::to_vec_pretty(d).expect("a dashboard serializes to JSON");
    json.push(b'\n');

    let sites = d.by_site_status.iter().map(|site| {
        let mut row = vec![site.site_id.clone(), site.site_name.clone()];
        row.extend(
            SUBJECT_STATUSES
                .iter()
                .map(|s| site.statuses.get(*s).copied().unwrap_or(0).to_string()),
        );
        row.push(site.total.to_string());
        row
    });
    let sites = write_csv(options, &site_status_columns(), sites)?;

    let months = d.enrolment_by_month.iter().map(|m| {
        vec![
            m.month.clone(),
            m.enrolled.to_string(),
            m.cumulative.to_string(),
        ]
    });
    let months = write_csv(options, &["month", "enrolled", "cumulative"], months)?;

    let rates = [
        (
            "screen_failure_rate",
            d.screen_failures,
            d.screened,
            d.screen_failure_rate,
        ),
        (
            "withdrawal_rate",
            d.withdrawals,
            d.enrolled,
            d.withdrawal_rate,
        ),
    ]
    .map(|(metric, numerator, denominator, value)| {
        vec![
            metric.to_string(),
            numerator.to_string(),
            denominator.to_string(),
            rate_text(value),
        ]
    });
    let rates = write_csv(
        options,
        &["metric", "numerator", "denominator", "value"],
        rates,
    )?;

    Ok(vec![
        ("dashboard.json".to_string(), json),
        ("by_site_status.csv".to_string(), sites),
        ("enrolment_by_month.csv".to_string(), months),
        ("rates.csv".to_string(), rates),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::{select, tests::study};
    use crate::options::{CsvEncoding, Delimiter};
    use serde_json::{Value, json};

    /// The shared test study plus p8 (s3, not-registered, 2021-05-20); p2 has an arm.
    ///
    /// | id | site | status         | enrolled   | counted as                     |
    /// |----|------|----------------|------------|--------------------------------|
    /// | p1 | s1   | on-study       | 2021-01-10 | screened, enrolled             |
    /// | p2 | s1   | screening (A)  | 2021-01-31 | screened, enrolled (arm)       |
    /// | p3 | s2   | withdrawn      | 2021-03-01 | screened, enrolled, withdrawal |
    /// | p4 | s2   | on-study       | (none)     | screened, enrolled             |
    /// | p5 | s1   | candidate      | 2021-02-15 | -                              |
    /// | p6 | s9   | on-study       | 2020-12-31 | screened, enrolled             |
    /// | p7 | s2   | ineligible     | 2021-03    | screened, failure              |
    /// | p8 | s3   | not-registered | 2021-05-20 | screened, failure              |
    fn data() -> StudyData {
        let mut data = study();
        data.participants[1].assigned_arm = "A".into();
        let mut p8 = data.participants[0].clone();
        p8.id = "p8".into();
        p8.site_id = "s3".into();
        p8.status = "not-registered".into();
        p8.enrolled = "2021-05-20".into();
        data.participants.push(p8);
        data
    }

    fn all() -> Dashboard {
        let data = data();
        dashboard(
            &data,
            &select(&data, &Filters::default()),
            "2024-05-01T12:00:00Z",
        )
    }

    #[test]
    fn counts_and_rates_of_everyone() {
        let d = all();
        assert_eq!(d.study_id, "st1");
        assert_eq!(d.study_title, "Trial One");
        assert_eq!(d.generated_at, "2024-05-01T12:00:00Z");
        assert_eq!(d.participants_total, 8);
        assert_eq!((d.screen_failures, d.screened), (2, 7));
        assert_eq!(d.screen_failure_rate, Some(0.2857));
        assert_eq!((d.withdrawals, d.enrolled), (1, 5));
        assert_eq!(d.withdrawal_rate, Some(0.2));
        assert_eq!(d.without_enrolment_date, 2);
    }

    #[test]
    fn sites_come_in_study_order_then_unknown_sites() {
        let d = all();
        let rows: Vec<(&str, &str, u64)> = d
            .by_site_status
            .iter()
            .map(|s| (s.site_id.as_str(), s.site_name.as_str(), s.total))
            .collect();
        assert_eq!(
            rows,
            [
                ("s2", "Second", 3),
                ("s1", "First", 3),
                ("s3", "Third", 1),
                ("s9", "", 1)
            ]
        );
        let s2 = &d.by_site_status[0].statuses;
        assert_eq!(s2.len(), SUBJECT_STATUSES.len());
        assert_eq!(
            (s2["withdrawn"], s2["on-study"], s2["ineligible"]),
            (1, 1, 1)
        );
        assert_eq!(s2["candidate"], 0);
        let s1 = &d.by_site_status[1].statuses;
        assert_eq!(
            (s1["on-study"], s1["screening"], s1["candidate"]),
            (1, 1, 1)
        );
        assert_eq!(d.by_site_status[2].statuses["not-registered"], 1);
    }

    #[test]
    fn months_are_contiguous_with_cumulative_counts() {
        let d = all();
        let months: Vec<(&str, u64, u64)> = d
            .enrolment_by_month
            .iter()
            .map(|m| (m.month.as_str(), m.enrolled, m.cumulative))
            .collect();
        assert_eq!(
            months,
            [
                ("2020-12", 1, 1),
                ("2021-01", 2, 3),
                ("2021-02", 1, 4),
                ("2021-03", 1, 5),
                ("2021-04", 0, 5),
                ("2021-05", 1, 6),
            ]
        );
    }

    #[test]
    fn rates_are_null_without_a_denominator() {
        let data = data();
        let candidates = Filters {
            statuses: Some(vec!["candidate".into()]),
            ..Filters::default()
        };
        let d = dashboard(&data, &select(&data, &candidates), "t");
        assert_eq!(d.participants_total, 1);
        assert_eq!((d.screened, d.screen_failure_rate), (0, None));
        assert_eq!((d.enrolled, d.withdrawal_rate), (0, None));
        let none = dashboard(&data, &[], "t");
        assert_eq!(none.participants_total, 0);
        assert!(none.enrolment_by_month.is_empty());
        assert_eq!(none.by_site_status.len(), 3);
        assert!(none.by_site_status.iter().all(|s| s.total == 0));
    }

    #[test]
    fn a_filtered_dashboard_counts_only_the_selected() {
        let data = data();
        let filters = Filters {
            sites: Some(vec!["s2".into()]),
            ..Filters::default()
        };
        let d = dashboard(&data, &select(&data, &filters), "t").with_filters(&filters);
        assert_eq!(d.participants_total, 3);
        assert_eq!((d.screen_failures, d.screened), (1, 3));
        assert_eq!(d.screen_failure_rate, Some(0.3333));
        assert_eq!((d.withdrawals, d.enrolled), (1, 2));
        assert_eq!(d.withdrawal_rate, Some(0.5));
        assert_eq!(d.filters, filters);
        let months: Vec<&str> = d
            .enrolment_by_month
            .iter()
            .map(|m| m.month.as_str())
            .collect();
        assert_eq!(months, ["2021-03"]);
        assert_eq!(d.without_enrolment_date, 2);
    }

    #[test]
    fn json_keys_sites_and_months() {
        let data = data();
        let filters = Filters {
            statuses: Some(vec!["on-study".into()]),
            ..Filters::default()
        };
        let d = dashboard(&data, &select(&data, &filters), "2024-05-01T12:00:00Z")
            .with_filters(&filters);
        let files = dashboard_files(&d, &ExportOptions::default()).unwrap();
        assert_eq!(files[0].0, "dashboard.json");
        let json: Value = serde_json::from_slice(&files[0].1).unwrap();
        assert_eq!(json["study_id"], "st1");
        assert_eq!(json["generated_at"], "2024-05-01T12:00:00Z");
        assert_eq!(json["participants_total"], 3);
        assert_eq!(json["filters"]["statuses"], json!(["on-study"]));
        let sites: Vec<&String> = json["by_site_status"].as_object().unwrap().keys().collect();
        assert_eq!(sites, ["s2", "s1", "s3", "s9"]);
        assert_eq!(json["by_site_status"]["s2"]["site_name"], "Second");
        assert_eq!(json["by_site_status"]["s2"]["statuses"]["on-study"], 1);
        assert_eq!(json["by_site_status"]["s2"]["total"], 1);
        assert_eq!(
            json["enrolment_by_month"],
            json!({
                "2020-12": {"enrolled": 1, "cumulative": 1},
                "2021-01": {"enrolled": 1, "cumulative": 2},
            })
        );
        assert_eq!(json["screen_failure_rate"], 0.0);
        assert_eq!(json["withdrawal_rate"], 0.0);
        let none = dashboard(&data, &[], "t");
        let json = serde_json::to_value(&none).unwrap();
        assert_eq!(json["screen_failure_rate"], Value::Null);
        assert_eq!(json["withdrawal_rate"], Value::Null);
    }

    fn file(files: &[(String, Vec<u8>)], name: &str) -> String {
        let (_, bytes) = files.iter().find(|(n, _)| n == name).unwrap();
        String::from_utf8(bytes.clone()).unwrap()
    }

    #[test]
    fn csv_files_hold_the_numbers() {
        let files = dashboard_files(&all(), &ExportOptions::default()).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "dashboard.json",
                "by_site_status.csv",
                "enrolment_by_month.csv",
                "rates.csv"
            ]
        );
        assert_eq!(
            file(&files, "rates.csv"),
            "metric,numerator,denominator,value\r\n\
             screen_failure_rate,2,7,0.2857\r\n\
             withdrawal_rate,1,5,0.2000\r\n"
        );
        assert_eq!(
            file(&files, "enrolment_by_month.csv"),
            "month,enrolled,cumulative\r\n2020-12,1,1\r\n2021-01,2,3\r\n2021-02,1,4\r\n\
             2021-03,1,5\r\n2021-04,0,5\r\n2021-05,1,6\r\n"
        );
        let sites = file(&files, "by_site_status.csv");
        let lines: Vec<&str> = sites.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "site_id,site_name,candidate,eligible,follow-up,ineligible,not-registered,\
             off-study,on-study,on-study-intervention,on-study-observation,pending-on-study,\
             potential-candidate,screening,withdrawn,total"
        );
        assert_eq!(lines[1], "s2,Second,0,0,0,1,0,0,1,0,0,0,0,0,1,3");
        assert_eq!(lines[2], "s1,First,1,0,0,0,0,0,1,0,0,0,0,1,0,3");
        assert_eq!(lines[3], "s3,Third,0,0,0,0,1,0,0,0,0,0,0,0,0,1");
        assert_eq!(lines[4], "s9,,0,0,0,0,0,0,1,0,0,0,0,0,0,1");
        assert_eq!(lines[5], "");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn csv_files_use_the_options_and_report_latin1_failures() {
        let mut data = data();
        data.sites[1].name = "Łódź".into();
        let d = dashboard(&data, &select(&data, &Filters::default()), "t");
        let options = ExportOptions {
            encoding: CsvEncoding::Iso88591,
            delimiter: Delimiter::Semicolon,
        };
        let error = dashboard_files(&d, &options).unwrap_err();
        assert_eq!((error.row, error.column), (2, 2));
        assert_eq!(error.column_name, "site_name");
        assert!(error.message.contains("U+0141"));

        let options = ExportOptions {
            encoding: CsvEncoding::Utf16Le,
            delimiter: Delimiter::Tab,
        };
        let files = dashboard_files(&d, &options).unwrap();
        let (_, rates) = &files[3];
        assert_eq!(&rates[..2], &[0xFF, 0xFE]);
        let units: Vec<u16> = rates[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert!(
            String::from_utf16(&units)
                .unwrap()
                .starts_with("metric\tnumerator\tdenominator\tvalue\r\n")
        );
        // JSON is always UTF-8.
        assert!(
            String::from_utf8(files[0].1.clone())
                .unwrap()
                .contains("Łódź")
        );
    }
}
