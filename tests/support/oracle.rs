//! The independent oracle: what an export must contain, computed from the input data with plain
//! predicates and the R4 compartment reference, never with the server's code. The local end-to-end
//! tests and the AWS tests against moto both compare with it.

use crate::CompartmentReference;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// `type → sorted ids` of the resources `keep` selects.
pub fn expected(
    resources: &[Value],
    keep: impl Fn(&Value) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in resources.iter().filter(|r| keep(r)) {
        out.entry(r["resourceType"].as_str().unwrap().to_string())
            .or_default()
            .push(r["id"].as_str().unwrap().to_string());
    }
    out.values_mut().for_each(|ids| ids.sort());
    out
}

/// Adds the Provenance resources whose target is among the expected resources: Patient and Group
/// exports carry the Provenance of what they export.
pub fn with_provenance_of_targets(
    resources: &[Value],
    mut want: BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<String>> {
    let exported: BTreeSet<String> = want
        .iter()
        .flat_map(|(t, ids)| ids.iter().map(move |id| format!("{t}/{id}")))
        .collect();
    let provenance = want.entry("Provenance".into()).or_default();
    for r in resources
        .iter()
        .filter(|r| r["resourceType"] == "Provenance")
    {
        let about_export = r["target"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| exported.contains(t["reference"].as_str().unwrap()));
        let id = r["id"].as_str().unwrap().to_string();
        if about_export && !provenance.contains(&id) {
            provenance.push(id);
        }
    }
    provenance.sort();
    want
}

/// Whether `r` is in the compartment of one of `patients`.
pub fn in_compartment_of(
    reference: &CompartmentReference,
    r: &Value,
    patients: &BTreeSet<String>,
) -> bool {
    reference
        .patients_of(r)
        .iter()
        .any(|p| patients.contains(p))
}

/// The Patient ids a Group lists as members.
pub fn group_members(data: &[Value], group_id: &str) -> BTreeSet<String> {
    let group = data
        .iter()
        .find(|r| r["resourceType"] == "Group" && r["id"] == group_id)
        .unwrap_or_else(|| panic!("no Group {group_id} in the data"));
    group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["entity"]["reference"].as_str())
        .filter_map(|r| r.strip_prefix("Patient/"))
        .map(String::from)
        .collect()
}

/// The ids of every Patient in the data.
pub fn all_patients(data: &[Value]) -> BTreeSet<String> {
    data.iter()
        .filter(|r| r["resourceType"] == "Patient")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// What a Patient-level export of `patients` holds: their compartments plus the Provenance of
/// what is exported (leaving out the Group `except_group`, which a Group export does not carry).
pub fn compartment_export(
    data: &[Value],
    patients: &BTreeSet<String>,
    except_group: Option<&str>,
) -> BTreeMap<String, Vec<String>> {
    let reference = CompartmentReference::load();
    with_provenance_of_targets(
        data,
        expected(data, |r| {
            !(except_group.is_some_and(|g| r["resourceType"] == "Group" && r["id"] == g))
                && in_compartment_of(&reference, r, patients)
        }),
    )
}

/// The `Type/id` of every resource in `want`.
pub fn references(want: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    want.iter()
        .flat_map(|(t, ids)| ids.iter().map(move |id| format!("{t}/{id}")))
        .collect()
}

/// `LatestProvenanceResources`: for each of the `exported` `Type/id`s, the Provenance about it
/// with the latest `recorded` instant (compared as instants); sorted ids. Panics when two
/// Provenance about one resource tie, since the data then has no single answer.
pub fn latest_provenance(resources: &[Value], exported: &BTreeSet<String>) -> Vec<String> {
    let recorded = |p: &Value| {
        chrono::DateTime::parse_from_rfc3339(p["recorded"].as_str().expect("recorded"))
            .unwrap_or_else(|e| panic!("{}: recorded is not an instant: {e}", p["id"]))
    };
    let mut latest: BTreeMap<&str, &Value> = BTreeMap::new();
    for p in resources
        .iter()
        .filter(|r| r["resourceType"] == "Provenance")
    {
        for target in p["target"].as_array().unwrap() {
            let target = target["reference"].as_str().unwrap();
            if !exported.contains(target) {
                continue;
            }
            match latest.get(target) {
                Some(best) if recorded(best) > recorded(p) => {}
                Some(best) if recorded(best) == recorded(p) => {
                    panic!("{} and {} about {target} tie", best["id"], p["id"])
                }
                _ => {
                    latest.insert(target, p);
                }
            }
        }
    }
    let mut ids: Vec<String> = latest
        .values()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Asserts two `type → ids` maps are equal, naming only what differs.
#[track_caller]
pub fn assert_same_ids(
    got: &BTreeMap<String, Vec<String>>,
    want: &BTreeMap<String, Vec<String>>,
    what: &str,
) {
    if got == want {
        return;
    }
    let flat = |m: &BTreeMap<String, Vec<String>>| -> BTreeSet<String> { references(m) };
    let (got_refs, want_refs) = (flat(got), flat(want));
    let extra: Vec<&String> = got_refs.difference(&want_refs).collect();
    let missing: Vec<&String> = want_refs.difference(&got_refs).collect();
    panic!(
        "{what}: {} unexpected {extra:?}; {} missing {missing:?}",
        extra.len(),
        missing.len()
    );
}
