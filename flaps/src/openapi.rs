//! `GET /openapi.json`: an OpenAPI 3.0 document of what Hangar implements,
//! built from one table of operations. Shapes follow Fly's Machines API
//! spec, whose schema names the responses carry (`x-fly-schema`).

use axum::Json;
use serde_json::{Map, Value, json};

/// One implemented operation: method, path, summary, success status, and
/// the name of Fly's schema for the answer (empty when there is no body).
type Op = (&'static str, &'static str, &'static str, u16, &'static str);

const OPS: &[Op] = &[
    (
        "get",
        "/v1/apps",
        "List the org's apps",
        200,
        "ListAppsResponse",
    ),
    (
        "post",
        "/v1/apps",
        "Create an app",
        201,
        "CreateAppResponse",
    ),
    ("get", "/v1/apps/{app_name}", "Get an app", 200, "App"),
    (
        "delete",
        "/v1/apps/{app_name}",
        "Delete an app and its machines",
        202,
        "",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines",
        "List machines (filters, paging)",
        200,
        "Machine[]",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines",
        "Create (and start) a machine",
        200,
        "Machine",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}",
        "Get a machine",
        200,
        "Machine",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}",
        "Update a machine",
        200,
        "Machine",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/machines/{machine_id}",
        "Destroy a machine",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/start",
        "Start or resume",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/stop",
        "Stop",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/suspend",
        "Suspend",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/restart",
        "Restart",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/cordon",
        "Cordon",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/uncordon",
        "Uncordon",
        200,
        "",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/wait",
        "Wait for a state",
        200,
        "WaitMachineResponse",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/events",
        "List events",
        200,
        "MachineEvent[]",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/versions",
        "List versions",
        200,
        "MachineVersion[]",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/lease",
        "Get the lease",
        200,
        "Lease",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/lease",
        "Take or extend a lease",
        201,
        "Lease",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/machines/{machine_id}/lease",
        "Release the lease",
        200,
        "",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata",
        "Get metadata",
        200,
        "",
    ),
    (
        "put",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata",
        "Replace metadata",
        204,
        "",
    ),
    (
        "patch",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata",
        "Merge metadata",
        204,
        "",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Get a metadata key",
        200,
        "metadataValueResponse",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Set a metadata key",
        204,
        "",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
        "Delete a metadata key",
        204,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/signal",
        "Signal the workload",
        200,
        "",
    ),
    (
        "post",
        "/v1/apps/{app_name}/machines/{machine_id}/exec",
        "Run a command beside the workload",
        200,
        "flydv1.ExecResponse",
    ),
    (
        "get",
        "/v1/apps/{app_name}/machines/{machine_id}/ps",
        "List the workload's processes",
        200,
        "ProcessStat[]",
    ),
    (
        "get",
        "/v1/apps/{app_name}/secrets",
        "List secrets",
        200,
        "AppSecrets",
    ),
    (
        "post",
        "/v1/apps/{app_name}/secrets",
        "Set and unset secrets",
        200,
        "AppSecretsUpdateResp",
    ),
    (
        "get",
        "/v1/apps/{app_name}/secrets/{secret_name}",
        "Get a secret",
        200,
        "AppSecret",
    ),
    (
        "post",
        "/v1/apps/{app_name}/secrets/{secret_name}",
        "Set a secret",
        201,
        "SetAppSecretResponse",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/secrets/{secret_name}",
        "Delete a secret",
        200,
        "DeleteAppSecretResponse",
    ),
    (
        "get",
        "/v1/apps/{app_name}/certificates",
        "List certificates",
        200,
        "listCertificatesResponse",
    ),
    (
        "post",
        "/v1/apps/{app_name}/certificates/custom",
        "Upload a certificate",
        201,
        "CertificateDetail",
    ),
    (
        "get",
        "/v1/apps/{app_name}/certificates/{hostname}",
        "Get a certificate",
        200,
        "CertificateDetail",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/certificates/{hostname}",
        "Remove a certificate",
        204,
        "",
    ),
    (
        "get",
        "/v1/apps/{app_name}/ip_assignments",
        "List flycast addresses",
        200,
        "listIPAssignmentsResponse",
    ),
    (
        "post",
        "/v1/apps/{app_name}/ip_assignments",
        "Assign a flycast address",
        200,
        "AssignIPResponse",
    ),
    (
        "delete",
        "/v1/apps/{app_name}/ip_assignments/{ip}",
        "Release an address",
        204,
        "",
    ),
    (
        "get",
        "/v1/orgs/{org_slug}/machines",
        "List the org's machines",
        200,
        "OrgMachinesResponse",
    ),
    (
        "get",
        "/v1/platform/regions",
        "List regions",
        200,
        "main.regionResponse",
    ),
    (
        "post",
        "/v1/platform/placements",
        "Preview placement",
        200,
        "main.getPlacementsResponse",
    ),
    (
        "get",
        "/v1/tokens/current",
        "Describe the caller's token",
        200,
        "",
    ),
];

/// The document: every implemented operation, with its path parameters,
/// success answer and the errors every operation may answer.
pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, status, schema) in OPS {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut ok = json!({ "description": "OK" });
        if !schema.is_empty() {
            ok["x-fly-schema"] = (*schema).into();
            ok["content"] = json!({ "application/json": { "schema": { "type": if schema.ends_with("[]") { "array" } else { "object" } } } });
        }
        let error = json!({ "description": "{\"error\": \"...\"}", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } } });
        let op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                status.to_string(): ok,
                "400": error, "401": error, "404": error, "409": error, "412": error, "429": error,
            },
        });
        let entry = paths
            .entry((*path).to_string())
            .or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.0.1",
        "info": {
            "title": "Hangar Machines API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The subset of Fly's Machines API that Hangar implements, with Fly's JSON shapes.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "ErrorResponse": {
                    "type": "object",
                    "properties": { "error": { "type": "string" }, "status": { "type": "string" } },
                },
            },
        },
    })
}

/// `GET /openapi.json` (no token needed).
pub async fn serve() -> Json<Value> {
    Json(document())
}
