//! The HTTPS front door: Bayard's REST gateway (`/v1/…`) and an Elasticsearch-compatible subset,
//! on TCP, on the same port number as the node's QUIC endpoint by default.
//!
//! - [`server`]: TLS (rustls with ring, the node's certificates, client certificates optional),
//!   HTTP/1.1 and HTTP/2, a bounded number of connections, graceful shutdown.
//! - [`auth`]: who is calling: a client certificate (the same roles as on QUIC) or an API key
//!   (`Authorization: ApiKey base64(id:key)` or `Bearer <key>`).
//! - [`error`]: every failure as JSON with a fitting status; one shape that Bayard's scripts and
//!   Elasticsearch clients both read.
//! - [`rest`]: the v0.8 gateway's routes.
//! - [`elastic`]: the Elasticsearch subset.
//!
//! This module knows nothing of Raft or of the node's internals: it turns HTTP into the same
//! [`ClientRequest`]s and [`AdminRequest`]s the QUIC door carries and hands them to a
//! [`Backend`], which applies the same handlers and limits to both doors.

pub mod auth;
pub mod elastic;
pub mod error;
pub mod rest;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::ApiKeyTable;
use crate::index::SearchIndex;
use crate::protocol::{AdminRequest, AdminResponse, ClientRequest, ClientResponse, NodeStatus, WireError};

pub use auth::Caller;
pub use server::{run, HttpTls};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the HTTP door needs of the node. The node implements it with the very handlers its QUIC
/// door uses, so both doors apply the same limits, authorization and write path.
pub trait Backend: Send + Sync + 'static {
    fn node_id(&self) -> u64;
    /// The cluster's id, once it has one.
    fn cluster_id(&self) -> Option<String>;
    /// This node's view of the cluster (no remote calls).
    fn local_status(&self) -> NodeStatus;
    /// The node's index, for local reads that are no request of their own (the mapping, checking
    /// documents before a bulk write, whether ids exist). Called on blocking threads only.
    fn index(&self) -> Arc<SearchIndex>;
    /// The API keys as applied on this node.
    fn api_keys(&self) -> Arc<ApiKeyTable>;
    /// A client request, under the caller's limits.
    fn client<'a>(
        &'a self,
        caller: &'a Caller,
        request: ClientRequest,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<ClientResponse, WireError>>;
    /// An admin request, authorized for the caller's role.
    fn admin<'a>(
        &'a self,
        caller: &'a Caller,
        request: AdminRequest,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<AdminResponse, WireError>>;
    /// Room for a request body in the byte budget of HTTP bodies (apart from QUIC's, so slow
    /// HTTP uploads cannot starve QUIC clients), held until the returned permit is dropped.
    fn reserve_request_bytes(
        &self,
        bytes: usize,
    ) -> BoxFuture<'_, Result<tokio::sync::OwnedSemaphorePermit, WireError>>;
    /// A place among the caller's requests in progress (`--max-requests-per-identity`), taken
    /// before its body is read and held for the whole request.
    fn admit(&self, caller: &Caller) -> Result<Box<dyn std::any::Any + Send + Sync>, WireError>;
    /// Waits (until `deadline`) for this node to have applied the log up to `index`, so that what
    /// a caller just wrote through it is what it reads from it next.
    fn wait_applied(&self, index: u64, deadline: Instant) -> BoxFuture<'_, Result<(), WireError>>;
    /// How many members (this one included) have applied the log up to `index`, asking each to
    /// wait for it until `deadline`: a `refresh` answers once every live member shows the write.
    fn members_applied(&self, index: u64, deadline: Instant) -> BoxFuture<'_, usize>;
    /// The stored fields (JSON text) of these ids in this node's committed index, under the
    /// node's read slots.
    fn stored_documents(
        &self,
        ids: Vec<String>,
        deadline: Instant,
    ) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>, WireError>>;
}

/// Settings of the HTTP door (flags of `bayard serve`).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The node's index as paths name it (`/{index}/_search`).
    pub index_name: String,
    pub trust_domain: String,
    /// Open HTTP connections, all callers together.
    pub max_connections: usize,
    /// Open HTTP connections from one remote address.
    pub max_connections_per_address: usize,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Most items in one `_bulk` body.
    pub max_bulk_items: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time a caller has for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a caller has to send a request's headers, and then its body.
    pub read_timeout: Duration,
    /// Longest a request may take (reads and writes alike).
    pub request_timeout: Duration,
    /// How long shutdown lets open requests finish.
    pub drain_timeout: Duration,
    /// Largest frame the node's peers accept: bulk writes are cut into requests under half of it.
    pub max_frame_bytes: usize,
}

impl HttpConfig {
    pub fn new(index_name: impl Into<String>) -> Self {
        HttpConfig {
            index_name: index_name.into(),
            trust_domain: crate::transport::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            max_connections: 1024,
            max_connections_per_address: 256,
            idle_timeout: Duration::from_secs(60),
            max_bulk_items: 10_000,
            max_body_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_frame_bytes: crate::transport::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Shared by every connection and request.
pub(crate) struct HttpState {
    pub backend: Arc<dyn Backend>,
    pub config: HttpConfig,
}

/// The version of Elasticsearch whose API shapes the subset follows (clients check the major).
pub const ELASTICSEARCH_COMPATIBLE_VERSION: &str = "8.15.0";

/// The latest moment a request may finish.
pub(crate) fn deadline(state: &HttpState) -> Instant {
    Instant::now() + state.config.request_timeout
}

/// The header an HTTP caller may set to make a write safe to retry: the same value is applied
/// at most once, like the request id the QUIC client draws (32 hex digits).
pub const REQUEST_ID_HEADER: &str = "x-bayard-request-id";

/// The write's request id: the caller's, or a new one.
pub(crate) fn request_id(headers: &axum::http::HeaderMap) -> Result<crate::protocol::RequestId, error::ApiError> {
    let Some(value) = headers.get(REQUEST_ID_HEADER) else {
        return Ok(crate::protocol::RequestId::random());
    };
    value
        .to_str()
        .ok()
        .filter(|text| text.len() == 32)
        .and_then(|text| u128::from_str_radix(text, 16).ok())
        .map(crate::protocol::RequestId)
        .ok_or_else(|| error::ApiError::bad_request(format!("{REQUEST_ID_HEADER} must be 32 hex digits")))
}

/// The request id of the `n`th write a request makes (its first is the request's own): derived,
/// so a retried request makes the same ids again, and unrelated to `first + n`, so a caller
/// numbering its requests in sequence cannot collide with another request's parts.
pub(crate) fn derived_request_id(first: crate::protocol::RequestId, n: u64) -> crate::protocol::RequestId {
    if n == 0 {
        return first;
    }
    let mut input = first.0.to_le_bytes().to_vec();
    input.extend_from_slice(&n.to_le_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    crate::protocol::RequestId(u128::from_le_bytes(bytes))
}

/// The id of a document a request asks the node to name (`POST /{index}/_doc`, a bulk `index`
/// without `_id`): drawn from the request id and the item's position, so a retry names the
/// same document.
pub(crate) fn derived_document_id(request_id: crate::protocol::RequestId, position: usize) -> String {
    use base64::Engine;
    let mut input = request_id.0.to_le_bytes().to_vec();
    input.extend_from_slice(&(position as u64).to_le_bytes());
    input.extend_from_slice(b"document id");
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..15])
}

/// Reads a request body: its announced length is checked against `--http-max-body-mb`, room is
/// reserved in the node's byte budget, and the bytes are read under the read timeout. The permit
/// is held for as long as the body is.
pub(crate) async fn read_body(
    state: &HttpState,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(bytes::Bytes, tokio::sync::OwnedSemaphorePermit), error::ApiError> {
    use http_body_util::BodyExt;
    let max_bytes = state.config.max_body_bytes;
    let too_large = |bytes: String| {
        crate::telemetry::metrics::record_limit_refusal("http_body_bytes");
        error::ApiError::too_large(format!(
            "the request body has {bytes} bytes, over the limit of {max_bytes} (--http-max-body-mb)"
        ))
    };
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<usize>().ok());
    if let Some(announced) = announced {
        if announced > max_bytes {
            // A body a little over the limit is read and dropped (chunk by chunk, under the read
            // timeout), so that the caller reads the 413 instead of a connection reset in the
            // middle of its upload; a much larger one is not worth the bytes.
            if announced <= max_bytes.saturating_mul(2) {
                let mut body = body;
                let _ = tokio::time::timeout(state.config.read_timeout, async {
                    while let Some(Ok(_)) = body.frame().await {}
                })
                .await;
            }
            return Err(too_large(announced.to_string()));
        }
    }
    let permit = state.backend.reserve_request_bytes(announced.unwrap_or(max_bytes).max(1)).await?;
    let limited = http_body_util::Limited::new(body, max_bytes);
    let collected = tokio::time::timeout(state.config.read_timeout, limited.collect())
        .await
        .map_err(|_| {
            error::ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "deadline_exceeded",
                "timeout_exception",
                format!("the request body did not arrive within {:?}", state.config.read_timeout),
            )
        })?
        .map_err(|error| {
            if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large(format!("more than {max_bytes}"))
            } else {
                error::ApiError::bad_request(format!("cannot read the request body: {error}"))
            }
        })?;
    Ok((collected.to_bytes(), permit))
}

/// The body as UTF-8 text.
pub(crate) fn body_text(bytes: &[u8]) -> Result<&str, error::ApiError> {
    std::str::from_utf8(bytes).map_err(|_| error::ApiError::bad_request("the request body is not UTF-8"))
}

/// One line of an NDJSON body with its number (from 1); blank lines are skipped.
pub(crate) fn ndjson_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(index, line)| (index + 1, line.trim())).filter(|(_, line)| !line.is_empty())
}
