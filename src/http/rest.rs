//! Bayard's own REST routes, the shapes of the original v0.8 gateway (so its scripts keep
//! working), answered with the JSON the CLI prints.
//!
//! | route | does |
//! |---|---|
//! | `GET/PUT/DELETE /v1/documents/{id}` | get, put (the body is the document), delete |
//! | `PUT/DELETE /v1/documents` | bulk put / delete, NDJSON (`_id` in every line) |
//! | `GET (or POST) /v1/commit`, `/v1/rollback`, `/v1/merge` | as the CLI commands |
//! | `GET /v1/schema`, `/v1/status`, `/v1/peers` | as the CLI commands |
//! | `POST /v1/search` | the query string is the body; `from`, `limit`, `exclude_count`, `exclude_docs`, `facet_field`, `facet_prefix`, `sort`, `consistency` are parameters |
//! | `GET/POST /v1/keys`, `DELETE /v1/keys/{id}` | API keys (admins) |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::{body_text, deadline, ndjson_lines, read_body, request_id, HttpState};
use crate::client::{receipt_json, status_json, SearchResult, WriteReceipt};
use crate::index::{FacetRequest, SearchRequest, SortSpec, ID_FIELD};
use crate::protocol::{AdminRequest, AdminResponse, ClientRequest, ClientResponse, Consistency, DocumentInput};

type Shared = State<Arc<HttpState>>;

pub(crate) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/v1/documents/{id}", get(get_document).put(put_document).delete(delete_document))
        .route("/v1/documents", put(bulk_put).delete(bulk_delete))
        .route("/v1/commit", get(commit).post(commit))
        .route("/v1/rollback", get(rollback).post(rollback))
        .route("/v1/merge", get(merge).post(merge))
        .route("/v1/schema", get(schema))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/search", axum::routing::post(search).get(search))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", axum::routing::delete(revoke_key))
}

/// Sends a write and turns its answer into the CLI's receipt.
pub(crate) async fn write(state: &HttpState, caller: &Caller, request: ClientRequest) -> ApiResult<WriteReceipt> {
    match state.backend.client(caller, request, deadline(state)).await? {
        ClientResponse::Written { operations, applied_index, duplicate, .. } => {
            // What a caller wrote through this node is what it reads from it next.
            state.backend.wait_applied(applied_index, deadline(state)).await?;
            Ok(WriteReceipt { operations, applied_index, duplicate })
        }
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn unexpected(answer: &ClientResponse) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "internal",
        "exception",
        format!("the node answered with an unexpected response: {answer:?}"),
    )
}

async fn get_document(State(state): Shared, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match state.backend.client(&caller, ClientRequest::Get { id: id.clone() }, deadline(&state)).await? {
        ClientResponse::Document { document: Some(document) } => {
            let fields: Value = serde_json::from_str(&document.fields_json).unwrap_or(Value::Null);
            Ok(Json(json!({"id": document.id, "fields": fields})))
        }
        ClientResponse::Document { document: None } => Err(ApiError::not_found(format!("no document with id `{id}`"))),
        other => Err(unexpected(&other)),
    }
}

async fn put_document(
    State(state): Shared,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let document_json = body_text(&bytes)?.trim().to_string();
    let request = ClientRequest::Put {
        documents: vec![DocumentInput { id: Some(id), document_json }],
        request_id: request_id(&headers)?,
    };
    Ok(Json(receipt_json(write(&state, &caller, request).await?)))
}

async fn delete_document(
    State(state): Shared,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let request = ClientRequest::Delete { ids: vec![id], request_id: request_id(&headers)? };
    Ok(Json(receipt_json(write(&state, &caller, request).await?)))
}

/// Most documents per write request: the same chunks the CLI sends.
pub(crate) const CHUNK_DOCUMENTS: usize = 1000;

/// Writes documents in chunks under the frame limit, in order; the error of a chunk names the
/// line of the body it came from.
async fn put_in_chunks(
    state: &HttpState,
    caller: &Caller,
    documents: Vec<(usize, DocumentInput)>,
    first_request_id: crate::protocol::RequestId,
) -> ApiResult<WriteReceipt> {
    let chunk_limit_bytes = state.config.max_frame_bytes / 2;
    let mut total = WriteReceipt { operations: 0, applied_index: 0, duplicate: false };
    let mut chunk: Vec<(usize, DocumentInput)> = Vec::new();
    let mut chunk_bytes = 0;
    let mut chunk_number = 0_u64;
    let mut remaining = documents.into_iter().peekable();
    while let Some((line, document)) = remaining.next() {
        chunk_bytes += document.document_json.len() + 16;
        chunk.push((line, document));
        let next_bytes = remaining.peek().map_or(0, |(_, next)| next.document_json.len() + 16);
        if chunk.len() >= CHUNK_DOCUMENTS || chunk_bytes + next_bytes > chunk_limit_bytes || remaining.peek().is_none()
        {
            let (lines, documents): (Vec<usize>, Vec<DocumentInput>) = std::mem::take(&mut chunk).into_iter().unzip();
            let request_id = super::derived_request_id(first_request_id, chunk_number);
            let receipt = write(state, caller, ClientRequest::Put { documents, request_id })
                .await
                .map_err(|error| name_the_line(error, &lines))?;
            total.operations += receipt.operations;
            total.applied_index = receipt.applied_index;
            total.duplicate |= receipt.duplicate;
            chunk_bytes = 0;
            chunk_number += 1;
        }
    }
    Ok(total)
}

/// "document 3 (id `x`): …" becomes "line 7 (id `x`): …".
fn name_the_line(mut error: ApiError, lines: &[usize]) -> ApiError {
    if let Some(rest) = error.message.strip_prefix("document ") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Some(line) = digits.parse::<usize>().ok().and_then(|position| lines.get(position.wrapping_sub(1))) {
            error.message = format!("line {line}{}", &rest[digits.len()..]);
        }
    }
    error
}

async fn bulk_put(
    State(state): Shared,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let text = body_text(&bytes)?;
    let mut documents = Vec::new();
    for (line, document) in ndjson_lines(text) {
        let object: serde_json::Map<String, Value> = serde_json::from_str(document)
            .map_err(|error| ApiError::bad_request(format!("line {line}: not a JSON object: {error}")))?;
        if !matches!(object.get(ID_FIELD), Some(Value::String(id)) if !id.is_empty()) {
            return Err(ApiError::bad_request(format!("line {line}: the document has no \"{ID_FIELD}\" string")));
        }
        documents.push((line, DocumentInput { id: None, document_json: document.to_string() }));
    }
    if documents.is_empty() {
        return Err(ApiError::bad_request("the body holds no documents (one JSON object per line)"));
    }
    Ok(Json(receipt_json(put_in_chunks(&state, &caller, documents, request_id(&headers)?).await?)))
}

async fn bulk_delete(
    State(state): Shared,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let text = body_text(&bytes)?;
    let mut ids = Vec::new();
    for (line, entry) in ndjson_lines(text) {
        let value: Value = serde_json::from_str(entry)
            .map_err(|error| ApiError::bad_request(format!("line {line}: not JSON: {error}")))?;
        match value.get(ID_FIELD) {
            Some(Value::String(id)) if !id.is_empty() => ids.push(id.clone()),
            _ => return Err(ApiError::bad_request(format!("line {line}: no \"{ID_FIELD}\" string"))),
        }
    }
    if ids.is_empty() {
        return Err(ApiError::bad_request("the body holds no ids (one {\"_id\": …} per line)"));
    }
    let first_request_id = request_id(&headers)?;
    let mut total = WriteReceipt { operations: 0, applied_index: 0, duplicate: false };
    for (number, chunk) in ids.chunks(crate::protocol::MAX_OPERATIONS_PER_REQUEST).enumerate() {
        let request_id = super::derived_request_id(first_request_id, number as u64);
        let receipt = write(&state, &caller, ClientRequest::Delete { ids: chunk.to_vec(), request_id }).await?;
        total.operations += receipt.operations;
        total.applied_index = receipt.applied_index;
        total.duplicate |= receipt.duplicate;
    }
    Ok(Json(receipt_json(total)))
}

async fn commit(State(state): Shared, caller: Caller, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let request = ClientRequest::Commit { request_id: request_id(&headers)? };
    Ok(Json(receipt_json(write(&state, &caller, request).await?)))
}

async fn rollback(State(state): Shared, caller: Caller, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let request = ClientRequest::Rollback { request_id: request_id(&headers)? };
    Ok(Json(receipt_json(write(&state, &caller, request).await?)))
}

async fn merge(State(state): Shared, caller: Caller, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let request = ClientRequest::Merge { request_id: request_id(&headers)? };
    Ok(Json(receipt_json(write(&state, &caller, request).await?)))
}

async fn schema(State(state): Shared, caller: Caller) -> ApiResult<Json<Value>> {
    match state.backend.client(&caller, ClientRequest::Schema, deadline(&state)).await? {
        ClientResponse::Schema { schema_json } => Ok(Json(serde_json::from_str(&schema_json).unwrap_or(Value::Null))),
        other => Err(unexpected(&other)),
    }
}

async fn status(State(state): Shared, caller: Caller) -> ApiResult<Json<Value>> {
    match state.backend.admin(&caller, AdminRequest::Status, deadline(&state)).await? {
        AdminResponse::Status(status) => Ok(Json(status_json(&status))),
        other => Err(ApiError::bad_request(format!("unexpected answer {other:?}"))),
    }
}

async fn peers(State(state): Shared, caller: Caller) -> ApiResult<Json<Value>> {
    match state.backend.admin(&caller, AdminRequest::Peers, deadline(&state)).await? {
        AdminResponse::Peers(peers) => {
            let object: serde_json::Map<String, Value> =
                peers.into_iter().map(|(node_id, address)| (node_id.to_string(), Value::String(address))).collect();
            Ok(Json(Value::Object(object)))
        }
        other => Err(ApiError::bad_request(format!("unexpected answer {other:?}"))),
    }
}

fn flag(value: &str) -> bool {
    matches!(value, "" | "true" | "1" | "yes")
}

/// `POST /v1/search`: the query string is the body (or `query=` for a GET); options are
/// parameters, as the v0.8 gateway took them (`facet_prefix` may repeat, also as `facet_prefix[]`).
async fn search(
    State(state): Shared,
    caller: Caller,
    Query(parameters): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let mut request = SearchRequest { query: body_text(&bytes)?.trim().to_string(), limit: 10, ..Default::default() };
    let mut facet_fields = Vec::new();
    let mut facet_prefixes = Vec::new();
    let mut consistency = Consistency::Local;
    let number = |name: &str, value: &str| {
        value.parse::<usize>().map_err(|_| ApiError::bad_request(format!("parameter `{name}` must be a number")))
    };
    for (name, value) in &parameters {
        match name.as_str() {
            "query" if request.query.is_empty() => request.query = value.clone(),
            "from" => request.from = number(name, value)?,
            "limit" => request.limit = number(name, value)?,
            "exclude_count" => request.exclude_count = flag(value),
            "exclude_docs" => request.exclude_docs = flag(value),
            "facet_field" => facet_fields.push(value.clone()),
            "facet_prefix" | "facet_prefix[]" => facet_prefixes.push(value.clone()),
            "sort" => {
                let (field, descending) = match value.strip_prefix('-') {
                    Some(field) => (field, true),
                    None => (value.strip_prefix('+').unwrap_or(value), false),
                };
                request.sort = Some(SortSpec { field: field.to_string(), descending });
            }
            "consistency" => {
                consistency = match value.as_str() {
                    "local" => Consistency::Local,
                    "leader" => Consistency::Leader,
                    "linearizable" => Consistency::Linearizable,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "unknown consistency `{other}`; use local, leader or linearizable"
                        )))
                    }
                }
            }
            other => return Err(ApiError::bad_request(format!("unknown search parameter `{other}`"))),
        }
    }
    request.facets = facet_fields
        .into_iter()
        .filter(|field| !field.is_empty())
        .map(|field| FacetRequest { field, prefixes: facet_prefixes.clone() })
        .collect();
    match state.backend.client(&caller, ClientRequest::Search { request, consistency }, deadline(&state)).await? {
        ClientResponse::Search { response, node_id, applied_index } => {
            let result = SearchResult::from_response(response, node_id, applied_index);
            Ok(Json(serde_json::to_value(&result).unwrap_or(Value::Null)))
        }
        other => Err(unexpected(&other)),
    }
}

async fn list_keys(State(state): Shared, caller: Caller) -> ApiResult<Json<Value>> {
    match state.backend.admin(&caller, AdminRequest::ListKeys, deadline(&state)).await? {
        AdminResponse::Keys(keys) => Ok(Json(json!({"keys": keys}))),
        other => Err(ApiError::bad_request(format!("unexpected answer {other:?}"))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default = "client_role")]
    role: String,
    #[serde(default)]
    read_only: bool,
}

fn client_role() -> String {
    "client".to_string()
}

/// `POST /v1/keys` `{"name": "web", "role": "client", "read_only": false}`: the answer holds the
/// key's secret, the only time it is shown.
async fn create_key(
    State(state): Shared,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let new: NewKey = serde_json::from_slice(&bytes)
        .map_err(|error| ApiError::bad_request(format!("expected {{\"name\", \"role\", \"read_only\"}}: {error}")))?;
    let role = crate::access::KeyRole::parse(&new.role).map_err(ApiError::bad_request)?;
    let (record, secret) = crate::access::new_key(&new.name, role, new.read_only).map_err(ApiError::bad_request)?;
    let id = record.id.clone();
    let request = AdminRequest::CreateKey { record, request_id: request_id(&headers)? };
    match state.backend.admin(&caller, request, deadline(&state)).await? {
        // A retry: its first attempt made a key (with a secret drawn then, and shown then); this
        // attempt's secret was never stored, so it is not shown.
        AdminResponse::KeyChanged { duplicate: true, .. } => Err(ApiError::conflict(
            "an earlier attempt of this request (same X-Bayard-Request-Id) created the key; its secret was shown \
             once, to that attempt: revoke it (GET /v1/keys lists it) if the answer was lost",
        )),
        AdminResponse::KeyChanged { .. } => Ok(Json(key_created_json(&id, &new.name, role, new.read_only, &secret))),
        other => Err(ApiError::bad_request(format!("unexpected answer {other:?}"))),
    }
}

/// What creating a key answers (the CLI prints the same).
pub fn key_created_json(id: &str, name: &str, role: crate::access::KeyRole, read_only: bool, secret: &str) -> Value {
    json!({
        "id": id,
        "name": name,
        "role": role.name(),
        "read_only": read_only,
        "key": secret,
        "encoded": crate::access::encode_api_key(id, secret),
    })
}

async fn revoke_key(
    State(state): Shared,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let request = AdminRequest::RevokeKey { id: id.clone(), request_id: request_id(&headers)? };
    match state.backend.admin(&caller, request, deadline(&state)).await? {
        AdminResponse::KeyChanged { applied_index, .. } => {
            Ok(Json(json!({"status": "OK", "revoked": id, "applied_index": applied_index})))
        }
        other => Err(ApiError::bad_request(format!("unexpected answer {other:?}"))),
    }
}
