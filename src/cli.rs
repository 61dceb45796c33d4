//! The command line: `bayard serve`, `bayard certs …` and the client commands. This is the edge
//! where errors become `anyhow` messages on stderr and a non-zero exit; results are JSON on stdout.

use std::io::{IsTerminal, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::certs::{self, CertificateAuthority, Validity};
use crate::client::{receipt_json, status_json, Client, ClientError, ClientOptions};
use crate::index::QueryLimits;
use crate::index::{FacetRequest, SearchRequest, SortSpec, DEFAULT_SCHEMA_JSON, DEFAULT_TOKENIZER_JSON};
use crate::node::{self, NodeConfig, NodeLimits};
use crate::protocol::{Consistency, DocumentInput, ErrorCode};
use crate::telemetry::{self, LogFormat, TelemetryConfig};
use crate::transport::{self, Role, TlsFiles};

#[derive(Debug, Parser)]
#[command(name = "bayard", version, about = "A distributed full-text search server")]
pub struct Arguments {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArguments>),
    /// Make certificates for a cluster.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Upsert a document (`--id` and JSON), or many with `--bulk` (NDJSON, each line with "_id").
    Put(PutArguments),
    /// Upsert documents from NDJSON (same as `put --bulk`).
    BulkPut(BulkArguments),
    /// Print the committed document with this id.
    Get(GetArguments),
    /// Delete a document, or many with `--bulk` (NDJSON of ids or of objects with "_id").
    Delete(DeleteArguments),
    /// Delete documents listed in NDJSON (same as `delete --bulk`).
    BulkDelete(BulkArguments),
    /// Make the writes so far searchable.
    Commit(ConnectionArguments),
    /// Discard the writes since the last commit.
    Rollback(ConnectionArguments),
    /// Merge the index segments into one.
    Merge(ConnectionArguments),
    /// Print the index schema.
    Schema(ConnectionArguments),
    /// Search with a query string.
    Search(SearchArguments),
    /// Print the node's status.
    Status(ConnectionArguments),
    /// Print the cluster members and their addresses.
    Peers(ConnectionArguments),
    /// Remove a node from the cluster (admin certificate).
    Leave(LeaveArguments),
    /// API keys for the HTTP API (admin certificate).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key; prints its secret, the only time it is shown.
    Create(CreateKeyArguments),
    /// List the keys (never their secrets).
    List(ConnectionArguments),
    /// Revoke a key on every node.
    Revoke(RevokeKeyArguments),
}

#[derive(Debug, Args)]
pub struct CreateKeyArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// A name for the key (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    pub name: String,
    /// client: documents and searches; admin: also cluster administration and keys.
    #[arg(long, default_value = "client", value_parser = crate::access::KeyRole::parse)]
    pub role: crate::access::KeyRole,
    /// The key may only read (search, get, status).
    #[arg(long)]
    pub read_only: bool,
}

#[derive(Debug, Args)]
pub struct RevokeKeyArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// The key's id (as `keys create` or `keys list` print it).
    #[arg(long)]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct LeaveArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// The node to remove (also accepted without the flag: `bayard leave 3`).
    #[arg(long = "id", value_name = "ID")]
    pub id_flag: Option<u64>,
    /// The node to remove, as the original Bayard's `leave 3` gave it.
    #[arg(value_name = "ID", conflicts_with = "id_flag", required_unless_present = "id_flag")]
    pub id: Option<u64>,
    /// Remove it even if the remaining voters that answer are not a quorum.
    #[arg(long)]
    pub force: bool,
}

/// Seed peers from `--peers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers(pub Vec<(u64, String)>);

/// Parses `1=host:5001,2=host:5002` (spaces allowed, empty means none).
pub fn parse_peers(text: &str) -> Result<Peers, String> {
    let mut peers = Vec::new();
    for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let Some((id, address)) = item.split_once('=') else {
            return Err(format!("peer `{item}` is not of the form id=host:port"));
        };
        let id: u64 = id.trim().parse().map_err(|_| format!("peer id `{id}` is not a number"))?;
        let address = address.trim();
        if crate::transport::pool::split_host_port(address).is_none() {
            return Err(format!("peer address `{address}` is not host:port"));
        }
        peers.push((id, address.to_string()));
    }
    Ok(Peers(peers))
}

#[derive(Debug, Args)]
pub struct ServeArguments {
    /// Node id, unique in the cluster.
    #[arg(long, env = "BAYARD_ID", default_value_t = 1)]
    pub id: u64,
    /// Address to bind the UDP port on.
    #[arg(long, env = "BAYARD_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The node's one port: QUIC on UDP carries Raft, membership, client and admin streams.
    #[arg(long, env = "BAYARD_PORT", default_value_t = 5001)]
    pub port: u16,
    /// Seed members to join through, as `id=host:port` pairs, comma-separated (e.g.
    /// "1=host1:5001,2=host2:5001"). Without it, a node with an empty data directory starts a new
    /// cluster. Ignored once the data directory holds a cluster's log.
    #[arg(long, env = "BAYARD_PEERS", default_value = "", value_parser = parse_peers)]
    pub peers: Peers,
    /// Host name or address other nodes and clients reach this node by (default: the bound address).
    #[arg(long, env = "BAYARD_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Data directory (default: ./data/<id>).
    #[arg(long, env = "BAYARD_DATA_DIRECTORY")]
    pub data_directory: Option<PathBuf>,
    /// tantivy schema JSON (default: etc/schema.json if present, else the built-in example).
    #[arg(long, env = "BAYARD_SCHEMA_FILE")]
    pub schema_file: Option<PathBuf>,
    /// Analyzer declarations (default: etc/tokenizer.json if present, else the built-in set).
    #[arg(long, env = "BAYARD_TOKENIZER_FILE")]
    pub tokenizer_file: Option<PathBuf>,
    /// Cluster CA certificate. Without --ca/--cert/--key, development certificates are made in --certs-directory.
    #[arg(long, env = "BAYARD_CA")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (its URI SAN must be spiffe://<trust-domain>/node/<id>).
    #[arg(long, env = "BAYARD_CERT")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM; mode 0600: a key others can read is refused).
    #[arg(long, env = "BAYARD_KEY")]
    pub key: Option<PathBuf>,
    /// Where development certificates are made when no certificate flags are given.
    #[arg(long, env = "BAYARD_CERTS_DIRECTORY", default_value = "certs")]
    pub certs_directory: PathBuf,
    /// Extra host names and addresses for the development node certificate, comma-separated
    /// (e.g. the host's DNS name when serving on --host 0.0.0.0); an existing development
    /// certificate without them is made again.
    #[arg(long, env = "BAYARD_DEV_SAN", value_delimiter = ',')]
    pub dev_san: Vec<String>,
    /// SPIFFE trust domain of the cluster's certificates (spiffe://<trust-domain>/node/<id>).
    #[arg(long, env = "BAYARD_TRUST_DOMAIN", default_value = transport::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// How long a new node keeps asking its seeds to join before it gives up (e.g. 5m).
    #[arg(long, env = "BAYARD_JOIN_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub join_timeout: Duration,
    /// Automatic commit period (e.g. 1s, 500ms); 0 commits only on request.
    #[arg(long, env = "BAYARD_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: Duration,
    /// Largest frame accepted on a stream, in bytes.
    #[arg(long, env = "BAYARD_MAX_FRAME_BYTES", default_value_t = transport::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Interval of the leader's heartbeats to its followers (e.g. 50ms). Keep it well under
    /// --election-timeout; on a WAN, about the round trip time between the farthest nodes.
    #[arg(long, env = "BAYARD_HEARTBEAT_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Election timeout (e.g. 200ms): a follower that hears nothing from its leader campaigns
    /// after between 2.5 and 3 times this (openraft waits out the old leader's lease first). On a
    /// WAN, at least 10 times the round trip time between the farthest nodes.
    #[arg(long, env = "BAYARD_ELECTION_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub election_timeout: Duration,
    /// Snapshot the index after this many Raft log entries (and purge the log behind it).
    #[arg(long, env = "BAYARD_SNAPSHOT_ENTRIES", default_value_t = 5_000)]
    pub snapshot_entries: u64,
    /// Remove members that have been down this long (e.g. 10m), never below a quorum. Off unless set.
    #[arg(long, env = "BAYARD_REMOVE_DOWN_AFTER", value_parser = parse_duration)]
    pub remove_down_after: Option<Duration>,
    /// Memory of the index writer, in MiB.
    #[arg(long, env = "BAYARD_WRITER_MEMORY_MB", default_value_t = 128)]
    pub writer_memory_mb: usize,
    /// Log lines as text (colour only on a terminal, never with NO_COLOR) or as JSON objects.
    #[arg(long, env = "BAYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://localhost:4317); also taken
    /// from OTEL_EXPORTER_OTLP_ENDPOINT. Nothing is exported when unset.
    #[arg(long, env = "BAYARD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Serve /metrics (Prometheus), /livez and /readyz over HTTP on this port of --host.
    #[arg(long, env = "BAYARD_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// TCP port of the HTTPS API (REST and the Elasticsearch subset): `same` (the QUIC port's
    /// number), a number, or `off`.
    #[arg(long, env = "BAYARD_HTTP_PORT", default_value = "same", value_parser = parse_http_port)]
    pub http_port: node::HttpPort,
    /// Fields searched by query terms that name none, with boosts: `title^2,body` (default: the
    /// schema file's `default_search_fields`, else every indexed text field).
    #[arg(long, env = "BAYARD_DEFAULT_SEARCH_FIELDS", value_parser = parse_default_search_fields)]
    pub default_search_fields: Option<FieldBoosts>,
    /// The index's name in HTTP paths (`/{index}/_search`).
    #[arg(long, env = "BAYARD_INDEX_NAME", default_value = "bayard")]
    pub index_name: String,
    /// Open HTTPS connections, all callers together.
    #[arg(long, env = "BAYARD_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Open HTTPS connections from one remote address.
    #[arg(long, env = "BAYARD_HTTP_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256)]
    pub http_max_connections_per_address: usize,
    /// An HTTPS connection with no request in progress for this long is closed.
    #[arg(long, env = "BAYARD_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
    /// Most actions in one `_bulk` body.
    #[arg(long, env = "BAYARD_HTTP_MAX_BULK_ITEMS", default_value_t = 10_000)]
    pub http_max_bulk_items: usize,
    /// Largest HTTP request body, in MiB (bulk bodies are written in chunks).
    #[arg(long, env = "BAYARD_HTTP_MAX_BODY_MB", default_value_t = 64)]
    pub http_max_body_mb: usize,
    /// Longest an HTTP request may take.
    #[arg(long, env = "BAYARD_HTTP_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_request_timeout: Duration,
    #[command(flatten)]
    pub limits: LimitArguments,
}

/// Fields with boosts, from `--default-search-fields`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldBoosts(pub Vec<(String, f32)>);

/// Parses `--default-search-fields`: `title^2,body`.
fn parse_default_search_fields(text: &str) -> Result<FieldBoosts, String> {
    crate::index::parse_field_boosts(text).map(FieldBoosts).map_err(|error| error.to_string())
}

/// Parses `--http-port`: `same`, `off` or a port number.
pub fn parse_http_port(text: &str) -> Result<node::HttpPort, String> {
    match text.trim() {
        "same" => Ok(node::HttpPort::SameAsQuic),
        "off" => Ok(node::HttpPort::Off),
        number => number
            .parse::<u16>()
            .map(node::HttpPort::Port)
            .map_err(|_| format!("`{number}` is not a port; use same, off or a number")),
    }
}

/// Limits on what callers may make the node hold (docs/security.md lists each with its refusal).
#[derive(Debug, Clone, Args)]
pub struct LimitArguments {
    /// Open connections, all callers together (handshakes included).
    #[arg(long, env = "BAYARD_MAX_CONNECTIONS", default_value_t = NodeLimits::default().max_connections)]
    pub max_connections: usize,
    /// Open connections of one certificate identity.
    #[arg(long, env = "BAYARD_MAX_CONNECTIONS_PER_IDENTITY", default_value_t = NodeLimits::default().max_connections_per_identity)]
    pub max_connections_per_identity: usize,
    /// Client and admin requests of one certificate in progress at once, over all its connections.
    #[arg(long, env = "BAYARD_MAX_REQUESTS_PER_IDENTITY", default_value_t = NodeLimits::default().max_requests_per_identity)]
    pub max_requests_per_identity: usize,
    /// Streams (requests) one connection may have open at once; more wait for a stream credit.
    #[arg(long, env = "BAYARD_MAX_STREAMS_PER_CONNECTION", default_value_t = transport::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_streams_per_connection: u32,
    /// Largest stream header in bytes (read before the caller's role is checked).
    #[arg(long, env = "BAYARD_MAX_HEADER_BYTES", default_value_t = NodeLimits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Request bodies being read or handled at once, all callers together, in MiB.
    #[arg(long, env = "BAYARD_MAX_INFLIGHT_REQUEST_MB", default_value_t = NodeLimits::default().max_inflight_request_bytes / (1024 * 1024))]
    pub max_inflight_request_mb: usize,
    /// Searches running at once (default: twice the cores).
    #[arg(long, env = "BAYARD_MAX_CONCURRENT_SEARCHES", default_value_t = NodeLimits::default().max_concurrent_searches)]
    pub max_concurrent_searches: usize,
    /// Searches waiting for a slot; more are refused at once.
    #[arg(long, env = "BAYARD_MAX_QUEUED_SEARCHES", default_value_t = NodeLimits::default().max_queued_searches)]
    pub max_queued_searches: usize,
    /// Write requests in progress at once.
    #[arg(long, env = "BAYARD_MAX_CONCURRENT_WRITES", default_value_t = NodeLimits::default().max_concurrent_writes)]
    pub max_concurrent_writes: usize,
    /// Write requests waiting for a slot; more are refused at once.
    #[arg(long, env = "BAYARD_MAX_QUEUED_WRITES", default_value_t = NodeLimits::default().max_queued_writes)]
    pub max_queued_writes: usize,
    /// Longest a request waits for a slot or for room in the byte budget (e.g. 5s).
    #[arg(long, env = "BAYARD_MAX_QUEUE_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub max_queue_wait: Duration,
    /// Time budget of one search; past it the search stops with deadline_exceeded (e.g. 10s).
    #[arg(long, env = "BAYARD_SEARCH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub search_timeout: Duration,
    /// Longest query text, in bytes.
    #[arg(long, env = "BAYARD_MAX_QUERY_BYTES", default_value_t = QueryLimits::default().max_query_bytes)]
    pub max_query_bytes: usize,
    /// Deepest nesting of parentheses in a query (at most 256).
    #[arg(long, env = "BAYARD_MAX_QUERY_DEPTH", default_value_t = QueryLimits::default().max_query_depth)]
    pub max_query_depth: usize,
    /// Most terms and operators in a query.
    #[arg(long, env = "BAYARD_MAX_QUERY_TERMS", default_value_t = QueryLimits::default().max_query_terms)]
    pub max_query_terms: usize,
    /// Most facet prefixes in one search, over all facet fields.
    #[arg(long, env = "BAYARD_MAX_FACET_PREFIXES", default_value_t = QueryLimits::default().max_facet_prefixes)]
    pub max_facet_prefixes: usize,
    /// Writes are refused while the data directory's file system has less free space, in MiB.
    #[arg(long, env = "BAYARD_MIN_FREE_DISK_MB", default_value_t = NodeLimits::default().min_free_disk_bytes / (1024 * 1024))]
    pub min_free_disk_mb: u64,
}

impl LimitArguments {
    pub fn to_limits(&self) -> NodeLimits {
        NodeLimits {
            max_connections: self.max_connections,
            max_connections_per_identity: self.max_connections_per_identity,
            max_requests_per_identity: self.max_requests_per_identity,
            max_header_bytes: self.max_header_bytes,
            max_inflight_request_bytes: self.max_inflight_request_mb.saturating_mul(1024 * 1024),
            max_concurrent_searches: self.max_concurrent_searches,
            max_queued_searches: self.max_queued_searches,
            max_concurrent_writes: self.max_concurrent_writes,
            max_queued_writes: self.max_queued_writes,
            max_queue_wait: self.max_queue_wait,
            search_timeout: self.search_timeout,
            query: QueryLimits {
                max_query_bytes: self.max_query_bytes,
                max_query_depth: self.max_query_depth,
                max_query_terms: self.max_query_terms,
                max_facet_prefixes: self.max_facet_prefixes,
            },
            min_free_disk_bytes: self.min_free_disk_mb.saturating_mul(1024 * 1024),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ConnectionArguments {
    /// Nodes to try, comma-separated host:port (a host alone means port 5001); `--server` works too.
    #[arg(long, alias = "server", env = "BAYARD_SERVERS", default_value = "127.0.0.1:5001", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "BAYARD_CA", default_value = DEFAULT_CLIENT_CA)]
    pub ca: PathBuf,
    /// This client's certificate (PEM; a client or admin role).
    #[arg(long, env = "BAYARD_CERT", default_value = DEFAULT_CLIENT_CERT)]
    pub cert: PathBuf,
    /// This client's private key (PEM; mode 0600).
    #[arg(long, env = "BAYARD_KEY", default_value = DEFAULT_CLIENT_KEY)]
    pub key: PathBuf,
    /// Deadline of each request (e.g. 30s).
    #[arg(long, env = "BAYARD_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Largest frame sent or accepted, in bytes (the node's --max-frame-bytes).
    #[arg(long, env = "BAYARD_MAX_FRAME_BYTES", default_value_t = transport::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// SPIFFE trust domain of the cluster's certificates.
    #[arg(long, env = "BAYARD_TRUST_DOMAIN", default_value = transport::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// Where the client looks for certificates when no flag says: what `bayard serve` makes.
const DEFAULT_CLIENT_CA: &str = "certs/ca.pem";
const DEFAULT_CLIENT_CERT: &str = "certs/admin-dev.pem";
const DEFAULT_CLIENT_KEY: &str = "certs/admin-dev.key";

#[derive(Debug, Args)]
pub struct PutArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// Document id (or an "_id" field in the document).
    #[arg(long)]
    pub id: Option<String>,
    /// Read the document (or NDJSON with --bulk) from this file; `-` is stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Treat the input as NDJSON, one document with "_id" per line.
    #[arg(long)]
    pub bulk: bool,
    /// The document JSON (else --file, else stdin).
    pub document: Option<String>,
}

#[derive(Debug, Args)]
pub struct BulkArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// NDJSON file; `-` or absent is stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GetArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// Id of the document.
    #[arg(long)]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct DeleteArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// Id of the document to delete.
    #[arg(long, required_unless_present = "bulk")]
    pub id: Option<String>,
    /// Delete the ids listed in NDJSON (`"id"`, `{"_id":"id"}` or a bare id per line).
    #[arg(long)]
    pub bulk: bool,
    /// The NDJSON file for --bulk; `-` or absent is stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SearchArguments {
    #[command(flatten)]
    pub connection: ConnectionArguments,
    /// Offset of the first hit.
    #[arg(long, default_value_t = 0)]
    pub from: usize,
    /// Hits per page.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Do not count all matches.
    #[arg(long)]
    pub exclude_count: bool,
    /// Return no documents (counts and facets only).
    #[arg(long)]
    pub exclude_docs: bool,
    /// Facet field to count (repeatable).
    #[arg(long)]
    pub facet_field: Vec<String>,
    /// Facet prefix whose children are counted (repeatable; default `/`).
    #[arg(long)]
    pub facet_prefix: Vec<String>,
    /// Sort by a fast field instead of relevance: `field`, `field:asc` or `field:desc`.
    #[arg(long)]
    pub sort: Option<String>,
    /// local: this node; leader: the leader's index; linearizable: the leader after a read-index check.
    #[arg(long, env = "BAYARD_CONSISTENCY", default_value = "local", value_parser = parse_consistency)]
    pub consistency: Consistency,
    /// A query in the JSON query language instead of the query string (Elasticsearch's Query
    /// DSL: `{"bool": {"must": [{"match": {"body": "search"}}]}}`).
    #[arg(long, conflicts_with = "query")]
    pub query_json: Option<String>,
    /// Aggregations, as Elasticsearch's `aggs` JSON (with --query-json or a query string).
    #[arg(long)]
    pub aggs_json: Option<String>,
    /// Stored text fields to highlight matches in, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub highlight: Vec<String>,
    /// tantivy query syntax, e.g. 'title:hello AND body:world'; `*` (or an empty query) matches
    /// every document.
    #[arg(required_unless_present = "query_json")]
    pub query: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make the cluster CA (ca.pem, ca.key).
    Ca(CaArguments),
    /// Make a node certificate (node-<id>.pem/.key).
    Node(NodeCertArguments),
    /// Make a client certificate (client-<name>.pem/.key): search and write, read-only admin.
    Client(NamedCertArguments),
    /// Make an admin certificate (admin-<name>.pem/.key): everything but Raft.
    Admin(NamedCertArguments),
}

#[derive(Debug, Args)]
pub struct CaArguments {
    /// Directory the files are written to.
    #[arg(long, default_value = "certs")]
    pub out_dir: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = certs::DEFAULT_CA_VALIDITY_DAYS)]
    pub days: i64,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SigningArguments {
    /// Directory the files are written to (and where the CA is looked for).
    #[arg(long, default_value = "certs")]
    pub out_dir: PathBuf,
    /// CA certificate (default: <out-dir>/ca.pem).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// CA key (default: <out-dir>/ca.key).
    #[arg(long)]
    pub ca_key: Option<PathBuf>,
    /// SPIFFE trust domain written into the certificate's URI SAN.
    #[arg(long, default_value = transport::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Validity in days.
    #[arg(long, default_value_t = certs::DEFAULT_LEAF_VALIDITY_DAYS)]
    pub days: i64,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct NodeCertArguments {
    /// The node id the certificate is for (spiffe://<trust-domain>/node/<id>).
    #[arg(long)]
    pub id: u64,
    /// Extra host names and IP addresses the node is reached by, comma-separated
    /// (localhost, 127.0.0.1 and ::1 are always included).
    #[arg(long, value_delimiter = ',')]
    pub san: Vec<String>,
    #[command(flatten)]
    pub signing: SigningArguments,
}

#[derive(Debug, Args)]
pub struct NamedCertArguments {
    /// Name of the application or operator (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub signing: SigningArguments,
}

/// Parses `1s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|character: char| !character.is_ascii_digit() && character != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 1s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{text}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_consistency(text: &str) -> Result<Consistency, String> {
    match text {
        "local" => Ok(Consistency::Local),
        "leader" => Ok(Consistency::Leader),
        "linearizable" => Ok(Consistency::Linearizable),
        other => Err(format!("unknown consistency `{other}` (use local, leader or linearizable)")),
    }
}

/// Parses `--sort field[:asc|:desc]`.
pub fn parse_sort(text: &str) -> anyhow::Result<SortSpec> {
    let (field, order) = match text.rsplit_once(':') {
        Some((field, order)) => (field, order),
        None => (text, "asc"),
    };
    if field.is_empty() {
        bail!("--sort needs a field name, as in `year:desc`");
    }
    let descending = match order {
        "asc" => false,
        "desc" => true,
        other => bail!("unknown sort order `{other}` in --sort (use asc or desc)"),
    };
    Ok(SortSpec { field: field.to_string(), descending })
}

pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    match arguments.command {
        Command::Serve(serve) => run_serve(*serve).await,
        Command::Certs(command) => run_certs(command),
        command => {
            // A client command is the root of its trace when an OTLP endpoint is set (or a child of
            // TRACEPARENT); the guard flushes its spans before the process exits.
            let telemetry_guard =
                telemetry::init(TelemetryConfig::from_env(LogFormat::Text, "cli").with_log_directive("warn"))?;
            let result = run_client_command(command).await;
            let _ = telemetry_guard.shutdown().await;
            result
        }
    }
}

fn read_file_or_embedded(
    path: Option<&Path>,
    default_path: &str,
    embedded: &'static str,
    what: &str,
) -> anyhow::Result<String> {
    match path {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display())),
        None if Path::new(default_path).exists() => {
            tracing::info!(path = default_path, "using {what}");
            std::fs::read_to_string(default_path).with_context(|| format!("cannot read {what} {default_path}"))
        }
        None => {
            tracing::info!("using the built-in {what}");
            Ok(embedded.to_string())
        }
    }
}

async fn run_serve(arguments: ServeArguments) -> anyhow::Result<()> {
    let telemetry_guard = telemetry::init(
        TelemetryConfig::from_env(arguments.log_format, arguments.id.to_string())
            // openraft logs every failed RPC (a peer restarting, a node joining) at WARN and ERROR:
            // alarms for normal events. bayard logs what an operator should see itself;
            // RUST_LOG=info,openraft=warn brings openraft's own lines back.
            .with_log_directive("info,openraft=off")
            .with_otlp_endpoint(arguments.otlp_endpoint.clone()),
    )?;
    let served = serve_node(arguments).await;
    if let Err(error) = telemetry_guard.shutdown().await {
        tracing::warn!(%error, "traces may not all have been exported");
    }
    served
}

async fn serve_node(arguments: ServeArguments) -> anyhow::Result<()> {
    let tls = match (&arguments.ca, &arguments.cert, &arguments.key) {
        (Some(ca), Some(cert), Some(key)) => {
            TlsFiles { ca_certificate: ca.clone(), certificate: cert.clone(), private_key: key.clone() }
        }
        (None, None, None) => {
            let mut names = Vec::new();
            if !arguments.host.is_unspecified() {
                names.push(arguments.host.to_string());
            }
            if let Some(advertise_host) = &arguments.advertise_host {
                names.push(advertise_host.clone());
            }
            names.extend(arguments.dev_san.iter().map(|name| name.trim().to_string()).filter(|name| !name.is_empty()));
            if arguments.host.is_unspecified() && arguments.advertise_host.is_none() && arguments.dev_san.is_empty() {
                tracing::warn!(
                    "serving on {} with development certificates valid only for localhost: remote clients will refuse \
                     them; add the host's names with --dev-san (or --advertise-host)",
                    arguments.host
                );
            }
            let development = certs::ensure_development_certificates(
                &arguments.certs_directory,
                arguments.id,
                &arguments.trust_domain,
                &names,
            )
            .context("cannot make development certificates")?;
            if !development.created.is_empty() {
                let created: Vec<String> = development.created.iter().map(|path| path.display().to_string()).collect();
                tracing::warn!(
                    files = %created.join(", "),
                    "no --ca/--cert/--key given: made development certificates; do not use them in production"
                );
            }
            TlsFiles {
                ca_certificate: development.ca_certificate,
                certificate: development.node_certificate,
                private_key: development.node_key,
            }
        }
        _ => bail!("give --ca, --cert and --key together (or none of them for development certificates)"),
    };
    let schema_json =
        read_file_or_embedded(arguments.schema_file.as_deref(), "etc/schema.json", DEFAULT_SCHEMA_JSON, "schema file")?;
    let tokenizer_json = read_file_or_embedded(
        arguments.tokenizer_file.as_deref(),
        "etc/tokenizer.json",
        DEFAULT_TOKENIZER_JSON,
        "tokenizer file",
    )?;
    let data_directory =
        arguments.data_directory.clone().unwrap_or_else(|| PathBuf::from("data").join(arguments.id.to_string()));
    let listen_address = SocketAddr::new(arguments.host, arguments.port);
    let mut config = NodeConfig::new(arguments.id, listen_address, data_directory, schema_json, tokenizer_json, tls);
    config.advertise_address = arguments.advertise_host.as_ref().map(|host| format!("{host}:{}", arguments.port));
    config.peers = arguments.peers.0.clone();
    config.trust_domain = arguments.trust_domain.clone();
    config.commit_interval = arguments.commit_interval;
    config.max_frame_bytes = arguments.max_frame_bytes;
    config.writer_memory_bytes = arguments.writer_memory_mb.max(16) * 1024 * 1024;
    config.raft.snapshot_after_entries = arguments.snapshot_entries.max(1);
    config.raft.heartbeat_interval = arguments.heartbeat_interval;
    config.raft.election_timeout_min = arguments.election_timeout;
    config.raft.election_timeout_max = arguments.election_timeout + arguments.election_timeout / 2;
    config.remove_down_after = arguments.remove_down_after;
    config.metrics_address = arguments.metrics_port.map(|port| SocketAddr::new(arguments.host, port));
    config.limits = arguments.limits.to_limits();
    config.join_timeout = arguments.join_timeout;
    config.max_concurrent_streams = arguments.limits.max_streams_per_connection;
    config.http_port = arguments.http_port;
    config.default_search_fields = arguments.default_search_fields.clone().map(|fields| fields.0);
    config.http.index_name = arguments.index_name.clone();
    config.http.max_connections = arguments.http_max_connections.max(1);
    config.http.max_body_bytes = arguments.http_max_body_mb.max(1) * 1024 * 1024;
    config.http.request_timeout = arguments.http_request_timeout;
    config.http.max_connections_per_address = arguments.http_max_connections_per_address.max(1);
    config.http.idle_timeout = arguments.http_idle_timeout.max(Duration::from_secs(1));
    config.http.max_bulk_items = arguments.http_max_bulk_items.max(1);
    node::run(config, shutdown_signal(), reload_signal()).await.map_err(|error| anyhow!(error))
}

/// Yields once per SIGHUP: the operator's way to make the node re-read its certificate files.
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        if sender.send(()).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP; certificate reload is off"),
        }
    }
    #[cfg(not(unix))]
    drop(sender);
    receiver
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_certs(command: CertsCommand) -> anyhow::Result<()> {
    let written = match command {
        CertsCommand::Ca(arguments) => {
            let (_, pair) =
                CertificateAuthority::generate("bayard cluster ca", Validity::days_from_now(arguments.days))?;
            certs::write_pair(&arguments.out_dir, "ca", &pair, arguments.force)?
        }
        CertsCommand::Node(arguments) => {
            let mut names = certs::default_node_subject_alternative_names();
            for name in arguments.san.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
                if !names.iter().any(|existing| existing == name) {
                    names.push(name.to_string());
                }
            }
            issue_leaf(
                &arguments.signing,
                &Role::Node { node_id: arguments.id },
                &names,
                &format!("node-{}", arguments.id),
            )?
        }
        CertsCommand::Client(arguments) => {
            check_certificate_name(&arguments.name)?;
            issue_leaf(
                &arguments.signing,
                &Role::Client { name: arguments.name.clone() },
                &[],
                &format!("client-{}", arguments.name),
            )?
        }
        CertsCommand::Admin(arguments) => {
            check_certificate_name(&arguments.name)?;
            issue_leaf(
                &arguments.signing,
                &Role::Admin { name: arguments.name.clone() },
                &[],
                &format!("admin-{}", arguments.name),
            )?
        }
    };
    print_json(&json!({
        "certificate": written.0.display().to_string(),
        "key": written.1.display().to_string(),
    }));
    Ok(())
}

fn check_certificate_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.chars().all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '_' | '.'));
    if !valid {
        bail!("certificate name `{name}` may only hold letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn issue_leaf(
    arguments: &SigningArguments,
    role: &Role,
    names: &[String],
    stem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca_certificate = arguments.ca_cert.clone().unwrap_or_else(|| arguments.out_dir.join("ca.pem"));
    let ca_key = arguments.ca_key.clone().unwrap_or_else(|| arguments.out_dir.join("ca.key"));
    let authority = CertificateAuthority::load(&ca_certificate, &ca_key)
        .with_context(|| "cannot load the CA; make one with `bayard certs ca` first".to_string())?;
    let pair = authority.issue(role, &arguments.trust_domain, names, Validity::days_from_now(arguments.days))?;
    Ok(certs::write_pair(&arguments.out_dir, stem, &pair, arguments.force)?)
}

/// The JSON search body of `search --query-json/--aggs-json/--highlight`: the query string (when
/// no JSON query is given) becomes a `query_string` query; `--from`, `--limit`, `--sort` and
/// `--exclude-count` carry over.
fn json_search_body(arguments: &SearchArguments) -> anyhow::Result<serde_json::Value> {
    if !arguments.facet_field.is_empty() {
        bail!("--facet-field works with query strings; with JSON, use a terms aggregation in --aggs-json");
    }
    let parse = |flag: &str, text: &str| -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(text).with_context(|| format!("{flag} is not JSON"))
    };
    let query = match (&arguments.query_json, &arguments.query) {
        (Some(text), _) => parse("--query-json", text)?,
        (None, Some(text)) if !text.trim().is_empty() && text.trim() != "*" => json!({"query_string": {"query": text}}),
        (None, _) => json!({"match_all": {}}),
    };
    let mut body = json!({"query": query, "from": arguments.from, "size": arguments.limit});
    if let Some(aggs) = &arguments.aggs_json {
        body["aggs"] = parse("--aggs-json", aggs)?;
    }
    if !arguments.highlight.is_empty() {
        let fields: serde_json::Map<String, serde_json::Value> =
            arguments.highlight.iter().map(|field| (field.clone(), json!({}))).collect();
        body["highlight"] = json!({"fields": fields});
    }
    if let Some(sort) = &arguments.sort {
        let sort = parse_sort(sort)?;
        body["sort"] = json!([{sort.field: {"order": if sort.descending { "desc" } else { "asc" }}}]);
    }
    if arguments.exclude_count {
        body["track_total_hits"] = json!(false);
    }
    if arguments.exclude_docs {
        body["size"] = json!(0);
    }
    Ok(body)
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn connect(arguments: &ConnectionArguments) -> anyhow::Result<Client> {
    let servers: Vec<String> = arguments
        .servers
        .iter()
        .map(|server| with_default_port(server.trim()))
        .filter(|server| !server.is_empty())
        .collect();
    let mut options = ClientOptions::new(
        servers,
        TlsFiles {
            ca_certificate: arguments.ca.clone(),
            certificate: arguments.cert.clone(),
            private_key: arguments.key.clone(),
        },
    );
    options.request_timeout = arguments.timeout;
    // A dial never outlasts the request's own deadline.
    options.connect_timeout = options.connect_timeout.min(arguments.timeout);
    options.max_frame_bytes = arguments.max_frame_bytes;
    options.trust_domain = arguments.trust_domain.clone();
    options.trace_context = std::env::var("TRACEPARENT").ok().filter(|value| !value.is_empty());
    match Client::connect(options) {
        Ok(client) => Ok(client),
        Err(ClientError::Tls(error @ transport::TlsError::Read { .. })) => Err(anyhow!(
            "{error}; pass --ca, --cert and --key (or set BAYARD_CA, BAYARD_CERT and BAYARD_KEY): without them the \
             client looks for the development certificates that `bayard serve` makes in ./certs"
        )),
        Err(error) => Err(error.into()),
    }
}

/// The default port of a node.
const DEFAULT_PORT: u16 = 5001;

/// `host` alone means `host:5001`; `host:port`, `[v6]:port` and bare IPv6 addresses are kept
/// (a bare IPv6 address gets brackets and the port).
pub fn with_default_port(server: &str) -> String {
    if let Ok(address) = server.parse::<std::net::Ipv6Addr>() {
        return format!("[{address}]:{DEFAULT_PORT}");
    }
    if server.is_empty() || transport::pool::split_host_port(server).is_some() {
        return server.to_string();
    }
    if let Some(inner) = server.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
        return format!("[{inner}]:{DEFAULT_PORT}");
    }
    format!("{server}:{DEFAULT_PORT}")
}

/// Flags and forms of the original Bayard (0.2–0.9) that bayard does not take, with what to use
/// instead. Consulted only when the command line does not parse, so valid uses are never touched.
pub fn legacy_hint(arguments: &[String]) -> Option<String> {
    let named =
        |flag: &str| arguments.iter().any(|argument| argument == flag || argument.starts_with(&format!("{flag}=")));
    if named("--raft-port") || named("--index-port") || named("--grpc-port") {
        return Some(
            "bayard serves Raft, clients and admins on one port per node: use --port (QUIC on UDP) instead of \
             --raft-port and --index-port; see docs/migrating.md"
                .to_string(),
        );
    }
    if named("--peer-raft-address") || named("--peer-address") {
        return Some(
            "bayard joins a cluster through its members: use --peers \"1=host:port\" (a member's id and address) \
             instead of --peer-raft-address; see docs/migrating.md"
                .to_string(),
        );
    }
    let command = arguments.iter().skip(1).find(|argument| !argument.starts_with('-'))?;
    // Bayard 0.8 ran a node as `bayard [flags] 1`, 0.7 as `bayard start 1`.
    if command.parse::<u64>().is_ok() || command == "start" {
        let node_id = arguments
            .iter()
            .skip(1)
            .filter(|argument| !argument.starts_with('-'))
            .find_map(|argument| argument.parse::<u64>().ok());
        let node_id = node_id.map_or_else(|| "<id>".to_string(), |node_id| node_id.to_string());
        return Some(format!(
            "a node runs with `bayard serve --id {node_id}` (flags after `serve`); see docs/migrating.md"
        ));
    }
    if command == "serve" {
        let position = arguments.iter().position(|argument| argument == "serve")?;
        let mut rest = arguments[position + 1..].iter().peekable();
        while let Some(argument) = rest.next() {
            if argument.starts_with("--") {
                // Skip the value of a `--flag value` pair.
                if !argument.contains('=') && rest.peek().is_some_and(|next| !next.starts_with('-')) {
                    rest.next();
                }
                continue;
            }
            if argument.parse::<u64>().is_ok() {
                return Some(format!(
                    "the node id is a flag in bayard: use `bayard serve --id {argument}`; see docs/migrating.md"
                ));
            }
        }
    }
    None
}

/// Reads one document from `path` (`-` or none: stdin), refusing it once it passes `limit` bytes
/// (the largest request the node takes) instead of holding whatever the input holds.
fn read_document(path: Option<&Path>, limit: usize) -> anyhow::Result<String> {
    let (reader, name): (Box<dyn Read>, String) = match path {
        Some(path) if path != Path::new("-") => (
            Box::new(std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?),
            path.display().to_string(),
        ),
        _ => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading from stdin (end with Ctrl-D)");
            }
            (Box::new(std::io::stdin()), "stdin".to_string())
        }
    };
    let mut bytes = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {name}"))?;
    if bytes.len() > limit {
        bail!("{name} is larger than {limit} bytes, the largest request sent (--max-frame-bytes)");
    }
    String::from_utf8(bytes).map_err(|_| anyhow!("{name} is not UTF-8"))
}

/// The lines of a reader, each refused once it passes `limit` bytes: a line longer than the
/// largest request could never be sent, and reading it whole first would make the CLI's memory
/// grow with the input (a file without newlines is one line). Yields 1-based line numbers; the
/// first error ends the iteration.
struct BoundedLines<R> {
    reader: R,
    limit: usize,
    number: usize,
    finished: bool,
}

impl<R: std::io::BufRead> BoundedLines<R> {
    fn new(reader: R, limit: usize) -> Self {
        BoundedLines { reader, limit, number: 0, finished: false }
    }
}

impl<R: std::io::BufRead> Iterator for BoundedLines<R> {
    type Item = anyhow::Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::BufRead;
        if self.finished {
            return None;
        }
        let mut line = Vec::new();
        // Room for the limit and a "\r\n": anything longer is too long whatever follows.
        let read = (&mut self.reader).take(self.limit as u64 + 2).read_until(b'\n', &mut line);
        let number = self.number + 1;
        let outcome = match read {
            Ok(0) => {
                self.finished = true;
                return None;
            }
            Err(error) => Err(anyhow!("line {number}: cannot read ({error})")),
            Ok(_) => {
                let ended = line.last() == Some(&b'\n');
                if ended {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                if line.len() > self.limit {
                    Err(anyhow!(
                        "line {number}: longer than {} bytes, the largest request sent (--max-frame-bytes)",
                        self.limit
                    ))
                } else {
                    String::from_utf8(line).map_err(|_| anyhow!("line {number}: not UTF-8"))
                }
            }
        };
        self.number = number;
        match outcome {
            Ok(line) => Some(Ok((number, line))),
            Err(error) => {
                self.finished = true;
                Some(Err(error))
            }
        }
    }
}

/// Bulk ids: each line is a JSON string, an object with "_id", or a bare id.
fn parse_bulk_ids(lines: impl Iterator<Item = anyhow::Result<(usize, String)>>) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for line in lines {
        let (line_number, line) = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let id = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::String(id)) => id,
            Ok(serde_json::Value::Object(object)) => match object.get("_id") {
                Some(serde_json::Value::String(id)) => id.clone(),
                _ => bail!("line {line_number}: the object has no \"_id\" string"),
            },
            Ok(serde_json::Value::Number(number)) => number.to_string(),
            Ok(_) => bail!("line {line_number}: expected an id"),
            Err(_) => line.to_string(),
        };
        if id.is_empty() {
            bail!("line {line_number}: empty id");
        }
        ids.push(id);
    }
    if ids.is_empty() {
        bail!("no ids in the input");
    }
    Ok(ids)
}

fn progress_bar(total: usize) -> indicatif::ProgressBar {
    // Draws on stderr only when it is a terminal.
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} documents ({rate}, eta {eta})") {
        let style = style.with_key("rate", |state: &indicatif::ProgressState, writer: &mut dyn std::fmt::Write| {
            let _ = write!(writer, "{:.0}/s", state.per_sec());
        });
        bar.set_style(style);
    }
    bar
}

/// Rewrites "document L" in a bulk load's error (the client names documents by their tags,
/// here line numbers) into "line L".
fn name_the_line(error: ClientError) -> anyhow::Error {
    if let ClientError::Remote { message, .. } = &error {
        if let Some(rest) = message.strip_prefix("document ") {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !digits.is_empty() {
                return anyhow!("line {digits}{}", &rest[digits.len()..]);
            }
        }
    }
    anyhow!(error)
}

/// Most invalid lines listed when a bulk file is refused.
const MAX_LISTED_INVALID_LINES: usize = 10;

/// A bulk input read twice, line by line (once to check it, once to send it): the file itself, or
/// stdin copied to a temporary file, removed when this is dropped. Memory stays independent of
/// the input's size.
struct BulkInput {
    path: std::path::PathBuf,
    remove_on_drop: bool,
}

impl BulkInput {
    fn open(file: Option<&Path>) -> anyhow::Result<BulkInput> {
        use std::os::unix::fs::OpenOptionsExt;
        match file {
            Some(path) if path != Path::new("-") => {
                std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
                Ok(BulkInput { path: path.to_path_buf(), remove_on_drop: false })
            }
            _ => {
                if std::io::stdin().is_terminal() {
                    eprintln!("reading from stdin (end with Ctrl-D)");
                }
                let path = std::env::temp_dir().join(format!(
                    "bayard-bulk-{}-{:016x}.ndjson",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                // Readable by this user only: the documents may be private.
                let mut spool = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let input = BulkInput { path, remove_on_drop: true };
                std::io::copy(&mut std::io::stdin().lock(), &mut spool).context("cannot read stdin")?;
                Ok(input)
            }
        }
    }

    /// Non-blank lines with their 1-based numbers, read as they are needed, each at most
    /// `limit` bytes.
    fn lines(&self, limit: usize) -> anyhow::Result<impl Iterator<Item = anyhow::Result<(usize, String)>>> {
        let file = std::fs::File::open(&self.path).with_context(|| format!("cannot read {}", self.path.display()))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        Ok(BoundedLines::new(reader, limit).filter(|line| !matches!(line, Ok((_, text)) if text.trim().is_empty())))
    }
}

impl Drop for BulkInput {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Checks every line of a bulk input (JSON object with an "_id", matching the node's schema)
/// before anything is sent: a file with one bad line is refused whole, so a load is never
/// applied in part because of its content. Returns the number of documents.
fn check_bulk_input(input: &BulkInput, schema_json: &str, line_limit: usize) -> anyhow::Result<usize> {
    let schema = crate::index::load_schema(schema_json).context("the node reported a schema that does not load")?;
    let mut invalid = Vec::new();
    let mut invalid_count = 0_usize;
    let mut count = 0_usize;
    for line in input.lines(line_limit)? {
        let (line_number, line) = line?;
        count += 1;
        if let Err(reason) = check_bulk_line(&schema, line.trim()) {
            invalid_count += 1;
            if invalid.len() < MAX_LISTED_INVALID_LINES {
                invalid.push(format!("line {line_number}: {reason}"));
            }
        }
    }
    if count == 0 {
        bail!("no documents in the input");
    }
    if invalid_count == 0 {
        return Ok(count);
    }
    let more = if invalid_count > invalid.len() {
        format!("\n({} more invalid lines not shown)", invalid_count - invalid.len())
    } else {
        String::new()
    };
    bail!(
        "{}{more}\nnothing was written: {invalid_count} of {count} lines are not valid documents for the node's \
         schema; fix them and load the file again",
        invalid.join("\n"),
    )
}

/// Why one NDJSON line is not a document the node would take.
fn check_bulk_line(schema: &tantivy::schema::Schema, line: &str) -> Result<String, String> {
    // The common case, a valid line, costs one parse; the reasons below only for a bad one.
    if let Ok(id) = crate::index::validate_document(schema, None, line) {
        return Ok(id);
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|error| format!("malformed JSON ({error})"))?;
    let Some(object) = value.as_object() else {
        return Err("expected a JSON object".into());
    };
    match object.get("_id") {
        Some(serde_json::Value::String(id)) if !id.is_empty() => {}
        _ => return Err("the document has no \"_id\" string".into()),
    }
    crate::index::validate_document(schema, None, line).map_err(|error| {
        let reason = error.to_string();
        reason.strip_prefix("invalid document: ").unwrap_or(&reason).to_string()
    })
}

/// "1-1000, 3001-4000": ranges of lines.
fn describe_line_ranges(ranges: &[(usize, usize)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(first, last)| if first == last { first.to_string() } else { format!("{first}-{last}") })
        .collect();
    parts.join(", ")
}

async fn bulk_put(connection: &ConnectionArguments, file: Option<&Path>) -> anyhow::Result<()> {
    let input = BulkInput::open(file)?;
    let client = connect(connection)?;
    let schema_json = serde_json::to_string(&client.schema().await?)?;
    let count = check_bulk_input(&input, &schema_json, connection.max_frame_bytes)?;
    let bar = progress_bar(count);
    // Checked above; a line that changed since is refused by the node, by its line number.
    let items = input.lines(connection.max_frame_bytes)?.map(|line| {
        let (line_number, line) = line.map_err(|error| ClientError::InvalidArgument(format!("{error:#}")))?;
        let line = line.trim().to_string();
        // Checked above: only its id is read again (a line changed since is refused by the
        // node, by its line number).
        let id = crate::client::document_id_of(&line);
        Ok::<_, ClientError>(bayard_item(id, line, line_number))
    });
    let outcome = client.bulk_put_stream(items, |written| bar.set_position(written as u64)).await;
    bar.finish_and_clear();
    match outcome {
        Ok(receipt) => {
            print_json(&receipt_json(receipt));
            Ok(())
        }
        Err(failure) => {
            // The node refused a request or none answered: say exactly what was applied.
            let certain = matches!(
                &failure.error,
                ClientError::InvalidArgument(_)
                    | ClientError::Remote { code: ErrorCode::InvalidArgument | ErrorCode::PermissionDenied, .. }
            );
            let error = name_the_line(failure.error);
            let failed = failure
                .failed_tags
                .map(|(first, last)| {
                    if certain {
                        format!("; the request of lines {first}-{last} was refused")
                    } else {
                        format!("; the request of lines {first}-{last} failed and may or may not have been applied")
                    }
                })
                .unwrap_or_default();
            let written = if failure.written_tags.is_empty() {
                "nothing was written".to_string()
            } else {
                format!(
                    "the documents of lines {} were written (requests in flight when the failure came were \
                     waited for)",
                    describe_line_ranges(&failure.written_tags)
                )
            };
            Err(error.context(format!("{written}{failed}; nothing after it was sent")))
        }
    }
}

fn bayard_item(id: String, line: String, line_number: usize) -> crate::client::BulkItem {
    crate::client::BulkItem { id, document: DocumentInput { id: None, document_json: line }, tag: line_number }
}

async fn bulk_delete(connection: &ConnectionArguments, file: Option<&Path>) -> anyhow::Result<()> {
    let input = BulkInput::open(file)?;
    let ids = parse_bulk_ids(input.lines(connection.max_frame_bytes)?)?;
    let client = connect(connection)?;
    let bar = progress_bar(ids.len());
    let receipt = client.bulk_delete(ids, |deleted| bar.set_position(deleted as u64)).await?;
    bar.finish_and_clear();
    print_json(&receipt_json(receipt));
    Ok(())
}

async fn run_client_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Put(arguments) => {
            if arguments.bulk {
                if arguments.document.is_some() {
                    bail!("--bulk reads NDJSON from --file or stdin, not from the command line");
                }
                return bulk_put(&arguments.connection, arguments.file.as_deref()).await;
            }
            let document = match (&arguments.document, &arguments.file) {
                (Some(_), Some(_)) => bail!("give the document either on the command line or with --file, not both"),
                (Some(document), None) => document.clone(),
                (None, file) => read_document(file.as_deref(), arguments.connection.max_frame_bytes)?,
            };
            let document = document.trim();
            if arguments.id.is_none() {
                let has_id = serde_json::from_str::<serde_json::Value>(document)
                    .ok()
                    .is_some_and(|value| value.get(crate::index::ID_FIELD).is_some());
                if !has_id {
                    bail!("the document has no id: give --id <id>, or an \"_id\" field in the document");
                }
            }
            let client = connect(&arguments.connection)?;
            let input = DocumentInput { id: arguments.id.clone(), document_json: document.to_string() };
            let receipt = client.put_documents(vec![input]).await.map_err(|error| match error {
                // One document: "document 1 (id `x`): unknown field …" says no more than "unknown field …".
                ClientError::Remote { message, .. } if message.starts_with("document 1") => {
                    match message.split_once(": ") {
                        Some((_, reason)) => anyhow!("invalid document: {reason}"),
                        None => anyhow!(message),
                    }
                }
                other => anyhow!(other),
            })?;
            print_json(&receipt_json(receipt));
        }
        Command::BulkPut(arguments) => bulk_put(&arguments.connection, arguments.file.as_deref()).await?,
        Command::Get(arguments) => {
            let client = connect(&arguments.connection)?;
            match client.get(&arguments.id).await? {
                Some(document) => print_json(&json!({"id": document.id, "fields": document.fields})),
                None => bail!("no document with id `{}`", arguments.id),
            }
        }
        Command::Delete(arguments) => {
            if arguments.bulk {
                return bulk_delete(&arguments.connection, arguments.file.as_deref()).await;
            }
            let Some(id) = &arguments.id else {
                bail!("give --id, or --bulk with --file");
            };
            let client = connect(&arguments.connection)?;
            // The committed index is what `get` sees; a put not committed yet is not counted.
            let existed = client.get(id).await?.is_some();
            let mut receipt = receipt_json(client.delete(id).await?);
            receipt["deleted"] = json!(u64::from(existed));
            if !existed {
                receipt["note"] = json!(format!("no committed document had the id `{id}`"));
            }
            print_json(&receipt);
        }
        Command::BulkDelete(arguments) => bulk_delete(&arguments.connection, arguments.file.as_deref()).await?,
        Command::Commit(connection) => print_json(&receipt_json(connect(&connection)?.commit().await?)),
        Command::Rollback(connection) => print_json(&receipt_json(connect(&connection)?.rollback().await?)),
        Command::Merge(connection) => print_json(&receipt_json(connect(&connection)?.merge().await?)),
        Command::Schema(connection) => print_json(&connect(&connection)?.schema().await?),
        Command::Status(connection) => print_json(&status_json(&connect(&connection)?.status().await?)),
        Command::Peers(connection) => {
            let peers = connect(&connection)?.peers().await?;
            let object: serde_json::Map<String, serde_json::Value> = peers
                .into_iter()
                .map(|(node_id, address)| (node_id.to_string(), serde_json::Value::String(address)))
                .collect();
            print_json(&serde_json::Value::Object(object));
        }
        Command::Leave(arguments) => {
            let client = connect(&arguments.connection)?;
            let Some(node_id) = arguments.id_flag.or(arguments.id) else {
                bail!("give the node to remove: `bayard leave 3` or `bayard leave --id 3`");
            };
            client.leave(node_id, arguments.force).await?;
            print_json(&json!({"status": "OK", "removed": node_id}));
        }
        Command::Search(arguments)
            if arguments.query_json.is_some() || arguments.aggs_json.is_some() || !arguments.highlight.is_empty() =>
        {
            let body = json_search_body(&arguments)?;
            let client = connect(&arguments.connection)?;
            print_json(&client.search_json(&body, arguments.consistency).await?);
        }
        Command::Keys(KeysCommand::Create(arguments)) => {
            let client = connect(&arguments.connection)?;
            let (record, secret) = client.create_key(&arguments.name, arguments.role, arguments.read_only).await?;
            print_json(&crate::http::rest::key_created_json(
                &record.id,
                &record.name,
                record.role,
                record.read_only,
                &secret,
            ));
        }
        Command::Keys(KeysCommand::List(connection)) => {
            let keys = connect(&connection)?.list_keys().await?;
            print_json(&json!({"keys": keys}));
        }
        Command::Keys(KeysCommand::Revoke(arguments)) => {
            let applied_index = connect(&arguments.connection)?.revoke_key(&arguments.id).await?;
            print_json(&json!({"status": "OK", "revoked": arguments.id, "applied_index": applied_index}));
        }
        Command::Search(arguments) => {
            let sort = arguments.sort.as_deref().map(parse_sort).transpose()?;
            let facets = arguments
                .facet_field
                .iter()
                .map(|field| FacetRequest { field: field.clone(), prefixes: arguments.facet_prefix.clone() })
                .collect();
            let request = SearchRequest {
                query: arguments.query.clone().unwrap_or_default(),
                from: arguments.from,
                limit: arguments.limit,
                exclude_count: arguments.exclude_count,
                exclude_docs: arguments.exclude_docs,
                facets,
                sort,
            };
            let client = connect(&arguments.connection)?;
            let result = client.search(request, arguments.consistency).await?;
            print_json(&serde_json::to_value(&result)?);
        }
        Command::Serve(_) | Command::Certs(_) => bail!("serve and certs are not client commands"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_and_argument_has_help() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if id != "help" && id != "version" && argument.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for subcommand in command.get_subcommands() {
                walk(subcommand, &format!("{path} {}", subcommand.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Arguments::command(), "bayard", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn legacy_forms_from_a_table() {
        let arguments = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let cases: &[(&str, Option<&str>)] = &[
            ("bayard serve --raft-port=7001", Some("use --port")),
            ("bayard serve --index-port 5001", Some("use --port")),
            ("bayard serve --peer-raft-address=0.0.0.0:7001", Some("use --peers")),
            ("bayard serve 1", Some("serve --id 1")),
            ("bayard serve --data-directory ./data 3", Some("serve --id 3")),
            ("bayard serve --data-directory 3", None),
            ("bayard serve --id 1", None),
            ("bayard search 1", None),
            ("bayard status --servers x", None),
            ("bayard --host=0.0.0.0 1", Some("bayard serve --id 1")),
            ("bayard start 2", Some("bayard serve --id 2")),
        ];
        for (line, hint) in cases {
            let found = legacy_hint(&arguments(line));
            match hint {
                Some(hint) => assert!(found.as_deref().is_some_and(|found| found.contains(hint)), "{line}: {found:?}"),
                None => assert!(found.is_none(), "{line}: {found:?}"),
            }
        }
    }

    #[test]
    fn hosts_alone_get_the_default_port() {
        let cases = [
            ("localhost", "localhost:5001"),
            ("10.0.0.1", "10.0.0.1:5001"),
            ("search-1:7000", "search-1:7000"),
            ("[::1]:5002", "[::1]:5002"),
            ("::1", "[::1]:5001"),
            ("[::1]", "[::1]:5001"),
            ("", ""),
        ];
        for (given, expected) in cases {
            assert_eq!(with_default_port(given), expected, "{given}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn peers_parse() {
        assert_eq!(parse_peers("").unwrap(), Peers(vec![]));
        assert_eq!(
            parse_peers("1=0.0.0.0:5001, 2=host-b:5002").unwrap(),
            Peers(vec![(1, "0.0.0.0:5001".into()), (2, "host-b:5002".into())])
        );
        assert!(parse_peers("1:host:5001").is_err());
        assert!(parse_peers("x=host:5001").is_err());
        assert!(parse_peers("1=host").is_err());
    }

    #[test]
    fn sort_specs_parse() {
        assert_eq!(parse_sort("year:desc").unwrap(), SortSpec { field: "year".into(), descending: true });
        assert_eq!(parse_sort("year").unwrap(), SortSpec { field: "year".into(), descending: false });
        assert!(parse_sort("year:sideways").is_err());
        assert!(parse_sort(":desc").is_err());
    }

    #[test]
    fn ndjson_errors_name_the_line() {
        let directory = std::env::temp_dir().join(format!("bayard-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let write = |name: &str, text: &str| {
            let path = directory.join(name);
            std::fs::write(&path, text).unwrap();
            BulkInput::open(Some(&path)).unwrap()
        };
        let schema = crate::index::DEFAULT_SCHEMA_JSON;
        let error = check_bulk_input(&write("broken", "{\"_id\":\"1\"}\n\n{oops}\n"), schema, 1 << 20).unwrap_err();
        assert!(error.to_string().starts_with("line 3: malformed JSON"), "{error}");
        let error = check_bulk_input(&write("no-id", "{\"title\":\"x\"}"), schema, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("no \"_id\""), "{error}");
        let error = check_bulk_input(&write("empty", "\n\n"), schema, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("no documents"), "{error}");
        let good = write("good", "{\"_id\":\"1\"}\n\n{\"_id\":\"2\"}");
        assert_eq!(check_bulk_input(&good, schema, 1 << 20).unwrap(), 2);
        let lines: Vec<usize> = good.lines(1 << 20).unwrap().map(|line| line.unwrap().0).collect();
        assert_eq!(lines, vec![1, 3]);
        assert_eq!(describe_line_ranges(&[(1, 1000), (3001, 3001)]), "1-1000, 3001");
        let ids = BoundedLines::new("\"a\"\n{\"_id\":\"b\"}\n\n c \n7".as_bytes(), 16);
        assert_eq!(parse_bulk_ids(ids).unwrap(), vec!["a", "b", "c", "7"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// Lines up to the limit pass whatever ends them; one byte more is refused by its number, and
    /// nothing after it is read.
    #[test]
    fn bounded_lines_refuse_a_line_past_the_limit() {
        type Lines = Vec<Result<(usize, String), String>>;
        let lines = |text: &str, limit: usize| -> Lines {
            BoundedLines::new(text.as_bytes(), limit).map(|line| line.map_err(|error| error.to_string())).collect()
        };
        let ok = |number: usize, text: &str| Ok((number, text.to_string()));
        let too_long = |number: usize| {
            Err(format!("line {number}: longer than 4 bytes, the largest request sent (--max-frame-bytes)"))
        };
        let cases: &[(&str, Lines)] = &[
            ("", vec![]),
            ("abcd", vec![ok(1, "abcd")]),
            ("abcd\n", vec![ok(1, "abcd")]),
            ("abcd\r\n\nxy", vec![ok(1, "abcd"), ok(2, ""), ok(3, "xy")]),
            ("abcde", vec![too_long(1)]),
            ("abcde\n", vec![too_long(1)]),
            ("ab\nabcde\r\nnever read\n", vec![ok(1, "ab"), too_long(2)]),
            ("abcdefghijklmnop\nx", vec![too_long(1)]),
            ("ab\r\r\n", vec![ok(1, "ab\r")]),
        ];
        for (text, expected) in cases {
            assert_eq!(&lines(text, 4), expected, "{text:?}");
        }
        let not_utf8 = BoundedLines::new(&b"ok\n\xff\n"[..], 4).map(|line| line.map_err(|error| error.to_string()));
        assert_eq!(not_utf8.collect::<Vec<_>>(), vec![ok(1, "ok"), Err("line 2: not UTF-8".to_string())]);
    }
}
