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

/// Epoch milliseconds of a UTC date-time written `YYYY-MM-DDThh:mm:ss[.fff]`, computed with chrono
/// (not with the code under test).
fn utc_ms(text: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .and_utc()
        .timestamp_millis()
}

fn patient_born(birth_date: &str) -> Value {
    json!({"resourceType": "Patient", "id": "p", "birthDate": birth_date})
}

#[test]
fn is_empty_only_without_queries() {
    assert!(TypeFilters::default().is_empty());
    assert!(TypeFilters::parse(&[], false).unwrap().is_empty());
    assert!(!filter("Observation?status=final").is_empty());
    assert!(!filter("Patient?gender=female,Observation?status=final").is_empty());
}

/// The parameters listed for a type are its own plus those of every resource (`_id`,
/// `_lastUpdated`, ...), never another type's; sorted and without repeats.
#[test]
fn search_params_of_one_type_only() {
    let observation = search_params_of("Observation");
    let codes: Vec<&str> = observation.iter().map(|(c, _)| *c).collect();
    for own in ["code", "status", "subject", "value-quantity", "date"] {
        assert!(codes.contains(&own), "{own}");
    }
    for common in [
        "_id",
        "_lastUpdated",
        "_tag",
        "_profile",
        "_security",
        "_source",
    ] {
        assert!(codes.contains(&common), "{common}");
    }
    for foreign in ["birthdate", "gender", "family", "totalnet", "probability"] {
        assert!(!codes.contains(&foreign), "{foreign}");
    }
    let mut sorted = codes.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(codes, sorted);
    assert!(observation.contains(&("value-quantity", ParamKind::Quantity)));
    assert!(observation.contains(&("date", ParamKind::Date)));
    assert!(observation.contains(&("_lastUpdated", ParamKind::Date)));

    let patient: Vec<&str> = search_params_of("Patient")
        .iter()
        .map(|(c, _)| *c)
        .collect();
    assert!(patient.contains(&"birthdate") && patient.contains(&"_id"));
    assert!(!patient.contains(&"value-quantity") && !patient.contains(&"code"));
}

/// A reference's `:Type` modifier must name a resource type; anything else is an unsupported
/// modifier (400, or dropped under lenient handling).
#[test]
fn reference_type_modifier_must_be_a_type() {
    for q in [
        "Observation?subject:Foo=p1",
        "Observation?subject:patient=p1",
        "Observation?subject:=p1",
    ] {
        let e = TypeFilters::parse(&[q.to_string()], false).unwrap_err();
        assert!(e.0.contains("modifier"), "{q}: {e:?}");
        let lenient = TypeFilters::parse(&[q.to_string()], true).unwrap();
        assert_eq!(lenient.warnings.len(), 1, "{q}");
    }
    let o = observation();
    assert!(passes("Observation?subject:Patient=p1", &o));
    assert!(!passes("Observation?subject:Patient=p2", &o));
}

/// An id alone matches the reference's id, not any reference that has a type.
#[test]
fn reference_by_id_compares_the_id() {
    let o = observation(); // subject Patient/p1
    assert!(passes("Observation?subject=p1", &o));
    assert!(!passes("Observation?subject=p2", &o));
    assert!(!passes("Observation?subject=Patient", &o));
    let versioned = json!({"resourceType": "Observation", "status": "final", "code": {},
        "subject": {"reference": "Patient/p1/_history/2"}});
    assert!(passes("Observation?subject=p1", &versioned));
    assert!(passes("Observation?subject=Patient/p1", &versioned));
    assert!(!passes("Observation?subject=p2", &versioned));
}

/// A backslash escapes only what R4 escapes (`,` `$` `|` `\`): before anything else it is part
/// of the value.
#[test]
fn backslash_before_other_characters_is_kept() {
    let patient = |v: &str| json!({"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": v}]});
    let f = filter(r"Patient?identifier=urn:t|a\b");
    assert!(f.matches("Patient", &patient(r"a\b")));
    assert!(!f.matches("Patient", &patient("a,")));
    assert!(!f.matches("Patient", &patient("a")));
    let f = filter(r"Patient?identifier=urn:t|a\,b,urn:t|c");
    assert!(f.matches("Patient", &patient("a,b")));
    assert!(f.matches("Patient", &patient("c")));
    assert!(!f.matches("Patient", &patient("a")));
    assert!(!f.matches("Patient", &patient("b")));
}

/// A number's implicit range is half a unit of its last digit either side, `[n - ½, n + ½)`:
/// `72.5` means [72.45, 72.55), `72.50` [72.495, 72.505).
#[test]
fn number_precision() {
    let o = observation(); // valueQuantity 72.5
    for (q, expected) in [
        ("72.5", true),
        ("72.50", true),
        ("72.500", true),
        ("72.4", false),
        ("72.6", false),
        ("72.51", false),
        ("72.49", false),
        ("ne72.4", true),
        ("ne72.50", false),
        ("72", false), // [71.5, 72.5)
        ("73", true),  // [72.5, 73.5)
        ("74", false),
        ("7.25e1", true),
        ("7.26e1", false),
    ] {
        assert_eq!(
            passes(&format!("Observation?value-quantity={q}"), &o),
            expected,
            "{q}"
        );
    }
    let r = |p: f64| {
        json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/p"},
            "prediction": [{"probabilityDecimal": p}]})
    };
    assert!(passes("RiskAssessment?probability=0.3", &r(0.26)));
    assert!(passes("RiskAssessment?probability=0.3", &r(0.34)));
    assert!(!passes("RiskAssessment?probability=0.3", &r(0.2)));
    assert!(!passes("RiskAssessment?probability=0.30", &r(0.26)));
    assert!(passes("RiskAssessment?probability=1", &r(0.6)));
}

/// `gt`/`lt` are strict, `ge`/`le` include the value, `sa`/`eb` are `gt`/`lt` for numbers.
#[test]
fn number_prefixes() {
    let o = observation(); // valueQuantity 72.5
    for (q, expected) in [
        ("gt72.5", false),
        ("gt72.4", true),
        ("lt72.5", false),
        ("lt72.6", true),
        ("lt80", true),
        ("ge72.5", true),
        ("ge72.6", false),
        ("le72.5", true),
        ("le80", true),
        ("le72.4", false),
        ("sa72.4", true),
        ("sa72.5", false),
        ("eb72.6", true),
        ("eb72.5", false),
        ("ap66", true), // 10% of 66 is 6.6
        ("ap65", false),
        ("ap80", true),
        ("ap81", false),
    ] {
        assert_eq!(
            passes(&format!("Observation?value-quantity={q}"), &o),
            expected,
            "{q}"
        );
    }
}

/// `number|system|code` needs that code in that system; the unit is compared only for
/// `number||code`; Money's currency is its code.
#[test]
fn quantity_units() {
    let o = observation(); // 72.5, unit beats/min, system UCUM, code /min
    for (q, expected) in [
        ("72.5|http://unitsofmeasure.org|/min", true),
        ("72.5|http://unitsofmeasure.org|mm[Hg]", false),
        ("72.5|http://unitsofmeasure.org|beats/min", false),
        ("72.5||/min", true),
        ("72.5||beats/min", true),
        ("72.5||mm[Hg]", false),
        ("72.5|http://unitsofmeasure.org|", true),
        ("72.5|http://other|", false),
    ] {
        assert_eq!(
            passes(&format!("Observation?value-quantity={q}"), &o),
            expected,
            "{q}"
        );
    }
    let invoice = json!({"resourceType": "Invoice", "status": "issued",
        "totalNet": {"value": 100, "currency": "USD"}});
    assert!(passes("Invoice?totalnet=100||USD", &invoice));
    assert!(!passes("Invoice?totalnet=100||EUR", &invoice));
    assert!(!passes("Invoice?totalnet=200||USD", &invoice));
}

/// The implicit range of each precision a FHIR date, dateTime or instant can have.
#[test]
fn date_range_of_each_precision() {
    let range = |text: &str| date_range(text).unwrap_or_else(|| panic!("{text}"));
    let cases: &[(&str, &str, &str)] = &[
        ("2020", "2020-01-01T00:00:00", "2021-01-01T00:00:00"),
        ("2021", "2021-01-01T00:00:00", "2022-01-01T00:00:00"),
        ("2020-12", "2020-12-01T00:00:00", "2021-01-01T00:00:00"),
        ("2021-02", "2021-02-01T00:00:00", "2021-03-01T00:00:00"),
        ("2020-06-15", "2020-06-15T00:00:00", "2020-06-16T00:00:00"),
        ("2020-12-31", "2020-12-31T00:00:00", "2021-01-01T00:00:00"),
        (
            "2020-06-15T10:30Z",
            "2020-06-15T10:30:00",
            "2020-06-15T10:31:00",
        ),
        (
            "2020-06-15T10:30+01:00",
            "2020-06-15T09:30:00",
            "2020-06-15T09:31:00",
        ),
        (
            "2020-06-15T10:30:15Z",
            "2020-06-15T10:30:15",
            "2020-06-15T10:30:16",
        ),
        (
            "2020-06-15T10:30:15",
            "2020-06-15T10:30:15",
            "2020-06-15T10:30:16",
        ),
        (
            "2020-06-15T10:30:00-02:00",
            "2020-06-15T12:30:00",
            "2020-06-15T12:30:01",
        ),
        (
            "2020-06-15T10:30:00+05:30",
            "2020-06-15T05:00:00",
            "2020-06-15T05:00:01",
        ),
        (
            "2020-06-15T10:30:00-09:30",
            "2020-06-15T20:00:00",
            "2020-06-15T20:00:01",
        ),
        (
            "2020-06-15T00:30:00+01:00",
            "2020-06-14T23:30:00",
            "2020-06-14T23:30:01",
        ),
        (
            "2020-06-15T10:30:00.5Z",
            "2020-06-15T10:30:00.5",
            "2020-06-15T10:30:00.6",
        ),
        (
            "2020-06-15T10:30:00.25Z",
            "2020-06-15T10:30:00.25",
            "2020-06-15T10:30:00.26",
        ),
        (
            "2020-06-15T10:30:00.123Z",
            "2020-06-15T10:30:00.123",
            "2020-06-15T10:30:00.124",
        ),
        // Below a millisecond: the millisecond that holds it.
        (
            "2020-06-15T10:30:00.1234Z",
            "2020-06-15T10:30:00.123",
            "2020-06-15T10:30:00.124",
        ),
        (
            "2020-06-15T10:30:00.120+02:00",
            "2020-06-15T08:30:00.120",
            "2020-06-15T08:30:00.121",
        ),
    ];
    for (text, low, high) in cases {
        assert_eq!(range(text), (utc_ms(low), utc_ms(high)), "{text}");
    }
    for bad in [
        "202",
        "2020-6",
        "2020-00",
        "2020-06-31",
        "2020-06-15T10Z",
        "2020-06-15T10:3Z",
        "2020-06-15T10:30:0Z",
        "2020-06-15T10:30:00.Z",
        "2020-06-15T25:00:00Z",
        "2020-06-15 10:30:00Z",
        "2020-06-15T10:30:00+0200",
    ] {
        assert_eq!(date_range(bad), None, "{bad}");
    }
}

/// The R4 prefixes at the edges of the ranges: `gt`/`lt` need the range above/below the search
/// value to overlap the target, `ge`/`le` that or `eq` (the search range contains the target),
/// `sa`/`eb` the target to start after/end before the search range.
#[test]
fn date_prefixes_at_range_edges() {
    let day = patient_born("1980-05-02");
    let year = patient_born("1980");
    for (q, target, expected) in [
        ("eq1980-05-02", &day, true),
        ("1980-05", &day, true),
        ("1980-05-03", &day, false),
        ("ne1980-05-02", &day, false),
        ("ne1980-05-03", &day, true),
        ("gt1980-05-01", &day, true),
        ("gt1980-05-02", &day, false),
        ("gt1980-05", &day, false),
        ("lt1980-05-03", &day, true),
        ("lt1980-05-02", &day, false),
        ("lt1980-05", &day, false),
        ("ge1980-05-02", &day, true),
        ("ge1980-05-01", &day, true),
        ("ge1980-05-03", &day, false),
        ("le1980-05-02", &day, true),
        ("le1980-05-03", &day, true),
        ("le1980-05-01", &day, false),
        ("sa1980-05-01", &day, true),
        ("sa1980-05-02", &day, false),
        ("sa1980-05-02T23:59:59Z", &day, false),
        ("sa1980-05-01T23:59:59Z", &day, true),
        ("eb1980-05-03", &day, true),
        ("eb1980-05-02", &day, false),
        ("eb1980-05-03T00:00:00Z", &day, true),
        ("eb1980-05-02T23:59:59Z", &day, false),
        // A whole year against parts of it.
        ("1980-05", &year, false),
        ("ne1980-05", &year, true),
        ("1980", &year, true),
        ("gt1980-12", &year, false),
        ("gt1980-11", &year, true),
        ("ge1980-12", &year, false),
        ("ge1979", &year, true),
        ("ge1980", &year, true),
        ("lt1980-01", &year, false),
        ("lt1980-02", &year, true),
        ("le1980-01", &year, false),
        ("le1981", &year, true),
        ("le1980", &year, true),
        ("sa1979-12-31", &year, true),
        ("sa1980-01", &year, false),
        ("eb1981-01-01", &year, true),
        ("eb1980-12", &year, false),
    ] {
        assert_eq!(
            passes(&format!("Patient?birthdate={q}"), target),
            expected,
            "{q} on {}",
            target["birthDate"]
        );
    }
}

/// Periods, closed and open at either end (an open end is unbounded).
#[test]
fn date_prefixes_on_periods() {
    let period = |start: Option<&str>, end: Option<&str>| {
        let mut p = serde_json::Map::new();
        if let Some(s) = start {
            p.insert("start".into(), json!(s));
        }
        if let Some(e) = end {
            p.insert("end".into(), json!(e));
        }
        json!({"resourceType": "Encounter", "status": "finished", "class": {}, "period": p})
    };
    let closed = period(Some("2020-01-01T10:00:00Z"), Some("2020-01-03T10:00:00Z"));
    let from = period(Some("2020-01-01"), None);
    let until = period(None, Some("2020-01-03"));
    for (q, target, expected) in [
        ("2020-01", &closed, true),
        ("2020-01-02", &closed, false),
        ("ne2020-01-02", &closed, true),
        ("ge2020-01-02", &closed, true),
        // Ending inside 2020-01-03 is neither above that day nor contained in it.
        ("ge2020-01-03", &closed, false),
        ("ge2020-01-04", &closed, false),
        ("le2020-01-02", &closed, true),
        ("le2020-01-01", &closed, false),
        ("le2019-12-31", &closed, false),
        ("gt2020-01-03", &closed, false),
        ("lt2020-01-01", &closed, false),
        ("sa2019-12-31", &closed, true),
        ("sa2020-01-01", &closed, false),
        ("eb2020-01-04", &closed, true),
        ("eb2020-01-03", &closed, false),
        // Open end: goes on for ever.
        ("gt2030", &from, true),
        ("ge2030", &from, true),
        ("lt2020", &from, false),
        ("lt2020-01-02", &from, true),
        ("2020", &from, false),
        ("ne2020", &from, true),
        ("sa2019", &from, true),
        ("sa2020", &from, false),
        ("eb2030", &from, false),
        // Open start: has always been going on.
        ("lt1900", &until, true),
        ("le1900", &until, true),
        ("gt2020-01-03", &until, false),
        ("gt2020-01-02", &until, true),
        ("2020", &until, false),
        ("eb2020-01-04", &until, true),
        ("eb2020-01-03", &until, false),
        ("sa1900", &until, false),
    ] {
        assert_eq!(
            passes(&format!("Encounter?date={q}"), target),
            expected,
            "{q} on {}",
            target["period"]
        );
    }
}

/// `ap`: within 10% of the gap between now and the search value (the R4 recommendation), so a
/// date a century ago is approximately one ten years later but not one a century or two away.
#[test]
fn date_approximately() {
    // 1900: now is more than 120 years away, so the margin is more than 12 years.
    assert!(passes(
        "Patient?birthdate=ap1900-01-01",
        &patient_born("1910-06-01")
    ));
    assert!(passes(
        "Patient?birthdate=ap1900-01-01",
        &patient_born("1890-06-01")
    ));
    assert!(!passes(
        "Patient?birthdate=ap1900-01-01",
        &patient_born("1700-01-01")
    ));
    assert!(!passes(
        "Patient?birthdate=ap1900-01-01",
        &patient_born("2100-01-01")
    ));
    // 2000: now is 25 years or more away, well under 500, so 1950 is too far.
    assert!(!passes(
        "Patient?birthdate=ap2000-01-01",
        &patient_born("1950-01-01")
    ));
    assert!(passes(
        "Patient?birthdate=ap2000-01-01",
        &patient_born("2000-06-01")
    ));
    assert!(passes(
        "Patient?birthdate=ap2000-01-01",
        &patient_born("2000-01-01")
    ));
}

/// A resource as the export reads it: parsed from its stored JSON text, so a stored decimal is
/// whatever serde_json makes of the digits written in the file.
fn stored(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn risk(probability: &str) -> Value {
    stored(&format!(
        r#"{{"resourceType":"RiskAssessment","status":"final","subject":{{"reference":"Patient/p"}},"prediction":[{{"probabilityDecimal":{probability}}}]}}"#
    ))
}

fn heart_rate(value: &str) -> Value {
    stored(&format!(
        r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"valueQuantity":{{"value":{value},"system":"http://unitsofmeasure.org","code":"/min"}}}}"#
    ))
}

/// `i / 10^scale` written out in decimal digits (`decimal(45, 3)` is `0.045`), with integer
/// arithmetic only, so the expected edges below never pass through binary floating point.
fn decimal(i: u64, scale: u32) -> String {
    let unit = 10u64.pow(scale);
    format!("{}.{:0width$}", i / unit, i % unit, width = scale as usize)
}

/// R4 search (search.html#number): a search number stands for the range of its significant
/// figures, half a unit of its last digit either side, lower edge included: `100` is
/// [99.5, 100.5), `100.00` [99.995, 100.005), `ne100` is outside [99.5, 100.5). So
/// `probability=0.05` is [0.045, 0.055) and matches a stored 0.045; `probability=0.10` is
/// [0.095, 0.105) and does not match 0.105.
#[test]
fn number_precision_edges_are_exact() {
    for (search, stored_value, expected) in [
        ("0.05", "0.045", true),
        ("0.05", "0.0549", true),
        ("0.05", "0.055", false),
        ("0.05", "0.0449", false),
        ("0.10", "0.095", true),
        ("0.10", "0.105", false),
        ("0.10", "0.1049999", true),
        ("100", "99.5", true),
        ("100", "100.4999", true),
        ("100", "100.5", false),
        ("100", "99.4999", false),
        ("100.00", "99.995", true),
        ("100.00", "100.005", false),
        ("100.00", "100.004", true),
        ("ne100", "100.5", true),
        ("ne100", "99.5", false),
        ("ne0.10", "0.105", true),
        ("ne0.05", "0.045", false),
        ("0.3", "0.25", true),
        ("0.3", "0.35", false),
        ("-0.3", "-0.35", true),
        ("-0.3", "-0.25", false),
        ("0", "0", true),
        ("0.0", "-0.05", true),
        ("0.0", "0.05", false),
    ] {
        assert_eq!(
            passes(
                &format!("RiskAssessment?probability={search}"),
                &risk(stored_value)
            ),
            expected,
            "probability={search} on {stored_value}"
        );
    }
}

/// Every two-decimal search value from 0.01 to 19.99 against the two edges of its range: the low
/// edge (`s - 0.005`) is in, the high edge (`s + 0.005`) is out. Numbers and quantities alike.
#[test]
fn number_and_quantity_edges_of_every_two_decimal_value() {
    let mut wrong = Vec::new();
    for i in 1..2000u64 {
        let search = decimal(i, 2);
        let (low, high) = (decimal(10 * i - 5, 3), decimal(10 * i + 5, 3));
        for (edge, expected) in [(&low, true), (&high, false)] {
            if passes(&format!("RiskAssessment?probability={search}"), &risk(edge)) != expected {
                wrong.push(format!("probability={search} on {edge}"));
            }
            if passes(
                &format!("Observation?value-quantity={search}"),
                &heart_rate(edge),
            ) != expected
            {
                wrong.push(format!("value-quantity={search} on {edge}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong edges, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// The prefixes compare with the exact values: `gt`/`lt`/`ge`/`le` (and `sa`/`eb`, which are
/// `gt`/`lt` for numbers) against the search number exactly, even beyond the 15 to 17 digits a
/// double holds; `ap` within 10% of the search value (R4's recommendation), edges included, and
/// never narrower than the value's implicit range.
#[test]
fn number_prefix_edges_are_exact() {
    for (search, stored_value, expected) in [
        ("gt0.1000000000000000001", "0.1", false),
        ("ge0.1000000000000000001", "0.1", false),
        ("sa0.1000000000000000001", "0.1", false),
        ("lt0.1000000000000000001", "0.1", true),
        ("eb0.1000000000000000001", "0.1", true),
        ("le0.0999999999999999999", "0.1", false),
        ("lt0.0999999999999999999", "0.1", false),
        ("gt0.0999999999999999999", "0.1", true),
        ("0.1000000000000000001", "0.1", false),
        ("ge0.3", "0.3", true),
        ("le0.3", "0.3", true),
        ("gt0.3", "0.3", false),
        ("lt0.3", "0.3", false),
        // 10% of 0.30 is 0.03: [0.27, 0.33].
        ("ap0.30", "0.33", true),
        ("ap0.30", "0.27", true),
        ("ap0.30", "0.3301", false),
        ("ap0.30", "0.2699", false),
        // 10% of 1.10 is 0.11: [0.99, 1.21].
        ("ap1.10", "1.21", true),
        ("ap1.10", "0.99", true),
        ("ap1.10", "1.2101", false),
        // 10% of -0.70 is 0.07: [-0.77, -0.63].
        ("ap-0.70", "-0.77", true),
        ("ap-0.70", "-0.63", true),
        ("ap-0.70", "-0.6299", false),
        // Never narrower than the implicit range: 10% of 0.3 is 0.03, its range is ±0.05.
        ("ap0.3", "0.35", true),
        ("ap0.3", "0.3501", false),
    ] {
        assert_eq!(
            passes(
                &format!("RiskAssessment?probability={search}"),
                &risk(stored_value)
            ),
            expected,
            "probability={search} on {stored_value}"
        );
    }
}

/// A quantity's prefix and number follow the number rules (R4 search.html#quantity), on
/// Quantity.value and Money.value alike.
#[test]
fn quantity_edges_are_exact() {
    for (search, stored_value, expected) in [
        ("0.05", "0.045", true),
        ("0.05", "0.055", false),
        ("0.10|http://unitsofmeasure.org|/min", "0.095", true),
        ("0.10|http://unitsofmeasure.org|/min", "0.105", false),
        ("ap0.30||/min", "0.33", true),
        ("ap0.30||/min", "0.3301", false),
        ("ge0.1000000000000000001", "0.1", false),
    ] {
        assert_eq!(
            passes(
                &format!("Observation?value-quantity={search}"),
                &heart_rate(stored_value)
            ),
            expected,
            "value-quantity={search} on {stored_value}"
        );
    }
    let invoice = |value: &str| {
        stored(&format!(
            r#"{{"resourceType":"Invoice","status":"issued","totalNet":{{"value":{value},"currency":"USD"}}}}"#
        ))
    };
    assert!(passes("Invoice?totalnet=0.10||USD", &invoice("0.095")));
    assert!(!passes("Invoice?totalnet=0.10||USD", &invoice("0.105")));
}

/// A Money's currency is a code of the ISO 4217 system (R4 Money: "ISO 4217 Currency Code";
/// its code system is `urn:iso:std:iso:4217`), so `number|urn:iso:std:iso:4217|code` finds it,
/// as `number||code` and `number|urn:iso:std:iso:4217|` do; another system does not.
#[test]
fn money_currency_is_a_code_of_iso_4217() {
    let invoice = json!({"resourceType": "Invoice", "status": "issued",
        "totalNet": {"value": 100, "currency": "USD"}});
    for (q, expected) in [
        ("100|urn:iso:std:iso:4217|USD", true),
        ("100||USD", true),
        ("100|urn:iso:std:iso:4217|", true),
        ("ge99|urn:iso:std:iso:4217|USD", true),
        ("100|urn:iso:std:iso:4217|EUR", false),
        ("200|urn:iso:std:iso:4217|USD", false),
        ("100|http://unitsofmeasure.org|USD", false),
        ("100|urn:other|USD", false),
        ("100|http://unitsofmeasure.org|", false),
    ] {
        assert_eq!(
            passes(&format!("Invoice?totalnet={q}"), &invoice),
            expected,
            "{q}"
        );
    }
    // A Quantity whose code is a currency but whose system is UCUM is not money.
    let o = heart_rate("100");
    assert!(!passes(
        "Observation?value-quantity=100|urn:iso:std:iso:4217|/min",
        &o
    ));
}

/// R4 search escaping (search.html#escaping): `$`, `,` and `|` inside a value
/// are written `\$`, `\,` and `\|`, and `\` itself `\\`. So `\|` is part of a token's code, not
/// the system separator, and `a\\,b` is the two alternatives `a\` and `b`.
#[test]
fn escapes_follow_r4() {
    let patient = |system: &str, value: &str| json!({"resourceType": "Patient", "identifier": [{"system": system, "value": value}]});
    /// (system, value) of an identifier.
    type Ids = &'static [(&'static str, &'static str)];
    let cases: &[(&str, Ids, Ids)] = &[
        (
            r"urn:t|a\|b",
            &[("urn:t", "a|b")],
            &[("urn:t", "a"), ("urn:t", "b"), ("urn:t", r"a\|b")],
        ),
        (
            r"urn:t|a\\,b",
            &[("urn:t", r"a\"), ("urn:t", "b")],
            &[("urn:t", r"a\,b"), ("urn:t", r"a\\"), ("urn:t", "a,b")],
        ),
        (r"urn:t|a\,b", &[("urn:t", "a,b")], &[("urn:t", "a")]),
        (r"urn:t|a\$b", &[("urn:t", "a$b")], &[("urn:t", r"a\$b")]),
        (r"urn:t|a\\b", &[("urn:t", r"a\b")], &[("urn:t", r"a\\b")]),
        // No unescaped `|`: a code in any system.
        (
            r"a\|b",
            &[("urn:t", "a|b"), ("urn:u", "a|b")],
            &[("a", "b")],
        ),
        // An escaped `|` in the system.
        (r"urn:a\|b|c", &[("urn:a|b", "c")], &[("urn:a", "b|c")]),
        // Percent-encoded escapes (`%5C%7C`) are the same once decoded.
        ("urn:t|a%5C%7Cb", &[("urn:t", "a|b")], &[("urn:t", "a")]),
        (
            "urn:t|a%5C%5C%2Cb",
            &[("urn:t", r"a\"), ("urn:t", "b")],
            &[],
        ),
    ];
    for (value, matching, other) in cases {
        let f = filter(&format!("Patient?identifier={value}"));
        for (s, v) in *matching {
            assert!(
                f.matches("Patient", &patient(s, v)),
                "{value} finds {s}|{v}"
            );
        }
        for (s, v) in *other {
            assert!(
                !f.matches("Patient", &patient(s, v)),
                "{value} does not find {s}|{v}"
            );
        }
    }
    // Strings, and a quantity's system and code.
    let named = json!({"resourceType": "Patient", "name": [{"family": "a|b,c$d"}]});
    assert!(passes(r"Patient?family=a\|b\,c\$d", &named));
    assert!(passes(r"Patient?family:exact=a\|b\,c\$d", &named));
    assert!(!passes(r"Patient?family:exact=a\|b", &named));
    let odd_unit = stored(
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1,"system":"urn:u|v","code":"a|b"}}"#,
    );
    assert!(passes(
        r"Observation?value-quantity=1|urn:u\|v|a\|b",
        &odd_unit
    ));
    assert!(!passes(
        r"Observation?value-quantity=1|urn:u|v|a\|b",
        &odd_unit
    ));
}

/// The test on stored bytes ([`TypeFilters::may_match_text`], [`TypeFilters::may_match`]) may
/// only ever rule out what the evaluation of the parsed resource rules out: over token searches
/// on codings, booleans, identifiers, `system|`, `|code`, OR-ed queries and criteria AND-ed
/// with ones it cannot test, every resource the evaluation keeps passes it, and some that the
/// evaluation leaves out are ruled out by it.
#[test]
fn the_test_on_stored_bytes_never_rules_out_a_match() {
    let patient = json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
        "identifier": [{"system": "urn:mrn", "value": "MRN-7"}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "name": [{"family": "Ng \"Nell\"", "given": ["Anne"]}]});
    // Deceased by a date: `deceased=true` matches a value the expression computes.
    let died = json!({"resourceType": "Patient", "id": "p2", "deceasedDateTime": "2020-01-01"});
    let resources = [observation(), patient, died];
    let queries = [
        "Observation?code=8867-4",
        "Observation?code=http://loinc.org|8867-4",
        "Observation?code=http://loinc.org|",
        "Observation?code=|8867-4",
        "Observation?code=9999-9",
        "Observation?code=9999-9,8867-4",
        "Observation?code=9999-9&status=final",
        "Observation?status=final&date=ge2020",
        "Observation?code=9999-9&date=ge2020",
        "Observation?category=vital-signs&code=8867-4",
        "Observation?combo-code=8867-4",
        "Observation?value-quantity=72.5",
        "Patient?active=true",
        "Patient?active=false",
        "Patient?gender=female",
        "Patient?gender=male",
        "Patient?identifier=urn:mrn|MRN-7",
        "Patient?identifier=MRN-8",
        "Patient?telecom=555-0100",
        "Patient?family=Ng \"Nell\"",
        "Patient?deceased=false",
        "Patient?deceased=true",
    ];
    let (mut kept, mut ruled_out) = (0, 0);
    for resource in &resources {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let stored = serde_json::to_vec(resource).unwrap();
        let members = crate::fhir::members::members(&stored).unwrap();
        for query in queries {
            // Two queries for a type are OR-ed: a matching one must keep the resource passing.
            for filters in [
                filter(query),
                TypeFilters::parse(&[query.into(), "Observation?code=0000-0".into()], false)
                    .unwrap(),
            ] {
                let matches = filters.matches(resource_type, resource);
                let may = filters.may_match_text(resource_type, &stored)
                    && filters.may_match(resource_type, &members);
                assert!(may || !matches, "{query} on {resource}");
                kept += matches as usize;
                ruled_out += !may as usize;
            }
        }
    }
    assert!(
        kept > 0 && ruled_out > 0,
        "kept {kept}, ruled out {ruled_out}"
    );
}
