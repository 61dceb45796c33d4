//! The attacks of the hardening issue, each against a real node over QUIC + mutual TLS, each
//! followed by the honest client being served. A node certificate whose node is not a member, a
//! member sending nonsense, a client sending what no client library would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bayard::client::ClientOptions;
use bayard::index::{FacetRequest, IndexOperation};
use bayard::protocol::{
    ClientRequest, ClientResponse, Consistency, ErrorCode, RaftRequest, RaftResponse, StreamHeader, StreamKind,
    WireError,
};
use bayard::raft::types::{Entry, IndexBatch, LogId, MemberNode, SnapshotMeta, StoredMembership, Vote};
use bayard::transport::{self, Role};
use common::{
    call_raw, eventually, node_config, node_with_one_document, query, raw_connection_with, remote_error as remote,
    start_node, CertificateSet, TestCluster, TestNode,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, Membership};

async fn assert_serves_the_honest_client(test: &TestNode) {
    common::assert_still_serving(test).await;
    let client = test.client();
    let hits = client.search(query("title:still"), Consistency::Local).await.expect("search served");
    assert_eq!(hits.count, Some(1));
    client.put("honest", r#"{"title":"honest write"}"#).await.expect("writes served");
}

fn metric_value(name: &str, label: &str) -> f64 {
    let text = bayard::telemetry::metrics::render().unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// --- 1. a query that overflowed the stack -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_and_oversized_queries_are_refused_before_parsing() {
    let test = node_with_one_document().await;
    let client = test.client();
    // 3,000 `(` used to overflow a runtime thread's stack and abort the process; 2,000 did not.
    for depth in [3_000, 2_000, 33] {
        for balanced in [true, false] {
            let text = format!("{}a{}", "(".repeat(depth), if balanced { ")".repeat(depth) } else { String::new() });
            let (code, message) = remote(client.search(query(&text), Consistency::Local).await.unwrap_err());
            assert_eq!(code, ErrorCode::InvalidQuery, "{message}");
            assert!(message.contains("--max-query-depth"), "{message}");
        }
    }
    // Quotes of any kind do not hide nesting from the bound (tantivy parses `'…'` phrases and
    // `/…/` regexes too).
    for prefix in ["'\"' ", "title:/\"/ ", "\" ", "NOT "] {
        let text = format!("{prefix}{}a{}", "(".repeat(3_000), ")".repeat(3_000));
        let (code, message) = remote(client.search(query(&text), Consistency::Local).await.unwrap_err());
        assert_eq!(code, ErrorCode::InvalidQuery, "{prefix}: {message}");
    }
    let negations = format!("{}a", "NOT ".repeat(1_000));
    let (_, message) = remote(client.search(query(&negations), Consistency::Local).await.unwrap_err());
    assert!(message.contains("--max-query-depth"), "{message}");
    // The deepest allowed nesting still parses and runs.
    let allowed = format!("{}still{}", "(".repeat(32), ")".repeat(32));
    assert_eq!(client.search(query(&allowed), Consistency::Local).await.unwrap().count, Some(1));

    // 120k OR terms, 1.2 MB: refused by its length, without the 790 MB it used to cost.
    let huge = vec!["term"; 120_000].join(" OR ");
    let (code, message) = remote(client.search(query(&huge), Consistency::Local).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidQuery);
    assert!(message.contains("--max-query-bytes"), "{message}");
    // Short terms under the length limit, over the term limit.
    let many = vec!["a"; 2_000].join(" ");
    let (_, message) = remote(client.search(query(&many), Consistency::Local).await.unwrap_err());
    assert!(message.contains("--max-query-terms"), "{message}");
    // 10,000 facet prefixes (5.8 s of CPU before).
    let mut faceted = query("*");
    faceted.facets = vec![FacetRequest {
        field: "category".into(),
        prefixes: (0..10_000).map(|number| format!("/c{number}")).collect(),
    }];
    let (code, message) = remote(client.search(faceted, Consistency::Local).await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("--max-facet-prefixes"), "{message}");
    assert!(metric_value("bayard_limit_refusals_total", "limit=\"query_size\"") >= 1.0);
    assert_serves_the_honest_client(&test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_past_its_time_budget_stops_with_deadline_exceeded() {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.limits.search_timeout = Duration::ZERO;
    let node = start_node(config).await;
    let client = common::client_with(&node.local_address().to_string(), certificates.client("app"));
    client.put("a", r#"{"title":"budget"}"#).await.unwrap();
    client.commit().await.unwrap();
    let (code, message) = remote(client.search(query("title:budget"), Consistency::Local).await.unwrap_err());
    assert_eq!(code, ErrorCode::DeadlineExceeded, "{message}");
    assert!(message.contains("--search-timeout"), "{message}");
    // Reads that are not searches are served.
    assert!(client.get("a").await.unwrap().is_some());
    node.shutdown().await;
}

// --- 2. raft traffic from a node that is not a member ------------------------------------------

fn log_id(term: u64, leader: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, leader), index)
}

fn refused_as_non_member<T: std::fmt::Debug>(answer: Result<Result<T, WireError>, transport::CallError>) {
    let error = answer.expect("the node answers").expect_err("the message is refused");
    assert_eq!(error.code, ErrorCode::PermissionDenied, "{}", error.message);
    assert!(error.message.contains("not a member"), "{}", error.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_from_a_node_that_never_joined_change_nothing() {
    let test = node_with_one_document().await;
    let term_before = test.node.raft().metrics().borrow().current_term;
    // A certificate for node 99, signed by the cluster CA, for a node that never joined.
    let attacker = raw_connection_with(&test.certificates.node(99), &test.address()).await;

    // A vote of term u64::MAX (granted before, then openraft panicked, and again at every start).
    let vote = RaftRequest::Vote(VoteRequest {
        vote: Vote::new(u64::MAX, 99),
        last_log_id: Some(log_id(u64::MAX, 99, 1 << 40)),
    });
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &vote).await);

    // A membership without this node (it used to record itself as removed, for good).
    let membership = Membership::new(vec![BTreeSet::from([99])], BTreeMap::from([(99, MemberNode::new("x:1", 1))]));
    let remove_me = RaftRequest::AppendEntries(AppendEntriesRequest {
        vote: Vote::new_committed(term_before + 1, 99),
        prev_log_id: None,
        entries: vec![Entry { log_id: log_id(term_before + 1, 99, 0), payload: EntryPayload::Membership(membership) }],
        leader_commit: Some(log_id(term_before + 1, 99, 0)),
    });
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &remove_me).await);

    // A put (it used to be injected).
    let last = test.node.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let put =
        IndexOperation::Put { id: "injected".into(), document_json: r#"{"_id":"injected","title":"pwned"}"#.into() };
    let inject = RaftRequest::AppendEntries(AppendEntriesRequest {
        vote: Vote::new_committed(term_before + 1, 99),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: log_id(term_before + 1, 99, last + 1),
            payload: EntryPayload::Normal(std::sync::Arc::new(IndexBatch::internal(vec![put, IndexOperation::Commit]))),
        }],
        leader_commit: Some(log_id(term_before + 1, 99, last + 1)),
    });
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &inject).await);

    // A snapshot whose id climbs out of the data directory.
    let snapshot = RaftRequest::InstallSnapshot(InstallSnapshotRequest {
        vote: Vote::new_committed(term_before + 1, 99),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(term_before + 1, 99, 1_000)),
            last_membership: StoredMembership::default(),
            snapshot_id: "../../../pwned".into(),
        },
        offset: 0,
        data: b"BAYSNAP1 not really".to_vec(),
        done: true,
    });
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &snapshot).await);

    // A proposal (writes forwarded by a follower) and a removal notice.
    let propose = RaftRequest::Propose(IndexBatch::internal(vec![IndexOperation::Rollback]));
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &propose).await);
    let incarnation =
        test.node.raft().metrics().borrow().membership_config.membership().get_node(&1).unwrap().incarnation;
    let notice = bayard::protocol::AdminRequest::Removed { node_id: 1, incarnation };
    refused_as_non_member(call_raw::<_, bayard::protocol::AdminResponse>(&attacker, StreamKind::Admin, &notice).await);

    // Nothing changed: still the leader of its term, no document injected, nothing written
    // outside the data directory, the honest client served.
    let metrics = test.node.raft().metrics().borrow().clone();
    assert_eq!(metrics.state, openraft::ServerState::Leader);
    assert_eq!(metrics.current_term, term_before);
    let client = test.client();
    client.commit().await.unwrap();
    assert!(client.get("injected").await.unwrap().is_none());
    for directory in [test.data.path().to_path_buf(), test.data.path().parent().unwrap().to_path_buf()] {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("pwned"), "{name} was written in {}", directory.display());
        }
    }
    assert!(metric_value("bayard_refused_raft_messages_total", "reason=\"not_a_member\"") >= 6.0);
    assert_serves_the_honest_client(&test).await;

    // And it starts again and leads (a granted vote of u64::MAX was persisted: a permanent brick).
    let TestNode { certificates, data, node } = test;
    node.shutdown().await;
    let node = start_node(node_config(&certificates, 1, data.path())).await;
    let test = TestNode { certificates, data, node };
    assert!(
        eventually(Duration::from_secs(20), || async {
            test.client().status().await.is_ok_and(|status| status.role == "leader")
        })
        .await,
        "the restarted node leads again"
    );
    assert_serves_the_honest_client(&test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_sending_nonsense_cannot_make_openraft_panic_or_write_outside() {
    let test = node_with_one_document().await;
    let term_before = test.node.raft().metrics().borrow().current_term;
    // The certificate of a member (this node's own id: the only member of a one-node cluster).
    let member = raw_connection_with(&test.certificates.node(1), &test.address()).await;
    let implausible = |answer: Result<Result<RaftResponse, WireError>, transport::CallError>, what: &str| {
        let error = answer.expect("the node answers").expect_err("refused");
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{}", error.message);
        assert!(error.message.contains(what), "{}", error.message);
    };
    let vote = RaftRequest::Vote(VoteRequest { vote: Vote::new(u64::MAX, 1), last_log_id: None });
    implausible(call_raw(&member, StreamKind::Raft, &vote).await, "implausible");
    let gap = RaftRequest::AppendEntries(AppendEntriesRequest {
        vote: Vote::new_committed(term_before, 1),
        prev_log_id: Some(log_id(term_before, 1, 1)),
        entries: vec![Entry { log_id: log_id(term_before, 1, 7), payload: EntryPayload::Blank }],
        leader_commit: None,
    });
    implausible(call_raw(&member, StreamKind::Raft, &gap).await, "does not follow");
    let escape = RaftRequest::InstallSnapshot(InstallSnapshotRequest {
        vote: Vote::new_committed(term_before, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(term_before, 1, 1)),
            last_membership: StoredMembership::default(),
            snapshot_id: "../../outside".into(),
        },
        offset: 0,
        data: vec![0; 16],
        done: true,
    });
    implausible(call_raw(&member, StreamKind::Raft, &escape).await, "snapshot id");
    let metrics = test.node.raft().metrics().borrow().clone();
    assert_eq!(metrics.state, openraft::ServerState::Leader);
    assert_eq!(metrics.current_term, term_before);
    assert!(metrics.running_state.is_ok());
    // `../../outside` from the snapshot directory would be the data directory itself.
    for directory in [test.data.path(), test.data.path().parent().unwrap()] {
        assert!(!directory.join("outside.snap").exists(), "a file landed in {}", directory.display());
    }
    assert_serves_the_honest_client(&test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_membership_change_admits_the_new_member_once_a_member_vouches() {
    let mut cluster = TestCluster::with_three_voters().await;
    // Node 3 is down while node 4 joins: node 3's log knows nothing of node 4.
    let address_of_3: std::net::SocketAddr = cluster.address(3).parse().unwrap();
    cluster.stop(3).await;
    cluster.start(4, Some(1)).await;
    cluster.wait_for_voters(1, &[1, 2, 3, 4], Duration::from_secs(30)).await;
    cluster.client_of(1).put("after", r#"{"title":"written while node 3 was down"}"#).await.unwrap();
    cluster.client_of(1).commit().await.unwrap();
    // Nodes 1 and 2 stop; node 3 comes back (on its port) with its old membership {1, 2, 3}.
    let address_of_2: std::net::SocketAddr = cluster.address(2).parse().unwrap();
    cluster.stop(1).await;
    cluster.stop(2).await;
    restart_on(&mut cluster, 3, address_of_3).await;
    let from_node_4 = raw_connection_with(&cluster.certificates.node(4), &cluster.address(3)).await;
    let vote = RaftRequest::Vote(VoteRequest { vote: Vote::new(1, 4), last_log_id: None });
    // No member of node 3's membership is up to vouch: node 4 is refused.
    refused_as_non_member(call_raw::<_, RaftResponse>(&from_node_4, StreamKind::Raft, &vote).await);
    // Node 2 comes back and vouches: node 4 is let through, a leader is elected among 2, 3, 4,
    // and node 3 catches up.
    restart_on(&mut cluster, 2, address_of_2).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            matches!(call_raw::<_, RaftResponse>(&from_node_4, StreamKind::Raft, &vote).await, Ok(Ok(_)))
        })
        .await,
        "node 4 stays refused after a member could vouch for it"
    );
    let node3 = cluster.client_of(3);
    assert!(
        eventually(Duration::from_secs(30), || async { node3.get("after").await.ok().flatten().is_some() }).await,
        "node 3 never caught up"
    );
    // A certificate of a node that is in nobody's membership is still refused by node 3.
    let attacker = raw_connection_with(&cluster.certificates.node(99), &cluster.address(3)).await;
    let vote = RaftRequest::Vote(VoteRequest { vote: Vote::new(1, 99), last_log_id: None });
    refused_as_non_member(call_raw::<_, RaftResponse>(&attacker, StreamKind::Raft, &vote).await);
    cluster.shutdown().await;
}

/// Restarts a node of the cluster from its data on the address it had (as a real node does).
async fn restart_on(cluster: &mut TestCluster, node_id: u64, address: std::net::SocketAddr) {
    let mut config = cluster.config(node_id, Vec::new());
    config.listen_address = address;
    // The stopped node's socket closes once its last tasks have ended: retry the bind briefly.
    for _ in 0..100 {
        match bayard::node::Node::start(config.clone()).await {
            Ok(node) => {
                cluster.nodes.insert(node_id, node);
                return;
            }
            Err(error) if error.to_string().contains("in use") => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => panic!("node {node_id} does not restart: {error}"),
        }
    }
    panic!("the port of node {node_id} stayed in use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_and_digests_from_a_non_member_change_nothing() {
    let test = node_with_one_document().await;
    let attacker = raw_connection_with(&test.certificates.node(99), &test.address()).await;
    // A leave, forced: refused (it used to remove any member).
    let leave = bayard::protocol::AdminRequest::Leave { node_id: 1, force: true };
    refused_as_non_member(call_raw::<_, bayard::protocol::AdminResponse>(&attacker, StreamKind::Admin, &leave).await);
    // Digests about made-up nodes and about node 1: only node 99's own is kept.
    let digest = |node_id: u64, incarnation: u64| bayard::cluster::membership::MemberDigest {
        node_id,
        address: format!("127.0.0.1:{}", 40_000 + node_id),
        incarnation,
        generation: u64::MAX,
        heartbeat: u64::MAX,
        role: "voter".into(),
        applied_index: 0,
        version: "evil".into(),
        leader: Some(99),
    };
    let mut members: Vec<_> = (1_000..1_900).map(|node_id| digest(node_id, 1)).collect();
    members.push(digest(1, u64::MAX));
    members.push(digest(99, 1));
    let message = bayard::cluster::membership::MembershipDigest { sender: 99, cluster_id: None, members };
    let answer: bayard::cluster::membership::MembershipDigest =
        call_raw(&attacker, StreamKind::Membership, &message).await.unwrap().unwrap();
    let ids: BTreeSet<u64> = answer.members.iter().map(|member| member.node_id).collect();
    // Only a node speaks for itself, in both directions: the answer carries node 1's own digest
    // and no other node's (no incarnation is handed out).
    assert_eq!(ids, BTreeSet::from([1]), "only the answering node's own digest");
    let own = answer.members.iter().find(|member| member.node_id == 1).unwrap();
    assert_ne!(own.incarnation, u64::MAX);
    // Too many digests in one message: refused while it is decoded.
    let flood = bayard::cluster::membership::MembershipDigest {
        sender: 99,
        cluster_id: None,
        members: (0..5_000).map(|node_id| digest(node_id, 1)).collect(),
    };
    let refused =
        call_raw::<_, bayard::cluster::membership::MembershipDigest>(&attacker, StreamKind::Membership, &flood)
            .await
            .unwrap()
            .unwrap_err();
    assert_eq!(refused.code, ErrorCode::MalformedFrame, "{}", refused.message);
    let status = test.client().status().await.unwrap();
    assert_eq!(status.role, "leader");
    assert_eq!(status.members.len(), 1);
    assert_serves_the_honest_client(&test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_are_bounded_while_they_are_decoded() {
    let test = node_with_one_document().await;
    let connection = raw_connection_with(&test.certificates.client("raw"), &test.address()).await;
    // 200,000 empty ids: a few hundred KiB on the wire, tens of MiB once decoded; refused at the
    // announced length.
    let delete =
        ClientRequest::Delete { ids: vec![String::new(); 200_000], request_id: bayard::protocol::RequestId(1) };
    let error = call_raw::<_, ClientResponse>(&connection, StreamKind::Client, &delete).await.unwrap().unwrap_err();
    assert_eq!(error.code, ErrorCode::MalformedFrame, "{}", error.message);
    assert!(error.message.contains("request frame"), "{}", error.message);
    assert_serves_the_honest_client(&test).await;
}

// --- 3. stream headers: small limit, versioned ----------------------------------------------------

fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends raw bytes on a new stream and reads the node's answer.
async fn send_raw(connection: &quinn::Connection, bytes: &[u8]) -> Result<Result<(), WireError>, String> {
    let (mut send, mut receive) = connection.open_bi().await.map_err(|error| error.to_string())?;
    let written = send.write_all(bytes).await;
    let _ = send.finish();
    let answer = transport::frame::read_frame::<_, Result<(), WireError>>(&mut receive, 1 << 20).await;
    match (answer, written) {
        (Ok(answer), _) => Ok(answer),
        (Err(error), _) => Err(error.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_small_and_versioned() {
    let test = node_with_one_document().await;
    let connection = raw_connection_with(&test.certificates.client("raw"), &test.address()).await;
    // A 16 MiB header, on many streams at once: refused on its length prefix, never read.
    let mut oversized = (16_u32 * 1024 * 1024).to_be_bytes().to_vec();
    oversized.extend(vec![7_u8; 256 * 1024]);
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (connection, bytes) = (connection.clone(), oversized.clone());
        attempts.spawn(async move { send_raw(&connection, &bytes).await });
    }
    while let Some(answer) = attempts.join_next().await {
        let error = answer.unwrap().expect("answered").expect_err("refused");
        assert_eq!(error.code, ErrorCode::FrameTooLarge, "{}", error.message);
        assert!(error.message.contains("--max-header-bytes"), "{}", error.message);
    }
    // A header of another protocol version is named as such.
    let mut future = StreamHeader::new(StreamKind::Client, None, 5_000);
    let ours = bayard::transport::stream::PROTOCOL_VERSION;
    future.protocol_version = ours + 1;
    let error = send_raw(&connection, &frame(&postcard::to_allocvec(&future).unwrap())).await.unwrap().unwrap_err();
    assert_eq!(error.code, ErrorCode::UnsupportedVersion);
    assert!(
        error.message.contains(&format!("version {}", ours + 1)) && error.message.contains(&format!("version {ours}")),
        "{}",
        error.message
    );
    // A header of bayard before versions (it started with the stream kind).
    let old = send_raw(&connection, &frame(&[3, 0, 100])).await.unwrap().unwrap_err();
    assert_eq!(old.code, ErrorCode::UnsupportedVersion);
    assert!(old.message.contains("unversioned"), "{}", old.message);
    // The same connection serves an honest request.
    let request = ClientRequest::Search { request: query("*"), consistency: Consistency::Local };
    let answer: ClientResponse = call_raw(&connection, StreamKind::Client, &request).await.unwrap().unwrap();
    assert!(matches!(answer, ClientResponse::Search { .. }));
    assert_serves_the_honest_client(&test).await;
}

// --- 4. limits on concurrent work -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_per_certificate_and_in_total() {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.limits.max_connections_per_identity = 3;
    config.limits.max_connections = 6;
    let node = start_node(config).await;
    let address = node.local_address().to_string();
    let search = ClientRequest::Search { request: query("*"), consistency: Consistency::Local };

    let mut held = Vec::new();
    for _ in 0..3 {
        let connection = raw_connection_with(&certificates.client("greedy"), &address).await;
        let answer: ClientResponse = call_raw(&connection, StreamKind::Client, &search).await.unwrap().unwrap();
        assert!(matches!(answer, ClientResponse::Search { .. }));
        held.push(connection);
    }
    // The fourth connection of the same certificate is closed with the reason.
    let fourth = raw_connection_with(&certificates.client("greedy"), &address).await;
    let reason = fourth.closed().await.to_string();
    assert!(reason.contains("--max-connections-per-identity"), "{reason}");
    // Another certificate is served; up to the total.
    for name in ["other-a", "other-b"] {
        let connection = raw_connection_with(&certificates.client(name), &address).await;
        let answer: ClientResponse = call_raw(&connection, StreamKind::Client, &search).await.unwrap().unwrap();
        assert!(matches!(answer, ClientResponse::Search { .. }));
        held.push(connection);
    }
    let honest = common::client_with(&address, certificates.client("app"));
    assert!(honest.status().await.is_ok(), "the sixth connection is the honest client's");
    // Over the total: refused before the handshake completes.
    let mut options = ClientOptions::new(vec![address.clone()], certificates.client("late"));
    options.request_timeout = Duration::from_secs(5);
    options.retry_rounds = 1;
    let late = bayard::client::Client::connect(options).unwrap();
    assert!(late.status().await.is_err(), "a seventh connection is refused");
    assert!(metric_value("bayard_limit_refusals_total", "limit=\"connections\"") >= 1.0);
    // Closing connections gives their places back.
    for connection in held.drain(..) {
        connection.close(0_u32.into(), b"done");
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            let client = common::client_with(&address, certificates.client("greedy"));
            client.status().await.is_ok()
        })
        .await,
        "places are given back when connections close"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_the_concurrency_limit_are_refused_and_counted() {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.limits.max_concurrent_writes = 1;
    config.limits.max_queued_writes = 0;
    let node = start_node(config).await;
    let address = node.local_address().to_string();
    // One connection, 64 streams opened at once: they reach the node together, and each write
    // holds its slot for at least an fsync.
    let client = std::sync::Arc::new(common::client_with(&address, certificates.client("writer")));
    client.status().await.unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for number in 0..64 {
        let client = client.clone();
        writers.spawn(async move { client.put(&format!("d{number}"), r#"{"title":"concurrent"}"#).await });
    }
    let (mut written, mut refused) = (0, 0);
    while let Some(outcome) = writers.join_next().await {
        match outcome.unwrap() {
            Ok(_) => written += 1,
            Err(error) => {
                let (code, message) = remote(error);
                assert_eq!(code, ErrorCode::ResourceExhausted, "{message}");
                assert!(message.contains("--max-concurrent-writes"), "{message}");
                refused += 1;
            }
        }
    }
    assert!(written >= 1 && refused >= 1, "written {written}, refused {refused}");
    assert!(metric_value("bayard_limit_refusals_total", "limit=\"concurrent_writes\"") >= 1.0);
    let client = common::client_with(&address, certificates.client("app"));
    client.put("after", r#"{"title":"served after"}"#).await.unwrap();
    client.commit().await.unwrap();
    assert_eq!(client.status().await.unwrap().document_count, written + 1);
    node.shutdown().await;
}

// --- 7. files ------------------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_readable_by_others_are_refused_and_data_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let files = certificates.node(1);
    std::fs::set_permissions(&files.private_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let directory = data.path().join("fresh");
    let error = match bayard::node::Node::start(node_config(&certificates, 1, &directory)).await {
        Ok(_) => panic!("a node started with a key others can read"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("chmod 600") && error.contains("0644"), "{error}");
    std::fs::set_permissions(&files.private_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = start_node(node_config(&certificates, 1, &directory)).await;
    let mode = std::fs::metadata(&directory).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data directory is private");
    let _ = Role::Node { node_id: 1 };
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_cannot_hold_every_request_place() {
    let certificates = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = node_config(&certificates, 1, data.path());
    config.limits.max_requests_per_identity = 2;
    let node = start_node(config).await;
    let address = node.local_address().to_string();
    let greedy = raw_connection_with(&certificates.client("greedy"), &address).await;
    // Two requests whose bodies never come: each holds its place until the node gives up on it.
    let header = frame(&postcard::to_allocvec(&StreamHeader::new(StreamKind::Client, None, 30_000)).unwrap());
    let (mut first, _first_answer) = greedy.open_bi().await.unwrap();
    first.write_all(&header).await.unwrap();
    let (mut second, _second_answer) = greedy.open_bi().await.unwrap();
    second.write_all(&header).await.unwrap();
    let search = ClientRequest::Search { request: query("*"), consistency: Consistency::Local };
    // Give the node a moment to take the two streams in (not a negative wait: the refusal below is
    // awaited as a condition).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = eventually(Duration::from_secs(5), || async {
        matches!(
            call_raw::<_, ClientResponse>(&greedy, StreamKind::Client, &search).await,
            Ok(Err(WireError { code: ErrorCode::ResourceExhausted, .. }))
        )
    })
    .await;
    assert!(refused, "a third request of the same certificate is refused");
    let error = call_raw::<_, ClientResponse>(&greedy, StreamKind::Client, &search).await.unwrap().unwrap_err();
    assert!(error.message.contains("--max-requests-per-identity"), "{}", error.message);
    // Another certificate is served meanwhile.
    let honest = common::client_with(&address, certificates.client("app"));
    assert!(honest.search(query("*"), Consistency::Local).await.is_ok());
    node.shutdown().await;
}
