//! A running bayard node: the endpoint, Raft, the index, and the handlers that connect them.
//!
//! [`Node::start`] opens the data directory, the index and the Raft log, binds the endpoint
//! (port 0 works, for tests), starts Raft, and then either bootstraps a one-node cluster (empty
//! data directory, no peers), asks a seed to join (empty data directory, peers), or resumes (data
//! present: never bootstraps or joins again). [`RunningNode::shutdown`] stops accepting, lets
//! in-flight streams finish (bounded), stops Raft and closes the endpoint. [`run`] does the same
//! for the binary, driven by signals.

pub mod authorization;
pub mod disk;
mod front_door;
mod handlers;
pub mod limits;
pub mod metadata;
mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, ClusterConfig, ClusterEvent};
use crate::index::{AnalyzerConfig, IndexError, SharedIndex};
use crate::raft::election::ElectionAssist;
use crate::raft::log_store::{LogStore, LogStoreError};
use crate::raft::network::{snapshot_chunk_bytes, Network};
use crate::raft::state_machine::{recover_interrupted_install, IndexOpener, StateMachinePaths, StateMachineStore};
use crate::raft::types::{MemberNode, Raft};
use crate::telemetry;
use crate::transport::{self, ConnectionPool, TlsFiles, TlsMaterial, TransportError};
pub use limits::NodeLimits;
use metadata::{MetadataError, NodeMetadata};

/// Everything a node needs to start. [`NodeConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: u64,
    /// Where the UDP socket binds. Port 0 picks a free port.
    pub listen_address: SocketAddr,
    /// The address other nodes and clients use for this node, when it differs from the bound one.
    pub advertise_address: Option<String>,
    /// Seeds to join through (`id`, `host:port`); empty bootstraps a new cluster on first start.
    pub peers: Vec<(u64, String)>,
    pub data_directory: PathBuf,
    /// tantivy schema JSON.
    pub schema_json: String,
    /// Analyzer file JSON.
    pub tokenizer_json: String,
    pub tls: TlsFiles,
    pub trust_domain: String,
    /// Automatic commit period; zero means commit only when asked.
    pub commit_interval: Duration,
    pub max_frame_bytes: usize,
    pub max_concurrent_streams: u32,
    /// Time a peer has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a new stream has to deliver its header and request.
    pub first_frame_timeout: Duration,
    /// Upper bound on any request's deadline, whatever the caller asks for.
    pub max_request_timeout: Duration,
    /// How long shutdown waits for in-flight streams.
    pub drain_timeout: Duration,
    pub writer_memory_bytes: usize,
    pub raft: RaftTimings,
    /// When set, the leader removes members that have been down this long (never below quorum).
    pub remove_down_after: Option<Duration>,
    /// Where to serve `/metrics`, `/livez` and `/readyz` over HTTP (port 0 picks one); off when unset.
    pub metrics_address: Option<SocketAddr>,
    /// What any caller may make this node hold at once (see `docs/security.md`).
    pub limits: NodeLimits,
    /// How long a new node keeps asking its seeds to join before it stops with the reason.
    pub join_timeout: Duration,
    /// Where the HTTPS door (REST and the Elasticsearch subset) listens on TCP.
    pub http_port: HttpPort,
    /// Settings of the HTTPS door.
    pub http: crate::http::HttpConfig,
    /// Fields and boosts searched by query terms that name no field, over the schema file's
    /// `default_search_fields` (`None`: the file's, or every indexed text field).
    pub default_search_fields: Option<Vec<(String, f32)>>,
}

/// The TCP port of the HTTPS door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpPort {
    /// The same number as the QUIC (UDP) port: one port number per node.
    SameAsQuic,
    Port(u16),
    Off,
}

/// Raft settings an operator may tune.
#[derive(Debug, Clone)]
pub struct RaftTimings {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (to catch up slow followers without one).
    pub entries_kept_after_snapshot: u64,
    /// Time to send one snapshot chunk.
    pub snapshot_chunk_timeout: Duration,
}

impl Default for RaftTimings {
    /// LAN timings (the binary's defaults): heartbeats every 50 ms, elections after 200–300 ms
    /// of silence on top of the old leader's 300 ms lease, so a follower campaigns 500–600 ms
    /// after its leader's last message. See `docs/cluster_mode.md` for a WAN.
    fn default() -> Self {
        RaftTimings {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(300),
            snapshot_after_entries: 5_000,
            entries_kept_after_snapshot: 1_000,
            snapshot_chunk_timeout: Duration::from_secs(30),
        }
    }
}

impl NodeConfig {
    pub fn new(
        node_id: u64,
        listen_address: SocketAddr,
        data_directory: PathBuf,
        schema_json: String,
        tokenizer_json: String,
        tls: TlsFiles,
    ) -> Self {
        NodeConfig {
            node_id,
            listen_address,
            advertise_address: None,
            peers: Vec::new(),
            data_directory,
            schema_json,
            tokenizer_json,
            tls,
            trust_domain: transport::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            commit_interval: Duration::from_secs(1),
            max_frame_bytes: transport::DEFAULT_MAX_FRAME_BYTES,
            max_concurrent_streams: transport::DEFAULT_MAX_CONCURRENT_STREAMS,
            handshake_timeout: Duration::from_secs(10),
            first_frame_timeout: Duration::from_secs(10),
            max_request_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(10),
            writer_memory_bytes: 128 * 1024 * 1024,
            raft: RaftTimings::default(),
            remove_down_after: None,
            metrics_address: None,
            limits: NodeLimits::default(),
            join_timeout: Duration::from_secs(300),
            http_port: HttpPort::Off,
            http: crate::http::HttpConfig::new("bayard"),
            default_search_fields: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    LogStore(#[from] LogStoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
    #[error("invalid raft settings: {0}")]
    RaftConfig(String),
    #[error("raft failed: {0}")]
    Raft(String),
    #[error("{0}")]
    Storage(String),
    #[error("cannot join the cluster: {0}")]
    Join(String),
    #[error("node {node_id} was removed from the cluster ({reason}); to add this host again, start it with an empty data directory (the same --id may join again)")]
    Removed { node_id: u64, reason: String },
    #[error("index worker failed: {0}")]
    Worker(String),
    #[error("{0}")]
    Stopped(String),
    #[error("certificate refused: {0}")]
    Certificate(String),
    #[error("invalid limits: {0}")]
    Limits(String),
    #[error("data directory {} is in use by another bayard process; stop it, or give this one its own --data-directory", .0.display())]
    DataDirectoryInUse(PathBuf),
}

/// State shared by every connection and stream of a node.
pub(crate) struct NodeState {
    pub config: NodeConfig,
    /// `node.json`, kept in step with the file.
    pub metadata: std::sync::Mutex<NodeMetadata>,
    /// Membership, the write path to the leader, status.
    pub cluster: Cluster,
    /// The address reported to clients and peers.
    pub address: String,
    pub index: SharedIndex,
    pub raft: Raft,
    /// Told of vote exchanges and of the leader's messages; starts elections early.
    pub election: ElectionAssist,
    /// The log store (shared with Raft), for the commit index the readiness check compares with.
    pub log_store: LogStore,
    /// Set once when the node must stop: removed from the cluster, or a fatal join refusal.
    pub stop_reason: watch::Sender<Option<NodeError>>,
    /// Open connections, in total and per certificate identity.
    pub connections: Arc<limits::ConnectionCounter>,
    /// Client and admin requests in progress, per certificate identity.
    pub requests_per_identity: limits::RequestsPerIdentity,
    /// Searches running and waiting.
    pub searches: limits::Gate,
    /// Writes (validation and the trip through the log) running and waiting.
    pub writes: limits::Gate,
    /// Request bodies of clients and admins being read or handled.
    pub request_bytes: limits::ByteBudget,
    /// Request bodies of nodes (Raft, membership, forwarded requests), apart: clients filling
    /// their budget must not starve replication.
    pub peer_request_bytes: limits::ByteBudget,
    /// One line per period for refused connections; the rest are only counted.
    pub refusal_log: limits::LogThrottle,
    /// Free space of the data directory's file system.
    pub disk: disk::DiskGuard,
    /// The API keys as applied here.
    pub keys: Arc<crate::access::KeyRing>,
    /// Bodies of HTTP requests being read or handled: their own budget, so HTTP callers cannot
    /// starve QUIC clients.
    pub http_request_bytes: limits::ByteBudget,
}

impl NodeState {
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    pub fn metadata(&self) -> NodeMetadata {
        self.metadata.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn incarnation(&self) -> u64 {
        self.metadata().incarnation
    }

    /// Refuses a write while the disk is too full (see `disk`).
    pub fn check_disk_space(&self) -> Result<(), crate::protocol::WireError> {
        if !self.disk.is_full() {
            return Ok(());
        }
        Err(limits::exhausted(
            "disk_space",
            format!(
                "disk full on node {}: {} MiB free in {}, under --min-free-disk-mb {}; writes are refused until \
                 space is freed, reads are served",
                self.node_id(),
                self.disk.available() / (1024 * 1024),
                self.config.data_directory.display(),
                self.config.limits.min_free_disk_bytes / (1024 * 1024)
            ),
        ))
    }

    /// Changes `node.json` (durably, off the runtime) and the copy in memory.
    pub async fn update_metadata(&self, change: impl FnOnce(&mut NodeMetadata)) -> Result<(), NodeError> {
        let mut updated = self.metadata();
        change(&mut updated);
        let data_directory = self.config.data_directory.clone();
        let stored = updated.clone();
        tokio::task::spawn_blocking(move || metadata::store(&data_directory, &stored))
            .await
            .map_err(|error| NodeError::Worker(error.to_string()))??;
        *self.metadata.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = updated;
        Ok(())
    }

    /// Asks the node to stop for `reason` (the first reason wins).
    pub fn stop_because(&self, reason: NodeError) {
        self.stop_reason.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }
}

/// A node that is serving.
pub struct RunningNode {
    local_address: SocketAddr,
    node_id: u64,
    endpoint: quinn::Endpoint,
    tls_files: TlsFiles,
    max_concurrent_streams: u32,
    state: Arc<NodeState>,
    metrics_address: Option<SocketAddr>,
    /// Where HTTPS is served, and its TLS configuration (replaced on reload).
    http: Option<(SocketAddr, Arc<crate::http::HttpTls>, JoinHandle<()>)>,
    shutdown_sender: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningNode {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// The address the node gives to others.
    pub fn advertised_address(&self) -> &str {
        &self.state.address
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Where `/metrics`, `/livez` and `/readyz` are served, when they are.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Where the HTTPS door listens (TCP), when it is on.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(address, _, _)| *address)
    }

    /// The node's Raft handle (metrics, for tests and tools).
    pub fn raft(&self) -> &Raft {
        &self.state.raft
    }

    /// Bytes of Raft log entries this node keeps in memory for reading back (for tests and
    /// tools; `bayard_raft_log_memory_bytes`).
    pub fn log_entries_in_memory_bytes(&self) -> usize {
        self.state.log_store.entries_in_memory_bytes()
    }

    /// The node's cluster handle (the write path, for tests and tools).
    pub fn cluster(&self) -> &crate::cluster::Cluster {
        &self.state.cluster
    }

    /// Re-reads the CA, certificate and key files (what SIGHUP does). New inbound connections use
    /// the new files; open connections keep the identity they were made with. When the files do
    /// not load, the node keeps its current ones and says why.
    pub fn reload_certificates(&self) -> Result<(), NodeError> {
        let material = TlsMaterial::load(&self.tls_files)?;
        let server_config = transport::tls::server_config(&material, self.max_concurrent_streams)?;
        let http_config = match &self.http {
            Some(_) => Some(crate::http::server::tls_config(&material)?),
            None => None,
        };
        self.endpoint.set_server_config(Some(server_config));
        if let (Some((_, tls, _)), Some(http_config)) = (&self.http, http_config) {
            tls.replace(http_config);
        }
        tracing::info!(node_id = self.node_id, certificate = %self.tls_files.certificate.display(), "reloaded certificates");
        Ok(())
    }

    /// Completes when the node must stop by itself, with the reason.
    pub async fn stopped(&self) -> String {
        let mut receiver = self.state.stop_reason.subscribe();
        loop {
            if let Some(reason) = receiver.borrow().as_ref() {
                return reason.to_string();
            }
            if receiver.changed().await.is_err() {
                return "node state dropped".to_string();
            }
        }
    }

    /// The reason the node stopped by itself, if it did.
    pub fn stop_reason(&self) -> Option<String> {
        self.state.stop_reason.borrow().as_ref().map(ToString::to_string)
    }

    /// Stops accepting, waits for in-flight streams (bounded by the drain timeout), stops Raft,
    /// closes the endpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown_sender.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(%error, "node task ended abnormally");
        }
        if let Some((_, _, http_task)) = self.http {
            let _ = http_task.await;
        }
        if let Err(error) = self.state.raft.shutdown().await {
            tracing::warn!(%error, "raft did not stop cleanly");
        }
    }
}

/// How long a node waits for a connection to another node: a handshake on a LAN takes a
/// millisecond; a dead peer must not hold a forward or a probe for seconds.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn storage_error(context: &str, error: impl std::fmt::Display) -> NodeError {
    NodeError::Storage(format!("{context}: {error}"))
}

fn raft_config(timings: &RaftTimings, max_frame_bytes: usize) -> Result<openraft::Config, NodeError> {
    let config = openraft::Config {
        cluster_name: "bayard".to_string(),
        heartbeat_interval: timings.heartbeat_interval.as_millis() as u64,
        election_timeout_min: timings.election_timeout_min.as_millis() as u64,
        election_timeout_max: timings.election_timeout_max.as_millis() as u64,
        install_snapshot_timeout: timings.snapshot_chunk_timeout.as_millis() as u64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timings.snapshot_after_entries),
        max_in_snapshot_log_to_keep: timings.entries_kept_after_snapshot,
        // Entries are batches of documents: keep replication messages to a few of them.
        max_payload_entries: 32,
        // A chunk and its envelope fit a Raft frame under this node's frame limit.
        snapshot_max_chunk_size: snapshot_chunk_bytes(max_frame_bytes),
        ..Default::default()
    };
    config.validate().map_err(|error| NodeError::RaftConfig(error.to_string()))
}

/// Refuses to start with a certificate that names another node: it would be refused by every
/// peer anyway, and the operator learns why at once.
fn check_own_certificate(material: &TlsMaterial, config: &NodeConfig) -> Result<(), NodeError> {
    let Some(leaf) = material.certificate_chain.first() else {
        return Err(NodeError::Certificate(format!("{} holds no certificate", config.tls.certificate.display())));
    };
    let peer = transport::identity::peer_from_certificate(leaf, &config.trust_domain)
        .map_err(|error| NodeError::Certificate(format!("{}: {error}", config.tls.certificate.display())))?;
    if peer.role != (transport::Role::Node { node_id: config.node_id }) {
        return Err(NodeError::Certificate(format!(
            "{} is the certificate of {}, but this is node {}; make one with `bayard certs node --id {}`",
            config.tls.certificate.display(),
            peer.role,
            config.node_id,
            config.node_id
        )));
    }
    Ok(())
}

pub struct Node;

impl Node {
    /// Opens the data directory, index and log, binds the endpoint, starts Raft and serving.
    /// A start that fails leaves no new data directory behind: the next attempt (with the mistake
    /// fixed) starts as fresh as this one would have.
    pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
        let directory_existed = config.data_directory.exists();
        let data_directory = config.data_directory.clone();
        let started = Self::start_in_directory(config).await;
        if started.is_err() && !directory_existed {
            let directory = data_directory.clone();
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(directory)).await;
            if let Ok(Err(error)) = removed {
                tracing::warn!(%error, data_directory = %data_directory.display(), "could not remove the new data directory");
            }
        }
        started
    }

    async fn start_in_directory(config: NodeConfig) -> Result<RunningNode, NodeError> {
        config.limits.validate(config.max_frame_bytes).map_err(NodeError::Limits)?;
        let (mut metadata, directory_state) = metadata::load_or_create(&config.data_directory, config.node_id)?;
        if let Some(reason) = &metadata.removed {
            return Err(NodeError::Removed { node_id: config.node_id, reason: reason.clone() });
        }
        // Counted before the node speaks: its digests of this run outrank those of the last. A
        // node that cannot write it (a full disk) still starts and serves reads; peers then may
        // show it suspect for as long as its previous run lasted.
        metadata.starts += 1;
        if let Err(error) = metadata::store(&config.data_directory, &metadata) {
            tracing::warn!(%error, "could not record this start in node.json; peers may be slow to see it alive");
        }
        tracing::info!(
            node_id = config.node_id,
            data_directory = %config.data_directory.display(),
            new_directory = matches!(directory_state, metadata::DirectoryState::Created),
            "opened data directory"
        );

        let paths = StateMachinePaths::in_data_directory(&config.data_directory);
        let schema_file = crate::index::load_schema_file(&config.schema_json)?;
        let opener = IndexOpener {
            schema: schema_file.schema,
            analyzers: AnalyzerConfig::from_json(&config.tokenizer_json)?,
            writer_memory_bytes: config.writer_memory_bytes,
            default_search_fields: config.default_search_fields.clone().or(schema_file.default_search_fields),
        };
        let log_path = config.data_directory.join("raft").join("log.redb");
        let (state_machine, log_store) = {
            let paths = paths.clone();
            let opener = opener.clone();
            tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
                recover_interrupted_install(&paths)
                    .map_err(|error| storage_error("cannot recover the index", error))?;
                let index = SharedIndex::new(opener.open(&paths.index).map_err(|error| match error {
                    IndexError::OpenIndex { source: tantivy::TantivyError::LockFailure(..), .. } => {
                        NodeError::DataDirectoryInUse(paths.index.parent().unwrap_or(&paths.index).to_path_buf())
                    }
                    other => NodeError::Index(other),
                })?);
                let state_machine = StateMachineStore::new(index, opener, paths)?;
                let log_store = LogStore::open(&log_path)?;
                Ok((state_machine, log_store))
            })
            .await
            .map_err(|error| NodeError::Worker(error.to_string()))??
        };
        let fresh = log_store.is_empty().await.map_err(|error| storage_error("cannot read the raft log", error))?;

        let material = TlsMaterial::load(&config.tls)?;
        check_own_certificate(&material, &config)?;
        let (endpoint, http_listener) = bind_ports(&config, &material).await?;
        let local_address =
            endpoint.local_addr().map_err(|source| TransportError::Bind { address: config.listen_address, source })?;
        let address = config.advertise_address.clone().unwrap_or_else(|| local_address.to_string());
        let pool = Arc::new(ConnectionPool::new(endpoint.clone(), config.trust_domain.clone(), PEER_CONNECT_TIMEOUT));

        let log_store_view = log_store.clone();
        let (election, election_hints) = ElectionAssist::new();
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config(&config.raft, config.max_frame_bytes)?),
            Network::new(pool.clone(), config.max_frame_bytes, election.clone()),
            log_store,
            state_machine.clone(),
        )
        .await
        .map_err(|error| NodeError::Raft(error.to_string()))?;

        let node_id = config.node_id;
        let tls_files = config.tls.clone();
        let max_concurrent_streams = config.max_concurrent_streams;
        let (stop_reason, _) = watch::channel(None);
        let limits = config.limits.clone();
        let disk = disk::DiskGuard::default();
        disk.refresh(&config.data_directory, limits.min_free_disk_bytes);
        let joining = fresh && !config.peers.is_empty();
        let (events, event_receiver) = tokio::sync::mpsc::unbounded_channel();
        let cluster = Cluster::new(
            ClusterConfig {
                node_id,
                address: address.clone(),
                incarnation: metadata.incarnation,
                generation: metadata.starts,
                seeds: config.peers.clone(),
                trust_domain: config.trust_domain.clone(),
                max_request_timeout: config.max_request_timeout,
                join_timeout: config.join_timeout,
                remove_down_after: config.remove_down_after,
                commit_interval: config.commit_interval,
                election_timeout_max: config.raft.election_timeout_max,
                max_frame_bytes: config.max_frame_bytes,
            },
            raft.clone(),
            pool,
            state_machine.index().clone(),
            metadata.cluster_id.clone(),
            joining,
            events,
        );
        let state = Arc::new(NodeState {
            cluster,
            index: state_machine.index().clone(),
            raft,
            election,
            log_store: log_store_view,
            stop_reason,
            metadata: std::sync::Mutex::new(metadata),
            address,
            config,
            connections: limits::ConnectionCounter::new(limits.max_connections, limits.max_connections_per_identity),
            requests_per_identity: limits::RequestsPerIdentity::new(limits.max_requests_per_identity),
            searches: limits::Gate::new(
                "concurrent_searches",
                "--max-concurrent-searches, --max-queued-searches",
                limits.max_concurrent_searches,
                limits.max_queued_searches,
            ),
            writes: limits::Gate::new(
                "concurrent_writes",
                "--max-concurrent-writes, --max-queued-writes",
                limits.max_concurrent_writes,
                limits.max_queued_writes,
            ),
            request_bytes: limits::ByteBudget::new(limits.max_inflight_request_bytes),
            peer_request_bytes: limits::ByteBudget::new(limits.max_inflight_request_bytes),
            refusal_log: limits::LogThrottle::new(Duration::from_secs(10)),
            disk,
            keys: state_machine.key_ring(),
            http_request_bytes: limits::ByteBudget::new(limits.max_inflight_request_bytes),
        });
        tracing::info!(node_id, %local_address, address = %state.address, fresh, "node listening");

        let (shutdown_sender, shutdown_receiver) = watch::channel(false);
        let metrics_address = match state.config.metrics_address {
            Some(address) => Some(serve_metrics(state.clone(), address, shutdown_receiver.clone()).await?),
            None => None,
        };
        tokio::spawn(update_metrics(state.clone(), shutdown_receiver.clone()));
        tokio::spawn(watch_disk_space(state.clone(), shutdown_receiver.clone()));
        tokio::spawn(stop_when_raft_stops(state.clone(), shutdown_receiver.clone()));
        tokio::spawn(crate::raft::election::run(
            state.raft.clone(),
            state.election.clone(),
            election_hints,
            crate::raft::election::Timing {
                election_timeout_min: state.config.raft.election_timeout_min,
                election_timeout_max: state.config.raft.election_timeout_max,
            },
            shutdown_receiver.clone(),
        ));
        let task = tokio::spawn(server::serve(state.clone(), endpoint.clone(), shutdown_receiver.clone()));
        let http = match http_listener {
            Some(listener) => {
                let address = listener
                    .local_addr()
                    .map_err(|error| NodeError::Storage(format!("cannot read the HTTPS address: {error}")))?;
                let tls = Arc::new(crate::http::HttpTls::new(crate::http::server::tls_config(&material)?));
                let backend: Arc<dyn crate::http::Backend> = Arc::new(front_door::HttpBackend { state: state.clone() });
                let mut http_config = state.config.http.clone();
                http_config.trust_domain = state.config.trust_domain.clone();
                http_config.max_frame_bytes = state.config.max_frame_bytes;
                http_config.handshake_timeout = state.config.handshake_timeout;
                http_config.drain_timeout = state.config.drain_timeout;
                let http_task = tokio::spawn(crate::http::run(
                    listener,
                    tls.clone(),
                    backend,
                    http_config,
                    shutdown_receiver.clone(),
                ));
                tracing::info!(node_id, %address, "HTTPS listening");
                Some((address, tls, http_task))
            }
            None => None,
        };

        tokio::spawn(handle_cluster_events(state.clone(), event_receiver, shutdown_receiver.clone()));
        if fresh && state.config.peers.is_empty() {
            if state.cluster.cluster_id().is_none() {
                let cluster_id = metadata::random_hex_id();
                state.update_metadata(|metadata| metadata.cluster_id = Some(cluster_id.clone())).await?;
                state.cluster.adopt_cluster_id(cluster_id);
            }
            let members = BTreeMap::from([(node_id, MemberNode::new(state.address.clone(), state.incarnation()))]);
            state.raft.initialize(members).await.map_err(|error| NodeError::Raft(error.to_string()))?;
            // A one-node cluster elects itself at once; wait for it (bounded), so that a node
            // that says it bootstrapped also leads (the first `status` says "leader").
            let leading = state
                .raft
                .wait(Some(Duration::from_secs(5)))
                .state(openraft::ServerState::Leader, "the new one-node cluster elects its node")
                .await;
            if let Err(error) = leading {
                tracing::warn!(%error, "the new one-node cluster has not elected its node yet");
            }
            tracing::info!(node_id, cluster_id = %state.cluster.cluster_id().unwrap_or_default(), "bootstrapped a new one-node cluster");
        } else if !fresh {
            tracing::info!(node_id, generation = state.metadata().starts, "resuming from the data directory");
        }
        state.cluster.spawn_tasks(joining, shutdown_receiver);

        Ok(RunningNode {
            local_address,
            node_id,
            endpoint,
            tls_files,
            max_concurrent_streams,
            state,
            metrics_address,
            http,
            shutdown_sender,
            task,
        })
    }
}

/// Binds the QUIC endpoint and, when HTTPS is on, its TCP listener. With the same port number
/// for both and port 0 asked for, the number QUIC picked may be taken on TCP: then both are
/// bound again (a few times) until one number is free for both.
async fn bind_ports(
    config: &NodeConfig,
    material: &TlsMaterial,
) -> Result<(quinn::Endpoint, Option<tokio::net::TcpListener>), NodeError> {
    const ATTEMPTS: usize = 16;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let endpoint = transport::bind_node_endpoint(config.listen_address, material, config.max_concurrent_streams)?;
        let quic_address =
            endpoint.local_addr().map_err(|source| TransportError::Bind { address: config.listen_address, source })?;
        let http_address = match config.http_port {
            HttpPort::Off => return Ok((endpoint, None)),
            HttpPort::SameAsQuic => quic_address,
            HttpPort::Port(port) => SocketAddr::new(config.listen_address.ip(), port),
        };
        match tokio::net::TcpListener::bind(http_address).await {
            Ok(listener) => return Ok((endpoint, Some(listener))),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && config.http_port == HttpPort::SameAsQuic
                    && config.listen_address.port() == 0
                    && attempt < ATTEMPTS =>
            {
                endpoint.close(0_u32.into(), b"rebinding");
                continue;
            }
            Err(error) => {
                return Err(NodeError::Storage(format!(
                    "cannot listen for HTTPS on TCP {http_address}: {error} (--http-port moves it, --http-port off                      turns it off)"
                )))
            }
        }
    }
}

/// Binds the HTTP listener of `/metrics`, `/livez`, `/readyz` and serves it until shutdown.
/// Ready means: a leader is known and everything known committed is applied here.
async fn serve_metrics(
    state: Arc<NodeState>,
    address: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SocketAddr, NodeError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| NodeError::Storage(format!("cannot bind the metrics port {address}: {error}")))?;
    let bound = listener
        .local_addr()
        .map_err(|error| NodeError::Storage(format!("cannot read the metrics address: {error}")))?;
    let live_state = state.clone();
    let health = telemetry::health_from_fn(
        move || live_state.raft.metrics().borrow().running_state.is_ok(),
        move || {
            if state.disk.is_full() {
                return Err(format!(
                    "disk full: {} MiB free, under --min-free-disk-mb; writes are refused",
                    state.disk.available() / (1024 * 1024)
                ));
            }
            let metrics = state.raft.metrics().borrow().clone();
            telemetry::raft_readiness(&metrics, state.log_store.committed_index())
        },
    );
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(error) = telemetry::serve_http(listener, health, stop).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics, /livez and /readyz");
    Ok(bound)
}

/// Reads the free space of the data directory once a second (on a blocking thread: statvfs can
/// stall on a busy disk).
async fn watch_disk_space(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let reading = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            reading.disk.refresh(&reading.config.data_directory, reading.config.limits.min_free_disk_bytes)
        })
        .await;
    }
}

/// openraft stops for good on a storage error (a full disk the margin did not prevent, a failed
/// fsync): a node that stays up without Raft only confuses. Stop the process with the reason,
/// so that its supervisor restarts it (the log and the index are intact: nothing unsynced was
/// ever acknowledged).
async fn stop_when_raft_stops(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = state.raft.metrics();
    loop {
        let fatal = metrics.borrow_and_update().running_state.clone().err();
        if let Some(fatal) = fatal.filter(|fatal| !matches!(fatal, openraft::error::Fatal::Stopped)) {
            let text = fatal.to_string();
            let disk_full = text.contains("No space left") || text.contains("ENOSPC") || state.disk.is_full();
            let reason = if disk_full {
                format!(
                    "disk full on node {}: raft could not write its log ({text}); free space in {} and restart the node",
                    state.node_id(),
                    state.config.data_directory.display()
                )
            } else {
                format!("raft stopped on node {}: {text}; restart the node", state.node_id())
            };
            tracing::error!(%reason, "stopping");
            state.stop_because(NodeError::Stopped(reason));
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Refreshes the gauges that mirror Raft, the index and the membership exchange, once a second.
async fn update_metrics(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let node_id = state.node_id();
        let raft_metrics = state.raft.metrics().borrow().clone();
        telemetry::update_from_raft_metrics(node_id, &raft_metrics);
        telemetry::metrics::set_raft_commit_index(node_id, state.log_store.committed_index());
        // Entries every reader has read are not read again: give their memory back, so that a
        // burst's entries do not stay held after it.
        let matched: Option<Vec<Option<u64>>> = raft_metrics
            .replication
            .as_ref()
            .map(|targets| targets.values().map(|matched| matched.map(|log_id| log_id.index)).collect());
        let last_applied = raft_metrics.last_applied.map(|log_id| log_id.index);
        if let Some(index) = crate::raft::recent_entries::read_by_everyone(last_applied, matched.as_deref()) {
            state.log_store.release_entries_through(index);
        }
        telemetry::metrics::set_raft_log_memory_bytes(node_id, state.log_store.entries_in_memory_bytes());
        let index = state.index.current();
        telemetry::metrics::set_index_stats(index.document_count(), index.segment_count() as u64);
        // From the local membership table: no network call.
        let members = state.cluster.status().members;
        let count = |wanted: &str| members.iter().filter(|member| member.state == wanted).count() as u64;
        telemetry::metrics::set_membership_members([
            ("alive", count("alive")),
            ("suspect", count("suspect")),
            ("down", count("down")),
        ]);
    }
}

/// How long a removed node keeps serving before it stops: the answer to the `leave` that
/// removed it (when it led the change itself) is still on its way.
const REMOVED_GRACE: Duration = Duration::from_millis(500);

/// Acts on what the cluster component reports: records a join or a removal in `node.json`, and
/// stops the node when it was removed or could not join.
/// Ends at shutdown (it holds the node's state, whose cluster holds the sending side).
async fn handle_cluster_events(
    state: Arc<NodeState>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        match event {
            ClusterEvent::Joined { cluster_id, leader } => {
                tracing::debug!(leader, %cluster_id, "recording the cluster joined");
                if let Err(error) = state.update_metadata(|metadata| metadata.cluster_id = Some(cluster_id)).await {
                    tracing::error!(%error, "could not record the cluster id");
                }
            }
            ClusterEvent::Removed { reason } => {
                let recorded = reason.clone();
                if let Err(error) = state.update_metadata(|metadata| metadata.removed = Some(recorded)).await {
                    tracing::error!(%error, "could not record the removal in node.json");
                }
                tracing::warn!(node_id = state.node_id(), %reason, "this node is no longer a member of the cluster; stopping");
                tokio::time::sleep(REMOVED_GRACE).await;
                state.stop_because(NodeError::Removed { node_id: state.node_id(), reason });
            }
            ClusterEvent::JoinFailed { reason } => state.stop_because(NodeError::Join(reason)),
        }
    }
}

/// Runs a node until `shutdown` completes or the node must stop by itself (removed from the
/// cluster, join refused), then drains and stops. Each item of `reload` re-reads the certificate
/// files (the binary feeds it from SIGHUP).
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    tokio::pin!(shutdown);
    let mut stop_reason = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            reason = node.stopped() => {
                stop_reason = Some(reason);
                break;
            }
            Some(()) = reload.recv() => {
                if let Err(error) = node.reload_certificates() {
                    tracing::error!(%error, "certificate reload failed; keeping the current certificates");
                }
            }
        }
    }
    tracing::info!("shutting down");
    let removed = matches!(node.state.stop_reason.borrow().as_ref(), Some(NodeError::Removed { .. }));
    node.shutdown().await;
    match stop_reason {
        Some(reason) if removed => {
            // Leaving is what the operator asked for: say why and exit normally.
            tracing::warn!(%reason, "node stopped");
            Ok(())
        }
        Some(reason) => Err(NodeError::Stopped(reason)),
        None => Ok(()),
    }
}
