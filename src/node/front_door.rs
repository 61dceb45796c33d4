//! The node behind its HTTP door: the same handlers, limits and authorization as the QUIC door,
//! reached through `http::Backend`. Requests are counted and traced with `kind="http"`, so the
//! door a request came through shows in `bayard_requests_total` and in its span.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::server::{joined, log_outcome, with_deadline};
use super::{handlers, NodeState};
use crate::http::{Backend, BoxFuture, Caller};
use crate::index::SearchIndex;
use crate::protocol::{AdminRequest, AdminResponse, ClientRequest, ClientResponse, ErrorCode, NodeStatus, WireError};
use crate::transport::identity::Peer;

/// The metric and span label of requests that came over HTTP.
const HTTP_KIND: &str = "http";

pub(crate) struct HttpBackend {
    pub state: Arc<NodeState>,
}

impl HttpBackend {
    fn peer(&self, caller: &Caller) -> Peer {
        Peer { role: caller.role.clone(), trust_domain: self.state.config.trust_domain.clone() }
    }

    fn span(&self, caller: &Caller, request: &'static str) -> tracing::Span {
        tracing::info_span!(
            "bayard.request",
            node_id = self.state.config.node_id,
            kind = HTTP_KIND,
            request,
            peer = %caller.identity(),
            outcome = tracing::field::Empty,
        )
    }
}

fn read_only_refusal(request: &str) -> WireError {
    WireError::new(
        ErrorCode::PermissionDenied,
        format!("permission denied: this API key is read-only and may not run `{request}`"),
    )
}

impl Backend for HttpBackend {
    fn node_id(&self) -> u64 {
        self.state.node_id()
    }

    fn cluster_id(&self) -> Option<String> {
        self.state.metadata().cluster_id
    }

    fn local_status(&self) -> NodeStatus {
        // With every member (from the membership and the exchange; no remote call).
        self.state.cluster.status()
    }

    fn index(&self) -> Arc<SearchIndex> {
        self.state.index.current()
    }

    fn api_keys(&self) -> Arc<crate::access::ApiKeyTable> {
        self.state.keys.current()
    }

    fn client<'a>(
        &'a self,
        caller: &'a Caller,
        request: ClientRequest,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<ClientResponse, WireError>> {
        Box::pin(async move {
            let started = Instant::now();
            let name = request.name();
            let span = self.span(caller, name);
            let answer = async {
                if caller.read_only && request.is_write() {
                    return Err(read_only_refusal(name));
                }
                // The caller's per-identity slot was taken when the request arrived (`admit`).
                // As on QUIC: the work keeps its slots until it is really over, even when the
                // caller stops waiting at its deadline.
                let state = self.state.clone();
                let work = tokio::spawn(
                    async move { handlers::handle_client(&state, request, false, deadline).await }
                        .instrument(span.clone()),
                );
                with_deadline(deadline.saturating_duration_since(Instant::now()), joined(work)).await
            }
            .await;
            log_outcome(&span, &self.peer(caller), HTTP_KIND, name, started, &answer);
            answer
        })
    }

    fn admin<'a>(
        &'a self,
        caller: &'a Caller,
        request: AdminRequest,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<AdminResponse, WireError>> {
        Box::pin(async move {
            let started = Instant::now();
            let name = request.name();
            let span = self.span(caller, name);
            let answer = async {
                // Joins, removal notices and apply waits are between nodes; the HTTP door never
                // carries them.
                if matches!(
                    request,
                    AdminRequest::Join { .. }
                        | AdminRequest::Removed { .. }
                        | AdminRequest::LocalStatus
                        | AdminRequest::WaitApplied { .. }
                ) {
                    return Err(WireError::new(
                        ErrorCode::PermissionDenied,
                        format!("`{name}` is not served over HTTP"),
                    ));
                }
                super::authorization::authorize_admin_request(&caller.role, &request)?;
                if caller.read_only && !request.is_read_only() {
                    return Err(read_only_refusal(name));
                }
                let timeout = deadline.saturating_duration_since(Instant::now());
                with_deadline(timeout, handlers::handle_admin(&self.state, &caller.role, request, deadline))
                    .instrument(span.clone())
                    .await
            }
            .await;
            log_outcome(&span, &self.peer(caller), HTTP_KIND, name, started, &answer);
            answer
        })
    }

    fn reserve_request_bytes(
        &self,
        bytes: usize,
    ) -> BoxFuture<'_, Result<tokio::sync::OwnedSemaphorePermit, WireError>> {
        Box::pin(
            async move { self.state.http_request_bytes.reserve(bytes, self.state.config.limits.max_queue_wait).await },
        )
    }

    fn admit(&self, caller: &Caller) -> Result<Box<dyn std::any::Any + Send + Sync>, WireError> {
        let identity = caller.identity();
        self.state.requests_per_identity.enter_detached(&identity)?;
        Ok(Box::new(IdentitySlot { state: self.state.clone(), identity }))
    }

    fn wait_applied(&self, index: u64, deadline: Instant) -> BoxFuture<'_, Result<(), WireError>> {
        Box::pin(async move {
            let timeout = deadline.saturating_duration_since(Instant::now());
            self.state
                .raft
                .wait(Some(timeout))
                .applied_index_at_least(Some(index), "the caller's write is applied here")
                .await
                .map(|_| ())
                .map_err(|error| {
                    WireError::new(
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "the write was committed, but node {} has not applied it yet: {error}",
                            self.state.node_id()
                        ),
                    )
                })
        })
    }

    fn members_applied(&self, index: u64, deadline: Instant) -> BoxFuture<'_, usize> {
        Box::pin(self.state.cluster.members_applied(index, deadline))
    }

    fn stored_documents(
        &self,
        ids: Vec<String>,
        deadline: Instant,
    ) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>, WireError>> {
        Box::pin(async move {
            let wait = self.state.config.limits.max_queue_wait.min(deadline.saturating_duration_since(Instant::now()));
            let slot = self.state.searches.enter(wait).await?;
            let index = self.state.index.current();
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let mut found = std::collections::HashMap::new();
                for id in ids {
                    if let Some(document) = index.get(&id).map_err(handlers::index_error_to_wire)? {
                        found.insert(id, document.fields_json);
                    }
                }
                Ok(found)
            })
            .await
            .map_err(|error| WireError::new(ErrorCode::Internal, format!("index worker failed: {error}")))?
        })
    }
}

/// A caller's place among its requests in progress, given back when the request ends.
struct IdentitySlot {
    state: Arc<NodeState>,
    identity: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        self.state.requests_per_identity.leave(&self.identity);
    }
}
