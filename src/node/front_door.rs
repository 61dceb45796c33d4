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
        self.state.cluster.local_status()
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
                let _identity_slot = self.state.requests_per_identity.enter(&caller.identity())?;
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
                // Joins and removal notices are between nodes; the HTTP door never carries them.
                if matches!(
                    request,
                    AdminRequest::Join { .. } | AdminRequest::Removed { .. } | AdminRequest::LocalStatus
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
                let _identity_slot = self.state.requests_per_identity.enter(&caller.identity())?;
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
        Box::pin(async move { self.state.request_bytes.reserve(bytes, self.state.config.limits.max_queue_wait).await })
    }
}
