//! What each request does. Index work runs on blocking threads so the runtime keeps serving;
//! writes go through the replicated log (`Cluster::propose`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::NodeState;
use crate::index::{IndexError, IndexOperation, SearchBudget, SearchIndex};
use crate::protocol::{
    AdminRequest, AdminResponse, ClientRequest, ClientResponse, Consistency, DocumentInput, ErrorCode, RaftRequest,
    RaftResponse, WireError,
};
use crate::raft::admission;
use crate::raft::election::Hint;
use crate::raft::types::{IndexBatch, RequestId};
use crate::transport::Role;

pub use crate::protocol::MAX_OPERATIONS_PER_REQUEST;

pub(crate) fn index_error_to_wire(error: IndexError) -> WireError {
    let code = match &error {
        IndexError::InvalidDocument(_) | IndexError::InvalidRequest(_) => ErrorCode::InvalidArgument,
        IndexError::InvalidQuery(_) => ErrorCode::InvalidQuery,
        IndexError::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        _ => ErrorCode::Internal,
    };
    WireError::new(code, error.to_string())
}

fn worker_failure(error: tokio::task::JoinError) -> WireError {
    WireError::new(ErrorCode::Internal, format!("index worker failed: {error}"))
}

/// Runs index work on a blocking thread, on the index in use now.
async fn blocking<T, F>(state: &NodeState, work: F) -> Result<T, WireError>
where
    T: Send + 'static,
    F: FnOnce(&SearchIndex) -> Result<T, IndexError> + Send + 'static,
{
    let index = state.index.current();
    tokio::task::spawn_blocking(move || work(&index)).await.map_err(worker_failure)?.map_err(index_error_to_wire)
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

/// Validates every document before anything is replicated: a batch with one bad document is
/// refused whole, and the error names the document by its position in the request, counted from
/// 1 as lines are (the client turns it into a line number), so nothing is half-written and
/// nothing bad enters the log.
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
                    Some(id) => format!("document {} (id `{id}`): {reason}", position + 1),
                    None => format!("document {}: {reason}", position + 1),
                };
                WireError::new(ErrorCode::InvalidArgument, message)
            })
        })
        .collect()
}

/// Proposes the operations of one client request, under its request id (so a retry of it is
/// applied at most once), and answers with the leader that committed it.
async fn write(
    state: &NodeState,
    operations: Vec<IndexOperation>,
    request_id: RequestId,
    deadline: Instant,
) -> Result<ClientResponse, WireError> {
    let operation_count = operations.len() as u64;
    let batch = IndexBatch::of_request(operations, request_id);
    let (outcome, leader) = state.cluster.propose(batch, deadline).await?;
    Ok(ClientResponse::Written {
        operations: operation_count,
        applied_index: outcome.applied_index,
        duplicate: outcome.duplicate,
        leader: Some(leader),
    })
}

fn applied_index(state: &NodeState) -> u64 {
    state.raft.metrics().borrow().last_applied.map(|log_id| log_id.index).unwrap_or(0)
}

/// Refuses a search over the query bounds before it waits for a slot or reaches tantivy; counted.
fn check_search_bounds(state: &NodeState, request: &crate::index::SearchRequest) -> Result<(), WireError> {
    let limits = &state.config.limits.query;
    crate::index::check_query_bounds(&request.query, limits).map_err(|error| {
        crate::telemetry::metrics::record_limit_refusal("query_size");
        index_error_to_wire(error)
    })?;
    let facet_prefixes: usize = request.facets.iter().map(|facet| facet.prefixes.len().max(1)).sum();
    if facet_prefixes > limits.max_facet_prefixes {
        crate::telemetry::metrics::record_limit_refusal("facet_prefixes");
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "invalid search request: the request asks for {facet_prefixes} facet prefixes, over the limit of {} \
                 (--max-facet-prefixes)",
                limits.max_facet_prefixes
            ),
        ));
    }
    Ok(())
}

/// Time left until `deadline`, at least a millisecond.
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

async fn search_here(
    state: &NodeState,
    request: crate::index::SearchRequest,
    deadline: Instant,
) -> Result<ClientResponse, WireError> {
    check_search_bounds(state, &request)?;
    let limits = state.config.limits.clone();
    let slot = state.searches.enter(limits.max_queue_wait.min(remaining(deadline))).await?;
    let applied_index = applied_index(state);
    let span = tracing::info_span!("bayard.search", applied_index);
    // The slot travels with the work: a search whose caller gave up still holds it until tantivy
    // stops, at the latest when its budget is spent.
    let budget = SearchBudget::until(deadline.min(Instant::now() + limits.search_timeout));
    let response = blocking(state, move |index| {
        let _slot = slot;
        index.search_within(&request, &limits.query, budget)
    })
    .instrument(span)
    .await
    .inspect_err(|error| {
        if error.code == ErrorCode::DeadlineExceeded {
            crate::telemetry::metrics::record_limit_refusal("search_timeout");
        }
    })?;
    Ok(ClientResponse::Search { response, node_id: state.node_id(), applied_index })
}

/// A slot for a write and room on the disk for it.
async fn admit_write(state: &NodeState, deadline: Instant) -> Result<tokio::sync::OwnedSemaphorePermit, WireError> {
    state.check_disk_space()?;
    state.writes.enter(state.config.limits.max_queue_wait.min(remaining(deadline))).await
}

/// `forwarded` is set when another node sent the request (it already went through one hop and
/// must not be sent on again).
pub(crate) async fn handle_client(
    state: &NodeState,
    request: ClientRequest,
    forwarded: bool,
    deadline: Instant,
) -> Result<ClientResponse, WireError> {
    let _write_slot = if request.is_write() { Some(admit_write(state, deadline).await?) } else { None };
    match request {
        ClientRequest::Put { documents, request_id } => {
            check_batch_size(documents.len())?;
            let index = state.index.current();
            let operations = tokio::task::spawn_blocking(move || prepare_puts(&index, documents))
                .await
                .map_err(worker_failure)??;
            write(state, operations, request_id, deadline).await
        }
        ClientRequest::Delete { ids, request_id } => {
            check_batch_size(ids.len())?;
            if let Some(position) = ids.iter().position(|id| id.is_empty()) {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("id {position} of the request is empty"),
                ));
            }
            write(state, ids.into_iter().map(|id| IndexOperation::Delete { id }).collect(), request_id, deadline).await
        }
        ClientRequest::Commit { request_id } => write(state, vec![IndexOperation::Commit], request_id, deadline).await,
        ClientRequest::Rollback { request_id } => {
            write(state, vec![IndexOperation::Rollback], request_id, deadline).await
        }
        ClientRequest::Merge { request_id } => write(state, vec![IndexOperation::Merge], request_id, deadline).await,
        ClientRequest::Get { id } => {
            if id.is_empty() {
                return Err(WireError::new(ErrorCode::InvalidArgument, "id is empty"));
            }
            // Gets share the searches' slots: both are reads on blocking threads.
            let _slot = state.searches.enter(state.config.limits.max_queue_wait.min(remaining(deadline))).await?;
            let document = blocking(state, move |index| index.get(&id)).await?;
            Ok(ClientResponse::Document { document })
        }
        ClientRequest::Search { request, consistency } => {
            if !at_consistency(state, consistency, forwarded).await? {
                return Ok(state.cluster.forward_to_leader(&ClientRequest::Search { request, consistency }).await?);
            }
            search_here(state, request, deadline).await
        }
        ClientRequest::Schema => Ok(ClientResponse::Schema { schema_json: state.index.current().schema_json() }),
        ClientRequest::SearchJson { body_json, consistency } => {
            if !at_consistency(state, consistency, forwarded).await? {
                let request = ClientRequest::SearchJson { body_json, consistency };
                return Ok(state.cluster.forward_to_leader(&request).await?);
            }
            search_json_here(state, body_json, deadline).await
        }
        ClientRequest::CountJson { query_json, consistency } => {
            if !at_consistency(state, consistency, forwarded).await? {
                let request = ClientRequest::CountJson { query_json, consistency };
                return Ok(state.cluster.forward_to_leader(&request).await?);
            }
            count_json_here(state, query_json, deadline).await
        }
    }
}

/// Whether a read at `consistency` may be served here (after a read-index check when it must
/// be linearizable); `false`: it goes to the leader.
async fn at_consistency(state: &NodeState, consistency: Consistency, forwarded: bool) -> Result<bool, WireError> {
    match consistency {
        Consistency::Local => Ok(true),
        Consistency::Leader | Consistency::Linearizable if state.cluster.is_leader() => {
            if consistency == Consistency::Linearizable {
                // Read index: confirm leadership with a quorum and wait until everything
                // committed before this moment is applied here.
                state.raft.ensure_linearizable().await.map_err(|error| {
                    WireError::new(
                        ErrorCode::Unavailable,
                        format!("cannot confirm leadership for a linearizable read: {error}"),
                    )
                })?;
            }
            Ok(true)
        }
        Consistency::Leader | Consistency::Linearizable if forwarded => {
            Err(WireError::new(ErrorCode::Unavailable, format!("node {} is no longer the leader", state.node_id()))
                .with_leader(state.cluster.known_leader()))
        }
        Consistency::Leader | Consistency::Linearizable => Ok(false),
    }
}

/// Most bytes of a JSON search body (its query is bounded again, clause by clause, by the query
/// limits).
fn check_json_bytes(state: &NodeState, json: &str) -> Result<serde_json::Value, WireError> {
    let max_bytes = state.config.limits.query.max_query_bytes.saturating_mul(4);
    if json.len() > max_bytes {
        crate::telemetry::metrics::record_limit_refusal("query_size");
        return Err(WireError::new(
            ErrorCode::InvalidQuery,
            format!(
                "invalid query: the search body has {} bytes, over the limit of {max_bytes} (4 × --max-query-bytes)",
                json.len()
            ),
        ));
    }
    serde_json::from_str(json).map_err(|error| {
        WireError::new(ErrorCode::InvalidQuery, format!("invalid query: the body is not JSON: {error}"))
    })
}

async fn search_json_here(
    state: &NodeState,
    body_json: String,
    deadline: Instant,
) -> Result<ClientResponse, WireError> {
    let body = check_json_bytes(state, &body_json)?;
    let request = crate::index::JsonSearchRequest::from_json(&body).map_err(index_error_to_wire)?;
    let limits = state.config.limits.clone();
    let slot = state.searches.enter(limits.max_queue_wait.min(remaining(deadline))).await?;
    let applied_index = applied_index(state);
    let budget = SearchBudget::until(deadline.min(Instant::now() + limits.search_timeout));
    let response = blocking(state, move |index| {
        let _slot = slot;
        index.search_json(&request, &limits.query, budget)
    })
    .instrument(tracing::info_span!("bayard.search", applied_index))
    .await
    .inspect_err(count_search_timeout)?;
    let response_json = serde_json::to_string(&response)
        .map_err(|error| WireError::new(ErrorCode::Internal, format!("cannot encode the search answer: {error}")))?;
    Ok(ClientResponse::SearchJson { response_json, node_id: state.node_id(), applied_index })
}

async fn count_json_here(
    state: &NodeState,
    query_json: Option<String>,
    deadline: Instant,
) -> Result<ClientResponse, WireError> {
    let query = query_json.as_deref().map(|json| check_json_bytes(state, json)).transpose()?;
    let limits = state.config.limits.clone();
    let slot = state.searches.enter(limits.max_queue_wait.min(remaining(deadline))).await?;
    let applied_index = applied_index(state);
    let budget = SearchBudget::until(deadline.min(Instant::now() + limits.search_timeout));
    let count = blocking(state, move |index| {
        let _slot = slot;
        index.count_json(query.as_ref(), &limits.query, budget)
    })
    .await
    .inspect_err(count_search_timeout)?;
    Ok(ClientResponse::Count { count, node_id: state.node_id(), applied_index })
}

fn count_search_timeout(error: &WireError) {
    if error.code == ErrorCode::DeadlineExceeded {
        crate::telemetry::metrics::record_limit_refusal("search_timeout");
    }
}

/// Adds or revokes an API key through the log, under the request's id.
async fn change_keys(
    state: &NodeState,
    change: crate::access::KeyChange,
    request_id: RequestId,
    deadline: Instant,
) -> Result<AdminResponse, WireError> {
    let _write_slot = admit_write(state, deadline).await?;
    let batch = IndexBatch { keys: Some(change), ..IndexBatch::of_request(Vec::new(), request_id) };
    let (outcome, _leader) = state.cluster.propose(batch, deadline).await?;
    Ok(AdminResponse::KeyChanged { applied_index: outcome.applied_index, duplicate: outcome.duplicate })
}

/// A key record as a caller made it: well-formed before it enters the log (the state machine
/// checks again, for records that come another way).
fn check_key_record(record: &crate::access::ApiKeyRecord) -> Result<(), WireError> {
    crate::access::check_record(record)
        .map_err(|reason| WireError::new(ErrorCode::InvalidArgument, format!("invalid key: {reason}")))
}

pub(crate) async fn handle_admin(
    state: &Arc<NodeState>,
    role: &Role,
    request: AdminRequest,
    deadline: Instant,
) -> Result<AdminResponse, WireError> {
    match request {
        AdminRequest::CreateKey { record, request_id } => {
            check_key_record(&record)?;
            change_keys(state, crate::access::KeyChange::Create(record), request_id, deadline).await
        }
        AdminRequest::RevokeKey { id, request_id } => {
            // An unknown id is refused by the state machine (here it may not be applied yet).
            change_keys(state, crate::access::KeyChange::Revoke { id }, request_id, deadline).await
        }
        AdminRequest::ListKeys => Ok(AdminResponse::Keys(state.keys.current().list())),
        AdminRequest::WaitApplied { index } => {
            let Role::Node { node_id: sender } = role else {
                return Err(WireError::new(ErrorCode::PermissionDenied, "permission denied: for members only"));
            };
            state.cluster.admit_raft_sender(*sender, "apply waits")?;
            let timeout = deadline.saturating_duration_since(Instant::now());
            state
                .raft
                .wait(Some(timeout))
                .applied_index_at_least(Some(index), "a refresh waits for this node")
                .await
                .map_err(|error| WireError::new(ErrorCode::DeadlineExceeded, format!("not applied in time: {error}")))?;
            Ok(AdminResponse::Acknowledged)
        }
        AdminRequest::Status => Ok(AdminResponse::Status(state.cluster.status())),
        AdminRequest::LocalStatus => Ok(AdminResponse::Status(state.cluster.local_status())),
        AdminRequest::Peers => Ok(AdminResponse::Peers(state.cluster.peer_addresses())),
        AdminRequest::Join { node_id, address, incarnation } => {
            // A node asks to join under its own id; a member may forward another node's request
            // to the leader. Nobody else may.
            let allowed = match role {
                Role::Node { node_id: sender } if *sender == node_id => true,
                Role::Node { node_id: sender } => state.cluster.is_member(*sender),
                _ => false,
            };
            if !allowed {
                return Err(WireError::new(
                    ErrorCode::PermissionDenied,
                    format!("permission denied: a {role} certificate may not join as node {node_id}"),
                ));
            }
            Ok(state.cluster.handle_join(node_id, address, incarnation).await?)
        }
        AdminRequest::Leave { node_id, force } => {
            // Node certificates may forward a leave (or remove a down member) only as members.
            if let Role::Node { node_id: sender } = role {
                state.cluster.admit_raft_sender(*sender, "membership changes")?;
            }
            Ok(state.cluster.handle_leave(node_id, force).await?)
        }
        AdminRequest::Removed { node_id, incarnation } => {
            // Only this incarnation: a notice about the data this host had before is not about us.
            if node_id != state.node_id() || incarnation != state.incarnation() || !matches!(role, Role::Node { .. }) {
                return Err(WireError::new(
                    ErrorCode::PermissionDenied,
                    "permission denied: not a removal notice for this node",
                ));
            }
            // Only a member (the leader that removed this node) may say so; a node certificate of
            // a non-member, or of a removed node, may not stop this one.
            let Role::Node { node_id: sender } = role else {
                return Err(WireError::new(ErrorCode::PermissionDenied, "permission denied: not a node certificate"));
            };
            state.cluster.admit_raft_sender(*sender, "removal notices")?;
            // A notice is one peer's word: the node stops only if the other voters confirm it.
            state.cluster.removal_reported(*sender).await?;
            Ok(AdminResponse::Acknowledged)
        }
    }
}

/// Raft messages reach openraft only from members, and only when their content is plausible
/// (`raft::admission`); a follower whose disk is full refuses new entries (the leader retries).
pub(crate) async fn handle_raft(
    state: &Arc<NodeState>,
    sender: u64,
    request: RaftRequest,
    deadline: Instant,
) -> Result<RaftResponse, WireError> {
    state.cluster.admit_raft_sender(sender, "raft messages")?;
    let current_term = state.raft.metrics().borrow().current_term;
    let plausible = match &request {
        RaftRequest::AppendEntries(rpc) => admission::check_append_entries(rpc, current_term),
        RaftRequest::Vote(rpc) => admission::check_vote(rpc, current_term),
        RaftRequest::InstallSnapshot(rpc) => admission::check_install_snapshot(rpc, current_term),
        RaftRequest::Propose(_) => Ok(()),
    };
    if let Err(reason) = plausible {
        crate::telemetry::metrics::record_refused_raft_message("implausible");
        tracing::warn!(sender, request = request.name(), %reason, "refused an implausible raft message");
        return Err(WireError::new(ErrorCode::InvalidArgument, format!("refused {}: {reason}", request.name())));
    }
    Ok(match request {
        RaftRequest::AppendEntries(rpc) => {
            if !rpc.entries.is_empty() {
                state.check_disk_space()?;
            }
            // openraft renews its leader lease when a current leader's message arrives, before
            // the log is flushed; the election assist's silence must not count a slow flush.
            if rpc.vote.is_committed() && rpc.vote.leader_id().term >= current_term {
                state.election.heard_from_leader();
            }
            let answer = state.raft.append_entries(rpc).await;
            if matches!(&answer, Ok(response) if !matches!(response, openraft::raft::AppendEntriesResponse::HigherVote(_)))
            {
                state.election.heard_from_leader();
            }
            RaftResponse::AppendEntries(answer)
        }
        RaftRequest::Vote(rpc) => {
            let request = rpc.clone();
            let answer = state.raft.vote(rpc).await;
            if let Ok(response) = &answer {
                if response.vote_granted {
                    // A granted vote renews openraft's timer too: the winner's first message
                    // is due, not an election.
                    state.election.heard_from_leader();
                }
                state.election.report(Hint::Answered { request, response: response.clone() });
            }
            RaftResponse::Vote(answer)
        }
        RaftRequest::InstallSnapshot(rpc) => {
            state.check_disk_space()?;
            let answer = state.raft.install_snapshot(rpc).await;
            if answer.is_ok() {
                state.election.heard_from_leader();
            }
            RaftResponse::InstallSnapshot(answer)
        }
        RaftRequest::Propose(batch) => {
            let _write_slot = admit_write(state, deadline).await?;
            RaftResponse::Proposed(state.cluster.propose_as_leader(batch, deadline).await?)
        }
    })
}
