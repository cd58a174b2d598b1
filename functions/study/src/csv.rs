//! CSV files of study exports, written line by line so an export of any size streams.
//!
//! Lines follow RFC 4180 (CRLF ends, cells quoted when they hold the delimiter, a double quote,
//! CR or LF, quotes doubled). Cells that a spreadsheet would read as a formula are neutralised
//! (OWASP "CSV injection"), since participant and site names come from the FHIR store and may
//! hold anything. The encodings are written by hand: the WHATWG Encoding Standard (and crates
//! that follow it) maps the label "iso-8859-1" to windows-1252, which is not what a study team
//! asking for Latin-1 means.
//!
//! This module also holds the participant selection ([`select`]) shared by every study export
//! type, and the rows of the sites and participants CSVs.

use crate::model::{Participant, SUBJECT_STATUSES, StudyData, counts_by_site};
use crate::options::{CsvEncoding, Delimiter, ExportOptions, Filters};
use chrono::NaiveDate;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A cell that cannot be written, named so a study team can fix the source data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvError {
    /// Data rows count from 1; the header is row 0.
    pub row: usize,
    /// 1-based.
    pub column: usize,
    /// The column's header name (empty when no header was written).
    pub column_name: String,
    pub message: String,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "row {}, column {}", self.row, self.column)?;
        if !self.column_name.is_empty() {
            write!(f, " ({})", self.column_name)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for CsvError {}

/// Writes one CSV file a line at a time; each call returns that line's encoded bytes, so the
/// caller can stream them out.
#[derive(Debug, Clone)]
pub struct CsvWriter {
    delimiter: Delimiter,
    encoding: CsvEncoding,
    /// The header's names, for errors.
    names: Vec<String>,
    /// Data rows written so far (or attempted: a failed row still has its number).
    rows: usize,
    /// Whether a line (and so the BOM) has been emitted.
    started: bool,
}

impl CsvWriter {
    pub fn new(delimiter: Delimiter, encoding: CsvEncoding) -> CsvWriter {
        CsvWriter {
            delimiter,
            encoding,
            names: Vec::new(),
            rows: 0,
            started: false,
        }
    }

    /// A writer with an export's CSV options.
    pub fn for_options(options: &ExportOptions) -> CsvWriter {
        CsvWriter::new(options.delimiter, options.encoding)
    }

    /// The header line (row 0); its names label the columns of later errors.
    pub fn header(&mut self, names: &[&str]) -> Result<Vec<u8>, CsvError> {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self.line(names, 0)
    }

    /// The next data line. With a header, a row of another width is an error (RFC 4180: every
    /// line has the same number of fields), since it means the columns would be misread.
    pub fn row(&mut self, cells: &[&str]) -> Result<Vec<u8>, CsvError> {
        self.rows += 1;
        let row = self.rows;
        if !self.names.is_empty() && cells.len() != self.names.len() {
            let column = cells.len().min(self.names.len()) + 1;
            return Err(self.error(
                row,
                column,
                format!(
                    "the row has {} cells but the header has {} columns",
                    cells.len(),
                    self.names.len()
                ),
            ));
        }
        self.line(cells, row)
    }

    fn line(&mut self, cells: &[&str], row: usize) -> Result<Vec<u8>, CsvError> {
        let delimiter = char::from(self.delimiter.byte());
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if self.encoding == CsvEncoding::Iso88591
                && let Some(c) = cell.chars().find(|c| u32::from(*c) > 0xFF)
            {
                return Err(self.error(
                    row,
                    i + 1,
                    format!(
                        "character {c:?} (U+{:04X}) cannot be encoded in ISO-8859-1 (Latin-1)",
                        u32::from(c)
                    ),
                ));
            }
            if i > 0 {
                text.push(delimiter);
            }
            push_cell(&mut text, cell, delimiter);
        }
        text.push_str("\r\n");

        let mut out = Vec::with_capacity(text.len() * 2 + 3);
        if !self.started {
            out.extend_from_slice(bom(self.encoding));
        }
        encode_into(&mut out, &text, self.encoding);
        self.started = true;
        Ok(out)
    }

    fn error(&self, row: usize, column: usize, message: String) -> CsvError {
        CsvError {
            row,
            column,
            column_name: self.names.get(column - 1).cloned().unwrap_or_default(),
            message,
        }
    }
}

/// A whole CSV file (header and rows) with an export's options, for files small enough to hold
/// in memory (the dashboard's).
pub fn write_csv(
    options: &ExportOptions,
    columns: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> Result<Vec<u8>, CsvError> {
    let mut writer = CsvWriter::for_options(options);
    let mut out = writer.header(columns)?;
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.extend(writer.row(&cells)?);
    }
    Ok(out)
}

/// Whether a spreadsheet would run the cell as a formula (or, for tab and CR, could be led to by
/// a cell that trims them): OWASP's CSV injection trigger characters.
fn is_formula(cell: &str) -> bool {
    cell.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// Appends one cell: formula cells get a leading `'`, which spreadsheets show as text and do not
/// evaluate (it changes the cell's text, e.g. `-5` becomes `'-5`; the study exports hold no
/// negative numbers); then the cell is quoted if RFC 4180 requires it.
fn push_cell(out: &mut String, cell: &str, delimiter: char) {
    let neutral = is_formula(cell);
    let quoted = cell.contains([delimiter, '"', '\r', '\n']);
    if quoted {
        out.push('"');
    }
    if neutral {
        out.push('\'');
    }
    if quoted {
        out.push_str(&cell.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(cell);
    }
}

/// The byte order mark an encoding begins its file with.
fn bom(encoding: CsvEncoding) -> &'static [u8] {
    match encoding {
        CsvEncoding::Utf8 | CsvEncoding::Iso88591 => b"",
        CsvEncoding::Utf8Bom => b"\xEF\xBB\xBF",
        CsvEncoding::Utf16Le => b"\xFF\xFE",
    }
}

/// Encodes text whose Latin-1 fitness has been checked.
fn encode_into(out: &mut Vec<u8>, text: &str, encoding: CsvEncoding) {
    match encoding {
        CsvEncoding::Utf8 | CsvEncoding::Utf8Bom => out.extend_from_slice(text.as_bytes()),
        // `encode_utf16` yields surrogate pairs for characters beyond the BMP.
        CsvEncoding::Utf16Le => {
            for unit in text.encode_utf16() {
                out.extend_from_slice(&unit.to_le_bytes());
            }
        }
        // Latin-1 is the first 256 code points, one byte each.
        CsvEncoding::Iso88591 => out.extend(text.chars().map(|c| u32::from(c) as u8)),
    }
}

/// A participant's enrolment date, if it is a full valid `YYYY-MM-DD` date (a partial FHIR date
/// such as `2021-03` counts as none).
pub fn enrolment_date(participant: &Participant) -> Option<NaiveDate> {
    let text = participant.enrolled.as_str();
    if text.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// The participants an export covers, in the study's participant order. Each filter given must
/// hold: the enrolment date within the inclusive date range (a participant without one is left
/// out when the range has a bound; a range with neither bound selects all), the participant's
/// site in `sites`, its status in `statuses`. An empty list selects no one.
pub fn select<'a>(data: &'a StudyData, filters: &Filters) -> Vec<&'a Participant> {
    let range = filters
        .date_range
        .as_ref()
        .filter(|r| r.from.is_some() || r.to.is_some());
    let sites: Option<HashSet<&str>> = filters
        .sites
        .as_ref()
        .map(|s| s.iter().map(String::as_str).collect());
    let statuses: Option<HashSet<&str>> = filters
        .statuses
        .as_ref()
        .map(|s| s.iter().map(String::as_str).collect());
    data.participants
        .iter()
        .filter(|p| {
            range.is_none_or(|r| {
                enrolment_date(p).is_some_and(|d| {
                    r.from.is_none_or(|from| d >= from) && r.to.is_none_or(|to| d <= to)
                })
            })
        })
        .filter(|p| {
            sites
                .as_ref()
                .is_none_or(|s| s.contains(p.site_id.as_str()))
        })
        .filter(|p| {
            statuses
                .as_ref()
                .is_none_or(|s| s.contains(p.status.as_str()))
        })
        .collect()
}

/// The sites CSV's columns.
pub const SITES_COLUMNS: &[&str] = &[
    "site_id",
    "site_name",
    "city",
    "state",
    "country",
    "site_status",
    "participants_total",
    "participants_candidate",
    "participants_eligible",
    "participants_follow-up",
    "participants_ineligible",
    "participants_not-registered",
    "participants_off-study",
    "participants_on-study",
    "participants_on-study-intervention",
    "participants_on-study-observation",
    "participants_pending-on-study",
    "participants_potential-candidate",
    "participants_screening",
    "participants_withdrawn",
];

/// One row per site of the study, in the study's order, every site even with no one selected
/// (a team sees which sites have not enrolled). Participants at no site of the study appear in
/// no row.
pub fn site_rows(data: &StudyData, selected: &[&Participant]) -> Vec<Vec<String>> {
    let counts = counts_by_site(selected);
    data.sites
        .iter()
        .map(|site| {
            let at_site = counts.get(&site.id);
            let count = |status: &str| at_site.and_then(|c| c.get(status)).copied().unwrap_or(0);
            let total: u64 = at_site.map(|c| c.values().sum()).unwrap_or(0);
            let mut row = vec![
                site.id.clone(),
                site.name.clone(),
                site.city.clone(),
                site.state.clone(),
                site.country.clone(),
                site.status.clone(),
                total.to_string(),
            ];
            row.extend(SUBJECT_STATUSES.iter().map(|s| count(s).to_string()));
            row
        })
        .collect()
}

/// The participants CSV's columns.
pub const PARTICIPANTS_COLUMNS: &[&str] = &[
    "participant_id",
    "participant_identifier",
    "site_id",
    "site_name",
    "status",
    "enrollment_date",
    "end_date",
    "assigned_arm",
    "actual_arm",
    "consent_reference",
    "patient_gender",
    "patient_birth_date",
];

/// One row per selected participant, in their order; lazy, so the CSV streams.
pub fn participant_rows(
    data: &StudyData,
    selected: &[&Participant],
) -> impl Iterator<Item = Vec<String>> {
    let names: HashMap<&str, &str> = data
        .sites
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    selected.iter().map(move |p| {
        vec![
            p.id.clone(),
            p.identifier.clone(),
            p.site_id.clone(),
            names.get(p.site_id.as_str()).unwrap_or(&"").to_string(),
            p.status.clone(),
            p.enrolled.clone(),
            p.ended.clone(),
            p.assigned_arm.clone(),
            p.actual_arm.clone(),
            p.consent.clone(),
            p.gender.clone(),
            p.birth_date.clone(),
        ]
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Site, Study};
    use crate::options::DateRange;
    use serde_json::Value;

    fn writer(delimiter: Delimiter) -> CsvWriter {
        CsvWriter::new(delimiter, CsvEncoding::Utf8)
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn plain_cells_are_not_quoted_and_lines_end_in_crlf() {
        let mut w = writer(Delimiter::Comma);
        assert_eq!(text(w.header(&["a", "b"]).unwrap()), "a,b\r\n");
        assert_eq!(text(w.row(&["x y", ""]).unwrap()), "x y,\r\n");
    }

    #[test]
    fn cells_with_delimiter_quote_cr_or_lf_are_quoted() {
        let mut w = writer(Delimiter::Comma);
        let line = w
            .row(&["a,b", "say \"hi\"", "one\ntwo", "cr\rhere", "a;b", "a\tb"])
            .unwrap();
        assert_eq!(
            text(line),
            "\"a,b\",\"say \"\"hi\"\"\",\"one\ntwo\",\"cr\rhere\",a;b,a\tb\r\n"
        );
    }

    #[test]
    fn each_delimiter_separates_and_quotes_its_own_character() {
        let cells = ["a,b", "c;d", "e\tf"];
        assert_eq!(
            text(writer(Delimiter::Comma).row(&cells).unwrap()),
            "\"a,b\",c;d,e\tf\r\n"
        );
        assert_eq!(
            text(writer(Delimiter::Semicolon).row(&cells).unwrap()),
            "a,b;\"c;d\";e\tf\r\n"
        );
        assert_eq!(
            text(writer(Delimiter::Tab).row(&cells).unwrap()),
            "a,b\tc;d\t\"e\tf\"\r\n"
        );
    }

    #[test]
    fn formula_cells_are_neutralised_with_a_quote() {
        let mut w = writer(Delimiter::Comma);
        for (cell, expected) in [
            ("=1+1", "'=1+1"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "\"'\r=1\""),
            (
                "=HYPERLINK(\"x\",\"y\")",
                "\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\"",
            ),
            ("=a,b", "\"'=a,b\""),
            ("a=b", "a=b"),
            ("2021-01-01", "2021-01-01"),
            ("", ""),
        ] {
            assert_eq!(
                text(w.row(&[cell]).unwrap()),
                format!("{expected}\r\n"),
                "{cell:?}"
            );
        }
        // With tab as the delimiter a leading tab is also quoted.
        assert_eq!(
            text(writer(Delimiter::Tab).row(&["\tx"]).unwrap()),
            "\"'\tx\"\r\n"
        );
    }

    #[test]
    fn utf8_has_no_bom_and_utf8_bom_has_one_only_first() {
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Utf8);
        assert_eq!(w.header(&["名"]).unwrap(), "名\r\n".as_bytes());
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Utf8Bom);
        let first = w.header(&["é"]).unwrap();
        assert_eq!(&first[..3], &[0xEF, 0xBB, 0xBF]);
        assert_eq!(std::str::from_utf8(&first[3..]).unwrap(), "é\r\n");
        assert_eq!(w.row(&["日本"]).unwrap(), "日本\r\n".as_bytes());
    }

    #[test]
    fn the_bom_comes_with_the_first_line_even_without_header() {
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Utf8Bom);
        assert_eq!(w.row(&["a"]).unwrap(), b"\xEF\xBB\xBFa\r\n");
        assert_eq!(w.row(&["b"]).unwrap(), b"b\r\n");
    }

    fn utf16(bytes: &[u8]) -> String {
        assert_eq!(bytes.len() % 2, 0);
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).unwrap()
    }

    #[test]
    fn utf16le_has_a_bom_and_surrogate_pairs() {
        let mut w = CsvWriter::new(Delimiter::Semicolon, CsvEncoding::Utf16Le);
        let first = w.header(&["name", "x"]).unwrap();
        assert_eq!(&first[..2], &[0xFF, 0xFE]);
        assert_eq!(utf16(&first[2..]), "name;x\r\n");
        let second = w.row(&["Kraków 😀", "日;本"]).unwrap();
        assert_ne!(&second[..2], &[0xFF, 0xFE]);
        assert_eq!(utf16(&second), "Kraków 😀;\"日;本\"\r\n");
        // U+1F600 as the surrogate pair D83D DE00, little endian.
        let emoji = [0x3D, 0xD8, 0x00, 0xDE];
        assert!(second.windows(4).any(|w| w == emoji));
        // "a" is 61 00.
        assert_eq!(
            w.row(&["a", ""]).unwrap(),
            [0x61, 0, b';', 0, b'\r', 0, b'\n', 0]
        );
    }

    #[test]
    fn latin1_writes_one_byte_per_character() {
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Iso88591);
        let header = w.header(&["city", "price"]).unwrap();
        assert_eq!(header, b"city,price\r\n");
        let row = w.row(&["Kraków", "5 ¤uro"]).unwrap();
        assert_eq!(row, b"Krak\xF3w,5 \xA4uro\r\n");
        let decoded: String = row.iter().map(|b| char::from(*b)).collect();
        assert_eq!(decoded, "Kraków,5 ¤uro\r\n");
        // ÿ is the last Latin-1 character; windows-1252 would differ in 0x80..0x9F.
        assert_eq!(w.row(&["ÿ\u{80}", "x"]).unwrap(), b"\xFF\x80,x\r\n");
    }

    #[test]
    fn latin1_names_the_row_column_and_character_it_cannot_write() {
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Iso88591);
        w.header(&["site_id", "site_name", "city"]).unwrap();
        w.row(&["s1", "Kraków", "x"]).unwrap();
        let error = w.row(&["s2", "Łódź", "y"]).unwrap_err();
        assert_eq!(
            error,
            CsvError {
                row: 2,
                column: 2,
                column_name: "site_name".into(),
                message: "character 'Ł' (U+0141) cannot be encoded in ISO-8859-1 (Latin-1)".into(),
            }
        );
        assert_eq!(
            error.to_string(),
            "row 2, column 2 (site_name): character 'Ł' (U+0141) cannot be encoded in \
             ISO-8859-1 (Latin-1)"
        );
        let error = w.row(&["s3", "x", "東京 日"]).unwrap_err();
        assert_eq!((error.row, error.column), (3, 3));
        assert_eq!(error.column_name, "city");
        assert!(error.message.contains("U+6771"), "{}", error.message);
        // The euro sign is in windows-1252 but not in Latin-1.
        let error = w.row(&["€", "", ""]).unwrap_err();
        assert_eq!((error.row, error.column), (4, 1));
        assert!(error.message.contains("U+20AC"));
    }

    #[test]
    fn latin1_header_errors_are_row_zero() {
        let mut w = CsvWriter::new(Delimiter::Comma, CsvEncoding::Iso88591);
        let error = w.header(&["a", "ł"]).unwrap_err();
        assert_eq!((error.row, error.column), (0, 2));
        assert!(error.message.contains("U+0142"));
    }

    #[test]
    fn a_row_of_another_width_than_the_header_is_an_error() {
        let mut w = writer(Delimiter::Comma);
        w.header(&["a", "b"]).unwrap();
        let error = w.row(&["1"]).unwrap_err();
        assert_eq!(
            (error.row, error.column, error.column_name.as_str()),
            (1, 2, "b")
        );
        let error = w.row(&["1", "2", "3"]).unwrap_err();
        assert_eq!(
            (error.row, error.column, error.column_name.as_str()),
            (2, 3, "")
        );
    }

    #[test]
    fn write_csv_writes_header_and_rows() {
        let options = ExportOptions {
            encoding: CsvEncoding::Utf8Bom,
            delimiter: Delimiter::Semicolon,
        };
        let bytes = write_csv(
            &options,
            &["a", "b"],
            vec![vec!["1".into(), "x;y".into()], vec!["=2".into(), "".into()]],
        )
        .unwrap();
        assert_eq!(bytes, "\u{FEFF}a;b\r\n1;\"x;y\"\r\n'=2;\r\n".as_bytes());
    }

    fn site(id: &str, name: &str) -> Site {
        Site {
            id: id.into(),
            name: name.into(),
            city: format!("{name} city"),
            state: "ST".into(),
            country: "PL".into(),
            status: "active".into(),
            resource: Value::Null,
        }
    }

    fn participant(id: &str, site: &str, status: &str, enrolled: &str) -> Participant {
        Participant {
            id: id.into(),
            identifier: format!("ID-{id}"),
            site_id: site.into(),
            status: status.into(),
            enrolled: enrolled.into(),
            patient_id: format!("pat-{id}"),
            ..Participant::default()
        }
    }

    /// Three sites, seven participants: p1..p7.
    pub(crate) fn study() -> StudyData {
        StudyData {
            study: Study {
                id: "st1".into(),
                title: "Trial One".into(),
                status: "active".into(),
                resource: Value::Null,
            },
            sites: vec![
                site("s2", "Second"),
                site("s1", "First"),
                site("s3", "Third"),
            ],
            participants: vec![
                participant("p1", "s1", "on-study", "2021-01-10"),
                participant("p2", "s1", "screening", "2021-01-31"),
                participant("p3", "s2", "withdrawn", "2021-03-01"),
                participant("p4", "s2", "on-study", ""),
                participant("p5", "s1", "candidate", "2021-02-15"),
                participant("p6", "s9", "on-study", "2020-12-31"),
                participant("p7", "s2", "ineligible", "2021-03"),
            ],
        }
    }

    fn ids(selected: &[&Participant]) -> Vec<String> {
        selected.iter().map(|p| p.id.clone()).collect()
    }

    fn date(text: &str) -> Option<NaiveDate> {
        Some(text.parse().unwrap())
    }

    fn range(from: Option<NaiveDate>, to: Option<NaiveDate>) -> Option<DateRange> {
        Some(DateRange { from, to })
    }

    #[test]
    fn no_filters_select_everyone_in_order() {
        let data = study();
        assert_eq!(
            ids(&select(&data, &Filters::default())),
            ["p1", "p2", "p3", "p4", "p5", "p6", "p7"]
        );
        let open = Filters {
            date_range: range(None, None),
            ..Filters::default()
        };
        assert_eq!(select(&data, &open).len(), 7);
    }

    #[test]
    fn the_date_range_is_inclusive_and_needs_an_enrolment_date() {
        let data = study();
        let filters = |from, to| Filters {
            date_range: range(from, to),
            ..Filters::default()
        };
        assert_eq!(
            ids(&select(
                &data,
                &filters(date("2021-01-10"), date("2021-02-15"))
            )),
            ["p1", "p2", "p5"]
        );
        assert_eq!(
            ids(&select(
                &data,
                &filters(date("2021-01-11"), date("2021-02-14"))
            )),
            ["p2"]
        );
        assert_eq!(
            ids(&select(&data, &filters(date("2021-02-01"), None))),
            ["p3", "p5"]
        );
        assert_eq!(
            ids(&select(&data, &filters(None, date("2021-01-10")))),
            ["p1", "p6"]
        );
        assert_eq!(
            ids(&select(&data, &filters(date("2022-01-01"), None))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn sites_and_statuses_filter_by_membership() {
        let data = study();
        let by_sites = Filters {
            sites: Some(vec!["s2".into(), "s9".into()]),
            ..Filters::default()
        };
        assert_eq!(ids(&select(&data, &by_sites)), ["p3", "p4", "p6", "p7"]);
        let by_status = Filters {
            statuses: Some(vec!["on-study".into(), "withdrawn".into()]),
            ..Filters::default()
        };
        assert_eq!(ids(&select(&data, &by_status)), ["p1", "p3", "p4", "p6"]);
        let empty = Filters {
            sites: Some(vec![]),
            ..Filters::default()
        };
        assert!(select(&data, &empty).is_empty());
    }

    #[test]
    fn filters_combine_with_and() {
        let data = study();
        let filters = Filters {
            date_range: range(date("2021-01-01"), date("2021-12-31")),
            sites: Some(vec!["s1".into(), "s2".into()]),
            statuses: Some(vec![
                "on-study".into(),
                "withdrawn".into(),
                "candidate".into(),
            ]),
        };
        // p4 (no date), p6 (2020, s9), p2 (screening), p7 (partial date) are left out.
        assert_eq!(ids(&select(&data, &filters)), ["p1", "p3", "p5"]);
        let filters = Filters {
            sites: Some(vec!["s2".into()]),
            statuses: Some(vec!["on-study".into()]),
            ..Filters::default()
        };
        assert_eq!(ids(&select(&data, &filters)), ["p4"]);
    }

    #[test]
    fn site_columns_name_every_status() {
        assert_eq!(SITES_COLUMNS.len(), 7 + SUBJECT_STATUSES.len());
        for (column, status) in SITES_COLUMNS[7..].iter().zip(SUBJECT_STATUSES) {
            assert_eq!(*column, format!("participants_{status}"));
        }
        assert!(SITES_COLUMNS.contains(&"participants_on-study"));
    }

    #[test]
    fn site_rows_count_the_selected_participants_of_every_site() {
        let data = study();
        let all = select(&data, &Filters::default());
        let rows = site_rows(&data, &all);
        assert_eq!(rows.len(), 3);
        let count = |row: &Vec<String>, status: &str| {
            let i = SITES_COLUMNS
                .iter()
                .position(|c| *c == format!("participants_{status}"))
                .unwrap();
            row[i].clone()
        };
        // Study order: s2, s1, s3.
        assert_eq!(
            rows[0][..7],
            ["s2", "Second", "Second city", "ST", "PL", "active", "3"]
        );
        assert_eq!(count(&rows[0], "withdrawn"), "1");
        assert_eq!(count(&rows[0], "on-study"), "1");
        assert_eq!(count(&rows[0], "ineligible"), "1");
        assert_eq!(count(&rows[0], "candidate"), "0");
        assert_eq!(rows[1][0], "s1");
        assert_eq!(rows[1][6], "3");
        assert_eq!(count(&rows[1], "on-study"), "1");
        assert_eq!(count(&rows[1], "screening"), "1");
        assert_eq!(count(&rows[1], "candidate"), "1");
        assert_eq!(rows[2][0], "s3");
        assert!(rows[2][6..].iter().all(|c| c == "0"));
        for row in &rows {
            assert_eq!(row.len(), SITES_COLUMNS.len());
        }

        let on_study = Filters {
            statuses: Some(vec!["on-study".into()]),
            ..Filters::default()
        };
        let rows = site_rows(&data, &select(&data, &on_study));
        let totals: Vec<&str> = rows.iter().map(|r| r[6].as_str()).collect();
        assert_eq!(totals, ["1", "1", "0"]);
    }

    #[test]
    fn participant_rows_follow_the_columns() {
        let mut data = study();
        data.participants[0].ended = "2022-01-01".into();
        data.participants[0].assigned_arm = "A".into();
        data.participants[0].actual_arm = "B".into();
        data.participants[0].consent = "Consent/c1".into();
        data.participants[0].gender = "female".into();
        data.participants[0].birth_date = "1970-05-06".into();
        let filters = Filters {
            statuses: Some(vec!["on-study".into()]),
            ..Filters::default()
        };
        let selected = select(&data, &filters);
        let rows: Vec<Vec<String>> = participant_rows(&data, &selected).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            [
                "p1",
                "ID-p1",
                "s1",
                "First",
                "on-study",
                "2021-01-10",
                "2022-01-01",
                "A",
                "B",
                "Consent/c1",
                "female",
                "1970-05-06"
            ]
        );
        assert_eq!(rows[1][..4], ["p4", "ID-p4", "s2", "Second"]);
        // A site not of the study has no name.
        assert_eq!(rows[2][..4], ["p6", "ID-p6", "s9", ""]);
        assert!(rows.iter().all(|r| r.len() == PARTICIPANTS_COLUMNS.len()));
    }

    #[test]
    fn enrolment_dates_must_be_full_dates() {
        let mut p = participant("p", "s", "on-study", "2021-02-29");
        assert_eq!(enrolment_date(&p), None);
        p.enrolled = "2021-03".into();
        assert_eq!(enrolment_date(&p), None);
        p.enrolled = "2020-02-29".into();
        assert_eq!(enrolment_date(&p), date("2020-02-29"));
    }
}
