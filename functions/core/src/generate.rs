//! Deterministic synthetic R4 data for demos, tests and benchmarks.
//!
//! About 300 resources per patient across 19 types, with valid references between them and
//! `meta.lastUpdated` spread over 2020–2025. The same `(patients, seed)` always gives the same data.

use crate::fhir::time::{format_instant, from_micros};
use serde_json::{Value, json};

/// The resource types the generator writes.
pub const GENERATED_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "CarePlan",
    "Claim",
    "Condition",
    "DiagnosticReport",
    "Encounter",
    "ExplanationOfBenefit",
    "Group",
    "Immunization",
    "Location",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Procedure",
    "Provenance",
    "ResearchStudy",
    "ResearchSubject",
];

/// Patients per Group; every `GROUP_EVERY`th block of patients forms one Group.
pub const GROUP_SIZE: usize = 10;
const GROUP_EVERY: usize = 5;

/// A small, fast, deterministic random source (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const START_MICROS: i64 = 1_577_836_800_000_000; // 2020-01-01T00:00:00Z
const SPAN_MICROS: i64 = 6 * 365 * 24 * 3600 * 1_000_000;

/// Observation categories (http://terminology.hl7.org/CodeSystem/observation-category), the
/// `k % 10`-th Observation of a patient getting the `k % 10`-th (none past the end).
const OBSERVATION_CATEGORIES: &[&str] = &[
    "vital-signs",
    "laboratory",
    "social-history",
    "survey",
    "exam",
    "imaging",
    "procedure",
    "therapy",
    "activity",
];

const LOINC: &[(&str, &str, &str)] = &[
    ("8302-2", "Body Height", "cm"),
    ("29463-7", "Body Weight", "kg"),
    ("8867-4", "Heart rate", "/min"),
    ("9279-1", "Respiratory rate", "/min"),
    ("8310-5", "Body temperature", "Cel"),
    ("2339-0", "Glucose", "mg/dL"),
    ("2093-3", "Cholesterol", "mg/dL"),
    ("39156-5", "Body mass index", "kg/m2"),
];
const SNOMED: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertension"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("40055000", "Chronic sinusitis"),
    ("55822004", "Hyperlipidemia"),
];
const VACCINES: &[(&str, &str)] = &[
    ("140", "Influenza, seasonal"),
    ("113", "Td (adult)"),
    ("08", "Hep B, adolescent"),
];
const DRUGS: &[(&str, &str)] = &[
    ("314076", "lisinopril 10 MG"),
    ("860975", "metformin 500 MG"),
    ("197361", "amlodipine 5 MG"),
];
const GIVEN: &[&str] = &[
    "Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena",
];
const FAMILY: &[&str] = &[
    "Silva", "Okafor", "Nguyen", "Müller", "Haddad", "Kowalski", "Tanaka", "Rossi",
];

/// Calls `sink(resource_type, resource)` for every resource of a dataset with `patients` patients.
pub fn generate(patients: usize, seed: u64, sink: &mut dyn FnMut(&str, Value)) {
    generate_studies(patients, seed, None, sink)
}

/// Like [`generate`], with `studies` clinical studies (default: 3, or one per 200 patients).
/// Every patient takes part in one study, at one of its 3–20 sites, in one of the 13
/// `ResearchSubject` statuses (in turn), enrolled some day between 2019 and 2025.
pub fn generate_studies(
    patients: usize,
    seed: u64,
    studies: Option<usize>,
    sink: &mut dyn FnMut(&str, Value),
) {
    let mut rng = Rng(seed ^ 0x005E_ED0F_F41C);
    let organizations = (patients / 20).max(2);
    let practitioners = (patients / 10).max(3);
    let studies = studies.unwrap_or((patients / 200).max(3)).max(1);
    let when = |rng: &mut Rng| {
        format_instant(from_micros(
            START_MICROS + rng.below(SPAN_MICROS as u64) as i64,
        ))
    };

    for o in 0..organizations {
        let lu = when(&mut rng);
        sink(
            "Organization",
            json!({"resourceType":"Organization","id":format!("org-{o}"),"meta":{"lastUpdated":lu},
            "active":true,"type":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/organization-type","code":"prov","display":"Healthcare Provider"}]}],
            "name":format!("Community Clinic {o}"),"telecom":[{"system":"phone","value":format!("555-01{o:02}")}],
            "address":[{"line":[format!("{} Main St", 100 + o)],"city":"Springfield","state":"MA","postalCode":"01101","country":"US"}]}),
        );
        let lu = when(&mut rng);
        sink(
            "Location",
            json!({"resourceType":"Location","id":format!("loc-{o}"),"meta":{"lastUpdated":lu},"status":"active",
            "name":format!("Community Clinic {o} – main site"),"managingOrganization":{"reference":format!("Organization/org-{o}")}}),
        );
    }
    for p in 0..practitioners {
        let lu = when(&mut rng);
        sink(
            "Practitioner",
            json!({"resourceType":"Practitioner","id":format!("prac-{p}"),"meta":{"lastUpdated":lu},"active":true,
            "identifier":[{"system":"http://hl7.org/fhir/sid/us-npi","value":format!("{}", 9_999_000_000u64 + p as u64)}],
            "name":[{"family":rng.pick(FAMILY),"given":[rng.pick(GIVEN)],"prefix":["Dr."]}],"gender":"female"}),
        );
    }
    for s in 0..studies {
        let sites: Vec<Value> = (0..sites_of(s))
            .map(|k| {
                let lu = when(&mut rng);
                let (city, state, country) = *rng.pick(PLACES);
                let status = ["active", "active", "active", "suspended", "inactive"][(s + k) % 5];
                let site = json!({"resourceType":"Location","id":format!("site-{s}-{k}"),"meta":{"lastUpdated":lu},
                    "status":status,"name":format!("{city} study centre {k}"),
                    "address":{"line":[format!("{} Research Way", 10 + k)],"city":city,"state":state,"country":country}});
                sink("Location", site);
                json!({"reference": format!("Location/site-{s}-{k}")})
            })
            .collect();
        let lu = when(&mut rng);
        sink(
            "ResearchStudy",
            json!({"resourceType":"ResearchStudy","id":format!("study-{s}"),"meta":{"lastUpdated":lu},
            "identifier":[{"system":"urn:bulk-export:study","value":format!("BX-{s:03}")}],
            "title":format!("Outcomes study {s}"),"status":if s % 4 == 3 { "completed" } else { "active" },
            "sponsor":{"reference":format!("Organization/org-{}", s % organizations)},
            "arm":[{"name":"A","description":"standard care"},{"name":"B","description":"intervention"}],
            "site":sites}),
        );
    }
    for g in 0..patients.div_ceil(GROUP_SIZE * GROUP_EVERY) {
        let first = g * GROUP_SIZE * GROUP_EVERY;
        let members: Vec<Value> = (first..(first + GROUP_SIZE).min(patients))
            .map(|i| json!({"entity":{"reference":format!("Patient/{}", patient_id(i))}}))
            .collect();
        let lu = when(&mut rng);
        sink(
            "Group",
            json!({"resourceType":"Group","id":format!("group-{g}"),"meta":{"lastUpdated":lu},"type":"person","actual":true,
            "name":format!("Cohort {g}"),"quantity":members.len(),"member":members}),
        );
    }

    for i in 0..patients {
        let pid = patient_id(i);
        let patient_ref = json!({"reference": format!("Patient/{pid}")});
        let org = format!("Organization/org-{}", i % organizations);
        let prac = |rng: &mut Rng| json!({"reference": format!("Practitioner/prac-{}", rng.below(practitioners as u64))});
        let lu = when(&mut rng);
        let mut patient = json!({"resourceType":"Patient","id":pid,"meta":{"lastUpdated":lu},
            "identifier":[{"system":"urn:oid:2.16.840.1.113883.4.3.25","value":format!("MRN{i:08}")}],
            "active":true,"name":[{"use":"official","family":rng.pick(FAMILY),"given":[rng.pick(GIVEN)]}],
            "gender":if rng.below(2) == 0 {"female"} else {"male"},"birthDate":format!("{}-{:02}-{:02}", 1940 + rng.below(70), 1 + rng.below(12), 1 + rng.below(28)),
            "address":[{"city":"Springfield","state":"MA","country":"US"}],"managingOrganization":{"reference":org},
            "generalPractitioner":[prac(&mut rng)]});
        if i % 50 == 49 {
            patient["link"] = json!([{"other":{"reference":format!("Patient/{}", patient_id(i - 1))},"type":"seealso"}]);
        }
        sink("Patient", patient);

        let encounters: Vec<String> = (0..20).map(|e| format!("enc-{pid}-{e}")).collect();
        for (e, enc) in encounters.iter().enumerate() {
            let lu = when(&mut rng);
            sink(
                "Encounter",
                json!({"resourceType":"Encounter","id":enc,"meta":{"lastUpdated":lu},"status":"finished",
                "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},
                "type":[{"coding":[{"system":"http://snomed.info/sct","code":"185349003","display":"Encounter for check up"}]}],
                "subject":patient_ref,"participant":[{"individual":prac(&mut rng)}],
                "period":{"start":lu,"end":lu},"location":[{"location":{"reference":format!("Location/loc-{}", i % organizations)}}],
                "serviceProvider":{"reference":org},"reasonCode":[{"text":format!("visit {e}")}]}),
            );
        }
        for k in 0..150 {
            let (code, display, unit) = *rng.pick(LOINC);
            let lu = when(&mut rng);
            let mut obs = json!({"resourceType":"Observation","id":format!("obs-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"final",
                "code":{"coding":[{"system":"http://loinc.org","code":code,"display":display}],"text":display},
                "subject":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % 20])},
                "effectiveDateTime":lu,"issued":lu,
                "valueQuantity":{"value":(rng.below(20000) as f64) / 100.0,"unit":unit,"system":"http://unitsofmeasure.org","code":unit}});
            // Categories vary (and one in ten Observations has none), so category filters select
            // some Observations and leave others out.
            if let Some(category) = OBSERVATION_CATEGORIES.get(k % 10) {
                obs["category"] = json!([{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":category}]}]);
            }
            obs["performer"] = json!([prac(&mut rng)]);
            sink("Observation", obs);
        }
        for k in 0..10 {
            let (code, display) = *rng.pick(SNOMED);
            let lu = when(&mut rng);
            sink(
                "Condition",
                json!({"resourceType":"Condition","id":format!("cond-{pid}-{k}"),"meta":{"lastUpdated":lu},
                "clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"active"}]},
                "code":{"coding":[{"system":"http://snomed.info/sct","code":code,"display":display}],"text":display},
                "subject":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % encounters.len()])},"onsetDateTime":lu,"asserter":prac(&mut rng)}),
            );
        }
        for k in 0..15 {
            let lu = when(&mut rng);
            sink(
                "Procedure",
                json!({"resourceType":"Procedure","id":format!("proc-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"completed",
                "code":{"coding":[{"system":"http://snomed.info/sct","code":"430193006","display":"Medication reconciliation"}]},
                "subject":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % encounters.len()])},"performedDateTime":lu,
                "performer":[{"actor":prac(&mut rng)}]}),
            );
        }
        for k in 0..20 {
            let (code, display) = *rng.pick(DRUGS);
            let lu = when(&mut rng);
            sink(
                "MedicationRequest",
                json!({"resourceType":"MedicationRequest","id":format!("medrx-{pid}-{k}"),"meta":{"lastUpdated":lu},
                "status":"active","intent":"order","medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":code,"display":display}]},
                "subject":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % encounters.len()])},"authoredOn":lu,"requester":prac(&mut rng),
                "dosageInstruction":[{"text":"1 tablet daily"}]}),
            );
        }
        for k in 0..10 {
            let (code, display) = *rng.pick(VACCINES);
            let lu = when(&mut rng);
            sink(
                "Immunization",
                json!({"resourceType":"Immunization","id":format!("imm-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"completed",
                "vaccineCode":{"coding":[{"system":"http://hl7.org/fhir/sid/cvx","code":code,"display":display}]},
                "patient":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % encounters.len()])},"occurrenceDateTime":lu,"primarySource":true}),
            );
        }
        for k in 0..2 {
            let lu = when(&mut rng);
            sink(
                "AllergyIntolerance",
                json!({"resourceType":"AllergyIntolerance","id":format!("allergy-{pid}-{k}"),"meta":{"lastUpdated":lu},
                "clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical","code":"active"}]},
                "type":"allergy","category":["food"],"criticality":"low",
                "code":{"coding":[{"system":"http://snomed.info/sct","code":"91935009","display":"Allergy to peanuts"}]},
                "patient":patient_ref,"recorder":prac(&mut rng),"recordedDate":lu}),
            );
        }
        for k in 0..20 {
            let lu = when(&mut rng);
            let results: Vec<Value> = (0..3)
                .map(
                    |r| json!({"reference":format!("Observation/obs-{pid}-{}", (k * 7 + r) % 150)}),
                )
                .collect();
            sink(
                "DiagnosticReport",
                json!({"resourceType":"DiagnosticReport","id":format!("report-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"final",
                "code":{"coding":[{"system":"http://loinc.org","code":"51990-0","display":"Basic metabolic panel"}]},
                "subject":patient_ref,"encounter":{"reference":format!("Encounter/{}", encounters[k % encounters.len()])},"effectiveDateTime":lu,"issued":lu,
                "performer":[prac(&mut rng)],"result":results}),
            );
        }
        for k in 0..3 {
            let lu = when(&mut rng);
            sink(
                "CarePlan",
                json!({"resourceType":"CarePlan","id":format!("careplan-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"active","intent":"plan",
                "category":[{"coding":[{"system":"http://snomed.info/sct","code":"734163000","display":"Care plan"}]}],
                "subject":patient_ref,"period":{"start":lu},"activity":[{"detail":{"status":"in-progress","performer":[prac(&mut rng)],
                "code":{"coding":[{"system":"http://snomed.info/sct","code":"229065009","display":"Exercise therapy"}]}}}]}),
            );
        }
        for k in 0..20 {
            let lu = when(&mut rng);
            let amount = rng.below(50_000) as f64 / 100.0;
            let mut claim = json!({"resourceType":"Claim","id":format!("claim-{pid}-{k}"),"meta":{"lastUpdated":lu},"status":"active",
                "type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"professional"}]},"use":"claim",
                "patient":patient_ref,"created":lu,"provider":{"reference":org},"priority":{"coding":[{"code":"normal"}]},
                "insurance":[{"sequence":1,"focal":true,"coverage":{"display":"Self-pay"}}],
                "item":[{"sequence":1,"productOrService":{"coding":[{"system":"http://snomed.info/sct","code":"185349003"}]},
                    "encounter":[{"reference":format!("Encounter/{}", encounters[k % encounters.len()])}],"net":{"value":amount,"currency":"USD"}}],
                "total":{"value":amount,"currency":"USD"}});
            if k == 0 {
                claim["payee"] =
                    json!({"type":{"coding":[{"code":"subscriber"}]},"party":patient_ref});
            }
            sink("Claim", claim);
            let lu = when(&mut rng);
            sink(
                "ExplanationOfBenefit",
                json!({"resourceType":"ExplanationOfBenefit","id":format!("eob-{pid}-{k}"),"meta":{"lastUpdated":lu},
                "status":"active","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"professional"}]},"use":"claim",
                "patient":patient_ref,"created":lu,"insurer":{"display":"Self-pay"},"provider":{"reference":org},
                "claim":{"reference":format!("Claim/claim-{pid}-{k}")},"outcome":"complete",
                "insurance":[{"focal":true,"coverage":{"display":"Self-pay"}}],"payment":{"amount":{"value":amount,"currency":"USD"}}}),
            );
        }
        for k in 0..2 {
            let lu = when(&mut rng);
            let target = if k == 0 {
                json!({"reference":format!("Patient/{pid}")})
            } else {
                json!({"reference":format!("Encounter/{}", encounters[0])})
            };
            sink(
                "Provenance",
                json!({"resourceType":"Provenance","id":format!("prov-{pid}-{k}"),"meta":{"lastUpdated":lu},
                "target":[target],"recorded":lu,"agent":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/provenance-participant-type","code":"author"}]},
                "who":prac(&mut rng),"onBehalfOf":{"reference":org}}]}),
            );
        }
        let lu = when(&mut rng);
        sink(
            "ResearchSubject",
            research_subject(i, studies, &mut rng, lu, &patient_ref),
        );
    }
}

/// How many sites study `s` has: 3 to 20.
fn sites_of(s: usize) -> usize {
    3 + (s * 7 + 5) % 18
}

/// Patient `i` as a participant of study `i % studies`: a site of it, the `i % 13`th status, an
/// enrolment day between 2019 and 2025, and what that status implies (an end, arms, a consent).
fn research_subject(i: usize, studies: usize, rng: &mut Rng, lu: String, patient: &Value) -> Value {
    use crate::fhir::study::{SITE_EXTENSION, SUBJECT_STATUSES};
    let s = i % studies;
    let site = rng.below(sites_of(s) as u64);
    let status = SUBJECT_STATUSES[i % SUBJECT_STATUSES.len()];
    let enrolled = 1_546_300_800 + rng.below(7 * 365 * 86_400) as i64; // from 2019-01-01
    let day = |seconds: i64| {
        chrono::DateTime::from_timestamp(seconds, 0)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };
    let mut period = json!({"start": day(enrolled)});
    if matches!(
        status,
        "off-study" | "withdrawn" | "ineligible" | "not-registered"
    ) {
        period["end"] = json!(day(enrolled + (30 + rng.below(400) as i64) * 86_400));
    }
    let mut subject = json!({"resourceType":"ResearchSubject","id":format!("subject-{}", patient_id(i)),
        "meta":{"lastUpdated":lu},
        "extension":[{"url":SITE_EXTENSION,"valueReference":{"reference":format!("Location/site-{s}-{site}")}}],
        "identifier":[{"system":"urn:bulk-export:subject","value":format!("S{s:03}-{i:06}")}],
        "status":status,"period":period,
        "study":{"reference":format!("ResearchStudy/study-{s}")},"individual":patient});
    let randomized = matches!(
        status,
        "on-study"
            | "on-study-intervention"
            | "on-study-observation"
            | "follow-up"
            | "off-study"
            | "withdrawn"
    );
    if randomized {
        let arm = if rng.below(2) == 0 { "A" } else { "B" };
        subject["assignedArm"] = json!(arm);
        // One in ten receives the other arm than assigned.
        let crossed = rng.below(10) == 0;
        subject["actualArm"] = json!(match (arm, crossed) {
            ("A", true) | ("B", false) => "B",
            _ => "A",
        });
    }
    if !matches!(status, "candidate" | "potential-candidate" | "screening") {
        subject["consent"] = json!({"reference": format!("Consent/consent-{}", patient_id(i))});
    }
    subject
}

/// Cities of the generated study sites.
const PLACES: &[(&str, &str, &str)] = &[
    ("Boston", "MA", "US"),
    ("Lyon", "ARA", "FR"),
    ("München", "BY", "DE"),
    ("Toronto", "ON", "CA"),
    ("São Paulo", "SP", "BR"),
    ("Kraków", "MA", "PL"),
    ("Osaka", "27", "JP"),
    ("Aarhus", "82", "DK"),
];

/// The id of the `i`th generated patient.
pub fn patient_id(i: usize) -> String {
    format!("pat-{i:06}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn deterministic_and_about_300_per_patient() {
        let mut a = Vec::new();
        generate(10, 7, &mut |t, r| a.push((t.to_string(), r)));
        let mut b = Vec::new();
        generate(10, 7, &mut |t, r| b.push((t.to_string(), r)));
        assert_eq!(a, b);
        let per_patient = a.len() / 10;
        assert!((280..=320).contains(&per_patient), "{per_patient}");
        let types: BTreeMap<&str, usize> = a.iter().fold(BTreeMap::new(), |mut m, (t, _)| {
            *m.entry(t.as_str()).or_default() += 1;
            m
        });
        assert_eq!(types.keys().copied().collect::<Vec<_>>(), GENERATED_TYPES);
        for (t, r) in &a {
            assert!(
                crate::load::prepare(r.clone(), crate::fhir::time::now_millis()).is_ok(),
                "{t}"
            );
        }
    }
}
