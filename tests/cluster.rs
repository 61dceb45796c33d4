//! Cluster mode with in-process nodes over real QUIC + mTLS on 127.0.0.1: joining, replication,
//! forwarding, consistency levels, snapshots, leave and its quorum guard.

mod common;

use std::time::Duration;

use bayard::index::SearchRequest;
use bayard::protocol::{Consistency, DocumentInput};
use common::{eventually, TestCluster};

const SETTLE: Duration = Duration::from_secs(30);

fn everything() -> SearchRequest {
    SearchRequest { query: "*".into(), limit: 1_000, exclude_docs: true, ..Default::default() }
}

async fn three_node_cluster() -> TestCluster {
    TestCluster::with_three_voters().await
}

/// `bayard_raft_log_reads_total{source="memory"}` of this process.
fn log_reads_from_memory() -> f64 {
    let text = bayard::telemetry::metrics::render().expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix("bayard_raft_log_reads_total{source=\"memory\"} "))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

fn follower_of(cluster: &TestCluster) -> u64 {
    let leader = cluster.leader().expect("a leader");
    *cluster.nodes.keys().find(|node_id| **node_id != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_join_and_replicate_writes_made_through_a_follower() {
    let cluster = three_node_cluster().await;
    let peers = cluster.client_of(1).peers().await.unwrap();
    assert_eq!(peers.len(), 3);
    for node_id in [1, 2, 3] {
        assert_eq!(peers[&node_id], cluster.address(node_id));
    }

    let follower = follower_of(&cluster);
    let through_follower = cluster.client_of(follower);
    let memory_reads_before = log_reads_from_memory();
    let documents: Vec<DocumentInput> = (0..50)
        .map(|number| DocumentInput {
            id: None,
            document_json: format!(r#"{{"_id":"f{number}","title":"through a follower {number}"}}"#),
        })
        .collect();
    through_follower.put_documents(documents).await.unwrap();
    through_follower.commit().await.unwrap();

    for node_id in [1, 2, 3] {
        let client = cluster.client_of(node_id);
        let replicated = eventually(SETTLE, || async {
            client
                .search(everything(), Consistency::Local)
                .await
                .map(|result| result.count == Some(50))
                .unwrap_or(false)
        })
        .await;
        assert!(replicated, "node {node_id} never saw the 50 documents");
        assert_eq!(client.get("f7").await.unwrap().unwrap().fields["title"], "through a follower 7");
    }
    // The new entries were read back from memory: to apply them, on every node, and on the
    // leader to send them to each follower (the counter is the process's, shared by the three
    // nodes and by other tests, which only add to it).
    let memory_reads = log_reads_from_memory() - memory_reads_before;
    assert!(memory_reads >= 5.0, "{memory_reads} log reads answered from memory");
    // Once every node applied them and every follower holds them, they are given back.
    for node_id in [1, 2, 3] {
        let node = &cluster.nodes[&node_id];
        let released = eventually(SETTLE, || async { node.log_entries_in_memory_bytes() == 0 }).await;
        assert!(released, "node {node_id} still keeps {} bytes of entries", node.log_entries_in_memory_bytes());
    }

    // Liveness comes from the membership exchange, which converges within a few seconds.
    let viewer = cluster.client_of(follower);
    let converged = eventually(SETTLE, || async {
        viewer.status().await.is_ok_and(|status| {
            status.members.len() == 3
                && status.members.iter().all(|member| member.role == "voter" && member.state == "alive")
        })
    })
    .await;
    assert!(converged, "{:?}", viewer.status().await);
    assert_eq!(viewer.status().await.unwrap().leader, cluster.leader());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_searches_never_miss_an_acknowledged_commit() {
    let cluster = three_node_cluster().await;
    let follower = follower_of(&cluster);
    let writer = cluster.client_of(follower);
    let reader = cluster.client_of(follower);
    for round in 0..20_u64 {
        writer.put(&format!("lin{round}"), &format!(r#"{{"title":"round {round}","year":{round}}}"#)).await.unwrap();
        writer.commit().await.unwrap();
        // Asked of the follower, served by the leader after a read-index check.
        let result = reader.search(everything(), Consistency::Linearizable).await.unwrap();
        assert_eq!(result.count, Some(round + 1), "round {round}: a linearizable search missed an acknowledged commit");
        assert_eq!(Some(result.node_id), cluster.leader());
        let leader_read = reader.search(everything(), Consistency::Leader).await.unwrap();
        assert_eq!(Some(leader_read.node_id), cluster.leader());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_joins_after_the_log_was_purged_is_brought_up_by_snapshot() {
    let mut cluster = TestCluster::new();
    cluster.timings.snapshot_after_entries = 20;
    cluster.timings.entries_kept_after_snapshot = 0;
    cluster.start(1, None).await;
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    let client = cluster.client_of(1);
    for round in 0..30 {
        client.put(&format!("s{round}"), &format!(r#"{{"title":"before the snapshot {round}"}}"#)).await.unwrap();
        client.commit().await.unwrap();
    }
    // The log behind the snapshot is gone: a new node cannot be caught up from entries.
    let raft = cluster.nodes[&1].raft().clone();
    let purged = raft
        .wait(Some(SETTLE))
        .metrics(|metrics| metrics.snapshot.is_some() && metrics.purged.is_some(), "snapshot built and log purged")
        .await
        .unwrap();
    assert!(purged.purged.unwrap().index > 10);

    cluster.start(2, Some(1)).await;
    cluster.wait_for_voters(2, &[1, 2], SETTLE).await;
    let joined = cluster.nodes[&2].raft().metrics().borrow().clone();
    assert!(joined.snapshot.is_some(), "node 2 was not brought up by a snapshot: {joined:?}");
    let second = cluster.client_of(2);
    let caught_up = eventually(SETTLE, || async {
        second.search(everything(), Consistency::Local).await.map(|result| result.count == Some(30)).unwrap_or(false)
    })
    .await;
    assert!(caught_up, "node 2 does not hold the 30 documents");
    assert_eq!(second.get("s29").await.unwrap().unwrap().fields["title"], "before the snapshot 29");
    // Writes after the snapshot reach it by replication.
    client.put("after", r#"{"title":"after the snapshot"}"#).await.unwrap();
    client.commit().await.unwrap();
    assert!(eventually(SETTLE, || async { second.get("after").await.unwrap().is_some() }).await);

    // A restart of the node that installed the snapshot resumes from it.
    cluster.stop(2).await;
    let config = cluster.config(2, vec![]);
    cluster.nodes.insert(2, common::start_node(config).await);
    let restarted = cluster.client_of(2);
    assert!(
        eventually(SETTLE, || async {
            restarted
                .search(everything(), Consistency::Local)
                .await
                .map(|result| result.count == Some(31))
                .unwrap_or(false)
        })
        .await
    );
    cluster.shutdown().await;
}

/// A snapshot far larger than the frame limit reaches a new member in chunks that fit the limit.
/// Chunks were 4 MiB whatever `--max-frame-bytes` said: under 64 KiB, the leader's encoder refused
/// every chunk, and a node that needed the snapshot never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_larger_than_the_frame_limit_reaches_a_new_member() {
    const FRAME_LIMIT: usize = 64 * 1024;
    const DOCUMENTS: usize = 40;
    let mut cluster = TestCluster::new();
    cluster.timings.snapshot_after_entries = 20;
    cluster.timings.entries_kept_after_snapshot = 0;
    let start = |cluster: &mut TestCluster, node_id: u64, peers: Vec<(u64, String)>| {
        let mut config = cluster.config(node_id, peers);
        config.max_frame_bytes = FRAME_LIMIT;
        config
    };
    let config = start(&mut cluster, 1, vec![]);
    cluster.nodes.insert(1, common::start_node(config).await);
    cluster.wait_for_voters(1, &[1], SETTLE).await;
    // Words of random letters: tantivy's stores and term dictionary cannot shrink them much, so
    // 40 documents of 40 KB make a snapshot of megabytes from requests that each fit a frame.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut letter = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (b'a' + (state % 26) as u8) as char
    };
    let client = cluster.client_of(1);
    for number in 0..DOCUMENTS {
        let words: Vec<String> = (0..4_500).map(|_| (0..8).map(|_| letter()).collect()).collect();
        let document = serde_json::json!({ "title": format!("large {number}"), "body": words.join(" ") });
        client.put(&format!("large{number}"), &document.to_string()).await.unwrap();
        client.commit().await.unwrap();
    }
    let raft = cluster.nodes[&1].raft().clone();
    raft.wait(Some(SETTLE))
        .metrics(
            // Each document is two entries (put, commit): a snapshot of 30 of them at least.
            |metrics| metrics.purged.is_some_and(|purged| purged.index >= 60),
            "a snapshot of most documents built and the log behind it purged",
        )
        .await
        .unwrap();
    let snapshots = cluster.data[&1].path().join("raft").join("snapshots");
    let largest =
        std::fs::read_dir(&snapshots).unwrap().map(|entry| entry.unwrap().metadata().unwrap().len()).max().unwrap_or(0);
    assert!(
        largest > (FRAME_LIMIT + bayard::raft::network::RAFT_FRAME_OVERHEAD_BYTES) as u64,
        "the snapshot ({largest} bytes) must not fit one Raft frame for this test to mean anything"
    );

    let address = cluster.address(1);
    let config = start(&mut cluster, 2, vec![(1, address)]);
    cluster.nodes.insert(2, common::start_node(config).await);
    cluster.wait_for_voters(2, &[1, 2], SETTLE).await;
    let joined = cluster.nodes[&2].raft().metrics().borrow().clone();
    assert!(joined.snapshot.is_some(), "node 2 was not brought up by a snapshot: {joined:?}");
    let second = cluster.client_of(2);
    let caught_up = eventually(SETTLE, || async {
        second
            .search(everything(), Consistency::Local)
            .await
            .map(|result| result.count == Some(DOCUMENTS as u64))
            .unwrap_or(false)
    })
    .await;
    assert!(caught_up, "node 2 does not hold the {DOCUMENTS} documents");
    let last = second.get(&format!("large{}", DOCUMENTS - 1)).await.unwrap().unwrap();
    assert_eq!(last.fields["title"], format!("large {}", DOCUMENTS - 1));
    // The honest client is still served by the leader.
    assert!(client.get("large0").await.unwrap().is_some());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leave_removes_a_node_and_guards_the_quorum() {
    let mut cluster = three_node_cluster().await;
    let admin = cluster.client_of(1);

    // Node 3 stops; removing node 2 would leave {1, 3} with one voter answering: refused.
    cluster.stop(3).await;
    let error = admin.leave(2, false).await.unwrap_err();
    assert!(error.to_string().contains("fewer than the 2 a quorum needs"), "{error}");
    assert!(error.to_string().contains("--force"), "{error}");
    // Removing the stopped node itself leaves {1, 2}, both answering: allowed.
    admin.leave(3, false).await.unwrap();
    cluster.wait_for_voters(1, &[1, 2], SETTLE).await;
    assert_eq!(admin.peers().await.unwrap().keys().copied().collect::<Vec<_>>(), vec![1, 2]);

    // A removed node's data directory does not serve again.
    let config = cluster.config(3, vec![]);
    let refused = bayard::node::Node::start(config).await;
    // Node 3 was down when removed; it learns it when it comes back (its data still lists it,
    // so it starts, and stops as soon as the new membership reaches it), or it was told.
    if let Ok(node) = refused {
        let stopped = tokio::time::timeout(SETTLE, node.stopped()).await;
        assert!(stopped.is_ok(), "a removed node kept running");
        node.shutdown().await;
    }
    // From then on the directory is refused at start, with what to do instead.
    let error = bayard::node::Node::start(cluster.config(3, vec![])).await.err().expect("refused");
    assert!(error.to_string().contains("node 3 was removed from the cluster"), "{error}");

    // A fresh node with a new id joins the two remaining.
    cluster.start(4, Some(2)).await;
    cluster.wait_for_voters(1, &[1, 2, 4], SETTLE).await;
    // Leaving a running node: it stops by itself and says why.
    admin.leave(4, false).await.unwrap();
    let reason = tokio::time::timeout(SETTLE, cluster.nodes[&4].stopped()).await.expect("node 4 stops");
    assert!(reason.contains("removed"), "{reason}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_cannot_change_membership() {
    let cluster = three_node_cluster().await;
    let client = common::client_with(&cluster.address(1), cluster.certificates.client("app"));
    let error = client.leave(3, true).await.unwrap_err();
    assert!(error.to_string().contains("permission denied"), "{error}");
    assert_eq!(client.peers().await.unwrap().len(), 3);
    cluster.shutdown().await;
}

/// A write that reached the leader but was not committed before its deadline is reported as
/// "may still be applied", never as "not applied": here the leader loses both followers just
/// before the write and appends it without a majority to commit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_cut_at_its_deadline_after_reaching_the_leader_is_not_called_unapplied() {
    use bayard::index::IndexOperation;
    use bayard::raft::types::{IndexBatch, RequestId};

    let mut cluster = three_node_cluster().await;
    let leader = cluster.leader().expect("a leader");
    let followers: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let all = cluster.client();
    all.put("before", r#"{"title":"before"}"#).await.expect("a put while all are up");
    all.commit().await.expect("commit");
    let started = std::time::Instant::now();
    let (first, second) = (cluster.nodes.remove(&followers[0]), cluster.nodes.remove(&followers[1]));
    let (first, second) = (first.expect("follower"), second.expect("follower"));
    tokio::join!(first.shutdown(), second.shutdown());
    // The leader refuses writes outright once no majority has answered for 1.8 s; this test is
    // about a write it still takes before that.
    assert!(started.elapsed() < Duration::from_millis(1_000), "stopping the followers took {:?}", started.elapsed());
    let batch = IndexBatch::of_request(
        vec![IndexOperation::Put { id: "cut".into(), document_json: r#"{"title":"cut"}"#.into() }],
        RequestId(77),
    );
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    let error = cluster.nodes[&leader].cluster().propose(batch, deadline).await.expect_err("no quorum to commit it");
    let message = error.to_string();
    assert!(message.contains("may still be applied"), "{message}");
    assert!(!message.contains("it was not applied"), "{message}");

    // The node is not stuck: it still serves what it holds.
    let client = cluster.client_of(leader);
    assert!(client.get("before").await.expect("a read on the leader").is_some());
    cluster.shutdown().await;
}
