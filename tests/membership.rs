//! The membership exchange and the join rules, with in-process nodes over real QUIC + mTLS:
//! dead seeds, five nodes, concurrent joins, a wiped node, impostors, liveness in `status`.

mod common;

use std::time::Duration;

use bayard::cluster::membership::MembershipDigest;
use bayard::protocol::{AdminRequest, ErrorCode, StreamKind, WireError};
use bayard::transport::{self, pool::ConnectionPool, TlsMaterial};
use common::{eventually, CertificateSet, TestCluster};

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_join_through_any_seed_even_when_the_first_is_dead() {
    let mut cluster = TestCluster::new();
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    let dead_seed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    for node_id in 2..=5_u64 {
        // The first seed never answers; the second is a member that may or may not lead.
        let seed = node_id - 1;
        let config = cluster.config(node_id, vec![(99, dead_seed.clone()), (seed, cluster.address(seed))]);
        cluster.nodes.insert(node_id, common::start_node(config).await);
        let voters: Vec<u64> = (1..=node_id).collect();
        cluster.wait_for_voters(1, &voters, SETTLE).await;
    }
    for node_id in 1..=5 {
        cluster.wait_for_voters(node_id, &[1, 2, 3, 4, 5], SETTLE).await;
    }
    // Every member sees every other as alive through the exchange.
    let client = cluster.client_of(5);
    let all_alive = eventually(SETTLE, || async {
        client.status().await.is_ok_and(|status| {
            status.members.len() == 5 && status.members.iter().all(|member| member.state == "alive")
        })
    })
    .await;
    assert!(all_alive, "{:?}", client.status().await);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_joining_at_once_both_end_as_voters() {
    let mut cluster = TestCluster::new();
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    let seed = vec![(1, cluster.address(1))];
    let (second, third) = (cluster.config(2, seed.clone()), cluster.config(3, seed));
    let (second, third) = tokio::join!(common::start_node(second), common::start_node(third));
    cluster.nodes.insert(2, second);
    cluster.nodes.insert(3, third);
    // `wait_for_voters` also requires a uniform (non-joint) configuration.
    for node_id in [1, 2, 3] {
        cluster.wait_for_voters(node_id, &[1, 2, 3], SETTLE).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_is_refused_until_it_leaves_then_joins_again() {
    let mut cluster = TestCluster::with_three_voters().await;

    // Node 3 loses its data: same id, new incarnation.
    cluster.stop(3).await;
    cluster.data.remove(&3);
    let config = cluster.config(3, vec![(1, cluster.address(1))]);
    let wiped = common::start_node(config).await;
    let reason = tokio::time::timeout(SETTLE, wiped.stopped()).await.expect("the wiped node is refused");
    assert!(reason.contains("node 3 is still a member with other data; run `bayard leave --id 3` first"), "{reason}");
    wiped.shutdown().await;

    // After `leave`, the same id joins again as a fresh node.
    cluster.client_of(1).leave(3, false).await.unwrap();
    cluster.wait_for_voters(1, &[1, 2], SETTLE).await;
    cluster.data.remove(&3);
    cluster.start(3, Some(2)).await;
    cluster.wait_for_voters(1, &[1, 2, 3], SETTLE).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn liveness_goes_suspect_then_down_and_back() {
    let mut cluster = TestCluster::with_three_voters().await;
    let client = cluster.client_of(1);
    let state_of = |status: &bayard::protocol::NodeStatus, node_id: u64| {
        status.members.iter().find(|member| member.node_id == node_id).map(|member| member.state.clone())
    };
    cluster.stop(3).await;
    let suspect = eventually(SETTLE, || async {
        client.status().await.is_ok_and(|status| state_of(&status, 3).as_deref() == Some("suspect"))
    })
    .await;
    assert!(suspect, "node 3 never became suspect");
    let down = eventually(SETTLE, || async {
        client.status().await.is_ok_and(|status| state_of(&status, 3).as_deref() == Some("down"))
    })
    .await;
    assert!(down, "node 3 never became down");
    // It comes back with its data: it resumes and is alive again.
    let config = cluster.config(3, vec![]);
    cluster.nodes.insert(3, common::start_node(config).await);
    let alive = eventually(SETTLE, || async {
        client.status().await.is_ok_and(|status| state_of(&status, 3).as_deref() == Some("alive"))
    })
    .await;
    assert!(alive, "node 3 never came back alive");
    cluster.shutdown().await;
}

/// A raw connection to `address` with the certificate of `node_id` from `certificates`.
async fn connection_as_node(certificates: &CertificateSet, node_id: u64, address: &str) -> quinn::Connection {
    let material = TlsMaterial::load(&certificates.node(node_id)).unwrap();
    let config = transport::tls::client_config(&material, 16).unwrap();
    let endpoint = transport::bind_client_endpoint(config, false).unwrap();
    ConnectionPool::new(endpoint, common::TRUST_DOMAIN, Duration::from_secs(5)).get(address).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impostors_and_foreign_nodes_never_become_members() {
    let mut cluster = TestCluster::new();
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    cluster.start(2, Some(1)).await;
    cluster.wait_for_voters(1, &[1, 2], SETTLE).await;
    let leader_address = cluster.address(1);

    // A node certificate for id 7 cannot speak as node 8 in the exchange, nor ask to join as 8.
    let as_seven = connection_as_node(&cluster.certificates, 7, &leader_address).await;
    let forged = MembershipDigest { sender: 8, cluster_id: None, members: vec![] };
    let answer: Result<MembershipDigest, WireError> =
        transport::call(&as_seven, StreamKind::Membership, None, &forged, Duration::from_secs(5), 1 << 20)
            .await
            .unwrap();
    let error = answer.unwrap_err();
    assert_eq!(error.code, ErrorCode::PermissionDenied);
    assert!(error.message.contains("may not send membership digests as node 8"), "{}", error.message);
    let join = AdminRequest::Join { node_id: 8, address: "127.0.0.1:1".into(), incarnation: 1 };
    let answer: Result<bayard::protocol::AdminResponse, WireError> =
        transport::call(&as_seven, StreamKind::Admin, None, &join, Duration::from_secs(5), 1 << 20).await.unwrap();
    assert_eq!(answer.unwrap_err().code, ErrorCode::PermissionDenied);

    // A member forwarding a join cannot admit whatever answers at the address: the leader checks
    // that the node there presents the certificate of the id that asks.
    let as_member = connection_as_node(&cluster.certificates, 2, &leader_address).await;
    let impostor = AdminRequest::Join { node_id: 9, address: cluster.address(2), incarnation: 1 };
    let answer: Result<bayard::protocol::AdminResponse, WireError> =
        transport::call(&as_member, StreamKind::Admin, None, &impostor, Duration::from_secs(10), 1 << 20)
            .await
            .unwrap();
    let error = answer.unwrap_err();
    assert!(error.message.contains("presents the certificate of node/2, not node/9"), "{}", error.message);

    // A node with a certificate of another CA cannot even connect: it keeps trying, never joins.
    let foreign = CertificateSet::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = common::node_config(&foreign, 6, data.path());
    config.peers = vec![(1, leader_address.clone())];
    let outsider = common::start_node(config).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peers = cluster.client_of(1).peers().await.unwrap();
    assert_eq!(peers.keys().copied().collect::<Vec<_>>(), vec![1, 2], "an outsider got in: {peers:?}");
    outsider.shutdown().await;

    // A node given another node's certificate refuses to start, and says which it is.
    let data = tempfile::tempdir().unwrap();
    let mut config = common::node_config(&cluster.certificates, 5, data.path());
    config.tls = cluster.certificates.node(2);
    let error = bayard::node::Node::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("is the certificate of node/2, but this is node 5"), "{error}");
    assert_eq!(cluster.client_of(1).peers().await.unwrap().len(), 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn down_members_are_removed_automatically_when_asked_and_never_below_quorum() {
    let mut cluster = TestCluster::new();
    let mut config = cluster.config(1, vec![]);
    config.remove_down_after = Some(Duration::from_secs(4));
    cluster.nodes.insert(1, common::start_node(config).await);
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    cluster.start(2, Some(1)).await;
    cluster.start(3, Some(1)).await;
    cluster.wait_for_voters(1, &[1, 2, 3], SETTLE).await;
    assert_eq!(cluster.leader(), Some(1));

    // Node 3 goes down: {1, 2} still answer, so the leader removes it after the timeout.
    cluster.stop(3).await;
    let client = cluster.client_of(1);
    let removed =
        eventually(SETTLE, || async { client.peers().await.is_ok_and(|peers| !peers.contains_key(&3)) }).await;
    assert!(removed, "node 3 was not removed");
    // Node 2 goes down too: removing it would need a quorum of {1, 2}, which is gone. It stays.
    cluster.stop(2).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(client.peers().await.unwrap().contains_key(&2), "a member was removed without a quorum");
    cluster.shutdown().await;
}
