use super::values::date_range;
use super::*;
use serde_json::json;

fn filter(q: &str) -> TypeFilters {
    TypeFilters::parse(&[q.to_string()], false).unwrap_or_else(|e| panic!("{q}: {e:?}"))
}

fn passes(q: &str, resource: &Value) -> bool {
    let t = resource["resourceType"].as_str().unwrap();
    filter(q).matches(t, resource)
}

fn observation() -> Value {
    json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "meta": {"lastUpdated": "2021-03-04T05:06:07.890Z", "tag": [{"system": "urn:t", "code": "x"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2020-06-15T10:30:00+02:00",
        "valueQuantity": {"value": 72.5, "unit": "beats/min", "system": "http://unitsofmeasure.org", "code": "/min"}})
}

#[test]
fn tokens() {
    let o = observation();
    assert!(passes("Observation?code=8867-4", &o));
    assert!(passes("Observation?code=http://loinc.org|8867-4", &o));
    assert!(!passes(
        "Observation?code=http://snomed.info/sct|8867-4",
        &o
    ));
    assert!(passes("Observation?code=http://loinc.org|", &o));
    assert!(!passes("Observation?code=|8867-4", &o));
    assert!(passes("Observation?code=1234,8867-4", &o));
    assert!(passes("Observation?status=final", &o));
    assert!(!passes("Observation?status=final&code=1", &o));
    assert!(passes("Observation?status:not=preliminary", &o));
    assert!(!passes("Observation?status:not=final", &o));
    assert!(passes("Observation?category=vital-signs", &o));
    assert!(passes("Observation?_id=o1", &o));
    assert!(passes("Observation?_tag=urn:t|x", &o));
    assert!(passes(
        "Observation?code=http%3A%2F%2Floinc.org%7C8867-4",
        &o
    ));
}

#[test]
fn missing() {
    let o = observation();
    assert!(passes("Observation?specimen:missing=true", &o));
    assert!(!passes("Observation?subject:missing=true", &o));
    assert!(passes("Observation?subject:missing=false", &o));
}

#[test]
fn references() {
    let o = observation();
    assert!(passes("Observation?subject=Patient/p1", &o));
    assert!(passes("Observation?subject=p1", &o));
    assert!(passes("Observation?patient=Patient/p1", &o));
    assert!(passes("Observation?subject:Patient=p1", &o));
    assert!(!passes("Observation?subject:Group=p1", &o));
    assert!(!passes("Observation?subject=Patient/p2", &o));
    assert!(passes(
        "Observation?subject=http://example.org/fhir/Patient/p1",
        &o
    ));
}

#[test]
fn dates() {
    let o = observation(); // 2020-06-15T08:30:00Z
    for (q, expected) in [
        ("date=2020", true),
        ("date=2020-06", true),
        ("date=2020-06-15", true),
        ("date=2020-06-16", false),
        ("date=ne2020-06-16", true),
        ("date=gt2020-06-14", true),
        ("date=gt2020-06-15", false),
        ("date=ge2020-06-15", true),
        ("date=lt2020-06-16", true),
        ("date=lt2020-06-15T08:30:00Z", false),
        ("date=le2020-06-15T08:30:00Z", true),
        ("date=2020-06-15T10:30:00%2B02:00", true),
        ("date=2020-06-15T10:30:00+02:00", true),
        ("date=sa2019", true),
        ("date=eb2019", false),
        ("date=eb2021", true),
        ("date=ap2020-06-14", true),
        ("_lastUpdated=gt2021-03-04T05:06:06Z", true),
        ("_lastUpdated=gt2021-03-04T05:06:07Z", false), // same second: not above it
        ("_lastUpdated=lt2021-03-04T05:06:07Z", false),
    ] {
        assert_eq!(passes(&format!("Observation?{q}"), &o), expected, "{q}");
    }
    // A Period is a range: eq needs it inside the search range.
    let e = json!({"resourceType": "Encounter", "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-03T10:00:00Z"}});
    assert!(passes("Encounter?date=2020-01", &e));
    assert!(!passes("Encounter?date=2020-01-02", &e));
    assert!(passes("Encounter?date=gt2020-01-02", &e));
    assert!(passes("Encounter?date=lt2020-01-02", &e));
    let open = json!({"resourceType": "Encounter", "period": {"start": "2020-01-01"}});
    assert!(passes("Encounter?date=gt2030", &open));
}

#[test]
fn date_ranges_follow_precision() {
    let (low, high) = date_range("2020").unwrap();
    assert_eq!(high - low, 366 * 86_400_000);
    let (low, high) = date_range("2020-02").unwrap();
    assert_eq!(high - low, 29 * 86_400_000);
    let (low, high) = date_range("2020-02-01T00:00:00.5Z").unwrap();
    assert_eq!(high - low, 100);
    assert_eq!(low, date_range("2020-02-01T01:00:00.5+01:00").unwrap().0);
    assert!(date_range("2020-13").is_none());
    assert!(date_range("20200101").is_none());
}

#[test]
fn strings() {
    let p = json!({"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Anna", "Lena"]}],
        "address": [{"city": "Bern", "line": ["Hauptstrasse 1"]}], "gender": "female", "birthDate": "1980-05-02",
        "deceasedDateTime": "2020-01-01"});
    assert!(passes("Patient?name=mul", &p));
    assert!(passes("Patient?name=LENA", &p));
    assert!(!passes("Patient?name=ena", &p));
    assert!(passes("Patient?name:contains=ena", &p));
    assert!(passes("Patient?family:exact=Müller", &p));
    assert!(!passes("Patient?family:exact=muller", &p));
    assert!(passes("Patient?address-city=be", &p));
    assert!(passes("Patient?address=haupt", &p));
    assert!(passes("Patient?gender=female&birthdate=1980", &p));
    assert!(passes("Patient?deceased=true", &p));
    assert!(!passes("Patient?deceased=false", &p));
}

#[test]
fn numbers_and_quantities() {
    let o = observation();
    for (q, expected) in [
        ("value-quantity=72.5", true),
        ("value-quantity=72", false),
        ("value-quantity=73", true), // 73 means [72.5, 73.5)
        ("value-quantity=gt70", true),
        ("value-quantity=lt70", false),
        ("value-quantity=ge72.5|http://unitsofmeasure.org|/min", true),
        ("value-quantity=72.5|http://other|/min", false),
        ("value-quantity=72.5||beats/min", true),
        ("value-quantity=ap70", true),
        ("value-quantity=ap60", false),
        ("value-quantity=ne72.5", false),
    ] {
        assert_eq!(passes(&format!("Observation?{q}"), &o), expected, "{q}");
    }
    let r = json!({"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.25}]});
    assert!(passes("RiskAssessment?probability=gt0.2", &r));
    assert!(passes("RiskAssessment?probability=0.25", &r));
    assert!(!passes("RiskAssessment?probability=lt0.2", &r));
}

#[test]
fn uris() {
    let v = json!({"resourceType": "ValueSet", "url": "http://example.org/vs/a"});
    assert!(passes("ValueSet?url=http://example.org/vs/a", &v));
    assert!(!passes("ValueSet?url=http://example.org/vs", &v));
    assert!(passes("ValueSet?url:below=http://example.org/vs", &v));
}

#[test]
fn queries_or_and_unfiltered_types() {
    let f = TypeFilters::parse(
        &[
            "Observation?status=preliminary".into(),
            "Observation?code=8867-4".into(),
        ],
        false,
    )
    .unwrap();
    assert!(f.matches("Observation", &observation()));
    assert!(f.matches("Condition", &json!({})));
    assert!(f.filters("Observation") && !f.filters("Condition"));
    // The legacy comma-separated form keeps commas inside values.
    let f = filter("Observation?code=1,8867-4,Condition?code=x");
    assert_eq!(
        f.types().collect::<Vec<_>>(),
        vec!["Condition", "Observation"]
    );
    assert!(f.matches("Observation", &observation()));
}

#[test]
fn rejects_what_it_cannot_evaluate() {
    for q in [
        "Observation?foo=1",
        "Observation?subject.name=x",
        "Observation?_include=Observation:subject",
        "Observation?_sort=date",
        "Observation?code:text=x",
        "Observation?code=",
        "Observation?date=yesterday",
        "Observation?value-quantity=abc",
        "Observation?subject:missing=maybe",
        "Foo?x=1",
        "code=1",
        "Observation?component-code-value-quantity=x$1",
    ] {
        assert!(TypeFilters::parse(&[q.to_string()], false).is_err(), "{q}");
    }
    let lenient =
        TypeFilters::parse(&["Observation?foo=1&status=final".to_string()], true).unwrap();
    assert_eq!(lenient.warnings.len(), 1);
    assert!(lenient.matches("Observation", &observation()));
    assert!(TypeFilters::parse(&["Foo?x=1".to_string()], true).is_err());
}

#[test]
fn lists_search_params() {
    let params = search_params_of("Observation");
    assert!(
        params
            .iter()
            .any(|(c, k)| *c == "code" && *k == ParamKind::Token)
    );
    assert!(params.iter().any(|(c, _)| *c == "_lastUpdated"));
    assert!(
        !params
            .iter()
            .any(|(c, _)| *c == "component-code-value-quantity")
    );
}

/// A value can reach `_typeFilter` raw (`a=b`, `a\,b`: the URL's own encoding is all there is) or
/// with its inner query's names and values percent-encoded once more (smart-fetch, Epic, HAPI),
/// where `%2C` separates alternatives and `%26`/`%3D` stay inside a value. Both must select the
/// same Patients; a raw `&` inside a value cannot be told from a separator and must be an error,
/// never an empty type.
#[test]
fn inner_query_encodings() {
    let values = [
        "a&b",
        "a=b",
        "a,b",
        "a|b",
        "a$b",
        "a b",
        "Zoë Ørsted",
        "plain",
    ];
    let patient = |v: &str| {
        json!({"resourceType": "Patient", "id": "p",
            "identifier": [{"system": "urn:t", "value": v}]})
    };
    // (raw form or None when it cannot be written raw, encoded form, values expected to match)
    let cases: &[(Option<&str>, &str, &[&str])] = &[
        (None, "identifier=urn%3At%7Ca%26b", &["a&b"]),
        (
            Some("identifier=urn:t|a=b"),
            "identifier=urn%3At%7Ca%3Db",
            &["a=b"],
        ),
        (
            Some(r"identifier=urn:t|a\,b"),
            "identifier=urn%3At%7Ca%5C%2Cb",
            &["a,b"],
        ),
        (
            Some("identifier=urn:t|plain,urn:t|a$b"),
            "identifier=urn%3At%7Cplain%2Curn%3At%7Ca%24b",
            &["plain", "a$b"],
        ),
        (
            Some("identifier=urn:t|a|b"),
            "identifier=urn%3At%7Ca%7Cb",
            &["a|b"],
        ),
        (
            Some("identifier=urn:t|a b"),
            "identifier=urn%3At%7Ca%20b",
            &["a b"],
        ),
        (
            Some("identifier=urn:t|Zoë Ørsted"),
            "identifier=urn%3At%7CZo%C3%AB%20%C3%98rsted",
            &["Zoë Ørsted"],
        ),
        (
            Some("identifier:missing=false"),
            "identifier%3Amissing=false",
            &values,
        ),
    ];
    for (raw, encoded, expected) in cases {
        let mut forms = vec![format!("Patient?{encoded}")];
        forms.extend(raw.map(|r| format!("Patient?{r}")));
        for query in forms {
            let filters = TypeFilters::parse(std::slice::from_ref(&query), false);
            // A query whose `?` is encoded too (the whole query encoded once more) reads the same.
            let whole =
                percent_encoding::utf8_percent_encode(&query, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            let filters_whole = TypeFilters::parse(&[whole], false);
            for filters in [filters, filters_whole] {
                let filters = filters.unwrap_or_else(|e| panic!("{query}: {e:?}"));
                for v in values {
                    assert_eq!(
                        filters.matches("Patient", &patient(v)),
                        expected.contains(&v),
                        "{query} on identifier {v:?}"
                    );
                }
            }
        }
    }
    // `Patient?identifier=urn:t|a&b`: `b` is not name=value, so the query is refused.
    assert!(TypeFilters::parse(&["Patient?identifier=urn:t|a&b".into()], false).is_err());
}

/// smart-fetch's default Observation filter, after the URL's decoding.
#[test]
fn alternatives_encoded_as_percent_2c() {
    let f = filter("Observation?category=social-history%2Cvital-signs%2Claboratory");
    for (category, wanted) in [
        ("vital-signs", true),
        ("laboratory", true),
        ("social-history", true),
        ("imaging", false),
    ] {
        let mut o = observation();
        o["category"][0]["coding"][0]["code"] = json!(category);
        assert_eq!(f.matches("Observation", &o), wanted, "{category}");
    }
}

/// `:above` on a uri matches a search value the resource's uri is a prefix of.
#[test]
fn uri_above() {
    let v = json!({"resourceType": "ValueSet", "url": "http://example.org/vs"});
    assert!(passes("ValueSet?url:above=http://example.org/vs/a/b", &v));
    assert!(passes("ValueSet?url:above=http://example.org/vs", &v));
    assert!(!passes("ValueSet?url:above=http://example.org/other", &v));
    assert!(!passes("ValueSet?url:below=http://example.org/vs/a", &v));
}

/// A Timing's events and its bounds are date ranges like a Period.
#[test]
fn timing_ranges() {
    let m = json!({"resourceType": "MedicationRequest", "status": "active",
        "dosageInstruction": [{"timing": {"event": ["2021-03-01T08:00:00Z", "2021-03-05T08:00:00Z"]}}]});
    assert!(passes("MedicationRequest?date=2021-03-01", &m));
    assert!(passes("MedicationRequest?date=2021-03-05", &m));
    assert!(!passes("MedicationRequest?date=2021-03-03", &m));
    assert!(!passes("MedicationRequest?date=2021-04", &m));
    // A date parameter whose element is a whole Timing (`ServiceRequest.occurrence[x]`).
    let timed = json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "occurrenceTiming": {"event": ["2021-01-10", "2021-01-20T12:00:00Z"]}});
    assert!(passes("ServiceRequest?occurrence=2021-01-10", &timed));
    assert!(passes("ServiceRequest?occurrence=gt2021-01-15", &timed));
    assert!(!passes("ServiceRequest?occurrence=2021-01-15", &timed));
    assert!(!passes("ServiceRequest?occurrence=gt2021-02", &timed));
}

/// A time without a zone is read as UTC, in the search value and in the resource.
#[test]
fn zone_less_times_are_utc() {
    let o = observation(); // effective 2020-06-15T08:30:00Z
    assert!(passes("Observation?date=2020-06-15T08:30:00", &o));
    assert!(!passes("Observation?date=2020-06-15T10:30:00", &o));
    assert!(passes("Observation?date=gt2020-06-15T08:29:59", &o));
    let local = json!({"resourceType": "Observation", "status": "final", "code": {},
        "effectiveDateTime": "2020-06-15T23:30:00"});
    assert!(passes("Observation?date=2020-06-15", &local));
    assert!(!passes("Observation?date=2020-06-16", &local));
}

#[test]
fn profile_security_and_source() {
    let o = json!({"resourceType": "Observation", "status": "final", "code": {},
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-vital-signs"],
                 "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                 "source": "http://example.org/ehr#abc"}});
    assert!(passes(
        "Observation?_profile=http://hl7.org/fhir/us/core/StructureDefinition/us-core-vital-signs",
        &o
    ));
    assert!(!passes(
        "Observation?_profile=http://hl7.org/fhir/StructureDefinition/vitalsigns",
        &o
    ));
    assert!(passes(
        "Observation?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R",
        &o
    ));
    assert!(!passes("Observation?_security=N", &o));
    assert!(passes("Observation?_source=http://example.org/ehr#abc", &o));
    assert!(!passes("Observation?_source=http://example.org/other", &o));
}

/// What the README says is rejected: `_has`, `_count`, `:in`, token `:below`.
#[test]
fn rejects_has_count_in_and_token_below() {
    for q in [
        "Observation?_has:Observation:patient:code=1234",
        "Observation?_count=10",
        "Observation?code:in=http://example.org/vs",
        "Observation?code:below=http://snomed.info/sct|123",
        "Observation?_summary=true",
        "Observation?_elements=status",
        "Observation?code:of-type=x",
    ] {
        let e = TypeFilters::parse(&[q.to_string()], false).unwrap_err();
        assert!(
            e.0.contains(
                q.split('?')
                    .nth(1)
                    .unwrap()
                    .split(['=', ':'])
                    .next()
                    .unwrap()
            ) || e.0.contains("modifier"),
            "{q}: {e:?}"
        );
        // Under lenient handling the criterion is dropped and reported.
        let lenient = TypeFilters::parse(&[q.to_string()], true).unwrap();
        assert_eq!(lenient.warnings.len(), 1, "{q}");
        assert!(lenient.matches("Observation", &observation()), "{q}");
    }
}
