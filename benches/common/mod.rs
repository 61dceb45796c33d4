//! What the benchmarks share: certificates, a node on loopback, latency figures, an HTTPS
//! client that keeps its connection.

#![allow(dead_code)]

pub mod corpus;
pub mod tantivy_serve;

/// The binary's allocator (`src/main.rs`), so that nodes run here as they do in production; the
/// in-process tantivy baselines use it too, which keeps the comparison even.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bayard::certs::{self, CertificateAuthority, Validity};
use bayard::index::{DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};
use bayard::node::{Node, NodeConfig, RunningNode};
use bayard::transport::{Role, TlsFiles};

pub struct Certificates {
    pub directory: tempfile::TempDir,
    authority: CertificateAuthority,
}

impl Certificates {
    pub fn new() -> Self {
        let directory = tempfile::tempdir().expect("temp dir");
        let (authority, pair) = CertificateAuthority::generate("bench ca", Validity::days_from_now(1)).expect("ca");
        certs::write_pair(directory.path(), "ca", &pair, false).expect("write ca");
        Certificates { directory, authority }
    }

    pub fn files(&self, role: &Role, stem: &str) -> TlsFiles {
        let names = match role {
            Role::Node { .. } => certs::default_node_subject_alternative_names(),
            _ => Vec::new(),
        };
        let pair = self.authority.issue(role, "bayard", &names, Validity::days_from_now(1)).expect("issue");
        let (certificate, private_key) = certs::write_pair(self.directory.path(), stem, &pair, true).expect("write");
        TlsFiles { ca_certificate: self.directory.path().join("ca.pem"), certificate, private_key }
    }
}

/// A node on 127.0.0.1 (QUIC and HTTPS on one port number), committing only when asked.
pub async fn start_node(certificates: &Certificates, data: &std::path::Path) -> RunningNode {
    let mut config = NodeConfig::new(
        1,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data.to_path_buf(),
        DEFAULT_SCHEMA_JSON.to_string(),
        DEFAULT_TOKENIZER_JSON.to_string(),
        certificates.files(&Role::Node { node_id: 1 }, "node-1"),
    );
    config.commit_interval = Duration::ZERO;
    config.http_port = bayard::node::HttpPort::SameAsQuic;
    Node::start(config).await.expect("node starts")
}

/// Latencies of one run: p50 and p99.
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn percentile(&mut self, fraction: f64) -> Duration {
        self.0.sort();
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let position = ((self.0.len() as f64 - 1.0) * fraction).round() as usize;
        self.0[position]
    }
}

/// The median of a few rounds' timings (the upper one of an even count).
pub fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

pub fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A new tantivy index in `directory` with the node's default schema and analyzers: the
/// in-process baseline the benches compare against.
pub fn raw_tantivy_index(directory: &std::path::Path) -> (tantivy::Index, tantivy::schema::Schema) {
    let schema = bayard::index::load_schema(DEFAULT_SCHEMA_JSON).expect("schema");
    // The node's settings: the baseline is the same index.
    let index = tantivy::Index::builder()
        .schema(schema.clone())
        .settings(bayard::index::new_index_settings())
        .create_in_dir(directory)
        .expect("index");
    bayard::index::AnalyzerConfig::from_json(DEFAULT_TOKENIZER_JSON)
        .expect("analyzers")
        .register_into(index.tokenizers())
        .expect("register");
    (index, schema)
}

/// Bytes of an index's doc stores (its `.store` files).
pub fn doc_store_bytes(directory: &std::path::Path) -> u64 {
    std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "store"))
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Indexes the articles as the node's documents into `index` (2 threads, 128 MB, as a node's
/// writer here) and commits: what every in-process baseline does.
pub fn index_articles(index: &tantivy::Index, schema: &tantivy::schema::Schema, articles: &[corpus::Article]) {
    let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(2, 128 * 1024 * 1024).expect("writer");
    for (number, article) in articles.iter().enumerate() {
        let document =
            tantivy::TantivyDocument::parse_json(schema, &corpus::document_json(number, article)).expect("doc");
        writer.add_document(document).expect("add");
    }
    writer.commit().expect("commit");
}

/// This process's resident memory in MB: (`VmRSS`, `RssAnon`), the whole and its anonymous part
/// (the heap; the rest is mostly memory-mapped index files), 0 when it cannot be read.
pub fn resident_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        let kb = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        kb as f64 / 1024.0
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Raft log reads of this process's nodes so far: (answered from memory, read from the file),
/// from `bayard_raft_log_reads_total`.
pub fn log_reads() -> (f64, f64) {
    let text = bayard::telemetry::metrics::render().unwrap_or_default();
    let count = |source: &str| {
        let prefix = format!("bayard_raft_log_reads_total{{source=\"{source}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (count("memory"), count("file"))
}

/// CPU time of this process so far (all threads: node and load generator alike).
pub fn process_cpu() -> Duration {
    cpu_of(libc::RUSAGE_SELF)
}

/// CPU time of this process's children that have been waited for (the CLI runs).
pub fn children_cpu() -> Duration {
    cpu_of(libc::RUSAGE_CHILDREN)
}

fn cpu_of(who: libc::c_int) -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        if libc::getrusage(who, usage.as_mut_ptr()) != 0 {
            return Duration::ZERO;
        }
        usage.assume_init()
    };
    let seconds = |time: libc::timeval| Duration::new(time.tv_sec as u64, time.tv_usec as u32 * 1000);
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// An HTTPS/1.1 connection kept open, as a load generator or a pooled client keeps one.
pub struct KeptConnection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl KeptConnection {
    pub async fn open(address: SocketAddr, files: &TlsFiles) -> Self {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls_pki_types::CertificateDer::pem_file_iter(&files.ca_certificate).expect("ca") {
            roots.add(certificate.expect("pem")).expect("root");
        }
        let chain = rustls_pki_types::CertificateDer::pem_file_iter(&files.certificate)
            .expect("certificate")
            .map(|certificate| certificate.expect("pem"))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&files.private_key).expect("key");
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client certificate");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(address).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.expect("tls");
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("http");
        tokio::spawn(connection);
        KeptConnection { sender }
    }

    /// Sends one request and reads the whole answer; panics on anything but 200.
    pub async fn post(&mut self, path: &str, body: String) -> bytes::Bytes {
        use http_body_util::BodyExt;
        self.sender.ready().await.expect("connection ready");
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let response = self.sender.send_request(request).await.expect("answer");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        bytes
    }
}

/// Node `node_id` on 127.0.0.1, committing only when asked; joins through `seed` (node 1's
/// address) when given. `writer_memory_bytes` overrides the node's default.
pub async fn start_member(
    certificates: &Certificates,
    node_id: u64,
    data: &std::path::Path,
    seed: Option<String>,
    writer_memory_bytes: Option<usize>,
) -> RunningNode {
    let mut config = NodeConfig::new(
        node_id,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data.to_path_buf(),
        DEFAULT_SCHEMA_JSON.to_string(),
        DEFAULT_TOKENIZER_JSON.to_string(),
        certificates.files(&Role::Node { node_id }, &format!("node-{node_id}")),
    );
    config.commit_interval = Duration::ZERO;
    if let Some(bytes) = writer_memory_bytes {
        config.writer_memory_bytes = bytes;
    }
    if let Some(seed) = seed {
        config.peers = vec![(1, seed)];
    }
    Node::start(config).await.expect("node starts")
}

/// Waits until `node` sees `voters` voters, no joint configuration and a leader.
pub async fn wait_for_voters(node: &RunningNode, voters: usize) {
    node.raft()
        .wait(Some(Duration::from_secs(60)))
        .metrics(
            |metrics| {
                metrics.membership_config.membership().voter_ids().count() == voters
                    && metrics.membership_config.membership().get_joint_config().len() == 1
                    && metrics.current_leader.is_some()
            },
            "cluster forms",
        )
        .await
        .expect("cluster forms");
}

/// Three nodes in `directories`, node 1 first (and leader), the others joining through it.
pub async fn three_nodes(
    certificates: &Certificates,
    directories: &[tempfile::TempDir],
    writer_memory_bytes: Option<usize>,
) -> [RunningNode; 3] {
    let first = start_member(certificates, 1, directories[0].path(), None, writer_memory_bytes).await;
    wait_for_voters(&first, 1).await;
    let seed = first.local_address().to_string();
    let second = start_member(certificates, 2, directories[1].path(), Some(seed.clone()), writer_memory_bytes).await;
    wait_for_voters(&first, 2).await;
    let third = start_member(certificates, 3, directories[2].path(), Some(seed), writer_memory_bytes).await;
    wait_for_voters(&first, 3).await;
    [first, second, third]
}
