//! Kick-off parameters: read from the query string (GET) or a `Parameters` body (POST), then
//! validated against the Bulk Data IG. Everything unsupported is rejected, or, under
//! `Prefer: handling=lenient`, ignored and reported in the manifest's error files.

use crate::accept;
use crate::elements::ElementSelection;
use crate::error::ApiError;
use crate::fhir::time::{Instant, format_instant, parse_instant};
use crate::fhir::{is_resource_type, reference};
use crate::type_filter::TypeFilters;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The output formats accepted for `_outputFormat`; all mean NDJSON.
pub const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Which `$export` endpoint was called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", content = "group", rename_all = "lowercase")]
pub enum ExportLevel {
    System,
    Patient,
    Group(String),
}

/// The HTTP method of the kick-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickoffMethod {
    Get,
    Post,
}

/// Validated kick-off parameters, as stored with the job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportParams {
    pub output_format: String,
    pub since: Option<Instant>,
    pub until: Option<Instant>,
    /// `_type`, in request order without repeats; `None` means every type.
    pub types: Option<Vec<String>>,
    /// Patient ids from the `patient` parameter; `None` means every patient in scope.
    pub patients: Option<Vec<String>>,
    /// `Prefer: handling=lenient` was sent.
    pub lenient: bool,
    /// Parameters ignored under lenient handling, reported as OperationOutcome lines.
    pub ignored: Vec<String>,
    /// `_typeFilter` queries as sent (compiled again where they are applied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub type_filters: Vec<String>,
    /// `_elements` values as sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<String>,
    /// `includeAssociatedData`: which Provenance resources accompany the exported resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated: Option<AssociatedProvenance>,
    /// `organizeOutputBy` (only `Patient`): files hold one block per patient instead of one type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organize_by: Option<String>,
    /// `allowPartialManifests=true`: status polls may answer with the files finished so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial_manifests: bool,
    /// `Prefer: separate-export-status`: status polls answer 200 and carry the export's status
    /// in `X-Export-Status`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub separate_status: bool,
    /// Other problems handled leniently (criteria left out), reported like `ignored`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Information for the client (e.g. that its scopes narrowed the export), reported in the
    /// error file with severity `information`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl ExportParams {
    /// Whether `_type` (if given) asks for `resource_type`.
    pub fn wants_type(&self, resource_type: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == resource_type))
    }

    /// The compiled `_typeFilter` (validated at kick-off).
    pub fn compiled_type_filters(&self) -> TypeFilters {
        TypeFilters::parse(&self.type_filters, true).unwrap_or_default()
    }

    /// The compiled `_elements` (validated at kick-off).
    pub fn element_selection(&self) -> ElementSelection {
        ElementSelection::parse(&self.elements).unwrap_or_default()
    }
}

/// The `includeAssociatedData` values this server supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssociatedProvenance {
    /// `LatestProvenanceResources`: the most recent Provenance of each exported resource.
    Latest,
    /// `RelevantProvenanceResources`: every Provenance of the exported resources.
    Relevant,
}

/// One raw parameter value before validation.
#[derive(Debug, Clone)]
enum RawValue {
    Text(String),
    Boolean(bool),
    Reference(String),
    Other,
}

/// The request headers that matter to a kick-off.
#[derive(Debug, Clone, Default)]
pub struct KickoffHeaders {
    pub prefer: Vec<String>,
    pub accept: Option<String>,
}

impl KickoffHeaders {
    fn preferences(&self) -> impl Iterator<Item = String> + '_ {
        self.prefer
            .iter()
            .flat_map(|h| h.split([',', ';']))
            .map(|p| p.trim().to_ascii_lowercase().replace(' ', ""))
    }

    /// `Prefer: respond-async` is present.
    pub fn respond_async(&self) -> bool {
        self.preferences().any(|p| p == "respond-async")
    }

    /// `Prefer: handling=lenient` is present.
    pub fn lenient(&self) -> bool {
        self.preferences().any(|p| p == "handling=lenient")
    }

    /// `Prefer: separate-export-status` is present.
    pub fn separate_export_status(&self) -> bool {
        self.preferences().any(|p| p == "separate-export-status")
    }
}

/// Checks the kick-off headers: `Prefer: respond-async`, and an `Accept` that names
/// `application/fhir+json`, the only type the IG defines for a kick-off. Under
/// `Prefer: handling=lenient` a missing or different `Accept` is read as `application/fhir+json`.
pub fn check_kickoff_headers(headers: &KickoffHeaders) -> Result<(), ApiError> {
    if !headers.respond_async() {
        return Err(ApiError::invalid(
            "the Prefer header must include respond-async for $export",
        ));
    }
    let accept = headers.accept.as_deref().unwrap_or("").trim();
    if headers.lenient() || accept::names(accept, accept::FHIR_JSON) {
        return Ok(());
    }
    if accept.is_empty() {
        return Err(ApiError::invalid(
            "the Accept header must be application/fhir+json for $export",
        ));
    }
    Err(ApiError::invalid(format!(
        "Accept '{accept}' is not supported: a $export kick-off must send Accept: application/fhir+json \
         (or Prefer: handling=lenient to have any Accept read as application/fhir+json)"
    )))
}

/// Parses and validates the kick-off parameters.
///
/// `query` holds the decoded query pairs; `body` the POST body (a FHIR `Parameters` resource).
/// `now` decides whether `_since`/`_until` lie in the future.
pub fn parse_kickoff(
    level: &ExportLevel,
    method: KickoffMethod,
    query: &[(String, String)],
    body: Option<&[u8]>,
    headers: &KickoffHeaders,
    now: Instant,
) -> Result<ExportParams, ApiError> {
    let mut raw: Vec<(String, RawValue)> = query
        .iter()
        .map(|(k, v)| (k.clone(), RawValue::Text(v.clone())))
        .collect();
    if method == KickoffMethod::Post {
        raw.extend(parameters_body(body.unwrap_or_default())?);
    }

    let lenient = headers.lenient();
    let mut params = ExportParams {
        output_format: OUTPUT_FORMATS[0].to_string(),
        lenient,
        separate_status: headers.separate_export_status(),
        ..ExportParams::default()
    };
    let mut seen_single: Vec<&str> = Vec::new();
    let mut patients: Vec<String> = Vec::new();
    let mut types: Vec<String> = Vec::new();
    let mut saw_type = false;

    for (name, value) in &raw {
        let name = name.as_str();
        match name {
            "organizeOutputBy" => match text_value(name, value)? {
                "Patient" => params.organize_by = Some("Patient".to_string()),
                other if lenient => params.warnings.push(format!(
                    "organizeOutputBy '{other}' is not supported (only Patient); output is organized by type"
                )),
                other => {
                    return Err(ApiError::invalid(format!(
                        "organizeOutputBy '{other}' is not supported; only Patient is"
                    )));
                }
            },
            "allowPartialManifests" => {
                params.allow_partial_manifests = match value {
                    RawValue::Boolean(b) => *b,
                    _ => match text_value(name, value)? {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(ApiError::invalid(format!(
                                "allowPartialManifests must be true or false, not '{other}'"
                            )));
                        }
                    },
                }
            }
            "_outputFormat" | "_since" | "_until" => {
                if seen_single.contains(&name) {
                    return Err(ApiError::invalid(format!(
                        "parameter {name} may appear only once"
                    )));
                }
                seen_single.push(name);
                let text = text_value(name, value)?;
                match name {
                    "_outputFormat" => {
                        if !OUTPUT_FORMATS.contains(&text) {
                            return Err(ApiError::invalid(format!(
                                "_outputFormat '{text}' is not supported; use one of {}",
                                OUTPUT_FORMATS.join(", ")
                            )));
                        }
                        params.output_format = text.to_string();
                    }
                    "_since" => params.since = Some(instant_param(name, text, now)?),
                    _ => params.until = Some(instant_param(name, text, now)?),
                }
            }
            "_type" => {
                saw_type = true;
                for t in text_value(name, value)?.split(',').map(str::trim) {
                    if !is_resource_type(t) {
                        return Err(ApiError::invalid(format!(
                            "_type '{t}' is not an R4 resource type"
                        )));
                    }
                    if !types.iter().any(|x| x == t) {
                        types.push(t.to_string());
                    }
                }
            }
            "_typeFilter" => params
                .type_filters
                .push(text_value(name, value)?.to_string()),
            "_elements" => params.elements.push(text_value(name, value)?.to_string()),
            "includeAssociatedData" => {
                for v in text_value(name, value)?.split(',').map(str::trim) {
                    let wanted = match v {
                        "LatestProvenanceResources" => AssociatedProvenance::Latest,
                        "RelevantProvenanceResources" => AssociatedProvenance::Relevant,
                        other if lenient => {
                            params.warnings.push(format!(
                                "includeAssociatedData value '{other}' is not supported and was ignored"
                            ));
                            continue;
                        }
                        other => {
                            return Err(ApiError::invalid(format!(
                                "includeAssociatedData '{other}' is not supported; use LatestProvenanceResources or RelevantProvenanceResources"
                            )));
                        }
                    };
                    // Relevant includes Latest.
                    if params.associated != Some(AssociatedProvenance::Relevant) {
                        params.associated = Some(wanted);
                    }
                }
            }
            "patient" => {
                if method == KickoffMethod::Get {
                    return Err(ApiError::invalid(
                        "the patient parameter is supported only in a POST kick-off (a Parameters body)",
                    ));
                }
                if *level == ExportLevel::System {
                    return Err(ApiError::invalid(
                        "the patient parameter is not allowed at system level: use Patient/$export or Group/[id]/$export",
                    ));
                }
                let RawValue::Reference(r) = value else {
                    return Err(ApiError::invalid(
                        "patient must be given as valueReference, e.g. {\"reference\": \"Patient/123\"}",
                    ));
                };
                let Some(id) = reference::patient_id(r) else {
                    return Err(ApiError::invalid(format!(
                        "patient reference '{r}' is not a Patient reference"
                    )));
                };
                if !patients.iter().any(|p| p == id) {
                    patients.push(id.to_string());
                }
            }
            _ if lenient => params.ignored.push(name.to_string()),
            _ => {
                return Err(ApiError::invalid(format!(
                    "unknown parameter '{name}' for $export (send Prefer: handling=lenient to have it ignored)"
                )));
            }
        }
    }
    if let (Some(since), Some(until)) = (params.since, params.until)
        && since >= until
    {
        return Err(ApiError::invalid(format!(
            "_since ({}) must be before _until ({})",
            format_instant(since),
            format_instant(until)
        )));
    }
    params.ignored.dedup();
    let filters =
        TypeFilters::parse(&params.type_filters, lenient).map_err(|e| ApiError::invalid(e.0))?;
    params.warnings.extend(filters.warnings);
    ElementSelection::parse(&params.elements).map_err(ApiError::invalid)?;
    if saw_type {
        params.types = Some(types);
    }
    if !patients.is_empty() {
        params.patients = Some(patients);
    }
    Ok(params)
}

/// Reads a POST body: a FHIR `Parameters` resource.
fn parameters_body(body: &[u8]) -> Result<Vec<(String, RawValue)>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the POST body is not valid JSON: {e}")))?;
    if doc.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::invalid(
            "the POST body must be a FHIR Parameters resource",
        ));
    }
    let entries = match doc.get("parameter") {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(ApiError::invalid("Parameters.parameter must be an array")),
    };
    entries
        .iter()
        .map(|entry| {
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("every Parameters.parameter needs a name"))?;
            let value = entry
                .as_object()
                .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
                .map(|(_, v)| match v {
                    Value::String(s) => RawValue::Text(s.clone()),
                    Value::Bool(b) => RawValue::Boolean(*b),
                    Value::Object(o) => match o.get("reference").and_then(Value::as_str) {
                        Some(r) => RawValue::Reference(r.to_string()),
                        None => RawValue::Other,
                    },
                    _ => RawValue::Other,
                })
                .unwrap_or(RawValue::Other);
            Ok((name.to_string(), value))
        })
        .collect()
}

fn text_value<'a>(name: &str, value: &'a RawValue) -> Result<&'a str, ApiError> {
    match value {
        RawValue::Text(t) if !t.trim().is_empty() => Ok(t.trim()),
        RawValue::Text(_) => Err(ApiError::invalid(format!(
            "parameter {name} has an empty value"
        ))),
        _ => Err(ApiError::invalid(format!(
            "parameter {name} must have a string value"
        ))),
    }
}

fn instant_param(name: &str, text: &str, now: Instant) -> Result<Instant, ApiError> {
    let t = parse_instant(text).map_err(|e| ApiError::invalid(format!("{name}: {e}")))?;
    if t > now {
        return Err(ApiError::invalid(format!(
            "{name} ({text}) is in the future"
        )));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::time::now_millis;

    fn headers() -> KickoffHeaders {
        KickoffHeaders {
            prefer: vec!["respond-async".into()],
            accept: Some("application/fhir+json".into()),
        }
    }

    fn get(level: ExportLevel, q: &[(&str, &str)]) -> Result<ExportParams, ApiError> {
        let q: Vec<_> = q
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse_kickoff(
            &level,
            KickoffMethod::Get,
            &q,
            None,
            &headers(),
            now_millis(),
        )
    }

    fn post(level: ExportLevel, body: &str) -> Result<ExportParams, ApiError> {
        parse_kickoff(
            &level,
            KickoffMethod::Post,
            &[],
            Some(body.as_bytes()),
            &headers(),
            now_millis(),
        )
    }

    #[test]
    fn reads_query_parameters() {
        let p = get(
            ExportLevel::System,
            &[
                ("_type", "Patient,Observation"),
                ("_type", "Patient, Condition"),
                ("_since", "2020-01-01T00:00:00Z"),
                ("_outputFormat", "ndjson"),
            ],
        )
        .unwrap();
        assert_eq!(
            p.types.unwrap(),
            vec!["Patient", "Observation", "Condition"]
        );
        assert_eq!(p.output_format, "ndjson");
        assert!(p.since.is_some());
    }

    #[test]
    fn reads_parameters_body() {
        let body = r#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Observation"},
            {"name":"_since","valueInstant":"2020-01-01T00:00:00Z"},
            {"name":"patient","valueReference":{"reference":"Patient/a"}},
            {"name":"patient","valueReference":{"reference":"Patient/b"}}]}"#;
        let p = post(ExportLevel::Patient, body).unwrap();
        assert_eq!(p.patients.unwrap(), vec!["a", "b"]);
        assert_eq!(p.types.unwrap(), vec!["Observation"]);
    }

    #[test]
    fn rejects_bad_values() {
        let cases: &[&[(&str, &str)]] = &[
            &[("_outputFormat", "text/csv")],
            &[("_since", "yesterday")],
            &[("_since", "2999-01-01T00:00:00Z")],
            &[("_until", "2999-01-01T00:00:00Z")],
            &[
                ("_since", "2021-01-01T00:00:00Z"),
                ("_until", "2020-01-01T00:00:00Z"),
            ],
            &[("_type", "Foo")],
            &[("_type", "Patient,,Observation")],
            &[("_type", "")],
            &[
                ("_since", "2020-01-01T00:00:00Z"),
                ("_since", "2020-01-01T00:00:00Z"),
            ],
            &[("_typeFilter", "Observation?foo=1")],
            &[("_typeFilter", "Observation")],
            &[("_typeFilter", "")],
            &[("_elements", "Patient.name.given")],
            &[("includeAssociatedData", "LatestProvenanceResources,Other")],
            &[("includeAssociatedData", "_custom")],
            &[("foo", "bar")],
            &[("patient", "Patient/1")],
        ];
        for q in cases {
            let e = get(ExportLevel::Patient, q).unwrap_err();
            assert_eq!(e.status, 400, "{q:?}");
        }
        assert!(post(ExportLevel::System, r#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/a"}}]}"#).is_err());
        assert!(post(ExportLevel::Patient, "{not json").is_err());
        assert!(post(ExportLevel::Patient, r#"{"resourceType":"Patient"}"#).is_err());
    }

    #[test]
    fn lenient_ignores_unsupported() {
        let mut h = headers();
        h.prefer = vec!["respond-async, handling=lenient".into()];
        let q = vec![
            ("colour".to_string(), "x".to_string()),
            ("_typeFilter".to_string(), "Observation?foo=1".to_string()),
        ];
        let p = parse_kickoff(
            &ExportLevel::System,
            KickoffMethod::Get,
            &q,
            None,
            &h,
            now_millis(),
        )
        .unwrap();
        assert_eq!(p.ignored, vec!["colour"]);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn checks_headers() {
        assert!(check_kickoff_headers(&headers()).is_ok());
        let mut h = headers();
        h.prefer.clear();
        assert!(check_kickoff_headers(&h).is_err());
        let mut h = headers();
        h.accept = Some("application/xml".into());
        assert!(check_kickoff_headers(&h).is_err());
        h.accept = None;
        assert!(check_kickoff_headers(&h).is_err());
        for accept in [
            "*/*",
            "application/json",
            "application/*",
            "application/fhir+json;q=0",
        ] {
            h.accept = Some(accept.into());
            assert!(check_kickoff_headers(&h).is_err(), "{accept}");
        }
        h.accept = Some("application/json, application/fhir+json;q=0.9".into());
        assert!(check_kickoff_headers(&h).is_ok());
        h.prefer = vec!["respond-async".into(), "handling=lenient".into()];
        for accept in [None, Some("*/*"), Some("application/xml")] {
            h.accept = accept.map(String::from);
            assert!(check_kickoff_headers(&h).is_ok(), "{accept:?}");
        }
    }

    /// A kick-off with the given `Prefer` headers, at a fixed `now`.
    fn kickoff(
        method: KickoffMethod,
        prefer: &str,
        query: &[(&str, &str)],
        body: Option<&str>,
        now: Instant,
    ) -> Result<ExportParams, ApiError> {
        let q: Vec<_> = query
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let headers = KickoffHeaders {
            prefer: vec![prefer.to_string()],
            accept: Some("application/fhir+json".into()),
        };
        parse_kickoff(
            &ExportLevel::Patient,
            method,
            &q,
            body.map(str::as_bytes),
            &headers,
            now,
        )
    }

    fn lenient_get(q: &[(&str, &str)]) -> Result<ExportParams, ApiError> {
        kickoff(
            KickoffMethod::Get,
            "respond-async, handling=lenient",
            q,
            None,
            now_millis(),
        )
    }

    fn parameters(entries: &str) -> String {
        format!(r#"{{"resourceType":"Parameters","parameter":[{entries}]}}"#)
    }

    /// Without `_outputFormat` the output is `application/fhir+ndjson`, the IG's default; the
    /// handling and status preferences are recorded with the job.
    #[test]
    fn defaults_and_recorded_preferences() {
        let p = get(ExportLevel::System, &[]).unwrap();
        assert_eq!(p.output_format, "application/fhir+ndjson");
        assert!(!p.lenient && !p.separate_status && !p.allow_partial_manifests);
        assert_eq!(p.types, None);
        assert_eq!(p.patients, None);
        assert_eq!(p.organize_by, None);
        assert_eq!(p.associated, None);

        let p = kickoff(
            KickoffMethod::Get,
            "respond-async, handling=lenient",
            &[],
            None,
            now_millis(),
        )
        .unwrap();
        assert!(p.lenient && !p.separate_status);

        let p = kickoff(
            KickoffMethod::Get,
            "respond-async, separate-export-status",
            &[],
            None,
            now_millis(),
        )
        .unwrap();
        assert!(p.separate_status && !p.lenient);
    }

    /// `Prefer: separate-export-status` is one preference among others, in any header and case
    /// (RFC 7240 preference names are case-insensitive); a different preference is not it.
    #[test]
    fn separate_export_status_preference() {
        let h = |prefer: &[&str]| KickoffHeaders {
            prefer: prefer.iter().map(|p| p.to_string()).collect(),
            accept: None,
        };
        assert!(h(&["respond-async, separate-export-status"]).separate_export_status());
        assert!(h(&["respond-async", "Separate-Export-Status"]).separate_export_status());
        assert!(!h(&["respond-async"]).separate_export_status());
        assert!(!h(&["respond-async, handling=lenient"]).separate_export_status());
        assert!(!h(&[]).separate_export_status());
        assert!(!h(&["separate-export-status-please"]).separate_export_status());
    }

    /// Without `_type` every type is exported; with it, exactly the listed types.
    #[test]
    fn wants_type_follows_type_parameter() {
        let all = get(ExportLevel::System, &[]).unwrap();
        for t in ["Patient", "Observation", "Provenance"] {
            assert!(all.wants_type(t), "{t}");
        }
        let some = get(ExportLevel::System, &[("_type", "Patient,Observation")]).unwrap();
        assert!(some.wants_type("Patient"));
        assert!(some.wants_type("Observation"));
        assert!(!some.wants_type("Condition"));
        assert!(!some.wants_type("Provenance"));
    }

    /// The `_typeFilter` stored with the job compiles back to the filter the client asked for.
    #[test]
    fn compiled_type_filters_apply_the_queries() {
        let p = get(
            ExportLevel::System,
            &[("_typeFilter", "Observation?status=final")],
        )
        .unwrap();
        assert_eq!(p.type_filters, vec!["Observation?status=final"]);
        let f = p.compiled_type_filters();
        assert!(!f.is_empty());
        assert!(f.filters("Observation") && !f.filters("Condition"));
        let obs = |status: &str| serde_json::json!({"resourceType": "Observation", "status": status, "code": {}});
        assert!(f.matches("Observation", &obs("final")));
        assert!(!f.matches("Observation", &obs("preliminary")));
        // Without `_typeFilter` nothing is filtered.
        let none = get(ExportLevel::System, &[])
            .unwrap()
            .compiled_type_filters();
        assert!(none.is_empty());
        assert!(none.matches("Observation", &obs("preliminary")));
        // Under lenient handling the unusable criterion was dropped at kick-off; the rest applies.
        let p = lenient_get(&[("_typeFilter", "Observation?foo=1&status=final")]).unwrap();
        let f = p.compiled_type_filters();
        assert!(f.matches("Observation", &obs("final")));
        assert!(!f.matches("Observation", &obs("preliminary")));
    }

    /// `_elements` is accepted (both forms, repeated) and compiles back to the selection.
    #[test]
    fn elements_parameter_and_selection() {
        let p = get(
            ExportLevel::System,
            &[
                ("_elements", "Patient.gender"),
                ("_elements", "Observation.status"),
            ],
        )
        .unwrap();
        assert_eq!(p.elements, vec!["Patient.gender", "Observation.status"]);
        let s = p.element_selection();
        assert!(s.trims("Patient") && s.trims("Observation") && !s.trims("Condition"));
        let mut patient = serde_json::json!({"resourceType": "Patient", "id": "p",
            "gender": "female", "birthDate": "1980-05-02"});
        s.apply("Patient", &mut patient);
        assert_eq!(patient["gender"], "female");
        assert!(patient.get("birthDate").is_none());

        let none = get(ExportLevel::System, &[]).unwrap().element_selection();
        assert!(!none.trims("Patient"));
        let p = post(
            ExportLevel::Patient,
            &parameters(r#"{"name":"_elements","valueString":"id"}"#),
        )
        .unwrap();
        assert_eq!(p.elements, vec!["id"]);
        assert!(p.element_selection().trims("Condition"));
    }

    /// `organizeOutputBy`: `Patient` only; another value is a 400, or under lenient handling a
    /// warning with the output organized by type.
    #[test]
    fn organize_output_by() {
        let p = get(ExportLevel::Patient, &[("organizeOutputBy", "Patient")]).unwrap();
        assert_eq!(p.organize_by.as_deref(), Some("Patient"));
        let e = get(ExportLevel::Patient, &[("organizeOutputBy", "Encounter")]).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.diagnostics.contains("Encounter"), "{}", e.diagnostics);
        let p = lenient_get(&[("organizeOutputBy", "Encounter")]).unwrap();
        assert_eq!(p.organize_by, None);
        assert_eq!(p.warnings.len(), 1);
        assert!(
            p.warnings[0].contains("organizeOutputBy"),
            "{:?}",
            p.warnings
        );
        assert!(p.ignored.is_empty());
    }

    /// `allowPartialManifests`: `true`/`false` in a query, `valueBoolean` in a Parameters body.
    #[test]
    fn allow_partial_manifests() {
        let q = |v: &str| get(ExportLevel::System, &[("allowPartialManifests", v)]);
        assert!(q("true").unwrap().allow_partial_manifests);
        assert!(!q("false").unwrap().allow_partial_manifests);
        assert_eq!(q("yes").unwrap_err().status, 400);
        let body = |value: &str| {
            post(
                ExportLevel::Patient,
                &parameters(&format!(r#"{{"name":"allowPartialManifests",{value}}}"#)),
            )
        };
        assert!(
            body(r#""valueBoolean":true"#)
                .unwrap()
                .allow_partial_manifests
        );
        assert!(
            !body(r#""valueBoolean":false"#)
                .unwrap()
                .allow_partial_manifests
        );
        assert!(
            body(r#""valueString":"true""#)
                .unwrap()
                .allow_partial_manifests
        );
        assert_eq!(body(r#""valueInteger":1"#).unwrap_err().status, 400);
        // A lenient kick-off still refuses a value that is neither true nor false.
        assert_eq!(
            lenient_get(&[("allowPartialManifests", "maybe")])
                .unwrap_err()
                .status,
            400
        );
    }

    /// `includeAssociatedData`: each supported value alone; Relevant includes Latest whatever
    /// the order; unknown values are warnings under lenient handling.
    #[test]
    fn include_associated_data() {
        let q = |v: &str| get(ExportLevel::Patient, &[("includeAssociatedData", v)]);
        assert_eq!(
            q("LatestProvenanceResources").unwrap().associated,
            Some(AssociatedProvenance::Latest)
        );
        assert_eq!(
            q("RelevantProvenanceResources").unwrap().associated,
            Some(AssociatedProvenance::Relevant)
        );
        for both in [
            "LatestProvenanceResources,RelevantProvenanceResources",
            "RelevantProvenanceResources,LatestProvenanceResources",
            "RelevantProvenanceResources, LatestProvenanceResources",
        ] {
            assert_eq!(
                q(both).unwrap().associated,
                Some(AssociatedProvenance::Relevant),
                "{both}"
            );
        }
        let p = get(
            ExportLevel::Patient,
            &[
                ("includeAssociatedData", "RelevantProvenanceResources"),
                ("includeAssociatedData", "LatestProvenanceResources"),
            ],
        )
        .unwrap();
        assert_eq!(p.associated, Some(AssociatedProvenance::Relevant));

        let p =
            lenient_get(&[("includeAssociatedData", "LatestProvenanceResources,_custom")]).unwrap();
        assert_eq!(p.associated, Some(AssociatedProvenance::Latest));
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("_custom"), "{:?}", p.warnings);
        let p = lenient_get(&[("includeAssociatedData", "_custom")]).unwrap();
        assert_eq!(p.associated, None);
        assert_eq!(p.warnings.len(), 1);
        assert!(p.ignored.is_empty());
    }

    /// Values are trimmed; an empty or blank value is a 400 that says so, and a value of another
    /// type than string (`valueInteger`) is a 400 that says that.
    #[test]
    fn empty_blank_and_non_string_values() {
        let p = get(ExportLevel::System, &[("_outputFormat", "  ndjson ")]).unwrap();
        assert_eq!(p.output_format, "ndjson");
        for name in [
            "_outputFormat",
            "_since",
            "_type",
            "_typeFilter",
            "_elements",
            "includeAssociatedData",
            "organizeOutputBy",
            "allowPartialManifests",
        ] {
            for value in ["", "   "] {
                let e = get(ExportLevel::Patient, &[(name, value)]).unwrap_err();
                assert_eq!(e.status, 400, "{name}={value:?}");
                assert!(
                    e.diagnostics.contains("empty value") && e.diagnostics.contains(name),
                    "{name}={value:?}: {}",
                    e.diagnostics
                );
            }
        }
        let e = post(
            ExportLevel::Patient,
            &parameters(r#"{"name":"_outputFormat","valueInteger":1}"#),
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.diagnostics.contains("string value"), "{}", e.diagnostics);
    }

    /// `_since`/`_until` may be `now` itself (not in the future) but not a millisecond later.
    #[test]
    fn since_and_until_up_to_now() {
        let now = parse_instant("2024-01-31T12:00:00Z").unwrap();
        let get_at =
            |q: &[(&str, &str)]| kickoff(KickoffMethod::Get, "respond-async", q, None, now);
        let p = get_at(&[("_since", "2024-01-31T12:00:00Z")]).unwrap();
        assert_eq!(p.since, Some(now));
        let p = get_at(&[("_until", "2024-01-31T13:00:00+01:00")]).unwrap();
        assert_eq!(p.until, Some(now));
        for name in ["_since", "_until"] {
            let e = get_at(&[(name, "2024-01-31T12:00:00.001Z")]).unwrap_err();
            assert_eq!(e.status, 400, "{name}");
            assert!(e.diagnostics.contains("future"), "{}", e.diagnostics);
        }
        // `_since` must be strictly before `_until`.
        let e = get_at(&[
            ("_since", "2024-01-01T00:00:00Z"),
            ("_until", "2024-01-01T00:00:00Z"),
        ])
        .unwrap_err();
        assert_eq!(e.status, 400);
        let p = get_at(&[
            ("_since", "2024-01-01T00:00:00Z"),
            ("_until", "2024-01-01T00:00:00.001Z"),
        ])
        .unwrap();
        assert!(p.since < p.until);
    }
}
