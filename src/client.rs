//! `bayard::client`: the typed async client the CLI and the tests use.
//!
//! A [`Client`] holds one QUIC endpoint and one pooled connection per server. Each call is one
//! stream. When a server does not answer (or says it is unavailable) the call moves on to the next
//! server in the list, for a bounded number of rounds; an answer that is an error (a bad query, a
//! schema violation) is returned at once, since another server would say the same.
//!
//! Writes go to the leader when the client knows it: every write answer (and every "unavailable"
//! answer of a node that knows the leader) names it, and the next write starts there. Every write
//! carries a request id drawn once and sent again with each retry, so a write whose answer was
//! lost is applied once however often it is retried.
//!
//! ```no_run
//! # async fn example() -> Result<(), bayard::client::ClientError> {
//! use bayard::client::{Client, ClientOptions};
//! use bayard::transport::TlsFiles;
//! let tls = TlsFiles {
//!     ca_certificate: "certs/ca.pem".into(),
//!     certificate: "certs/client-app.pem".into(),
//!     private_key: "certs/client-app.key".into(),
//! };
//! let client = Client::connect(ClientOptions::new(vec!["127.0.0.1:5001".into()], tls))?;
//! client.put("1", r#"{"title":"hello"}"#).await?;
//! client.commit().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::index::{SearchRequest, SearchResponse};
use crate::protocol::{
    AdminRequest, AdminResponse, ClientRequest, ClientResponse, Consistency, DocumentInput, ErrorCode, LeaderHint,
    NodeStatus, RequestId, StreamKind, WireError,
};
use crate::transport::frame::FrameError;
use crate::transport::pool::{ConnectError, ConnectionPool};
use crate::transport::{self, CallError, TlsFiles, TlsMaterial};

/// Documents per bulk request, at most; requests are also kept under half the frame limit.
pub const BULK_CHUNK_DOCUMENTS: usize = 1_000;
/// Bulk requests one load keeps in flight: enough that the node validates, replicates and
/// applies one while the next crosses the network.
pub const BULK_CHUNKS_IN_FLIGHT: usize = 4;

/// One document of a bulk load: its id (for ordering), and a tag of the caller's (a line
/// number, a position) that errors name it by.
#[derive(Debug, Clone)]
pub struct BulkItem {
    pub id: String,
    pub document: DocumentInput,
    pub tag: usize,
}

/// Why a bulk load stopped, and exactly what it wrote before.
#[derive(Debug)]
pub struct BulkPutFailure {
    /// What failed; a node's "document K" is rewritten to the document's tag.
    pub error: ClientError,
    /// Ranges of tags (first, last) whose chunks were applied, in the order of the input.
    pub written_tags: Vec<(usize, usize)>,
    /// The tags of the chunk that failed (none when the input itself failed).
    pub failed_tags: Option<(usize, usize)>,
}

/// The longest a client keeps sending one write (its first attempt and every resend): under
/// the two minutes for which nodes remember a request id (`raft::dedup::REQUEST_RETENTION_MS`),
/// so a resend never comes after its first attempt was forgotten.
pub const WRITE_RETRY_SPAN: Duration = Duration::from_secs(100);
const _: () = assert!(WRITE_RETRY_SPAN.as_millis() < crate::raft::dedup::REQUEST_RETENTION_MS as u128);

/// The `_id` of a document's JSON, or empty (the node then refuses the document by name).
pub fn document_id_of(document_json: &str) -> String {
    #[derive(serde::Deserialize)]
    struct OnlyId {
        #[serde(rename = "_id")]
        id: Option<String>,
    }
    serde_json::from_str::<OnlyId>(document_json).ok().and_then(|only| only.id).unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` of the nodes to try, in order.
    pub servers: Vec<String>,
    pub tls: TlsFiles,
    pub trust_domain: String,
    /// Deadline of one request, sent to the node with it.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_frame_bytes: usize,
    /// Passes over the server list before giving up on transport failures.
    pub retry_rounds: usize,
    /// W3C traceparent to send with every request (the CLI takes it from `TRACEPARENT`).
    pub trace_context: Option<String>,
}

impl ClientOptions {
    pub fn new(servers: Vec<String>, tls: TlsFiles) -> Self {
        ClientOptions {
            servers,
            tls,
            trust_domain: transport::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            request_timeout: Duration::from_secs(30),
            // A handshake on a LAN takes milliseconds: a dead server is given up on within a
            // second and the next one tried.
            connect_timeout: Duration::from_secs(1),
            max_frame_bytes: transport::DEFAULT_MAX_FRAME_BYTES,
            retry_rounds: 2,
            trace_context: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("no server given; pass --servers host:port")]
    NoServers,
    #[error("no server answered: {}", attempts.join("; "))]
    Unavailable { attempts: Vec<String> },
    /// The node answered with an error.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String, server: String },
    #[error("request not sent: {0}")]
    Request(FrameError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unexpected answer from {server} to `{request}`")]
    UnexpectedResponse { server: String, request: &'static str },
}

impl ClientError {
    /// The error code a node answered with, if it answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What a write reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriteReceipt {
    pub operations: u64,
    pub applied_index: u64,
    /// An earlier attempt of this request had been applied (its answer was lost on the way):
    /// nothing was applied twice.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// How many leader hints one call follows before it goes on through the server list.
const MAX_LEADER_HINTS_FOLLOWED: usize = 3;

/// A stored document as `get` returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub id: String,
    pub fields: serde_json::Value,
}

/// One search hit with its stored fields parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub id: String,
    pub fields: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_value: Option<serde_json::Value>,
}

/// A search answer, shaped as the CLI prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    pub docs: Vec<Hit>,
    pub facet: BTreeMap<String, BTreeMap<String, u64>>,
    /// The node that answered, and how far its index had applied the log.
    pub node_id: u64,
    pub applied_index: u64,
}

impl SearchResult {
    pub fn from_response(response: SearchResponse, node_id: u64, applied_index: u64) -> Self {
        let docs = response
            .docs
            .into_iter()
            .map(|hit| Hit {
                fields: parse_json_or_string(&hit.fields_json),
                sort_value: hit.sort_value.as_deref().map(parse_json_or_string),
                id: hit.id,
                score: hit.score,
            })
            .collect();
        let facet =
            response.facets.into_iter().map(|facet| (facet.field, facet.counts.into_iter().collect())).collect();
        SearchResult { count: response.count, docs, facet, node_id, applied_index }
    }
}

/// The node sends stored fields as JSON text; should it ever not parse, keep the text.
fn parse_json_or_string(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

pub struct Client {
    pool: ConnectionPool,
    options: ClientOptions,
    /// The server that answered last; calls start there.
    preferred_server: AtomicUsize,
    /// The leader's address, as the last answer that named it said: writes start there.
    leader_address: Mutex<Option<String>>,
}

impl Client {
    /// Reads the certificate files and prepares the endpoint. No connection is made until the
    /// first call.
    pub fn connect(options: ClientOptions) -> Result<Self, ClientError> {
        let material = TlsMaterial::load(&options.tls)?;
        let quic_config = transport::tls::client_config(&material, transport::DEFAULT_MAX_CONCURRENT_STREAMS)?;
        Self::with_quic_config(options, quic_config)
    }

    /// Like [`Client::connect`] with a ready QUIC client configuration (tests use it to present
    /// no certificate or a foreign one).
    pub fn with_quic_config(options: ClientOptions, quic_config: quinn::ClientConfig) -> Result<Self, ClientError> {
        if options.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let ipv6 = options.servers.iter().all(|server| server.starts_with('['));
        let endpoint = transport::bind_client_endpoint(quic_config, ipv6)?;
        let pool = ConnectionPool::new(endpoint, options.trust_domain.clone(), options.connect_timeout);
        Ok(Client { pool, options, preferred_server: AtomicUsize::new(0), leader_address: Mutex::new(None) })
    }

    /// Like [`Client::connect`] on a UDP socket the caller bound (the fault-injection tests bind
    /// it inside a network namespace).
    pub fn on_socket(options: ClientOptions, socket: std::net::UdpSocket) -> Result<Self, ClientError> {
        if options.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let material = TlsMaterial::load(&options.tls)?;
        let quic_config = transport::tls::client_config(&material, transport::DEFAULT_MAX_CONCURRENT_STREAMS)?;
        let endpoint = transport::client_endpoint_on_socket(quic_config, socket)?;
        let pool = ConnectionPool::new(endpoint, options.trust_domain.clone(), options.connect_timeout);
        Ok(Client { pool, options, preferred_server: AtomicUsize::new(0), leader_address: Mutex::new(None) })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The leader's address, as the last answer that named one said.
    pub fn known_leader(&self) -> Option<String> {
        self.leader_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn remember_leader(&self, leader: Option<&LeaderHint>) {
        if let Some(leader) = leader {
            *self.leader_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(leader.address.clone());
        }
    }

    /// Sends one request, moving through the servers on transport failures.
    async fn call<Request, Response>(
        &self,
        kind: StreamKind,
        request: &Request,
    ) -> Result<(Response, String), ClientError>
    where
        Request: Serialize,
        Response: DeserializeOwned,
    {
        self.call_preferring(kind, request, None).await
    }

    /// Like `call`, trying `first` (the leader, for writes) before the server list.
    async fn call_preferring<Request, Response>(
        &self,
        kind: StreamKind,
        request: &Request,
        first: Option<String>,
    ) -> Result<(Response, String), ClientError>
    where
        Request: Serialize,
        Response: DeserializeOwned,
    {
        // The root span of the request (a child of TRACEPARENT when the caller passed one); its
        // context travels in every stream header, so the nodes' spans join this trace.
        let span = tracing::info_span!("bayard.client", kind = kind.name());
        crate::telemetry::set_parent_from_traceparent(&span, self.options.trace_context.as_deref());
        let trace_context = crate::telemetry::traceparent_of_span(&span).or_else(|| self.options.trace_context.clone());
        let budget = self.options.request_timeout;
        self.call_with(kind, request, trace_context, first, budget).instrument(span).await
    }

    async fn call_with<Request, Response>(
        &self,
        kind: StreamKind,
        request: &Request,
        trace_context: Option<String>,
        leader: Option<String>,
        budget: Duration,
    ) -> Result<(Response, String), ClientError>
    where
        Request: Serialize,
        Response: DeserializeOwned,
    {
        let servers = &self.options.servers;
        let first = self.preferred_server.load(Ordering::Relaxed) % servers.len();
        let mut attempts = Vec::new();
        let mut hints_followed = 0;
        // `budget` bounds the whole call, every server and round included.
        let deadline = tokio::time::Instant::now() + budget;
        let remaining = || deadline.saturating_duration_since(tokio::time::Instant::now());
        'rounds: for round in 0..self.options.retry_rounds.max(1) {
            if round > 0 {
                let pause = Duration::from_millis(200 * round as u64);
                if remaining() <= pause {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            // This round's servers: the leader first (when known), then the list from the one
            // that answered last. A leader hint met on the way goes to the front.
            let mut order: std::collections::VecDeque<(Option<usize>, String)> = (0..servers.len())
                .map(|offset| (first + offset) % servers.len())
                .map(|position| (Some(position), servers[position].clone()))
                .collect();
            if let Some(leader) = &leader {
                order.retain(|(_, server)| server != leader);
                order.push_front((None, leader.clone()));
            }
            while let Some((position, server)) = order.pop_front() {
                if remaining().is_zero() {
                    break 'rounds;
                }
                let server = &server;
                let dialled = match tokio::time::timeout(remaining(), self.pool.get(server)).await {
                    Ok(dialled) => dialled,
                    Err(_) => {
                        attempts.push(format!("{server}: no answer within {budget:?}"));
                        break 'rounds;
                    }
                };
                if let Err(ConnectError::TimedOut { .. }) = &dialled {
                    // Dead or unreachable: the next server is tried at once.
                    self.pool.forget(server);
                }
                let connection = match dialled {
                    Ok(connection) => connection,
                    Err(error) => {
                        // A refused certificate is not going to change by asking again.
                        if matches!(error, ConnectError::NotANode { .. }) {
                            return Err(ClientError::Unavailable { attempts: vec![error.to_string()] });
                        }
                        attempts.push(error.to_string());
                        continue;
                    }
                };
                let outcome = transport::call::<Request, Response>(
                    &connection,
                    kind,
                    trace_context.clone(),
                    request,
                    remaining().max(Duration::from_millis(1)),
                    self.options.max_frame_bytes,
                )
                .await;
                match outcome {
                    Ok(Ok(response)) => {
                        if let Some(position) = position {
                            self.preferred_server.store(position, Ordering::Relaxed);
                        }
                        return Ok((response, server.clone()));
                    }
                    Ok(Err(WireError { code: ErrorCode::Unavailable, message, leader })) => {
                        attempts.push(format!("{server}: {message}"));
                        if position.is_none() && leader.is_none() {
                            // The remembered leader cannot serve and names no other.
                            *self.leader_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                        }
                        if let Some(hint) = leader.filter(|hint| &hint.address != server) {
                            if hints_followed < MAX_LEADER_HINTS_FOLLOWED {
                                hints_followed += 1;
                                self.remember_leader(Some(&hint));
                                order.retain(|(_, queued)| queued != &hint.address);
                                order.push_front((None, hint.address));
                            }
                        }
                    }
                    Ok(Err(WireError { code, message, .. })) => {
                        return Err(ClientError::Remote { code, message, server: server.clone() })
                    }
                    Err(CallError::Frame(error @ (FrameError::TooLarge { .. } | FrameError::Encode(_)))) => {
                        return Err(ClientError::Request(error));
                    }
                    Err(error) => {
                        self.pool.forget(server);
                        let reason = match &error {
                            CallError::Connection(connection_error) => {
                                transport::pool::describe_connection_error(connection_error)
                            }
                            other => other.to_string(),
                        };
                        attempts.push(format!("{server}: {reason}"));
                        // A leader that does not answer is no longer the one to start with.
                        if position.is_none() {
                            *self.leader_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                        }
                    }
                }
            }
        }
        // One line per distinct failure: two rounds over a dead server say the same thing twice.
        let mut seen = std::collections::HashSet::new();
        attempts.retain(|attempt| seen.insert(attempt.clone()));
        Err(ClientError::Unavailable { attempts })
    }

    async fn client_call(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        Ok(self.call(StreamKind::Client, &request).await?.0)
    }

    /// Sends a write to the leader when it is known (else through the list). The request, with
    /// its request id, is the same on every attempt.
    ///
    /// A write is sent for at most [`WRITE_RETRY_SPAN`] whatever `request_timeout` says: the
    /// nodes remember a request id for two minutes after applying it, so every resend of it
    /// must come within that (see `raft::dedup`).
    async fn write(&self, request: ClientRequest) -> Result<WriteReceipt, ClientError> {
        let name = request.name();
        let span = tracing::info_span!("bayard.client", kind = StreamKind::Client.name());
        crate::telemetry::set_parent_from_traceparent(&span, self.options.trace_context.as_deref());
        let trace_context = crate::telemetry::traceparent_of_span(&span).or_else(|| self.options.trace_context.clone());
        let budget = self.options.request_timeout.min(WRITE_RETRY_SPAN);
        let (response, server) = self
            .call_with(StreamKind::Client, &request, trace_context, self.known_leader(), budget)
            .instrument(span)
            .await?;
        match response {
            ClientResponse::Written { operations, applied_index, duplicate, leader } => {
                self.remember_leader(leader.as_ref());
                Ok(WriteReceipt { operations, applied_index, duplicate })
            }
            _ => Err(ClientError::UnexpectedResponse { server, request: name }),
        }
    }

    /// Upserts one document under `id`.
    pub async fn put(&self, id: &str, document_json: &str) -> Result<WriteReceipt, ClientError> {
        self.put_documents(vec![DocumentInput { id: Some(id.to_string()), document_json: document_json.to_string() }])
            .await
    }

    /// Upserts documents in one request (one batch: all or nothing).
    pub async fn put_documents(&self, documents: Vec<DocumentInput>) -> Result<WriteReceipt, ClientError> {
        self.write(ClientRequest::Put { documents, request_id: RequestId::random() }).await
    }

    /// Upserts any number of documents, split into requests under the frame limit, with up to
    /// [`BULK_CHUNKS_IN_FLIGHT`] requests at once (see [`Client::bulk_put_stream`]).
    /// `on_progress` is told how many documents have been written so far, counted from the
    /// start. An error names its document by its position in `documents` (from 1).
    pub async fn bulk_put(
        &self,
        documents: Vec<DocumentInput>,
        on_progress: impl FnMut(usize),
    ) -> Result<WriteReceipt, ClientError> {
        let items = documents.into_iter().enumerate().map(|(position, document)| {
            let id = document.id.clone().unwrap_or_else(|| document_id_of(&document.document_json));
            Ok::<_, ClientError>(BulkItem { id, document, tag: position + 1 })
        });
        match self.bulk_put_stream(items, on_progress).await {
            Ok(receipt) => Ok(receipt),
            Err(failure) => Err(failure.error),
        }
    }

    /// Upserts documents as they come from `items` (a file being read, say), in requests of up
    /// to [`BULK_CHUNK_DOCUMENTS`] documents under the frame limit, with up to
    /// [`BULK_CHUNKS_IN_FLIGHT`] requests at once, so that the node is never idle waiting for the
    /// next chunk. Memory is the chunks in flight, whatever the input's size.
    ///
    /// Order is kept where it matters: a document whose id is in a chunk still in flight waits
    /// for that chunk to be answered, so the last line of an id always wins, as it would one
    /// chunk at a time. `on_progress` is told how many documents have been written from the start
    /// without a gap. On failure nothing more is sent, the chunks in flight are waited for, and
    /// the error says which tags were written.
    pub async fn bulk_put_stream<E: Into<ClientError>>(
        &self,
        items: impl Iterator<Item = Result<BulkItem, E>>,
        mut on_progress: impl FnMut(usize),
    ) -> Result<WriteReceipt, BulkPutFailure> {
        use futures_util::stream::{FuturesOrdered, StreamExt};

        let chunk_limit_bytes = self.options.max_frame_bytes / 2;
        let mut in_flight = FuturesOrdered::new();
        // Ids in the chunks in flight, with how many of those chunks hold them.
        let mut ids_in_flight: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut written = 0_usize;
        let mut written_tags: Vec<(usize, usize)> = Vec::new();
        let mut last_applied_index = 0_u64;
        let mut chunk: Vec<BulkItem> = Vec::new();
        // The distinct ids of `chunk`: a set, because a scan of the chunk for every document made
        // a 1,000-document chunk cost half a million comparisons (most of the CLI's CPU).
        let mut chunk_ids: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut chunk_bytes = 0_usize;
        let mut failure: Option<(ClientError, Option<(usize, usize)>)> = None;
        let mut items = items.peekable();

        // Sends one chunk: its ids are marked in flight until its answer is taken.
        let send = |chunk: Vec<BulkItem>,
                    chunk_ids: &mut std::collections::HashSet<String>,
                    ids_in_flight: &mut std::collections::HashMap<String, usize>| {
            let ids: Vec<String> = chunk_ids.drain().collect();
            for id in &ids {
                *ids_in_flight.entry(id.clone()).or_default() += 1;
            }
            let tags: Vec<usize> = chunk.iter().map(|item| item.tag).collect();
            let documents: Vec<DocumentInput> = chunk.into_iter().map(|item| item.document).collect();
            async move {
                let result = self.put_documents(documents).await;
                (result, ids, tags)
            }
        };
        // Takes the oldest answer; false when the load must stop.
        macro_rules! take_answer {
            () => {
                let answer: Option<(Result<WriteReceipt, ClientError>, Vec<String>, Vec<usize>)> =
                    in_flight.next().await;
                if let Some((result, ids, tags)) = answer {
                    for id in &ids {
                        if let Some(count) = ids_in_flight.get_mut(id) {
                            *count -= 1;
                            if *count == 0 {
                                ids_in_flight.remove(id);
                            }
                        }
                    }
                    let span = (tags.first().copied().unwrap_or(0), tags.last().copied().unwrap_or(0));
                    match result {
                        Ok(receipt) => {
                            match written_tags.last_mut() {
                                Some(last) if failure.is_none() && tags.first().copied() == Some(last.1 + 1) => {
                                    last.1 = span.1
                                }
                                _ => written_tags.push(span),
                            }
                            if failure.is_none() {
                                written += tags.len();
                                on_progress(written);
                            }
                            last_applied_index = last_applied_index.max(receipt.applied_index);
                        }
                        Err(error) if failure.is_none() => {
                            failure = Some((name_the_tag(error, &tags), Some(span)));
                        }
                        Err(_) => {}
                    }
                }
            };
        }

        loop {
            if failure.is_some() {
                break;
            }
            let Some(next) = items.next() else { break };
            let item = match next {
                Ok(item) => item,
                Err(error) => {
                    failure = Some((error.into(), None));
                    break;
                }
            };
            let item_bytes = item.document.document_json.len() + item.id.len() + 16;
            if item_bytes > self.options.max_frame_bytes {
                failure = Some((
                    ClientError::InvalidArgument(format!(
                        "document {} is {item_bytes} bytes, over the frame limit of {} bytes",
                        item.tag, self.options.max_frame_bytes
                    )),
                    None,
                ));
                break;
            }
            // An id still in flight: everything in flight is answered first, so the order of
            // this id's lines is kept.
            let repeats_in_chunk = chunk_ids.contains(&item.id);
            if ids_in_flight.contains_key(&item.id) && !repeats_in_chunk {
                while !in_flight.is_empty() && ids_in_flight.contains_key(&item.id) {
                    take_answer!();
                }
            }
            chunk_bytes += item_bytes;
            if !repeats_in_chunk {
                chunk_ids.insert(item.id.clone());
            }
            chunk.push(item);
            let next_bytes = match items.peek() {
                Some(Ok(next)) => next.document.document_json.len() + next.id.len() + 16,
                _ => 0,
            };
            let full = chunk.len() >= BULK_CHUNK_DOCUMENTS || chunk_bytes + next_bytes > chunk_limit_bytes;
            if full || items.peek().is_none() {
                while in_flight.len() >= BULK_CHUNKS_IN_FLIGHT {
                    take_answer!();
                }
                if failure.is_some() {
                    break;
                }
                in_flight.push_back(send(std::mem::take(&mut chunk), &mut chunk_ids, &mut ids_in_flight));
                chunk_bytes = 0;
            }
        }
        while !in_flight.is_empty() {
            take_answer!();
        }
        match failure {
            None => {
                Ok(WriteReceipt { operations: written as u64, applied_index: last_applied_index, duplicate: false })
            }
            Some((error, failed_tags)) => Err(BulkPutFailure { error, written_tags, failed_tags }),
        }
    }

    pub async fn delete(&self, id: &str) -> Result<WriteReceipt, ClientError> {
        self.write(ClientRequest::Delete { ids: vec![id.to_string()], request_id: RequestId::random() }).await
    }

    /// Deletes any number of ids, in requests of at most [`BULK_CHUNK_DOCUMENTS`].
    pub async fn bulk_delete(
        &self,
        ids: Vec<String>,
        mut on_progress: impl FnMut(usize),
    ) -> Result<WriteReceipt, ClientError> {
        let mut receipt = WriteReceipt { operations: 0, applied_index: 0, duplicate: false };
        let mut deleted = 0_usize;
        for chunk in ids.chunks(BULK_CHUNK_DOCUMENTS) {
            let chunk_receipt =
                self.write(ClientRequest::Delete { ids: chunk.to_vec(), request_id: RequestId::random() }).await?;
            deleted += chunk.len();
            receipt = WriteReceipt {
                operations: deleted as u64,
                applied_index: chunk_receipt.applied_index,
                duplicate: false,
            };
            on_progress(deleted);
        }
        Ok(receipt)
    }

    pub async fn commit(&self) -> Result<WriteReceipt, ClientError> {
        self.write(ClientRequest::Commit { request_id: RequestId::random() }).await
    }

    pub async fn rollback(&self) -> Result<WriteReceipt, ClientError> {
        self.write(ClientRequest::Rollback { request_id: RequestId::random() }).await
    }

    pub async fn merge(&self) -> Result<WriteReceipt, ClientError> {
        self.write(ClientRequest::Merge { request_id: RequestId::random() }).await
    }

    /// The committed document with this id, if any.
    pub async fn get(&self, id: &str) -> Result<Option<Document>, ClientError> {
        let (response, server) = self.call(StreamKind::Client, &ClientRequest::Get { id: id.to_string() }).await?;
        match response {
            ClientResponse::Document { document } => Ok(document
                .map(|document| Document { fields: parse_json_or_string(&document.fields_json), id: document.id })),
            _ => Err(ClientError::UnexpectedResponse { server, request: "get" }),
        }
    }

    pub async fn search(&self, request: SearchRequest, consistency: Consistency) -> Result<SearchResult, ClientError> {
        let (response, server) = self.call(StreamKind::Client, &ClientRequest::Search { request, consistency }).await?;
        match response {
            ClientResponse::Search { response, node_id, applied_index } => {
                Ok(SearchResult::from_response(response, node_id, applied_index))
            }
            _ => Err(ClientError::UnexpectedResponse { server, request: "search" }),
        }
    }

    /// The index schema as tantivy JSON.
    pub async fn schema(&self) -> Result<serde_json::Value, ClientError> {
        match self.client_call(ClientRequest::Schema).await? {
            ClientResponse::Schema { schema_json } => Ok(parse_json_or_string(&schema_json)),
            _ => Err(ClientError::UnexpectedResponse { server: String::new(), request: "schema" }),
        }
    }

    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let (response, server) = self.call(StreamKind::Admin, &AdminRequest::Status).await?;
        match response {
            AdminResponse::Status(status) => Ok(status),
            _ => Err(ClientError::UnexpectedResponse { server, request: "status" }),
        }
    }

    /// Member id to address.
    pub async fn peers(&self) -> Result<BTreeMap<u64, String>, ClientError> {
        let (response, server) = self.call(StreamKind::Admin, &AdminRequest::Peers).await?;
        match response {
            AdminResponse::Peers(peers) => Ok(peers),
            _ => Err(ClientError::UnexpectedResponse { server, request: "peers" }),
        }
    }

    /// A search in the JSON query language (Elasticsearch's request body: `query`, `from`,
    /// `size`, `sort`, `_source`, `highlight`, `aggs`, …); the answer is
    /// `index::JsonSearchResponse` as JSON.
    pub async fn search_json(
        &self,
        body: &serde_json::Value,
        consistency: Consistency,
    ) -> Result<serde_json::Value, ClientError> {
        let request = ClientRequest::SearchJson { body_json: body.to_string(), consistency };
        let (response, server) = self.call(StreamKind::Client, &request).await?;
        match response {
            ClientResponse::SearchJson { response_json, .. } => Ok(parse_json_or_string(&response_json)),
            _ => Err(ClientError::UnexpectedResponse { server, request: "search_json" }),
        }
    }

    /// How many documents match a JSON query (`None`: all of them).
    pub async fn count_json(
        &self,
        query: Option<&serde_json::Value>,
        consistency: Consistency,
    ) -> Result<u64, ClientError> {
        let request = ClientRequest::CountJson { query_json: query.map(ToString::to_string), consistency };
        let (response, server) = self.call(StreamKind::Client, &request).await?;
        match response {
            ClientResponse::Count { count, .. } => Ok(count),
            _ => Err(ClientError::UnexpectedResponse { server, request: "count_json" }),
        }
    }

    /// Makes an API key here and registers its record (admin certificate): the secret never
    /// leaves this process but in the answer. Returns the record and the secret.
    pub async fn create_key(
        &self,
        name: &str,
        role: crate::access::KeyRole,
        read_only: bool,
    ) -> Result<(crate::access::ApiKeyRecord, String), ClientError> {
        let (record, secret) = crate::access::new_key(name, role, read_only).map_err(ClientError::InvalidArgument)?;
        let request = AdminRequest::CreateKey { record: record.clone(), request_id: RequestId::random() };
        let (response, server) = self.call_preferring(StreamKind::Admin, &request, self.known_leader()).await?;
        match response {
            AdminResponse::KeyChanged { .. } => Ok((record, secret)),
            _ => Err(ClientError::UnexpectedResponse { server, request: "create_key" }),
        }
    }

    /// The cluster's API keys (admin certificate).
    pub async fn list_keys(&self) -> Result<Vec<crate::access::ApiKeyInfo>, ClientError> {
        let (response, server) = self.call(StreamKind::Admin, &AdminRequest::ListKeys).await?;
        match response {
            AdminResponse::Keys(keys) => Ok(keys),
            _ => Err(ClientError::UnexpectedResponse { server, request: "list_keys" }),
        }
    }

    /// Revokes an API key on every node (admin certificate); the log index it was applied at.
    pub async fn revoke_key(&self, id: &str) -> Result<u64, ClientError> {
        let request = AdminRequest::RevokeKey { id: id.to_string(), request_id: RequestId::random() };
        let (response, server) = self.call_preferring(StreamKind::Admin, &request, self.known_leader()).await?;
        match response {
            AdminResponse::KeyChanged { applied_index, .. } => Ok(applied_index),
            _ => Err(ClientError::UnexpectedResponse { server, request: "revoke_key" }),
        }
    }

    /// Sends a write request exactly as given (its request id included): tests retry one with
    /// the same id to see it applied once.
    pub async fn send_write(&self, request: ClientRequest) -> Result<WriteReceipt, ClientError> {
        self.write(request).await
    }

    /// Removes `node_id` from the cluster (admin certificate). Refused when the remaining voters
    /// that answer would not be a quorum, unless `force`.
    pub async fn leave(&self, node_id: u64, force: bool) -> Result<(), ClientError> {
        let (response, server) = self
            .call_preferring(StreamKind::Admin, &AdminRequest::Leave { node_id, force }, self.known_leader())
            .await?;
        match response {
            AdminResponse::Left { .. } => Ok(()),
            _ => Err(ClientError::UnexpectedResponse { server, request: "leave" }),
        }
    }

    /// Sends an arbitrary stream kind and body; for diagnostics and tests of refusals.
    pub async fn raw_call<Request: Serialize>(
        &self,
        kind_byte: u8,
        request: &Request,
    ) -> Result<Result<(), WireError>, ClientError> {
        let server = &self.options.servers[0];
        let connection = self
            .pool
            .get(server)
            .await
            .map_err(|error| ClientError::Unavailable { attempts: vec![error.to_string()] })?;
        raw_stream_call(&connection, kind_byte, request, self.options.request_timeout, self.options.max_frame_bytes)
            .await
            .map_err(|error| ClientError::Unavailable { attempts: vec![format!("{server}: {error}")] })
    }
}

/// Rewrites a node's "document K" (K counted from 1 within one request) into the tag of that
/// document, which the caller gave it (its position in the whole load, a line number).
fn name_the_tag(error: ClientError, tags: &[usize]) -> ClientError {
    match error {
        ClientError::Remote { code, message, server } => {
            let message = match message.strip_prefix("document ") {
                Some(rest) => {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let tag = digits.parse::<usize>().ok().and_then(|position| tags.get(position.checked_sub(1)?));
                    match tag {
                        Some(tag) => format!("document {tag}{}", &rest[digits.len()..]),
                        None => message,
                    }
                }
                None => message,
            };
            ClientError::Remote { code, message, server }
        }
        other => other,
    }
}

/// Like [`transport::call`] but with a raw kind byte, so tests can send kinds that do not exist.
async fn raw_stream_call<Request: Serialize>(
    connection: &quinn::Connection,
    kind_byte: u8,
    request: &Request,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<Result<(), WireError>, CallError> {
    let header = crate::protocol::StreamHeader {
        protocol_version: crate::transport::stream::PROTOCOL_VERSION,
        kind: kind_byte,
        trace_context: None,
        deadline_millis: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
    };
    let exchange = async {
        let (mut send, mut receive) = connection.open_bi().await?;
        let header_frame = transport::frame::encode_frame(&header, max_frame_bytes)?;
        let body_frame = transport::frame::encode_frame(request, max_frame_bytes)?;
        let _ = send.write_all(&header_frame).await;
        let _ = send.write_all(&body_frame).await;
        let _ = send.finish();
        let answer = transport::frame::read_frame::<_, Result<(), WireError>>(&mut receive, max_frame_bytes).await?;
        Ok(answer)
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(CallError::TimedOut(timeout)))
}

/// A write's receipt as the CLI prints it and the REST gateway answers it.
pub fn receipt_json(receipt: WriteReceipt) -> serde_json::Value {
    let mut answer =
        serde_json::json!({"status": "OK", "operations": receipt.operations, "applied_index": receipt.applied_index});
    // Only when it happened: a retry whose first attempt had been applied, so nothing was twice.
    if receipt.duplicate {
        answer["duplicate"] = serde_json::json!(true);
    }
    answer
}

/// A node's status as `bayard status` prints it and `GET /v1/status` answers it.
pub fn status_json(status: &NodeStatus) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = status
        .members
        .iter()
        .map(|member| {
            serde_json::json!({
                "id": member.node_id,
                "address": member.address,
                "role": member.role,
                "applied_index": member.applied_index,
                "lag": member.lag,
                "state": member.state,
            })
        })
        .collect();
    serde_json::json!({
        "leader": status.leader,
        "term": status.term,
        "node_id": status.node_id,
        "cluster_id": status.cluster_id,
        "address": status.address,
        "role": status.role,
        "applied_index": status.applied_index,
        "document_count": status.document_count,
        "segment_count": status.segment_count,
        "version": status.version,
        "nodes": nodes,
        "status": "OK",
    })
}
