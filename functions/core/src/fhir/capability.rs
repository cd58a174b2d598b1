//! The server's R4 `CapabilityStatement`.

use serde_json::{Value, json};

const EXPORT_OPERATION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT_OPERATION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT_OPERATION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The CapabilityStatement for a server whose FHIR base is `base_url`.
///
/// It `instantiates` the Bulk Data IG's server CapabilityStatement and declares `$export` at
/// system, Patient and Group level.
pub fn capability_statement(base_url: &str, software_version: &str, published: &str) -> Value {
    let export_op = |definition: &str| json!({"name": "export", "definition": definition});
    json!({
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
            "documentation": "Bulk Data Access IG v2.0.0 $export at system, Patient and Group level. \
                Kick-off parameters: _outputFormat, _since, _until, _type, patient (POST). \
                One export runs at a time; a second kick-off is answered 429 with Retry-After.",
            "resource": [
                {"type": "Patient", "operation": [export_op(PATIENT_EXPORT_OPERATION)]},
                {"type": "Group", "operation": [export_op(GROUP_EXPORT_OPERATION)]}
            ],
            "operation": [export_op(EXPORT_OPERATION)]
        }]
    })
}
