//! An Elasticsearch-compatible subset, faithful in request and response shapes (the ES 8
//! reference), so Elasticsearch's own client libraries and tools work against a node unchanged.
//!
//! The node has one index; paths name it by `--index-name` (`_all` and `*` name it too), any
//! other name is `404 index_not_found_exception`. What is supported, and what answers 400 naming
//! what is not, is listed in `docs/http_api.md`. Searches are the JSON query language of
//! `index::JsonSearchRequest`; this file only moves URL parameters into the body and wraps the
//! answer in Elasticsearch's envelope.
//!
//! Documents have no versions in bayard: `_version` is always 1, `_seq_no` is the log index the
//! write was applied at, and `result` (`created` / `updated`) is judged against this node's
//! committed index just before the write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::rest::{unexpected, write, CHUNK_DOCUMENTS};
use super::{
    body_text, deadline, derived_document_id, derived_request_id, ndjson_lines, read_body, request_id, HttpState,
    ELASTICSEARCH_COMPATIBLE_VERSION,
};
use crate::client::WriteReceipt;
use crate::index::ID_FIELD;
use crate::protocol::{ClientRequest, ClientResponse, Consistency, DocumentInput, RequestId};

type Shared = State<Arc<HttpState>>;
type Parameters = Query<Vec<(String, String)>>;

pub(crate) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/", get(info))
        .route("/_cluster/health", get(health))
        .route("/_bulk", post(bulk).put(bulk))
        .route("/_search", get(search_all).post(search_all))
        .route("/_count", get(count_all).post(count_all))
        .route("/_msearch", get(msearch_all).post(msearch_all))
        .route("/_refresh", get(refresh_all).post(refresh_all))
        .route("/{index}", get(index_info).put(create_index))
        .route("/{index}/_mapping", get(mapping))
        .route("/{index}/_doc", post(put_new_document))
        .route("/{index}/_doc/{id}", get(get_document).put(put_document).post(put_document).delete(delete_document))
        .route("/{index}/_create/{id}", axum::routing::put(create_document).post(create_document))
        .route("/{index}/_bulk", post(bulk_in).put(bulk_in))
        .route("/{index}/_refresh", get(refresh).post(refresh))
        .route("/{index}/_search", get(search).post(search))
        .route("/{index}/_count", get(count).post(count))
        .route("/{index}/_msearch", get(msearch).post(msearch))
}

/// Elasticsearch clients (8.x) refuse a server that does not name the product in this header.
pub(crate) async fn product_header(mut response: Response) -> Response {
    response.headers_mut().insert("x-elastic-product", HeaderValue::from_static("Elasticsearch"));
    response
}

pub(crate) async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "resource_not_found_exception",
        format!("no handler found for uri [{}] and method [{method}]; see docs/http_api.md for the routes", uri.path()),
    )
}

/// The index a path names must be this node's.
fn check_index(state: &HttpState, index: &str) -> ApiResult<()> {
    if index == state.config.index_name || index == "_all" || index == "*" {
        Ok(())
    } else {
        Err(ApiError::index_not_found(index))
    }
}

fn shards(total: usize) -> Value {
    json!({"total": total, "successful": total, "skipped": 0, "failed": 0})
}

fn member_count(state: &HttpState) -> usize {
    state.backend.local_status().members.len().max(1)
}

fn took(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// Runs blocking work on the node's index (local reads that are no request of their own).
async fn on_index<T: Send + 'static>(
    state: &HttpState,
    work: impl FnOnce(&crate::index::SearchIndex) -> T + Send + 'static,
) -> ApiResult<T> {
    let index = state.backend.index();
    tokio::task::spawn_blocking(move || work(&index))
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "exception", error.to_string()))
}

/// The parameter `name`, when given.
fn parameter<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

/// Refuses parameters this subset does not know; `known` lists the route's own.
fn check_parameters(parameters: &[(String, String)], known: &[&str]) -> ApiResult<()> {
    // Parameters every route accepts (clients send them) and that change nothing here.
    const HARMLESS: [&str; 8] = [
        "pretty",
        "human",
        "error_trace",
        "filter_path",
        "timeout",
        "master_timeout",
        "wait_for_active_shards",
        "format",
    ];
    for (name, _) in parameters {
        if !known.contains(&name.as_str()) && !HARMLESS.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!("request contains unrecognized parameter: [{name}]")));
        }
    }
    Ok(())
}

/// `refresh=true|wait_for` makes the write visible before the answer: bayard commits.
fn wants_refresh(parameters: &[(String, String)]) -> ApiResult<bool> {
    match parameter(parameters, "refresh") {
        None | Some("false") => Ok(false),
        Some("" | "true" | "wait_for") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!("refresh must be true, false or wait_for, not [{other}]"))),
    }
}

/// How long a refresh waits for the other members to apply its commit: a member that is down
/// must not hold the answer for the whole request timeout.
const REFRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A refresh: a commit, answered once every live member has applied it, so what was written is
/// searchable on whichever node the caller asks next (as Elasticsearch refreshes every copy).
/// Returns how many members show it.
async fn commit(state: &HttpState, caller: &Caller) -> ApiResult<usize> {
    let receipt = write(state, caller, ClientRequest::Commit { request_id: RequestId::random() }).await?;
    let deadline = Instant::now() + REFRESH_WAIT.min(state.config.request_timeout);
    Ok(state.backend.members_applied(receipt.applied_index, deadline).await)
}

async fn info(State(state): Shared, _caller: Caller) -> Json<Value> {
    let node_id = state.backend.node_id();
    Json(json!({
        "name": format!("node-{node_id}"),
        "cluster_name": "bayard",
        "cluster_uuid": state.backend.cluster_id().unwrap_or_else(|| "_na_".to_string()),
        "version": {
            "number": ELASTICSEARCH_COMPATIBLE_VERSION,
            "build_flavor": "default",
            "build_type": "bayard",
            "build_hash": "",
            "build_date": "",
            "build_snapshot": false,
            "lucene_version": "tantivy-0.27",
            "minimum_wire_compatibility_version": "7.17.0",
            "minimum_index_compatibility_version": "7.0.0",
            "distribution": "bayard",
            "bayard_version": env!("CARGO_PKG_VERSION"),
        },
        "tagline": "bayard: distributed full-text search, an Elasticsearch-compatible subset",
    }))
}

async fn health(State(state): Shared, _caller: Caller) -> Json<Value> {
    let status = state.backend.local_status();
    let members = status.members.len().max(1);
    let alive = status.members.iter().filter(|member| member.state == "alive").count();
    let color = if status.leader.is_none() {
        "red"
    } else if alive < status.members.len() {
        "yellow"
    } else {
        "green"
    };
    let unassigned = members.saturating_sub(alive.max(1));
    Json(json!({
        "cluster_name": "bayard",
        "status": color,
        "timed_out": false,
        "number_of_nodes": members,
        "number_of_data_nodes": members,
        "active_primary_shards": 1,
        "active_shards": members - unassigned,
        "relocating_shards": 0,
        "initializing_shards": 0,
        "unassigned_shards": unassigned,
        "delayed_unassigned_shards": 0,
        "number_of_pending_tasks": 0,
        "number_of_in_flight_fetch": 0,
        "task_max_waiting_in_queue_millis": 0,
        "active_shards_percent_as_number": 100.0 * (members - unassigned) as f64 / members as f64,
    }))
}

/// The schema as an Elasticsearch mapping.
fn mapping_properties(schema: &tantivy::schema::Schema) -> Value {
    use tantivy::schema::FieldType;
    let mut properties = Map::new();
    for (_, entry) in schema.fields() {
        if entry.name() == ID_FIELD {
            continue;
        }
        let kind = match entry.field_type() {
            FieldType::Str(options) => match options.get_indexing_options().map(|indexing| indexing.tokenizer()) {
                Some("raw") | None => "keyword",
                Some(_) => "text",
            },
            FieldType::U64(_) => "unsigned_long",
            FieldType::I64(_) => "long",
            FieldType::F64(_) => "double",
            FieldType::Bool(_) => "boolean",
            FieldType::Date(_) => "date",
            FieldType::Facet(_) => "keyword",
            FieldType::Bytes(_) => "binary",
            FieldType::JsonObject(_) => "object",
            FieldType::IpAddr(_) => "ip",
            _ => "object",
        };
        properties.insert(entry.name().to_string(), json!({"type": kind}));
    }
    Value::Object(properties)
}

async fn index_info(State(state): Shared, _caller: Caller, Path(index): Path<String>) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    let properties = on_index(&state, |index| mapping_properties(index.schema())).await?;
    let replicas = member_count(&state) - 1;
    let name = state.config.index_name.clone();
    Ok(Json(json!({name.clone(): {
        "aliases": {},
        "mappings": {"properties": properties},
        "settings": {"index": {
            "number_of_shards": "1",
            "number_of_replicas": replicas.to_string(),
            "provided_name": name,
            "uuid": state.backend.cluster_id().unwrap_or_default(),
        }},
    }})))
}

async fn create_index(State(state): Shared, _caller: Caller, Path(index): Path<String>) -> ApiError {
    if check_index(&state, &index).is_ok() {
        let mut error = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "resource_already_exists_exception",
            format!("index [{index}] already exists (a bayard node has one index, made from its schema file)"),
        );
        error.extra = vec![("index", index)];
        return error;
    }
    ApiError::bad_request(format!(
        "cannot create index [{index}]: a bayard node has one index, [{}], made from its schema file",
        state.config.index_name
    ))
}

async fn mapping(State(state): Shared, _caller: Caller, Path(index): Path<String>) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    let properties = on_index(&state, |index| mapping_properties(index.schema())).await?;
    Ok(Json(json!({state.config.index_name.clone(): {"mappings": {"properties": properties}}})))
}

/// A document's stored fields, as `_source`.
async fn stored_source(state: &HttpState, caller: &Caller, id: &str) -> ApiResult<Option<Map<String, Value>>> {
    match state.backend.client(caller, ClientRequest::Get { id: id.to_string() }, deadline(state)).await? {
        ClientResponse::Document { document } => Ok(document.map(|document| source_of(&document.fields_json))),
        other => Err(unexpected(&other)),
    }
}

/// Stored fields as JSON text → `_source` (always an object).
fn source_of(fields_json: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(fields_json) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    }
}

/// The JSON object of a request body; `_id` inside it is refused as Elasticsearch does.
fn source_object(bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|error| ApiError::bad_request(format!("failed to parse the document: {error}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request("the document must be a JSON object"));
    };
    if object.contains_key(ID_FIELD) {
        return Err(ApiError::bad_request(
            "Field [_id] is a metadata field and cannot be added inside a document; use the id in the path",
        ));
    }
    Ok(object)
}

fn write_answer(state: &HttpState, id: &str, result: &str, receipt: &WriteReceipt) -> Value {
    let copies = member_count(state);
    json!({
        "_index": state.config.index_name,
        "_id": id,
        "_version": 1,
        "result": result,
        "_shards": {"total": copies, "successful": copies, "failed": 0},
        "_seq_no": receipt.applied_index,
        "_primary_term": 1,
    })
}

async fn put_source(
    state: &HttpState,
    caller: &Caller,
    id: &str,
    source: Map<String, Value>,
    request_id: RequestId,
) -> ApiResult<WriteReceipt> {
    let document_json = Value::Object(source).to_string();
    let request =
        ClientRequest::Put { documents: vec![DocumentInput { id: Some(id.to_string()), document_json }], request_id };
    write(state, caller, request).await.map_err(strip_document_position)
}

/// "document 3 (id `x`): reason" names a position in the write request, which means nothing to
/// the caller of one document or one bulk item: the reason alone is said.
fn strip_document_position(mut error: ApiError) -> ApiError {
    if let Some(rest) = error.message.strip_prefix("document ") {
        if rest.starts_with(|character: char| character.is_ascii_digit()) {
            if let Some((_, reason)) = rest.split_once(": ") {
                error.message = reason.to_string();
                error.elastic_type = "document_parsing_exception";
            }
        }
    }
    error
}

/// `PUT /{index}/_doc/{id}` (`op_type=create` refuses an existing id).
async fn put_document(
    State(state): Shared,
    caller: Caller,
    Path((index, id)): Path<(String, String)>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    check_index(&state, &index)?;
    check_parameters(&parameters, &["refresh", "op_type", "routing", "pipeline"])?;
    let create = match parameter(&parameters, "op_type") {
        None | Some("index") => false,
        Some("create") => true,
        Some(other) => return Err(ApiError::bad_request(format!("op_type must be index or create, not [{other}]"))),
    };
    let write = DocumentWrite { id: &id, create, request_id: request_id(&headers)? };
    index_document(&state, &caller, write, &parameters, &headers, body).await
}

async fn create_document(
    State(state): Shared,
    caller: Caller,
    Path((index, id)): Path<(String, String)>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    check_index(&state, &index)?;
    check_parameters(&parameters, &["refresh", "routing", "pipeline"])?;
    let write = DocumentWrite { id: &id, create: true, request_id: request_id(&headers)? };
    index_document(&state, &caller, write, &parameters, &headers, body).await
}

/// `POST /{index}/_doc`: the node draws the id, as Elasticsearch does.
async fn put_new_document(
    State(state): Shared,
    caller: Caller,
    Path(index): Path<String>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    check_index(&state, &index)?;
    check_parameters(&parameters, &["refresh", "routing", "pipeline", "op_type"])?;
    // Drawn from the request id, so a retry under the same `X-Bayard-Request-Id` names the
    // document its first attempt wrote.
    let request_id = request_id(&headers)?;
    let id = derived_document_id(request_id, 0);
    index_document(&state, &caller, DocumentWrite { id: &id, create: false, request_id }, &parameters, &headers, body)
        .await
}

/// One document to index: its id, whether an existing one is a conflict, the write's request id.
struct DocumentWrite<'a> {
    id: &'a str,
    create: bool,
    request_id: RequestId,
}

async fn index_document(
    state: &HttpState,
    caller: &Caller,
    write: DocumentWrite<'_>,
    parameters: &[(String, String)],
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let DocumentWrite { id, create, request_id } = write;
    let refresh = wants_refresh(parameters)?;
    let (bytes, _permit) = read_body(state, headers, body).await?;
    let source = source_object(&bytes)?;
    let existed = stored_source(state, caller, id).await?.is_some();
    if create && existed {
        return Err(ApiError::conflict(format!("[{id}]: version conflict, document already exists")));
    }
    let receipt = put_source(state, caller, id, source, request_id).await?;
    if refresh {
        commit(state, caller).await?;
    }
    let (status, result) = if existed { (StatusCode::OK, "updated") } else { (StatusCode::CREATED, "created") };
    Ok((status, Json(write_answer(state, id, result, &receipt))).into_response())
}

async fn get_document(
    State(state): Shared,
    caller: Caller,
    Path((index, id)): Path<(String, String)>,
    Query(parameters): Parameters,
) -> ApiResult<Response> {
    check_index(&state, &index)?;
    check_parameters(&parameters, &["realtime", "refresh", "routing", "preference", "_source", "stored_fields"])?;
    let name = state.config.index_name.clone();
    Ok(match stored_source(&state, &caller, &id).await? {
        Some(source) => Json(json!({
            "_index": name, "_id": id, "_version": 1, "_seq_no": 0, "_primary_term": 1, "found": true,
            "_source": source,
        }))
        .into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"_index": name, "_id": id, "found": false}))).into_response(),
    })
}

async fn delete_document(
    State(state): Shared,
    caller: Caller,
    Path((index, id)): Path<(String, String)>,
    Query(parameters): Parameters,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_index(&state, &index)?;
    check_parameters(&parameters, &["refresh", "routing"])?;
    let refresh = wants_refresh(&parameters)?;
    let existed = stored_source(&state, &caller, &id).await?.is_some();
    let request = ClientRequest::Delete { ids: vec![id.clone()], request_id: request_id(&headers)? };
    let receipt = write(&state, &caller, request).await?;
    if refresh {
        commit(&state, &caller).await?;
    }
    let (status, result) = if existed { (StatusCode::OK, "deleted") } else { (StatusCode::NOT_FOUND, "not_found") };
    Ok((status, Json(write_answer(&state, &id, result, &receipt))).into_response())
}

async fn refresh(State(state): Shared, caller: Caller, Path(index): Path<String>) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    let refreshed = commit(&state, &caller).await?;
    let total = member_count(&state);
    Ok(Json(json!({"_shards": {"total": total, "successful": refreshed, "failed": total.saturating_sub(refreshed)}})))
}

async fn refresh_all(State(state): Shared, caller: Caller) -> ApiResult<Json<Value>> {
    let index = state.config.index_name.clone();
    refresh(State(state), caller, Path(index)).await
}

// ---------------------------------------------------------------------------------------------
// _bulk

/// One action of a bulk body.
#[derive(Debug)]
enum BulkAction {
    Index { id: String, source: Map<String, Value>, create: bool },
    Update { id: String, doc: Map<String, Value>, upsert: Option<Map<String, Value>>, doc_as_upsert: bool },
    Delete { id: String },
}

/// A parsed item: its action name (for the answer) and the action or why it cannot be done.
struct BulkItem {
    kind: &'static str,
    id: String,
    action: Result<BulkAction, ApiError>,
}

/// Reads the action/source line pairs. A malformed action line refuses the whole body (as
/// Elasticsearch does: the pairing is lost); a bad item only fails that item.
fn parse_bulk(
    state: &HttpState,
    text: &str,
    default_index: Option<&str>,
    request_id: RequestId,
) -> ApiResult<Vec<BulkItem>> {
    let mut lines = ndjson_lines(text);
    let mut items = Vec::new();
    let max_items = state.config.max_bulk_items;
    while let Some((line, action_line)) = lines.next() {
        if items.len() >= max_items {
            crate::telemetry::metrics::record_limit_refusal("bulk_items");
            return Err(ApiError::bad_request(format!(
                "the bulk body has more than {max_items} actions (--http-max-bulk-items); send it in parts"
            )));
        }
        let action: Value = serde_json::from_str(action_line)
            .map_err(|error| ApiError::bad_request(format!("line {line}: malformed action: {error}")))?;
        let Some((kind, metadata)) =
            action.as_object().filter(|object| object.len() == 1).and_then(|o| o.iter().next())
        else {
            return Err(ApiError::bad_request(format!(
                "line {line}: an action is one of {{\"index\"|\"create\"|\"update\"|\"delete\": {{…}}}}"
            )));
        };
        let kind: &'static str = match kind.as_str() {
            "index" => "index",
            "create" => "create",
            "update" => "update",
            "delete" => "delete",
            other => return Err(ApiError::bad_request(format!("line {line}: unknown bulk action [{other}]"))),
        };
        let index = metadata.get("_index").and_then(Value::as_str).or(default_index);
        let id = metadata.get("_id").and_then(|id| match id {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        });
        let source = if kind == "delete" {
            None
        } else {
            let (_, source_line) = lines
                .next()
                .ok_or_else(|| ApiError::bad_request(format!("line {line}: the {kind} action has no source line")))?;
            Some(source_line)
        };
        let index_check = match index {
            Some(index) => check_index(state, index),
            None => Err(ApiError::bad_request(format!("line {line}: no _index in the action or the path"))),
        };
        let metadata_id = id.clone().unwrap_or_default();
        let position = items.len();
        let action =
            index_check.and_then(|()| bulk_action(kind, id, source, || derived_document_id(request_id, position)));
        let item_id = match &action {
            Ok(BulkAction::Index { id, .. } | BulkAction::Update { id, .. } | BulkAction::Delete { id }) => id.clone(),
            Err(_) => metadata_id,
        };
        items.push(BulkItem { kind, id: item_id, action });
    }
    Ok(items)
}

fn bulk_action(
    kind: &'static str,
    id: Option<String>,
    source: Option<&str>,
    new_id: impl FnOnce() -> String,
) -> ApiResult<BulkAction> {
    let needs_id = || ApiError::bad_request(format!("the {kind} action needs an _id"));
    let object = |text: &str| -> ApiResult<Map<String, Value>> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => Ok(object),
            Ok(_) => Err(ApiError::bad_request("the source must be a JSON object")),
            Err(error) => Err(ApiError::bad_request(format!("failed to parse the source: {error}"))),
        }
    };
    match kind {
        "delete" => Ok(BulkAction::Delete { id: id.ok_or_else(needs_id)? }),
        "update" => {
            let mut body = object(source.unwrap_or("{}"))?;
            if body.contains_key("script") {
                return Err(ApiError::bad_request("scripted updates are not supported; send a partial `doc`"));
            }
            let doc = match body.remove("doc") {
                Some(Value::Object(doc)) => doc,
                Some(_) => return Err(ApiError::bad_request("`doc` must be an object")),
                None => Map::new(),
            };
            let upsert = match body.remove("upsert") {
                Some(Value::Object(upsert)) => Some(upsert),
                Some(_) => return Err(ApiError::bad_request("`upsert` must be an object")),
                None => None,
            };
            let doc_as_upsert = matches!(body.remove("doc_as_upsert"), Some(Value::Bool(true)));
            body.remove("detect_noop");
            if let Some(key) = body.keys().next() {
                return Err(ApiError::bad_request(format!("update option [{key}] is not supported")));
            }
            Ok(BulkAction::Update { id: id.ok_or_else(needs_id)?, doc, upsert, doc_as_upsert })
        }
        _ => {
            let source = object(source.unwrap_or("{}"))?;
            if source.contains_key(ID_FIELD) {
                return Err(ApiError::bad_request(
                    "Field [_id] is a metadata field and cannot be added inside a document",
                ));
            }
            let create = kind == "create";
            let id = match id {
                Some(id) => id,
                None if !create => new_id(),
                None => return Err(needs_id()),
            };
            Ok(BulkAction::Index { id, source, create })
        }
    }
}

/// An item's action name, id, and status with `result` (or its error).
type ItemOutcome = (&'static str, String, Result<(StatusCode, &'static str), ApiError>);

/// A write the bulk sends, with the items it carries.
enum Run {
    Puts(Vec<(usize, DocumentInput)>),
    Deletes(Vec<(usize, String)>),
}

async fn bulk(
    State(state): Shared,
    caller: Caller,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    run_bulk(&state, &caller, None, &parameters, &headers, body).await
}

async fn bulk_in(
    State(state): Shared,
    caller: Caller,
    Path(index): Path<String>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    run_bulk(&state, &caller, Some(&index), &parameters, &headers, body).await
}

/// Carries out a bulk body in order: consecutive puts go as one write (in chunks), consecutive
/// deletes as another. Each item gets its own result; a write that fails fails its items only.
async fn run_bulk(
    state: &HttpState,
    caller: &Caller,
    default_index: Option<&str>,
    parameters: &[(String, String)],
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    check_parameters(parameters, &["refresh", "routing", "pipeline", "require_alias", "_source"])?;
    let refresh = wants_refresh(parameters)?;
    let (bytes, _permit) = read_body(state, headers, body).await?;
    let first_request_id = request_id(headers)?;
    let items = parse_bulk(state, body_text(&bytes)?, default_index, first_request_id)?;

    // What the committed index holds for every id the body names, before any item; items then
    // see the effect of the items before them.
    let ids: Vec<String> = items.iter().filter(|item| item.action.is_ok()).map(|item| item.id.clone()).collect();
    let stored = state.backend.stored_documents(ids.clone(), deadline(state)).await?;
    let mut current: HashMap<String, Option<Map<String, Value>>> =
        ids.into_iter().map(|id| (id.clone(), stored.get(&id).map(|fields| source_of(fields)))).collect();

    let mut results: Vec<ItemOutcome> = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    for item in items {
        let position = results.len();
        let outcome = match item.action {
            Err(error) => Err(error),
            Ok(BulkAction::Delete { id }) => {
                let existed = current.insert(id.clone(), None).flatten().is_some();
                match runs.last_mut() {
                    Some(Run::Deletes(deletes)) => deletes.push((position, id.clone())),
                    _ => runs.push(Run::Deletes(vec![(position, id.clone())])),
                }
                Ok(if existed { (StatusCode::OK, "deleted") } else { (StatusCode::NOT_FOUND, "not_found") })
            }
            Ok(BulkAction::Index { id, source, create }) => {
                let existed = current.get(&id).is_some_and(Option::is_some);
                if create && existed {
                    Err(ApiError::conflict(format!("[{id}]: version conflict, document already exists")))
                } else {
                    push_put(&mut runs, position, &id, &source);
                    current.insert(id, Some(source));
                    Ok(if existed { (StatusCode::OK, "updated") } else { (StatusCode::CREATED, "created") })
                }
            }
            Ok(BulkAction::Update { id, doc, upsert, doc_as_upsert }) => {
                let existing = current.get(&id).cloned().flatten();
                let merged = match (existing, upsert, doc_as_upsert) {
                    (Some(mut existing), _, _) => {
                        existing.extend(doc);
                        Ok((existing, (StatusCode::OK, "updated")))
                    }
                    (None, Some(upsert), _) => Ok((upsert, (StatusCode::CREATED, "created"))),
                    (None, None, true) => Ok((doc, (StatusCode::CREATED, "created"))),
                    (None, None, false) => Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "document_missing_exception",
                        format!("[{id}]: document missing"),
                    )),
                };
                merged.map(|(source, outcome)| {
                    push_put(&mut runs, position, &id, &source);
                    current.insert(id.clone(), Some(source));
                    outcome
                })
            }
        };
        results.push((item.kind, item.id, outcome));
    }

    // Every document is checked against the schema first (as the node will), so a bad one fails
    // its item alone and is never sent.
    let puts: Vec<(usize, DocumentInput)> = runs
        .iter()
        .filter_map(|run| match run {
            Run::Puts(puts) => Some(puts.clone()),
            Run::Deletes(_) => None,
        })
        .flatten()
        .collect();
    let refused: Vec<(usize, String)> = on_index(state, move |index| {
        puts.into_iter()
            .filter_map(|(position, document)| {
                crate::index::validate_document(index.schema(), document.id.as_deref(), &document.document_json)
                    .err()
                    .map(|error| (position, error.to_string()))
            })
            .collect()
    })
    .await?;
    for (position, reason) in &refused {
        let mut error = ApiError::bad_request(reason.clone());
        error.elastic_type = "document_parsing_exception";
        results[*position].2 = Err(error);
    }
    let refused: std::collections::HashSet<usize> = refused.into_iter().map(|(position, _)| position).collect();
    for run in &mut runs {
        if let Run::Puts(puts) = run {
            puts.retain(|(position, _)| !refused.contains(position));
        }
    }

    // Send the runs in order. A run refused as a whole (the node busy, no leader) fails its items;
    // a document the node still refuses (validation above makes it rare) is found by its
    // position and only it fails when the rest is resent, a bounded number of times.
    let mut applied_index = 0;
    let mut request_number = 0_u64;
    for run in runs {
        match run {
            Run::Deletes(deletes) => {
                for chunk in deletes.chunks(crate::protocol::MAX_OPERATIONS_PER_REQUEST) {
                    let request_id = derived_request_id(first_request_id, request_number);
                    request_number += 1;
                    let ids = chunk.iter().map(|(_, id)| id.clone()).collect();
                    match write(state, caller, ClientRequest::Delete { ids, request_id }).await {
                        Ok(receipt) => applied_index = receipt.applied_index,
                        Err(error) => chunk.iter().for_each(|(position, _)| results[*position].2 = Err(error.clone())),
                    }
                }
            }
            Run::Puts(puts) => {
                for chunk in chunk_puts(puts, state.config.max_frame_bytes / 2) {
                    let mut pending = chunk;
                    let mut attempts = 0;
                    while !pending.is_empty() {
                        attempts += 1;
                        let request_id = derived_request_id(first_request_id, request_number);
                        request_number += 1;
                        let documents = pending.iter().map(|(_, document)| document.clone()).collect();
                        match write(state, caller, ClientRequest::Put { documents, request_id }).await {
                            Ok(receipt) => {
                                applied_index = receipt.applied_index;
                                break;
                            }
                            Err(error) => match refused_document(&error, pending.len()).filter(|_| attempts < 8) {
                                Some(offset) => {
                                    let (position, _) = pending.remove(offset);
                                    results[position].2 = Err(strip_document_position(error));
                                }
                                None => {
                                    pending.iter().for_each(|(position, _)| results[*position].2 = Err(error.clone()));
                                    break;
                                }
                            },
                        }
                    }
                }
            }
        }
    }
    if refresh {
        commit(state, caller).await?;
    }

    let copies = member_count(state);
    let index_name = state.config.index_name.clone();
    let mut errors = false;
    let items: Vec<Value> = results
        .into_iter()
        .map(|(kind, id, outcome)| {
            let entry = match outcome {
                Ok((status, result)) => json!({
                    "_index": index_name, "_id": id, "_version": 1, "result": result,
                    "_shards": {"total": copies, "successful": copies, "failed": 0},
                    "_seq_no": applied_index, "_primary_term": 1, "status": status.as_u16(),
                }),
                Err(error) => {
                    errors = true;
                    json!({"_index": index_name, "_id": id, "status": error.status.as_u16(), "error": error.error_object()})
                }
            };
            json!({kind: entry})
        })
        .collect();
    Ok(Json(json!({"took": took(started), "errors": errors, "items": items})))
}

fn push_put(runs: &mut Vec<Run>, position: usize, id: &str, source: &Map<String, Value>) {
    let document = DocumentInput { id: Some(id.to_string()), document_json: Value::Object(source.clone()).to_string() };
    match runs.last_mut() {
        Some(Run::Puts(puts)) => puts.push((position, document)),
        _ => runs.push(Run::Puts(vec![(position, document)])),
    }
}

fn chunk_puts(puts: Vec<(usize, DocumentInput)>, limit_bytes: usize) -> Vec<Vec<(usize, DocumentInput)>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for put in puts {
        let size = put.1.document_json.len() + 16;
        if !chunk.is_empty() && (chunk.len() >= CHUNK_DOCUMENTS || bytes + size > limit_bytes) {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(put);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// The offset (from 0) of the document a refused put names ("document 3 (id `x`): …"), when the
/// refusal is about one document.
fn refused_document(error: &ApiError, documents: usize) -> Option<usize> {
    if error.status != StatusCode::BAD_REQUEST {
        return None;
    }
    let rest = error.message.strip_prefix("document ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let position = digits.parse::<usize>().ok()?;
    (1..=documents).contains(&position).then(|| position - 1)
}

// ---------------------------------------------------------------------------------------------
// _search, _count, _msearch

/// Moves URL parameters into the body, as Elasticsearch reads them.
fn search_body(bytes: &[u8], parameters: &[(String, String)]) -> ApiResult<(Map<String, Value>, bool)> {
    let mut body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(body)) => body,
            Ok(_) => return Err(ApiError::bad_request("the search body must be a JSON object")),
            Err(error) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "parsing_exception",
                    format!("the search body is not JSON: {error}"),
                ))
            }
        }
    };
    let mut total_hits_as_int = false;
    let number = |name: &str, value: &str| -> ApiResult<Value> {
        value.parse::<u64>().map(Value::from).map_err(|_| ApiError::bad_request(format!("[{name}] must be a number")))
    };
    let mut query_string: Option<Map<String, Value>> = None;
    for (name, value) in parameters {
        match name.as_str() {
            "q" => {
                query_string.get_or_insert_with(Map::new).insert("query".into(), json!(value));
            }
            "df" => {
                query_string.get_or_insert_with(Map::new).insert("default_field".into(), json!(value));
            }
            "default_operator" => {
                query_string.get_or_insert_with(Map::new).insert("default_operator".into(), json!(value));
            }
            "size" | "from" => {
                body.insert(name.clone(), number(name, value)?);
            }
            "track_total_hits" => {
                let parsed = match value.as_str() {
                    "true" | "" => json!(true),
                    "false" => json!(false),
                    other => number(name, other)?,
                };
                body.insert(name.clone(), parsed);
            }
            "_source" => {
                let parsed = match value.as_str() {
                    "true" => json!(true),
                    "false" => json!(false),
                    fields => json!(fields.split(',').collect::<Vec<_>>()),
                };
                body.insert("_source".into(), parsed);
            }
            "_source_includes" => {
                body.insert("_source".into(), json!({"includes": value.split(',').collect::<Vec<_>>()}));
            }
            "sort" => {
                let keys: Vec<Value> = value
                    .split(',')
                    .map(|key| match key.split_once(':') {
                        Some((field, order)) => json!({field: {"order": order}}),
                        None => json!(key),
                    })
                    .collect();
                body.insert("sort".into(), Value::Array(keys));
            }
            "rest_total_hits_as_int" => total_hits_as_int = value == "true" || value.is_empty(),
            // Accepted and without effect on one local index.
            "typed_keys"
            | "request_cache"
            | "preference"
            | "routing"
            | "ignore_unavailable"
            | "allow_no_indices"
            | "expand_wildcards"
            | "search_type"
            | "batched_reduce_size"
            | "ccs_minimize_roundtrips"
            | "allow_partial_search_results"
            | "max_concurrent_shard_requests"
            | "pre_filter_shard_size"
            | "pretty"
            | "human"
            | "error_trace"
            | "filter_path"
            | "timeout" => {}
            other => return Err(ApiError::bad_request(format!("request contains unrecognized parameter: [{other}]"))),
        }
    }
    if let Some(query_string) = query_string {
        if body.contains_key("query") {
            return Err(ApiError::bad_request("give the query either as `q` or in the body, not both"));
        }
        body.insert("query".into(), json!({"query_string": query_string}));
    }
    Ok((body, total_hits_as_int))
}

/// Runs one search and wraps the index's answer in Elasticsearch's envelope.
async fn run_search(
    state: &HttpState,
    caller: &Caller,
    body: Map<String, Value>,
    total_hits_as_int: bool,
) -> ApiResult<Value> {
    let started = Instant::now();
    let body_json = Value::Object(body).to_string();
    let request = ClientRequest::SearchJson { body_json, consistency: Consistency::Local };
    let response_json = match state.backend.client(caller, request, deadline(state)).await? {
        ClientResponse::SearchJson { response_json, .. } => response_json,
        other => return Err(unexpected(&other)),
    };
    let response: Value = serde_json::from_str(&response_json).map_err(|error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "exception", format!("bad search answer: {error}"))
    })?;
    let index_name = state.config.index_name.clone();
    let hits: Vec<Value> = response
        .get("hits")
        .and_then(Value::as_array)
        .map(|hits| {
            hits.iter()
                .map(|hit| {
                    let mut entry = json!({
                        "_index": index_name,
                        "_id": hit.get("id").cloned().unwrap_or(Value::Null),
                        "_score": hit.get("score").cloned().unwrap_or(Value::Null),
                    });
                    for (from, to) in [("source", "_source"), ("highlight", "highlight"), ("sort", "sort")] {
                        if let Some(value) = hit.get(from).filter(|value| !value.is_null()) {
                            entry[to] = value.clone();
                        }
                    }
                    entry
                })
                .collect()
        })
        .unwrap_or_default();
    let mut hits_object = json!({"max_score": response.get("max_score").cloned().unwrap_or(Value::Null), "hits": hits});
    if let Some(total) = response.get("total").filter(|total| !total.is_null()) {
        hits_object["total"] =
            if total_hits_as_int { total.get("value").cloned().unwrap_or(Value::Null) } else { total.clone() };
    }
    let mut answer = json!({
        "took": took(started),
        "timed_out": false,
        "_shards": shards(1),
        "hits": hits_object,
    });
    if let Some(aggregations) = response.get("aggregations").filter(|value| !value.is_null()) {
        answer["aggregations"] = aggregations.clone();
    }
    Ok(answer)
}

async fn search(
    State(state): Shared,
    caller: Caller,
    Path(index): Path<String>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let (body, total_hits_as_int) = search_body(&bytes, &parameters)?;
    Ok(Json(run_search(&state, &caller, body, total_hits_as_int).await?))
}

async fn search_all(
    State(state): Shared,
    caller: Caller,
    parameters: Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let index = state.config.index_name.clone();
    search(State(state), caller, Path(index), parameters, headers, body).await
}

async fn count(
    State(state): Shared,
    caller: Caller,
    Path(index): Path<String>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    let (bytes, _permit) = read_body(&state, &headers, body).await?;
    let (mut body, _) = search_body(&bytes, &parameters)?;
    let query = body.remove("query");
    if let Some(key) = body.keys().next() {
        return Err(ApiError::bad_request(format!("request does not support [{key}]; _count takes a query only")));
    }
    let request =
        ClientRequest::CountJson { query_json: query.map(|query| query.to_string()), consistency: Consistency::Local };
    match state.backend.client(&caller, request, deadline(&state)).await? {
        ClientResponse::Count { count, .. } => Ok(Json(json!({"count": count, "_shards": shards(1)}))),
        other => Err(unexpected(&other)),
    }
}

async fn count_all(
    State(state): Shared,
    caller: Caller,
    parameters: Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let index = state.config.index_name.clone();
    count(State(state), caller, Path(index), parameters, headers, body).await
}

/// Most searches one `_msearch` may carry.
const MAX_MSEARCH_SEARCHES: usize = 256;

async fn msearch(
    State(state): Shared,
    caller: Caller,
    Path(index): Path<String>,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    check_index(&state, &index)?;
    run_msearch(&state, &caller, Some(&index), &parameters, &headers, body).await
}

async fn msearch_all(
    State(state): Shared,
    caller: Caller,
    Query(parameters): Parameters,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    run_msearch(&state, &caller, None, &parameters, &headers, body).await
}

/// Header/body line pairs, searched one after another (each under the node's search limits).
async fn run_msearch(
    state: &HttpState,
    caller: &Caller,
    default_index: Option<&str>,
    parameters: &[(String, String)],
    headers: &HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    check_parameters(parameters, &["typed_keys", "rest_total_hits_as_int", "max_concurrent_searches", "search_type"])?;
    let total_hits_as_int = parameter(parameters, "rest_total_hits_as_int").is_some_and(|value| value != "false");
    let (bytes, _permit) = read_body(state, headers, body).await?;
    let text = body_text(&bytes)?;
    // Counted before any search runs.
    if ndjson_lines(text).count() > 2 * MAX_MSEARCH_SEARCHES {
        crate::telemetry::metrics::record_limit_refusal("msearch_searches");
        return Err(ApiError::bad_request(format!("_msearch carries at most {MAX_MSEARCH_SEARCHES} searches")));
    }
    let mut lines = ndjson_lines(text);
    let mut responses = Vec::new();
    while let Some((line, header_line)) = lines.next() {
        let (_, body_line) = lines
            .next()
            .ok_or_else(|| ApiError::bad_request(format!("line {line}: a search header has no body line")))?;
        let header: Value = serde_json::from_str(header_line)
            .map_err(|error| ApiError::bad_request(format!("line {line}: malformed search header: {error}")))?;
        let index = match header.get("index") {
            Some(Value::String(index)) => Some(index.as_str()),
            Some(Value::Array(indexes)) => indexes.first().and_then(Value::as_str),
            _ => default_index,
        };
        let answer = async {
            check_index(state, index.unwrap_or(&state.config.index_name))?;
            let (body, _) = search_body(body_line.as_bytes(), &[])?;
            run_search(state, caller, body, total_hits_as_int).await
        }
        .await;
        responses.push(match answer {
            Ok(mut response) => {
                response["status"] = json!(200);
                response
            }
            Err(error) => error.body(),
        });
    }
    Ok(Json(json!({"took": took(started), "responses": responses})))
}
