//! A running bayard node: the endpoint, the index, and the handlers that connect them.
//!
//! [`Node::start`] binds the endpoint (port 0 works, for tests), opens the index and spawns the
//! accept loop; [`RunningNode::shutdown`] stops accepting, lets in-flight streams finish (bounded),
//! then closes the endpoint. [`run`] is the same for the binary, with a shutdown future.

pub mod apply;
pub mod authorization;
mod handlers;
pub mod metadata;
mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::index::{AnalyzerConfig, IndexError, SearchIndex};
use crate::transport::{self, TlsFiles, TlsMaterial, TransportError};
use apply::{IndexCommitMarker, LocalWritePath};
use metadata::{MetadataError, NodeMetadata};

/// Everything a node needs to start. [`NodeConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: u64,
    /// Where the UDP socket binds. Port 0 picks a free port.
    pub listen_address: SocketAddr,
    /// The address other nodes and clients use for this node, when it differs from the bound one.
    pub advertise_address: Option<String>,
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
            max_request_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
            writer_memory_bytes: 128 * 1024 * 1024,
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
    Transport(#[from] TransportError),
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
    #[error("index worker failed: {0}")]
    Worker(String),
}

/// State shared by every connection and stream of a node.
pub(crate) struct NodeState {
    pub config: NodeConfig,
    pub metadata: NodeMetadata,
    /// The address reported to clients and peers.
    pub address: String,
    pub index: Arc<SearchIndex>,
    pub write_path: LocalWritePath,
}

/// A node that is serving.
pub struct RunningNode {
    local_address: SocketAddr,
    node_id: u64,
    endpoint: quinn::Endpoint,
    tls_files: TlsFiles,
    max_concurrent_streams: u32,
    shutdown_sender: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningNode {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Re-reads the CA, certificate and key files (what SIGHUP does). New inbound connections use
    /// the new files; open connections keep the identity they were made with.
    /// When the files do not load, the node keeps its current ones and says why.
    pub fn reload_certificates(&self) -> Result<(), NodeError> {
        let material = TlsMaterial::load(&self.tls_files)?;
        let server_config = transport::tls::server_config(&material, self.max_concurrent_streams)?;
        self.endpoint.set_server_config(Some(server_config));
        tracing::info!(node_id = self.node_id, certificate = %self.tls_files.certificate.display(), "reloaded certificates");
        Ok(())
    }

    /// Stops accepting, waits for in-flight streams (bounded by the drain timeout), closes.
    pub async fn shutdown(self) {
        let _ = self.shutdown_sender.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(%error, "node task ended abnormally");
        }
    }

    /// Waits until the node stops by itself.
    pub async fn wait(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "node task ended abnormally");
        }
    }
}

pub struct Node;

impl Node {
    /// Opens the data directory and index, binds the endpoint and starts serving.
    pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
        let (metadata, directory_state) = metadata::load_or_create(&config.data_directory, config.node_id)?;
        tracing::info!(
            node_id = config.node_id,
            data_directory = %config.data_directory.display(),
            ?directory_state,
            cluster_id = %metadata.cluster_id,
            "opened data directory"
        );
        let index = open_index(&config).await?;
        let last_applied_index = {
            let index = index.clone();
            tokio::task::spawn_blocking(move || IndexCommitMarker::read(&index))
                .await
                .map_err(|error| NodeError::Worker(error.to_string()))??
                .map(|marker| marker.applied_index)
                .unwrap_or(0)
        };

        let material = TlsMaterial::load(&config.tls)?;
        let endpoint = transport::bind_node_endpoint(config.listen_address, &material, config.max_concurrent_streams)?;
        let local_address =
            endpoint.local_addr().map_err(|source| TransportError::Bind { address: config.listen_address, source })?;
        let address = config.advertise_address.clone().unwrap_or_else(|| local_address.to_string());
        tracing::info!(node_id = config.node_id, %local_address, %address, last_applied_index, "node listening");

        let node_id = config.node_id;
        let tls_files = config.tls.clone();
        let max_concurrent_streams = config.max_concurrent_streams;
        let state = Arc::new(NodeState {
            write_path: LocalWritePath::new(index.clone(), last_applied_index),
            index,
            metadata,
            address,
            config,
        });
        let (shutdown_sender, shutdown_receiver) = watch::channel(false);
        if !state.config.commit_interval.is_zero() {
            tokio::spawn(auto_commit(state.clone(), shutdown_receiver.clone()));
        }
        let task = tokio::spawn(server::serve(state, endpoint.clone(), shutdown_receiver));
        Ok(RunningNode { local_address, node_id, endpoint, tls_files, max_concurrent_streams, shutdown_sender, task })
    }
}

async fn open_index(config: &NodeConfig) -> Result<Arc<SearchIndex>, NodeError> {
    let schema = crate::index::load_schema(&config.schema_json)?;
    let analyzers = AnalyzerConfig::from_json(&config.tokenizer_json)?;
    let index_directory = config.data_directory.join("index");
    let writer_memory_bytes = config.writer_memory_bytes;
    let index = tokio::task::spawn_blocking(move || {
        SearchIndex::open_or_create(&index_directory, schema, &analyzers, writer_memory_bytes)
    })
    .await
    .map_err(|error| NodeError::Worker(error.to_string()))??;
    Ok(Arc::new(index))
}

/// Commits on a timer when there are uncommitted writes, so documents become searchable without
/// every client calling commit. The commit goes through the write path like any other operation.
async fn auto_commit(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(state.config.commit_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
        if !state.index.has_uncommitted_changes() {
            continue;
        }
        if let Err(error) = state.write_path.submit(vec![crate::index::IndexOperation::Commit]).await {
            tracing::error!(%error, "automatic commit failed");
        }
    }
}

/// Runs a node until `shutdown` completes, then drains and stops. Each item of `reload` re-reads
/// the certificate files (the binary feeds it from SIGHUP).
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => {
                if let Err(error) = node.reload_certificates() {
                    tracing::error!(%error, "certificate reload failed; keeping the current certificates");
                }
            }
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}
