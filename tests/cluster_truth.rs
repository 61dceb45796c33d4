//! Membership that tells the truth across restarts, and writes that are safe to retry: each test
//! is one defect an operator met (see the cluster-component issue), against in-process nodes
//! over real QUIC + mutual TLS on 127.0.0.1.

mod common;

use std::time::Duration;

use bayard::cluster::membership::{MemberDigest, MembershipDigest};
use bayard::protocol::{AdminRequest, AdminResponse, ClientRequest, DocumentInput, ErrorCode, RequestId, StreamKind};
use bayard::transport::frame::encode_frame;
use bayard::transport::StreamHeader;
use common::{call_raw, eventually, raw_connection_with, TestCluster, TestNode};

const SETTLE: Duration = Duration::from_secs(30);

fn state_of(status: &bayard::protocol::NodeStatus, node_id: u64) -> Option<String> {
    status.members.iter().find(|member| member.node_id == node_id).map(|member| member.state.clone())
}

/// Holds for the whole of `period` (checked every 250 ms); false at the first check that fails.
async fn holds_throughout<F, Fut>(period: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while started.elapsed() < period {
        if !condition().await {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    true
}

/// Restarts `node_id` on its data directory (a Ctrl-C and a start, as an operator does).
async fn restart(cluster: &mut TestCluster, node_id: u64) {
    let address = cluster.nodes[&node_id].local_address();
    cluster.stop(node_id).await;
    start_again(cluster, node_id, address).await;
}

/// Starts `node_id` again on its data directory and its old port (the address the membership
/// records).
async fn start_again(cluster: &mut TestCluster, node_id: u64, address: std::net::SocketAddr) {
    let mut config = cluster.config(node_id, vec![]);
    config.listen_address = address;
    cluster.nodes.insert(node_id, common::start_node(config).await);
}

/// Defects 1 and 2: a node that ran for a while and was restarted used to be shown `down` for
/// about as long as it had run (its heartbeat starts again from 0), and `--remove-down-after`
/// removed it. Now its first digest of the new run outranks the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_is_alive_at_once_and_never_removed_for_it() {
    let mut cluster = TestCluster::new();
    let mut config = cluster.config(1, vec![]);
    config.remove_down_after = Some(Duration::from_secs(5));
    cluster.nodes.insert(1, common::start_node(config).await);
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    cluster.start(2, Some(1)).await;
    cluster.start(3, Some(1)).await;
    cluster.wait_for_voters(1, &[1, 2, 3], SETTLE).await;
    let client = cluster.client_of(1);
    // Let node 2's heartbeat climb well past what the checks below allow.
    let alive = eventually(SETTLE, || async {
        client.status().await.is_ok_and(|s| state_of(&s, 2).as_deref() == Some("alive"))
    })
    .await;
    assert!(alive);
    tokio::time::sleep(Duration::from_secs(10)).await;

    restart(&mut cluster, 2).await;
    let alive_again = eventually(Duration::from_secs(5), || async {
        client.status().await.is_ok_and(|s| state_of(&s, 2).as_deref() == Some("alive"))
    })
    .await;
    assert!(alive_again, "the restarted node 2 was not shown alive within 5 s");
    // And it stays alive and a member, past SUSPECT_AFTER and past --remove-down-after.
    let stays = holds_throughout(Duration::from_secs(8), || async {
        client.status().await.is_ok_and(|s| state_of(&s, 2).as_deref() == Some("alive"))
    })
    .await;
    assert!(stays, "the restarted node 2 was shown suspect, down or removed: {:?}", client.status().await);
    cluster.shutdown().await;
}

/// Defect 3: `leave` was refused for ~34 s after the leader was restarted ("would leave 1 of 2
/// remaining voters reachable"): the leave guard trusted stale liveness. It probes the voters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leave_works_right_after_a_restart() {
    let mut cluster = TestCluster::with_three_voters().await;
    let leader = cluster.leader().expect("a leader");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let address = cluster.nodes[&leader].local_address();
    cluster.stop(leader).await;
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|node_id| *node_id != leader).collect();
    let elected = eventually(SETTLE, || async { cluster.leader().is_some_and(|new| new != leader) }).await;
    assert!(elected, "no new leader after the old one stopped");
    start_again(&mut cluster, leader, address).await;
    cluster.wait_for_voters(leader, &[1, 2, 3], SETTLE).await;
    // The restarted node follows the new leader (at its start it briefly believes in its old
    // term's leadership).
    let raft = cluster.nodes[&leader].raft().clone();
    let follows = eventually(SETTLE, || async {
        let metrics = raft.metrics().borrow().clone();
        metrics.current_leader.is_some_and(|current| current != leader)
            && metrics.state != openraft::ServerState::Leader
    })
    .await;
    assert!(follows, "the restarted node never followed the new leader");
    let new_leader = raft.metrics().borrow().current_leader.expect("a leader");

    // Remove the third node: the restarted one is needed for the quorum that remains.
    let leaving = survivors.into_iter().find(|node_id| *node_id != new_leader).expect("a follower");
    let started = std::time::Instant::now();
    let admin = cluster.client_of(new_leader);
    admin.leave(leaving, false).await.expect("leave right after the restart");
    assert!(started.elapsed() < Duration::from_secs(5), "leave took {:?}", started.elapsed());
    cluster.shutdown().await;
}

/// Defect 4: `leave` of the current leader did the removal but answered with an error; a retry
/// then said "not a member". Now it answers OK, the others elect a leader and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_can_leave_and_says_so() {
    let mut cluster = TestCluster::with_three_voters().await;
    let leader = cluster.leader().expect("a leader");
    // As the binary does: the node is shut down as soon as it says it must stop.
    let node = cluster.nodes.remove(&leader).expect("the leader runs");
    let leader_address = node.local_address().to_string();
    let stopping = tokio::spawn(async move {
        let reason = node.stopped().await;
        node.shutdown().await;
        reason
    });
    // Sent to the leader itself, which removes itself.
    let admin = common::client_with(&leader_address, cluster.certificates.admin("ops"));
    admin.leave(leader, false).await.expect("the leader's leave answers OK");
    let reason = tokio::time::timeout(SETTLE, stopping).await.expect("the removed leader stops").unwrap();
    assert!(reason.contains("removed"), "{reason}");
    // Defect 5: the removed node says the same id may join again (it used to ask for a new one).
    assert!(reason.contains("the same --id may join again"), "{reason}");
    let remaining: Vec<u64> = [1, 2, 3].into_iter().filter(|node_id| *node_id != leader).collect();
    for node_id in &remaining {
        cluster.wait_for_voters(*node_id, &remaining, SETTLE).await;
    }
    let client = cluster.client();
    client.put("after", r#"{"title":"the two go on"}"#).await.expect("writes go on");
    assert!(!client.peers().await.unwrap().contains_key(&leader));
    cluster.shutdown().await;
}

/// Defect 6: only a node speaks for itself. A member's certificate (node 2's) sends digests
/// about node 3 and about node 1 (generation and heartbeat u64::MAX, a made-up applied index)
/// and a removal notice for node 1: none of it is believed, and the exchange answers with the
/// answering node's own digest only (no other node's incarnation).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_member_speaks_only_for_itself() {
    let cluster = TestCluster::with_three_voters().await;
    let status = cluster.client_of(1).status().await.unwrap();
    let attacker = raw_connection_with(&cluster.certificates.node(2), &cluster.address(1)).await;
    let fake = |node_id: u64| MemberDigest {
        node_id,
        address: format!("127.0.0.1:{}", 40_000 + node_id),
        incarnation: 1,
        generation: u64::MAX,
        heartbeat: u64::MAX,
        role: "voter".into(),
        applied_index: 999_999,
        version: "evil".into(),
        leader: Some(2),
    };
    let message =
        MembershipDigest { sender: 2, cluster_id: status.cluster_id.clone(), members: vec![fake(3), fake(1)] };
    let answer: MembershipDigest =
        call_raw(&attacker, StreamKind::Membership, &message).await.expect("transport").expect("answered");
    assert_eq!(answer.members.iter().map(|digest| digest.node_id).collect::<Vec<_>>(), vec![1], "only node 1's own");
    let after = cluster.client_of(1).status().await.unwrap();
    for member in &after.members {
        assert!(member.applied_index < 999_999, "a digest not sent by its node was merged: {member:?}");
    }
    // A removal notice for node 1, from a member: the other voters still list node 1.
    // The exchange no longer hands out incarnations; the attacker is given the real one.
    let incarnation = {
        let node_json = std::fs::read(cluster.data[&1].path().join("node.json")).unwrap();
        let metadata: serde_json::Value = serde_json::from_slice(&node_json).unwrap();
        metadata["incarnation"].as_u64().unwrap()
    };
    let notice = AdminRequest::Removed { node_id: 1, incarnation };
    let refused = call_raw::<_, AdminResponse>(&attacker, StreamKind::Admin, &notice).await.expect("transport");
    let error = refused.expect_err("a removal the voters do not confirm is refused");
    assert_eq!(error.code, ErrorCode::PermissionDenied, "{error:?}");
    assert!(error.message.contains("still list it"), "{}", error.message);
    assert!(cluster.nodes[&1].stop_reason().is_none(), "node 1 stopped on one peer's word");
    // The honest client is still served.
    cluster.client().put("honest", r#"{"title":"served"}"#).await.expect("served");
    cluster.shutdown().await;
}

/// Sends a write on a raw stream and drops the stream before the answer: the answer is lost,
/// as when a leader dies after committing. Waits until the node has applied it.
async fn send_and_lose_the_answer(test: &TestNode, request: &ClientRequest) {
    let before = test.node.raft().metrics().borrow().last_applied.map(|log_id| log_id.index).unwrap_or(0);
    let connection = raw_connection_with(&test.certificates.admin("ops"), &test.address()).await;
    let (mut send, receive) = connection.open_bi().await.expect("stream");
    let header = encode_frame(&StreamHeader::new(StreamKind::Client, None, 10_000), 1 << 20).unwrap();
    let body = encode_frame(request, 1 << 20).unwrap();
    send.write_all(&header).await.unwrap();
    send.write_all(&body).await.unwrap();
    send.finish().unwrap();
    drop(receive);
    let applied = eventually(Duration::from_secs(10), || async {
        test.node.raft().metrics().borrow().last_applied.map(|log_id| log_id.index).unwrap_or(0) > before
    })
    .await;
    assert!(applied, "the write whose answer was lost was never applied");
}

/// Defect 7: a retried write is applied once. A rollback whose answer was lost, retried after
/// another write was acknowledged, used to discard that write; a put retried after a newer put
/// of the same id reverted it. Both are deduplicated by request id, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_rollback_commit_or_put_is_applied_once() {
    let mut test = TestNode::start().await;
    let client = test.admin();
    // The node has elected itself and applied its first entries before anything is counted.
    client.commit().await.unwrap();
    let rollback = ClientRequest::Rollback { request_id: RequestId(0xabc) };
    send_and_lose_the_answer(&test, &rollback).await;
    client.put("acknowledged", r#"{"title":"written after the rollback"}"#).await.unwrap();
    // The client retries the rollback (same request id): nothing is rolled back.
    let retried = client.send_write(rollback.clone()).await.unwrap();
    assert!(retried.duplicate, "{retried:?}");
    client.commit().await.unwrap();
    assert!(client.get("acknowledged").await.unwrap().is_some(), "the retried rollback discarded a write");

    // A put of x = old whose answer was lost, then x = new, then the retry of the first.
    let old_put = ClientRequest::Put {
        documents: vec![DocumentInput { id: Some("x".into()), document_json: r#"{"title":"old"}"#.into() }],
        request_id: RequestId(0xdef),
    };
    send_and_lose_the_answer(&test, &old_put).await;
    client.put("x", r#"{"title":"new"}"#).await.unwrap();
    let commit = ClientRequest::Commit { request_id: RequestId(0x123) };
    client.send_write(commit.clone()).await.unwrap();
    assert!(client.send_write(old_put.clone()).await.unwrap().duplicate);
    assert!(client.send_write(commit.clone()).await.unwrap().duplicate);
    client.commit().await.unwrap();
    assert_eq!(client.get("x").await.unwrap().unwrap().fields["title"], "new");

    // After a restart the request ids are still known (they are in the commit marker).
    let address = test.node.local_address();
    test.node.shutdown().await;
    let mut config = common::node_config(&test.certificates, 1, test.data.path());
    config.listen_address = address;
    test.node = common::start_node(config).await;
    let client = test.admin();
    let after_restart = client.send_write(old_put).await.unwrap();
    assert!(after_restart.duplicate, "a retry after a restart was applied again");
    client.commit().await.unwrap();
    assert_eq!(client.get("x").await.unwrap().unwrap().fields["title"], "new");
    // Fresh requests are applied as usual.
    assert!(!client.put("y", "{}").await.unwrap().duplicate);
    test.node.shutdown().await;
}

/// Defect 8: a write answer names the leader, and the client sends the next write straight
/// there, even when its list holds only a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_learn_the_leader_and_go_straight_there() {
    let cluster = TestCluster::with_three_voters().await;
    let leader = cluster.leader().expect("a leader");
    let follower = [1, 2, 3].into_iter().find(|node_id| *node_id != leader).expect("a follower");
    let client = cluster.client_of(follower);
    assert_eq!(client.known_leader(), None);
    client.put("a", r#"{"title":"through a follower"}"#).await.unwrap();
    assert_eq!(client.known_leader(), Some(cluster.address(leader)), "the answer named the leader");
    client.put("b", r#"{"title":"straight to the leader"}"#).await.unwrap();
    client.commit().await.unwrap();
    cluster.shutdown().await;
}

/// A write whose client gave up is never applied later. A follower without a leader used to keep
/// retrying a put for up to ~20 s after its client's deadline, and forward it when a leader came
/// back: the client had reported the put as failed, yet it landed (found by the multi-host
/// partition test, as a write refused by the minority that appeared once the partition healed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_its_client_gave_up_on_is_never_applied_later() {
    let mut cluster = TestCluster::with_three_voters().await;
    let leader = cluster.leader().expect("a leader");
    let follower = [1, 2, 3].into_iter().find(|node_id| *node_id != leader).expect("a follower");
    let other = [1, 2, 3].into_iter().find(|node_id| *node_id != leader && *node_id != follower).expect("a third");
    let addresses: Vec<(u64, std::net::SocketAddr)> =
        [leader, other].into_iter().map(|node_id| (node_id, cluster.nodes[&node_id].local_address())).collect();
    cluster.stop(leader).await;
    cluster.stop(other).await;
    // Alone, the follower stands for election and knows no leader: a write waits for one.
    cluster.nodes[&follower]
        .raft()
        .wait(Some(SETTLE))
        .metrics(|metrics| metrics.current_leader.is_none(), "the follower knows no leader")
        .await
        .expect("the follower forgets the stopped leader");

    let mut options =
        bayard::client::ClientOptions::new(vec![cluster.address(follower)], cluster.certificates.admin("ops"));
    options.request_timeout = Duration::from_secs(1);
    let impatient = bayard::client::Client::connect(options).expect("client");
    let refused = impatient.put("abandoned", r#"{"title":"given up on"}"#).await;
    assert!(refused.is_err(), "a follower with no quorum acknowledged a write: {refused:?}");

    // The quorum comes back well inside the window the old retry loop kept the write for.
    for (node_id, address) in addresses {
        start_again(&mut cluster, node_id, address).await;
    }
    cluster.wait_for_voters(follower, &[1, 2, 3], SETTLE).await;
    let patient = cluster.client_of(follower);
    patient.put("after", r#"{"title":"written once the quorum was back"}"#).await.expect("a put after the restart");
    patient.commit().await.expect("a commit after the restart");
    for node_id in [1, 2, 3] {
        let client = cluster.client_of(node_id);
        let present =
            eventually(SETTLE, || async { client.get("after").await.is_ok_and(|found| found.is_some()) }).await;
        assert!(present, "node {node_id} never showed the write made after the restart");
        assert_eq!(
            client.get("abandoned").await.expect("a get").map(|document| document.id),
            None,
            "node {node_id} holds the write its client gave up on"
        );
    }
    cluster.shutdown().await;
}

/// A vote request dials a node that a dial failed to reach a moment ago; other calls fail at once
/// for a second (so openraft backs off instead of piling up dials). Elections used to lose a
/// whole round to that memory: a peer restarted just before a leader failure was "unreachable"
/// to every vote for a second, and the election took 1.3–2 s instead of 0.55 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vote_dials_a_peer_that_failed_a_moment_ago() {
    let certificates = common::CertificateSet::new();
    let material = bayard::transport::TlsMaterial::load(&certificates.node(1)).expect("node 1's certificate");
    let endpoint =
        bayard::transport::bind_node_endpoint("127.0.0.1:0".parse().unwrap(), &material, 16).expect("an endpoint");
    let pool = bayard::transport::ConnectionPool::new(
        endpoint,
        bayard::transport::identity::DEFAULT_TRUST_DOMAIN,
        Duration::from_millis(300),
    );
    // A port nobody serves yet.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let address = free.to_string();
    assert!(pool.get(&address).await.is_err(), "a port nobody serves answered");

    let data = tempfile::tempdir().unwrap();
    let mut config = common::node_config(&certificates, 2, data.path());
    config.listen_address = free;
    let node = common::start_node(config).await;
    let remembered = pool.get(&address).await;
    assert!(remembered.is_err(), "within a second of the failed dial, ordinary calls fail at once");
    let fresh = pool.get_now(&address).await;
    assert!(fresh.is_ok(), "a vote's dial reaches the node that now serves there: {:?}", fresh.err());
    node.shutdown().await;
}
