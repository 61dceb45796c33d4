//! What each request does. Index work runs on blocking threads so the runtime keeps serving.

use std::collections::BTreeMap;

use super::apply::WriteError;
use super::NodeState;
use crate::index::{IndexError, IndexOperation, SearchIndex};
use crate::protocol::{
    AdminRequest, AdminResponse, ClientRequest, ClientResponse, DocumentInput, ErrorCode, MemberStatus, NodeStatus,
    WireError,
};

/// Most operations one write request may carry; larger loads are split by the client.
pub const MAX_OPERATIONS_PER_REQUEST: usize = 100_000;

pub(crate) fn index_error_to_wire(error: IndexError) -> WireError {
    let code = match &error {
        IndexError::InvalidDocument(_) | IndexError::InvalidRequest(_) => ErrorCode::InvalidArgument,
        IndexError::InvalidQuery(_) => ErrorCode::InvalidQuery,
        _ => ErrorCode::Internal,
    };
    WireError::new(code, error.to_string())
}

fn write_error_to_wire(error: WriteError) -> WireError {
    match error {
        WriteError::Index(error) => index_error_to_wire(error),
        WriteError::Worker(message) => WireError::new(ErrorCode::Internal, format!("index worker failed: {message}")),
    }
}

/// Runs index work on a blocking thread.
async fn blocking<T, F>(state: &NodeState, work: F) -> Result<T, WireError>
where
    T: Send + 'static,
    F: FnOnce(&SearchIndex) -> Result<T, IndexError> + Send + 'static,
{
    let index = state.index.clone();
    tokio::task::spawn_blocking(move || work(&index))
        .await
        .map_err(|error| WireError::new(ErrorCode::Internal, format!("index worker failed: {error}")))?
        .map_err(index_error_to_wire)
}

fn check_batch_size(count: usize) -> Result<(), WireError> {
    if count == 0 {
        return Err(WireError::new(ErrorCode::InvalidArgument, "request holds no documents"));
    }
    if count > MAX_OPERATIONS_PER_REQUEST {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("request holds {count} operations; at most {MAX_OPERATIONS_PER_REQUEST} per request"),
        ));
    }
    Ok(())
}

/// Validates every document before anything is applied: a batch with one bad document is refused
/// whole, and the error names the document by its position in the request (the client turns that
/// into a line number), so nothing is half-written.
fn prepare_puts(index: &SearchIndex, documents: Vec<DocumentInput>) -> Result<Vec<IndexOperation>, WireError> {
    documents
        .into_iter()
        .enumerate()
        .map(|(position, document)| {
            let prepared = match &document.id {
                Some(id) => index.prepare_put(id, &document.document_json),
                None => index.prepare_put_with_embedded_id(&document.document_json),
            };
            prepared.map_err(|error| {
                let reason = match error {
                    IndexError::InvalidDocument(reason) => reason,
                    other => return index_error_to_wire(other),
                };
                let message = match &document.id {
                    Some(id) => format!("document {position} (id `{id}`): {reason}"),
                    None => format!("document {position}: {reason}"),
                };
                WireError::new(ErrorCode::InvalidArgument, message)
            })
        })
        .collect()
}

async fn submit(state: &NodeState, operations: Vec<IndexOperation>) -> Result<ClientResponse, WireError> {
    let operation_count = operations.len() as u64;
    let (applied_index, _) = state.write_path.submit(operations).await.map_err(write_error_to_wire)?;
    Ok(ClientResponse::Written { operations: operation_count, applied_index })
}

pub(crate) async fn handle_client(state: &NodeState, request: ClientRequest) -> Result<ClientResponse, WireError> {
    match request {
        ClientRequest::Put { documents } => {
            check_batch_size(documents.len())?;
            let index = state.index.clone();
            let operations = tokio::task::spawn_blocking(move || prepare_puts(&index, documents))
                .await
                .map_err(|error| WireError::new(ErrorCode::Internal, format!("index worker failed: {error}")))??;
            submit(state, operations).await
        }
        ClientRequest::Delete { ids } => {
            check_batch_size(ids.len())?;
            if let Some(position) = ids.iter().position(|id| id.is_empty()) {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("id {position} of the request is empty"),
                ));
            }
            let operations = ids.into_iter().map(|id| IndexOperation::Delete { id }).collect();
            submit(state, operations).await
        }
        ClientRequest::Commit => submit(state, vec![IndexOperation::Commit]).await,
        ClientRequest::Rollback => submit(state, vec![IndexOperation::Rollback]).await,
        ClientRequest::Merge => submit(state, vec![IndexOperation::Merge]).await,
        ClientRequest::Get { id } => {
            if id.is_empty() {
                return Err(WireError::new(ErrorCode::InvalidArgument, "id is empty"));
            }
            let document = blocking(state, move |index| index.get(&id)).await?;
            Ok(ClientResponse::Document { document })
        }
        ClientRequest::Search { request, consistency: _ } => {
            // A standalone node is its own leader: every consistency level reads the same index.
            let applied_index = state.write_path.applied_index().await;
            let response = blocking(state, move |index| index.search(&request)).await?;
            Ok(ClientResponse::Search { response, node_id: state.config.node_id, applied_index })
        }
        ClientRequest::Schema => Ok(ClientResponse::Schema { schema_json: state.index.schema_json() }),
    }
}

pub(crate) async fn handle_admin(state: &NodeState, request: AdminRequest) -> Result<AdminResponse, WireError> {
    match request {
        AdminRequest::Status => {
            let applied_index = state.write_path.applied_index().await;
            let (document_count, segment_count) =
                blocking(state, |index| Ok((index.document_count(), index.segment_count() as u64))).await?;
            let node_id = state.config.node_id;
            Ok(AdminResponse::Status(NodeStatus {
                node_id,
                cluster_id: state.metadata.cluster_id.clone(),
                address: state.address.clone(),
                role: "leader".to_string(),
                leader: Some(node_id),
                term: 0,
                applied_index,
                document_count,
                segment_count,
                version: env!("CARGO_PKG_VERSION").to_string(),
                members: vec![MemberStatus {
                    node_id,
                    address: state.address.clone(),
                    role: "voter".to_string(),
                    applied_index,
                    state: "alive".to_string(),
                }],
            }))
        }
        AdminRequest::Peers => {
            let mut peers = BTreeMap::new();
            peers.insert(state.config.node_id, state.address.clone());
            Ok(AdminResponse::Peers(peers))
        }
    }
}
