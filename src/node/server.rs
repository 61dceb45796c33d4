//! The accept loop: connections, streams, headers, authorization, dispatch by kind.
//!
//! Every failure here is confined to its stream (or, for a bad certificate, its connection): an
//! error frame goes back, the stream ends, and everything else keeps being served.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::authorization::{authorize_admin_request, authorize_stream};
use super::{handlers, NodeState};
use crate::cluster::membership::MembershipDigest;
use crate::protocol::{AdminRequest, ClientRequest, ErrorCode, RaftRequest, StreamKind, WireError};
use crate::raft::network::RAFT_FRAME_OVERHEAD_BYTES;
use crate::telemetry;
use crate::telemetry::metrics::ConnectionDirection;
use crate::transport::frame::{self, FrameError};
use crate::transport::identity::{peer_of_connection, Peer};
use crate::transport::stream::{decode_header, HeaderError};
use crate::transport::Role;
use tracing::Instrument;

/// QUIC application error codes used when a stream or connection is cut short.
mod close_code {
    pub const REFUSED_STREAM: u32 = 1;
    pub const IDENTITY_REFUSED: u32 = 2;
    pub const SHUTTING_DOWN: u32 = 3;
    pub const TOO_MANY_CONNECTIONS: u32 = 4;
}

/// Logs a refused connection at most once per period (with how many were held back); every
/// refusal is counted in `bayard_refused_connections_total` all the same.
fn log_refused_connection(state: &NodeState, remote_address: std::net::SocketAddr, reason: &str, error: &str) {
    // A peer that went away during the handshake (a node restarting, a client giving up) is a
    // normal event, not an alarm.
    let normal = error.contains("aborted by peer") || error.contains("closed by peer") || error.contains("timed out");
    if normal {
        tracing::debug!(%remote_address, reason, %error, "connection ended during its handshake");
        return;
    }
    if let Some(held_back) = state.refusal_log.permit() {
        tracing::warn!(%remote_address, reason, %error, held_back, "refused connection");
    }
}

pub(crate) async fn serve(state: Arc<NodeState>, endpoint: quinn::Endpoint, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Under load, make a peer prove its address (a QUIC retry) before it may hold a
                // handshake slot: spoofed Initial packets cannot fill the node then.
                if !incoming.remote_address_validated()
                    && state.connections.open_connections() >= state.config.limits.max_connections / 2
                {
                    if let Err(error) = incoming.retry() {
                        error.into_incoming().refuse();
                    }
                    continue;
                }
                // Counted before the handshake: handshakes cost memory and CPU too.
                match state.connections.open() {
                    Some(slot) => {
                        connections.spawn(serve_connection(state.clone(), incoming, slot, shutdown.clone()));
                    }
                    None => {
                        telemetry::metrics::record_limit_refusal("connections");
                        telemetry::metrics::record_refused_connection("too_many_connections");
                        log_refused_connection(
                            &state,
                            incoming.remote_address(),
                            "too_many_connections",
                            &format!("{} connections open (--max-connections)", state.config.limits.max_connections),
                        );
                        incoming.refuse();
                    }
                }
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    // Stop taking new connections, let the open ones finish their streams.
    endpoint.set_server_config(None);
    let drained =
        tokio::time::timeout(state.config.drain_timeout, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_ms = state.config.drain_timeout.as_millis() as u64,
            "streams still running at shutdown; closing them"
        );
        connections.abort_all();
    }
    endpoint.close(close_code::SHUTTING_DOWN.into(), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!(node_id = state.config.node_id, "node stopped");
}

async fn serve_connection(
    state: Arc<NodeState>,
    incoming: quinn::Incoming,
    mut slot: super::limits::ConnectionSlot,
    mut shutdown: watch::Receiver<bool>,
) {
    let remote_address = incoming.remote_address();
    let connection = match tokio::time::timeout(state.config.handshake_timeout, incoming).await {
        Err(_) => {
            telemetry::metrics::record_refused_connection("handshake_timeout");
            log_refused_connection(&state, remote_address, "handshake_timeout", "no handshake within the time limit");
            return;
        }
        Ok(Err(error)) => {
            // Certificate problems (none, foreign CA, expired) end here: rustls refused the handshake.
            telemetry::metrics::record_refused_connection("handshake");
            log_refused_connection(&state, remote_address, "handshake", &error.to_string());
            return;
        }
        Ok(Ok(connection)) => connection,
    };
    let peer = match peer_of_connection(&connection, &state.config.trust_domain) {
        Ok(peer) => Arc::new(peer),
        Err(error) => {
            telemetry::metrics::record_refused_connection("identity");
            log_refused_connection(&state, remote_address, "identity", &error.to_string());
            let reason = format!("certificate refused: {error}");
            connection.close(close_code::IDENTITY_REFUSED.into(), reason.as_bytes());
            return;
        }
    };
    if let Err(refusal) = state.connections.identify(&mut slot, &peer.role.to_string()) {
        telemetry::metrics::record_refused_connection("too_many_connections_per_identity");
        log_refused_connection(&state, remote_address, "too_many_connections_per_identity", &refusal.message);
        connection.close(close_code::TOO_MANY_CONNECTIONS.into(), refusal.message.as_bytes());
        return;
    }
    tracing::debug!(%remote_address, peer = %peer.role, "connection established");
    let connection_metrics = telemetry::metrics::ConnectionMetrics::open(ConnectionDirection::Inbound);

    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => {
                match accepted {
                    Ok((send, receive)) => {
                        streams.spawn(serve_stream(state.clone(), peer.clone(), send, receive));
                    }
                    Err(error) => {
                        tracing::debug!(%remote_address, %error, "connection ended");
                        break;
                    }
                }
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => connection_metrics.observe(&connection.stats()),
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    // In-flight streams finish; the caller bounds how long that may take.
    while streams.join_next().await.is_some() {}
    connection_metrics.observe(&connection.stats());
}

/// Sends one answer frame and finishes the stream. An answer too large for a frame becomes an
/// error that says so, rather than a silently dropped stream.
async fn reply<T: Serialize>(send: &mut quinn::SendStream, answer: &Result<T, WireError>, max_frame_bytes: usize) {
    let encoded = match frame::encode_frame(answer, max_frame_bytes) {
        Ok(encoded) => encoded,
        Err(error) => {
            let refusal: Result<(), WireError> = Err(WireError::new(
                ErrorCode::FrameTooLarge,
                format!("response does not fit in a frame: {error}; ask for fewer documents"),
            ));
            match frame::encode_frame(&refusal, max_frame_bytes) {
                Ok(encoded) => encoded,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = send.write_all(&encoded).await {
        tracing::debug!(%error, "could not send answer");
        return;
    }
    let _ = send.finish();
}

/// Answers with an error without reading the rest of the stream, and tells the peer to stop
/// sending.
async fn refuse(
    send: &mut quinn::SendStream,
    receive: &mut quinn::RecvStream,
    error: WireError,
    max_frame_bytes: usize,
) {
    let _ = receive.stop(close_code::REFUSED_STREAM.into());
    reply::<()>(send, &Err(error), max_frame_bytes).await;
}

fn frame_error_to_wire(what: &str, error: FrameError) -> WireError {
    match error {
        FrameError::TooLarge { .. } => WireError::new(ErrorCode::FrameTooLarge, format!("{what} refused: {error}")),
        other => WireError::new(ErrorCode::MalformedFrame, format!("{what} is malformed: {other}")),
    }
}

async fn serve_stream(
    state: Arc<NodeState>,
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut receive: quinn::RecvStream,
) {
    let max_frame_bytes = state.config.max_frame_bytes;
    let first_frame_timeout = state.config.first_frame_timeout;
    // The header is read before the role is known: it gets its own small limit.
    let max_header_bytes = state.config.limits.max_header_bytes;
    let header_bytes = match tokio::time::timeout(
        first_frame_timeout,
        frame::read_frame_bytes(&mut receive, max_header_bytes),
    )
    .await
    {
        Err(_) => {
            let error =
                WireError::new(ErrorCode::DeadlineExceeded, format!("no stream header within {first_frame_timeout:?}"));
            return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
        }
        Ok(Err(FrameError::Closed)) => return,
        Ok(Err(error @ FrameError::TooLarge { .. })) => {
            telemetry::metrics::record_limit_refusal("header_bytes");
            let error = WireError::new(
                ErrorCode::FrameTooLarge,
                format!("stream header refused: {error} (--max-header-bytes)"),
            );
            return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
        }
        Ok(Err(error)) => {
            tracing::debug!(peer = %peer.role, %error, "malformed stream header");
            return refuse(&mut send, &mut receive, frame_error_to_wire("stream header", error), max_frame_bytes).await;
        }
        Ok(Ok(bytes)) => bytes,
    };
    let header = match decode_header(&header_bytes) {
        Ok(header) => header,
        Err(error @ (HeaderError::UnsupportedVersion { .. } | HeaderError::Unversioned { .. })) => {
            if let Some(held_back) = state.refusal_log.permit() {
                tracing::warn!(peer = %peer.role, %error, held_back, "stream of another protocol version");
            }
            let error = WireError::new(ErrorCode::UnsupportedVersion, format!("{error}; upgrade the older side"));
            return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
        }
        Err(error) => {
            tracing::debug!(peer = %peer.role, %error, "malformed stream header");
            let error = WireError::new(ErrorCode::MalformedFrame, format!("stream header is malformed: {error}"));
            return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
        }
    };
    let Some(kind) = StreamKind::from_byte(header.kind) else {
        tracing::debug!(peer = %peer.role, kind = header.kind, "unknown stream kind");
        let error = WireError::new(
            ErrorCode::UnknownStreamKind,
            format!(
                "unknown stream kind {}; this node speaks raft (1), membership (2), client (3) and admin (4)",
                header.kind
            ),
        );
        return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
    };
    if let Err(error) = authorize_stream(&peer.role, kind) {
        if let Some(held_back) = state.refusal_log.permit() {
            tracing::warn!(peer = %peer.role, kind = kind.name(), reason = "permission", held_back, "refused stream");
        }
        return refuse(&mut send, &mut receive, error, max_frame_bytes).await;
    }
    let deadline = Duration::from_millis(u64::from(header.deadline_millis))
        .min(state.config.max_request_timeout)
        .max(Duration::from_millis(1));
    let deadline_at = std::time::Instant::now() + deadline;
    telemetry::metrics::record_stream(kind.name());
    // Nodes are bounded by their own limits (budget, slots); applications and admins also by
    // how many requests each certificate has in progress.
    let _identity_slot = match &peer.role {
        Role::Node { .. } => None,
        role => match state.requests_per_identity.enter(&role.to_string()) {
            Ok(slot) => Some(slot),
            Err(error) => return refuse(&mut send, &mut receive, error, max_frame_bytes).await,
        },
    };
    // One span per request, child of the caller's span when the header carries its context: a
    // request that crosses nodes stays one trace.
    // Raft heartbeats and membership exchanges run every few hundred milliseconds: their spans are
    // debug level, so the default trace filter keeps them out of exported traces. Client and admin
    // requests, and writes forwarded to the leader, are info level.
    let span = request_span(&state, &peer, kind, matches!(kind, StreamKind::Client | StreamKind::Admin));
    telemetry::set_parent_from_traceparent(&span, header.trace_context.as_deref());
    let started = std::time::Instant::now();

    match kind {
        StreamKind::Client => {
            let (request, _body_budget) =
                match read_request::<ClientRequest>(&state, &peer, &mut receive, first_frame_timeout, max_frame_bytes)
                    .await
                {
                    Ok(request) => request,
                    Err(error) => return refuse(&mut send, &mut receive, error, max_frame_bytes).await,
                };
            let request_name = request.name();
            span.record("request", request_name);
            let forwarded = matches!(peer.role, Role::Node { .. });
            // The work runs in its own task, which keeps the request's byte budget (and, inside,
            // its search or write slot) until the work is really over: a caller that gives up at
            // its deadline gets its answer, but does not get to start more work than the limits
            // allow.
            let work = {
                let state = state.clone();
                tokio::spawn(
                    async move {
                        let _body_budget = _body_budget;
                        handlers::handle_client(&state, request, forwarded, deadline_at).await
                    }
                    .instrument(span.clone()),
                )
            };
            let answer = with_deadline(deadline, joined(work)).await;
            log_outcome(&span, &peer, kind.name(), request_name, started, &answer);
            reply(&mut send, &answer, max_frame_bytes).await;
        }
        StreamKind::Admin => {
            let (request, _body_budget) =
                match read_request::<AdminRequest>(&state, &peer, &mut receive, first_frame_timeout, max_frame_bytes)
                    .await
                {
                    Ok(request) => request,
                    Err(error) => return refuse(&mut send, &mut receive, error, max_frame_bytes).await,
                };
            if let Err(error) = authorize_admin_request(&peer.role, &request) {
                if let Some(held_back) = state.refusal_log.permit() {
                    tracing::warn!(peer = %peer.role, request = request.name(), reason = "permission", held_back, "refused request");
                }
                return reply::<()>(&mut send, &Err(error), max_frame_bytes).await;
            }
            let request_name = request.name();
            span.record("request", request_name);
            let answer = with_deadline(deadline, handlers::handle_admin(&state, &peer.role, request, deadline_at))
                .instrument(span.clone())
                .await;
            log_outcome(&span, &peer, kind.name(), request_name, started, &answer);
            reply(&mut send, &answer, max_frame_bytes).await;
        }
        StreamKind::Raft => {
            let raft_frame_bytes = max_frame_bytes + RAFT_FRAME_OVERHEAD_BYTES;
            let (request, _body_budget) =
                match read_request::<RaftRequest>(&state, &peer, &mut receive, first_frame_timeout, raft_frame_bytes)
                    .await
                {
                    Ok(request) => request,
                    Err(error) => return refuse(&mut send, &mut receive, error, max_frame_bytes).await,
                };
            let span = if matches!(request, RaftRequest::Propose(_)) {
                let span = request_span(&state, &peer, kind, true);
                telemetry::set_parent_from_traceparent(&span, header.trace_context.as_deref());
                span
            } else {
                span
            };
            // A node certificate for id 2 cannot speak for node 3.
            if let (Some(claimed), Role::Node { node_id }) = (request.claimed_sender(), &peer.role) {
                if claimed != *node_id {
                    if let Some(held_back) = state.refusal_log.permit() {
                        tracing::warn!(peer = %peer.role, claimed, reason = "impersonation", held_back, "refused raft message");
                    }
                    let error = WireError::new(
                        ErrorCode::PermissionDenied,
                        format!("permission denied: node {node_id} may not send raft messages as node {claimed}"),
                    );
                    return reply::<()>(&mut send, &Err(error), max_frame_bytes).await;
                }
            }
            let request_name = request.name();
            span.record("request", request_name);
            let Role::Node { node_id: sender } = peer.role else {
                return;
            };
            let work = {
                let state = state.clone();
                tokio::spawn(
                    async move {
                        let _body_budget = _body_budget;
                        handlers::handle_raft(&state, sender, request, deadline_at).await
                    }
                    .instrument(span.clone()),
                )
            };
            let answer = with_deadline(deadline, joined(work)).await;
            log_outcome(&span, &peer, kind.name(), request_name, started, &answer);
            reply(&mut send, &answer, raft_frame_bytes).await;
        }
        StreamKind::Membership => {
            let (request, _body_budget) = match read_request::<MembershipDigest>(
                &state,
                &peer,
                &mut receive,
                first_frame_timeout,
                max_frame_bytes,
            )
            .await
            {
                Ok(request) => request,
                Err(error) => return refuse(&mut send, &mut receive, error, max_frame_bytes).await,
            };
            let Role::Node { node_id } = peer.role else {
                return;
            };
            let answer = state.cluster.handle_exchange(node_id, request).map_err(WireError::from);
            if let Err(error) = &answer {
                if let Some(held_back) = state.refusal_log.permit() {
                    tracing::warn!(peer = %peer.role, error = %error.message, held_back, "refused membership digest");
                }
            }
            reply(&mut send, &answer, max_frame_bytes).await;
        }
    }
}

fn request_span(state: &NodeState, peer: &Peer, kind: StreamKind, info: bool) -> tracing::Span {
    if info {
        tracing::info_span!(
            "bayard.request",
            node_id = state.config.node_id,
            kind = kind.name(),
            request = tracing::field::Empty,
            peer = %peer.role,
            outcome = tracing::field::Empty,
        )
    } else {
        tracing::debug_span!(
            "bayard.request",
            node_id = state.config.node_id,
            kind = kind.name(),
            request = tracing::field::Empty,
            peer = %peer.role,
            outcome = tracing::field::Empty,
        )
    }
}

/// Reads the request frame: its length, then room for it in the node's byte budget, then the
/// body. The budget's permit is held until the answer is sent, so the bytes a node holds for
/// requests are bounded whatever the callers announce.
async fn read_request<T: serde::de::DeserializeOwned>(
    state: &NodeState,
    peer: &Peer,
    receive: &mut quinn::RecvStream,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(T, tokio::sync::OwnedSemaphorePermit), WireError> {
    let frame_bytes = match tokio::time::timeout(timeout, frame::read_frame_length(receive, max_frame_bytes)).await {
        Err(_) => {
            return Err(WireError::new(ErrorCode::DeadlineExceeded, format!("no request frame within {timeout:?}")))
        }
        Ok(Err(FrameError::Closed)) => {
            return Err(WireError::new(
                ErrorCode::MalformedFrame,
                "stream ended after the header, before a request frame",
            ))
        }
        Ok(Err(error)) => return Err(frame_error_to_wire("request frame", error)),
        Ok(Ok(frame_bytes)) => frame_bytes,
    };
    let budget = match peer.role {
        Role::Node { .. } => &state.peer_request_bytes,
        _ => &state.request_bytes,
    };
    let permit = budget.reserve(frame_bytes, state.config.limits.max_queue_wait).await?;
    let body = match tokio::time::timeout(timeout, frame::read_frame_body(receive, frame_bytes)).await {
        Err(_) => {
            return Err(WireError::new(ErrorCode::DeadlineExceeded, format!("no request frame within {timeout:?}")))
        }
        Ok(Err(error)) => return Err(frame_error_to_wire("request frame", error)),
        Ok(Ok(body)) => body,
    };
    let request =
        postcard::from_bytes(&body).map_err(|error| frame_error_to_wire("request frame", FrameError::Decode(error)))?;
    Ok((request, permit))
}

/// The answer of a request task.
pub(super) async fn joined<T>(work: tokio::task::JoinHandle<Result<T, WireError>>) -> Result<T, WireError> {
    work.await.unwrap_or_else(|error| Err(WireError::new(ErrorCode::Internal, format!("request task failed: {error}"))))
}

pub(super) async fn with_deadline<T>(
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    match tokio::time::timeout(deadline, work).await {
        Ok(answer) => answer,
        Err(_) => Err(WireError::new(
            ErrorCode::DeadlineExceeded,
            format!("request did not finish within its deadline of {deadline:?}"),
        )),
    }
}

pub(super) fn log_outcome<T>(
    span: &tracing::Span,
    peer: &Peer,
    kind: &'static str,
    request: &'static str,
    started: std::time::Instant,
    answer: &Result<T, WireError>,
) {
    let outcome = match answer {
        Ok(_) => "ok",
        Err(error) => error.code.name(),
    };
    span.record("outcome", outcome);
    telemetry::record_request(kind, request, outcome, started.elapsed());
    match answer {
        Ok(_) => tracing::debug!(peer = %peer.role, kind, request, "request served"),
        // The node's own trouble is worth a line; the caller's mistakes and refusals are counted
        // in bayard_requests_total{outcome} and logged at debug, so a flood of them costs no disk.
        Err(error) if !matches!(error.code, ErrorCode::Internal | ErrorCode::Unavailable) => tracing::debug!(
            peer = %peer.role,
            kind,
            request,
            code = error.code.name(),
            error = %error.message,
            "request failed"
        ),
        Err(error) => tracing::info!(
            peer = %peer.role,
            kind,
            request,
            code = error.code.name(),
            error = %error.message,
            "request failed"
        ),
    }
}
