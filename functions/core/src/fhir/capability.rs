//! The server's R4 `CapabilityStatement`.

use crate::fhir::RESOURCE_TYPES;
use crate::type_filter::{ParamKind, search_params_of};
use serde_json::{Value, json};

/// The kick-off parameters this server implements, as the CapabilityStatement documents them.
pub const KICKOFF_PARAMETERS: &[&str] = &[
    "_outputFormat",
    "_since",
    "_until",
    "_type",
    "_typeFilter",
    "_elements",
    "patient",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
];

const EXPORT_OPERATION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_OPERATION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_OPERATION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The CapabilityStatement for a server whose FHIR base is `base_url`.
///
/// It `instantiates` the Bulk Data IG's server CapabilityStatement and declares `$export` at
/// system, Patient and Group level. Every resource type lists the search parameters its
/// `_typeFilter` queries can use.
/// With `token_url` (when clients need tokens), `rest.security` declares SMART Backend Services
/// and the token endpoint in the `oauth-uris` extension.
pub fn capability_statement(
    base_url: &str,
    software_version: &str,
    published: &str,
    token_url: Option<&str>,
) -> Value {
    let export_op = |name: &str, definition: &str| {
        json!({"name": name, "definition": definition,
            "documentation": format!("Kick-off parameters: {}", KICKOFF_PARAMETERS.join(", "))})
    };
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let mut entry = json!({"type": t, "searchParam": search_params(t)});
            // `export` is the operation's name in the IG; older clients and test suites look
            // for the OperationDefinition ids `patient-export` and `group-export` as names.
            match *t {
                "Patient" => {
                    entry["operation"] = json!([
                        export_op("export", PATIENT_EXPORT_OPERATION),
                        export_op("patient-export", PATIENT_EXPORT_OPERATION)
                    ])
                }
                "Group" => {
                    entry["operation"] = json!([
                        export_op("export", GROUP_EXPORT_OPERATION),
                        export_op("group-export", GROUP_EXPORT_OPERATION)
                    ])
                }
                _ => {}
            }
            entry
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published,
        "publisher": "bulk-export",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "bulk-export", "version": software_version},
        "implementation": {"description": "FHIR Bulk Data export server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": format!("Bulk Data Access IG v2.0.0 $export at system, Patient and Group level. \
                Kick-off parameters: {}. _typeFilter queries may use the searchParam listed for each \
                resource type (no chaining, _include or _sort). One export runs at a time; a second \
                kick-off is answered 429 with Retry-After, except that the same client repeating an \
                identical kick-off is sent to the running export.", KICKOFF_PARAMETERS.join(", ")),
            "resource": resources,
            "operation": [export_op("export", EXPORT_OPERATION)]
        }]
    });
    if let Some(token_url) = token_url {
        statement["rest"][0]["security"] = json!({
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": token_url}]
            }],
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "description": "SMART Backend Services (client-confidential-asymmetric): see /.well-known/smart-configuration"
        });
    }
    statement
}

fn search_params(resource_type: &str) -> Vec<Value> {
    search_params_of(resource_type)
        .into_iter()
        .map(|(name, kind)| {
            let kind = match kind {
                ParamKind::Token => "token",
                ParamKind::Reference => "reference",
                ParamKind::Date => "date",
                ParamKind::String => "string",
                ParamKind::Uri => "uri",
                ParamKind::Number => "number",
                ParamKind::Quantity => "quantity",
            };
            json!({"name": name, "type": kind, "documentation": "usable in _typeFilter"})
        })
        .collect()
}
