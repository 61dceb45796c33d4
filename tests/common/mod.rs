//! Test harness: certificates in a temp directory, in-process nodes on 127.0.0.1 port 0, and
//! clients with any role. Everything is real: QUIC, mutual TLS, tantivy on disk.

#![allow(dead_code)]

pub mod https;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bayard::certs::{self, CertificateAuthority, Validity};
use bayard::client::{Client, ClientOptions};
use bayard::index::{DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};
use bayard::node::{Node, NodeConfig, RunningNode};
use bayard::transport::{Role, TlsFiles};

pub const TRUST_DOMAIN: &str = "bayard";

/// A cluster CA and the leaf certificates made from it, in a temporary directory.
pub struct CertificateSet {
    pub directory: tempfile::TempDir,
    authority: CertificateAuthority,
}

impl CertificateSet {
    pub fn new() -> Self {
        let directory = tempfile::tempdir().expect("temp dir");
        let (authority, pair) =
            CertificateAuthority::generate("test ca", Validity::days_from_now(30)).expect("generate ca");
        certs::write_pair(directory.path(), "ca", &pair, false).expect("write ca");
        CertificateSet { directory, authority }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.directory.path().join("ca.pem")
    }

    /// Issues (once) and returns the files of a certificate for `role`.
    pub fn files_for(&self, role: &Role) -> TlsFiles {
        self.files_with_validity(role, &format!("{}", role).replace('/', "-"), Validity::days_from_now(30))
    }

    pub fn files_with_validity(&self, role: &Role, stem: &str, validity: Validity) -> TlsFiles {
        let (certificate, private_key) = certs::pair_paths(self.directory.path(), stem);
        if !certificate.exists() {
            let names = match role {
                Role::Node { .. } => certs::default_node_subject_alternative_names(),
                _ => Vec::new(),
            };
            let pair = self.authority.issue(role, TRUST_DOMAIN, &names, validity).expect("issue");
            certs::write_pair(self.directory.path(), stem, &pair, true).expect("write leaf");
        }
        TlsFiles { ca_certificate: self.ca_path(), certificate, private_key }
    }

    pub fn node(&self, node_id: u64) -> TlsFiles {
        self.files_for(&Role::Node { node_id })
    }

    pub fn client(&self, name: &str) -> TlsFiles {
        self.files_for(&Role::Client { name: name.to_string() })
    }

    pub fn admin(&self, name: &str) -> TlsFiles {
        self.files_for(&Role::Admin { name: name.to_string() })
    }
}

pub fn node_config(certificates: &CertificateSet, node_id: u64, data_directory: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(
        node_id,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data_directory.to_path_buf(),
        DEFAULT_SCHEMA_JSON.to_string(),
        DEFAULT_TOKENIZER_JSON.to_string(),
        certificates.node(node_id),
    );
    // Tests decide when to commit unless they test the timer.
    config.commit_interval = Duration::ZERO;
    config.writer_memory_bytes = 32 * 1024 * 1024;
    config
}

pub async fn start_node(config: NodeConfig) -> RunningNode {
    Node::start(config).await.expect("node starts")
}

pub fn client_with(address: &str, tls: TlsFiles) -> Client {
    let mut options = ClientOptions::new(vec![address.to_string()], tls);
    options.request_timeout = Duration::from_secs(20);
    Client::connect(options).expect("client")
}

/// A standalone node with its own data directory, plus a client certificate to talk to it.
pub struct TestNode {
    pub certificates: CertificateSet,
    pub data: tempfile::TempDir,
    pub node: RunningNode,
}

impl TestNode {
    pub async fn start() -> Self {
        let certificates = CertificateSet::new();
        let data = tempfile::tempdir().expect("temp dir");
        let node = start_node(node_config(&certificates, 1, data.path())).await;
        TestNode { certificates, data, node }
    }

    pub fn address(&self) -> String {
        self.node.local_address().to_string()
    }

    pub fn client(&self) -> Client {
        client_with(&self.address(), self.certificates.client("app"))
    }

    pub fn admin(&self) -> Client {
        client_with(&self.address(), self.certificates.admin("ops"))
    }
}

/// Waits for `condition` to hold, checking every 50 ms for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Several in-process nodes sharing one CA, each with its own data directory.
pub struct TestCluster {
    pub certificates: CertificateSet,
    pub nodes: std::collections::BTreeMap<u64, RunningNode>,
    pub data: std::collections::BTreeMap<u64, tempfile::TempDir>,
    pub timings: bayard::node::RaftTimings,
    /// Start the nodes with their HTTPS door (same port number as QUIC).
    pub http: bool,
}

impl TestCluster {
    pub fn new() -> Self {
        // `RUST_LOG=info cargo test …` shows the nodes' logs.
        if std::env::var_os("RUST_LOG").is_some() {
            bayard::telemetry::init_logging(bayard::telemetry::LogFormat::Text, "info");
        }
        // Slower than the binary's LAN defaults: a test process runs a dozen nodes on two cores,
        // and a leader starved for 300 ms must not start elections in the middle of a test of
        // something else. The fault-injection suite (separate processes) runs the defaults.
        let timings = bayard::node::RaftTimings {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(600),
            election_timeout_max: Duration::from_millis(900),
            ..Default::default()
        };
        TestCluster {
            certificates: CertificateSet::new(),
            nodes: Default::default(),
            data: Default::default(),
            timings,
            http: false,
        }
    }

    /// Node 1 bootstraps, nodes 2 and 3 join through it; returns once every node sees the three
    /// voters in a uniform configuration.
    pub async fn with_three_voters() -> Self {
        let mut cluster = TestCluster::new();
        cluster.start(1, None).await;
        cluster.wait_for_voters(1, &[1], Duration::from_secs(30)).await;
        cluster.start(2, Some(1)).await;
        cluster.start(3, Some(1)).await;
        for node_id in [1, 2, 3] {
            cluster.wait_for_voters(node_id, &[1, 2, 3], Duration::from_secs(30)).await;
        }
        cluster
    }

    pub fn config(&mut self, node_id: u64, peers: Vec<(u64, String)>) -> NodeConfig {
        let data = self.data.entry(node_id).or_insert_with(|| tempfile::tempdir().expect("temp dir"));
        let mut config = node_config(&self.certificates, node_id, data.path());
        config.peers = peers;
        config.raft = self.timings.clone();
        if self.http {
            config.http_port = bayard::node::HttpPort::SameAsQuic;
        }
        config
    }

    pub fn address(&self, node_id: u64) -> String {
        self.nodes[&node_id].local_address().to_string()
    }

    /// Starts node `node_id`; with `seed`, it joins through that member.
    pub async fn start(&mut self, node_id: u64, seed: Option<u64>) {
        let peers = match seed {
            Some(seed) => vec![(seed, self.address(seed))],
            None => Vec::new(),
        };
        let config = self.config(node_id, peers);
        let node = start_node(config).await;
        self.nodes.insert(node_id, node);
    }

    /// Waits until `node_id` sees exactly `voters` as voters and knows a leader.
    pub async fn wait_for_voters(&self, node_id: u64, voters: &[u64], limit: Duration) {
        let expected: std::collections::BTreeSet<u64> = voters.iter().copied().collect();
        let raft = self.nodes[&node_id].raft().clone();
        raft.wait(Some(limit))
            .metrics(
                |metrics| {
                    let membership = metrics.membership_config.membership();
                    // Applied, hence committed: the membership change is over, not just proposed.
                    let applied =
                        metrics.last_applied.is_some() && metrics.last_applied >= *metrics.membership_config.log_id();
                    membership.voter_ids().collect::<std::collections::BTreeSet<u64>>() == expected
                        && membership.get_joint_config().len() == 1
                        && metrics.current_leader.is_some()
                        && applied
                },
                format!("node {node_id} sees voters {voters:?}"),
            )
            .await
            .expect("membership settles");
    }

    /// A client of every node, trying them in order.
    pub fn client(&self) -> Client {
        let servers = self.nodes.values().map(|node| node.local_address().to_string()).collect();
        let mut options = ClientOptions::new(servers, self.certificates.admin("ops"));
        options.request_timeout = Duration::from_secs(20);
        Client::connect(options).expect("client")
    }

    /// A client of one node only.
    pub fn client_of(&self, node_id: u64) -> Client {
        client_with(&self.address(node_id), self.certificates.admin("ops"))
    }

    pub fn leader(&self) -> Option<u64> {
        self.nodes.values().find_map(|node| {
            let metrics = node.raft().metrics().borrow().clone();
            (metrics.state == openraft::ServerState::Leader).then_some(metrics.id)
        })
    }

    pub async fn stop(&mut self, node_id: u64) {
        if let Some(node) = self.nodes.remove(&node_id) {
            node.shutdown().await;
        }
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for node_id in ids {
            self.stop(node_id).await;
        }
    }
}

/// A raw QUIC connection with any certificate, to send what the client library never would.
pub async fn raw_connection_with(files: &TlsFiles, address: &str) -> quinn::Connection {
    let material = bayard::transport::TlsMaterial::load(files).expect("tls material");
    let config = bayard::transport::tls::client_config(&material, 256).expect("client config");
    let endpoint = bayard::transport::bind_client_endpoint(config, false).expect("endpoint");
    let pool = bayard::transport::ConnectionPool::new(endpoint, TRUST_DOMAIN, Duration::from_secs(5));
    pool.get(address).await.expect("connects")
}

/// One request/answer of `kind` on `connection`; the outer error is the transport's.
pub async fn call_raw<Request: serde::Serialize, Response: serde::de::DeserializeOwned>(
    connection: &quinn::Connection,
    kind: bayard::protocol::StreamKind,
    request: &Request,
) -> Result<Result<Response, bayard::protocol::WireError>, bayard::transport::CallError> {
    bayard::transport::call(connection, kind, None, request, Duration::from_secs(10), 32 * 1024 * 1024).await
}

/// A search for `text`, ten hits.
pub fn query(text: &str) -> bayard::index::SearchRequest {
    bayard::index::SearchRequest { query: text.into(), limit: 10, ..Default::default() }
}

/// The code and message of an error the node answered with.
pub fn remote_error(error: bayard::client::ClientError) -> (bayard::protocol::ErrorCode, String) {
    match error {
        bayard::client::ClientError::Remote { code, message, .. } => (code, message),
        other => panic!("expected an answer from the node, got {other:?}"),
    }
}

/// A node holding one committed document ("safe"); bad requests and attacks must leave it there.
pub async fn node_with_one_document() -> TestNode {
    let test = TestNode::start().await;
    let client = test.client();
    client.put("safe", r#"{"title":"still here","year":2000}"#).await.unwrap();
    client.commit().await.unwrap();
    test
}

/// The committed document is still there and the node answers.
pub async fn assert_still_serving(test: &TestNode) {
    let client = test.client();
    let document = client.get("safe").await.expect("node still answers").expect("document kept");
    assert_eq!(document.fields["title"], "still here");
}
