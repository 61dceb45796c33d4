//! Prometheus metrics, all named `bayard_*`, in one process-wide registry.
//!
//! The recording functions are cheap (atomics, plus a read lock on the label map) and never
//! block on I/O, so they can be called on any request path. [`render`] produces the OpenMetrics
//! text that `/metrics` serves.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::TelemetryError;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request latencies: from half a millisecond (a local read) to the longest request timeout.
const REQUEST_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Index commits: an fsync at least, minutes at worst for a large merge.
const COMMIT_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    request: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestKindLabels {
    kind: String,
    request: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FollowerLabels {
    node: u64,
    follower: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RequestKindLabels>,
    raft_term: Family<NodeLabels, Gauge>,
    raft_leader_id: Family<NodeLabels, Gauge>,
    raft_is_leader: Family<NodeLabels, Gauge>,
    raft_last_log_index: Family<NodeLabels, Gauge>,
    raft_commit_index: Family<NodeLabels, Gauge>,
    raft_applied_index: Family<NodeLabels, Gauge>,
    raft_replication_lag: Family<FollowerLabels, Gauge>,
    index_documents: Gauge,
    index_segments: Gauge,
    index_commit_duration: Histogram,
    quic_connections: Family<DirectionLabels, Gauge>,
    quic_connections_opened: Family<DirectionLabels, Counter>,
    quic_streams: Family<KindLabels, Counter>,
    quic_sent_bytes: Counter,
    quic_received_bytes: Counter,
    quic_lost_packets: Counter,
    membership_members: Family<StateLabels, Gauge>,
    refused_connections: Family<ReasonLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    refused_raft_messages: Family<ReasonLabels, Counter>,
    disk_full: Gauge,
    duplicate_requests: Counter,
    remembered_requests: Gauge,
    requests_forgotten_early: Counter,
    write_group_requests: Histogram,
    election_assists: Family<ReasonLabels, Counter>,
    raft_log_memory_bytes: Family<NodeLabels, Gauge>,
    raft_log_reads_from_memory: Counter,
    raft_log_reads_from_file: Counter,
    /// Followers each node last reported a lag for, so that series of followers that left (or of
    /// a node that lost leadership) disappear instead of freezing at their last value.
    lag_followers: Mutex<HashMap<u64, BTreeSet<u64>>>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bayard");
        let requests = Family::default();
        registry.register("requests", "Requests handled, by stream kind, request and outcome", requests.clone());
        let request_duration: HistogramFamily<RequestKindLabels> = Family::new_with_constructor(request_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from reading a request to writing its answer",
            Unit::Seconds,
            request_duration.clone(),
        );

        let raft_term = Family::default();
        registry.register("raft_term", "Current Raft term", raft_term.clone());
        let raft_leader_id = Family::default();
        registry.register("raft_leader_id", "Leader this node knows of (-1: none)", raft_leader_id.clone());
        let raft_is_leader = Family::default();
        registry.register("raft_is_leader", "1 when this node is the Raft leader", raft_is_leader.clone());
        let raft_last_log_index = Family::default();
        registry.register("raft_last_log_index", "Last index in this node's Raft log", raft_last_log_index.clone());
        let raft_commit_index = Family::default();
        registry.register(
            "raft_commit_index",
            "Last Raft index this node knows is committed",
            raft_commit_index.clone(),
        );
        let raft_applied_index = Family::default();
        registry.register("raft_applied_index", "Last Raft index applied to the index", raft_applied_index.clone());
        let raft_replication_lag = Family::default();
        registry.register(
            "raft_replication_lag",
            "Log entries a follower is behind the leader's log (reported by the leader)",
            raft_replication_lag.clone(),
        );

        let index_documents = Gauge::default();
        registry.register("index_documents", "Documents in the searchable index", index_documents.clone());
        let index_segments = Gauge::default();
        registry.register("index_segments", "Segments in the searchable index", index_segments.clone());
        let index_commit_duration = Histogram::new(COMMIT_BUCKETS);
        registry.register_with_unit(
            "index_commit_duration",
            "Time to commit the index writer",
            Unit::Seconds,
            index_commit_duration.clone(),
        );

        let quic_connections = Family::default();
        registry.register("quic_connections", "Open QUIC connections", quic_connections.clone());
        let quic_connections_opened = Family::default();
        registry.register("quic_connections_opened", "QUIC connections established", quic_connections_opened.clone());
        let quic_streams = Family::default();
        registry.register("quic_streams", "QUIC streams served, by stream kind", quic_streams.clone());
        let quic_sent_bytes = Counter::default();
        registry.register_with_unit("quic_sent", "UDP payload bytes sent", Unit::Bytes, quic_sent_bytes.clone());
        let quic_received_bytes = Counter::default();
        registry.register_with_unit(
            "quic_received",
            "UDP payload bytes received",
            Unit::Bytes,
            quic_received_bytes.clone(),
        );
        let quic_lost_packets = Counter::default();
        registry.register("quic_lost_packets", "QUIC packets declared lost", quic_lost_packets.clone());

        let membership_members = Family::default();
        registry.register("membership_members", "Cluster members by state", membership_members.clone());
        let refused_connections = Family::default();
        registry.register("refused_connections", "Connections refused, by reason", refused_connections.clone());
        let limit_refusals = Family::default();
        registry.register(
            "limit_refusals",
            "Requests and connections refused because a limit was reached, by limit",
            limit_refusals.clone(),
        );
        let refused_raft_messages = Family::default();
        registry.register(
            "refused_raft_messages",
            "Raft messages refused (sender not a member, implausible content), by reason",
            refused_raft_messages.clone(),
        );
        let disk_full = Gauge::default();
        registry.register(
            "disk_full",
            "1 while free space in the data directory is under --min-free-disk-mb and writes are refused",
            disk_full.clone(),
        );

        let duplicate_requests = Counter::default();
        registry.register(
            "duplicate_requests",
            "Log entries of a retried client request that had been applied before, so changed nothing",
            duplicate_requests.clone(),
        );

        let remembered_requests = Gauge::default();
        registry.register(
            "remembered_requests",
            "Client request ids the state machine remembers, so that a retry of one is applied at most once",
            remembered_requests.clone(),
        );
        let requests_forgotten_early = Counter::default();
        registry.register(
            "requests_forgotten_early",
            "Request ids forgotten before their retention (120 s of log time) because the table was full: a retry of \
             one arriving later could be applied twice",
            requests_forgotten_early.clone(),
        );

        let write_group_requests = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]);
        registry.register(
            "write_group_requests",
            "Client requests carried by one Raft entry the leader proposed (group commit)",
            write_group_requests.clone(),
        );

        let election_assists = Family::default();
        registry.register(
            "election_assists",
            "Elections this node started before its own timer, by rule (longer_log: it refused a candidate with a \
             shorter log; collision: a peer with a shorter log campaigned at the same term; leader_silent: no \
             leader heard from for the lease and an election timeout)",
            election_assists.clone(),
        );

        let raft_log_memory_bytes = Family::default();
        registry.register(
            "raft_log_memory_bytes",
            "Bytes of the newest Raft log entries kept in memory for reading back (at most 16 MiB; given back once \
             applied and, on the leader, held by every follower and learner)",
            raft_log_memory_bytes.clone(),
        );

        let raft_log_reads: Family<SourceLabels, Counter> = Family::default();
        registry.register(
            "raft_log_reads",
            "Reads of Raft log entries (to apply, to replicate), by where they were answered from: memory (the \
             newest entries, kept as appended) or file (read from the log file and decoded)",
            raft_log_reads.clone(),
        );
        // Both series exist from the start, and a read counts without building a label.
        let raft_log_reads_from_memory =
            raft_log_reads.get_or_create(&SourceLabels { source: "memory".into() }).clone();
        let raft_log_reads_from_file = raft_log_reads.get_or_create(&SourceLabels { source: "file".into() }).clone();

        let build_info: Family<VersionLabels, Gauge> = Family::default();
        registry.register("build_info", "Always 1; the version is a label", build_info.clone());
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);

        Metrics {
            registry,
            requests,
            request_duration,
            raft_term,
            raft_leader_id,
            raft_is_leader,
            raft_last_log_index,
            raft_commit_index,
            raft_applied_index,
            raft_replication_lag,
            index_documents,
            index_segments,
            index_commit_duration,
            quic_connections,
            quic_connections_opened,
            quic_streams,
            quic_sent_bytes,
            quic_received_bytes,
            quic_lost_packets,
            membership_members,
            refused_connections,
            limit_refusals,
            refused_raft_messages,
            disk_full,
            duplicate_requests,
            remembered_requests,
            requests_forgotten_early,
            write_group_requests,
            election_assists,
            raft_log_memory_bytes,
            raft_log_reads_from_memory,
            raft_log_reads_from_file,
            lag_followers: Mutex::new(HashMap::new()),
        }
    }
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Gauges are i64; indexes and counts beyond that do not occur, and saturating beats wrapping.
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// All metrics as OpenMetrics text (which Prometheus scrapes), ending with `# EOF`.
pub fn render() -> Result<String, TelemetryError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics().registry)?;
    Ok(text)
}

/// One request done. `kind` is the stream kind (`client`, `admin`, `raft`), `request` the request
/// name, `outcome` `ok` or the error code in snake case; all three must come from a small fixed
/// set (never user input), as each combination is a time series.
pub fn record_request(kind: &str, request: &str, outcome: &str, duration: Duration) {
    let metrics = metrics();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            kind: kind.to_string(),
            request: request.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
    metrics
        .request_duration
        .get_or_create(&RequestKindLabels { kind: kind.to_string(), request: request.to_string() })
        .observe(duration.as_secs_f64());
}

/// Sets the Raft gauges of `node_id` from openraft's metrics (call on every change of
/// `raft.metrics()`): term, leader, last log index, applied index, and on the leader the
/// replication lag of each follower (`last_log_index - matched index`).
pub fn update_from_raft_metrics<N: openraft::Node>(node_id: u64, raft: &RaftMetrics<u64, N>) {
    let metrics = metrics();
    let node = NodeLabels { node: node_id };
    metrics.raft_term.get_or_create(&node).set(gauge_value(raft.current_term));
    metrics.raft_leader_id.get_or_create(&node).set(raft.current_leader.map(gauge_value).unwrap_or(-1));
    metrics.raft_is_leader.get_or_create(&node).set(i64::from(raft.state == ServerState::Leader));
    metrics.raft_last_log_index.get_or_create(&node).set(raft.last_log_index.map(gauge_value).unwrap_or(-1));
    metrics
        .raft_applied_index
        .get_or_create(&node)
        .set(raft.last_applied.map(|log_id| gauge_value(log_id.index)).unwrap_or(-1));

    // Lags compare lengths (index + 1), so that "nothing replicated yet" and "index 0" differ.
    let log_length = raft.last_log_index.map(|index| index + 1).unwrap_or(0);
    let mut reported = BTreeSet::new();
    if let Some(replication) = &raft.replication {
        for (follower, matched) in replication {
            if *follower == node_id {
                continue;
            }
            let matched_length = matched.map(|log_id| log_id.index + 1).unwrap_or(0);
            let lag = log_length.saturating_sub(matched_length);
            metrics
                .raft_replication_lag
                .get_or_create(&FollowerLabels { node: node_id, follower: *follower })
                .set(gauge_value(lag));
            reported.insert(*follower);
        }
    }
    // A poisoned lock only means another thread panicked while updating this map; the map
    // itself is still consistent enough to go on with.
    let mut lag_followers = metrics.lag_followers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let previous = lag_followers.insert(node_id, reported.clone()).unwrap_or_default();
    for gone in previous.difference(&reported) {
        metrics.raft_replication_lag.remove(&FollowerLabels { node: node_id, follower: *gone });
    }
}

/// The commit index `node_id` knows of (openraft's metrics do not carry it; the log store learns
/// it in `save_committed`).
pub fn set_raft_commit_index(node_id: u64, committed: Option<u64>) {
    metrics()
        .raft_commit_index
        .get_or_create(&NodeLabels { node: node_id })
        .set(committed.map(gauge_value).unwrap_or(-1));
}

/// Readiness as `/readyz` means it: a leader is known, Raft runs, and everything this node knows
/// to be committed is applied. `committed` is the commit index the node knows (`None`: unknown,
/// then only the leader is checked).
pub fn raft_readiness<N: openraft::Node>(raft: &RaftMetrics<u64, N>, committed: Option<u64>) -> Result<(), String> {
    if let Err(fatal) = &raft.running_state {
        return Err(format!("raft stopped: {fatal}"));
    }
    if raft.state == ServerState::Shutdown {
        return Err("raft is shut down".to_string());
    }
    if raft.current_leader.is_none() {
        return Err("no leader is known".to_string());
    }
    let applied = raft.last_applied.map(|log_id| log_id.index);
    if let Some(committed) = committed {
        if applied.is_none_or(|applied| applied < committed) {
            let applied = applied.map(|index| index.to_string()).unwrap_or_else(|| "nothing".to_string());
            return Err(format!("applied {applied}, behind the commit index {committed}"));
        }
    }
    Ok(())
}

/// Index size after a commit or reload.
pub fn set_index_stats(documents: u64, segments: u64) {
    let metrics = metrics();
    metrics.index_documents.set(gauge_value(documents));
    metrics.index_segments.set(gauge_value(segments));
}

/// One index writer commit took `duration`.
pub fn record_index_commit(duration: Duration) {
    metrics().index_commit_duration.observe(duration.as_secs_f64());
}

/// An election started early by the election assist (`raft::election`), by rule.
pub fn record_election_assist(rule: &str) {
    metrics().election_assists.get_or_create(&ReasonLabels { reason: rule.to_string() }).inc();
}

/// One log entry skipped because its request id had been applied before.
pub fn record_duplicate_request() {
    metrics().duplicate_requests.inc();
}

/// How many request ids the state machine remembers now.
pub fn set_remembered_requests(count: usize) {
    metrics().remembered_requests.set(count as i64);
}

/// One request id forgotten before its retention because the table was full.
pub fn record_request_forgotten_early() {
    metrics().requests_forgotten_early.inc();
}

/// One Raft entry proposed by the leader's group commit, carrying `requests` client requests.
pub fn record_write_group(requests: usize) {
    metrics().write_group_requests.observe(requests as f64);
}

/// Bytes of Raft log entries node `node_id` keeps in memory for reading back.
pub fn set_raft_log_memory_bytes(node_id: u64, bytes: usize) {
    metrics().raft_log_memory_bytes.get_or_create(&NodeLabels { node: node_id }).set(gauge_value(bytes as u64));
}

/// One read of Raft log entries, answered from memory (the newest entries,
/// `raft::recent_entries`) or from the file (redb, decoded).
pub fn record_log_read(from_memory: bool) {
    let metrics = metrics();
    if from_memory {
        metrics.raft_log_reads_from_memory.inc();
    } else {
        metrics.raft_log_reads_from_file.inc();
    }
}

/// One stream accepted, by stream kind (`client`, `admin`, `raft`).
pub fn record_stream(kind: &str) {
    metrics().quic_streams.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
}

/// One connection refused. `reason` comes from a fixed set: `handshake_timeout`, `handshake`,
/// `identity`, `permission`, ...
pub fn record_refused_connection(reason: &str) {
    metrics().refused_connections.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
}

/// One request or connection refused because `limit` (a fixed name, e.g. `connections`,
/// `concurrent_searches`, `query_bytes`) was reached.
pub fn record_limit_refusal(limit: &str) {
    metrics().limit_refusals.get_or_create(&LimitLabels { limit: limit.to_string() }).inc();
}

/// One Raft message refused; `reason` is `not_a_member` or `implausible`.
pub fn record_refused_raft_message(reason: &str) {
    metrics().refused_raft_messages.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc();
}

/// Whether writes are refused for lack of disk space.
pub fn set_disk_full(full: bool) {
    metrics().disk_full.set(i64::from(full));
}

/// Sets the member count of every state and removes states not listed (a state with no member
/// left should not keep its last count).
pub fn set_membership_members<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) {
    let family = &metrics().membership_members;
    family.clear();
    for (state, count) in counts {
        family.get_or_create(&StateLabels { state: state.to_string() }).set(gauge_value(count));
    }
}

/// Which side opened a QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionDirection {
    /// Accepted by this node.
    Inbound,
    /// Dialled by this node (Raft, forwarding) or by a client.
    Outbound,
}

impl ConnectionDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionDirection::Inbound => "inbound",
            ConnectionDirection::Outbound => "outbound",
        }
    }
}

/// Metrics of one QUIC connection: counts it open while alive and turns quinn's cumulative
/// [`quinn::ConnectionStats`] into the byte and loss counters.
///
/// Create it when the connection is established, call [`ConnectionMetrics::observe`] with
/// `connection.stats()` from time to time (after each stream, and once when the connection ends),
/// and drop it when the connection ends.
#[derive(Debug)]
pub struct ConnectionMetrics {
    direction: ConnectionDirection,
    sent: AtomicU64,
    received: AtomicU64,
    lost: AtomicU64,
}

impl ConnectionMetrics {
    pub fn open(direction: ConnectionDirection) -> ConnectionMetrics {
        let metrics = metrics();
        let labels = DirectionLabels { direction: direction.as_str().to_string() };
        metrics.quic_connections.get_or_create(&labels).inc();
        metrics.quic_connections_opened.get_or_create(&labels).inc();
        ConnectionMetrics { direction, sent: AtomicU64::new(0), received: AtomicU64::new(0), lost: AtomicU64::new(0) }
    }

    /// Adds what the connection sent, received and lost since the last call.
    pub fn observe(&self, stats: &quinn::ConnectionStats) {
        let metrics = metrics();
        // fetch_max keeps concurrent observers from counting the same bytes twice.
        let add = |seen: &AtomicU64, total: u64, counter: &Counter| {
            let previous = seen.fetch_max(total, Ordering::Relaxed);
            if total > previous {
                counter.inc_by(total - previous);
            }
        };
        add(&self.sent, stats.udp_tx.bytes, &metrics.quic_sent_bytes);
        add(&self.received, stats.udp_rx.bytes, &metrics.quic_received_bytes);
        add(&self.lost, stats.path.lost_packets, &metrics.quic_lost_packets);
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        let labels = DirectionLabels { direction: self.direction.as_str().to_string() };
        metrics().quic_connections.get_or_create(&labels).dec();
    }
}
